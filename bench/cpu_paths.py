"""Chunked PyTorch path against the token-by-token reference on the CPU (issue 2's speed check).

    python bench/cpu_paths.py                      # T = 2048, B = 2, H = 4, S = K = V = 32, top_k 4, C 64
    python bench/cpu_paths.py --T 512 2048 --mode fwd fwdbwd --json out.json
    python bench/cpu_paths.py --out bench/results   # also writes cpu-paths-<commit>-<date>.json

Checks that both paths agree before it reports any time. Prints one row per (T, mode) with the
median and 20/80 % quantiles of wall time, the speed-up, the device and the git commit. With
``--json`` or ``--out`` the rows also go to a new JSON file (an existing file is never
overwritten: ``-2``, ``-3``, ... is added to the name), and the script says where.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nstm_kernels import S2SParams, nstm_attention  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import atomic_write, cpu_name, git_commit, new_path, result_stem, run_date, timeit  # noqa: E402


def make_inputs(B, T, H, K, S, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, K, generator=g) for _ in range(3))
    logits = torch.randn(B, T, H, S, generator=g) * 2
    gate = torch.randn(B, T, H, generator=g)
    s2s = S2SParams(*(torch.randn(H, K, K, generator=g) * K ** -0.5 for _ in range(2)),
                    torch.full((H,), 0.5))
    tensors = [q, k, v, logits, gate]
    if requires_grad:
        for t in tensors + list(s2s):
            t.requires_grad_(True)
    return tensors, s2s


def run_once(backend, tensors, s2s, top_k, C, mode):
    o, st = nstm_attention(*tensors, top_k=top_k, s2s=s2s, comm_every=C, output_final_state=True,
                           backend=backend)
    if mode == "fwdbwd":
        (o.square().sum() + st.v.sum()).backward()
    return o


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[2048])
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=32, help="K = V = S")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--C", type=int, default=64)
    ap.add_argument("--mode", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--reps", type=int, default=5)
    dest = ap.add_mutually_exclusive_group()
    dest.add_argument("--json", help="write the rows to this new JSON file")
    dest.add_argument("--out", help="write the rows to DIR/cpu-paths-<commit>-<date>.json")
    args = ap.parse_args(argv)

    device, commit = cpu_name(), git_commit()
    print(f"# device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, commit {commit}")
    print(f"# B={args.B} H={args.H} S=K=V={args.D} top_k={args.top_k} C={args.C}, fp32")
    print(f"{'T':>6} {'mode':>7} {'reference ms':>14} {'chunked ms':>12} {'speed-up':>9}")
    rows = []
    for T in args.T:
        for mode in args.mode:
            tensors, s2s = make_inputs(args.B, T, args.H, args.D, args.D, requires_grad=mode == "fwdbwd")
            ref = run_once("reference", tensors, s2s, args.top_k, args.C, "fwd").detach()
            chk = run_once("chunked", tensors, s2s, args.top_k, args.C, "fwd").detach()
            err = ((ref - chk).norm() / ref.norm()).item()
            if not err < 1e-4:
                raise SystemExit(f"chunked and reference disagree at T={T}: relative error {err:.2e}")
            t_ref = timeit(lambda: run_once("reference", tensors, s2s, args.top_k, args.C, mode),
                           max(1, args.reps // 2))
            t_chk = timeit(lambda: run_once("chunked", tensors, s2s, args.top_k, args.C, mode), args.reps)
            row = dict(device=device, commit=commit, T=T, B=args.B, H=args.H, S=args.D, K=args.D,
                       V=args.D, top_k=args.top_k, C=args.C, mode=mode, dtype="float32",
                       reference_ms=t_ref[0], chunked_ms=t_chk[0], chunked_q20_ms=t_chk[1],
                       chunked_q80_ms=t_chk[2], speedup=t_ref[0] / t_chk[0], rel_err=err)
            rows.append(row)
            print(f"{T:>6} {mode:>7} {t_ref[0]:>14.1f} {t_chk[0]:>12.1f} {row['speedup']:>8.1f}x")
    path = None
    if args.json:
        path = new_path(args.json)
    elif args.out:
        path = result_stem(args.out, f"cpu-paths-{commit}-{run_date()}", [".json"]) + ".json"
    if path:
        atomic_write(path, json.dumps(rows, indent=1) + "\n")
        print(f"# wrote {path}")
    return rows


if __name__ == "__main__":
    main()
