"""nstm-sample: generation from any language-model checkpoint of nstm-train, from the checkpoint
alone; clear errors for classifiers, unknown characters and bad ids."""
from __future__ import annotations

import pytest

from nstm.sample import main as sample_main
from nstm.sample import sample
from nstm.train import main as train_main

TINY = ["--steps", "2", "--d-model", "16", "--n-layers", "1", "--num-heads", "2", "--num-states", "4",
        "--top-k", "2", "--comm-every", "4", "--batch-size", "2", "--eval-batches", "1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def trained(tmp_path, task_args, model="nstm", name="r"):
    train_main(["--out", str(tmp_path), *TINY, "--model", model, "--run-name", name, *task_args])
    return str(tmp_path / task_args[1] / name / "ckpt.pt")


@pytest.mark.parametrize("model", ["nstm", "transformer"])
def test_sample_continues_a_text_prompt(tmp_path, model, capsys):
    f = tmp_path / "mine.txt"
    f.write_text("abc abd abe. " * 60, encoding="utf-8")
    ckpt = trained(tmp_path, ["--task", "text", "--data-path", str(f), "--seq-len", "16"], model)
    [t] = sample(ckpt, prompt="ab", max_new_tokens=12, seed=1)
    assert t.startswith("ab") and len(t) == 14 and set(t) <= set("abcde. ")
    assert sample(ckpt, "ab", 12, temperature=0) == sample(ckpt, "ab", 12, temperature=0, seed=7)  # greedy
    assert sample(ckpt, "ab", 12, seed=3) == sample(ckpt, "ab", 12, seed=3)
    assert sample_main([ckpt, "--prompt", "ab", "--max-new-tokens", "5", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2
    assert sample_main([ckpt, "--prompt", "xyz"]) == 2
    assert "never saw" in capsys.readouterr().err


def test_sample_takes_ids_without_a_vocabulary_and_refuses_classifiers(tmp_path, capsys):
    ckpt = trained(tmp_path, ["--task", "copy", "--seq-len", "4", "--vocab", "8"])
    [t] = sample(ckpt, prompt="1 2 3", max_new_tokens=4)
    ids = [int(i) for i in t.split()]
    assert ids[:3] == [1, 2, 3] and len(ids) == 7 and all(0 <= i < 10 for i in ids)
    assert sample_main([ckpt, "--prompt", "1 99"]) == 2
    assert "token ids must be in" in capsys.readouterr().err
    cls = trained(tmp_path, ["--task", "listops", "--seq-len", "24", "--min-len", "8", "--max-depth", "3"],
                  name="c")
    assert sample_main([cls]) == 2
    assert "classifier" in capsys.readouterr().err
    assert sample_main([str(tmp_path / "nothing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
