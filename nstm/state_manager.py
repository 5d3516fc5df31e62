"""StateManager: the slots of one NSTM layer, their learned initial memory, importance and usage."""
from __future__ import annotations

import math
import weakref
from typing import List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nstm_kernels import NSTMState


class PruneReport(NamedTuple):
    """What ``StateManager.prune`` did: slots before and after, and which were kept per head."""

    old_num_states: int
    new_num_states: int
    kept: torch.Tensor                 # [H, new_num_states] slot indices (into the old numbering)
    removed_per_head: List[int]


class StateManager(nn.Module):
    """Per head ``S`` slots: learned initial keys/values, importance logits iota and usage counts.

    * ``importance()`` = sigmoid(iota) ``[H, S]``; the router adds ``log sigmoid(iota)`` to its logits,
      so an unimportant slot is rarely chosen and can be pruned.
    * ``usage`` counts the write weight each slot received in training forwards (a buffer).
    * ``prune(threshold)`` physically removes slots whose importance is below ``threshold``, with their
      router rows and initial memory; ``revive()`` re-initialises dead slots during training.
    """

    def __init__(self, num_heads: int, num_states: int, key_dim: int, value_dim: int,
                 init_importance: float = 3.0):
        super().__init__()
        self.num_heads, self.num_states = num_heads, num_states
        self.init_importance = init_importance
        self.init_k = nn.Parameter(torch.randn(num_heads, num_states, key_dim) / math.sqrt(key_dim))
        self.init_v = nn.Parameter(torch.randn(num_heads, num_states, value_dim) * 0.02)
        self.iota = nn.Parameter(torch.full((num_heads, num_states), float(init_importance)))
        self.register_buffer("usage", torch.zeros(num_heads, num_states))
        self.register_buffer("usage_tokens", torch.zeros((), dtype=torch.float64))
        self._router = None

    def attach_router(self, router: nn.Module) -> None:
        """Slots live in the router too (its rows); prune and revive keep both in step."""
        self._router = weakref.ref(router)

    # ---- importance and usage ------------------------------------------------------------------
    def importance(self) -> torch.Tensor:
        return torch.sigmoid(self.iota)

    def log_importance(self) -> torch.Tensor:
        return F.logsigmoid(self.iota)

    @torch.no_grad()
    def record_usage(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """Add the write weights of a forward (``indices/weights [B, T, H, k]``) to ``usage``."""
        H, S = self.num_heads, self.num_states
        flat = (indices + torch.arange(H, device=indices.device)[:, None] * S).reshape(-1)
        self.usage += torch.zeros(H * S, device=self.usage.device).index_add_(
            0, flat, weights.reshape(-1).float()).view(H, S)
        self.usage_tokens += indices.shape[0] * indices.shape[1]

    def usage_fraction(self) -> torch.Tensor:
        """Share of each head's write weight that went to each slot ``[H, S]`` (zeros before use)."""
        total = self.usage.sum(1, keepdim=True)
        return torch.where(total > 0, self.usage / total.clamp(min=1e-30), torch.zeros_like(self.usage))

    def reset_usage(self) -> None:
        self.usage.zero_()
        self.usage_tokens.zero_()

    def active_states(self, min_importance: float = 0.5, min_usage: float = 0.0) -> torch.Tensor:
        """Bool mask ``[H, S]`` of live slots: importance >= ``min_importance`` and usage share
        > ``min_usage`` (usage is ignored before any has been recorded)."""
        alive = self.importance() >= min_importance
        if self.usage_tokens.item() > 0:
            alive = alive & (self.usage_fraction() > min_usage)
        return alive.detach()

    # ---- memory --------------------------------------------------------------------------------
    def initial_state(self, batch: int, pos: int = 0) -> NSTMState:
        """The learned memory before the first token, expanded to ``batch`` (differentiable)."""
        H, S = self.num_heads, self.num_states
        return NSTMState(self.init_k.unsqueeze(0).expand(batch, H, S, -1),
                         self.init_v.unsqueeze(0).expand(batch, H, S, -1), pos)

    # ---- prune and revive ----------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, threshold: float) -> PruneReport:
        """Remove slots with importance below ``threshold``.

        All heads keep the same number of slots (tensors stay rectangular): ``S'`` is the largest
        count of slots at or above the threshold over heads, and each head keeps its ``S'`` most
        important slots, in their original order. At least one slot is kept.
        """
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be a float in [0, 1] (an importance), got {threshold!r}")
        imp = self.importance()
        H, S = imp.shape
        new_s = max(1, int((imp >= threshold).sum(1).max().item()))
        kept = imp.topk(new_s, dim=1).indices.sort(dim=1).values             # [H, S']
        removed = [int(S - new_s)] * H
        self._keep(kept)
        if self._router is not None and self._router() is not None:
            self._router().keep_slots(kept)
        return PruneReport(S, new_s, kept, removed)

    def _keep(self, kept: torch.Tensor) -> None:
        def take(t):
            idx = kept.to(t.device)
            if t.dim() == 3:
                idx = idx.unsqueeze(-1).expand(-1, -1, t.shape[-1])
            return t.gather(1, idx).clone()

        self.init_k = nn.Parameter(take(self.init_k.data))
        self.init_v = nn.Parameter(take(self.init_v.data))
        self.iota = nn.Parameter(take(self.iota.data))
        self.usage = take(self.usage)
        self.num_states = kept.shape[1]

    @torch.no_grad()
    def set_importance(self, value: float) -> None:
        """Every slot's importance logit iota to ``value``, which ``revive()`` then restores too."""
        self.init_importance = float(value)
        self.iota.fill_(self.init_importance)

    @torch.no_grad()
    def revive(self, min_usage: Optional[float] = None, generator: Optional[torch.Generator] = None) -> int:
        """Re-initialise dead slots: usage share below ``min_usage`` (default: a tenth of the uniform
        share 1/S) or importance below 0.5. Their initial memory, importance and router rows are
        re-drawn; usage counts restart. Returns the number of slots revived (over all heads)."""
        H, S = self.num_heads, self.num_states
        min_usage = 0.1 / S if min_usage is None else min_usage
        dead = self.importance() < 0.5
        if self.usage_tokens.item() > 0:
            dead = dead | (self.usage_fraction() < min_usage)
        n = int(dead.sum().item())
        if n:
            K, V = self.init_k.shape[-1], self.init_v.shape[-1]
            fk = torch.randn(H, S, K, generator=generator).to(self.init_k) / math.sqrt(K)
            fv = torch.randn(H, S, V, generator=generator).to(self.init_v) * 0.02
            self.init_k[dead] = fk[dead]
            self.init_v[dead] = fv[dead]
            self.iota[dead] = self.init_importance
            if self._router is not None and self._router() is not None:
                self._router().reset_slots(dead.to(self.iota.device), generator=generator)
        self.reset_usage()
        return n

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_states={self.num_states}"
