"""The files and the saved state of a training run (``nstm.train``): where they go, the results
JSON (written atomically), the curves PNG, the checkpoint and ``--resume``, and the ``--maps``
interpretability PNGs with their pruning report.

    files = RunFiles.at("results", "mqar", "nstm-d128-l2-s0")   # .json .png .ckpt .run_dir
    state = TrainState(model, optimizer, scheduler, scaler, [torch.Generator().manual_seed(0)])
    state.save(files.ckpt, device, config, spec, task.state, files.run_name)
    state.restore(load_for_resume(files.ckpt, config), device)  # --resume
    write_json_atomic(files.json, results_json(header, state.progress, final, "completed", wall_s))
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, ModelSpec, check_resume_config, load_checkpoint, save_checkpoint
from .tasks.base import Task

SCHEMA = "nstm-train-results/1"

# Settings that may change when a run is resumed (they do not change what is being trained).
RESUME_MAY_CHANGE = ("steps", "time_budget", "eval_every", "eval_batches", "eval_batch_size",
                     "eval_contexts", "ckpt_every", "log_every", "resume", "out", "device", "amp",
                     "maps", "prune_threshold", "no_progress", "data_root", "data_path", "backend",
                     "stop_after", "run_name", "overwrite", "fsdp")

# settings added after the first checkpoints were written, with the value those runs had
_ADDED = {"pack": False, "grad_accum": 1, "world_size": 1,
          "write_gate_bias": None, "importance_init": None, "s2s_gate_init": None}

# run-config keys of checkpoints written before the flags took the NSTMConfig field names
_RENAMED = {"heads": "num_heads", "layers": "n_layers"}


# ---- where the files go --------------------------------------------------------------------------
@dataclass(frozen=True)
class RunFiles:
    """``<out>/<task>/<run>.json`` (results), ``<run>.png`` (curves) and ``<run>/`` (checkpoint, maps)."""

    task_dir: str
    run_name: str

    @classmethod
    def at(cls, out: str, task: str, run_name: str) -> RunFiles:
        return cls(os.path.join(out, task), run_name)

    @property
    def json(self) -> str:
        return os.path.join(self.task_dir, self.run_name + ".json")

    @property
    def png(self) -> str:
        return os.path.join(self.task_dir, self.run_name + ".png")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.task_dir, self.run_name)

    @property
    def ckpt(self) -> str:
        return os.path.join(self.run_dir, "ckpt.pt")


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
    """Write ``obj`` as JSON (NaN/inf as null) to a temporary file, fsync it, rename it over ``path``."""
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


# ---- progress: what the loop accumulates ----------------------------------------------------------
def _new_window() -> Dict[str, Any]:
    return {"loss": 0.0, "acc": 0.0, "acc_n": 0, "aux": 0.0, "n": 0, "tokens": 0, "time": 0.0}


@dataclass
class Progress:
    """Where a run stands: steps done, tokens seen, training time over all sessions (evaluation
    excluded), the history of the results JSON and the open averaging window of ``--log-every``."""

    step: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    history: Dict[str, List[Dict]] = field(default_factory=lambda: {"train": [], "eval": []})
    window: Dict[str, Any] = field(default_factory=_new_window)

    @property
    def tokens_per_s(self) -> Optional[float]:
        return self.tokens / self.train_time_s if self.train_time_s > 0 else None

    def add_step(self, loss: float, accuracy: float, aux: Optional[float], tokens: int, seconds: float) -> None:
        """Count one optimiser step (``accuracy`` may be NaN: nothing scored)."""
        self.step += 1
        self.tokens += tokens
        self.train_time_s += seconds
        w = self.window
        w["loss"] += loss
        w["n"] += 1
        if math.isfinite(accuracy):
            w["acc"] += accuracy
            w["acc_n"] += 1
        w["aux"] += aux if aux is not None else 0.0
        w["tokens"] += tokens
        w["time"] += seconds

    def log_train(self, lr: float, with_aux: bool) -> None:
        """Close the window: its averages become the next ``history["train"]`` entry."""
        w, n = self.window, self.window["n"]
        self.history["train"].append({
            "step": self.step, "loss": w["loss"] / n,
            "accuracy": w["acc"] / w["acc_n"] if w["acc_n"] else None,
            "aux_loss": w["aux"] / n if with_aux else None,
            "lr": lr,
            "tokens_per_s": w["tokens"] / w["time"] if w["time"] > 0 else None})
        self.window = _new_window()

    def log_eval(self, metrics: Dict[str, float]) -> None:
        self.history["eval"].append({"step": self.step, **metrics})


# ---- checkpoint and resume -------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything a checkpoint saves and ``--resume`` restores. ``data_rngs``: this process's data
    streams (one per micro-step of gradient accumulation; ``nstm.distributed``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any                                   # torch.optim.lr_scheduler.LRScheduler
    scaler: Optional[torch.amp.GradScaler]
    data_rngs: List[torch.Generator]
    progress: Progress = field(default_factory=Progress)

    def save(self, path: str, device: torch.device, config: Dict, spec: ModelSpec, task_state: Dict,
             run_name: str, model_state: Optional[Dict] = None, optimizer_state: Optional[Dict] = None,
             data_rng_states: Optional[List[torch.Tensor]] = None) -> None:
        """Atomically save the weights, optimiser, schedule, RNG states and progress, with the run
        config and the model's spec (``nstm.checkpoint.load_model`` rebuilds the model from it).
        ``model_state`` / ``optimizer_state`` / ``data_rng_states``: what to save instead of this
        process's own (the full state of a sharded model; every process's data streams)."""
        p = self.progress
        rngs = data_rng_states if data_rng_states is not None else [g.get_state() for g in self.data_rngs]
        save_checkpoint(path, model_state if model_state is not None else self.model,
                        optimizer_state if optimizer_state is not None else self.optimizer,
                        self.scheduler, p.step, config, model_spec=spec, extra={
            "data_rngs": rngs, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "history": p.history, "window": p.window, "train_time_s": p.train_time_s, "tokens": p.tokens,
            "task_state": task_state, "run_name": run_name,
        })

    def restore(self, ckpt: Dict, device: torch.device, streams: Optional[List[int]] = None,
                load_weights: bool = True, load_optimizer: bool = True) -> None:
        """Continue from ``ckpt`` (of ``load_for_resume``): weights, optimiser, schedule, RNGs,
        progress. ``streams``: which of the saved data streams are this process's (default: the
        first ones); ``load_weights`` / ``load_optimizer`` False when the caller loads those itself
        (a sharded model)."""
        if load_weights:
            self.model.load_state_dict(ckpt["model"])
        if load_optimizer:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        ex = ckpt["extra"]
        saved = ex["data_rngs"] if "data_rngs" in ex else [ex["data_rng"]]   # one stream before 0.3
        streams = list(range(len(self.data_rngs))) if streams is None else streams
        if max(streams) >= len(saved):
            raise CheckpointError(f"the checkpoint holds {len(saved)} data streams, this run needs "
                                  f"{max(streams) + 1} (processes x --grad-accum): resume with the same "
                                  "number of processes and --grad-accum")
        for g, j in zip(self.data_rngs, streams):
            g.set_state(saved[j])
        torch.set_rng_state(ex["torch_rng"])
        if device.type == "cuda" and ex.get("cuda_rng"):
            torch.cuda.set_rng_state_all(ex["cuda_rng"])
        if self.scaler is not None and ex.get("scaler"):
            self.scaler.load_state_dict(ex["scaler"])
        self.progress = Progress(step=ckpt["step"], tokens=ex["tokens"], train_time_s=ex["train_time_s"],
                                 history=ex["history"], window=ex["window"])


def find_checkpoint(resume: Optional[str], own_ckpt: str) -> Optional[str]:
    """The checkpoint ``--resume`` names: ``None`` (no resume), ``"auto"`` (``own_ckpt`` if it
    exists), a file or a run directory; ``FileNotFoundError`` when there is none there."""
    if resume is None:
        return None
    if resume == "auto":
        return own_ckpt if os.path.isfile(own_ckpt) else None
    path = os.path.join(resume, "ckpt.pt") if os.path.isdir(resume) else resume
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def upgrade_run_config(saved: Dict) -> Dict:
    """A checkpoint's run config under today's names (``heads`` -> ``num_heads``, ``layers`` ->
    ``n_layers``, ``no_s2s`` -> ``use_s2s``), so that runs from before the rename still resume."""
    config = {_RENAMED.get(k, k): v for k, v in saved.items()}
    for k, v in _ADDED.items():
        config.setdefault(k, v)
    if "no_s2s" in config and "use_s2s" not in config:
        config["use_s2s"] = not config.pop("no_s2s")
    return config


def load_for_resume(path: str, config: Dict) -> Dict:
    """Load the checkpoint at ``path`` and check that it was made with ``config`` (outside
    ``RESUME_MAY_CHANGE``); ``CheckpointError`` otherwise."""
    ckpt = load_checkpoint(path, map_location="cpu")
    check_resume_config(upgrade_run_config(ckpt["config"]), config, ignore=RESUME_MAY_CHANGE)
    return ckpt


# ---- the results JSON and the curves ---------------------------------------------------------------
def results_json(header: Dict, progress: Progress, final: Optional[Dict], status: str, wall_time_s: float,
                 **more) -> Dict:
    """The results file: the run's fixed ``header`` (config, task, model, device, versions), the
    history, the ``final`` metrics (None while running), the status and times, and ``more``
    (``maps``, ``curves``)."""
    return {**header, **more, "history": progress.history, "final": final, "status": status,
            "steps_done": progress.step, "train_time_s": progress.train_time_s, "wall_time_s": wall_time_s,
            "tokens_seen": progress.tokens, "tokens_per_s": progress.tokens_per_s}


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


# ---- interpretability maps and pruning ---------------------------------------------------------
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


def write_maps(model, spec: ModelSpec, task: Task, run_dir: str, device, autocast: Callable,
               eval_bs: int, eval_batches: int, threshold: Optional[float], final: Dict) -> Dict:
    """Routing heatmaps, slot usage, s2s maps and importance before/after pruning a copy of the
    NSTM ``model`` (built again from ``spec``) at ``threshold`` (None: the 25th percentile of the
    model's slot importances); returns what was written and the
    pruning report (loss, metric, parameters and forward time before/after)."""
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
            maps = model(one.inputs, return_maps=True).maps
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
    chosen = "given"
    if threshold is None:        # the model's 25th percentile: pruning then removes about a quarter
        threshold = float(torch.quantile(torch.cat([i.float().flatten() for i in before_imp]), 0.25))
        chosen = "the 25th percentile of the model's slot importances"

    # prune a fresh copy (deepcopy would share the router back-references of the original)
    clone = spec.build().to(device)
    clone.load_state_dict(model.state_dict())
    params_before = sum(p.numel() for p in clone.parameters())
    reports = clone.prune_states(threshold)
    params_after = sum(p.numel() for p in clone.parameters())
    ms_before, ms_after = _time_forwards([model, clone], task, batch, autocast)
    after = task.evaluate(clone, eval_bs, eval_batches, device, autocast)
    for i, (layer, imp) in enumerate(zip(clone.nstm_layers(), before_imp)):
        files.append(plots.importance(imp, os.path.join(maps_dir, f"importance_layer{i}.png"),
                                      after=layer.states.importance().detach().cpu(), threshold=threshold,
                                      title=f"{task.name}: layer {i} slot importance before/after pruning"))
    metric = task.metric
    prune = {
        "threshold": threshold, "threshold_is": chosen,
        "slots": [{"before": r.old_num_states, "after": r.new_num_states} for r in reports],
        "loss_before": final.get("loss"), "loss_after": after.get("loss"),
        "metric": metric, "metric_before": final.get(metric), "metric_after": after.get(metric),
        "params_before": params_before, "params_after": params_after,
        "forward_ms_before": ms_before, "forward_ms_after": ms_after,
        "speedup": ms_before / ms_after if ms_after > 0 else None,
        "eval_after": after,
    }
    return {"files": [os.path.relpath(f, os.path.dirname(run_dir)) for f in files], "prune": prune}


__all__ = ["SCHEMA", "RESUME_MAY_CHANGE", "RunFiles", "Progress", "TrainState", "find_checkpoint",
           "upgrade_run_config", "load_for_resume", "results_json", "write_json_atomic", "plot_curves",
           "write_maps", "git_commit", "device_name", "CheckpointError"]
