"""Synthetic sequence tasks: the generators (MQAR, copy, passkey retrieval), batches of
``(inputs [B, T] int64, targets [B, T] int64)`` where ``targets`` is ``IGNORE`` (-100) wherever
nothing is to be predicted; and, at the end, the ``copy``, ``mqar`` and ``passkey`` training tasks
built from them (the ``Task`` entries of ``nstm.tasks.registry``)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .base import EVAL_SEED, IGNORE, Task, check_int, generated, lm_batch


def mqar_batch(batch: int, num_pairs: int, vocab_size: int, num_queries: Optional[int] = None,
               generator: Optional[torch.Generator] = None,
               seq_len: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall (Zoology's MQAR).

    The sequence is ``k1 v1 k2 v2 ... kN vN`` followed by ``num_queries`` (default N) queries
    ``q a``: a key seen before and, teacher-forced, its value. The model is scored on predicting
    ``a`` at each query key. Keys come from ``[1, vocab/2)``, values from ``[vocab/2, vocab)``, all
    keys of a sequence distinct. Length ``2 * (num_pairs + num_queries)``.

    ``seq_len = T`` (Zoology's layout): the sequence has T tokens; after the N pairs, every key is
    queried once, in a random order, at random places among the remaining ``T - 2N`` positions,
    and the positions between the queries hold the filler token 0. Zoology draws the gaps from
    a power law; here every placement is equally likely. Needs ``T >= 4N``.
    """
    check_int("batch", batch, 1)
    check_int("num_pairs", num_pairs, 1)
    check_int("vocab_size", vocab_size, 4)
    half = vocab_size // 2
    if num_pairs > half - 1:
        raise ValueError(f"num_pairs ({num_pairs}) must be < vocab_size // 2 ({half}) so keys are distinct")
    if seq_len is not None:
        check_int("seq_len", seq_len, 4 * num_pairs)
        if num_queries is not None:
            raise ValueError("num_queries is fixed by seq_len (every key is queried once)")
        return _mqar_spread(batch, num_pairs, vocab_size, seq_len, generator)
    nq = num_pairs if num_queries is None else num_queries
    check_int("num_queries", nq, 1)
    keys, vals = _mqar_pairs(batch, num_pairs, vocab_size, generator)
    ctx = torch.stack([keys, vals], dim=-1).flatten(1)                           # [B, 2N]
    pick = torch.randint(0, num_pairs, (batch, nq), generator=generator)
    qk, qv = keys.gather(1, pick), vals.gather(1, pick)
    queries = torch.stack([qk, qv], dim=-1).flatten(1)                           # [B, 2Q]
    inputs = torch.cat([ctx, queries], dim=1)
    targets = torch.full_like(inputs, IGNORE)
    targets[:, 2 * num_pairs::2] = qv                                            # predict a at q
    return inputs, targets


def _mqar_pairs(batch, num_pairs, vocab_size, generator):
    half = vocab_size // 2
    keys = torch.rand(batch, half - 1, generator=generator).argsort(-1)[:, :num_pairs] + 1
    vals = torch.randint(half, vocab_size, (batch, num_pairs), generator=generator)
    return keys, vals


def _mqar_spread(batch, num_pairs, vocab_size, seq_len, generator):
    """``mqar_batch`` with ``seq_len``: the pairs, then each key queried once among fillers."""
    N = num_pairs
    keys, vals = _mqar_pairs(batch, N, vocab_size, generator)
    inputs = torch.zeros(batch, seq_len, dtype=torch.long)
    inputs[:, 0:2 * N:2], inputs[:, 1:2 * N:2] = keys, vals
    slots = (seq_len - 2 * N) // 2                                 # room for a (query, value) pair each
    where = torch.rand(batch, slots, generator=generator).argsort(-1)[:, :N].sort(-1).values
    pos = 2 * N + 2 * where                                        # [B, N] query positions, in order
    order = torch.rand(batch, N, generator=generator).argsort(-1)  # which key each query asks for
    qk, qv = keys.gather(1, order), vals.gather(1, order)
    inputs.scatter_(1, pos, qk)
    inputs.scatter_(1, pos + 1, qv)
    targets = torch.full_like(inputs, IGNORE)
    targets.scatter_(1, pos, qv)                                   # predict the value at its query key
    return inputs, targets


def copy_batch(batch: int, length: int, vocab_size: int,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Copy: ``x1 .. xL SEP x1 .. xL``; the model predicts the second copy (token 0 is SEP).

    Length ``2 * length + 1``; scored on the ``length`` tokens after SEP."""
    check_int("batch", batch, 1)
    check_int("length", length, 1)
    check_int("vocab_size", vocab_size, 3)
    x = torch.randint(1, vocab_size, (batch, length), generator=generator)
    sep = torch.zeros(batch, 1, dtype=torch.long)
    inputs = torch.cat([x, sep, x], dim=1)
    targets = torch.full_like(inputs, IGNORE)
    targets[:, length:2 * length] = x
    return inputs, targets


# --- passkey retrieval -------------------------------------------------------------------------
# A fixed, tiny vocabulary: pad, the ten digits, two markers and three filler "words".
PASSKEY_PAD = 0
PASSKEY_DIGIT0 = 1                    # digit d is token PASSKEY_DIGIT0 + d (tokens 1..10)
PASSKEY_KEY = 11                      # "the pass key is" (precedes the hidden digits)
PASSKEY_QUERY = 12                    # "what is the pass key?" (precedes the answer digits)
PASSKEY_FILLER = (13, 14, 15)         # filler words; the haystack cycles through them
PASSKEY_VOCAB = 16


def passkey_batch(batch: int, context_len: int, generator: Optional[torch.Generator] = None,
                  depth=None, num_digits: int = 5,
                  filler: str = "repeat") -> Tuple[torch.Tensor, torch.Tensor]:
    """Passkey retrieval: find a number hidden in a long haystack of filler tokens.

    Each row is ``filler.. KEY d1..dn filler.. QUERY d1..dn`` with exactly ``context_len`` tokens
    (vocabulary ``PASSKEY_VOCAB``; digit ``d`` is token ``PASSKEY_DIGIT0 + d``; the number has
    ``num_digits`` digits, the first one non-zero). The answer at the end is teacher-forced: the
    model is scored only on predicting each answer digit from the token before it (the QUERY
    marker predicts ``d1``, ``d1`` predicts ``d2``, ...), so ``targets`` holds ``num_digits``
    digit tokens and IGNORE elsewhere.

    ``depth`` places the hidden number: ``None`` draws a uniform depth per row; a float in
    ``[0, 1]`` (or a length-``batch`` sequence / tensor of them) puts the KEY marker after
    ``round(depth * F)`` of the ``F = context_len - 2 * (num_digits + 1)`` filler tokens
    (0: at the very start, 1: just before the query). ``filler="repeat"`` cycles the filler
    words (like the repeated sentences of the usual passkey test), ``"random"`` draws them.
    """
    check_int("batch", batch, 1)
    check_int("num_digits", num_digits, 1)
    check_int("context_len", context_len, 1)
    need = 2 * (num_digits + 1)
    if context_len < need:
        raise ValueError(
            f"context_len ({context_len}) is too short for a {num_digits}-digit passkey: it needs at "
            f"least 2 * (num_digits + 1) = {need} tokens (KEY + digits, then QUERY + digits)")
    if filler not in ("repeat", "random"):
        raise ValueError(f"filler must be 'repeat' or 'random', got {filler!r}")
    n, T = num_digits, context_len
    F = T - need                                                                 # filler tokens
    if depth is None:
        frac = torch.rand(batch, generator=generator, dtype=torch.float64)
    else:
        frac = torch.as_tensor(depth, dtype=torch.float64).flatten()
        if frac.numel() == 1:
            frac = frac.expand(batch)
        if frac.numel() != batch:
            raise ValueError(f"depth must be a float or have one value per row ({batch}), "
                             f"got {frac.numel()} values")
        if not bool(((frac >= 0) & (frac <= 1)).all()):
            raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
    pos = torch.round(frac * F).long().clamp_(0, F)                              # [B] KEY index

    first = torch.randint(1, 10, (batch, 1), generator=generator)
    rest = torch.randint(0, 10, (batch, n - 1), generator=generator)
    digits = torch.cat([first, rest], dim=1) + PASSKEY_DIGIT0                   # [B, n] tokens

    fill = torch.tensor(PASSKEY_FILLER, dtype=torch.long)
    if filler == "repeat":
        inputs = fill[torch.arange(T) % len(fill)].repeat(batch, 1)
    else:
        inputs = fill[torch.randint(0, len(fill), (batch, T), generator=generator)]
    needle = torch.cat([torch.full((batch, 1), PASSKEY_KEY, dtype=torch.long), digits], dim=1)
    inputs.scatter_(1, pos[:, None] + torch.arange(n + 1), needle)
    inputs[:, T - n - 1] = PASSKEY_QUERY
    inputs[:, T - n:] = digits
    targets = torch.full_like(inputs, IGNORE)
    targets[:, T - n - 1:T - 1] = digits
    return inputs, targets


def passkey_digits(tokens: torch.Tensor) -> torch.Tensor:
    """Digit tokens -> digit values (``tokens - PASSKEY_DIGIT0``), e.g. for printing answers."""
    return tokens - PASSKEY_DIGIT0


def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Accuracy of ``logits.argmax(-1)`` over the positions where ``targets != IGNORE``."""
    mask = targets != IGNORE
    if not mask.any():
        raise ValueError("targets has no scored position (all IGNORE)")
    return (logits.argmax(-1)[mask] == targets[mask]).float().mean().item()


# ---- training tasks ----------------------------------------------------------------------------
def copy_task(seq_len: Optional[int] = None, vocab_size: Optional[int] = None, **_) -> Task:
    """Copy ``L`` (default 32) tokens of a ``vocab_size`` (16) vocabulary; scored at ``L``, ``2L`` and ``4L``."""
    L = 32 if seq_len is None else seq_len
    V = 16 if vocab_size is None else vocab_size
    check_int("seq_len (copy length L)", L, 1)
    check_int("vocab_size", V, 3)

    def at(length):
        return lambda b, g: lm_batch(copy_batch(b, length, V, generator=g))

    def eval_sets(bs, nb):
        return {f"L{L}": generated(at(L), bs, nb, EVAL_SEED),
                f"L{2 * L}": generated(at(2 * L), bs, nb, EVAL_SEED + 2),
                f"L{4 * L}": generated(at(4 * L), bs, nb, EVAL_SEED + 1)}

    return Task("copy", "lm", "accuracy", True, at(L), eval_sets, vocab_size=V, seq_len=2 * L + 1,
                finite_eval=False, info={"length": L, "vocab_size": V, "eval_lengths": [L, 2 * L, 4 * L]})


def mqar_task(num_pairs: Optional[int] = None, vocab_size: Optional[int] = None,
              seq_len: Optional[int] = None, **_) -> Task:
    """MQAR with ``num_pairs`` (default 8) key-value pairs over a ``vocab_size`` (64) vocabulary;
    ``seq_len`` spreads the queries over that many tokens with fillers (Zoology's layout,
    ``mqar_batch``), else the queries follow the pairs directly (length 4 N)."""
    N = 8 if num_pairs is None else num_pairs
    V = 64 if vocab_size is None else vocab_size
    check_int("num_pairs", N, 1)
    check_int("vocab_size", V, 4)
    if N > V // 2 - 1:
        raise ValueError(f"mqar needs num_pairs ({N}) < vocab_size // 2 ({V // 2}) so keys are distinct")
    if seq_len is not None and seq_len < 4 * N:
        raise ValueError(f"mqar needs seq_len >= 4 * num_pairs ({4 * N}) to place every query, got {seq_len}")

    def train(b, g):
        return lm_batch(mqar_batch(b, N, V, generator=g, seq_len=seq_len))

    return Task("mqar", "lm", "accuracy", True, train,
                lambda bs, nb: {"test": generated(train, bs, nb, EVAL_SEED)},
                vocab_size=V, seq_len=4 * N if seq_len is None else seq_len, finite_eval=False,
                info={"num_pairs": N, "vocab_size": V, "length": 4 * N if seq_len is None else seq_len})


def passkey_task(seq_len: Optional[int] = None, eval_contexts: Optional[Sequence[int]] = None, **_) -> Task:
    """Passkey retrieval trained at context ``seq_len`` (default 1024, at most 2048) and scored at
    ``eval_contexts`` (default ``L, 4L, 16L``)."""
    L = 1024 if seq_len is None else seq_len
    check_int("seq_len (passkey training context)", L, 16, 2048)
    contexts = [L, 4 * L, 16 * L] if not eval_contexts else [int(c) for c in eval_contexts]
    for c in contexts:
        check_int("eval context", c, 16)

    def at(ctx):
        return lambda b, g: lm_batch(passkey_batch(b, ctx, generator=g))

    def eval_sets(bs, nb):
        return {f"ctx{c}": generated(at(c), bs, nb, EVAL_SEED + i) for i, c in enumerate(contexts)}

    return Task("passkey", "lm", "accuracy", True, at(L), eval_sets, vocab_size=PASSKEY_VOCAB,
                seq_len=L, finite_eval=False, info={"train_context": L, "eval_contexts": contexts})
