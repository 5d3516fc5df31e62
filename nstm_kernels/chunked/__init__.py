"""Chunk-parallel NSTM in PyTorch, and the sparse one-token step."""
from .chunk import chunk_nstm
from .recurrent import recurrent_nstm_step

__all__ = ["chunk_nstm", "recurrent_nstm_step"]
