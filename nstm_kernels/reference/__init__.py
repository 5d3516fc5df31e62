"""Reference (token-by-token) NSTM: the ground truth every backend is tested against."""
from .naive import naive_nstm_step, naive_recurrent_nstm

__all__ = ["naive_recurrent_nstm", "naive_nstm_step"]
