"""Test setup: fresh allocations in our code start as NaN.

The tests are a package that mirrors the code (``tests/ops``, ``tests/layers``, ``tests/models``,
``tests/train``, ``tests/tools``); shared helpers are imported as ``tests.helpers`` (pytest puts
the repository root on ``sys.path`` because ``tests/`` has an ``__init__.py``).

Filling torch.empty / empty_like with NaN (as fla's conftest does) makes a path that forgets to
write an element fail loudly instead of passing on leftover zeros.
"""
import pytest
import torch

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
