"""StateToStateAttention: the parameters of the slots' multi-head attention among themselves."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from nstm_kernels import S2SParams

# sigmoid(-8) = 0.00034: the slots start all but unmixed (the identity) and learn how much to mix.
# It was -4 (g = 0.018) until the study (results/README.md, issue 14): at -4 a passkey written early
# faded over the periods of a long context (92.5 / 62.5 / 15.8 % at 4K / 16K / 64K after training at
# 256), at -8 it held (95.8 / 84.2 / 79.2 %), with copy and the character model unchanged.
GATE_INIT = -8.0


class StateToStateAttention(nn.Module):
    """``w_q, w_k [H, V, V]`` and ``gate [H]``. At every period end the slot values become
    ``(1 - g) V + g softmax((V W_q)(V W_k)^T / sqrt(V)) V`` with ``g = sigmoid(gate)``: a convex mix
    of slot rows, so the memory stays bounded by what was written. ``gate`` starts at
    ``GATE_INIT`` (-8: g = 0.00034)."""

    def __init__(self, num_heads: int, value_dim: int, gate_init: float = GATE_INIT):
        super().__init__()
        self.w_q = nn.Parameter(torch.randn(num_heads, value_dim, value_dim) / math.sqrt(value_dim))
        self.w_k = nn.Parameter(torch.randn(num_heads, value_dim, value_dim) / math.sqrt(value_dim))
        self.gate = nn.Parameter(torch.full((num_heads,), float(gate_init)))

    def params(self) -> S2SParams:
        return S2SParams(self.w_q, self.w_k, self.gate)
