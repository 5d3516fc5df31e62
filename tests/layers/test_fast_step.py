"""``NSTMLayer.step`` on the CPU takes a shorter path (one matmul for the projections, the conv and
the operator's step in the C++ kernel): it gives what the general path gives, in every layer
variant, for the functional and the in-place step, with int and per-row positions, and it follows
weight changes."""
from __future__ import annotations

import pytest
import torch

from nstm import NSTMLayer
from nstm.layer import NSTMLayerState
from nstm_kernels import NSTMState, cpu
from tests.ops.test_cpu_kernel import _need_kernel


@pytest.fixture(autouse=True)
def kernel():
    _need_kernel()


def make(dtype, **kw):
    torch.manual_seed(3)
    args = dict(num_states=6, top_k=2, comm_every=3)
    args.update(kw)
    layer = NSTMLayer(16, 2, **args).to(dtype).eval()
    with torch.no_grad():
        if layer.s2s is not None:
            layer.s2s.gate.fill_(0.7)
        layer.states.iota.normal_()
    return layer


def run(layer, x, state, inplace, fast, monkeypatch):
    calls = []
    real = layer._fast_step
    monkeypatch.setattr(layer, "_fast_step", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(layer, "_fast_step_ok", (lambda *a: True) if fast else (lambda *a: False))
    outs = []
    for t in range(x.shape[1]):
        y, state = layer.step(x[:, t], state, inplace=inplace)
        outs.append(y)
    monkeypatch.undo()
    assert len(calls) == (x.shape[1] if fast else 0)
    return torch.stack(outs, 1), state


def copy_state(st):
    return NSTMLayerState(NSTMState(st.op.k.clone(), st.op.v.clone(),
                                    st.op.pos.clone() if isinstance(st.op.pos, torch.Tensor) else st.op.pos),
                          None if st.conv is None else st.conv.clone())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("kw", [{}, {"conv_size": 0}, {"use_s2s": False}, {"write_pointer": 5},
                                {"top_k": 6}, {"conv_size": 2, "write_pointer": 4}])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_fast_step_equals_the_general_step(dtype, tol, kw, inplace, per_row, monkeypatch):
    layer = make(dtype, **kw)
    x = torch.randn(2, 9, 16, dtype=dtype)
    _, st = layer(torch.randn(2, 4, 16, dtype=dtype), return_state=True)[:2]
    if per_row:
        st = NSTMLayerState(NSTMState(st.op.k, st.op.v, torch.tensor([4, 7])), st.conv)
        if inplace:                    # the in-place step takes one position for all rows
            with pytest.raises(ValueError, match="one-element int64 tensor"):
                layer.step(x[:, 0], st, inplace=True)
            return
    before = copy_state(st)
    y_fast, s_fast = run(layer, x, copy_state(st), inplace, True, monkeypatch)
    y_ref, s_ref = run(layer, x, copy_state(st), inplace, False, monkeypatch)
    torch.testing.assert_close(y_fast, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(s_fast.op.k, s_ref.op.k, rtol=tol, atol=tol)
    torch.testing.assert_close(s_fast.op.v, s_ref.op.v, rtol=tol, atol=tol)
    if s_ref.conv is not None:
        torch.testing.assert_close(s_fast.conv, s_ref.conv, rtol=tol, atol=tol)
    assert torch.equal(torch.as_tensor(s_fast.op.pos), torch.as_tensor(s_ref.op.pos))
    if not inplace:                                  # the caller's state is left as it was
        assert torch.equal(st.op.k, before.op.k) and torch.equal(st.op.v, before.op.v)
        assert st.conv is None or torch.equal(st.conv, before.conv)


def test_the_cpu_path_is_taken_for_fp32_and_not_for_other_backends_or_dtypes():
    layer = make(torch.float32)
    st = layer.init_state(2)
    x = torch.randn(2, 16)
    assert layer._fast_step_ok(x, st, False)
    assert not layer.bfloat16()._fast_step_ok(x.bfloat16(), layer.init_state(2), False)
    ref = make(torch.float32, backend="reference")
    assert not ref._fast_step_ok(x, ref.init_state(2), False)
    strided = NSTMLayerState(NSTMState(st.op.k.transpose(2, 3).contiguous().transpose(2, 3), st.op.v, 0), st.conv)
    assert layer.float()._fast_step_ok(x, strided, False) and not layer._fast_step_ok(x, strided, True)


def test_the_plan_follows_weight_changes():
    """An optimizer step, a load_state_dict and an in-place edit each change what step computes."""
    layer = make(torch.float64)
    x = torch.randn(2, 16, dtype=torch.float64)
    st = layer.init_state(2)
    y0, _ = layer.step(x, st)
    with torch.no_grad():
        layer.router.bias.add_(0.5)
        layer.in_proj.weight.mul_(1.1)
    y1, _ = layer.step(x, st)
    layer._fast_step_ok = lambda *a: False
    y1_ref, _ = layer.step(x, st)
    del layer._fast_step_ok
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, y1_ref, rtol=1e-12, atol=1e-12)
    other = make(torch.float64, comm_every=3)
    with torch.no_grad():
        other.out_proj.weight.normal_()
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer.step(x, st)[0], other.step(x, st)[0], rtol=1e-12, atol=1e-12)


def test_plan_is_not_saved():
    layer = make(torch.float32)
    layer.step(torch.randn(1, 16), layer.init_state(1))
    assert "_plan" in layer.__dict__
    assert not any("plan" in k for k in layer.state_dict())
    assert cpu.available()
