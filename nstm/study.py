"""Run a learning study from a config file: tasks x models x learning rates x seeds, resumable.

    nstm-study study/cpu.toml                 # run (or continue) the study; writes the summary
    nstm-study study/cpu.toml --dry-run       # list the runs and what is done, run nothing
    nstm-study study/cpu.toml --report        # only rebuild summary.json, the tables and plots
    nstm-study study/cpu.toml --only copy     # only the entries of task copy

Each run is one ``nstm-train`` process (its own thread count, a log file, ``--resume auto`` when
its checkpoint exists), so an interrupted study continues where it stopped: a run whose JSON says
it finished is never run again. After every run the study rewrites

* ``summary.json``: a list of rows ``{"task", "setting", "model", "metric", "value", "std",
  "seeds", "params", "steps", "state_elements", "train_seconds", "cpu_minutes", "lr", "lrs",
  "commit", "device", "complete", "bar", "bar_met"}``; ``value`` is the mean over seeds at the
  learning rate with the best mean (picked per task, setting and model), ``std`` the sample
  standard deviation over those seeds (0 with one seed); ``cpu_minutes`` is what the whole row
  cost, the learning-rate sweep included (wall time x threads);
* the study's section of the README (between ``<!-- study:begin -->`` and ``<!-- study:end -->``)
  with one table per task and the plots: accuracy against state size, and evaluation curves with
  seed bands.

The config (TOML, or JSON with the same structure)::

    [study]
    out = "results/study"             # the runs' files (<out>/<task>/<run>.json, logs in <out>/logs)
    summary = "results/summary.json"
    readme = "results/README.md"
    seeds = [0, 1, 2]
    threads = 2                       # OMP threads per run; runs go one at a time
    device = "cpu"
    # relative paths here and in the flags (data-root = "../data") are relative to the config's folder

    [defaults]                        # nstm-train flags of every run (names as on the command line)
    d-model = 64
    n-layers = 2

    [[entry]]
    task = "copy"                     # the summary's task name
    setting = "L=32"                  # what tells this entry apart from others of the task
    flags = {task = "copy", seq-len = 32, steps = 400}
    models = ["nstm", "transformer", {name = "nstm", flags = {write-pointer = 32}, label = "nstm-wp"}]
    lrs = [1e-3, 3e-3]
    metrics = [{key = "L32/accuracy", metric = "accuracy"},
               {key = "L64/accuracy", metric = "accuracy", setting = "L=32, scored at 2L"}]
    bar = {model = "nstm", at_least = 0.99}        # or {model = "nstm", at_most_ratio = 1.02, of = "transformer"}

The first metric of an entry picks the learning rate (higher is better for accuracies, lower for
losses: ``lower_is_better = true`` on the metric). A model is a name of ``nstm-train --model``
(``nstm``, ``transformer``, ``nstm-no-s2s``, ``gsa``) or a table with that ``name``, extra
``flags``, a ``label`` (the summary's model name) and its own ``lrs`` (default: the entry's), e.g.
``{name = "nstm", label = "nstm+wp", flags = {write-pointer = 32}, lrs = [1e-2]}``. A metric whose
name or key ends in ``loss`` is lower-is-better unless it says ``lower_is_better = false``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from nstm_kernels import settings

from .progress import progress
from .runs import write_json_atomic

BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
SUMMARY_KEYS = ("task", "setting", "model", "metric", "value", "std", "seeds", "params", "steps",
                "state_elements", "train_seconds", "cpu_minutes", "lr", "lrs", "commit", "device",
                "complete", "bar", "bar_met")
MODEL_NAMES = ("nstm", "transformer", "nstm-no-s2s", "gsa")


class StudyError(ValueError):
    """A config the study cannot run: says which entry and what was expected."""


# ---- the config ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    name: str                          # nstm-train --model
    label: str                         # the summary's model name
    flags: Dict[str, Any] = field(default_factory=dict)
    lrs: Tuple[float, ...] = ()        # its own learning rates (empty: the entry's)


@dataclass(frozen=True)
class Metric:
    key: str                           # the key in the run JSON's "final"
    metric: str                        # the summary's metric name
    setting: str
    lower_is_better: bool = False


@dataclass(frozen=True)
class Entry:
    task: str
    setting: str
    flags: Dict[str, Any]
    models: Tuple[Model, ...]
    lrs: Tuple[float, ...]
    metrics: Tuple[Metric, ...]
    bar: Optional[Dict[str, Any]]
    seeds: Tuple[int, ...]
    chance: Optional[float] = None     # the accuracy of guessing (a line in the plots)
    length: Optional[int] = None       # tokens per scored sequence, when the run JSON does not say

    def lrs_of(self, model: Model) -> Tuple[float, ...]:
        """The learning rates swept for ``model``: its own ``lrs`` if the config gives them."""
        return model.lrs or self.lrs


@dataclass(frozen=True)
class Run:
    entry: Entry
    model: Model
    lr: float
    seed: int

    @property
    def task_dir(self) -> str:
        return self.entry.flags["task"]

    @property
    def name(self) -> str:
        setting = "".join(c if c.isalnum() else "-" for c in self.entry.setting).strip("-")
        parts = [self.entry.task, setting, self.model.label, f"lr{self.lr:g}", f"s{self.seed}"]
        return "-".join(p for p in parts if p).replace("--", "-")


@dataclass
class Study:
    path: str
    out: str
    summary: str
    readme: Optional[str]
    threads: int
    device: str
    defaults: Dict[str, Any]
    entries: List[Entry]

    @property
    def folder(self) -> str:
        """The config's folder: the runs' working directory, what relative paths are relative to."""
        return os.path.dirname(os.path.abspath(self.path))

    def runs(self, only: Optional[Sequence[str]] = None) -> List[Run]:
        """Seed by seed within each entry, so a partial study has every model and learning rate."""
        return [Run(e, m, lr, s) for e in self.entries if not only or e.task in only
                for s in e.seeds for m in e.models for lr in e.lrs_of(m)]


def _read(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise StudyError(f"study config {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".json"):
        try:
            return json.loads(raw)
        except ValueError as e:
            raise StudyError(f"{path}: not valid JSON ({e})") from None
    try:
        import tomllib
    except ImportError:                       # Python < 3.11
        raise StudyError(f"{path}: TOML configs need Python 3.11 (tomllib); write it as JSON") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise StudyError(f"{path}: not valid TOML ({e})") from None


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _parser():
    from .train import build_parser
    return build_parser()


def _check_lrs(path: str, where: str, lrs: Any) -> Tuple[float, ...]:
    if not (isinstance(lrs, list) and lrs and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  and x > 0 for x in lrs)):
        raise StudyError(f"{path}: {where}: lrs must be a non-empty list of positive numbers, got {lrs!r}")
    return tuple(float(x) for x in lrs)


def load_config(path: str) -> Study:
    """The study ``path`` describes; a missing or misspelt field is a ``StudyError`` naming it."""
    from .train import MODELS

    cfg = _read(path)
    unknown = set(cfg) - {"study", "defaults", "entry"}
    if unknown:
        raise StudyError(f"{path}: unknown top-level table(s) {sorted(unknown)}; expected study, defaults, entry")
    st = cfg.get("study", {})
    known = {"out", "summary", "readme", "seeds", "threads", "device"}
    if set(st) - known:
        raise StudyError(f"{path}: unknown [study] field(s) {sorted(set(st) - known)}; expected {sorted(known)}")
    base = os.path.dirname(os.path.abspath(path))

    def rel(p):
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    seeds = st.get("seeds", [0, 1, 2])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise StudyError(f"{path}: [study] seeds must be a non-empty list of integers, got {seeds!r}")
    threads = st.get("threads", 1)
    if not isinstance(threads, int) or threads < 1:
        raise StudyError(f"{path}: [study] threads must be an integer >= 1, got {threads!r}")
    actions = _parser()._actions
    flags_known = {a.dest for a in actions} | {o.lstrip("-").replace("-", "_")
                                               for a in actions for o in a.option_strings}
    managed = {"lr", "seed", "run_name", "out", "resume", "overwrite", "device"}

    def check_flags(where, flags):
        if not isinstance(flags, dict):
            raise StudyError(f"{path}: {where} must be a table of nstm-train flags, got {flags!r}")
        for k in flags:
            dest = k.replace("-", "_")
            if dest not in flags_known:
                raise StudyError(f"{path}: {where}: {k!r} is not an nstm-train flag")
            if dest in managed:
                raise StudyError(f"{path}: {where}: {k!r} is set by the study (lrs, seeds, names, out, device)")
        return dict(flags)

    defaults = check_flags("[defaults]", cfg.get("defaults", {}))
    entries = []
    for i, e in enumerate(cfg.get("entry", [])):
        where = f"entry {i + 1}"
        extra = set(e) - {"task", "setting", "flags", "models", "lrs", "metrics", "bar", "seeds", "chance", "length"}
        if extra:
            raise StudyError(f"{path}: {where}: unknown field(s) {sorted(extra)}")
        for req in ("task", "flags", "models", "lrs", "metrics"):
            if req not in e:
                raise StudyError(f"{path}: {where}: missing {req!r}")
        flags = check_flags(f"{where} flags", e["flags"])
        if "task" not in flags:
            raise StudyError(f"{path}: {where}: flags must name the nstm-train task (task = ...)")
        models = []
        for m in e["models"]:
            m = {"name": m} if isinstance(m, str) else m
            if not isinstance(m, dict) or m.get("name") not in MODELS:
                raise StudyError(f"{path}: {where}: a model is one of {list(MODELS)} or a table with that "
                                 f"name, got {m!r}")
            extra = set(m) - {"name", "label", "flags", "lrs"}
            if extra:
                raise StudyError(f"{path}: {where}: unknown model keys {sorted(extra)} in {m!r} "
                                 f"(a model table has name, label, flags, lrs)")
            label = m.get("label", m["name"])
            models.append(Model(m["name"], label,
                                check_flags(f"{where} model {m['name']} flags", m.get("flags", {})),
                                _check_lrs(path, f"{where} model {label}", m["lrs"]) if "lrs" in m else ()))
        labels = [m.label for m in models]
        if len(set(labels)) != len(labels):
            raise StudyError(f"{path}: {where}: model labels must differ, got {labels}")
        lrs = _check_lrs(path, where, e["lrs"])
        metrics = []
        for m in e["metrics"]:
            if not isinstance(m, dict) or "key" not in m or "metric" not in m:
                raise StudyError(f"{path}: {where}: a metric is a table with key and metric, got {m!r}")
            if not (isinstance(m["key"], str) and isinstance(m["metric"], str)):
                raise StudyError(f"{path}: {where}: a metric's key and metric must be strings, got {m!r}")
            # a loss is lower-is-better unless the config says otherwise
            lower = m.get("lower_is_better", m["metric"].endswith("loss") or m["key"].endswith("loss"))
            if not isinstance(lower, bool):
                raise StudyError(f"{path}: {where}: lower_is_better must be true or false, got {lower!r}")
            metrics.append(Metric(m["key"], m["metric"], m.get("setting", e.get("setting", "")), lower))
        if not metrics:
            raise StudyError(f"{path}: {where}: metrics must not be empty")
        bar = e.get("bar")
        if bar is not None and not (isinstance(bar, dict) and "model" in bar
                                    and ("at_least" in bar or "at_most_ratio" in bar)):
            raise StudyError(f"{path}: {where}: bar is {{model, at_least}} or {{model, at_most_ratio, of}}, "
                             f"got {bar!r}")
        eseeds = e.get("seeds", seeds)
        for name in ("chance", "length"):
            if name in e and not (isinstance(e[name], (int, float)) and e[name] > 0):
                raise StudyError(f"{path}: {where}: {name} must be a positive number, got {e[name]!r}")
        entries.append(Entry(e["task"], e.get("setting", ""), flags, tuple(models), lrs,
                             tuple(metrics), bar, tuple(eseeds), e.get("chance"),
                             int(e["length"]) if "length" in e else None))
    if not entries:
        raise StudyError(f"{path}: no [[entry]] tables: nothing to run")
    names = [r.name for e in entries
             for r in (Run(e, m, lr, s) for m in e.models for lr in e.lrs_of(m) for s in e.seeds)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StudyError(f"{path}: two runs would share a name ({dup[:3]}): give the entries different settings")
    return Study(path, rel(st.get("out", "results/study")), rel(st.get("summary", "results/summary.json")),
                 rel(st["readme"]) if st.get("readme") else None, threads, st.get("device", "cpu"), defaults, entries)


# ---- running ------------------------------------------------------------------------------------
def run_json_path(study: Study, run: Run) -> str:
    return os.path.join(study.out, run.task_dir, run.name + ".json")


def load_run(study: Study, run: Run) -> Optional[Dict[str, Any]]:
    try:
        with open(run_json_path(study, run)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_done(result: Optional[Dict[str, Any]]) -> bool:
    """A run is done when its final evaluation was written: completed, stopped by its time budget,
    or diverged (counted with the metrics it ended with; running it again would diverge again)."""
    if not result or result.get("final") is None:
        return False
    status = str(result.get("status"))
    return status in ("completed", "time_budget") or status.startswith("diverged")


def train_argv(study: Study, run: Run) -> List[str]:
    flags = dict(study.defaults)
    flags.update(run.entry.flags)
    flags.update(run.model.flags)
    argv = []
    negatable = {o for a in _parser()._actions for o in a.option_strings if o.startswith("--no-")}
    for k, v in flags.items():
        if isinstance(v, bool):     # a switch: on, or its --no- form when it has one (off is its default)
            if v:
                argv.append(f"--{_flag(k)}")
            elif f"--no-{_flag(k)}" in negatable:
                argv.append(f"--no-{_flag(k)}")
        else:
            argv += [f"--{_flag(k)}", str(v)]
    # --out relative to the config's folder (the runs' working directory), so that the run JSONs
    # and logs name no machine's paths
    out = os.path.relpath(study.out, study.folder)
    argv += ["--model", run.model.name, "--lr", f"{run.lr:g}", "--seed", str(run.seed), "--device", study.device,
             "--out", out, "--run-name", run.name, "--no-progress"]
    ckpt = os.path.join(study.out, run.task_dir, run.name, "ckpt.pt")
    argv += ["--resume", "auto"] if os.path.exists(ckpt) else ["--overwrite"]
    return argv


def run_one(study: Study, run: Run) -> int:
    """Train one run in its own process (log under ``<out>/logs``); returns its exit status."""
    logs = os.path.join(study.out, "logs")
    os.makedirs(logs, exist_ok=True)
    argv = train_argv(study, run)
    cmd = [sys.executable, "-m", "nstm.train"] + argv
    env = settings.child_env(OMP_NUM_THREADS=str(study.threads), MKL_NUM_THREADS=str(study.threads))
    with open(os.path.join(logs, run.name + ".log"), "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} (in the config's folder, "
                  f"OMP_NUM_THREADS={study.threads}) python -m nstm.train {' '.join(argv)}\n")
        log.flush()
        # from the config's folder, so that relative paths in its flags (data-root) mean the same
        # wherever the study is started
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=study.folder)


# ---- the summary ----------------------------------------------------------------------------------
def state_elements(result: Dict[str, Any], length: Optional[int]) -> Optional[int]:
    """Numbers a model keeps to process the next token: NSTM's slots (H S (K + V) per layer) and
    short-conv cache ((w - 1) 3 H K), the Transformer's KV cache at ``length`` (2 T D per layer)."""
    c = result.get("config", {})
    d, layers, heads = c.get("d_model"), c.get("n_layers", c.get("layers")), c.get("num_heads", c.get("heads"))
    if d is None or layers is None or heads is None:
        return None
    if result.get("model") == "transformer":
        return None if length is None else 2 * length * d * layers
    k = c.get("head_dim") or d // heads
    conv = max(0, (c.get("conv_size") or 0) - 1) * 3 * heads * k
    return layers * (heads * c["num_states"] * 2 * k + conv)


def _length(result: Dict[str, Any], metric: Metric, default: Optional[int] = None) -> Optional[int]:
    """The sequence length the metric was scored at (copy's L64/..., passkey's ctx4096/...)."""
    head = metric.key.split("/")[0]
    digits = "".join(ch for ch in head if ch.isdigit())
    if digits and head.rstrip("0123456789") in ("L", "ctx"):
        n = int(digits)
        return 2 * n + 1 if head.startswith("L") else n          # copy: L tokens, separator, L answers
    info = result.get("task_info", {})
    return default or info.get("seq_len") or result.get("config", {}).get("seq_len")


def _stats(values: List[float]) -> Tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(study: Study) -> List[Dict[str, Any]]:
    """The summary rows of every (entry, model, metric) with at least one finished run."""
    rows = []
    for e in study.entries:
        for m in e.models:
            by_lr: Dict[float, List[Dict]] = {}
            cost = 0.0
            for lr in e.lrs_of(m):
                for s in e.seeds:
                    r = load_run(study, Run(e, m, lr, s))
                    if r is not None and r.get("wall_time_s"):
                        cost += r["wall_time_s"] * study.threads / 60
                    if is_done(r):
                        by_lr.setdefault(lr, []).append(r)
            if not by_lr:
                continue
            pick = e.metrics[0]

            def score(lr):
                vals = [r["final"].get(pick.key) for r in by_lr[lr]]
                vals = [v for v in vals if v is not None and math.isfinite(v)]
                if not vals:
                    return -math.inf
                mean = statistics.fmean(vals)
                return -mean if pick.lower_is_better else mean

            best = max(by_lr, key=lambda lr: (len(by_lr[lr]), score(lr)))   # most seeds first, then best
            done = by_lr[best]
            for met in e.metrics:
                vals = [r["final"].get(met.key) for r in done]
                if any(v is None for v in vals):
                    continue
                mean, std = _stats(vals)
                row = {
                    "task": e.task, "setting": met.setting, "model": m.label, "metric": met.metric,
                    "value": mean, "std": std, "seeds": sorted(r["config"]["seed"] for r in done),
                    "params": done[0].get("param_count"), "steps": done[0].get("steps_done"),
                    "state_elements": state_elements(done[0], _length(done[0], met, e.length)),
                    "train_seconds": statistics.fmean(r.get("train_time_s") or 0.0 for r in done),
                    "cpu_minutes": round(cost, 2), "lr": best, "lrs": sorted(by_lr),
                    "commit": ",".join(sorted({(r.get("git_commit") or "?")[:7] for r in done})),
                    "device": done[0].get("device_name"),
                    "complete": all(len(by_lr.get(lr, [])) == len(e.seeds) for lr in e.lrs_of(m)),
                    "bar": None, "bar_met": None,
                }
                rows.append(row)
    _judge(study, rows)
    return rows


def _judge(study: Study, rows: List[Dict[str, Any]]) -> None:
    """Fill ``bar``/``bar_met`` on the first metric's row of the entry's bar model."""
    for e in study.entries:
        if not e.bar:
            continue
        first = e.metrics[0]
        mine = [r for r in rows if r["task"] == e.task and r["setting"] == first.setting
                and r["model"] == e.bar["model"] and r["metric"] == first.metric]
        for r in mine:
            if "at_least" in e.bar:
                r["bar"] = f">= {e.bar['at_least']:g}"
                r["bar_met"] = r["value"] >= e.bar["at_least"]
            else:
                of = [o for o in rows if o["task"] == e.task and o["setting"] == first.setting
                      and o["model"] == e.bar.get("of", "transformer") and o["metric"] == first.metric]
                r["bar"] = f"<= {e.bar['at_most_ratio']:g} x {e.bar.get('of', 'transformer')}"
                r["bar_met"] = (r["value"] <= e.bar["at_most_ratio"] * of[0]["value"]) if of else None


# ---- the report ---------------------------------------------------------------------------------
def _fmt(row: Dict[str, Any]) -> str:
    v, s = row["value"], row["std"]
    if "accuracy" in row["metric"]:
        return f"{100 * v:.2f} ± {100 * s:.2f} %"
    return f"{v:.4f} ± {s:.4f}"


def tables(rows: List[Dict[str, Any]]) -> str:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        out.append(f"### {task}\n")
        out.append("| setting | model | metric | mean ± std | seeds | lr (of) | params | steps | state elements "
                   "| train s / run | CPU min (row) | bar |")
        out.append("| --- " * 12 + "|")
        for r in (r for r in rows if r["task"] == task):
            bar = "" if r["bar"] is None else f"{r['bar']}: {'met' if r['bar_met'] else 'missed'}" \
                if r["bar_met"] is not None else f"{r['bar']}: no peer"
            seeds = ",".join(map(str, r["seeds"])) + ("" if r["complete"] else " (partial)")
            out.append(f"| {r['setting']} | {r['model']} | {r['metric']} | {_fmt(r)} | {seeds} | "
                       f"{r['lr']:g} ({', '.join(f'{x:g}' for x in r['lrs'])}) | {r['params'] or 0:,} | "
                       f"{r['steps']} | {r['state_elements'] or 0:,} | {r['train_seconds']:.0f} | "
                       f"{r['cpu_minutes']:.1f} | {bar} |")
        out.append("")
    return "\n".join(out)


def plot(study: Study, rows: List[Dict[str, Any]]) -> List[str]:
    """Accuracy against state size (per task, one point per model and setting) and evaluation
    curves with seed bands (mean ± std over the chosen learning rate's seeds). Returns the files."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    os.makedirs(study.out, exist_ok=True)
    acc = [r for r in rows if "accuracy" in r["metric"] and r["state_elements"]]
    tasks = list(dict.fromkeys(r["task"] for r in acc))
    chance = {e.task: e.chance for e in study.entries if e.chance}
    markers = "osD^v<>"
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            models = list(dict.fromkeys(r["model"] for r in acc if r["task"] == task))
            settings = list(dict.fromkeys(r["setting"] for r in acc if r["task"] == task))
            for mi, model in enumerate(models):
                for si, setting in enumerate(settings):
                    pts = sorted((r["state_elements"], r["value"], r["std"]) for r in acc
                                 if r["task"] == task and r["model"] == model and r["setting"] == setting)
                    if pts:
                        ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                                    marker=markers[si % len(markers)], color=f"C{mi}", capsize=3, linestyle="none",
                                    fillstyle="full" if si == 0 else "none", label=f"{model}, {setting}")
            if task in chance:
                ax.axhline(100 * chance[task], color="grey", linestyle=":", label=f"chance ({100 * chance[task]:g} %)")
            ax.set_xscale("log")
            ax.set_xlabel("state elements (numbers kept per token, all layers)")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(-2, 102)
            ax.set_title(f"{task}: accuracy against state size (mean ± std over seeds)", fontsize=9)
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = os.path.join(study.out, "accuracy-vs-state.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    for e in study.entries:
        pick = e.metrics[0]
        curves = {}                       # label -> (train loss series, evaluation series), one per seed
        for m in e.models:
            row = next((r for r in rows if r["task"] == e.task and r["model"] == m.label
                        and r["setting"] == pick.setting and r["metric"] == pick.metric), None)
            if row is None:
                continue
            train, evals = [], []
            for s in row["seeds"]:
                hist = (load_run(study, Run(e, m, row["lr"], s)) or {}).get("history", {})
                train.append([(h["step"], h["loss"]) for h in hist.get("train", []) if "loss" in h])
                evals.append([(h["step"], h[pick.key]) for h in hist.get("eval", []) if pick.key in h])
            curves[f"{m.label} (lr {row['lr']:g}, {len(row['seeds'])} seeds)"] = (train, evals)
        if not curves:
            continue
        scale = 100 if "accuracy" in pick.metric else 1
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for i, (label, pair) in enumerate(curves.items()):
            for ax, series, sc in ((axes[0], pair[0], 1), (axes[1], pair[1], scale)):
                series = [pts for pts in series if pts]
                if not series:
                    continue
                steps = sorted(set.intersection(*(set(st for st, _ in pts) for pts in series)))
                vals = [[dict(pts)[st] for pts in series] for st in steps]
                mean = [sc * statistics.fmean(v) for v in vals]
                std = [sc * statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
                ax.plot(steps, mean, marker="." if len(steps) < 30 else None, color=f"C{i}", label=label)
                ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                                color=f"C{i}", alpha=0.2)
        if e.chance and "accuracy" in pick.metric:
            axes[1].axhline(100 * e.chance, color="grey", linestyle=":", label=f"chance ({100 * e.chance:g} %)")
        axes[0].set_ylabel("training loss (nats per scored token)")
        axes[1].set_ylabel(f"{pick.key}" + (" (%)" if "accuracy" in pick.metric else ""))
        for ax, what in zip(axes, ("training loss", "evaluation")):
            ax.set_xlabel("optimiser step")
            ax.set_title(f"{e.task} {e.setting}: {what}, mean ± std over seeds", fontsize=9)
            if ax.get_legend_handles_labels()[0]:      # an axis with no series gets no empty legend
                ax.legend(fontsize=6)
        fig.tight_layout()
        slug = "".join(c if c.isalnum() else "-" for c in f"{e.task}-{e.setting}").strip("-")
        path = os.path.join(study.out, f"curves-{slug}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def write_report(study: Study) -> List[Dict[str, Any]]:
    """summary.json, the plots and the README section from the run JSONs; returns the rows."""
    rows = summarize(study)
    os.makedirs(os.path.dirname(study.summary) or ".", exist_ok=True)
    write_json_atomic(study.summary, rows)
    files = plot(study, rows)
    if study.readme:
        base = os.path.dirname(study.readme)
        pics = "\n".join(f"![{os.path.basename(f)}]({os.path.relpath(f, base).replace(os.sep, '/')})" for f in files)
        body = (f"Generated by `nstm-study {os.path.relpath(study.path, base).replace(os.sep, '/')} --report` "
                f"from `{os.path.relpath(study.summary, base).replace(os.sep, '/')}`; do not edit by hand.\n\n"
                + (tables(rows) if rows else "No run has finished yet.\n") + "\n" + pics + "\n")
        text = open(study.readme, encoding="utf-8").read() if os.path.exists(study.readme) else ""
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + BEGIN + "\n" + body + END + rest.split(END, 1)[1]
        else:
            text = text + ("\n" if text else "") + f"## Study\n\n{BEGIN}\n{body}{END}\n"
        tmp = study.readme + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, study.readme)
    return rows


# ---- the command ----------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="nstm-study", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="the study's TOML (or JSON) file")
    ap.add_argument("--only", default=None, help="comma-separated task names: run only their entries")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    ap.add_argument("--report", action="store_true", help="only rebuild summary.json, the tables and plots")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (a slice of the study)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    try:
        study = load_config(a.config)
    except StudyError as e:
        ap.error(str(e))
    only = [t.strip() for t in a.only.split(",")] if a.only else None
    if only:
        missing = sorted(set(only) - {e.task for e in study.entries})
        if missing:
            ap.error(f"--only: no entry of task(s) {missing}; the study has {sorted({e.task for e in study.entries})}")
    runs = study.runs(only)
    todo = [r for r in runs if not is_done(load_run(study, r))]
    if a.dry_run:
        for r in runs:
            print(("todo " if r in todo else "done ") + r.name)
        print(f"{len(runs) - len(todo)} of {len(runs)} runs done", file=sys.stderr)
        return 0
    if a.report:
        rows = write_report(study)
        print(f"{len(rows)} summary rows -> {study.summary}", file=sys.stderr)
        return 0
    if a.max_runs is not None:
        todo = todo[: a.max_runs]
    failed = []
    bar = progress(total=len(todo), desc="study", unit="run", enabled=not a.no_progress)
    try:
        for r in todo:
            bar.set_postfix(run=r.name)
            t0 = time.perf_counter()
            rc = run_one(study, r)
            if rc == 130:
                bar.write(f"interrupted in {r.name}; its checkpoint is kept: run the same command to continue")
                write_report(study)
                return 130
            if rc != 0 or not is_done(load_run(study, r)):
                failed.append(r.name)
                bar.write(f"{r.name} failed (exit {rc}); see {os.path.join(study.out, 'logs', r.name + '.log')}")
            else:
                bar.write(f"{r.name}: {time.perf_counter() - t0:.0f} s")
            write_report(study)
            bar.update(1)
    except KeyboardInterrupt:
        write_report(study)
        print("nstm-study: interrupted; run the same command to continue", file=sys.stderr)
        return 130
    finally:
        bar.close()
    write_report(study)
    if failed:
        print(f"nstm-study: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
