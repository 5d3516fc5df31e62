"""The one-token NSTM step in PyTorch, touching only the top_k routed slots (spec §4).

Written once, in two forms: ``recurrent_nstm_step`` (functional and differentiable: a new state)
and ``recurrent_nstm_step_`` (the slot memory updated in place, for static decoding buffers and
CUDA graphs).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..routing import route_torch
from ..s2s import state_attention_torch
from ..state import NSTMState, initial_slots
from ..utils import compute_dtype


def _step(q, k, v, route_logits, write_gate, top_k: int, s2s, comm_every: int, Ks, Vs,
          pos: Union[int, torch.Tensor], scale: Optional[float], inplace: bool):
    """Write the routed slots of ``Ks/Vs``, read, mix at a period end; returns ``(o, Ks, Vs)``."""
    B, H, K = q.shape
    V = v.shape[-1]
    dt = Ks.dtype
    scale = K ** -0.5 if scale is None else scale
    idx, wts = route_torch(route_logits, write_gate, top_k, dtype=dt)  # [B, H, top_k]
    w = wts.unsqueeze(-1).to(dt)
    ik = idx.unsqueeze(-1).expand(B, H, top_k, K)
    iv = idx.unsqueeze(-1).expand(B, H, top_k, V)
    new_k = (1 - w) * Ks.gather(2, ik) + w * k.to(dt).unsqueeze(2)
    new_v = (1 - w) * Vs.gather(2, iv) + w * v.to(dt).unsqueeze(2)
    if inplace:
        Ks.scatter_(2, ik, new_k)
        Vs.scatter_(2, iv, new_v)
    else:
        Ks, Vs = Ks.scatter(2, ik, new_k), Vs.scatter(2, iv, new_v)
    p = torch.softmax(scale * torch.einsum("bhk,bhsk->bhs", q.to(dt), Ks), dim=-1)
    o = torch.einsum("bhs,bhsv->bhv", p, Vs)
    if s2s is not None:
        if isinstance(pos, torch.Tensor):
            # one position per row ([B]) or for all ([1]), decided on the device (CUDA graphs):
            # mix every row, keep it only where this token ends that row's period
            event = ((pos.reshape(-1, 1, 1, 1).to(Vs.device) + 1) % comm_every) == 0
            mixed = torch.where(event, state_attention_torch(Vs, s2s), Vs)
        elif (int(pos) + 1) % comm_every == 0:
            mixed = state_attention_torch(Vs, s2s)
        else:
            mixed = Vs
        if inplace:
            if mixed is not Vs:
                Vs.copy_(mixed)
        else:
            Vs = mixed
    return o.to(q.dtype), Ks, Vs


def recurrent_nstm_step(q, k, v, route_logits, write_gate, top_k: int, s2s, comm_every: int,
                        state: Optional[NSTMState], scale: Optional[float] = None):
    """``q/k [B,H,K]``, ``v [B,H,V]``, logits ``[B,H,S]``, gate ``[B,H]`` -> ``(o [B,H,V], new_state)``.

    Out of place (``state`` is not modified) and differentiable: the write gathers the routed
    slots, updates them and scatters them back; the read runs over all slots; the
    state-to-state attention runs when this token ends a period.
    """
    B, H, K = q.shape
    V, S = v.shape[-1], route_logits.shape[-1]
    Ks, Vs, pos = initial_slots(state, B, H, S, K, V, compute_dtype(q.dtype), q.device)
    o, Ks, Vs = _step(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, Ks, Vs, pos,
                      scale, inplace=False)
    return o, NSTMState(Ks, Vs, pos + 1)


@torch.no_grad()
def recurrent_nstm_step_(q, k, v, route_logits, write_gate, top_k: int, s2s, comm_every: int,
                         state_k: torch.Tensor, state_v: torch.Tensor,
                         pos: Union[int, torch.Tensor], scale: Optional[float] = None) -> torch.Tensor:
    """The same step with the slot memory ``state_k [B,H,S,K]`` / ``state_v [B,H,S,V]`` updated IN
    PLACE (their dtype is the compute dtype); returns ``o [B, H, V]`` in q's dtype.

    ``pos``: an int (the period end is decided on the host) or an int64 tensor of one element or
    of one per row (decided on the device, so that a CUDA graph replays it); not incremented.
    """
    return _step(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state_k, state_v, pos,
                 scale, inplace=True)[0]
