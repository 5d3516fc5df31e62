"""Test setup: tests import their helpers by name, and fresh allocations in our code start as NaN.

Filling torch.empty / empty_like with NaN (as fla's conftest does) makes a path that forgets to
write an element fail loudly instead of passing on leftover zeros.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

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
