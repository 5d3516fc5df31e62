"""Decoding with static buffers: the NSTM state updated in place, optionally replayed as a CUDA graph.

``NSTMLM.step`` is functional (a new state per token). For fast generation the state instead lives
in fixed buffers that each token updates in place (``NSTMLayer.step(..., inplace=True)``), and on a
GPU one whole decode step (embedding, every layer, head) can be captured once as a CUDA graph and
replayed per token:

    dec = StaticDecoder(model, state, cuda_graph=True)    # state: from model.prefill / forward
    logits = dec.step(tokens)                             # [B] -> [B, vocab]; state advanced
    state = dec.export()                                  # back to List[NSTMLayerState] (copies)

The in-place one-token operator is ``nstm_kernels.nstm_step_``; ``nstm_kernels.dispatch`` picks it
like every other op: the CUDA C++ kernel for ``backend="cuda"`` (on the layer, or ``NSTM_BACKEND``),
else the PyTorch step. With a CUDA graph the position is a one-element tensor, so the period end
((pos + 1) % C == 0) is decided on the device and replays correctly.

Without a GPU ``cuda_graph=True`` is a documented fallback: the same in-place step runs eagerly
(no capture) and one warning says so. The memory held is the same at every position: the slot
memories, the conv caches and a one-element position tensor.
"""
from __future__ import annotations

import logging
from typing import List, Union

import torch

from nstm_kernels import NSTMState

from .layer import NSTMLayerState

logger = logging.getLogger("nstm")
_warned = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


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
        self.bufs: List[NSTMLayerState] = []        # pos of each: a placeholder (self.pos rules)
        for s in state:
            if int(s.op.pos) != self.pos:
                raise ValueError("all layers' states must be at the same position")
            k = s.op.k.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            v = s.op.v.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            conv = None if s.conv is None else s.conv.detach().clone(memory_format=torch.contiguous_format)
            self.bufs.append(NSTMLayerState(NSTMState(k, v, 0), conv))
        self.cuda_graph = bool(cuda_graph) and self.device.type == "cuda"
        if cuda_graph and not self.cuda_graph:
            _warn_once(f"graph:{self.device.type}",
                       f"nstm: cuda_graph=True needs CUDA tensors (got {self.device.type}); "
                       "decoding with the same in-place step, without a graph")
        self._graph = None
        self._tokens = None
        self._logits = None

    def _tensors(self):
        for b in self.bufs:
            yield from (b.op.k, b.op.v, b.conv)

    def state_bytes(self) -> int:
        """Bytes of the decode state (slot memories, conv caches, the position tensor)."""
        n = self.pos_t.numel() * self.pos_t.element_size()
        return n + sum(t.numel() * t.element_size() for t in self._tensors() if t is not None)

    def _forward(self, tokens: torch.Tensor, pos: Union[int, torch.Tensor]) -> torch.Tensor:
        m = self.model
        h = m.embed(tokens)
        for block, buf in zip(m.blocks, self.bufs):
            state = NSTMLayerState(NSTMState(buf.op.k, buf.op.v, pos), buf.conv)
            h, _ = block.step(h, state, inplace=True)
        return m.head(m.norm(h))

    def _snapshot(self):
        return [None if t is None else t.clone() for t in self._tensors()]

    def _restore(self, snap) -> None:
        for t, c in zip(self._tensors(), snap):
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
        return [NSTMLayerState(NSTMState(b.op.k.clone(), b.op.v.clone(), self.pos),
                               None if b.conv is None else b.conv.clone()) for b in self.bufs]
