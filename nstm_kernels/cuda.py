"""The CUDA C++ one-token step (``csrc/``): its loader and the two Python entry points.

``cuda_nstm_step(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state, scale=None)``
    The functional form, same signature and results as ``nstm_kernels.chunked.recurrent_nstm_step``
    and ``triton_nstm_step``: returns ``(o, new NSTMState)``. The caller's ``state`` is NOT modified:
    the kernel runs on an fp32 copy, which becomes the new state.

``cuda_nstm_step_(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state_k, state_v, pos,
scale=None, out=None)``
    The in-place form for decoding (and CUDA graphs): updates ``state_k [B,H,S,K]`` and
    ``state_v [B,H,S,V]`` (fp32, contiguous) in place and returns ``o``. ``pos`` is the token's
    absolute position, an int or an int64 CUDA tensor of one element (read on the device, so a
    captured graph can replay it); it is not incremented here, the caller advances it.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja), only when
PyTorch has CUDA, a GPU is visible and a CUDA toolkit is found (``CUDA_HOME`` or ``nvcc`` on the
``PATH``). The outcome is cached for the process. A failed build is reported in one line by the
dispatcher, which then falls back ("triton" when it can run, else "chunked"); the compiler's full
output is kept in ``<build dir>/build.log``.

Environment:
    NSTM_CUDA_REBUILD=1     wipe the build directory and compile again (first use in a process)
    NSTM_CUDA_BUILD_DIR     build directory (default ``~/.cache/nstm_kernels/cuda-<torch>-<cuda>``)
    NSTM_CUDA_VERBOSE=1     show the compiler's output while building
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from typing import Optional, Union

import torch

from . import _jit, settings
from .state import NSTMState, S2SParams

logger = logging.getLogger("nstm_kernels")



def _find_csrc() -> str:
    """The CUDA sources: packaged inside ``nstm_kernels/csrc`` by a wheel, or the checkout's
    top-level ``csrc/`` (editable installs and source trees)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(cand, "nstm_step.cu")):
            return cand
    return os.path.join(os.path.dirname(here), "csrc")


CSRC = _find_csrc()
SOURCES = ("nstm_step.cpp", "nstm_step.cu")
EXT_NAME = "nstm_cuda_step"

_lock = threading.Lock()
_ext = None
_error: Optional[str] = None


def build_dir() -> str:
    tag = f"cuda-{torch.__version__.split('+')[0]}-{torch.version.cuda or 'none'}"
    return _jit.build_dir(settings.cuda_build_dir(), tag)


def toolkit_reason() -> Optional[str]:
    """Why the extension cannot be built here, before trying (None when it can be tried)."""
    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} was built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    for src in SOURCES:
        if not os.path.isfile(os.path.join(CSRC, src)):
            return f"the CUDA sources are missing ({os.path.join(CSRC, src)})"
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as e:  # noqa: BLE001 - importing it imports setuptools, which can fail
        return f"torch.utils.cpp_extension cannot be imported ({type(e).__name__}: {str(e)[:200]})"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on the PATH)"
    return None


def _build():
    directory = build_dir()
    if settings.flag("NSTM_CUDA_REBUILD"):
        shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    try:
        from torch.utils import cpp_extension  # inside the guard: importing setuptools can fail too
        ext = cpp_extension.load(
            name=EXT_NAME,
            sources=[os.path.join(CSRC, s) for s in SOURCES],
            extra_include_paths=[CSRC],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            build_directory=directory,
            verbose=settings.flag("NSTM_CUDA_VERBOSE"),
        )
    except Exception as e:  # noqa: BLE001 - any build/load error means: fall back
        raise _jit.build_failure(e, directory, "the CUDA step kernel") from e
    return ext


def load_extension():
    """The compiled extension module; builds it on first use. Raises ``RuntimeError`` with the reason
    when it cannot be had (the reason is cached: later calls fail fast)."""
    global _ext, _error
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is None and _error is None:
            reason = toolkit_reason()
            if reason is None:
                try:
                    _ext = _build()
                except RuntimeError as e:
                    reason = str(e)
            _error = reason if _ext is None else None
    if _ext is None:
        raise RuntimeError(_error)
    return _ext


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None when the CUDA step can run on ``device`` (building it if needed), else why not."""
    if device is not None and torch.device(device).type != "cuda":
        return f"the CUDA step kernel needs CUDA tensors, got {torch.device(device).type}"
    try:
        load_extension()
    except RuntimeError as e:
        return str(e)
    return None


def available(device: Optional[torch.device] = None) -> bool:
    return unavailable_reason(device) is None


def reset() -> None:
    """Forget the cached extension / failure (tests; a later call tries again)."""
    global _ext, _error
    with _lock:
        _ext, _error = None, None


def _s2s_args(s2s: Optional[S2SParams]):
    if s2s is None:
        return None, None, None
    return tuple(t.detach().to(torch.float32).contiguous() for t in s2s)


@torch.no_grad()
def cuda_nstm_step_(q, k, v, route_logits, write_gate, top_k: int, s2s: Optional[S2SParams],
                    comm_every: int, state_k: torch.Tensor, state_v: torch.Tensor,
                    pos: Union[int, torch.Tensor], scale: Optional[float] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token, slot memory updated IN PLACE: returns ``o [B, H, V]`` (q's dtype).

    ``state_k [B,H,S,K]`` and ``state_v [B,H,S,V]`` must be contiguous fp32 CUDA tensors (they are
    written). ``pos``: int, or an int64 CUDA tensor with one element (not incremented). ``out``: an
    optional ``[B, H, V]`` buffer for ``o`` (static buffers for CUDA graphs).
    """
    ext = load_extension()
    B, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    logits = route_logits.detach().to(torch.float32).contiguous()
    gate = write_gate.detach().to(torch.float32).contiguous()
    if out is None:
        out = torch.empty(B, H, V, dtype=q.dtype, device=q.device)
    per_row = isinstance(pos, torch.Tensor) and pos.numel() > 1
    if isinstance(pos, torch.Tensor):
        pos_dev, pos_host = pos.reshape(-1)[:1].contiguous(), 0
    else:
        pos_dev, pos_host = None, int(pos)
    ext.nstm_step_(q, k, v, logits, gate, state_k, state_v, out,
                   *_s2s_args(None if per_row else s2s), pos_dev, pos_host, int(top_k),
                   int(comm_every), scale)
    if per_row and s2s is not None:
        # one position per row: the kernel ran without its s2s; mix the rows whose period ends,
        # decided on the device (capturable in a CUDA graph)
        from .s2s import state_attention_torch
        event = ((pos.reshape(-1, 1, 1, 1) + 1) % comm_every) == 0
        state_v.copy_(torch.where(event, state_attention_torch(state_v, s2s), state_v))
    return out


@torch.no_grad()
def cuda_nstm_step(q, k, v, route_logits, write_gate, top_k: int, s2s: Optional[S2SParams],
                   comm_every: int, state: Optional[NSTMState], scale: Optional[float] = None):
    """One token through the CUDA kernel: ``q/k [B,H,K]``, ``v [B,H,V]``, logits ``[B,H,S]``,
    gate ``[B,H]`` -> ``(o [B,H,V] in q's dtype, NSTMState(k, v, pos + 1))`` with an fp32 state.

    Functional: ``state`` is copied, never modified. fp64 inputs run on the exact PyTorch step
    (the kernel computes in fp32). Not differentiable (decode).
    """
    if q.dtype == torch.float64:
        from .chunked import recurrent_nstm_step
        return recurrent_nstm_step(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state,
                                   scale)
    B, H, K = q.shape
    V, S = v.shape[-1], route_logits.shape[-1]
    if state is None:
        sk = torch.zeros(B, H, S, K, dtype=torch.float32, device=q.device)
        sv = torch.zeros(B, H, S, V, dtype=torch.float32, device=q.device)
        pos = 0
    else:
        sk = state.k.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        sv = state.v.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        pos = state.pos if isinstance(state.pos, torch.Tensor) else int(state.pos)
    o = cuda_nstm_step_(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, sk, sv, pos, scale)
    return o, NSTMState(sk, sv, pos + 1)
