"""State-to-state attention in PyTorch (spec §2 step 4).

``V <- (1 - g) V + g A V`` per batch row and head, ``A = softmax((V W_q)(V W_k)^T / sqrt(V))``
(row-stochastic) and ``g = sigmoid(gate)``: every new row is a convex combination of old rows, so
the slot values stay in the convex hull of what was written, for any weights.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .state import S2SParams


class PackedS2S(NamedTuple):
    """S2S weights prepared once per call: ``w_qk [H, V, 2V]`` and ``mix = sigmoid(gate) [H, 1, 1]``."""

    w_qk: torch.Tensor
    mix: torch.Tensor


def pack_s2s(s2s: S2SParams, dtype: torch.dtype) -> PackedS2S:
    w = torch.cat([s2s.w_q, s2s.w_k], dim=-1).to(dtype)
    return PackedS2S(w, torch.sigmoid(s2s.gate.to(dtype))[:, None, None])


def apply_s2s(v_state: torch.Tensor, packed: PackedS2S, return_map: bool = False):
    """``(1 - g) V + g softmax((V W_q)(V W_k)^T / sqrt(V)) V`` for ``v_state [B, H, S, V]``."""
    # an explicit softmax, not F.scaled_dot_product_attention: the CPU SDPA backward returns NaN
    # for very large scores, the explicit one stays finite
    qs, ks = (v_state @ packed.w_qk).chunk(2, dim=-1)
    attn = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(v_state.shape[-1]), dim=-1)
    out = (1 - packed.mix) * v_state + packed.mix * (attn @ v_state)
    return (out, attn) if return_map else out


def state_attention_torch(v_state: torch.Tensor, s2s: S2SParams, return_map: bool = False):
    """The s2s step in ``v_state``'s dtype; with ``return_map`` also the ``[B, H, S, S]`` attention."""
    return apply_s2s(v_state, pack_s2s(s2s, v_state.dtype), return_map)
