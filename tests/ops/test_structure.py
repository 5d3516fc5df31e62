"""The package's structure holds: no import cycles (module- or function-level), one backend table
used by every entry point, environment variables read in one module at call time, no production
import of the reference oracle."""
from __future__ import annotations

import ast
import os
import re

import pytest
import torch

import nstm_kernels
from nstm_kernels import dispatch, nstm_attention, settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("nstm_kernels", "nstm")


def _modules():
    mods = {}
    for pkg in PACKAGES:
        for dp, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dp, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _imports(mods):
    """module -> the package modules it imports anywhere in its body (inside functions too)."""
    graph = {}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    parts = parts[:len(parts) - (node.level - 1)]
                    target = ".".join(parts + ([node.module] if node.module else []))
                else:
                    target = node.module
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[mod] = {d for d in deps if d in mods and d != mod}
    return graph


def _cycles(graph):
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _imports(_modules())
    assert "nstm_kernels.triton.ops" in graph and graph["nstm_kernels.api"]   # the walk saw them
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_production_module_imports_the_reference():
    graph = _imports(_modules())
    users = sorted(m for m, deps in graph.items()
                   if any(d.startswith("nstm_kernels.reference") for d in deps)
                   and not m.startswith("nstm_kernels.reference"))
    assert users == ["nstm_kernels.dispatch"]     # the table offers it as the "reference" backend


def test_environment_is_read_in_settings_only():
    offenders = []
    for mod, path in _modules().items():
        if mod in ("nstm_kernels.settings", "nstm.data.fetch"):   # fetch builds a pip subprocess env
            continue
        if re.search(r"os\.environ|os\.getenv", open(path, encoding="utf-8").read()):
            offenders.append(mod)
    assert offenders == []


def test_every_public_op_goes_through_the_table(monkeypatch):
    calls = []

    def fake(*args, **kwargs):
        calls.append(len(args))
        B, T, H, _ = args[0].shape
        return torch.zeros(B, T, H, args[2].shape[-1]), None

    monkeypatch.setitem(dispatch.TABLE["nstm_attention"], "chunked", fake)
    q = torch.randn(1, 4, 2, 8)
    o, _ = nstm_attention(q, q, q, torch.randn(1, 4, 2, 4), torch.randn(1, 4, 2), 2)
    assert calls == [11] and torch.equal(o, torch.zeros(1, 4, 2, 8))
    assert set(dispatch.TABLE) == {"nstm_attention", "nstm_attention_with_maps", "nstm_step",
                                   "nstm_step_", "sparse_route", "state_attention"}
    for op, table in dispatch.TABLE.items():
        assert "chunked" in table, op
        assert set(table) <= set(settings.BACKENDS), op


def test_backend_override_is_read_at_call_time(monkeypatch):
    monkeypatch.delenv("NSTM_BACKEND", raising=False)
    assert dispatch.resolve_backend(None, torch.device("cpu"), "nstm_attention") == "chunked"
    monkeypatch.setenv("NSTM_BACKEND", "reference")
    assert dispatch.lookup("nstm_attention", None, torch.device("cpu"))[0] == "reference"
    assert dispatch.resolve_backend("chunked", torch.device("cpu"), "nstm_attention") == "chunked"
    monkeypatch.setenv("NSTM_BACKEND", "fast")
    with pytest.raises(ValueError, match="NSTM_BACKEND must be one of"):
        dispatch.resolve_backend(None, torch.device("cpu"), "nstm_attention")


def test_a_backend_without_the_op_runs_its_chunked_entry():
    name, fn = dispatch.lookup("nstm_attention", "cuda", torch.device("cpu"))
    assert name == "chunked" and fn is dispatch.TABLE["nstm_attention"]["chunked"]
    assert dispatch.impl("nstm_attention", "cuda") is dispatch.TABLE["nstm_attention"]["chunked"]


def test_kernel_variant_choices_are_checked():
    with pytest.raises(ValueError, match=r"forward must be one of \('chunk', 'recurrent'\)"):
        settings.triton_forward("parallel")
    assert settings.triton_backward("recurrent") == "recurrent"
    assert nstm_kernels.__version__
