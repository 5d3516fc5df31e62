"""Device facts for the Triton kernels, in one place.

Every launcher asks this module for block sizes and ``num_warps`` (the choices made from
environment variables live in ``nstm_kernels.settings``). It reads the compute capability
and the shared memory of the tensors' GPU once (cached); for CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1``) it answers with the same choices an sm_80 GPU would get, so the
interpreted kernels are the ones that compile on a real GPU.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class DeviceInfo(NamedTuple):
    is_cuda: bool
    capability: tuple        # (major, minor); (8, 0) under the interpreter
    shared_mem: int          # bytes of shared memory a block may use
    num_sms: int


@functools.cache
def _cuda_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    return DeviceInfo(True, (props.major, props.minor), int(smem), int(props.multi_processor_count))


def device_info(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        return _cuda_info(device.index if device.index is not None else torch.cuda.current_device())
    return DeviceInfo(False, (8, 0), 164 * 1024, 1)


def pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, triton.next_power_of_2(int(n)))


def dot_block(n: int) -> int:
    """A block dim for a dimension that enters ``tl.dot``: a power of two >= 16."""
    return pow2(n, 16)


def tile_warps(elements: int, device: torch.device) -> int:
    """``num_warps`` for a program that holds tiles of about ``elements`` fp32 values on chip."""
    if elements <= 64 * 64:
        return 4
    if elements <= 128 * 128:
        return 8
    return 16 if device_info(device).capability[0] >= 9 else 8


def row_warps(block: int) -> int:
    """``num_warps`` for a program whose largest tile has ``block`` elements (no ``tl.dot``)."""
    return 1 if block <= 256 else (2 if block <= 1024 else 4)


def compute_tl_dtype(dtype: torch.dtype):
    """The Triton compute dtype: fp64 for fp64 inputs, else fp32 (spec: fp32 accumulators)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def segment_length() -> int:
    """Tokens between the states the sequence kernel stores for its backward (a power of two)."""
    return 64


def chunk_length() -> int:
    """The longest chunk of the chunk-parallel forward (``chunk.py``): one closed-form state step
    of its sequential pass, and the spacing of the chunk-entry states it stores (a power of two)."""
    return 64


def sub_chunk_length() -> int:
    """Tokens per step of the chunk forward's output pass (its ``[L, L, S]`` pairwise tile);
    a power of two >= 16 so that every ``tl.dot`` it feeds has dims >= 16."""
    return 16
