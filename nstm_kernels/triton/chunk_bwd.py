"""The chunk-parallel NSTM backward in Triton (the adjoint of ``chunk.py``'s forward).

Per chunk (tokens ``t0 .. t1 - 1``, entry state ``X_0`` stored by the forward) and per slot i, with
``lw = log(1 - w)`` (clamped as in the forward) and ``lc`` its in-chunk cumulative sum, the state
after token s is ``X_s = exp(lc_s) X_0 + sum_{r <= s} w_r exp(lc_s - lc_r) x_r``. The reads give a
direct gradient on every ``X_t`` of rank one per slot: ``G^K_t[i] = c_t[i] q_t`` (``c`` = scale x
softmax-backward of the scores) and ``G^V_t[i] = p_t[i] do_t``. The adjoint of ``X_s`` is

    A_s[i] = exp(lc_e - lc_s)[i] A_exit[i] + sum_{t >= s} exp(lc_t - lc_s)[i] G_t[i]

and the input gradients are ``dk_s = sum_i w_s[i] A^K_s[i]`` (dv alike), ``dw_s[i] = <A_s[i],
x_s - X_{s-1}[i]>`` over K and V (the exact derivative of ``(1 - w) X + w x``; nothing is divided by
``1 - w``, which may be ``eps``: ``X_{s-1}`` is formed in closed form from the sub-chunk entry
state, never recovered from ``X_s``), and ``dX_0 = exp(lc_e) A_exit + sum_t exp(lc_t) G_t``.

Three launches:

A. ``_chunk_bwd_kernel_c`` with ``LOCAL=True``, one program per (chunk, batch, head): the chunk's
   reads alone (``A_exit = 0``): stores the local entry adjoint ``sum_t exp(lc_t) G_t``;
B. ``_chunk_bwd_kernel_h``, one program per (batch, head), chunks in reverse: carries
   ``dX_entry(c) = local(c) + exp(lc_e(c)) dX_exit(c)``; at a period end it runs the s2s backward
   on ``V̂`` before the s2s (recomputed from the chunk's entry state in closed form) and adds into
   the per-(b, h) weight-gradient partials; stores ``dX_exit`` of every chunk and ``dX_0``;
C. ``_chunk_bwd_kernel_c`` with ``LOCAL=False``, one program per (chunk, batch, head): starts from
   ``A_exit = dX_exit(c)`` and walks the chunk's sub-chunks (``SUB`` = 16 tokens) in reverse,
   carrying the adjoint at the sub-chunk end; the sub-chunk entry state is recomputed from the
   chunk entry (closed form, one sub-chunk step at a time). Per sub-chunk it recomputes the reads
   (as the forward's output pass), then dq, dk, dv with ``[SUB, SUB] x [SUB, K|V]`` dots, and dw
   from ``[SUB, SUB, S]`` tiles except the one triple sum (the pairs ``r < s <= t`` of the read at
   t against the write r inside ``X_{s-1}``), which takes a loop over the sub-chunk's tokens s with
   two ``[SUB, SUB] x [SUB, S]`` dots each.

Pass A shares pass C's kernel (it recomputes the reads too); merging them would need pass B's
exit adjoints first, so the reads are recomputed twice (cheap next to the dw loop).

Every exponent is a difference of cumulative log-decays over an ordered pair (<= 0, clamped).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .device import sub_chunk_length, tile_warps
from .s2s import s2s_backward_tile
from .utils import (
    advance,
    backward_result,
    backward_setup,
    chunk_meta,
    dense_weights,
    launch,
    log_retain,
    mm,
    on_device,
    slot_tiles,
    state_warps,
)


@triton.jit
def _prefix_state(k_ptr, v_ptr, idx_ptr, w_ptr, Ks, Vs, h, H, K, V, t0, n,
                  TOP_K: tl.constexpr, EPS: tl.constexpr, BLOCK_L: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                  DT: tl.constexpr, PREC: tl.constexpr):
    """The state after the ``n`` (<= BLOCK_L) tokens from ``t0``, from the state ``Ks, Vs`` before
    them, in closed form; also the total log-decay ``[BLOCK_S]`` of those tokens."""
    rl = tl.arange(0, BLOCK_L)
    rk = tl.arange(0, BLOCK_K)
    rv = tl.arange(0, BLOCK_V)
    rmask = rl < n
    tok = (t0.to(tl.int64) + rl) * H + h
    W = dense_weights(idx_ptr, w_ptr, tok, rmask, BLOCK_S, TOP_K, DT)
    lw = log_retain(W, EPS)
    lc = tl.cumsum(lw, axis=0)
    kc = tl.load(k_ptr + tok[:, None] * K + rk[None, :],
                 mask=rmask[:, None] & (rk[None, :] < K), other=0.0).to(DT)
    vc = tl.load(v_ptr + tok[:, None] * V + rv[None, :],
                 mask=rmask[:, None] & (rv[None, :] < V), other=0.0).to(DT)
    Ks, Vs = advance(Ks, Vs, W, lw, lc, kc, vc, PREC)
    return Ks, Vs, tl.sum(lw, axis=0)


@triton.jit
def _chunk_bwd_kernel_c(q_ptr, k_ptr, v_ptr, idx_ptr, w_ptr, do_ptr, seg_ptr, bk_ptr, bv_ptr,
                        ak_ptr, av_ptr, dq_ptr, dk_ptr, dv_ptr, dw_ptr, lcs_ptr,
                        H, S, K, V, scale,
                        LOCAL: tl.constexpr, TOP_K: tl.constexpr, EPS: tl.constexpr,
                        SUB: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_V: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """``LOCAL``: store into ``ak/av [G, H, S, *]`` the adjoint of the chunk-entry state from
    the chunk's own reads. Else: read the exit adjoint from ``ak/av`` and store dq, dk, dv, dw."""
    pid = tl.program_id(0)       # (chunk c, head h)
    c = pid // H
    h = pid % H
    rs, rk, rv, smask, mk, mv, sk_off, sv_off = slot_tiles(S, K, V, BLOCK_S, BLOCK_K, BLOCK_V)
    rl = tl.arange(0, SUB)
    causal = (rl[:, None] >= rl[None, :])[:, :, None]                  # [SUB(t), SUB(s), 1]
    t0 = tl.load(seg_ptr + c)
    t1 = tl.load(seg_ptr + c + 1)
    bo = pid.to(tl.int64) * S
    K0 = tl.load(bk_ptr + bo * K + sk_off, mask=mk, other=0.0).to(DT)
    V0 = tl.load(bv_ptr + bo * V + sv_off, mask=mv, other=0.0).to(DT)
    if LOCAL:
        AK = tl.zeros([BLOCK_S, BLOCK_K], DT)
        AV = tl.zeros([BLOCK_S, BLOCK_V], DT)
    else:
        AK = tl.load(ak_ptr + bo * K + sk_off, mask=mk, other=0.0).to(DT)
        AV = tl.load(av_ptr + bo * V + sv_off, mask=mv, other=0.0).to(DT)
    j = (t1 - t0 + SUB - 1) // SUB - 1
    while j >= 0:
        u = t0 + j * SUB
        # the state entering the sub-chunk, from the chunk entry, a full sub-chunk at a time
        # ([SUB, *] tiles: a [BLOCK_L = 64, 64] step here makes ptxas fall back to 32 registers)
        Ks = K0
        Vs = V0
        m = t0
        while m < u:
            Ks, Vs, _ = _prefix_state(k_ptr, v_ptr, idx_ptr, w_ptr, Ks, Vs, h, H, K, V, m,
                                      SUB, TOP_K, EPS, SUB, BLOCK_S, BLOCK_K, BLOCK_V, DT, PREC)
            m += SUB
        rmask = rl < (t1 - u)
        tok = (u.to(tl.int64) + rl) * H + h                             # [SUB]
        W = dense_weights(idx_ptr, w_ptr, tok, rmask, BLOCK_S, TOP_K, DT)
        lw = log_retain(W, EPS)
        lc = tl.cumsum(lw, axis=0)                                     # [SUB, BLOCK_S]
        lend = tl.sum(lw, axis=0)
        elc = tl.exp(lc)
        km = rmask[:, None] & (rk[None, :] < K)
        vm = rmask[:, None] & (rv[None, :] < V)
        qc = tl.load(q_ptr + tok[:, None] * K + rk[None, :], mask=km, other=0.0).to(DT)
        kc = tl.load(k_ptr + tok[:, None] * K + rk[None, :], mask=km, other=0.0).to(DT)
        vc = tl.load(v_ptr + tok[:, None] * V + rv[None, :], mask=vm, other=0.0).to(DT)
        doc = tl.load(do_ptr + tok[:, None] * V + rv[None, :], mask=vm, other=0.0).to(DT)
        E = tl.where(causal, tl.exp(tl.minimum(lc[:, None, :] - lc[None, :, :], 0.0)), 0.0)
        D = E * W[None, :, :]                                          # [SUB, SUB, BLOCK_S]
        # recompute the reads
        qY = mm(qc, tl.trans(Ks), PREC)                               # q_t . K̂_0[i]
        qk = mm(qc, tl.trans(kc), PREC)                               # q_t . k_s
        sc = elc * qY + tl.sum(D * qk[:, :, None], axis=1)
        sc = tl.where(smask[None, :], sc * scale, float("-inf"))
        e = tl.exp(sc - tl.max(sc, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
        p = tl.where(rmask[:, None], p, 0.0)
        # softmax backward: dp_t[i] = do_t . V̂_t[i]
        dY = mm(doc, tl.trans(Vs), PREC)                              # do_t . V̂_0[i]
        dov = mm(doc, tl.trans(vc), PREC)                             # do_t . v_s
        dp = elc * dY + tl.sum(D * dov[:, :, None], axis=1)
        cg = p * (dp - tl.sum(p * dp, axis=1)[:, None]) * scale        # [SUB, BLOCK_S]
        if not LOCAL:
            Mc = tl.sum(D * cg[:, None, :], axis=2)                    # [SUB(t), SUB(s)]
            Mp = tl.sum(D * p[:, None, :], axis=2)
            dq = mm(cg * elc, Ks, PREC) + mm(Mc, kc, PREC)
            ef = tl.exp(tl.minimum(lend[None, :] - lc, 0.0))           # exp(lc_e - lc_s)
            Wf = W * ef
            dk = mm(Wf, AK, PREC) + mm(tl.trans(Mc), qc, PREC)
            dv = mm(Wf, AV, PREC) + mm(tl.trans(Mp), doc, PREC)
            # dw_s[i] = <A_s[i], x_s - X_{s-1}[i]> (K and V)
            xA = mm(kc, tl.trans(AK), PREC) + mm(vc, tl.trans(AV), PREC)   # x_s . A_exit[i]
            ab0 = tl.sum(AK * Ks, axis=1) + tl.sum(AV * Vs, axis=1)         # A_exit[i] . X_0[i]
            lcx = lc - lw                                              # exclusive cumsum
            # Dx[s, r, i] = [r < s] w_r[i] exp(lcx_s[i] - lc_r[i]): X_{s-1} from the sub-chunk
            Dx = tl.where(rl[None, :, None] < rl[:, None, None],
                          W[None, :, :] * tl.exp(tl.minimum(lcx[:, None, :] - lc[None, :, :],
                                                            0.0)), 0.0)
            ex = tl.exp(tl.minimum(lcx, 0.0))
            # exit adjoint part: exp(lc_e - lc_s) A[i] . (x_s - X_{s-1}[i])
            dW = ef * (xA - ex * ab0[None, :] - tl.sum(Dx * xA[None, :, :], axis=1))
            # reads part, sum_{t >= s} E[t, s, i] (c_t[i] q_t + p_t[i] do_t) . (x_s - X_{s-1}[i]),
            # all but the pairs r < s <= t inside X_{s-1}: those take the loop below
            dW += tl.sum(E * (cg[:, None, :] * qk[:, :, None] + p[:, None, :] * dov[:, :, None]),
                         axis=0)
            dW -= ex * tl.sum(E * (cg * qY + p * dY)[:, None, :], axis=0)
            # the rows lc_s go through a per-program scratch (a row of a register tile is a
            # masked reduction; nested jit calls cost the interpreter a re-patch: inlined)
            scr = lcs_ptr + tl.program_id(0).to(tl.int64) * SUB * BLOCK_S
            tl.store(scr + rl[:, None] * BLOCK_S + rs[None, :], lc)
            tl.debug_barrier()
            lcx_s = tl.zeros([BLOCK_S], DT)
            s = tl.zeros([], tl.int32)
            while s < t1 - u:   # the sub-chunk's tokens (fewer than SUB at a ragged end)
                lc_s = tl.load(scr + s * BLOCK_S + rs)
                Dp = tl.where(rl[:, None] < s,
                              W * tl.exp(tl.minimum(lcx_s[None, :] - lc, 0.0)), 0.0)   # [r, i]
                Es = tl.where(rl[:, None] >= s,
                              tl.exp(tl.minimum(lc - lc_s[None, :], 0.0)), 0.0)       # [t, i]
                if qk.dtype == tl.float64:   # as _mm: fp64 through a broadcast product
                    qkD = tl.sum(qk[:, :, None] * Dp[None, :, :], axis=1)
                    dovD = tl.sum(dov[:, :, None] * Dp[None, :, :], axis=1)
                else:
                    qkD = tl.dot(qk, Dp, input_precision=PREC)
                    dovD = tl.dot(dov, Dp, input_precision=PREC)
                g = tl.sum(Es * (cg * qkD + p * dovD), axis=0)
                dW = tl.where(rl[:, None] == s, dW - g[None, :], dW)
                lcx_s = lc_s
                s += 1
            tl.debug_barrier()   # the scratch rows are read before the next sub-chunk's store
            tl.store(dq_ptr + tok[:, None] * K + rk[None, :], dq.to(dq_ptr.dtype.element_ty),
                     mask=km)
            tl.store(dk_ptr + tok[:, None] * K + rk[None, :], dk.to(dk_ptr.dtype.element_ty),
                     mask=km)
            tl.store(dv_ptr + tok[:, None] * V + rv[None, :], dv.to(dv_ptr.dtype.element_ty),
                     mask=vm)
            for jj in range(TOP_K):   # back to the sparse layout of the routing
                ij = tl.load(idx_ptr + tok * TOP_K + jj, mask=rmask, other=0).to(tl.int32)
                val = tl.sum(tl.where(rs[None, :] == ij[:, None], dW, 0.0), axis=1)
                tl.store(dw_ptr + tok * TOP_K + jj, val.to(dw_ptr.dtype.element_ty), mask=rmask)
        # the adjoint at the sub-chunk start
        keep = tl.exp(lend)[:, None]
        AK = keep * AK + mm(tl.trans(cg * elc), qc, PREC)
        AV = keep * AV + mm(tl.trans(p * elc), doc, PREC)
        j -= 1
    if LOCAL:
        tl.store(ak_ptr + bo * K + sk_off, AK.to(ak_ptr.dtype.element_ty), mask=mk)
        tl.store(av_ptr + bo * V + sv_off, AV.to(av_ptr.dtype.element_ty), mask=mv)


@triton.jit
def _chunk_bwd_kernel_h(k_ptr, v_ptr, idx_ptr, w_ptr, seg_ptr, cuc_ptr, ev_ptr, bk_ptr, bv_ptr,
                        dkf_ptr, dvf_ptr, ak_ptr, av_ptr, dk0_ptr, dv0_ptr, wq_ptr, wk_ptr, mix_ptr,
                        dwq_ptr, dwk_ptr, dmix_ptr, scr_ptr, scr_stride,
                        H, S, K, V, qk_scale,
                        TOP_K: tl.constexpr, HAS_S2S: tl.constexpr, EPS: tl.constexpr,
                        SUB: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_V: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Reads the local entry adjoints from ``ak/av`` and overwrites them, chunk by chunk in
    reverse, with the exit adjoints (the gradient wrt the state after the chunk's last token,
    before any s2s)."""
    pid = tl.program_id(0)       # (sequence n, head h)
    n = pid // H
    h = pid % H
    pid64 = pid.to(tl.int64)
    rs, rk, rv, smask, mk, mv, sk_off, sv_off = slot_tiles(S, K, V, BLOCK_S, BLOCK_K, BLOCK_V)
    rl = tl.arange(0, SUB)
    dK = tl.load(dkf_ptr + pid64 * S * K + sk_off, mask=mk, other=0.0).to(DT)
    dV = tl.load(dvf_ptr + pid64 * S * V + sv_off, mask=mv, other=0.0).to(DT)
    dmix = tl.zeros([1], DT)
    mix = tl.zeros([], DT)
    if HAS_S2S:
        mix = tl.load(mix_ptr + h).to(DT)
    c_first = tl.load(cuc_ptr + n)
    c = tl.load(cuc_ptr + n + 1) - 1
    while c >= c_first:
        t0 = tl.load(seg_ptr + c)
        t1 = tl.load(seg_ptr + c + 1)
        bo = (c.to(tl.int64) * H + h) * S
        # the chunk's total log-decay, SUB tokens at a time
        ltot = tl.zeros([BLOCK_S], DT)
        m = t0
        while m < t1:
            tok = (m.to(tl.int64) + rl) * H + h
            W = dense_weights(idx_ptr, w_ptr, tok, rl < (t1 - m), BLOCK_S, TOP_K, DT)
            ltot += tl.sum(log_retain(W, EPS), axis=0)
            m += SUB
        if HAS_S2S:
            if tl.load(ev_ptr + c) != 0:   # the chunk's last token ends a period
                # V̂ before the s2s: the chunk's exit state from its entry state, SUB tokens at
                # a time (as in pass C)
                Ks = tl.load(bk_ptr + bo * K + sk_off, mask=mk, other=0.0).to(DT)
                Vs = tl.load(bv_ptr + bo * V + sv_off, mask=mv, other=0.0).to(DT)
                m = t0
                while m < t1:
                    Ks, Vs, _ = _prefix_state(k_ptr, v_ptr, idx_ptr, w_ptr, Ks, Vs, h, H,
                                              K, V, m, tl.minimum(t1 - m, SUB), TOP_K, EPS, SUB,
                                              BLOCK_S, BLOCK_K, BLOCK_V, DT, PREC)
                    m += SUB
                dV, dm = s2s_backward_tile(Vs, dV, wq_ptr, wk_ptr, mix, h, S, V,
                                           qk_scale, dwq_ptr + pid64 * V * V,
                                           dwk_ptr + pid64 * V * V,
                                           scr_ptr + pid64 * scr_stride, PREC)
                dmix += dm
        lK = tl.load(ak_ptr + bo * K + sk_off, mask=mk, other=0.0).to(DT)
        lV = tl.load(av_ptr + bo * V + sv_off, mask=mv, other=0.0).to(DT)
        tl.debug_barrier()   # every thread has read the local adjoint before it is overwritten
        tl.store(ak_ptr + bo * K + sk_off, dK.to(ak_ptr.dtype.element_ty), mask=mk)
        tl.store(av_ptr + bo * V + sv_off, dV.to(av_ptr.dtype.element_ty), mask=mv)
        keep = tl.exp(ltot)[:, None]
        dK = lK + keep * dK
        dV = lV + keep * dV
        c -= 1
    tl.store(dk0_ptr + pid64 * S * K + sk_off, dK.to(dk0_ptr.dtype.element_ty), mask=mk)
    tl.store(dv0_ptr + pid64 * S * V + sv_off, dV.to(dv0_ptr.dtype.element_ty), mask=mv)
    if HAS_S2S:
        tl.store(dmix_ptr + pid64 + tl.arange(0, 1), dmix.to(dmix_ptr.dtype.element_ty))


def chunk_backward(ctx, do, dkf, dvf):
    """``NSTMChunkFunction.backward`` (``ops.py``) on the chunk-parallel kernels: same saved
    tensors and the same return tuple as ``recurrent.recurrent_backward``."""
    g = backward_setup(ctx, do, dkf, dvf)
    H, S, K, V, dt, dev, lay = g.H, g.S, g.K, g.V, g.dt, g.dev, g.lay
    G, N = lay.G, lay.N
    ak = torch.empty(G, H, S, K, dtype=dt, device=dev)   # local entry, then exit adjoints
    av = torch.empty(G, H, S, V, dtype=dt, device=dev)
    meta = chunk_meta(S, K, V, g.top_k, dt, g.chunk_prec)
    BS, BK, BV = meta["BLOCK_S"], meta["BLOCK_K"], meta["BLOCK_V"]
    SUB = sub_chunk_length()
    lcs = torch.empty(G * H * SUB * BS, dtype=dt, device=dev)   # pass C's row scratch
    warps_c = tile_warps(max(SUB * SUB * BS, BS * max(BK, BV)), dev)
    pass_c_args = (g.q, g.k, g.v, g.idx, g.w, g.do, lay.seg, g.bk, g.bv, ak, av, g.dq, g.dk, g.dv,
                   g.dw, lcs, H, S, K, V, g.scale)
    with on_device(g.q):
        # A: each chunk's own pull on its entry state
        launch(_chunk_bwd_kernel_c, (G * H,), *pass_c_args, LOCAL=True, SUB=SUB, num_warps=warps_c, **meta)
        # B: carry the state adjoint through each sequence's chunks in reverse (s2s backward at
        # period ends)
        launch(_chunk_bwd_kernel_h, (N * H,),
            g.k, g.v, g.idx, g.w, lay.seg, lay.cuc, lay.ev, g.bk, g.bv, g.dkf, g.dvf, ak, av,
            g.dk0, g.dv0, *g.s2s_args, *g.dws, g.dmix, g.scr, g.scr_stride, H, S, K, V,
            1.0 / math.sqrt(V),
            HAS_S2S=g.has_s2s, SUB=SUB, num_warps=state_warps(BS, max(BK, BV)), **meta)
        # C: dq, dk, dv, dw from the exit adjoints
        launch(_chunk_bwd_kernel_c, (G * H,), *pass_c_args, LOCAL=False, SUB=SUB, num_warps=warps_c, **meta)
    return backward_result(g)
