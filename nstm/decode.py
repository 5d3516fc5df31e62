"""Decoding with static buffers: the NSTM state updated in place, optionally replayed as a CUDA graph.

``NSTMLM.step`` is functional (a new state per token). For fast generation the state instead lives
in fixed buffers that each token updates in place, and on a GPU one whole decode step (embedding,
every layer, head) can be captured once as a CUDA graph and replayed per token:

    dec = StaticDecoder(model, state, cuda_graph=True)    # state: from model.prefill / forward
    logits = dec.step(tokens)                             # [B] -> [B, vocab]; state advanced
    state = dec.export()                                  # back to List[NSTMLayerState] (copies)

Which one-token operator runs in place:
  * the CUDA C++ kernel (``nstm_kernels.cuda.cuda_nstm_step_``) when the layer's backend (or
    ``NSTM_BACKEND``) is ``"cuda"`` and the extension is available; the period end
    ((pos + 1) % C == 0) is decided on the device from a position tensor, so a graph replays it;
  * else the same step in PyTorch ops on the buffers (``torch_nstm_step_``), which is also
    capturable: with a position tensor it computes the state-to-state attention every token and
    keeps it only at a period end (``torch.where``); with an int position it branches on the host.

Without a GPU ``cuda_graph=True`` is a documented fallback: the same in-place step runs eagerly
(no capture) and one warning says so. The memory held is the same at every position: the slot
memories, the conv caches and a one-element position tensor.
"""
from __future__ import annotations

import logging
import os
from typing import List, NamedTuple, Optional, Union

import torch

from nstm_kernels import NSTMState
from nstm_kernels.routing import route_torch
from nstm_kernels.s2s import state_attention_torch

from .layer import NSTMLayer, NSTMLayerState

logger = logging.getLogger("nstm")
_warned = set()

# The CUDA C++ step becomes the in-place decode default on CUDA tensors once its GPU tests have
# passed on a real GPU (as for Triton in nstm_kernels.dispatch). Until then it is opt-in:
# backend="cuda" on the model / layer, or NSTM_BACKEND=cuda.
CUDA_DEFAULT_FOR_DECODE = False


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


class LayerBuffers(NamedTuple):
    """One layer's decode state in static buffers (updated in place)."""

    k: torch.Tensor               # [B, H, S, K] fp32, contiguous
    v: torch.Tensor               # [B, H, S, V] fp32, contiguous
    conv: Optional[torch.Tensor]  # [B, W - 1, C] or None


@torch.no_grad()
def torch_nstm_step_(q, k, v, route_logits, write_gate, top_k: int, s2s, comm_every: int,
                     state_k: torch.Tensor, state_v: torch.Tensor, pos: Union[int, torch.Tensor],
                     scale: Optional[float] = None) -> torch.Tensor:
    """The one-token step of ``nstm_kernels.chunked.recurrent_nstm_step`` with the slot memory
    ``state_k/state_v`` (fp32) updated IN PLACE; returns ``o [B, H, V]`` in q's dtype.

    ``pos``: int (the period end is decided on the host) or an int64 tensor of one element (decided
    on the device, for CUDA graphs). ``pos`` is not incremented.
    """
    B, H, K = q.shape
    V = v.shape[-1]
    dt = state_k.dtype
    scale = K ** -0.5 if scale is None else scale
    idx, wts = route_torch(route_logits, write_gate, top_k)           # [B, H, top_k]
    w = wts.unsqueeze(-1).to(dt)
    ik = idx.unsqueeze(-1).expand(B, H, top_k, K)
    iv = idx.unsqueeze(-1).expand(B, H, top_k, V)
    state_k.scatter_(2, ik, (1 - w) * state_k.gather(2, ik) + w * k.to(dt).unsqueeze(2))
    state_v.scatter_(2, iv, (1 - w) * state_v.gather(2, iv) + w * v.to(dt).unsqueeze(2))
    p = torch.softmax(scale * torch.einsum("bhk,bhsk->bhs", q.to(dt), state_k), dim=-1)
    o = torch.einsum("bhs,bhsv->bhv", p, state_v)
    if s2s is not None:
        if isinstance(pos, torch.Tensor):
            event = ((pos.reshape(()) + 1) % comm_every) == 0
            state_v.copy_(torch.where(event, state_attention_torch(state_v, s2s), state_v))
        elif (int(pos) + 1) % comm_every == 0:
            state_v.copy_(state_attention_torch(state_v, s2s))
    return o.to(q.dtype)


def _uses_cuda_kernel(layer: NSTMLayer, device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    backend = layer.backend
    if backend is None:
        backend = os.environ.get("NSTM_BACKEND", "").strip() or None
    if backend is None:
        backend = "cuda" if CUDA_DEFAULT_FOR_DECODE else None
    if backend != "cuda":
        return False
    from nstm_kernels.cuda import unavailable_reason
    reason = unavailable_reason(device)
    if reason is not None:
        _warn_once(f"decode:{device}", f"nstm: in-place decode: CUDA step kernel unavailable "
                                       f"({reason}); using the PyTorch in-place step")
        return False
    return True


@torch.no_grad()
def layer_step_(layer: NSTMLayer, x: torch.Tensor, buf: LayerBuffers, pos: Union[int, torch.Tensor],
                use_cuda_kernel: bool = False) -> torch.Tensor:
    """``NSTMLayer.step`` with the state in ``buf`` updated in place: ``x [B, D]`` -> ``y [B, D]``."""
    H, K = layer.num_heads, layer.head_dim
    qkv, z, logits, gate = layer._project(x)
    if layer.conv is not None:
        y, cache = layer.conv(qkv.unsqueeze(1), buf.conv)
        buf.conv.copy_(cache)
        qkv = y[:, 0]
    q, k, v = qkv.unflatten(-1, (3, H, K)).unbind(1)
    s2s = layer.s2s.params() if layer.s2s is not None else None
    top_k = min(layer.top_k, layer.num_states)
    if use_cuda_kernel:
        from nstm_kernels.cuda import cuda_nstm_step_
        o = cuda_nstm_step_(q, k, v, logits, gate, top_k, s2s, layer.comm_every, buf.k, buf.v, pos)
    else:
        o = torch_nstm_step_(q, k, v, logits, gate, top_k, s2s, layer.comm_every, buf.k, buf.v, pos)
    return layer._finish(o, z)


class StaticDecoder:
    """Decode an ``NSTMLM`` token by token with the state in static buffers (see the module doc).

    Args:
        model: an ``NSTMLM`` (put it in eval mode).
        state: the per-layer states to start from (``model.init_state`` / ``model.prefill``).
        cuda_graph: capture one decode step as a CUDA graph on the first ``step`` and replay it
            (CUDA tensors only; elsewhere the step runs eagerly, with one warning).
    """

    def __init__(self, model, state: List[NSTMLayerState], cuda_graph: bool = False):
        if len(state) != len(model.blocks):
            raise ValueError(f"state must hold one NSTMLayerState per layer ({len(model.blocks)}), "
                             f"got {len(state)}")
        self.model = model
        first = state[0].op
        self.device = first.k.device
        self.batch = first.k.shape[0]
        self.pos = int(first.pos)                          # host mirror of the position
        self.pos_t = torch.full((1,), self.pos, dtype=torch.int64, device=self.device)
        self.bufs: List[LayerBuffers] = []
        for s in state:
            if int(s.op.pos) != self.pos:
                raise ValueError("all layers' states must be at the same position")
            k = s.op.k.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            v = s.op.v.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            conv = None if s.conv is None else s.conv.detach().clone(memory_format=torch.contiguous_format)
            self.bufs.append(LayerBuffers(k, v, conv))
        self.cuda_kernel = [_uses_cuda_kernel(b.mixer, self.device) for b in model.blocks]
        self.cuda_graph = bool(cuda_graph) and self.device.type == "cuda"
        if cuda_graph and not self.cuda_graph:
            _warn_once(f"graph:{self.device.type}",
                       f"nstm: cuda_graph=True needs CUDA tensors (got {self.device.type}); "
                       "decoding with the same in-place step, without a graph")
        self._graph = None
        self._tokens = None
        self._logits = None

    def state_bytes(self) -> int:
        """Bytes of the decode state (slot memories, conv caches, the position tensor)."""
        n = self.pos_t.numel() * self.pos_t.element_size()
        for b in self.bufs:
            for t in b:
                if t is not None:
                    n += t.numel() * t.element_size()
        return n

    def _forward(self, tokens: torch.Tensor, pos: Union[int, torch.Tensor]) -> torch.Tensor:
        m = self.model
        h = m.embed(tokens)
        for block, buf, ck in zip(m.blocks, self.bufs, self.cuda_kernel):
            h = h + layer_step_(block.mixer, block.norm1(h), buf, pos, ck)
            h = h + block.mlp(block.norm2(h))
        return m.head(m.norm(h))

    def _snapshot(self):
        return [tuple(None if t is None else t.clone() for t in b) for b in self.bufs]

    def _restore(self, snap) -> None:
        for b, s in zip(self.bufs, snap):
            for t, c in zip(b, s):
                if t is not None:
                    t.copy_(c)

    def _capture(self, tokens: torch.Tensor) -> None:
        self._tokens = tokens.clone()
        snap = self._snapshot()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):                  # warm-up (lazy inits), then undo its writes
            for _ in range(2):
                self._forward(self._tokens, self.pos_t)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._restore(snap)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._forward(self._tokens, self.pos_t)
            self.pos_t.add_(1)
        self._graph = graph

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per sequence, ``tokens [B]`` -> ``logits [B, vocab]``; the buffers advance.

        With a graph the returned tensor is a static buffer that the next ``step`` overwrites."""
        if tokens.shape != (self.batch,):
            raise ValueError(f"tokens must have shape [{self.batch}], got {list(tokens.shape)}")
        if self.cuda_graph:
            if self._graph is None:
                self._capture(tokens)
            self._tokens.copy_(tokens)
            self._graph.replay()
            self.pos += 1
            return self._logits
        out = self._forward(tokens, self.pos)
        self.pos += 1
        self.pos_t.fill_(self.pos)
        return out

    def export(self) -> List[NSTMLayerState]:
        """The current state as ``List[NSTMLayerState]`` (copies; continue with ``model.step``)."""
        return [NSTMLayerState(NSTMState(b.k.clone(), b.v.clone(), self.pos),
                               None if b.conv is None else b.conv.clone()) for b in self.bufs]
