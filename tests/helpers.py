"""Shared test helpers: random NSTM inputs, gradients, one error metric and one tolerance table.

Every test that compares two computations of the operator uses ``make_inputs`` for its inputs,
``run_with_grads`` for outputs, final state and every input gradient, and ``assert_close`` (the
relative RMS error ``||a - b|| / ||b||`` against ``TOL``, or a per-test override with its reason).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch

from nstm_kernels import NSTMState, S2SParams

# the repository root (bench/, csrc/, nstm_kernels/ are found from here)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The relative RMS error allowed between a path under test and its ground truth, by dtype. Where a
# test needs another value it passes ``tol=`` with a comment saying why.
TOL = {
    torch.float32: 1e-4,
    torch.float64: 1e-10,
    # one bf16 ulp (2^-7 relative): an output that differs from the fp32 reference only by its
    # rounding to bf16, whatever the rounding mode
    torch.bfloat16: 2 ** -7,
}


# the Triton (interpreter) tests' inputs: fp32, and s2s gates ~ N(0, 1), either sign
F32_INPUTS = dict(dtype=torch.float32, s2s_gate=None)


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
                state=True, beta=None, gap=True, seed=0, requires_grad=False, s2s_gate=0.7) -> Inputs:
    """Random operator inputs ``[B, T, H, *]``, an s2s parameter set (``s2s``) and an initial state
    at ``pos`` (``state``). ``beta``: None (write gates ~ N(0, 1)), or a write strength to centre
    the gates on (0.01: weak, 0.999: strong). ``gap``: route logits with a clear gap between slots,
    so top-k has no near-ties (else N(0, 4)). ``s2s_gate``: a value to centre the s2s gates on
    (+- 0.1), or None for N(0, 1) gates (either sign, sigmoid(gate) anywhere in (0, 1)). Values are drawn in
    fp32 and cast to ``dtype``. For one token use ``as_step(make_inputs(T=1, ...))``."""
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
        w = [rn(H, V, V, scale=V ** -0.5) for _ in range(2)]
        if s2s_gate is None:
            sg = rn(H)
        else:
            sg = (torch.full((H,), s2s_gate) + torch.randn(H, generator=g) * 0.1).to(dtype)
        p = S2SParams(*w, sg)
    st = NSTMState(rn(B, H, S, K), rn(B, H, S, V), pos) if state else None
    tensors = [q, k, v, logits, gate] + (list(p) if p else []) + ([st.k, st.v] if st else [])
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return Inputs(q, k, v, logits, gate, p, st)


def as_step(inp: Inputs, t: int = 0) -> Inputs:
    """Token ``t`` of ``inp``: the one-token step's inputs ``[B, H, *]`` (s2s and state as they are)."""
    return inp._replace(**{n: getattr(inp, n)[:, t] for n in Inputs._fields[:5]})


def grad_leaves(inp: Inputs):
    """Every tensor input that takes a gradient, with its name."""
    out = [("q", inp.q), ("k", inp.k), ("v", inp.v), ("route_logits", inp.route_logits),
           ("write_gate", inp.write_gate)]
    if inp.s2s is not None:
        out += [(f"s2s.{n}", t) for n, t in zip(S2SParams._fields, inp.s2s)]
    if inp.initial_state is not None:
        out += [("initial_state.k", inp.initial_state.k), ("initial_state.v", inp.initial_state.v)]
    return out


def grad_names(s2s: bool, state: bool):
    """The names ``run_with_grads`` gives the gradients of inputs with/without s2s and a state."""
    names = ["q", "k", "v", "route_logits", "write_gate"]
    names += [f"s2s.{n}" for n in S2SParams._fields] if s2s else []
    return names + (["initial_state.k", "initial_state.v"] if state else [])


def with_leaves(inp: Inputs, leaves) -> Inputs:
    """``inp`` with its tensors replaced by ``leaves`` (in ``grad_leaves`` order)."""
    it = iter(leaves)
    q, k, v, lg, g = (next(it) for _ in range(5))
    p = None if inp.s2s is None else S2SParams(*(next(it) for _ in S2SParams._fields))
    st = None if inp.initial_state is None else NSTMState(next(it), next(it), inp.initial_state.pos)
    return Inputs(q, k, v, lg, g, p, st)


def run_with_grads(fn, inp: Inputs, top_k, comm_every, seed=1, **kw):
    """Run ``fn(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, initial_state, True,
    **kw)`` on fresh leaf copies of ``inp``'s tensors (the caller's are never touched), backpropagate
    (o * do).sum() + (K * dK).sum() + (V * dV).sum() with random do, dK, dV (from ``seed``: the same
    for every ``fn``), return (o, final_state, {name: grad}); an input that does not reach the
    output (s2s weights when no period ends) gets a zero gradient."""
    names = [n for n, _ in grad_leaves(inp)]
    leaves = [t.detach().clone().requires_grad_(True) for _, t in grad_leaves(inp)]
    x = with_leaves(inp, leaves)
    o, st = fn(x.q, x.k, x.v, x.route_logits, x.write_gate, top_k, x.s2s, comm_every,
               x.initial_state, True, **kw)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=g).to(o.dtype)
    dk = torch.randn(st.k.shape, generator=g).to(st.k.dtype)
    dv = torch.randn(st.v.shape, generator=g).to(st.v.dtype)
    loss = (o * do).sum() + (st.k * dk).sum() + (st.v * dv).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = {n: torch.zeros_like(t) if d is None else d for n, t, d in zip(names, leaves, grads)}
    return o.detach(), NSTMState(st.k.detach(), st.v.detach(), st.pos), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error ||a - b|| / ||b|| (absolute when b is all zeros), in fp64."""
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: Optional[float] = None,
                 name: str = "tensor") -> None:
    """``actual`` has ``expected``'s shape, is finite, and is within a relative RMS error ``tol``
    of it (default: ``TOL`` of the less precise of the two dtypes)."""
    if tol is None:
        tol = max(TOL[actual.dtype], TOL[expected.dtype])
    assert actual.shape == expected.shape, \
        f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    bad = (~torch.isfinite(actual.detach())).sum().item()
    assert bad == 0, f"{name}: {bad} non-finite values of {actual.numel()}"
    r = rel_err(actual, expected)
    assert r <= tol, (f"{name}: relative RMS error {r:.3e} > tol {tol:.1e} "
                      f"({actual.dtype} vs {expected.dtype}, shape {tuple(actual.shape)})")


def assert_grads_close(grads: dict, want: dict, tol: Optional[float] = None, names=None) -> None:
    """Gradient dicts from ``run_with_grads``: the same names (``names`` when given), each close."""
    assert set(grads) == set(want), f"gradients for {sorted(grads)}, expected {sorted(want)}"
    if names is not None:
        assert set(grads) == set(names), f"gradients for {sorted(grads)}, expected {sorted(names)}"
    for n in want:
        t = tol
        if t is None and n == "s2s.gate" and want[n].dtype == torch.float32:
            t = GATE_GRAD_TOL_F32
        assert_close(grads[n], want[n], t, name=f"d {n}")


# The v2 s2s gate's gradient is one number per head, sum over the whole state of dY * (A V - V):
# a difference of nearby values summed in float32 by two different orders of operations (the
# kernels' tiles and PyTorch's autograd), so it agrees to about 1e-4..1e-3 where everything else
# agrees to 1e-5. float64 holds it to the table's value.
GATE_GRAD_TOL_F32 = 1e-3
