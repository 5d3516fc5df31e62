"""StateToStateAttention: the parameters of the slots' multi-head attention among themselves."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from nstm_kernels import S2SParams

# sigmoid(-4) = 0.018: the slots start close to not mixing at all (the identity) and learn how much
GATE_INIT = -4.0


class StateToStateAttention(nn.Module):
    """``w_q, w_k [H, V, V]`` and ``gate [H]``. At every period end the slot values become
    ``(1 - g) V + g softmax((V W_q)(V W_k)^T / sqrt(V)) V`` with ``g = sigmoid(gate)``: a convex mix
    of slot rows, so the memory stays bounded by what was written. ``gate`` starts at
    ``GATE_INIT`` (g = 0.018)."""

    def __init__(self, num_heads: int, value_dim: int, gate_init: float = GATE_INIT):
        super().__init__()
        self.w_q = nn.Parameter(torch.randn(num_heads, value_dim, value_dim) / math.sqrt(value_dim))
        self.w_k = nn.Parameter(torch.randn(num_heads, value_dim, value_dim) / math.sqrt(value_dim))
        self.gate = nn.Parameter(torch.full((num_heads,), float(gate_init)))

    def params(self) -> S2SParams:
        return S2SParams(self.w_q, self.w_k, self.gate)
