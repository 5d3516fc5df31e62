"""NSTMLayer: the drop-in sequence mixer around the fused NSTM operator (spec §5).

Results: ``forward`` returns ``y`` unless ``return_state`` or ``return_maps`` is asked for; then a
``LayerOutput(y, state, maps)`` with None in the fields not asked for. ``step`` returns
``(y, new_state)``. The blocks and the models follow the same rule.
"""
from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from nstm_kernels import (
    NSTMState,
    nstm_attention,
    nstm_attention_with_maps,
    nstm_step,
    nstm_step_,
    sparse_route,
)
from nstm_kernels import cpu as cpu_kernel
from nstm_kernels.dispatch import resolve_backend
from nstm_kernels.utils import check_cu_seqlens

from .config import NSTMConfig
from .modules import RMSNorm, ShortConv
from .router import TokenToStateRouter
from .s2s import StateToStateAttention
from .state_manager import StateManager


class NSTMLayerState(NamedTuple):
    """Decode state of one layer: the operator's slot memory and the short convolution's cache."""

    op: NSTMState
    conv: Optional[torch.Tensor]       # [B, conv_size - 1, channels] or None without a conv

    def detach(self) -> NSTMLayerState:
        """The same state cut from the autograd graph, for truncated backpropagation through time:
        ``y, st = layer(x1, return_state=True)[:2]; layer(x2, state=st.detach())``."""
        return NSTMLayerState(self.op.detach(), None if self.conv is None else self.conv.detach())


class LayerOutput(NamedTuple):
    """What ``NSTMLayer.forward`` (and ``NSTMBlock.forward``) return when a state or maps are asked
    for: ``y [B, T, D]``, the ``NSTMLayerState`` after the last token (or None), the maps dict
    (or None)."""

    y: torch.Tensor
    state: Optional[NSTMLayerState]
    maps: Optional[Dict[str, Any]]


class _StepPlan(NamedTuple):
    """A layer's weights laid out once for one-token steps on the CPU (``NSTMLayer._fast_step``)."""

    key: tuple                          # (id, version) of every parameter and the dtype it was made for
    w_in: torch.Tensor                  # [D, 4 H K + H (S + 1)]: in_proj and router, one matmul
    b_in: torch.Tensor                  # [4 H K + H (S + 1)]: zeros, then the router's bias
    log_importance: torch.Tensor        # [H, S]
    pointer: Optional[torch.Tensor]     # [P, H, S] or None
    conv_w: Optional[torch.Tensor]      # [W, C] or None
    conv_b: Optional[torch.Tensor]      # [C] or None
    s2s: tuple                          # (w_q, w_k, sigmoid(gate)) or three empty tensors


class NSTMLayer(nn.Module):
    """A sequence mixer ``[B, T, D] -> [B, T, D]`` with an explicit memory of ``num_states`` slots per head.

    Args:
        d_model: model width D.
        num_heads: heads H.
        num_states: slots per head S.
        top_k: slots each token writes to (clipped to S after pruning).
        comm_every: the slots attend to each other after every ``comm_every``-th token.
        head_dim: K = V per head (default ``d_model // num_heads``).
        conv_size: width of the causal depthwise conv on q, k, v (0 disables it).
        use_s2s: include the state-to-state attention.
        backend: operator backend (None: the fastest for the device; see ``nstm_kernels``).
        write_pointer: period P of the position-aware write (0: content-only routing). The route
            logits of the token at absolute position ``tau`` get a learned bias row ``tau mod P``
            that starts as a pointer sweeping the slots once per period, so equal tokens at
            different positions write to different slots (``TokenToStateRouter``).

    Example::

        >>> layer = NSTMLayer(d_model=64, num_heads=4, num_states=16, top_k=4)
        >>> y = layer(torch.randn(2, 100, 64))          # [2, 100, 64]
        >>> loss = y.pow(2).mean() + 0.01 * layer.aux_loss
        >>> y, state, _ = layer(torch.randn(2, 100, 64), return_state=True)
        >>> y1, state = layer.step(torch.randn(2, 1, 64), state)     # [2, 1, 64]

    ``aux_loss`` is the Switch-style load-balancing loss of the last forward: set by every forward
    (a differentiable tensor in training mode or with ``return_maps``, else a zero tensor, so it
    is never left over from an earlier call). The models sum it over their layers (``model.aux_loss``).
    """

    def __init__(self, d_model: int, num_heads: int, num_states: int = 64, top_k: int = 8,
                 comm_every: int = 64, head_dim: Optional[int] = None, conv_size: int = 4,
                 use_s2s: bool = True, backend: Optional[str] = None, write_pointer: int = 0):
        super().__init__()
        for name, val, low in (("d_model", d_model, 1), ("num_heads", num_heads, 1),
                               ("num_states", num_states, 1), ("top_k", top_k, 1),
                               ("comm_every", comm_every, 1), ("conv_size", conv_size, 0),
                               ("write_pointer", write_pointer, 0)):
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                raise ValueError(f"{name} must be an int >= {low}, got {val!r}")
        if top_k > num_states:
            raise ValueError(f"top_k must be <= num_states ({num_states}), got {top_k}")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads}) "
                                 "unless head_dim is given")
            head_dim = d_model // num_heads
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.top_k, self.comm_every, self.backend = top_k, comm_every, backend
        H, K = num_heads, head_dim
        self.qkv_dim = 3 * H * K
        self.in_proj = nn.Linear(d_model, self.qkv_dim + H * K, bias=False)   # q, k, v and z
        self.router = TokenToStateRouter(d_model, num_heads, num_states, pointer_period=write_pointer)
        self.states = StateManager(num_heads, num_states, K, K)
        self.states.attach_router(self.router)
        self.s2s = StateToStateAttention(num_heads, K) if use_s2s else None
        self.conv = ShortConv(self.qkv_dim, conv_size) if conv_size > 0 else None
        self.norm = RMSNorm(K)
        self.out_proj = nn.Linear(H * K, d_model, bias=False)
        nn.init.normal_(self.in_proj.weight, std=1.0 / math.sqrt(d_model))
        nn.init.normal_(self.out_proj.weight, std=1.0 / math.sqrt(H * K))
        self.aux_loss = torch.zeros(())

    @classmethod
    def from_config(cls, config: NSTMConfig) -> NSTMLayer:
        """The layer ``config`` describes (its layer fields, ``d_model`` and ``num_heads``)."""
        return cls(config.d_model, config.num_heads, **config.layer_kwargs())

    @property
    def config(self) -> NSTMConfig:
        """This layer's settings (the model fields at their defaults)."""
        return NSTMConfig(d_model=self.d_model, num_heads=self.num_heads, num_states=self.num_states,
                          top_k=self.top_k, comm_every=self.comm_every, head_dim=self.head_dim,
                          conv_size=0 if self.conv is None else self.conv.width,
                          use_s2s=self.s2s is not None, backend=self.backend,
                          write_pointer=self.router.pointer_period)

    @property
    def num_states(self) -> int:
        return self.states.num_states

    @torch.no_grad()
    def init_gates(self, write_gate_bias: Optional[float] = None, importance: Optional[float] = None,
                   s2s_gate: Optional[float] = None) -> NSTMLayer:
        """Set the gates' starting values, for training from scratch (``None`` keeps one as it is).

        * ``write_gate_bias``: the bias of the write-strength logits; at a zero input a token writes
          ``beta = sigmoid(bias)`` of the way (0 at construction: beta = 0.5).
        * ``importance``: every slot's importance logit iota (3 at construction); ``revive()``
          restores revived slots to this value too. The router adds ``log sigmoid(iota)``, so a
          value shared by all slots changes only how fast importance learns, not the routing.
        * ``s2s_gate``: the logit of the s2s mix g = sigmoid(gate) (-8 at construction: g = 0.00034);
          an error on a layer without the s2s.

        These are starting values, not settings: a checkpoint carries the trained values and the
        config does not record them. Returns the layer."""
        for name, val in (("write_gate_bias", write_gate_bias), ("importance", importance),
                          ("s2s_gate", s2s_gate)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float))
                                    or not math.isfinite(val)):
                raise ValueError(f"{name} must be a finite number or None, got {val!r}")
        if s2s_gate is not None and self.s2s is None:
            raise ValueError("s2s_gate given for a layer without the s2s (use_s2s=False)")
        if write_gate_bias is not None:
            self.router.set_gate_bias(write_gate_bias)
        if importance is not None:
            self.states.set_importance(importance)
        if s2s_gate is not None:
            self.s2s.gate.fill_(float(s2s_gate))
        return self

    def _project(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None):
        """The input projections: q, k, v, z (one matmul) and route logits and write gates (one);
        with a write pointer, the bias of the tokens' absolute ``positions`` (``x.shape[:-1]``).

        Two matmuls, not one over concatenated weights: the concatenation copied both weight
        matrices on every call, a fifth of a decode step's time on the CPU (bench/NOTES.md)."""
        H, K = self.num_heads, self.head_dim
        qkv, z = F.linear(x, self.in_proj.weight.to(x.dtype)).split([self.qkv_dim, H * K], dim=-1)
        r = F.linear(x, self.router.weight.to(x.dtype), self.router.bias.to(x.dtype))
        logits, gate = self.router.split(r, self.states.log_importance())
        if self.router.pointer is not None:
            logits = logits + self.router.position_bias(positions, logits.dtype)
        return qkv, z, logits, gate

    def _positions(self, x: torch.Tensor, pos, cu_seqlens=None) -> Optional[torch.Tensor]:
        """Absolute position of every token of ``x [B, T, D]`` (``[B, T]`` int64), from the start
        positions ``pos`` (an int, a per-row tensor, or the one-element tensor of static decoding;
        per document when packed); None without a pointer."""
        if self.router.pointer is None:
            return None
        B, T = x.shape[:2]
        t = torch.arange(T, device=x.device)
        start = torch.as_tensor(pos, device=x.device).long().reshape(-1)
        if cu_seqlens is None:
            return (start[:, None] + t).expand(B, T)
        cu = cu_seqlens.to(x.device).long()
        doc = torch.searchsorted(cu[1:], t, right=True)                  # the document of each token
        return (t - cu[doc] + start.expand(cu.numel() - 1)[doc]).unsqueeze(0)

    def _validate(self, x: torch.Tensor, state, step: bool, cu_seqlens=None) -> int:
        """Check ``x`` and ``state``; returns the number of streams (B, or N when packed)."""
        want = "[B, D] or [B, 1, D]" if step else "[B, T, D]"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape {want}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {x.dtype}")
        ok_dims = (x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1)) if step else x.dim() == 3
        if not ok_dims or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape {want} with D = {self.d_model}, got {list(x.shape)}")
        if not step and x.shape[1] < 1:
            raise ValueError(f"x must hold at least one token (T >= 1), got shape {list(x.shape)}")
        if x.shape[0] < 1:
            raise ValueError(f"x must hold at least one sequence (B >= 1), got shape {list(x.shape)}")
        streams = x.shape[0]
        if cu_seqlens is not None:
            streams = check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1], x.device)
        if state is not None:
            if not isinstance(state, NSTMLayerState):
                raise TypeError(f"state must be an NSTMLayerState (from return_state=True or "
                                f"init_state), got {type(state).__name__}")
            if state.op.k.shape[0] != streams:
                what = f"{streams} packed documents (cu_seqlens)" if cu_seqlens is not None \
                    else f"batch {streams}"
                raise ValueError(f"state is for batch {state.op.k.shape[0]}, x has {what}")
            if state.conv is not None and state.conv.shape[0] != streams:
                raise ValueError(f"state.conv is for batch {state.conv.shape[0]}, expected {streams}")
            if state.op.k.shape[2] != self.num_states:
                raise ValueError(f"state has {state.op.k.shape[2]} slots, the layer has "
                                 f"{self.num_states} (was the layer pruned after the state was made?)")
        return streams

    def init_state(self, batch: int) -> NSTMLayerState:
        """The state before the first token: the learned initial memory, an empty conv cache."""
        conv = None
        if self.conv is not None:
            w = self.in_proj.weight
            conv = w.new_zeros(batch, self.conv.width - 1, self.qkv_dim)
        return NSTMLayerState(self.states.initial_state(batch), conv)

    def _finish(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.norm(o) * F.silu(z).unflatten(-1, (self.num_heads, self.head_dim))
        return self.out_proj(y.flatten(-2))

    def _aux(self, logits: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
        """Switch-style load balancing per head: S * sum_i f_i P_i (1 when balanced)."""
        S = logits.shape[-1]
        probs = torch.softmax(logits.float(), dim=-1).flatten(0, -3).mean(0)          # [H, S]
        H = indices.shape[-2]
        slot = (torch.arange(H, device=indices.device)[:, None] * S + indices).reshape(-1)
        counts = torch.zeros(H * S, device=indices.device).index_add_(
            0, slot, torch.ones(slot.numel(), device=indices.device)).view(H, S)       # [H, S]
        frac = counts / counts.sum(-1, keepdim=True)
        return (S * (frac * probs).sum(-1)).mean()

    def forward(self, x: torch.Tensor, state: Optional[NSTMLayerState] = None,
                return_state: bool = False, return_maps: bool = False,
                cu_seqlens: Optional[torch.Tensor] = None) -> Union[torch.Tensor, LayerOutput]:
        """``x [B, T, D]`` -> ``y [B, T, D]``.

        ``cu_seqlens`` (int64 ``[N + 1]``, ``[0, l1, l1 + l2, ..., T]``): ``x`` is a packed batch
        ``[1, T, D]`` of N documents laid end to end. Each starts from the learned initial memory
        (or from its row of ``state``, batch N) with an empty short-conv window, and no document
        sees another's tokens or state: the result equals running the documents one by one. The
        returned state then has batch N (one row per document, per-row positions).

        With ``return_state`` or ``return_maps``: ``LayerOutput(y, state, maps)``, where ``state``
        is the ``NSTMLayerState`` after the last token (pass it back as ``state`` to continue the
        stream) and ``maps`` a dict (routing ``indices``/``weights``, ``read`` distributions,
        ``s2s`` attention maps and their positions ``s2s_pos``); None when not asked for."""
        streams = self._validate(x, state, step=False, cu_seqlens=cu_seqlens)
        if return_maps and cu_seqlens is not None:
            raise ValueError("return_maps is not available for packed batches (cu_seqlens): run the "
                             "documents as a padded batch or one at a time to draw their maps")
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        op_state = self.states.initial_state(streams) if state is None else state.op
        qkv, z, logits, gate = self._project(x, self._positions(x, op_state.pos, cu_seqlens))
        conv_cache = None
        if self.conv is not None:
            qkv, conv_cache = self.conv(qkv, None if state is None else state.conv, cu_seqlens=cu_seqlens)
        q, k, v = qkv.unflatten(-1, (3, H, K)).unbind(2)
        s2s = self.s2s.params() if self.s2s is not None else None
        top_k = min(self.top_k, self.num_states)
        args = (q, k, v, logits, gate, top_k, s2s, self.comm_every, op_state, return_state)
        maps = None
        if return_maps:
            o, final, maps = nstm_attention_with_maps(*args, backend=self.backend)
        else:
            o, final = nstm_attention(*args, cu_seqlens=cu_seqlens, backend=self.backend)
        if self.training or return_maps:
            with torch.no_grad():
                indices, weights = sparse_route(logits.detach(), gate.detach(), top_k)
            self.aux_loss = self._aux(logits, indices, top_k)
            if self.training:
                self.states.record_usage(indices, weights)
        else:
            self.aux_loss = logits.new_zeros((), dtype=torch.float32)
        y = self._finish(o, z)
        if not (return_state or return_maps):
            return y
        return LayerOutput(y, NSTMLayerState(final, conv_cache) if return_state else None, maps)

    def step(self, x: torch.Tensor, state: NSTMLayerState, inplace: bool = False):
        """One token: ``x [B, D]`` or ``[B, 1, D]`` and the state before it -> ``(y, new state)``,
        ``y`` of ``x``'s shape.

        ``inplace=True`` (static decoding, CUDA graphs; ``nstm.decode.StaticDecoder``) writes the
        new slot memory and conv cache into ``state``'s own tensors (contiguous, fp32) and returns
        ``state`` itself; ``state.op.pos`` may then be an int64 tensor of one element, which the
        caller advances. Not differentiable (decode); ``forward`` is the training path.

        On fp32 / fp64 CPU tensors with the chunked backend a step runs the projections as one
        matmul and the conv and the operator in the C++ kernel, with the weights laid out once
        (again after any parameter changes); elsewhere the general path. Both compute the same."""
        self._validate(x, state, step=True)
        if state is None:
            raise TypeError("state must be an NSTMLayerState; use layer.init_state(batch)")
        if not isinstance(inplace, bool):
            raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
        squeeze = x.dim() == 3
        x2 = x[:, 0] if squeeze else x
        with torch.no_grad():
            step = self._fast_step if self._fast_step_ok(x2, state, inplace) else self._general_step
            y, new = step(x2, state, inplace)
        return (y.unsqueeze(1) if squeeze else y), new

    def _general_step(self, x: torch.Tensor, state: NSTMLayerState, inplace: bool):
        """``step`` on any device and dtype, through the dispatched ``nstm_step`` / ``nstm_step_``.
        ``x [B, D]``."""
        H, K = self.num_heads, self.head_dim
        positions = self._positions(x[:, None], state.op.pos)
        qkv, z, logits, gate = self._project(x, None if positions is None else positions[:, 0])
        conv_cache = None
        if self.conv is not None:
            qkv, conv_cache = self.conv(qkv.unsqueeze(1), state.conv)
            qkv = qkv[:, 0]
            if inplace:
                state.conv.copy_(conv_cache)
                conv_cache = state.conv
        q, k, v = qkv.unflatten(-1, (3, H, K)).unbind(1)
        s2s = self.s2s.params() if self.s2s is not None else None
        top_k = min(self.top_k, self.num_states)
        if inplace:
            o = nstm_step_(q, k, v, logits, gate, top_k, s2s, self.comm_every, state.op.k,
                           state.op.v, state.op.pos, backend=self.backend)
            new = state
        else:
            o, op = nstm_step(q, k, v, logits, gate, top_k, s2s, self.comm_every, state.op,
                              backend=self.backend)
            new = NSTMLayerState(op, conv_cache)
        return self._finish(o, z), new

    # ---------------------------------------------------------------- one-token steps on the CPU
    def _fast_step_ok(self, x: torch.Tensor, state: NSTMLayerState, inplace: bool) -> bool:
        """Whether ``step`` can take the CPU path: fp32 / fp64 CPU tensors, every parameter in x's
        dtype, the chunked backend, the C++ kernel buildable, the state in its compute dtype (and
        contiguous when it is updated in place)."""
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            return False
        if inplace and not (state.op.k.is_contiguous() and state.op.v.is_contiguous()
                            and (state.conv is None or state.conv.is_contiguous())):
            return False
        if inplace and isinstance(state.op.pos, torch.Tensor) and state.op.pos.numel() != 1:
            return False                 # (nstm_step_ says what it takes)
        if any(t.dtype != x.dtype or t.device.type != "cpu" for t in (state.op.k, state.op.v)):
            return False
        if state.conv is not None and state.conv.dtype != x.dtype:
            return False
        w = self.in_proj.weight
        if w.dtype != x.dtype or w.device.type != "cpu":
            return False
        top_k = min(self.top_k, self.num_states)
        return (resolve_backend(self.backend, x.device, "nstm_step_") == "chunked"
                and cpu_kernel.usable(x, top_k, False))

    def _plan_params(self):
        """The parameters a step plan is made from (``_finish`` reads the others directly)."""
        r = self.router
        yield from (self.in_proj.weight, r.weight, r.bias, self.states.iota)
        if r.pointer is not None:
            yield r.pointer
        if self.conv is not None:
            yield from (self.conv.weight, self.conv.bias)
        if self.s2s is not None:
            yield from self.s2s.params()

    def _step_plan(self, dtype: torch.dtype) -> _StepPlan:
        """The weights of a step laid out for one matmul and the C++ ops, made again whenever a
        parameter changes (an optimizer step, ``load_state_dict``, pruning)."""
        key = tuple((id(p), p._version) for p in self._plan_params()) + (dtype,)
        plan = self.__dict__.get("_plan")
        if plan is not None and plan.key == key:
            return plan
        with torch.no_grad():
            w_in = torch.cat([self.in_proj.weight, self.router.weight]).to(dtype).t().contiguous()
            b_in = torch.cat([self.in_proj.weight.new_zeros(self.in_proj.weight.shape[0]),
                              self.router.bias]).to(dtype).contiguous()
            pointer = None
            if self.router.pointer is not None:
                pointer = self.router.pointer.to(dtype).transpose(0, 1).contiguous()
            conv_w = conv_b = None
            if self.conv is not None:
                conv_w = self.conv.weight[:, 0].t().to(dtype).contiguous()
                conv_b = self.conv.bias.to(dtype).contiguous()
            if self.s2s is not None:
                p = self.s2s.params()
                s2s = (p.w_q.to(dtype).contiguous(), p.w_k.to(dtype).contiguous(),
                       torch.sigmoid(p.gate.to(dtype)).contiguous())
            else:
                s2s = (w_in.new_zeros(0),) * 3
            plan = _StepPlan(key, w_in, b_in, self.states.log_importance().to(dtype), pointer,
                             conv_w, conv_b, s2s)
        self.__dict__["_plan"] = plan           # not a module attribute: never saved or moved
        return plan

    def _fast_step(self, x: torch.Tensor, state: NSTMLayerState, inplace: bool):
        """``step`` on the CPU: the projections in one matmul, the conv and the operator's step in
        the C++ kernel, the same arithmetic as the general path in fewer, larger calls (a decode
        step of a small model is mostly per-call overhead). ``x [B, D]``."""
        plan = self._step_plan(x.dtype)
        B = x.shape[0]
        H, K, S = self.num_heads, self.head_dim, self.num_states
        C = self.qkv_dim
        r = torch.addmm(plan.b_in, x, plan.w_in)
        qkv, z = r[:, :C], r[:, C:C + H * K]
        logits = r[:, C + H * K:C + H * K + H * S].view(B, H, S) + plan.log_importance
        gate = r[:, C + H * K + H * S:].contiguous()
        pos = state.op.pos
        if plan.pointer is not None:
            rows = torch.remainder(torch.as_tensor(pos).reshape(-1), plan.pointer.shape[0])
            logits = logits + plan.pointer[rows]
        conv = None
        if self.conv is not None:
            window = state.conv.contiguous()
            qkv_in = qkv.unsqueeze(1)
            qkv = torch.ops.nstm_cpu.conv_forward(qkv_in, window, plan.conv_w, plan.conv_b,
                                                  cpu_kernel.NO_SEGMENTS)[:, 0]
            conv = torch.cat([window, qkv_in], 1)[:, 1:]
            if inplace:
                state.conv.copy_(conv)
                conv = state.conv
        q, k, v = qkv.view(B, 3, H, K).transpose(0, 1).contiguous().unbind(0)
        if inplace:
            sk, sv = state.op.k, state.op.v
        else:
            sk = state.op.k.to(memory_format=torch.contiguous_format, copy=True)
            sv = state.op.v.to(memory_format=torch.contiguous_format, copy=True)
        o = torch.ops.nstm_cpu.step_(q, k, v, logits, gate, sk, sv, cpu_kernel._pos_tensor(pos),
                                     *plan.s2s, min(self.top_k, S), self.comm_every,
                                     self.s2s is not None, K ** -0.5)
        y = self._finish(o, z)
        if inplace:
            return y, state
        return y, NSTMLayerState(NSTMState(sk, sv, pos + 1), conv)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, num_states={self.num_states}, "
                f"top_k={self.top_k}, comm_every={self.comm_every}, head_dim={self.head_dim}"
                + (f", write_pointer={self.router.pointer_period}" if self.router.pointer is not None else ""))
