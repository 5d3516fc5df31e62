"""FLOPs of the operator (``nstm_kernels/flops.py``): FlopCounterMode counts ``nstm_attention`` once,
by the operator's definition, whichever backend runs it, and the call's results do not change."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from nstm_kernels import S2SParams, nstm_attention
from nstm_kernels.flops import nstm_flops, period_ends


def _inputs(B=1, T=64, H=2, K=16, V=8, S=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_(True)   # noqa: E731
    s2s = S2SParams(r(H, V, V), r(H, V, V), r(H))
    return (r(B, T, H, K), r(B, T, H, K), r(B, T, H, V), r(B, T, H, S), r(B, T, H)), s2s


def test_period_ends():
    assert period_ends(64, 0, 16) == 4
    assert period_ends(10, 5, 16) == 0 and period_ends(11, 5, 16) == 1   # tau = 15 ends a period
    assert period_ends(1, 15, 16) == 1 and period_ends(100, 0, 10 ** 9) == 0


def test_the_formula_by_hand():
    # B = H = 1, T = 16, K = V = 4, S = 2, top_k = 1, one period end:
    # tokens 16 * (2*1*8 + 2*2*8) = 768; s2s 4*2*16 + 4*4*4 = 192
    assert nstm_flops(1, 16, 1, 4, 4, 2, 1, 16) == 768 + 192
    assert nstm_flops(1, 16, 1, 4, 4, 2, 1, 16, s2s=False) == 768
    assert nstm_flops(1, 16, 1, 4, 4, 2, 1, 16, backward=True) == 3 * 960


def test_flop_counter_counts_the_operator_by_its_definition():
    (q, k, v, lg, gate), s2s = _inputs()
    want_o, _ = nstm_attention(q, k, v, lg, gate, 2, s2s, 16)
    with FlopCounterMode(display=False) as fwd:
        o, _ = nstm_attention(q, k, v, lg, gate, 2, s2s, 16)
    assert fwd.get_total_flops() == nstm_flops(1, 64, 2, 16, 8, 8, 2, 16)
    assert torch.equal(o, want_o)                     # counting does not change the result
    with FlopCounterMode(display=False) as both:
        o, _ = nstm_attention(q, k, v, lg, gate, 2, s2s, 16)
        o.sum().backward()
    assert both.get_total_flops() == nstm_flops(1, 64, 2, 16, 8, 8, 2, 16, backward=True)
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_the_count_is_linear_in_t_and_independent_of_the_period_length():
    counts = {}
    for T, C in ((64, 16), (128, 16), (128, 10 ** 6)):
        (q, k, v, lg, gate), _ = _inputs(T=T)
        with FlopCounterMode(display=False) as m:
            nstm_attention(q, k, v, lg, gate, 2, None, C)
        counts[T, C] = m.get_total_flops()
    assert counts[128, 16] == 2 * counts[64, 16] == counts[128, 10 ** 6]
