"""What a Triton op does when one of its kernels does not fit the GPU: the PyTorch path instead.

A kernel that needs more shared memory per block than the device allows (``utils.DoesNotFit``,
raised by ``utils.launch``; the limit is read from the device once, in ``device.device_info``)
cannot launch. At S = V = 128 every kernel fits the 227 KB of an H100 (bench/compile_check.py),
but a 101 KB consumer GPU may be short. The public Triton ops then run the same call on the
``chunked`` PyTorch path (the same contract, v2) and log it once per op and kernel. The sequence
forward checks its backward before it commits (``utils.check_backward_fits``), so a training step
never ends with a forward on Triton and no backward; when the chunk-parallel backward is the one
that does not fit (its pass C needs 168-193 KB at S = K = V = 128), the reverse-segment backward
(48 KB) takes its place, and only if that does not fit either does the call go to PyTorch.
"""
from __future__ import annotations

import logging
from typing import Callable

from .utils import DoesNotFit

logger = logging.getLogger("nstm_kernels")
_told: set = set()


def tell(op: str, e: DoesNotFit, instead: str = "the chunked PyTorch path") -> None:
    """The one log line of a kernel that does not fit (once per op, kernel and limit)."""
    key = (op, e.kernel, e.limit)
    if key not in _told:
        _told.add(key)
        logger.warning("nstm_kernels: %s: Triton kernel %s needs %d bytes of %s per block, the GPU "
                       "allows %d; running %s for this configuration",
                       op, e.kernel, e.required, e.what, e.limit, instead)


def run_or_fall_back(op: str, fast: Callable, slow: Callable):
    """``fast()``; when a kernel does not fit the device, ``slow()`` (and one log line)."""
    try:
        return fast()
    except DoesNotFit as e:
        tell(op, e)
        return slow()
