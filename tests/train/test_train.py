"""Training CLI, task registry and checkpoints: smoke runs of every task on tiny models, resume
equality, atomic saves, argument errors, results files, and one learning sanity check."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from nstm import checkpoint as ckpt_mod
from nstm.checkpoint import CheckpointError, check_resume_config, load_checkpoint, save_checkpoint
from nstm.tasks import registry
from nstm.tasks.registry import build_task
from nstm.train import lr_factor, main

TINY = ["--d-model", "16", "--layers", "1", "--heads", "2", "--num-states", "4", "--top-k", "2",
        "--comm-every", "8", "--batch-size", "4", "--eval-batches", "1", "--log-every", "1",
        "--no-progress", "--lr", "3e-3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, *args, steps=2):
    return main(["--out", str(tmp_path), "--steps", str(steps), *TINY, *map(str, args)])


def name_of(out, task):
    """The name of the one run under ``out/task`` (the default name spells out the settings)."""
    [json_file] = (out / task).glob("*.json")
    return json_file.stem


def results(tmp_path, task, run_name):
    with open(tmp_path / task / f"{run_name}.json") as f:
        return json.load(f)


# ---- fake data modules (the CLI is tested, not the data layer) ---------------------------------
def _install(monkeypatch, name, **attrs):
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def fake_mnist(monkeypatch, n=24):
    g = torch.Generator().manual_seed(0)
    imgs = {s: torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8) for s in ("train", "test")}
    labels = {s: torch.arange(n) % 10 for s in ("train", "test")}
    _install(monkeypatch, "nstm.data.mnist", fetch_mnist=lambda root: root,
             load_mnist=lambda root, split: (imgs[split], labels[split]))
    return imgs


class FakeCharVocab:
    def __init__(self, chars):
        self.chars = list(chars)

    @classmethod
    def from_text(cls, text, *more):
        return cls(sorted(set(text).union(*more)))

    def encode(self, text):
        return torch.tensor([self.chars.index(c) for c in text], dtype=torch.long)

    def __len__(self):
        return len(self.chars)

    def to_dict(self):
        return {"chars": self.chars}


def fake_shakespeare(monkeypatch):
    text = "to be or not to be, that is the question. " * 12
    _install(monkeypatch, "nstm.data.shakespeare", fetch_shakespeare=lambda root: root,
             load_shakespeare=lambda root, val_fraction=0.1, seed=0: (text, text[:200]),
             CharVocab=FakeCharVocab)


# ---- the task registry -------------------------------------------------------------------------
def test_registry_tasks_and_eval_sets():
    assert set(registry.available_tasks()) >= {"copy", "mqar", "passkey", "listops", "smnist", "psmnist",
                                               "shakespeare", "lra-listops", "cifar10", "wikitext2", "row-mnist"}
    copy = build_task("copy", seq_len=4, vocab_size=8)
    assert copy.kind == "lm" and copy.metric == "accuracy" and copy.vocab_size == 8
    sets = copy.eval_batches(3, 2)
    assert list(sets) == ["L4", "L8", "L16"]                         # L, 2L (length generalisation), 4L
    b1, b2 = list(sets["L4"]), list(sets["L4"])                     # re-iterable, fixed seed
    assert len(b1) == 2 and torch.equal(b1[0].inputs, b2[0].inputs)
    assert list(sets["L16"])[0].inputs.shape == (3, 33)
    assert list(sets["L8"])[0].inputs.shape == (3, 17)
    with pytest.raises(ValueError, match="unknown task"):
        build_task("nope")
    with pytest.raises(ValueError, match="num_pairs"):
        build_task("mqar", num_pairs=20, vocab_size=16)
    with pytest.raises(ValueError, match="passkey training context"):
        build_task("passkey", seq_len=4096)
    with pytest.raises(ValueError, match="data-path"):
        build_task("cifar10")
    with pytest.raises(ValueError, match="num_batches"):
        copy.eval_batches(3, 0)


def test_registry_evaluate_keys():
    from nstm import NSTMLM
    task = build_task("copy", seq_len=3, vocab_size=8)
    model = NSTMLM(8, d_model=16, n_layers=1, num_heads=2, num_states=4, top_k=2, comm_every=4)
    m = task.evaluate(model, 2, 1)
    assert {"loss", "accuracy", "exact", "L3/accuracy", "L12/accuracy", "L12/loss"} <= set(m)
    assert 0 <= m["accuracy"] <= 1 and model.training


def test_psmnist_is_a_fixed_permutation_of_smnist(monkeypatch):
    fake_mnist(monkeypatch)
    s, p = build_task("smnist"), build_task("psmnist")
    assert s.kind == p.kind == "cls" and s.input_dim == 1 and s.num_classes == 10 and s.seq_len == 784
    bs = s.train_batch(3, torch.Generator().manual_seed(5))
    bp = p.train_batch(3, torch.Generator().manual_seed(5))
    assert bs.inputs.shape == (3, 784, 1) and 0 <= float(bs.inputs.min()) and float(bs.inputs.max()) <= 1
    perm = torch.randperm(784, generator=torch.Generator().manual_seed(registry.PSMNIST_SEED))
    assert torch.equal(bp.inputs, bs.inputs[:, perm]) and torch.equal(bp.targets, bs.targets)
    assert torch.equal(build_task("psmnist").train_batch(3, torch.Generator().manual_seed(5)).inputs, bp.inputs)


def test_data_path_tasks_with_fake_loaders(monkeypatch, tmp_path):
    g = torch.Generator().manual_seed(0)
    _install(monkeypatch, "nstm.data.cifar10", load_cifar10=lambda path, split: (
        torch.randint(0, 256, (6, 32, 32, 3), generator=g, dtype=torch.uint8), torch.arange(6) % 10))
    words = "the cat sat on the mat .\n the dog sat on the log .\n" * 30
    _install(monkeypatch, "nstm.data.wikitext", load_wikitext2=lambda path, split: words)
    rows = [("[MAX 1 2 ]", 2), ("[MIN 3 [MAX 4 5 ] ]", 3), ("7", 7)]
    _install(monkeypatch, "nstm.data.lra", load_lra_listops=lambda path, split: rows)
    cf = build_task("cifar10", data_path=str(tmp_path))
    b = cf.train_batch(2, g)
    assert b.inputs.shape == (2, 1024, 3) and cf.input_dim == 3
    assert len(list(cf.eval_batches(4, 0)["test"])) == 2              # 0: the whole split
    wt = build_task("wikitext2", data_path=str(tmp_path), seq_len=8)
    assert wt.kind == "lm" and wt.metric == "ppl" and not wt.higher_is_better
    assert wt.train_batch(2, g).inputs.shape == (2, 8)
    lra = build_task("lra-listops", data_path=str(tmp_path))
    lb = lra.train_batch(4, g)
    assert lb.lengths is not None and lb.inputs.shape[1] == int(lb.lengths.max())
    assert list(lra.eval_batches(2, 0)) == ["val", "test"]


def test_registry_is_a_table_of_builders_by_kind():
    kinds = {"copy": "synthetic", "mqar": "synthetic", "passkey": "synthetic", "listops": "lra",
             "lra-listops": "lra", "smnist": "images", "psmnist": "images", "cifar10": "images", "row-mnist": "images",
             "shakespeare": "text", "wikitext2": "text", "text": "text"}
    assert set(kinds) == set(registry.TASKS)
    for name, kind in kinds.items():
        assert registry.TASKS[name].builder.__module__ == f"nstm.tasks.{kind}", name
    assert registry.Task is __import__("nstm.tasks.base", fromlist=["Task"]).Task


# ---- smoke training of every task ---------------------------------------------------------------
SYNTHETIC = [
    ("copy", ["--seq-len", "4", "--vocab", "8"]),
    ("mqar", ["--num-pairs", "3", "--vocab", "16"]),
    ("passkey", ["--seq-len", "32", "--eval-contexts", "32,64"]),
    ("listops", ["--seq-len", "24", "--min-len", "8", "--max-depth", "3"]),
]


@pytest.mark.parametrize("model", ["nstm", "transformer"])
@pytest.mark.parametrize("task, extra", SYNTHETIC, ids=[t for t, _ in SYNTHETIC])
def test_smoke_synthetic_tasks(tmp_path, task, extra, model):
    final = run(tmp_path, "--task", task, "--model", model, *extra)
    assert final["step"] == 2 and final["status"] == "completed"
    assert 0 <= final["accuracy"] <= 1 and final["loss"] > 0
    r = results(tmp_path, task, name_of(tmp_path, task))
    if task == "copy":
        assert {"L4/accuracy", "L16/accuracy"} <= set(r["final"])
    if task == "passkey":
        assert {"ctx32/accuracy", "ctx64/accuracy"} <= set(r["final"])


@pytest.mark.parametrize("task, model", [("smnist", "nstm"), ("psmnist", "transformer")])
def test_smoke_mnist(tmp_path, monkeypatch, task, model):
    fake_mnist(monkeypatch)
    final = run(tmp_path, "--task", task, "--model", model, "--batch-size", "2", steps=1)
    assert final["step"] == 1 and 0 <= final["accuracy"] <= 1


@pytest.mark.parametrize("model", ["nstm", "transformer"])
def test_smoke_shakespeare(tmp_path, monkeypatch, model):
    fake_shakespeare(monkeypatch)
    final = run(tmp_path, "--task", "shakespeare", "--model", model, "--seq-len", "16")
    assert final["bpc"] == pytest.approx(final["loss"] / 0.6931471805599453)
    ck = load_checkpoint(tmp_path / "shakespeare" / name_of(tmp_path, "shakespeare") / "ckpt.pt")
    assert ck["extra"]["task_state"]["vocab"]["chars"][0] == " "      # the vocabulary travels along


# ---- results files -------------------------------------------------------------------------------
def test_results_json_fields_and_png(tmp_path):
    final = run(tmp_path, "--task", "mqar", "--num-pairs", "2", "--vocab", "8", "--run-name", "r1",
                "--eval-every", "1", steps=3)
    r = results(tmp_path, "mqar", "r1")
    for key in ("config", "history", "final", "device_name", "git_commit", "torch_version",
                "param_count", "wall_time_s", "train_time_s", "tokens_per_s", "metric", "status", "task_info"):
        assert key in r, key
    assert r["torch_version"] == torch.__version__ and r["status"] == "completed"
    assert isinstance(r["git_commit"], str) and r["git_commit"]
    assert r["config"]["task"] == "mqar" and r["param_count"] == final["param_count"] > 0
    assert [h["step"] for h in r["history"]["train"]] == [1, 2, 3]
    assert [h["step"] for h in r["history"]["eval"]] == [1, 2, 3]
    assert r["final"]["accuracy"] == final["accuracy"]
    assert (tmp_path / "mqar" / "r1.png").stat().st_size > 1000
    assert not [p for p in os.listdir(tmp_path / "mqar") if p.endswith(".tmp")]


def test_maps_and_pruning_report(tmp_path):
    final = run(tmp_path, "--task", "mqar", "--num-pairs", "4", "--vocab", "16", "--run-name", "m",
                "--maps", "--prune-threshold", "0.99", steps=1)
    r = results(tmp_path, "mqar", "m")
    maps_dir = tmp_path / "mqar" / "m" / "maps"
    names = sorted(os.listdir(maps_dir))
    assert {"routing_layer0.png", "slot_usage_layer0.png", "importance_layer0.png", "s2s_layer0.png"} <= set(names)
    p = r["maps"]["prune"]
    assert p["slots"] == [{"before": 4, "after": 1}]          # importances start at sigmoid(3) < 0.99
    assert p["params_after"] < p["params_before"] and p["speedup"] > 0
    assert p["loss_before"] == final["loss"] and p["loss_after"] is not None
    assert "prune/loss_after" in final


def test_maps_default_threshold_prunes_about_a_quarter_and_transformer_maps_are_skipped(tmp_path):
    run(tmp_path, "--task", "mqar", "--num-pairs", "4", "--vocab", "16", "--run-name", "m", "--num-states", "8",
        "--maps", steps=3)
    p = results(tmp_path, "mqar", "m")["maps"]["prune"]
    assert p["threshold_is"].startswith("the 25th percentile")
    assert all(r["before"] == 8 and 4 <= r["after"] <= 8 for r in p["slots"])
    final = run(tmp_path, "--task", "mqar", "--num-pairs", "4", "--vocab", "16", "--run-name", "t",
                "--model", "transformer", "--maps", steps=1)
    assert final["status"] == "completed"
    assert "Transformer" in results(tmp_path, "mqar", "t")["maps"]["skipped"]


def test_an_existing_run_is_never_replaced_silently(tmp_path, capsys):
    args = ["--task", "copy", "--seq-len", "3", "--vocab", "8"]
    run(tmp_path, *args, steps=3)
    name = name_of(tmp_path, "copy")
    before = (tmp_path / "copy" / f"{name}.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *args, steps=1)
    assert e.value.code == 2 and "exists" in capsys.readouterr().err
    assert (tmp_path / "copy" / f"{name}.json").read_bytes() == before
    assert run(tmp_path, *args, "--lr", "1e-3", steps=1)["status"] == "completed"   # another lr: another run
    assert len(list((tmp_path / "copy").glob("*.json"))) == 2
    assert run(tmp_path, *args, "--overwrite", steps=1)["step"] == 1
    assert results(tmp_path, "copy", name)["steps_done"] == 1


def test_interrupt_saves_first_and_exits_130(tmp_path, monkeypatch):
    import nstm.train as train_mod
    calls = {"n": 0}
    real = train_mod.train_step

    def step_then_ctrl_c(run_, state):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(run_, state)
    monkeypatch.setattr(train_mod, "train_step", step_then_ctrl_c)
    real_eval = train_mod.Run.evaluate

    def eval_interrupted(self, state):          # a second Ctrl-C, during the final evaluation
        raise KeyboardInterrupt
    monkeypatch.setattr(train_mod.Run, "evaluate", eval_interrupted)
    argv = ["--out", str(tmp_path), "--steps", "10", *TINY, "--task", "copy", "--seq-len", "3", "--vocab", "8"]
    monkeypatch.setattr(sys, "argv", ["nstm-train", *argv])
    assert train_mod.cli() == 130
    name = name_of(tmp_path, "copy")
    r = results(tmp_path, "copy", name)
    assert r["status"] == "interrupted" and r["steps_done"] == 2 and r["final"] is None
    assert load_checkpoint(tmp_path / "copy" / name / "ckpt.pt")["step"] == 2
    monkeypatch.setattr(train_mod.Run, "evaluate", real_eval)
    calls["n"] = -100
    final = run(tmp_path, "--task", "copy", "--seq-len", "3", "--vocab", "8", "--resume", "auto", steps=10)
    assert final["status"] == "completed" and final["step"] == 10


def test_help_shows_defaults():
    from nstm.train import build_parser
    text = build_parser().format_help()
    assert "(default: 1000)" in text and "(default: 200)" in text and "shakespeare" in text


def test_time_budget_stops_cleanly(tmp_path):
    final = run(tmp_path, "--task", "copy", "--seq-len", "3", "--vocab", "8", "--time-budget", "1e-6", steps=50)
    assert final["status"] == "time_budget" and final["step"] == 1
    assert (tmp_path / "copy" / name_of(tmp_path, "copy") / "ckpt.pt").exists()


# ---- checkpoints and resume -----------------------------------------------------------------------
@pytest.mark.parametrize("model", ["nstm", "transformer"])
def test_resume_equals_straight_run(tmp_path, model):
    args = ["--task", "mqar", "--num-pairs", "3", "--vocab", "16", "--model", model, "--warmup", "2"]
    a = run(tmp_path / "a", *args, steps=6)
    run(tmp_path / "b", *args, "--stop-after", "3", steps=6)
    rb = results(tmp_path / "b", "mqar", name_of(tmp_path / "b", "mqar"))
    assert rb["status"] == "stopped" and rb["steps_done"] == 3
    b = run(tmp_path / "b", *args, "--resume", "auto", steps=6)
    assert b["step"] == a["step"] == 6
    name = name_of(tmp_path / "a", "mqar")
    ra, rb = results(tmp_path / "a", "mqar", name), results(tmp_path / "b", "mqar", name)
    assert [h["loss"] for h in ra["history"]["train"]] == [h["loss"] for h in rb["history"]["train"]]
    assert rb["resumed_at_step"] == 3
    pa = load_checkpoint(tmp_path / "a" / "mqar" / name / "ckpt.pt")
    pb = load_checkpoint(tmp_path / "b" / "mqar" / name / "ckpt.pt")
    assert pa["step"] == pb["step"] == 6
    for k in pa["model"]:
        assert torch.equal(pa["model"][k], pb["model"][k]), k
    assert a["loss"] == b["loss"] and a["accuracy"] == b["accuracy"]


def test_resume_config_mismatch_and_missing(tmp_path, capsys):
    args = ["--task", "copy", "--seq-len", "3", "--vocab", "8", "--run-name", "r"]
    run(tmp_path, *args, steps=1)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *args, "--resume", "auto", "--d-model", "32", steps=2)
    assert e.value.code == 2
    assert "different configuration" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(tmp_path, *args, "--resume", str(tmp_path / "nothing.pt"), steps=2)
    assert "no checkpoint" in capsys.readouterr().err
    # a longer schedule may be asked for: that is not a mismatch
    final = run(tmp_path, *args, "--resume", "auto", steps=2)
    assert final["step"] == 2


def _tiny_model():
    return torch.nn.Linear(3, 2)


def test_checkpoint_roundtrip_and_errors(tmp_path):
    m = _tiny_model()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "c.pt"
    save_checkpoint(path, m, opt, None, 5, {"a": 1}, {"rng": torch.get_rng_state(), "hist": [{"x": 1.0}]})
    ck = load_checkpoint(path)
    assert ck["step"] == 5 and ck["config"] == {"a": 1} and ck["extra"]["hist"] == [{"x": 1.0}]
    assert torch.equal(ck["model"]["weight"], m.weight)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(bad)
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an nstm"):
        load_checkpoint(tmp_path / "foreign.pt")
    check_resume_config({"a": 1, "steps": 3}, {"a": 1, "steps": 9}, ignore=["steps"])
    with pytest.raises(CheckpointError, match="a: checkpoint 1 vs now 2"):
        check_resume_config({"a": 1}, {"a": 2})


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    m = _tiny_model()
    path = tmp_path / "c.pt"
    save_checkpoint(path, m, None, None, 1, {"v": 1})
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, m, None, None, 2, {"v": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]                      # no temporary file left behind


# ---- arguments ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--task", "bogus"], "invalid choice"),
    (["--task", "copy", "--steps", "0"], "--steps must be >= 1"),
    (["--task", "copy", "--d-model", "30", "--heads", "4"], "divisible"),
    (["--task", "copy", "--top-k", "9", "--num-states", "8"], "--top-k"),
    (["--task", "copy", "--lr", "-1"], "--lr"),
    (["--task", "copy", "--min-lr", "1", "--lr", "0.1"], "--min-lr"),
    (["--task", "copy", "--amp", "fp16", "--device", "cpu"], "fp16 needs a CUDA"),
    (["--task", "copy", "--backend", "bogus"], "invalid choice: 'bogus'"),
    (["--task", "copy", "--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--task", "cifar10"], "--data-path"),
    (["--task", "copy", "--eval-batches", "0"], "data-backed"),
    (["--task", "copy", "--warmup", "5", "--steps", "5"], "--warmup"),
    (["--task", "copy", "--eval-contexts", "a,b"], "comma-separated"),
    (["--task", "passkey", "--seq-len", "4096"], "passkey training context"),
    (["--task", "copy", "--time-budget", "0"], "--time-budget"),
])
def test_bad_args_rejected(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--no-progress", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_lr_schedule():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 100, 0, 0.0) == pytest.approx(1.0)


def test_module_help_runs():
    r = subprocess.run([sys.executable, "-m", "nstm.train", "--help"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), timeout=120)
    assert r.returncode == 0 and "--task" in r.stdout and "shakespeare" in r.stdout


# ---- learning sanity -------------------------------------------------------------------------------
def test_mqar_loss_decreases(tmp_path):
    final = run(tmp_path, "--task", "mqar", "--num-pairs", "2", "--vocab", "8", "--batch-size", "16",
                "--lr", "1e-2", "--warmup", "3", "--weight-decay", "0", "--run-name", "learn", steps=60)
    hist = [h["loss"] for h in results(tmp_path, "mqar", "learn")["history"]["train"]]
    first, last = sum(hist[:5]) / 5, sum(hist[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert final["loss"] < 1.15           # chance over the 4 values is ln 4 = 1.39, over all 8 tokens 2.08


# ---- NSTMConfig through the CLI and the checkpoint ------------------------------------------------
def test_model_flags_are_nstm_config_fields_with_aliases():
    import dataclasses

    from nstm.config import NSTMConfig
    from nstm.train import build_parser, nstm_config
    ap = build_parser()
    new = ap.parse_args(["--task", "copy", "--num-heads", "2", "--n-layers", "3", "--no-s2s"])
    old = ap.parse_args(["--task", "copy", "--heads", "2", "--layers", "3", "--no-s2s"])
    assert vars(new) == vars(old)
    assert new.num_heads == 2 and new.n_layers == 3 and new.use_s2s is False
    assert ap.parse_args(["--task", "copy"]).use_s2s is True
    for name in ("heads", "layers", "no_s2s"):
        assert not hasattr(new, name)
    fields = {f.name for f in dataclasses.fields(NSTMConfig)}
    model_dests = {a.dest for g in ap._action_groups if g.title == "model" for a in g._group_actions}
    assert {"d_model", "n_layers", "num_heads", "num_states", "top_k", "comm_every", "conv_size", "use_s2s",
            "backend", "mlp_ratio"} <= model_dests & fields
    cfg = nstm_config(new, build_task("copy", seq_len=3, vocab_size=8))
    assert cfg == NSTMConfig(d_model=128, num_heads=2, num_states=32, top_k=4, comm_every=64, conv_size=4,
                             use_s2s=False, n_layers=3, mlp_ratio=4.0, vocab_size=8, tie_weights=True)


@pytest.mark.parametrize("task, extra, model, cls", [
    ("copy", ["--seq-len", "3", "--vocab", "8", "--no-s2s"], "nstm", "NSTMLM"),
    ("listops", ["--seq-len", "24", "--min-len", "8", "--max-depth", "3", "--pool", "last"], "nstm",
     "NSTMClassifier"),
    ("mqar", ["--num-pairs", "2", "--vocab", "8"], "transformer", "TransformerLM"),
])
def test_checkpoint_alone_rebuilds_the_model(tmp_path, task, extra, model, cls):
    from nstm.checkpoint import ModelSpec, load_model
    from nstm.config import NSTMConfig
    final = run(tmp_path, "--task", task, "--model", model, "--run-name", "r", *extra, steps=2)
    path = tmp_path / task / "r" / "ckpt.pt"
    ck = load_checkpoint(path)
    assert ck["model_class"] == cls
    cfg = NSTMConfig.from_dict(ck["model_config"])
    assert cfg.d_model == 16 and cfg.n_layers == 1 and cfg.num_heads == 2 and cfg.num_states == 4
    assert cfg.use_s2s == ("--no-s2s" not in extra)
    assert results(tmp_path, task, "r")["model_config"] == ck["model_config"]
    rebuilt = load_model(path)
    assert type(rebuilt).__name__ == cls
    if model == "nstm":
        assert rebuilt.config == cfg
    else:
        assert rebuilt.mlp_ratio == ck["model_kwargs"]["mlp_ratio"]
    saved = ck["model"]
    assert set(rebuilt.state_dict()) == set(saved)
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # the rebuilt model scores what the run's final evaluation scored
    t = build_task(task, **{"copy": dict(seq_len=3, vocab_size=8), "mqar": dict(num_pairs=2, vocab_size=8),
                            "listops": dict(seq_len=24, min_len=8, max_depth=3)}[task])
    assert t.evaluate(rebuilt, 4, 1)["loss"] == pytest.approx(final["loss"], rel=1e-6)
    assert ModelSpec.from_checkpoint(ck).build().state_dict().keys() == saved.keys()


def test_checkpoint_without_model_spec_cannot_rebuild(tmp_path):
    from nstm.checkpoint import ModelSpec, load_model
    from nstm.config import NSTMConfig
    save_checkpoint(tmp_path / "c.pt", _tiny_model(), None, None, 1, {"v": 1})
    with pytest.raises(CheckpointError, match="does not describe its model"):
        load_model(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="model_class"):
        ModelSpec("Nope", NSTMConfig())
    with pytest.raises(CheckpointError, match="invalid"):
        ModelSpec.from_checkpoint({"model_class": "NSTMLM", "model_config": {"d_modle": 8}})


def test_resume_a_checkpoint_with_the_old_flag_names(tmp_path, capsys):
    """Runs saved before the flags took the NSTMConfig names (heads, layers, no_s2s) still resume,
    and a changed setting is still caught."""
    from nstm.runs import upgrade_run_config
    args = ["--task", "copy", "--seq-len", "3", "--vocab", "8", "--run-name", "r", "--no-s2s"]
    run(tmp_path, *args, steps=1)
    path = tmp_path / "copy" / "r" / "ckpt.pt"
    ck = torch.load(path, weights_only=True)
    c = ck["config"]
    c["heads"], c["layers"], c["no_s2s"] = c.pop("num_heads"), c.pop("n_layers"), not c.pop("use_s2s")
    for key in ("model_config", "model_class", "model_kwargs"):
        del ck[key]
    torch.save(ck, path)
    up = upgrade_run_config(c)
    assert (up["num_heads"], up["n_layers"], up["use_s2s"]) == (2, 1, False)
    assert not {"heads", "layers", "no_s2s"} & set(up)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *args[:-1], "--resume", "auto", steps=3)     # s2s on now: a different model
    assert e.value.code == 2 and "use_s2s: checkpoint False vs now True" in capsys.readouterr().err
    final = run(tmp_path, *args, "--resume", "auto", steps=2)
    assert final["step"] == 2 and results(tmp_path, "copy", "r")["resumed_at_step"] == 1


# ---- the gates' starting values (--write-gate-bias, --importance-init, --s2s-gate-init) ----------
def _gates(model):
    from nstm.layer import NSTMLayer
    layers = [m for m in model.modules() if isinstance(m, NSTMLayer)]
    assert layers
    out = []
    for m in layers:
        H, S = m.router.num_heads, m.router.num_states
        out.append((m.router.bias[H * S:].detach().clone(), m.states.iota.detach().clone(),
                    None if m.s2s is None else m.s2s.gate.detach().clone(), m.states.init_importance))
    return out


def test_gate_init_flags_set_every_nstm_layer(tmp_path):
    from nstm.train import build_model, default_run_name, parse_args
    task = build_task("copy", seq_len=3, vocab_size=8)
    base = ["--task", "copy", "--seq-len", "3", "--vocab", "8", "--d-model", "16", "--num-heads", "2",
            "--n-layers", "2", "--num-states", "4", "--top-k", "2"]
    _, plain = parse_args(base)
    torch.manual_seed(0)
    for gate, iota, s2s, init_iota in _gates(build_model(plain, task)):   # the layer's own starts
        assert torch.equal(gate, torch.zeros(2)) and torch.equal(iota, torch.full((2, 4), 3.0))
        assert torch.equal(s2s, torch.full((2,), -8.0)) and init_iota == 3.0
    _, a = parse_args(base + ["--write-gate-bias", "-2", "--importance-init", "0.5", "--s2s-gate-init", "-6"])
    for gate, iota, s2s, init_iota in _gates(build_model(a, task)):
        assert torch.equal(gate, torch.full((2,), -2.0)) and torch.equal(iota, torch.full((2, 4), 0.5))
        assert torch.equal(s2s, torch.full((2,), -6.0)) and init_iota == 0.5
    name = default_run_name(a)
    assert all(part in name for part in ("wg-2", "imp0.5", "s2sg-6")), name
    assert not any(part in default_run_name(plain) for part in ("wg", "imp", "s2sg"))
    # the training CLI starts from them (checked after one step at a learning rate too small to move them)
    run(tmp_path, "--task", "copy", "--seq-len", "3", "--vocab", "8", "--run-name", "g", "--write-gate-bias", "-2",
        "--s2s-gate-init", "-6", "--lr", "1e-9", steps=1)
    saved = load_checkpoint(tmp_path / "copy" / "g" / "ckpt.pt")["model"]
    gates = [v for k, v in saved.items() if k.endswith("router.bias")]
    assert gates and all(torch.allclose(v[-2:], torch.full((2,), -2.0), atol=1e-6) for v in gates)
    s2s = [v for k, v in saved.items() if k.endswith("s2s.gate")]
    assert s2s and all(torch.allclose(v, torch.full_like(v, -6.0), atol=1e-6) for v in s2s)
    assert results(tmp_path, "copy", "g")["config"]["write_gate_bias"] == -2.0


@pytest.mark.parametrize("extra, message", [
    (["--model", "transformer", "--write-gate-bias", "1"], "--write-gate-bias sets an NSTM gate"),
    (["--model", "nstm-no-s2s", "--s2s-gate-init", "-6"], "--s2s-gate-init needs the s2s"),
    (["--model", "gsa", "--s2s-gate-init", "-6"], "--s2s-gate-init needs the s2s"),
    (["--no-s2s", "--s2s-gate-init", "-6"], "--s2s-gate-init needs the s2s"),
    (["--importance-init", "nan"], "--importance-init must be a finite number"),
    (["--write-gate-bias", "inf"], "--write-gate-bias must be a finite number"),
])
def test_gate_init_flags_refuse_what_has_no_such_gate(capsys, extra, message):
    from nstm.train import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--task", "copy", *extra])
    assert message in capsys.readouterr().err


def test_layer_init_gates_checks_its_values():
    from nstm import NSTMLayer
    layer = NSTMLayer(16, 2, num_states=4, top_k=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for bad in (dict(importance=float("nan")), dict(write_gate_bias="1"), dict(s2s_gate=True)):
        with pytest.raises(ValueError, match="finite number or None"):
            layer.init_gates(**bad)
    with pytest.raises(ValueError, match="without the s2s"):
        NSTMLayer(16, 2, num_states=4, top_k=2, use_s2s=False).init_gates(s2s_gate=-6)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())   # untouched
    assert layer.init_gates() is layer
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    layer.init_gates(importance=-1.0)
    revived = layer.states.revive()          # importance sigmoid(-1) < 0.5: every slot counts as dead
    assert revived == 8 and torch.equal(layer.states.iota, torch.full((2, 4), -1.0))
