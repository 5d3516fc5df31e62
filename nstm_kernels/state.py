"""The two small records of the NSTM operator (spec §2): the slot memory and the s2s weights."""
from __future__ import annotations

from typing import NamedTuple, Union

import torch


class NSTMState(NamedTuple):
    """Slot memory of one NSTM operator.

    k:   slot keys   ``[B, H, S, K]``
    v:   slot values ``[B, H, S, V]``
    pos: absolute stream position of the next token (an ``int``); it decides where the
         state-to-state periods end, so a stream split anywhere resumes exactly.
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

    w_q, w_k, w_v: ``[H, V, V]``; gate: ``[H]`` (the mix is ``tanh(gate)``; 0 is the identity).
    """

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    gate: torch.Tensor


def initial_slots(state, B: int, H: int, S: int, K: int, V: int, dtype: torch.dtype, device):
    """``(K̂, V̂, pos)`` before the first token in the compute ``dtype``: the given ``NSTMState``
    (converted, not copied when already in ``dtype``), or zeros at pos 0."""
    if state is None:
        zk = torch.zeros(B, H, S, K, dtype=dtype, device=device)
        zv = torch.zeros(B, H, S, V, dtype=dtype, device=device)
        return zk, zv, 0
    return state.k.to(dtype), state.v.to(dtype), int(state.pos)
