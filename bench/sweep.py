"""Operator sweep (issue 3): NSTM against flash attention and fla's gated slot / gated linear attention.

    python bench/sweep.py                 # GPU when there is one, else a small CPU sweep
    python bench/sweep.py --device cpu    # the CPU paths at small sizes (says so in every row)
    python bench/sweep.py --quick         # a few sizes, for a smoke run

On a GPU (the issue's shapes): bf16, B·T = 32,768 tokens, H = 16, K = V = S = 64, top_k = 8, C = 64,
T from 512 to 65,536 (B = 32,768 / T, at least 1). Methods:

- ``nstm-triton``: ``nstm_attention(backend="triton")``, with the s2s attention on;
- ``nstm-chunked``: the PyTorch chunk-parallel path (the CUDA default until the GPU grid passes);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (causal, flash backend);
- ``fla-chunk_gsa`` / ``fla-chunk_gla``: fla's kernels on the same shapes when ``fla`` imports
  (``pip install --no-deps fla-core==0.6.0 einops``, or ``make bench-deps``; ``make bench`` itself
  installs nothing).

Each row has the forward and forward+backward medians (``triton.testing.do_bench`` on GPU,
wall-clock medians on CPU), peak memory of a forward+backward (GPU), and for NSTM the time as a
multiple of the memory floor: the bytes of the operator's inputs and outputs (and for the backward
their gradients) over the GPU's measured copy bandwidth (3.0 TB/s on an H100; on a GPU without a
measured bandwidth in ``COPY_BYTES_PER_S`` the × floor columns stay empty rather than compare it
with another GPU's). Before timing, every NSTM path is checked against the chunked path on the
first shape; a path that fails or disagrees is reported with the reason, not timed.

Writes ``bench/results/<device>-<commit>-<date>.{md,json,png}`` (``cpu-<commit>-<date>-sweep`` on
the CPU; ``-2``, ``-3``, ... is added when such files exist, so nothing is overwritten) and says
where. A progress bar on stderr follows the rows when stdout is a terminal (``--no-progress``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nstm.progress import progress as progress_bar  # noqa: E402
from nstm_kernels import S2SParams, nstm_attention  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    atomic_write,
    device_name,
    git_commit,
    plain_log_ticks,
    result_stem,
    run_date,
    slug,
    timeit,
)

# measured copy bandwidth (bytes read + written per second) of the GPUs the floor is known for,
# matched against the device name: the H100's is from ANCHORS.md
COPY_BYTES_PER_S = {"H100": 3.0e12}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

GPU_CFG = dict(tokens=32768, H=16, D=64, top_k=8, C=64, dtype="bfloat16",
               T=[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536])
CPU_CFG = dict(tokens=2048, H=4, D=32, top_k=4, C=64, dtype="float32",
               T=[128, 256, 512, 1024, 2048])
QUICK_T = {"cuda": [2048, 8192], "cpu": [128, 512]}
# the token-by-token reference is only worth timing on the CPU at short lengths
REFERENCE_MAX_T = 512


# ----------------------------------------------------------------------------- inputs per method

def nstm_inputs(B, T, H, D, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    q, k, v = r(B, T, H, D), r(B, T, H, D), r(B, T, H, D)
    logits, gate = r(B, T, H, D, scale=2.0), r(B, T, H)
    s2s = S2SParams(*(r(H, D, D, scale=D ** -0.5).float() for _ in range(2)),
                    torch.full((H,), 0.5, device=device))
    return [q, k, v, logits, gate], s2s


def nstm_fn(backend, top_k, C):
    def run(tensors, s2s):
        o, _ = nstm_attention(*tensors, top_k=top_k, s2s=s2s, comm_every=C, backend=backend)
        return o
    return run


def make_method(name: str, B, T, H, D, top_k, C, dtype, device):
    """``(fwd, leaves)``: ``fwd()`` returns the output; ``leaves`` need grads for fwd+bwd."""
    if name.startswith("nstm-"):
        backend = name.split("-", 1)[1]
        tensors, s2s = nstm_inputs(B, T, H, D, dtype, device)
        leaves = tensors + list(s2s)
        fn = nstm_fn(backend, top_k, C)
        return (lambda: fn(tensors, s2s)), leaves
    g = torch.Generator(device="cpu").manual_seed(1)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    if name == "sdpa":
        q, k, v = r(B, H, T, D), r(B, H, T, D), r(B, H, T, D)
        F = torch.nn.functional

        def fwd():
            if device.type == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return fwd, [q, k, v]
    if name == "fla-chunk_gsa":
        from fla.ops.gsa import chunk_gsa
        q, k, v, s = r(B, T, H, D), r(B, T, H, D), r(B, T, H, D), r(B, T, H, D)
        f = torch.nn.functional.logsigmoid(r(B, T, H, D).float() + 3.0).to(dtype)
        return (lambda: chunk_gsa(q, k, v, s, f)[0]), [q, k, v, s, f]
    if name == "fla-chunk_gla":
        from fla.ops.gla import chunk_gla
        q, k, v = r(B, T, H, D), r(B, T, H, D), r(B, T, H, D)
        gk = torch.nn.functional.logsigmoid(r(B, T, H, D).float() + 3.0).to(dtype)
        return (lambda: chunk_gla(q, k, v, gk)[0]), [q, k, v, gk]
    raise ValueError(f"unknown method {name!r}")


def fla_available() -> Optional[str]:
    """None when fla imports, else the reason."""
    try:
        import fla.ops.gla  # noqa: F401
        import fla.ops.gsa  # noqa: F401,F811
        return None
    except Exception as e:   # ImportError, or fla failing on this torch/triton
        return f"{type(e).__name__}: {e}".splitlines()[0][:160]


# ----------------------------------------------------------------------------- timing

def _fwdbwd(fwd: Callable, leaves: List[torch.Tensor]) -> Callable:
    def run():
        for t in leaves:
            t.grad = None
        o = fwd()
        o.backward(torch.ones_like(o))
    return run


def time_ms(fn: Callable, device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=max(50, reps * 10)))
    return timeit(fn, reps)[0]


def peak_mib(fn: Callable, device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def copy_bandwidth(name: str) -> Optional[float]:
    """The measured copy bandwidth of the GPU called ``name``, or None when it is not known."""
    return next((bw for key, bw in COPY_BYTES_PER_S.items() if key.lower() in name.lower()), None)


def nstm_floor_ms(B, T, H, D, dtype, bytes_per_s: float) -> Dict[str, float]:
    """Memory floor of the NSTM operator at ``bytes_per_s``: every input read once and the output
    written once (fwd); the backward reads the inputs and d_o and writes a gradient per input."""
    elt = torch.finfo(getattr(torch, dtype)).bits // 8
    n = B * T * H
    inputs = n * (3 * D + D + 1) * elt          # q, k, v, route logits (S = D), gate
    out = n * D * elt
    fwd = inputs + out
    bwd = inputs + out + inputs
    return {"fwd": fwd / bytes_per_s * 1e3, "fwdbwd": (fwd + bwd) / bytes_per_s * 1e3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- the sweep

def check_nstm_paths(methods, cfg, T, device) -> Dict[str, str]:
    """Each NSTM path against the chunked path on one shape; returns {method: reason} for failures."""
    B = max(1, cfg["tokens"] // T)
    tol = 1e-4 if cfg["dtype"] == "float32" else 2e-2
    bad = {}
    tensors, s2s = nstm_inputs(B, T, cfg["H"], cfg["D"], getattr(torch, cfg["dtype"]), device)
    with torch.no_grad():
        want = nstm_fn("chunked", cfg["top_k"], cfg["C"])(tensors, s2s)
        for m in methods:
            if not m.startswith("nstm-") or m == "nstm-chunked":
                continue
            try:
                got = nstm_fn(m.split("-", 1)[1], cfg["top_k"], cfg["C"])(tensors, s2s)
                err = rel_err(got, want)
                if not (err <= tol):
                    bad[m] = f"disagrees with nstm-chunked: relative error {err:.2e} > {tol:.0e}"
            except Exception as e:
                bad[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return bad


def run_sweep(device: torch.device, cfg: dict, methods: List[str], reps: int, progress=True,
              bytes_per_s: Optional[float] = None):
    """The rows, one per (T, method); ``bytes_per_s`` (the GPU's copy bandwidth) adds the
    × floor columns of the NSTM rows."""
    dtype = getattr(torch, cfg["dtype"])
    skipped = check_nstm_paths(methods, cfg, cfg["T"][0], device)
    rows = []
    bar = progress_bar(total=len(cfg["T"]) * len(methods), desc="sweep", unit="row", enabled=progress)
    for T in cfg["T"]:
        B = max(1, cfg["tokens"] // T)
        for m in methods:
            row = dict(method=m, T=T, B=B, H=cfg["H"], K=cfg["D"], V=cfg["D"], dtype=cfg["dtype"])
            if m.startswith("nstm-"):
                row.update(S=cfg["D"], top_k=cfg["top_k"], C=cfg["C"], s2s=True)
            bar.set_postfix(T=T, method=m)
            if m in skipped:
                row["error"] = skipped[m]
            elif m == "nstm-reference" and T > REFERENCE_MAX_T:
                row["error"] = f"not timed above T={REFERENCE_MAX_T} (token by token)"
            else:
                try:
                    fwd, leaves = make_method(m, B, T, cfg["H"], cfg["D"], cfg["top_k"], cfg["C"],
                                              dtype, device)
                    with torch.no_grad():
                        row["fwd_ms"] = time_ms(fwd, device, reps)
                    for t in leaves:
                        t.requires_grad_(True)
                    fb = _fwdbwd(fwd, leaves)
                    row["fwdbwd_ms"] = time_ms(fb, device, reps)
                    row["peak_mib"] = peak_mib(fb, device)
                    del fwd, leaves, fb
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if m.startswith("nstm-") and "fwd_ms" in row and device.type == "cuda" and bytes_per_s:
                floor = nstm_floor_ms(B, T, cfg["H"], cfg["D"], cfg["dtype"], bytes_per_s)
                row["floor_fwd_ms"], row["floor_fwdbwd_ms"] = floor["fwd"], floor["fwdbwd"]
                row["fwd_x_floor"] = row["fwd_ms"] / floor["fwd"]
                row["fwdbwd_x_floor"] = row["fwdbwd_ms"] / floor["fwdbwd"]
            rows.append(row)
            bar.update(1)
    bar.close()
    return rows


# ----------------------------------------------------------------------------- reports

def _fmt(x, digits=3):
    if x is None:
        return "–"
    return f"{x:,.{digits}f}"


def markdown(rows, meta) -> str:
    lines = [f"# Operator sweep: {meta['device']}", "",
             f"commit `{meta['commit']}`, torch {meta['torch']}, triton {meta['triton']}, "
             f"{meta['date']}. {meta['note']}", "",
             f"Shapes: B·T = {meta['cfg']['tokens']:,} tokens, H = {meta['cfg']['H']}, "
             f"K = V = S = {meta['cfg']['D']}, top_k = {meta['cfg']['top_k']}, "
             f"C = {meta['cfg']['C']}, {meta['cfg']['dtype']}. Times are medians in ms; "
             + (f"× floor is the time over the memory floor (inputs and outputs at "
                f"{meta['copy_bytes_per_s'] / 1e12:.1f} TB/s, this GPU's measured copy bandwidth)."
                if meta.get("copy_bytes_per_s") else
                "the × floor columns are empty (no measured copy bandwidth for this device)."), "",
             "| method | T | B | fwd ms | fwd+bwd ms | peak MiB (fwd+bwd) | fwd × floor | fwd+bwd × floor | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['T']:,} | {r['B']} | {_fmt(r.get('fwd_ms'))} | "
            f"{_fmt(r.get('fwdbwd_ms'))} | {_fmt(r.get('peak_mib'), 0)} | "
            f"{_fmt(r.get('fwd_x_floor'), 1)} | {_fmt(r.get('fwdbwd_x_floor'), 1)} | "
            f"{r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def plot(rows, meta, path) -> Optional[str]:
    """Forward and forward + backward medians against T, one colour per method in both panels.
    Only timed rows are drawn; the rows that were not timed are listed under the panels."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colour = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, key in enumerate(("fwd_ms", "fwdbwd_ms")):
        for m in methods:
            pts = [(r["T"], r[key]) for r in rows if r["method"] == m and r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax[i].plot(xs, ys, marker="o", color=colour[m], label=m)
        ax[i].set_xscale("log", base=2)
        ax[i].set_yscale("log")
        ax[i].set_xlabel(f"sequence length T (tokens; batch B = {meta['cfg']['tokens']:,} / T)")
        ax[i].set_ylabel("time per call (ms, median)")
        ax[i].set_title("forward" if key == "fwd_ms" else "forward + backward")
        ax[i].grid(True, which="both", alpha=0.3)
        ax[i].legend(fontsize=8)
        plain_log_ticks(ax[i])
    missing = {}
    for r in rows:
        if "error" in r:
            missing.setdefault((r["method"], r["error"]), []).append(r["T"])
    if missing:
        text = "not timed or failed (no point drawn for a time not measured): " + "; ".join(
            f"{m} at T = {', '.join(f'{t:,}' for t in ts)} ({why[:70]})" for (m, why), ts in missing.items())
        fig.text(0.01, 0.01, text, fontsize=7, wrap=True, va="bottom")
    fig.suptitle(f"{meta['device']} · {meta['cfg']['dtype']} · commit {meta['commit']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.08 if missing else 0, 1, 1))
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--quick", action="store_true", help="two lengths only (a smoke run)")
    ap.add_argument("--T", type=int, nargs="+", help="override the lengths")
    ap.add_argument("--methods", nargs="+", help="override the methods")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (CPU)")
    ap.add_argument("--out", default=RESULTS, help="folder for the .md/.json/.png")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch "
                 f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    else:
        device = torch.device(args.device)
    cfg = dict(GPU_CFG if device.type == "cuda" else CPU_CFG)
    if args.quick:
        cfg["T"] = QUICK_T[device.type]
    if args.T:
        if any(t < 1 for t in args.T):
            ap.error("--T: lengths must be >= 1")
        cfg["T"] = sorted(args.T)
    if device.type == "cuda":
        methods = ["nstm-triton", "nstm-chunked", "sdpa"]
        reason = fla_available()
        methods += [] if reason else ["fla-chunk_gsa", "fla-chunk_gla"]
        note = "GPU sweep." + (f" fla not available ({reason}): no chunk_gsa/chunk_gla rows."
                               if reason else " fla rows from fla-core.")
    else:
        methods = ["nstm-chunked", "nstm-reference", "sdpa"]
        note = ("CPU sweep at small sizes: no GPU here, so these rows time the PyTorch paths on the "
                "CPU (fp32); they are not comparable with the GPU anchors, and the × floor columns "
                "(a GPU's memory bandwidth) are left empty.")
    if args.methods:
        methods = args.methods
    reps = args.reps or (3 if device.type == "cpu" else 10)

    name = device_name(device)
    commit = git_commit()
    bandwidth = copy_bandwidth(name) if device.type == "cuda" else None
    if device.type == "cuda" and bandwidth is None:
        note += (" No measured copy bandwidth for this GPU (COPY_BYTES_PER_S): the × floor columns "
                 "are left empty.")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    meta = dict(device=name, commit=commit, torch=torch.__version__, triton=triton_version,
                date=time.strftime("%Y-%m-%d"), cfg=cfg, methods=methods, note=note,
                copy_bytes_per_s=bandwidth)
    print(f"# {name} · commit {commit} · {note}", flush=True)
    rows = run_sweep(device, cfg, methods, reps, progress=not args.no_progress, bytes_per_s=bandwidth)
    for r in rows:
        r["device"], r["commit"] = name, commit

    stem = result_stem(args.out, f"{slug(name) if device.type == 'cuda' else 'cpu'}-{commit}-{run_date()}"
                       + ("" if device.type == "cuda" else "-sweep"), [".md", ".json", ".png"])
    md = markdown(rows, meta)
    atomic_write(stem + ".md", md)
    atomic_write(stem + ".json", json.dumps(dict(meta=meta, rows=rows), indent=1))
    png = plot(rows, meta, stem + ".png")
    print(md)
    print(f"wrote {stem}.md, {stem}.json" + (f", {png}" if png else ""))
    return rows


if __name__ == "__main__":
    main()
