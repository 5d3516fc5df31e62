"""What the two extensions built on first use (the CUDA step, the CPU operator) share: where they
are built and how a failed build is reported."""
from __future__ import annotations

import os
from typing import Optional


def build_dir(override: Optional[str], tag: str) -> str:
    """``override`` (an environment variable's value), else ``~/.cache/nstm_kernels/<tag>``."""
    if override:
        return override
    return os.path.join(os.path.expanduser("~"), ".cache", "nstm_kernels", tag)


def build_failure(e: BaseException, directory: str, what: str) -> RuntimeError:
    """The error to raise for a failed build of ``what``: its first line, and the full text kept
    in ``<directory>/build.log``."""
    log = os.path.join(directory, "build.log")
    try:
        with open(log, "w", encoding="utf-8") as f:
            f.write(f"{type(e).__name__}: {e}")
    except OSError:
        log = "(not written)"
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return RuntimeError(f"building {what} failed: {first[:200]} (full log: {log})")
