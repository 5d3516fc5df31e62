"""The ground truth: the NSTM operator token by token, exactly as spec §2 writes it.

Slow (a Python loop over time) and plain on purpose. Every other path is tested against it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..routing import dense_weights, route_torch
from ..s2s import apply_s2s, pack_s2s
from ..state import NSTMState, S2SParams, initial_slots
from ..utils import compute_dtype
from ..varlen import loop_segments, needs_segments


def naive_recurrent_nstm(q, k, v, route_logits, write_gate, top_k: int,
                         s2s: Optional[S2SParams] = None, comm_every: int = 64,
                         initial_state: Optional[NSTMState] = None,
                         output_final_state: bool = False, scale: Optional[float] = None,
                         return_maps: bool = False, cu_seqlens=None):
    """Token-by-token NSTM. Shapes as ``nstm_attention``; returns ``(o, final_state_or_None)``,
    plus a dict of maps when ``return_maps`` (``read [B,T,H,S]``, ``s2s [E,B,H,S,S]``, ``s2s_pos``).
    A packed batch or per-row positions run one sequence at a time (``varlen.loop_segments``)."""
    if needs_segments(initial_state, cu_seqlens):
        if return_maps:
            raise ValueError("return_maps is not available for packed batches (cu_seqlens) or "
                             "per-row positions; call each sequence on its own for its maps")
        return loop_segments(naive_recurrent_nstm, q, k, v, route_logits, write_gate, top_k, s2s,
                             comm_every, initial_state, output_final_state, scale, cu_seqlens)
    B, T, H, K = q.shape
    V, S = v.shape[-1], route_logits.shape[-1]
    dt = compute_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    idx, wts = route_torch(route_logits, write_gate, top_k, dtype=dt)
    w = dense_weights(idx, wts, S)  # [B, T, H, S]
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    Ks, Vs, pos = initial_slots(initial_state, B, H, S, K, V, dt, q.device)

    packed = pack_s2s(s2s, dt) if s2s is not None else None
    outs, reads, maps, map_pos = [], [], [], []
    for t in range(T):
        wt = w[:, t].unsqueeze(-1)                                   # [B, H, S, 1]
        Ks = (1 - wt) * Ks + wt * kf[:, t].unsqueeze(2)              # gated convex write
        Vs = (1 - wt) * Vs + wt * vf[:, t].unsqueeze(2)
        p = torch.softmax(scale * torch.einsum("bhk,bhsk->bhs", qf[:, t], Ks), dim=-1)
        outs.append(torch.einsum("bhs,bhsv->bhv", p, Vs))
        reads.append(p)
        if s2s is not None and (pos + t + 1) % comm_every == 0:
            Vs, a = apply_s2s(Vs, packed, return_map=True)
            maps.append(a)
            map_pos.append(pos + t)
    o = torch.stack(outs, dim=1).to(q.dtype)
    final = NSTMState(Ks, Vs, pos + T) if output_final_state else None
    if not return_maps:
        return o, final
    s2s_maps = torch.stack(maps) if maps else torch.zeros(0, B, H, S, S, dtype=dt, device=q.device)
    return o, final, {"indices": idx, "weights": wts, "read": torch.stack(reads, dim=1),
                      "s2s": s2s_maps, "s2s_pos": map_pos}


def naive_nstm_step(q, k, v, route_logits, write_gate, top_k: int, s2s, comm_every: int,
                    state: NSTMState, scale: Optional[float] = None):
    """One token through the reference: ``q/k [B,H,K]``, ``v [B,H,V]``, logits ``[B,H,S]``, gate ``[B,H]``."""
    o, final = naive_recurrent_nstm(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                    route_logits.unsqueeze(1), write_gate.unsqueeze(1), top_k, s2s,
                                    comm_every, state, True, scale)
    return o[:, 0], final
