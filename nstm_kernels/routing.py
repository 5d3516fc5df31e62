"""Sparse top-k routing in PyTorch (spec §2 step 1): shared by every PyTorch path."""
from __future__ import annotations

from typing import Optional

import torch

from .utils import compute_dtype


def route_torch(route_logits: torch.Tensor, write_gate: torch.Tensor, top_k: int,
                dtype: Optional[torch.dtype] = None):
    """Top-k slots per token, softmax over the selected logits, times beta = sigmoid(gate).

    ``route_logits [..., S]``, ``write_gate [...]`` -> ``indices [..., top_k]`` (int64) and
    ``weights [..., top_k]`` in ``dtype`` (default the compute dtype of the logits: fp32, or fp64
    for fp64). Unselected logits get no gradient (as in mixture-of-experts routing).

    The tie rule of every backend: equal logits at the top-k boundary go to the lower slot index
    (a stable descending sort, not ``torch.topk``, whose order among equals is unspecified). A NaN
    logit ranks above every number (as in ``torch.sort``) and makes the token's weights NaN.
    """
    dt = compute_dtype(route_logits.dtype) if dtype is None else dtype
    logits = route_logits.to(dt)
    vals, idx = _top(logits, top_k)
    alpha = torch.softmax(vals, dim=-1)
    beta = torch.sigmoid(write_gate.to(dt))
    return idx, alpha * beta.unsqueeze(-1)


def _top(logits: torch.Tensor, top_k: int):
    """The top_k logits and their slots, descending, ties to the lower index. ``torch.topk`` (half
    the time of a sort on the CPU) when the top_k + 1 largest hold no tie and no NaN, which
    decides the set and its order; else the stable sort. While compiling: always the sort (no
    data-dependent branch in the graph)."""
    S = logits.shape[-1]
    if not torch.compiler.is_compiling() and logits.numel():
        vals, idx = torch.topk(logits, min(top_k + 1, S), dim=-1, sorted=True)
        if not bool(((vals[..., 1:] == vals[..., :-1]) | vals[..., :1].isnan()).any()):
            return vals[..., :top_k], idx[..., :top_k]
    vals, idx = torch.sort(logits, dim=-1, descending=True, stable=True)
    return vals[..., :top_k], idx[..., :top_k]


def dense_weights(indices: torch.Tensor, weights: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Scatter sparse write weights ``[..., k]`` into a dense ``[..., S]`` (zeros off the routed slots)."""
    out = torch.zeros(*weights.shape[:-1], num_slots, dtype=weights.dtype, device=weights.device)
    return out.scatter(-1, indices, weights)


def log_retain(w: torch.Tensor):
    """``(log(1 - w), full)`` for the chunk-parallel decays, exact at w = 1.

    w = beta * alpha can round to exactly 1 (sigmoid(17) == 1 in fp32): that write replaces the slot
    and nothing of the old content may survive. ``full`` marks those writes and their log-retain is
    set to 0 (finite); the decay from s to t is then ``exp(A_t - A_s)`` only where no full write
    lies in (s, t] (equal cumulative counts of ``full``), else exactly 0. A NaN w stays NaN.
    """
    full = w >= 1
    return torch.log1p(-torch.where(full, torch.zeros_like(w), w)), full
