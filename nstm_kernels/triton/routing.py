"""Sparse top-k routing in Triton (spec §2 step 1, §4: one fused kernel over all tokens).

One program per row of logits (a (batch, time, head) token): ``top_k`` rounds of argmax over the
``S`` logits (ties go to the lowest index), softmax over the selected logits, times
beta = sigmoid(write_gate). The backward kernel gives the gradient wrt the logits (zero off the
selected slots, as in mixture-of-experts routing) and wrt the gate.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import compute_dtype
from .device import compute_tl_dtype, pow2, row_warps


@triton.jit
def _topk_row(x, offs, S, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """``TOP_K`` rounds of argmax over ``x [BLOCK_S]`` (entries ``>= S`` ignored).

    Returns ``(vals [BLOCK_K], idx [BLOCK_K] int32)`` in descending order of value; ties go to the
    lowest index; entries ``>= TOP_K`` are -inf / 0.
    """
    BLOCK_S: tl.constexpr = x.shape[0]
    kk = tl.arange(0, BLOCK_K)
    taken = offs >= S
    vals = tl.full([BLOCK_K], float("-inf"), x.dtype)
    idx = tl.zeros([BLOCK_K], tl.int32)
    for j in range(TOP_K):
        xm = tl.where(taken, float("-inf"), x)
        m = tl.max(xm, axis=0)
        i = tl.min(tl.where((~taken) & (xm == m), offs, BLOCK_S), axis=0)
        taken = taken | (offs == i)
        vals = tl.where(kk == j, m, vals)
        idx = tl.where(kk == j, i, idx)
    return vals, idx


@triton.jit
def _route_weights(vals, gate, TOP_K: tl.constexpr):
    """Softmax over the selected logits ``vals [BLOCK_K]`` and beta = sigmoid(gate).

    Returns ``(alpha [BLOCK_K], beta)``; alpha is 0 at the padding entries.
    """
    kk = tl.arange(0, vals.shape[0])
    valid = kk < TOP_K
    vm = tl.where(valid, vals, float("-inf"))
    e = tl.where(valid, tl.exp(vm - tl.max(vm, axis=0)), 0.0)
    alpha = e / tl.sum(e, axis=0)
    beta = 1.0 / (1.0 + tl.exp(-gate))
    return alpha, beta


@triton.jit
def _route_fwd_kernel(logits_ptr, gate_ptr, idx_ptr, w_ptr, S,
                      TOP_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                      DT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_S)
    x = tl.load(logits_ptr + row * S + offs, mask=offs < S, other=0.0).to(DT)
    g = tl.load(gate_ptr + row).to(DT)
    vals, idx = _topk_row(x, offs, S, TOP_K, BLOCK_K)
    alpha, beta = _route_weights(vals, g, TOP_K)
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < TOP_K
    tl.store(idx_ptr + row * TOP_K + kk, idx.to(tl.int64), mask=kmask)
    tl.store(w_ptr + row * TOP_K + kk, (alpha * beta).to(w_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def _route_bwd_kernel(logits_ptr, gate_ptr, idx_ptr, dw_ptr, dlogits_ptr, dgate_ptr, S,
                      TOP_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                      DT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < TOP_K
    idx = tl.load(idx_ptr + row * TOP_K + kk, mask=kmask, other=0)
    vals = tl.load(logits_ptr + row * S + idx, mask=kmask, other=0.0).to(DT)
    g = tl.load(gate_ptr + row).to(DT)
    dw = tl.load(dw_ptr + row * TOP_K + kk, mask=kmask, other=0.0).to(DT)
    alpha, beta = _route_weights(vals, g, TOP_K)
    # w_j = alpha_j * beta: d alpha_j = dw_j beta, d logit_j = alpha_j (d alpha_j - sum_l alpha_l d alpha_l)
    dalpha = dw * beta
    dsel = alpha * (dalpha - tl.sum(alpha * dalpha, axis=0))
    dgate = tl.sum(dw * alpha, axis=0) * beta * (1.0 - beta)
    offs = tl.arange(0, BLOCK_S)
    hit = (offs[:, None] == idx[None, :].to(tl.int32)) & kmask[None, :]
    drow = tl.sum(tl.where(hit, dsel[None, :], 0.0), axis=1)
    tl.store(dlogits_ptr + row * S + offs, drow.to(dlogits_ptr.dtype.element_ty), mask=offs < S)
    tl.store(dgate_ptr + row, dgate.to(dgate_ptr.dtype.element_ty))


def _blocks(S: int, top_k: int):
    return pow2(S, 16), pow2(top_k, 2)


def route_forward(logits2d: torch.Tensor, gate1d: torch.Tensor, top_k: int):
    """Launcher: ``logits2d [N, S]``, ``gate1d [N]`` (contiguous) -> ``(idx [N, k], w [N, k])``."""
    N, S = logits2d.shape
    dt = compute_dtype(logits2d.dtype)
    idx = torch.empty(N, top_k, dtype=torch.int64, device=logits2d.device)
    w = torch.empty(N, top_k, dtype=dt, device=logits2d.device)
    if N == 0:
        return idx, w
    BS, BK = _blocks(S, top_k)
    _route_fwd_kernel[(N,)](logits2d, gate1d, idx, w, S, TOP_K=top_k, BLOCK_S=BS, BLOCK_K=BK,
                            DT=compute_tl_dtype(logits2d.dtype), num_warps=row_warps(BS))
    return idx, w


def route_backward(logits2d, gate1d, idx, dw, top_k: int):
    """Launcher of the backward: -> ``(dlogits [N, S], dgate [N])`` in the inputs' dtypes."""
    N, S = logits2d.shape
    dlogits = torch.empty_like(logits2d)
    dgate = torch.empty_like(gate1d)
    if N == 0:
        return dlogits, dgate
    BS, BK = _blocks(S, top_k)
    _route_bwd_kernel[(N,)](logits2d, gate1d, idx, dw.contiguous(), dlogits, dgate, S,
                            TOP_K=top_k, BLOCK_S=BS, BLOCK_K=BK,
                            DT=compute_tl_dtype(logits2d.dtype), num_warps=row_warps(BS))
    return dlogits, dgate


class SparseRouteFunction(torch.autograd.Function):
    """``(route_logits [N, S], write_gate [N], top_k) -> (indices [N, k], weights [N, k])``."""

    @staticmethod
    def forward(ctx, logits2d, gate1d, top_k):
        logits2d, gate1d = logits2d.contiguous(), gate1d.contiguous()
        idx, w = route_forward(logits2d, gate1d, top_k)
        ctx.save_for_backward(logits2d, gate1d, idx)
        ctx.top_k = top_k
        ctx.mark_non_differentiable(idx)
        return idx, w

    @staticmethod
    def backward(ctx, didx, dw):
        logits2d, gate1d, idx = ctx.saved_tensors
        if dw is None:
            return None, None, None
        dlogits, dgate = route_backward(logits2d, gate1d, idx, dw, ctx.top_k)
        return dlogits, dgate, None


def triton_sparse_route(route_logits: torch.Tensor, write_gate: torch.Tensor, top_k: int):
    """Top-k routing in Triton; same results as ``nstm_kernels.routing.route_torch``.

    ``route_logits [..., S]``, ``write_gate [...]`` -> ``(indices [..., top_k] int64,
    weights [..., top_k])`` with indices in descending order of logit and weights in fp32 (fp64 for
    fp64 logits). Differentiable wrt both inputs.
    """
    lead = route_logits.shape[:-1]
    S = route_logits.shape[-1]
    idx, w = SparseRouteFunction.apply(route_logits.reshape(-1, S), write_gate.reshape(-1), top_k)
    return idx.view(*lead, top_k), w.view(*lead, top_k)
