"""Readers for the Long Range Arena release (``lra_release.gz``, https://github.com/google-research/long-range-arena).

``path`` may be the extracted ``lra_release/`` folder, a folder holding it, or the nested
``lra_release/lra_release/`` some copies have; the task folders are searched under each:

- ListOps: ``listops-1000/basic_{train,val,test}.tsv``, header ``Source\\tTarget``, one expression
  (LRA's parenthesised text) and its value 0-9 per row;
- Retrieval (ACL Anthology Network pairs): ``tsv_data/new_aan_pairs.{train,eval,test}.tsv``, no
  header, rows ``label \\t id1 \\t id2 \\t text1 \\t text2`` (label 0/1, maybe written ``1.0``);
- Pathfinder: ``pathfinder{32,64,128,256}/{curv_baseline,curv_contour_length_9,
  curv_contour_length_14}/`` with ``imgs/<n>/sample_<i>.png`` and ``metadata/<n>.npy``, which
  despite the name are text files of rows ``imgs/<n> sample_<i>.png <k> <label> ...``.

Not fetchable here (no package index mirror): download it by hand.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from .fetch import PathLike

LRA_MANUAL = ("Download lra_release.gz (about 7 GB, https://storage.googleapis.com/long-range-arena/"
              "lra_release.gz), extract it (tar xzf) and pass the extracted lra_release/ folder "
              "(or the folder holding it); it is expected at {dir}/lra_release.")
PATHFINDER_DIFFICULTIES = ("curv_baseline", "curv_contour_length_9", "curv_contour_length_14")
# an empty image that LRA users (e.g. S4's loader) skip
_PATHFINDER_BAD = {(32, "curv_baseline"): {("imgs/0", "sample_172.png")}}


def _roots(path: Path) -> List[Path]:
    return [path, path / "lra_release", path / "lra_release" / "lra_release"]


def _find(path: Path, rel_options: Sequence[str], what: str) -> Path:
    tried = []
    for r in _roots(path):
        for rel in rel_options:
            p = r / rel
            if p.exists():
                return p
            tried.append(str(p))
    raise FileNotFoundError(f"LRA {what} not found; looked for {tried[0]}"
                            + (f" (and {len(tried) - 1} other places under {path})" if len(tried) > 1 else "")
                            + ". " + LRA_MANUAL.format(dir=path))


def _lines(p: Path) -> Iterator[Tuple[int, str]]:
    with open(p, encoding="utf-8", newline="") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line:
                yield i, line


def _label(s: str, allowed: range, where: str) -> int:
    try:
        v = float(s)
    except ValueError:
        raise ValueError(f"{where}: label {s[:20]!r} is not a number") from None
    if v != int(v) or int(v) not in allowed:
        raise ValueError(f"{where}: label {s!r} outside {allowed.start}..{allowed.stop - 1}")
    return int(v)


def load_lra_listops(path: PathLike, split: str = "train",
                     verify_rows: Optional[int] = 100) -> List[Tuple[str, int]]:
    """``[(expression text, answer 0..9)]`` from ``listops-1000/basic_{split}.tsv``.

    The first ``verify_rows`` rows (all with None, none with 0) are checked against
    :func:`nstm.tasks.listops.evaluate_listops`; a wrong answer raises ``ValueError``."""
    from ..tasks.listops import evaluate_listops
    if split not in ("train", "val", "test"):
        raise ValueError(f"LRA ListOps: unknown split {split!r}; expected 'train', 'val' or 'test'")
    p = _find(Path(path), [f"listops-1000/basic_{split}.tsv", f"listops/basic_{split}.tsv",
                           f"basic_{split}.tsv"], f"ListOps {split} file basic_{split}.tsv")
    out: List[Tuple[str, int]] = []
    rows = _lines(p)
    first = next(rows, None)
    if first is None or first[1].split("\t")[:2] != ["Source", "Target"]:
        raise ValueError(f"{p}: expected the header 'Source<TAB>Target', got "
                         f"{(first[1][:40] if first else '')!r}")
    for i, line in rows:
        parts = line.split("\t")
        if len(parts) < 2:
            raise ValueError(f"{p}:{i}: expected 'expression<TAB>answer', got {line[:60]!r}")
        out.append((parts[0], _label(parts[1], range(10), f"{p}:{i}")))
    n = len(out) if verify_rows is None else min(verify_rows, len(out))
    for k in range(n):
        text, y = out[k]
        got = evaluate_listops(text)
        if got != y:
            raise ValueError(f"{p}: row {k + 2} says {y} but the expression evaluates to {got}")
    return out


def load_lra_retrieval(path: PathLike, split: str = "train") -> List[Tuple[str, str, int]]:
    """``[(text1, text2, label 0/1)]`` from ``tsv_data/new_aan_pairs.{train,eval,test}.tsv``;
    ``split`` is "train", "val" (or its file name "eval") or "test"."""
    files = {"train": "train", "val": "eval", "eval": "eval", "test": "test"}
    if split not in files:
        raise ValueError(f"LRA retrieval: unknown split {split!r}; expected 'train', 'val' "
                         f"('eval') or 'test'")
    fname = f"new_aan_pairs.{files[split]}.tsv"
    p = _find(Path(path), [f"tsv_data/{fname}", f"aan/{fname}", fname],
              f"retrieval (AAN) {split} file {fname}")
    out: List[Tuple[str, str, int]] = []
    for i, line in _lines(p):
        parts = line.split("\t")
        if i == 1 and parts and parts[0].strip().lower() in ("label", "target"):
            continue                                             # tolerate a header row
        if len(parts) != 5:
            raise ValueError(f"{p}:{i}: expected 5 tab-separated fields (label, id1, id2, text1, "
                             f"text2), got {len(parts)}")
        out.append((parts[3], parts[4], _label(parts[0], range(2), f"{p}:{i}")))
    return out


def _meta_key(p: Path):
    return (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.name)


def load_lra_pathfinder(path: PathLike, resolution: int = 32, difficulty: str = "curv_baseline",
                        check_files: bool = False,
                        skip_known_bad: bool = True) -> List[Tuple[Path, int]]:
    """``[(image path, label 0/1)]`` of ``pathfinder{resolution}/{difficulty}/`` from its
    ``metadata/*.npy`` files (in numeric order). The single empty image of
    pathfinder32/curv_baseline is skipped unless ``skip_known_bad=False``; ``check_files``
    makes a missing image raise. LRA has no fixed split: the usual one is 80/10/10 in order."""
    if difficulty not in PATHFINDER_DIFFICULTIES:
        raise ValueError(f"LRA Pathfinder: unknown difficulty {difficulty!r}; expected one of "
                         f"{list(PATHFINDER_DIFFICULTIES)}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"LRA Pathfinder: resolution must be a positive int (32, 64, 128, 256), "
                         f"got {resolution!r}")
    path = Path(path)
    if (path / "metadata").is_dir():                      # the difficulty folder itself
        d = path
    elif (path / difficulty / "metadata").is_dir():       # the pathfinder<res> folder
        d = path / difficulty
    else:
        d = _find(path, [f"pathfinder{resolution}/{difficulty}"],
                  f"Pathfinder folder pathfinder{resolution}/{difficulty}")
    meta = d / "metadata"
    metas = sorted((m for m in meta.glob("*.npy") if m.is_file()), key=_meta_key) \
        if meta.is_dir() else []
    if not metas:
        raise FileNotFoundError(f"LRA Pathfinder: no metadata/*.npy files in {d}. "
                                + LRA_MANUAL.format(dir=path))
    bad = _PATHFINDER_BAD.get((resolution, difficulty), set()) if skip_known_bad else set()
    out: List[Tuple[Path, int]] = []
    for m in metas:
        try:
            rows = list(_lines(m))
        except UnicodeDecodeError:
            raise ValueError(f"{m}: not a text metadata file (LRA's pathfinder metadata/*.npy are "
                             f"text, one 'imgs/<n> sample_<i>.png <k> <label> ...' row per image)") from None
        for i, line in rows:
            f = line.split()
            if len(f) < 4:
                raise ValueError(f"{m}:{i}: expected at least 4 fields "
                                 f"('imgs/<n> sample_<i>.png <k> <label> ...'), got {line[:60]!r}")
            if (f[0], f[1]) in bad:
                continue
            img = d / f[0] / f[1]
            if check_files and not img.is_file():
                raise FileNotFoundError(f"{m}:{i}: image {img} is missing")
            out.append((img, _label(f[3], range(2), f"{m}:{i}")))
    return out
