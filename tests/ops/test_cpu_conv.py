"""The short convolution in C++ (``nstm_kernels.cpu.short_conv``, what ``nstm.modules.ShortConv``
runs on CPU tensors) against PyTorch's depthwise ``conv1d`` and SiLU: outputs and every gradient
(input, cache, weight, bias) in fp64 to 1e-12, across the kernel's token blocks and work units,
strided inputs, short sequences and every width; the same bits on one and two threads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nstm_kernels import cpu
from tests.ops.test_cpu_kernel import _need_kernel


@pytest.fixture(autouse=True)
def kernel():
    _need_kernel()


def reference(x, cache, weight, bias):
    """silu(depthwise conv1d over [cache; x]); weight [W, C] (tap W - 1 is the current token)."""
    B, T, C = x.shape
    W = weight.shape[0]
    if cache is None:
        cache = x.new_zeros(B, W - 1, C)
    xc = torch.cat([cache, x], 1).transpose(1, 2)                        # [B, C, W - 1 + T]
    y = F.conv1d(xc, weight.t().unsqueeze(1), bias, groups=C)            # [B, C, T]
    return F.silu(y.transpose(1, 2))


def inputs(B, T, C, W, with_cache, strided, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T, C + 5, generator=g, dtype=dtype) * 2
    x = base[..., 2:C + 2] if strided else base[..., :C].contiguous()
    cache = torch.randn(B, W - 1, C, generator=g, dtype=dtype) if with_cache else None
    weight = torch.randn(W, C, generator=g, dtype=dtype)
    bias = torch.randn(C, generator=g, dtype=dtype)
    return x, cache, weight, bias


def grads(fn, x, cache, weight, bias, seed=1):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (x, cache, weight, bias)]
    y = fn(*leaves)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * dy).sum().backward()
    return y.detach(), [None if t is None else t.grad for t in leaves]


def assert_same_fp64(y, g, ry, rg):
    """Outputs and the gradients of (x, cache, weight, bias) against the reference's, in fp64."""
    torch.testing.assert_close(y, ry, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("x", "cache", "weight", "bias"), g, rg):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-11, msg=lambda m: f"d{name}: {m}")


CASES = [
    # (B, T, C, W, cache, strided): one block; blocks and units of the backward (64 / 256 tokens)
    # with edges inside; T < W - 1 (the cache feeds every tap); T = 1; W = 1 (no cache); W = 2
    (2, 7, 5, 4, False, False),
    (2, 300, 6, 4, True, True),
    (1, 513, 3, 4, False, False),
    (3, 2, 4, 4, True, False),
    (2, 1, 4, 4, True, True),
    (2, 65, 7, 1, False, True),
    (1, 70, 4, 2, True, False),
    (1, 40, 16, 6, True, True),
]


@pytest.mark.parametrize("B,T,C,W,with_cache,strided", CASES)
def test_matches_conv1d_in_float64(B, T, C, W, with_cache, strided):
    x, cache, weight, bias = inputs(B, T, C, W, with_cache, strided, seed=T + C)
    y, g = grads(cpu.short_conv, x, cache, weight, bias)
    ry, rg = grads(reference, x, cache, weight, bias)
    assert_same_fp64(y, g, ry, rg)


def test_gradcheck():
    x, cache, weight, bias = inputs(2, 9, 3, 3, True, True, seed=3)
    leaves = [t.detach().clone().requires_grad_() for t in (x, cache, weight, bias)]
    assert torch.autograd.gradcheck(cpu.short_conv, leaves)


def test_float32_matches_and_saturates_without_overflow():
    x, cache, weight, bias = inputs(2, 100, 8, 4, True, False, dtype=torch.float32, seed=5)
    x = x * 30                                   # pre-activations far past exp's fp32 range
    y, g = grads(cpu.short_conv, x, cache, weight, bias)
    ry, rg = grads(reference, x, cache, weight, bias)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in g)
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-4)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_a_nan_input_reaches_only_the_tokens_that_read_it():
    x, _, weight, bias = inputs(1, 20, 4, 4, False, False, seed=7)
    x[0, 10, 1] = float("nan")
    y = cpu.short_conv(x, None, weight, bias)
    bad = torch.isnan(y[0, :, 1])
    assert bad[10:14].all() and not bad[:10].any() and not bad[14:].any()
    assert not torch.isnan(y[0, :, [0, 2, 3]]).any()


def test_the_same_bits_on_one_and_two_threads():
    x, cache, weight, bias = inputs(2, 700, 8, 4, True, True, dtype=torch.float32, seed=9)
    before = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(grads(cpu.short_conv, x, cache, weight, bias))
    finally:
        torch.set_num_threads(before)
    (y1, g1), (y2, g2) = out
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_inputs_are_left_untouched():
    x, cache, weight, bias = inputs(2, 80, 5, 4, True, True, seed=11)
    copies = [t.clone() for t in (x, cache, weight, bias)]
    grads(cpu.short_conv, x, cache, weight, bias)
    assert all(torch.equal(a, b) for a, b in zip((x, cache, weight, bias), copies))


def test_the_raw_op_rejects_bad_inputs():
    x, cache, weight, bias = inputs(2, 10, 5, 4, True, False)
    none = cpu.NO_SEGMENTS

    def op(*a):
        return torch.ops.nstm_cpu.conv_forward(*a, none)
    with pytest.raises(RuntimeError, match="contiguous channels"):
        op(x.transpose(1, 2).contiguous().transpose(1, 2), cache, weight, bias)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous \[W, C\]"):
        op(x, cache, weight[:, :4], bias)
    with pytest.raises(RuntimeError, match=r"cache must be empty"):
        op(x, cache[:, :2], weight, bias)
    with pytest.raises(RuntimeError, match="one dtype"):
        op(x, cache, weight.float(), bias)


def counted_shortconv(width, monkeypatch, seed):
    """An fp64 ``ShortConv(6, width)`` with a random bias, and the list its kernel calls append to."""
    from nstm.modules import ShortConv

    torch.manual_seed(seed)
    conv = ShortConv(6, width).double()
    with torch.no_grad():
        conv.bias.normal_()
    calls = []
    real = cpu.short_conv
    monkeypatch.setattr(cpu, "short_conv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return conv, calls


@pytest.mark.parametrize("width", [1, 3, 4])
def test_shortconv_runs_the_kernel_and_equals_its_pytorch_form(width, monkeypatch):
    """``ShortConv`` on CPU tensors calls the kernel; with ``fused = False`` it runs the shifted
    multiply-adds. Both give the same outputs, caches and gradients, with and without a cache."""
    conv, calls = counted_shortconv(width, monkeypatch, seed=0)
    x = torch.randn(2, 33, 9, dtype=torch.float64)[..., :6]
    for cache in (None, torch.randn(2, width - 1, 6, dtype=torch.float64)):
        res = []
        for fused in (True, False):
            conv.fused = fused
            conv.zero_grad()
            xx = x.clone().requires_grad_()
            y, tail = conv(xx, cache)
            y.pow(2).sum().backward()
            res.append((y.detach(), tail.detach(), xx.grad, conv.weight.grad.clone(), conv.bias.grad.clone()))
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2


def packed_reference(x, cache, weight, bias, lens):
    """Each document of the packed ``x [1, T, C]`` alone, from its own cache row: the definition."""
    out, start = [], 0
    for n, n_len in enumerate(lens):
        c = None if cache is None else cache[n:n + 1]
        out.append(reference(x[:, start:start + n_len], c, weight, bias))
        start += n_len
    return torch.cat(out, 1)


def cu_of(lens):
    return torch.tensor([0] + list(lens), dtype=torch.long).cumsum(0)


# documents across the forward's 64-token blocks and the backward's 256-token units, shorter than
# the window, of one token
PACKED = [((1, 2, 70, 300, 3), 4), ((5,), 4), ((130, 1, 1, 260), 3), ((7, 64, 2), 1), ((2, 1, 40), 6),
          ((1,) * 300 + (5, 250, 3) * 3, 4)]   # many short documents: backward units shared between them


@pytest.mark.parametrize("lens,W", PACKED)
@pytest.mark.parametrize("with_cache", [False, True])
def test_packed_documents_match_each_document_alone(lens, W, with_cache):
    C = 5
    x, _, weight, bias = inputs(1, sum(lens), C, W, False, True, seed=len(lens) + W)
    cache = torch.randn(len(lens), W - 1, C, dtype=torch.float64) if with_cache else None
    cu = cu_of(lens)
    y, g = grads(lambda *a: cpu.short_conv(*a, cu_seqlens=cu), x, cache, weight, bias)
    ry, rg = grads(lambda *a: packed_reference(*a, lens), x, cache, weight, bias)
    assert_same_fp64(y, g, ry, rg)


def test_packed_gradcheck_and_the_same_bits_on_one_and_two_threads():
    lens = (3, 1, 6)
    x, _, weight, bias = inputs(1, sum(lens), 3, 3, False, True, seed=4)
    cache = torch.randn(3, 2, 3, dtype=torch.float64)
    leaves = [t.detach().clone().requires_grad_() for t in (x, cache, weight, bias)]
    assert torch.autograd.gradcheck(lambda *a: cpu.short_conv(*a, cu_seqlens=cu_of(lens)), leaves)
    lens = (300, 1, 500, 70)
    x, _, weight, bias = inputs(1, sum(lens), 8, 4, False, False, dtype=torch.float32, seed=6)
    cache = torch.randn(4, 3, 8)
    before = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(grads(lambda *a: cpu.short_conv(*a, cu_seqlens=cu_of(lens)), x, cache, weight, bias))
    finally:
        torch.set_num_threads(before)
    (y1, g1), (y2, g2) = out
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_the_raw_op_rejects_bad_documents():
    x, _, weight, bias = inputs(1, 10, 5, 4, False, False)
    cache = torch.zeros(2, 3, 5, dtype=torch.float64)
    op = torch.ops.nstm_cpu.conv_forward

    def seg(*pairs):
        return torch.tensor(pairs, dtype=torch.long)
    assert op(x, cache, weight, bias, seg((0, 4), (4, 6))).shape == x.shape
    with pytest.raises(RuntimeError, match=r"document 1 is \(start 5, length 5\), expected start 4"):
        op(x, cache, weight, bias, seg((0, 4), (5, 5)))            # a gap
    with pytest.raises(RuntimeError, match=r"a length in \[1, 6\]"):  # lengths that would wrap around
        op(x, cache, weight, bias, seg((0, 4), (4, 2 ** 63 - 1)))
    with pytest.raises(RuntimeError, match=r"CPU int64 \[N, 2\].*got x \[1, 10, 5\] and documents Int"):
        op(x, cache, weight, bias, seg((0, 4), (4, 6)).int())
    with pytest.raises(RuntimeError, match=r"documents Long \[2, 3\]"):
        op(x, cache, weight, bias, torch.tensor([[0, 4, 0], [4, 6, 0]]))
    with pytest.raises(RuntimeError, match="non-empty"):
        op(x, cache, weight, bias, seg((0, 0), (0, 10)))           # an empty document
    with pytest.raises(RuntimeError, match="must end at T = 10"):
        op(x, cache, weight, bias, seg((0, 4), (4, 4)))
    with pytest.raises(RuntimeError, match=r"x \[1, T, C\]"):
        op(x.expand(2, 10, 5), cache, weight, bias, seg((0, 4), (4, 6)))
    with pytest.raises(RuntimeError, match=r"cache must be empty .*documents = 2.*got \[1, 3, 5\]"):
        op(x, cache[:1], weight, bias, seg((0, 4), (4, 6)))        # one cache row per document


@pytest.mark.parametrize("width", [1, 3, 4])
def test_packed_shortconv_runs_the_kernel_and_equals_its_pytorch_form(width, monkeypatch):
    """``ShortConv`` on a packed batch: the kernel and the gather form give the same outputs, tails
    (documents shorter than the window take rows of their cache) and gradients."""
    conv, calls = counted_shortconv(width, monkeypatch, seed=1)
    lens = (1, 2, 40, 3)
    cu = cu_of(lens)
    x = torch.randn(1, sum(lens), 9, dtype=torch.float64)[..., :6]
    for with_cache in (False, True):
        res = []
        for fused in (True, False):
            conv.fused = fused
            conv.zero_grad()
            xx = x.clone().requires_grad_()
            cache = torch.randn(4, width - 1, 6, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(2)).requires_grad_() if with_cache else None
            y, tail = conv(xx, cache, cu_seqlens=cu)
            (y.pow(2).sum() + (tail * torch.linspace(-1, 1, tail.numel(), dtype=tail.dtype).view_as(tail)).sum()
             ).backward()
            res.append((y.detach(), tail.detach(), xx.grad, conv.weight.grad.clone(), conv.bias.grad.clone())
                       + ((cache.grad,) if with_cache and width > 1 else ()))
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2


def test_inputs_strided_along_time_and_batch():
    """x read through its strides: every other token of a longer tensor, and batch/time transposed;
    unpacked and packed."""
    g = torch.Generator().manual_seed(12)
    weight, bias = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    every_other = torch.randn(2, 140, 6, generator=g, dtype=torch.float64)[:, ::2]
    transposed = torch.randn(70, 2, 6, generator=g, dtype=torch.float64).transpose(0, 1)
    for x in (every_other, transposed):
        assert x.stride(1) != 6                               # not one token after another
        y, gr = grads(cpu.short_conv, x, None, weight, bias)
        assert_same_fp64(y, gr, *grads(reference, x, None, weight, bias))
    lens = (3, 60, 7)
    x = every_other[:1]
    cache = torch.randn(3, 3, 6, generator=g, dtype=torch.float64)
    y, gr = grads(lambda *a: cpu.short_conv(*a, cu_seqlens=cu_of(lens)), x, cache, weight, bias)
    assert_same_fp64(y, gr, *grads(lambda *a: packed_reference(*a, lens), x, cache, weight, bias))
