"""The chunk-parallel NSTM in PyTorch (spec §4): the default on CPU and the fallback everywhere.

Within a chunk the slot update is linear in the state, so everything that does not depend on the
state entering the chunk is computed for all chunks at once:

    K_t[i] = exp(A_t,i) K_0[i] + sum_{s<=t} w_s,i exp(A_t,i - A_s,i) k_s,      A = cumsum log(1 - w)

(the same for V). Decays are pairwise differences of in-chunk cumulative log-retains, masked to
s <= t *before* the exp, so nothing is ever divided by a cumulative product and w = 0 or w -> 1 stay
finite. A write with w = 1 exactly (``routing.log_retain``'s ``full``) cuts every decay across it
to exactly 0, so it replaces the slot as the token-by-token form does; the masks are applied
before any product, so a NaN at token s never reaches an output before s. Only the hand-off of
the slot state from one chunk to the next is sequential; the state-to-state attention runs
there, at every period end. Chunks are laid out on absolute stream positions (``ChunkLayout``),
so that every period end (tau + 1) % C == 0 falls on a block end; padding tokens write nothing
(w = 0) and their outputs are dropped.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from ..routing import dense_weights, log_retain, route_torch
from ..s2s import apply_s2s, pack_s2s
from ..state import NSTMState, S2SParams, initial_slots
from ..utils import compute_dtype
from ..varlen import final_pos, flatten, needs_segments, segments

DEFAULT_CHUNK = 16


# without s2s there are no periods; chunks are grouped in blocks of this many for the hand-off
BLOCK_CHUNKS = 8


class ChunkLayout:
    """Where each token sits in the padded sequence of ``P`` blocks of ``n`` chunks of ``L`` tokens.

    The time axis holds one or more *segments* (independent streams end to end: a packed batch,
    or the rows of a batch with per-row positions), each ``(start, length, pos)``. With s2s,
    chunks are laid on each segment's absolute positions: ``L = min(chunk, C)``, a period of C
    tokens is ``ceil(C / L)`` chunks (its last one may be short: padded), and blocks of
    ``n <= BLOCK_CHUNKS`` chunks start at period starts, so that every period end
    (tau + 1) % C == 0 ends a block. Without s2s a block is ``n`` consecutive chunks. Every segment
    starts a new block. Only blocks that hold tokens exist: the padding is at most one block per
    period plus one at each segment's ends, so memory and time are O(T) for any C and any spread
    of the segment lengths.

    pidx:      ``[T]`` index of token t in the padded sequence of ``P * n * L`` tokens
    events:    blocks whose end is a period end ((tau + 1) % C == 0 for a real token)
    event_pos: the absolute position tau of the token that ends each of those periods
    first:     ``{block: segment}`` for the first block of each segment (the state is reset there)
    last:      ``{block: segment}`` for the last block of each segment (its final state)
    """

    def __init__(self, T: int, pos, comm_every: int, has_s2s: bool, chunk: int, device,
                 segments: Optional[List[tuple]] = None):
        self.events: List[int] = []
        self.event_pos: List[int] = []
        self.first, self.last = {}, {}
        segs = [(0, T, int(pos))] if segments is None else segments
        if has_s2s:
            C = comm_every
            L = min(chunk, C)
            per_period = -(-C // L)                       # chunks per period
            n = min(BLOCK_CHUNKS, per_period)             # chunks per block
            bpp = -(-per_period // n)                     # blocks per period
        else:
            L = min(chunk, max(length for _, length, _ in segs))
            n = min(BLOCK_CHUNKS, math.ceil(max(length for _, length, _ in segs) / L))
        parts, offset = [], 0                             # offset: blocks before this segment
        for i, (_, length, p0) in enumerate(segs):
            tau = torch.arange(p0, p0 + length)
            if has_s2s:
                def block_of(t):                          # block index of absolute position t
                    return (t // C) * bpp + ((t % C) // L) // n

                blk = block_of(tau)
                b0 = int(blk[0])
                local = ((blk - b0) * n + ((tau % C) // L) % n) * L + (tau % C) % L
                for end_tau in range(p0 + (C - 1 - p0 % C), p0 + length, C):   # period ends inside
                    self.events.append(offset + block_of(end_tau) - b0)
                    self.event_pos.append(end_tau)
            else:
                local = tau - p0
            blocks = int(local[-1]) // (n * L) + 1
            parts.append(local + offset * n * L)
            self.first[offset] = i
            self.last[offset + blocks - 1] = i
            offset += blocks
        pidx = torch.cat(parts)
        self.L, self.n = L, n
        self.P = offset
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
               return_maps: bool = False, chunk_size: int = DEFAULT_CHUNK, cu_seqlens=None):
    """Chunk-parallel NSTM; same signature and results as ``naive_recurrent_nstm``.

    A packed batch (``cu_seqlens``) or per-row positions (an int64 tensor ``initial_state.pos``)
    run as segments of one chunk layout: every sequence starts from its own initial state row at
    its own position, with no Python loop over the sequences."""
    if needs_segments(initial_state, cu_seqlens):
        if return_maps:
            raise ValueError("return_maps is not available for packed batches (cu_seqlens) or "
                             "per-row positions; call each sequence on its own for its maps")
        return _chunk_segments(q, k, v, route_logits, write_gate, top_k, s2s, comm_every,
                               initial_state, output_final_state, scale, chunk_size, cu_seqlens)
    B, T, H, K = q.shape
    V, S = v.shape[-1], route_logits.shape[-1]
    K0, V0, pos = initial_slots(initial_state, B, H, S, K, V, compute_dtype(q.dtype), q.device)
    o, finals, maps = _chunk_core(q, k, v, route_logits, write_gate, top_k, s2s, comm_every,
                                  [torch.cat([K0, V0], dim=-1)], [(0, T, pos)], scale, return_maps,
                                  chunk_size)
    final = NSTMState(finals[0][..., :K], finals[0][..., K:], pos + T) if output_final_state else None
    return (o, final) if not return_maps else (o, final, maps)


def _chunk_segments(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, initial_state,
                    output_final_state, scale, chunk_size, cu_seqlens):
    B, T, H, K = q.shape
    V, S = v.shape[-1], route_logits.shape[-1]
    seg = segments(B, T, initial_state, cu_seqlens)
    xs = (q, k, v, route_logits, write_gate)
    if not seg.packed:
        xs = tuple(flatten(x) for x in xs)
    rows = len(seg.starts)
    K0, V0, _ = initial_slots(None if initial_state is None else NSTMState(*initial_state[:2], 0),
                              rows, H, S, K, V, compute_dtype(q.dtype), q.device)
    init = list(torch.cat([K0, V0], dim=-1).split(1))
    o, finals, _ = _chunk_core(*xs, top_k, s2s, comm_every, init,
                               list(zip(seg.starts, seg.lengths, seg.pos)), scale, False, chunk_size)
    if not seg.packed:
        o = o.reshape(B, T, *o.shape[2:])
    final = None
    if output_final_state:
        st = torch.cat(finals)
        final = NSTMState(st[..., :K], st[..., K:],
                          final_pos(seg, None if initial_state is None else initial_state.pos))
    return o, final


def _chunk_core(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, init, segs, scale,
                return_maps, chunk_size):
    """The chunk-parallel operator over the segments ``segs`` of the time axis, each starting from
    its entry of ``init`` (``[B, H, S, K + V]``); returns ``(o, per-segment final states, maps)``."""
    B, T, H, K = q.shape
    V, S = v.shape[-1], route_logits.shape[-1]
    dt = compute_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    idx, wts = route_torch(route_logits, write_gate, top_k, dtype=dt)
    lay = ChunkLayout(T, 0, comm_every, s2s is not None, chunk_size, q.device, segments=segs)
    L, N = lay.L, lay.N

    # routing in chunks; padding tokens route to slot 0 with weight 0, i.e. write nothing
    idc = lay.to_chunks(idx).reshape(B, H, N, L * top_k)                # slot of each (s, j)
    wc = lay.to_chunks(wts)                                             # [B, H, N, L, top_k]
    qc, kc, vc = (lay.to_chunks(x.to(dt)) for x in (q, k, v))
    lw, full = log_retain(lay.to_chunks(dense_weights(idx, wts, S)))
    A = lw.cumsum(dim=3)                                                # [B, H, N, L, S]
    Z = full.to(torch.int32).cumsum(dim=3)                              # full writes so far
    eA = torch.where(Z == 0, A.exp(), 0.0)                              # the entry state's share
    # The in-chunk write-and-decay operator, kept sparse: token s writes only its top_k slots, so
    # G[t, s, j] = w_s,j exp(A_t,i - A_s,i) with i = idx_s,j, for s <= t (masked before the exp).
    at_slot = idc.unsqueeze(3).expand(B, H, N, L, L * top_k)
    A_ts = A.gather(-1, at_slot).view(B, H, N, L, L, top_k)            # A_t at the slot s wrote
    A_ss = A_ts.diagonal(dim1=3, dim2=4).permute(0, 1, 2, 4, 3)         # A_s at that slot [.., L(s), k]
    Z_ts = Z.gather(-1, at_slot).view(B, H, N, L, L, top_k)
    Z_ss = Z_ts.diagonal(dim1=3, dim2=4).permute(0, 1, 2, 4, 3)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()[:, :, None]
    # s <= t and no full write in (s, t]; masked before the exp and the product with w (a NaN at a
    # later token s must not reach an earlier t through 0 * NaN)
    live = causal & (Z_ts == Z_ss.unsqueeze(3))
    diff = torch.where(live, A_ts - A_ss.unsqueeze(3), 0.0)
    G = torch.where(live, diff.exp() * wc.unsqueeze(3), 0.0)

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
    finals = list(init)
    block_in, s2s_maps = [], []
    state = None
    for p, (z, e) in enumerate(zip(Z[n].unbind(2), E[n].unbind(2))):
        if p in lay.first:                              # a segment starts: its own entry state
            state = init[lay.first[p]]
        block_in.append(state)
        state = torch.addcmul(z, e, state)
        if p in events:
            mixed = apply_s2s(state[..., K:], packed, return_maps)
            if return_maps:
                mixed, amap = mixed
                s2s_maps.append(amap)
            state = torch.cat([state[..., :K], mixed], dim=-1)
        if p in lay.last:
            finals[lay.last[p]] = state
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
    if not return_maps:
        return o, finals, None
    s2s_map = (torch.stack(s2s_maps) if s2s_maps
               else torch.zeros(0, B, H, S, S, dtype=dt, device=q.device))
    return o, finals, {"indices": idx, "weights": wts, "read": lay.from_chunks(p), "s2s": s2s_map,
                       "s2s_pos": list(lay.event_pos)}
