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

    ``pointer_period = P > 0`` adds a position-aware write: a learned table ``pointer [H, P, S]``
    whose row ``tau mod P`` is added to the route logits of the token at absolute position ``tau``.
    It starts as a write pointer that sweeps the slots once per period
    (``POINTER_SCALE * cos(2 pi (p / P - s / S))``), so tokens of equal content at different
    positions start out writing to different slots; training keeps or reshapes it. The router
    still reads only the input and the position, so the operator's contract and its chunk-parallel
    form are unchanged.
    """

    POINTER_SCALE = 2.0

    def __init__(self, d_model: int, num_heads: int, num_states: int, gate_bias: float = 0.0,
                 pointer_period: int = 0):
        super().__init__()
        self.num_heads, self.num_states = num_heads, num_states
        self.weight = nn.Parameter(torch.empty(num_heads * (num_states + 1), d_model))
        self.bias = nn.Parameter(torch.zeros(num_heads * (num_states + 1)))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_model))
        self.set_gate_bias(gate_bias)
        self.pointer = None
        if pointer_period > 0:
            phase = torch.arange(pointer_period)[:, None] / pointer_period - torch.arange(num_states) / num_states
            table = self.POINTER_SCALE * torch.cos(2 * math.pi * phase)             # [P, S]
            self.pointer = nn.Parameter(table.expand(num_heads, -1, -1).clone())    # [H, P, S]

    @property
    def pointer_period(self) -> int:
        return 0 if self.pointer is None else self.pointer.shape[1]

    def position_bias(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Route-logit bias of the tokens at absolute ``positions`` (int64, any shape ``[...]``):
        ``[..., H, S]``."""
        rows = torch.remainder(positions, self.pointer.shape[1])
        return self.pointer.to(dtype).transpose(0, 1)[rows]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def set_gate_bias(self, value: float) -> None:
        """Set the bias of the H write-gate rows (after the H * S route-logit rows) to ``value``."""
        self.bias[self.num_heads * self.num_states:] = float(value)

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
        if self.pointer is not None:
            idx = keep[:, None, :].expand(-1, self.pointer.shape[1], -1)
            self.pointer = nn.Parameter(self.pointer.gather(2, idx).clone())
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
        if self.pointer is not None:           # the dead slots' pointer columns: the live mean
            m = mask[:, None, :].expand_as(self.pointer)
            live_p = (self.pointer * live[:, None, :]).sum(2, keepdim=True) / live.sum(1)[:, None, None].clamp(min=1)
            self.pointer.copy_(torch.where(m, live_p.expand_as(self.pointer), self.pointer))
