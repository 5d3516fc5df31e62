"""``triton_nstm``: the NSTM sequence operator on the Triton kernels (the entry point).

Routing runs first (the fused top-k kernel of ``routing.py``, whose autograd Function turns the
gradient wrt the write weights into gradients wrt the logits and the write gate), then one of two
forwards, each with a backward behind it:

* ``forward="chunk"`` (default): the chunk-parallel forward of ``chunk.py``; its backward is the
  chunk-parallel one of ``chunk_bwd.py`` (``backward="chunk"``, default) or the reverse-segment
  kernel of ``recurrent.py`` (``backward="recurrent"``): both start from the stored chunk-entry
  states.
* ``forward="recurrent"``: the fused recurrent forward of ``recurrent.py`` and its reverse-segment
  backward.

The environment variables ``NSTM_TRITON_FWD``, ``NSTM_TRITON_BWD`` and ``NSTM_TRITON_DOT``
override arguments left at None (``nstm_kernels.settings``, read at call time).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import settings
from ..chunked import chunk_nstm
from ..state import NSTMState, S2SParams
from ..utils import compute_dtype
from ..varlen import final_pos, needs_segments, segments
from .chunk import chunk_forward
from .chunk_bwd import chunk_backward
from .device import chunk_length, segment_length
from .fallback import run_or_fall_back, tell
from .recurrent import NSTMRecurrentFunction, recurrent_backward
from .routing import SparseRouteFunction
from .s2s import pack_weights
from .utils import DoesNotFit, check_backward_fits, dense_layout, keep_for_backward, layout, resolve_dot_precision


class NSTMChunkFunction(torch.autograd.Function):
    """Same inputs and outputs as ``NSTMRecurrentFunction``; the forward is the chunk-parallel one.

    The backward (``opts[2]``: "chunk" or "recurrent") is ``chunk_bwd.chunk_backward`` or
    ``recurrent.recurrent_backward``; both take the same saved tensors: the chunk-entry states are
    the segment-entry states of the reverse-segment backward (chunks are its segments: every s2s
    event ends one, none is longer than ``chunk_length()``).
    """

    @staticmethod
    def forward(ctx, q, k, v, w, k0, v0, wq, wk, mix, idx, top_k, lay, scale, store, opts):
        o, fk, fv, bk, bv = chunk_forward(q, k, v, w, idx, k0, v0, wq, wk, mix, top_k, lay, scale,
                                          opts[1])
        if store:
            saved, cfg = (q, k, v, w, idx, bk, bv, wq, wk, mix), (top_k, scale, k0.shape[2])
            if opts[2] == "chunk":
                try:
                    check_backward_fits(chunk_backward, saved, cfg, lay, opts, o)
                except DoesNotFit as e:   # the reverse-segment backward takes the same saved tensors
                    tell("nstm_attention", e, "the recurrent Triton backward")
                    opts = opts[:2] + ("recurrent",)
            keep_for_backward(ctx, chunk_backward if opts[2] == "chunk" else recurrent_backward,
                              saved, cfg, lay, opts, o)
        ctx.stored = store
        ctx.opts = opts
        return o, fk, fv

    @staticmethod
    def backward(ctx, do, dkf, dvf):
        if ctx.opts[2] == "chunk":
            return chunk_backward(ctx, do, dkf, dvf)
        return recurrent_backward(ctx, do, dkf, dvf)


def triton_nstm(q, k, v, route_logits, write_gate, top_k: int, s2s: Optional[S2SParams] = None,
                comm_every: int = 64, initial_state: Optional[NSTMState] = None,
                output_final_state: bool = False, scale: Optional[float] = None,
                forward: Optional[str] = None, backward: Optional[str] = None,
                dot_precision: Optional[str] = None, cu_seqlens=None):
    """The NSTM operator in Triton; same signature and results as ``naive_recurrent_nstm``
    (without ``return_maps``). Differentiable wrt q, k, v, route_logits, write_gate, the initial
    state and every field of ``s2s``.

    Args (beyond the operator's):
        forward: ``"chunk"`` (default, chunk-parallel) or ``"recurrent"``; None reads
            ``NSTM_TRITON_FWD``.
        backward: the backward behind the chunk forward, ``"chunk"`` (default) or
            ``"recurrent"``; None reads ``NSTM_TRITON_BWD``. The recurrent forward always takes
            the recurrent backward.
        dot_precision: fp32 ``tl.dot`` precision, "ieee", "tf32" or "tf32x3"; None reads
            ``NSTM_TRITON_DOT``, else "tf32x3" for the recurrent kernels and "ieee" for the chunk
            passes (``utils.resolve_dot_precision``).
        cu_seqlens: a packed batch (B = 1). Packed batches and per-row positions take the same
            launches as a plain batch: every pass runs once over all sequences (``utils.layout``
            lays their chunks on the flattened token axis), with no loop over the sequences.
    """
    def slow():
        return chunk_nstm(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, initial_state,
                          output_final_state, scale, cu_seqlens=cu_seqlens)
    return run_or_fall_back("nstm_attention", lambda: _triton_nstm(
        q, k, v, route_logits, write_gate, top_k, s2s, comm_every, initial_state, output_final_state,
        scale, forward, backward, dot_precision, cu_seqlens), slow)


def _triton_nstm(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, initial_state,
                 output_final_state, scale, forward, backward, dot_precision, cu_seqlens):
    fwd = settings.triton_forward(forward)
    bwd = settings.triton_backward(backward) if fwd == "chunk" else "recurrent"
    B, T, H, K = q.shape
    V, S = v.shape[-1], route_logits.shape[-1]
    dt = compute_dtype(q.dtype)
    dev = q.device
    opts = (resolve_dot_precision(dt, dev, chunk=False, kind=dot_precision),
            resolve_dot_precision(dt, dev, chunk=True, kind=dot_precision), bwd)
    scale = K ** -0.5 if scale is None else float(scale)
    has_s2s = s2s is not None
    L = chunk_length() if fwd == "chunk" else segment_length()
    seg = None
    if needs_segments(initial_state, cu_seqlens):   # packed, or one position per row
        seg = segments(B, T, initial_state, cu_seqlens)
        lay = layout(seg.starts, seg.lengths, seg.pos, comm_every, has_s2s, L, dev)
        pos = None
    else:
        pos = 0 if initial_state is None else int(initial_state.pos)
        lay = dense_layout(B, T, pos, comm_every, has_s2s, L, dev)
    N = lay.N
    if dt == torch.float64:   # float64 q, k, v: everything in float64, the routing too
        route_logits, write_gate = route_logits.to(dt), write_gate.to(dt)
    idx, w = SparseRouteFunction.apply(route_logits.reshape(-1, S), write_gate.reshape(-1), top_k)
    idx, w = idx.view(B, T, H, top_k), w.view(B, T, H, top_k)
    if initial_state is not None:
        k0, v0 = initial_state.k.to(dt).contiguous(), initial_state.v.to(dt).contiguous()
    else:
        k0 = torch.zeros(N, H, S, K, dtype=dt, device=dev)
        v0 = torch.zeros(N, H, S, V, dtype=dt, device=dev)
    if s2s is not None:
        wq, wk, mix = pack_weights(s2s, dt)
    else:
        wq = wk = mix = None
    tensors = [q, k, v, w, k0, v0] + ([wq, wk, mix] if s2s is not None else [])
    store = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    fn = NSTMChunkFunction if fwd == "chunk" else NSTMRecurrentFunction
    o, fk, fv = fn.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), w, k0, v0, wq, wk, mix, idx,
        top_k, lay, scale, store, opts)
    final = None
    if output_final_state:
        if seg is None:
            final = NSTMState(fk, fv, pos + T)
        else:
            final = NSTMState(fk, fv, final_pos(seg, None if initial_state is None else initial_state.pos))
    return o, final
