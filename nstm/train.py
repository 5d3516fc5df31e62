"""Train an NSTM model or its Transformer baseline on one task; write metrics, curves and checkpoints.

    python -m nstm.train --task mqar --model nstm --steps 2000
    python -m nstm.train --task copy --model transformer --seq-len 32 --steps 1000
    python -m nstm.train --task smnist --d-model 128 --layers 4 --maps --time-budget 3600
    python -m nstm.train --task mqar --steps 4000 --resume auto          # continue the same run

Each run writes, under ``--out`` (default ``results``):

* ``<task>/<run>.json``: config, metrics history, final metrics, device, git commit, torch version,
  parameter count, wall time (rewritten atomically after every evaluation);
* ``<task>/<run>.png``: loss and metric curves;
* ``<task>/<run>/ckpt.pt``: the checkpoint (``--resume auto`` continues from it);
* ``<task>/<run>/maps/*.png`` with ``--maps`` (NSTM): routing heatmaps, slot usage, slot importance
  before/after pruning, state-to-state attention maps; the JSON then records the loss before and
  after ``prune(--prune-threshold)`` and the forward speed-up.

The run name defaults to ``<model>-d<width>-l<layers>-s<seed>``. ``--model transformer`` keeps the
NSTM width and depth and (by default) picks the MLP ratio so that the parameter count matches the
NSTM model with the same flags within 10% (``--no-match-params`` keeps ``--mlp-ratio``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, check_resume_config, load_checkpoint, save_checkpoint
from .tasks.registry import TASKS, Task, build_task

SCHEMA = "nstm-train-results/1"

# Settings that may change when a run is resumed (they do not change what is being trained).
RESUME_MAY_CHANGE = ("steps", "time_budget", "eval_every", "eval_batches", "eval_batch_size",
                     "eval_contexts", "ckpt_every", "log_every", "resume", "out", "device", "amp",
                     "maps", "prune_threshold", "no_progress", "data_root", "data_path", "backend",
                     "stop_after", "run_name")


# ---- arguments ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    tasks = "\n".join(f"  {n:12s} {s.description}" for n, s in TASKS.items())
    ap = argparse.ArgumentParser(
        prog="nstm-train", description=__doc__.split("\n\n")[0],
        epilog="tasks:\n" + tasks, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("task")
    g.add_argument("--task", required=True, choices=list(TASKS), metavar="TASK",
                   help="one of: " + ", ".join(TASKS))
    g.add_argument("--seq-len", type=int, default=None,
                   help="copy: length L (32); passkey: training context (1024, at most 2048); listops: "
                        "max length (2000); shakespeare/wikitext2: context (256); lra-listops: truncation (2000)")
    g.add_argument("--vocab", type=int, default=None, help="copy (16) / mqar (64) vocabulary size")
    g.add_argument("--num-pairs", type=int, default=None, help="mqar key-value pairs (8)")
    g.add_argument("--min-len", type=int, default=None, help="listops minimum length (seq-len / 4)")
    g.add_argument("--max-depth", type=int, default=None, help="listops maximum nesting depth (10)")
    g.add_argument("--eval-contexts", type=str, default=None,
                   help="passkey: comma-separated evaluation contexts (default L,4L,16L)")
    g.add_argument("--data-root", default="data", help="where downloadable data sets are cached (smnist, "
                   "psmnist, shakespeare)")
    g.add_argument("--data-path", default=None, help="local copy of the data set for lra-listops, cifar10, wikitext2")

    g = ap.add_argument_group("model")
    g.add_argument("--model", choices=["nstm", "transformer"], default="nstm")
    g.add_argument("--d-model", type=int, default=128)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--num-states", type=int, default=32, help="NSTM slots per head")
    g.add_argument("--top-k", type=int, default=4, help="NSTM slots written per token")
    g.add_argument("--comm-every", type=int, default=64, help="NSTM state-to-state period")
    g.add_argument("--conv-size", type=int, default=4, help="NSTM short conv width (0: none)")
    g.add_argument("--no-s2s", action="store_true", help="NSTM without state-to-state attention")
    g.add_argument("--backend", default=None, help="NSTM operator backend (default: fastest for the device)")
    g.add_argument("--mlp-ratio", type=float, default=4.0)
    g.add_argument("--match-params", action=argparse.BooleanOptionalAction, default=True,
                   help="transformer: choose the MLP ratio to match the NSTM parameter count (default on)")
    g.add_argument("--pool", choices=["mean", "last"], default="mean", help="classifier pooling")

    g = ap.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default min(200, steps/10))")
    g.add_argument("--min-lr", type=float, default=None, help="cosine floor (default lr / 10)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--aux-weight", type=float, default=0.01, help="NSTM load-balancing loss weight")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                   help="autocast: auto = bf16 on CUDA (fp16 without bf16 support), none on CPU")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=0)

    g = ap.add_argument_group("evaluation, checkpoints, output")
    g.add_argument("--eval-every", type=int, default=200, help="steps between evaluations (0: only at the end)")
    g.add_argument("--eval-batches", type=int, default=8,
                   help="batches per evaluation set (0: the whole split; data-backed tasks only)")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    g.add_argument("--log-every", type=int, default=10, help="steps per history entry")
    g.add_argument("--ckpt-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--out", default="results", help="results directory")
    g.add_argument("--run-name", default=None, help="default <model>-d<width>-l<layers>-s<seed>")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="checkpoint (file or run directory) to continue from; auto: this run's checkpoint if any")
    g.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop cleanly (evaluate, checkpoint, write results) after this much wall time")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop cleanly after N steps in this session (the schedule still spans --steps; "
                        "continue with --resume)")
    g.add_argument("--maps", action="store_true", help="NSTM: write interpretability PNGs and a pruning report")
    g.add_argument("--prune-threshold", type=float, default=0.5, help="importance threshold for --maps pruning")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _validate(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    def positive(name, value, low=1):
        if value is not None and value < low:
            ap.error(f"--{name} must be >= {low}, got {value}")

    for name in ("steps", "batch_size", "d_model", "layers", "heads", "num_states", "top_k", "comm_every",
                 "log_every", "eval_batch_size", "stop_after"):
        positive(name.replace("_", "-"), getattr(a, name))
    for name in ("eval_every", "eval_batches", "ckpt_every", "conv_size", "warmup"):
        positive(name.replace("_", "-"), getattr(a, name), 0)
    for name in ("seq_len", "vocab", "num_pairs", "min_len", "max_depth"):
        positive(name.replace("_", "-"), getattr(a, name))
    if a.d_model % a.heads:
        ap.error(f"--d-model ({a.d_model}) must be divisible by --heads ({a.heads})")
    if (a.d_model // a.heads) % 2 and a.model == "transformer":
        ap.error(f"rotary positions need an even head size; --d-model / --heads = {a.d_model // a.heads}")
    if a.top_k > a.num_states:
        ap.error(f"--top-k ({a.top_k}) must be <= --num-states ({a.num_states})")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        ap.error(f"--lr must be a positive number, got {a.lr}")
    if a.min_lr is not None and not 0 <= a.min_lr <= a.lr:
        ap.error(f"--min-lr must be in [0, --lr], got {a.min_lr}")
    if a.weight_decay < 0:
        ap.error(f"--weight-decay must be >= 0, got {a.weight_decay}")
    if a.grad_clip < 0:
        ap.error(f"--grad-clip must be >= 0 (0 disables clipping), got {a.grad_clip}")
    if a.aux_weight < 0:
        ap.error(f"--aux-weight must be >= 0, got {a.aux_weight}")
    if not a.mlp_ratio > 0:
        ap.error(f"--mlp-ratio must be > 0, got {a.mlp_ratio}")
    if a.time_budget is not None and not a.time_budget > 0:
        ap.error(f"--time-budget must be > 0 seconds, got {a.time_budget}")
    if not 0 <= a.prune_threshold <= 1:
        ap.error(f"--prune-threshold must be in [0, 1], got {a.prune_threshold}")
    if a.maps and a.model != "nstm":
        ap.error("--maps draws NSTM routing and slot maps: it needs --model nstm")
    if a.eval_contexts is not None:
        try:
            ctx = [int(c) for c in a.eval_contexts.split(",") if c.strip()]
        except ValueError:
            ap.error(f"--eval-contexts must be comma-separated integers, got {a.eval_contexts!r}")
        if not ctx or min(ctx) < 1:
            ap.error(f"--eval-contexts must be positive integers, got {a.eval_contexts!r}")
    if TASKS[a.task].options and "data_path" in TASKS[a.task].options and not a.data_path:
        ap.error(f"--task {a.task} reads a local copy of its data set: give --data-path")
    if a.data_path is not None and not os.path.exists(a.data_path):
        ap.error(f"--data-path {a.data_path} does not exist")
    if a.eval_batches == 0 and a.task in ("copy", "mqar", "passkey", "listops"):
        ap.error(f"--eval-batches 0 (whole split) needs a data-backed task; {a.task} draws its evaluation data")
    if a.run_name is not None and (not a.run_name or os.sep in a.run_name or a.run_name in (".", "..")):
        ap.error(f"--run-name must be a plain file name, got {a.run_name!r}")
    # device and precision
    if a.device != "auto":
        try:
            dev = torch.device(a.device)
        except (RuntimeError, ValueError):
            ap.error(f"--device {a.device!r} is not a torch device (auto, cpu, cuda, cuda:N)")
        if dev.type == "cuda" and not torch.cuda.is_available():
            ap.error("--device cuda was asked for but CUDA is not available")
        if dev.type not in ("cpu", "cuda"):
            ap.error(f"--device must be cpu or cuda, got {a.device!r}")
    device = _device(a)
    if a.amp == "fp16" and device.type != "cuda":
        ap.error("--amp fp16 needs a CUDA device (use bf16 or none on the CPU)")


def _device(a) -> torch.device:
    if a.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(a.device)


def _amp_dtype(a, device) -> Optional[torch.dtype]:
    if a.amp == "none" or (a.amp == "auto" and device.type != "cuda"):
        return None
    if a.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if a.amp == "bf16" else torch.float16


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    _validate(ap, args)
    return ap, args


# ---- model, optimiser, schedule ----------------------------------------------------------------
def _nstm_kwargs(a) -> Dict:
    return dict(d_model=a.d_model, n_layers=a.layers, num_heads=a.heads, num_states=a.num_states,
                top_k=a.top_k, comm_every=a.comm_every, conv_size=a.conv_size, mlp_ratio=a.mlp_ratio,
                use_s2s=not a.no_s2s, backend=a.backend)


def build_model(a, task: Task) -> nn.Module:
    """The model the flags describe, for ``task`` (an LM or a classifier)."""
    from .baseline import TransformerClassifier, TransformerLM, matched_transformer_config
    from .models import NSTMClassifier, NSTMLM

    if task.kind == "lm":
        def nstm():
            return NSTMLM(task.vocab_size, **_nstm_kwargs(a))
    else:
        inputs = dict(input_dim=task.input_dim) if task.input_dim is not None else dict(vocab_size=task.vocab_size)

        def nstm():
            return NSTMClassifier(task.num_classes, **inputs, pool=a.pool, **_nstm_kwargs(a))
    if a.model == "nstm":
        return nstm()
    if a.match_params:
        with torch.device("meta"):
            cfg = matched_transformer_config(nstm())
    elif task.kind == "lm":
        cfg = dict(vocab_size=task.vocab_size, d_model=a.d_model, n_layers=a.layers, num_heads=a.heads,
                   mlp_ratio=a.mlp_ratio)
    else:
        cfg = dict(num_classes=task.num_classes, **inputs, d_model=a.d_model, n_layers=a.layers,
                   num_heads=a.heads, mlp_ratio=a.mlp_ratio, pool=a.pool)
    return TransformerLM(**cfg) if task.kind == "lm" else TransformerClassifier(**cfg)


def build_optimizer(model: nn.Module, a, device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases, slot importances or initial memories)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and ".states." not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), **kw)


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``steps``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# ---- small utilities ---------------------------------------------------------------------------
def git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _plain(x):
    """JSON-safe copy: NaN/inf become None, tensors become numbers or lists."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _plain(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json_atomic(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(_plain(obj), f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot_curves(history: Dict[str, List[Dict]], metric: str, path: str, title: str) -> str:
    """Two panels: training and evaluation loss; training accuracy and the evaluation metric."""
    from . import plots
    plt = plots._plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    tr, ev = history["train"], history["eval"]
    if tr:
        ax1.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train")
    if ev:
        ax1.plot([r["step"] for r in ev], [r["loss"] for r in ev], marker="o", label="eval")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    acc = [r for r in tr if r.get("accuracy") is not None]
    if metric == "accuracy" and acc:
        ax2.plot([r["step"] for r in acc], [r["accuracy"] for r in acc], label="train")
    if ev:
        sets = [k[: -len(metric) - 1] for k in ev[0] if k.endswith("/" + metric)]
        for name in sets if len(sets) > 1 else []:
            ax2.plot([r["step"] for r in ev], [r.get(f"{name}/{metric}") for r in ev], marker="o",
                     label=f"eval {name}")
        if len(sets) <= 1 and metric in ev[0]:
            ax2.plot([r["step"] for r in ev], [r[metric] for r in ev], marker="o", label="eval")
    ax2.set_xlabel("step")
    ax2.set_ylabel(metric)
    ax2.legend(fontsize=7)
    fig.suptitle(title)
    return plots._save(fig, path)


def _time_forwards(models, task: Task, batch, autocast, repeats: int = 7) -> List[float]:
    """Median wall time (ms) of one evaluation forward of each model, timed in alternation so that
    machine noise hits all of them alike."""
    sync = torch.cuda.synchronize if batch.inputs.is_cuda else (lambda: None)
    times: List[List[float]] = [[] for _ in models]
    for m in models:
        m.eval()
    with torch.no_grad():
        for i in range(repeats + 1):
            for j, m in enumerate(models):
                sync()
                t0 = time.perf_counter()
                with autocast():
                    task.logits(m, batch)
                sync()
                if i:                          # the first round warms up
                    times[j].append((time.perf_counter() - t0) * 1e3)
    return [sorted(t)[len(t) // 2] for t in times]


# ---- interpretability maps and pruning ---------------------------------------------------------
def write_maps(model, a, task: Task, run_dir: str, device, autocast, eval_bs: int, final: Dict) -> Dict:
    """Routing heatmaps, slot usage, s2s maps and importance before/after pruning a copy of the model;
    returns what was written and the pruning report (loss and speed before/after)."""
    from . import plots

    maps_dir = os.path.join(run_dir, "maps")
    first_set = next(iter(task.eval_batches(eval_bs, 1).values()))
    batch = next(iter(first_set)).to(device)
    one = type(batch)(batch.inputs[:1], batch.targets[:1], None if batch.lengths is None else batch.lengths[:1])
    if one.lengths is not None:          # drop the padding of the plotted sequence
        n = int(one.lengths[0])
        one = type(one)(one.inputs[:, :n], one.targets, one.lengths)
    model.eval()
    with torch.no_grad():
        if task.kind == "lm":
            _, maps = model(one.inputs, return_maps=True)
        else:
            _, maps = model(one.inputs, return_maps=True, lengths=one.lengths)
    files = []
    layers = model.nstm_layers()
    for i, (layer, m) in enumerate(zip(layers, maps)):
        files.append(plots.routing_map(m["indices"], m["weights"], layer.num_states,
                                       os.path.join(maps_dir, f"routing_layer{i}.png"),
                                       title=f"{task.name}: layer {i} routing on one sequence (write weight per slot)"))
        files.append(plots.slot_usage(layer.states.usage, os.path.join(maps_dir, f"slot_usage_layer{i}.png"),
                                      title=f"{task.name}: layer {i} slot usage over training"))
        s2s = m.get("s2s")
        if s2s is not None and s2s.shape[0] > 0:
            files.append(plots.s2s_maps(s2s, os.path.join(maps_dir, f"s2s_layer{i}.png"),
                                        title=f"{task.name}: layer {i} state-to-state attention (last period)"))
    before_imp = [layer.states.importance().detach().cpu() for layer in layers]

    # prune a fresh copy (deepcopy would share the router back-references of the original)
    clone = build_model(a, task).to(device)
    clone.load_state_dict(model.state_dict())
    params_before = sum(p.numel() for p in clone.parameters())
    reports = clone.prune_states(a.prune_threshold)
    params_after = sum(p.numel() for p in clone.parameters())
    ms_before, ms_after = _time_forwards([model, clone], task, batch, autocast)
    after = task.evaluate(clone, eval_bs, a.eval_batches, device, autocast)
    for i, (layer, imp) in enumerate(zip(clone.nstm_layers(), before_imp)):
        files.append(plots.importance(imp, os.path.join(maps_dir, f"importance_layer{i}.png"),
                                      after=layer.states.importance().detach().cpu(),
                                      threshold=a.prune_threshold,
                                      title=f"{task.name}: layer {i} slot importance before/after pruning"))
    metric = task.metric
    prune = {
        "threshold": a.prune_threshold,
        "slots": [{"before": r.old_num_states, "after": r.new_num_states} for r in reports],
        "loss_before": final.get("loss"), "loss_after": after.get("loss"),
        "metric": metric, "metric_before": final.get(metric), "metric_after": after.get(metric),
        "params_before": params_before, "params_after": params_after,
        "forward_ms_before": ms_before, "forward_ms_after": ms_after,
        "speedup": ms_before / ms_after if ms_after > 0 else None,
        "eval_after": after,
    }
    return {"files": [os.path.relpath(f, os.path.dirname(run_dir)) for f in files], "prune": prune}


# ---- the run -----------------------------------------------------------------------------------
def _resolve_resume(ap, a, ckpt_path: str) -> Optional[str]:
    if a.resume is None:
        return None
    if a.resume == "auto":
        return ckpt_path if os.path.isfile(ckpt_path) else None
    path = a.resume
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        ap.error(f"--resume: no checkpoint at {path}")
    return path


def main(argv: Optional[List[str]] = None) -> Dict:
    """Run the CLI; returns the final metrics dict (also written to ``<out>/<task>/<run>.json``)."""
    wall0 = time.perf_counter()
    ap, a = parse_args(argv)
    device = _device(a)
    amp_dtype = _amp_dtype(a, device)
    if amp_dtype is None:
        autocast = contextlib.nullcontext
    else:
        def autocast():
            return torch.autocast(device.type, dtype=amp_dtype)
    if a.warmup is not None and a.warmup >= a.steps:
        ap.error(f"--warmup ({a.warmup}) must be < --steps ({a.steps})")
    warmup = min(200, a.steps // 10) if a.warmup is None else a.warmup
    min_lr = a.lr / 10 if a.min_lr is None else a.min_lr
    eval_bs = a.eval_batch_size or a.batch_size
    run_name = a.run_name or f"{a.model}-d{a.d_model}-l{a.layers}-s{a.seed}"
    task_dir = os.path.join(a.out, a.task)
    run_dir = os.path.join(task_dir, run_name)
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    json_path = os.path.join(task_dir, run_name + ".json")
    png_path = os.path.join(task_dir, run_name + ".png")
    config = {k: v for k, v in vars(a).items()}

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        ap.error("the training CLI needs tqdm: pip install 'nstm-kernels[tools]'")

    torch.manual_seed(a.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(a.seed)
    try:
        task = build_task(a.task, seq_len=a.seq_len, vocab_size=a.vocab, num_pairs=a.num_pairs,
                          min_len=a.min_len, max_depth=a.max_depth,
                          eval_contexts=[int(c) for c in a.eval_contexts.split(",") if c.strip()]
                          if a.eval_contexts else None,
                          data_root=a.data_root, data_path=a.data_path)
    except (ValueError, ImportError, OSError, RuntimeError) as e:   # bad options, missing data
        ap.error(f"--task {a.task}: {e}")
    try:
        model = build_model(a, task).to(device)
    except ValueError as e:
        ap.error(f"model: {e}")
    is_nstm = a.model == "nstm"
    n_params = sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, a, device)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, a.steps, warmup, min_lr / a.lr))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    gen = torch.Generator().manual_seed(a.seed)
    history: Dict[str, List[Dict]] = {"train": [], "eval": []}
    window = {"loss": 0.0, "acc": 0.0, "acc_n": 0, "aux": 0.0, "n": 0, "tokens": 0, "time": 0.0}
    step, prior_train_time, prior_tokens = 0, 0.0, 0

    resume_path = _resolve_resume(ap, a, ckpt_path)
    if resume_path is not None:
        try:
            ckpt = load_checkpoint(resume_path, map_location="cpu")
            check_resume_config(ckpt["config"], config, ignore=RESUME_MAY_CHANGE)
        except CheckpointError as e:
            ap.error(f"--resume: {e}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        ex = ckpt["extra"]
        gen.set_state(ex["data_rng"])
        torch.set_rng_state(ex["torch_rng"])
        if device.type == "cuda" and ex.get("cuda_rng"):
            torch.cuda.set_rng_state_all(ex["cuda_rng"])
        if scaler is not None and ex.get("scaler"):
            scaler.load_state_dict(ex["scaler"])
        history = ex["history"]
        window = ex["window"]
        step = ckpt["step"]
        prior_train_time, prior_tokens = ex["train_time_s"], ex["tokens"]

    results = {
        "schema": SCHEMA, "task": a.task, "model": a.model, "run_name": run_name, "config": config,
        "resolved": {"warmup": warmup, "min_lr": min_lr, "eval_batch_size": eval_bs,
                     "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
                     "device": str(device)},
        "task_info": task.info, "metric": task.metric, "higher_is_better": task.higher_is_better,
        "param_count": n_params, "device_name": device_name(device), "git_commit": git_commit(),
        "torch_version": str(torch.__version__), "python_version": platform.python_version(),
        "resumed_from": resume_path, "resumed_at_step": step if resume_path else None,
        "checkpoint": ckpt_path,
    }
    if a.model == "transformer":
        results["transformer_mlp_ratio"] = model.mlp_ratio

    def save_ckpt():
        save_checkpoint(ckpt_path, model, opt, sched, step, config, extra={
            "data_rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            "scaler": scaler.state_dict() if scaler is not None else {},
            "history": history, "window": window, "train_time_s": train_time(), "tokens": tokens,
            "task_state": task.state, "run_name": run_name,
        })

    session_t0 = time.perf_counter()
    session_start_step = step
    tokens = prior_tokens
    train_clock = [0.0]                 # training time of this session (excludes evaluation)

    def train_time():
        return prior_train_time + train_clock[0]

    def evaluate():
        m = task.evaluate(model, eval_bs, a.eval_batches, device, autocast)
        history["eval"].append({"step": step, **m})
        return m

    def write_results(final, status):
        results.update(history=history, final=final, status=status, steps_done=step,
                       train_time_s=train_time(), wall_time_s=time.perf_counter() - wall0,
                       tokens_seen=tokens,
                       tokens_per_s=tokens / train_time() if train_time() > 0 else None)
        write_json_atomic(json_path, results)

    print(f"{a.model} {n_params / 1e6:.3f}M params | task {a.task} ({task.kind}, metric {task.metric}) | "
          f"{device_name(device)}, amp {results['resolved']['amp']} | run {json_path}"
          + (f" | resumed at step {step}" if resume_path else ""), file=sys.stderr)

    status = "completed"
    bar = tqdm(total=a.steps, initial=step, desc=f"{a.task}/{a.model}", unit="step", dynamic_ncols=True,
               mininterval=1.0, disable=a.no_progress, file=sys.stderr)
    last_eval: Optional[Dict] = None
    model.train()
    try:
        while step < a.steps:
            t0 = time.perf_counter()
            batch = task.train_batch(a.batch_size, gen).to(device)
            with autocast():
                loss, logits = task.loss(model, batch)
                aux = model.aux_loss if is_nstm and a.aux_weight > 0 else None
                total = loss + a.aux_weight * aux if aux is not None else loss
            if not torch.isfinite(loss):
                status = f"diverged (loss {loss.item()} at step {step + 1})"
                break
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(total).backward()
                scaler.unscale_(opt)
            else:
                total.backward()
            if a.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            step += 1
            lv = loss.item()
            acc = task.accuracy(logits.detach(), batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            train_clock[0] += dt
            ntok = batch.num_tokens
            tokens += ntok
            window["loss"] += lv
            window["n"] += 1
            if math.isfinite(acc):
                window["acc"] += acc
                window["acc_n"] += 1
            window["aux"] += float(aux.detach()) if aux is not None else 0.0
            window["tokens"] += ntok
            window["time"] += dt
            if step % a.log_every == 0 or step == a.steps:
                n = window["n"]
                history["train"].append({
                    "step": step, "loss": window["loss"] / n,
                    "accuracy": window["acc"] / window["acc_n"] if window["acc_n"] else None,
                    "aux_loss": window["aux"] / n if is_nstm else None,
                    "lr": sched.get_last_lr()[0],
                    "tokens_per_s": window["tokens"] / window["time"] if window["time"] > 0 else None})
                window = {"loss": 0.0, "acc": 0.0, "acc_n": 0, "aux": 0.0, "n": 0, "tokens": 0, "time": 0.0}
            bar.update(1)
            bar.set_postfix(loss=f"{lv:.4f}", acc=f"{acc:.3f}", tok_s=f"{tokens / max(train_time(), 1e-9):,.0f}",
                            refresh=False)
            if a.eval_every and step % a.eval_every == 0 and step < a.steps:
                last_eval = evaluate()
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()
                                                       if "/" not in k))
                write_results(None, "running")
            if a.ckpt_every and step % a.ckpt_every == 0 and step < a.steps:
                save_ckpt()
            if a.stop_after is not None and step - session_start_step >= a.stop_after and step < a.steps:
                status = "stopped"
                break
            if a.time_budget is not None and time.perf_counter() - session_t0 >= a.time_budget:
                status = "time_budget"
                bar.write(f"time budget of {a.time_budget:g} s reached after step {step}")
                break
    except KeyboardInterrupt:
        status = "interrupted"
        bar.write(f"interrupted at step {step}; evaluating and saving")
    finally:
        bar.close()

    final_eval = evaluate()
    save_ckpt()
    final = dict(final_eval)
    last_train = history["train"][-1] if history["train"] else {}
    final.update(step=step, train_loss=last_train.get("loss"), train_accuracy=last_train.get("accuracy"),
                 tokens_per_s=tokens / train_time() if train_time() > 0 else None,
                 train_time_s=train_time(), wall_time_s=time.perf_counter() - wall0,
                 param_count=n_params, status=status)
    if a.maps:
        try:
            maps = write_maps(model, a, task, run_dir, device, autocast, eval_bs, final_eval)
        except ImportError as e:
            maps = {"error": str(e)}
        results["maps"] = maps
        if "prune" in maps:
            p = maps["prune"]
            final.update({"prune/loss_before": p["loss_before"], "prune/loss_after": p["loss_after"],
                          "prune/speedup": p["speedup"]})
    write_results(final, status)
    try:
        results["curves"] = plot_curves(history, task.metric, png_path, f"{a.task}: {a.model} ({run_name})")
    except ImportError as e:  # pragma: no cover - matplotlib missing
        results["curves"] = f"not drawn: {e}"
    write_results(final, status)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in final_eval.items() if "/" not in k)
    print(f"{status} at step {step}: {summary} | {final['tokens_per_s'] or 0:,.0f} tokens/s | "
          f"wrote {json_path}", file=sys.stderr)
    return final


def cli() -> int:
    """Console-script entry point (``nstm-train``): runs ``main`` and exits 0."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
