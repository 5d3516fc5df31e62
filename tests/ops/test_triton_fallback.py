"""A Triton kernel that does not fit the GPU's shared memory: the op runs the chunked PyTorch path
instead, says so once, and the caller gets the same results and gradients (``triton/fallback.py``).

Under the interpreter nothing has a shared-memory limit, so these tests stand one in: a kernel whose
launch raises Triton's ``OutOfResources``, or a device limit of 101 KB (consumer GPUs) with a
kernel that the (stubbed) compiler says needs more."""
from __future__ import annotations

import logging

import pytest
import torch

from nstm_kernels.chunked import chunk_nstm, recurrent_nstm_step
from tests.helpers import F32_INPUTS, assert_close, make_inputs

triton = pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def interpreter():
    from nstm_kernels import dispatch
    reason = dispatch._triton_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def fresh(monkeypatch):
    """Empty verdict caches and log memory, so each test sees its first call."""
    from nstm_kernels.triton import fallback, utils
    monkeypatch.setattr(fallback, "_told", set())
    monkeypatch.setattr(utils, "_FITS", {})


class _Refuses:
    """Stands in for a JITFunction whose launch Triton refuses for lack of shared memory."""

    def __init__(self, fn):
        self.fn = fn.fn

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            raise triton.runtime.errors.OutOfResources(240_000, 101_376, "shared memory")
        return run


def _call(fn, inp, **kw):
    return fn(inp.q, inp.k, inp.v, inp.route_logits, inp.write_gate, 2, inp.s2s, 4, inp.initial_state,
              True, None, **kw)


def _grads(o, fin, inp):
    loss = (o.float() ** 2).sum() + fin.v.float().sum()
    leaves = [inp.q, inp.k, inp.v, inp.route_logits, inp.write_gate, *inp.s2s]
    return torch.autograd.grad(loss, leaves)


def test_a_forward_kernel_that_does_not_fit_runs_the_chunked_path(monkeypatch, fresh, caplog):
    from nstm_kernels.triton import chunk, triton_nstm
    monkeypatch.setattr(chunk, "_chunk_nstm_fwd_kernel_o", _Refuses(chunk._chunk_nstm_fwd_kernel_o))
    inp = make_inputs(B=1, T=9, H=1, K=8, V=8, S=4, seed=1, requires_grad=True, **F32_INPUTS)
    with caplog.at_level(logging.WARNING, logger="nstm_kernels"):
        o, fin = _call(triton_nstm, inp)
        o2, _ = _call(triton_nstm, inp)
    ro, rfin = _call(chunk_nstm, inp)
    assert torch.equal(o, ro) and torch.equal(o2, ro) and torch.equal(fin.v, rfin.v)
    for a, b in zip(_grads(o, fin, inp), _grads(ro, rfin, inp)):
        assert torch.equal(a, b)
    lines = [r.getMessage() for r in caplog.records if "_chunk_nstm_fwd_kernel_o" in r.getMessage()]
    assert len(lines) == 1, lines                      # one log line, not one per call
    assert "240000" in lines[0] and "101376" in lines[0] and "chunked" in lines[0]


def _limit_101k(monkeypatch, needs):
    """A 101 KB GPU on which the kernels named in ``needs`` need that many bytes (others 16 KB)."""
    from nstm_kernels.triton import device, utils
    monkeypatch.setattr(utils, "limit_applies", lambda dev: True)
    monkeypatch.setattr(utils, "device_info", lambda dev: device.DeviceInfo(True, (8, 9), 101_376, 58))
    monkeypatch.setattr(utils, "shared_bytes", lambda k, grid, a, kw: needs.get(k.fn.__name__, 16_384))


@pytest.mark.parametrize("backward,kernel", [("chunk", "_nstm_bwd_kernel"),
                                             ("recurrent", "_nstm_bwd_kernel")])
def test_a_backward_that_would_not_fit_is_caught_before_the_forward_commits(monkeypatch, fresh, caplog,
                                                                            backward, kernel):
    from nstm_kernels.triton import triton_nstm
    # the chunk backward (pass C) and the recurrent one both too big: the whole call goes to PyTorch
    _limit_101k(monkeypatch, {"_chunk_bwd_kernel_c": 240_000, kernel: 240_000})
    inp = make_inputs(B=1, T=9, H=1, K=8, V=8, S=4, seed=2, requires_grad=True, **F32_INPUTS)
    with caplog.at_level(logging.WARNING, logger="nstm_kernels"):
        o, fin = _call(triton_nstm, inp, backward=backward)
    ro, rfin = _call(chunk_nstm, inp)
    assert torch.equal(o, ro)
    for a, b in zip(_grads(o, fin, inp), _grads(ro, rfin, inp)):
        assert torch.equal(a, b)
    assert any(kernel in r.getMessage() and "101376" in r.getMessage() and "chunked" in r.getMessage()
               for r in caplog.records)
    # without grad there is no backward to fit: the Triton forward runs
    caplog.clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="nstm_kernels"):
        o3, _ = _call(triton_nstm, inp, backward=backward)
    assert not caplog.records
    assert_close(o3, ro, name="o (Triton, no grad)")


def test_a_chunk_backward_that_does_not_fit_gives_way_to_the_recurrent_one(monkeypatch, fresh, caplog):
    from nstm_kernels.triton import chunk_bwd, recurrent, triton_nstm
    _limit_101k(monkeypatch, {"_chunk_bwd_kernel_c": 197_632})   # S = K = V = 128 on sm_90
    from nstm_kernels.triton import ops, utils
    ran = []   # the backwards that ran for real (not in a dry run)

    def spy(name, fn):
        def run(*a):
            if not utils._DRY[-1]:
                ran.append(name)
            return fn(*a)
        run.__name__ = fn.__name__
        return run
    monkeypatch.setattr(ops, "chunk_backward", spy("chunk", chunk_bwd.chunk_backward))
    monkeypatch.setattr(ops, "recurrent_backward", spy("recurrent", recurrent.recurrent_backward))
    inp = make_inputs(B=1, T=9, H=1, K=8, V=8, S=4, seed=5, requires_grad=True, **F32_INPUTS)
    with caplog.at_level(logging.WARNING, logger="nstm_kernels"):
        o, fin = _call(triton_nstm, inp, backward="chunk")
        g = _grads(o, fin, inp)
    ro, rfin = _call(chunk_nstm, inp)
    assert ran == ["recurrent"]
    for a, b in zip(g, _grads(ro, rfin, inp)):
        assert_close(a, b, name="grad")
    [line] = [r.getMessage() for r in caplog.records]
    assert "_chunk_bwd_kernel_c" in line and "recurrent Triton backward" in line


def test_when_everything_fits_the_dry_run_changes_nothing(monkeypatch, fresh, caplog):
    from nstm_kernels.triton import device, triton_nstm, utils
    seen = []
    monkeypatch.setattr(utils, "limit_applies", lambda dev: True)
    monkeypatch.setattr(utils, "device_info", lambda dev: device.DeviceInfo(True, (9, 0), 232_448, 132))
    monkeypatch.setattr(utils, "shared_bytes", lambda k, grid, a, kw: seen.append(k.fn.__name__) or 65_536)
    inp = make_inputs(B=1, T=9, H=1, K=8, V=8, S=4, seed=3, requires_grad=True, **F32_INPUTS)
    with caplog.at_level(logging.WARNING, logger="nstm_kernels"):
        o, fin = _call(triton_nstm, inp)
        g = _grads(o, fin, inp)
    ro, rfin = _call(chunk_nstm, inp)
    assert not caplog.records
    assert {"_chunk_bwd_kernel_c", "_chunk_bwd_kernel_h"} <= set(seen)   # the backward was checked
    assert_close(o, ro, name="o")
    for a, b in zip(g, _grads(ro, rfin, inp)):
        assert_close(a, b, name="grad")


def test_the_step_and_the_s2s_fall_back_too(monkeypatch, fresh, caplog):
    from nstm_kernels.s2s import state_attention_torch
    from nstm_kernels.triton import s2s, step, triton_nstm_step, triton_state_attention
    monkeypatch.setattr(step, "_nstm_step_kernel", _Refuses(step._nstm_step_kernel))
    monkeypatch.setattr(s2s, "_s2s_fwd_kernel", _Refuses(s2s._s2s_fwd_kernel))
    inp = make_inputs(B=2, T=1, H=1, K=8, V=8, S=4, seed=4, **F32_INPUTS)
    args = (inp.q[:, 0], inp.k[:, 0], inp.v[:, 0], inp.route_logits[:, 0], inp.write_gate[:, 0], 2,
            inp.s2s, 1, inp.initial_state)
    with caplog.at_level(logging.WARNING, logger="nstm_kernels"):
        o, st = triton_nstm_step(*args)
        y = triton_state_attention(inp.initial_state.v, inp.s2s)
    ro, rst = recurrent_nstm_step(*args)
    assert torch.equal(o, ro) and torch.equal(st.v, rst.v)
    assert torch.equal(y, state_attention_torch(inp.initial_state.v, inp.s2s))
    assert len(caplog.records) == 2


def test_an_s2s_backward_that_would_not_fit_sends_the_call_to_pytorch(monkeypatch, fresh, caplog):
    """The standalone s2s checks its backward in the forward when a gradient is wanted."""
    from nstm_kernels.s2s import state_attention_torch
    from nstm_kernels.triton import triton_state_attention
    _limit_101k(monkeypatch, {"_s2s_bwd_kernel": 240_000})
    inp = make_inputs(B=1, T=1, H=1, K=8, V=8, S=4, seed=6, requires_grad=True, **F32_INPUTS)
    x = inp.initial_state.v
    with caplog.at_level(logging.WARNING, logger="nstm_kernels"):
        y = triton_state_attention(x, inp.s2s)
    assert torch.equal(y, state_attention_torch(x, inp.s2s))
    assert any("_s2s_bwd_kernel" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="nstm_kernels"):
        y2 = triton_state_attention(x, inp.s2s)          # no gradient wanted: the Triton forward runs
    assert not caplog.records
    assert_close(y2, y, name="s2s (Triton, no grad)")
