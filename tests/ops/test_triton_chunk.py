"""The chunk-parallel Triton forward (``nstm_kernels/triton/chunk.py``) under Triton's interpreter.

Outputs and final states against the ground truth (``naive_recurrent_nstm``) over a covering
subset of T in {1, 63, 130}, S in {16, 32}, K = V in {16, 32}, top_k in {1, 4}, C in {16, 64},
pos in {0, 7}, s2s on/off (plus ragged sizes, K != V, a period that is no multiple of the chunk);
fp64; w -> 1 and w = 0 exactly; bf16 inputs; gradients through ``triton_nstm`` with the chunk
forward feeding the reverse-segment backward; streaming; the forward switch. Shapes are tiny:
the interpreter runs every program serially in numpy.
"""
import pytest
import torch

from nstm_kernels.reference import naive_recurrent_nstm
from tests.helpers import F32_INPUTS, TOL, assert_close, assert_grads_close, grad_names, make_inputs, run_with_grads

pytest.importorskip("triton")
pytestmark = pytest.mark.interpret   # CPU tensors: TRITON_INTERPRET=1 from tests/conftest.py

from nstm_kernels.settings import triton_forward as forward_kind  # noqa: E402
from nstm_kernels.triton import triton_nstm  # noqa: E402
from nstm_kernels.triton.device import chunk_length  # noqa: E402
from nstm_kernels.triton.utils import chunk_starts  # noqa: E402


def compare_forward(inp, top_k, C, tol=None, fwd="chunk"):
    """``triton_nstm`` with the ``fwd`` forward against the reference: o and the final state."""
    with torch.no_grad():
        o, fin = triton_nstm(*inp[:5], top_k, inp.s2s, C, inp.initial_state, True, None, forward=fwd)
        ro, rfin = naive_recurrent_nstm(*inp[:5], top_k, inp.s2s, C, inp.initial_state, True, None)
    assert o.dtype == inp.q.dtype and fin.pos == rfin.pos
    assert_close(o, ro, tol, "o")
    assert_close(fin.k, rfin.k, tol, "final.k")
    assert_close(fin.v, rfin.v, tol, "final.v")
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
    inp = make_inputs(B=B, T=T, H=H, K=K, V=V, S=S, s2s=use_s2s, pos=pos or 0, state=pos is not None,
                      seed=T * 7 + S + (pos or 0), **F32_INPUTS)
    o, fin = compare_forward(inp, top_k, C)
    assert fin.k.dtype == fin.v.dtype == torch.float32
    assert fin.pos == (pos or 0) + T


def test_chunk_forward_fp64():
    inp = make_inputs(B=1, T=40, H=1, K=16, V=16, S=16, dtype=torch.float64, s2s_gate=None, pos=7,
                      seed=4)
    o, fin = compare_forward(inp, 4, 16)
    assert o.dtype == fin.k.dtype == torch.float64


@pytest.mark.parametrize("top_k", [1, 4])
def test_chunk_forward_write_weight_one(top_k):
    """write_gate = +30: beta == 1 in fp32; with top_k = 1, w = 1 exactly (a full overwrite).
    log(1 - w) is clamped at w = 1 - eps: finite, and the state moves by at most eps."""
    inp = make_inputs(B=1, T=70, H=1, K=16, V=16, S=16, pos=7, seed=6, **F32_INPUTS)
    compare_forward(inp._replace(write_gate=torch.full((1, 70, 1), 30.0)), top_k, 16)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")   # the routing's sigmoid(-200)
def test_chunk_forward_write_weight_zero():
    """write_gate = -200: beta == 0 exactly, so every w is 0: nothing is written, log(1 - w) = 0,
    and every read sees the initial state (s2s still mixes it at period ends)."""
    inp = make_inputs(B=1, T=40, H=1, K=16, V=16, S=32, pos=7, seed=3, **F32_INPUTS)
    inp = inp._replace(write_gate=torch.full((1, 40, 1), -200.0))
    o, fin = compare_forward(inp._replace(s2s=None), 4, 16)
    assert torch.equal(fin.k, inp.initial_state.k) and torch.equal(fin.v, inp.initial_state.v)
    compare_forward(inp, 1, 16)


def test_chunk_forward_bf16():
    """bf16 q, k, v load and upcast: the reference on the same bf16 values in fp32 differs only by
    the rounding of o to bf16 (at most one bf16 ulp, 2^-7 relative)."""
    q, k, v, logits, gate, s2s, st = make_inputs(B=1, T=40, H=2, K=16, V=16, S=16, pos=7, seed=9,
                                                 **F32_INPUTS)
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    with torch.no_grad():
        o, fin = triton_nstm(q, k, v, logits, gate, 4, s2s, 16, st, True, None, forward="chunk")
        ro, rfin = naive_recurrent_nstm(q.float(), k.float(), v.float(), logits, gate, 4, s2s, 16,
                                        st, True, None)
    assert o.dtype == torch.bfloat16 and fin.k.dtype == torch.float32
    assert_close(o, ro, TOL[torch.bfloat16], "o bf16")
    assert_close(fin.k, rfin.k, name="final.k")
    assert_close(fin.v, rfin.v, name="final.v")


# ---------------------------------------------------------------------------------------------
# gradients: the chunk forward's stored chunk-entry states feed the reverse-segment backward


GRAD_CASES = [
    # B, T, H, S, K, V, top_k, C, pos, s2s, dtype, gate
    (1, 40, 1, 20, 24, 24, 3, 16, 7, True, torch.float32, None),
    (1, 70, 1, 16, 16, 16, 4, 64, 7, False, torch.float32, None),   # a 64-token chunk: 4 sub-chunks
    (1, 24, 1, 16, 16, 16, 1, 16, 0, False, torch.float32, 40.0),   # w = 1 exactly
    (1, 20, 1, 16, 16, 16, 4, 16, 7, True, torch.float64, None),
]


@pytest.mark.parametrize("B,T,H,S,K,V,top_k,C,pos,use_s2s,dtype,gate", GRAD_CASES)
def test_chunk_forward_gradients(B, T, H, S, K, V, top_k, C, pos, use_s2s, dtype, gate):
    inp = make_inputs(B=B, T=T, H=H, K=K, V=V, S=S, dtype=dtype, s2s=use_s2s, s2s_gate=None, pos=pos,
                      seed=T + S)
    if gate is not None:
        inp = inp._replace(write_gate=torch.full((B, T, H), gate, dtype=dtype))
    o, fin, grads = run_with_grads(triton_nstm, inp, top_k, C, forward="chunk")
    ro, rfin, rgrads = run_with_grads(naive_recurrent_nstm, inp, top_k, C)
    assert_close(o, ro, name="o")
    assert_close(fin.v, rfin.v, name="final.v")
    assert_grads_close(grads, rgrads, names=grad_names(use_s2s, state=True))


# ---------------------------------------------------------------------------------------------
# streaming, and the switch between the two forwards


def test_chunk_forward_streaming_split_mid_period():
    """One call == two calls passing the state on, split inside a C-period and inside a chunk."""
    B, T, H, S, KV, C = 1, 100, 1, 16, 16, 32
    q, k, v, logits, gate, s2s, st0 = make_inputs(B=B, T=T, H=H, K=KV, V=KV, S=S, pos=5, seed=5, **F32_INPUTS)
    cut = 45                                   # tau 50: inside a period, inside a chunk
    with torch.no_grad():
        o, fin = triton_nstm(q, k, v, logits, gate, 4, s2s, C, st0, True, None, forward="chunk")
        o1, mid = triton_nstm(q[:, :cut], k[:, :cut], v[:, :cut], logits[:, :cut],
                              gate[:, :cut], 4, s2s, C, st0, True, None, forward="chunk")
        o2, fin2 = triton_nstm(q[:, cut:], k[:, cut:], v[:, cut:], logits[:, cut:],
                               gate[:, cut:], 4, s2s, C, mid, True, None, forward="chunk")
        ro, rfin = naive_recurrent_nstm(q, k, v, logits, gate, 4, s2s, C, st0, True, None)
    assert mid.pos == 5 + cut and fin2.pos == fin.pos == 5 + T
    assert_close(torch.cat([o1, o2], 1), o, 1e-5, "o split")       # the same kernel: tighter
    assert_close(fin2.k, fin.k, 1e-5, "final.k split")
    assert_close(fin2.v, fin.v, 1e-5, "final.v split")
    assert_close(o, ro, name="o")
    assert_close(fin.v, rfin.v, name="final.v")


def test_forward_switch(monkeypatch):
    """``forward=`` / ``NSTM_TRITON_FWD`` pick the forward; both give the same function."""
    monkeypatch.delenv("NSTM_TRITON_FWD", raising=False)
    assert forward_kind() == "chunk"
    monkeypatch.setenv("NSTM_TRITON_FWD", "recurrent")
    assert forward_kind() == "recurrent" and forward_kind("chunk") == "chunk"
    inp = make_inputs(B=1, T=63, H=1, K=16, V=16, S=16, pos=7, seed=12, **F32_INPUTS)
    oc, fc = compare_forward(inp, 4, 16, fwd="chunk")
    orr, fr = compare_forward(inp, 4, 16, fwd=None)   # recurrent, from env
    assert_close(oc, orr, 1e-5, "chunk vs recurrent o")
    assert_close(fc.v, fr.v, 1e-5, "chunk vs recurrent final.v")
    monkeypatch.setenv("NSTM_TRITON_FWD", "parallel")
    with pytest.raises(ValueError, match="NSTM_TRITON_FWD"):
        triton_nstm(*inp[:5], 4, None, 16, None, False, None)
