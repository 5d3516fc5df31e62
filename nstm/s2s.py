"""StateToStateAttention: the parameters of the slots' multi-head attention among themselves."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from nstm_kernels import S2SParams


class StateToStateAttention(nn.Module):
    """``w_q, w_k, w_v [H, V, V]`` and ``gate [H]``; ``tanh(gate) = 0`` at init, so it starts as the
    identity and learns how much the slots should talk."""

    def __init__(self, num_heads: int, value_dim: int):
        super().__init__()
        self.w_q = nn.Parameter(torch.randn(num_heads, value_dim, value_dim) / math.sqrt(value_dim))
        self.w_k = nn.Parameter(torch.randn(num_heads, value_dim, value_dim) / math.sqrt(value_dim))
        self.w_v = nn.Parameter(torch.randn(num_heads, value_dim, value_dim) / math.sqrt(value_dim))
        self.gate = nn.Parameter(torch.zeros(num_heads))

    def params(self) -> S2SParams:
        return S2SParams(self.w_q, self.w_k, self.w_v, self.gate)
