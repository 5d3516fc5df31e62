"""The Triton kernels on CPU tensors under Triton's interpreter, against the PyTorch paths.

Every function is compared, outputs and every input gradient, with the ground truth
(``naive_recurrent_nstm``, ``route_torch``, ``state_attention_torch``, ``recurrent_nstm_step``) at
small shapes. The interpreter runs each program serially in numpy, so the shapes are a
representative subset of T in {1, 63, 130}, S in {16, 32}, K = V in {16, 32}, top_k in {1, 4},
comm_every in {16, 64}, pos in {0, 7}, with and without s2s (plus a few ragged sizes, fp64 and the
w -> 1 edge).
"""
import math

import pytest
import torch

from nstm_kernels import NSTMState, S2SParams, nstm_attention, nstm_step, sparse_route, state_attention
from nstm_kernels.chunked import recurrent_nstm_step
from nstm_kernels.reference import naive_recurrent_nstm
from nstm_kernels.routing import route_torch
from nstm_kernels.s2s import state_attention_torch

pytest.importorskip("triton")
pytestmark = pytest.mark.interpret   # CPU tensors: TRITON_INTERPRET=1 from tests/conftest.py

from nstm_kernels.triton import triton_nstm, triton_nstm_step, triton_sparse_route, triton_state_attention  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num if den == 0 else num / den


def check(name, a, b, tol):
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    r = rel(a, b)
    assert r <= tol, f"{name}: relative RMS error {r:.3e} > {tol:.0e}"


def gapped_logits(*lead, S, gen, dtype=torch.float32):
    """Logits with a clear gap between any two entries of a row (no top-k ties)."""
    n = math.prod(lead)
    perm = torch.stack([torch.randperm(S, generator=gen) for _ in range(n)]).to(dtype)
    return (perm * 0.5 + 0.01 * torch.rand(n, S, generator=gen, dtype=dtype)).view(*lead, S)


def make_s2s(H, V, gen, dtype=torch.float32):
    w = [torch.randn(H, V, V, generator=gen, dtype=dtype) / math.sqrt(V) for _ in range(2)]
    return S2SParams(*w, torch.randn(H, generator=gen, dtype=dtype))


def make_operator_inputs(B, T, H, S, K, V, *, seed, dtype=torch.float32, step=False):
    g = torch.Generator().manual_seed(seed)
    shp = (B, H) if step else (B, T, H)
    q = torch.randn(*shp, K, generator=g, dtype=dtype)
    k = torch.randn(*shp, K, generator=g, dtype=dtype)
    v = torch.randn(*shp, V, generator=g, dtype=dtype)
    logits = gapped_logits(*shp, S=S, gen=g, dtype=dtype)
    gate = torch.randn(*shp, generator=g, dtype=dtype)
    return q, k, v, logits, gate, g


# ---------------------------------------------------------------------------------------------
# routing


@pytest.mark.parametrize("S,top_k", [(16, 1), (32, 4), (24, 24)])
def test_sparse_route_matches_torch(S, top_k):
    g = torch.Generator().manual_seed(S + top_k)
    logits = gapped_logits(2, 9, 3, S=S, gen=g).requires_grad_()
    gate = torch.randn(2, 9, 3, generator=g).requires_grad_()
    idx, w = triton_sparse_route(logits, gate, top_k)
    ridx, rw = route_torch(logits, gate, top_k)
    assert idx.dtype == torch.int64 and idx.shape == (2, 9, 3, top_k)
    assert torch.equal(idx, ridx)
    assert w.dtype == torch.float32
    check("weights", w, rw, TOL[torch.float32])
    gw = torch.randn(w.shape, generator=g)
    got = torch.autograd.grad((w * gw).sum(), [logits, gate])
    want = torch.autograd.grad((rw * gw).sum(), [logits, gate])
    check("d route_logits", got[0], want[0], TOL[torch.float32])
    check("d write_gate", got[1], want[1], TOL[torch.float32])
    # unselected logits get exactly zero gradient
    sel = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)
    assert (got[0][~sel] == 0).all()


def test_sparse_route_fp64_and_api():
    g = torch.Generator().manual_seed(3)
    logits = gapped_logits(5, 2, S=16, gen=g, dtype=torch.float64)
    gate = torch.randn(5, 2, generator=g, dtype=torch.float64)
    idx, w = sparse_route(logits, gate, 4, backend="triton")
    ridx, rw = route_torch(logits, gate, 4)
    assert w.dtype == torch.float64
    assert torch.equal(idx, ridx)
    check("weights fp64", w, rw, TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# state-to-state attention


@pytest.mark.parametrize("B,H,S,V", [(2, 2, 16, 16), (1, 2, 32, 32), (2, 1, 20, 24)])
def test_state_attention_matches_torch(B, H, S, V):
    g = torch.Generator().manual_seed(B * 100 + S + V)
    x = torch.randn(B, H, S, V, generator=g).requires_grad_()
    p = S2SParams(*(t.requires_grad_() for t in make_s2s(H, V, g)))
    y = triton_state_attention(x, p)
    ry = state_attention_torch(x, p)
    assert y.dtype == x.dtype
    check("mixed v_state", y, ry, TOL[torch.float32])
    gy = torch.randn(y.shape, generator=g)
    leaves = [x, *p]
    got = torch.autograd.grad((y * gy).sum(), leaves)
    want = torch.autograd.grad((ry * gy).sum(), leaves)
    for name, a, b in zip(["v_state", "w_q", "w_k", "gate"], got, want):
        check(f"d {name}", a, b, TOL[torch.float32])


def test_state_attention_api_closed_gate_is_identity():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 16, 16, generator=g)
    p = make_s2s(2, 16, g)._replace(gate=torch.full((2,), -torch.inf))   # sigmoid(-inf) = 0
    assert torch.equal(state_attention(x, p, backend="triton"), x)


# ---------------------------------------------------------------------------------------------
# one-token step

STEP_CASES = [
    # S, KV, top_k, comm_every, pos, s2s, with_state
    (16, 16, 1, 16, 0, True, False),
    (32, 32, 4, 16, 7, True, True),
    (16, 32, 4, 8, 7, True, True),     # pos 7, C 8: this token ends a period (s2s runs)
    (32, 16, 4, 64, 63, True, True),   # pos 63, C 64: s2s runs
    (24, 16, 4, 64, 7, False, True),   # ragged S
]


@pytest.mark.parametrize("S,KV,top_k,comm_every,pos,use_s2s,with_state", STEP_CASES)
def test_step_matches_torch(S, KV, top_k, comm_every, pos, use_s2s, with_state):
    B, H = 2, 2
    q, k, v, logits, gate, g = make_operator_inputs(B, 1, H, S, KV, KV, seed=S + pos, step=True)
    s2s = make_s2s(H, KV, g) if use_s2s else None
    state = None
    if with_state:
        state = NSTMState(torch.randn(B, H, S, KV, generator=g), torch.randn(B, H, S, KV, generator=g), pos)
    o, new = triton_nstm_step(q, k, v, logits, gate, top_k, s2s, comm_every, state)
    ro, rnew = recurrent_nstm_step(q, k, v, logits, gate, top_k, s2s, comm_every, state)
    assert o.dtype == q.dtype and new.k.dtype == torch.float32 and new.v.dtype == torch.float32
    assert new.pos == rnew.pos == (pos if with_state else 0) + 1
    check("o", o, ro, TOL[torch.float32])
    check("state.k", new.k, rnew.k, TOL[torch.float32])
    check("state.v", new.v, rnew.v, TOL[torch.float32])


@pytest.mark.parametrize("use_s2s", [False, True])
def test_step_touches_only_routed_slots(use_s2s):
    B, H, S, KV, top_k = 2, 2, 32, 16, 4
    q, k, v, logits, gate, g = make_operator_inputs(B, 1, H, S, KV, KV, seed=11, step=True)
    s2s = make_s2s(H, KV, g) if use_s2s else None
    state = NSTMState(torch.randn(B, H, S, KV, generator=g), torch.randn(B, H, S, KV, generator=g), 3)
    k_before, v_before = state.k.clone(), state.v.clone()
    # comm_every 16 at pos 3: no s2s event on this token even with s2s given
    _, new = triton_nstm_step(q, k, v, logits, gate, top_k, s2s, 16, state)
    assert torch.equal(state.k, k_before) and torch.equal(state.v, v_before)   # input untouched
    assert new.k.data_ptr() != state.k.data_ptr() and new.v.data_ptr() != state.v.data_ptr()
    idx, _ = route_torch(logits, gate, top_k)
    routed = torch.zeros(B, H, S, dtype=torch.bool).scatter(-1, idx, True)
    assert torch.equal(new.k[~routed], state.k[~routed])
    assert torch.equal(new.v[~routed], state.v[~routed])
    assert not torch.equal(new.k[routed], state.k[routed])                    # routed rows moved


def test_step_api_and_none_state():
    q, k, v, logits, gate, g = make_operator_inputs(1, 1, 2, 16, 16, 16, seed=2, step=True)
    o, new = nstm_step(q, k, v, logits, gate, 4, None, 16, None, backend="triton")
    ro, rnew = recurrent_nstm_step(q, k, v, logits, gate, 4, None, 16, None)
    check("o", o, ro, TOL[torch.float32])
    check("state.k", new.k, rnew.k, TOL[torch.float32])
    assert new.pos == 1


# ---------------------------------------------------------------------------------------------
# the sequence operator

SEQ_CASES = [
    # B, T, H, S, KV, top_k, comm_every, pos, s2s, with_state
    (1, 1, 2, 16, 16, 1, 16, 0, True, False),
    (2, 63, 1, 32, 16, 4, 16, 7, True, True),
    (1, 130, 1, 16, 32, 4, 64, 7, True, True),
    (1, 130, 2, 16, 16, 1, 16, 0, False, False),
    (1, 63, 1, 32, 32, 4, 64, 0, False, True),
    (1, 40, 1, 20, 24, 3, 16, 7, True, True),    # ragged S, K = V = 24
]


def _run_with_grads(fn, q, k, v, logits, gate, top_k, s2s, C, state, seed):
    leaves = [q, k, v, logits, gate]
    if state is not None:
        leaves += [state.k, state.v]
    if s2s is not None:
        leaves += list(s2s)
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    q, k, v, logits, gate = leaves[:5]
    rest = leaves[5:]
    st = None
    if state is not None:
        st, rest = NSTMState(rest[0], rest[1], state.pos), rest[2:]
    p = S2SParams(*rest) if s2s is not None else None
    o, final = fn(q, k, v, logits, gate, top_k, p, C, st, True, None)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(o.shape, generator=g)
    gk = torch.randn(final.k.shape, generator=g)
    gv = torch.randn(final.v.shape, generator=g)
    loss = (o * go).sum() + (final.k * gk).sum() + (final.v * gv).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    # s2s weights unused when no period ends inside the call: their gradient is zero
    return o, final, [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads)]


@pytest.mark.parametrize("B,T,H,S,KV,top_k,C,pos,use_s2s,with_state", SEQ_CASES)
def test_nstm_matches_reference(B, T, H, S, KV, top_k, C, pos, use_s2s, with_state):
    q, k, v, logits, gate, g = make_operator_inputs(B, T, H, S, KV, KV, seed=T * 7 + S + pos)
    s2s = make_s2s(H, KV, g) if use_s2s else None
    state = None
    if with_state:
        state = NSTMState(torch.randn(B, H, S, KV, generator=g), torch.randn(B, H, S, KV, generator=g), pos)
    args = (q, k, v, logits, gate, top_k, s2s, C, state, 99)
    o, final, grads = _run_with_grads(triton_nstm, *args)
    ro, rfinal, rgrads = _run_with_grads(naive_recurrent_nstm, *args)
    tol = TOL[torch.float32]
    assert o.dtype == q.dtype and final.k.dtype == torch.float32
    assert final.pos == rfinal.pos == (pos if with_state else 0) + T
    check("o", o, ro, tol)
    check("final.k", final.k, rfinal.k, tol)
    check("final.v", final.v, rfinal.v, tol)
    names = ["q", "k", "v", "route_logits", "write_gate"]
    names += ["initial_state.k", "initial_state.v"] if with_state else []
    names += ["w_q", "w_k", "gate"] if use_s2s else []
    assert len(grads) == len(rgrads) == len(names)
    for name, a, b in zip(names, grads, rgrads):
        check(f"d {name}", a, b, tol)


def test_nstm_streaming_split_mid_period():
    """One call equals two calls passing the state on, split inside a C-period (no grad: the
    forward does not store states)."""
    B, T, H, S, KV, C = 1, 70, 1, 16, 16, 16
    q, k, v, logits, gate, g = make_operator_inputs(B, T, H, S, KV, KV, seed=5)
    s2s = make_s2s(H, KV, g)
    st0 = NSTMState(torch.randn(B, H, S, KV, generator=g), torch.randn(B, H, S, KV, generator=g), 5)
    with torch.no_grad():
        o, fin = triton_nstm(q, k, v, logits, gate, 4, s2s, C, st0, True, None)
        cut = 29   # pos 5 + 29 = 34: inside a period
        o1, mid = triton_nstm(q[:, :cut], k[:, :cut], v[:, :cut], logits[:, :cut], gate[:, :cut],
                              4, s2s, C, st0, True, None)
        o2, fin2 = triton_nstm(q[:, cut:], k[:, cut:], v[:, cut:], logits[:, cut:], gate[:, cut:],
                               4, s2s, C, mid, True, None)
        ro, rfin = naive_recurrent_nstm(q, k, v, logits, gate, 4, s2s, C, st0, True, None)
    assert mid.pos == 5 + cut and fin2.pos == fin.pos == 5 + T
    check("o split", torch.cat([o1, o2], 1), o, 1e-5)
    check("final.v split", fin2.v, fin.v, 1e-5)
    check("o", o, ro, TOL[torch.float32])
    check("final.v", fin.v, rfin.v, TOL[torch.float32])


def test_step_equals_sequence():
    """T one-token Triton steps give the Triton sequence kernel's outputs and state."""
    B, T, H, S, KV, C = 1, 12, 2, 16, 16, 16
    q, k, v, logits, gate, g = make_operator_inputs(B, T, H, S, KV, KV, seed=8)
    s2s = make_s2s(H, KV, g)
    st = NSTMState(torch.randn(B, H, S, KV, generator=g), torch.randn(B, H, S, KV, generator=g), 7)
    with torch.no_grad():
        o, fin = triton_nstm(q, k, v, logits, gate, 4, s2s, C, st, True, None)
        outs = []
        for t in range(T):   # pos 7 + 8 = 15: an s2s event on the 9th token
            ot, st = triton_nstm_step(q[:, t], k[:, t], v[:, t], logits[:, t], gate[:, t], 4, s2s,
                                      C, st)
            outs.append(ot)
    assert st.pos == fin.pos
    check("o", torch.stack(outs, 1), o, 1e-5)
    check("state.k", st.k, fin.k, 1e-5)
    check("state.v", st.v, fin.v, 1e-5)


def test_nstm_fp64():
    B, T, H, S, KV, C = 1, 20, 1, 16, 16, 16
    q, k, v, logits, gate, g = make_operator_inputs(B, T, H, S, KV, KV, seed=4, dtype=torch.float64)
    s2s = make_s2s(H, KV, g, dtype=torch.float64)
    st = NSTMState(torch.randn(B, H, S, KV, generator=g, dtype=torch.float64),
                   torch.randn(B, H, S, KV, generator=g, dtype=torch.float64), 7)
    args = (q, k, v, logits, gate, 4, s2s, C, st, 1)
    o, final, grads = _run_with_grads(triton_nstm, *args)
    ro, rfinal, rgrads = _run_with_grads(naive_recurrent_nstm, *args)
    assert o.dtype == torch.float64 and final.k.dtype == torch.float64
    check("o", o, ro, TOL[torch.float64])
    check("final.v", final.v, rfinal.v, TOL[torch.float64])
    for i, (a, b) in enumerate(zip(grads, rgrads)):
        check(f"grad {i}", a, b, TOL[torch.float64])


def test_nstm_write_weight_one_stays_finite():
    """beta = sigmoid(40) == 1 in fp32 and top_k = 1: w = 1 exactly overwrites the slot. The
    backward restores the overwritten rows instead of dividing by 1 - w."""
    B, T, H, S, KV = 1, 24, 1, 16, 16
    q, k, v, logits, _, g = make_operator_inputs(B, T, H, S, KV, KV, seed=6)
    gate = torch.full((B, T, H), 40.0)
    st = NSTMState(torch.randn(B, H, S, KV, generator=g), torch.randn(B, H, S, KV, generator=g), 0)
    args = (q, k, v, logits, gate, 1, None, 16, st, 2)
    o, final, grads = _run_with_grads(triton_nstm, *args)
    ro, rfinal, rgrads = _run_with_grads(naive_recurrent_nstm, *args)
    check("o", o, ro, TOL[torch.float32])
    for name, a, b in zip(["q", "k", "v", "route_logits", "write_gate", "k0", "v0"], grads, rgrads):
        check(f"d {name}", a, b, TOL[torch.float32])


def test_nstm_api_backend_triton_bf16():
    """The public API dispatches to the Triton kernels; bf16 inputs give bf16 outputs (fp32 state).
    The reference runs on the same bf16 values in fp32, so the only difference is the rounding of
    o to bf16: at most one bf16 ulp (2^-7 relative) whatever the rounding mode (the interpreter
    does not round to nearest like a GPU does)."""
    B, T, H, S, KV = 1, 10, 2, 16, 16
    q, k, v, logits, gate, g = make_operator_inputs(B, T, H, S, KV, KV, seed=9)
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    o, fin = nstm_attention(q, k, v, logits, gate, 4, None, 16, None, True, None, backend="triton")
    ro, rfin = naive_recurrent_nstm(q.float(), k.float(), v.float(), logits, gate, 4, None, 16, None,
                                    True, None)
    assert o.dtype == torch.bfloat16 and fin.k.dtype == torch.float32
    check("o bf16", o.float(), ro, 2 ** -7)
    check("final.k", fin.k, rfin.k, TOL[torch.float32])
    check("final.v", fin.v, rfin.v, TOL[torch.float32])


def test_dot_precision_choice(monkeypatch):
    """fp32 dots default to tf32x3 (ieee in the chunk passes); the argument, NSTM_TRITON_DOT or
    NSTM_TRITON_TF32 choose (read at call time); fp64 and GPUs before sm_80 get ieee; a bad value
    is refused with the choices."""
    from nstm_kernels import settings
    from nstm_kernels.triton import device as dev
    from nstm_kernels.triton import utils

    monkeypatch.delenv("NSTM_TRITON_DOT", raising=False)
    monkeypatch.delenv("NSTM_TRITON_TF32", raising=False)
    assert settings.dot_precision(None, "tf32x3") == "tf32x3"
    assert settings.dot_precision(None, "ieee") == "ieee"        # the chunk passes' default
    monkeypatch.setenv("NSTM_TRITON_TF32", "1")
    assert settings.dot_precision(None, "tf32x3") == "tf32"
    monkeypatch.setenv("NSTM_TRITON_DOT", "ieee")
    assert settings.dot_precision(None, "tf32x3") == "ieee"
    assert settings.dot_precision("tf32x3", "ieee") == "tf32x3"   # the argument wins
    monkeypatch.setenv("NSTM_TRITON_DOT", "fp16")
    with pytest.raises(ValueError, match="NSTM_TRITON_DOT"):
        settings.dot_precision(None, "tf32x3")
    with pytest.raises(ValueError, match="argument"):
        settings.dot_precision("fp8", "tf32x3")
    monkeypatch.delenv("NSTM_TRITON_DOT")
    monkeypatch.delenv("NSTM_TRITON_TF32")
    assert utils.resolve_dot_precision(torch.float64) == "ieee"
    assert utils.resolve_dot_precision(torch.float64, kind="tf32x3") == "ieee"
    assert utils.resolve_dot_precision(torch.float32) == "tf32x3"
    assert utils.resolve_dot_precision(torch.float32, chunk=True) == "ieee"
    assert utils.resolve_dot_precision(torch.float32, torch.device("cpu")) == "tf32x3"   # sm_80 facts
    monkeypatch.setattr(utils, "device_info", lambda d: dev.DeviceInfo(True, (7, 5), 64 * 1024, 40))
    assert utils.resolve_dot_precision(torch.float32, torch.device("cpu")) == "ieee"

