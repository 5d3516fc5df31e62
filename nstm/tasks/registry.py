"""The table of the tasks the training CLI knows: name -> builder, description, the options it reads.

    task = build_task("copy", seq_len=16, vocab_size=16)      # a nstm.tasks.base.Task
    available_tasks()                                          # ["copy", "mqar", ...]

The builders live by kind: ``synthetic`` (copy, mqar, passkey), ``lra`` (listops, lra-listops),
``images`` (smnist, row-mnist, psmnist, cifar10), ``text`` (shakespeare, wikitext2); ``base`` holds ``Task``,
``Batch`` and the evaluation loop. Data-backed builders look their readers up (``nstm.data.*``)
when the task is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

from .base import EVAL_SEED, Batch, Task  # noqa: F401  (re-exported: nstm.tasks.registry.Task etc.)
from .images import PSMNIST_SEED, cifar10_task, psmnist_task, row_mnist_task, smnist_task  # noqa: F401
from .lra import listops_task, lra_listops_task
from .synthetic import copy_task, mqar_task, passkey_task
from .text import WIKITEXT_MIN_COUNT, shakespeare_task, text_file_task, wikitext_task  # noqa: F401


@dataclass(frozen=True)
class TaskSpec:
    builder: Callable[..., Task]
    description: str
    options: Sequence[str]          # the build options the task reads


TASKS: Dict[str, TaskSpec] = {
    "copy": TaskSpec(copy_task, "copy L random tokens after a separator; scored at L, 2L and 4L",
                     ("seq_len", "vocab_size")),
    "mqar": TaskSpec(mqar_task, "multi-query associative recall (Zoology); --seq-len T spreads the "
                     "queries over T tokens with fillers", ("num_pairs", "vocab_size", "seq_len")),
    "passkey": TaskSpec(passkey_task, "retrieve a 5-digit passkey hidden in filler; train <= 2K, "
                        "score at --eval-contexts", ("seq_len", "eval_contexts")),
    "listops": TaskSpec(listops_task, "synthetic ListOps expressions (10 classes)",
                        ("seq_len", "min_len", "max_depth")),
    "smnist": TaskSpec(smnist_task, "sequential MNIST, 784 pixels one by one", ("data_root",)),
    "row-mnist": TaskSpec(row_mnist_task, "MNIST row by row: 28 steps of 28 pixels", ("data_root",)),
    "psmnist": TaskSpec(psmnist_task, "permuted sequential MNIST (fixed seeded pixel permutation)",
                        ("data_root",)),
    "shakespeare": TaskSpec(shakespeare_task, "character-level Tiny Shakespeare (val loss, bits per char)",
                            ("seq_len", "data_root", "pack")),
    "text": TaskSpec(text_file_task, "a character model of your own UTF-8 text file, --data-path FILE "
                     "(the last 10% held out; val loss in bits per char)", ("seq_len", "data_path", "pack")),
    "lra-listops": TaskSpec(lra_listops_task, "Long Range Arena ListOps from --data-path",
                            ("seq_len", "data_path")),
    "cifar10": TaskSpec(cifar10_task, "sequential CIFAR-10 (1024 RGB pixels) from --data-path", ("data_path",)),
    "wikitext2": TaskSpec(wikitext_task, "word-level WikiText-2 from --data-path (val perplexity)",
                          ("seq_len", "data_path", "pack")),
}

OPTIONS = ("seq_len", "vocab_size", "num_pairs", "min_len", "max_depth", "eval_contexts",
           "data_root", "data_path", "pack")


def available_tasks() -> List[str]:
    return list(TASKS)


def build_task(name: str, **options) -> Task:
    """Build task ``name`` with options ``seq_len``, ``vocab_size``, ``num_pairs``, ``min_len``,
    ``max_depth``, ``eval_contexts``, ``data_root``, ``data_path``, ``pack`` (each task reads the ones listed in
    ``TASKS[name].options``; ``None`` means the task's default)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown task options: {', '.join(sorted(unknown))}")
    opts = {k: v for k, v in options.items() if v is not None}
    return TASKS[name].builder(**opts)
