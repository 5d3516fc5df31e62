"""The demo, the plots and the CPU benchmark run end to end and write what they promise."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from nstm import plots
from nstm.demo import main as demo_main

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_plots_write_pngs(tmp_path):
    idx = torch.randint(0, 8, (1, 20, 2, 2))
    w = torch.rand(1, 20, 2, 2)
    paths = [
        plots.routing_map(idx, w, 8, str(tmp_path / "r.png")),
        plots.slot_usage(torch.rand(2, 8), str(tmp_path / "u.png")),
        plots.importance(torch.rand(2, 8), str(tmp_path / "i.png"), after=torch.rand(2, 5), threshold=0.5),
        plots.s2s_maps(torch.rand(3, 1, 2, 8, 8), str(tmp_path / "s.png")),
        plots.curves({"step": [1, 2, 3], "loss": [3.0, 2.0, 1.5]}, str(tmp_path / "c.png")),
    ]
    for p in paths:
        assert _is_png(p)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp.png")]


def test_demo_runs_and_writes_outputs(tmp_path):
    out = tmp_path / "demo"
    summary = demo_main(["--steps", "3", "--batch", "4", "--out", str(out)])
    for name in ("routing_map.png", "slot_usage.png", "training.png"):
        assert _is_png(out / name)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["steps"] == 3 and 0.0 <= on_disk["accuracy"] <= 1.0
    assert summary["tokens_per_second"] > 0


def test_cpu_bench_checks_then_times_and_never_overwrites(tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    import cpu_paths
    out = tmp_path / "rows.json"
    out.write_text("[]\n")                    # a result that is already there (a tracked file, say)
    args = ["--T", "40", "--B", "1", "--H", "2", "--D", "8", "--top-k", "2", "--C", "16", "--reps", "1"]
    rows = cpu_paths.main(args + ["--json", str(out)])
    assert len(rows) == 2 and all(r["rel_err"] < 1e-4 and r["chunked_ms"] > 0 for r in rows)
    assert out.read_text() == "[]\n"          # left alone; the rows went to a new file, and it says so
    assert len(json.loads((tmp_path / "rows-2.json").read_text())) == 2
    assert f"wrote {tmp_path / 'rows-2.json'}" in capsys.readouterr().out
    cpu_paths.main(args + ["--out", str(tmp_path / "res")])
    [name] = os.listdir(tmp_path / "res")
    assert name.startswith("cpu-paths-") and name.endswith(".json")


def test_result_stems_take_the_next_free_name(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    import common
    assert common.result_stem(str(tmp_path / "new"), "x", [".json"]) == str(tmp_path / "new" / "x")
    (tmp_path / "x.md").write_text("")
    assert common.result_stem(str(tmp_path), "x", [".json", ".md"]) == str(tmp_path / "x-2")
    (tmp_path / "x-2.json").write_text("")
    assert common.result_stem(str(tmp_path), "x", [".json", ".md"]) == str(tmp_path / "x-3")
    assert common.new_path(str(tmp_path / "x.md")) == str(tmp_path / "x-2.md")
    assert common.new_path(str(tmp_path / "y.md")) == str(tmp_path / "y.md")


def test_curves_label_axes_draw_chance_and_refuse_misaligned_series(tmp_path):
    history = {"step": [1, 2, 3], "loss": [3.0, 2.0, 1.5], "accuracy": [0.1, None, 0.4]}
    assert _is_png(plots.curves(history, str(tmp_path / "c.png"), chance={"accuracy": 0.25}))
    with pytest.raises(ValueError, match="values for 3"):
        plots.curves({"step": [1, 2, 3], "eval_loss": [2.0]}, str(tmp_path / "bad.png"))


def _decode_rows():
    base = dict(section="decode", device="cpu", commit="abc", dtype="float32", batch=1)
    return [
        dict(base, model="nstm", mode="static", context=256, status="ok", latency_ms=2.0, tokens_per_s=500.0,
             how="prefill 256 tokens"),
        dict(base, model="nstm", mode="static", context=4096, status="ok", latency_ms=2.5, tokens_per_s=400.0,
             how="prefill 512 tokens, then pos set to 4096"),
        dict(base, model="transformer", mode="kv-cache", context=256, status="ok", latency_ms=1.0, tokens_per_s=1e3,
             how="prefill 256 tokens"),
        dict(base, model="transformer", mode="kv-cache", context=4096, status="OOM"),
    ]


def test_models_decode_plot_draws_measured_points_only(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import models
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    rows = _decode_rows()
    assert _is_png(models.plot(rows, dict(device="cpu", commit="abc", dtype="float32"), str(tmp_path / "d.png")))
    [ax] = figs[0].axes
    measured = {r["latency_ms"] for r in rows if r.get("status") == "ok"}
    ys = {float(y) for line in ax.lines if line.get_transform() == ax.transData for y in line.get_ydata()}
    assert ys == measured                      # the OOM row has no point at any latency
    labels = [t.get_text() for t in figs[0].legends[0].get_texts()]
    assert any(t.startswith("NSTM static: in-place") for t in labels)
    assert any("not run" in t for t in labels) and any("setting the position" in t for t in labels)


def test_models_cpu_summary_compares_nothing_unlike():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    import models
    meta = dict(device_type="cpu", device="cpu", commit="abc", torch="x", nstm_cfg={}, nstm_params=10,
                tf_cfg={}, tf_params=10, dtype="float32", steps=1, size="small")
    md = models.markdown(_decode_rows(), meta)
    assert "target" not in md.lower() and "15,000" not in md and "This CPU" in md


def test_operator_sweep_on_cpu_writes_table_json_and_plot(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    import sweep
    rows = sweep.main(["--device", "cpu", "--T", "32", "600", "--reps", "1", "--no-progress",
                       "--out", str(tmp_path)])
    by = {(r["method"], r["T"]): r for r in rows}
    assert set(by) == {(m, t) for m in ("nstm-chunked", "nstm-reference", "sdpa") for t in (32, 600)}
    for (m, t), r in by.items():
        if m == "nstm-reference" and t > sweep.REFERENCE_MAX_T:
            assert "not timed" in r["error"] and "fwd_ms" not in r
        else:
            assert "error" not in r, r
            assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["B"] == max(1, 2048 // t)
        assert r["device"] and r["commit"]
    md = next(tmp_path.glob("cpu-*-sweep.md")).read_text()
    assert "CPU sweep at small sizes" in md and "| nstm-chunked | 600 |" in md
    data = json.loads(next(tmp_path.glob("cpu-*-sweep.json")).read_text())
    assert len(data["rows"]) == 6 and data["meta"]["cfg"]["T"] == [32, 600]
    assert _is_png(next(tmp_path.glob("cpu-*-sweep.png")))


def test_sweep_flags_a_disagreeing_path(monkeypatch):
    """A fast path that disagrees with the chunked path is reported, not timed."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    import sweep
    real = sweep.nstm_fn

    def broken(backend, top_k, C):
        fn = real(backend if backend != "reference" else "chunked", top_k, C)
        return (lambda t, s: fn(t, s) * 1.01) if backend == "reference" else fn
    monkeypatch.setattr(sweep, "nstm_fn", broken)
    cfg = dict(sweep.CPU_CFG, T=[16], tokens=32, H=2, D=8, top_k=2, C=8)
    rows = sweep.run_sweep(torch.device("cpu"), cfg, ["nstm-chunked", "nstm-reference"], 1,
                           progress=False)
    bad = [r for r in rows if r["method"] == "nstm-reference"][0]
    assert "disagrees" in bad["error"] and "fwd_ms" not in bad


def test_flops_bench_counts_both_models_and_writes_table_json_and_plot(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    import flops
    assert flops.main(["--contexts", "64", "256", "--no-progress", "--out", str(tmp_path)]) == 0
    [path] = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    data = json.loads((tmp_path / path).read_text())
    rows = {(r["T"], r["model"]): r for r in data["rows"]}
    n64, n256 = rows[64, "nstm"], rows[256, "nstm"]
    t64, t256 = rows[64, "transformer"], rows[256, "transformer"]
    # NSTM's cost per token does not depend on T (C = 64 divides both); the Transformer's grows
    assert n64["analytic_fwd"] == n256["analytic_fwd"]
    assert abs(n64["counted_fwd"] - n256["counted_fwd"]) < 1e-6 * n64["counted_fwd"]
    assert t256["analytic_fwd"] > t64["analytic_fwd"] and t256["counted_fwd"] > t64["counted_fwd"]
    # the Transformer's attention is counted (the CPU SDPA kernel got a formula): 4 layers, full square
    d = data["meta"]["transformer"]["d_model"]
    assert abs(t256["counted_fwd"] - t64["counted_fwd"] - 4 * 4 * d * (256 - 64)) < 1.0
    for r in data["rows"]:
        assert 0.85 < r["counted_fwd"] / r["analytic_fwd"] < 1.5, r
        assert r["counted_train_no_conv_bwd"] > 2 * r["counted_fwd"]
    assert _is_png(tmp_path / path.replace(".json", ".png"))
    assert (tmp_path / path.replace(".json", ".md")).read_text().count("| nstm |") == 2


def test_cpu_operator_bench_writes_rows_for_every_path(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    import cpu as cpu_bench
    rows = cpu_bench.main(["--quick", "--no-contention", "--threads", "1", "--reps", "1",
                           "--no-plot", "--no-progress", "--out", str(tmp_path)])
    assert {r["impl"] for r in rows} == {"nstm", "nstm-units", "nstm-torch", "sdpa"}
    assert all(0 < r["cores"] < 64 for r in rows)
    assert all(r["threads"] == 1 and r["neighbour"] == "alone" and r["ms"] > 0 for r in rows)
    assert all(r["gflops"] > 0 for r in rows if r["impl"] != "sdpa")
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith("-quick.json") and files[1].endswith("-quick.md")
    md = (tmp_path / files[1]).read_text()
    assert "| 512 | 1 | fwd | 1 | alone |" in md
    assert json.loads((tmp_path / files[0]).read_text()) == rows


def test_cpu_bench_neighbour_is_ended_by_its_pid():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    import cpu as cpu_bench
    with cpu_bench.Neighbour("busy") as n:
        pid = n.proc.pid
        assert n.proc.poll() is None          # running
    assert n.proc.poll() is not None          # ended
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
