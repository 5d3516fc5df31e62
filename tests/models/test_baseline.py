"""Transformer baseline: KV-cache decoding equals the full forward, greedy generation, rotary
positions are relative, parameter matching, classifier padding."""
import pytest
import torch

from nstm import NSTMLM, NSTMClassifier
from nstm.baseline import (
    KVCache,
    TransformerClassifier,
    TransformerLM,
    apply_rotary,
    count_parameters,
    matched_transformer_config,
    rotary_cos_sin,
)


def tiny_lm(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=37, d_model=32, n_layers=2, num_heads=4)
    cfg.update(kw)
    return TransformerLM(**cfg).eval()


def test_forward_shape_and_causality():
    m = tiny_lm()
    x = torch.randint(0, 37, (2, 11))
    y = m(x)
    assert y.shape == (2, 11, 37)
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 37          # the future must not change earlier logits
    assert torch.equal(m(x2)[:, :7], y[:, :7])


def test_step_decode_with_cache_equals_full_forward():
    m = tiny_lm()
    x = torch.randint(0, 37, (3, 21))
    with torch.no_grad():
        full = m(x)
    cache = m.init_cache(3, 21)
    outs = [m.prefill(x[:, :5], cache)]                  # a prompt
    outs.append(m.prefill(x[:, 5:9], cache))             # a second chunk after it (masked prefill)
    for t in range(9, 21):                               # then one token at a time
        logits, cache2 = m.step(x[:, t], cache)
        assert cache2 is cache and cache.length == t + 1
        outs.append(logits[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_cache_full_and_mismatch_errors():
    m = tiny_lm()
    cache = m.init_cache(2, 4)
    m.prefill(torch.randint(0, 37, (2, 4)), cache)
    with pytest.raises(ValueError, match="KV cache is full"):
        m.step(torch.zeros(2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="batch"):
        m.step(torch.zeros(3, dtype=torch.long), m.init_cache(2, 4))
    with pytest.raises(TypeError, match="KVCache"):
        m.step(torch.zeros(2, dtype=torch.long), None)
    with pytest.raises(ValueError, match="token ids"):
        m(torch.full((1, 3), 37))
    capped = tiny_lm(max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        capped(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        capped.init_cache(1, 9)


def test_cache_bytes():
    m = tiny_lm()
    cache = m.init_cache(2, 10)
    assert isinstance(cache, KVCache) and cache.max_len == 10 and cache.length == 0
    # layers * (k + v) * B * H * max_len * Dh * 4 bytes
    assert m.cache_bytes(cache) == 2 * 2 * 2 * 4 * 10 * 8 * 4


def test_generate_greedy_equals_argmax_of_full_forwards():
    m = tiny_lm()
    prompt = torch.randint(0, 37, (2, 6))
    out = m.generate(prompt, 7, greedy=True)
    seq = prompt
    with torch.no_grad():
        for _ in range(7):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = m.generate(prompt, 5, temperature=0.8, sample_top_k=5, top_p=0.9, generator=g1)
    b = m.generate(prompt, 5, temperature=0.8, sample_top_k=5, top_p=0.9, generator=g2)
    assert torch.equal(a, b) and a.shape == (2, 11)
    assert torch.equal(m.generate(prompt, 0), prompt)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(prompt, -1)


def test_rotary_is_relative():
    torch.manual_seed(1)
    Dh = 16
    q, k = torch.randn(1, 2, 1, Dh, dtype=torch.float64), torch.randn(1, 2, 1, Dh, dtype=torch.float64)

    def score(m, n):
        cq, sq = rotary_cos_sin(torch.tensor([m]), Dh)
        ck, sk = rotary_cos_sin(torch.tensor([n]), Dh)
        qr = apply_rotary(q, cq.double(), sq.double())
        kr = apply_rotary(k, ck.double(), sk.double())
        return (qr * kr).sum(-1)

    base = score(7, 3)
    for shift in (1, 50, 1000):
        torch.testing.assert_close(score(7 + shift, 3 + shift), base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 5))          # but it does depend on m - n
    cos, sin = rotary_cos_sin(torch.arange(5), Dh)                 # rotation keeps the norm
    x = torch.randn(3, 5, Dh)
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("cfg", [
    dict(vocab_size=64, d_model=32, n_layers=1, num_heads=2, num_states=8, top_k=2),
    dict(vocab_size=100, d_model=64, n_layers=2, num_heads=4, num_states=32, top_k=4),
    dict(vocab_size=256, d_model=128, n_layers=3, num_heads=4, num_states=64, top_k=8, use_s2s=False),
    dict(vocab_size=1000, d_model=96, n_layers=2, num_heads=3, num_states=16, top_k=4, conv_size=0),
])
def test_matched_config_lm_within_10_percent(cfg):
    with torch.device("meta"):
        nstm = NSTMLM(**cfg)
    mc = matched_transformer_config(nstm)
    assert mc["d_model"] == cfg["d_model"] and mc["n_layers"] == cfg["n_layers"]
    assert mc["num_heads"] == cfg["num_heads"] and mc["vocab_size"] == cfg["vocab_size"]
    with torch.device("meta"):
        tr = TransformerLM(**mc)
    n, t = count_parameters(nstm), count_parameters(tr)
    assert abs(t - n) <= 0.1 * n, (n, t)
    assert abs(t - n) <= 3 * cfg["d_model"] * cfg["n_layers"]        # in fact within one MLP unit


def test_matched_config_classifier_and_count():
    clf = NSTMClassifier(10, input_dim=1, d_model=32, n_layers=2, num_heads=2, num_states=8, top_k=2)
    mc = matched_transformer_config(clf)
    tr = TransformerClassifier(**mc)
    assert abs(count_parameters(tr) - count_parameters(clf)) <= 0.1 * count_parameters(clf)
    assert tr(torch.rand(2, 9, 1)).shape == (2, 10)
    mc2 = matched_transformer_config(500_000, vocab_size=100, d_model=64, n_layers=4, num_heads=4)
    assert abs(count_parameters(TransformerLM(**mc2)) - 500_000) <= 50_000
    with pytest.raises(ValueError, match="within"):       # smaller than the attention alone
        matched_transformer_config(1_000, vocab_size=100, d_model=64, n_layers=4, num_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        matched_transformer_config(1_000, d_model=64, n_layers=4, num_heads=4)


@pytest.mark.parametrize("make", [
    lambda pool: TransformerClassifier(5, vocab_size=17, d_model=32, num_heads=2, pool=pool),
    lambda pool: NSTMClassifier(5, vocab_size=17, d_model=32, num_heads=2, num_states=8, top_k=2, pool=pool),
])
@pytest.mark.parametrize("pool", ["mean", "last"])
def test_classifier_lengths_ignore_right_padding(make, pool):
    torch.manual_seed(0)
    clf = make(pool).eval()
    a, b = torch.randint(1, 17, (1, 7)), torch.randint(1, 17, (1, 4))
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)])
    with torch.no_grad():
        batch = clf(padded, lengths=torch.tensor([7, 4]))
        torch.testing.assert_close(batch[0], clf(a)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch[1], clf(b)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lengths"):
        clf(padded, lengths=torch.tensor([8, 4]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_pinned_backend_matches_forward():
    torch.manual_seed(0)
    m = TransformerLM(50, d_model=64, n_layers=2, num_heads=2).cuda().eval()
    x = torch.randint(0, 50, (2, 40), device="cuda")
    with torch.no_grad():
        full = m(x)
    cache = m.init_cache(2, 40)
    outs = [m.prefill(x[:, :10], cache)]
    for t in range(10, 40):
        outs.append(m.step(x[:, t], cache)[0][:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=2e-3, atol=2e-3)
    mb = m.to(torch.bfloat16)
    out = mb.generate(x[:, :8], 16, greedy=True)
    assert out.shape == (2, 24)
