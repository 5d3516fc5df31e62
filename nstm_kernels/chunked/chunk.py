"""The chunk-parallel NSTM in PyTorch (spec §4): the default on CPU and the fallback everywhere.

Within a chunk the slot update is linear in the state, so everything that does not depend on the
state entering the chunk is computed for all chunks at once:

    K_t[i] = exp(A_t,i) K_0[i] + sum_{s<=t} w_s,i exp(A_t,i - A_s,i) k_s,      A = cumsum log(1 - w)

(the same for V). Decays are pairwise differences of in-chunk cumulative log-retains, masked to
s <= t *before* the exp, so nothing is ever divided by a cumulative product and w = 0 or w -> 1 stay
finite. Only the hand-off of the slot state from one chunk to the next is sequential; the
state-to-state attention runs there, at every period end. Chunks are laid out on absolute stream
positions, so that every period end (tau + 1) % C == 0 falls on a chunk end; padding tokens write
nothing (w = 0) and their outputs are dropped.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from ..routing import dense_weights, log_retain, route_torch
from ..s2s import apply_s2s, pack_s2s
from ..state import NSTMState, S2SParams, initial_slots
from ..utils import compute_dtype

DEFAULT_CHUNK = 16


# without s2s there are no periods; chunks are grouped in blocks of this many for the hand-off
BLOCK_CHUNKS = 8


class ChunkLayout:
    """Where each token sits in the padded sequence of ``P`` blocks of ``n`` chunks of ``L`` tokens.

    A block is one state-to-state period (C tokens, padded to ``n * L``) when s2s is on, else ``n``
    consecutive chunks. The state-to-state attention can only run at a block end.

    pidx:      ``[T]`` index of token t in the padded sequence of ``P * n * L`` tokens
    events:    blocks whose end is a period end ((tau + 1) % C == 0 for a real token)
    event_pos: the absolute position tau of the token that ends each of those periods
    """

    def __init__(self, T: int, pos: int, comm_every: int, has_s2s: bool, chunk: int, device):
        self.events: List[int] = []
        self.event_pos: List[int] = []
        tau = torch.arange(pos, pos + T)
        if has_s2s:
            C = comm_every
            n = math.ceil(C / chunk)                      # chunks per period
            L = math.ceil(C / n)                          # chunk length; a padded period is n * L >= C
            base = pos - pos % C                          # absolute start of the first period
            pidx = ((tau - base) // C) * (n * L) + tau % C
            for p, end_tau in enumerate(range(base + C - 1, pos + T, C)):  # periods ending inside
                self.events.append(p)
                self.event_pos.append(end_tau)
        else:
            L = min(chunk, T)
            n = min(BLOCK_CHUNKS, math.ceil(T / L))
            pidx = tau - pos
        self.L, self.n = L, n
        self.P = int(pidx[-1]) // (n * L) + 1
        self.N = self.P * n
        self.identity = self.N * L == T and bool((pidx == torch.arange(T)).all())
        self.pidx = pidx.to(device)

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, D]`` -> ``[B, H, N, L, D]`` (zeros at the padding)."""
        B, T, H, D = x.shape
        x = x.transpose(1, 2)
        if not self.identity:
            x = x.new_zeros(B, H, self.N * self.L, D).index_copy(2, self.pidx, x)
        return x.reshape(B, H, self.N, self.L, D)

    def from_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, L, D]`` -> ``[B, T, H, D]`` (padding dropped)."""
        B, H, N, L, D = x.shape
        x = x.reshape(B, H, N * L, D)
        if not self.identity:
            x = x.index_select(2, self.pidx)
        return x.transpose(1, 2)


def chunk_nstm(q, k, v, route_logits, write_gate, top_k: int, s2s: Optional[S2SParams] = None,
               comm_every: int = 64, initial_state: Optional[NSTMState] = None,
               output_final_state: bool = False, scale: Optional[float] = None,
               return_maps: bool = False, chunk_size: int = DEFAULT_CHUNK):
    """Chunk-parallel NSTM; same signature and results as ``naive_recurrent_nstm``."""
    B, T, H, K = q.shape
    V, S = v.shape[-1], route_logits.shape[-1]
    dt = compute_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    idx, wts = route_torch(route_logits, write_gate, top_k)
    K0, V0, pos = initial_slots(initial_state, B, H, S, K, V, dt, q.device)
    lay = ChunkLayout(T, pos, comm_every, s2s is not None, chunk_size, q.device)
    L, N = lay.L, lay.N

    # routing in chunks; padding tokens route to slot 0 with weight 0, i.e. write nothing
    idc = lay.to_chunks(idx).reshape(B, H, N, L * top_k)                # slot of each (s, j)
    wc = lay.to_chunks(wts)                                             # [B, H, N, L, top_k]
    qc, kc, vc = (lay.to_chunks(x.to(dt)) for x in (q, k, v))
    A = log_retain(lay.to_chunks(dense_weights(idx, wts, S))).cumsum(dim=3)   # [B, H, N, L, S]
    eA = A.exp()
    # The in-chunk write-and-decay operator, kept sparse: token s writes only its top_k slots, so
    # G[t, s, j] = w_s,j exp(A_t,i - A_s,i) with i = idx_s,j, for s <= t (masked before the exp).
    at_slot = idc.unsqueeze(3).expand(B, H, N, L, L * top_k)
    A_ts = A.gather(-1, at_slot).view(B, H, N, L, L, top_k)            # A_t at the slot s wrote
    A_ss = A_ts.diagonal(dim1=3, dim2=4).permute(0, 1, 2, 4, 3)         # A_s at that slot [.., L(s), k]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()[:, :, None]
    G = (A_ts - A_ss.unsqueeze(3)).masked_fill(~causal, -math.inf).exp() * wc.unsqueeze(3)

    # what each chunk adds to the state it hands on (M_end[s, i]: what token s left in slot i at the
    # chunk end), and how much of the incoming state survives the chunk
    M_end = torch.zeros_like(A).scatter(-1, idc.view(B, H, N, L, top_k), G[:, :, :, -1])
    U = M_end.transpose(-1, -2) @ torch.cat([kc, vc], dim=-1)           # [B, H, N, S, K + V]

    # The hand-off between chunks, in two levels. Inside a block it is linear: a short recurrence over
    # the n chunks of a block, run for all blocks at once, gives what the block adds (Z) and keeps
    # (E) up to each chunk. Only block to block is sequential: s2s runs there.
    P, n = lay.P, lay.n
    U = U.view(B, H, P, n, S, K + V)
    keep = eA[:, :, :, -1].view(B, H, P, n, S, 1)                      # retained through each chunk
    Z, E = [torch.zeros_like(U[:, :, :, 0])], [torch.ones_like(keep[:, :, :, 0])]
    for c in range(n):
        Z.append(torch.addcmul(U[:, :, :, c], keep[:, :, :, c], Z[-1]))
        E.append(E[-1] * keep[:, :, :, c])

    events = set(lay.events)
    packed = pack_s2s(s2s, dt) if s2s is not None else None
    state = torch.cat([K0, V0], dim=-1)
    block_in, s2s_maps = [], []
    for p, (z, e) in enumerate(zip(Z[n].unbind(2), E[n].unbind(2))):
        block_in.append(state)
        state = torch.addcmul(z, e, state)
        if p in events:
            mixed = apply_s2s(state[..., K:], packed, return_maps)
            if return_maps:
                mixed, amap = mixed
                s2s_maps.append(amap)
            state = torch.cat([state[..., :K], mixed], dim=-1)
    Kc, Vc = state[..., :K], state[..., K:]
    block_in = torch.stack(block_in, dim=2).unsqueeze(3)               # [B, H, P, 1, S, K + V]
    states = torch.addcmul(torch.stack(Z[:n], 3), torch.stack(E[:n], 3), block_in)
    states = states.reshape(B, H, N, S, K + V)
    K_in, V_in = states[..., :K], states[..., K:]

    # read: scores_t,i = q_t . K_t[i] = exp(A_t,i) q_t . K_in[i] + sum_(s,j -> i) (q_t . k_s) G[t, s, j]
    qk = qc @ kc.transpose(-1, -2)                                      # [B, H, N, L(t), L(s)]
    scores = torch.zeros_like(A).scatter_add(-1, at_slot, (qk.unsqueeze(-1) * G).flatten(-2))
    scores = scores + eA * (qc @ K_in.transpose(-1, -2))
    p = torch.softmax(scale * scores, dim=-1)                           # [B, H, N, L, S]
    # o_t = sum_i p_t,i V_t[i] = (p * exp(A)) V_in + sum_s (sum_j p_t,idx_sj G[t, s, j]) v_s
    o = (p * eA) @ V_in
    p_at = p.gather(-1, at_slot).view(B, H, N, L, L, top_k)
    o = o + (p_at * G).sum(-1) @ vc
    o = lay.from_chunks(o).to(q.dtype)

    final = NSTMState(Kc, Vc, pos + T) if output_final_state else None
    if not return_maps:
        return o, final
    s2s_map = (torch.stack(s2s_maps) if s2s_maps
               else torch.zeros(0, B, H, S, S, dtype=dt, device=q.device))
    return o, final, {"indices": idx, "weights": wts, "read": lay.from_chunks(p), "s2s": s2s_map,
                      "s2s_pos": list(lay.event_pos)}
