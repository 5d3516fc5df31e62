"""Test setup: Triton's interpreter on CPU-only machines, and fresh allocations start as NaN.

The tests are a package that mirrors the code (``tests/ops``, ``tests/layers``, ``tests/models``,
``tests/train``, ``tests/tools``); shared helpers are imported as ``tests.helpers`` (pytest puts
the repository root on ``sys.path`` because ``tests/`` has an ``__init__.py``).

Filling torch.empty / empty_like with NaN (as fla's conftest does) makes a path that forgets to
write an element fail loudly instead of passing on leftover zeros.

TRITON_INTERPRET is set here and nowhere else. Triton decides whether a kernel is interpreted when
its module is imported (``@triton.jit`` reads the variable then), so it is set before any test
module imports ``nstm_kernels.triton``: without a CUDA GPU the Triton kernels run on CPU tensors
through the interpreter; on a GPU machine they compile (``pytest -m gpu``), and the tests marked
``interpret`` (CPU tensors through the interpreter) are skipped. A TRITON_INTERPRET given by the
caller is left as it is. The package's dispatch reads the variable at call time
(``nstm_kernels.dispatch``), so a test of the "Triton unavailable here" fallback changes it with
``monkeypatch`` (tests/ops/test_dispatch.py).
"""
import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    if TRITON_INTERPRET:
        return
    skip = pytest.mark.skip(reason="TRITON_INTERPRET is not 1 in this run (Triton compiles for a GPU); "
                                   "the conftest sets it on CPU-only machines")
    for item in items:
        if "interpret" in item.keywords:
            item.add_marker(skip)

_empty, _empty_like = torch.empty, torch.empty_like


def _nan_empty(*args, **kwargs):
    t = _empty(*args, **kwargs)
    if t.is_floating_point() and t.device.type != "meta":
        t.fill_(float("nan"))
    return t


def _nan_empty_like(*args, **kwargs):
    t = _empty_like(*args, **kwargs)
    if t.is_floating_point() and t.device.type != "meta":
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def nan_fresh_allocations(monkeypatch):
    monkeypatch.setattr(torch, "empty", _nan_empty)
    monkeypatch.setattr(torch, "empty_like", _nan_empty_like)
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny tensors: more threads only add overhead, and a busy
    machine's OpenMP contention); use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
