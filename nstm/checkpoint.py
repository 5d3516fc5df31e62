"""Training checkpoints: atomic saves, safe loads, config checks on resume, models rebuilt from
the checkpoint alone.

    spec = ModelSpec("NSTMLM", NSTMConfig(vocab_size=64, d_model=128))
    model = spec.build()
    save_checkpoint("run/ckpt.pt", model, optimizer, scheduler, step, config, extra={"rng": ...},
                    model_spec=spec)
    ckpt = load_checkpoint("run/ckpt.pt", map_location="cpu")
    check_resume_config(ckpt["config"], config, ignore=("steps", "time_budget"))
    model.load_state_dict(ckpt["model"])
    model = load_model("run/ckpt.pt")          # the same model, from the checkpoint alone

A checkpoint holds ``config`` (the run's settings: the training CLI's flags), and, when saved with
a ``model_spec``, ``model_config`` (the ``NSTMConfig`` as a dict), ``model_class`` and
``model_kwargs`` (the constructor arguments besides the config).

A save writes a temporary file in the same directory, flushes and fsyncs it, then ``os.replace``-s
it over the target: a crash or an error mid-save leaves the previous checkpoint as it was. Loads use
``torch.load(weights_only=True)``, so everything stored must be tensors or plain Python containers
and scalars (the config, vocabularies and RNG states are stored that way).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional

import torch

from .config import NSTMConfig

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


# ---- what model a checkpoint holds ------------------------------------------------------------
MODEL_CLASSES = ("NSTMLM", "NSTMClassifier", "TransformerLM", "TransformerClassifier")


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model: its class name, its ``NSTMConfig`` and the other constructor arguments.

    * ``NSTMLM``: ``NSTMLM.from_config(config)``; ``kwargs`` is empty.
    * ``NSTMClassifier``: ``NSTMClassifier.from_config(config, **kwargs)``, ``kwargs`` holding
      ``num_classes``, ``input_dim`` and ``pool``.
    * ``TransformerLM`` / ``TransformerClassifier``: the class called with ``kwargs`` (all its
      arguments); ``config`` is the NSTM model the baseline was sized against.
    """

    model_class: str
    config: NSTMConfig
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.model_class not in MODEL_CLASSES:
            raise ValueError(f"model_class must be one of {MODEL_CLASSES}, got {self.model_class!r}")
        if not isinstance(self.config, NSTMConfig):
            raise TypeError(f"config must be an NSTMConfig, got {type(self.config).__name__}")

    def build(self) -> torch.nn.Module:
        """A freshly initialised model (draws from the global torch RNG like the constructor)."""
        from . import baseline, models
        if self.model_class == "NSTMLM":
            return models.NSTMLM.from_config(self.config)
        if self.model_class == "NSTMClassifier":
            return models.NSTMClassifier.from_config(self.config, **self.kwargs)
        return getattr(baseline, self.model_class)(**self.kwargs)

    def to_checkpoint(self) -> Dict[str, Any]:
        """The checkpoint entries: ``model_config``, ``model_class``, ``model_kwargs`` (plain data)."""
        return {"model_config": self.config.to_dict(), "model_class": self.model_class,
                "model_kwargs": dict(self.kwargs)}

    @classmethod
    def from_checkpoint(cls, ckpt: Dict[str, Any]) -> ModelSpec:
        """The spec a checkpoint was saved with; ``CheckpointError`` when it has none."""
        if ckpt.get("model_config") is None or ckpt.get("model_class") is None:
            raise CheckpointError("the checkpoint does not describe its model (saved without model_spec, "
                                  "or by an older version): rebuild the model from its 'config'")
        try:
            return cls(ckpt["model_class"], NSTMConfig.from_dict(ckpt["model_config"]),
                       dict(ckpt.get("model_kwargs") or {}))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"the checkpoint's model description is invalid: {e}") from e


# ---- save and load -----------------------------------------------------------------------------
def save_checkpoint(path: str, model: torch.nn.Module, optimizer=None, scheduler=None, step: int = 0,
                    config: Optional[Dict] = None, extra: Optional[Dict] = None,
                    model_spec: Optional[ModelSpec] = None) -> str:
    """Save model, optimizer and scheduler states, the step, the run config, ``extra`` (plain
    data: RNG states as tensors, histories as lists of dicts, a vocabulary...) and, given
    ``model_spec``, what builds the model again (``load_model``), atomically."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "config": dict(config or {}),
        # a module or its state dict (a full state gathered from shards, say)
        "model": model if isinstance(model, dict) else model.state_dict(),
        "optimizer": optimizer if optimizer is None or isinstance(optimizer, dict) else optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": dict(extra or {}),
        "torch_version": str(torch.__version__),
    }
    if model_spec is not None:
        payload.update(model_spec.to_checkpoint())
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


def load_model(path: str, map_location="cpu") -> torch.nn.Module:
    """The model of a checkpoint saved with a ``model_spec``: built from the spec, weights loaded."""
    ckpt = load_checkpoint(path, map_location=map_location)
    model = ModelSpec.from_checkpoint(ckpt).build()
    model.load_state_dict(ckpt["model"])
    return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model


def check_resume_config(saved: Dict, current: Dict, ignore: Iterable[str] = ()) -> None:
    """Raise ``CheckpointError`` listing every setting (outside ``ignore``) whose value differs."""
    ignore = set(ignore)
    keys = sorted((set(saved) | set(current)) - ignore)
    diffs = [f"{k}: checkpoint {saved.get(k, '<unset>')!r} vs now {current.get(k, '<unset>')!r}"
             for k in keys if saved.get(k, "<unset>") != current.get(k, "<unset>")]
    if diffs:
        raise CheckpointError("the checkpoint was made with a different configuration; resume with the "
                              "same settings (or start a new run):\n  " + "\n  ".join(diffs))
