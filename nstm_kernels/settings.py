"""Every environment variable the package reads, in one place, read at call time.

Each choice is a keyword argument of the function that makes it, with a documented default; an
environment variable only overrides an argument left at None, and is read when the call is made
(never at import), so a test or a notebook can change it between calls.

| variable | overrides | values (default first) |
| --- | --- | --- |
| ``NSTM_BACKEND`` | ``backend=`` of every op (``nstm_kernels.dispatch``) | reference, chunked, triton, cuda |
| ``NSTM_TRITON_FWD`` | ``forward=`` of ``triton_nstm`` | chunk, recurrent |
| ``NSTM_TRITON_BWD`` | ``backward=`` of ``triton_nstm`` | chunk, recurrent |
| ``NSTM_TRITON_DOT`` | ``dot_precision=`` of the Triton ops | tf32x3 (ieee in the chunk passes), tf32 |
| ``NSTM_TRITON_TF32=1`` | as ``NSTM_TRITON_DOT=tf32`` (older name) | |
| ``TRITON_INTERPRET=1`` | Triton runs on CPU tensors in its interpreter (Triton's own variable) | |
| ``NSTM_CUDA_BUILD_DIR`` | where the CUDA step extension is built | ``~/.cache/nstm_kernels/...`` |
| ``NSTM_CUDA_REBUILD=1`` | rebuild the extension from scratch | |
| ``NSTM_CUDA_VERBOSE=1`` | show the compiler's output | |
| ``NSTM_CPU_KERNEL`` | the C++ CPU kernel in the ``"chunked"`` backend (``nstm_kernels.cpu``) | 1, 0 |
| ``NSTM_CPU_BUILD_DIR`` | where the C++ CPU kernel is built | ``~/.cache/nstm_kernels/...`` |
| ``NSTM_CPU_REBUILD=1`` | rebuild the C++ CPU kernel from scratch | |
| ``NSTM_CPU_VERBOSE=1`` | show the compiler's output | |
| ``NSTM_CPU_SCHEDULE`` | how the C++ CPU kernel splits a call (``nstm_kernels.cpu``) | auto, units, blocks |
| ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` | ``nstm-train`` under ``torchrun`` (torch.distributed's own variables) | |
| ``NSTM_PROGRESS`` | progress bars (``nstm.progress``) | unset: at a terminal, 1: always, 0: never |
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

BACKENDS = ("reference", "chunked", "triton", "cuda")
TRITON_FORWARDS = ("chunk", "recurrent")
TRITON_BACKWARDS = ("chunk", "recurrent")
DOT_PRECISIONS = ("ieee", "tf32", "tf32x3")
CPU_SCHEDULES = ("auto", "units", "blocks")


def _env(name: str) -> Optional[str]:
    value = os.environ.get(name, "").strip()
    return value or None


def flag(name: str) -> bool:
    """An on/off environment variable: 1, true, yes or on (any case) is on."""
    return (_env(name) or "0").lower() in ("1", "true", "yes", "on")


def choose(what: str, value: Optional[str], env: str, choices: Sequence[str],
           default: Optional[str] = None) -> str:
    """``value``, else the environment variable ``env``, else ``default`` (``choices[0]``); checked."""
    source = "argument"
    if value is None:
        value, source = _env(env), env
    if value is None:
        return choices[0] if default is None else default
    if value not in choices:
        raise ValueError(f"{what} must be one of {tuple(choices)} ({source}), got {value!r}")
    return value


def backend_override() -> Optional[str]:
    """``NSTM_BACKEND`` (None when unset); ``nstm_kernels.dispatch`` checks the name."""
    return _env("NSTM_BACKEND")


def triton_interpret() -> bool:
    """Triton's interpreter is on (CPU tensors can run the Triton kernels)."""
    return _env("TRITON_INTERPRET") == "1"


def triton_forward(kind: Optional[str] = None) -> str:
    """The Triton sequence forward: ``"chunk"`` (chunk-parallel, default) or ``"recurrent"``."""
    return choose("the Triton sequence forward", kind, "NSTM_TRITON_FWD", TRITON_FORWARDS)


def triton_backward(kind: Optional[str] = None) -> str:
    """The backward behind the chunk forward: ``"chunk"`` (default) or ``"recurrent"``."""
    return choose("the Triton chunk backward", kind, "NSTM_TRITON_BWD", TRITON_BACKWARDS)


def dot_precision(kind: Optional[str], default: str) -> str:
    """The fp32 ``tl.dot`` precision: ``kind``, else ``NSTM_TRITON_DOT``, else "tf32" when
    ``NSTM_TRITON_TF32=1``, else ``default`` (see ``nstm_kernels.triton.utils.dot_precision``)."""
    if kind is None and _env("NSTM_TRITON_DOT") is None and flag("NSTM_TRITON_TF32"):
        return "tf32"
    return choose("the fp32 dot precision", kind, "NSTM_TRITON_DOT", DOT_PRECISIONS, default)


def cuda_build_dir() -> Optional[str]:
    """``NSTM_CUDA_BUILD_DIR`` (None: the default cache folder)."""
    return _env("NSTM_CUDA_BUILD_DIR")


def cpu_kernel_enabled() -> bool:
    """``NSTM_CPU_KERNEL`` (default 1): 0 keeps the ``"chunked"`` backend on the PyTorch chunk form."""
    value = _env("NSTM_CPU_KERNEL")
    if value is None:
        return True
    if value not in ("0", "1"):
        raise ValueError(f"NSTM_CPU_KERNEL must be 0 or 1, got {value!r}")
    return value == "1"


def cpu_schedule(kind: Optional[str] = None) -> str:
    """How the C++ CPU kernel splits a call over its threads: ``kind``, else ``NSTM_CPU_SCHEDULE``,
    else "auto". "units": one task per (sequence, head); "blocks": the block-parallel schedule
    (calls that keep gradients, with the s2s period a multiple of the 64-token block; others run
    per unit); "auto": blocks for calls of at most 16 (sequence, head) pairs
    (``nstm_kernels.cpu.SCHEDULES``)."""
    return choose("the CPU kernel schedule", kind, "NSTM_CPU_SCHEDULE", CPU_SCHEDULES, "auto")


def cpu_build_dir() -> Optional[str]:
    """``NSTM_CPU_BUILD_DIR`` (None: the default cache folder)."""
    return _env("NSTM_CPU_BUILD_DIR")


def progress_override() -> Optional[bool]:
    """``NSTM_PROGRESS``: True (1) forces progress bars on, False (0) off, None (unset) leaves it to
    whether stdout is a terminal."""
    value = _env("NSTM_PROGRESS")
    if value is None:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"NSTM_PROGRESS must be 0 or 1, got {value!r}")
    return value == "1"


def distributed_env() -> Optional[tuple]:
    """``(rank, local_rank, world_size)`` when this process was started by ``torchrun`` (or any
    launcher that sets torch.distributed's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``), else None."""
    if _env("RANK") is None or _env("WORLD_SIZE") is None:
        return None
    try:
        rank, world = int(_env("RANK")), int(_env("WORLD_SIZE"))
        local = int(_env("LOCAL_RANK") or rank)
    except ValueError:
        raise ValueError(f"RANK, LOCAL_RANK and WORLD_SIZE must be integers, got RANK={_env('RANK')!r}, "
                         f"LOCAL_RANK={_env('LOCAL_RANK')!r}, WORLD_SIZE={_env('WORLD_SIZE')!r}") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank}, WORLD_SIZE={world}")
    return rank, local, world


def child_env(**changes: str) -> dict:
    """This process's environment with ``changes``, for a child process (``nstm.study`` starts
    each training with its own thread count)."""
    env = dict(os.environ)
    env.update(changes)
    return env
