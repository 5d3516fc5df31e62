"""The NSTM sequence operator in Triton: fused recurrent forward and reverse-time backward.

Routing runs first, as one fused kernel over all tokens (``routing.py``); its autograd Function
turns the gradient wrt the write weights into gradients wrt the logits and the write gate.

Forward (``_nstm_fwd_kernel``), one program per (batch, head): the slot state ``K̂ [S, K]`` and
``V̂ [S, V]`` stays in registers while the program walks through time; each token writes its
``top_k`` routed slots (the others are selected unchanged), reads with a softmax over all slots,
and the state-to-state attention runs at period ends (absolute position ``pos + t``). Time is cut
into *segments*: a new segment starts at every period start (so that every s2s event is the last
token of a segment) and at least every ``segment_length()`` tokens. The state entering every
segment is stored for the backward.

Backward (``_nstm_bwd_kernel``), one program per (batch, head), segments in reverse: reload the
segment's entry state, rerun the segment forward while saving, for every token, the old contents
of the rows it overwrites (``top_k`` rows per token, in a per-program scratch buffer), backprop
through the s2s event at the segment end, then walk the segment backwards in time: read gradients
with the state after the token, then restore the state before the token by putting the saved rows
back (exact: no division by 1 - w, so w -> 1 stays finite), then the write gradients.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ..state import NSTMState, S2SParams
from ..utils import compute_dtype
from .device import (compute_tl_dtype, dot_block, forward_kind, pow2, segment_length,
                     tile_warps)
from .routing import SparseRouteFunction
from .s2s import (convex_write, dot_precision, pack_weights, read_probs, s2s_backward_tile,
                  s2s_forward_tile, slot_tiles)


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
def _nstm_fwd_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, w_ptr, k0_ptr, v0_ptr, seg_ptr,
                     o_ptr, bk_ptr, bv_ptr, fk_ptr, fv_ptr, wq_ptr, wk_ptr, wv_ptr, mix_ptr,
                     T, H, S, K, V, NS, pos_mod, C, scale, qk_scale,
                     TOP_K: tl.constexpr, HAS_INIT: tl.constexpr, HAS_S2S: tl.constexpr,
                     STORE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_TK: tl.constexpr, DT: tl.constexpr,
                     PREC: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
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
    sg = tl.zeros([], tl.int32)   # a tensor (not a constexpr) so that it can be loop-carried
    while sg < NS:
        t0 = tl.load(seg_ptr + sg)
        t1 = tl.load(seg_ptr + sg + 1)
        if STORE:
            bo = (pid64 * NS + sg) * S
            tl.store(bk_ptr + bo * K + sk_off, Ks.to(bk_ptr.dtype.element_ty), mask=mk)
            tl.store(bv_ptr + bo * V + sv_off, Vs.to(bv_ptr.dtype.element_ty), mask=mv)
        t = t0
        while t < t1:
            tok = (b.to(tl.int64) * T + t) * H + h
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
            if (pos_mod + t1) % C == 0:   # the segment's last token ends a period
                Vs = s2s_forward_tile(Vs, wq_ptr, wk_ptr, wv_ptr, mix, h, S, V, qk_scale, PREC)
        sg += 1
    tl.store(fk_ptr + pid64 * S * K + sk_off, Ks.to(fk_ptr.dtype.element_ty), mask=mk)
    tl.store(fv_ptr + pid64 * S * V + sv_off, Vs.to(fv_ptr.dtype.element_ty), mask=mv)


@triton.jit
def _nstm_bwd_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, w_ptr, do_ptr, seg_ptr, bk_ptr, bv_ptr,
                     dkf_ptr, dvf_ptr, sck_ptr, scv_ptr, wq_ptr, wk_ptr, wv_ptr, mix_ptr,
                     dq_ptr, dk_ptr, dv_ptr, dw_ptr, dk0_ptr, dv0_ptr,
                     dwq_ptr, dwk_ptr, dwv_ptr, dmix_ptr,
                     T, H, S, K, V, NS, LMAX, pos_mod, C, scale, qk_scale,
                     TOP_K: tl.constexpr, HAS_S2S: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_TK: tl.constexpr, DT: tl.constexpr,
                     PREC: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
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
    sg = tl.zeros([], tl.int32) + (NS - 1)
    while sg >= 0:
        t0 = tl.load(seg_ptr + sg)
        t1 = tl.load(seg_ptr + sg + 1)
        bo = (pid64 * NS + sg) * S
        Ks = tl.load(bk_ptr + bo * K + sk_off, mask=mk, other=0.0).to(DT)
        Vs = tl.load(bv_ptr + bo * V + sv_off, mask=mv, other=0.0).to(DT)
        tl.debug_barrier()  # the previous segment's scratch reads are done before it is rewritten
        # rerun the segment, saving the rows each token overwrites
        t = t0
        while t < t1:
            tok = (b.to(tl.int64) * T + t) * H + h
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
            if (pos_mod + t1) % C == 0:
                dV, dm = s2s_backward_tile(Vs, dV, wq_ptr, wk_ptr, wv_ptr, mix, h, S, V,
                                           qk_scale, dwq_ptr + pid64 * V * V,
                                           dwk_ptr + pid64 * V * V, dwv_ptr + pid64 * V * V,
                                           PREC)
                dmix += dm
        tl.debug_barrier()  # the scratch rows stored above are visible to every thread
        t = t1 - 1
        while t >= t0:
            tok = (b.to(tl.int64) * T + t) * H + h
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


def segment_starts(T: int, pos: int, comm_every: int, has_s2s: bool, seg_len: int) -> List[int]:
    """Token indices where a segment starts, plus ``T``: every period start (when s2s is on, so
    that every s2s event ends a segment) and at most ``seg_len`` tokens apart."""
    if has_s2s:
        first = (-pos) % comm_every or comm_every          # first t >= 1 with (pos + t) % C == 0
        cuts = [0] + list(range(first, T, comm_every)) + [T]
    else:
        cuts = [0, T]
    starts = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        starts.extend(range(a, b, seg_len))
    return starts + [T]


def _meta(S, K, V, top_k, dt, device):
    BS, BK, BV = dot_block(S), pow2(K, 16), dot_block(V)
    return dict(TOP_K=top_k, BLOCK_S=BS, BLOCK_K=BK, BLOCK_V=BV, BLOCK_TK=pow2(top_k, 2),
                DT=compute_tl_dtype(dt), PREC=dot_precision(dt, device),
                num_warps=tile_warps(BS * max(BK, BV), device))


class NSTMRecurrentFunction(torch.autograd.Function):
    """``(q, k, v, weights, k0, v0, w_q, w_k, w_v, mix) -> (o, final K̂, final V̂)``.

    ``k0``/``v0`` (the state before the first token, compute dtype) are always tensors (zeros when
    the caller has no state); ``w_q .. mix`` are None without s2s. ``idx`` (the routed slots),
    ``top_k``, ``pos``, ``comm_every``, ``scale`` are constants; ``store`` says whether to keep the
    segment entry states for a backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, w, k0, v0, wq, wk, wv, mix, idx, top_k, pos, comm_every, scale,
                store):
        B, T, H, K = q.shape
        V, S = v.shape[-1], k0.shape[2]
        dt = w.dtype
        dev = q.device
        has_s2s = wq is not None
        starts = segment_starts(T, pos, comm_every, has_s2s, segment_length())
        NS = len(starts) - 1
        seg = torch.tensor(starts, dtype=torch.int32, device=dev)
        o = torch.empty(B, T, H, V, dtype=q.dtype, device=dev)
        fk = torch.empty(B, H, S, K, dtype=dt, device=dev)
        fv = torch.empty(B, H, S, V, dtype=dt, device=dev)
        if store:
            bk = torch.empty(B, H, NS, S, K, dtype=dt, device=dev)
            bv = torch.empty(B, H, NS, S, V, dtype=dt, device=dev)
        else:
            bk, bv = fk, fv  # not written (STORE=False)
        dummy = fk
        meta = _meta(S, K, V, top_k, dt, dev)
        C = comm_every
        _nstm_fwd_kernel[(B * H,)](
            q, k, v, idx, w, k0, v0,
            seg, o, bk, bv, fk, fv,
            wq if has_s2s else dummy, wk if has_s2s else dummy, wv if has_s2s else dummy,
            mix if has_s2s else dummy,
            T, H, S, K, V, NS, pos % C, C, scale, 1.0 / math.sqrt(V),
            HAS_INIT=True, HAS_S2S=has_s2s, STORE=store, **meta)
        if store:
            ctx.save_for_backward(q, k, v, w, idx, seg, bk, bv, wq, wk, wv, mix)
            ctx.cfg = (top_k, pos, comm_every, scale, S,
                       max(b - a for a, b in zip(starts[:-1], starts[1:])))
        ctx.stored = store
        return o, fk, fv

    @staticmethod
    def backward(ctx, do, dkf, dvf):
        g = backward_setup(ctx, do, dkf, dvf)
        sck = torch.empty(g.B * g.H, g.lmax * g.top_k, g.K, dtype=g.dt, device=g.dev)
        scv = torch.empty(g.B * g.H, g.lmax * g.top_k, g.V, dtype=g.dt, device=g.dev)
        _nstm_bwd_kernel[(g.B * g.H,)](
            g.q, g.k, g.v, g.idx, g.w, g.do, g.seg, g.bk, g.bv, g.dkf, g.dvf, sck, scv,
            *g.s2s_args, g.dq, g.dk, g.dv, g.dw, g.dk0, g.dv0, *g.dws, g.dmix,
            g.T, g.H, g.S, g.K, g.V, g.seg.numel() - 1, g.lmax, g.pos % g.C, g.C, g.scale,
            1.0 / math.sqrt(g.V), HAS_S2S=g.has_s2s,
            **_meta(g.S, g.K, g.V, g.top_k, g.dt, g.dev))
        return backward_result(g)


def backward_setup(ctx, do, dkf, dvf) -> SimpleNamespace:
    """What both Triton backwards (this file's and ``chunk_bwd.py``'s) start from: the saved
    tensors and constants of the forward, contiguous output gradients in the state dtype (zeros for
    an unused final state), and the gradient buffers they fill."""
    if not ctx.stored:
        raise RuntimeError("triton_nstm: the forward ran without grad; no states were stored")
    q, k, v, w, idx, seg, bk, bv, wq, wk, wv, mix = ctx.saved_tensors
    top_k, pos, C, scale, S, lmax = ctx.cfg
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt, dev = w.dtype, q.device
    has_s2s = wq is not None
    dkf = torch.zeros(B, H, S, K, dtype=dt, device=dev) if dkf is None else dkf.contiguous().to(dt)
    dvf = torch.zeros(B, H, S, V, dtype=dt, device=dev) if dvf is None else dvf.contiguous().to(dt)
    dk0 = torch.empty(B, H, S, K, dtype=dt, device=dev)
    if has_s2s:
        dws = [torch.zeros(B, H, V, V, dtype=dt, device=dev) for _ in range(3)]
        dmix = torch.zeros(B, H, dtype=dt, device=dev)
        s2s_args = (wq, wk, wv, mix)
    else:   # placeholders the kernels never touch (HAS_S2S=False)
        dws, dmix, s2s_args = [dk0, dk0, dk0], dk0, (dk0,) * 4
    return SimpleNamespace(
        q=q, k=k, v=v, w=w, idx=idx, seg=seg, bk=bk, bv=bv, s2s_args=s2s_args, has_s2s=has_s2s,
        top_k=top_k, pos=pos, C=C, scale=scale, lmax=lmax, B=B, T=T, H=H, S=S, K=K, V=V, dt=dt,
        dev=dev, do=do.contiguous(), dkf=dkf, dvf=dvf,
        dq=torch.empty_like(q), dk=torch.empty_like(k), dv=torch.empty_like(v),
        dw=torch.empty_like(w), dk0=dk0, dv0=torch.empty(B, H, S, V, dtype=dt, device=dev),
        dws=dws, dmix=dmix)


def backward_result(g: SimpleNamespace) -> tuple:
    """The gradient tuple of the sequence Functions' ``forward`` arguments."""
    if g.has_s2s:
        g_s2s = (g.dws[0].sum(0), g.dws[1].sum(0), g.dws[2].sum(0), g.dmix.sum(0))
    else:
        g_s2s = (None, None, None, None)
    return (g.dq, g.dk, g.dv, g.dw, g.dk0, g.dv0, *g_s2s) + (None,) * 6


def triton_nstm(q, k, v, route_logits, write_gate, top_k: int, s2s: Optional[S2SParams] = None,
                comm_every: int = 64, initial_state: Optional[NSTMState] = None,
                output_final_state: bool = False, scale: Optional[float] = None,
                forward: Optional[str] = None):
    """The NSTM operator in Triton; same signature and results as ``naive_recurrent_nstm``
    (without ``return_maps``). Differentiable wrt q, k, v, route_logits, write_gate, the initial
    state and every field of ``s2s``.

    ``forward``: ``"chunk"`` (default: the chunk-parallel forward of ``chunk.py``) or
    ``"recurrent"`` (this file's fused recurrent forward); None reads ``NSTM_TRITON_FWD``. Both
    store the segment-entry states for the same reverse-segment backward.
    """
    kind = forward_kind(forward)
    B, T, H, K = q.shape
    V, S = v.shape[-1], route_logits.shape[-1]
    dt = compute_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else float(scale)
    pos = 0 if initial_state is None else int(initial_state.pos)
    idx, w = SparseRouteFunction.apply(route_logits.reshape(-1, S), write_gate.reshape(-1), top_k)
    idx, w = idx.view(B, T, H, top_k), w.view(B, T, H, top_k)
    if initial_state is not None:
        k0, v0 = initial_state.k.to(dt).contiguous(), initial_state.v.to(dt).contiguous()
    else:
        k0 = torch.zeros(B, H, S, K, dtype=dt, device=q.device)
        v0 = torch.zeros(B, H, S, V, dtype=dt, device=q.device)
    if s2s is not None:
        wq, wk, wv, mix = pack_weights(s2s, dt)
    else:
        wq = wk = wv = mix = None
    tensors = [q, k, v, w, k0, v0] + ([wq, wk, wv, mix] if s2s is not None else [])
    store = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if kind == "chunk":
        from .chunk import NSTMChunkFunction   # chunk.py imports this module
        fn = NSTMChunkFunction
    else:
        fn = NSTMRecurrentFunction
    o, fk, fv = fn.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), w, k0, v0, wq, wk, wv, mix, idx,
        top_k, pos, comm_every, scale, store)
    final = NSTMState(fk, fv, pos + T) if output_final_state else None
    return o, final
