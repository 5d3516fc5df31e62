"""Which backend runs which op: the one table, and the one place that picks from it.

``TABLE[op][backend]`` is the function that runs ``op`` (its public name: ``"nstm_attention"``,
``"nstm_step"``, ...) on ``backend``. Every entry point of the package (``nstm_kernels.api``,
the ``torch.compile`` op in ``nstm_kernels.compile``, the layer's in-place decode step) asks
``lookup(op, backend, device)`` and nothing else.

Order of choice: the ``backend=`` argument, else the ``NSTM_BACKEND`` environment variable (read
at call time in ``nstm_kernels.settings``), else ``DEFAULTS`` for the tensors' device. A backend
that cannot run here (no Triton, no GPU, no compiler) falls back with one log line, never to a
silent wrong answer: ``"cuda"`` to ``"triton"`` when Triton runs on the (CUDA) tensors, else to
``"chunked"``; ``"triton"`` to ``"chunked"``. A backend without an entry for an op runs the op's
``"chunked"`` entry (the CUDA C++ extension implements the one-token step only; the sequence ops
with ``backend="cuda"`` run the chunked path, as documented in the README).

``"chunked"`` on CPU tensors runs the C++ CPU kernel (``nstm_kernels.cpu``, built on first use)
and falls back to the PyTorch chunk form (``nstm_kernels.chunked``) where it cannot be built.

Fast paths are defaults only once their GPU tests have passed on a real GPU: until then CUDA
tensors default to ``"chunked"``, and ``"triton"`` / ``"cuda"`` are opt-in.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Callable, Dict, Optional, Tuple

import torch

from . import settings
from .cpu import chunked_nstm, chunked_nstm_step, chunked_nstm_step_, chunked_sparse_route
from .reference import naive_nstm_step, naive_recurrent_nstm
from .routing import route_torch
from .s2s import state_attention_torch
from .settings import BACKENDS

logger = logging.getLogger("nstm_kernels")

__all__ = ["BACKENDS", "TABLE", "DEFAULTS", "impl", "lookup", "resolve_backend", "triton_interpret"]


class _Lazy:
    """A function of an optional module (Triton, the CUDA extension), imported on first call, so
    that the core never needs Triton or a compiler."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.module}.{self.name}>"


_TRITON = "nstm_kernels.triton"
_CUDA = "nstm_kernels.cuda"

# op -> backend -> function. Signatures per op are those of the "chunked" entry.
TABLE: Dict[str, Dict[str, Callable]] = {
    # (q, k, v, route_logits, write_gate, top_k, s2s, comm_every, initial_state,
    #  output_final_state, scale) -> (o, final_state)
    "nstm_attention": {"reference": naive_recurrent_nstm, "chunked": chunked_nstm,
                  "triton": _Lazy(_TRITON, "triton_nstm")},
    # the same, plus the maps: -> (o, final_state, maps); the PyTorch paths only
    "nstm_attention_with_maps": {"reference": naive_recurrent_nstm, "chunked": chunked_nstm},
    # one token, functional: (q, k, v, logits, gate, top_k, s2s, C, state, scale) -> (o, state)
    "nstm_step": {"reference": naive_nstm_step, "chunked": chunked_nstm_step,
             "triton": _Lazy(_TRITON, "triton_nstm_step"), "cuda": _Lazy(_CUDA, "cuda_nstm_step")},
    # one token, in place: (q, k, v, logits, gate, top_k, s2s, C, state_k, state_v, pos, scale) -> o
    "nstm_step_": {"chunked": chunked_nstm_step_, "cuda": _Lazy(_CUDA, "cuda_nstm_step_")},
    # (route_logits, write_gate, top_k) -> (indices, weights)
    "sparse_route": {"reference": route_torch, "chunked": chunked_sparse_route,
              "triton": _Lazy(_TRITON, "triton_sparse_route")},
    # (v_state, s2s) -> mixed v_state
    "state_attention": {"reference": state_attention_torch, "chunked": state_attention_torch,
                        "triton": _Lazy(_TRITON, "triton_state_attention")},
}

# The backend an op gets with no argument and no NSTM_BACKEND, per device type. The Triton kernels
# and the CUDA step have not yet passed their GPU grid on a real GPU, so CUDA tensors get the
# chunked PyTorch path until they have.
DEFAULTS: Dict[str, str] = {"cpu": "chunked", "cuda": "chunked"}

_warned = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


def triton_interpret() -> bool:
    return settings.triton_interpret()


def _triton_reason(device: torch.device) -> Optional[str]:
    """Why the Triton backend cannot run on ``device`` (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if importlib.util.find_spec(_TRITON) is None:
        return "this build has no Triton kernels"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and settings.triton_interpret():
        return None
    return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"


def _cuda_reason(device: torch.device, op: str) -> Optional[str]:
    if device.type != "cuda":
        return f"the CUDA step kernel needs CUDA tensors, got {device.type}"
    if importlib.util.find_spec(_CUDA) is None:
        return "this build has no CUDA C++ kernels"
    if "cuda" in TABLE.get(op, {}):   # an op with a CUDA C++ kernel: build it now (cached) or say why not
        from .cuda import unavailable_reason
        return unavailable_reason(device)
    return None


_REASONS = {"triton": lambda device, op: _triton_reason(device), "cuda": _cuda_reason}


def resolve_backend(backend: Optional[str], device: torch.device, op: str) -> str:
    """The backend that will run ``op`` (a key of ``TABLE``, the public name of the op) for tensors
    on ``device``."""
    source = "backend"
    if backend is None:
        env = settings.backend_override()
        if env is not None:
            backend, source = env, "NSTM_BACKEND"
    if backend is None:
        return DEFAULTS.get(device.type, "chunked")
    if not isinstance(backend, str):
        raise TypeError(f"{source} must be a str, one of {BACKENDS}, or None; got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")
    reason_fn = _REASONS.get(backend)
    reason = None if reason_fn is None else reason_fn(device, op)
    if reason is not None:
        # a CUDA build that failed falls back to Triton where Triton runs on these (CUDA) tensors
        fallback = ("triton" if backend == "cuda" and device.type == "cuda"
                    and _triton_reason(device) is None else "chunked")
        _warn_once(f"{backend}:{device.type}:{op}",
                   f"nstm_kernels: {op}: backend '{backend}' unavailable ({reason}); using '{fallback}'")
        return fallback
    return backend


def impl(op: str, backend: str) -> Callable:
    """The function of ``TABLE[op]`` for an already resolved ``backend`` (its ``"chunked"`` entry
    when the backend has none for this op)."""
    table = TABLE[op]
    return table.get(backend, table["chunked"])


def lookup(op: str, backend: Optional[str], device: torch.device) -> Tuple[str, Callable]:
    """``(backend name, function)`` that runs ``op`` (a key of ``TABLE``) for tensors on ``device``."""
    chosen = resolve_backend(backend, device, op)
    return chosen, impl(op, chosen)
