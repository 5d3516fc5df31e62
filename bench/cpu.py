"""The NSTM operator on the CPU against SDPA, alone and next to another busy program (issue 12).

    python bench/cpu.py                 # the whole table (~5 min on 2 cores)
    python bench/cpu.py --quick         # a smoke run at small T (< 1 min)
    python bench/cpu.py --no-contention # only the cases without a competing process

Shapes: H = 4, K = V = S = 32, top_k = 4, C = 64, s2s on, fp32. Rows:

* ``nstm`` — the default ``"chunked"`` backend on CPU tensors (the C++ kernel, ``nstm_kernels.cpu``,
  its automatic schedule: the block-parallel one for calls of at most 16 (sequence, head) pairs);
* ``nstm-units`` — the same kernel with one task per (sequence, head) (``schedule="units"``, the
  only schedule before the block-parallel one);
* ``nstm-torch`` — the PyTorch chunk form (``nstm_kernels.chunked.chunk_nstm``, what the backend
  runs without a compiler);
* ``sdpa`` — ``F.scaled_dot_product_attention(is_causal=True)`` on ``[B, H, T, 32]``.

Each case is timed at 1 and 2 intra-op threads (``torch.set_num_threads``), alone, and (2 threads)
next to a competing process this script starts itself and ends by its pid: ``busy`` (a Python
``while True`` loop, one core) and ``matmul`` (a 2-thread fp32 matmul loop, like a neighbour's
training). It also times a 2048 x 2048 fp32 matmul at the same thread count, the machine's practical
ceiling, and reports the operator's GFLOP/s (FLOPs by the operator's definition,
``nstm_kernels.flops.nstm_flops``) against it. Medians of ``--reps`` runs after one warm-up; the
device, the thread count and the commit are in every row, and ``cores``: the process's CPU time
over the wall time of the row's runs (next to a neighbour: the share of the machine it got, so
a slowdown splits into a lost share and a lost speed per CPU second). Writes
``bench/results/cpu-<commit>-<date>.{json,md,png}`` (or into ``--out``; ``-2``, ``-3``, ... is
added to the name when such files exist, so nothing is overwritten) and says where. A progress
bar on stderr follows the rows when stdout is a terminal (``--no-progress`` turns it off).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nstm.progress import progress  # noqa: E402
from nstm_kernels import cpu, nstm_attention  # noqa: E402
from nstm_kernels.chunked import chunk_nstm  # noqa: E402
from nstm_kernels.flops import nstm_flops  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_paths  # noqa: E402
from common import atomic_write, cpu_name, git_commit, plain_log_ticks, result_stem, run_date, timeit  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
H, D, TOP_K, C = 4, 32, 4, 64

# (T, B, mode): the table
CASES = [(2048, 1, "fwd"), (2048, 4, "fwdbwd"), (8192, 1, "fwdbwd"), (32768, 1, "fwdbwd")]
QUICK_CASES = [(512, 1, "fwd"), (512, 2, "fwdbwd"), (1024, 1, "fwdbwd")]
CONTENTION = [(2048, 4, "fwdbwd"), (8192, 1, "fwdbwd")]
QUICK_CONTENTION = [(512, 2, "fwdbwd")]

NEIGHBOURS = {
    "busy": "while True:\n    pass\n",
    "matmul": ("import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\n"
               "while True:\n    a @ a\n"),
}


def make_inputs(B, T, requires_grad):
    return cpu_paths.make_inputs(B, T, H, D, D, requires_grad=requires_grad)


def runner(impl, B, T, mode):
    """A no-argument function that runs one call (and its backward in ``fwdbwd``)."""
    grad = mode == "fwdbwd"
    ts, s2s = make_inputs(B, T, grad)
    if impl == "sdpa":
        q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_(grad) for t in ts[:3])

        def run():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if grad:
                o.square().sum().backward()
        return run
    if impl == "nstm-torch":
        fn = chunk_nstm
    elif impl == "nstm-units":
        def fn(*a):
            return cpu.cpu_nstm(*a, schedule="units")
    else:
        def fn(*a):
            return nstm_attention(*a, backend="chunked")

    def run():
        o, st = fn(*ts, TOP_K, s2s, C, None, True)
        if grad:
            (o.square().sum() + st.v.sum()).backward()
    return run


def default_reps(quick: bool, T: int, impl: str, neighbour: str) -> int:
    """Timed runs per row: 11 (a 5-run median moved by up to 30 % between runs on a 2-core VM,
    and the slowdown rows divide two of them); 3 for the slowest rows (T >= 32K, the PyTorch chunk
    form next to a neighbour: seconds per call); 2 in a quick run."""
    if quick:
        return 2
    if T >= 32768 or (impl == "nstm-torch" and neighbour != "alone"):
        return 3
    return 11


def matmul_gflops(reps=5):
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    ms, _, _ = timeit(lambda: a @ b, reps)
    return 2 * 2048 ** 3 / (ms * 1e-3) / 1e9


class Neighbour:
    """A competing process for the duration of a ``with`` block, ended by its pid."""

    def __init__(self, kind):
        self.kind, self.proc = kind, None

    def __enter__(self):
        if self.kind != "alone":
            env = dict(os.environ, OMP_NUM_THREADS="2")
            self.proc = subprocess.Popen([sys.executable, "-c", NEIGHBOURS[self.kind]], env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.5 if self.kind == "matmul" else 0.3)   # let it import and get going
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small T, few reps (< 1 min)")
    ap.add_argument("--reps", type=int, help="timed runs per row (default 11; 3 at T >= 32K and for the "
                    "PyTorch chunk form next to a neighbour; 2 quick)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-contention", action="store_true", help="skip the cases next to a neighbour")
    ap.add_argument("--out", default=RESULTS, help="output directory")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    cases = QUICK_CASES if args.quick else CASES
    contention = [] if args.no_contention else (QUICK_CONTENTION if args.quick else CONTENTION)
    kernel = cpu.unavailable_reason()
    impls = ["nstm", "nstm-units", "nstm-torch", "sdpa"]
    if kernel is not None:                      # no C++ kernel: "units" would run the same form
        impls.remove("nstm-units")
    device, commit = cpu_name(), git_commit()
    print(f"# device: {device}, torch {torch.__version__}, commit {commit}")
    print(f"# H={H} S=K=V={D} top_k={TOP_K} C={C}, s2s on, fp32; nstm = chunked backend "
          f"({'C++ kernel' if kernel is None else 'PyTorch chunk form: ' + kernel})")
    rows = []
    threads_before = torch.get_num_threads()
    bar = progress(total=len(impls) * (len(args.threads) * len(cases) + 2 * len(contention)),
                   desc="cpu bench", unit="row", enabled=not args.no_progress)

    def record(T, B, mode, threads, neighbour, ceiling):
        base = {}
        for impl in impls:
            reps = args.reps or default_reps(args.quick, T, impl, neighbour)
            torch.set_num_threads(threads)
            with Neighbour(neighbour):
                fn = runner(impl, B, T, mode)
                w0, c0 = time.perf_counter(), time.process_time()
                ms, lo, hi = timeit(fn, reps)
                cores = (time.process_time() - c0) / (time.perf_counter() - w0)
            flops = (nstm_flops(B, T, H, D, D, D, TOP_K, C, backward=mode == "fwdbwd")
                     if impl != "sdpa" else None)
            row = dict(device=device, threads=threads, commit=commit, T=T, B=B, mode=mode,
                       neighbour=neighbour, impl=impl, ms=round(ms, 2), p20=round(lo, 2),
                       p80=round(hi, 2), reps=reps, cores=round(cores, 2),
                       gflops=None if flops is None else round(flops / (ms * 1e-3) / 1e9, 2),
                       matmul_gflops=round(ceiling, 1))
            base[impl] = ms
            rows.append(row)
            bar.update(1)
            bar.write(f"T={T:>6} B={B} {mode:>6} threads={threads} {neighbour:>6} {impl:>10}: "
                      f"{ms:9.1f} ms [{lo:.1f}, {hi:.1f}] on {cores:.2f} cores"
                      + (f"  {row['gflops']:.2f} GFLOP/s of {ceiling:.0f}" if flops else ""),
                      file=sys.stdout)
        for r in rows[-len(impls):]:
            r["vs_sdpa"] = round(r["ms"] / base["sdpa"], 3)

    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            ceiling = matmul_gflops()
            bar.write(f"# matmul 2048^2 fp32 at {threads} threads: {ceiling:.1f} GFLOP/s", file=sys.stdout)
            for T, B, mode in cases:
                record(T, B, mode, threads, "alone", ceiling)
        for neighbour in ("busy", "matmul"):
            torch.set_num_threads(2)
            with Neighbour(neighbour):
                ceiling = matmul_gflops()
            for T, B, mode in contention:
                record(T, B, mode, 2, neighbour, ceiling)
    finally:
        torch.set_num_threads(threads_before)
        bar.close()

    # slowdown next to a neighbour, against the same case alone
    alone = {(r["T"], r["B"], r["mode"], r["impl"]): r["ms"] for r in rows
             if r["neighbour"] == "alone" and r["threads"] == 2}
    for r in rows:
        a = alone.get((r["T"], r["B"], r["mode"], r["impl"]))
        r["slowdown"] = None if a is None else round(r["ms"] / a, 2)

    stem = result_stem(args.out, f"cpu-{commit}-{run_date()}" + ("-quick" if args.quick else ""),
                       [".json", ".md", ".png"])
    atomic_write(stem + ".json", json.dumps(rows, indent=1) + "\n")
    atomic_write(stem + ".md", markdown(rows, device, commit))
    print(f"# wrote {stem}.json and {stem}.md")
    if not args.no_plot:
        try:
            plot(rows, stem + ".png", device, commit)
            print(f"# wrote {stem}.png")
        except ImportError:
            print("# matplotlib is not installed: no plot")
        except ValueError as e:
            print(f"# no plot: {e}")
    return rows


def markdown(rows, device, commit):
    out = [f"# NSTM operator on the CPU against SDPA (commit {commit})", "",
           f"Device: {device}. H = {H}, K = V = S = {D}, top_k = {TOP_K}, C = {C}, s2s on, fp32. "
           "Medians in ms; `vs SDPA` = NSTM time / SDPA time in the same conditions; `slowdown` = "
           "time next to the neighbour / time alone (2 threads); cores = CPU time / wall time of "
           "the row (nstm, SDPA); GFLOP/s by the operator's definition against a 2048² fp32 matmul in "
           "the same conditions. nstm (C++) is the automatic schedule (block-parallel for B·H <= 16 "
           "with gradients), per unit is the one-task-per-(sequence, head) schedule.", "",
           "| T | B | mode | threads | neighbour | nstm (C++) | nstm (C++, per unit) | "
           "nstm (PyTorch chunk form) | SDPA | nstm vs SDPA | nstm slowdown | per-unit slowdown | "
           "SDPA slowdown | cores (nstm, SDPA) | nstm GFLOP/s (matmul) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["T"], r["B"], r["mode"], r["threads"], r["neighbour"]), {})[r["impl"]] = r
    for (T, B, mode, th, nb), g in keyed.items():
        n, t, s, u = g["nstm"], g["nstm-torch"], g["sdpa"], g.get("nstm-units")
        sl = (lambda r: "" if r is None or r["slowdown"] is None or nb == "alone" else f"{r['slowdown']:.2f}x")
        ums = "" if u is None else f"{u['ms']:.1f}"
        out.append(f"| {T:,} | {B} | {mode} | {th} | {nb} | {n['ms']:.1f} | {ums} | {t['ms']:.1f} | "
                   f"{s['ms']:.1f} | {n['vs_sdpa']:.2f} | {sl(n)} | {sl(u)} | {sl(s)} | "
                   f"{n['cores']:.2f}, {s['cores']:.2f} | {n['gflops']:.2f} ({n['matmul_gflops']:.0f}) |")
    return "\n".join(out) + "\n"


IMPL_STYLE = {   # one colour and marker per implementation, the same in every panel
    "nstm": dict(color="tab:blue", marker="o", ls="-", label="nstm (C++ kernel, automatic schedule)"),
    "nstm-units": dict(color="tab:purple", marker="x", ls=":", label="nstm (C++ kernel, per unit)"),
    "nstm-torch": dict(color="tab:orange", marker="s", ls="--", label="nstm (PyTorch chunk form)"),
    "sdpa": dict(color="tab:green", marker="^", ls="-", label="SDPA (causal)"),
}


def plot(rows, path, device, commit):
    """Forward + backward time per 1K tokens against T, alone, one panel per thread count (one
    shared y axis). Only measured rows are drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    alone = [r for r in rows if r["neighbour"] == "alone" and r["mode"] == "fwdbwd"]
    threads = sorted({r["threads"] for r in alone})
    if not threads:
        raise ValueError("no forward + backward rows without a neighbour to plot")
    fig, axes = plt.subplots(1, len(threads), figsize=(5.5 * len(threads), 4), sharey=True,
                             squeeze=False)
    for th, ax in zip(threads, axes[0]):
        for impl, style in IMPL_STYLE.items():
            pts = sorted((r["T"], r["ms"] / (r["B"] * r["T"] / 1024)) for r in alone
                         if r["threads"] == th and r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts), **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel("forward + backward time per 1K tokens (ms)")
        ax.yaxis.set_tick_params(which="both", labelleft=True)
        ax.set_title(f"alone, {th} thread{'s' if th > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        plain_log_ticks(ax, "x")
    plain_log_ticks(axes[0, 0], "y")                    # the y axis is shared: set once
    fig.suptitle(f"NSTM (H={H}, S=K=V={D}, top_k={TOP_K}, C={C}, fp32) vs SDPA on {device} @ {commit}",
                 fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
