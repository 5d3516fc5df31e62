"""Markdown tables from the run JSONs that ``python -m nstm.train`` writes.

    python -m nstm.results results/            # rewrite the tables in results/README.md, print them
    python -m nstm.results results/ --stdout   # only print them

Reads every ``<dir>/<task>/<run>.json`` (schema ``nstm-train-results/1``) and writes one table per
task, each row linking to its JSON, between the markers ``<!-- results:begin -->`` and
``<!-- results:end -->`` of ``<dir>/README.md`` (the rest of the README is left alone). Every number
comes from the JSONs.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional

SCHEMA = "nstm-train-results/1"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
TASK_ORDER = ["mqar", "copy", "passkey", "shakespeare", "smnist", "psmnist"]
TITLES = {"mqar": "MQAR: accuracy vs state size", "copy": "Copy: accuracy at L and 4L",
          "passkey": "Passkey retrieval: accuracy by context", "shakespeare": "Shakespeare (characters)",
          "smnist": "Sequential MNIST", "psmnist": "Permuted sequential MNIST"}


def load_runs(root: str) -> List[Dict]:
    """The run JSONs under ``root/<task>/``, sorted by task then run name; ``_path`` is relative to root."""
    runs = []
    for path in sorted(glob.glob(os.path.join(root, "*", "*.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(r, dict) and r.get("schema") == SCHEMA:
            r["_path"] = os.path.relpath(path, root).replace(os.sep, "/")
            runs.append(r)
    return runs


# ---- formatting ---------------------------------------------------------------------------------
def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def num(x, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def count(x) -> str:
    return "–" if x is None else f"{int(x):,}"


def table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _final(r: Dict) -> Dict:
    return r.get("final") or {}


def _setting(c: Dict, name: str, old: str):
    """``c[name]``, or ``c[old]`` in the JSONs written before the flags took the NSTMConfig names
    (``heads`` -> ``num_heads``, ``layers`` -> ``n_layers``)."""
    return c.get(name, c.get(old))


def state_elements(r: Dict) -> Optional[int]:
    """Recurrent state per layer: NSTM heads·S·(K+V) with K = V = d_model / heads; Transformer: its
    KV cache at the task's training sequence length, 2·T·d_model."""
    c = r.get("config", {})
    if r.get("model") == "nstm":
        heads = _setting(c, "num_heads", "heads")
        hd = c["d_model"] // heads
        return heads * c["num_states"] * 2 * hd
    T = (r.get("task_info") or {}).get("num_pairs")
    T = 4 * T if T is not None and r.get("task") == "mqar" else c.get("seq_len")
    return None if T is None else 2 * T * c["d_model"]


def _model(r: Dict) -> str:
    c = r.get("config", {})
    s = f"{r.get('model')} d{c.get('d_model')} l{_setting(c, 'n_layers', 'layers')}"
    if r.get("model") == "nstm":
        s += f" S{c.get('num_states')} k{c.get('top_k')}"
    return s


def _common(r: Dict) -> List[str]:
    """Run link, model, parameters, steps (status), training time."""
    steps = f"{r.get('steps_done', '–')}/{r.get('config', {}).get('steps', '–')}"
    if r.get("status") not in (None, "completed"):
        steps += f" ({r.get('status')})"
    t = r.get("train_time_s")
    return [f"[{r.get('run_name')}]({r['_path']})", _model(r), count(r.get("param_count")), steps,
            "–" if t is None else f"{t / 60:.1f} min", str(r.get("git_commit", "–"))[:7]]


COMMON = ["run", "model", "params", "steps", "train time", "commit"]


def _evaluated(r: Dict) -> str:
    """How many test examples the final evaluation scored (data-backed classifiers)."""
    size = (r.get("task_info") or {}).get("test_size")
    nb = r.get("config", {}).get("eval_batches")
    bs = (r.get("resolved") or {}).get("eval_batch_size")
    if size is None or nb is None or bs is None:
        return "–"
    n = size if nb <= 0 else min(size, nb * bs)
    return f"{n:,} of {size:,}"


def task_table(task: str, runs: List[Dict]) -> str:
    if task == "mqar":
        rows = [_common(r) + [str((r.get("task_info") or {}).get("num_pairs")), count(state_elements(r)),
                              pct(_final(r).get("accuracy")), pct(_final(r).get("exact"))] for r in runs]
        return table(COMMON + ["pairs", "state elements / layer", "test accuracy", "all queries right"], rows)
    if task == "copy":
        L = [(r.get("task_info") or {}).get("eval_lengths", [None, None]) for r in runs]
        rows = [_common(r) + [str(ls[0]), pct(_final(r).get(f"L{ls[0]}/accuracy")),
                              pct(_final(r).get(f"L{ls[-1]}/accuracy")), pct(_final(r).get(f"L{ls[-1]}/exact"))]
                for r, ls in zip(runs, L)]
        return table(COMMON + ["L", "accuracy at L", "accuracy at 4L", "exact copies at 4L"], rows)
    if task == "passkey":
        ctxs = sorted({c for r in runs for c in (r.get("task_info") or {}).get("eval_contexts", [])})
        rows = []
        for r in runs:
            mine = (r.get("task_info") or {}).get("eval_contexts", [])
            w = r.get("wall_time_s")
            rows.append(_common(r) + ["–" if w is None else f"{w / 60:.1f} min",
                                      count((r.get("task_info") or {}).get("train_context"))]
                        + [pct(_final(r).get(f"ctx{c}/accuracy")) if c in mine else "not run" for c in ctxs])
        return table(COMMON + ["wall time (with evaluation)", "train context"]
                     + [f"acc @ {c:,}" for c in ctxs], rows)
    if task in ("shakespeare", "wikitext2"):
        rows = [_common(r) + [num(_final(r).get("loss")), num(_final(r).get("bpc")),
                              count(_final(r).get("tokens_per_s"))] for r in runs]
        return table(COMMON + ["val loss (nats/char)", "val bits/char", "train tokens/s"], rows)
    if task in ("smnist", "psmnist", "cifar10"):
        rows = [_common(r) + [pct(_final(r).get("accuracy")), _evaluated(r)] for r in runs]
        return table(COMMON + ["test accuracy", "test examples scored"], rows)
    rows = [_common(r) + [str(r.get("metric")), num(_final(r).get(r.get("metric", "")))] for r in runs]
    return table(COMMON + ["metric", "value"], rows)


def pruning_table(runs: List[Dict]) -> Optional[str]:
    rows = []
    for r in runs:
        p = (r.get("maps") or {}).get("prune")
        if not p:
            continue
        slots = ", ".join(f"{s['before']}→{s['after']}" for s in p.get("slots", []))
        files = (r.get("maps") or {}).get("files") or []
        task_dir = os.path.dirname(r["_path"])
        pngs = (f"[{len(files)} PNGs]({task_dir}/{os.path.dirname(files[0]).replace(os.sep, '/')}/)"
                if files else "–")
        rows.append([f"[{r.get('run_name')}]({r['_path']})", r.get("task", "–"), str(p.get("threshold")), slots,
                     f"{count(p.get('params_before'))} → {count(p.get('params_after'))}",
                     f"{num(p.get('loss_before'))} → {num(p.get('loss_after'))}",
                     f"{pct(p.get('metric_before'))} → {pct(p.get('metric_after'))}"
                     if p.get("metric") == "accuracy"
                     else f"{num(p.get('metric_before'))} → {num(p.get('metric_after'))}",
                     f"{num(p.get('forward_ms_before'), 1)} → {num(p.get('forward_ms_after'), 1)}",
                     "–" if p.get("speedup") is None else f"{p['speedup']:.2f}×", pngs])
    if not rows:
        return None
    return table(["run", "task", "threshold", "slots per layer", "params", "eval loss", "metric",
                  "forward ms", "speed-up", "maps"], rows)


def provenance(runs: List[Dict]) -> str:
    """One line: the commits, torch versions and devices the runs recorded."""
    def values(key):
        return ", ".join(sorted({str(r.get(key)) for r in runs}))
    commits = ", ".join(sorted({str(r.get("git_commit"))[:7] for r in runs}))
    return (f"{len(runs)} runs; git commit {commits}; torch {values('torch_version')}; "
            f"device {values('device_name')}.")


def eval_only(r: Dict) -> bool:
    """A run resumed from a checkpoint that trained no further step: it repeats its source run's
    numbers, so it is listed in the pruning table only."""
    return r.get("resumed_at_step") is not None and r.get("resumed_at_step") == r.get("steps_done")


def render(runs: List[Dict]) -> str:
    by_task: Dict[str, List[Dict]] = {}
    for r in runs:
        if eval_only(r):        # a resumed run that trained no step (e.g. --maps on a checkpoint)
            continue
        by_task.setdefault(r.get("task", "?"), []).append(r)
    order = [t for t in TASK_ORDER if t in by_task] + sorted(t for t in by_task if t not in TASK_ORDER)
    parts = [provenance(runs)]
    for t in order:
        rows = sorted(by_task[t], key=lambda r: (r.get("model") != "nstm", r.get("steps_done") or 0,
                                                 r.get("run_name") or ""))
        parts.append(f"### {TITLES.get(t, t)}\n\n" + task_table(t, rows))
    p = pruning_table(runs)
    if p:
        parts.append("### Pruning (`--maps --prune-threshold`)\n\n" + p)
    return "\n\n".join(parts) + "\n"


def update_readme(path: str, body: str) -> bool:
    """Replace the text between the markers of ``path``; False when the file or a marker is missing."""
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        text = f.read()
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        return False
    new = text[:i + len(BEGIN)] + "\n" + body + text[j:]
    with open(path, "w") as f:
        f.write(new)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nstm.results", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", default="results", help="results directory (default results)")
    ap.add_argument("--stdout", action="store_true", help="print the tables; leave README.md alone")
    a = ap.parse_args(argv)
    runs = load_runs(a.root)
    if not runs:
        print(f"no run JSONs under {a.root}/<task>/", file=sys.stderr)
        return 1
    body = render(runs)
    print(body, end="")
    if not a.stdout:
        readme = os.path.join(a.root, "README.md")
        if update_readme(readme, body):
            print(f"updated {readme}", file=sys.stderr)
        else:
            print(f"{readme} has no {BEGIN} ... {END} markers: nothing written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
