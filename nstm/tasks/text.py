"""Text language-modelling tasks: ``shakespeare`` (characters, scored in bits per character) and
``wikitext2`` (words, scored in perplexity). Training draws random windows of the training text;
evaluation scores the validation text in consecutive windows.

With ``pack=True`` (``nstm-train --pack``) the text is a list of documents (Shakespeare's works,
WikiText's articles) and every batch is one packed row of ``batch_size * seq_len`` tokens: windows
of at most ``seq_len`` tokens that never cross a document boundary, laid end to end with their
``cu_seqlens`` and no padding; the model runs each window as if alone. Training windows start at
random tokens (a window that reaches its document's end is shorter, and the next one fills the
row); evaluation tiles each validation document with consecutive windows. Every token but a
document's first is scored once.

The readers (``nstm.data.shakespeare``, ``nstm.data.wikitext``'s ``load_wikitext2``) are looked up
when a task is built; the tokenisers live next to them (``CharVocab``; ``wikitext_words`` and
``word_vocab``).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..data.wikitext import WIKITEXT_MIN_COUNT, encode_words, wikitext_articles, wikitext_words, word_vocab
from .base import Batch, Reiterable, Task, check_int, data_module, load_split, need_path


def text_lm_task(name: str, train_ids: torch.Tensor, val_ids: torch.Tensor, seq_len: int,
                 vocab_size: int, val_name: str, text_metric: str, info: Dict, state: Dict) -> Task:
    """Next-token prediction on token ids: training windows of ``seq_len + 1`` tokens at random
    offsets of ``train_ids``; the evaluation set ``val_name`` tiles ``val_ids``."""
    T = seq_len
    if train_ids.numel() < T + 2 or val_ids.numel() < T + 2:
        raise ValueError(f"{name}: the text is too short for seq_len {T} "
                         f"(train {train_ids.numel()}, val {val_ids.numel()} tokens)")

    def train(b, g):
        starts = torch.randint(0, train_ids.numel() - T - 1, (b,), generator=g)
        w = torch.stack([train_ids[s:s + T + 1] for s in starts.tolist()])
        return Batch(w[:, :-1].contiguous(), w[:, 1:].contiguous())

    def eval_sets(bs, nb):
        windows = (val_ids.numel() - 1) // T
        n = windows if nb <= 0 else min(windows, bs * nb)

        def it():
            for s in range(0, n, bs):
                idx = range(s, min(n, s + bs))
                w = torch.stack([val_ids[i * T:i * T + T + 1] for i in idx])
                yield Batch(w[:, :-1].contiguous(), w[:, 1:].contiguous())
        return {val_name: Reiterable(it)}

    return Task(name, "lm", text_metric, False, train, eval_sets, vocab_size=vocab_size, seq_len=T,
                text_metric=text_metric, info=info, state=state)


def packed_lm_task(name: str, train_docs: List[torch.Tensor], val_docs: List[torch.Tensor], seq_len: int,
                   vocab_size: int, val_name: str, text_metric: str, info: Dict, state: Dict) -> Task:
    """Next-token prediction on packed batches (see the module doc): ``train_docs`` and ``val_docs``
    are the documents' token ids; a batch of size b is ``Batch(inputs [1, b * seq_len], targets,
    cu_seqlens=...)``."""
    T = seq_len
    train_docs = [d for d in train_docs if d.numel() >= 2]
    val_docs = [d for d in val_docs if d.numel() >= 2]
    if not train_docs or not val_docs:
        raise ValueError(f"{name}: packing needs documents of at least 2 tokens on both sides "
                         f"({len(train_docs)} train, {len(val_docs)} validation)")
    ids = torch.cat(train_docs)
    lens = torch.tensor([d.numel() for d in train_docs])
    ends = torch.repeat_interleave(lens.cumsum(0), lens)           # [N_tok]: one past its document's end
    starts = torch.nonzero(torch.arange(ids.numel()) < ends - 1).flatten()   # a token with a next one

    def pack(windows):
        """``[(ids, start, length)]`` -> one packed Batch."""
        x = torch.cat([d[s:s + n] for d, s, n in windows])
        y = torch.cat([d[s + 1:s + n + 1] for d, s, n in windows])
        cu = torch.tensor([0] + [n for _, _, n in windows], dtype=torch.int64).cumsum(0)
        return Batch(x[None], y[None], cu_seqlens=cu)

    def train(b, g):
        left, windows = b * T, []
        while left:
            p = int(starts[torch.randint(0, starts.numel(), (1,), generator=g)])
            n = min(T, int(ends[p]) - 1 - p, left)
            windows.append((ids, p, n))
            left -= n
        return pack(windows)

    tiles = [(d, s, min(T, d.numel() - 1 - s)) for d in val_docs for s in range(0, d.numel() - 1, T)]

    def eval_sets(bs, nb):
        def it():
            windows, used, made = [], 0, 0
            for w in tiles:
                if windows and used + w[2] > bs * T:
                    yield pack(windows)
                    made += 1
                    if 0 < nb <= made:
                        return
                    windows, used = [], 0
                windows.append(w)
                used += w[2]
            if windows:
                yield pack(windows)
        return {val_name: Reiterable(it)}

    info = dict(info, packed=True, train_documents=len(train_docs), val_documents=len(val_docs))
    return Task(name, "lm", text_metric, False, train, eval_sets, vocab_size=vocab_size, seq_len=T,
                text_metric=text_metric, info=info, state=state)


def shakespeare_task(seq_len: Optional[int] = None, data_root="data", pack: bool = False, **_) -> Task:
    """Character-level Tiny Shakespeare (fetched into ``data_root``; 10% of the works held out).
    ``pack``: packed batches of whole works (the module doc)."""
    sh = data_module("nstm.data.shakespeare")
    T = 256 if seq_len is None else seq_len
    check_int("seq_len", T, 1)
    sh.fetch_shakespeare(data_root)
    train_text, val_text = sh.load_shakespeare(data_root, val_fraction=0.1, seed=0)
    vocab = sh.CharVocab.from_text(train_text + val_text)
    if pack:
        works = sh.shakespeare_works(data_root)
        train_names, val_names = sh.split_works(works, val_fraction=0.1, seed=0)
        return packed_lm_task("shakespeare", [vocab.encode(works[n]).long() for n in train_names],
                              [vocab.encode(works[n]).long() for n in val_names], T, len(vocab), "val", "bpc",
                              {"seq_len": T, "vocab_size": len(vocab), "train_chars": len(train_text),
                               "val_chars": len(val_text), "data_root": str(data_root)},
                              {"vocab": vocab.to_dict()})
    train_ids = torch.as_tensor(vocab.encode(train_text)).long()
    val_ids = torch.as_tensor(vocab.encode(val_text)).long()
    return text_lm_task("shakespeare", train_ids, val_ids, T, len(vocab), "val", "bpc",
                        {"seq_len": T, "vocab_size": len(vocab), "train_chars": len(train_text),
                         "val_chars": len(val_text), "data_root": str(data_root)},
                        {"vocab": vocab.to_dict()})


def wikitext_task(seq_len: Optional[int] = None, data_path=None, min_count: int = WIKITEXT_MIN_COUNT,
                  pack: bool = False, **_) -> Task:
    """Word-level WikiText-2 (raw) from ``data_path``, tokenised by ``nstm.data.wikitext``
    (``wikitext_words``, ``word_vocab``: about 30K words, like the tokenized release).
    ``pack``: packed batches of whole articles (``wikitext_articles``; the module doc)."""
    path = need_path("wikitext2", data_path)
    wt = data_module("nstm.data.wikitext")
    T = 256 if seq_len is None else seq_len
    check_int("seq_len", T, 1)
    train_text = wt.load_wikitext2(path, "train")
    val_text = load_split(wt.load_wikitext2, path, ("valid", "validation", "val"))
    train_words, val_words = wikitext_words(train_text), wikitext_words(val_text)
    itos = word_vocab(train_words, min_count)
    train_ids = torch.tensor(encode_words(train_words, itos), dtype=torch.long)
    val_ids = torch.tensor(encode_words(val_words, itos), dtype=torch.long)
    build = text_lm_task
    if pack:
        def docs(text):
            return [torch.tensor(encode_words(wikitext_words(a), itos), dtype=torch.long)
                    for a in wikitext_articles(text)]
        train_ids, val_ids = docs(train_text), docs(val_text)
        build = packed_lm_task
    return build("wikitext2", train_ids, val_ids, T, len(itos), "valid", "ppl",
                        {"seq_len": T, "vocab_size": len(itos),
                         "tokenization": f"whitespace words + <eos> per line; < {min_count} train "
                                         "occurrences -> <unk>",
                         "train_tokens": len(train_words), "val_tokens": len(val_words),
                         "val_unk_rate": float((val_ids == 0).float().mean()), "data_path": str(path)},
                        {"vocab": itos})


def text_file_task(seq_len: Optional[int] = None, data_path=None, pack: bool = False, **_) -> Task:
    """A character model of the user's own text: the UTF-8 file ``data_path``, its last 10% of
    characters held out for validation (``pack``: train and validation each one document, packed
    into windows that do not cross the split)."""
    from ..data.shakespeare import CharVocab

    path = need_path("text", data_path)
    T = 256 if seq_len is None else seq_len
    check_int("seq_len", T, 1)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"text: {path} is not UTF-8 text ({e})") from None
    except IsADirectoryError:
        raise ValueError(f"text: --data-path must be a text file, got the directory {path}") from None
    cut = int(len(text) * 0.9)
    if cut < T + 2 or len(text) - cut < T + 2:
        raise ValueError(f"text: {path} holds {len(text):,} characters; with 10% held out, seq_len {T} "
                         f"needs at least {10 * (T + 2):,} (give a longer file or a smaller --seq-len)")
    vocab = CharVocab.from_text(text)
    train_ids, val_ids = vocab.encode(text[:cut]).long(), vocab.encode(text[cut:]).long()
    info = {"seq_len": T, "vocab_size": len(vocab), "train_chars": cut, "val_chars": len(text) - cut,
            "data_path": str(path)}
    if pack:
        return packed_lm_task("text", [train_ids], [val_ids], T, len(vocab), "val", "bpc", info,
                              {"vocab": vocab.to_dict()})
    return text_lm_task("text", train_ids, val_ids, T, len(vocab), "val", "bpc", info, {"vocab": vocab.to_dict()})
