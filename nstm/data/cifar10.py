"""CIFAR-10, "python version" (``cifar-10-python.tar.gz`` from https://www.cs.toronto.edu/~kriz/cifar.html).

The archive holds ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5`` (train, 10000
images each), ``test_batch`` and ``batches.meta``: Python-2 pickles of dicts whose ``b"data"`` is a
uint8 array [10000, 3072] (per row: 1024 red, 1024 green, 1024 blue values, each a 32x32 image in
row-major order) and ``b"labels"`` a list of 10000 ints in 0..9.

The pickles are read with a restricted unpickler that only rebuilds numpy arrays, so a tampered
file cannot run code. Not fetchable here (no package index mirror): download it by hand.
"""
from __future__ import annotations

import codecs
import io
import pickle
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from .fetch import PathLike

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR10_MANUAL = (
    "Download cifar-10-python.tar.gz (163 MB, md5 c58f30108f718f92721af3b95e74349a) from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and put it, or the cifar-10-batches-py/ folder "
    "it extracts to, into {dir}/")

_np_reconstruct = np.empty(0).__reduce__()[0]
_np_scalar = np.int64(0).__reduce__()[0]
_SAFE = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,     # how protocol-2 pickles from Python 3 store bytes
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _SAFE[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays, "
                f"lists and dicts") from None


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a format error here
        raise ValueError(f"{where} is not a CIFAR-10 python batch: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is not a CIFAR-10 python batch (a {type(obj).__name__}, "
                         f"expected a dict)")
    return obj


def _locate(path: Path):
    """``("dir", folder)`` or ``("tar", archive)`` holding the batches, or None."""
    if path.is_file():
        return ("tar", path) if tarfile.is_tarfile(path) else None
    for d in (path, path / CIFAR10_DIRNAME, path / "cifar10" / CIFAR10_DIRNAME, path / "cifar10"):
        if (d / "test_batch").is_file() or (d / "data_batch_1").is_file():
            return "dir", d
    for a in (path / CIFAR10_ARCHIVE, path / "cifar10" / CIFAR10_ARCHIVE):
        if a.is_file():
            return "tar", a
    return None


def _read_batches(path: Path, names: List[str]) -> Dict[str, bytes]:
    found = _locate(path)
    if found is None:
        raise FileNotFoundError(
            f"CIFAR-10 (python version) not found at {path}: expected {CIFAR10_DIRNAME}/ with "
            f"data_batch_1..5 and test_batch, or {CIFAR10_ARCHIVE}. "
            + CIFAR10_MANUAL.format(dir=path if path.is_dir() else path.parent))
    kind, where = found
    out = {}
    if kind == "dir":
        for n in names:
            p = where / n
            if not p.is_file():
                raise FileNotFoundError(f"CIFAR-10: {p} is missing (the folder must hold "
                                        f"data_batch_1..5 and test_batch). "
                                        + CIFAR10_MANUAL.format(dir=where.parent))
            out[n] = p.read_bytes()
        return out
    with tarfile.open(where) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for n in names:
            if n not in members:
                raise ValueError(f"{where} has no {n}; is it cifar-10-python.tar.gz?")
            f = tar.extractfile(members[n])
            assert f is not None
            out[n] = f.read()
    return out


def load_cifar10(path: PathLike, split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 32, 32, 3], labels int64 [N])``; N = 50000 (train) or 10000 (test).

    ``path``: the ``cifar-10-batches-py`` folder, a folder containing it (or ``cifar10/`` with
    it), or the ``cifar-10-python.tar.gz`` archive itself (read without extracting)."""
    if split not in CIFAR10_FILES:
        raise ValueError(f"CIFAR-10: unknown split {split!r}; expected 'train' or 'test'")
    path = Path(path)
    images, labels = [], []
    for name, data in _read_batches(path, CIFAR10_FILES[split]).items():
        batch = _unpickle(data, f"{path}:{name}")
        if b"data" not in batch or b"labels" not in batch:
            raise ValueError(f"{path}:{name}: a CIFAR-10 batch needs the keys b'data' and "
                             f"b'labels', found {sorted(batch)[:6]}")
        x, y = batch[b"data"], np.asarray(batch[b"labels"])
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
            raise ValueError(f"{path}:{name}: b'data' must be uint8 [N, 3072], got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
        if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}:{name}: b'labels' must be {x.shape[0]} ints, got "
                             f"{y.dtype} {y.shape}")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{path}:{name}: labels must be 0..9")
        images.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y.astype(np.int64))
    return (torch.from_numpy(np.ascontiguousarray(np.concatenate(images))),
            torch.from_numpy(np.concatenate(labels)))
