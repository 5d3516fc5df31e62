"""Shared test helpers: random NSTM inputs and error metrics."""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch

from nstm_kernels import NSTMState, S2SParams

# the repository root (bench/, csrc/, nstm_kernels/ are found from here)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Inputs(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    route_logits: torch.Tensor
    write_gate: torch.Tensor
    s2s: Optional[S2SParams]
    initial_state: Optional[NSTMState]


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def make_inputs(B=2, T=16, H=2, K=8, V=8, S=8, *, dtype=torch.float64, s2s=True, pos=0,
                state=True, beta=None, gap=True, seed=0, requires_grad=False, s2s_gate=0.7):
    """Random operator inputs. ``beta``: None (gates ~ N(0, 1)), or a write strength to centre the
    gates on (0.01: weak, 0.999: strong). ``gap``: route logits with a clear gap between slots, so
    top-k has no near-ties."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    q, k, v = rn(B, T, H, K), rn(B, T, H, K), rn(B, T, H, V)
    if gap:
        perm = torch.stack([torch.randperm(S, generator=g) for _ in range(B * T * H)]).view(B, T, H, S)
        logits = (perm.float() * 0.7 + torch.rand(B, T, H, S, generator=g) * 0.2).to(dtype)
    else:
        logits = rn(B, T, H, S, scale=2.0)
    if beta is None:
        gate = rn(B, T, H)
    else:
        gate = (logit(beta) + torch.randn(B, T, H, generator=g) * 0.1).to(dtype)
    p = None
    if s2s:
        p = S2SParams(rn(H, V, V, scale=V ** -0.5), rn(H, V, V, scale=V ** -0.5),
                      (torch.full((H,), s2s_gate) + torch.randn(H, generator=g) * 0.1).to(dtype))
    st = NSTMState(rn(B, H, S, K), rn(B, H, S, V), pos) if state else None
    tensors = [q, k, v, logits, gate] + (list(p) if p else []) + ([st.k, st.v] if st else [])
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return Inputs(q, k, v, logits, gate, p, st)


def grad_leaves(inp: Inputs):
    """Every tensor input that takes a gradient, with its name."""
    out = [("q", inp.q), ("k", inp.k), ("v", inp.v), ("route_logits", inp.route_logits),
           ("write_gate", inp.write_gate)]
    if inp.s2s is not None:
        out += [(f"s2s.{n}", t) for n, t in zip(S2SParams._fields, inp.s2s)]
    if inp.initial_state is not None:
        out += [("initial_state.k", inp.initial_state.k), ("initial_state.v", inp.initial_state.v)]
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error ||a - b|| / ||b|| (absolute when b is all zeros)."""
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def run_with_grads(fn, inp: Inputs, top_k, comm_every, seed=1, **kw):
    """Run ``fn`` on ``inp``, backpropagate (o * do).sum() + (K * dK).sum() + (V * dV).sum() with
    random do, dK, dV, return (o, final_state, {name: grad})."""
    leaves = grad_leaves(inp)
    for _, t in leaves:
        t.grad = None
    o, st = fn(inp.q, inp.k, inp.v, inp.route_logits, inp.write_gate, top_k, inp.s2s, comm_every,
               inp.initial_state, True, **kw)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=g).to(o.dtype)
    dk = torch.randn(st.k.shape, generator=g).to(st.k.dtype)
    dv = torch.randn(st.v.shape, generator=g).to(st.v.dtype)
    ((o * do).sum() + (st.k * dk).sum() + (st.v * dv).sum()).backward()
    grads = {n: torch.zeros_like(t) if t.grad is None else t.grad.clone() for n, t in leaves}
    for _, t in leaves:
        t.grad = None
    return o.detach(), NSTMState(st.k.detach(), st.v.detach(), st.pos), grads
