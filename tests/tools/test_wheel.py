"""The wheel: built from the source tree without a network, what it carries (the packages, the C++
and CUDA sources, the console scripts, the requirements and extras), and a fresh virtual env on a
CPU-only machine with neither Triton nor a compiler, where it imports, runs a layer forward and
backward (the C++ CPU kernel cannot be built there: one log line, then the PyTorch path) and
runs the console scripts.

The fresh env gets torch (the version running these tests), numpy and tqdm from this machine's
*local* package sources only (the file:// indexes and find-links folders in pip's configuration),
and the wheel with ``--no-deps``; the test is skipped, saying why, when those cannot be installed
offline. It builds in a copy of the sources, so the checkout gets no build/ or *.egg-info.
"""
from __future__ import annotations

import configparser
import email.parser
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile

import pytest
import torch

import nstm_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: what the build reads (setup.py reads README.md; LICENSE goes into the metadata)
SOURCES = ("setup.py", "pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in",
           "nstm", "nstm_kernels", "csrc")
CSRC_PATTERNS = (".cu", ".cuh", ".h", ".cpp", ".md")     # setup.py's package_data for csrc
SCRIPTS = {"nstm-demo": "nstm.demo:cli", "nstm-train": "nstm.train:cli", "nstm-sample": "nstm.sample:main",
           "nstm-study": "nstm.study:main"}
KERNEL_LOG = "the C++ CPU kernel is not used"

pytestmark = pytest.mark.slow


def _run(cmd, timeout=300, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _tail(p, n=1500):
    return (p.stdout + p.stderr)[-n:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Path of the wheel built by ``pip wheel --no-deps --no-build-isolation`` (no network)."""
    top = tmp_path_factory.mktemp("wheel")
    src, dist = top / "src", top / "dist"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=ignore)
        elif os.path.isfile(path):
            shutil.copy2(path, src / name)
    env = dict(os.environ, PIP_NO_INDEX="1")
    p = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
              "-w", str(dist), str(src)], env=env)
    assert p.returncode == 0, _tail(p)
    [whl] = list(dist.glob("nstm_kernels-*.whl"))
    return whl


def _source_files(top):
    for d, dirs, files in os.walk(os.path.join(ROOT, top)):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for f in files:
            yield os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")


def _requirements(meta):
    """``{extra or "": {requirement without spaces}}`` from the METADATA's Requires-Dist lines."""
    out = {}
    for line in meta.get_all("Requires-Dist") or []:
        req, _, marker = line.partition(";")
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        out.setdefault(m.group(1) if m else "", set()).add(req.replace(" ", ""))
    return out


def test_wheel_carries_the_packages_the_sources_and_the_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(f"{info}/METADATA").decode())
        entry = configparser.ConfigParser()
        entry.read_string(z.read(f"{info}/entry_points.txt").decode())
    # every module of both packages, and nothing of the tests or the benchmarks
    py = {f for top in ("nstm", "nstm_kernels") for f in _source_files(top) if f.endswith(".py")}
    assert py and not py - names, sorted(py - names)
    assert not [n for n in names if n.startswith(("tests/", "bench/", "csrc/"))]
    # the C++ / CUDA sources inside the package, where nstm_kernels/cuda.py and cpu.py look first
    csrc = {"nstm_kernels/csrc/" + f.split("/", 1)[1] for f in _source_files("csrc")
            if f.endswith(CSRC_PATTERNS)}
    assert {"nstm_kernels/csrc/nstm_cpu.cpp", "nstm_kernels/csrc/nstm_step.cu",
            "nstm_kernels/csrc/nstm_step.cpp"} <= csrc
    assert not csrc - names, sorted(csrc - names)
    # console scripts
    assert dict(entry["console_scripts"]) == SCRIPTS
    # version, requirements, extras: no Triton, compiler tools or plotting without an extra
    assert meta["Name"] == "nstm-kernels" and meta["Version"] == nstm_kernels.__version__
    reqs = _requirements(meta)
    assert reqs[""] == {"torch>=2.1", "numpy", "tqdm>=4.60"}
    assert {"triton", "hf", "tools", "dev"} <= set(meta.get_all("Provides-Extra"))
    assert reqs["triton"] == {"triton>=3.0"}
    assert reqs["hf"] == {"transformers>=5.0", "safetensors"}
    assert {"matplotlib>=3.5"} <= reqs["tools"]
    dev = {re.split(r"[<>=!~]", r)[0] for r in reqs["dev"]}
    assert {"pytest", "ruff", "ninja", "matplotlib", "transformers", "safetensors"} <= dev


def _local_sources():
    """pip options naming only this machine's local package sources from pip's configuration
    (``file://`` indexes and find-links folders), or ``--no-index``."""
    p = _run([sys.executable, "-m", "pip", "config", "list"], timeout=60)
    found = {"index-url": [], "extra-index-url": [], "find-links": []}
    for line in p.stdout.splitlines():        # e.g. global.extra-index-url='file:///a file:///b'
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in found:
            found[name] += value.strip().strip("'\"").split()

    def local(u):
        return u.startswith("file:") or ("://" not in u and os.path.isdir(u))
    indexes = [u for u in dict.fromkeys(found["index-url"] + found["extra-index-url"]) if local(u)]
    links = [u for u in dict.fromkeys(found["find-links"]) if local(u)]
    args = ["--index-url", indexes[0]] if indexes else ["--no-index"]
    for u in indexes[1:]:
        args += ["--extra-index-url", u]
    for u in links:
        args += ["--find-links", u]
    return args


SMOKE = r'''
import importlib.util, os, sys
import torch
import nstm, nstm_kernels
from nstm import NSTMLayer
from nstm_kernels import cpu, cuda

pkg = os.path.dirname(os.path.abspath(nstm_kernels.__file__))
assert "site-packages" in pkg, pkg                          # the installed wheel, not the checkout
assert importlib.util.find_spec("triton") is None, "triton is installed"
assert os.path.dirname(os.path.abspath(cpu._source())) == os.path.join(pkg, "csrc"), cpu._source()
assert os.path.isfile(cpu._source()) and os.path.isfile(os.path.join(cuda.CSRC, "nstm_step.cu"))
torch.manual_seed(0)
layer = NSTMLayer(d_model=16, num_heads=2, num_states=8, top_k=2, comm_every=4)
x = torch.randn(2, 12, 16, requires_grad=True)
y = layer(x)
(y.square().mean() + 0.01 * layer.aux_loss).backward()
assert y.shape == x.shape and torch.isfinite(y).all()
assert torch.isfinite(x.grad).all() and all(p.grad is not None and torch.isfinite(p.grad).all()
                                            for p in layer.parameters() if p.requires_grad)
assert cpu.unavailable_reason() is not None                 # no compiler: the PyTorch path ran
print("SMOKE OK", nstm_kernels.__version__, torch.__version__, "|", cpu.unavailable_reason())
'''


def _du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if not os.path.islink(os.path.join(d, f)))


def test_wheel_installs_and_runs_on_cpu_without_triton_or_compiler(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(str(env_dir))
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    py = str(bindir / "python")
    pip_env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    pip_env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    pip = [py, "-m", "pip", "install", "-q", "--no-compile", "--retries", "0", "--timeout", "5"]
    want = f"torch=={torch.__version__.split('+')[0]}"
    p = _run(pip + _local_sources() + [want, "numpy", "tqdm>=4.60"], env=pip_env, timeout=600)
    if p.returncode != 0:
        pytest.skip(f"{want}, numpy and tqdm cannot be installed offline from this machine's local "
                    f"package sources: {_tail(p, 400)}")
    p = _run(pip + ["--no-deps", "--no-index", str(wheel)], env=pip_env)
    assert p.returncode == 0, _tail(p)
    p = _run([py, "-m", "pip", "check"], env=pip_env)       # its requirements are all there
    assert p.returncode == 0, _tail(p)

    # no compiler, no ninja, no triton: PATH is the venv's bin only; fresh build and cache folders
    run_env = {k: v for k, v in os.environ.items()
               if not k.startswith(("NSTM_", "TRITON_", "PYTHON", "TORCH_EXTENSIONS"))}
    home = tmp_path / "home"
    home.mkdir()
    run_env.update(PATH=str(bindir), CXX="/nonexistent/c++", CC="/nonexistent/cc", HOME=str(home),
                   NSTM_CPU_BUILD_DIR=str(tmp_path / "nstm-cpu-build"),
                   TORCH_EXTENSIONS_DIR=str(tmp_path / "torch-ext"), NSTM_PROGRESS="0")
    smoke = tmp_path / "smoke.py"
    smoke.write_text(SMOKE)
    p = _run([py, str(smoke)], env=run_env, cwd=str(tmp_path))
    assert p.returncode == 0 and "SMOKE OK" in p.stdout, _tail(p, 3000)
    assert p.stderr.count(KERNEL_LOG) == 1, p.stderr[-2000:]  # said once, then the PyTorch path

    with zipfile.ZipFile(wheel) as z:
        has_sample = "nstm/sample.py" in z.namelist()
    for script in ("nstm-train", "nstm-demo") + (("nstm-sample",) if has_sample else ()):
        p = _run([str(bindir / script), "--help"], env=run_env, cwd=str(tmp_path))
        assert p.returncode == 0 and "usage" in p.stdout.lower(), (script, _tail(p))
    # the entry points run for real after a plain install: no matplotlib, so no plots, but numbers
    p = _run([str(bindir / "nstm-demo"), "--steps", "2", "--batch", "4", "--out", str(tmp_path / "demo")],
             env=run_env, cwd=str(tmp_path))
    assert p.returncode == 0 and "no plots" in p.stdout, _tail(p, 3000)
    assert (tmp_path / "demo" / "summary.json").is_file()
    p = _run([str(bindir / "nstm-train"), "--task", "copy", "--steps", "2", "--d-model", "16", "--n-layers", "1",
              "--num-heads", "2", "--num-states", "4", "--top-k", "2", "--batch-size", "2", "--eval-batches", "1",
              "--out", str(tmp_path / "runs"), "--run-name", "r"], env=run_env, cwd=str(tmp_path))
    assert p.returncode == 0 and (tmp_path / "runs" / "copy" / "r" / "ckpt.pt").is_file(), _tail(p, 3000)
    print(f"\nfresh CPU env with the wheel: {_du(env_dir) / 2 ** 20:.0f} MiB")
