"""Progress bars for the long jobs (training, evaluation, data fetch, benchmarks).

``progress(...)`` takes tqdm's arguments and returns a tqdm bar, or a silent stand-in with the
same methods (``update``, ``set_postfix``, ``write``, ``close``, iteration, ``with``) when the bar
is switched off: by the caller (``enabled=False``, the CLIs' ``--no-progress``), when stdout is not
a terminal (a log file, CI, a pipe), with ``NSTM_PROGRESS=0`` in the environment, or when tqdm is
not installed. ``NSTM_PROGRESS=1`` forces bars on even without a terminal. Bars draw on stderr, so
a program's stdout stays clean.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Optional

from nstm_kernels import settings

__all__ = ["progress", "progress_enabled"]


def progress_enabled(enabled: bool = True) -> bool:
    """Whether a bar would be drawn: ``enabled``, tqdm importable and stdout a terminal (or
    ``NSTM_PROGRESS=1``); ``NSTM_PROGRESS=0`` turns every bar off."""
    env = settings.progress_override()
    if not enabled or env is False:
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    if env:
        return True
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):   # replaced or closed stdout
        return False


class _Silent:
    """What ``progress`` returns when no bar is drawn: iterates over ``iterable``, counts, and
    prints ``write`` messages to stderr (they are log lines, not bar decoration)."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None,
                 initial: int = 0, **_: Any):
        self.iterable, self.total, self.n = iterable, total, initial

    def __iter__(self):
        for item in self.iterable if self.iterable is not None else ():
            self.n += 1
            yield item

    def __len__(self):
        return len(self.iterable) if self.iterable is not None else (self.total or 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(msg: str, file=None, **_: Any) -> None:
        print(msg, file=file or sys.stderr, flush=True)


def progress(iterable: Optional[Iterable] = None, *, enabled: bool = True, **kwargs: Any):
    """A tqdm bar on stderr over ``iterable`` (or for ``total=`` manual updates), or a silent
    stand-in (see the module doc). ``kwargs`` go to tqdm (``desc``, ``total``, ``unit``, ...)."""
    if not progress_enabled(enabled):
        return _Silent(iterable, **kwargs)
    from tqdm.auto import tqdm

    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)
