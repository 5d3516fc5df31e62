"""The chunk-parallel NSTM forward in Triton (spec §4).

Within a chunk of tokens the slot update is linear in the state entering the chunk. With
``lw[t, i] = log(1 - w[t, i])`` (``utils.log_retain``: -FULL for a full write, w = 1) and
``lc = cumsum_t lw`` inside the chunk:

    K̂_t[i] = exp(lc[t, i]) K̂_in[i] + sum_{s <= t} w[s, i] exp(lc[t, i] - lc[s, i]) k_s     (V̂ alike)

Every exponent is a difference ``lc[t] - lc[s]`` with ``s <= t`` (<= 0), clamped to <= 0 against
rounding; nothing is divided by a cumulative product, so w = 0 and w -> 1 stay finite.

Three launches:

1. routing, the fused top-k kernel of ``routing.py`` (sparse ``idx, w [B, T, H, top_k]``);
2. ``_chunk_nstm_fwd_kernel_h``, one program per (batch, head), sequential over the chunks:
   the slot state ``[S, K]``/``[S, V]`` stays on chip in fp32; per chunk it stores the state
   entering the chunk, then jumps to the chunk end in closed form (two ``[S, L] x [L, K|V]``
   dots), then runs the state-to-state attention when the chunk ends a period;
3. ``_chunk_nstm_fwd_kernel_o``, one program per (chunk, batch, head), all in parallel: from
   the stored chunk-entry state it walks the chunk in sub-chunks of ``SUB`` = 16 tokens. Per
   sub-chunk: ``scores = exp(lc) * (q K̂_inᵀ) + sum_s D[t, s, :] (q_t . k_s)`` with the
   in-sub-chunk write-and-decay operator ``D[t, s, i] = w[s, i] exp(lc[t, i] - lc[s, i])``
   (t >= s, a ``[SUB, SUB, S]`` tile), softmax over the slots, ``o = (p * exp(lc)) V̂_in + M v``
   with ``M[t, s] = sum_i p[t, i] D[t, s, i]``, then the state moves to the next sub-chunk start
   (the closed form of pass 2). The read at token t sees the state after t's write (D includes
   s = t). Chunks never hold an s2s event inside, so this pass has none.

Chunks (``utils.layout``) are laid on absolute stream positions: a new chunk at every period start
when s2s is on (so every s2s event is a chunk end) and every ``L`` = ``chunk_length()`` tokens from
there (from absolute multiples of ``L`` without s2s). The chunk-entry states are exactly the
segment-entry states both backwards need: the chunk-parallel backward of ``chunk_bwd.py`` (the
default) and the reverse-segment backward of ``recurrent.py`` (``NSTM_TRITON_BWD=recurrent``);
``NSTMChunkFunction.backward`` (in ``ops.py``) picks one.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .device import chunk_length, pow2, sub_chunk_length, tile_warps
from .s2s import s2s_forward_tile
from .utils import (
    Layout,
    advance,
    chunk_meta,
    dense_weights,
    launch,
    log_retain,
    mm,
    on_device,
    s2s_scratch,
    s2s_scratch_size,
    slot_tiles,
    state_warps,
)


@triton.jit
def _chunk_nstm_fwd_kernel_h(k_ptr, v_ptr, idx_ptr, w_ptr, k0_ptr, v0_ptr, seg_ptr, cuc_ptr,
                             ev_ptr, bk_ptr, bv_ptr, fk_ptr, fv_ptr, wq_ptr, wk_ptr, mix_ptr,
                             scr_ptr, scr_stride, H, S, K, V, qk_scale,
                             TOP_K: tl.constexpr, HAS_S2S: tl.constexpr, EPS: tl.constexpr,
                             BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_V: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)       # (sequence n, head h): its state row is pid
    n = pid // H
    h = pid % H
    pid64 = pid.to(tl.int64)
    rs, rk, rv, smask, mk, mv, sk_off, sv_off = slot_tiles(S, K, V, BLOCK_S, BLOCK_K, BLOCK_V)
    rl = tl.arange(0, BLOCK_L)
    Ks = tl.load(k0_ptr + pid64 * S * K + sk_off, mask=mk, other=0.0).to(DT)
    Vs = tl.load(v0_ptr + pid64 * S * V + sv_off, mask=mv, other=0.0).to(DT)
    if HAS_S2S:
        mix = tl.load(mix_ptr + h).to(DT)
    c = tl.load(cuc_ptr + n)     # this sequence's chunks; a while loop (the interpreter needs it)
    c_end = tl.load(cuc_ptr + n + 1)
    while c < c_end:
        t0 = tl.load(seg_ptr + c)
        t1 = tl.load(seg_ptr + c + 1)
        bo = (c.to(tl.int64) * H + h) * S
        tl.store(bk_ptr + bo * K + sk_off, Ks.to(bk_ptr.dtype.element_ty), mask=mk)
        tl.store(bv_ptr + bo * V + sv_off, Vs.to(bv_ptr.dtype.element_ty), mask=mv)
        rmask = rl < (t1 - t0)
        tok = (t0.to(tl.int64) + rl) * H + h                            # [BLOCK_L]
        W = dense_weights(idx_ptr, w_ptr, tok, rmask, BLOCK_S, TOP_K, DT)
        lw = log_retain(W, EPS)
        lc = tl.cumsum(lw, axis=0)
        kc = tl.load(k_ptr + tok[:, None] * K + rk[None, :],
                     mask=rmask[:, None] & (rk[None, :] < K), other=0.0).to(DT)
        vc = tl.load(v_ptr + tok[:, None] * V + rv[None, :],
                     mask=rmask[:, None] & (rv[None, :] < V), other=0.0).to(DT)
        Ks, Vs = advance(Ks, Vs, W, lw, lc, kc, vc, PREC)
        if HAS_S2S:
            if tl.load(ev_ptr + c) != 0:   # the chunk's last token ends a period
                Vs = s2s_forward_tile(Vs, wq_ptr, wk_ptr, mix, h, S, V, qk_scale,
                                      scr_ptr + pid64 * scr_stride, PREC)
        c += 1
    tl.store(fk_ptr + pid64 * S * K + sk_off, Ks.to(fk_ptr.dtype.element_ty), mask=mk)
    tl.store(fv_ptr + pid64 * S * V + sv_off, Vs.to(fv_ptr.dtype.element_ty), mask=mv)


@triton.jit
def _chunk_nstm_fwd_kernel_o(q_ptr, k_ptr, v_ptr, idx_ptr, w_ptr, seg_ptr, bk_ptr, bv_ptr, o_ptr,
                             H, S, K, V, scale,
                             TOP_K: tl.constexpr, EPS: tl.constexpr, SUB: tl.constexpr,
                             BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                             DT: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)       # (chunk c, head h); a 1-D grid (dim 1 stops at 65535)
    c = pid // H
    h = pid % H
    rs, rk, rv, smask, mk, mv, sk_off, sv_off = slot_tiles(S, K, V, BLOCK_S, BLOCK_K, BLOCK_V)
    rl = tl.arange(0, SUB)
    causal = (rl[:, None] >= rl[None, :])[:, :, None]                  # [SUB(t), SUB(s), 1]
    t0 = tl.load(seg_ptr + c)
    t1 = tl.load(seg_ptr + c + 1)
    bo = pid.to(tl.int64) * S    # the chunk-entry state of (c, h)
    Ks = tl.load(bk_ptr + bo * K + sk_off, mask=mk, other=0.0).to(DT)
    Vs = tl.load(bv_ptr + bo * V + sv_off, mask=mv, other=0.0).to(DT)
    u = t0
    while u < t1:
        rmask = rl < (t1 - u)
        tok = (u.to(tl.int64) + rl) * H + h                             # [SUB]
        W = dense_weights(idx_ptr, w_ptr, tok, rmask, BLOCK_S, TOP_K, DT)
        lw = log_retain(W, EPS)
        lc = tl.cumsum(lw, axis=0)                                     # [SUB, BLOCK_S]
        elc = tl.exp(lc)
        km = rmask[:, None] & (rk[None, :] < K)
        vm = rmask[:, None] & (rv[None, :] < V)
        qc = tl.load(q_ptr + tok[:, None] * K + rk[None, :], mask=km, other=0.0).to(DT)
        kc = tl.load(k_ptr + tok[:, None] * K + rk[None, :], mask=km, other=0.0).to(DT)
        vc = tl.load(v_ptr + tok[:, None] * V + rv[None, :], mask=vm, other=0.0).to(DT)
        # in-sub-chunk write-and-decay operator D[t, s, i] (t >= s; exponent <= 0 before the exp)
        dlc = tl.minimum(lc[:, None, :] - lc[None, :, :], 0.0)
        D = tl.where(causal, tl.exp(dlc) * W[None, :, :], 0.0)         # [SUB, SUB, BLOCK_S]
        # scores_t,i = q_t . K̂_t[i]
        qK = mm(qc, tl.trans(Ks), PREC)                               # [SUB, BLOCK_S]
        qk = mm(qc, tl.trans(kc), PREC)                               # [SUB, SUB]
        sc = elc * qK + tl.sum(D * qk[:, :, None], axis=1)
        sc = tl.where(smask[None, :], sc * scale, float("-inf"))
        e = tl.exp(sc - tl.max(sc, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
        # o_t = sum_i p_t,i V̂_t[i]
        M = tl.sum(D * p[:, None, :], axis=2)                          # [SUB, SUB]
        o = mm(p * elc, Vs, PREC) + mm(M, vc, PREC)
        tl.store(o_ptr + tok[:, None] * V + rv[None, :], o.to(o_ptr.dtype.element_ty), mask=vm)
        if u + SUB < t1:   # the state at the next sub-chunk start
            Ks, Vs = advance(Ks, Vs, W, lw, lc, kc, vc, PREC)
        u += SUB


def chunk_forward(q, k, v, w, idx, k0, v0, wq, wk, mix, top_k, lay: Layout, scale, prec: str):
    """Launch the two chunk passes. ``q, k, v`` contiguous ``[B, T, H, *]`` (any float dtype; the
    sequences of ``lay`` on the flattened token axis), ``w, idx [B, T, H, top_k]`` from the routing
    kernel, ``k0, v0 [N, H, S, *]`` the entry states in the compute dtype, ``wq .. mix`` packed s2s
    weights or None, ``prec`` the dot precision of the passes.

    Returns ``(o, final K̂, final V̂ [N, H, S, *], bk [G, H, S, K], bv [G, H, S, V])``: the
    chunk-entry states (compute dtype) the output pass read.
    """
    B, T, H, K = q.shape
    V, S = v.shape[-1], k0.shape[2]
    dt, dev = w.dtype, q.device
    has_s2s = wq is not None
    G, N = lay.G, lay.N
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=dev)
    fk = torch.empty(N, H, S, K, dtype=dt, device=dev)
    fv = torch.empty(N, H, S, V, dtype=dt, device=dev)
    bk = torch.empty(G, H, S, K, dtype=dt, device=dev)
    bv = torch.empty(G, H, S, V, dtype=dt, device=dev)
    meta = chunk_meta(S, K, V, top_k, dt, prec)
    BS, BK, BV = meta["BLOCK_S"], meta["BLOCK_K"], meta["BLOCK_V"]
    L, SUB = pow2(chunk_length(), 16), sub_chunk_length()
    dummy = fk
    scr = s2s_scratch(N * H, S, V, False, dt, dev) if has_s2s else dummy
    with on_device(q):
        launch(_chunk_nstm_fwd_kernel_h, (N * H,),
            k, v, idx, w, k0, v0, lay.seg, lay.cuc, lay.ev, bk, bv, fk, fv,
            wq if has_s2s else dummy, wk if has_s2s else dummy, mix if has_s2s else dummy,
            scr, s2s_scratch_size(S, V, False), H, S, K, V, 1.0 / math.sqrt(V),
            HAS_S2S=has_s2s, BLOCK_L=L, num_warps=state_warps(BS, max(BK, BV)), **meta)
        launch(_chunk_nstm_fwd_kernel_o, (G * H,),
            q, k, v, idx, w, lay.seg, bk, bv, o, H, S, K, V, scale,
            SUB=SUB, num_warps=tile_warps(SUB * SUB * BS, dev), **meta)
    return o, fk, fv, bk, bv
