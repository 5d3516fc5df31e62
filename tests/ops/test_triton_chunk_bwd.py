"""The chunk-parallel Triton backward (``nstm_kernels/triton/chunk_bwd.py``) under Triton's
interpreter.

Every input gradient (q, k, v, route_logits, write_gate, the initial state, every s2s field) from
``triton_nstm`` with the chunk forward and ``NSTM_TRITON_BWD=chunk`` against autograd through the
ground truth ``naive_recurrent_nstm``, over a covering subset of T in {1, 63, 130}, S in {16, 32},
K = V in {16, 32}, top_k in {1, 4}, C in {16, 64}, pos in {0, 7}, s2s on/off (plus ragged sizes,
K != V, a period that is no multiple of the chunk, dense writes); fp64; w -> 1 and w = 0; a stream
split in two calls passing the state on; the switch. Shapes are tiny (the interpreter is serial).
"""
import pytest
import torch

from nstm_kernels.reference import naive_recurrent_nstm

pytest.importorskip("triton")
pytestmark = pytest.mark.interpret   # CPU tensors: TRITON_INTERPRET=1 from tests/conftest.py

from nstm_kernels.settings import triton_backward as backward_kind  # noqa: E402
from nstm_kernels.triton import chunk_bwd, ops, triton_nstm  # noqa: E402
from tests.ops.test_triton_chunk import _grads, check, make_inputs  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


@pytest.fixture
def chunk_bwd_on(monkeypatch):
    """Select the chunk backward and count its calls (so a test cannot pass on the other one)."""
    monkeypatch.setenv("NSTM_TRITON_BWD", "chunk")
    calls = []
    real = chunk_bwd.chunk_backward

    def spy(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(ops, "chunk_backward", spy)     # where NSTMChunkFunction looks it up
    return calls


def _names(use_s2s):
    names = ["q", "k", "v", "route_logits", "write_gate", "initial_state.k", "initial_state.v"]
    return names + (["w_q", "w_k", "gate"] if use_s2s else [])


def compare_grads(args, top_k, C, tol, calls):
    o, fin, grads = _grads(triton_nstm, args, top_k, C, 1, forward="chunk")
    ro, rfin, rgrads = _grads(naive_recurrent_nstm, args, top_k, C, 1)
    assert calls, "the chunk backward did not run"
    check("o", o, ro, tol)
    names = _names(args[5] is not None)
    if args[6] is None:
        names = [n for n in names if not n.startswith("initial")]
    assert len(grads) == len(rgrads) == len(names)
    for name, a, b in zip(names, grads, rgrads):
        check(f"d {name}", a, b, tol)


CASES = [
    # B, T, H, S, K, V, top_k, C, pos (None: no state), s2s
    (1, 1, 2, 16, 16, 16, 1, 16, None, True),
    (2, 33, 1, 32, 16, 16, 4, 16, 7, True),
    (1, 130, 1, 16, 32, 32, 4, 64, 7, True),
    (1, 63, 1, 16, 16, 16, 1, 16, 0, False),
    (1, 63, 1, 32, 32, 32, 4, 64, 0, False),
    (1, 100, 1, 32, 16, 16, 1, 64, 0, True),
    (1, 63, 1, 16, 32, 32, 1, 16, 7, False),
    (1, 70, 1, 20, 24, 24, 3, 24, 7, True),    # ragged S, K = V; C = 24: chunks 17, 7, 16, 8, ...
    (1, 50, 1, 16, 32, 16, 4, 100, 7, True),   # K != V; C > L: chunks cut inside a period too
    (1, 40, 1, 16, 16, 16, 16, 16, 7, True),   # top_k = S: dense writes
]


@pytest.mark.parametrize("B,T,H,S,K,V,top_k,C,pos,use_s2s", CASES)
def test_chunk_backward_matches_reference(chunk_bwd_on, B, T, H, S, K, V, top_k, C, pos,
                                          use_s2s):
    args = make_inputs(B, T, H, S, K, V, seed=T * 3 + S + (pos or 0), s2s=use_s2s, pos=pos)
    compare_grads(args, top_k, C, TOL[torch.float32], chunk_bwd_on)


def test_chunk_backward_fp64(chunk_bwd_on):
    args = make_inputs(1, 40, 1, 16, 16, 16, seed=4, dtype=torch.float64, s2s=True, pos=7)
    compare_grads(args, 4, 16, TOL[torch.float64], chunk_bwd_on)


@pytest.mark.parametrize("top_k,g", [(1, 30.0), (4, 30.0), (1, 9.0)])
def test_chunk_backward_write_weight_one(chunk_bwd_on, top_k, g):
    """write_gate = +30: beta == 1 in fp32; with top_k = 1, w = 1 exactly (a full overwrite):
    the decay is clamped at 1 - eps in the forward, and dw is formed without dividing by 1 - w.
    write_gate = +9, top_k = 1: 1 - w = 1.2e-4 with a live gate gradient (dw matters)."""
    q, k, v, logits, _, s2s, st = make_inputs(1, 40, 1, 16, 16, 16, seed=6, s2s=True, pos=7)
    gate = torch.full(q.shape[:3], g)
    compare_grads((q, k, v, logits, gate, s2s, st), top_k, 16, TOL[torch.float32], chunk_bwd_on)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")   # the routing's sigmoid(-200)
def test_chunk_backward_write_weight_zero(chunk_bwd_on):
    """write_gate = -200: every w is 0 (nothing written, log(1 - w) = 0); dq and the state
    gradients are still nonzero, dk = dv = 0, and dw is finite."""
    q, k, v, logits, _, s2s, st = make_inputs(1, 40, 1, 32, 16, 16, seed=3, s2s=True, pos=7)
    gate = torch.full(q.shape[:3], -200.0)
    compare_grads((q, k, v, logits, gate, None, st), 4, 16, TOL[torch.float32], chunk_bwd_on)
    compare_grads((q, k, v, logits, gate, s2s, st), 1, 16, TOL[torch.float32], chunk_bwd_on)


def test_chunk_backward_streaming(chunk_bwd_on):
    """Two calls passing the state on (split inside a period and a chunk), differentiated through
    both, equal the reference on the whole sequence."""
    B, T, H, S, KV, C, cut = 1, 70, 1, 16, 16, 32, 45
    args = make_inputs(B, T, H, S, KV, KV, seed=5, s2s=True, pos=5)
    q, k, v, logits, gate, s2s, st = args

    def two_calls(q, k, v, logits, gate, top_k, s2s, C, st, out_final, scale, **kw):
        o1, mid = triton_nstm(q[:, :cut], k[:, :cut], v[:, :cut], logits[:, :cut],
                              gate[:, :cut], top_k, s2s, C, st, True, scale, forward="chunk")
        o2, fin = triton_nstm(q[:, cut:], k[:, cut:], v[:, cut:], logits[:, cut:],
                              gate[:, cut:], top_k, s2s, C, mid, True, scale, forward="chunk")
        return torch.cat([o1, o2], 1), fin

    o, fin, grads = _grads(two_calls, args, 4, C, 1)
    ro, rfin, rgrads = _grads(naive_recurrent_nstm, args, 4, C, 1)
    assert len(chunk_bwd_on) == 2
    check("o", o, ro, TOL[torch.float32])
    for name, a, b in zip(_names(True), grads, rgrads):
        check(f"d {name}", a, b, TOL[torch.float32])


def test_backward_switch(monkeypatch):
    monkeypatch.delenv("NSTM_TRITON_BWD", raising=False)
    assert backward_kind() == "chunk"   # the default
    monkeypatch.setenv("NSTM_TRITON_BWD", "recurrent")
    assert backward_kind() == "recurrent" and backward_kind("chunk") == "chunk"
    monkeypatch.setenv("NSTM_TRITON_BWD", "parallel")
    with pytest.raises(ValueError, match="NSTM_TRITON_BWD"):
        backward_kind()
    # both backwards give the same gradients
    args = make_inputs(1, 20, 1, 16, 16, 16, seed=8, s2s=True, pos=7)
    monkeypatch.setenv("NSTM_TRITON_BWD", "recurrent")
    _, _, gr = _grads(triton_nstm, args, 4, 16, 1, forward="chunk")
    monkeypatch.setenv("NSTM_TRITON_BWD", "chunk")
    _, _, gc = _grads(triton_nstm, args, 4, 16, 1, forward="chunk")
    for name, a, b in zip(_names(True), gc, gr):
        check(f"chunk vs recurrent d {name}", a, b, 1e-5)
