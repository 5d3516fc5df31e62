"""The backend choice (``nstm_kernels/dispatch.py``) around Triton's interpreter.

tests/conftest.py sets ``TRITON_INTERPRET=1`` for the whole run on a CPU-only machine, before any
Triton kernel is imported. The dispatch reads the variable at call time, so the "Triton cannot run
on these CPU tensors" path is tested here by taking it away with ``monkeypatch``: every public op
asked for ``"triton"`` (by argument or ``NSTM_BACKEND``) falls back to ``"chunked"`` with one log
line and the chunked results.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import pkgutil

import pytest
import torch

from nstm_kernels import dispatch, nstm_attention, nstm_attention_with_maps, nstm_step, sparse_route, state_attention
from tests.helpers import make_inputs

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _attention(inp, backend):
    o, st = nstm_attention(*inp[:5], 2, inp.s2s, 4, inp.initial_state, True, backend=backend)
    return [o, st.k, st.v]


def _attention_with_maps(inp, backend):
    o, st, maps = nstm_attention_with_maps(*inp[:5], 2, inp.s2s, 4, inp.initial_state, True,
                                           backend=backend)
    return [o, st.k, st.v, maps["read"]]


def _step(inp, backend):
    o, st = nstm_step(*(t[:, 0] for t in inp[:5]), 2, inp.s2s, 4, inp.initial_state, backend=backend)
    return [o, st.k, st.v]


def _route(inp, backend):
    return list(sparse_route(inp.route_logits, inp.write_gate, 2, backend=backend))


def _state_attention(inp, backend):
    return [state_attention(inp.initial_state.v, inp.s2s, backend=backend)]


OPS = [pytest.param("nstm_attention", _attention, id="nstm_attention"),
       pytest.param("nstm_attention_with_maps", _attention_with_maps, id="nstm_attention_with_maps"),
       pytest.param("nstm_step", _step, id="nstm_step"),
       pytest.param("sparse_route", _route, id="sparse_route"),
       pytest.param("state_attention", _state_attention, id="state_attention")]


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())


@pytest.mark.parametrize("how", ["argument", "NSTM_BACKEND"])
@pytest.mark.parametrize("op,run", OPS)
def test_triton_on_cpu_without_interpreter_falls_back_to_chunked(op, run, how, monkeypatch, caplog,
                                                                 fresh_warnings):
    if HAVE_TRITON:   # imported (interpreted) first: taking the variable away changes the dispatch only
        importlib.import_module("nstm_kernels.triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("NSTM_BACKEND", raising=False)
    inp = make_inputs(T=9, dtype=torch.float32, pos=3, seed=1)
    want = run(inp, "chunked")
    with caplog.at_level(logging.WARNING, logger="nstm_kernels"):
        if how == "argument":
            got = [run(inp, "triton") for _ in range(2)]
        else:
            monkeypatch.setenv("NSTM_BACKEND", "triton")
            got = [run(inp, None) for _ in range(2)]
    reason = ("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got cpu"
              if HAVE_TRITON else "Triton is not installed")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"nstm_kernels: {op}: backend 'triton' unavailable ({reason}); using 'chunked'"]
    for res in got:                                    # the second call logs nothing, same numbers
        assert len(res) == len(want)
        for a, b in zip(res, want):
            assert torch.equal(a, b)


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
@pytest.mark.parametrize("op", [p.values[0] for p in OPS])
def test_interpreter_lets_triton_run_on_cpu(op, monkeypatch, caplog, fresh_warnings):
    monkeypatch.delenv("NSTM_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with caplog.at_level(logging.WARNING, logger="nstm_kernels"):
        assert dispatch.resolve_backend("triton", torch.device("cpu"), op) == "triton"
    assert not caplog.records
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with caplog.at_level(logging.WARNING, logger="nstm_kernels"):
        assert dispatch.resolve_backend("triton", torch.device("cpu"), op) == "chunked"
    assert len(caplog.records) == 1


def _kernel_kinds():
    """The class names of every Triton kernel object in nstm_kernels.triton's modules."""
    from triton.runtime.jit import KernelInterface

    import nstm_kernels.triton as pkg

    kinds = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        kinds |= {type(obj).__name__ for obj in vars(mod).values() if isinstance(obj, KernelInterface)}
    return kinds


@pytest.mark.interpret
@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
def test_cpu_runs_interpret_the_triton_kernels():
    """On a CPU-only machine the conftest set TRITON_INTERPRET=1 before the kernels were imported."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert _kernel_kinds() == {"InterpretedFunction"}


@pytest.mark.gpu
def test_gpu_runs_compile_the_triton_kernels():
    """On a CUDA machine the conftest leaves TRITON_INTERPRET unset: the kernels compile."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not HAVE_TRITON:
        pytest.skip("needs Triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 was given by the caller")
    assert _kernel_kinds() == {"JITFunction"}
