"""Sparse top-k routing in PyTorch (spec §2 step 1): shared by every PyTorch path."""
from __future__ import annotations

import torch

from .utils import compute_dtype


def route_torch(route_logits: torch.Tensor, write_gate: torch.Tensor, top_k: int):
    """Top-k slots per token, softmax over the selected logits, times beta = sigmoid(gate).

    ``route_logits [..., S]``, ``write_gate [...]`` -> ``indices [..., top_k]`` (int64) and
    ``weights [..., top_k]`` in the compute dtype (fp32, or fp64 for fp64 inputs). Unselected logits
    get no gradient (as in mixture-of-experts routing).
    """
    dt = compute_dtype(route_logits.dtype)
    logits = route_logits.to(dt)
    vals, idx = torch.topk(logits, top_k, dim=-1, sorted=True)
    alpha = torch.softmax(vals, dim=-1)
    beta = torch.sigmoid(write_gate.to(dt))
    return idx, alpha * beta.unsqueeze(-1)


def dense_weights(indices: torch.Tensor, weights: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Scatter sparse write weights ``[..., k]`` into a dense ``[..., S]`` (zeros off the routed slots)."""
    out = torch.zeros(*weights.shape[:-1], num_slots, dtype=weights.dtype, device=weights.device)
    return out.scatter(-1, indices, weights)


def log_retain(w: torch.Tensor) -> torch.Tensor:
    """log(1 - w), finite for w -> 1.

    w = beta * alpha can round to exactly 1 (sigmoid(17) == 1 in fp32). We clamp w to 1 - eps of its
    dtype, which changes the state by at most eps (below the dtype's own rounding) and keeps every
    log-decay, cumulative sum and gradient finite.
    """
    eps = torch.finfo(w.dtype).eps
    return torch.log1p(-w.clamp(max=1.0 - eps))
