"""API details a new user trips over: result types, the step's shapes, detach for truncated BPTT,
aux_loss never stale, the head-first warning, T = 0, the config, the version."""
from __future__ import annotations

import warnings

import pytest
import torch

import nstm
from nstm import NSTMLM, LayerOutput, LMOutput, NSTMBlock, NSTMConfig, NSTMLayer, NSTMLayerState, detach_state
from nstm_kernels import nstm_attention


def small(**kw):
    args = dict(d_model=32, num_heads=2, num_states=8, top_k=2, comm_every=4)
    args.update(kw)
    return NSTMLayer(**args)


def test_layer_returns_y_or_a_layer_output():
    layer = small().eval()
    x = torch.randn(2, 9, 32)
    y = layer(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 9, 32)
    out = layer(x, return_state=True)
    assert isinstance(out, LayerOutput) and out.maps is None and isinstance(out.state, NSTMLayerState)
    assert torch.equal(out.y, y)
    out = layer(x, return_maps=True)
    assert out.state is None and set(out.maps) >= {"indices", "weights", "read", "s2s", "s2s_pos"}
    y2, st, maps = layer(x, return_state=True, return_maps=True)
    assert torch.equal(y2, y) and st is not None and maps is not None


def test_block_and_lm_follow_the_same_rule():
    block = NSTMBlock(32, 2, num_states=8, top_k=2).eval()
    x = torch.randn(1, 5, 32)
    assert isinstance(block(x), torch.Tensor)
    assert isinstance(block(x, return_state=True), LayerOutput)
    lm = NSTMLM(20, d_model=32, n_layers=2, num_heads=2, num_states=8, top_k=2).eval()
    idx = torch.randint(0, 20, (2, 6))
    logits = lm(idx)
    out = lm(idx, return_state=True, return_maps=True)
    assert isinstance(out, LMOutput) and torch.equal(out.logits, logits)
    assert len(out.state) == 2 and len(out.maps) == 2
    assert lm(idx, return_state=True).maps is None


@pytest.mark.parametrize("shape", ["[B, D]", "[B, 1, D]"])
def test_step_takes_both_token_shapes(shape):
    torch.manual_seed(0)
    layer = small().double().eval()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    full = layer(x)
    st = layer.init_state(2)
    for t in range(5):
        xt = x[:, t] if shape == "[B, D]" else x[:, t:t + 1]
        yt, st = layer.step(xt, st)
        assert yt.shape == xt.shape
        torch.testing.assert_close(yt.reshape(2, 32), full[:, t], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"\[B, D\] or \[B, 1, D\]"):
        layer.step(x[:, :2], st)


def test_in_place_step_equals_the_functional_step():
    torch.manual_seed(1)
    layer = small().eval()
    with torch.no_grad():
        layer.s2s.gate.fill_(0.7)
    x = torch.randn(3, 9, 32)
    _, st, _ = layer(x[:, :3], return_state=True)
    buf = NSTMLayerState(type(st.op)(st.op.k.clone(), st.op.v.clone(), st.op.pos), st.conv.clone())
    k_ptr = buf.op.k.data_ptr()
    for t in range(3, 9):                      # a period end at pos 3 and 7
        y1, st = layer.step(x[:, t], st)
        pos_now = buf.op.pos
        y2, same = layer.step(x[:, t], buf, inplace=True)
        assert same is buf and buf.op.k.data_ptr() == k_ptr
        buf = NSTMLayerState(type(buf.op)(buf.op.k, buf.op.v, pos_now + 1), buf.conv)
        torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    torch.testing.assert_close(buf.op.v, st.op.v, rtol=0, atol=0)
    torch.testing.assert_close(buf.conv, st.conv, rtol=0, atol=0)


def test_states_detach_for_truncated_backprop():
    layer = small()
    x = torch.randn(2, 8, 32)
    _, st, _ = layer(x[:, :4], return_state=True)
    assert st.op.v.requires_grad
    d = st.detach()
    assert not d.op.v.requires_grad and not d.conv.requires_grad and d.op.pos == st.op.pos
    y = layer(x[:, 4:], state=d)
    y.sum().backward()                         # no graph reaches the first piece
    lm = NSTMLM(20, d_model=32, n_layers=2, num_heads=2, num_states=8, top_k=2)
    _, states, _ = lm(torch.randint(0, 20, (1, 5)), return_state=True)
    assert all(not s.op.k.requires_grad for s in detach_state(states))
    assert all(not s.op.k.requires_grad for s in lm.detach_state(states))


def test_aux_loss_is_never_left_over_from_an_earlier_forward():
    lm = NSTMLM(20, d_model=32, n_layers=2, num_heads=2, num_states=8, top_k=2)
    idx = torch.randint(0, 20, (2, 6))
    lm.train()
    lm(idx)
    aux = lm.aux_loss
    assert aux.requires_grad and aux.item() > 0
    lm.eval()
    lm(idx)
    assert lm.aux_loss.item() == 0 and not lm.aux_loss.requires_grad


def test_head_first_tensors_warn_once():
    q = torch.randn(1, 4, 16, 8)                   # reads as T = 4, H = 16: likely [B, H, T, K]
    with pytest.warns(UserWarning, match="head-first"):
        nstm_attention(q, q, q, torch.randn(1, 4, 16, 4), torch.randn(1, 4, 16), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nstm_attention(q, q, q, torch.randn(1, 4, 16, 4), torch.randn(1, 4, 16), 2)   # once
        one = torch.randn(1, 1, 16, 8)             # one token (streaming) never warns
        nstm_attention(one, one, one, torch.randn(1, 1, 16, 4), torch.randn(1, 1, 16), 2)


def test_empty_sequences_give_a_clear_error():
    with pytest.raises(ValueError, match=r"at least one token \(T >= 1\)"):
        small()(torch.randn(2, 0, 32))
    lm = NSTMLM(20, d_model=32, n_layers=1, num_heads=2, num_states=8, top_k=2)
    with pytest.raises(ValueError, match=r"at least one token"):
        lm(torch.zeros(1, 0, dtype=torch.long))


def test_generate_calls_the_sampling_cut_off_sample_top_k():
    lm = NSTMLM(20, d_model=32, n_layers=1, num_heads=2, num_states=8, top_k=2)
    out = lm.generate(torch.randint(0, 20, (1, 3)), 4, sample_top_k=1)   # top-1 sampling = greedy
    assert torch.equal(out, lm.generate(torch.randint(0, 20, (1, 3)).copy_(out[:, :3]), 4, greedy=True))
    with pytest.raises(TypeError, match="sample_top_k= for the sampling cut-off"):
        lm.generate(torch.randint(0, 20, (1, 3)), 4, top_k=5)
    with pytest.raises(ValueError, match="sample_top_k must be None or an int >= 1"):
        lm.generate(torch.randint(0, 20, (1, 3)), 4, sample_top_k=0)


def test_one_config_from_layer_to_model():
    cfg = NSTMConfig(vocab_size=30, d_model=32, n_layers=2, num_heads=2, num_states=8, top_k=2,
                     comm_every=5, conv_size=0, use_s2s=False)
    lm = NSTMLM.from_config(cfg)
    assert lm.config == cfg
    assert NSTMConfig.from_dict(cfg.to_dict()) == cfg
    layer = lm.blocks[0].mixer
    assert layer.config == NSTMLayer.from_config(cfg).config
    assert layer.num_states == 8 and layer.s2s is None and layer.conv is None
    with pytest.raises(ValueError, match="unknown NSTMConfig field"):
        NSTMConfig.from_dict({"d_model": 32, "n_layer": 2})
    with pytest.raises(ValueError, match="vocab_size"):
        NSTMLM.from_config(cfg.replace(vocab_size=None))


def test_version():
    assert nstm.__version__ == __import__("nstm_kernels").__version__
