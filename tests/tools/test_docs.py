"""The docs stand on their own: every relative link in the markdown files points to a file inside
the repository, no committed file names an absolute path of some machine, and docs/operator.md
covers every public operator function and every backend."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from nstm_kernels import BACKENDS
from tests.helpers import REPO_ROOT

DOCS = ["README.md", "CHANGELOG.md", "bench/NOTES.md", "results/README.md", "csrc/README.md",
        "docs/operator.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# an absolute path of a particular machine (a home, this project's work or check folders)
MACHINE_PATH = re.compile(r"(?<![\w.])/(work|check|home/\w+|Users/\w+)/")
BINARY = (".png", ".pt", ".whl", ".gz", ".zip", ".so", ".pdf", ".jpg", ".safetensors")


def _doc_files():
    found = [f for f in DOCS if os.path.isfile(os.path.join(REPO_ROOT, f))]
    found += [os.path.join("docs", f) for f in os.listdir(os.path.join(REPO_ROOT, "docs")) if f.endswith(".md")]
    return sorted(set(found))


def test_markdown_links_stay_inside_the_repository():
    bad = []
    root = os.path.realpath(REPO_ROOT)
    for doc in _doc_files():
        text = open(os.path.join(REPO_ROOT, doc), encoding="utf-8").read()
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+://|^mailto:|^#", target):
                continue
            path = os.path.realpath(os.path.join(REPO_ROOT, os.path.dirname(doc), target.split("#")[0]))
            if not path.startswith(root + os.sep) and path != root:
                bad.append(f"{doc}: {target} leaves the repository")
            elif not os.path.exists(path):
                bad.append(f"{doc}: {target} does not exist")
    assert bad == []


def test_no_committed_file_names_a_machine_path():
    try:
        files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=60, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is not available to list the committed files")
    me = os.path.relpath(os.path.abspath(__file__), REPO_ROOT).replace(os.sep, "/")
    bad = []
    for f in files:
        if f == me or f.endswith(BINARY) or not os.path.isfile(os.path.join(REPO_ROOT, f)):
            continue
        try:
            text = open(os.path.join(REPO_ROOT, f), encoding="utf-8").read()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                bad.append(f"{f}:{n}: {line.strip()[:100]}")
    assert bad == []


def test_the_operator_page_covers_the_api_and_the_backends():
    text = " ".join(open(os.path.join(REPO_ROOT, "docs", "operator.md"), encoding="utf-8").read().split())
    for name in ("nstm_attention", "nstm_step", "nstm_step_", "sparse_route", "state_attention",
                 "nstm_attention_with_maps", "NSTMState", "S2SParams", "cu_seqlens"):
        assert f"{name}" in text, name
    for b in BACKENDS:
        assert f"`{b}`" in text, b
    for rule in ("Ties", "NaN", "replaced exactly", "convex hull", "per-row positions"):
        assert rule in text, rule


def test_the_machine_path_pattern_finds_what_it_should():
    assert MACHINE_PATH.search("see /work/shared/design/X.md")
    assert MACHINE_PATH.search("/home/alice/data")
    assert not MACHINE_PATH.search("results/work/x and ./work/y") and not MACHINE_PATH.search("/tmp/nstm-site")
