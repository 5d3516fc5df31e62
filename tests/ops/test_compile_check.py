"""bench/compile_check.py: every Triton kernel compiles for a real GPU (sm_90) at S = K = V = 128
and fits its shared memory, on this CPU.

The interpreter tests check what the kernels compute; this checks that the same kernels get
through Triton's GPU compiler and ptxas (block shapes, dot dims, register allocation), which the
interpreter never exercises. It runs in a subprocess without ``TRITON_INTERPRET``: tests/conftest.py
sets ``TRITON_INTERPRET=1`` in this process on a CPU-only machine, and the recorder needs
compiled-mode ``JITFunction``s.
"""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT as ROOT

TOOL = os.path.join(ROOT, "bench", "compile_check.py")


def launched_kernels():
    """Names of the ``@triton.jit`` functions that are launched (``launch(name, grid, ...)``, the
    one way the ops launch), from the source."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "nstm_kernels", "triton", "*.py")):
        src = open(path).read()
        jitted = set(re.findall(r"@triton\.jit\s*\ndef (\w+)\(", src))
        names |= {n for n in jitted if re.search(rf"\blaunch\({n},", src)}
    return names


def run_tool(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return subprocess.run([sys.executable, TOOL, "--out", str(tmp_path), "--quiet", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def test_source_scan_finds_the_kernels():
    names = launched_kernels()
    for n in ("_route_fwd_kernel", "_nstm_step_kernel", "_chunk_nstm_fwd_kernel_h",
              "_chunk_bwd_kernel_c", "_nstm_bwd_kernel", "_s2s_bwd_kernel"):
        assert n in names
    assert not any(n in names for n in ("convex_write", "read_probs", "s2s_forward_tile"))


H100_LIMIT, CONSUMER_LIMIT = 227 * 1024, 99 * 1024   # opt-in shared memory per block (sm_90; sm_86/89)
# Kernels allowed over the consumer limit at S = K = V = 128, and what takes their place there
# (nstm_kernels/triton/fallback.py): the chunk backward's pass C gives way to the recurrent backward.
OVER_CONSUMER_LIMIT = {"_chunk_bwd_kernel_c"}


@pytest.mark.slow
def test_every_kernel_fits_an_h100_at_s_v_128(tmp_path):
    """At S = K = V = 128 (fp32, top_k 8, s2s on) every launched kernel is recorded, compiles for
    sm_90 with the launcher's block sizes and warps, and its shared memory fits an H100 (227 KB).
    On a 101 KB GPU all but the chunk backward's pass C fit, and that one has a Triton fallback."""
    p = run_tool(tmp_path, "--arch", "90", "--dims", "128", "--dtype", "fp32", "--top-k", "8")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    [path] = glob.glob(str(tmp_path / "compile-*.json"))
    data = json.load(open(path))
    rows = data["rows"]
    assert {r["kernel"] for r in rows} == launched_kernels()
    for r in rows:
        assert r["status"] == "ok", r
        assert r["arch"] == "sm_90" and r["dims"] == "S=K=V=128" and "H100" in r["fits"]
        assert r["shared"] <= H100_LIMIT
        if "registers" in r:                      # cuobjdump ships with Triton's NVIDIA backend
            assert 0 < r["registers"] <= 255
    over = {r["kernel"] for r in rows if r["shared"] > CONSUMER_LIMIT}
    assert over <= OVER_CONSUMER_LIMIT, over
    assert data["meta"]["commit"]
    assert os.path.exists(path[:-5] + ".md")


def test_bad_arguments_are_refused(tmp_path):
    p = run_tool(tmp_path, "--arch", "70")
    assert p.returncode == 2 and "--arch 70: expected one of" in p.stderr
    p = run_tool(tmp_path, "--dims", "0")
    assert p.returncode == 2 and "--dims 0: expected 1..256" in p.stderr
    assert not glob.glob(str(tmp_path / "compile-*"))
