"""nstm-study: the config is checked before anything runs, runs are resumed and never repeated,
and the summary rows are what the run JSONs say (mean and spread over seeds at the best lr)."""
from __future__ import annotations

import json
import os
import statistics

import pytest

from nstm import study as S

TINY = """
[study]
out = "runs"
summary = "out/summary.json"
readme = "README.md"
seeds = [0, 1]
threads = 1

[defaults]
d-model = 16
n-layers = 1
num-heads = 2
num-states = 4
top-k = 2
batch-size = 4
eval-batches = 1
eval-every = 1
ckpt-every = 1

[[entry]]
task = "copy"
setting = "L=4"
flags = {task = "copy", seq-len = 4, steps = 2}
models = ["nstm", {name = "transformer", label = "tf"}]
lrs = [1e-3, 3e-3]
metrics = [{key = "L4/accuracy", metric = "accuracy"}, {key = "L8/accuracy", metric = "accuracy", setting = "2L"}]
bar = {model = "nstm", at_least = 0.99}
"""


def write(tmp_path, text, name="study.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("change, match", [
    (("lrs = [1e-3, 3e-3]", "lrs = []"), "lrs must be a non-empty list"),
    (('models = ["nstm"', 'models = ["lstm"'), "a model is one of"),
    (("d-model = 16", "d-modle = 16"), "'d-modle' is not an nstm-train flag"),
    (("d-model = 16", "lr = 0.1"), "set by the study"),
    (("seeds = [0, 1]", "seeds = []"), "seeds must be a non-empty list"),
    (('setting = "L=4"\n', ""), None),                     # no setting: allowed
    (('task = "copy"\nsetting', 'setting'), "missing 'task'"),
    (('bar = {model = "nstm", at_least = 0.99}', 'bar = {model = "nstm"}'), "bar is"),
    (("[defaults]", "[defualts]"), "unknown top-level table"),
    (('label = "tf"}', 'label = "tf", lrs = [0]}'), "model tf: lrs must be a non-empty list"),
    (('label = "tf"}', 'label = "tf", lr = 1e-3}'), r"unknown model keys \['lr'\]"),
    (('metric = "accuracy"}, {key', 'metric = 3}, {key'), "key and metric must be strings"),
    (('metric = "accuracy"}, {key', 'metric = "accuracy", lower_is_better = "false"}, {key'),
     "lower_is_better must be true or false"),
])
def test_config_errors_name_the_field(tmp_path, change, match):
    path = write(tmp_path, TINY.replace(*change))
    if match is None:
        assert S.load_config(path).entries[0].setting == ""
        return
    with pytest.raises(S.StudyError, match=match):
        S.load_config(path)


def test_config_runs_names_and_argv(tmp_path):
    st = S.load_config(write(tmp_path, TINY))
    runs = st.runs()
    assert len(runs) == 2 * 2 * 2 and len({r.name for r in runs}) == 8
    assert [r.seed for r in runs[:4]] == [0, 0, 0, 0]           # seed by seed: a partial study has every model
    assert runs[0].name == "copy-L-4-nstm-lr0.001-s0"
    argv = S.train_argv(st, runs[2])
    assert argv[argv.index("--model") + 1] == "transformer" and argv[argv.index("--lr") + 1] == "0.001"
    assert "--overwrite" in argv and "--resume" not in argv     # nothing to continue yet
    assert st.out == str(tmp_path / "runs") and st.summary == str(tmp_path / "out" / "summary.json")
    with pytest.raises(S.StudyError, match="does not exist"):
        S.load_config(str(tmp_path / "nope.toml"))
    # the same study as JSON
    import tomllib
    jpath = write(tmp_path, json.dumps(tomllib.loads(TINY)), "study.json")
    assert [r.name for r in S.load_config(jpath).runs()] == [r.name for r in runs]


def test_a_model_can_sweep_its_own_learning_rates(tmp_path):
    st = S.load_config(write(tmp_path, TINY.replace('label = "tf"}', 'label = "tf", lrs = [1e-2]}')))
    runs = st.runs()
    assert [(r.model.label, r.lr) for r in runs if r.seed == 0] == [("nstm", 1e-3), ("nstm", 3e-3), ("tf", 1e-2)]
    for r in runs:
        fake_result(st, r, 0.5 + r.seed / 10)
    rows = {(r["model"], r["setting"]): r for r in S.summarize(st)}
    assert rows[("tf", "L=4")]["lrs"] == [1e-2] and rows[("tf", "L=4")]["complete"]
    assert rows[("nstm", "L=4")]["lrs"] == [1e-3, 3e-3] and rows[("nstm", "L=4")]["complete"]


def test_a_loss_metric_is_lower_is_better_unless_told(tmp_path):
    loss = TINY.replace('{key = "L4/accuracy", metric = "accuracy"}', '{key = "val/loss", metric = "val_loss"}')
    assert S.load_config(write(tmp_path, loss)).entries[0].metrics[0].lower_is_better
    told = loss.replace('metric = "val_loss"}', 'metric = "val_loss", lower_is_better = false}')
    assert not S.load_config(write(tmp_path, told)).entries[0].metrics[0].lower_is_better
    assert not S.load_config(write(tmp_path, TINY)).entries[0].metrics[0].lower_is_better
    by_key = TINY.replace('{key = "L4/accuracy", metric = "accuracy"}', '{key = "val/loss", metric = "nll"}')
    assert S.load_config(write(tmp_path, by_key)).entries[0].metrics[0].lower_is_better


def fake_result(st, run, value, steps=10, seconds=3.0, status="completed", params=1000):
    path = S.run_json_path(st, run)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    r = {"schema": "nstm-train-results/1", "task": "copy", "model": run.model.name, "status": status,
         "config": {"seed": run.seed, "d_model": 16, "n_layers": 1, "num_heads": 2, "num_states": 4,
                    "conv_size": 4, "head_dim": None, "seq_len": 4},
         "task_info": {"length": 4}, "param_count": params, "steps_done": steps, "train_time_s": seconds,
         "wall_time_s": seconds + 1, "git_commit": "abcdef0123", "device_name": "CPU",
         "final": {"L4/accuracy": value, "L8/accuracy": value / 2},
         "history": {"eval": [{"step": 5, "L4/accuracy": value / 2}, {"step": 10, "L4/accuracy": value}]}}
    with open(path, "w") as f:
        json.dump(r, f)


def test_summary_picks_the_best_lr_by_the_mean_over_seeds(tmp_path):
    st = S.load_config(write(tmp_path, TINY))
    vals = {("nstm", 1e-3): [0.5, 0.7], ("nstm", 3e-3): [0.9, 0.2], ("tf", 1e-3): [1.0, 0.98], ("tf", 3e-3): [0.2, 0.4]}
    for r in st.runs():
        fake_result(st, r, vals[(r.model.label, r.lr)][r.seed])
    rows = S.summarize(st)
    assert {tuple(sorted(r)) for r in rows} == {tuple(sorted(S.SUMMARY_KEYS))}
    by = {(r["model"], r["setting"]): r for r in rows}
    nstm = by[("nstm", "L=4")]
    assert nstm["lr"] == 1e-3 and nstm["value"] == pytest.approx(0.6)     # 0.6 beats 0.55 (best seed 0.9)
    assert nstm["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert nstm["seeds"] == [0, 1] and nstm["complete"] and nstm["lrs"] == [1e-3, 3e-3]
    assert by[("nstm", "2L")]["value"] == pytest.approx(0.3)              # same runs, second metric
    assert nstm["bar_met"] is False and nstm["bar"] == ">= 0.99"
    assert by[("tf", "L=4")]["value"] == pytest.approx(0.99) and by[("tf", "L=4")]["bar"] is None
    # NSTM state: H S (K + V) + conv cache (w - 1) 3 H K; the Transformer's KV cache at 2L + 1 tokens
    assert nstm["state_elements"] == 2 * 4 * 2 * 8 + 3 * 3 * 2 * 8
    assert by[("tf", "L=4")]["state_elements"] == 2 * 9 * 16 and by[("tf", "2L")]["state_elements"] == 2 * 17 * 16
    assert nstm["cpu_minutes"] == pytest.approx(4 * 4.0 / 60, abs=0.01)   # the whole sweep: 4 runs
    assert nstm["commit"] == "abcdef0" and nstm["train_seconds"] == 3.0


def test_summary_of_a_partial_study_and_the_ratio_bar(tmp_path):
    text = TINY.replace('bar = {model = "nstm", at_least = 0.99}',
                        'bar = {model = "nstm", at_most_ratio = 1.02, of = "tf"}')
    text = text.replace('metrics = [{key = "L4/accuracy", metric = "accuracy"}',
                        'metrics = [{key = "L4/accuracy", metric = "val_loss", lower_is_better = true}')
    st = S.load_config(write(tmp_path, text))
    runs = st.runs()
    fake_result(st, runs[0], 1.0)                     # nstm lr 1e-3 seed 0
    fake_result(st, runs[1], 0.8)                     # nstm lr 3e-3 seed 0: lower is better
    fake_result(st, runs[2], 0.9)                     # tf lr 1e-3 seed 0
    fake_result(st, runs[3], 0.5, status="stopped")   # not finished: not counted
    rows = {(r["model"], r["setting"]): r for r in S.summarize(st)}
    nstm, tf = rows[("nstm", "L=4")], rows[("tf", "L=4")]
    assert nstm["lr"] == 3e-3 and nstm["value"] == 0.8 and nstm["std"] == 0.0 and not nstm["complete"]
    assert tf["value"] == 0.9 and tf["lrs"] == [1e-3]
    assert nstm["bar_met"] is True and nstm["bar"] == "<= 1.02 x tf"


def test_report_rewrites_only_its_section(tmp_path):
    st = S.load_config(write(tmp_path, TINY))
    (tmp_path / "README.md").write_text(f"# Mine\n\nkeep this\n\n{S.BEGIN}\nold\n{S.END}\n\nand this\n")
    for r in st.runs():
        fake_result(st, r, 0.5 + 0.1 * r.seed)
    rows = S.write_report(st)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# Mine\n\nkeep this\n") and text.rstrip().endswith("and this") and "old" not in text
    assert "| L=4 | nstm | accuracy | 55.00 ± 7.07 % | 0,1 |" in text and ">= 0.99: missed" in text
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == json.loads(json.dumps(rows))
    pytest.importorskip("matplotlib")
    assert (tmp_path / "runs" / "accuracy-vs-state.png").exists()
    assert (tmp_path / "runs" / "curves-copy-L-4.png").exists()


def test_study_runs_resumes_and_never_repeats_a_finished_run(tmp_path, monkeypatch):
    """Three real (two-step) trainings, then the rest; a run stopped half-way is continued."""
    monkeypatch.chdir(tmp_path)
    text = TINY.replace('models = ["nstm", {name = "transformer", label = "tf"}]', 'models = ["nstm"]')
    text = text.replace("seeds = [0, 1]", "seeds = [0]")
    path = write(tmp_path, text)
    st = S.load_config(path)
    assert S.main([path, "--max-runs", "1", "--no-progress"]) == 0
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {r["complete"] for r in rows} == {False} and rows[0]["lrs"] == [1e-3]
    # a run cut off after one step (as by a crash) is continued from its checkpoint
    second = st.runs()[1]
    argv = S.train_argv(st, second) + ["--stop-after", "1"]
    from nstm.train import main as train_main
    assert train_main(argv)["status"] == "stopped"
    assert "--resume" in S.train_argv(st, second)
    assert S.main([path, "--no-progress"]) == 0
    res = S.load_run(st, second)
    assert res["status"] == "completed" and res["resumed_at_step"] == 1 and res["steps_done"] == 2
    logs = {r.name: (tmp_path / "runs" / "logs" / f"{r.name}.log").read_text() for r in st.runs()}
    assert logs[st.runs()[0].name].count("\n# ") == 1                      # run once, never again
    assert S.main([path, "--no-progress"]) == 0                            # all done: nothing runs
    assert (tmp_path / "runs" / "logs" / f"{st.runs()[0].name}.log").read_text() == logs[st.runs()[0].name]
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {r["complete"] for r in rows} == {True} and rows[0]["steps"] == 2


def test_cli_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        S.main([str(tmp_path / "missing.toml")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    path = write(tmp_path, TINY)
    with pytest.raises(SystemExit) as e:
        S.main([path, "--only", "mqar"])
    assert e.value.code == 2 and "no entry of task" in capsys.readouterr().err
