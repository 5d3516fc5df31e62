"""The PyTorch paths: the chunk-parallel sequence operator and the sparse one-token step."""
from .chunk import chunk_nstm
from .recurrent import recurrent_nstm_step, recurrent_nstm_step_

__all__ = ["chunk_nstm", "recurrent_nstm_step", "recurrent_nstm_step_"]
