"""Training checkpoints: atomic saves, safe loads, config checks on resume.

    save_checkpoint("run/ckpt.pt", model, optimizer, scheduler, step, config, extra={"rng": ...})
    ckpt = load_checkpoint("run/ckpt.pt", map_location="cpu")
    check_resume_config(ckpt["config"], config, ignore=("steps", "time_budget"))
    model.load_state_dict(ckpt["model"])

A save writes a temporary file in the same directory, flushes and fsyncs it, then ``os.replace``-s
it over the target: a crash or an error mid-save leaves the previous checkpoint as it was. Loads use
``torch.load(weights_only=True)``, so everything stored must be tensors or plain Python containers
and scalars (the config, vocabularies and RNG states are stored that way).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, Iterable, Optional

import torch

FORMAT = "nstm-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, not ours, or made for a different configuration."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:           # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:           # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def save_checkpoint(path: str, model: torch.nn.Module, optimizer=None, scheduler=None, step: int = 0,
                    config: Optional[Dict] = None, extra: Optional[Dict] = None) -> str:
    """Save model, optimizer and scheduler states, the step, the run config and ``extra`` (plain
    data: RNG states as tensors, histories as lists of dicts, a vocabulary...) atomically."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "config": dict(config or {}),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": dict(extra or {}),
        "torch_version": str(torch.__version__),
    }
    atomic_torch_save(payload, path)
    return os.fspath(path)


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` (``weights_only=True``: no code runs).

    Raises ``CheckpointError`` for a missing, truncated or foreign file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"could not read checkpoint {path} (corrupt or truncated file?): "
                              f"{type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an nstm training checkpoint")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {ckpt['version']}, "
                              f"this code reads up to {VERSION}")
    for key in ("step", "config", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path} lacks {key!r}: incomplete checkpoint")
    return ckpt


def check_resume_config(saved: Dict, current: Dict, ignore: Iterable[str] = ()) -> None:
    """Raise ``CheckpointError`` listing every setting (outside ``ignore``) whose value differs."""
    ignore = set(ignore)
    keys = sorted((set(saved) | set(current)) - ignore)
    diffs = [f"{k}: checkpoint {saved.get(k, '<unset>')!r} vs now {current.get(k, '<unset>')!r}"
             for k in keys if saved.get(k, "<unset>") != current.get(k, "<unset>")]
    if diffs:
        raise CheckpointError("the checkpoint was made with a different configuration; resume with the "
                              "same settings (or start a new run):\n  " + "\n  ".join(diffs))
