"""The tasks the training CLI knows: how to draw a training batch, which evaluation sets to score,
and how to compute the loss and metrics for a model.

    task = build_task("copy", seq_len=16, vocab_size=16)
    batch = task.train_batch(32, torch.Generator().manual_seed(0))     # Batch(inputs, targets, lengths)
    loss, logits = task.loss(model, batch)
    metrics = task.evaluate(model, batch_size=64, num_batches=4)        # {"accuracy": ..., "L16/accuracy": ...}

Two kinds of task:

* ``"lm"``: next-token prediction. ``inputs [B, T]`` int64, ``targets [B, T]`` int64 with ``IGNORE``
  where nothing is scored. Model: ``NSTMLM`` / ``TransformerLM``.
* ``"cls"``: sequence classification. ``inputs [B, T, input_dim]`` floats or ``[B, T]`` token ids,
  ``targets [B]`` labels, ``lengths [B]`` for right-padded token sequences. Model:
  ``NSTMClassifier`` / ``TransformerClassifier``.

Data-backed tasks import their loaders lazily (``nstm.data.*``, ``nstm.tasks.listops``), so this
module imports without them. Evaluation data is drawn from fixed seeds: every run and every model
is scored on the same sequences.
"""
from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .synthetic import IGNORE

EVAL_SEED = 1234            # evaluation batches come from generators seeded from this
PSMNIST_SEED = 0            # the fixed permutation of the 784 pixels for psMNIST
WIKITEXT_MIN_COUNT = 3      # rarer train words become <unk>


class Batch(NamedTuple):
    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: Optional[torch.Tensor] = None

    def to(self, device) -> "Batch":
        return Batch(self.inputs.to(device, non_blocking=True), self.targets.to(device, non_blocking=True),
                     None if self.lengths is None else self.lengths.to(device, non_blocking=True))

    @property
    def num_tokens(self) -> int:
        """Input positions in the batch (valid positions only when ``lengths`` is given)."""
        if self.lengths is not None:
            return int(self.lengths.sum())
        return self.inputs.shape[0] * self.inputs.shape[1]


class _Reiterable:
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
    def logits(self, model, batch: Batch) -> torch.Tensor:
        if self.kind == "lm":
            return model(batch.inputs)
        if batch.lengths is not None:
            return model(batch.inputs, lengths=batch.lengths)
        return model(batch.inputs)

    def loss(self, model, batch: Batch):
        """``(mean cross-entropy, logits)`` of ``model`` on ``batch``."""
        logits = self.logits(model, batch)
        if self.kind == "lm":
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
        else:
            loss = F.cross_entropy(logits.float(), batch.targets)
        return loss, logits

    def accuracy(self, logits: torch.Tensor, batch: Batch) -> float:
        pred = logits.argmax(-1)
        if self.kind == "lm":
            mask = batch.targets != IGNORE
            n = int(mask.sum())
            return float((pred[mask] == batch.targets[mask]).sum()) / n if n else float("nan")
        return float((pred == batch.targets).float().mean())

    @torch.no_grad()
    def evaluate(self, model, batch_size: int, num_batches: int, device=None,
                 autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None) -> Dict[str, float]:
        """Loss and accuracy on every evaluation set, as ``"<set>/loss"``, ``"<set>/accuracy"`` (lm:
        also ``"<set>/exact"``, the share of sequences with every scored token right; text: ``bpc`` or
        ``ppl``); the first set's values also without prefix. Restores the model's training mode."""
        device = next(model.parameters()).device if device is None else torch.device(device)
        autocast = autocast or contextlib.nullcontext
        was_training = model.training
        model.eval()
        out: Dict[str, float] = {}
        try:
            for i, (name, batches) in enumerate(self.eval_batches(batch_size, num_batches).items()):
                loss_sum, count, correct, seqs, exact = 0.0, 0, 0, 0, 0
                for batch in batches:
                    batch = batch.to(device)
                    with autocast():
                        logits = self.logits(model, batch)
                    logits = logits.float()
                    pred = logits.argmax(-1)
                    if self.kind == "lm":
                        mask = batch.targets != IGNORE
                        loss_sum += float(F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(),
                                                          ignore_index=IGNORE, reduction="sum"))
                        count += int(mask.sum())
                        right = (pred == batch.targets) & mask
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


# ---- helpers -----------------------------------------------------------------------------------
def _check(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")


def _generated(fn: Callable[[int, torch.Generator], Batch], batch_size: int, num_batches: int,
               seed: int) -> Iterable[Batch]:
    def it():
        g = torch.Generator().manual_seed(seed)
        for _ in range(num_batches):
            yield fn(batch_size, g)
    return _Reiterable(it)


def _lm_batch(pair) -> Batch:
    inputs, targets = pair
    return Batch(inputs, targets)


def _module(name: str):
    """Import a data module lazily, with a clear message when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"this task needs {name}, which could not be imported: {e}") from e


def _need_path(task: str, data_path: Optional[str]) -> str:
    if not data_path:
        raise ValueError(f"task {task!r} reads a local copy of its data set: give --data-path")
    return data_path


def _load_split(loader, path, names: Sequence[str]):
    """Call ``loader(path, name)`` for the first split name the loader accepts."""
    errors = []
    for n in names:
        try:
            return loader(path, n)
        except (ValueError, KeyError, FileNotFoundError) as e:
            errors.append(f"{n!r}: {e}")
    raise ValueError("no split of " + "/".join(names) + " could be loaded: " + "; ".join(errors))


# ---- synthetic tasks ---------------------------------------------------------------------------
def _copy_task(seq_len=None, vocab_size=None, **_):
    from .synthetic import copy_batch
    L = 32 if seq_len is None else seq_len
    V = 16 if vocab_size is None else vocab_size
    _check("seq_len (copy length L)", L, 1)
    _check("vocab_size", V, 3)

    def at(length):
        return lambda b, g: _lm_batch(copy_batch(b, length, V, generator=g))

    def eval_sets(bs, nb):
        return {f"L{L}": _generated(at(L), bs, nb, EVAL_SEED),
                f"L{4 * L}": _generated(at(4 * L), bs, nb, EVAL_SEED + 1)}

    return Task("copy", "lm", "accuracy", True, at(L), eval_sets, vocab_size=V, seq_len=2 * L + 1,
                finite_eval=False, info={"length": L, "vocab_size": V, "eval_lengths": [L, 4 * L]})


def _mqar_task(num_pairs=None, vocab_size=None, **_):
    from .synthetic import mqar_batch
    N = 8 if num_pairs is None else num_pairs
    V = 64 if vocab_size is None else vocab_size
    _check("num_pairs", N, 1)
    _check("vocab_size", V, 4)
    if N > V // 2 - 1:
        raise ValueError(f"mqar needs num_pairs ({N}) < vocab_size // 2 ({V // 2}) so keys are distinct")

    def train(b, g):
        return _lm_batch(mqar_batch(b, N, V, generator=g))

    return Task("mqar", "lm", "accuracy", True, train,
                lambda bs, nb: {"test": _generated(train, bs, nb, EVAL_SEED)},
                vocab_size=V, seq_len=4 * N, finite_eval=False, info={"num_pairs": N, "vocab_size": V})


def _passkey_task(seq_len=None, eval_contexts=None, **_):
    syn = _module("nstm.tasks.synthetic")
    if not hasattr(syn, "passkey_batch"):
        raise ImportError("the passkey task needs nstm.tasks.synthetic.passkey_batch")
    L = 1024 if seq_len is None else seq_len
    _check("seq_len (passkey training context)", L, 16, 2048)
    contexts = [L, 4 * L, 16 * L] if not eval_contexts else [int(c) for c in eval_contexts]
    for c in contexts:
        _check("eval context", c, 16)

    def at(ctx):
        return lambda b, g: _lm_batch(syn.passkey_batch(b, ctx, generator=g))

    def eval_sets(bs, nb):
        return {f"ctx{c}": _generated(at(c), bs, nb, EVAL_SEED + i) for i, c in enumerate(contexts)}

    return Task("passkey", "lm", "accuracy", True, at(L), eval_sets, vocab_size=int(syn.PASSKEY_VOCAB),
                seq_len=L, finite_eval=False, info={"train_context": L, "eval_contexts": contexts})


def _listops_task(seq_len=None, min_len=None, max_depth=None, **_):
    lo = _module("nstm.tasks.listops")
    hi = 2000 if seq_len is None else seq_len
    low = max(1, hi // 4) if min_len is None else min_len
    depth = 10 if max_depth is None else max_depth
    _check("seq_len (listops max length)", hi, 2)
    _check("min_len", low, 1, hi)
    _check("max_depth", depth, 1)

    def train(b, g):
        tokens, lengths, labels = lo.listops_batch(b, min_len=low, max_len=hi, max_depth=depth, generator=g)
        return Batch(tokens, labels, lengths)

    return Task("listops", "cls", "accuracy", True, train,
                lambda bs, nb: {"test": _generated(train, bs, nb, EVAL_SEED)},
                vocab_size=len(lo.LISTOPS_VOCAB), num_classes=10, seq_len=hi, finite_eval=False,
                info={"min_len": low, "max_len": hi, "max_depth": depth})


# ---- image classification ----------------------------------------------------------------------
def _image_task(name, images_train, labels_train, images_test, labels_test, channels, perm=None, info=None):
    """Pixel-by-pixel classification: uint8 images -> ``[B, pixels, channels]`` floats in [0, 1]."""
    xtr = images_train.reshape(images_train.shape[0], -1, channels)
    xte = images_test.reshape(images_test.shape[0], -1, channels)
    ytr, yte = labels_train.long(), labels_test.long()
    T = xtr.shape[1]

    def to_seq(x):
        x = x.float() / 255.0
        return x if perm is None else x[:, perm]

    def train(b, g):
        idx = torch.randint(0, xtr.shape[0], (b,), generator=g)
        return Batch(to_seq(xtr[idx]), ytr[idx])

    def eval_sets(bs, nb):
        n = xte.shape[0] if nb <= 0 else min(xte.shape[0], bs * nb)

        def it():
            for s in range(0, n, bs):
                e = min(n, s + bs)
                yield Batch(to_seq(xte[s:e]), yte[s:e])
        return {"test": _Reiterable(it)}

    num_classes = int(max(int(ytr.max()), int(yte.max())) + 1)
    return Task(name, "cls", "accuracy", True, train, eval_sets, input_dim=channels,
                num_classes=max(num_classes, 10), seq_len=T,
                info=dict(info or {}, train_size=int(xtr.shape[0]), test_size=int(xte.shape[0])))


def _mnist_task(name, data_root="data", **_):
    mn = _module("nstm.data.mnist")
    mn.fetch_mnist(data_root)
    xtr, ytr = mn.load_mnist(data_root, "train")
    xte, yte = mn.load_mnist(data_root, "test")
    perm = None
    info = {"data_root": str(data_root)}
    if name == "psmnist":
        perm = torch.randperm(xtr[0].numel(), generator=torch.Generator().manual_seed(PSMNIST_SEED))
        info["permutation_seed"] = PSMNIST_SEED
    return _image_task(name, torch.as_tensor(xtr), torch.as_tensor(ytr), torch.as_tensor(xte),
                       torch.as_tensor(yte), 1, perm, info)


def _cifar_task(data_path=None, **_):
    path = _need_path("cifar10", data_path)
    cf = _module("nstm.data.cifar10")
    xtr, ytr = cf.load_cifar10(path, "train")
    xte, yte = cf.load_cifar10(path, "test")
    return _image_task("cifar10", torch.as_tensor(xtr), torch.as_tensor(ytr), torch.as_tensor(xte),
                       torch.as_tensor(yte), 3, None, {"data_path": str(path)})


# ---- text language modelling -------------------------------------------------------------------
def _text_lm_task(name, train_ids, val_ids, seq_len, vocab_size, val_name, text_metric, info, state):
    T = seq_len
    if train_ids.numel() < T + 2 or val_ids.numel() < T + 2:
        raise ValueError(f"{name}: the text is too short for seq_len {T} "
                         f"(train {train_ids.numel()}, val {val_ids.numel()} tokens)")

    def train(b, g):
        starts = torch.randint(0, train_ids.numel() - T - 1, (b,), generator=g)
        w = torch.stack([train_ids[s:s + T + 1] for s in starts.tolist()])
        return Batch(w[:, :-1].contiguous(), w[:, 1:].contiguous())

    def eval_sets(bs, nb):
        windows = (val_ids.numel() - 1) // T
        n = windows if nb <= 0 else min(windows, bs * nb)

        def it():
            for s in range(0, n, bs):
                idx = range(s, min(n, s + bs))
                w = torch.stack([val_ids[i * T:i * T + T + 1] for i in idx])
                yield Batch(w[:, :-1].contiguous(), w[:, 1:].contiguous())
        return {val_name: _Reiterable(it)}

    metric = text_metric
    return Task(name, "lm", metric, False, train, eval_sets, vocab_size=vocab_size, seq_len=T,
                text_metric=text_metric, info=info, state=state)


def _shakespeare_task(seq_len=None, data_root="data", **_):
    sh = _module("nstm.data.shakespeare")
    T = 256 if seq_len is None else seq_len
    _check("seq_len", T, 1)
    sh.fetch_shakespeare(data_root)
    train_text, val_text = sh.load_shakespeare(data_root, val_fraction=0.1, seed=0)
    vocab = sh.CharVocab.from_text(train_text + val_text)
    train_ids = torch.as_tensor(vocab.encode(train_text)).long()
    val_ids = torch.as_tensor(vocab.encode(val_text)).long()
    return _text_lm_task("shakespeare", train_ids, val_ids, T, len(vocab), "val", "bpc",
                         {"seq_len": T, "vocab_size": len(vocab), "train_chars": len(train_text),
                          "val_chars": len(val_text), "data_root": str(data_root)},
                         {"vocab": vocab.to_dict()})


def _words(text: str) -> List[str]:
    out = []
    for line in text.splitlines():
        w = line.split()
        if w:
            out.extend(w)
            out.append("<eos>")
    return out


def _wikitext_task(seq_len=None, data_path=None, min_count=WIKITEXT_MIN_COUNT, **_):
    """Word-level WikiText-2 (raw): whitespace words plus ``<eos>`` per line; words seen fewer than
    ``min_count`` times in train become ``<unk>`` (about 30K words, like the tokenized release)."""
    path = _need_path("wikitext2", data_path)
    wt = _module("nstm.data.wikitext")
    T = 256 if seq_len is None else seq_len
    _check("seq_len", T, 1)
    train_words = _words(wt.load_wikitext2(path, "train"))
    val_words = _words(_load_split(wt.load_wikitext2, path, ("valid", "validation", "val")))
    counts: Dict[str, int] = {}
    for w in train_words:
        counts[w] = counts.get(w, 0) + 1
    itos = ["<unk>"] + sorted(w for w, c in counts.items() if c >= min_count and w != "<unk>")
    stoi = {w: i for i, w in enumerate(itos)}
    train_ids = torch.tensor([stoi.get(w, 0) for w in train_words], dtype=torch.long)
    val_ids = torch.tensor([stoi.get(w, 0) for w in val_words], dtype=torch.long)
    return _text_lm_task("wikitext2", train_ids, val_ids, T, len(itos), "valid", "ppl",
                         {"seq_len": T, "vocab_size": len(itos),
                          "tokenization": f"whitespace words + <eos> per line; < {min_count} train "
                                          "occurrences -> <unk>",
                          "train_tokens": len(train_words), "val_tokens": len(val_words),
                          "val_unk_rate": float((val_ids == 0).float().mean()), "data_path": str(path)},
                         {"vocab": itos})


# ---- LRA ListOps -------------------------------------------------------------------------------
def _lra_listops_task(seq_len=None, data_path=None, **_):
    path = _need_path("lra-listops", data_path)
    lra = _module("nstm.data.lra")
    lo = _module("nstm.tasks.listops")
    T = 2000 if seq_len is None else seq_len
    _check("seq_len (truncation length)", T, 1)

    def encode(rows):
        seqs = [torch.tensor(lo.tokenize_listops(text)[:T] or [0], dtype=torch.long) for text, _ in rows]
        labels = torch.tensor([int(label) for _, label in rows], dtype=torch.long)
        return seqs, labels

    def pad(seqs):
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        out = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, :len(s)] = s
        return out, lengths

    tr_seqs, tr_labels = encode(lra.load_lra_listops(path, "train"))
    sets = {"val": encode(_load_split(lra.load_lra_listops, path, ("val", "validation", "dev"))),
            "test": encode(lra.load_lra_listops(path, "test"))}

    def train(b, g):
        idx = torch.randint(0, len(tr_seqs), (b,), generator=g).tolist()
        tokens, lengths = pad([tr_seqs[i] for i in idx])
        return Batch(tokens, tr_labels[idx], lengths)

    def eval_sets(bs, nb):
        def make(seqs, labels):
            n = len(seqs) if nb <= 0 else min(len(seqs), bs * nb)

            def it():
                for s in range(0, n, bs):
                    tokens, lengths = pad(seqs[s:min(n, s + bs)])
                    yield Batch(tokens, labels[s:min(n, s + bs)], lengths)
            return _Reiterable(it)
        return {name: make(*v) for name, v in sets.items()}

    return Task("lra-listops", "cls", "accuracy", True, train, eval_sets,
                vocab_size=len(lo.LISTOPS_VOCAB), num_classes=10, seq_len=T,
                info={"max_len": T, "train_size": len(tr_seqs), "data_path": str(path)})


# ---- registry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    builder: Callable[..., Task]
    description: str
    options: Sequence[str]          # the build options the task reads


TASKS: Dict[str, TaskSpec] = {
    "copy": TaskSpec(_copy_task, "copy L random tokens after a separator; scored at L and 4L",
                     ("seq_len", "vocab_size")),
    "mqar": TaskSpec(_mqar_task, "multi-query associative recall (Zoology)", ("num_pairs", "vocab_size")),
    "passkey": TaskSpec(_passkey_task, "retrieve a 5-digit passkey hidden in filler; train <= 2K, "
                        "score at --eval-contexts", ("seq_len", "eval_contexts")),
    "listops": TaskSpec(_listops_task, "synthetic ListOps expressions (10 classes)",
                        ("seq_len", "min_len", "max_depth")),
    "smnist": TaskSpec(lambda **kw: _mnist_task("smnist", **kw), "sequential MNIST, 784 pixels one by one",
                       ("data_root",)),
    "psmnist": TaskSpec(lambda **kw: _mnist_task("psmnist", **kw),
                        "permuted sequential MNIST (fixed seeded pixel permutation)", ("data_root",)),
    "shakespeare": TaskSpec(_shakespeare_task, "character-level Tiny Shakespeare (val loss, bits per char)",
                            ("seq_len", "data_root")),
    "lra-listops": TaskSpec(_lra_listops_task, "Long Range Arena ListOps from --data-path",
                            ("seq_len", "data_path")),
    "cifar10": TaskSpec(_cifar_task, "sequential CIFAR-10 (1024 RGB pixels) from --data-path", ("data_path",)),
    "wikitext2": TaskSpec(_wikitext_task, "word-level WikiText-2 from --data-path (val perplexity)",
                          ("seq_len", "data_path")),
}

DATA_PATH_TASKS = tuple(n for n, s in TASKS.items() if "data_path" in s.options)


def available_tasks() -> List[str]:
    return list(TASKS)


def build_task(name: str, **options) -> Task:
    """Build task ``name`` with options ``seq_len``, ``vocab_size``, ``num_pairs``, ``min_len``,
    ``max_depth``, ``eval_contexts``, ``data_root``, ``data_path`` (each task reads the ones listed in
    ``TASKS[name].options``; ``None`` means the task's default)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    known = {"seq_len", "vocab_size", "num_pairs", "min_len", "max_depth", "eval_contexts",
             "data_root", "data_path"}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown task options: {', '.join(sorted(unknown))}")
    opts = {k: v for k, v in options.items() if v is not None}
    return TASKS[name].builder(**opts)
