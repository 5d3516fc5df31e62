"""nstm.results turns run JSONs into README tables (two tiny fake runs, no training)."""
from __future__ import annotations

import json

from nstm import results


def _run(tmp_path, task, name, model, final, **extra):
    config = {"d_model": 64, "layers": 2, "heads": 4, "num_states": 8, "top_k": 2, "steps": 100,
              "seq_len": None, "eval_batches": 8}
    r = {"schema": results.SCHEMA, "task": task, "model": model, "run_name": name, "config": config,
         "task_info": {"num_pairs": 16, "vocab_size": 64}, "resolved": {"eval_batch_size": 32},
         "param_count": 1234, "steps_done": 100, "status": "completed", "train_time_s": 120.0,
         "final": final, **extra}
    (tmp_path / task).mkdir(exist_ok=True)
    (tmp_path / task / f"{name}.json").write_text(json.dumps(r))


def test_tables_from_run_jsons(tmp_path, capsys):
    _run(tmp_path, "mqar", "a-nstm", "nstm", {"accuracy": 0.5, "exact": 0.25},
         maps={"prune": {"threshold": 0.9, "slots": [{"before": 8, "after": 4}], "loss_before": 1.0,
                         "loss_after": 1.5, "metric": "accuracy", "metric_before": 0.5, "metric_after": 0.4,
                         "params_before": 1234, "params_after": 1000, "forward_ms_before": 2.0,
                         "forward_ms_after": 1.0, "speedup": 2.0}})
    _run(tmp_path, "mqar", "b-tf", "transformer", {"accuracy": 0.98765, "exact": 0.5})
    (tmp_path / "mqar" / "not-a-run.json").write_text("{}")          # other JSONs are skipped
    (tmp_path / "README.md").write_text(f"intro\n{results.BEGIN}\nSTALE-TABLE\n{results.END}\noutro\n")

    assert results.main([str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("intro\n") and text.endswith(f"{results.END}\noutro\n") and "STALE-TABLE" not in text
    assert "[a-nstm](mqar/a-nstm.json)" in text and "[b-tf](mqar/b-tf.json)" in text
    assert "50.00 %" in text and "98.77 %" in text
    assert "| 1,024 |" in text                       # NSTM state: 4 heads * 8 slots * (16 + 16)
    assert "| 8,192 |" in text                       # Transformer KV cache: 2 * T(=4*16) * 64
    assert "8→4" in text and "2.00×" in text         # the pruning table
    assert "### MQAR" in capsys.readouterr().out


def test_no_runs(tmp_path):
    assert results.main([str(tmp_path), "--stdout"]) == 1


def test_run_jsons_with_the_nstm_config_names():
    """JSONs written since the flags took the NSTMConfig names (num_heads, n_layers) read the same
    as the older ones (heads, layers)."""
    old = {"model": "nstm", "config": {"d_model": 64, "layers": 2, "heads": 4, "num_states": 8, "top_k": 2}}
    new = {"model": "nstm", "config": {"d_model": 64, "n_layers": 2, "num_heads": 4, "num_states": 8, "top_k": 2}}
    assert results.state_elements(old) == results.state_elements(new) == 4 * 8 * 2 * 16
    assert results._model(old) == results._model(new) == "nstm d64 l2 S8 k2"
