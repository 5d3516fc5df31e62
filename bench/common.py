"""What every benchmark script shares: the commit, the device's name, file names, atomic writes.

Result files are named by what made them: the script's prefix, the commit and the date
(``result_stem``), and a run never overwrites a file that is already there (a tracked result in
``bench/results``, an earlier run of the same commit on the same day): it takes the next free
``-2``, ``-3``, ... suffix instead, and prints where it wrote."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def git_commit() -> str:
    """The short hash of HEAD, or "unknown" outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the number of torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in name)
    return "-".join(p for p in keep.split("-") if p)[:40]


def run_date() -> str:
    """Today as ``YYYYMMDD`` (local time), for result file names."""
    return time.strftime("%Y%m%d")


def result_stem(out_dir: str, name: str, exts: Sequence[str]) -> str:
    """``out_dir/name`` (the folder is created), or ``out_dir/name-2``, ``-3``, ... when a file
    ``<that stem><ext>`` already exists for one of ``exts``: the stem of a new set of result
    files that overwrites nothing."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    stem, n = base, 1
    while any(os.path.exists(stem + ext) for ext in exts):
        n += 1
        stem = f"{base}-{n}"
    return stem


def new_path(path: str) -> str:
    """``path``, or ``<root>-2<ext>``, ``-3``, ... when it exists: a file name that is not taken."""
    root, ext = os.path.splitext(path)
    return result_stem(os.path.dirname(os.path.abspath(path)), os.path.basename(root), [ext]) + ext


def _plain(v, _pos=None) -> str:
    return f"{v:,.0f}" if v >= 1 and v == int(v) else f"{v:g}"


def plain_log_ticks(ax, axes: str = "xy") -> None:
    """Tick labels of a log-scaled axis as plain numbers (0.5, 2, 300, 4,096, 1,048,576), not 2 x 10^0; minor
    ticks are labelled only where a decade would otherwise have few labels."""
    from matplotlib.ticker import FuncFormatter, LogFormatter
    for name in axes:
        axis = ax.xaxis if name == "x" else ax.yaxis
        if axis.get_scale() != "log":
            continue
        axis.set_major_formatter(FuncFormatter(_plain))
        axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))


def atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def timeit(fn, reps: int):
    """``(median, 20 %, 80 % quantile)`` in ms of ``reps`` timed calls of ``fn`` after one warm-up
    (wall clock: for CPU work, or GPU work that synchronises)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return statistics.median(times), q[0], q[-1]
