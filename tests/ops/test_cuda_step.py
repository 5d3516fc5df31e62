"""The CUDA C++ one-token step (csrc/, nstm_kernels/cuda.py).

On the CPU: the loader says why it is unavailable, ``nstm_step(backend="cuda")`` falls back with one
log line and the right numbers, a failed build is reported in one line and falls back, and the
kernel's own code runs on the CPU through a thread-per-CUDA-thread emulation (csrc/nstm_emu.h,
built with g++) against the PyTorch step. On a GPU (``-m gpu``): the compiled kernel against the
chunked step and the reference over a grid, a long decode loop, the in-place form and CUDA graphs.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import os
import shutil
import subprocess

import pytest
import torch

import nstm_kernels.cuda as ncuda
from nstm_kernels import NSTMState, S2SParams, dispatch, nstm_step
from nstm_kernels.chunked import recurrent_nstm_step
from nstm_kernels.reference import naive_nstm_step
from tests.helpers import as_step, make_inputs

CSRC = ncuda.CSRC


pytestmark = pytest.mark.usefixtures("one_thread")


def step_inputs(B=2, H=2, K=16, V=16, S=8, dtype=torch.float32, s2s=True, pos=0, seed=0,
                device="cpu"):
    """One token of ``make_inputs`` (fp32) on ``device``: q, k, v in ``dtype``, the rest fp32."""
    inp = as_step(make_inputs(B=B, T=1, H=H, K=K, V=V, S=S, dtype=torch.float32, s2s=s2s, pos=pos,
                              seed=seed))
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    p = None if inp.s2s is None else S2SParams(*(t.to(device) for t in inp.s2s))
    st = NSTMState(inp.initial_state.k.to(device), inp.initial_state.v.to(device), pos)
    return (to(inp.q), to(inp.k), to(inp.v), inp.route_logits.to(device),
            inp.write_gate.to(device)), p, st


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())


# ------------------------------------------------------------------------------------------ CPU
def test_loader_reports_unavailable_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    reason = ncuda.unavailable_reason()
    assert reason is not None and not ncuda.available()
    assert "CUDA" in reason
    assert "needs CUDA tensors" in ncuda.unavailable_reason(torch.device("cpu"))


def test_cuda_backend_on_cpu_falls_back_with_one_warning(fresh_warnings, caplog):
    (q, k, v, lg, g), s2s, st = step_inputs(pos=6)
    with caplog.at_level(logging.WARNING, logger="nstm_kernels"):
        o1, s1 = nstm_step(q, k, v, lg, g, 2, s2s, 7, st, backend="cuda")
        o2, s2 = nstm_step(q, k, v, lg, g, 2, s2s, 7, s1, backend="cuda")
    lines = [r for r in caplog.records if "backend 'cuda' unavailable" in r.getMessage()]
    assert len(lines) == 1 and "using 'chunked'" in lines[0].getMessage()
    e1, f1 = nstm_step(q, k, v, lg, g, 2, s2s, 7, st, backend="chunked")
    e2, f2 = nstm_step(q, k, v, lg, g, 2, s2s, 7, f1, backend="chunked")
    for a, b in ((o1, e1), (o2, e2), (s2.k, f2.k), (s2.v, f2.v)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert s2.pos == 8


def test_build_failure_logs_one_line_and_falls_back(fresh_warnings, caplog, monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp_ext

    calls = []

    def broken_load(*args, **kwargs):
        calls.append(kwargs.get("name"))
        raise RuntimeError("Error building extension 'nstm_cuda_step'\nnvcc fatal : boom")

    monkeypatch.setattr(ncuda, "toolkit_reason", lambda: None)
    monkeypatch.setattr(cpp_ext, "load", broken_load)
    monkeypatch.setenv("NSTM_CUDA_BUILD_DIR", str(tmp_path / "build"))
    ncuda.reset()
    try:
        with pytest.raises(RuntimeError, match="building the CUDA step kernel failed"):
            ncuda.load_extension()
        assert "boom" in (tmp_path / "build" / "build.log").read_text()
        dev = torch.device("cuda")          # only a name here: nothing runs on it
        with caplog.at_level(logging.WARNING, logger="nstm_kernels"):
            got = [dispatch.resolve_backend("cuda", dev, "nstm_step") for _ in range(3)]
        want = "triton" if dispatch._triton_reason(dev) is None else "chunked"
        assert got == [want] * 3
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "building the CUDA step kernel failed" in lines[0]
        assert f"using '{want}'" in lines[0]
        assert calls == ["nstm_cuda_step"]  # the failure is cached: one build attempt
    finally:
        ncuda.reset()


def test_rebuild_env_wipes_the_build_dir(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp_ext

    d = tmp_path / "build"
    d.mkdir()
    (d / "stale.o").write_text("x")
    seen = {}

    def fake_load(*args, **kwargs):
        seen["stale"] = (d / "stale.o").exists()
        seen["dir"] = kwargs["build_directory"]
        return "module"

    monkeypatch.setattr(ncuda, "toolkit_reason", lambda: None)
    monkeypatch.setattr(cpp_ext, "load", fake_load)
    monkeypatch.setenv("NSTM_CUDA_BUILD_DIR", str(d))
    monkeypatch.setenv("NSTM_CUDA_REBUILD", "1")
    ncuda.reset()
    try:
        assert ncuda.load_extension() == "module"
        assert seen == {"stale": False, "dir": str(d)}
    finally:
        ncuda.reset()


def test_kernel_sources_are_aten_free():
    """The kernel's translation unit compiles with nvcc alone: no ATen/torch headers outside the
    binding."""
    for name in ("nstm_step.cu", "nstm_step_kernel.cuh", "nstm_step.h"):
        text = open(os.path.join(CSRC, name), encoding="utf-8").read()
        includes = [ln for ln in text.splitlines() if ln.strip().startswith("#include")]
        assert not [ln for ln in includes if "torch" in ln or "ATen" in ln or "c10" in ln], name


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    """The kernel's code built for the CPU emulation (g++, C++20)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp("emu") / "libnstm_step_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-DNSTM_CPU_EMU", f"-I{CSRC}",
           os.path.join(CSRC, "nstm_step_emu.cpp"), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 and "c++20" in res.stderr:
        pytest.skip("the C++ compiler has no C++20 (std::barrier)")
    assert res.returncode == 0, res.stderr
    lib = ctypes.CDLL(str(out))
    lib.nstm_step_emu.restype = ctypes.c_int
    return lib


def emu_step_(lib, q, k, v, lg, g, top_k, s2s, C, sk, sv, pos, scale=None):
    """The emulated kernel on fp32 CPU tensors; sk/sv updated in place; pos int or int64 tensor."""
    B, H, K = q.shape
    V, S = v.shape[-1], lg.shape[-1]
    ins = [t.float().contiguous() for t in (q, k, v, lg, g)]
    ws = [None] * 3 if s2s is None else [t.float().contiguous() for t in s2s]
    o = torch.empty(B, H, V)
    ptr = lambda t: None if t is None else ctypes.c_void_p(t.data_ptr())  # noqa: E731
    pos_dev = pos if isinstance(pos, torch.Tensor) else None
    rc = lib.nstm_step_emu(*[ptr(t) for t in ins], ptr(sk), ptr(sv), ptr(o), *[ptr(t) for t in ws],
                           ptr(pos_dev), ctypes.c_int64(0 if pos_dev is not None else pos),
                           ctypes.c_int64(C), B, H, S, K, V, top_k,
                           ctypes.c_float(K ** -0.5 if scale is None else scale))
    assert rc == 0
    return o


GRID = [  # (S, K=V, top_k, s2s, pos): pos 7 with C = 8 ends a period
    (16, 32, 1, True, 7), (16, 32, 8, False, 7), (64, 64, 8, True, 7), (64, 16, 1, True, 3),
    (128, 32, 8, True, 7), (130, 24, 8, True, 15), (5, 40, 5, True, 7), (1, 8, 1, True, 7),
]


@pytest.mark.parametrize("S,D,top_k,s2s,pos", GRID)
def test_emulated_kernel_equals_pytorch_step(emu_lib, S, D, top_k, s2s, pos):
    (q, k, v, lg, g), p, st = step_inputs(B=2, H=2, K=D, V=D, S=S, s2s=s2s, pos=pos, seed=S + D)
    sk, sv = st.k.clone(), st.v.clone()
    o = emu_step_(emu_lib, q, k, v, lg, g, top_k, p, 8, sk, sv, pos)
    eo, es = recurrent_nstm_step(q, k, v, lg, g, top_k, p, 8, st)
    torch.testing.assert_close(o, eo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sk, es.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sv, es.v, rtol=1e-5, atol=1e-5)


def test_emulated_kernel_decode_loop_with_device_position(emu_lib):
    """20 tokens across two period ends, the position read from a tensor (as in a CUDA graph)."""
    B, H, K, S, top_k, C = 1, 2, 16, 8, 2, 6
    (q, k, v, lg, g), p, st = step_inputs(B=B, H=H, K=K, V=K, S=S, pos=3)
    sk, sv = st.k.clone(), st.v.clone()
    pos = torch.tensor([3], dtype=torch.int64)
    ref = st
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        q, k, v = (torch.randn(B, H, K, generator=gen) for _ in range(3))
        lg, g = torch.randn(B, H, S, generator=gen) * 2, torch.randn(B, H, generator=gen)
        o = emu_step_(emu_lib, q, k, v, lg, g, top_k, p, C, sk, sv, pos)
        pos += 1
        eo, ref = recurrent_nstm_step(q, k, v, lg, g, top_k, p, C, ref)
        torch.testing.assert_close(o, eo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sv, ref.v, rtol=1e-5, atol=1e-5)
    assert int(pos) == ref.pos == 23


class EmuExt:
    """Stands in for the compiled extension: the binding's signature, the emulated kernel behind it
    (fp32 CPU tensors), so that the Python side (argument order, copies, positions) is tested."""

    def __init__(self, lib):
        self.lib, self.calls = lib, 0

    def nstm_step_(self, q, k, v, logits, gate, state_k, state_v, o, w_q, w_k, s2s_gate,
                   pos_dev, pos_host, top_k, comm_every, scale):
        self.calls += 1
        for t in (q, k, v, logits, gate, state_k, state_v, o):
            assert t.is_contiguous() and t.dtype == torch.float32
        B, H, K = q.shape
        ptr = lambda t: None if t is None else ctypes.c_void_p(t.data_ptr())  # noqa: E731
        rc = self.lib.nstm_step_emu(ptr(q), ptr(k), ptr(v), ptr(logits), ptr(gate), ptr(state_k),
                                    ptr(state_v), ptr(o), ptr(w_q), ptr(w_k), ptr(s2s_gate),
                                    ptr(pos_dev), ctypes.c_int64(pos_host), ctypes.c_int64(comm_every),
                                    B, H, logits.shape[-1], K, v.shape[-1], top_k, ctypes.c_float(scale))
        assert rc == 0


@pytest.fixture
def emu_ext(emu_lib, monkeypatch):
    ext = EmuExt(emu_lib)
    monkeypatch.setattr(ncuda, "load_extension", lambda: ext)
    return ext


def test_cuda_wrappers_through_the_emulated_kernel(emu_ext):
    """cuda_nstm_step (functional: the caller's state, here an expanded view, is not modified) and
    cuda_nstm_step_ (in place, int or tensor position) against the PyTorch step."""
    (q, k, v, lg, g), p, st = step_inputs(B=3, H=2, K=16, V=16, S=8, pos=5)
    st = NSTMState(st.k[:1].expand(3, -1, -1, -1), st.v[:1].expand(3, -1, -1, -1), 5)
    k0, v0 = st.k.clone(), st.v.clone()
    o, ns = ncuda.cuda_nstm_step(q, k, v, lg, g, 3, p, 6, st)            # pos 5 ends a period
    eo, es = recurrent_nstm_step(q, k, v, lg, g, 3, p, 6, st)
    assert torch.equal(st.k, k0) and torch.equal(st.v, v0)
    torch.testing.assert_close(o, eo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ns.v, es.v, rtol=1e-5, atol=1e-5)
    assert ns.pos == 6 and ns.k.is_contiguous()
    sk, sv = st.k.contiguous().clone(), st.v.contiguous().clone()
    o2 = ncuda.cuda_nstm_step_(q, k, v, lg, g, 3, p, 6, sk, sv, torch.tensor([5]))
    torch.testing.assert_close(o2, eo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sv, es.v, rtol=1e-5, atol=1e-5)
    o3, n3 = ncuda.cuda_nstm_step(q, k, v, lg, g, 3, None, 6, None)         # no state, no s2s
    e3, f3 = recurrent_nstm_step(q, k, v, lg, g, 3, None, 6, None)
    torch.testing.assert_close(o3, e3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(n3.k, f3.k, rtol=1e-5, atol=1e-5)
    assert emu_ext.calls == 3


def test_static_decoder_with_the_emulated_kernel_equals_model_step(emu_ext, monkeypatch):
    """The decode path that a CUDA graph captures (kernel + position tensor), run eagerly with the
    emulated kernel, against the functional model.step."""
    import copy

    from nstm import NSTMLM
    torch.manual_seed(3)
    model = NSTMLM(40, d_model=32, n_layers=2, num_heads=2, num_states=8, top_k=3,
                   comm_every=4).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.mixer.s2s.gate.fill_(0.6)
    ref = copy.deepcopy(model)                               # the PyTorch step
    for b in model.blocks:                                   # the decoder's layers: the CUDA step,
        b.mixer.backend = "cuda"                             # "available" on CPU tensors here
    monkeypatch.setitem(dispatch._REASONS, "cuda", lambda device, op: None)
    logits, state = ref.prefill(torch.randint(0, 40, (2, 5)))
    dec = model.static_decoder(state)
    tok = logits.argmax(-1)
    with torch.no_grad():
        for t in range(9):                                   # period ends at pos 7 and 11
            l1, state = ref.step(tok, state)
            if t % 2:
                l2 = dec.step(tok)                           # int position
            else:
                l2 = dec._forward(tok, dec.pos_t)           # tensor position, as in the graph
                dec.pos += 1
                dec.pos_t.add_(1)
            torch.testing.assert_close(l2, l1, rtol=1e-4, atol=1e-4)
            tok = l1.argmax(-1)
    assert emu_ext.calls == 9 * 2
    for a, b in zip(state, dec.export()):
        torch.testing.assert_close(b.op.v, a.op.v, rtol=1e-4, atol=1e-4)
        assert a.op.pos == b.op.pos == 14


# ------------------------------------------------------------------------------------------ GPU
def _need_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    missing = ncuda.toolkit_reason()
    if missing is not None:                    # no compiler here: nothing to test, not a bug
        pytest.skip(f"the CUDA step kernel cannot be built here: {missing}")
    reason = ncuda.unavailable_reason(torch.device("cuda"))
    if reason is not None:                     # a toolkit and a GPU, and still no kernel: a bug
        pytest.fail(f"a GPU and a CUDA toolkit are present but the kernel is unavailable: {reason}")


GPU_GRID = [(dt, S, D, top_k, s2s)
            for dt, S, D, top_k, s2s in itertools.product(
                (torch.float32, torch.bfloat16), (16, 64, 128), (32, 64, 128), (1, 8), (True, False))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,S,D,top_k,s2s", GPU_GRID)
def test_cuda_step_equals_chunked_and_reference(dtype, S, D, top_k, s2s):
    _need_kernel()
    C = 4
    for pos in (2, 3, 4):                                # 3 ends a period (C = 4)
        (q, k, v, lg, g), p, st = step_inputs(B=3, H=2, K=D, V=D, S=S, dtype=dtype, s2s=s2s,
                                              pos=pos, seed=S * D + pos, device="cuda")
        k0, v0 = st.k.clone(), st.v.clone()
        o, ns = nstm_step(q, k, v, lg, g, top_k, p, C, st, backend="cuda")
        torch.cuda.synchronize()
        assert torch.equal(st.k, k0) and torch.equal(st.v, v0), "the functional step mutated its input"
        eo, es = recurrent_nstm_step(q, k, v, lg, g, top_k, p, C, st)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(o, eo, **tol)
        torch.testing.assert_close(ns.k, es.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ns.v, es.v, rtol=1e-4, atol=1e-4)
        assert ns.pos == pos + 1 and ns.k.dtype == torch.float32
        # against the fp64 reference
        d64 = lambda t: t.double()  # noqa: E731
        p64 = None if p is None else S2SParams(*(d64(t) for t in p))
        ro, rs = naive_nstm_step(d64(q), d64(k), d64(v), d64(lg), d64(g), top_k, p64, C,
                                 NSTMState(d64(st.k), d64(st.v), pos))
        torch.testing.assert_close(o.double(), ro, **(dict(rtol=1e-3, atol=1e-3)
                                                      if dtype == torch.float32 else tol))
        torch.testing.assert_close(ns.v.double(), rs.v, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_long_decode_loop_in_place(dtype):
    """2,000 tokens with the in-place form and a device position vs the functional PyTorch step."""
    _need_kernel()
    B, H, K, S, top_k, C = 2, 4, 64, 64, 8, 64
    (q, k, v, lg, g), p, st = step_inputs(B=B, H=H, K=K, V=K, S=S, dtype=dtype, device="cuda")
    p = S2SParams(p.w_q, p.w_k, torch.full((H,), 0.3, device="cuda"))
    sk, sv = st.k.clone(), st.v.clone()
    pos = torch.zeros(1, dtype=torch.int64, device="cuda")
    ref = st
    gen = torch.Generator(device="cuda").manual_seed(0)
    worst = 0.0
    for _ in range(2000):
        q, k, v = (torch.randn(B, H, K, generator=gen, device="cuda").to(dtype) for _ in range(3))
        lg = torch.randn(B, H, S, generator=gen, device="cuda") * 2
        g = torch.randn(B, H, generator=gen, device="cuda")
        o = ncuda.cuda_nstm_step_(q, k, v, lg, g, top_k, p, C, sk, sv, pos)
        pos += 1
        eo, ref = recurrent_nstm_step(q, k, v, lg, g, top_k, p, C, ref)
        worst = max(worst, (o.float() - eo.float()).abs().max().item())
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    assert worst < tol
    torch.testing.assert_close(sv, ref.v, rtol=1e-3, atol=1e-3)
    assert int(pos) == ref.pos == 2000


@pytest.mark.gpu
def test_cuda_step_in_a_cuda_graph():
    _need_kernel()
    B, H, K, S, top_k, C = 2, 2, 32, 16, 4, 3
    (q, k, v, lg, g), p, st = step_inputs(B=B, H=H, K=K, V=K, S=S, device="cuda")
    sk, sv = st.k.clone(), st.v.clone()
    pos = torch.zeros(1, dtype=torch.int64, device="cuda")
    ins = [t.clone() for t in (q, k, v, lg, g)]
    ncuda.cuda_nstm_step_(*ins, top_k, p, C, sk.clone(), sv.clone(), pos)     # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ncuda.cuda_nstm_step_(*ins, top_k, p, C, sk, sv, pos)
        pos.add_(1)
    ref = NSTMState(st.k, st.v, 0)
    gen = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(10):                                  # crosses three period ends
        new = [torch.randn(t.shape, generator=gen, device="cuda") for t in ins]
        for buf, x in zip(ins, new):
            buf.copy_(x)
        graph.replay()
        eo, ref = recurrent_nstm_step(*new, top_k, p, C, ref)
        torch.testing.assert_close(out, eo, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sv, ref.v, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_step_rejects_unsupported_sizes():
    _need_kernel()
    (q, k, v, lg, g), p, st = step_inputs(K=8, V=8, S=8, device="cuda")
    big = torch.randn(2, 2, 2000, device="cuda")
    with pytest.raises(RuntimeError, match="supported"):
        ncuda.cuda_nstm_step(q, k, v, big, g, 2, None, 4, None)
