"""NSTMLayer, StateManager and the models: shapes, streaming, generation, pruning, learning."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nstm import NSTMLM, NSTMBlock, NSTMClassifier, NSTMLayer
from nstm.tasks import IGNORE, copy_batch, masked_accuracy, mqar_batch
from tests.helpers import assert_close


def small_layer(**kw):
    args = dict(d_model=32, num_heads=2, num_states=8, top_k=2, comm_every=5)
    args.update(kw)
    return NSTMLayer(**args)


def test_layer_is_a_drop_in_mixer():
    layer = small_layer()
    x = torch.randn(3, 17, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    (y.sum() + layer.aux_loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    names = dict(layer.named_children())
    assert set(["router", "states", "s2s"]) <= set(names)
    # every parameter learns (the s2s projections only a little: they start behind sigmoid(-8))
    for n, p in layer.named_parameters():
        if not n.startswith("s2s.w_"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_layer_parameters_get_gradients_once_s2s_gate_opens():
    layer = small_layer()
    with torch.no_grad():
        layer.s2s.gate.fill_(0.5)
    layer(torch.randn(2, 12, 32)).sum().backward()
    for n in ("w_q", "w_k", "gate"):
        assert getattr(layer.s2s, n).grad.abs().sum() > 0, n


@pytest.mark.parametrize("conv_size", [0, 4])
@pytest.mark.parametrize("use_s2s", [True, False])
@pytest.mark.parametrize("write_pointer", [0, 5])      # 5: the position-aware write, a period not dividing T
def test_layer_streaming_prefix_and_steps_equal_full_forward(conv_size, use_s2s, write_pointer):
    torch.manual_seed(1)
    layer = small_layer(conv_size=conv_size, use_s2s=use_s2s, write_pointer=write_pointer).double().eval()
    with torch.no_grad():
        if use_s2s:
            layer.s2s.gate.fill_(0.8)
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    full, st_full, _ = layer(x, return_state=True)
    y1, st, _ = layer(x[:, :9], return_state=True)
    y2, st, _ = layer(x[:, 9:14], state=st, return_state=True)
    ys = [y1, y2]
    for t in range(14, 23):
        yt, st = layer.step(x[:, t], st)
        ys.append(yt[:, None])
    assert_close(torch.cat(ys, 1), full, name="y (prefix, chunk, steps)")     # fp64: TOL 1e-10
    assert_close(st.op.v, st_full.op.v, name="state.v")
    assert st.op.pos == 23


def test_layer_init_state_equals_no_state():
    layer = small_layer().eval()
    x = torch.randn(2, 11, 32)
    assert torch.equal(layer(x), layer(x, state=layer.init_state(2)))


def test_return_maps_shapes():
    layer = small_layer(comm_every=4)
    y, state, maps = layer(torch.randn(2, 13, 32), return_maps=True)
    assert state is None
    assert maps["indices"].shape == (2, 13, 2, 2) and maps["weights"].shape == (2, 13, 2, 2)
    assert maps["read"].shape == (2, 13, 2, 8)
    assert maps["s2s"].shape == (3, 2, 2, 8, 8) and maps["s2s_pos"] == [3, 7, 11]
    assert torch.allclose(maps["read"].sum(-1), torch.ones(2, 13, 2))


def test_aux_loss_is_one_when_routing_is_balanced():
    layer = small_layer(num_states=4, top_k=1)
    # logits with a uniform softmax and tokens spread evenly over slots: S * sum f_i P_i = 1
    logits = torch.zeros(1, 8, 2, 4)
    idx = torch.arange(8).remainder(4).view(1, 8, 1, 1).expand(1, 8, 2, 1)
    assert abs(layer._aux(logits, idx, 1).item() - 1.0) < 1e-6
    # all tokens on one slot that also holds all the probability: the loss is S
    logits = torch.full((1, 8, 2, 4), -1e4)
    logits[..., 0] = 0
    assert abs(layer._aux(logits, torch.zeros(1, 8, 2, 1, dtype=torch.long), 1).item() - 4.0) < 1e-4


def test_usage_statistics_and_active_states():
    layer = small_layer().train()
    assert layer.states.usage.sum() == 0
    layer(torch.randn(2, 10, 32))
    frac = layer.states.usage_fraction()
    assert torch.allclose(frac.sum(1), torch.ones(2))
    assert layer.states.usage_tokens.item() == 20
    alive = layer.states.active_states()
    assert alive.shape == (2, 8) and alive.dtype == torch.bool
    layer.eval()
    before = layer.states.usage.clone()
    layer(torch.randn(2, 10, 32))
    assert torch.equal(layer.states.usage, before)     # eval forwards don't count


def test_prune_removes_slots_and_model_still_runs():
    torch.manual_seed(2)
    model = NSTMLM(40, d_model=32, n_layers=2, num_heads=2, num_states=8, top_k=3, comm_every=4)
    x, y = mqar_batch(4, 4, 40)
    sm = model.blocks[0].mixer.states
    with torch.no_grad():
        sm.iota[0, [1, 4, 6]] = -4.0                 # head 0: 5 important slots
        sm.iota[1, [0, 2, 3, 5, 7]] = -4.0           # head 1: 3 important slots
    keep_imp = sm.importance()[0, [0, 2, 3, 5, 7]].clone()
    n_params = sum(p.numel() for p in model.parameters())
    reports = model.prune_states(0.5)
    assert reports[0].old_num_states == 8 and reports[0].new_num_states == 5
    assert reports[0].kept[0].tolist() == [0, 2, 3, 5, 7]
    assert torch.equal(sm.importance()[0], keep_imp)
    assert reports[1].new_num_states == 8              # layer 1: every slot important
    layer0 = model.blocks[0].mixer
    assert layer0.num_states == 5 and layer0.router.num_states == 5
    assert layer0.router.weight.shape[0] == 2 * (5 + 1) and sm.init_k.shape == (2, 5, 16)
    assert sum(p.numel() for p in model.parameters()) < n_params
    logits = model(x)
    assert logits.shape == (4, x.shape[1], 40) and torch.isfinite(logits).all()
    out = model.generate(x[:, :5], 4, greedy=True)
    assert out.shape == (4, 9)


def test_pruned_layer_equals_a_layer_built_from_the_kept_slots():
    """prune() keeps the right rows everywhere: a fresh layer with S' slots, given the kept slots'
    router rows, initial memory and importance (and every other weight as is), computes the same."""
    torch.manual_seed(3)
    layer = small_layer(num_states=6, top_k=2).double().eval()
    with torch.no_grad():
        layer.states.iota[0, [1, 4]] = -3.0
        layer.states.iota[1, [0, 5]] = -3.0
        layer.s2s.gate.fill_(0.5)
    kept = torch.tensor([[0, 2, 3, 5], [1, 2, 3, 4]])
    fresh = small_layer(num_states=4, top_k=2).double().eval()
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    rows = torch.cat([(torch.arange(2)[:, None] * 6 + kept).reshape(-1), torch.arange(12, 14)])
    sd["router.weight"], sd["router.bias"] = sd["router.weight"][rows], sd["router.bias"][rows]
    for name in ("states.init_k", "states.init_v"):
        sd[name] = sd[name].gather(1, kept[..., None].expand(-1, -1, sd[name].shape[-1]))
    for name in ("states.iota", "states.usage"):
        sd[name] = sd[name].gather(1, kept)
    fresh.load_state_dict(sd)
    rep = layer.states.prune(0.5)
    assert rep.kept.tolist() == kept.tolist() and rep.new_num_states == 4
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    assert torch.equal(layer(x), fresh(x))


def test_prune_rejects_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        small_layer().states.prune(1.5)


def test_revive_resets_dead_slots():
    layer = small_layer().train()
    with torch.no_grad():
        layer.states.iota[0, 3] = -5.0
    old_row = layer.router.weight[3].clone()
    n = layer.states.revive(generator=torch.Generator().manual_seed(0))
    assert n >= 1
    assert layer.states.importance()[0, 3] > 0.5
    assert not torch.equal(layer.router.weight[3], old_row)
    assert layer.states.usage.sum() == 0


def test_lm_generate_with_cache_equals_greedy_full_forwards():
    torch.manual_seed(4)
    model = NSTMLM(30, d_model=32, n_layers=2, num_heads=2, num_states=8, top_k=2, comm_every=3).eval()
    prompt = torch.randint(0, 30, (2, 7))
    out = model.generate(prompt, 15, greedy=True)
    cur = prompt
    for _ in range(15):
        cur = torch.cat([cur, model(cur)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, cur)


def test_lm_sampling_respects_top_k_and_seed():
    torch.manual_seed(5)
    model = NSTMLM(30, d_model=32, n_layers=1, num_heads=2, num_states=8, top_k=2)
    prompt = torch.randint(0, 30, (3, 4))
    a = model.generate(prompt, 6, temperature=0.8, sample_top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 6, temperature=0.8, sample_top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 10)
    c = model.generate(prompt, 6, top_p=0.5, generator=torch.Generator().manual_seed(1))
    assert c.shape == (3, 10)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 2, top_p=1.5)
    with pytest.raises(ValueError, match="token ids"):
        model.generate(prompt + 100, 2)


def test_step_api_and_constant_state_size():
    model = NSTMLM(20, d_model=32, n_layers=2, num_heads=2, num_states=8, top_k=2).eval()
    state = model.init_state(2)
    size0 = model.state_bytes(state)
    tok = torch.zeros(2, dtype=torch.long)
    for _ in range(50):
        logits, state = model.step(tok, state)
        tok = logits.argmax(-1)
    assert model.state_bytes(state) == size0 and state[0].op.pos == 50


def test_block_and_classifier():
    block = NSTMBlock(32, 2, num_states=8, top_k=2)
    assert block(torch.randn(2, 9, 32)).shape == (2, 9, 32)
    clf = NSTMClassifier(10, input_dim=1, d_model=32, num_heads=2, num_states=8, top_k=2)
    assert clf(torch.rand(4, 30, 1)).shape == (4, 10)
    clf_tok = NSTMClassifier(5, vocab_size=17, d_model=32, num_heads=2, num_states=8, top_k=2, pool="last")
    assert clf_tok(torch.randint(0, 17, (3, 12))).shape == (3, 5)
    with pytest.raises(ValueError, match="input_dim"):
        clf(torch.rand(4, 30, 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_states=0), "num_states"), (dict(top_k=9), "top_k"), (dict(comm_every=0), "comm_every"),
    (dict(d_model=30, num_heads=4), "divisible"), (dict(conv_size=-1), "conv_size"),
])
def test_layer_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_layer(**kwargs)


@pytest.mark.parametrize("x,state,exc,match", [
    pytest.param(lambda: torch.randn(2, 5, 31), None, ValueError, r"x must have shape \[B, T, D\]", id="x-D=31"),
    pytest.param(lambda: torch.zeros(2, 5, 32, dtype=torch.long), None, TypeError, "floating", id="x-int64"),
    pytest.param(lambda: torch.randn(2, 5, 32), lambda layer: (1, 2), TypeError, "NSTMLayerState",
                 id="state-tuple"),
    pytest.param(lambda: torch.randn(2, 5, 32), lambda layer: layer.init_state(3), ValueError, "batch",
                 id="state-batch-3-for-2"),
])
def test_layer_forward_errors_leave_input_untouched(x, state, exc, match):
    layer = small_layer()
    x = x()
    x0 = x.clone()
    with pytest.raises(exc, match=match):
        layer(x) if state is None else layer(x, state=state(layer))
    assert torch.equal(x, x0)


def test_tasks_generators():
    x, y = mqar_batch(5, 6, 32, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 24) and (y != IGNORE).sum(1).tolist() == [6] * 5
    # every query's answer is the value that followed that key in the context
    for b in range(5):
        ctx = dict(zip(x[b, 0:12:2].tolist(), x[b, 1:12:2].tolist()))
        for t in range(12, 24, 2):
            assert y[b, t].item() == ctx[x[b, t].item()] == x[b, t + 1].item()
    xc, yc = copy_batch(3, 7, 10)
    assert xc.shape == (3, 15) and torch.equal(yc[:, 7:14], xc[:, :7]) and (xc[:, 7] == 0).all()
    with pytest.raises(ValueError, match="num_pairs"):
        mqar_batch(2, 20, 32)


@pytest.mark.slow
def test_tiny_lm_learns_associative_recall():
    """A 1-layer NSTMLM learns MQAR (4 pairs, 16 possible values: chance 1/16) in 300 CPU steps."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = NSTMLM(32, d_model=64, n_layers=1, num_heads=2, num_states=16, top_k=2, comm_every=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        x, y = mqar_batch(32, 4, 32, generator=g)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad()
        (loss + 0.01 * model.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    xe, ye = mqar_batch(512, 4, 32, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        acc = masked_accuracy(model(xe), ye)
    assert acc > 0.6, f"MQAR accuracy {acc:.3f} after 300 steps (chance 0.0625)"


@pytest.mark.parametrize("width", [1, 2, 4])
def test_short_conv_one_token_path_equals_full_pass(width):
    """ShortConv's one-token path (a weighted sum over the cached window) gives the outputs and
    caches of one conv1d pass over the whole sequence, token by token."""
    from nstm.modules import ShortConv

    torch.manual_seed(0)
    conv = ShortConv(12, width)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(3, 9, 12)
    full, full_cache = conv(x)
    cache, outs = None, []
    for t in range(x.shape[1]):
        y, cache = conv(x[:, t:t + 1], cache)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache, full_cache)
