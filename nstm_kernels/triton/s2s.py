"""State-to-state attention in Triton (spec §2 step 4).

``(1 - g_h) V + g_h softmax((V W_q)(V W_k)^T / sqrt(V)) V`` (``g_h = sigmoid(gate_h)``) for one ``[S, V]`` tile
per (batch, head) program, S and V padded to powers of two >= 16 with masks, fp32 (fp64) compute.

The two ``@triton.jit`` helpers ``s2s_forward_tile`` / ``s2s_backward_tile`` work on a tile held in
registers; the sequence and step kernels call them at period ends (the generic tile helpers they
use live in ``utils.py``). ``sigmoid(gate)`` (``mix``) is
computed in PyTorch (an ``[H]`` vector) and its gradient flows through PyTorch's sigmoid.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..state import S2SParams
from ..utils import compute_dtype
from .device import compute_tl_dtype, dot_block, tile_warps
from .utils import load_head_weight, load_tile, mm, resolve_dot_precision, store_tile


@triton.jit
def _s2s_probs(X, Wq, Wk, S, qk_scale, PREC: tl.constexpr):
    """Queries, keys and the row-softmax ``P [BLOCK_S, BLOCK_S]`` (zero rows/cols at the padding)."""
    BLOCK_S: tl.constexpr = X.shape[0]
    Q = mm(X, Wq, PREC)
    Kx = mm(X, Wk, PREC)
    sc = mm(Q, tl.trans(Kx), PREC) * qk_scale
    rs = tl.arange(0, BLOCK_S)
    valid = (rs[:, None] < S) & (rs[None, :] < S)
    sc = tl.where(rs[None, :] < S, sc, float("-inf"))
    e = tl.exp(sc - tl.max(sc, axis=1)[:, None])
    P = tl.where(valid, e / tl.sum(e, axis=1)[:, None], 0.0)
    return Q, Kx, P


@triton.jit
def _s2s_parts(X, wq_ptr, wk_ptr, h, S, V, qk_scale, PREC: tl.constexpr):
    """Everything the forward and the backward of one tile share: the head's weights, queries,
    keys, the softmax ``P`` and the mixed-in rows ``O = P X``."""
    BLOCK_V: tl.constexpr = X.shape[1]
    Wq = load_head_weight(wq_ptr, h, V, BLOCK_V, X.dtype)
    Wk = load_head_weight(wk_ptr, h, V, BLOCK_V, X.dtype)
    Q, Kx, P = _s2s_probs(X, Wq, Wk, S, qk_scale, PREC)
    O = mm(P, X, PREC)
    return Wq, Wk, Q, Kx, P, O


@triton.jit
def s2s_forward_tile(X, wq_ptr, wk_ptr, mix, h, S, V, qk_scale, PREC: tl.constexpr):
    """The mixed tile ``(1 - mix) X + mix * P X`` for ``X [BLOCK_S, BLOCK_V]`` (padding rows stay 0)."""
    BLOCK_S: tl.constexpr = X.shape[0]
    Wq, Wk, Q, Kx, P, O = _s2s_parts(X, wq_ptr, wk_ptr, h, S, V, qk_scale, PREC)
    rs = tl.arange(0, BLOCK_S)
    return tl.where(rs[:, None] < S, (1.0 - mix) * X + mix * O, 0.0)


@triton.jit
def _acc_weight_grad(dw_ptr, G, V, BLOCK_V: tl.constexpr):
    """``dw[0:V, 0:V] += G`` for one program's private ``[V, V]`` partial (no other program writes it)."""
    r = tl.arange(0, BLOCK_V)
    m = (r[:, None] < V) & (r[None, :] < V)
    ptrs = dw_ptr + r[:, None] * V + r[None, :]
    tl.debug_barrier()  # earlier stores to this partial come from other threads of this program
    tl.store(ptrs, (tl.load(ptrs, mask=m, other=0.0) + G).to(dw_ptr.dtype.element_ty), mask=m)


@triton.jit
def s2s_backward_tile(X, dY, wq_ptr, wk_ptr, mix, h, S, V, qk_scale, dwq_ptr, dwk_ptr,
                      PREC: tl.constexpr):
    """Backward of ``Y = (1 - mix) X + mix * softmax((X W_q)(X W_k)^T * c) X`` for one tile.

    Adds ``X^T dQ`` and ``X^T dK`` into this program's weight-gradient partials (``[V, V]`` each,
    at ``dw*_ptr``) and returns ``(dX, dmix)``.
    """
    BLOCK_V: tl.constexpr = X.shape[1]
    Wq, Wk, Q, Kx, P, O = _s2s_parts(X, wq_ptr, wk_ptr, h, S, V, qk_scale, PREC)
    dmix = tl.sum(tl.sum(dY * (O - X), axis=1), axis=0)
    dO = mix * dY
    dP = mm(dO, tl.trans(X), PREC)
    dS = P * (dP - tl.sum(P * dP, axis=1)[:, None]) * qk_scale
    dQ = mm(dS, Kx, PREC)
    dKx = mm(tl.trans(dS), Q, PREC)
    dX = (1.0 - mix) * dY + mm(tl.trans(P), dO, PREC)
    dX += mm(dQ, tl.trans(Wq), PREC)
    dX += mm(dKx, tl.trans(Wk), PREC)
    Xt = tl.trans(X)
    _acc_weight_grad(dwq_ptr, mm(Xt, dQ, PREC), V, BLOCK_V)
    _acc_weight_grad(dwk_ptr, mm(Xt, dKx, PREC), V, BLOCK_V)
    return dX, dmix


@triton.jit
def _s2s_fwd_kernel(x_ptr, wq_ptr, wk_ptr, mix_ptr, y_ptr, H, S, V, qk_scale,
                    BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, DT: tl.constexpr,
                    PREC: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    off = pid.to(tl.int64) * S * V
    X = load_tile(x_ptr + off, S, V, BLOCK_S, BLOCK_V, DT)
    mix = tl.load(mix_ptr + h).to(DT)
    Y = s2s_forward_tile(X, wq_ptr, wk_ptr, mix, h, S, V, qk_scale, PREC)
    store_tile(y_ptr + off, Y, S, V, BLOCK_S, BLOCK_V)


@triton.jit
def _s2s_bwd_kernel(x_ptr, dy_ptr, wq_ptr, wk_ptr, mix_ptr, dx_ptr,
                    dwq_ptr, dwk_ptr, dmix_ptr, H, S, V, qk_scale,
                    BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, DT: tl.constexpr,
                    PREC: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    off = pid.to(tl.int64) * S * V
    woff = pid.to(tl.int64) * V * V
    X = load_tile(x_ptr + off, S, V, BLOCK_S, BLOCK_V, DT)
    dY = load_tile(dy_ptr + off, S, V, BLOCK_S, BLOCK_V, DT)
    mix = tl.load(mix_ptr + h).to(DT)
    dX, dmix = s2s_backward_tile(X, dY, wq_ptr, wk_ptr, mix, h, S, V, qk_scale,
                                 dwq_ptr + woff, dwk_ptr + woff, PREC)
    store_tile(dx_ptr + off, dX, S, V, BLOCK_S, BLOCK_V)
    tl.store(dmix_ptr + pid, dmix.to(dmix_ptr.dtype.element_ty))


def pack_weights(s2s: S2SParams, dt: torch.dtype):
    """``(w_q, w_k, mix = sigmoid(gate))`` in the compute dtype, contiguous (differentiable)."""
    return (s2s.w_q.to(dt).contiguous(), s2s.w_k.to(dt).contiguous(),
            torch.sigmoid(s2s.gate.to(dt)).contiguous())


def _launch_meta(S: int, V: int, dtype: torch.dtype, device, prec: str):
    BS, BV = dot_block(S), dot_block(V)
    return dict(BLOCK_S=BS, BLOCK_V=BV, DT=compute_tl_dtype(dtype), PREC=prec,
                num_warps=tile_warps(max(BS, BV) * BV, device))


class StateAttentionFunction(torch.autograd.Function):
    """``(v_state [B,H,S,V] in the compute dtype, w_q, w_k [H,V,V], mix [H], prec) -> mixed``
    (``prec``: the resolved dot precision)."""

    @staticmethod
    def forward(ctx, x, wq, wk, mix, prec):
        B, H, S, V = x.shape
        x = x.contiguous()
        y = torch.empty_like(x)
        meta = _launch_meta(S, V, x.dtype, x.device, prec)
        if B * H > 0:
            _s2s_fwd_kernel[(B * H,)](x, wq, wk, mix, y, H, S, V, 1.0 / math.sqrt(V), **meta)
        ctx.save_for_backward(x, wq, wk, mix)
        ctx.prec = prec
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wq, wk, mix = ctx.saved_tensors
        B, H, S, V = x.shape
        dy = dy.contiguous().to(x.dtype)
        dx = torch.empty_like(x)
        dws = [torch.zeros(B, H, V, V, dtype=x.dtype, device=x.device) for _ in range(2)]
        dmix = torch.empty(B, H, dtype=x.dtype, device=x.device)
        meta = _launch_meta(S, V, x.dtype, x.device, ctx.prec)
        if B * H > 0:
            _s2s_bwd_kernel[(B * H,)](x, dy, wq, wk, mix, dx, *dws, dmix, H, S, V,
                                      1.0 / math.sqrt(V), **meta)
        # per-(b, h) partials summed over the batch here: deterministic, no atomics
        return (dx, dws[0].sum(0).to(wq.dtype), dws[1].sum(0).to(wk.dtype), dmix.sum(0).to(mix.dtype),
                None)


def triton_state_attention(v_state: torch.Tensor, s2s: S2SParams,
                           dot_precision: Optional[str] = None) -> torch.Tensor:
    """The s2s step in Triton: ``v_state [B, H, S, V]`` -> mixed ``v_state`` (its dtype).

    Computes in fp32 (fp64 for fp64); differentiable wrt ``v_state`` and every field of ``s2s``.
    ``dot_precision``: "ieee", "tf32" or "tf32x3" (None: ``NSTM_TRITON_DOT``, else "tf32x3").
    """
    dt = compute_dtype(v_state.dtype)
    wq, wk, mix = pack_weights(s2s, dt)
    prec = resolve_dot_precision(dt, v_state.device, kind=dot_precision)
    return StateAttentionFunction.apply(v_state.to(dt), wq, wk, mix, prec).to(v_state.dtype)
