"""Triton kernels of the NSTM operator (spec §4). Imported lazily by ``nstm_kernels.api``.

Files: ``routing.py`` (fused top-k routing, fwd + bwd), ``s2s.py`` (state-to-state attention, fwd +
bwd, and the tile helpers the other kernels fuse), ``step.py`` (the one-token decode step),
``recurrent.py`` (the sequence operator: fused recurrent forward, reverse-time backward, and
``triton_nstm``), ``chunk.py`` (the chunk-parallel forward of spec §4, the default forward of
``triton_nstm``; ``NSTM_TRITON_FWD=recurrent`` or ``forward="recurrent"`` picks the other),
``device.py`` (device facts: block sizes, num_warps, dot precision).
Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from .recurrent import triton_nstm
from .routing import triton_sparse_route
from .s2s import triton_state_attention
from .step import triton_nstm_step

__all__ = ["triton_sparse_route", "triton_state_attention", "triton_nstm_step", "triton_nstm"]
