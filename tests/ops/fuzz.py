"""Seeded fuzzing of the NSTM operator against the token-by-token reference (spec §2, v2).

``case(seed)`` draws one configuration over B, T (1 and chunk/period edges), H, K, V (non-powers
of two), S, top_k, C (1 to far beyond T), pos (int or per row), s2s on/off (large weights in
float64), gates up to +-30, logits with ties, an initial state, float64/float32/bfloat16 and packed
batches; ``check(cfg, backend)`` compares outputs, final states and every gradient with the
reference, a split of the stream into pieces with one call, and (T = 1) ``nstm_step`` with
``nstm_attention``. ``tests/ops/test_fuzz.py`` runs a few hundred cases in ``make test``;
``make fuzz N=10000`` (this file as a script) runs many more and prints the worst errors.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from typing import Dict, List

import torch

from nstm_kernels import NSTMState, S2SParams, nstm_attention, nstm_step

# relative RMS error allowed against the reference, by input dtype
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 2e-2}
GRAD_FLOOR = 1e-6   # gradients smaller than this (per element, RMS) are compared in absolute terms


def case(seed: int) -> Dict:
    """One random configuration (plain data: it prints and replays)."""
    r = random.Random(seed)
    dtype = r.choice(["float64", "float64", "float32", "bfloat16"])
    C = r.choice([1, 2, 3, 7, 16, 17, 64, 100, 10 ** 5, 10 ** 9])
    T = r.choice([1, 2, 15, 16, 17, 31, 33, 64, 65, r.randint(1, 90)])
    if C <= 64 and r.random() < 0.3:
        T = r.choice([C - 1, C, C + 1, 2 * C + 1]) if C > 1 else T
    T = max(1, T)
    S = r.choice([1, 2, 3, 5, 8, 16])
    packed = r.random() < 0.2
    B = 1 if packed else r.choice([1, 2, 3])
    lengths = None
    if packed:
        n = r.randint(1, min(4, T))
        cuts = sorted(r.sample(range(1, T), n - 1)) if n > 1 else []
        lengths = [b - a for a, b in zip([0] + cuts, cuts + [T])]
    return dict(
        seed=seed, dtype=dtype, B=B, T=T, H=r.choice([1, 2, 3]), K=r.choice([1, 3, 4, 5, 8]),
        V=r.choice([1, 2, 5, 8]), S=S, top_k=r.randint(1, S), C=C,
        pos=r.choice(["zero", "int", "row"]) if not packed else r.choice(["zero", "int", "row"]),
        pos_int=r.choice([0, 1, 5, C - 1 if C < 10 ** 4 else 7, 1000]),
        s2s=r.random() < 0.7, s2s_scale=r.choice([0.3, 1.0, 10.0]) if dtype == "float64" else 0.5,
        gate_scale=r.choice([1.0, 5.0, 30.0]) if dtype == "float64" else r.choice([1.0, 5.0]),
        ties=r.random() < 0.3, state=r.random() < 0.7, lengths=lengths, split=r.random() < 0.4,
    )


def tensors(cfg: Dict, requires_grad: bool = True):
    """The inputs of ``cfg``: ``(q, k, v, logits, gate, s2s, initial_state, cu_seqlens)``."""
    g = torch.Generator().manual_seed(cfg["seed"])
    dt = getattr(torch, cfg["dtype"])
    B, T, H, K, V, S = (cfg[n] for n in "BTHKVS")

    def rn(*shape, scale=1.0, dtype=dt):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    q, k, v = rn(B, T, H, K), rn(B, T, H, K), rn(B, T, H, V)
    if cfg["ties"]:
        logits = torch.randint(0, 3, (B, T, H, S), generator=g).to(torch.float32)
    else:
        logits = rn(B, T, H, S, scale=2.0, dtype=torch.float32)
    if dt == torch.float64:
        logits = logits.double()
    gate = rn(B, T, H, scale=cfg["gate_scale"], dtype=logits.dtype)
    s2s = None
    if cfg["s2s"]:
        sc = cfg["s2s_scale"] / math.sqrt(V)
        s2s = S2SParams(rn(H, V, V, scale=sc, dtype=logits.dtype), rn(H, V, V, scale=sc, dtype=logits.dtype),
                        rn(H, scale=2.0, dtype=logits.dtype))
    rows = len(cfg["lengths"]) if cfg["lengths"] else B
    cu = None
    if cfg["lengths"]:
        cu = torch.tensor([0] + list(torch.tensor(cfg["lengths"]).cumsum(0).tolist()), dtype=torch.int64)
    state = None
    sd = torch.float64 if dt == torch.float64 else torch.float32
    if cfg["state"] or cfg["pos"] != "zero":
        if cfg["pos"] == "row":
            pos = torch.tensor([(cfg["pos_int"] + 3 * i) for i in range(rows)], dtype=torch.int64)
        else:
            pos = 0 if cfg["pos"] == "zero" else cfg["pos_int"]
        state = NSTMState(rn(rows, H, S, K, dtype=sd), rn(rows, H, S, V, dtype=sd), pos)
    leaves = [q, k, v, logits, gate] + (list(s2s[:2]) + [s2s.gate] if s2s else []) + \
        ([state.k, state.v] if state else [])
    if requires_grad:
        for t in leaves:
            t.requires_grad_(True)
    return (q, k, v, logits, gate, s2s, state, cu), leaves


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """Relative RMS error ``||a - b|| / max(||b||, floor * sqrt(numel))``; NaNs must sit in the same
    places. ``floor`` > 0 for gradients: a gate at +-30 saturates the sigmoid, its gradient is
    ~1e-13 and carries the rounding of ``1 - sigmoid(g)`` (5 % at g = 33 in float64), so such
    gradients are compared in absolute terms below the floor."""
    a, b = a.detach().double(), b.detach().double()
    if torch.isnan(b).any() or torch.isnan(a).any():
        return 0.0 if torch.equal(torch.isnan(a), torch.isnan(b)) and \
            torch.allclose(a.nan_to_num(), b.nan_to_num(), rtol=1e-6, atol=1e-6) else math.inf
    den = max(b.norm().item(), floor * math.sqrt(max(b.numel(), 1)))
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def _run(backend, cfg, inputs, leaves, grads=True):
    q, k, v, logits, gate, s2s, state, cu = inputs
    o, fin = nstm_attention(q, k, v, logits, gate, cfg["top_k"], s2s, cfg["C"], state, True,
                            cu_seqlens=cu, backend=backend)
    out = {"o": o, "state.k": fin.k, "state.v": fin.v}
    if grads:
        gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        w = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for t in (o, fin.k, fin.v)]
        loss = sum((t * wt).sum() for t, wt in zip((o, fin.k, fin.v), w))
        gs = torch.autograd.grad(loss, leaves, allow_unused=True)
        for i, gr in enumerate(gs):
            out[f"d{i}"] = torch.zeros_like(leaves[i]) if gr is None else gr
    return out, fin


def check(cfg: Dict, backend: str = "chunked") -> Dict[str, float]:
    """Errors of ``backend`` against the reference for ``cfg`` (name -> relative error)."""
    dt = getattr(torch, cfg["dtype"])
    grads = dt != torch.bfloat16
    inputs, leaves = tensors(cfg, requires_grad=grads)
    ref, rfin = _run("reference", cfg, inputs, leaves, grads)
    got, fin = _run(backend, cfg, inputs, leaves, grads)
    errs = {name: rel_err(got[name], ref[name], GRAD_FLOOR if name.startswith("d") else 0.0)
            for name in ref}
    if isinstance(rfin.pos, torch.Tensor) or isinstance(fin.pos, torch.Tensor):
        errs["pos"] = 0.0 if torch.equal(torch.as_tensor(fin.pos), torch.as_tensor(rfin.pos)) else math.inf
    else:
        errs["pos"] = 0.0 if fin.pos == rfin.pos else math.inf
    q, k, v, logits, gate, s2s, state, cu = inputs
    T = cfg["T"]
    if cfg["split"] and cu is None and T > 1:      # a stream split in two equals one call
        cut = 1 + cfg["seed"] % (T - 1)
        with torch.no_grad():
            o1, st1 = nstm_attention(q[:, :cut], k[:, :cut], v[:, :cut], logits[:, :cut], gate[:, :cut],
                                     cfg["top_k"], s2s, cfg["C"], state, True, backend=backend)
            o2, st2 = nstm_attention(q[:, cut:], k[:, cut:], v[:, cut:], logits[:, cut:], gate[:, cut:],
                                     cfg["top_k"], s2s, cfg["C"], st1, True, backend=backend)
        errs["split.o"] = rel_err(torch.cat([o1, o2], 1), ref["o"])
        errs["split.state.v"] = rel_err(st2.v, ref["state.v"])
    if T == 1 and cu is None:                       # one token: nstm_step equals the sequence call
        with torch.no_grad():
            o, st = nstm_step(q[:, 0], k[:, 0], v[:, 0], logits[:, 0], gate[:, 0], cfg["top_k"], s2s,
                              cfg["C"], state, backend=backend)
        errs["step.o"] = rel_err(o, ref["o"][:, 0])
        errs["step.state.v"] = rel_err(st.v, ref["state.v"])
    return errs


def failures(cfg: Dict, errs: Dict[str, float]) -> List[str]:
    tol = TOL[getattr(torch, cfg["dtype"])]
    return [f"{n}: {e:.2e}" for n, e in errs.items() if not e <= tol]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="cases")
    ap.add_argument("--seed", type=int, default=0, help="first case seed")
    ap.add_argument("--backend", default="chunked", help="backend to check against the reference")
    args = ap.parse_args(argv)
    worst: Dict[str, float] = {}
    bad, t0 = [], time.perf_counter()
    for i in range(args.seed, args.seed + args.n):
        cfg = case(i)
        errs = check(cfg, args.backend)
        for name, e in errs.items():
            key = f"{cfg['dtype']} {name}"
            worst[key] = max(worst.get(key, 0.0), e)
        f = failures(cfg, errs)
        if f:
            bad.append((cfg, f))
            print(f"FAIL seed {i}: {cfg}\n  {f}", flush=True)
        if (i - args.seed + 1) % 100 == 0:
            print(f"{i - args.seed + 1}/{args.n} cases, {len(bad)} failed, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    print(f"{args.n} cases against the reference ({args.backend}), {len(bad)} failed; worst errors:")
    for key in sorted(worst):
        print(f"  {key:28s} {worst[key]:.2e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
