"""nstm-train under torchrun: 2 CPU processes (gloo) train what 1 process with the same global
batch trains (DDP and FSDP2, with a resume under torchrun), and only rank 0 writes files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nstm.checkpoint import load_checkpoint, load_model
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow

ARGS = ["--task", "mqar", "--num-pairs", "3", "--vocab", "16", "--d-model", "16", "--n-layers", "2",
        "--num-heads", "2", "--num-states", "4", "--top-k", "2", "--comm-every", "8", "--batch-size", "4",
        "--eval-batches", "1", "--log-every", "1", "--no-progress", "--lr", "3e-3", "--run-name", "r"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", NSTM_PROGRESS="0", PYTHONPATH=REPO_ROOT)
    return env


def two_processes(out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nstm.train", *ARGS, "--out", str(out), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=_env())
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p


def one_process(out, *extra):
    cmd = [sys.executable, "-m", "nstm.train", *ARGS, "--grad-accum", "2", "--out", str(out), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=_env())
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]


def _results(out):
    files = sorted(os.listdir(out / "mqar"))
    assert files == ["r", "r.json", "r.png"], files            # one results file, one run folder
    assert os.listdir(out / "mqar" / "r") == ["ckpt.pt"]
    return json.loads((out / "mqar" / "r.json").read_text())


def _same_training(a, b):
    la = [h["loss"] for h in a["history"]["train"]]
    lb = [h["loss"] for h in b["history"]["train"]]
    assert len(la) == len(lb) == a["steps_done"]
    assert la == pytest.approx(lb, rel=1e-5)      # gloo's all-reduce adds in another order
    assert a["final"]["loss"] == pytest.approx(b["final"]["loss"], rel=1e-5)
    assert a["tokens_seen"] == b["tokens_seen"]


def _same_weights(pa, pb):
    ma, mb = load_model(pa), load_model(pb)            # both load in one process
    for (n, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), n


def test_ddp_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    p = two_processes(tmp_path / "two", "--steps", "4")
    assert p.stderr.count("completed at step 4") == 1                   # rank 0 alone reports
    one_process(tmp_path / "one", "--steps", "4")
    two, one = _results(tmp_path / "two"), _results(tmp_path / "one")
    assert two["resolved"]["processes"] == 2 and two["resolved"]["parallel"] == "ddp"
    assert two["resolved"]["global_batch"] == one["resolved"]["global_batch"] == 8
    _same_training(two, one)
    _same_weights(tmp_path / "two/mqar/r/ckpt.pt", tmp_path / "one/mqar/r/ckpt.pt")
    assert len(load_checkpoint(tmp_path / "two/mqar/r/ckpt.pt")["extra"]["data_rngs"]) == 2


def test_fsdp_two_processes_resume_under_torchrun_and_load_in_one(tmp_path):
    two_processes(tmp_path / "two", "--steps", "6", "--fsdp", "--stop-after", "3")
    two_processes(tmp_path / "two", "--steps", "6", "--fsdp", "--resume", "auto")
    one_process(tmp_path / "one", "--steps", "6")
    two, one = _results(tmp_path / "two"), _results(tmp_path / "one")
    assert two["resolved"]["parallel"] == "fsdp2" and two["resumed_at_step"] == 3
    _same_training(two, one)
    _same_weights(tmp_path / "two/mqar/r/ckpt.pt", tmp_path / "one/mqar/r/ckpt.pt")


def test_resume_with_another_number_of_streams_is_refused(tmp_path):
    one_process(tmp_path / "one", "--steps", "3", "--stop-after", "2")
    cmd = [sys.executable, "-m", "nstm.train", *ARGS, "--out", str(tmp_path / "one"), "--steps", "3",
           "--resume", "auto"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=_env())
    assert p.returncode == 2 and "grad_accum" in p.stderr


def test_fsdp_needs_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "nstm.train", *ARGS, "--out", str(tmp_path), "--steps", "2", "--fsdp"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=_env())
    assert p.returncode == 2 and "torchrun" in p.stderr and not (tmp_path / "mqar").exists()
