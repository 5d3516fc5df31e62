"""WikiText-2 (raw, character-level): ``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw``;
the reader (``load_wikitext2``) and the word tokenisation the ``wikitext2`` task uses
(``wikitext_words``, ``word_vocab``, ``encode_words``).

Accepted layouts for ``path`` (checked in this order):

- a folder holding the three ``wiki.*.raw`` files;
- a folder holding ``wikitext-2-raw/`` (what ``wikitext-2-raw-v1.zip`` extracts to) or
  ``wikitext-2-raw-v1/`` (itself with the files, or with ``wikitext-2-raw/`` inside);
- the zip archive ``wikitext-2-raw-v1.zip`` (or a folder holding it), read without extracting;
- the Hugging Face ``wikitext`` dataset folder ``wikitext-2-raw-v1/`` with
  ``{train,validation,test}-00000-of-00001.parquet`` (needs ``pyarrow``);
- the split's file itself (``.../wiki.valid.raw`` with ``split="valid"``).

Not fetchable here (no package index mirror): download it by hand.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

from .fetch import PathLike

WIKITEXT2_SPLITS = ("train", "valid", "test")
WIKITEXT2_MANUAL = (
    "Download wikitext-2-raw-v1.zip (e.g. https://wikitext.smerity.com/wikitext-2-raw-v1.zip, or "
    "the Salesforce/wikitext dataset on the Hugging Face hub) and put it, or the wikitext-2-raw/ "
    "folder it extracts to, into {dir}/")
_HF_SPLIT = {"train": "train", "valid": "validation", "test": "test"}
WIKITEXT_MIN_COUNT = 3      # train words seen fewer times become <unk>


def _candidate_dirs(p: Path) -> List[Path]:
    return [p, p / "wikitext-2-raw", p / "wikitext-2-raw-v1",
            p / "wikitext-2-raw-v1" / "wikitext-2-raw", p / "wikitext2", p / "wikitext2" / "wikitext-2-raw"]


def _decode(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text: {e}") from e
    if not text.strip():
        raise ValueError(f"{where} is empty")
    return text


def _from_zip(zpath: Path, fname: str) -> str:
    try:
        with zipfile.ZipFile(zpath) as z:
            names = [n for n in z.namelist() if n.split("/")[-1] == fname and "__MACOSX" not in n]
            if not names:
                raise ValueError(f"{zpath} holds no {fname}; is it wikitext-2-raw-v1.zip?")
            return _decode(z.read(sorted(names, key=len)[0]), f"{zpath}:{names[0]}")
    except zipfile.BadZipFile as e:
        raise ValueError(f"{zpath} is not a zip archive: {e}") from e


def _from_parquet(p: Path) -> str:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{p} is a parquet file (Hugging Face layout) and reading it needs "
                          f"pyarrow (`pip install pyarrow`), or use the wiki.*.raw files") from None
    table = pq.read_table(p, columns=["text"])
    return "".join(table.column("text").to_pylist())


def load_wikitext2(path: PathLike, split: str = "train") -> str:
    """The text of one split ("train", "valid" or "test") of WikiText-2 raw, unchanged."""
    if split not in WIKITEXT2_SPLITS:
        raise ValueError(f"WikiText-2: unknown split {split!r}; expected one of {list(WIKITEXT2_SPLITS)}")
    path = Path(path)
    fname = f"wiki.{split}.raw"
    if path.is_file():
        if path.name == fname:
            return _decode(path.read_bytes(), str(path))
        if zipfile.is_zipfile(path):
            return _from_zip(path, fname)
        if path.name.startswith("wiki.") and path.name.endswith(".raw"):
            raise ValueError(f"{path} is not the {split!r} split (expected a file named {fname})")
        raise ValueError(f"{path} is neither {fname} nor a WikiText-2 zip archive")
    for d in _candidate_dirs(path):
        if (d / fname).is_file():
            return _decode((d / fname).read_bytes(), str(d / fname))
    for d in (path, path / "wikitext2"):
        z = d / "wikitext-2-raw-v1.zip"
        if z.is_file():
            return _from_zip(z, fname)
    for d in (path, path / "wikitext-2-raw-v1"):
        pq_files = sorted(d.glob(f"{_HF_SPLIT[split]}-*.parquet")) if d.is_dir() else []
        if pq_files:
            return "".join(_from_parquet(p) for p in pq_files)
    if any((d / f"wiki.{split}.tokens").is_file() for d in _candidate_dirs(path)
           + [path / "wikitext-2", path / "wikitext-2-v1"]):
        raise FileNotFoundError(f"found the tokenized WikiText-2 (wiki.{split}.tokens, with <unk>) "
                                f"under {path}, but this loader wants the raw version "
                                f"(wiki.{split}.raw). " + WIKITEXT2_MANUAL.format(dir=path))
    raise FileNotFoundError(f"WikiText-2 raw not found under {path}: no {fname} in "
                            f"{', '.join(str(d) for d in _candidate_dirs(path)[:4])}, and no "
                            f"wikitext-2-raw-v1.zip. " + WIKITEXT2_MANUAL.format(dir=path))


# ---- word tokenisation -------------------------------------------------------------------------
def wikitext_words(text: str) -> List[str]:
    """Whitespace-separated words, with ``"<eos>"`` after every non-empty line."""
    out: List[str] = []
    for line in text.splitlines():
        w = line.split()
        if w:
            out.extend(w)
            out.append("<eos>")
    return out


def wikitext_articles(text: str) -> List[str]:
    """The articles of a WikiText split: a new one starts at each top-level heading line
    (`` = Title = ``; section headings have two or more ``=``). Text before the first heading, if
    any, is an article of its own; every line belongs to exactly one article."""
    out: List[List[str]] = []
    for line in text.splitlines(keepends=True):
        s = line.strip()
        top = len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")
        if top or not out:
            out.append([])
        out[-1].append(line)
    return ["".join(a) for a in out]


def word_vocab(words: Iterable[str], min_count: int = WIKITEXT_MIN_COUNT) -> List[str]:
    """The vocabulary (id -> word): ``"<unk>"`` (id 0), then the words seen at least ``min_count``
    times, sorted (about 30K words of the raw train split, like the tokenized release)."""
    counts: Dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    return ["<unk>"] + sorted(w for w, c in counts.items() if c >= min_count and w != "<unk>")


def encode_words(words: Iterable[str], itos: Sequence[str]) -> List[int]:
    """Word ids in the vocabulary ``itos`` of ``word_vocab``; unknown words are ``<unk>`` (0)."""
    stoi = {w: i for i, w in enumerate(itos)}
    return [stoi.get(w, 0) for w in words]
