"""nstm-kernels: fused kernels for the Neural State Transition Machine (NSTM) operator.

Public API (spec §3)::

    nstm_attention(q, k, v, route_logits, write_gate, top_k, s2s=None, comm_every=64,
                   initial_state=None, output_final_state=False, scale=None, backend=None)
    nstm_step(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state, scale=None)
    nstm_step_(..., state_k, state_v, pos, scale=None)   # the in-place step, for static decoding
    sparse_route(route_logits, write_gate, top_k)
    state_attention(v_state, s2s)
    NSTMState, S2SParams
"""
from .api import (
                  nstm_attention,
                  nstm_attention_with_maps,
                  nstm_step,
                  nstm_step_,
                  sparse_route,
                  state_attention,
)
from .dispatch import BACKENDS, resolve_backend
from .state import NSTMState, S2SParams

__version__ = "0.2.0"

__all__ = [
    "nstm_attention", "nstm_step", "nstm_step_", "sparse_route", "state_attention",
    "nstm_attention_with_maps", "NSTMState", "S2SParams", "BACKENDS", "resolve_backend", "__version__",
]
