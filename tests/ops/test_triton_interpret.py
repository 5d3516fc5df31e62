"""The Triton kernels on CPU tensors under Triton's interpreter, against the PyTorch paths.

Every function is compared, outputs and every input gradient, with the ground truth
(``naive_recurrent_nstm``, ``route_torch``, ``state_attention_torch``, ``recurrent_nstm_step``) at
small shapes. The interpreter runs each program serially in numpy, so the shapes are a
representative subset of T in {1, 63, 130}, S in {16, 32}, K = V in {16, 32}, top_k in {1, 4},
comm_every in {16, 64}, pos in {0, 7}, with and without s2s (plus a few ragged sizes, fp64 and the
w -> 1 edge).
"""
import pytest
import torch

from nstm_kernels import nstm_attention, nstm_step, sparse_route, state_attention
from nstm_kernels.chunked import recurrent_nstm_step
from nstm_kernels.reference import naive_recurrent_nstm
from nstm_kernels.routing import route_torch
from nstm_kernels.s2s import state_attention_torch
from tests.helpers import (
    F32_INPUTS,
    TOL,
    as_step,
    assert_close,
    assert_grads_close,
    grad_names,
    make_inputs,
    run_with_grads,
)

pytest.importorskip("triton")
pytestmark = pytest.mark.interpret   # CPU tensors: TRITON_INTERPRET=1 from tests/conftest.py

from nstm_kernels.triton import triton_nstm, triton_nstm_step, triton_sparse_route, triton_state_attention  # noqa: E402

# ---------------------------------------------------------------------------------------------
# routing


@pytest.mark.parametrize("S,top_k", [(16, 1), (32, 4), (24, 24)])
def test_sparse_route_matches_torch(S, top_k):
    inp = make_inputs(B=2, T=9, H=3, S=S, s2s=False, state=False, seed=S + top_k, **F32_INPUTS)
    logits, gate = inp.route_logits.requires_grad_(), inp.write_gate.requires_grad_()
    g = torch.Generator().manual_seed(S + top_k)
    idx, w = triton_sparse_route(logits, gate, top_k)
    ridx, rw = route_torch(logits, gate, top_k)
    assert idx.dtype == torch.int64 and idx.shape == (2, 9, 3, top_k)
    assert torch.equal(idx, ridx)
    assert w.dtype == torch.float32
    assert_close(w, rw, name="weights")
    gw = torch.randn(w.shape, generator=g)
    got = torch.autograd.grad((w * gw).sum(), [logits, gate])
    want = torch.autograd.grad((rw * gw).sum(), [logits, gate])
    assert_close(got[0], want[0], name="d route_logits")
    assert_close(got[1], want[1], name="d write_gate")
    # unselected logits get exactly zero gradient
    sel = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)
    assert (got[0][~sel] == 0).all()


def test_sparse_route_fp64_and_api():
    inp = make_inputs(B=5, T=2, H=1, S=16, dtype=torch.float64, s2s=False, state=False, seed=3)
    logits, gate = inp.route_logits[:, :, 0], inp.write_gate[:, :, 0]     # two leading dims
    idx, w = sparse_route(logits, gate, 4, backend="triton")
    ridx, rw = route_torch(logits, gate, 4)
    assert w.dtype == torch.float64
    assert torch.equal(idx, ridx)
    assert_close(w, rw, name="weights fp64")


# ---------------------------------------------------------------------------------------------
# state-to-state attention


# (40, 72) and (72, 20): several [BLOCK, 32] blocks in every product of the blocked s2s (sgemm)
@pytest.mark.parametrize("B,H,S,V", [(2, 2, 16, 16), (1, 2, 32, 32), (2, 1, 20, 24), (1, 1, 40, 72),
                                     (1, 1, 72, 20)])
def test_state_attention_matches_torch(B, H, S, V):
    inp = make_inputs(B=B, T=1, H=H, K=V, V=V, S=S, seed=B * 100 + S + V, requires_grad=True, **F32_INPUTS)
    x, p = inp.initial_state.v, inp.s2s
    g = torch.Generator().manual_seed(B * 100 + S + V)
    y = triton_state_attention(x, p)
    ry = state_attention_torch(x, p)
    assert y.dtype == x.dtype
    assert_close(y, ry, name="mixed v_state")
    gy = torch.randn(y.shape, generator=g)
    leaves = [x, *p]
    got = torch.autograd.grad((y * gy).sum(), leaves)
    want = torch.autograd.grad((ry * gy).sum(), leaves)
    for name, a, b in zip(["v_state", "w_q", "w_k", "gate"], got, want):
        assert_close(a, b, name=f"d {name}")


def test_state_attention_api_closed_gate_is_identity():
    inp = make_inputs(B=1, T=1, H=2, K=16, V=16, S=16, seed=5, **F32_INPUTS)
    x, p = inp.initial_state.v, inp.s2s._replace(gate=torch.full((2,), -torch.inf))   # sigmoid(-inf) = 0
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
    q, k, v, logits, gate, s2s, state = as_step(make_inputs(
        B=B, T=1, H=H, K=KV, V=KV, S=S, s2s=use_s2s, pos=pos, state=with_state, seed=S + pos, **F32_INPUTS))
    o, new = triton_nstm_step(q, k, v, logits, gate, top_k, s2s, comm_every, state)
    ro, rnew = recurrent_nstm_step(q, k, v, logits, gate, top_k, s2s, comm_every, state)
    assert o.dtype == q.dtype and new.k.dtype == torch.float32 and new.v.dtype == torch.float32
    assert new.pos == rnew.pos == (pos if with_state else 0) + 1
    assert_close(o, ro, name="o")
    assert_close(new.k, rnew.k, name="state.k")
    assert_close(new.v, rnew.v, name="state.v")


@pytest.mark.parametrize("use_s2s", [False, True])
def test_step_touches_only_routed_slots(use_s2s):
    B, H, S, KV, top_k = 2, 2, 32, 16, 4
    q, k, v, logits, gate, s2s, state = as_step(make_inputs(
        B=B, T=1, H=H, K=KV, V=KV, S=S, s2s=use_s2s, pos=3, seed=11, **F32_INPUTS))
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
    q, k, v, logits, gate, _, _ = as_step(make_inputs(B=1, T=1, H=2, K=16, V=16, S=16, s2s=False,
                                                      state=False, seed=2, **F32_INPUTS))
    o, new = nstm_step(q, k, v, logits, gate, 4, None, 16, None, backend="triton")
    ro, rnew = recurrent_nstm_step(q, k, v, logits, gate, 4, None, 16, None)
    assert_close(o, ro, name="o")
    assert_close(new.k, rnew.k, name="state.k")
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


@pytest.mark.parametrize("B,T,H,S,KV,top_k,C,pos,use_s2s,with_state", SEQ_CASES)
def test_nstm_matches_reference(B, T, H, S, KV, top_k, C, pos, use_s2s, with_state):
    inp = make_inputs(B=B, T=T, H=H, K=KV, V=KV, S=S, s2s=use_s2s, pos=pos, state=with_state,
                      seed=T * 7 + S + pos, **F32_INPUTS)
    o, final, grads = run_with_grads(triton_nstm, inp, top_k, C, seed=99)
    ro, rfinal, rgrads = run_with_grads(naive_recurrent_nstm, inp, top_k, C, seed=99)
    assert o.dtype == inp.q.dtype and final.k.dtype == torch.float32
    assert final.pos == rfinal.pos == (pos if with_state else 0) + T
    assert_close(o, ro, name="o")
    assert_close(final.k, rfinal.k, name="final.k")
    assert_close(final.v, rfinal.v, name="final.v")
    assert_grads_close(grads, rgrads, names=grad_names(use_s2s, with_state))


def test_nstm_streaming_split_mid_period():
    """One call equals two calls passing the state on, split inside a C-period (no grad: the
    forward does not store states)."""
    B, T, H, S, KV, C = 1, 70, 1, 16, 16, 16
    q, k, v, logits, gate, s2s, st0 = make_inputs(B=B, T=T, H=H, K=KV, V=KV, S=S, pos=5, seed=5, **F32_INPUTS)
    with torch.no_grad():
        o, fin = triton_nstm(q, k, v, logits, gate, 4, s2s, C, st0, True, None)
        cut = 29   # pos 5 + 29 = 34: inside a period
        o1, mid = triton_nstm(q[:, :cut], k[:, :cut], v[:, :cut], logits[:, :cut], gate[:, :cut],
                              4, s2s, C, st0, True, None)
        o2, fin2 = triton_nstm(q[:, cut:], k[:, cut:], v[:, cut:], logits[:, cut:], gate[:, cut:],
                               4, s2s, C, mid, True, None)
        ro, rfin = naive_recurrent_nstm(q, k, v, logits, gate, 4, s2s, C, st0, True, None)
    assert mid.pos == 5 + cut and fin2.pos == fin.pos == 5 + T
    assert_close(torch.cat([o1, o2], 1), o, 1e-5, "o split")       # the same kernel: tighter
    assert_close(fin2.v, fin.v, 1e-5, "final.v split")
    assert_close(o, ro, name="o")
    assert_close(fin.v, rfin.v, name="final.v")


def test_step_equals_sequence():
    """T one-token Triton steps give the Triton sequence kernel's outputs and state."""
    B, T, H, S, KV, C = 1, 12, 2, 16, 16, 16
    q, k, v, logits, gate, s2s, st = make_inputs(B=B, T=T, H=H, K=KV, V=KV, S=S, pos=7, seed=8, **F32_INPUTS)
    with torch.no_grad():
        o, fin = triton_nstm(q, k, v, logits, gate, 4, s2s, C, st, True, None)
        outs = []
        for t in range(T):   # pos 7 + 8 = 15: an s2s event on the 9th token
            ot, st = triton_nstm_step(q[:, t], k[:, t], v[:, t], logits[:, t], gate[:, t], 4, s2s,
                                      C, st)
            outs.append(ot)
    assert st.pos == fin.pos
    assert_close(torch.stack(outs, 1), o, 1e-5, "o")                # Triton against Triton: tighter
    assert_close(st.k, fin.k, 1e-5, "state.k")
    assert_close(st.v, fin.v, 1e-5, "state.v")


def test_nstm_fp64():
    B, T, H, S, KV, C = 1, 20, 1, 16, 16, 16
    inp = make_inputs(B=B, T=T, H=H, K=KV, V=KV, S=S, dtype=torch.float64, s2s_gate=None, pos=7, seed=4)
    o, final, grads = run_with_grads(triton_nstm, inp, 4, C, seed=1)
    ro, rfinal, rgrads = run_with_grads(naive_recurrent_nstm, inp, 4, C, seed=1)
    assert o.dtype == torch.float64 and final.k.dtype == torch.float64
    assert_close(o, ro, name="o")
    assert_close(final.v, rfinal.v, name="final.v")
    assert_grads_close(grads, rgrads, names=grad_names(True, True))


def test_nstm_write_weight_one_stays_finite():
    """beta = sigmoid(40) == 1 in fp32 and top_k = 1: w = 1 exactly overwrites the slot. The
    backward restores the overwritten rows instead of dividing by 1 - w."""
    B, T, H, S, KV = 1, 24, 1, 16, 16
    inp = make_inputs(B=B, T=T, H=H, K=KV, V=KV, S=S, s2s=False, pos=0, seed=6, **F32_INPUTS)
    inp = inp._replace(write_gate=torch.full((B, T, H), 40.0))
    o, final, grads = run_with_grads(triton_nstm, inp, 1, 16, seed=2)
    ro, rfinal, rgrads = run_with_grads(naive_recurrent_nstm, inp, 1, 16, seed=2)
    assert_close(o, ro, name="o")
    assert_grads_close(grads, rgrads, names=grad_names(False, True))


def test_nstm_api_backend_triton_bf16():
    """The public API dispatches to the Triton kernels; bf16 inputs give bf16 outputs (fp32 state).
    The reference runs on the same bf16 values in fp32, so the only difference is the rounding of
    o to bf16: at most one bf16 ulp (2^-7 relative) whatever the rounding mode (the interpreter
    does not round to nearest like a GPU does)."""
    B, T, H, S, KV = 1, 10, 2, 16, 16
    q, k, v, logits, gate, _, _ = make_inputs(B=B, T=T, H=H, K=KV, V=KV, S=S, s2s=False, state=False,
                                              seed=9, **F32_INPUTS)
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    o, fin = nstm_attention(q, k, v, logits, gate, 4, None, 16, None, True, None, backend="triton")
    ro, rfin = naive_recurrent_nstm(q.float(), k.float(), v.float(), logits, gate, 4, None, 16, None,
                                    True, None)
    assert o.dtype == torch.bfloat16 and fin.k.dtype == torch.float32
    assert_close(o, ro, TOL[torch.bfloat16], "o bf16")
    assert_close(fin.k, rfin.k, name="final.k")
    assert_close(fin.v, rfin.v, name="final.v")


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

