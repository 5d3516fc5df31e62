"""The functional API of spec §3: validation, then the backend ``nstm_kernels.dispatch`` picks."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .dispatch import lookup
from .flops import counting_flops, register_flop_formulas
from .state import NSTMState, S2SParams
from .utils import (
    check_dims,
    check_int,
    check_s2s,
    check_same_device,
    check_tensor,
    compute_dtype,
    validate_operator_inputs,
)

_warned_layout = set()


# FlopCounterMode copies the formula table when it is created: register before any counter exists
register_flop_formulas()

def _warn_head_first(q: torch.Tensor) -> None:
    """fla's check: ``[B, T, H, K]`` with 1 < T < H is more likely a head-first ``[B, H, T, K]``
    tensor read as T = H. Warn once per shape (a short sequence with many heads is legal; one
    token, as in streaming, never warns)."""
    B, T, H, K = q.shape
    if 1 < T < H and (T, H) not in _warned_layout:
        _warned_layout.add((T, H))
        warnings.warn(f"nstm_attention: q has shape [B, T, H, K] = {list(q.shape)} with T = {T} < "
                      f"H = {H}; the layout is time-first [B, T, H, K] (as fla's), not head-first "
                      "[B, H, T, K]: transpose(1, 2) a head-first tensor first", stacklevel=3)


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def nstm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, route_logits: torch.Tensor,
                   write_gate: torch.Tensor, top_k: int, s2s: Optional[S2SParams] = None,
                   comm_every: int = 64, initial_state: Optional[NSTMState] = None,
                   output_final_state: bool = False, scale: Optional[float] = None,
                   cu_seqlens: Optional[torch.Tensor] = None, backend: Optional[str] = None):
    """The NSTM operator over a sequence (spec §2).

    Args:
        q, k: ``[B, T, H, K]`` read queries and write keys.
        v: ``[B, T, H, V]`` write values.
        route_logits: ``[B, T, H, S]`` router logits (importance bias included).
        write_gate: ``[B, T, H]`` write-strength logits, beta = sigmoid(write_gate).
        top_k: slots each token writes to, ``1 <= top_k <= S``.
        s2s: ``S2SParams`` for the state-to-state attention, or None to skip it.
        comm_every: the slots talk after every ``comm_every``-th token of the stream (absolute).
        initial_state: ``NSTMState(k [B,H,S,K], v [B,H,S,V], pos)`` or None (zeros at pos 0);
            ``pos`` an int, or an int64 tensor ``[B]`` (``[N]`` when packed) of per-row positions.
        output_final_state: also return the state after the last token (fp32; fp64 for fp64 inputs).
        scale: read temperature, default ``K ** -0.5``.
        cu_seqlens: int64 ``[N + 1]``, cumulative lengths ``[0, l1, l1 + l2, ..., T]``: a packed
            batch (B = 1) of N independent sequences; equals running each alone. The initial state
            (if any) and the final state have batch N; the final ``pos`` is a tensor ``[N]``.
        backend: "reference", "chunked", "triton", "cuda" or None (see ``nstm_kernels.dispatch``).

    Returns:
        ``(o [B, T, H, V] in q's dtype, final NSTMState or None)``.

    Example::

        >>> B, T, H, K, S = 2, 128, 4, 32, 16
        >>> q, k, v = (torch.randn(B, T, H, K) for _ in range(3))
        >>> o, st = nstm_attention(q, k, v, torch.randn(B, T, H, S), torch.randn(B, T, H), top_k=4,
        ...                        output_final_state=True)
        >>> o.shape, st.k.shape, st.pos
        (torch.Size([2, 128, 4, 32]), torch.Size([2, 4, 16, 32]), 128)
    """
    validate_operator_inputs(q, k, v, route_logits, write_gate, top_k, s2s, comm_every,
                             initial_state, scale, step=False, state_name="initial_state",
                             cu_seqlens=cu_seqlens)
    _check_flag("output_final_state", output_final_state)
    if not torch.compiler.is_compiling():
        _warn_head_first(q)
    name, fn = lookup("nstm_attention", backend, q.device)
    varlen = cu_seqlens is not None or (initial_state is not None
                                        and isinstance(initial_state.pos, torch.Tensor))
    if varlen:
        if torch.compiler.is_compiling():
            raise NotImplementedError("nstm_attention under torch.compile takes an int position and no "
                                      "cu_seqlens; call it outside the compiled region for packed "
                                      "batches or per-row positions")
        return fn(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, initial_state,
                  output_final_state, scale, cu_seqlens=cu_seqlens)
    if torch.compiler.is_compiling() or counting_flops():
        # one opaque custom op for torch.compile (nstm_kernels/compile.py), and for FlopCounterMode
        # (nstm_kernels/flops.py: the operator counted by its definition)
        from .compile import compiled_attention
        return compiled_attention(q, k, v, route_logits, write_gate, top_k, s2s, comm_every,
                                  initial_state, output_final_state, scale, name)
    return fn(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, initial_state,
              output_final_state, scale)


def nstm_attention_with_maps(q, k, v, route_logits, write_gate, top_k, s2s=None, comm_every=64,
                             initial_state=None, output_final_state=False, scale=None,
                             backend=None):
    """``nstm_attention`` that also returns the maps a person wants to look at.

    Returns ``(o, final_state_or_None, maps)`` where ``maps`` holds ``indices`` and ``weights``
    (``[B, T, H, top_k]``, the routing), ``read`` (``[B, T, H, S]``, the read distributions p),
    ``s2s`` (``[E, B, H, S, S]``, one state-to-state map per period end) and ``s2s_pos`` (the
    absolute position of the token ending each of those periods). Runs on the PyTorch paths
    ("reference" when asked for, else "chunked").
    """
    validate_operator_inputs(q, k, v, route_logits, write_gate, top_k, s2s, comm_every,
                             initial_state, scale, step=False, state_name="initial_state")
    _check_flag("output_final_state", output_final_state)
    _, fn = lookup("nstm_attention_with_maps", backend, q.device)
    return fn(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, initial_state,
              output_final_state, scale, return_maps=True)


def nstm_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, route_logits: torch.Tensor,
              write_gate: torch.Tensor, top_k: int, s2s: Optional[S2SParams], comm_every: int,
              state: Optional[NSTMState], scale: Optional[float] = None,
              backend: Optional[str] = None):
    """One token of the NSTM operator, for generation.

    ``q/k [B, H, K]``, ``v [B, H, V]``, ``route_logits [B, H, S]``, ``write_gate [B, H]``;
    ``state`` is the ``NSTMState`` before the token (None: zeros at pos 0). Returns
    ``(o [B, H, V], new_state)`` with ``new_state.pos = state.pos + 1``. Only the ``top_k`` routed
    slots are written; ``state`` itself is not modified (also with ``backend="cuda"``, whose kernel
    updates a copy; the in-place form for decoding is ``nstm_step_``).
    """
    validate_operator_inputs(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state,
                             scale, step=True, state_name="state")
    _, fn = lookup("nstm_step", backend, q.device)
    return fn(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state, scale)


def sparse_route(route_logits: torch.Tensor, write_gate: torch.Tensor, top_k: int,
                 backend: Optional[str] = None):
    """Top-k routing with gated softmax weights (spec §2 step 1).

    ``route_logits [B, T, H, S]`` (any leading dims), ``write_gate`` of the leading dims ->
    ``(indices [..., top_k] int64, weights [..., top_k])``; ``weights`` sum to sigmoid(write_gate)
    and are fp32 (fp64 for fp64 logits). Indices come in descending order of logit.
    """
    check_tensor("route_logits", route_logits, getattr(route_logits, "ndim", 0), "[B, T, H, S]")
    if route_logits.dim() < 1:
        raise ValueError("route_logits must have shape [B, T, H, S] (at least 1 dim), "
                         "got a 0-dim tensor")
    check_tensor("write_gate", write_gate, route_logits.dim() - 1, "[B, T, H]")
    check_dims("write_gate", write_gate, tuple(route_logits.shape[:-1]),
               "the leading dims of route_logits")
    check_same_device([("route_logits", route_logits), ("write_gate", write_gate)])
    S = route_logits.shape[-1]
    if S < 1:
        raise ValueError("route_logits must have at least one slot (S >= 1)")
    check_int("top_k", top_k, 1, S)
    _, fn = lookup("sparse_route", backend, route_logits.device)
    return fn(route_logits, write_gate, top_k)


def state_attention(v_state: torch.Tensor, s2s: S2SParams, backend: Optional[str] = None):
    """The state-to-state attention on its own: ``v_state [B, H, S, V]`` -> mixed ``v_state``.

    ``(1 - g_h) V + g_h softmax((V W_q)(V W_k)^T / sqrt(V)) V`` with ``g_h = sigmoid(gate_h)``, per
    batch row and head, computed in fp32 (fp64 for fp64) and returned in ``v_state``'s dtype.
    """
    check_tensor("v_state", v_state, 4, "[B, H, S, V]")
    B, H, S, V = v_state.shape
    if s2s is None:
        raise TypeError("s2s must be an S2SParams(w_q, w_k, gate), got None")
    for name, n in (("B", B), ("H", H), ("S", S), ("V", V)):
        if n < 1:
            raise ValueError(f"v_state: every dimension must be >= 1, got {name} = {n}")
    check_s2s(s2s, H, V, v_state.device, ref="v_state")
    name, fn = lookup("state_attention", backend, v_state.device)
    if name == "triton":
        return fn(v_state, s2s)
    return fn(v_state.to(compute_dtype(v_state.dtype)), s2s).to(v_state.dtype)


def nstm_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, route_logits: torch.Tensor,
               write_gate: torch.Tensor, top_k: int, s2s: Optional[S2SParams], comm_every: int,
               state_k: torch.Tensor, state_v: torch.Tensor, pos, scale: Optional[float] = None,
               backend: Optional[str] = None) -> torch.Tensor:
    """``nstm_step`` with the slot memory updated IN PLACE, for static decode buffers and CUDA
    graphs: ``state_k [B, H, S, K]`` and ``state_v [B, H, S, V]`` (contiguous fp32, or fp64; the
    CUDA kernel takes fp32) are overwritten with the state after the token; returns ``o [B, H, V]``.

    ``pos`` is the position of this token: an int, or an int64 tensor of one element on the
    tensors' device (the period end is then decided on the device); it is not incremented.
    ``backend="cuda"`` runs the CUDA C++ kernel; every other backend the PyTorch step.
    """
    validate_operator_inputs(q, k, v, route_logits, write_gate, top_k, s2s, comm_every,
                             NSTMState(state_k, state_v, 0), scale, step=True, state_name="state")
    if isinstance(pos, torch.Tensor):
        if pos.dtype != torch.int64 or pos.numel() != 1 or pos.device != q.device:
            raise ValueError(f"pos must be an int or a one-element int64 tensor on {q.device}, got "
                             f"{pos.dtype} of shape {list(pos.shape)} on {pos.device}")
    else:
        check_int("pos", pos, 0)
    for name, t in (("state_k", state_k), ("state_v", state_v)):
        if t.dtype not in (torch.float32, torch.float64) or t.dtype != state_k.dtype \
                or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 (or float64) tensor of state_k's "
                             f"dtype (it is updated in place), got {t.dtype}"
                             f"{'' if t.is_contiguous() else ', not contiguous'}")
    _, fn = lookup("nstm_step_", backend, q.device)
    return fn(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state_k, state_v, pos, scale)
