"""The C++ CPU kernel (``nstm_kernels.cpu``, the ``"chunked"`` backend's path for CPU tensors)
against the token-by-token reference: outputs, final states and every gradient, in fp64 to 1e-10,
across checkpoint blocks, period ends, positions, packed batches and per-row positions; the
fallback to the PyTorch chunk form when the kernel cannot be built or is switched off."""
from __future__ import annotations

import logging
import math
import shutil
import sys

import pytest
import torch

from nstm_kernels import NSTMState, S2SParams, cpu, nstm_attention
from nstm_kernels.chunked import chunk_nstm
from nstm_kernels.reference import naive_recurrent_nstm
from tests.helpers import assert_close, assert_grads_close, make_inputs, run_with_grads


def _need_kernel():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the chunked backend runs the PyTorch form")
    reason = cpu.unavailable_reason()
    assert reason is None, f"the C++ CPU kernel should build here: {reason}"


@pytest.fixture(autouse=True)
def kernel():
    _need_kernel()


def _cpu(q, k, v, lg, g, top_k, s2s, C, st, out, scale=None, **kw):
    return cpu.cpu_nstm(q, k, v, lg, g, top_k, s2s, C, st, out, scale, **kw)


CASES = [
    # (B, T, H, K, V, S, top_k, C, pos, s2s, state): blocks of 64 tokens, period ends inside and
    # on block edges, a start mid-period, top_k = S (dense), top_k = 1, C = 1 (an s2s every token)
    (2, 16, 2, 8, 8, 8, 2, 4, 0, True, True),
    (1, 150, 2, 4, 6, 5, 2, 16, 7, True, True),
    (2, 130, 1, 5, 3, 4, 4, 64, 60, True, False),
    (1, 70, 3, 4, 4, 6, 1, 1, 0, True, True),
    (2, 65, 2, 4, 4, 4, 3, 8, 3, False, True),
    (1, 1, 2, 4, 4, 4, 2, 1, 0, True, True),
    # the lengths with unrolled loops (16, 32, 64, 128) next to generic ones
    (1, 70, 2, 16, 32, 16, 4, 16, 3, True, True),
    (1, 40, 1, 64, 16, 32, 2, 8, 0, True, True),
    (1, 20, 1, 128, 128, 8, 3, 8, 0, True, True),
]


@pytest.mark.parametrize("B,T,H,K,V,S,top_k,C,pos,s2s,state", CASES)
def test_matches_the_reference_in_float64(B, T, H, K, V, S, top_k, C, pos, s2s, state):
    inp = make_inputs(B, T, H, K, V, S, s2s=s2s, pos=pos, state=state, seed=T + S)
    o, st, g = run_with_grads(_cpu, inp, top_k, C)
    ro, rst, rg = run_with_grads(naive_recurrent_nstm, inp, top_k, C)
    assert_close(o, ro, name="o")
    assert_close(st.k, rst.k, name="final k")
    assert_close(st.v, rst.v, name="final v")
    assert st.pos == rst.pos
    assert_grads_close(g, rg)


# the block-parallel schedule (``schedule="blocks"``): the s2s period a multiple of the 64-token
# block, or no s2s; several blocks, starts mid-block (blocks are aligned to absolute positions),
# period ends on every block edge (C = 64) and every other one (C = 128), a single partial block,
# top_k = S and top_k = 1, the unrolled lengths
BLOCK_CASES = [
    (1, 300, 2, 8, 8, 8, 2, 64, 0, True, True),
    (2, 200, 2, 4, 6, 5, 2, 64, 37, True, True),
    (1, 330, 1, 8, 8, 6, 6, 128, 100, True, False),
    (2, 150, 2, 4, 4, 4, 3, 64, 5, False, True),
    (1, 40, 2, 4, 4, 4, 1, 64, 30, True, True),
    (1, 260, 2, 16, 32, 16, 4, 64, 63, True, True),
]


@pytest.mark.parametrize("B,T,H,K,V,S,top_k,C,pos,s2s,state", BLOCK_CASES)
def test_the_block_schedule_matches_the_reference_and_the_unit_schedule(B, T, H, K, V, S, top_k, C,
                                                                        pos, s2s, state):
    inp = make_inputs(B, T, H, K, V, S, s2s=s2s, pos=pos, state=state, seed=T + S)
    o, st, g = run_with_grads(_cpu, inp, top_k, C, schedule="blocks")
    uo, ust, ug = run_with_grads(_cpu, inp, top_k, C, schedule="units")
    ro, rst, rg = run_with_grads(naive_recurrent_nstm, inp, top_k, C)
    assert_close(o, ro, name="o")
    assert_close(st.k, rst.k, name="final k")
    assert_close(st.v, rst.v, name="final v")
    assert_grads_close(g, rg)
    # the forward does the same arithmetic in another order of tasks: the same bits
    assert torch.equal(o, uo) and torch.equal(st.k, ust.k) and torch.equal(st.v, ust.v)
    # the backward sums the adjoint in another order: equal to rounding
    assert_grads_close(g, ug, tol=1e-13)


def test_the_block_schedule_with_packed_documents_and_per_row_positions():
    inp = make_inputs(1, 400, 2, 4, 4, 6, seed=8)
    cu = torch.tensor([0, 130, 131, 200, 400])              # a 1-token document among longer ones
    st = NSTMState(torch.randn(4, 2, 6, 4, dtype=torch.float64),
                   torch.randn(4, 2, 6, 4, dtype=torch.float64), torch.tensor([5, 0, 63, 64]))
    inp = inp._replace(initial_state=st)
    o, fst, g = run_with_grads(_cpu, inp, 2, 64, cu_seqlens=cu, schedule="blocks")
    ro, rfst, rg = run_with_grads(naive_recurrent_nstm, inp, 2, 64, cu_seqlens=cu)
    assert_close(o, ro, name="o")
    assert_close(fst.k, rfst.k, name="final k")
    assert_close(fst.v, rfst.v, name="final v")
    assert_grads_close(g, rg)
    rows = make_inputs(3, 150, 2, 4, 4, 6, seed=9)
    rows = rows._replace(initial_state=rows.initial_state._replace(pos=torch.tensor([0, 70, 127])))
    o, fst, g = run_with_grads(_cpu, rows, 2, 64, schedule="blocks")
    ro, rfst, rg = run_with_grads(naive_recurrent_nstm, rows, 2, 64)
    assert_close(o, ro, name="o")
    assert fst.pos.tolist() == rfst.pos.tolist()
    assert_grads_close(g, rg)


def test_the_block_schedule_gives_the_same_bits_on_any_thread_count():
    """Every sum of the block schedule has a fixed order (a block's own sums in its task, the
    hand-off of the adjoint and the s2s weight gradients in each unit's chain), whichever thread
    runs which task and when."""
    inp = make_inputs(1, 700, 2, 8, 8, 8, dtype=torch.float32, seed=12)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(run_with_grads(_cpu, inp, 2, 64, schedule="blocks"))
    finally:
        torch.set_num_threads(before)
    a = runs[0]
    for b in runs[1:]:
        assert torch.equal(a[0], b[0]) and torch.equal(a[1].k, b[1].k) and torch.equal(a[1].v, b[1].v)
        assert all(torch.equal(a[2][n], b[2][n]) for n in a[2])


def test_the_automatic_schedule_gives_the_same_bits_on_any_thread_count():
    """"auto" picks the schedule from the call's shape alone (blocks for at most 16 (sequence,
    head) pairs), never from the thread count: the two schedules' backwards sum in different
    orders, so a thread-count rule would change the gradient bits with the thread count."""
    inp = make_inputs(2, 300, 2, 8, 8, 8, dtype=torch.float32, seed=13)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = run_with_grads(_cpu, inp, 2, 64, schedule="auto")
        torch.set_num_threads(2)
        b = run_with_grads(_cpu, inp, 2, 64, schedule="auto")
    finally:
        torch.set_num_threads(before)
    blocks = run_with_grads(_cpu, inp, 2, 64, schedule="blocks")
    for x in (a, b):
        assert all(torch.equal(x[2][n], blocks[2][n]) for n in x[2])       # 4 units: blocks


def test_the_block_schedule_gradcheck():
    inp = make_inputs(1, 70, 1, 2, 2, 3, pos=10, seed=4)
    leaves = [t.detach().clone().requires_grad_(True) for t in
              (inp.q, inp.k, inp.v, inp.route_logits, inp.write_gate, *inp.s2s,
               inp.initial_state.k, inp.initial_state.v)]

    def fn(q, k, v, lg, g, wq, wk, gate, k0, v0):
        o, st = _cpu(q, k, v, lg, g, 2, S2SParams(wq, wk, gate), 64, NSTMState(k0, v0, 10), True,
                     schedule="blocks")
        return o, st.k, st.v

    assert torch.autograd.gradcheck(fn, leaves)


def test_a_schedule_is_checked(monkeypatch):
    inp = make_inputs(1, 8, 1, 4, 4, 4, seed=1)
    with pytest.raises(ValueError, match="schedule"):
        _cpu(*inp[:5], 2, inp.s2s, 64, inp.initial_state, True, schedule="threads")
    monkeypatch.setenv("NSTM_CPU_SCHEDULE", "fast")
    with pytest.raises(ValueError, match="NSTM_CPU_SCHEDULE"):
        _cpu(*inp[:5], 2, inp.s2s, 64, inp.initial_state, True)
    monkeypatch.setenv("NSTM_CPU_SCHEDULE", "blocks")       # the variable is read at call time
    o, _ = _cpu(*inp[:5], 2, inp.s2s, 64, inp.initial_state, True)
    ro, _ = naive_recurrent_nstm(*inp[:5], 2, inp.s2s, 64, inp.initial_state, True)
    assert_close(o, ro)


def test_gradcheck():
    inp = make_inputs(1, 9, 2, 3, 3, 4, pos=2, seed=3)
    leaves = [t.detach().clone().requires_grad_(True) for t in
              (inp.q, inp.k, inp.v, inp.route_logits, inp.write_gate, *inp.s2s,
               inp.initial_state.k, inp.initial_state.v)]

    def fn(q, k, v, lg, g, wq, wk, gate, k0, v0):
        o, st = _cpu(q, k, v, lg, g, 2, S2SParams(wq, wk, gate), 4, NSTMState(k0, v0, 2), True)
        return o, st.k, st.v

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision(dtype):
    inp = make_inputs(2, 100, 2, 8, 8, 8, dtype=dtype, seed=5)
    o, st, g = run_with_grads(_cpu, inp, 3, 16)
    ref = make_inputs(2, 100, 2, 8, 8, 8, dtype=torch.float64, seed=5)
    ro, rst, rg = run_with_grads(naive_recurrent_nstm, ref, 3, 16)
    assert o.dtype == dtype and st.k.dtype == torch.float32
    tol = 1e-4 if dtype == torch.float32 else 2 ** -7
    assert_close(o.double(), ro, tol, name="o")
    assert_close(st.v.double(), rst.v, 1e-4 if dtype == torch.float32 else 1e-2, name="final v")
    if dtype == torch.float32:
        assert_grads_close({n: t.double() for n, t in g.items()}, rg, tol=1e-4)


def test_packed_and_per_row_positions_equal_the_loop():
    inp = make_inputs(1, 90, 2, 4, 4, 6, seed=8)
    cu = torch.tensor([0, 30, 31, 90])
    st = NSTMState(torch.randn(3, 2, 6, 4, dtype=torch.float64),
                   torch.randn(3, 2, 6, 4, dtype=torch.float64), torch.tensor([5, 0, 63]))
    inp = inp._replace(initial_state=st)
    o, fst, g = run_with_grads(_cpu, inp, 2, 8, cu_seqlens=cu)
    ro, rfst, rg = run_with_grads(naive_recurrent_nstm, inp, 2, 8, cu_seqlens=cu)
    assert_close(o, ro, name="o")
    assert_close(fst.v, rfst.v, name="final v")
    assert fst.pos.tolist() == [35, 1, 122]
    assert_grads_close(g, rg)
    # per-row positions
    rows = make_inputs(3, 40, 2, 4, 4, 6, seed=9)
    rows = rows._replace(initial_state=rows.initial_state._replace(pos=torch.tensor([0, 7, 62])))
    o, fst, g = run_with_grads(_cpu, rows, 2, 8)
    ro, rfst, rg = run_with_grads(naive_recurrent_nstm, rows, 2, 8)
    assert_close(o, ro, name="o")
    assert fst.pos.tolist() == rfst.pos.tolist()
    assert_grads_close(g, rg)


def test_a_full_write_replaces_the_slot_exactly():
    # top_k = 1 and a saturated gate: w = 1 exactly; the old (huge) content must not survive
    q = torch.randn(1, 6, 1, 4)
    kv = torch.randn(1, 6, 1, 4)
    lg = torch.zeros(1, 6, 1, 3)
    lg[..., 1] = 5.0
    gate = torch.full((1, 6, 1), 40.0)
    st = NSTMState(torch.full((1, 1, 3, 4), 1e30), torch.full((1, 1, 3, 4), 1e30), 0)
    _, fin = _cpu(q, kv, kv, lg, gate, 1, None, 64, st, True)
    assert torch.equal(fin.k[0, 0, 1], kv[0, -1, 0]) and torch.equal(fin.v[0, 0, 1], kv[0, -1, 0])
    assert torch.equal(fin.k[0, 0, 0], st.k[0, 0, 0])      # unrouted slots untouched


def test_a_nan_reaches_no_earlier_token():
    q = torch.randn(1, 80, 2, 8)
    lg, gate = torch.randn(1, 80, 2, 8), torch.randn(1, 80, 2)
    lg[0, 70, 1, 3] = math.nan
    s2s = S2SParams(torch.randn(2, 8, 8), torch.randn(2, 8, 8), torch.zeros(2))
    o, _ = _cpu(q, q, q, lg, gate, 2, s2s, 16, None, False)
    assert not o[:, :70].isnan().any() and o[:, 70:, 1].isnan().all()
    assert not o[:, :, 0].isnan().any()


def test_the_same_bits_on_one_and_two_threads():
    inp = make_inputs(2, 200, 3, 8, 8, 8, dtype=torch.float32, seed=11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = run_with_grads(_cpu, inp, 2, 16)
        torch.set_num_threads(2)
        b = run_with_grads(_cpu, inp, 2, 16)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].v, b[1].v)
    assert all(torch.equal(a[2][n], b[2][n]) for n in a[2])


def test_inputs_are_left_untouched_and_no_grad_runs():
    inp = make_inputs(1, 70, 2, 4, 4, 4, seed=2)
    copies = [t.clone() for t in (inp.q, inp.route_logits, inp.initial_state.k, inp.initial_state.v)]
    with torch.no_grad():
        o, st = _cpu(*inp[:5], 2, inp.s2s, 8, inp.initial_state, True)
    ro, _ = naive_recurrent_nstm(*inp[:5], 2, inp.s2s, 8, inp.initial_state, True)
    assert_close(o, ro)
    for a, b in zip(copies, (inp.q, inp.route_logits, inp.initial_state.k, inp.initial_state.v)):
        assert torch.equal(a, b)


def test_the_chunked_backend_runs_the_kernel_on_cpu(monkeypatch):
    calls = []
    real = cpu.cpu_nstm
    monkeypatch.setattr(cpu, "cpu_nstm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    inp = make_inputs(1, 20, 2, 4, 4, 4, seed=1)
    nstm_attention(*inp[:5], 2, inp.s2s, 8, backend="chunked")
    assert calls == [1]
    # the maps come from the same kernel, so asking for them does not change a bit of the output
    from nstm_kernels import nstm_attention_with_maps
    o, _ = nstm_attention(*inp[:5], 2, inp.s2s, 8, backend="chunked")
    om, _, _ = nstm_attention_with_maps(*inp[:5], 2, inp.s2s, 8, backend="chunked")
    assert calls == [1, 1, 1] and torch.equal(o, om)


@pytest.mark.parametrize("pos", [0, 5])
def test_maps_match_the_reference(pos):
    inp = make_inputs(2, 37, 2, 4, 6, 5, pos=pos, seed=4)
    o, st, maps = _cpu(*inp[:5], 2, inp.s2s, 8, inp.initial_state, True, return_maps=True)
    ro, rst, rmaps = naive_recurrent_nstm(*inp[:5], 2, inp.s2s, 8, inp.initial_state, True,
                                          return_maps=True)
    assert_close(o, ro, name="o")
    assert torch.equal(maps["indices"], rmaps["indices"])
    assert maps["s2s_pos"] == rmaps["s2s_pos"] and len(maps["s2s_pos"]) == maps["s2s"].shape[0]
    for name in ("weights", "read", "s2s"):
        assert_close(maps[name], rmaps[name], name=name)


def test_switched_off_or_unbuildable_falls_back(monkeypatch, caplog):
    inp = make_inputs(1, 20, 2, 4, 4, 4, seed=1)
    want, _ = chunk_nstm(*inp[:5], 2, inp.s2s, 8)
    monkeypatch.setenv("NSTM_CPU_KERNEL", "0")
    assert not cpu.usable(inp.q, 2, False)
    o, _ = nstm_attention(*inp[:5], 2, inp.s2s, 8, backend="chunked")
    assert torch.equal(o, want)
    monkeypatch.setenv("NSTM_CPU_KERNEL", "2")
    with pytest.raises(ValueError, match="NSTM_CPU_KERNEL must be 0 or 1"):
        cpu.usable(inp.q, 2, False)
    monkeypatch.delenv("NSTM_CPU_KERNEL")
    # a build that fails: one log line, then the PyTorch form
    monkeypatch.setattr(cpu, "_loaded", False)
    monkeypatch.setattr(cpu, "_build", lambda: (_ for _ in ()).throw(RuntimeError("no compiler")))
    cpu.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="nstm_kernels"):
            o1, _ = nstm_attention(*inp[:5], 2, inp.s2s, 8, backend="chunked")
            o2, _ = nstm_attention(*inp[:5], 2, inp.s2s, 8, backend="chunked")
        assert torch.equal(o1, want) and torch.equal(o2, want)
        lines = [r.getMessage() for r in caplog.records if "C++ CPU kernel" in r.getMessage()]
        assert len(lines) == 1 and "no compiler" in lines[0]
        with pytest.raises(RuntimeError, match="no compiler"):
            cpu.cpu_nstm(*inp[:5], 2, inp.s2s, 8)
    finally:
        cpu.reset()


def test_the_raw_op_rejects_bad_inputs():
    q = torch.randn(5, 2, 4)
    lg = torch.randn(5, 2, 3)
    gate = torch.randn(5, 2)
    k0 = torch.zeros(1, 2, 3, 4)
    seg = torch.tensor([[0, 5, 0]])
    e = torch.zeros(0)
    ok = (q, q, q, lg, gate, k0, k0, seg, e, e, e, 2, 8, False, 0.5, 64)
    torch.ops.nstm_cpu.forward(*ok)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.nstm_cpu.forward(q.transpose(0, 1).contiguous().transpose(0, 1), *ok[1:])
    with pytest.raises(RuntimeError, match="outside the time axis"):
        torch.ops.nstm_cpu.forward(*ok[:7], torch.tensor([[2, 5, 0]]), *ok[8:])
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.nstm_cpu.forward(*ok[:3], lg.double(), *ok[4:])
    with pytest.raises(RuntimeError, match="top_k must be in"):
        torch.ops.nstm_cpu.forward(*ok[:11], 4, *ok[12:])
    with pytest.raises(RuntimeError, match="initial keys"):
        torch.ops.nstm_cpu.forward(*ok[:5], torch.zeros(2, 2, 3, 4), *ok[6:])
    with pytest.raises(RuntimeError, match="negative position"):
        torch.ops.nstm_cpu.forward(*ok[:7], torch.tensor([[0, 5, -1]]), *ok[8:])
    with pytest.raises(RuntimeError, match="schedule must be"):
        torch.ops.nstm_cpu.forward(*ok, False, 0, 3)
    # the backward makes the forward's checks too (with its own inputs)
    w = torch.randn(2, 4, 4)
    mix = torch.rand(2)
    fwd = torch.ops.nstm_cpu.forward(q, q, q, lg, gate, k0, k0, seg, w, w, mix, 2, 8, True, 0.5, 64)
    ck, do = fwd[3], torch.randn(5, 2, 4)
    bwd = (q, q, q, lg, gate, seg, w, w, mix, ck, do, k0, k0, 2, 8, True, 0.5, 64)
    torch.ops.nstm_cpu.backward(*bwd)
    with pytest.raises(RuntimeError, match="C must be > 0"):
        torch.ops.nstm_cpu.backward(*bwd[:14], 0, *bwd[15:])
    with pytest.raises(RuntimeError, match=r"segment 0 \(start 2, length 5\) lies outside"):
        torch.ops.nstm_cpu.backward(*bwd[:5], torch.tensor([[2, 5, 0]]), *bwd[6:])
    with pytest.raises(RuntimeError, match=r"checkpoints do not match the segments: expected a contiguous \[1, 2"):
        torch.ops.nstm_cpu.backward(*bwd[:9], torch.cat([ck, ck]), *bwd[10:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pos", [0, 7, "rows"])
@pytest.mark.parametrize("s2s", [True, False])
def test_step_matches_the_reference(dtype, pos, s2s):
    from nstm_kernels.reference import naive_nstm_step
    from tests.helpers import as_step
    p = torch.tensor([7, 3, 15]) if pos == "rows" else pos
    inp = as_step(make_inputs(3, 1, 2, 8, 8, 8, dtype=dtype, s2s=s2s, pos=0, seed=6))
    st = inp.initial_state._replace(pos=p)
    args = (*inp[:5], 3, inp.s2s, 8)
    o, new = cpu.chunked_nstm_step(*args, st)
    ro, rnew = naive_nstm_step(*args, st)
    tol = None if dtype == torch.float64 else 1e-5
    assert_close(o, ro, tol, name="o")
    assert_close(new.k, rnew.k, tol, name="k")
    assert_close(new.v, rnew.v, tol, name="v")
    assert torch.equal(torch.as_tensor(new.pos), torch.as_tensor(rnew.pos))
    assert not torch.equal(new.v, st.v)          # a new state; the caller's is untouched
    # in place
    sk, sv = st.k.clone(), st.v.clone()
    o2 = cpu.chunked_nstm_step_(*args, sk, sv, p)
    assert torch.equal(o2, o) and torch.equal(sk, new.k) and torch.equal(sv, new.v)


def test_step_with_gradients_runs_the_differentiable_pytorch_step():
    from tests.helpers import as_step
    full = make_inputs(2, 1, 2, 4, 4, 4, seed=2, requires_grad=True)
    inp = as_step(full)
    o, new = cpu.chunked_nstm_step(*inp[:5], 2, inp.s2s, 4, inp.initial_state)
    (o.sum() + new.v.sum()).backward()
    assert full.q.grad is not None and full.initial_state.v.grad is not None


def test_routing_without_gradients_equals_route_torch():
    from nstm_kernels.routing import route_torch
    torch.manual_seed(3)
    lg = torch.randn(3, 50, 2, 16).bfloat16().float().round()   # many ties
    lg[0, 3, 1, 5] = math.nan
    lg[1, 7, 0, :] = -math.inf
    gate = torch.randn(3, 50, 2)
    idx, w = cpu.chunked_sparse_route(lg, gate, 4)
    ridx, rw = route_torch(lg, gate, 4)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w, rw, equal_nan=True)
    lg.requires_grad_(True)                                      # with gradients: route_torch
    _, wg = cpu.chunked_sparse_route(lg, gate, 4)
    assert wg.requires_grad


def test_tokens_outside_every_segment_get_zero_outputs_and_gradients():
    """The kernel's outputs are allocated uninitialised and written per unit; the tokens that no
    segment covers (the raw op allows gaps) read as zeros, output and every gradient, and the
    covered ones equal each segment run alone."""
    torch.manual_seed(0)
    T, H, K, S = 12, 2, 4, 5
    segs = [(0, 4, 0), (6, 3, 2)]                  # tokens 4, 5, 9, 10, 11 are in no segment
    leaves = [torch.randn(1, T, H, n, dtype=torch.float64, requires_grad=True) for n in (K, K, K, S)]
    gate = torch.randn(1, T, H, dtype=torch.float64, requires_grad=True)
    s2s = S2SParams(torch.randn(H, K, K, dtype=torch.float64), torch.randn(H, K, K, dtype=torch.float64),
                    torch.zeros(H, dtype=torch.float64))
    k0 = torch.randn(2, H, S, K, dtype=torch.float64)
    v0 = torch.randn(2, H, S, K, dtype=torch.float64)
    w = torch.randn(1, T, H, K, dtype=torch.float64)
    o, _, _, _ = cpu._run(*leaves, gate, 2, s2s, 3, k0, v0, segs, None)
    (o * w).sum().backward()
    gaps = [4, 5, 9, 10, 11]
    assert torch.equal(o[0, gaps], torch.zeros_like(o[0, gaps]))
    for x in leaves + [gate]:
        assert torch.equal(x.grad[0, gaps], torch.zeros_like(x.grad[0, gaps]))
    for n, (start, length, pos) in enumerate(segs):
        part = [x.detach()[:, start:start + length].clone().requires_grad_() for x in leaves + [gate]]
        o1, _, _, _ = cpu._run(*part, 2, s2s, 3, k0[n:n + 1], v0[n:n + 1], [(0, length, pos)], None)
        (o1 * w[:, start:start + length]).sum().backward()
        torch.testing.assert_close(o[:, start:start + length], o1, rtol=1e-12, atol=1e-12)
        for x, p in zip(leaves + [gate], part):
            torch.testing.assert_close(x.grad[:, start:start + length], p.grad, rtol=1e-12, atol=1e-12)


def test_an_unimportable_extension_builder_falls_back(monkeypatch, tmp_path):
    """``torch.utils.cpp_extension`` imports setuptools, and that import can fail (setuptools' own
    distutils shim asserts in some environments): the build then fails like any other, with the
    reason, and the operator runs the PyTorch form instead of raising from the first call."""
    inp = make_inputs(1, 12, 2, 4, 4, 4, seed=2)
    want, _ = chunk_nstm(*inp[:5], 2, inp.s2s, 8)
    monkeypatch.delattr(torch.utils, "cpp_extension", raising=False)
    monkeypatch.setitem(sys.modules, "torch.utils.cpp_extension", None)   # import raises ImportError
    monkeypatch.setattr(cpu, "_loaded", False)
    monkeypatch.setattr(cpu, "build_dir", lambda: str(tmp_path))   # its build.log goes here
    cpu.reset()
    try:
        reason = cpu.unavailable_reason()
        assert reason is not None and "building the C++ CPU kernel failed" in reason
        assert (tmp_path / "build.log").is_file()
        assert not cpu.usable(inp.q, 2, False)
        o, _ = nstm_attention(*inp[:5], 2, inp.s2s, 8, backend="chunked")
        assert torch.equal(o, want)
    finally:
        monkeypatch.undo()
        cpu.reset()
