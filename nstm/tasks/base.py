"""What a training task is: ``Batch``, ``Task`` (loss, accuracy, the evaluation loop) and the small
helpers the task builders share (``synthetic``, ``images``, ``text``, ``lra``).

    batch = task.train_batch(32, torch.Generator().manual_seed(0))     # Batch(inputs, targets, lengths)
    loss, logits = task.loss(model, batch)
    metrics = task.evaluate(model, batch_size=64, num_batches=4)        # {"accuracy": ..., "L16/accuracy": ...}

Two kinds of task:

* ``"lm"``: next-token prediction. ``inputs [B, T]`` int64, ``targets [B, T]`` int64 with ``IGNORE``
  where nothing is scored. Model: ``NSTMLM`` / ``TransformerLM``.
* ``"cls"``: sequence classification. ``inputs [B, T, input_dim]`` floats or ``[B, T]`` token ids,
  ``targets [B]`` labels, ``lengths [B]`` for right-padded token sequences. Model:
  ``NSTMClassifier`` / ``TransformerClassifier``.

Evaluation data is drawn from fixed seeds (``EVAL_SEED``): every run and every model is scored on
the same sequences.
"""
from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

IGNORE = -100               # target of the positions that are not scored
# a language-model batch whose scored positions are at most this share of its tokens sends only
# those through the output head (``Task.scored``): the same loss without the [B, T, vocab] logits
SPARSE_SCORED = 0.5
EVAL_SEED = 1234            # evaluation batches come from generators seeded from this


class Batch(NamedTuple):
    """``inputs``, ``targets``; ``lengths [B]`` for right-padded classifier inputs; ``cu_seqlens``
    (int64 ``[N + 1]``) for a packed language-model batch ``[1, T]`` of N documents end to end."""

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None

    def to(self, device) -> Batch:
        return Batch(self.inputs.to(device, non_blocking=True), self.targets.to(device, non_blocking=True),
                     None if self.lengths is None else self.lengths.to(device, non_blocking=True),
                     None if self.cu_seqlens is None else self.cu_seqlens.to(device, non_blocking=True))

    @property
    def num_tokens(self) -> int:
        """Input positions in the batch (valid positions only when ``lengths`` is given)."""
        if self.lengths is not None:
            return int(self.lengths.sum())
        return self.inputs.shape[0] * self.inputs.shape[1]


class Reiterable:
    """An iterable that calls ``fn()`` afresh for every pass (evaluation sets are re-scored)."""

    def __init__(self, fn: Callable[[], Iterator[Batch]]):
        self.fn = fn

    def __iter__(self):
        return iter(self.fn())


@dataclass
class Task:
    """A training task. ``train_batch(batch_size, generator)`` draws one batch;
    ``eval_batches(batch_size, num_batches)`` returns the named evaluation sets (the first is the
    headline one; ``num_batches <= 0`` means the whole split for data-backed tasks)."""

    name: str
    kind: str                                       # "lm" or "cls"
    metric: str                                     # headline metric, a key of evaluate()'s output
    higher_is_better: bool
    train_batch: Callable[[int, torch.Generator], Batch]
    eval_sets: Callable[[int, int], Dict[str, Iterable[Batch]]]
    vocab_size: Optional[int] = None                # token inputs (lm and token classifiers)
    input_dim: Optional[int] = None                 # continuous inputs (pixel classifiers)
    num_classes: Optional[int] = None               # cls only
    seq_len: Optional[int] = None                   # training sequence length (the longest)
    text_metric: Optional[str] = None               # "bpc" or "ppl" for text LMs
    finite_eval: bool = True                        # False: eval sets need num_batches >= 1
    info: Dict = field(default_factory=dict)        # settings for the results JSON (plain types)
    state: Dict = field(default_factory=dict)       # e.g. a vocabulary; saved in checkpoints

    def eval_batches(self, batch_size: int, num_batches: int) -> Dict[str, Iterable[Batch]]:
        if not self.finite_eval and num_batches < 1:
            raise ValueError(f"task {self.name!r} draws its evaluation data: give num_batches >= 1")
        return self.eval_sets(batch_size, num_batches)

    # -- loss and metrics --------------------------------------------------------------------------
    def scored(self, batch: Batch) -> Optional[torch.Tensor]:
        """The bool mask ``[B, T]`` of the scored positions of a language-model batch when they are
        at most ``SPARSE_SCORED`` of its tokens (copy, MQAR, passkey: only those go through the
        output head), else None (every position gets logits)."""
        if self.kind != "lm" or batch.cu_seqlens is not None:
            return None
        mask = batch.targets != IGNORE
        return mask if mask.sum() <= SPARSE_SCORED * mask.numel() else None

    def logits(self, model, batch: Batch, at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model's logits on ``batch``: ``[B, T, vocab]`` (lm), ``[B, classes]`` (cls); with ``at``
        (a bool ``[B, T]``, lm only) those positions' logits ``[n, vocab]``."""
        if batch.cu_seqlens is not None:
            return model(batch.inputs, cu_seqlens=batch.cu_seqlens)
        if self.kind == "lm":
            return model(batch.inputs) if at is None else model(batch.inputs, logits_at=at)
        if batch.lengths is not None:
            return model(batch.inputs, lengths=batch.lengths)
        return model(batch.inputs)

    def loss(self, model, batch: Batch):
        """``(mean cross-entropy, logits)`` of ``model`` on ``batch``; for a language model that
        scores few positions (``scored``) the logits are those positions' ``[n, vocab]``."""
        at = self.scored(batch)
        logits = self.logits(model, batch, at)
        if self.kind == "lm":
            targets = batch.targets.flatten() if at is None else batch.targets[at]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE)
        else:
            loss = F.cross_entropy(logits.float(), batch.targets)
        return loss, logits

    def accuracy(self, logits: torch.Tensor, batch: Batch) -> float:
        """Accuracy over the scored positions (lm: ``logits`` ``[B, T, vocab]``, or the scored
        positions' ``[n, vocab]`` that ``loss`` returns) or the examples (cls)."""
        pred = logits.argmax(-1)
        if self.kind == "lm":
            mask = batch.targets != IGNORE
            n = int(mask.sum())
            if pred.dim() == 1:                       # already the scored positions
                return float((pred == batch.targets[mask]).sum()) / n if n else float("nan")
            return float((pred[mask] == batch.targets[mask]).sum()) / n if n else float("nan")
        return float((pred == batch.targets).float().mean())

    @torch.no_grad()
    def evaluate(self, model, batch_size: int, num_batches: int, device=None,
                 autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                 show_progress: bool = False) -> Dict[str, float]:
        """Loss and accuracy on every evaluation set, as ``"<set>/loss"``, ``"<set>/accuracy"`` (lm:
        also ``"<set>/exact"``, the share of sequences with every scored token right; text: ``bpc`` or
        ``ppl``); the first set's values also without prefix. Restores the model's training mode.
        ``show_progress``: a bar per set (``nstm.progress``: only at a terminal)."""
        from ..progress import progress
        device = next(model.parameters()).device if device is None else torch.device(device)
        autocast = autocast or contextlib.nullcontext
        was_training = model.training
        model.eval()
        out: Dict[str, float] = {}
        try:
            for i, (name, batches) in enumerate(self.eval_batches(batch_size, num_batches).items()):
                loss_sum, count, correct, seqs, exact = 0.0, 0, 0, 0, 0
                for batch in progress(batches, desc=f"eval {name}", unit="batch", leave=False,
                                      total=num_batches if num_batches > 0 else None, enabled=show_progress):
                    batch = batch.to(device)
                    at = self.scored(batch)
                    with autocast():
                        logits = self.logits(model, batch, at)
                    logits = logits.float()
                    pred = logits.argmax(-1)
                    if self.kind == "lm":
                        mask = batch.targets != IGNORE
                        targets = batch.targets.flatten() if at is None else batch.targets[at]
                        loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets,
                                                          ignore_index=IGNORE, reduction="sum"))
                        count += int(mask.sum())
                        if at is None:
                            right = (pred == batch.targets) & mask
                        else:                         # the scored positions' predictions, back in place
                            right = torch.zeros_like(mask)
                            right[at] = pred == targets
                        correct += int(right.sum())
                        scored = mask.any(1)
                        seqs += int(scored.sum())
                        exact += int(((right == mask).all(1) & scored).sum())
                    else:
                        loss_sum += float(F.cross_entropy(logits, batch.targets, reduction="sum"))
                        count += batch.targets.numel()
                        correct += int((pred == batch.targets).sum())
                if count == 0:
                    raise ValueError(f"evaluation set {name!r} of task {self.name!r} has no scored position")
                m = {"loss": loss_sum / count, "accuracy": correct / count}
                if self.kind == "lm" and self.text_metric is None:
                    m["exact"] = exact / max(seqs, 1)
                if self.text_metric == "bpc":
                    m["bpc"] = m["loss"] / math.log(2)
                elif self.text_metric == "ppl":
                    m["ppl"] = math.exp(min(m["loss"], 50.0))
                for k, v in m.items():
                    out[f"{name}/{k}"] = v
                    if i == 0:
                        out[k] = v
        finally:
            model.train(was_training)
        return out


# ---- helpers shared by the task builders ---------------------------------------------------------
def check_int(name, value, low, high=None):
    """``ValueError`` unless ``value`` is an int (not a bool) in ``[low, high]`` (``high=None``: no bound)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")


def generated(fn: Callable[[int, torch.Generator], Batch], batch_size: int, num_batches: int,
              seed: int) -> Iterable[Batch]:
    """An evaluation set of ``num_batches`` batches drawn by ``fn`` from a generator seeded ``seed``
    (the same batches on every pass)."""
    def it():
        g = torch.Generator().manual_seed(seed)
        for _ in range(num_batches):
            yield fn(batch_size, g)
    return Reiterable(it)


def lm_batch(pair) -> Batch:
    """``Batch`` of an ``(inputs, targets)`` pair from a generator."""
    inputs, targets = pair
    return Batch(inputs, targets)


def data_module(name: str):
    """Import a data module when its task is built, with a clear message when it is missing (the
    loaders are looked up by name then, so that a loader can be swapped, e.g. in tests)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"this task needs {name}, which could not be imported: {e}") from e


def need_path(task: str, data_path: Optional[str]) -> str:
    if not data_path:
        raise ValueError(f"task {task!r} reads a local copy of its data set: give --data-path")
    return data_path


def load_split(loader, path, names: Sequence[str]):
    """Call ``loader(path, name)`` for the first split name the loader accepts."""
    errors = []
    for n in names:
        try:
            return loader(path, n)
        except (ValueError, KeyError, FileNotFoundError) as e:
            errors.append(f"{n!r}: {e}")
    raise ValueError("no split of " + "/".join(names) + " could be loaded: " + "; ".join(errors))
