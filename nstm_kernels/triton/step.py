"""The fused one-token NSTM decode step in Triton (spec §2, §4).

One program per (batch, head): routing (top-k + softmax + sigmoid gate), the gated write into the
``top_k`` routed slots only (the other rows are carried over bit for bit), the read (softmax over
all ``S`` slots), and the state-to-state attention when this token ends a period. The new state is
written into new tensors; the caller's state is never modified. No autograd (decode).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..chunked import recurrent_nstm_step
from ..state import NSTMState, S2SParams
from ..utils import compute_dtype
from .device import compute_tl_dtype, dot_block, pow2, tile_warps
from .fallback import run_or_fall_back
from .routing import _route_weights, _topk_rows
from .s2s import pack_weights, s2s_forward_tile, triton_state_attention
from .utils import convex_write, launch, on_device, read_probs, resolve_dot_precision, s2s_scratch, s2s_scratch_size


@triton.jit
def _nstm_step_kernel(q_ptr, k_ptr, v_ptr, logits_ptr, gate_ptr, sk_ptr, sv_ptr,
                      o_ptr, nk_ptr, nv_ptr, wq_ptr, wk_ptr, mix_ptr, scr_ptr, scr_stride,
                      H, S, K, V, scale, qk_scale,
                      TOP_K: tl.constexpr, HAS_STATE: tl.constexpr, IS_EVENT: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_TK: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    pid64 = pid.to(tl.int64)
    rs = tl.arange(0, BLOCK_S)
    rk = tl.arange(0, BLOCK_K)
    rv = tl.arange(0, BLOCK_V)
    smask = rs < S
    # routing: top-k of this token's logits, softmax over them, times beta
    x = tl.load(logits_ptr + pid64 * S + rs[None, :], mask=smask[None, :], other=0.0).to(DT)
    g = tl.load(gate_ptr + pid64 + tl.arange(0, 1)).to(DT)
    vals, idx = _topk_rows(x, rs, S, TOP_K, BLOCK_TK)                     # [1, BLOCK_TK]
    alpha, beta = _route_weights(vals, g, TOP_K)
    kk = tl.arange(0, BLOCK_TK)
    hit = (rs[:, None] == idx) & (kk[None, :] < TOP_K)                   # [BLOCK_S, BLOCK_TK]
    w = tl.sum(tl.where(hit, alpha * beta, 0.0), axis=1)                 # [BLOCK_S], 0 off-route
    routed = tl.max(hit.to(tl.int32), axis=1) > 0
    # the slot memory before the token
    mk = smask[:, None] & (rk[None, :] < K)
    mv = smask[:, None] & (rv[None, :] < V)
    sk_off = pid64 * S * K + rs[:, None] * K + rk[None, :]
    sv_off = pid64 * S * V + rs[:, None] * V + rv[None, :]
    if HAS_STATE:
        Ks = tl.load(sk_ptr + sk_off, mask=mk, other=0.0).to(DT)
        Vs = tl.load(sv_ptr + sv_off, mask=mv, other=0.0).to(DT)
    else:
        Ks = tl.zeros([BLOCK_S, BLOCK_K], DT)
        Vs = tl.zeros([BLOCK_S, BLOCK_V], DT)
    qt = tl.load(q_ptr + pid64 * K + rk, mask=rk < K, other=0.0).to(DT)
    kt = tl.load(k_ptr + pid64 * K + rk, mask=rk < K, other=0.0).to(DT)
    vt = tl.load(v_ptr + pid64 * V + rv, mask=rv < V, other=0.0).to(DT)
    # gated convex write, routed rows only
    wc = w[:, None]
    Ks, Vs = convex_write(Ks, Vs, routed, wc, kt, vt)
    # read: softmax over all slots
    p = read_probs(Ks, qt, smask, scale)
    o = tl.sum(p[:, None] * Vs, axis=0)
    tl.store(o_ptr + pid64 * V + rv, o.to(o_ptr.dtype.element_ty), mask=rv < V)
    if IS_EVENT:
        mix = tl.load(mix_ptr + h).to(DT)
        Vs = s2s_forward_tile(Vs, wq_ptr, wk_ptr, mix, h, S, V, qk_scale,
                              scr_ptr + pid64 * scr_stride, PREC)
    tl.store(nk_ptr + sk_off, Ks.to(nk_ptr.dtype.element_ty), mask=mk)
    tl.store(nv_ptr + sv_off, Vs.to(nv_ptr.dtype.element_ty), mask=mv)


def triton_nstm_step(q, k, v, route_logits, write_gate, top_k: int, s2s: Optional[S2SParams],
                     comm_every: int, state: Optional[NSTMState], scale: Optional[float] = None,
                     dot_precision: Optional[str] = None):
    """One token in Triton: ``q/k [B,H,K]``, ``v [B,H,V]``, logits ``[B,H,S]``, gate ``[B,H]``.

    Returns ``(o [B,H,V] in q's dtype, NSTMState(k, v, pos + 1))`` with the state in fp32 (fp64 for
    fp64 inputs). ``state`` None means zeros at pos 0. Same results as
    ``nstm_kernels.chunked.recurrent_nstm_step``; not differentiable (decode). ``dot_precision``:
    "ieee", "tf32" or "tf32x3" (None: ``NSTM_TRITON_DOT``, else "tf32x3").
    """
    def slow():
        with torch.no_grad():
            return recurrent_nstm_step(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state,
                                       scale)
    return run_or_fall_back("nstm_step", lambda: _triton_nstm_step(
        q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state, scale, dot_precision), slow)


def _triton_nstm_step(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state, scale,
                      dot_precision):
    B, H, K = q.shape
    V, S = v.shape[-1], route_logits.shape[-1]
    dt = compute_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else float(scale)
    pos = 0 if state is None else state.pos
    per_row = isinstance(pos, torch.Tensor)
    if not per_row:
        pos = int(pos)
    is_event = s2s is not None and not per_row and (pos + 1) % comm_every == 0
    dev = q.device
    with torch.no_grad():
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if dt == torch.float64:   # float64 q, k, v: the routing in float64 too
            route_logits, write_gate = route_logits.to(dt), write_gate.to(dt)
        logits, gate = route_logits.contiguous(), write_gate.contiguous()
        if state is not None:
            sk, sv = state.k.contiguous(), state.v.contiguous()
        else:
            sk = sv = q  # not read (HAS_STATE=False)
        o = torch.empty(B, H, V, dtype=q.dtype, device=dev)
        nk = torch.empty(B, H, S, K, dtype=dt, device=dev)
        nv = torch.empty(B, H, S, V, dtype=dt, device=dev)
        if is_event:
            wq, wk, mix = pack_weights(s2s, dt)
            scr, scr_stride = s2s_scratch(B * H, S, V, False, dt, dev), s2s_scratch_size(S, V, False)
        else:
            wq = wk = mix = scr = nk  # not read (IS_EVENT=False)
            scr_stride = 0
        BS, BK, BV = dot_block(S), pow2(K, 16), dot_block(V)
        if B * H > 0:
            with on_device(q):
                launch(_nstm_step_kernel, (B * H,),
                    q, k, v, logits, gate, sk, sv, o, nk, nv, wq, wk, mix, scr, scr_stride,
                    H, S, K, V, scale, 1.0 / math.sqrt(V),
                    TOP_K=top_k, HAS_STATE=state is not None, IS_EVENT=is_event,
                    BLOCK_S=BS, BLOCK_K=BK, BLOCK_V=BV, BLOCK_TK=pow2(top_k, 2),
                    DT=compute_tl_dtype(q.dtype), PREC=resolve_dot_precision(dt, dev, kind=dot_precision),
                    num_warps=tile_warps(BS * max(BK, BV), dev))
        if per_row and s2s is not None:
            # one position per row: the rows whose period ends now are mixed after the kernel
            # (decided on the device: no host sync)
            event = ((pos.reshape(-1, 1, 1, 1).to(dev) + 1) % comm_every) == 0
            nv = torch.where(event, triton_state_attention(nv, s2s, dot_precision=dot_precision), nv)
    return o, NSTMState(nk, nv, pos + 1)
