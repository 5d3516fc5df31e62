"""The v2 contract under random configurations (``tests/ops/fuzz.py``), and the properties the
fuzz run cannot see case by case: exact replacement, NaN never before its token, the tie rule,
the cost for any C, the bounded state over a 1M-token stream."""
from __future__ import annotations

import math
import time

import pytest
import torch

from nstm_kernels import NSTMState, S2SParams, nstm_attention, nstm_step
from tests.ops import fuzz

CHUNKED_CASES = 300
TRITON_CASES = 8   # the interpreter is slow; make fuzz BACKEND=triton runs more


@pytest.fixture
def triton_interpreter():
    """Triton on CPU tensors: needs Triton and its interpreter (set by the conftest without a GPU)."""
    from nstm_kernels import dispatch
    reason = dispatch._triton_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


def _failures(seeds, backend):
    """(seed, config, failures) of every case of ``seeds`` that ``backend`` gets wrong."""
    bad = []
    for seed in seeds:
        cfg = fuzz.case(seed)
        f = fuzz.failures(cfg, fuzz.check(cfg, backend))
        if f:
            bad.append((seed, cfg, f))
    return bad


@pytest.mark.parametrize("block", range(CHUNKED_CASES // 50))
def test_chunked_equals_the_reference_on_random_cases(block):
    bad = _failures(range(block * 50, (block + 1) * 50), "chunked")
    assert not bad, bad[:3]


def test_triton_equals_the_reference_on_random_cases(triton_interpreter):
    # short streams only: the interpreter runs every program serially (seconds per case)
    seeds = [s for s in range(10_000, 11_000) if fuzz.case(s)["T"] <= 17][:TRITON_CASES]
    bad = _failures(seeds, "triton")
    assert not bad, bad[:3]


def test_the_fuzz_check_fails_a_wrong_backend(monkeypatch):
    """The checker is not blind: a backend that drops the s2s is caught."""
    from nstm_kernels import dispatch
    real = dispatch.TABLE["nstm_attention"]["chunked"]
    monkeypatch.setitem(dispatch.TABLE["nstm_attention"], "chunked",
                        lambda *a, **kw: real(*a[:6], None, *a[7:], **kw))
    cfg = fuzz.case(3)
    cfg.update(s2s=True, C=2, T=9, dtype="float64", lengths=None)
    assert fuzz.failures(cfg, fuzz.check(cfg, "chunked"))


BACKENDS = ["reference", "chunked", "triton"]


def _need(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_full_write_replaces_the_slot_exactly(backend, dtype, request):
    _need(backend, request)
    q, k, v = (torch.randn(1, 3, 1, 4).to(dtype) for _ in range(3))
    old = torch.full((1, 1, 1, 4), 1e4)
    st = NSTMState(old.clone(), old.clone(), 0)
    o, fin = nstm_attention(q, k, v, torch.zeros(1, 3, 1, 1), torch.full((1, 3, 1), math.inf), 1,
                            initial_state=st, output_final_state=True, backend=backend)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert fin.v.dtype == state_dtype
    assert torch.equal(fin.v, v[:, -1].to(state_dtype).reshape(1, 1, 1, 4))
    assert torch.equal(fin.k, k[:, -1].to(state_dtype).reshape(1, 1, 1, 4))
    # gate 17: sigmoid rounds to 1 in fp32, top_k = 1 -> w = 1: the step and the sequence agree
    _, s1 = nstm_step(q[:, 0], k[:, 0], v[:, 0], torch.zeros(1, 1, 1), torch.full((1, 1), 17.0), 1,
                      None, 64, st, backend=backend)
    _, s2 = nstm_attention(q[:, :1], k[:, :1], v[:, :1], torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1), 17.0),
                           1, initial_state=st, output_final_state=True, backend=backend)
    assert torch.equal(s1.v, s2.v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["logit", "gate", "inf-logit"])
def test_a_nan_never_reaches_earlier_tokens(backend, where, request):
    _need(backend, request)
    torch.manual_seed(0)
    q = torch.randn(1, 40, 2, 8)
    logits, gate = torch.randn(1, 40, 2, 8), torch.randn(1, 40, 2)
    if where == "logit":
        logits[0, 21, 1, 3] = math.nan
    elif where == "gate":
        gate[0, 21, 1] = math.nan
    else:
        logits[0, 21, 1, 3] = math.inf
    s2s = S2SParams(torch.randn(2, 8, 8), torch.randn(2, 8, 8), torch.zeros(2))
    o, _ = nstm_attention(q, q, q, logits, gate, 2, s2s, 16, backend=backend)
    assert not o[:, :21].isnan().any()
    assert o[:, 21:, 1].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_slot_index(backend, request):
    _need(backend, request)
    from nstm_kernels import sparse_route
    logits = torch.tensor([[[[1.0, 3.0, 3.0, 0.0, 3.0, math.nan]]]])
    idx, _ = sparse_route(logits[..., :5], torch.zeros(1, 1, 1), 2, backend=backend)
    assert idx.flatten().tolist() == [1, 2]
    idx, w = sparse_route(logits, torch.zeros(1, 1, 1), 2, backend=backend)
    assert idx.flatten().tolist()[0] == 5 and w.isnan().all()   # a NaN ranks first, poisons
    torch.manual_seed(1)                                         # bf16 logits tie often
    lg = torch.randn(2, 30, 2, 16).bfloat16().float().round()
    q = torch.randn(2, 30, 2, 8)
    o2, _ = nstm_attention(q, q, q, lg, torch.zeros(2, 30, 2), 4, backend=backend)
    r2, _ = nstm_attention(q, q, q, lg, torch.zeros(2, 30, 2), 4, backend="reference")
    torch.testing.assert_close(o2, r2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("C", [10 ** 5, 10 ** 9])
def test_the_cost_does_not_grow_with_comm_every(C):
    q = torch.randn(1, 20, 2, 8)
    s2s = S2SParams(torch.randn(2, 8, 8), torch.randn(2, 8, 8), torch.zeros(2))
    args = (q, q, q, torch.randn(1, 20, 2, 8), torch.randn(1, 20, 2), 2, s2s)
    t0 = time.perf_counter()
    o, _ = nstm_attention(*args, C, initial_state=NSTMState(torch.zeros(1, 2, 8, 8),
                                                           torch.zeros(1, 2, 8, 8), C - 5))
    took = time.perf_counter() - t0
    ref, _ = nstm_attention(*args, C, initial_state=NSTMState(torch.zeros(1, 2, 8, 8),
                                                             torch.zeros(1, 2, 8, 8), C - 5),
                            backend="reference")
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    assert took < 2.0, took
    from nstm_kernels.chunked.chunk import ChunkLayout
    lay = ChunkLayout(20, C - 5, C, True, 16, "cpu")
    assert lay.N * lay.L <= 20 + 2 * 128 and lay.events == [0] and lay.event_pos == [C - 1]


def test_dtype_mix_computes_in_float64():
    q = torch.randn(1, 9, 2, 8, dtype=torch.float64)
    logits, gate = torch.randn(1, 9, 2, 4), torch.randn(1, 9, 2)        # float32 router outputs
    for backend in ("reference", "chunked"):
        o, fin = nstm_attention(q, q, q, logits, gate, 2, None, 4, output_final_state=True,
                                backend=backend)
        assert o.dtype == torch.float64 and fin.v.dtype == torch.float64
    o1, _ = nstm_attention(q, q, q, logits, gate, 2, backend="chunked")
    o2, _ = nstm_attention(q, q, q, logits.double(), gate.double(), 2, backend="reference")
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_a_million_token_stream_stays_in_the_hull():
    """1M tokens at small width with large random s2s weights: every coordinate of every slot lies
    between the smallest and the largest value that coordinate had in the initial memory or in a
    written row (spec §2, bounded state)."""
    torch.manual_seed(0)
    H, S, D, piece = 2, 4, 3, 65_536
    s2s = S2SParams(torch.randn(H, D, D) * 30, torch.randn(H, D, D) * 30, torch.full((H,), 3.0))
    st = NSTMState(torch.randn(1, H, S, D), torch.randn(1, H, S, D), 0)
    lo_k, hi_k = st.k.amin(2, keepdim=True), st.k.amax(2, keepdim=True)
    lo_v, hi_v = st.v.amin(2, keepdim=True), st.v.amax(2, keepdim=True)
    with torch.no_grad():
        for _ in range(1_000_000 // piece + 1):
            k, v = torch.randn(1, piece, H, D) * 5, torch.randn(1, piece, H, D) * 5
            _, st = nstm_attention(torch.randn(1, piece, H, D), k, v, torch.randn(1, piece, H, S) * 3,
                                   torch.randn(1, piece, H) * 3, 1, s2s, 64, st, True)
            lo_k = torch.minimum(lo_k, k.amin(1).unsqueeze(2))
            hi_k = torch.maximum(hi_k, k.amax(1).unsqueeze(2))
            lo_v = torch.minimum(lo_v, v.amin(1).unsqueeze(2))
            hi_v = torch.maximum(hi_v, v.amax(1).unsqueeze(2))
            eps = 1e-5 * (hi_v - lo_v).abs().max()
            assert (st.v >= lo_v - eps).all() and (st.v <= hi_v + eps).all()
            assert (st.k >= lo_k - eps).all() and (st.k <= hi_k + eps).all()
    assert st.pos >= 1_000_000 and torch.isfinite(st.v).all()
