"""Models built from NSTM layers: a block, a language model with constant-memory generation, and a
sequence classifier (spec §5)."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import NSTMConfig
from .layer import NSTMLayer, NSTMLayerState
from .modules import RMSNorm


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, d_model: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(d_model * ratio * 2 / 3)
        self.up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(a) * b)


class NSTMBlock(nn.Module):
    """Pre-norm residual block: ``x + NSTMLayer(norm(x))``, then ``x + MLP(norm(x))``."""

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: float = 4.0, **layer_kwargs):
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.mixer = NSTMLayer(d_model, num_heads, **layer_kwargs)
        self.norm2 = RMSNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio)

    def forward(self, x, state: Optional[NSTMLayerState] = None, return_state: bool = False,
                return_maps: bool = False):
        out = self.mixer(self.norm1(x), state=state, return_state=return_state, return_maps=return_maps)
        extra = ()
        if isinstance(out, tuple):
            out, extra = out[0], out[1:]
        x = x + out
        x = x + self.mlp(self.norm2(x))
        return (x,) + extra if extra else x

    def step(self, x, state: NSTMLayerState):
        y, state = self.mixer.step(self.norm1(x), state)
        x = x + y
        return x + self.mlp(self.norm2(x)), state


def _layer_kwargs(num_states, top_k, comm_every, head_dim, conv_size, use_s2s, backend):
    return dict(num_states=num_states, top_k=top_k, comm_every=comm_every, head_dim=head_dim,
                conv_size=conv_size, use_s2s=use_s2s, backend=backend)


class _NSTMStack(nn.Module):
    """Blocks and the state plumbing shared by the LM and the classifier."""

    def _make_blocks(self, d_model, n_layers, num_heads, mlp_ratio, kw):
        self.blocks = nn.ModuleList(NSTMBlock(d_model, num_heads, mlp_ratio, **kw) for _ in range(n_layers))
        self.norm = RMSNorm(d_model)

    def _run_blocks(self, h, state, return_state, return_maps):
        if state is not None and len(state) != len(self.blocks):
            raise ValueError(f"state must hold one NSTMLayerState per layer ({len(self.blocks)}), "
                             f"got {len(state)}")
        states, maps = [], []
        for i, block in enumerate(self.blocks):
            out = block(h, state=None if state is None else state[i], return_state=return_state,
                        return_maps=return_maps)
            if isinstance(out, tuple):
                h = out[0]
                rest = list(out[1:])
                if return_state:
                    states.append(rest.pop(0))
                if return_maps:
                    maps.append(rest.pop(0))
            else:
                h = out
        return self.norm(h), states, maps

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the layers' load-balancing losses from the last training forward."""
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

    def state_bytes(self, state: Sequence[NSTMLayerState]) -> int:
        """Bytes held by a decode state (slot memories and conv caches of all layers)."""
        total = 0
        for s in state:
            total += s.op.k.numel() * s.op.k.element_size() + s.op.v.numel() * s.op.v.element_size()
            if s.conv is not None:
                total += s.conv.numel() * s.conv.element_size()
        return total


class NSTMLM(_NSTMStack):
    """Language model: token embedding, NSTM blocks, final norm, tied output head.

    ``forward(idx [B, T])`` -> logits ``[B, T, vocab]``. ``generate`` prefills with the chunked
    operator and then decodes one token at a time from a per-layer state cache whose size does not
    depend on the context length.
    """

    def __init__(self, vocab_size: int, d_model: int = 256, n_layers: int = 4, num_heads: int = 4,
                 num_states: int = 64, top_k: int = 8, comm_every: int = 64,
                 head_dim: Optional[int] = None, conv_size: int = 4, mlp_ratio: float = 4.0,
                 use_s2s: bool = True, tie_weights: bool = True, backend: Optional[str] = None):
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.config = NSTMConfig(d_model=d_model, num_heads=num_heads, num_states=num_states, top_k=top_k,
                                 comm_every=comm_every, head_dim=head_dim, conv_size=conv_size,
                                 use_s2s=use_s2s, backend=backend, n_layers=n_layers,
                                 mlp_ratio=mlp_ratio, vocab_size=vocab_size, tie_weights=tie_weights)
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self._make_blocks(d_model, n_layers, num_heads, mlp_ratio,
                          _layer_kwargs(num_states, top_k, comm_every, head_dim, conv_size, use_s2s, backend))
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.embed.weight
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("down.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    @classmethod
    def from_config(cls, config: NSTMConfig) -> "NSTMLM":
        """The language model ``config`` describes (``config.vocab_size`` must be set)."""
        if not isinstance(config, NSTMConfig):
            raise TypeError(f"config must be an NSTMConfig, got {type(config).__name__}")
        if config.vocab_size is None:
            raise ValueError("NSTMLM needs config.vocab_size")
        return cls(**config.to_dict())

    def _check_tokens(self, idx, ndim):
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an int64 tensor, got "
                            f"{getattr(idx, 'dtype', type(idx).__name__)}")
        if idx.dim() != ndim:
            raise ValueError(f"tokens must have shape {'[B, T]' if ndim == 2 else '[B]'}, got {list(idx.shape)}")
        # the range check reads values: skipped while torch.compile traces (it would break the graph)
        if idx.numel() and not torch.compiler.is_compiling() and \
                (idx.min() < 0 or idx.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got range "
                             f"[{int(idx.min())}, {int(idx.max())}]")

    def forward(self, idx: torch.Tensor, state: Optional[List[NSTMLayerState]] = None,
                return_state: bool = False, return_maps: bool = False):
        """``idx [B, T]`` -> ``logits [B, T, vocab]`` (+ per-layer states, + per-layer maps)."""
        self._check_tokens(idx, 2)
        h, states, maps = self._run_blocks(self.embed(idx), state, return_state, return_maps)
        logits = self.head(h)
        out = (logits,) + ((states,) if return_state else ()) + ((maps,) if return_maps else ())
        return out[0] if len(out) == 1 else out

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: List[NSTMLayerState]):
        """One token per sequence: ``tokens [B]`` -> ``(logits [B, vocab], new state)``."""
        self._check_tokens(tokens, 1)
        if state is None or len(state) != len(self.blocks):
            raise ValueError(f"state must hold one NSTMLayerState per layer ({len(self.blocks)}); "
                             "use model.init_state(batch)")
        h = self.embed(tokens)
        new = []
        for block, s in zip(self.blocks, state):
            h, s = block.step(h, s)
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
        self._check_tokens(idx, 2)
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
        from .decode import StaticDecoder
        return StaticDecoder(self, state, cuda_graph=cuda_graph)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, greedy: bool = False,
                 generator: Optional[torch.Generator] = None, cuda_graph: bool = False,
                 prefill_chunk: Optional[int] = None) -> torch.Tensor:
        """Continue ``idx [B, T]`` by ``max_new_tokens`` tokens; returns ``[B, T + max_new_tokens]``.

        The prompt is prefilled with the sequence operator (``prefill``, in pieces of
        ``prefill_chunk`` tokens when given); each new token then costs one step whose memory does
        not grow with the context. ``greedy=True`` (or ``temperature=0``) takes the argmax; otherwise
        sampling with ``temperature``, optional ``top_k`` and nucleus ``top_p``.

        ``cuda_graph=True`` decodes with the state in static buffers updated in place and, on CUDA
        tensors, one captured CUDA graph per step (``nstm.decode.StaticDecoder``); the tokens are
        the same as without it. On the CPU it runs the same in-place step without a graph (one
        warning).
        """
        self._check_tokens(idx, 2)
        check_generate_args(max_new_tokens, temperature, top_k, top_p)
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        if max_new_tokens == 0:
            return idx
        was_training = self.training
        self.eval()
        try:
            logits, state = self.prefill(idx, chunk_size=prefill_chunk)
            decoder = self.static_decoder(state, cuda_graph=True) if cuda_graph else None
            out = [idx]
            for i in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, top_p, greedy, generator)
                out.append(nxt[:, None])
                if i + 1 < max_new_tokens:
                    if decoder is not None:
                        logits = decoder.step(nxt)
                    else:
                        logits, state = self.step(nxt, state)
        finally:
            self.train(was_training)
        return torch.cat(out, dim=1)


def check_generate_args(max_new_tokens, temperature, top_k, top_p) -> None:
    """The sampling arguments ``generate`` takes (shared by NSTMLM and the Transformer baseline)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, greedy: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token from ``logits [B, vocab]``: argmax, or sampling with temperature, top-k, top-p."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p          # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class NSTMClassifier(_NSTMStack):
    """Sequence classifier: inputs ``[B, T, input_dim]`` (e.g. pixels, ``input_dim=1``) or token ids
    ``[B, T]`` (give ``vocab_size``), NSTM blocks, mean or last-token pooling, a linear head.

    The blocks are causal, so right padding does not change the valid positions; pass ``lengths``
    to ``forward`` and the pooling ignores the padding too."""

    def __init__(self, num_classes: int, input_dim: Optional[int] = None,
                 vocab_size: Optional[int] = None, d_model: int = 128, n_layers: int = 2,
                 num_heads: int = 4, num_states: int = 32, top_k: int = 4, comm_every: int = 64,
                 head_dim: Optional[int] = None, conv_size: int = 4, mlp_ratio: float = 4.0,
                 use_s2s: bool = True, pool: str = "mean", backend: Optional[str] = None):
        super().__init__()
        if (input_dim is None) == (vocab_size is None):
            raise ValueError("give exactly one of input_dim (continuous inputs) or vocab_size (token ids)")
        if pool not in ("mean", "last"):
            raise ValueError(f"pool must be 'mean' or 'last', got {pool!r}")
        self.pool, self.input_dim, self.vocab_size = pool, input_dim, vocab_size
        self.num_classes = num_classes
        self.config = NSTMConfig(d_model=d_model, num_heads=num_heads, num_states=num_states, top_k=top_k,
                                 comm_every=comm_every, head_dim=head_dim, conv_size=conv_size,
                                 use_s2s=use_s2s, backend=backend, n_layers=n_layers,
                                 mlp_ratio=mlp_ratio, vocab_size=vocab_size, tie_weights=False)
        self.inp = nn.Linear(input_dim, d_model) if input_dim is not None else nn.Embedding(vocab_size, d_model)
        self._make_blocks(d_model, n_layers, num_heads, mlp_ratio,
                          _layer_kwargs(num_states, top_k, comm_every, head_dim, conv_size, use_s2s, backend))
        self.head = nn.Linear(d_model, num_classes)

    @classmethod
    def from_config(cls, config: NSTMConfig, num_classes: int, input_dim: Optional[int] = None,
                    pool: str = "mean") -> "NSTMClassifier":
        """The classifier ``config`` describes: token ids when ``config.vocab_size`` is set, else
        continuous inputs of ``input_dim`` features (``tie_weights`` does not apply)."""
        if not isinstance(config, NSTMConfig):
            raise TypeError(f"config must be an NSTMConfig, got {type(config).__name__}")
        kw = config.to_dict()
        kw.pop("tie_weights")
        return cls(num_classes, input_dim=input_dim, pool=pool, **kw)

    @staticmethod
    def check_inputs(x, input_dim: Optional[int]) -> None:
        """``x`` must be floats ``[B, T, input_dim]`` (``input_dim`` given) or int64 ids ``[B, T]``
        (shared with ``nstm.baseline.TransformerClassifier``)."""
        if input_dim is not None:
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 3 \
                    or x.shape[-1] != input_dim:
                raise ValueError(f"x must be a float tensor [B, T, input_dim={input_dim}], got "
                                 f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
        elif not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or x.dim() != 2:
            raise ValueError(f"x must be int64 token ids [B, T], got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")

    @staticmethod
    def pool_hidden(h: torch.Tensor, pool: str, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean or last-position pooling of ``h [B, T, D]``; with ``lengths [B]`` only the first
        ``lengths[b]`` positions of sequence ``b`` count (right padding is ignored)."""
        if lengths is None:
            return h.mean(1) if pool == "mean" else h[:, -1]
        B, T, _ = h.shape
        if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int64, torch.int32) \
                or tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must be an int tensor of shape [B={B}], got "
                             f"{getattr(lengths, 'dtype', type(lengths).__name__)} "
                             f"{list(getattr(lengths, 'shape', []))}")
        lengths = lengths.to(h.device)
        if lengths.min() < 1 or lengths.max() > T:
            raise ValueError(f"lengths must be in [1, T={T}], got range "
                             f"[{int(lengths.min())}, {int(lengths.max())}]")
        if pool == "last":
            return h[torch.arange(B, device=h.device), lengths.long() - 1]
        mask = torch.arange(T, device=h.device)[None, :] < lengths[:, None]
        return (h * mask[..., None].to(h.dtype)).sum(1) / lengths[:, None].to(h.dtype)

    def forward(self, x: torch.Tensor, return_maps: bool = False, *,
                lengths: Optional[torch.Tensor] = None):
        """``x [B, T, input_dim]`` or ``[B, T]`` token ids -> class logits ``[B, num_classes]``.

        ``lengths [B]`` (optional): valid positions per right-padded sequence, for the pooling."""
        NSTMClassifier.check_inputs(x, self.input_dim)
        h, _, maps = self._run_blocks(self.inp(x), None, False, return_maps)
        pooled = self.pool_hidden(h, self.pool, lengths)
        logits = self.head(pooled)
        return (logits, maps) if return_maps else logits
