"""How the Triton ops launch: on the tensors' device, without a host copy per call, one launch per
pass over all sequences of a packed batch."""
from __future__ import annotations

import ast
import glob
import os

import pytest
import torch

from tests.helpers import REPO_ROOT

pytest.importorskip("triton")

TRITON_DIR = os.path.join(REPO_ROOT, "nstm_kernels", "triton")


def _launch_calls_outside_a_guard(tree: ast.AST):
    """``launch(...)`` calls not lexically inside ``with on_device(...)``."""
    bad = []

    def visit(node, guarded):
        if isinstance(node, ast.With):
            guarded = guarded or any(isinstance(i.context_expr, ast.Call)
                                     and getattr(i.context_expr.func, "id", None) == "on_device"
                                     for i in node.items)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "launch" and not guarded:
            bad.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)
    visit(tree, False)
    return bad


def test_every_launch_is_inside_a_device_guard():
    """Triton launches on the current CUDA device; each launch sits in ``with on_device(tensor)``."""
    found, bad = 0, {}
    for path in glob.glob(os.path.join(TRITON_DIR, "*.py")):
        src = open(path).read()
        tree = ast.parse(src)
        found += sum(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "launch"
                     for n in ast.walk(tree))
        lines = _launch_calls_outside_a_guard(tree)
        if lines:
            bad[os.path.basename(path)] = lines
    assert found >= 12 and not bad, (found, bad)


def test_the_guard_check_is_not_blind():
    tree = ast.parse("def f(x):\n    launch(k, (1,), x)\n    with on_device(x):\n        launch(k, (1,), x)\n")
    assert _launch_calls_outside_a_guard(tree) == [2]


def test_the_chunk_layout_is_built_once_per_shape():
    """A repeated call shape reuses the device table: no host-to-device copy, no sync."""
    from nstm_kernels.triton.utils import dense_layout, layout
    a = dense_layout(3, 100, 5, 16, True, 64, "cpu")
    assert dense_layout(3, 100, 5 + 16, 16, True, 64, "cpu") is a   # same phase in the period
    assert dense_layout(3, 100, 6, 16, True, 64, "cpu") is not a
    # the table: chunks never cross a row, every period end is an event, rows own their chunks
    seg, cuc, ev = a.seg.tolist(), a.cuc.tolist(), a.ev.tolist()
    assert seg[0] == 0 and seg[-1] == 300 and cuc[0] == 0 and cuc[-1] == a.G == len(ev)
    for n in range(3):
        starts = seg[cuc[n]:cuc[n + 1] + 1]
        assert starts[0] == 100 * n and starts[-1] == 100 * (n + 1)
        ends = [(5 + t1 - 100 * n) % 16 == 0 for t1 in starts[1:]]
        assert ev[cuc[n]:cuc[n + 1]] == [int(e) for e in ends]
        assert all(0 < b - a_ <= 64 for a_, b in zip(starts[:-1], starts[1:]))
    p = layout([0, 7], [7, 30], [3, 0], 4, True, 64, "cpu")
    assert p.N == 2 and p.lmax <= 4 and p.seg.tolist()[p.cuc.tolist()[1]] == 7


def test_a_packed_batch_is_one_launch_per_pass(monkeypatch):
    """Four documents of very different lengths: each kernel is launched once, not per document."""
    from nstm_kernels import dispatch
    if dispatch._triton_reason(torch.device("cpu")) is not None:
        pytest.skip("needs the Triton interpreter")
    from nstm_kernels.triton import chunk, chunk_bwd, ops, routing, triton_nstm, utils
    from tests.helpers import F32_INPUTS, make_inputs
    counts = {}
    real = utils.launch

    def counting(kernel, grid, *args, **kwargs):
        name = kernel.fn.__name__ + ("/local" if kwargs.get("LOCAL") else "")
        counts[name] = counts.get(name, 0) + 1
        return real(kernel, grid, *args, **kwargs)
    for mod in (chunk, chunk_bwd, ops, routing):
        if hasattr(mod, "launch"):
            monkeypatch.setattr(mod, "launch", counting)
    inp = make_inputs(B=1, T=40, H=1, K=8, V=8, S=4, seed=9, requires_grad=True, state=False, **F32_INPUTS)
    cu = torch.tensor([0, 1, 3, 20, 40])
    o, fin = triton_nstm(inp.q, inp.k, inp.v, inp.route_logits, inp.write_gate, 2, inp.s2s, 8,
                         None, True, None, cu_seqlens=cu)
    (o.sum() + fin.v.sum()).backward()
    assert fin.k.shape[0] == 4
    assert counts == {"_route_fwd_kernel": 1, "_chunk_nstm_fwd_kernel_h": 1, "_chunk_nstm_fwd_kernel_o": 1,
                      "_chunk_bwd_kernel_c/local": 1, "_chunk_bwd_kernel_h": 1, "_chunk_bwd_kernel_c": 1,
                      "_route_bwd_kernel": 1}, counts
