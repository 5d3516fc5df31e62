"""TokenToStateRouter: route logits and write gates from the token, plus the slot-importance bias."""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn


class TokenToStateRouter(nn.Module):
    """Per head, ``S`` route logits and one write-gate logit per token.

    The weight rows are laid out ``[H * S route logits | H write gates]``. ``NSTMLayer`` folds this
    weight into its one fused input projection; ``forward`` is the stand-alone form.
    """

    def __init__(self, d_model: int, num_heads: int, num_states: int, gate_bias: float = 0.0):
        super().__init__()
        self.num_heads, self.num_states = num_heads, num_states
        self.weight = nn.Parameter(torch.empty(num_heads * (num_states + 1), d_model))
        self.bias = nn.Parameter(torch.zeros(num_heads * (num_states + 1)))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_model))
        with torch.no_grad():
            self.bias[num_heads * num_states:] = gate_bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def split(self, out: torch.Tensor, log_importance: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Projection output ``[..., H * (S + 1)]`` -> ``(route_logits [..., H, S], write_gate [..., H])``.

        ``log_importance [H, S]`` (log sigmoid of the importance) is added to the logits."""
        H, S = self.num_heads, self.num_states
        logits = out[..., : H * S].unflatten(-1, (H, S)) + log_importance.to(out.dtype)
        return logits, out[..., H * S:]

    def forward(self, x: torch.Tensor, log_importance: torch.Tensor):
        return self.split(nn.functional.linear(x, self.weight, self.bias), log_importance)

    @torch.no_grad()
    def keep_slots(self, keep: torch.Tensor) -> None:
        """Keep only slots ``keep [H, S']`` (per-head indices); the gate rows stay."""
        H, S = self.num_heads, self.num_states
        rows = (torch.arange(H, device=keep.device)[:, None] * S + keep).reshape(-1)
        rows = torch.cat([rows, torch.arange(H * S, H * (S + 1), device=keep.device)])
        self.weight = nn.Parameter(self.weight[rows].clone())
        self.bias = nn.Parameter(self.bias[rows].clone())
        self.num_states = keep.shape[1]

    @torch.no_grad()
    def reset_slots(self, mask: torch.Tensor, generator=None) -> None:
        """Re-draw the route rows of slots ``mask [H, S]`` (bool), biases set to the live mean."""
        H, S = self.num_heads, self.num_states
        w = self.weight[: H * S].view(H, S, -1)
        b = self.bias[: H * S].view(H, S)
        fresh = torch.randn(w.shape, generator=generator, device="cpu").to(w) / math.sqrt(w.shape[-1])
        w[mask] = fresh[mask]
        live = (~mask).float()
        live_mean = (b * live).sum(1, keepdim=True) / live.sum(1, keepdim=True).clamp(min=1)
        b.copy_(torch.where(mask, live_mean.expand_as(b), b))
