"""The NSTM sequence operator in Triton: fused recurrent forward and reverse-time backward.

Routing runs first, as one fused kernel over all tokens (``routing.py``); its autograd Function
turns the gradient wrt the write weights into gradients wrt the logits and the write gate.

Forward (``_nstm_fwd_kernel``), one program per (sequence, head): the slot state ``K̂ [S, K]`` and
``V̂ [S, V]`` stays in registers while the program walks through time; each token writes its
``top_k`` routed slots (the others are selected unchanged), reads with a softmax over all slots,
and the state-to-state attention runs at period ends (absolute position ``pos + t``). Time is cut
into *segments*: a new segment starts at every period start (so that every s2s event is the last
token of a segment) and at least every ``segment_length()`` tokens (``utils.layout``). The
state entering every segment is stored for the backward.

Backward (``_nstm_bwd_kernel``), one program per (sequence, head), segments in reverse: reload the
segment's entry state, rerun the segment forward while saving, for every token, the old contents
of the rows it overwrites (``top_k`` rows per token, in a per-program scratch buffer), backprop
through the s2s event at the segment end, then walk the segment backwards in time: read gradients
with the state after the token, then restore the state before the token by putting the saved rows
back (exact: no division by 1 - w, so w -> 1 stays finite), then the write gradients.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .s2s import s2s_backward_tile, s2s_forward_tile
from .utils import (
    backward_result,
    backward_setup,
    convex_write,
    keep_for_backward,
    launch,
    on_device,
    read_probs,
    recurrent_meta,
    s2s_scratch,
    s2s_scratch_size,
    slot_tiles,
)


@triton.jit
def _token_routing(idx_ptr, w_ptr, tok, rs, TOP_K: tl.constexpr, BLOCK_TK: tl.constexpr):
    """One token's routing, dense over the slots: ``hit [BLOCK_S, BLOCK_TK]`` (slot i is the
    token's j-th routed slot), the write weight ``wd [BLOCK_S]`` (0 off-route) and the rows to
    touch ``routed = wd > 0`` (a row with w = 0 is left as it is either way)."""
    kk = tl.arange(0, BLOCK_TK)
    kmask = kk < TOP_K
    idx = tl.load(idx_ptr + tok * TOP_K + kk, mask=kmask, other=0).to(tl.int32)
    wj = tl.load(w_ptr + tok * TOP_K + kk, mask=kmask, other=0.0)
    hit = (rs[:, None] == idx[None, :]) & kmask[None, :]
    wd = tl.sum(tl.where(hit, wj[None, :], 0.0), axis=1)
    return hit, wd, wd > 0


@triton.jit
def _nstm_fwd_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, w_ptr, k0_ptr, v0_ptr, seg_ptr, cuc_ptr,
                     ev_ptr, o_ptr, bk_ptr, bv_ptr, fk_ptr, fv_ptr, wq_ptr, wk_ptr, mix_ptr,
                     scr_ptr, scr_stride, H, S, K, V, scale, qk_scale,
                     TOP_K: tl.constexpr, HAS_INIT: tl.constexpr, HAS_S2S: tl.constexpr,
                     STORE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_TK: tl.constexpr, DT: tl.constexpr,
                     PREC: tl.constexpr):
    pid = tl.program_id(0)       # (sequence n, head h): its state row is pid
    n = pid // H
    h = pid % H
    pid64 = pid.to(tl.int64)
    rs, rk, rv, smask, mk, mv, sk_off, sv_off = slot_tiles(S, K, V, BLOCK_S, BLOCK_K, BLOCK_V)
    if HAS_INIT:
        Ks = tl.load(k0_ptr + pid64 * S * K + sk_off, mask=mk, other=0.0).to(DT)
        Vs = tl.load(v0_ptr + pid64 * S * V + sv_off, mask=mv, other=0.0).to(DT)
    else:
        Ks = tl.zeros([BLOCK_S, BLOCK_K], DT)
        Vs = tl.zeros([BLOCK_S, BLOCK_V], DT)
    if HAS_S2S:
        mix = tl.load(mix_ptr + h).to(DT)
    # runtime loops are written as while loops: the interpreter (numpy 2) cannot take range() of
    # a runtime scalar; on a GPU both lower to the same scf loops
    sg = tl.load(cuc_ptr + n)    # this sequence's segments (a tensor: loop-carried)
    sg_end = tl.load(cuc_ptr + n + 1)
    while sg < sg_end:
        t0 = tl.load(seg_ptr + sg)
        t1 = tl.load(seg_ptr + sg + 1)
        if STORE:
            bo = (sg.to(tl.int64) * H + h) * S
            tl.store(bk_ptr + bo * K + sk_off, Ks.to(bk_ptr.dtype.element_ty), mask=mk)
            tl.store(bv_ptr + bo * V + sv_off, Vs.to(bv_ptr.dtype.element_ty), mask=mv)
        t = t0
        while t < t1:
            tok = t.to(tl.int64) * H + h
            hit, wd, routed = _token_routing(idx_ptr, w_ptr, tok, rs, TOP_K, BLOCK_TK)
            qt = tl.load(q_ptr + tok * K + rk, mask=rk < K, other=0.0).to(DT)
            kt = tl.load(k_ptr + tok * K + rk, mask=rk < K, other=0.0).to(DT)
            vt = tl.load(v_ptr + tok * V + rv, mask=rv < V, other=0.0).to(DT)
            wc = wd[:, None].to(DT)
            Ks, Vs = convex_write(Ks, Vs, routed, wc, kt, vt)
            # read: p = softmax over the slots of scale * K q
            p = read_probs(Ks, qt, smask, scale)
            o = tl.sum(p[:, None] * Vs, axis=0)
            tl.store(o_ptr + tok * V + rv, o.to(o_ptr.dtype.element_ty), mask=rv < V)
            t += 1
        if HAS_S2S:
            if tl.load(ev_ptr + sg) != 0:   # the segment's last token ends a period
                Vs = s2s_forward_tile(Vs, wq_ptr, wk_ptr, mix, h, S, V, qk_scale,
                                      scr_ptr + pid64 * scr_stride, PREC)
        sg += 1
    tl.store(fk_ptr + pid64 * S * K + sk_off, Ks.to(fk_ptr.dtype.element_ty), mask=mk)
    tl.store(fv_ptr + pid64 * S * V + sv_off, Vs.to(fv_ptr.dtype.element_ty), mask=mv)


@triton.jit
def _nstm_bwd_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, w_ptr, do_ptr, seg_ptr, cuc_ptr, ev_ptr,
                     bk_ptr, bv_ptr, dkf_ptr, dvf_ptr, sck_ptr, scv_ptr, wq_ptr, wk_ptr, mix_ptr,
                     dq_ptr, dk_ptr, dv_ptr, dw_ptr, dk0_ptr, dv0_ptr,
                     dwq_ptr, dwk_ptr, dmix_ptr, scr_ptr, scr_stride,
                     H, S, K, V, LMAX, scale, qk_scale,
                     TOP_K: tl.constexpr, HAS_S2S: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_TK: tl.constexpr, DT: tl.constexpr,
                     PREC: tl.constexpr):
    pid = tl.program_id(0)       # (sequence n, head h)
    n = pid // H
    h = pid % H
    pid64 = pid.to(tl.int64)
    rs, rk, rv, smask, mk, mv, sk_off, sv_off = slot_tiles(S, K, V, BLOCK_S, BLOCK_K, BLOCK_V)
    # gradients wrt the state after the last token
    dK = tl.load(dkf_ptr + pid64 * S * K + sk_off, mask=mk, other=0.0).to(DT)
    dV = tl.load(dvf_ptr + pid64 * S * V + sv_off, mask=mv, other=0.0).to(DT)
    sck = sck_ptr + pid64 * LMAX * TOP_K * K
    scv = scv_ptr + pid64 * LMAX * TOP_K * V
    dmix = tl.zeros([1], DT)
    mix = tl.zeros([1], DT)
    if HAS_S2S:
        mix = tl.load(mix_ptr + h).to(DT)
    sg_first = tl.load(cuc_ptr + n)
    sg = tl.load(cuc_ptr + n + 1) - 1
    while sg >= sg_first:
        t0 = tl.load(seg_ptr + sg)
        t1 = tl.load(seg_ptr + sg + 1)
        bo = (sg.to(tl.int64) * H + h) * S
        Ks = tl.load(bk_ptr + bo * K + sk_off, mask=mk, other=0.0).to(DT)
        Vs = tl.load(bv_ptr + bo * V + sv_off, mask=mv, other=0.0).to(DT)
        tl.debug_barrier()  # the previous segment's scratch reads are done before it is rewritten
        # rerun the segment, saving the rows each token overwrites
        t = t0
        while t < t1:
            tok = t.to(tl.int64) * H + h
            hit, wd, routed = _token_routing(idx_ptr, w_ptr, tok, rs, TOP_K, BLOCK_TK)
            # scratch row of (token, j) for each routed slot
            row = (t - t0) * TOP_K + tl.sum(tl.where(hit, tl.arange(0, BLOCK_TK)[None, :], 0), axis=1)
            tl.store(sck + row[:, None] * K + rk[None, :], Ks, mask=mk & routed[:, None])
            tl.store(scv + row[:, None] * V + rv[None, :], Vs, mask=mv & routed[:, None])
            kt = tl.load(k_ptr + tok * K + rk, mask=rk < K, other=0.0).to(DT)
            vt = tl.load(v_ptr + tok * V + rv, mask=rv < V, other=0.0).to(DT)
            wc = wd[:, None].to(DT)
            Ks, Vs = convex_write(Ks, Vs, routed, wc, kt, vt)
            t += 1
        if HAS_S2S:
            if tl.load(ev_ptr + sg) != 0:
                dV, dm = s2s_backward_tile(Vs, dV, wq_ptr, wk_ptr, mix, h, S, V,
                                           qk_scale, dwq_ptr + pid64 * V * V,
                                           dwk_ptr + pid64 * V * V,
                                           scr_ptr + pid64 * scr_stride, PREC)
                dmix += dm
        tl.debug_barrier()  # the scratch rows stored above are visible to every thread
        t = t1 - 1
        while t >= t0:
            tok = t.to(tl.int64) * H + h
            hit, wd, routed = _token_routing(idx_ptr, w_ptr, tok, rs, TOP_K, BLOCK_TK)
            qt = tl.load(q_ptr + tok * K + rk, mask=rk < K, other=0.0).to(DT)
            kt = tl.load(k_ptr + tok * K + rk, mask=rk < K, other=0.0).to(DT)
            vt = tl.load(v_ptr + tok * V + rv, mask=rv < V, other=0.0).to(DT)
            dot_ = tl.load(do_ptr + tok * V + rv, mask=rv < V, other=0.0).to(DT)
            # read: o = sum_i p_i V_i, p = softmax(scale K q)
            p = read_probs(Ks, qt, smask, scale)
            dp = tl.sum(Vs * dot_[None, :], axis=1)
            ds = p * (dp - tl.sum(p * dp, axis=0))
            dq = tl.sum(ds[:, None] * Ks, axis=0) * scale
            dK += (ds * scale)[:, None] * qt[None, :]
            dV += p[:, None] * dot_[None, :]
            # the state before the token: the saved rows put back
            row = (t - t0) * TOP_K + tl.sum(tl.where(hit, tl.arange(0, BLOCK_TK)[None, :], 0), axis=1)
            Kp = tl.load(sck + row[:, None] * K + rk[None, :], mask=mk & routed[:, None], other=0.0)
            Vp = tl.load(scv + row[:, None] * V + rv[None, :], mask=mv & routed[:, None], other=0.0)
            Kp = tl.where(routed[:, None], Kp.to(DT), Ks)
            Vp = tl.where(routed[:, None], Vp.to(DT), Vs)
            # write: X_new = (1 - w) X_old + w x
            dwd = tl.sum(dK * (kt[None, :] - Kp), axis=1) + tl.sum(dV * (vt[None, :] - Vp), axis=1)
            dwj = tl.sum(tl.where(hit, dwd[:, None], 0.0), axis=0)
            wc = wd[:, None].to(DT)
            dk = tl.sum(wc * dK, axis=0)
            dv = tl.sum(wc * dV, axis=0)
            dK = (1.0 - wc) * dK
            dV = (1.0 - wc) * dV
            Ks = Kp
            Vs = Vp
            tl.store(dq_ptr + tok * K + rk, dq.to(dq_ptr.dtype.element_ty), mask=rk < K)
            tl.store(dk_ptr + tok * K + rk, dk.to(dk_ptr.dtype.element_ty), mask=rk < K)
            tl.store(dv_ptr + tok * V + rv, dv.to(dv_ptr.dtype.element_ty), mask=rv < V)
            kk = tl.arange(0, BLOCK_TK)
            tl.store(dw_ptr + tok * TOP_K + kk, dwj.to(dw_ptr.dtype.element_ty), mask=kk < TOP_K)
            t -= 1
        sg -= 1
    tl.store(dk0_ptr + pid64 * S * K + sk_off, dK.to(dk0_ptr.dtype.element_ty), mask=mk)
    tl.store(dv0_ptr + pid64 * S * V + sv_off, dV.to(dv0_ptr.dtype.element_ty), mask=mv)
    if HAS_S2S:
        tl.store(dmix_ptr + pid64 + tl.arange(0, 1), dmix.to(dmix_ptr.dtype.element_ty))


class NSTMRecurrentFunction(torch.autograd.Function):
    """``(q, k, v, weights, k0, v0, w_q, w_k, mix) -> (o, final K̂, final V̂)``.

    ``k0``/``v0`` (the states before the first token, ``[N, H, S, *]``, compute dtype) are always
    tensors (zeros when the caller has no state); ``w_q .. mix`` are None without s2s. ``idx`` (the
    routed slots), ``top_k``, ``lay`` (the ``utils.Layout`` of the sequences and their segments)
    and ``scale`` are constants; ``store`` says whether to keep the segment entry states for a
    backward; ``opts = (recurrent dot precision, chunk dot precision, backward kind)`` (see
    ``ops.triton_nstm``).
    """

    @staticmethod
    def forward(ctx, q, k, v, w, k0, v0, wq, wk, mix, idx, top_k, lay, scale, store, opts):
        B, T, H, K = q.shape
        V, S = v.shape[-1], k0.shape[2]
        dt = w.dtype
        dev = q.device
        has_s2s = wq is not None
        N = lay.N
        o = torch.empty(B, T, H, V, dtype=q.dtype, device=dev)
        fk = torch.empty(N, H, S, K, dtype=dt, device=dev)
        fv = torch.empty(N, H, S, V, dtype=dt, device=dev)
        if store:
            bk = torch.empty(lay.G, H, S, K, dtype=dt, device=dev)
            bv = torch.empty(lay.G, H, S, V, dtype=dt, device=dev)
        else:
            bk, bv = fk, fv  # not written (STORE=False)
        dummy = fk
        scr = s2s_scratch(N * H, S, V, False, dt, dev) if has_s2s else dummy
        meta = recurrent_meta(S, K, V, top_k, dt, dev, opts[0])
        with on_device(q):
            launch(_nstm_fwd_kernel, (N * H,),
                q, k, v, idx, w, k0, v0, lay.seg, lay.cuc, lay.ev, o, bk, bv, fk, fv,
                wq if has_s2s else dummy, wk if has_s2s else dummy, mix if has_s2s else dummy,
                scr, s2s_scratch_size(S, V, False), H, S, K, V, scale, 1.0 / math.sqrt(V),
                HAS_INIT=True, HAS_S2S=has_s2s, STORE=store, **meta)
        if store:
            saved, cfg = (q, k, v, w, idx, bk, bv, wq, wk, mix), (top_k, scale, S)
            keep_for_backward(ctx, recurrent_backward, saved, cfg, lay, opts, o)
        ctx.stored = store
        ctx.opts = opts
        return o, fk, fv

    @staticmethod
    def backward(ctx, do, dkf, dvf):
        return recurrent_backward(ctx, do, dkf, dvf)


def recurrent_backward(ctx, do, dkf, dvf):
    """The reverse-segment backward (one program per (sequence, head)); it also serves the chunk
    forward (``ops.NSTMChunkFunction``), whose chunk-entry states are its segment-entry states."""
    g = backward_setup(ctx, do, dkf, dvf)
    lay = g.lay
    sck = torch.empty(g.N * g.H, lay.lmax * g.top_k, g.K, dtype=g.dt, device=g.dev)
    scv = torch.empty(g.N * g.H, lay.lmax * g.top_k, g.V, dtype=g.dt, device=g.dev)
    with on_device(g.q):
        launch(_nstm_bwd_kernel, (g.N * g.H,),
            g.q, g.k, g.v, g.idx, g.w, g.do, lay.seg, lay.cuc, lay.ev, g.bk, g.bv, g.dkf, g.dvf,
            sck, scv, *g.s2s_args, g.dq, g.dk, g.dv, g.dw, g.dk0, g.dv0, *g.dws, g.dmix,
            g.scr, g.scr_stride, g.H, g.S, g.K, g.V, lay.lmax, g.scale, 1.0 / math.sqrt(g.V), HAS_S2S=g.has_s2s,
            **recurrent_meta(g.S, g.K, g.V, g.top_k, g.dt, g.dev, g.seq_prec))
    return backward_result(g)
