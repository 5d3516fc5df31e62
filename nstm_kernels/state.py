"""The two small records of the NSTM operator (spec §2): the slot memory and the s2s weights."""
from __future__ import annotations

from typing import NamedTuple, Union

import torch


class NSTMState(NamedTuple):
    """Slot memory of one NSTM operator.

    k:   slot keys   ``[B, H, S, K]``
    v:   slot values ``[B, H, S, V]``
    pos: absolute stream position of the next token: an ``int``, or an int64 tensor ``[B]`` with
         one position per row; it decides where the state-to-state periods end, so a stream
         split anywhere resumes exactly.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: Union[int, torch.Tensor]

    def detach(self) -> NSTMState:
        """The same memory cut from the autograd graph (truncated backpropagation through time)."""
        pos = self.pos.detach() if isinstance(self.pos, torch.Tensor) else self.pos
        return NSTMState(self.k.detach(), self.v.detach(), pos)


class S2SParams(NamedTuple):
    """Weights of the state-to-state attention, per head.

    w_q, w_k: ``[H, V, V]``; gate: ``[H]``. At a period end the slot values become
    ``(1 - g) V + g softmax((V W_q)(V W_k)^T / sqrt(V)) V`` with ``g = sigmoid(gate)``: a convex
    mix of slot rows, so the state stays in the hull of what was written (``gate -> -inf`` is the
    identity).
    """

    w_q: torch.Tensor
    w_k: torch.Tensor
    gate: torch.Tensor


def initial_slots(state, B: int, H: int, S: int, K: int, V: int, dtype: torch.dtype, device):
    """``(K̂, V̂, pos)`` before the first token in the compute ``dtype``: the given ``NSTMState``
    (converted, not copied when already in ``dtype``), or zeros at pos 0. ``pos`` is an int, or
    the state's int64 tensor of per-row positions."""
    if state is None:
        zk = torch.zeros(B, H, S, K, dtype=dtype, device=device)
        zv = torch.zeros(B, H, S, V, dtype=dtype, device=device)
        return zk, zv, 0
    pos = state.pos if isinstance(state.pos, torch.Tensor) else int(state.pos)
    return state.k.to(dtype), state.v.to(dtype), pos
