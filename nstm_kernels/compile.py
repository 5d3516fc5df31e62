"""``torch.compile`` support: the sequence operator as a registered custom op.

Inside a compiled region ``nstm_attention`` calls ``torch.ops.nstm_kernels.attention`` instead of
the backend directly. Dynamo then sees one opaque node with a fake (meta) implementation that gives
the output shapes, so a model that uses the operator compiles with ``fullgraph=True`` and the rest
of the model is still fused around it. Eager calls never come through here.

The op always returns the final state (cheap: it is computed anyway); ``nstm_attention`` drops it
when the caller did not ask for it. Its backward is a second custom op that reruns the forward
with autograd on and differentiates it: the forward inside the graph therefore saves nothing but
its inputs (like activation checkpointing of the operator), at the price of one extra forward in
the backward pass.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch

from . import dispatch
from .state import NSTMState, S2SParams
from .utils import compute_dtype

Tensor = torch.Tensor

# the positions of the differentiable tensor inputs in the op's argument list
_N_TENSORS = 10   # q, k, v, route_logits, write_gate, k0, v0, w_q, w_k, gate


@contextlib.contextmanager
def _autograd_below_dispatch():
    """Turn autograd back on inside a custom op's kernel.

    A custom op's implementation runs below the autograd dispatch keys (the dispatcher excludes
    them), so ``torch.enable_grad()`` alone records nothing there. The backward op needs a real
    autograd graph of the backend to differentiate, so it lifts that exclusion for the duration of
    the recompute and restores it afterwards.
    """
    D = torch._C.DispatchKey
    keys = [getattr(D, n) for n in ("AutogradFunctionality", "AutogradOther",
                                    "AutogradNestedTensor", "ADInplaceOrView") if hasattr(D, n)]
    prev = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in keys]
    for key in keys:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for key, was in zip(keys, prev):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, was)


def _unaliased(outs, ins):
    """``outs`` with clones where a tensor shares storage with an input or an earlier output: a
    custom op's outputs may alias neither (the backends may return views of one buffer, autograd
    may pass a gradient through unchanged)."""
    seen = {t.untyped_storage().data_ptr() for t in ins if t is not None and t.numel()}
    res = []
    for x in outs:
        if x.numel():
            if x.untyped_storage().data_ptr() in seen:
                x = x.clone()
            seen.add(x.untyped_storage().data_ptr())
        res.append(x)
    return res


def _run(tensors: Sequence[Optional[Tensor]], top_k: int, comm_every: int, pos: int,
         scale: float, backend: str):
    q, k, v, logits, gate, k0, v0, wq, wk, g = tensors
    state = None if k0 is None else NSTMState(k0, v0, pos)
    s2s = None if wq is None else S2SParams(wq, wk, g)
    fn = dispatch.impl("nstm_attention", backend)
    o, st = fn(q, k, v, logits, gate, top_k, s2s, comm_every, state, True, scale)
    return o, st.k, st.v


@torch.library.custom_op("nstm_kernels::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, route_logits: Tensor, write_gate: Tensor,
                 k0: Optional[Tensor], v0: Optional[Tensor], w_q: Optional[Tensor],
                 w_k: Optional[Tensor], gate: Optional[Tensor],
                 top_k: int, comm_every: int, pos: int, scale: float,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """``(o [B,T,H,V], final K̂ [B,H,S,K], final V̂ [B,H,S,V])`` of the operator on ``backend``."""
    with torch.no_grad():
        o, fk, fv = _run((q, k, v, route_logits, write_gate, k0, v0, w_q, w_k, gate),
                         top_k, comm_every, pos, scale, backend)
    ins = (q, k, v, route_logits, write_gate, k0, v0, w_q, w_k, gate)
    return tuple(_unaliased((o.contiguous(), fk.contiguous(), fv.contiguous()), ins))


@attention_op.register_fake
def _attention_fake(q, k, v, route_logits, write_gate, k0, v0, w_q, w_k, gate, top_k,
                    comm_every, pos, scale, backend):
    B, T, H, K = q.shape
    V, S = v.shape[-1], route_logits.shape[-1]
    sd = compute_dtype(q.dtype)
    return (q.new_empty(B, T, H, V), q.new_empty(B, H, S, K, dtype=sd),
            q.new_empty(B, H, S, V, dtype=sd))


@torch.library.custom_op("nstm_kernels::attention_backward", mutates_args=())
def attention_backward_op(q: Tensor, k: Tensor, v: Tensor, route_logits: Tensor,
                          write_gate: Tensor, k0: Optional[Tensor], v0: Optional[Tensor],
                          w_q: Optional[Tensor], w_k: Optional[Tensor],
                          gate: Optional[Tensor], d_o: Tensor, d_k: Tensor, d_v: Tensor,
                          top_k: int, comm_every: int, pos: int, scale: float,
                          backend: str) -> List[Tensor]:
    """Gradients of ``attention_op`` for its 10 tensor inputs (an empty tensor for an absent one)."""
    ins = (q, k, v, route_logits, write_gate, k0, v0, w_q, w_k, gate)
    with _autograd_below_dispatch():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in ins]
        outs = _run(leaves, top_k, comm_every, pos, scale, backend)
        present = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(outs, present, (d_o, d_k, d_v), allow_unused=True)
    it = iter(grads)
    res = []
    for t in ins:
        if t is None:
            res.append(q.new_empty(0))  # a placeholder: this input was absent
            continue
        g_t = next(it)
        res.append(t.new_zeros(t.shape) if g_t is None else g_t.contiguous())
    return _unaliased(res, ins + (d_o, d_k, d_v))


@attention_backward_op.register_fake
def _attention_backward_fake(q, k, v, route_logits, write_gate, k0, v0, w_q, w_k, gate,
                             d_o, d_k, d_v, top_k, comm_every, pos, scale, backend):
    ins = (q, k, v, route_logits, write_gate, k0, v0, w_q, w_k, gate)
    return [q.new_empty(0) if t is None else t.new_empty(t.shape) for t in ins]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*[t for t in inputs[:_N_TENSORS] if t is not None])
    ctx.present = [t is not None for t in inputs[:_N_TENSORS]]
    ctx.consts = inputs[_N_TENSORS:]


def _backward(ctx, d_o, d_k, d_v):
    saved = iter(ctx.saved_tensors)
    ins = [next(saved) if p else None for p in ctx.present]
    q = ins[0]
    o_shape = (*q.shape[:3], ins[2].shape[-1])
    sd = compute_dtype(q.dtype)
    B, H, S, K, V = q.shape[0], q.shape[2], ins[3].shape[-1], q.shape[-1], ins[2].shape[-1]
    d_o = torch.zeros(o_shape, dtype=q.dtype, device=q.device) if d_o is None else d_o.contiguous()
    d_k = torch.zeros(B, H, S, K, dtype=sd, device=q.device) if d_k is None else d_k.contiguous()
    d_v = torch.zeros(B, H, S, V, dtype=sd, device=q.device) if d_v is None else d_v.contiguous()
    grads = attention_backward_op(*ins, d_o, d_k, d_v, *ctx.consts)
    return tuple(g if p else None for g, p in zip(grads, ctx.present)) + (None,) * len(ctx.consts)


attention_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_attention(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, initial_state,
                       output_final_state, scale, backend: str):
    """``nstm_attention`` through the custom op (called by ``nstm_attention`` while compiling)."""
    k0 = v0 = None
    pos = 0
    if initial_state is not None:
        k0, v0, pos = initial_state.k, initial_state.v, int(initial_state.pos)
    wq = wk = g = None
    if s2s is not None:
        wq, wk, g = s2s
    sc = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, fk, fv = attention_op(q, k, v, route_logits, write_gate, k0, v0, wq, wk, g,
                             top_k, comm_every, pos, sc, backend)
    final = NSTMState(fk, fv, pos + q.shape[1]) if output_final_state else None
    return o, final
