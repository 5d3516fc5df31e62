"""Packed documents (``cu_seqlens``) through the layer and the language model: a packed batch of
N documents gives what running each document alone gives (outputs, gradients, final states, the
short conv restarting at each boundary), the states it returns continue each document's stream,
and bad packing is refused with a clear error."""
from __future__ import annotations

import pytest
import torch

from nstm import NSTMLM, NSTMLayer
from nstm.modules import ShortConv
from tests.helpers import assert_close

LENS = [5, 1, 13, 7]           # a one-token document, documents shorter and longer than C


def tol_for(name):
    # RMSNorm computes in fp32 by design (nstm.modules), so its weight's gradient is an fp32 sum
    # over tokens, added up in another order when the tokens come packed: fp32 rounding, not fp64
    last = name.split(".")[-2] if "." in name else ""
    return 1e-6 if last.startswith("norm") else None


def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int64)


def layer64(**kw):
    args = dict(d_model=16, num_heads=2, num_states=6, top_k=2, comm_every=4, backend="chunked")
    args.update(kw)
    torch.manual_seed(0)
    layer = NSTMLayer(**args).double()
    if layer.s2s is not None:
        with torch.no_grad():                 # open the s2s gate so that its periods matter
            layer.s2s.gate.fill_(0.7)
    return layer


def test_short_conv_restarts_at_each_document():
    torch.manual_seed(1)
    conv = ShortConv(6, 4).double()
    x = torch.randn(1, sum(LENS), 6, dtype=torch.float64)
    cache = torch.randn(len(LENS), 3, 6, dtype=torch.float64)
    cu = cu_of(LENS)
    for c in (None, cache):
        y, caches = conv(x, c, cu_seqlens=cu)
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            yi, ci = conv(x[:, a:b], None if c is None else c[i:i + 1])
            assert_close(y[:, a:b], yi)
            assert_close(caches[i:i + 1], ci)


@pytest.mark.parametrize("conv_size, use_s2s", [(4, True), (0, True), (4, False)])
def test_packed_layer_equals_documents_one_by_one(conv_size, use_s2s):
    layer = layer64(conv_size=conv_size, use_s2s=use_s2s)
    cu = cu_of(LENS)
    x = torch.randn(1, sum(LENS), 16, dtype=torch.float64, requires_grad=True)
    out = layer(x, return_state=True, cu_seqlens=cu)
    gy = torch.randn_like(out.y)
    grads = torch.autograd.grad((out.y * gy).sum(), [x] + list(layer.parameters()), allow_unused=True)

    xs = x.detach().clone().requires_grad_(True)
    ys, finals = [], []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o = layer(xs[:, a:b], return_state=True)
        ys.append(o.y)
        finals.append(o.state)
    y1 = torch.cat(ys, 1)
    grads1 = torch.autograd.grad((y1 * gy).sum(), [xs] + list(layer.parameters()), allow_unused=True)
    assert_close(out.y, y1)
    for (name, _), g, g1 in zip([("x", None)] + list(layer.named_parameters()), grads, grads1):
        if g1 is None:
            assert g is None or g.abs().max() == 0, name
        else:
            assert_close(g, g1, tol=tol_for(name), name=name)
    assert out.state.op.k.shape[0] == len(LENS)
    assert_close(out.state.op.k, torch.cat([f.op.k for f in finals]))
    assert_close(out.state.op.v, torch.cat([f.op.v for f in finals]))
    assert torch.as_tensor(out.state.op.pos).tolist() == LENS
    if conv_size:
        assert_close(out.state.conv, torch.cat([f.conv for f in finals]))
    else:
        assert out.state.conv is None

    # the returned state continues every document's stream: one more token per row
    nxt = torch.randn(len(LENS), 16, dtype=torch.float64)
    y_step, _ = layer.step(nxt, out.state)
    for i, f in enumerate(finals):
        yi, _ = layer.step(nxt[i:i + 1], f)
        assert_close(y_step[i:i + 1], yi)


def test_packed_layer_resumes_from_a_state_per_document():
    layer = layer64()
    cu = cu_of(LENS)
    torch.manual_seed(3)
    first = [torch.randn(1, n, 16, dtype=torch.float64) for n in (3, 9, 2, 6)]
    states = [layer(p, return_state=True).state for p in first]
    packed_state = type(states[0])(
        type(states[0].op)(torch.cat([s.op.k for s in states]), torch.cat([s.op.v for s in states]),
                           torch.tensor([3, 9, 2, 6])),
        torch.cat([s.conv for s in states]))
    x = torch.randn(1, sum(LENS), 16, dtype=torch.float64)
    y = layer(x, state=packed_state, cu_seqlens=cu)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        assert_close(y[:, a:b], layer(x[:, a:b], state=states[i]))


def test_packed_language_model_equals_documents_one_by_one():
    torch.manual_seed(0)
    model = NSTMLM(vocab_size=11, d_model=16, n_layers=2, num_heads=2, num_states=6, top_k=2,
                   comm_every=4, backend="chunked").double()
    cu = cu_of(LENS)
    idx = torch.randint(0, 11, (1, sum(LENS)))
    out = model(idx, return_state=True, cu_seqlens=cu)
    out.logits.square().mean().backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    pieces = [model(idx[:, a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    logits1 = torch.cat(pieces, 1)
    logits1.square().mean().backward()
    assert_close(out.logits, logits1)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert_close(g[n], p.grad, tol=tol_for(n), name=n)
    assert [s.op.k.shape[0] for s in out.state] == [len(LENS)] * 2


def test_packed_input_errors_leave_the_input_alone():
    layer = layer64()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    before = x.clone()
    bad = [
        (torch.tensor([0, 4, 10], dtype=torch.int32), "int64"),
        (torch.tensor([0, 4, 9]), "end at T = 10"),
        (torch.tensor([0, 4, 4, 10]), "strictly increasing"),
        (torch.tensor([[0, 10]]), "shape"),
    ]
    for cu, msg in bad:
        with pytest.raises(ValueError, match=msg):
            layer(x, cu_seqlens=cu)
    with pytest.raises(ValueError, match="B = 1"):
        layer(torch.randn(2, 10, 16, dtype=torch.float64), cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="2 packed documents"):
        layer(x, state=layer.init_state(3), cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="return_maps"):
        layer(x, return_maps=True, cu_seqlens=torch.tensor([0, 4, 10]))
    assert torch.equal(x, before)


def test_packed_transformer_baseline_equals_documents_one_by_one():
    from nstm.baseline import TransformerLM
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=11, d_model=16, n_layers=2, num_heads=2, max_len=13).double()
    cu = cu_of(LENS)
    idx = torch.randint(0, 11, (1, sum(LENS)))
    logits = model(idx, cu_seqlens=cu)
    logits.square().mean().backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    pieces = torch.cat([model(idx[:, a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    pieces.square().mean().backward()
    assert_close(logits, pieces)
    for n, p in model.named_parameters():
        assert_close(g[n], p.grad, tol=tol_for(n), name=n)
    with pytest.raises(ValueError, match="exceeds max_len 13"):
        model(idx, cu_seqlens=torch.tensor([0, 2, sum(LENS)]))      # a document of 24 tokens
    with pytest.raises(ValueError, match="strictly increasing"):
        model(idx, cu_seqlens=torch.tensor([0, 0, sum(LENS)]))
