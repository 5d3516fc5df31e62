"""The demo, the plots and the CPU benchmark run end to end and write what they promise."""
from __future__ import annotations

import json
import os
import sys

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


def test_cpu_bench_checks_then_times(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import cpu_paths
    out = tmp_path / "rows.json"
    rows = cpu_paths.main(["--T", "40", "--B", "1", "--H", "2", "--D", "8", "--top-k", "2", "--C", "16",
                           "--reps", "1", "--json", str(out)])
    assert len(rows) == 2 and all(r["rel_err"] < 1e-4 and r["chunked_ms"] > 0 for r in rows)
    assert len(json.loads(out.read_text())) == 2
