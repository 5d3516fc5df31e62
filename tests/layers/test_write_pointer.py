"""The position-aware write (``write_pointer = P``): a learned route-logit bias of row ``tau mod P``.

It must keep everything the layer promises: streaming (prefix, chunks, steps) equals the full
forward because the bias follows the absolute position (``test_layer.py`` runs that test with a
pointer), packed documents restart their positions,
per-row positions are honoured, pruning keeps the kept slots' columns, and the table learns."""
from __future__ import annotations

import pytest
import torch

from nstm import NSTMLM, NSTMConfig, NSTMLayer
from nstm_kernels import NSTMState, sparse_route
from tests.helpers import assert_close

from .test_packed import LENS, cu_of, tol_for


def layer64(**kw):
    args = dict(d_model=16, num_heads=2, num_states=6, top_k=2, comm_every=4, backend="chunked", write_pointer=5)
    args.update(kw)
    torch.manual_seed(0)
    layer = NSTMLayer(**args).double()
    with torch.no_grad():
        layer.s2s.gate.fill_(0.7)
        layer.router.pointer.add_(0.3 * torch.randn_like(layer.router.pointer))   # a trained-looking table
    return layer


def test_pointer_starts_as_a_sweep_over_the_slots():
    layer = NSTMLayer(16, 2, num_states=8, top_k=2, write_pointer=8)
    table = layer.router.pointer
    assert table.shape == (2, 8, 8) and table.requires_grad
    assert table[0].argmax(-1).tolist() == list(range(8))          # row p points at slot p
    assert NSTMLayer(16, 2, num_states=8, top_k=2).router.pointer is None
    assert layer.config.write_pointer == 8 and "write_pointer=8" in repr(layer)


def test_equal_tokens_at_different_positions_write_to_different_slots():
    torch.manual_seed(0)
    x = 0.1 * torch.randn(1, 1, 16).expand(1, 12, 16)     # one token repeated (weak content logits)
    routes = {}
    for wp in (0, 6):
        layer = NSTMLayer(16, 2, num_states=6, top_k=1, write_pointer=wp)
        _, _, logits, gate = layer._project(x, layer._positions(x, 0))
        routes[wp] = sparse_route(logits, gate, 1)[0][0, :, 0, 0]
    assert routes[0].unique().numel() == 1                            # content only: one slot
    assert routes[6].unique().numel() == 6                            # the pointer: every slot


def test_position_changes_the_output():
    """The bias follows the absolute position: the same tokens started at another position differ."""
    layer = layer64().eval()
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    s0 = layer.init_state(1)
    s3 = s0._replace(op=NSTMState(s0.op.k, s0.op.v, 3))
    assert not torch.allclose(layer(x, state=s0), layer(x, state=s3))


def test_per_row_positions_and_one_element_position_tensor():
    layer = layer64().eval()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    base = layer.init_state(3)
    pos = torch.tensor([0, 2, 7])
    rows = layer(x, state=base._replace(op=NSTMState(base.op.k, base.op.v, pos)))
    for i, p in enumerate(pos.tolist()):
        b1 = layer.init_state(1)
        alone = layer(x[i:i + 1], state=b1._replace(op=NSTMState(b1.op.k, b1.op.v, p)))
        assert_close(rows[i:i + 1], alone, name=f"row {i} at position {p}")
    # a step at an int position and an in-place step at a one-element int64 tensor (static decoding)
    layer32 = layer64().float().eval()
    x32 = x.float()
    st = layer32(x32, return_state=True).state
    y_int, _ = layer32.step(x32[:, 0], st)
    st_t = st._replace(op=NSTMState(st.op.k.clone(), st.op.v.clone(), torch.tensor([6])),
                       conv=st.conv.clone())
    y_t, _ = layer32.step(x32[:, 0], st_t, inplace=True)
    assert_close(y_int, y_t, tol=1e-5)


def test_packed_documents_restart_their_positions():
    layer = layer64()
    cu = cu_of(LENS)
    x = torch.randn(1, sum(LENS), 16, dtype=torch.float64, requires_grad=True)
    y = layer(x, cu_seqlens=cu)
    gy = torch.randn_like(y)
    params = list(layer.parameters())
    grads = torch.autograd.grad((y * gy).sum(), [x] + params)
    xs = x.detach().clone().requires_grad_(True)
    y1 = torch.cat([layer(xs[:, a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    grads1 = torch.autograd.grad((y1 * gy).sum(), [xs] + params)
    assert_close(y, y1)
    for (name, _), g, g1 in zip([("x", None)] + list(layer.named_parameters()), grads, grads1):
        assert_close(g, g1, tol=tol_for(name), name=name)
    assert grads[1 + [n for n, _ in layer.named_parameters()].index("router.pointer")].abs().sum() > 0


def test_packed_documents_continue_from_per_document_positions():
    layer = layer64()
    cu = cu_of(LENS)
    torch.manual_seed(3)
    states = [layer(torch.randn(1, n, 16, dtype=torch.float64), return_state=True).state for n in (3, 9, 2, 6)]
    packed = type(states[0])(NSTMState(torch.cat([s.op.k for s in states]), torch.cat([s.op.v for s in states]),
                                       torch.tensor([3, 9, 2, 6])), torch.cat([s.conv for s in states]))
    x = torch.randn(1, sum(LENS), 16, dtype=torch.float64)
    y = layer(x, state=packed, cu_seqlens=cu)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        assert_close(y[:, a:b], layer(x[:, a:b], state=states[i]), name=f"document {i}")


def test_pruning_keeps_the_kept_slots_pointer_columns():
    layer = layer64().eval()
    with torch.no_grad():
        layer.states.iota[0, [1, 4]] = -3.0
        layer.states.iota[1, [0, 5]] = -3.0
    kept = torch.tensor([[0, 2, 3, 5], [1, 2, 3, 4]])
    want = layer.router.pointer.detach().gather(2, kept[:, None, :].expand(-1, 5, -1)).clone()
    fresh = layer64(num_states=4).eval()
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    rows = torch.cat([(torch.arange(2)[:, None] * 6 + kept).reshape(-1), torch.arange(12, 14)])
    sd["router.weight"], sd["router.bias"] = sd["router.weight"][rows], sd["router.bias"][rows]
    sd["router.pointer"] = want
    for name in ("states.init_k", "states.init_v"):
        sd[name] = sd[name].gather(1, kept[..., None].expand(-1, -1, sd[name].shape[-1]))
    for name in ("states.iota", "states.usage"):
        sd[name] = sd[name].gather(1, kept)
    fresh.load_state_dict(sd)
    layer.states.prune(0.5)
    assert torch.equal(layer.router.pointer, want)
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    assert torch.equal(layer(x), fresh(x))


def test_revived_slots_get_the_live_mean_pointer_column():
    layer = layer64()
    dead = torch.zeros(2, 6, dtype=torch.bool)
    dead[0, 2] = True
    live_mean = layer.router.pointer.detach()[0][:, [0, 1, 3, 4, 5]].mean(-1)
    layer.router.reset_slots(dead, generator=torch.Generator().manual_seed(0))
    assert_close(layer.router.pointer.detach()[0, :, 2], live_mean)


def test_models_and_config_carry_the_pointer():
    cfg = NSTMConfig(vocab_size=11, d_model=16, n_layers=2, num_heads=2, num_states=6, top_k=2, write_pointer=6)
    model = NSTMLM.from_config(cfg)
    assert model.config == cfg
    assert all(b.mixer.router.pointer_period == 6 for b in model.blocks)
    with pytest.raises(ValueError, match="write_pointer"):
        NSTMLayer(16, 2, num_states=6, top_k=2, write_pointer=-1)
