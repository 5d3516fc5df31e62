"""The two small records of the NSTM operator (spec §2): the slot memory and the s2s weights."""
from typing import NamedTuple

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
    pos: int


class S2SParams(NamedTuple):
    """Weights of the state-to-state attention, per head.

    w_q, w_k, w_v: ``[H, V, V]``; gate: ``[H]`` (the mix is ``tanh(gate)``; 0 is the identity).
    """

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    gate: torch.Tensor
