"""The chunk-parallel Triton forward (``nstm_kernels/triton/chunk.py``) under Triton's interpreter.

Outputs and final states against the ground truth (``naive_recurrent_nstm``) over a covering
subset of T in {1, 63, 130}, S in {16, 32}, K = V in {16, 32}, top_k in {1, 4}, C in {16, 64},
pos in {0, 7}, s2s on/off (plus ragged sizes, K != V, a period that is no multiple of the chunk);
fp64; w -> 1 and w = 0 exactly; bf16 inputs; gradients through ``triton_nstm`` with the chunk
forward feeding the reverse-segment backward; streaming; the forward switch. Shapes are tiny:
the interpreter runs every program serially in numpy.
"""
import math

import pytest
import torch

from nstm_kernels import NSTMState, S2SParams
from nstm_kernels.reference import naive_recurrent_nstm

pytest.importorskip("triton")
pytestmark = pytest.mark.interpret   # CPU tensors: TRITON_INTERPRET=1 from tests/conftest.py

from nstm_kernels.settings import triton_forward as forward_kind  # noqa: E402
from nstm_kernels.triton import triton_nstm  # noqa: E402
from nstm_kernels.triton.device import chunk_length  # noqa: E402
from nstm_kernels.triton.utils import chunk_starts  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def check(name, a, b, tol):
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    r = rel(a, b)
    assert r <= tol, f"{name}: relative error {r:.3e} > {tol:.0e}"


def make_inputs(B, T, H, S, K, V, *, seed, dtype=torch.float32, s2s=False, pos=None):
    """Random operator inputs; route logits with a clear gap (no top-k ties); a random initial
    state at ``pos`` (None: no state)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    n = B * T * H
    perm = torch.stack([torch.randperm(S, generator=g) for _ in range(n)]).to(dtype)
    logits = (perm * 0.5 + 0.01 * torch.rand(n, S, generator=g, dtype=dtype)).view(B, T, H, S)
    gate = torch.randn(B, T, H, generator=g, dtype=dtype)
    p = None
    if s2s:
        w = [torch.randn(H, V, V, generator=g, dtype=dtype) / math.sqrt(V) for _ in range(2)]
        p = S2SParams(*w, torch.randn(H, generator=g, dtype=dtype))
    st = None
    if pos is not None:
        st = NSTMState(torch.randn(B, H, S, K, generator=g, dtype=dtype),
                       torch.randn(B, H, S, V, generator=g, dtype=dtype), pos)
    return q, k, v, logits, gate, p, st


def compare_forward(args, top_k, C, tol, fwd="chunk"):
    q, k, v, logits, gate, s2s, st = args
    with torch.no_grad():
        o, fin = triton_nstm(q, k, v, logits, gate, top_k, s2s, C, st, True, None, forward=fwd)
        ro, rfin = naive_recurrent_nstm(q, k, v, logits, gate, top_k, s2s, C, st, True, None)
    assert o.dtype == q.dtype and fin.pos == rfin.pos
    check("o", o, ro, tol)
    check("final.k", fin.k, rfin.k, tol)
    check("final.v", fin.v, rfin.v, tol)
    return o, fin


# ---------------------------------------------------------------------------------------------
# chunk layout


@pytest.mark.parametrize("C", [1, 5, 16, 24, 64, 100, 130])
@pytest.mark.parametrize("pos", [0, 7, 63, 64])
def test_chunk_starts(C, pos):
    """Chunks of at most L tokens; with s2s every period end is a chunk end; the cuts sit on
    absolute positions, so a call split at any token cuts where the whole call cuts (plus there)."""
    T, L = 150, chunk_length()
    for has_s2s in (False, True):
        st = chunk_starts(T, pos, C, has_s2s, L)
        assert st[0] == 0 and st[-1] == T and st == sorted(set(st))
        assert all(0 < b - a <= L for a, b in zip(st[:-1], st[1:]))
        if has_s2s:
            ends = {t + 1 for t in range(T) if (pos + t + 1) % C == 0}
            assert ends <= set(st)
        for cut in (1, 29, 64, 101):
            a = chunk_starts(cut, pos, C, has_s2s, L)
            b = chunk_starts(T - cut, pos + cut, C, has_s2s, L)
            assert sorted(set(a + [cut + x for x in b])) == sorted(set(st) | {cut})


# ---------------------------------------------------------------------------------------------
# forward == reference

FWD_CASES = [
    # B, T, H, S, K, V, top_k, C, pos (None: no state), s2s
    (1, 1, 2, 16, 16, 16, 1, 16, None, True),
    (2, 63, 1, 32, 16, 16, 4, 16, 7, True),
    (1, 130, 1, 16, 32, 32, 4, 64, 7, True),
    (1, 130, 2, 16, 16, 16, 1, 16, None, False),
    (1, 63, 1, 32, 32, 32, 4, 64, 0, False),
    (1, 130, 1, 32, 16, 16, 1, 64, 0, True),
    (1, 63, 1, 16, 32, 32, 1, 16, 7, False),
    (1, 70, 1, 20, 24, 24, 3, 24, 7, True),    # ragged S, K = V; C = 24: chunks 17, 7, 16, 8, ...
    (1, 50, 1, 16, 32, 16, 4, 100, 7, True),   # K != V; C > L: chunks cut inside a period too
    (1, 40, 1, 16, 16, 16, 16, 16, 7, True),   # top_k = S: dense writes
]


@pytest.mark.parametrize("B,T,H,S,K,V,top_k,C,pos,use_s2s", FWD_CASES)
def test_chunk_forward_matches_reference(B, T, H, S, K, V, top_k, C, pos, use_s2s):
    args = make_inputs(B, T, H, S, K, V, seed=T * 7 + S + (pos or 0), s2s=use_s2s, pos=pos)
    o, fin = compare_forward(args, top_k, C, TOL[torch.float32])
    assert fin.k.dtype == fin.v.dtype == torch.float32
    assert fin.pos == (pos or 0) + T


def test_chunk_forward_fp64():
    args = make_inputs(1, 40, 1, 16, 16, 16, seed=4, dtype=torch.float64, s2s=True, pos=7)
    o, fin = compare_forward(args, 4, 16, TOL[torch.float64])
    assert o.dtype == fin.k.dtype == torch.float64


@pytest.mark.parametrize("top_k", [1, 4])
def test_chunk_forward_write_weight_one(top_k):
    """write_gate = +30: beta == 1 in fp32; with top_k = 1, w = 1 exactly (a full overwrite).
    log(1 - w) is clamped at w = 1 - eps: finite, and the state moves by at most eps."""
    q, k, v, logits, _, s2s, st = make_inputs(1, 70, 1, 16, 16, 16, seed=6, s2s=True, pos=7)
    gate = torch.full(q.shape[:3], 30.0)
    compare_forward((q, k, v, logits, gate, s2s, st), top_k, 16, TOL[torch.float32])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")   # the routing's sigmoid(-200)
def test_chunk_forward_write_weight_zero():
    """write_gate = -200: beta == 0 exactly, so every w is 0: nothing is written, log(1 - w) = 0,
    and every read sees the initial state (s2s still mixes it at period ends)."""
    q, k, v, logits, _, s2s, st = make_inputs(1, 40, 1, 32, 16, 16, seed=3, s2s=True, pos=7)
    gate = torch.full(q.shape[:3], -200.0)
    o, fin = compare_forward((q, k, v, logits, gate, None, st), 4, 16, TOL[torch.float32])
    assert torch.equal(fin.k, st.k) and torch.equal(fin.v, st.v)
    compare_forward((q, k, v, logits, gate, s2s, st), 1, 16, TOL[torch.float32])


def test_chunk_forward_bf16():
    """bf16 q, k, v load and upcast: the reference on the same bf16 values in fp32 differs only by
    the rounding of o to bf16 (at most one bf16 ulp, 2^-7 relative)."""
    q, k, v, logits, gate, s2s, st = make_inputs(1, 40, 2, 16, 16, 16, seed=9, s2s=True, pos=7)
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    with torch.no_grad():
        o, fin = triton_nstm(q, k, v, logits, gate, 4, s2s, 16, st, True, None, forward="chunk")
        ro, rfin = naive_recurrent_nstm(q.float(), k.float(), v.float(), logits, gate, 4, s2s, 16,
                                        st, True, None)
    assert o.dtype == torch.bfloat16 and fin.k.dtype == torch.float32
    check("o bf16", o.float(), ro, 2 ** -7)
    check("final.k", fin.k, rfin.k, TOL[torch.float32])
    check("final.v", fin.v, rfin.v, TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# gradients: the chunk forward's stored chunk-entry states feed the reverse-segment backward


def _grads(fn, args, top_k, C, seed, **kw):
    q, k, v, logits, gate, s2s, st = args
    leaves = [q, k, v, logits, gate]
    if st is not None:
        leaves += [st.k, st.v]
    if s2s is not None:
        leaves += list(s2s)
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    rest = leaves[5:]
    st2 = None
    if st is not None:
        st2, rest = NSTMState(rest[0], rest[1], st.pos), rest[2:]
    p = S2SParams(*rest) if s2s is not None else None
    o, fin = fn(*leaves[:5], top_k, p, C, st2, True, None, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = sum((x * torch.randn(x.shape, generator=g, dtype=x.dtype)).sum()
               for x in (o, fin.k, fin.v))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return o, fin, [torch.zeros_like(x) if d is None else d for x, d in zip(leaves, grads)]


GRAD_CASES = [
    # B, T, H, S, K, V, top_k, C, pos, s2s, dtype, gate
    (1, 40, 1, 20, 24, 24, 3, 16, 7, True, torch.float32, None),
    (1, 70, 1, 16, 16, 16, 4, 64, 7, False, torch.float32, None),   # a 64-token chunk: 4 sub-chunks
    (1, 24, 1, 16, 16, 16, 1, 16, 0, False, torch.float32, 40.0),   # w = 1 exactly
    (1, 20, 1, 16, 16, 16, 4, 16, 7, True, torch.float64, None),
]


@pytest.mark.parametrize("B,T,H,S,K,V,top_k,C,pos,use_s2s,dtype,gate", GRAD_CASES)
def test_chunk_forward_gradients(B, T, H, S, K, V, top_k, C, pos, use_s2s, dtype, gate):
    args = make_inputs(B, T, H, S, K, V, seed=T + S, dtype=dtype, s2s=use_s2s, pos=pos)
    if gate is not None:
        args = args[:4] + (torch.full(args[0].shape[:3], gate, dtype=dtype),) + args[5:]
    o, fin, grads = _grads(triton_nstm, args, top_k, C, 1, forward="chunk")
    ro, rfin, rgrads = _grads(naive_recurrent_nstm, args, top_k, C, 1)
    tol = TOL[dtype]
    check("o", o, ro, tol)
    check("final.v", fin.v, rfin.v, tol)
    names = ["q", "k", "v", "route_logits", "write_gate", "initial_state.k", "initial_state.v"]
    names += ["w_q", "w_k", "gate"] if use_s2s else []
    assert len(grads) == len(rgrads) == len(names)
    for name, a, b in zip(names, grads, rgrads):
        check(f"d {name}", a, b, tol)


# ---------------------------------------------------------------------------------------------
# streaming, and the switch between the two forwards


def test_chunk_forward_streaming_split_mid_period():
    """One call == two calls passing the state on, split inside a C-period and inside a chunk."""
    B, T, H, S, KV, C = 1, 100, 1, 16, 16, 32
    q, k, v, logits, gate, s2s, st0 = make_inputs(B, T, H, S, KV, KV, seed=5, s2s=True, pos=5)
    cut = 45                                   # tau 50: inside a period, inside a chunk
    with torch.no_grad():
        o, fin = triton_nstm(q, k, v, logits, gate, 4, s2s, C, st0, True, None, forward="chunk")
        o1, mid = triton_nstm(q[:, :cut], k[:, :cut], v[:, :cut], logits[:, :cut],
                              gate[:, :cut], 4, s2s, C, st0, True, None, forward="chunk")
        o2, fin2 = triton_nstm(q[:, cut:], k[:, cut:], v[:, cut:], logits[:, cut:],
                               gate[:, cut:], 4, s2s, C, mid, True, None, forward="chunk")
        ro, rfin = naive_recurrent_nstm(q, k, v, logits, gate, 4, s2s, C, st0, True, None)
    assert mid.pos == 5 + cut and fin2.pos == fin.pos == 5 + T
    check("o split", torch.cat([o1, o2], 1), o, 1e-5)
    check("final.k split", fin2.k, fin.k, 1e-5)
    check("final.v split", fin2.v, fin.v, 1e-5)
    check("o", o, ro, TOL[torch.float32])
    check("final.v", fin.v, rfin.v, TOL[torch.float32])


def test_forward_switch(monkeypatch):
    """``forward=`` / ``NSTM_TRITON_FWD`` pick the forward; both give the same function."""
    monkeypatch.delenv("NSTM_TRITON_FWD", raising=False)
    assert forward_kind() == "chunk"
    monkeypatch.setenv("NSTM_TRITON_FWD", "recurrent")
    assert forward_kind() == "recurrent" and forward_kind("chunk") == "chunk"
    args = make_inputs(1, 63, 1, 16, 16, 16, seed=12, s2s=True, pos=7)
    oc, fc = compare_forward(args, 4, 16, TOL[torch.float32], fwd="chunk")
    orr, fr = compare_forward(args, 4, 16, TOL[torch.float32], fwd=None)   # recurrent, from env
    check("chunk vs recurrent o", oc, orr, 1e-5)
    check("chunk vs recurrent final.v", fc.v, fr.v, 1e-5)
    monkeypatch.setenv("NSTM_TRITON_FWD", "parallel")
    with pytest.raises(ValueError, match="NSTM_TRITON_FWD"):
        triton_nstm(*args[:5], 4, None, 16, None, False, None)
