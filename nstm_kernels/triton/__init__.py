"""Triton kernels of the NSTM operator (spec §4). Imported lazily by ``nstm_kernels.dispatch``.

Files: ``ops.py`` (the entry point ``triton_nstm``: routing, then the chunk or the recurrent
forward and their backwards), ``chunk.py`` (the chunk-parallel forward of spec §4),
``chunk_bwd.py`` (the chunk-parallel backward), ``recurrent.py`` (the fused recurrent forward and
the reverse-segment backward), ``routing.py`` (fused top-k routing, fwd + bwd), ``s2s.py``
(state-to-state attention, fwd + bwd, and the tiles the sequence kernels fuse), ``step.py`` (the
one-token decode step), ``utils.py`` (what they share: jit tile helpers, launch settings, the
chunk layout, the backward set-up), ``device.py`` (device facts: block sizes, num_warps).
Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from .ops import triton_nstm
from .routing import triton_sparse_route
from .s2s import triton_state_attention
from .step import triton_nstm_step

__all__ = ["triton_sparse_route", "triton_state_attention", "triton_nstm_step", "triton_nstm"]
