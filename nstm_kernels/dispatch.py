"""Backend choice for every op: one place, so that every entry point behaves the same.

Order: the ``backend=`` argument, else the ``NSTM_BACKEND`` environment variable, else the fastest
path validated for the tensors' device. A fast path that cannot run here (no Triton, no GPU, no
compiler) falls back with one log line, never to a silent wrong answer: ``"cuda"`` to ``"triton"``
when Triton runs on the (CUDA) tensors, else to ``"chunked"``; ``"triton"`` to ``"chunked"``. The
CUDA C++ extension exists for ``nstm_step`` only (built on first use, see ``nstm_kernels.cuda``).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

import torch

logger = logging.getLogger("nstm_kernels")

BACKENDS = ("reference", "chunked", "triton", "cuda")

# Issue 3: "triton" becomes the default on CUDA tensors only once the full GPU grid has passed on a
# real GPU. Until then CUDA tensors default to "chunked" and "triton" is opt-in.
TRITON_DEFAULT_ON_CUDA = False

_warned = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_reason(device: torch.device) -> Optional[str]:
    """Why the Triton backend cannot run on ``device`` (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if importlib.util.find_spec("nstm_kernels.triton") is None:
        return "this build has no Triton kernels"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpret():
        return None
    return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"


def _cuda_reason(device: torch.device, op: str = "nstm_step") -> Optional[str]:
    if device.type != "cuda":
        return f"the CUDA step kernel needs CUDA tensors, got {device.type}"
    if importlib.util.find_spec("nstm_kernels.cuda") is None:
        return "this build has no CUDA C++ kernels"
    if op == "nstm_step":  # the one op with a CUDA C++ kernel: build it now (cached) or say why not
        from .cuda import unavailable_reason
        return unavailable_reason(device)
    return None


def resolve_backend(backend: Optional[str], device: torch.device, op: str) -> str:
    """The backend that will run ``op`` for tensors on ``device``."""
    source = "backend"
    if backend is None:
        env = os.environ.get("NSTM_BACKEND", "").strip()
        if env:
            backend, source = env, "NSTM_BACKEND"
    if backend is None:
        if device.type == "cuda" and TRITON_DEFAULT_ON_CUDA and _triton_reason(device) is None:
            return "triton"
        return "chunked"
    if not isinstance(backend, str):
        raise TypeError(f"{source} must be a str, one of {BACKENDS}, or None; got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "cuda":
        reason = _cuda_reason(device, op)
    else:
        reason = {"triton": _triton_reason}.get(backend, lambda d: None)(device)
    if reason is not None:
        # a CUDA build that failed falls back to Triton where Triton runs on these (CUDA) tensors
        fallback = ("triton" if backend == "cuda" and device.type == "cuda"
                    and _triton_reason(device) is None else "chunked")
        _warn_once(f"{backend}:{device.type}:{op}",
                   f"nstm_kernels: {op}: backend '{backend}' unavailable ({reason}); using '{fallback}'")
        return fallback
    return backend
