"""Sparse top-k routing in Triton (spec §2 step 1, §4: one fused kernel over all tokens).

One program per block of rows of logits (each row a (batch, time, head) token): ``top_k`` rounds of argmax over the
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
from .utils import launch, on_device


@triton.jit
def _topk_rows(x, offs, S, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """``TOP_K`` rounds of argmax over each row of ``x [BLOCK_N, BLOCK_S]`` (columns ``>= S``
    ignored; ``offs`` = ``tl.arange(0, BLOCK_S)``).

    Returns ``(vals, idx)``, both ``[BLOCK_N, BLOCK_K]`` (idx int32), in descending order of value;
    ties go to the lowest index; columns ``>= TOP_K`` are -inf / 0. A row with a NaN logit selects
    it first and returns NaN values (its weights become NaN, as in the PyTorch paths).
    """
    BLOCK_S: tl.constexpr = x.shape[1]
    kk = tl.arange(0, BLOCK_K)[None, :]
    cols = offs[None, :]
    isnan = (x != x) & (cols < S)
    row_nan = tl.max(isnan.to(tl.int32), axis=1)[:, None] > 0
    x = tl.where(isnan, float("inf"), x)          # a NaN ranks first (as in torch.sort) ...
    taken = tl.broadcast_to(cols >= S, [x.shape[0], BLOCK_S])   # loop-carried: full shape
    vals = tl.full([x.shape[0], BLOCK_K], float("-inf"), x.dtype)
    idx = tl.zeros([x.shape[0], BLOCK_K], tl.int32)
    for j in range(TOP_K):
        xm = tl.where(taken, float("-inf"), x)
        m = tl.max(xm, axis=1)[:, None]
        i = tl.min(tl.where((~taken) & (xm == m), cols, BLOCK_S), axis=1)[:, None]
        i = tl.minimum(i, S - 1)   # stay in bounds
        taken = taken | (cols == i)
        vals = tl.where(kk == j, m, vals)
        idx = tl.where(kk == j, i, idx)
    return tl.where(row_nan, float("nan"), vals), idx   # ... and makes the token's weights NaN


@triton.jit
def _route_weights(vals, gate, TOP_K: tl.constexpr):
    """Softmax over the selected logits ``vals [BLOCK_N, BLOCK_K]`` and beta = sigmoid(gate)
    (``gate [BLOCK_N]``). Returns ``(alpha [BLOCK_N, BLOCK_K], beta [BLOCK_N, 1])``; alpha is 0 at
    the padding columns."""
    kk = tl.arange(0, vals.shape[1])[None, :]
    valid = kk < TOP_K
    vm = tl.where(valid, vals, float("-inf"))
    e = tl.where(valid, tl.exp(vm - tl.max(vm, axis=1)[:, None]), 0.0)
    alpha = e / tl.sum(e, axis=1)[:, None]
    beta = 1.0 / (1.0 + tl.exp(-gate[:, None]))
    return alpha, beta


@triton.jit
def _route_fwd_kernel(logits_ptr, gate_ptr, idx_ptr, w_ptr, N, S,
                      TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_K: tl.constexpr, DT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    offs = tl.arange(0, BLOCK_S)
    x = tl.load(logits_ptr + rows[:, None] * S + offs[None, :],
                mask=rmask[:, None] & (offs[None, :] < S), other=0.0).to(DT)
    g = tl.load(gate_ptr + rows, mask=rmask, other=0.0).to(DT)
    vals, idx = _topk_rows(x, offs, S, TOP_K, BLOCK_K)
    alpha, beta = _route_weights(vals, g, TOP_K)
    kk = tl.arange(0, BLOCK_K)[None, :]
    m = rmask[:, None] & (kk < TOP_K)
    o = rows[:, None] * TOP_K + kk
    tl.store(idx_ptr + o, idx.to(tl.int64), mask=m)
    tl.store(w_ptr + o, (alpha * beta).to(w_ptr.dtype.element_ty), mask=m)


@triton.jit
def _route_bwd_kernel(logits_ptr, gate_ptr, idx_ptr, dw_ptr, dlogits_ptr, dgate_ptr, N, S,
                      TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_K: tl.constexpr, DT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    kk = tl.arange(0, BLOCK_K)[None, :]
    m = rmask[:, None] & (kk < TOP_K)
    o = rows[:, None] * TOP_K + kk
    idx = tl.load(idx_ptr + o, mask=m, other=0)
    vals = tl.load(logits_ptr + rows[:, None] * S + idx, mask=m, other=0.0).to(DT)
    g = tl.load(gate_ptr + rows, mask=rmask, other=0.0).to(DT)
    dw = tl.load(dw_ptr + o, mask=m, other=0.0).to(DT)
    alpha, beta = _route_weights(vals, g, TOP_K)
    # w_j = alpha_j * beta: d alpha_j = dw_j beta, d logit_j = alpha_j (d alpha_j - sum_l alpha_l d alpha_l)
    dalpha = dw * beta
    dsel = alpha * (dalpha - tl.sum(alpha * dalpha, axis=1)[:, None])
    dgate = tl.sum(dw * alpha, axis=1) * tl.reshape(beta * (1.0 - beta), [BLOCK_N])
    offs = tl.arange(0, BLOCK_S)
    # scatter the TOP_K selected gradients into the row: [BLOCK_N, BLOCK_S, BLOCK_K] one-hot
    hit = (offs[None, :, None] == idx.to(tl.int32)[:, None, :]) & m[:, None, :]
    drow = tl.sum(tl.where(hit, dsel[:, None, :], 0.0), axis=2)
    tl.store(dlogits_ptr + rows[:, None] * S + offs[None, :],
             drow.to(dlogits_ptr.dtype.element_ty), mask=rmask[:, None] & (offs[None, :] < S))
    tl.store(dgate_ptr + rows, dgate.to(dgate_ptr.dtype.element_ty), mask=rmask)


def _blocks(S: int, top_k: int):
    BS = pow2(S, 16)
    BN = max(1, min(16, 2048 // BS))      # rows per program: about 2K logits on chip
    return BN, BS, pow2(top_k, 2)


def route_forward(logits2d: torch.Tensor, gate1d: torch.Tensor, top_k: int):
    """Launcher: ``logits2d [N, S]``, ``gate1d [N]`` (contiguous) -> ``(idx [N, k], w [N, k])``."""
    N, S = logits2d.shape
    dt = compute_dtype(logits2d.dtype)
    idx = torch.empty(N, top_k, dtype=torch.int64, device=logits2d.device)
    w = torch.empty(N, top_k, dtype=dt, device=logits2d.device)
    if N == 0:
        return idx, w
    BN, BS, BK = _blocks(S, top_k)
    with on_device(logits2d):
        launch(_route_fwd_kernel, (triton.cdiv(N, BN),),
            logits2d, gate1d, idx, w, N, S, TOP_K=top_k, BLOCK_N=BN, BLOCK_S=BS, BLOCK_K=BK,
            DT=compute_tl_dtype(logits2d.dtype), num_warps=row_warps(BN * BS))
    return idx, w


def route_backward(logits2d, gate1d, idx, dw, top_k: int):
    """Launcher of the backward: -> ``(dlogits [N, S], dgate [N])`` in the inputs' dtypes."""
    N, S = logits2d.shape
    dlogits = torch.empty_like(logits2d)
    dgate = torch.empty_like(gate1d)
    if N == 0:
        return dlogits, dgate
    BN, BS, BK = _blocks(S, top_k)
    with on_device(logits2d):
        launch(_route_bwd_kernel, (triton.cdiv(N, BN),),
            logits2d, gate1d, idx, dw.contiguous(), dlogits, dgate, N, S, TOP_K=top_k, BLOCK_N=BN,
            BLOCK_S=BS, BLOCK_K=BK, DT=compute_tl_dtype(logits2d.dtype),
            num_warps=row_warps(BN * BS * BK // 4))
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
