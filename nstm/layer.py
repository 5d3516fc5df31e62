"""NSTMLayer: the drop-in sequence mixer around the fused NSTM operator (spec §5)."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nstm_kernels import (NSTMState, nstm_attention, nstm_attention_with_maps, nstm_step,
                          sparse_route)

from .modules import RMSNorm, ShortConv
from .router import TokenToStateRouter
from .s2s import StateToStateAttention
from .state_manager import StateManager


class NSTMLayerState(NamedTuple):
    """Decode state of one layer: the operator's slot memory and the short convolution's cache."""

    op: NSTMState
    conv: Optional[torch.Tensor]       # [B, conv_size - 1, channels] or None without a conv


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

    Example::

        >>> layer = NSTMLayer(d_model=64, num_heads=4, num_states=16, top_k=4)
        >>> y = layer(torch.randn(2, 100, 64))          # [2, 100, 64]
        >>> loss = y.pow(2).mean() + 0.01 * layer.aux_loss
    """

    def __init__(self, d_model: int, num_heads: int, num_states: int = 64, top_k: int = 8,
                 comm_every: int = 64, head_dim: Optional[int] = None, conv_size: int = 4,
                 use_s2s: bool = True, backend: Optional[str] = None):
        super().__init__()
        for name, val, low in (("d_model", d_model, 1), ("num_heads", num_heads, 1),
                               ("num_states", num_states, 1), ("top_k", top_k, 1),
                               ("comm_every", comm_every, 1), ("conv_size", conv_size, 0)):
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
        self.router = TokenToStateRouter(d_model, num_heads, num_states)
        self.states = StateManager(num_heads, num_states, K, K)
        self.states.attach_router(self.router)
        self.s2s = StateToStateAttention(num_heads, K) if use_s2s else None
        self.conv = ShortConv(self.qkv_dim, conv_size) if conv_size > 0 else None
        self.norm = RMSNorm(K)
        self.out_proj = nn.Linear(H * K, d_model, bias=False)
        nn.init.normal_(self.in_proj.weight, std=1.0 / math.sqrt(d_model))
        nn.init.normal_(self.out_proj.weight, std=1.0 / math.sqrt(H * K))
        self.aux_loss = torch.zeros(())

    @property
    def num_states(self) -> int:
        return self.states.num_states

    def _project(self, x: torch.Tensor):
        """The input projections: q, k, v, z (one matmul) and route logits and write gates (one).

        Two matmuls, not one over concatenated weights: the concatenation copied both weight
        matrices on every call, a fifth of a decode step's time on the CPU (bench/NOTES.md)."""
        H, K = self.num_heads, self.head_dim
        qkv, z = F.linear(x, self.in_proj.weight.to(x.dtype)).split([self.qkv_dim, H * K], dim=-1)
        r = F.linear(x, self.router.weight.to(x.dtype), self.router.bias.to(x.dtype))
        logits, gate = self.router.split(r, self.states.log_importance())
        return qkv, z, logits, gate

    def _validate(self, x: torch.Tensor, state, step: bool) -> None:
        want = "[B, D]" if step else "[B, T, D]"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape {want}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {x.dtype}")
        if x.dim() != (2 if step else 3) or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape {want} with D = {self.d_model}, got {list(x.shape)}")
        if state is not None:
            if not isinstance(state, NSTMLayerState):
                raise TypeError(f"state must be an NSTMLayerState (from return_state=True or "
                                f"init_state), got {type(state).__name__}")
            if state.op.k.shape[0] != x.shape[0]:
                raise ValueError(f"state is for batch {state.op.k.shape[0]}, x has batch {x.shape[0]}")
            if state.op.k.shape[2] != self.num_states:
                raise ValueError(f"state has {state.op.k.shape[2]} slots, the layer has "
                                 f"{self.num_states} (was the layer pruned after the state was made?)")

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
        counts = F.one_hot(indices, S).float().flatten(0, -4).sum((0, 2))              # [H, S]
        frac = counts / counts.sum(-1, keepdim=True)
        return (S * (frac * probs).sum(-1)).mean()

    def forward(self, x: torch.Tensor, state: Optional[NSTMLayerState] = None,
                return_state: bool = False, return_maps: bool = False):
        """``x [B, T, D]`` -> ``y [B, T, D]``; with ``return_state`` also the ``NSTMLayerState`` after
        the last token (pass it back as ``state`` to continue the stream), with ``return_maps`` also a
        dict of maps (routing indices/weights, read distributions, s2s attention)."""
        self._validate(x, state, step=False)
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        qkv, z, logits, gate = self._project(x)
        conv_cache = None
        if self.conv is not None:
            qkv, conv_cache = self.conv(qkv, None if state is None else state.conv)
        q, k, v = qkv.unflatten(-1, (3, H, K)).unbind(2)
        op_state = self.states.initial_state(B) if state is None else state.op
        s2s = self.s2s.params() if self.s2s is not None else None
        top_k = min(self.top_k, self.num_states)
        args = (q, k, v, logits, gate, top_k, s2s, self.comm_every, op_state, return_state)
        if return_maps:
            o, final, maps = nstm_attention_with_maps(*args, backend=self.backend)
        else:
            o, final = nstm_attention(*args, backend=self.backend)
        if self.training or return_maps:
            with torch.no_grad():
                indices, weights = sparse_route(logits.detach(), gate.detach(), top_k)
            self.aux_loss = self._aux(logits, indices, top_k)
            if self.training:
                self.states.record_usage(indices, weights)
        y = self._finish(o, z)
        out = (y,)
        if return_state:
            out += (NSTMLayerState(final, conv_cache),)
        if return_maps:
            out += (maps,)
        return out[0] if len(out) == 1 else out

    @torch.no_grad()
    def step(self, x: torch.Tensor, state: NSTMLayerState):
        """One token: ``x [B, D]`` and the state before it -> ``(y [B, D], new state)``."""
        self._validate(x, state, step=True)
        if state is None:
            raise TypeError("state must be an NSTMLayerState; use layer.init_state(batch)")
        H, K = self.num_heads, self.head_dim
        qkv, z, logits, gate = self._project(x)
        conv_cache = None
        if self.conv is not None:
            qkv, conv_cache = self.conv(qkv.unsqueeze(1), state.conv)
            qkv = qkv[:, 0]
        q, k, v = qkv.unflatten(-1, (3, H, K)).unbind(1)
        s2s = self.s2s.params() if self.s2s is not None else None
        o, op = nstm_step(q, k, v, logits, gate, min(self.top_k, self.num_states), s2s,
                          self.comm_every, state.op, backend=self.backend)
        return self._finish(o, z), NSTMLayerState(op, conv_cache)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, num_states={self.num_states}, "
                f"top_k={self.top_k}, comm_every={self.comm_every}, head_dim={self.head_dim}")
