"""Models built from NSTM layers: a block, a language model with constant-memory generation, and a
sequence classifier (spec §5).

Every model is described by an ``NSTMConfig`` (``model.config``; ``Model.from_config(cfg)``).
Results follow the layer's rule: the main output (logits, or ``y`` for a block) unless a state or
maps are asked for, then a NamedTuple (``LayerOutput`` for a block, ``LMOutput`` for the LM).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from .config import NSTMConfig
from .generation import GenerateMixin, check_tokens, select_positions
from .layer import LayerOutput, NSTMLayer, NSTMLayerState
from .modules import MLP, RMSNorm, check_classifier_inputs, pool_hidden


class NSTMBlock(nn.Module):
    """Pre-norm residual block: ``x + NSTMLayer(norm(x))``, then ``x + MLP(norm(x))``.

    ``forward`` returns ``x`` or, with ``return_state`` / ``return_maps``, a ``LayerOutput`` (the
    layer's state and maps)."""

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: float = 4.0, **layer_kwargs):
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.mixer = NSTMLayer(d_model, num_heads, **layer_kwargs)
        self.norm2 = RMSNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio)

    def forward(self, x, state: Optional[NSTMLayerState] = None, return_state: bool = False,
                return_maps: bool = False, cu_seqlens: Optional[torch.Tensor] = None):
        asked = return_state or return_maps
        out = self.mixer(self.norm1(x), state=state, return_state=return_state, return_maps=return_maps,
                         cu_seqlens=cu_seqlens)
        x = x + (out.y if asked else out)
        x = x + self.mlp(self.norm2(x))
        return LayerOutput(x, out.state, out.maps) if asked else x

    def step(self, x, state: NSTMLayerState, inplace: bool = False):
        """One token (``NSTMLayer.step``): ``x [B, D]`` -> ``(x, new state)``."""
        y, state = self.mixer.step(self.norm1(x), state, inplace=inplace)
        x = x + y
        return x + self.mlp(self.norm2(x)), state


class LMOutput(NamedTuple):
    """``NSTMLM.forward`` with ``return_state`` / ``return_maps``: the logits, the per-layer
    states after the last token (or None), the per-layer maps (or None)."""

    logits: torch.Tensor
    state: Optional[List[NSTMLayerState]]
    maps: Optional[List[Dict[str, Any]]]


def detach_state(state: Sequence[NSTMLayerState]) -> List[NSTMLayerState]:
    """A model's per-layer state cut from the autograd graph (truncated backpropagation)."""
    return [s.detach() for s in state]


class _NSTMStack(nn.Module):
    """Blocks and the state plumbing shared by the LM and the classifier."""

    def _make_blocks(self, config: NSTMConfig):
        self.blocks = nn.ModuleList(NSTMBlock(config.d_model, config.num_heads, config.mlp_ratio,
                                              **config.layer_kwargs())
                                    for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model)

    def _run_blocks(self, h, state, return_state, return_maps, cu_seqlens=None):
        if state is not None and len(state) != len(self.blocks):
            raise ValueError(f"state must hold one NSTMLayerState per layer ({len(self.blocks)}), "
                             f"got {len(state)}")
        states, maps = [], []
        asked = return_state or return_maps
        for i, block in enumerate(self.blocks):
            out = block(h, state=None if state is None else state[i], return_state=return_state,
                        return_maps=return_maps, cu_seqlens=cu_seqlens)
            if asked:
                h = out.y
                states.append(out.state)
                maps.append(out.maps)
            else:
                h = out
        return self.norm(h), (states if return_state else None), (maps if return_maps else None)

    @property
    def aux_loss(self) -> torch.Tensor:
        """The load-balancing loss of the last forward, summed over the layers: the one way to
        add it to a training loss (``loss + weight * model.aux_loss``). Zero after an eval
        forward (``NSTMLayer.aux_loss``)."""
        return sum(b.mixer.aux_loss for b in self.blocks)

    def nstm_layers(self) -> List[NSTMLayer]:
        return [b.mixer for b in self.blocks]

    def init_state(self, batch: int) -> List[NSTMLayerState]:
        """Per-layer states before the first token (learned initial memories)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        return [b.mixer.init_state(batch) for b in self.blocks]

    @torch.no_grad()
    def prune_states(self, threshold: float):
        """Prune every layer's slots below ``threshold`` importance; returns the per-layer reports.

        Parameters are replaced: make a new optimizer afterwards."""
        return [b.mixer.states.prune(threshold) for b in self.blocks]

    detach_state = staticmethod(detach_state)

    def state_bytes(self, state: Sequence[NSTMLayerState]) -> int:
        """Bytes held by a decode state (slot memories and conv caches of all layers)."""
        total = 0
        for s in state:
            total += s.op.k.numel() * s.op.k.element_size() + s.op.v.numel() * s.op.v.element_size()
            if s.conv is not None:
                total += s.conv.numel() * s.conv.element_size()
        return total


class NSTMLM(GenerateMixin, _NSTMStack):
    """Language model: token embedding, NSTM blocks, final norm, tied output head.

    ``forward(idx [B, T])`` -> logits ``[B, T, vocab]`` (with ``return_state`` / ``return_maps``:
    ``LMOutput(logits, state, maps)``). ``generate`` prefills with the sequence operator and then
    decodes one token at a time from a per-layer state cache whose size does not depend on the
    context length.

    The arguments are the fields of ``NSTMConfig`` (``NSTMLM.from_config(cfg)`` is the same model).
    ``top_k`` is the routing's slots per token; ``generate`` calls its sampling cut-off
    ``sample_top_k``.
    """

    def __init__(self, vocab_size: int, d_model: int = 256, n_layers: int = 4, num_heads: int = 4,
                 num_states: int = 64, top_k: int = 8, comm_every: int = 64,
                 head_dim: Optional[int] = None, conv_size: int = 4, mlp_ratio: float = 4.0,
                 use_s2s: bool = True, tie_weights: bool = True, backend: Optional[str] = None,
                 write_pointer: int = 0):
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.config = NSTMConfig(d_model=d_model, num_heads=num_heads, num_states=num_states, top_k=top_k,
                                 comm_every=comm_every, head_dim=head_dim, conv_size=conv_size,
                                 use_s2s=use_s2s, backend=backend, write_pointer=write_pointer, n_layers=n_layers,
                                 mlp_ratio=mlp_ratio, vocab_size=vocab_size, tie_weights=tie_weights)
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self._make_blocks(self.config)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.embed.weight
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("down.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    @classmethod
    def from_config(cls, config: NSTMConfig) -> NSTMLM:
        """The language model ``config`` describes (``config.vocab_size`` must be set)."""
        if not isinstance(config, NSTMConfig):
            raise TypeError(f"config must be an NSTMConfig, got {type(config).__name__}")
        if config.vocab_size is None:
            raise ValueError("NSTMLM needs config.vocab_size")
        return cls(**config.to_dict())

    def forward(self, idx: torch.Tensor, state: Optional[List[NSTMLayerState]] = None,
                return_state: bool = False, return_maps: bool = False,
                cu_seqlens: Optional[torch.Tensor] = None, logits_at: Optional[torch.Tensor] = None):
        """``idx [B, T]`` -> ``logits [B, T, vocab]``; with ``return_state`` / ``return_maps``
        ``LMOutput(logits, per-layer states or None, per-layer maps or None)``.

        ``cu_seqlens`` (int64 ``[N + 1]``): ``idx [1, T]`` holds N documents end to end, each run
        as if alone (``NSTMLayer.forward``); the states returned then have batch N.
        ``logits_at`` (bool ``[B, T]``): only these positions go through the output head, and the
        logits come as ``[n, vocab]`` in the mask's row-major order (``logits[mask]`` of the full
        call, without the full ``[B, T, vocab]`` tensor: tasks that score a few positions)."""
        check_tokens(idx, 2, self.vocab_size)
        if idx.shape[1] < 1:
            raise ValueError(f"idx must hold at least one token (T >= 1), got shape {list(idx.shape)}")
        h, states, maps = self._run_blocks(self.embed(idx), state, return_state, return_maps, cu_seqlens)
        logits = self.head(select_positions(h, logits_at))
        if return_state or return_maps:
            return LMOutput(logits, states, maps)
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: List[NSTMLayerState], inplace: bool = False):
        """One token per sequence: ``tokens [B]`` -> ``(logits [B, vocab], new state)``
        (``inplace``: as ``NSTMLayer.step``)."""
        check_tokens(tokens, 1, self.vocab_size)
        if state is None or len(state) != len(self.blocks):
            raise ValueError(f"state must hold one NSTMLayerState per layer ({len(self.blocks)}); "
                             "use model.init_state(batch)")
        h = self.embed(tokens)
        new = []
        for block, s in zip(self.blocks, state):
            h, s = block.step(h, s, inplace=inplace)
            new.append(s)
        return self.head(self.norm(h)), new

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, state: Optional[List[NSTMLayerState]] = None,
                chunk_size: Optional[int] = None):
        """Run a prompt ``idx [B, T]`` through the sequence operator (chunked / Triton path) and return
        ``(logits of its last position [B, vocab], per-layer states)``.

        ``state`` continues an earlier stream; ``chunk_size`` feeds the prompt in pieces of that many
        tokens, passing the state on (the same result, activations bounded by the piece; how a very
        long context is reached). Only the last position goes through the output head.
        """
        check_tokens(idx, 2, self.vocab_size)
        T = idx.shape[1]
        if T < 1:
            raise ValueError("the prompt must hold at least one token")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        piece = T if chunk_size is None else chunk_size
        h = None
        for s in range(0, T, piece):
            h, state, _ = self._run_blocks(self.embed(idx[:, s:s + piece]), state, True, False)
        return self.head(h[:, -1]), state

    def static_decoder(self, state: List[NSTMLayerState], cuda_graph: bool = False):
        """A ``nstm.decode.StaticDecoder`` starting from ``state``: the state in static buffers
        updated in place each token, optionally one CUDA graph per decode step."""
        from .decode import StaticDecoder  # decode.py builds on this module
        return StaticDecoder(self, state, cuda_graph=cuda_graph)

    def _decoder(self, idx, max_new_tokens, cuda_graph: bool = False,
                 prefill_chunk: Optional[int] = None):
        """``generate``'s options: ``prefill_chunk`` feeds the prompt in pieces (``prefill``);
        ``cuda_graph=True`` decodes with the state in static buffers updated in place and, on CUDA
        tensors, one captured CUDA graph per step (``nstm.decode.StaticDecoder``): the same tokens
        as without it; on the CPU the same in-place step runs without a graph (one warning)."""
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        logits, state = self.prefill(idx, chunk_size=prefill_chunk)
        if cuda_graph:
            return logits, self.static_decoder(state, cuda_graph=True).step
        return logits, _StateStepper(self, state).step


class _StateStepper:
    """``NSTMLM.step`` with the state kept between calls (``generate`` without static buffers)."""

    def __init__(self, model: NSTMLM, state: List[NSTMLayerState]):
        self.model, self.state = model, state

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits, self.state = self.model.step(tokens, self.state)
        return logits


class NSTMClassifier(_NSTMStack):
    """Sequence classifier: inputs ``[B, T, input_dim]`` (e.g. pixels, ``input_dim=1``) or token ids
    ``[B, T]`` (give ``vocab_size``), NSTM blocks, mean or last-token pooling, a linear head.

    The blocks are causal, so right padding does not change the valid positions; pass ``lengths``
    to ``forward`` and the pooling ignores the padding too."""

    def __init__(self, num_classes: int, input_dim: Optional[int] = None,
                 vocab_size: Optional[int] = None, d_model: int = 128, n_layers: int = 2,
                 num_heads: int = 4, num_states: int = 32, top_k: int = 4, comm_every: int = 64,
                 head_dim: Optional[int] = None, conv_size: int = 4, mlp_ratio: float = 4.0,
                 use_s2s: bool = True, pool: str = "mean", backend: Optional[str] = None,
                 write_pointer: int = 0):
        super().__init__()
        if (input_dim is None) == (vocab_size is None):
            raise ValueError("give exactly one of input_dim (continuous inputs) or vocab_size (token ids)")
        if pool not in ("mean", "last"):
            raise ValueError(f"pool must be 'mean' or 'last', got {pool!r}")
        self.pool, self.input_dim, self.vocab_size = pool, input_dim, vocab_size
        self.num_classes = num_classes
        self.config = NSTMConfig(d_model=d_model, num_heads=num_heads, num_states=num_states, top_k=top_k,
                                 comm_every=comm_every, head_dim=head_dim, conv_size=conv_size,
                                 use_s2s=use_s2s, backend=backend, write_pointer=write_pointer, n_layers=n_layers,
                                 mlp_ratio=mlp_ratio, vocab_size=vocab_size, tie_weights=False)
        self.inp = nn.Linear(input_dim, d_model) if input_dim is not None else nn.Embedding(vocab_size, d_model)
        self._make_blocks(self.config)
        self.head = nn.Linear(d_model, num_classes)

    @classmethod
    def from_config(cls, config: NSTMConfig, num_classes: int, input_dim: Optional[int] = None,
                    pool: str = "mean") -> NSTMClassifier:
        """The classifier ``config`` describes: token ids when ``config.vocab_size`` is set, else
        continuous inputs of ``input_dim`` features (``tie_weights`` does not apply)."""
        if not isinstance(config, NSTMConfig):
            raise TypeError(f"config must be an NSTMConfig, got {type(config).__name__}")
        kw = config.to_dict()
        kw.pop("tie_weights")
        return cls(num_classes, input_dim=input_dim, pool=pool, **kw)

    def forward(self, x: torch.Tensor, return_maps: bool = False, *,
                lengths: Optional[torch.Tensor] = None):
        """``x [B, T, input_dim]`` or ``[B, T]`` token ids -> class logits ``[B, num_classes]``.

        ``lengths [B]`` (optional): valid positions per right-padded sequence, for the pooling."""
        check_classifier_inputs(x, self.input_dim)
        h, _, maps = self._run_blocks(self.inp(x), None, False, return_maps)
        pooled = pool_hidden(h, self.pool, lengths)
        logits = self.head(pooled)
        return (logits, maps) if return_maps else logits
