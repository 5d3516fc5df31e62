"""Small building blocks shared by the NSTM layer and models."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time, then SiLU (as in Mamba and GLA).

    ``forward(x [B, T, C], cache [B, W-1, C] or None)`` -> ``(y [B, T, C], new cache)``. The cache
    holds the last ``W - 1`` inputs, so that decoding token by token equals one full pass.
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        if cache is None:
            cache = x.new_zeros(B, self.width - 1, C)
        xc = torch.cat([cache.to(x.dtype), x], dim=1)                      # [B, W-1+T, C]
        if T == 1:
            # One token (decoding): a weighted sum over the window. conv1d's set-up cost was
            # most of this call on the CPU, for W * C multiply-adds.
            y = torch.einsum("bwc,cw->bc", xc, self.weight[:, 0].to(x.dtype)) + self.bias.to(x.dtype)
            y = y.unsqueeze(1)
        else:
            y = F.conv1d(xc.transpose(1, 2), self.weight.to(x.dtype), self.bias.to(x.dtype),
                         groups=C).transpose(1, 2)
        return F.silu(y), xc[:, xc.shape[1] - (self.width - 1):]
