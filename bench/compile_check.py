"""Compile every Triton kernel for real GPUs on a machine without one, and report its resources.

    python bench/compile_check.py                        # sm_80 and sm_90, S = K = V = 64 and 128, bf16
    python bench/compile_check.py --arch 90 --dims 32 --dtype fp32 --out /tmp/cc

The Triton interpreter (the CI's correctness check) runs the kernels' Python, not their GPU code:
it cannot tell whether a kernel compiles, how many registers it takes, whether it spills, or
whether its shared memory fits the GPU. This tool runs each public Triton entry point (routing,
s2s, the one-token step, the sequence operator with the chunk and the recurrent forward and
backward) on CPU tensors with every kernel launch *recorded instead of run*. The block sizes and
``num_warps`` are the ones ``nstm_kernels.triton.device`` picks for the target GPU. Each distinct
launch is then compiled with ``triton.compile`` for that target (Triton's bundled ptxas), and
``cuobjdump -res-usage`` reads registers and stack (spill) bytes from the cubin.

Output: a table per launch (kernel, target, shape, dtype, warps, registers, stack bytes, shared
memory, and on which GPUs that shared memory fits), written to
``bench/results/compile-<commit>-<date>.{md,json}`` (``-2``, ``-3``, ... added when such files
exist, so nothing is overwritten). Exit status 1 when a kernel fails to compile or
needs more shared memory than its target has and no other Triton kernel takes its place there
(``TRITON_FALLBACK``); spills are reported, not failed (they cost speed, not correctness).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

os.environ.pop("TRITON_INTERPRET", None)          # recorded launches must be JITFunctions

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import atomic_write, cpu_name, git_commit, result_stem, run_date  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Shared memory a block may opt in to, bytes (CUDA programming guide, "compute capabilities").
SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
                90: 227 * 1024}
GPU_NAMES = {75: "T4", 80: "A100", 86: "RTX 30xx / A10", 89: "RTX 40xx / L4", 90: "H100"}
SMS = {75: 40, 80: 108, 86: 84, 89: 58, 90: 132}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TORCH_TO_TRITON = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                   torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64", torch.int16: "i16",
                   torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


# ------------------------------------------------------------------------------------ recording
class Launch(dict):
    """One recorded kernel launch: the JITFunction and what ``triton.compile`` needs."""


@contextlib.contextmanager
def recording(arch: int):
    """Within: Triton launches are recorded (not run) into the yielded list, and the device facts
    that pick block sizes, ``num_warps`` and the dot precision are those of an sm_``arch`` GPU."""
    from triton.runtime.jit import JITFunction

    from nstm_kernels.triton import device as dev
    from nstm_kernels.triton import utils as tutils

    launches: List[Launch] = []
    info = dev.DeviceInfo(True, (arch // 10, arch % 10), SHARED_LIMIT.get(arch, 99 * 1024),
                          SMS.get(arch, 80))

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(describe(self, args, kwargs))
        return None

    saved = JITFunction.run, dev.device_info, tutils.device_info
    JITFunction.run = run
    dev.device_info = tutils.device_info = lambda device: info
    try:
        yield launches
    finally:
        JITFunction.run, dev.device_info, tutils.device_info = saved


def describe(fn, args, kwargs) -> Launch:
    """The signature, constexprs and attributes of one launch, as Triton's launcher derives them
    (pointers by element type, ints as i32/i64, 16-divisibility of pointers and ints)."""
    names = fn.arg_names
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound = inspect.signature(fn.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        val = bound.arguments[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = val
        elif val is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = None
        elif isinstance(val, torch.Tensor):
            signature[p.name] = "*" + TORCH_TO_TRITON[val.dtype]
            if val.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(val, bool):
            signature[p.name] = "i1"
        elif isinstance(val, int):
            signature[p.name] = "i32" if -2 ** 31 <= val < 2 ** 31 else "i64"
            if val % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(val, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(val).__name__} "
                            "is not handled by the recorder")
    return Launch(fn=fn, name=fn.__name__, signature=signature, constexprs=constexprs, attrs=attrs,
                  options=dict(num_warps=options.get("num_warps", 4),
                               num_stages=options.get("num_stages", 3)))


def launch_key(launch: Launch) -> str:
    const = {k: (str(v) if not isinstance(v, (int, float, bool, type(None))) else v)
             for k, v in launch["constexprs"].items()}
    return json.dumps([launch["name"], launch["signature"], const, launch["options"]], sort_keys=True)


# ------------------------------------------------------------------------------------ workloads
def workloads(S: int, K: int, V: int, top_k: int, dtype: torch.dtype, s2s: bool,
              dot: Optional[str] = None):
    """(name, callable) pairs that drive every Triton kernel once at these sizes; ``dot`` is the
    fp32 ``tl.dot`` precision (None: the package's defaults)."""
    from nstm_kernels.state import NSTMState, S2SParams
    from nstm_kernels.triton import triton_nstm, triton_nstm_step, triton_sparse_route, triton_state_attention

    B, T, H, C = 1, 2 * 64, 2, 64

    def t(*shape, grad=True, dt=dtype):
        return torch.randn(*shape, dtype=dt).requires_grad_(grad)

    def params(force=False):
        return S2SParams(t(H, V, V, dt=torch.float32), t(H, V, V, dt=torch.float32),
                         t(H, dt=torch.float32)) if s2s or force else None

    def route():
        idx, w = triton_sparse_route(t(B, T, H, S), t(B, T, H), top_k)
        w.sum().backward()

    def state_attention():
        triton_state_attention(t(B, H, S, V), params(force=True), dot_precision=dot).sum().backward()

    def step():
        with torch.no_grad():
            st = NSTMState(torch.zeros(B, H, S, K), torch.zeros(B, H, S, V), C - 1)
            triton_nstm_step(t(B, H, K, grad=False), t(B, H, K, grad=False), t(B, H, V, grad=False),
                             t(B, H, S, grad=False), t(B, H, grad=False), top_k, params(), C, st,
                             dot_precision=dot)

    def sequence(forward: str, backward: str):
        def go():
            o, _ = triton_nstm(t(B, T, H, K), t(B, T, H, K), t(B, T, H, V), t(B, T, H, S),
                               t(B, T, H), top_k, params(), C, forward=forward, backward=backward,
                               dot_precision=dot)
            o.float().sum().backward()
        return go

    return [("route", route), ("s2s", state_attention), ("step", step),
            ("sequence chunk/chunk", sequence("chunk", "chunk")),
            ("sequence recurrent/recurrent", sequence("recurrent", "recurrent"))]


def record(arch: int, S: int, K: int, V: int, top_k: int, dtype: torch.dtype, s2s: bool,
           dot: Optional[str] = None) -> List[Launch]:
    """Every distinct launch of the workloads at these sizes, with the entry point that made it."""
    seen: Dict[str, Launch] = {}
    for name, go in workloads(S, K, V, top_k, dtype, s2s, dot):
        with recording(arch) as launches:
            go()
        for launch in launches:
            launch["entry"] = name
            seen.setdefault(launch_key(launch), launch)
    return list(seen.values())


# ------------------------------------------------------------------------------------ compiling
def cuobjdump() -> Optional[str]:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def resource_usage(cubin: bytes, tool: Optional[str]) -> dict:
    """Registers, stack and static shared bytes of a cubin's kernel (``cuobjdump -res-usage``)."""
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if not m:
        return {}
    reg, stack, shared, local = map(int, m.groups())
    return dict(registers=reg, stack_bytes=stack, static_shared=shared, local_bytes=local)


def compile_launch(launch: Launch, arch: int, tool: Optional[str]) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(launch["fn"], launch["signature"], launch["constexprs"], launch["attrs"])
    t0 = time.perf_counter()
    try:
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch["options"])
    except Exception as e:  # noqa: BLE001 - reported per kernel, never hidden
        msg = " ".join(str(e).split())
        return dict(status="error", error=msg[:400], compile_s=time.perf_counter() - t0)
    row = dict(kernel=launch["name"], status="ok", compile_s=time.perf_counter() - t0,
               shared=int(ck.metadata.shared))
    row.update(resource_usage(ck.asm["cubin"], tool))
    return classify(row, arch)


# Kernels with a Triton path that takes their place where they do not fit the GPU's shared memory
# (nstm_kernels/triton/fallback.py); any other kernel falls back to the PyTorch chunked path.
TRITON_FALLBACK = {"_chunk_bwd_kernel_c": "the recurrent backward"}


def classify(row: dict, arch: int) -> dict:
    """``status`` and ``fits`` of a compiled row from its shared memory and the target's limit:
    over the limit is a failure, unless another Triton kernel takes the kernel's place there."""
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and row["shared"] > limit:
        other = TRITON_FALLBACK.get(row["kernel"])
        row["status"] = (f"over the limit: {other} runs instead" if other
                         else "shared memory over the limit")
    row["fits"] = [GPU_NAMES[a] for a in sorted(SHARED_LIMIT) if row["shared"] <= SHARED_LIMIT[a]
                   and a in GPU_NAMES]
    return row


def failed(row: dict) -> bool:
    return not (row["status"] == "ok" or row["status"].startswith("over the limit:"))


def launch_label(launch: Launch) -> str:
    c = launch["constexprs"]
    blocks = ", ".join(f"{k}={v}" for k, v in c.items() if k.startswith("BLOCK") or k in ("SUB", "L"))
    flags = ", ".join(k for k, v in c.items() if v is True)
    return "; ".join(x for x in (blocks, flags) if x)


def check(archs, dims, dtypes, top_k=8, s2s=True, progress=True, dots=(None,)) -> List[dict]:
    tool = cuobjdump()
    rows = []
    for arch, d, dname, dot in ((a, d, n, p) for a in archs for d in dims for n in dtypes for p in dots):
        launches = record(arch, d, d, d, min(top_k, d), DTYPES[dname], s2s, dot)
        for launch in launches:
            row = dict(kernel=launch["name"], entry=launch["entry"], arch=f"sm_{arch}",
                       dims=f"S=K=V={d}", dtype=dname, s2s=s2s,
                       dot=dot or str(launch["constexprs"].get("PREC", "-")),
                       num_warps=launch["options"]["num_warps"], blocks=launch_label(launch))
            row.update(compile_launch(launch, arch, tool))
            rows.append(row)
            if progress:
                print(f"  {row['arch']} {row['dims']} {dname} {row['dot']:<6} {row['kernel']:<28} "
                      f"{row['status']:<6} regs {row.get('registers', '-')} "
                      f"stack {row.get('stack_bytes', '-')} shared {row.get('shared', '-')} "
                      f"({row['compile_s']:.1f} s)", flush=True)
    return rows


# ------------------------------------------------------------------------------------ output
def markdown(rows: List[dict], meta: dict) -> str:
    out = ["# Offline compile check of the Triton kernels", "",
           f"- commit: {meta['commit']}; Triton {meta['triton']}; compiled on {meta['host']} "
           "(no GPU: nothing here ran, it only compiled)",
           "- registers / stack from `cuobjdump -res-usage`; stack > 0 means spills to local memory",
           f"- top_k = {meta['top_k']}, s2s = {meta['s2s']}",
           "- shared memory limits (opt-in, per block): " + ", ".join(
               f"{GPU_NAMES[a]} {SHARED_LIMIT[a] // 1024} KB" for a in sorted(GPU_NAMES)),
           "- a kernel over the limit of the GPU it runs on does not launch: the op runs the PyTorch "
           "`chunked` path instead, or, for the chunk backward, the recurrent Triton backward, with one "
           "log line (nstm_kernels/triton/fallback.py)", "",
           "| kernel | entry | target | dims | dtype | fp32 dot | warps | blocks | status | regs | stack B "
           "| shared KiB | fits (shared memory) |",
           "|---|---|---|---|---|---|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        shared = f"{r['shared'] / 1024:.1f}" if "shared" in r else "-"
        status = r["status"] if r["status"] != "error" else f"error: {r['error'][:120]}"
        out.append(f"| {r['kernel']} | {r['entry']} | {r['arch']} | {r['dims']} | {r['dtype']} | {r['dot']} | "
                   f"{r['num_warps']} | {r['blocks']} | {status} | {r.get('registers', '-')} | "
                   f"{r.get('stack_bytes', '-')} | {shared} | {', '.join(r.get('fits', [])) or '-'} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                    help="compute capabilities to compile for (80 = A100, 90 = H100)")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="S = K = V values")
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--no-s2s", action="store_true", help="compile the kernels without s2s")
    ap.add_argument("--dot", nargs="+", help="fp32 tl.dot precisions to compile (ieee, tf32, tf32x3; "
                    "default: the package's, NSTM_TRITON_DOT)")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    for a in args.arch:
        if a not in SHARED_LIMIT:
            ap.error(f"--arch {a}: expected one of {sorted(SHARED_LIMIT)}")
    from nstm_kernels.settings import DOT_PRECISIONS
    for p in args.dot or []:
        if p not in DOT_PRECISIONS:
            ap.error(f"--dot {p}: expected one of {list(DOT_PRECISIONS)}")
    if args.tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.tag):
        ap.error(f"--tag {args.tag!r}: expected letters, digits, '.', '_' or '-'")
    for d in args.dims:
        if d < 1 or d > 256:
            ap.error(f"--dims {d}: expected 1..256")

    t0 = time.perf_counter()
    rows = check(args.arch, args.dims, args.dtype, args.top_k, not args.no_s2s, not args.quiet,
                 args.dot or (None,))
    commit = git_commit()
    meta = dict(commit=commit, triton=triton.__version__, host=cpu_name(),
                top_k=args.top_k, s2s=not args.no_s2s, elapsed_s=time.perf_counter() - t0)
    stem = result_stem(args.out, f"compile-{commit}-{run_date()}" + (f"-{args.tag}" if args.tag else ""),
                       [".json", ".md"])
    md = markdown(rows, meta)
    atomic_write(stem + ".json", json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    atomic_write(stem + ".md", md)
    if not args.quiet:
        print(md)
    bad = [r for r in rows if failed(r)]
    print(f"# {len(rows)} compiles, {len(bad)} failed; wrote {stem}.md/.json in {meta['elapsed_s']:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
