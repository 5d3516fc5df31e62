"""State-to-state attention in Triton (spec §2 step 4).

``(1 - g_h) V + g_h softmax((V W_q)(V W_k)^T / sqrt(V)) V`` (``g_h = sigmoid(gate_h)``) for one ``[S, V]`` tile
per (batch, head) program, S and V padded to powers of two >= 16 with masks, fp32 (fp64) compute.

The two ``@triton.jit`` helpers ``s2s_forward_tile`` / ``s2s_backward_tile`` take a tile held in
registers and return one; the sequence and step kernels call them at period ends. Inside, every
product goes through a per-program scratch in global memory (L2-resident) in ``[BLOCK, 32]``
blocks (``sgemm``): a ``[128, 128]`` fp32 operand staged whole through shared memory costs 64 KB
(twice that with the tf32x3 split), and the fused kernels needed 256-576 KB of it at S = V = 128
before (bench/NOTES.md). The s2s runs once per period, so the extra memory traffic is small.
``sigmoid(gate)`` (``mix``) is computed in PyTorch (an ``[H]`` vector) and its gradient flows through PyTorch's sigmoid.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..s2s import state_attention_torch
from ..state import S2SParams
from ..utils import compute_dtype
from .device import compute_tl_dtype, dot_block, tile_warps
from .fallback import run_or_fall_back
from .utils import (
    check_fits,
    launch,
    load_tile,
    mm,
    on_device,
    resolve_dot_precision,
    s2s_scratch,
    s2s_scratch_size,
    store_tile,
)


@triton.jit
def sgemm(a_ptr, a_sm, a_sk, b_ptr, b_sk, b_sn, c_ptr, c_sm, c_sn, M, N, KD,
          BM: tl.constexpr, BN: tl.constexpr, BKD: tl.constexpr, ACC: tl.constexpr,
          DT: tl.constexpr, PREC: tl.constexpr):
    """``C[:M, :N] (+)= A[:M, :KD] @ B[:KD, :N]`` with every operand in memory (element ``(i, j)``
    of A at ``a_ptr + i * a_sm + j * a_sk``, B and C alike: a transpose is a swap of strides).

    ``BM, BN, BKD`` are the padded dims (powers of two >= 16). The product runs in ``[BM, NT]``
    output blocks, ``NT``-deep steps (``NT = min(32, .)``), in loops (not unrolled), so no
    operand tile larger than ``[BM, 32]`` ever goes through shared memory: this is what lets the
    s2s run at S = V = 128 inside the sequence kernels (bench/compile_check.py)."""
    NT: tl.constexpr = min(32, BN)
    KT: tl.constexpr = min(32, BKD)
    rm = tl.arange(0, BM)
    rn = tl.arange(0, NT)
    rk = tl.arange(0, KT)
    for n0 in range(0, BN, NT):
        cols = n0 + rn
        acc = tl.zeros([BM, NT], DT)
        for k0 in range(0, BKD, KT):
            ks = k0 + rk
            a = tl.load(a_ptr + rm[:, None] * a_sm + ks[None, :] * a_sk,
                        mask=(rm[:, None] < M) & (ks[None, :] < KD), other=0.0).to(DT)
            b = tl.load(b_ptr + ks[:, None] * b_sk + cols[None, :] * b_sn,
                        mask=(ks[:, None] < KD) & (cols[None, :] < N), other=0.0).to(DT)
            acc += mm(a, b, PREC)
        cm = (rm[:, None] < M) & (cols[None, :] < N)
        cp = c_ptr + rm[:, None] * c_sm + cols[None, :] * c_sn
        if ACC:
            acc += tl.load(cp, mask=cm, other=0.0).to(DT)
        tl.store(cp, acc.to(c_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _scratch_tile(ptr, R, Cn, BR: tl.constexpr, BC: tl.constexpr, DT: tl.constexpr, fill):
    """A ``[BR, BC]`` register tile of the row-major ``[R, Cn]`` matrix at ``ptr`` (``fill`` at the padding)."""
    r = tl.arange(0, BR)
    c = tl.arange(0, BC)
    return tl.load(ptr + r[:, None] * Cn + c[None, :], mask=(r[:, None] < R) & (c[None, :] < Cn),
                   other=fill).to(DT)


@triton.jit
def _scratch_store(ptr, X, R, Cn):
    r = tl.arange(0, X.shape[0])
    c = tl.arange(0, X.shape[1])
    tl.store(ptr + r[:, None] * Cn + c[None, :], X.to(ptr.dtype.element_ty),
             mask=(r[:, None] < R) & (c[None, :] < Cn))


@triton.jit
def _s2s_probs(X, wq, wk, S, V, qk_scale, xs, qs, ks, ps, PREC: tl.constexpr):
    """Stores ``X``, ``Q = X W_q``, ``Kx = X W_k`` and the row softmax ``P`` of ``Q Kx^T * c`` into
    the scratch (``xs, qs, ks [S, V]``, ``ps [S, S]``) and returns ``P`` as a register tile."""
    BS: tl.constexpr = X.shape[0]
    BV: tl.constexpr = X.shape[1]
    DT: tl.constexpr = X.dtype
    tl.debug_barrier()     # an earlier use of the scratch is over
    _scratch_store(xs, X, S, V)
    tl.debug_barrier()
    sgemm(xs, V, 1, wq, V, 1, qs, V, 1, S, V, V, BS, BV, BV, False, DT, PREC)
    sgemm(xs, V, 1, wk, V, 1, ks, V, 1, S, V, V, BS, BV, BV, False, DT, PREC)
    tl.debug_barrier()
    sgemm(qs, V, 1, ks, 1, V, ps, S, 1, S, S, V, BS, BS, BV, False, DT, PREC)   # Q Kx^T
    tl.debug_barrier()
    rs = tl.arange(0, BS)
    sc = _scratch_tile(ps, S, S, BS, BS, DT, 0.0) * qk_scale
    sc = tl.where(rs[None, :] < S, sc, float("-inf"))
    e = tl.exp(sc - tl.max(sc, axis=1)[:, None])
    P = tl.where((rs[:, None] < S) & (rs[None, :] < S), e / tl.sum(e, axis=1)[:, None], 0.0)
    tl.debug_barrier()     # every thread has read the scores before P overwrites them
    _scratch_store(ps, P, S, S)
    tl.debug_barrier()
    return P


@triton.jit
def s2s_forward_tile(X, wq_ptr, wk_ptr, mix, h, S, V, qk_scale, scr_ptr, PREC: tl.constexpr):
    """The mixed tile ``(1 - mix) X + mix * P X`` for ``X [BLOCK_S, BLOCK_V]`` (padding rows stay 0).

    ``scr_ptr``: this program's scratch, ``s2s_scratch_size(S, V, False)`` elements of the compute
    dtype. The products go through it in small blocks (``sgemm``)."""
    BS: tl.constexpr = X.shape[0]
    BV: tl.constexpr = X.shape[1]
    DT: tl.constexpr = X.dtype
    SV = S * V
    xs, qs, ks, ps = scr_ptr, scr_ptr + SV, scr_ptr + 2 * SV, scr_ptr + 3 * SV
    os_ = ps + S * S
    wq = wq_ptr + h.to(tl.int64) * V * V
    wk = wk_ptr + h.to(tl.int64) * V * V
    _s2s_probs(X, wq, wk, S, V, qk_scale, xs, qs, ks, ps, PREC)
    sgemm(ps, S, 1, xs, V, 1, os_, V, 1, S, V, S, BS, BV, BS, False, DT, PREC)  # O = P X
    tl.debug_barrier()
    O = _scratch_tile(os_, S, V, BS, BV, DT, 0.0)
    rs = tl.arange(0, BS)
    return tl.where(rs[:, None] < S, (1.0 - mix) * X + mix * O, 0.0)


@triton.jit
def s2s_backward_tile(X, dY, wq_ptr, wk_ptr, mix, h, S, V, qk_scale, dwq_ptr, dwk_ptr, scr_ptr,
                      PREC: tl.constexpr):
    """Backward of ``Y = (1 - mix) X + mix * softmax((X W_q)(X W_k)^T * c) X`` for one tile.

    Adds ``X^T dQ`` and ``X^T dK`` into this program's weight-gradient partials (``[V, V]`` each,
    at ``dw*_ptr``; no other program writes them) and returns ``(dX, dmix)``. ``scr_ptr``:
    ``s2s_scratch_size(S, V, True)`` elements of the compute dtype."""
    BS: tl.constexpr = X.shape[0]
    BV: tl.constexpr = X.shape[1]
    DT: tl.constexpr = X.dtype
    SV = S * V
    SS = S * S
    xs, qs, ks, ps = scr_ptr, scr_ptr + SV, scr_ptr + 2 * SV, scr_ptr + 3 * SV
    os_ = ps + SS
    dos = os_ + SV
    dss = dos + SV
    dqs = dss + SS
    dks = dqs + SV
    dxs = dks + SV
    wq = wq_ptr + h.to(tl.int64) * V * V
    wk = wk_ptr + h.to(tl.int64) * V * V
    P = _s2s_probs(X, wq, wk, S, V, qk_scale, xs, qs, ks, ps, PREC)
    sgemm(ps, S, 1, xs, V, 1, os_, V, 1, S, V, S, BS, BV, BS, False, DT, PREC)  # O = P X
    _scratch_store(dos, mix * dY, S, V)                                         # dO
    tl.debug_barrier()
    O = _scratch_tile(os_, S, V, BS, BV, DT, 0.0)
    dmix = tl.sum(tl.sum(dY * (O - X), axis=1), axis=0)
    sgemm(dos, V, 1, xs, 1, V, dss, S, 1, S, S, V, BS, BS, BV, False, DT, PREC)  # dP = dO X^T
    tl.debug_barrier()
    dP = _scratch_tile(dss, S, S, BS, BS, DT, 0.0)
    dS = P * (dP - tl.sum(P * dP, axis=1)[:, None]) * qk_scale
    tl.debug_barrier()
    _scratch_store(dss, dS, S, S)
    tl.debug_barrier()
    sgemm(dss, S, 1, ks, V, 1, dqs, V, 1, S, V, S, BS, BV, BS, False, DT, PREC)  # dQ = dS Kx
    sgemm(dss, 1, S, qs, V, 1, dks, V, 1, S, V, S, BS, BV, BS, False, DT, PREC)  # dKx = dS^T Q
    sgemm(ps, 1, S, dos, V, 1, dxs, V, 1, S, V, S, BS, BV, BS, False, DT, PREC)  # P^T dO
    tl.debug_barrier()
    sgemm(dqs, V, 1, wq, 1, V, dxs, V, 1, S, V, V, BS, BV, BV, True, DT, PREC)   # += dQ W_q^T
    tl.debug_barrier()
    sgemm(dks, V, 1, wk, 1, V, dxs, V, 1, S, V, V, BS, BV, BV, True, DT, PREC)   # += dKx W_k^T
    sgemm(xs, 1, V, dqs, V, 1, dwq_ptr, V, 1, V, V, S, BV, BV, BS, True, DT, PREC)  # X^T dQ
    sgemm(xs, 1, V, dks, V, 1, dwk_ptr, V, 1, V, V, S, BV, BV, BS, True, DT, PREC)  # X^T dKx
    tl.debug_barrier()
    dX = (1.0 - mix) * dY + _scratch_tile(dxs, S, V, BS, BV, DT, 0.0)
    return dX, dmix


@triton.jit
def _s2s_fwd_kernel(x_ptr, wq_ptr, wk_ptr, mix_ptr, y_ptr, scr_ptr, scr_stride, H, S, V, qk_scale,
                    BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, DT: tl.constexpr,
                    PREC: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    off = pid.to(tl.int64) * S * V
    X = load_tile(x_ptr + off, S, V, BLOCK_S, BLOCK_V, DT)
    mix = tl.load(mix_ptr + h).to(DT)
    scr = scr_ptr + pid.to(tl.int64) * scr_stride
    Y = s2s_forward_tile(X, wq_ptr, wk_ptr, mix, h, S, V, qk_scale, scr, PREC)
    store_tile(y_ptr + off, Y, S, V, BLOCK_S, BLOCK_V)


@triton.jit
def _s2s_bwd_kernel(x_ptr, dy_ptr, wq_ptr, wk_ptr, mix_ptr, dx_ptr,
                    dwq_ptr, dwk_ptr, dmix_ptr, scr_ptr, scr_stride, H, S, V, qk_scale,
                    BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, DT: tl.constexpr,
                    PREC: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    off = pid.to(tl.int64) * S * V
    woff = pid.to(tl.int64) * V * V
    X = load_tile(x_ptr + off, S, V, BLOCK_S, BLOCK_V, DT)
    dY = load_tile(dy_ptr + off, S, V, BLOCK_S, BLOCK_V, DT)
    mix = tl.load(mix_ptr + h).to(DT)
    scr = scr_ptr + pid.to(tl.int64) * scr_stride
    dX, dmix = s2s_backward_tile(X, dY, wq_ptr, wk_ptr, mix, h, S, V, qk_scale,
                                 dwq_ptr + woff, dwk_ptr + woff, scr, PREC)
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


def _s2s_backward(x, dy, wq, wk, mix, prec):
    """Launch the s2s backward: ``(dx, per-(b, h) dw_q and dw_k partials, dmix [B, H])``."""
    B, H, S, V = x.shape
    dx = torch.empty_like(x)
    dws = [torch.zeros(B, H, V, V, dtype=x.dtype, device=x.device) for _ in range(2)]
    dmix = torch.empty(B, H, dtype=x.dtype, device=x.device)
    meta = _launch_meta(S, V, x.dtype, x.device, prec)
    if B * H > 0:
        scr = s2s_scratch(B * H, S, V, True, x.dtype, x.device)
        with on_device(x):
            launch(_s2s_bwd_kernel, (B * H,), x, dy, wq, wk, mix, dx, *dws, dmix, scr,
                   s2s_scratch_size(S, V, True), H, S, V, 1.0 / math.sqrt(V), **meta)
    return dx, dws, dmix



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
            scr = s2s_scratch(B * H, S, V, False, x.dtype, x.device)
            with on_device(x):
                launch(_s2s_fwd_kernel, (B * H,), x, wq, wk, mix, y, scr, s2s_scratch_size(S, V, False),
                       H, S, V, 1.0 / math.sqrt(V), **meta)
        if any(ctx.needs_input_grad[:4]):
            # the backward must fit too: learn it now, once per configuration (see fallback.py)
            check_fits(x.device, ("s2s backward", str(x.device), S, V, x.dtype, prec),
                       lambda: _s2s_backward(x, y, wq, wk, mix, prec))
        ctx.save_for_backward(x, wq, wk, mix)
        ctx.prec = prec
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wq, wk, mix = ctx.saved_tensors
        dx, dws, dmix = _s2s_backward(x, dy.contiguous().to(x.dtype), wq, wk, mix, ctx.prec)
        # per-(b, h) partials summed over the batch here: deterministic, no atomics
        return (dx, dws[0].sum(0).to(wq.dtype), dws[1].sum(0).to(wk.dtype), dmix.sum(0).to(mix.dtype),
                None)


def triton_state_attention(v_state: torch.Tensor, s2s: S2SParams,
                           dot_precision: Optional[str] = None) -> torch.Tensor:
    """The s2s step in Triton: ``v_state [B, H, S, V]`` -> mixed ``v_state`` (its dtype).

    Computes in fp32 (fp64 for fp64); differentiable wrt ``v_state`` and every field of ``s2s``.
    ``dot_precision``: "ieee", "tf32" or "tf32x3" (None: ``NSTM_TRITON_DOT``, else "tf32x3").
    On a GPU whose shared memory the kernels do not fit, the PyTorch path runs (``fallback.py``).
    """
    dt = compute_dtype(v_state.dtype)

    def fast():
        wq, wk, mix = pack_weights(s2s, dt)
        prec = resolve_dot_precision(dt, v_state.device, kind=dot_precision)
        return StateAttentionFunction.apply(v_state.to(dt), wq, wk, mix, prec).to(v_state.dtype)
    return run_or_fall_back("state_attention", fast,
                            lambda: state_attention_torch(v_state.to(dt), s2s).to(v_state.dtype))
