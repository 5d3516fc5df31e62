"""Packed language-model batches (``--pack``): windows inside one document, laid end to end with
their ``cu_seqlens``, every validation token scored once; the ``text`` task on a user's file."""
from __future__ import annotations

import pytest
import torch

import nstm.data.shakespeare as sh
from nstm.data.wikitext import wikitext_articles
from nstm.tasks.registry import build_task
from nstm.tasks.text import packed_lm_task
from nstm.train import main

pytestmark = pytest.mark.usefixtures("one_thread")


def docs(lengths, base=0):
    # document i holds the tokens 100 * i + 0, 1, 2, ...: a window's tokens tell where they came from
    return [torch.arange(n) + 100 * (i + base) for i, n in enumerate(lengths)]


def windows(batch):
    cu = batch.cu_seqlens.tolist()
    return [(batch.inputs[0, a:b], batch.targets[0, a:b]) for a, b in zip(cu[:-1], cu[1:])]


def test_training_batches_are_full_rows_of_windows_inside_documents():
    T = 8
    task = packed_lm_task("t", docs([3, 30, 9, 2]), docs([20], 10), T, 1000, "val", "bpc", {}, {})
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        b = task.train_batch(4, g)
        assert b.inputs.shape == b.targets.shape == (1, 4 * T) and b.cu_seqlens.dtype == torch.int64
        assert b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == 4 * T and (b.cu_seqlens.diff() > 0).all()
        for x, y in windows(b):
            assert 1 <= x.numel() <= T
            assert torch.equal(y, x + 1)                          # the next token ...
            assert (torch.cat([x, y]) // 100).unique().numel() == 1   # ... of the same document
    assert task.info["packed"] and task.info["train_documents"] == 4


def test_evaluation_scores_every_validation_token_once():
    T = 5
    val = docs([12, 2, 7, 1], 10)                                 # a one-token document has no target
    task = packed_lm_task("t", docs([30]), val, T, 10_000, "val", "bpc", {}, {})
    assert task.info["val_documents"] == 3
    scored = []
    for b in task.eval_batches(2, 0)["val"]:
        assert b.inputs.shape[1] <= 2 * T
        for x, y in windows(b):
            assert x.numel() <= T and torch.equal(y, x + 1)
        scored += b.targets[0].tolist()
    want = [t for d in val if d.numel() > 1 for t in d[1:].tolist()]
    assert sorted(scored) == sorted(want)
    assert len(list(task.eval_batches(2, 1)["val"])) == 1        # --eval-batches N caps the batches


def test_packing_refuses_documents_too_short():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        packed_lm_task("t", docs([1, 1]), docs([5]), 4, 1000, "val", "bpc", {}, {})


def test_wikitext_articles_start_at_top_level_headings():
    text = " = A = \n\n x y \n = = Sec = = \n z \n = B = \n w \n"
    arts = wikitext_articles(text)
    assert "".join(arts) == text
    assert [a.splitlines()[0].strip() for a in arts] == ["= A =", "= B ="]
    assert wikitext_articles("no heading\n") == ["no heading\n"]


def test_packed_shakespeare_keeps_works_apart(tmp_path, monkeypatch):
    d = tmp_path / "shakespeare"
    d.mkdir()
    for w, c in (("hamlet", "a"), ("macbeth", "b"), ("othello", "c"), ("tempest", "d")):
        (d / f"{w}_gut.txt").write_text(c * 400 + "\n", encoding="utf-8")
    monkeypatch.setattr(sh, "fetch_shakespeare", lambda root, verbose=True: d)
    task = build_task("shakespeare", seq_len=16, data_root=str(tmp_path), pack=True)
    vocab = sh.CharVocab.from_dict(task.state["vocab"])
    b = task.train_batch(8, torch.Generator().manual_seed(0))
    for x, y in windows(b):      # one work per window: a single letter (or its closing newline)
        assert len(set(vocab.decode(torch.cat([x, y]))) - {"\n"}) == 1
    assert task.info["train_documents"] + task.info["val_documents"] == 4


def test_text_task_trains_packed_and_unpacked_and_checks_its_file(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    common = ["--out", str(tmp_path / "out"), "--steps", "2", "--d-model", "16", "--n-layers", "1",
              "--num-heads", "2", "--num-states", "4", "--top-k", "2", "--comm-every", "4",
              "--batch-size", "2", "--eval-batches", "2", "--no-progress", "--seq-len", "16",
              "--task", "text", "--data-path", str(f)]
    for model in ("nstm", "transformer"):
        for pack in ([], ["--pack"]):
            final = main(common + ["--model", model, "--run-name", f"{model}{len(pack)}", *pack])
            assert final["bpc"] == pytest.approx(final["loss"] / 0.6931471805599453)
    short = tmp_path / "short.txt"
    short.write_text("tiny", encoding="utf-8")
    with pytest.raises(ValueError, match="holds 4 characters"):
        build_task("text", seq_len=16, data_path=str(short))
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\xff\xfe\x00" * 100)
    with pytest.raises(ValueError, match="not UTF-8"):
        build_task("text", seq_len=16, data_path=str(binary))


def test_pack_is_refused_where_there_are_no_documents(capsys):
    with pytest.raises(SystemExit):
        main(["--task", "copy", "--pack", "--steps", "1"])
    assert "--pack packs language-model documents" in capsys.readouterr().err
