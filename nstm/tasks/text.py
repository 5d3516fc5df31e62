"""Text language-modelling tasks: ``shakespeare`` (characters, scored in bits per character) and
``wikitext2`` (words, scored in perplexity). Training draws random windows of the training text;
evaluation scores the validation text in consecutive windows.

The readers (``nstm.data.shakespeare``, ``nstm.data.wikitext``'s ``load_wikitext2``) are looked up
when a task is built; the tokenisers live next to them (``CharVocab``; ``wikitext_words`` and
``word_vocab``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..data.wikitext import WIKITEXT_MIN_COUNT, encode_words, wikitext_words, word_vocab
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


def shakespeare_task(seq_len: Optional[int] = None, data_root="data", **_) -> Task:
    """Character-level Tiny Shakespeare (fetched into ``data_root``; 10% of the works held out)."""
    sh = data_module("nstm.data.shakespeare")
    T = 256 if seq_len is None else seq_len
    check_int("seq_len", T, 1)
    sh.fetch_shakespeare(data_root)
    train_text, val_text = sh.load_shakespeare(data_root, val_fraction=0.1, seed=0)
    vocab = sh.CharVocab.from_text(train_text + val_text)
    train_ids = torch.as_tensor(vocab.encode(train_text)).long()
    val_ids = torch.as_tensor(vocab.encode(val_text)).long()
    return text_lm_task("shakespeare", train_ids, val_ids, T, len(vocab), "val", "bpc",
                        {"seq_len": T, "vocab_size": len(vocab), "train_chars": len(train_text),
                         "val_chars": len(val_text), "data_root": str(data_root)},
                        {"vocab": vocab.to_dict()})


def wikitext_task(seq_len: Optional[int] = None, data_path=None, min_count: int = WIKITEXT_MIN_COUNT,
                  **_) -> Task:
    """Word-level WikiText-2 (raw) from ``data_path``, tokenised by ``nstm.data.wikitext``
    (``wikitext_words``, ``word_vocab``: about 30K words, like the tokenized release)."""
    path = need_path("wikitext2", data_path)
    wt = data_module("nstm.data.wikitext")
    T = 256 if seq_len is None else seq_len
    check_int("seq_len", T, 1)
    train_words = wikitext_words(wt.load_wikitext2(path, "train"))
    val_words = wikitext_words(load_split(wt.load_wikitext2, path, ("valid", "validation", "val")))
    itos = word_vocab(train_words, min_count)
    train_ids = torch.tensor(encode_words(train_words, itos), dtype=torch.long)
    val_ids = torch.tensor(encode_words(val_words, itos), dtype=torch.long)
    return text_lm_task("wikitext2", train_ids, val_ids, T, len(itos), "valid", "ppl",
                        {"seq_len": T, "vocab_size": len(itos),
                         "tokenization": f"whitespace words + <eos> per line; < {min_count} train "
                                         "occurrences -> <unk>",
                         "train_tokens": len(train_words), "val_tokens": len(val_words),
                         "val_unk_rate": float((val_ids == 0).float().mean()), "data_path": str(path)},
                        {"vocab": itos})
