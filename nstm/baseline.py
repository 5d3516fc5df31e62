"""Transformer baseline for NSTM comparisons: same width and depth, about the same parameter count.

* ``TransformerLM``: pre-norm blocks (RMSNorm), causal ``scaled_dot_product_attention`` with rotary
  positions (RoPE), the SwiGLU ``MLP`` of the NSTM models, a tied output head. Decoding uses a
  preallocated per-layer KV cache (``init_cache`` / ``prefill`` / ``step`` / ``generate``).
* ``TransformerClassifier``: the same blocks behind ``NSTMClassifier``'s interface.
* ``matched_transformer_config``: constructor arguments for a Transformer with the width and depth
  of an NSTM model and its parameter count within 10% (the MLP ratio is adjusted).

Example::

    >>> nstm = NSTMLM(256, d_model=128, n_layers=2, num_heads=4)
    >>> base = TransformerLM(**matched_transformer_config(nstm))
    >>> cache = base.init_cache(batch=1, max_len=64)
    >>> logits = base.prefill(torch.randint(0, 256, (1, 10)), cache)     # [1, 10, 256]
    >>> logits, cache = base.step(logits[:, -1].argmax(-1), cache)        # [1, 256]

On CUDA, the decode paths (``prefill`` with a cache, ``step``) pin SDPA to the flash and
memory-efficient backends: with a KV length that changes at every call, the cuDNN backend re-plans
each time and is an order of magnitude slower.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from nstm_kernels.utils import check_cu_seqlens

from .generation import GenerateMixin, check_tokens, select_positions
from .models import NSTMLM, NSTMClassifier
from .modules import MLP, RMSNorm, check_classifier_inputs, pool_hidden

__all__ = ["TransformerLM", "TransformerClassifier", "KVCache", "matched_transformer_config",
           "apply_rotary", "rotary_cos_sin", "count_parameters"]


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (a tied head is counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---- rotary positions --------------------------------------------------------------------------
def rotary_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """``cos, sin [T, head_dim / 2]`` (fp32) for integer ``positions [T]``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device,
                                            dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., T, Dh]`` by the angles of ``cos/sin [T, Dh/2]`` (pairs ``(i, i + Dh/2)``).

    The score ``<R(m) q, R(n) k>`` depends only on ``m - n``: attention is relative."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


def _decode_sdpa_context(device: torch.device):
    """On CUDA: SDPA restricted to the flash and memory-efficient kernels (see the module doc)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


# ---- KV cache ----------------------------------------------------------------------------------
class KVCache:
    """Preallocated keys and values per layer, ``k[i], v[i] [B, H, max_len, Dh]``, and the number of
    positions filled so far (``length``). ``TransformerLM.step``/``prefill`` write into it in place."""

    def __init__(self, k: List[torch.Tensor], v: List[torch.Tensor], length: int = 0):
        self.k, self.v, self.length = k, v, length

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def nbytes(self) -> int:
        """Bytes allocated for the whole cache (all ``max_len`` positions)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self) -> KVCache:
        self.length = 0
        return self

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.num_layers}, batch={self.batch}, length={self.length}, "
                f"max_len={self.max_len}, dtype={self.k[0].dtype})")


# ---- blocks ------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with RoPE; ``causal=False`` for bidirectional use."""

    def __init__(self, d_model: int, num_heads: int, head_dim: Optional[int] = None, causal: bool = True):
        super().__init__()
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads}) "
                                 "unless head_dim is given")
            head_dim = d_model // num_heads
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {head_dim}")
        self.num_heads, self.head_dim, self.causal = num_heads, head_dim, causal
        self.qkv = nn.Linear(d_model, 3 * num_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(num_heads * head_dim, d_model, bias=False)

    def forward(self, x, cos, sin, kv=None, start: int = 0, packed: Optional[_Packed] = None):
        """``x [B, T, D]``; with ``kv = (k_cache, v_cache)`` the new keys/values are written at
        ``start:start+T`` and the queries attend to everything up to their own position. With
        ``packed`` (``x [1, T, D]`` holding N documents), each document attends only to itself:
        the documents are gathered into a padded batch ``[N, L]``, attended causally (padding
        sits after each document, so no real query sees it) and scattered back."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if packed is not None:
            qp, kp, vp = (t[0][:, packed.index].transpose(0, 1) for t in (q, k, v))      # [N, H, L, Dh]
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=packed.index.shape[1] > 1)
            o = q.new_empty(self.num_heads, T, self.head_dim)
            o[:, packed.index[packed.valid]] = op.transpose(0, 1)[:, packed.valid]
            o = o.unsqueeze(0)
        elif kv is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and T > 1)
        else:
            kc, vc = kv
            kc[:, :, start:start + T] = k.to(kc.dtype)
            vc[:, :, start:start + T] = v.to(vc.dtype)
            keys, vals = kc[:, :, :start + T], vc[:, :, :start + T]
            mask = None
            if T > 1 and start > 0:   # query i (position start+i) sees keys 0..start+i
                mask = (torch.arange(start + T, device=x.device)[None, :]
                        <= torch.arange(start, start + T, device=x.device)[:, None])
            with _decode_sdpa_context(x.device):
                o = F.scaled_dot_product_attention(q.to(keys.dtype), keys, vals, attn_mask=mask,
                                                   is_causal=T > 1 and start == 0)
            o = o.to(q.dtype)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: ``x + Attn(norm(x))``, then ``x + MLP(norm(x))``."""

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: float = 4.0,
                 head_dim: Optional[int] = None, causal: bool = True):
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads, head_dim, causal)
        self.norm2 = RMSNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio)

    def forward(self, x, cos, sin, kv=None, start: int = 0, packed=None):
        x = x + self.attn(self.norm1(x), cos, sin, kv, start, packed)
        return x + self.mlp(self.norm2(x))


class _TransformerStack(nn.Module):
    def _make_blocks(self, d_model, n_layers, num_heads, mlp_ratio, head_dim, causal):
        _check_int("d_model", d_model, 1)
        _check_int("n_layers", n_layers, 1)
        _check_int("num_heads", num_heads, 1)
        if not isinstance(mlp_ratio, (int, float)) or isinstance(mlp_ratio, bool) or mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}")
        if int(d_model * mlp_ratio * 2 / 3) < 1:
            raise ValueError(f"mlp_ratio {mlp_ratio} gives an empty MLP at d_model {d_model}")
        self.d_model, self.n_layers, self.num_heads, self.mlp_ratio = d_model, n_layers, num_heads, mlp_ratio
        self.blocks = nn.ModuleList(TransformerBlock(d_model, num_heads, mlp_ratio, head_dim, causal)
                                    for _ in range(n_layers))
        self.head_dim = self.blocks[0].attn.head_dim
        self.norm = RMSNorm(d_model)

    def _init_residual_out(self):
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("down.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.n_layers))

    def _run(self, h, start=0, cache: Optional[KVCache] = None, cu_seqlens=None):
        T = h.shape[1]
        packed = None
        if cu_seqlens is None:
            positions = torch.arange(start, start + T, device=h.device)
        else:   # packed documents: positions restart at each document, attention stays inside it
            packed = _packed_layout(cu_seqlens, T, h.device)
            positions = packed.positions
        cos, sin = rotary_cos_sin(positions, self.head_dim)
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            h = block(h, cos, sin, kv, start, packed)
        return self.norm(h)


class _Packed(NamedTuple):
    """Where the tokens of a packed batch go in a padded ``[N, L]`` layout (L: the longest document):
    ``index [N, L]`` (a token's row in the packed batch; 0 at padding), ``valid [N, L]``, and each
    token's position inside its document ``positions [T]``."""

    index: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor


def _packed_layout(cu_seqlens: torch.Tensor, T: int, device) -> _Packed:
    cu = cu_seqlens.to(device)
    lens = cu[1:] - cu[:-1]
    N, L = lens.numel(), int(lens.max())
    doc = torch.repeat_interleave(torch.arange(N, device=device), lens, output_size=T)
    positions = torch.arange(T, device=device) - cu[doc]
    j = torch.arange(L, device=device)
    valid = j[None, :] < lens[:, None]
    index = torch.where(valid, cu[:-1, None] + j[None, :], torch.zeros((), dtype=cu.dtype, device=device))
    return _Packed(index, valid, positions)


# ---- language model ----------------------------------------------------------------------------
class TransformerLM(GenerateMixin, _TransformerStack):
    """GPT-style language model: token embedding, pre-norm blocks with RoPE attention and SwiGLU
    MLP, final RMSNorm, tied output head.

    ``forward(idx [B, T])`` -> ``logits [B, T, vocab]``. ``max_len`` (optional) caps the sequence
    and cache length; RoPE itself has no length limit.
    """

    def __init__(self, vocab_size: int, d_model: int = 256, n_layers: int = 4, num_heads: int = 4,
                 mlp_ratio: float = 4.0, max_len: Optional[int] = None, tie_weights: bool = True,
                 head_dim: Optional[int] = None):
        super().__init__()
        _check_int("vocab_size", vocab_size, 1)
        if max_len is not None:
            _check_int("max_len", max_len, 1)
        self.vocab_size, self.max_len, self.tie_weights = vocab_size, max_len, tie_weights
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self._make_blocks(d_model, n_layers, num_heads, mlp_ratio, head_dim, causal=True)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.embed.weight
        self._init_residual_out()

    def forward(self, idx: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``idx [B, T]`` -> ``logits [B, T, vocab]`` (causal).

        ``cu_seqlens`` (int64 ``[N + 1]``, ``[0, l1, l1 + l2, ..., T]``): ``idx [1, T]`` holds N
        documents end to end; each is attended to on its own (rotary positions from 0 in each),
        as if run alone, at the cost of a padded batch of the documents (not of a [T, T] mask).
        ``logits_at`` (bool ``[B, T]``): only those positions through the head, ``[n, vocab]``
        (as ``NSTMLM.forward``)."""
        check_tokens(idx, 2, self.vocab_size)
        longest = idx.shape[1]
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, idx.shape[0], idx.shape[1], idx.device)
            longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if self.max_len is not None and longest > self.max_len:
            raise ValueError(f"sequence length {longest} exceeds max_len {self.max_len}")
        return self.head(select_positions(self._run(self.embed(idx), cu_seqlens=cu_seqlens), logits_at))

    # -- decoding ----------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` positions (preallocated;
        default device and dtype: the model's)."""
        _check_int("batch", batch, 1)
        _check_int("max_len", max_len, 1)
        if self.max_len is not None and max_len > self.max_len:
            raise ValueError(f"cache max_len {max_len} exceeds the model's max_len {self.max_len}")
        ref = self.embed.weight
        device = ref.device if device is None else torch.device(device)
        dtype = ref.dtype if dtype is None else dtype
        shape = (batch, self.num_heads, max_len, self.head_dim)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks]
        return KVCache(k, v, 0)

    def _check_cache(self, cache, batch, new):
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (use model.init_cache), got {type(cache).__name__}")
        if cache.num_layers != len(self.blocks):
            raise ValueError(f"cache has {cache.num_layers} layers, the model {len(self.blocks)}")
        if cache.batch != batch:
            raise ValueError(f"cache is for batch {cache.batch}, the tokens have batch {batch}")
        if cache.length + new > cache.max_len:
            raise ValueError(f"KV cache is full: it holds {cache.length} of {cache.max_len} positions "
                             f"and {new} more were given; make a larger cache with init_cache(max_len=...)")

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run ``idx [B, T]`` after what ``cache`` holds, writing its keys/values into the cache.
        Returns ``logits [B, T, vocab]``."""
        check_tokens(idx, 2, self.vocab_size)
        self._check_cache(cache, idx.shape[0], idx.shape[1])
        start = cache.length
        h = self._run(self.embed(idx), start, cache)
        cache.length = start + idx.shape[1]
        return self.head(h)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: KVCache):
        """One token per sequence: ``tokens [B]`` -> ``(logits [B, vocab], cache)`` (updated in place)."""
        check_tokens(tokens, 1, self.vocab_size)
        return self.prefill(tokens[:, None], cache)[:, 0], cache

    def cache_bytes(self, cache: KVCache) -> int:
        """Bytes allocated by ``cache`` (keys and values of every layer, all ``max_len`` positions)."""
        return cache.nbytes()

    def _decoder(self, idx, max_new_tokens):
        """``generate``: the prompt into a KV cache sized for the whole output, then one ``step``
        per token."""
        cache = self.init_cache(idx.shape[0], idx.shape[1] + max_new_tokens - 1, device=idx.device)
        logits = self.prefill(idx, cache)[:, -1]
        return logits, lambda tokens: self.step(tokens, cache)[0]

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, d_model={self.d_model}, n_layers={self.n_layers}, "
                f"num_heads={self.num_heads}, mlp_ratio={self.mlp_ratio:.4g}, max_len={self.max_len}")


# ---- classifier --------------------------------------------------------------------------------
class TransformerClassifier(_TransformerStack):
    """Sequence classifier with ``NSTMClassifier``'s interface: inputs ``[B, T, input_dim]`` or token
    ids ``[B, T]`` (give ``vocab_size``), Transformer blocks (causal by default, like NSTM), mean or
    last pooling (``lengths`` excludes right padding), a linear head."""

    def __init__(self, num_classes: int, input_dim: Optional[int] = None,
                 vocab_size: Optional[int] = None, d_model: int = 128, n_layers: int = 2,
                 num_heads: int = 4, mlp_ratio: float = 4.0, pool: str = "mean",
                 head_dim: Optional[int] = None, causal: bool = True, max_len: Optional[int] = None):
        super().__init__()
        _check_int("num_classes", num_classes, 1)
        if (input_dim is None) == (vocab_size is None):
            raise ValueError("give exactly one of input_dim (continuous inputs) or vocab_size (token ids)")
        if pool not in ("mean", "last"):
            raise ValueError(f"pool must be 'mean' or 'last', got {pool!r}")
        self.pool, self.input_dim, self.vocab_size, self.max_len = pool, input_dim, vocab_size, max_len
        self.inp = nn.Linear(input_dim, d_model) if input_dim is not None else nn.Embedding(vocab_size, d_model)
        self._make_blocks(d_model, n_layers, num_heads, mlp_ratio, head_dim, causal)
        self.head = nn.Linear(d_model, num_classes)
        self._init_residual_out()

    def forward(self, x: torch.Tensor, *, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [B, T, input_dim]`` or ``[B, T]`` token ids -> class logits ``[B, num_classes]``.

        ``lengths [B]``: valid positions per sequence (right padding beyond them is ignored)."""
        check_classifier_inputs(x, self.input_dim)
        if self.max_len is not None and x.shape[1] > self.max_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_len {self.max_len}")
        if not self.blocks[0].attn.causal and lengths is not None:
            raise ValueError("lengths with a bidirectional classifier would attend to padding; "
                             "use causal=True or unpadded inputs")
        h = self._run(self.inp(x))
        return self.head(pool_hidden(h, self.pool, lengths))


# ---- parameter matching ------------------------------------------------------------------------
def _nstm_sizes(model):
    layer = model.blocks[0].mixer
    return dict(d_model=layer.d_model, n_layers=len(model.blocks), num_heads=layer.num_heads)


def matched_transformer_config(nstm_model_or_param_count: Union[nn.Module, int], *,
                               vocab_size: Optional[int] = None, d_model: Optional[int] = None,
                               n_layers: Optional[int] = None, num_heads: Optional[int] = None,
                               num_classes: Optional[int] = None, input_dim: Optional[int] = None,
                               pool: Optional[str] = None, tie_weights: bool = True,
                               tolerance: float = 0.10) -> dict:
    """Constructor arguments for a Transformer baseline matched to an NSTM model.

    Give an ``NSTMLM`` / ``NSTMClassifier`` (width, depth, heads, vocabulary / classes are read from
    it; explicit arguments override) or a target parameter count together with ``d_model``,
    ``n_layers``, ``num_heads`` and ``vocab_size`` (LM) or ``num_classes`` plus ``input_dim`` or
    ``vocab_size`` (classifier). The width and depth are kept and ``mlp_ratio`` is chosen so that
    the Transformer's parameter count is as close as possible to the target; a ``ValueError`` is
    raised when that is not within ``tolerance`` (e.g. a target smaller than the attention alone).

    Returns ``TransformerLM`` kwargs, or ``TransformerClassifier`` kwargs when matching a classifier
    (``num_classes`` given or an ``NSTMClassifier``)::

        cfg = matched_transformer_config(nstm_lm)
        baseline = TransformerLM(**cfg)
    """
    src = nstm_model_or_param_count
    classifier = num_classes is not None
    if isinstance(src, nn.Module):
        if not isinstance(src, (NSTMLM, NSTMClassifier)):
            raise TypeError(f"expected an NSTMLM, NSTMClassifier or a parameter count, got {type(src).__name__}")
        sizes = _nstm_sizes(src)
        d_model = sizes["d_model"] if d_model is None else d_model
        n_layers = sizes["n_layers"] if n_layers is None else n_layers
        num_heads = sizes["num_heads"] if num_heads is None else num_heads
        target = count_parameters(src)
        if isinstance(src, NSTMClassifier):
            classifier = True
            num_classes = src.head.out_features if num_classes is None else num_classes
            if input_dim is None and vocab_size is None:
                input_dim, vocab_size = src.input_dim, src.vocab_size
            pool = src.pool if pool is None else pool
        else:
            vocab_size = src.vocab_size if vocab_size is None else vocab_size
            tie_weights = src.head.weight is src.embed.weight
    else:
        if isinstance(src, bool) or not isinstance(src, int) or src < 1:
            raise TypeError(f"expected an NSTM model or a parameter count (int >= 1), got {src!r}")
        target = src
        missing = [n for n, v in (("d_model", d_model), ("n_layers", n_layers), ("num_heads", num_heads))
                   if v is None]
        if classifier and input_dim is None and vocab_size is None:
            missing.append("input_dim or vocab_size")
        if not classifier and vocab_size is None:
            missing.append("vocab_size")
        if missing:
            raise ValueError(f"with a parameter count, also give: {', '.join(missing)}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
    if d_model % num_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")

    if classifier:
        base = dict(num_classes=num_classes, input_dim=input_dim, vocab_size=vocab_size,
                    d_model=d_model, n_layers=n_layers, num_heads=num_heads, pool=pool or "mean")
        cls = TransformerClassifier
    else:
        base = dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, num_heads=num_heads,
                    tie_weights=tie_weights)
        cls = TransformerLM

    def ratio_for(hidden):   # an mlp_ratio whose int(d_model * ratio * 2 / 3) is exactly `hidden`
        return (hidden + 0.5) * 1.5 / d_model

    def count(hidden):
        with torch.device("meta"):
            return count_parameters(cls(**base, mlp_ratio=ratio_for(hidden)))

    per_hidden = 3 * d_model * n_layers       # SwiGLU: up (2 * hidden * D) + down (hidden * D)
    c1 = count(1)
    hidden = max(1, round((target - (c1 - per_hidden)) / per_hidden))
    got = count(hidden)
    if abs(got - target) > tolerance * target:
        raise ValueError(f"cannot match {target:,} parameters within {tolerance:.0%} at d_model={d_model}, "
                         f"n_layers={n_layers}: the closest Transformer has {got:,} "
                         f"(MLP hidden size {hidden})")
    return dict(base, mlp_ratio=ratio_for(hidden))
