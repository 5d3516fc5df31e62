"""Synthetic sequence tasks: batches of ``(inputs [B, T] int64, targets [B, T] int64)`` where
``targets`` is ``IGNORE`` (-100) wherever nothing is to be predicted."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

IGNORE = -100


def _check(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def mqar_batch(batch: int, num_pairs: int, vocab_size: int, num_queries: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall (Zoology's MQAR).

    The sequence is ``k1 v1 k2 v2 ... kN vN`` followed by ``num_queries`` (default N) queries
    ``q a``: a key seen before and, teacher-forced, its value. The model is scored on predicting
    ``a`` at each query key. Keys come from ``[1, vocab/2)``, values from ``[vocab/2, vocab)``, all
    keys of a sequence distinct. Length ``2 * (num_pairs + num_queries)``.
    """
    _check("batch", batch, 1)
    _check("num_pairs", num_pairs, 1)
    _check("vocab_size", vocab_size, 4)
    nq = num_pairs if num_queries is None else num_queries
    _check("num_queries", nq, 1)
    half = vocab_size // 2
    if num_pairs > half - 1:
        raise ValueError(f"num_pairs ({num_pairs}) must be < vocab_size // 2 ({half}) so keys are distinct")
    keys = torch.rand(batch, half - 1, generator=generator).argsort(-1)[:, :num_pairs] + 1
    vals = torch.randint(half, vocab_size, (batch, num_pairs), generator=generator)
    ctx = torch.stack([keys, vals], dim=-1).flatten(1)                           # [B, 2N]
    pick = torch.randint(0, num_pairs, (batch, nq), generator=generator)
    qk, qv = keys.gather(1, pick), vals.gather(1, pick)
    queries = torch.stack([qk, qv], dim=-1).flatten(1)                           # [B, 2Q]
    inputs = torch.cat([ctx, queries], dim=1)
    targets = torch.full_like(inputs, IGNORE)
    targets[:, 2 * num_pairs::2] = qv                                            # predict a at q
    return inputs, targets


def copy_batch(batch: int, length: int, vocab_size: int,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Copy: ``x1 .. xL SEP x1 .. xL``; the model predicts the second copy (token 0 is SEP).

    Length ``2 * length + 1``; scored on the ``length`` tokens after SEP."""
    _check("batch", batch, 1)
    _check("length", length, 1)
    _check("vocab_size", vocab_size, 3)
    x = torch.randint(1, vocab_size, (batch, length), generator=generator)
    sep = torch.zeros(batch, 1, dtype=torch.long)
    inputs = torch.cat([x, sep, x], dim=1)
    targets = torch.full_like(inputs, IGNORE)
    targets[:, length:2 * length] = x
    return inputs, targets


def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Accuracy of ``logits.argmax(-1)`` over the positions where ``targets != IGNORE``."""
    mask = targets != IGNORE
    if not mask.any():
        raise ValueError("targets has no scored position (all IGNORE)")
    return (logits.argmax(-1)[mask] == targets[mask]).float().mean().item()
