"""Token checks, sampling and ``generate``, written once for ``NSTMLM`` and the Transformer baseline.

A language model that mixes in ``GenerateMixin`` provides two things: ``vocab_size`` and
``_decoder(idx, max_new_tokens, **options)``, which runs the prompt and returns
``(logits of the last prompt position [B, vocab], step)`` where ``step(tokens [B]) -> logits``
advances the model's cache by one token. ``generate`` does the rest: argument checks, eval mode,
sampling, the output tensor.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch


def check_tokens(idx, ndim: int, vocab_size: int) -> None:
    """``idx`` must be int64/int32 token ids of ``ndim`` dims (``[B, T]`` or ``[B]``) in ``[0, vocab)``."""
    layout = "[B, T]" if ndim == 2 else "[B]"
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be an int64 tensor of shape {layout}, got "
                        f"{getattr(idx, 'dtype', type(idx).__name__)}")
    if idx.dim() != ndim:
        raise ValueError(f"tokens must have shape {layout}, got {list(idx.shape)}")
    # the range check reads values: skipped while torch.compile traces (it would break the graph)
    if idx.numel() and not torch.compiler.is_compiling() and \
            (idx.min() < 0 or idx.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got range "
                         f"[{int(idx.min())}, {int(idx.max())}]")


def select_positions(h: torch.Tensor, at: Optional[torch.Tensor]) -> torch.Tensor:
    """``h [B, T, D]`` at the positions of the bool mask ``at [B, T]`` as ``[n, D]`` (row-major
    order), or ``h`` itself when ``at`` is None: what a language model's ``logits_at`` sends
    through its output head."""
    if at is None:
        return h
    if not isinstance(at, torch.Tensor) or at.dtype != torch.bool or at.shape != h.shape[:2]:
        raise ValueError(f"logits_at must be a bool tensor of shape [B, T] = {list(h.shape[:2])}, got "
                         f"{getattr(at, 'dtype', type(at).__name__)} {list(getattr(at, 'shape', []))}")
    return h[at.to(h.device)]


def check_generate_args(max_new_tokens, temperature, sample_top_k, top_p) -> None:
    """The sampling arguments of ``generate``."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if sample_top_k is not None and (isinstance(sample_top_k, bool) or not isinstance(sample_top_k, int)
                                     or sample_top_k < 1):
        raise ValueError(f"sample_top_k must be None or an int >= 1, got {sample_top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, sample_top_k: Optional[int] = None,
                top_p: Optional[float] = None, greedy: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The next token from ``logits [B, vocab]``: argmax (``greedy`` or ``temperature == 0``), or
    sampling with ``temperature``, restricted to the ``sample_top_k`` most likely tokens and to the
    nucleus ``top_p``."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if sample_top_k is not None and sample_top_k < logits.shape[-1]:
        kth = logits.topk(sample_top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p          # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


Stepper = Callable[[torch.Tensor], torch.Tensor]


class GenerateMixin:
    """``generate`` for a causal LM that defines ``vocab_size`` and ``_decoder`` (module doc)."""

    vocab_size: int

    def _decoder(self, idx: torch.Tensor, max_new_tokens: int, **options) -> Tuple[torch.Tensor, Stepper]:
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 sample_top_k: Optional[int] = None, top_p: Optional[float] = None,
                 greedy: bool = False, generator: Optional[torch.Generator] = None,
                 **options) -> torch.Tensor:
        """Continue ``idx [B, T]`` by ``max_new_tokens`` tokens; returns ``[B, T + max_new_tokens]``.

        ``greedy=True`` (or ``temperature=0``) takes the argmax; otherwise tokens are sampled with
        ``temperature`` from the ``sample_top_k`` most likely tokens (None: all) and the nucleus
        ``top_p``. (``sample_top_k`` is the sampling cut-off; ``top_k`` of the NSTM models is the
        routing's slots per token.) Further keyword ``options`` go to the model's decoder (see the
        model's ``generate`` notes)."""
        if "top_k" in options:
            raise TypeError("generate() takes sample_top_k= for the sampling cut-off (top_k is the "
                            "NSTM routing's slots per token, a model setting)")
        check_tokens(idx, 2, self.vocab_size)
        check_generate_args(max_new_tokens, temperature, sample_top_k, top_p)
        if max_new_tokens == 0:
            return idx
        was_training = self.training
        self.eval()
        try:
            logits, step = self._decoder(idx, max_new_tokens, **options)
            out = [idx]
            for i in range(max_new_tokens):
                nxt = sample_next(logits, temperature, sample_top_k, top_p, greedy, generator)
                out.append(nxt[:, None])
                if i + 1 < max_new_tokens:
                    logits = step(nxt)
        finally:
            self.train(was_training)
        return torch.cat(out, dim=1)
