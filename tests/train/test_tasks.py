"""Synthetic task generators: MQAR, copy, passkey retrieval and LRA-style ListOps."""
import re

import numpy as np
import pytest
import torch

from nstm.tasks import (
    IGNORE,
    LISTOPS_PAD,
    LISTOPS_VOCAB,
    PASSKEY_DIGIT0,
    PASSKEY_FILLER,
    PASSKEY_KEY,
    PASSKEY_QUERY,
    PASSKEY_VOCAB,
    copy_batch,
    detokenize_listops,
    evaluate_listops,
    generate_listops,
    listops_batch,
    mqar_batch,
    pad_listops,
    passkey_batch,
    tokenize_listops,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- MQAR and copy (existing generators) ----------------------------------------------------------

def test_mqar_targets_are_the_values_of_the_queried_keys():
    x, y = mqar_batch(4, 6, 32, num_queries=5, generator=gen())
    assert x.shape == y.shape == (4, 2 * (6 + 5)) and x.dtype == y.dtype == torch.int64
    for b in range(4):
        pairs = dict(zip(x[b, 0:12:2].tolist(), x[b, 1:12:2].tolist()))
        assert len(pairs) == 6                                   # keys distinct
        scored = (y[b] != IGNORE).nonzero().flatten().tolist()
        assert scored == list(range(12, 22, 2))
        for t in scored:
            assert y[b, t] == pairs[int(x[b, t])] == x[b, t + 1]


@pytest.mark.parametrize("T,N", [(64, 4), (128, 8), (33, 8), (16, 4)])
def test_mqar_with_seq_len_queries_every_key_once_among_fillers(T, N):
    """Zoology's layout: T tokens, the N pairs first, then each key queried once at a random place,
    its value after it, fillers (0) everywhere else; scored only at the query keys."""
    x, y = mqar_batch(8, N, 8192, generator=gen(T), seq_len=T)
    assert x.shape == y.shape == (8, T)
    starts = set()
    for b in range(8):
        pairs = dict(zip(x[b, 0:2 * N:2].tolist(), x[b, 1:2 * N:2].tolist()))
        assert len(pairs) == N and all(1 <= k < 4096 <= v < 8192 for k, v in pairs.items())
        scored = (y[b] != IGNORE).nonzero().flatten().tolist()
        assert len(scored) == N and all(t >= 2 * N and (t - 2 * N) % 2 == 0 for t in scored)
        assert sorted(int(x[b, t]) for t in scored) == sorted(pairs)       # every key exactly once
        for t in scored:
            assert y[b, t] == pairs[int(x[b, t])] == x[b, t + 1]
        rest = set(range(2 * N, T)) - set(scored) - {t + 1 for t in scored}
        assert all(int(x[b, t]) == 0 for t in rest)
        starts.add(scored[0])
    if T - 4 * N >= 8:
        assert len(starts) > 1                      # the queries are not always in the same place
    with pytest.raises(ValueError, match="seq_len"):
        mqar_batch(2, N, 8192, seq_len=4 * N - 1)


def test_mqar_task_takes_seq_len():
    from nstm.tasks.registry import build_task
    task = build_task("mqar", num_pairs=4, vocab_size=8192, seq_len=64)
    b = task.train_batch(3, gen())
    assert task.seq_len == 64 and b.inputs.shape == (3, 64) and task.info["length"] == 64
    assert build_task("mqar", num_pairs=4, vocab_size=64).seq_len == 16
    with pytest.raises(ValueError, match="seq_len >= 4"):
        build_task("mqar", num_pairs=8, vocab_size=64, seq_len=20)


def test_copy_targets_are_the_second_copy():
    x, y = copy_batch(3, 7, 10, generator=gen())
    assert x.shape == (3, 15) and (x[:, 7] == 0).all() and (x[:, :7] == x[:, 8:]).all()
    assert (y[:, 7:14] == x[:, 8:]).all() and (y[:, :7] == IGNORE).all() and (y[:, 14] == IGNORE).all()


# --- passkey ---------------------------------------------------------------------------------------

def _hidden(row, n):
    """The digits after the KEY marker and after the QUERY marker."""
    k = (row == PASSKEY_KEY).nonzero().flatten()
    q = (row == PASSKEY_QUERY).nonzero().flatten()
    assert k.numel() == 1 and q.numel() == 1
    return int(k), row[k + 1:k + 1 + n], int(q), row[q + 1:q + 1 + n]


@pytest.mark.parametrize("filler", ["repeat", "random"])
def test_passkey_answer_is_the_hidden_number_and_only_it_is_scored(filler):
    n, T = 5, 64
    x, y = passkey_batch(16, T, generator=gen(), num_digits=n, filler=filler)
    assert x.shape == y.shape == (16, T) and x.dtype == y.dtype == torch.int64
    assert 0 <= int(x.min()) and int(x.max()) < PASSKEY_VOCAB
    for b in range(16):
        k, key_digits, q, ans_digits = _hidden(x[b], n)
        assert q == T - n - 1                                    # the query closes the sequence
        assert torch.equal(key_digits, ans_digits)
        assert ((key_digits >= PASSKEY_DIGIT0) & (key_digits < PASSKEY_DIGIT0 + 10)).all()
        assert int(key_digits[0]) != PASSKEY_DIGIT0              # a genuine n-digit number
        others = torch.ones(T, dtype=torch.bool)
        others[k:k + n + 1] = False
        others[q:] = False
        assert torch.isin(x[b, others], torch.tensor(PASSKEY_FILLER)).all()
        scored = (y[b] != IGNORE).nonzero().flatten().tolist()
        assert scored == list(range(T - n - 1, T - 1))           # QUERY, d1 .. d(n-1)
        assert torch.equal(y[b, scored], x[b, T - n:])           # teacher forced: next token
        number = int("".join(str(int(d) - PASSKEY_DIGIT0) for d in key_digits))
        assert 10 ** (n - 1) <= number < 10 ** n


def test_passkey_depth_is_respected():
    n, T = 3, 48
    F = T - 2 * (n + 1)
    depths = [0.0, 0.25, 0.5, 1.0]
    x, _ = passkey_batch(4, T, generator=gen(), depth=depths, num_digits=n)
    for b, d in enumerate(depths):
        assert _hidden(x[b], n)[0] == round(d * F)
    x, _ = passkey_batch(3, T, generator=gen(), depth=1.0, num_digits=n)
    assert (x[:, F] == PASSKEY_KEY).all() and (x[:, F + n + 1] == PASSKEY_QUERY).all()
    x, _ = passkey_batch(2, T, generator=gen(), depth=torch.tensor([0.0, 0.0]), num_digits=n)
    assert (x[:, 0] == PASSKEY_KEY).all()
    # random depths cover the haystack
    x, _ = passkey_batch(400, T, generator=gen(1), num_digits=n)
    pos = (x == PASSKEY_KEY).nonzero()[:, 1]
    assert int(pos.min()) <= 2 and int(pos.max()) >= F - 2


def test_passkey_minimal_length_and_determinism():
    x, y = passkey_batch(2, 12, generator=gen(), num_digits=5)          # no filler at all
    assert (x[:, 0] == PASSKEY_KEY).all() and (x[:, 6] == PASSKEY_QUERY).all()
    a = passkey_batch(3, 40, generator=gen(7))
    b = passkey_batch(3, 40, generator=gen(7))
    c = passkey_batch(3, 40, generator=gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_passkey_bad_arguments():
    with pytest.raises(ValueError, match="too short"):
        passkey_batch(2, 11, num_digits=5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        passkey_batch(2, 32, depth=1.5)
    with pytest.raises(ValueError, match="one value per row"):
        passkey_batch(2, 32, depth=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        passkey_batch(2, 32, num_digits=0)
    with pytest.raises(ValueError):
        passkey_batch(0, 32)
    with pytest.raises(ValueError, match="filler"):
        passkey_batch(2, 32, filler="noise")


# --- ListOps ---------------------------------------------------------------------------------------

def _reference_value(text):
    """An independent recursive evaluator (LRA's semantics: MED = int(np.median))."""
    toks = text.replace("(", " ").replace(")", " ").split()
    pos = 0

    def node():
        nonlocal pos
        tok = toks[pos]
        pos += 1
        if tok.isdigit():
            return int(tok)
        args = []
        while toks[pos] != "]":
            args.append(node())
        pos += 1
        return {"[MAX": max, "[MIN": min, "[SM": lambda a: sum(a) % 10,
                "[MED": lambda a: int(np.median(a))}[tok](args)

    v = node()
    assert pos == len(toks)
    return v


def _shape(text):
    """(max list nesting, min and max argument counts) of a paren-free expression."""
    depth = max_depth = 0
    counts, stack = [], []
    for tok in text.split():
        if tok.startswith("["):
            if stack:
                stack[-1] += 1
            stack.append(0)
            depth += 1
            max_depth = max(max_depth, depth)
        elif tok == "]":
            counts.append(stack.pop())
            depth -= 1
        elif stack:
            stack[-1] += 1
    return max_depth, min(counts), max(counts)


@pytest.mark.parametrize("text,value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 4 7 ]", 4),
    ("[SM 9 9 5 ]", 3),
    ("[MED 1 2 ]", 1),                       # even count: the mean of the middle two, truncated
    ("[MED 3 8 1 4 ]", 3),
    ("[MED 7 1 9 ]", 7),
    ("[SM [MAX 1 2 ] [MED 5 6 7 ] 8 ]", 6),
    ("( ( ( [MAX 2 ) 9 ) ] )", 9),           # LRA's parenthesised form
    ("7", 7),
])
def test_evaluate_listops_known_values(text, value):
    assert evaluate_listops(text) == value == _reference_value(text)


@pytest.mark.parametrize("text", ["[MAX 2 9", "[MAX 2 ] ]", "[MAX ]", "[FOO 1 2 ]", "", "1 2",
                                  "[MAX 1 2 ] 3", "[MAX 12 3 ]"])
def test_evaluate_listops_rejects_malformed_text(text):
    with pytest.raises(ValueError):
        evaluate_listops(text)


def test_generated_listops_answers_lengths_depth_and_args():
    ex = generate_listops(40, min_len=30, max_len=120, max_depth=6, max_args=5, seed=3)
    assert len(ex) == 40 and len({t for t, _ in ex}) > 30
    for text, y in ex:
        assert 0 <= y <= 9 and evaluate_listops(text) == y == _reference_value(text)
        assert 30 <= len(tokenize_listops(text)) <= 120
        depth, lo, hi = _shape(text)
        assert depth <= 5 and lo >= 2 and hi <= 5      # max_depth counts the leaf level


def test_generated_listops_at_lra_lengths():
    ex = generate_listops(4, seed=0)                    # LRA defaults: 500..2000 tokens, depth 10
    for text, y in ex:
        assert 500 <= len(tokenize_listops(text)) <= 2000
        assert evaluate_listops(text) == y
        depth, lo, hi = _shape(text)
        assert depth <= 9 and lo >= 2 and hi <= 10


def test_generate_listops_determinism_and_paren_format():
    a = generate_listops(5, min_len=20, max_len=80, seed=11)
    assert a == generate_listops(5, min_len=20, max_len=80, seed=11)
    assert a != generate_listops(5, min_len=20, max_len=80, seed=12)
    p = generate_listops(5, min_len=20, max_len=80, seed=11, parens=True)
    for (t0, y0), (t1, y1) in zip(a, p):
        assert y0 == y1 and "(" in t1 and tokenize_listops(t0) == tokenize_listops(t1)
        assert evaluate_listops(t1) == y1
        assert t1.count("(") == t1.count(")")
        assert re.sub(r"[()]", " ", t1).split() == t0.split()


def test_generate_listops_bad_arguments():
    for kwargs in ({"min_len": 100, "max_len": 50}, {"max_depth": 0}, {"max_args": 1},
                   {"min_len": 0}, {"min_len": 5000, "max_len": 6000, "max_depth": 2}):
        with pytest.raises(ValueError):
            generate_listops(1, **kwargs)
    with pytest.raises(ValueError):
        generate_listops(-1)
    with pytest.raises(RuntimeError, match="rejected"):
        generate_listops(1, min_len=17, max_len=17, max_depth=3, max_args=3, max_tries=5)


def test_listops_vocab_and_tokenize_round_trip():
    assert LISTOPS_VOCAB[LISTOPS_PAD] == "<pad>" and len(set(LISTOPS_VOCAB)) == len(LISTOPS_VOCAB)
    assert {"[MAX", "[MIN", "[MED", "[SM", "]", *map(str, range(10))} <= set(LISTOPS_VOCAB)
    text = "[MAX 2 9 [MIN 4 7 ] 0 ]"
    ids = tokenize_listops(text)
    assert len(ids) == 9 and LISTOPS_PAD not in ids
    assert detokenize_listops(ids + [LISTOPS_PAD] * 3) == text
    assert tokenize_listops("( ( [MIN 4 ) 7 ) ] )") == tokenize_listops("[MIN 4 7 ]")
    with pytest.raises(ValueError):
        tokenize_listops("[MAX 2 x ]")
    with pytest.raises(ValueError):
        tokenize_listops("<pad>")


def test_listops_batch_padding_lengths_labels():
    tokens, lengths, labels = listops_batch(6, min_len=40, max_len=200, max_depth=6, generator=gen())
    assert tokens.dtype == lengths.dtype == labels.dtype == torch.int64
    assert tokens.shape == (6, int(lengths.max())) and lengths.shape == labels.shape == (6,)
    for b in range(6):
        n = int(lengths[b])
        assert 40 <= n <= 200
        assert (tokens[b, :n] != LISTOPS_PAD).all() and (tokens[b, n:] == LISTOPS_PAD).all()
        assert evaluate_listops(detokenize_listops(tokens[b].tolist())) == int(labels[b])
    again = listops_batch(6, min_len=40, max_len=200, max_depth=6, generator=gen())
    assert all(torch.equal(u, v) for u, v in zip((tokens, lengths, labels), again))
    padded, _, _ = listops_batch(2, min_len=10, max_len=50, generator=gen(), pad_to=64)
    assert padded.shape == (2, 64)
    with pytest.raises(ValueError):
        listops_batch(0)
    with pytest.raises(ValueError, match="pad_to"):
        pad_listops([("[MAX 1 2 3 ]", 3)], pad_to=3)


@pytest.mark.parametrize("model_name", ["nstm", "transformer"])
def test_sparse_scored_tasks_take_only_the_scored_logits(model_name):
    """MQAR scores 4 of 32 positions here: the loss sends only those through the output head
    (``logits_at``), with the same loss, accuracy and evaluation as the full [B, T, vocab] logits."""
    import torch.nn.functional as F

    from nstm.baseline import TransformerLM
    from nstm.models import NSTMLM
    from nstm.tasks.registry import build_task

    torch.manual_seed(0)
    task = build_task("mqar", num_pairs=4, vocab_size=64, seq_len=32)
    model = (NSTMLM(64, d_model=32, n_layers=1, num_heads=2, num_states=8, top_k=2) if model_name == "nstm"
             else TransformerLM(64, d_model=32, n_layers=1, num_heads=2))
    batch = task.train_batch(8, gen(3))
    at = task.scored(batch)
    assert at is not None and int(at.sum()) == 8 * 4
    full = model(batch.inputs)
    some = model(batch.inputs, logits_at=at)
    assert some.shape == (32, 64)
    torch.testing.assert_close(some, full[at], rtol=1e-5, atol=1e-6)
    loss, logits = task.loss(model, batch)
    dense = F.cross_entropy(full.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-6)
    assert task.accuracy(logits, batch) == task.accuracy(full, batch)
    ev = task.evaluate(model, 8, 2)
    sets = task.eval_batches(8, 2)["test"]
    loss_sum = right = n = exact = 0
    with torch.no_grad():
        for b in sets:
            lg = model(b.inputs)
            mask = b.targets != IGNORE
            loss_sum += float(F.cross_entropy(lg.flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE,
                                              reduction="sum"))
            ok = (lg.argmax(-1) == b.targets) & mask
            right, n = right + int(ok.sum()), n + int(mask.sum())
            exact += int((ok == mask).all(1).sum())
    assert ev["test/accuracy"] == right / n and ev["test/exact"] == exact / 16
    assert abs(ev["test/loss"] - loss_sum / n) < 1e-5
    # a dense task (characters: every position scored) keeps the full logits
    dense_batch = batch._replace(targets=batch.inputs.roll(-1, 1))
    assert task.scored(dense_batch) is None
    with pytest.raises(ValueError, match="logits_at must be a bool tensor"):
        model(batch.inputs, logits_at=at.long())
