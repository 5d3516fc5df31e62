"""ListOps as defined by the Long Range Arena (LRA) benchmark.

Expressions are nested lists over the digits 0-9 with four operators:
``[MAX``, ``[MIN``, ``[MED`` (median, truncated to an int: the mean of the two middle values,
rounded down, for an even count) and ``[SM`` (sum modulo 10), each list closed by ``]``::

    [MAX 2 9 [MIN 4 7 ] 0 ]   ->   9

The answer (0-9) is the value of the whole expression. Generation follows LRA's recipe: a node at
depth ``< max_depth`` (the root has depth 1) is a list with probability 1/4, otherwise a digit; a
list has 2..``max_args`` arguments and a uniformly drawn operator; trees whose token count falls
outside ``[min_len, max_len]`` are rejected (generation of a tree stops as soon as it is too long,
which leaves the distribution unchanged and keeps rejection cheap). The token count excludes the
round parentheses that LRA's released TSV files carry around every sub-tree (its tokenizer drops
them, and so does :func:`tokenize_listops`); ``parens=True`` writes expressions in that format.
"""
from __future__ import annotations

import random
from typing import List, Optional, Sequence, Tuple

import torch

OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
END = "]"
DIGITS = tuple(str(d) for d in range(10))
LISTOPS_PAD = 0
#: token strings; index 0 is padding, ``LISTOPS_VOCAB.index(tok)`` is a token's id
LISTOPS_VOCAB: List[str] = ["<pad>", *OPERATORS, END, *DIGITS]
LISTOPS_TOKEN_ID = {tok: i for i, tok in enumerate(LISTOPS_VOCAB)}
LISTOPS_NUM_CLASSES = 10
NON_LEAF_P = 0.25       # LRA's probability that a node (above the depth limit) is a list


def _apply(op: str, args: Sequence[int]) -> int:
    if op == "[MAX":
        return max(args)
    if op == "[MIN":
        return min(args)
    if op == "[SM":
        return sum(args) % 10
    if op == "[MED":
        s = sorted(args)
        m = len(s) // 2
        return s[m] if len(s) % 2 else (s[m - 1] + s[m]) // 2
    raise ValueError(f"unknown ListOps operator {op!r}")


class _TooLong(Exception):
    pass


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, budget: List[int]):
    """A random (sub)tree: an int (leaf) or ``(op, [children])``, and its value.

    ``budget[0]`` counts the tokens still allowed; raises ``_TooLong`` once it is exceeded."""
    if depth < max_depth and rng.random() < NON_LEAF_P:
        budget[0] -= 2                                           # '[OP' and ']'
        if budget[0] < 0:
            raise _TooLong
        children, values = [], []
        for _ in range(rng.randint(2, max_args)):
            child, value = _tree(rng, depth + 1, max_depth, max_args, budget)
            children.append(child)
            values.append(value)
        op = rng.choice(OPERATORS)
        return (op, children), _apply(op, values)
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLong
    value = rng.randrange(10)
    return value, value


def _to_text(tree, parens: bool) -> str:
    out: List[str] = []

    def walk(t):
        if isinstance(t, int):
            out.append(str(t))
            return
        op, children = t
        if parens:                      # LRA's layout: ( ( ( [OP a0 ) a1 ) ] )
            out.extend(["("] * (len(children) + 1))
            out.append(op)
            for child in children:
                walk(child)
                out.append(")")
            out.extend([END, ")"])
        else:
            out.append(op)
            for child in children:
                walk(child)
            out.append(END)

    walk(tree)
    return " ".join(out)


def _check_args(min_len, max_len, max_depth, max_args):
    for name, v, low in (("min_len", min_len, 1), ("max_len", max_len, 1),
                         ("max_depth", max_depth, 1), ("max_args", max_args, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if min_len > max_len:
        raise ValueError(f"min_len ({min_len}) must be <= max_len ({max_len})")
    # the longest tree: every node above the leaves a list of max_args arguments
    longest, width = 0, 1
    for _ in range(max_depth - 1):
        longest += 2 * width
        width *= max_args
    longest += width
    if min_len > longest:
        raise ValueError(f"no tree with max_depth={max_depth}, max_args={max_args} has "
                         f"{min_len} tokens (the longest has {longest})")


def generate_listops(num: int, min_len: int = 500, max_len: int = 2000, max_depth: int = 10,
                     max_args: int = 10, seed: int = 0, parens: bool = False,
                     max_tries: Optional[int] = None) -> List[Tuple[str, int]]:
    """``num`` random ListOps expressions ``(text, answer)`` with ``min_len..max_len`` tokens.

    Deterministic in ``seed``. ``parens=True`` writes LRA's parenthesised text format (same
    tokens). Raises ``RuntimeError`` if more than ``max_tries`` (default ``10000 * num + 10000``)
    candidate trees are rejected, e.g. for a length window the tree distribution rarely hits."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise ValueError(f"num must be an int >= 0, got {num!r}")
    _check_args(min_len, max_len, max_depth, max_args)
    rng = random.Random(seed)
    limit = 10000 * num + 10000 if max_tries is None else max_tries
    out: List[Tuple[str, int]] = []
    tries = 0
    while len(out) < num:
        tries += 1
        if tries > limit:
            raise RuntimeError(
                f"generate_listops: {limit} candidate trees rejected for min_len={min_len}, "
                f"max_len={max_len}, max_depth={max_depth}, max_args={max_args}; widen the "
                f"length window or raise max_depth/max_args")
        budget = [max_len]
        try:
            tree, value = _tree(rng, 1, max_depth, max_args, budget)
        except _TooLong:
            continue
        if max_len - budget[0] < min_len:
            continue
        out.append((_to_text(tree, parens), value))
    return out


def _split(text: str) -> List[str]:
    return text.replace("(", " ").replace(")", " ").split()


def evaluate_listops(text: str) -> int:
    """The value (0-9) of a ListOps expression (parentheses, as in LRA's TSV files, ignored)."""
    stack: List[Tuple[str, List[int]]] = []
    result: Optional[int] = None
    for tok in _split(text):
        if tok in OPERATORS:
            if result is not None:
                raise ValueError(f"ListOps text has tokens after the complete expression: {text[:80]!r}")
            stack.append((tok, []))
            continue
        if tok == END:
            if not stack:
                raise ValueError(f"unbalanced ']' in ListOps text {text[:80]!r}")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"empty list {op} ] in ListOps text {text[:80]!r}")
            value = _apply(op, args)
        elif tok in LISTOPS_TOKEN_ID and tok.isdigit():
            value = int(tok)
        else:
            raise ValueError(f"unknown ListOps token {tok!r} in {text[:80]!r}")
        if stack:
            stack[-1][1].append(value)
        elif result is None:
            result = value
        else:
            raise ValueError(f"ListOps text has more than one top-level value: {text[:80]!r}")
    if stack:
        raise ValueError(f"ListOps text has {len(stack)} unclosed list(s): {text[:80]!r}")
    if result is None:
        raise ValueError("empty ListOps text")
    return result


def tokenize_listops(text: str) -> List[int]:
    """Token ids (indices into ``LISTOPS_VOCAB``) of an expression; parentheses are dropped."""
    ids = []
    for tok in _split(text):
        i = LISTOPS_TOKEN_ID.get(tok)
        if i is None or i == LISTOPS_PAD:
            raise ValueError(f"unknown ListOps token {tok!r} (vocabulary: {LISTOPS_VOCAB[1:]})")
        ids.append(i)
    return ids


def detokenize_listops(ids) -> str:
    """Inverse of :func:`tokenize_listops` (padding dropped)."""
    return " ".join(LISTOPS_VOCAB[int(i)] for i in ids if int(i) != LISTOPS_PAD)


def pad_listops(examples: Sequence[Tuple[str, int]], pad_to: Optional[int] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize ``(text, label)`` pairs into ``(tokens [B, T], lengths [B], labels [B])``,
    right-padded with 0 to the longest (or to ``pad_to``; longer sequences raise)."""
    seqs = [tokenize_listops(text) for text, _ in examples]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    T = int(lengths.max()) if seqs else 0
    if pad_to is not None:
        if T > pad_to:
            raise ValueError(f"a sequence has {T} tokens, more than pad_to={pad_to}")
        T = pad_to
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    labels = torch.tensor([int(y) for _, y in examples], dtype=torch.long)
    if labels.numel() and not bool(((labels >= 0) & (labels < 10)).all()):
        raise ValueError("ListOps labels must lie in 0..9")
    return tokens, lengths, labels


def listops_batch(batch: int, min_len: int = 500, max_len: int = 2000, max_depth: int = 10,
                  generator: Optional[torch.Generator] = None, max_args: int = 10,
                  pad_to: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fresh batch of ListOps: ``(tokens [B, T] int64, lengths [B] int64, labels [B] int64)``.

    ``tokens`` are right-padded with 0 (``LISTOPS_PAD``) to the longest row (or ``pad_to``).
    The random stream comes from ``generator`` (the global torch RNG when None)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    examples = generate_listops(batch, min_len=min_len, max_len=max_len, max_depth=max_depth,
                                max_args=max_args, seed=seed)
    return pad_listops(examples, pad_to=pad_to)
