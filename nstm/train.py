"""Train an NSTM model or its Transformer baseline on one task; write metrics, curves and checkpoints.

    python -m nstm.train --task mqar --model nstm --steps 2000
    python -m nstm.train --task copy --model transformer --seq-len 32 --steps 1000
    python -m nstm.train --task smnist --d-model 128 --n-layers 4 --maps --time-budget 3600
    python -m nstm.train --task mqar --steps 4000 --resume auto          # continue the same run
    python -m nstm.train --task copy --model gsa --write-pointer 32      # an ablation; the position-aware write

Each run writes, under ``--out`` (default ``results``):

* ``<task>/<run>.json``: config, metrics history, final metrics, device, git commit, torch version,
  parameter count, wall time (rewritten atomically after every evaluation);
* ``<task>/<run>.png``: loss and metric curves;
* ``<task>/<run>/ckpt.pt``: the checkpoint (``--resume auto`` continues from it; it also holds the
  model's ``NSTMConfig`` and class, so ``nstm.checkpoint.load_model`` rebuilds the model from it);
* ``<task>/<run>/maps/*.png`` with ``--maps`` (NSTM): routing heatmaps, slot usage, slot importance
  before/after pruning, state-to-state attention maps; the JSON then records the loss before and
  after ``prune(--prune-threshold)`` and the forward speed-up.

The model flags carry the ``NSTMConfig`` field names (``--num-heads`` sets ``num_heads``; ``--heads``
and ``--layers`` remain as aliases of ``--num-heads`` and ``--n-layers``). The run name defaults to
``<model>-d<width>-l<layers>-s<seed>``. ``--model transformer`` keeps the NSTM width and depth and
(by default) picks the MLP ratio so that the parameter count matches the NSTM model with the same
flags within 10% (``--no-match-params`` keeps ``--mlp-ratio``).

This module reads top to bottom: the flags (``build_parser``, ``parse_args``), the model
(``nstm_config``, ``model_spec``), the optimiser and schedule, one step (``train_step``), the loop
(``train``), the end of a run (``finish``) and ``main``. The run's files, checkpoint and resume, and
the ``--maps`` report live in ``nstm.runs``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from nstm_kernels.settings import BACKENDS

from . import distributed, runs
from .checkpoint import CheckpointError, ModelSpec
from .config import NSTMConfig
from .progress import progress
from .runs import RESUME_MAY_CHANGE, SCHEMA  # noqa: F401  (re-exported)
from .tasks.registry import TASKS, Task, build_task

# --model: the NSTM settings each name fixes (None: the Transformer baseline). gsa also sets
# top_k = num_states (dense routing): Gated Slot Attention is this operator with every slot written.
MODELS = {"nstm": {}, "transformer": None, "nstm-no-s2s": {"use_s2s": False}, "gsa": {"use_s2s": False}}
#: the flags (argparse names) that set NSTM gates' starting values (``NSTMLayer.init_gates``)
GATE_INIT_FLAGS = ("write_gate_bias", "importance_init", "s2s_gate_init")


# ---- arguments ---------------------------------------------------------------------------------
class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the task list's layout and shows every flag's default (not a None, whose
    meaning the help text gives, nor a switch's False)."""

    def _get_help_string(self, action):
        text = (action.help or "").strip()
        d = action.default
        if (action.option_strings and d is not None and d is not argparse.SUPPRESS and d is not False
                and "%(default)" not in text):
            text = f"{text} (default: %(default)s)".strip()
        return text


def build_parser() -> argparse.ArgumentParser:
    tasks = "\n".join(f"  {n:12s} {s.description}" for n, s in TASKS.items())
    ap = argparse.ArgumentParser(
        prog="nstm-train", description=__doc__.split("\n\n")[0],
        epilog="tasks:\n" + tasks, formatter_class=_HelpFormatter)
    g = ap.add_argument_group("task")
    g.add_argument("--task", required=True, choices=list(TASKS), metavar="TASK",
                   help="one of: " + ", ".join(TASKS))
    g.add_argument("--seq-len", type=int, default=None,
                   help="copy: length L (32); mqar: tokens per sequence, queries spread among fillers "
                        "(4 x pairs, queries right after the pairs); passkey: training context (1024, at "
                        "most 2048); listops: max length (2000); shakespeare/wikitext2/text: context (256); "
                        "lra-listops: truncation (2000)")
    g.add_argument("--vocab", type=int, default=None, help="copy (16) / mqar (64) vocabulary size")
    g.add_argument("--num-pairs", type=int, default=None, help="mqar key-value pairs (8)")
    g.add_argument("--min-len", type=int, default=None, help="listops minimum length (seq-len / 4)")
    g.add_argument("--max-depth", type=int, default=None, help="listops maximum nesting depth (10)")
    g.add_argument("--eval-contexts", type=str, default=None,
                   help="passkey: comma-separated evaluation contexts (default L,4L,16L)")
    g.add_argument("--data-root", default="data", help="where downloadable data sets are cached (smnist, "
                   "psmnist, shakespeare)")
    g.add_argument("--data-path", default=None, help="local copy of the data set for lra-listops, cifar10, wikitext2; "
                   "text: your UTF-8 text file")
    g.add_argument("--pack", action="store_true",
                   help="shakespeare, wikitext2, text: packed batches of batch-size x seq-len tokens in one row, "
                        "windows that never cross a document (work, article), no padding")

    # the dests of the model flags are NSTMConfig field names (nstm_config reads them by name)
    g = ap.add_argument_group("model")
    g.add_argument("--model", choices=list(MODELS), default="nstm",
                   help="nstm; transformer (rotary, the baseline); the ablations nstm-no-s2s (no "
                        "state-to-state attention) and gsa (dense routing, top-k = S, no s2s: Gated Slot Attention)")
    g.add_argument("--d-model", type=int, default=128)
    g.add_argument("--n-layers", "--layers", dest="n_layers", type=int, default=2)
    g.add_argument("--num-heads", "--heads", dest="num_heads", type=int, default=4)
    g.add_argument("--num-states", type=int, default=32, help="NSTM slots per head")
    g.add_argument("--top-k", type=int, default=4, help="NSTM slots written per token")
    g.add_argument("--comm-every", type=int, default=64, help="NSTM state-to-state period")
    g.add_argument("--conv-size", type=int, default=4, help="NSTM short conv width (0: none)")
    g.add_argument("--write-pointer", type=int, default=0, metavar="P",
                   help="NSTM position-aware write: period P of the learned route bias (0: content-only routing)")
    g.add_argument("--no-s2s", dest="use_s2s", action="store_false",
                   help="NSTM without state-to-state attention")
    g.add_argument("--write-gate-bias", type=float, default=None, metavar="B",
                   help="NSTM: starting bias of the write-strength logits (the layer's: 0, beta = 0.5)")
    g.add_argument("--importance-init", type=float, default=None, metavar="I",
                   help="NSTM: starting slot-importance logit (the layer's: 3)")
    g.add_argument("--s2s-gate-init", type=float, default=None, metavar="G",
                   help="NSTM: starting logit of the s2s mix gate (the layer's: -8, g = 0.00034)")
    g.add_argument("--backend", default=None, choices=list(BACKENDS),
                   help="NSTM operator backend (default: the automatic choice for the device)")
    g.add_argument("--mlp-ratio", type=float, default=4.0)
    g.add_argument("--match-params", action=argparse.BooleanOptionalAction, default=True,
                   help="transformer: choose the MLP ratio to match the NSTM parameter count (default on)")
    g.add_argument("--pool", choices=["mean", "last"], default="mean", help="classifier pooling")

    g = ap.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=32,
                   help="sequences per micro-step and process (--pack: rows of batch-size x seq-len tokens); "
                        "the global batch is batch-size x grad-accum x processes")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimiser step (gradient accumulation)")
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
    g.add_argument("--ckpt-every", type=int, default=200, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--out", default="results", help="results directory")
    g.add_argument("--run-name", default=None,
                   help="default: the model, its size, S/top-k/C (NSTM), lr, batch, the task's settings and "
                        "the seed, e.g. nstm-d128-l2-S32-k4-C64-lr0.001-b32-s0")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing run of the same name (without it, and without --resume, an "
                        "existing run is refused)")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="checkpoint (file or run directory) to continue from; auto: this run's checkpoint if any")
    g.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop cleanly (evaluate, checkpoint, write results) after this much wall time")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop cleanly after N steps in this session (the schedule still spans --steps; "
                        "continue with --resume)")
    g.add_argument("--maps", action="store_true", help="NSTM: write interpretability PNGs and a pruning report")
    g.add_argument("--prune-threshold", type=float, default=None,
                   help="--maps: prune the slots whose importance is below this; default: the model's 25th "
                        "percentile of slot importance, so the report shows what dropping a quarter costs")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none either when stdout is not a terminal)")
    g = ap.add_argument_group("several processes (torchrun)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the model with FSDP2 (fully_shard per block) instead of DDP; needs torchrun")
    for action in ap._actions:         # every flag's default in --help, those without a help text too
        if action.help is None and action.option_strings and action.default not in (None, argparse.SUPPRESS):
            action.help = "(default: %(default)s)"
    return ap


def _validate(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    def positive(name, value, low=1):
        if value is not None and value < low:
            ap.error(f"--{name} must be >= {low}, got {value}")

    for name in ("steps", "batch_size", "grad_accum", "d_model", "n_layers", "num_heads", "num_states", "top_k",
                 "comm_every", "log_every", "eval_batch_size", "stop_after"):
        positive(name.replace("_", "-"), getattr(a, name))
    for name in ("eval_every", "eval_batches", "ckpt_every", "conv_size", "warmup", "write_pointer"):
        positive(name.replace("_", "-"), getattr(a, name), 0)
    for name in ("seq_len", "vocab", "num_pairs", "min_len", "max_depth"):
        positive(name.replace("_", "-"), getattr(a, name))
    if a.warmup is not None and a.warmup >= a.steps:
        ap.error(f"--warmup ({a.warmup}) must be < --steps ({a.steps})")
    if a.d_model % a.num_heads:
        ap.error(f"--d-model ({a.d_model}) must be divisible by --num-heads ({a.num_heads})")
    if (a.d_model // a.num_heads) % 2 and a.model == "transformer":
        ap.error(f"rotary positions need an even head size; --d-model / --num-heads = {a.d_model // a.num_heads}")
    if a.top_k > a.num_states:
        ap.error(f"--top-k ({a.top_k}) must be <= --num-states ({a.num_states})")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        ap.error(f"--lr must be a positive number, got {a.lr}")
    for name in GATE_INIT_FLAGS:
        value = getattr(a, name)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value):
            ap.error(f"{flag} must be a finite number, got {value}")
        if a.model == "transformer":
            ap.error(f"{flag} sets an NSTM gate; --model transformer has none")
    if a.s2s_gate_init is not None and not (a.use_s2s and (MODELS[a.model] or {}).get("use_s2s", True)):
        ap.error(f"--s2s-gate-init needs the s2s; --model {a.model}"
                 f"{'' if a.use_s2s else ' --no-s2s'} has none")
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
    if a.prune_threshold is not None and not 0 <= a.prune_threshold <= 1:
        ap.error(f"--prune-threshold must be in [0, 1], got {a.prune_threshold}")
    if a.eval_contexts is not None:
        try:
            ctx = [int(c) for c in a.eval_contexts.split(",") if c.strip()]
        except ValueError:
            ap.error(f"--eval-contexts must be comma-separated integers, got {a.eval_contexts!r}")
        if not ctx or min(ctx) < 1:
            ap.error(f"--eval-contexts must be positive integers, got {a.eval_contexts!r}")
    if TASKS[a.task].options and "data_path" in TASKS[a.task].options and not a.data_path:
        ap.error(f"--task {a.task} reads a local copy of its data set: give --data-path")
    if a.pack and "pack" not in TASKS[a.task].options:
        packs = ", ".join(n for n, t in TASKS.items() if "pack" in t.options)
        ap.error(f"--pack packs language-model documents: it works with {packs}, not {a.task}")
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
    if a.amp == "fp16" and _device(a).type != "cuda":
        ap.error("--amp fp16 needs a CUDA device (use bf16 or none on the CPU)")


def parse_args(argv=None) -> Tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = build_parser()
    args = ap.parse_args(argv)
    _validate(ap, args)
    return ap, args


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


def task_options(a) -> Dict:
    """The ``build_task`` options the flags give."""
    contexts = [int(c) for c in a.eval_contexts.split(",") if c.strip()] if a.eval_contexts else None
    return dict(seq_len=a.seq_len, vocab_size=a.vocab, num_pairs=a.num_pairs, min_len=a.min_len,
                max_depth=a.max_depth, eval_contexts=contexts, data_root=a.data_root, data_path=a.data_path,
                pack=a.pack or None)


# ---- the model -----------------------------------------------------------------------------------
def nstm_config(a, task: Task) -> NSTMConfig:
    """The NSTM model the flags describe for ``task``: every ``NSTMConfig`` field that is a flag
    (same name), the vocabulary from the task, tied embeddings for language models."""
    flags = {f.name: getattr(a, f.name) for f in dataclasses.fields(NSTMConfig) if hasattr(a, f.name)}
    flags.update(MODELS.get(a.model) or {})
    if a.model == "gsa":
        flags["top_k"] = a.num_states
    return NSTMConfig(**flags, vocab_size=task.vocab_size, tie_weights=task.kind == "lm")


def model_spec(a, task: Task) -> ModelSpec:
    """What builds the model of the flags for ``task`` (an LM or a classifier); a Transformer
    keeps the NSTM width and depth (and, with ``--match-params``, its parameter count)."""
    from .baseline import matched_transformer_config

    cfg = nstm_config(a, task)
    if task.kind == "lm":
        nstm = ModelSpec("NSTMLM", cfg)
    else:
        nstm = ModelSpec("NSTMClassifier", cfg, dict(num_classes=task.num_classes, input_dim=task.input_dim,
                                                     pool=a.pool))
    if a.model != "transformer":
        return nstm
    if a.match_params:
        with torch.device("meta"):
            kwargs = matched_transformer_config(nstm.build())
    elif task.kind == "lm":
        kwargs = dict(vocab_size=task.vocab_size, d_model=a.d_model, n_layers=a.n_layers, num_heads=a.num_heads,
                      mlp_ratio=a.mlp_ratio)
    else:
        inputs = dict(input_dim=task.input_dim) if task.input_dim is not None else dict(vocab_size=task.vocab_size)
        kwargs = dict(num_classes=task.num_classes, **inputs, d_model=a.d_model, n_layers=a.n_layers,
                      num_heads=a.num_heads, mlp_ratio=a.mlp_ratio, pool=a.pool)
    return ModelSpec("TransformerLM" if task.kind == "lm" else "TransformerClassifier", cfg, kwargs)


def init_gates(a, model: nn.Module) -> nn.Module:
    """Set the starting gate values of ``--write-gate-bias`` / ``--importance-init`` /
    ``--s2s-gate-init`` in every NSTM layer of ``model`` (``NSTMLayer.init_gates``)."""
    from .layer import NSTMLayer

    values = dict(write_gate_bias=a.write_gate_bias, importance=a.importance_init, s2s_gate=a.s2s_gate_init)

    for m in model.modules():
        if isinstance(m, NSTMLayer):
            m.init_gates(**values)
    return model


def build_model(a, task: Task) -> nn.Module:
    """The model the flags describe, for ``task`` (``model_spec(a, task).build()``, with the
    flags' starting gate values)."""
    return init_gates(a, model_spec(a, task).build())


# ---- optimiser and schedule ------------------------------------------------------------------------
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


# ---- one session ---------------------------------------------------------------------------------
@dataclass
class Run:
    """One training session's fixed parts: the flags, the task, what builds the model, the device,
    the processes, where the files go and the header of the results JSON."""

    a: argparse.Namespace
    config: Dict                                     # the run config (the flags) of checkpoints and JSON
    task: Task
    spec: ModelSpec
    files: runs.RunFiles
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    eval_batch_size: int
    header: Dict                                     # the fixed part of the results JSON
    wall0: float                                     # perf_counter() at the start of main
    dist: distributed.Dist = dataclasses.field(default_factory=distributed.Dist)
    raw: Optional[nn.Module] = None                  # the model outside DDP (FSDP2: the model itself)

    @property
    def evaluates(self) -> bool:
        """Whether this process runs the evaluation: rank 0, or every rank under FSDP (the forwards
        gather the shards)."""
        return self.dist.is_main or self.a.fsdp

    def evaluate(self, state: runs.TrainState) -> Dict[str, float]:
        m = {}
        if self.evaluates:
            m = self.task.evaluate(self.raw, self.eval_batch_size, self.a.eval_batches, self.device, self.autocast,
                                   show_progress=not self.a.no_progress and self.dist.is_main)
            state.progress.log_eval(m)
        return m

    def save_checkpoint(self, state: runs.TrainState) -> None:
        """Every process calls this (the data streams, and under FSDP the shards, are gathered);
        rank 0 writes."""
        rngs = [r for states in self.dist.gather([g.get_state() for g in state.data_rngs]) for r in states]
        full = distributed.full_state(state.model, state.optimizer, self.a.fsdp) if self.a.fsdp else {}
        weights = distributed.counted_state(full.get("model") or self.raw.state_dict(), self.dist)
        if self.dist.is_main:
            state.save(self.files.ckpt, self.device, self.config, self.spec, self.task.state, self.files.run_name,
                       model_state=weights, optimizer_state=full.get("optimizer"), data_rng_states=rngs)

    def write_results(self, state: runs.TrainState, final: Optional[Dict], status: str, **more) -> None:
        if self.dist.is_main:
            runs.write_json_atomic(self.files.json, runs.results_json(
                self.header, state.progress, final, status, time.perf_counter() - self.wall0, **more))

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, file=sys.stderr, flush=True)


def _summary(metrics: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k)


def default_run_name(a) -> str:
    """A name that tells runs of a sweep apart: model and size, S/top-k/C for NSTM, lr, batch, the
    task's settings, packing, the seed."""
    parts = [a.model, f"d{a.d_model}", f"l{a.n_layers}"]
    if a.model != "transformer":
        parts += [f"S{a.num_states}"]
        if a.model != "gsa":
            parts += [f"k{a.top_k}"]
        parts += [f"C{a.comm_every}"]
        if not a.use_s2s and a.model == "nstm":
            parts.append("nos2s")
        if a.write_pointer:
            parts.append(f"wp{a.write_pointer}")
        for name, short in zip(GATE_INIT_FLAGS, ("wg", "imp", "s2sg")):
            if getattr(a, name) is not None:
                parts.append(f"{short}{getattr(a, name):g}")
    parts += [f"lr{a.lr:g}", f"b{a.batch_size}"]
    if a.grad_accum > 1:
        parts.append(f"ga{a.grad_accum}")
    for flag, short in (("seq_len", "T"), ("vocab", "V"), ("num_pairs", "P"), ("min_len", "min"),
                        ("max_depth", "depth")):
        if getattr(a, flag) is not None:
            parts.append(f"{short}{getattr(a, flag)}")
    if a.pack:
        parts.append("pack")
    parts.append(f"s{a.seed}")
    return "-".join(parts)


def _existing_run(files: runs.RunFiles) -> Optional[str]:
    for path in (files.json, files.ckpt):
        if os.path.exists(path):
            return path
    return None


def setup(ap: argparse.ArgumentParser, a: argparse.Namespace, wall0: float,
          dist: Optional[distributed.Dist] = None) -> Tuple[Run, runs.TrainState]:
    """Seed, build the task, the model (in DDP / FSDP2 under torchrun), the optimiser and schedule,
    continue from ``--resume``; a bad option, missing data, an existing run or an incompatible
    checkpoint exits with status 2 (``ap.error``)."""
    dist = dist or distributed.Dist()
    device = distributed.device_for(dist, _device(a))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp_dtype = _amp_dtype(a, device)
    autocast = (contextlib.nullcontext if amp_dtype is None
                else functools.partial(torch.autocast, device.type, dtype=amp_dtype))
    warmup = min(200, a.steps // 10) if a.warmup is None else a.warmup
    min_lr = a.lr / 10 if a.min_lr is None else a.min_lr
    eval_bs = a.eval_batch_size or a.batch_size
    files = runs.RunFiles.at(a.out, a.task, a.run_name or default_run_name(a))
    a.world_size = dist.world
    config = dict(vars(a))

    # an existing run is continued (--resume), replaced (--overwrite) or refused; rank 0 decides
    existing = _existing_run(files) if dist.is_main and a.resume is None and not a.overwrite else None
    existing = dist.gather(existing)[0]
    if existing is not None:
        ap.error(f"a run named {files.run_name!r} exists ({existing}): continue it with --resume auto, "
                 "start another with --run-name NAME, or replace it with --overwrite")

    torch.manual_seed(a.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(a.seed)
    try:
        task = build_task(a.task, **task_options(a))
    except (ValueError, ImportError, OSError, RuntimeError) as e:   # bad options, missing data
        ap.error(f"--task {a.task}: {e}")
    try:
        spec = model_spec(a, task)
        raw = init_gates(a, spec.build()).to(device)
    except ValueError as e:
        ap.error(f"model: {e}")
    streams = [dist.rank * a.grad_accum + i for i in range(a.grad_accum)]
    rngs = [torch.Generator().manual_seed(distributed.stream_seed(a.seed, j)) for j in streams]
    ckpt = None
    try:
        resume_path = runs.find_checkpoint(a.resume, files.ckpt)
        if resume_path is not None:
            ckpt = runs.load_for_resume(resume_path, config)
            raw.load_state_dict(ckpt["model"])              # before DDP / FSDP takes the weights over
            distributed.keep_counters_on_rank0(raw, dist)
    except (FileNotFoundError, CheckpointError) as e:
        ap.error(f"--resume: {e}")
    try:
        model = distributed.wrap(raw, dist, device, fsdp=a.fsdp)
    except RuntimeError as e:
        ap.error(str(e))
    opt = build_optimizer(model, a, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, a.steps, warmup, min_lr / a.lr))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    state = runs.TrainState(model, opt, sched, scaler, rngs)
    if ckpt is not None:
        try:
            state.restore(ckpt, device, streams, load_weights=False, load_optimizer=not a.fsdp)
        except CheckpointError as e:
            ap.error(f"--resume: {e}")
        if a.fsdp:
            distributed.load_full_optimizer_state(model, opt, ckpt["optimizer"])

    header = {
        "schema": SCHEMA, "task": a.task, "model": a.model, "run_name": files.run_name, "config": config,
        "model_config": spec.config.to_dict(),
        "resolved": {"warmup": warmup, "min_lr": min_lr, "eval_batch_size": eval_bs,
                     "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
                     "device": str(device), "processes": dist.world, "parallel": (
                         "fsdp2" if a.fsdp else "ddp" if dist.active else "none"),
                     "global_batch": a.batch_size * a.grad_accum * dist.world},
        "task_info": task.info, "metric": task.metric, "higher_is_better": task.higher_is_better,
        "param_count": sum(p.numel() for p in raw.parameters()) if not a.fsdp else
        sum(p.numel() for p in spec.build().parameters()), "device_name": runs.device_name(device),
        "git_commit": runs.git_commit(), "torch_version": str(torch.__version__),
        "python_version": platform.python_version(), "resumed_from": resume_path,
        "resumed_at_step": state.progress.step if resume_path else None, "checkpoint": files.ckpt,
    }
    if a.model == "transformer":
        header["transformer_mlp_ratio"] = raw.mlp_ratio
    run = Run(a, config, task, spec, files, device, autocast, eval_bs, header, wall0, dist, raw)
    return run, state


# ---- training ------------------------------------------------------------------------------------
def train_step(run: Run, state: runs.TrainState) -> Tuple[float, float, Optional[float], int]:
    """One optimiser step: ``--grad-accum`` micro-batches, one from each of this process's data
    streams (the gradients summed locally under ``no_sync``, then averaged over the processes).
    Returns ``(loss, accuracy, aux loss or None, tokens)``, averaged (tokens: summed) over every
    micro-batch of every process. A non-finite loss anywhere skips the update (the loop then
    stops: diverged)."""
    a, task, model, opt, scaler = run.a, run.task, state.model, state.optimizer, state.scaler
    n = a.grad_accum
    opt.zero_grad(set_to_none=True)
    losses, accs, auxes, tokens = [], [], [], 0
    for i, rng in enumerate(state.data_rngs):
        batch = task.train_batch(a.batch_size, rng).to(run.device)
        with distributed.no_sync(model, skip=i < n - 1):
            with run.autocast():
                loss, logits = task.loss(model, batch)
                aux = run.raw.aux_loss if a.model != "transformer" and a.aux_weight > 0 else None
                total = loss + a.aux_weight * aux if aux is not None else loss
            if scaler is not None:
                scaler.scale(total / n).backward()
            else:
                (total / n).backward()
        losses.append(loss.item())
        accs.append(task.accuracy(logits.detach(), batch))
        auxes.append(float(aux.detach()) if aux is not None else 0.0)
        tokens += batch.num_tokens
    acc_ok = [x for x in accs if math.isfinite(x)]
    loss, acc, aux_mean, anyacc = run.dist.mean(
        [sum(losses) / n, sum(acc_ok) / len(acc_ok) if acc_ok else 0.0, sum(auxes) / n, float(bool(acc_ok))],
        run.device)
    acc = acc / anyacc if anyacc > 0 else float("nan")
    if not math.isfinite(loss):
        opt.zero_grad(set_to_none=True)
        return loss, float("nan"), None, tokens * run.dist.world
    if scaler is not None:
        scaler.unscale_(opt)
    if a.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    state.scheduler.step()
    return loss, acc, aux_mean if a.model != "transformer" and a.aux_weight > 0 else None, tokens * run.dist.world


def train(run: Run, state: runs.TrainState) -> str:
    """Train from ``state.progress.step`` to ``--steps``, evaluating (and rewriting the results JSON)
    every ``--eval-every`` and checkpointing every ``--ckpt-every`` steps. Returns the status:
    ``completed``, ``stopped`` (``--stop-after``), ``time_budget``, ``interrupted`` (Ctrl-C) or
    ``diverged (...)``."""
    a, p = run.a, state.progress
    session_t0, session_start = time.perf_counter(), p.step
    status = "completed"
    bar = progress(total=a.steps, initial=p.step, desc=f"{a.task}/{a.model}", unit="step",
                   enabled=not a.no_progress and run.dist.is_main, mininterval=1.0)
    state.model.train()
    try:
        while p.step < a.steps:
            t0 = time.perf_counter()
            loss, acc, aux, tokens = train_step(run, state)
            if not math.isfinite(loss):
                status = f"diverged (loss {loss} at step {p.step + 1})"
                break
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            p.add_step(loss, acc, aux, tokens, time.perf_counter() - t0)
            if p.step % a.log_every == 0 or p.step == a.steps:
                p.log_train(state.scheduler.get_last_lr()[0], with_aux=a.model != "transformer")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}",
                            tok_s=f"{p.tokens / max(p.train_time_s, 1e-9):,.0f}", refresh=False)
            if a.eval_every and p.step % a.eval_every == 0 and p.step < a.steps:
                m = run.evaluate(state)
                if run.dist.is_main:
                    bar.write(f"step {p.step}: " + _summary(m))
                run.write_results(state, None, "running")
                state.model.train()
            if a.ckpt_every and p.step % a.ckpt_every == 0 and p.step < a.steps:
                run.save_checkpoint(state)
            if a.stop_after is not None and p.step - session_start >= a.stop_after and p.step < a.steps:
                status = "stopped"
                break
            over = a.time_budget is not None and time.perf_counter() - session_t0 >= a.time_budget
            if run.dist.any(over, run.device):        # every process stops at the same step
                status = "time_budget"
                if run.dist.is_main:
                    bar.write(f"time budget of {a.time_budget:g} s reached after step {p.step}")
                break
    except KeyboardInterrupt:
        status = "interrupted"
        if run.dist.is_main:
            bar.write(f"interrupted at step {p.step}; saving the checkpoint and results, then evaluating "
                      "(a second Ctrl-C skips the evaluation; what was saved stays)")
    finally:
        bar.close()
    return status


def finish(run: Run, state: runs.TrainState, status: str) -> Dict:
    """The end of a session: the checkpoint and the results JSON first (so that nothing is lost if
    the evaluation is interrupted), then the final evaluation, ``--maps``, the curves, and the
    checkpoint and results again. Returns the final metrics (``status`` among them)."""
    a, p = run.a, state.progress
    run.save_checkpoint(state)
    run.write_results(state, None, status)
    try:
        final_eval = run.evaluate(state)
    except KeyboardInterrupt:
        run.log(f"interrupted during the final evaluation: {run.files.ckpt} and {run.files.json} hold "
                f"step {p.step} without it")
        return {"step": p.step, "status": "interrupted"}
    run.save_checkpoint(state)
    last_train = p.history["train"][-1] if p.history["train"] else {}
    final = dict(final_eval, step=p.step, train_loss=last_train.get("loss"),
                 train_accuracy=last_train.get("accuracy"), tokens_per_s=p.tokens_per_s,
                 train_time_s=p.train_time_s, wall_time_s=time.perf_counter() - run.wall0,
                 param_count=run.header["param_count"], status=status)
    if not run.dist.is_main:
        return final
    more = {}
    if a.maps and a.model == "transformer":
        more["maps"] = {"skipped": "--maps draws NSTM routing, slot and state-to-state maps; a Transformer "
                                   "has none of them (its curves are drawn as usual)"}
        run.log("--maps: nothing to draw for a Transformer (no slots or routing); curves only")
    elif a.maps and a.fsdp:
        more["maps"] = {"skipped": "--maps is not drawn under --fsdp: draw them from the checkpoint "
                                   "in one process (--resume with --steps unchanged and --maps)"}
    elif a.maps:
        try:
            more["maps"] = runs.write_maps(run.raw, run.spec, run.task, run.files.run_dir, run.device,
                                           run.autocast, run.eval_batch_size, a.eval_batches,
                                           a.prune_threshold, final_eval)
        except ImportError as e:
            more["maps"] = {"error": str(e)}
        prune = more["maps"].get("prune")
        if prune is not None:
            final.update({"prune/loss_before": prune["loss_before"], "prune/loss_after": prune["loss_after"],
                          "prune/speedup": prune["speedup"]})
    try:
        more["curves"] = runs.plot_curves(p.history, run.task.metric, run.files.png,
                                          f"{a.task}: {a.model} ({run.files.run_name})")
    except ImportError as e:  # pragma: no cover - matplotlib missing
        more["curves"] = f"not drawn: {e}"
    run.write_results(state, final, status, **more)
    run.log(f"{status} at step {p.step}: {_summary(final_eval)} | {final['tokens_per_s'] or 0:,.0f} tokens/s | "
            f"wrote {run.files.json}")
    return final


def main(argv: Optional[List[str]] = None) -> Dict:
    """Run the CLI; returns the final metrics dict (also written to ``<out>/<task>/<run>.json``),
    with ``status`` (``completed``, ``interrupted``, ...). Under torchrun every process runs this."""
    wall0 = time.perf_counter()
    ap, a = parse_args(argv)
    try:
        dist = distributed.init(a.device)
    except (RuntimeError, ValueError) as e:
        ap.error(f"torch.distributed: {e}")
    try:
        run, state = setup(ap, a, wall0, dist)
        h = run.header
        run.log(f"{a.model} {h['param_count'] / 1e6:.3f}M params | task {a.task} ({run.task.kind}, metric "
                f"{run.task.metric}) | {h['device_name']}, amp {h['resolved']['amp']}"
                + (f" | {dist.world} processes ({h['resolved']['parallel']})" if dist.active else "")
                + f" | run {run.files.json}"
                + (f" | resumed at step {h['resumed_at_step']}" if h["resumed_from"] else ""))
        status = train(run, state)
        final = finish(run, state, status)
        # every process reaches this before any tears the group down: a rank that destroyed its gloo
        # group while rank 0 was still writing the results was sometimes aborted (std::terminate)
        dist.barrier()
        return final
    finally:
        dist.close()


def cli() -> int:
    """Console-script entry point (``nstm-train``): 0 when the run ended normally, 130 when it was
    interrupted (Ctrl-C; the checkpoint and results were saved first), 2 for bad arguments."""
    try:
        final = main()
    except KeyboardInterrupt:            # before training started: nothing to save
        print("nstm-train: interrupted", file=sys.stderr)
        return 130
    return 130 if final.get("status") == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(cli())
