"""The one-token NSTM step in PyTorch, touching only the top_k routed slots (spec §4)."""
from __future__ import annotations

from typing import Optional

import torch

from ..reference.naive import initial_slots
from ..routing import route_torch
from ..s2s import state_attention_torch
from ..state import NSTMState
from ..utils import compute_dtype


def recurrent_nstm_step(q, k, v, route_logits, write_gate, top_k: int, s2s, comm_every: int,
                        state: Optional[NSTMState], scale: Optional[float] = None):
    """``q/k [B,H,K]``, ``v [B,H,V]``, logits ``[B,H,S]``, gate ``[B,H]`` -> ``(o [B,H,V], new_state)``.

    The write gathers the routed slots, updates them and scatters them back (out of place); the read
    runs over all slots; the state-to-state attention runs when this token ends a period.
    """
    B, H, K = q.shape
    V, S = v.shape[-1], route_logits.shape[-1]
    dt = compute_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    idx, wts = route_torch(route_logits, write_gate, top_k)           # [B, H, top_k]
    Ks, Vs, pos = initial_slots(state, B, H, S, K, V, dt, q.device)
    w = wts.unsqueeze(-1)
    ik = idx.unsqueeze(-1).expand(B, H, top_k, K)
    iv = idx.unsqueeze(-1).expand(B, H, top_k, V)
    Ks = Ks.scatter(2, ik, (1 - w) * Ks.gather(2, ik) + w * k.to(dt).unsqueeze(2))
    Vs = Vs.scatter(2, iv, (1 - w) * Vs.gather(2, iv) + w * v.to(dt).unsqueeze(2))
    p = torch.softmax(scale * torch.einsum("bhk,bhsk->bhs", q.to(dt), Ks), dim=-1)
    o = torch.einsum("bhs,bhsv->bhv", p, Vs)
    if s2s is not None and (pos + 1) % comm_every == 0:
        Vs = state_attention_torch(Vs, s2s)
    return o.to(q.dtype), NSTMState(Ks, Vs, pos + 1)
