"""Shared helpers: input validation with clear messages, and the compute dtype rule."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .state import NSTMState, S2SParams

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and accumulators run in fp32, or fp64 when the inputs are fp64 (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {_shape(t)}")


def check_int(name: str, value, low: int, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {rng}, got {value}")


def check_same_device(named: Sequence[tuple]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on the same device"
            )


def check_dims(name: str, t: torch.Tensor, expected: Sequence[Optional[int]], layout: str) -> None:
    for got, want in zip(t.shape, expected):
        if want is not None and got != want:
            want_str = "[" + ", ".join("*" if w is None else str(w) for w in expected) + "]"
            raise ValueError(f"{name} must have shape {layout} = {want_str}, got {_shape(t)}")


def check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale}")


def check_s2s(s2s, H: int, V: int, device: torch.device, ref: str = "q") -> None:
    """``ref`` names the tensor whose device the weights must share (in the error message)."""
    if s2s is None:
        return
    if not isinstance(s2s, S2SParams):
        raise TypeError(f"s2s must be an S2SParams(w_q, w_k, gate) or None, got {type(s2s).__name__}")
    for name in ("w_q", "w_k"):
        t = getattr(s2s, name)
        check_tensor(f"s2s.{name}", t, 3, "[H, V, V]")
        check_dims(f"s2s.{name}", t, (H, V, V), "[H, V, V]")
        check_same_device([(ref, _probe(device)), (f"s2s.{name}", t)])
    check_tensor("s2s.gate", s2s.gate, 1, "[H]")
    check_dims("s2s.gate", s2s.gate, (H,), "[H]")
    check_same_device([(ref, _probe(device)), ("s2s.gate", s2s.gate)])


def check_state(name: str, state, B: int, H: int, S: int, K: int, V: int, device) -> None:
    if state is None:
        return
    if not isinstance(state, NSTMState):
        raise TypeError(f"{name} must be an NSTMState(k, v, pos) or None, got {type(state).__name__}")
    check_tensor(f"{name}.k", state.k, 4, "[B, H, S, K]")
    check_dims(f"{name}.k", state.k, (B, H, S, K), "[B, H, S, K]")
    check_tensor(f"{name}.v", state.v, 4, "[B, H, S, V]")
    check_dims(f"{name}.v", state.v, (B, H, S, V), "[B, H, S, V]")
    check_pos(f"{name}.pos", state.pos, B)
    check_same_device([("q", _probe(device)), (f"{name}.k", state.k), (f"{name}.v", state.v)])


def check_pos(name: str, pos, B: int) -> None:
    """A stream position: an int >= 0, or an int64 tensor ``[B]`` of per-row positions >= 0."""
    if isinstance(pos, torch.Tensor):
        if pos.dtype != torch.int64 or pos.dim() != 1:
            raise TypeError(f"{name} must be an int or an int64 tensor of shape [B = {B}] (one "
                            f"position per row), got {pos.dtype} of shape {list(pos.shape)}")
        if pos.shape[0] != B:
            raise ValueError(f"{name} must have one position per row, shape [B = {B}], got "
                             f"{list(pos.shape)}")
        if pos.numel() and not torch.compiler.is_compiling() and int(pos.min()) < 0:
            raise ValueError(f"{name} must be >= 0, got a minimum of {int(pos.min())}")
        return
    check_int(name, pos, 0)


def check_cu_seqlens(cu_seqlens, B: int, T: int, device) -> int:
    """``cu_seqlens``: int64 ``[N + 1]``, 0 first, T last, strictly increasing, B = 1; returns N."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int64 tensor [N + 1] or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int64 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be an int64 tensor of shape [N + 1] with N >= 1, got "
                         f"{cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}")
    if B != 1:
        raise ValueError(f"a packed batch (cu_seqlens) must have B = 1 (the sequences laid end to end "
                         f"in time), got B = {B}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {T}, got {cu[0]} ... {cu[-1]}")
    if any(b <= a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (every sequence holds at least one "
                         f"token), got {cu}")
    return len(cu) - 1


def _probe(device) -> torch.Tensor:
    # a zero-size tensor on `device`, so that device checks share one message format
    return torch.empty(0, device=device)


def validate_operator_inputs(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state,
                             scale, *, step: bool, state_name: str, cu_seqlens=None):
    """Validate the operator's arguments (sequence form, or the one-token form when ``step``).

    Returns the dimensions ``(B, T, H, K, V, S)`` (T is 1 for a step). With ``cu_seqlens`` the
    state's batch is the number of sequences N.
    """
    if step:
        check_tensor("q", q, 3, "[B, H, K]")
        B, H, K = q.shape
        check_tensor("k", k, 3, "[B, H, K]")
        check_dims("k", k, (B, H, K), "[B, H, K] (same as q)")
        check_tensor("v", v, 3, "[B, H, V]")
        check_dims("v", v, (B, H, None), "[B, H, V]")
        V = v.shape[2]
        check_tensor("route_logits", route_logits, 3, "[B, H, S]")
        check_dims("route_logits", route_logits, (B, H, None), "[B, H, S]")
        S = route_logits.shape[2]
        check_tensor("write_gate", write_gate, 2, "[B, H]")
        check_dims("write_gate", write_gate, (B, H), "[B, H]")
        T = 1
    else:
        check_tensor("q", q, 4, "[B, T, H, K]")
        B, T, H, K = q.shape
        check_tensor("k", k, 4, "[B, T, H, K]")
        check_dims("k", k, (B, T, H, K), "[B, T, H, K] (same as q)")
        check_tensor("v", v, 4, "[B, T, H, V]")
        check_dims("v", v, (B, T, H, None), "[B, T, H, V]")
        V = v.shape[3]
        check_tensor("route_logits", route_logits, 4, "[B, T, H, S]")
        check_dims("route_logits", route_logits, (B, T, H, None), "[B, T, H, S]")
        S = route_logits.shape[3]
        check_tensor("write_gate", write_gate, 3, "[B, T, H]")
        check_dims("write_gate", write_gate, (B, T, H), "[B, T, H]")
    for name, n in (("B", B), ("T", T), ("H", H), ("K", K), ("V", V), ("S", S)):
        if n < 1:
            raise ValueError(f"every dimension must be >= 1, got {name} = {n} (q {_shape(q)})")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; "
                            "q, k and v must share one dtype")
    check_same_device([("q", q), ("k", k), ("v", v), ("route_logits", route_logits),
                       ("write_gate", write_gate)])
    check_int("top_k", top_k, 1, S)
    check_int("comm_every", comm_every, 1)
    check_s2s(s2s, H, V, q.device)
    rows = B
    if cu_seqlens is not None:
        rows = check_cu_seqlens(cu_seqlens, B, T, q.device)
    check_state(state_name, state, rows, H, S, K, V, q.device)
    check_scale(scale)
    return B, T, H, K, V, S
