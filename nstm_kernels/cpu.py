"""The NSTM sequence operator on the CPU in C++ (``csrc/nstm_cpu.cpp``): the fast path of the
``"chunked"`` backend for CPU tensors.

The chunk-parallel PyTorch form (``nstm_kernels.chunked.chunk_nstm``) runs a few hundred tensor
operations per call, each of which allocates its output and synchronises the intra-op threads.
On a machine where memory pages are expensive to fault in (virtual machines) or where another
program holds a core, those small parallel regions and fresh allocations cost far more than the
arithmetic (``bench/NOTES.md``, issue 12). This kernel does the same work token by token, per
(sequence, head), in one parallel region per call, with the slot memory in a private buffer that
stays in cache. Its backward re-runs each block of 64 tokens from a stored checkpoint and walks it
in reverse, restoring the state exactly.

It is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja, the system C++
compiler; about 30 s, then cached on disk). When it cannot be built (no compiler, no ninja, a
build error) or is switched off (``NSTM_CPU_KERNEL=0``), the ``"chunked"`` backend runs the
PyTorch chunk form instead, after one log line; nothing else changes. Calls with
``return_maps=True``, dtypes other than fp32/fp64/bf16/fp16, or a ``top_k`` of 0 also take the
PyTorch form.

Environment:
    NSTM_CPU_KERNEL=0      never use the kernel (the PyTorch chunk form everywhere)
    NSTM_CPU_BUILD_DIR     build directory (default ``~/.cache/nstm_kernels/cpu-<torch>-<machine>``)
    NSTM_CPU_REBUILD=1     wipe the build directory and compile again (first use in a process)
    NSTM_CPU_VERBOSE=1     show the compiler's output while building
    NSTM_CPU_SCHEDULE      auto (default), units or blocks: how a call is split over the threads
                           (``schedule=`` of ``cpu_nstm``; see ``SCHEDULES``)
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from typing import Optional

import torch

from . import _jit, settings
from .state import NSTMState, S2SParams
from .utils import compute_dtype
from .varlen import final_pos, flatten, needs_segments, segments

logger = logging.getLogger("nstm_kernels")

SOURCE = "nstm_cpu.cpp"
EXT_NAME = "nstm_cpu_ops"
# tokens between the forward's checkpoints (the backward re-runs one block at a time)
BLOCK = 64
#: the kernel's ``schedule`` argument. "units": one task per (sequence, head), each walked by one
#: thread. "blocks": each (sequence, head) split into its 64-token blocks with a thin sequential
#: chain (routing, writes and s2s forward; the s2s backward and the adjoint hand-off backward)
#: and the reads and their gradients as parallel block tasks, so that a few long sequences keep
#: every thread busy and a descheduled thread holds up one block, not a quarter of the call. It
#: applies to calls that keep gradients (it works from the backward's checkpoints), without
#: ``return_maps``, with the s2s period a multiple of 64 or no s2s; other calls run per unit.
#: "auto": blocks for calls of at most 16 (sequence, head) pairs (a rule on the shape only, so a
#: call gives the same bits on any thread count). Every schedule computes the same function: the
#: forward the same bits, the gradients the same sums in another order (within rounding).
SCHEDULES = {"auto": 0, "units": 1, "blocks": 2}

_lock = threading.Lock()
_loaded = False
_error: Optional[str] = None
_told = False


def _source() -> str:
    from .cuda import CSRC
    return os.path.join(CSRC, SOURCE)


def _cpu_tag() -> str:
    """The build folder is per machine type: the code is compiled for the CPU it runs on."""
    facts = {"processor": platform.processor() or ""}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:                      # the first core's model and instruction sets
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features") and key not in facts:
                    facts[key] = line
    except OSError:
        pass
    return hashlib.sha1(repr(sorted(facts.items())).encode()).hexdigest()[:10]


def build_dir() -> str:
    tag = f"cpu-{torch.__version__.split('+')[0]}-{platform.machine()}-{_cpu_tag()}"
    return _jit.build_dir(settings.cpu_build_dir(), tag)


def _flags():
    """Compiler and linker flags. ATen's ``parallel_for`` is an inline OpenMP region: without
    ``-fopenmp`` it would run on one thread."""
    cflags, ldflags = ["-O3", "-fopenmp-simd"], []
    if platform.system() == "Linux":
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
        if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
            cflags.append("-march=native")
    return cflags, ldflags


def _build() -> None:
    directory = build_dir()
    if settings.flag("NSTM_CPU_REBUILD"):
        shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    if not os.path.isfile(_source()):
        raise RuntimeError(f"the C++ source is missing ({_source()})")
    try:
        # imported here, inside the guard: importing it imports setuptools, which can itself fail
        # (e.g. setuptools' distutils shim asserting after the standard distutils got imported)
        from torch.utils import cpp_extension
        cflags, ldflags = _flags()
        cpp_extension.load(name=EXT_NAME, sources=[_source()], extra_cflags=cflags,
                           extra_ldflags=ldflags,
                           build_directory=directory, is_python_module=False,
                           verbose=settings.flag("NSTM_CPU_VERBOSE"))
        try:
            os.remove(os.path.join(directory, "build.log"))   # an earlier failure's log
        except OSError:
            pass
    except Exception as e:  # noqa: BLE001 - any build/load error means: fall back
        raise _jit.build_failure(e, directory, "the C++ CPU kernel") from e


def unavailable_reason() -> Optional[str]:
    """None when the kernel can run (building it on first use), else why not (cached)."""
    global _loaded, _error
    if not settings.cpu_kernel_enabled():
        return "switched off by NSTM_CPU_KERNEL=0"
    if _loaded:
        return None
    with _lock:
        if not _loaded and _error is None:
            try:
                _build()
                _loaded = True
            except RuntimeError as e:
                _error = str(e)
    return None if _loaded else _error


def available() -> bool:
    return unavailable_reason() is None


def reset() -> None:
    """Forget a cached failure (tests); a loaded library stays loaded."""
    global _error, _told
    with _lock:
        _error, _told = None, False


def _tell(reason: str) -> None:
    global _told
    if not _told:
        _told = True
        logger.warning("nstm_kernels: the C++ CPU kernel is not used (%s); the chunked backend runs "
                       "the PyTorch chunk form", reason)


def usable(q: torch.Tensor, top_k: int, return_maps: bool) -> bool:
    """Whether a ``"chunked"`` call on these inputs runs the C++ kernel."""
    if q.device.type != "cpu" or top_k < 1 or torch.compiler.is_compiling():
        return False          # (while tracing, the sequence op runs as nstm_kernels::attention)
    if q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return False
    if not settings.cpu_kernel_enabled():       # asked for: no log line
        return False
    reason = unavailable_reason()
    if reason is not None:
        _tell(reason)
        return False
    return True


class _CPUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, logits, gate, k0, v0, wq, wk, mix, seg, top_k, C, has_s2s, scale,
                n_maps, schedule):
        keep = any(ctx.needs_input_grad[:10])    # checkpoints only when a backward can follow
        out = torch.ops.nstm_cpu.forward(q, k, v, logits, gate, k0, v0, seg, wq, wk, mix, top_k, C,
                                         has_s2s, scale, BLOCK if keep else 0, n_maps >= 0,
                                         max(n_maps, 0), schedule)
        ck = out[3]
        ctx.save_for_backward(q, k, v, logits, gate, wq, wk, mix, seg, ck)
        ctx.args = (top_k, C, has_s2s, scale, schedule)
        ctx.mark_non_differentiable(*out[3:])
        return tuple(out)

    @staticmethod
    def backward(ctx, do, dkf, dvf, *_maps):
        q, k, v, logits, gate, wq, wk, mix, seg, ck = ctx.saved_tensors
        top_k, C, has_s2s, scale, schedule = ctx.args
        N, H, S = seg.shape[0], q.shape[1], logits.shape[2]
        K, V = q.shape[2], v.shape[2]
        z = q.new_zeros
        do = z(v.shape) if do is None else do.contiguous()
        dkf = z(N, H, S, K) if dkf is None else dkf.contiguous()
        dvf = z(N, H, S, V) if dvf is None else dvf.contiguous()
        dq, dk, dv, dlg, dg, dk0, dv0, dwq, dwk, dmix = torch.ops.nstm_cpu.backward(
            q, k, v, logits, gate, seg, wq, wk, mix, ck, do, dkf, dvf, top_k, C, has_s2s, scale,
            BLOCK, schedule)
        if has_s2s:
            dwq, dwk, dmix = dwq.sum(0), dwk.sum(0), dmix.sum(0)
        else:
            dwq = dwk = dmix = None
        return (dq, dk, dv, dlg, dg, dk0, dv0, dwq, dwk, dmix) + (None,) * 7


def _run(q, k, v, route_logits, write_gate, top_k, s2s, C, k0, v0, segs, scale, n_maps=-1,
         schedule=None):
    """The kernel over the flattened time axis ``[1, T, H, *]`` and its segments
    ``[(start, length, pos), ...]``, each starting from its row of ``k0 [N, H, S, K]`` / ``v0``.
    Returns ``o [1, T, H, V]`` (compute dtype), the final slot memories ``[N, H, S, *]`` and the
    maps (``n_maps >= 0``: indices, weights, reads ``[T, H, *]``, s2s ``[n_maps, N, H, S, S]``;
    every segment must have ``n_maps`` period ends) or None. ``schedule``: a key of
    ``SCHEDULES`` (None: ``NSTM_CPU_SCHEDULE``, else "auto")."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"nstm_kernels: the C++ CPU kernel cannot run: {reason}")
    dt = compute_dtype(q.dtype)
    T, H = q.shape[1], q.shape[2]
    c = [x.reshape(T, H, x.shape[-1]).to(dt).contiguous() for x in (q, k, v, route_logits)]
    gate = write_gate.reshape(T, H).to(dt).contiguous()
    seg = torch.tensor(segs, dtype=torch.int64).reshape(-1, 3)
    if s2s is not None:
        wq, wk = s2s.w_q.to(dt).contiguous(), s2s.w_k.to(dt).contiguous()
        mix = torch.sigmoid(s2s.gate.to(dt)).contiguous()
    else:
        wq = wk = mix = q.new_zeros(0, dtype=dt)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    sched = SCHEDULES[settings.cpu_schedule(schedule)]
    out = _CPUFunction.apply(*c, gate, k0.to(dt).contiguous(), v0.to(dt).contiguous(), wq, wk, mix,
                             seg, int(top_k), int(C), s2s is not None, scale, int(n_maps), sched)
    o, kf, vf = out[:3]
    return o.unsqueeze(0), kf, vf, (out[4:] if n_maps >= 0 else None)


def cpu_nstm(q, k, v, route_logits, write_gate, top_k: int, s2s: Optional[S2SParams] = None,
             comm_every: int = 64, initial_state: Optional[NSTMState] = None,
             output_final_state: bool = False, scale: Optional[float] = None,
             return_maps: bool = False, cu_seqlens=None, schedule: Optional[str] = None):
    """The operator through the C++ kernel; the signature and results of ``chunk_nstm`` (the maps
    are not differentiable here; packed batches and per-row positions have none, as there).
    ``schedule``: how the call is split over threads (``SCHEDULES``; None: ``NSTM_CPU_SCHEDULE``,
    else "auto"). Raises ``RuntimeError`` when the kernel cannot be had (``usable`` says beforehand)."""
    B, T, H, K = q.shape
    V, S = v.shape[-1], route_logits.shape[-1]
    dt = compute_dtype(q.dtype)
    if needs_segments(initial_state, cu_seqlens):
        if return_maps:
            raise ValueError("return_maps is not available for packed batches (cu_seqlens) or "
                             "per-row positions; call each sequence on its own for its maps")
        seg = segments(B, T, initial_state, cu_seqlens)
        xs = (q, k, v, route_logits, write_gate)
        if not seg.packed:
            xs = tuple(flatten(x) for x in xs)
        rows = len(seg.starts)
        if initial_state is None:
            k0 = q.new_zeros(rows, H, S, K, dtype=dt)
            v0 = q.new_zeros(rows, H, S, V, dtype=dt)
        else:
            k0, v0 = initial_state.k, initial_state.v
        o, kf, vf, _ = _run(*xs, top_k, s2s, comm_every, k0, v0,
                            list(zip(seg.starts, seg.lengths, seg.pos)), scale, schedule=schedule)
        o = o.reshape(B, T, H, V).to(q.dtype)
        final = None
        if output_final_state:
            final = NSTMState(kf, vf, final_pos(seg, None if initial_state is None
                                                else initial_state.pos))
        return o, final
    if initial_state is None:
        k0 = q.new_zeros(B, H, S, K, dtype=dt)
        v0 = q.new_zeros(B, H, S, V, dtype=dt)
        pos = 0
    else:
        k0, v0, pos = initial_state.k, initial_state.v, int(initial_state.pos)
    xs = tuple(flatten(x) for x in (q, k, v, route_logits, write_gate))
    ends = []                                   # the period ends, for the maps only
    if return_maps and s2s is not None:
        ends = list(range(pos + (comm_every - 1 - pos % comm_every), pos + T, comm_every))
    o, kf, vf, maps = _run(*xs, top_k, s2s, comm_every, k0, v0,
                           [(b * T, T, pos) for b in range(B)], scale,
                           len(ends) if return_maps else -1, schedule)
    o = o.reshape(B, T, H, V).to(q.dtype)
    final = NSTMState(kf, vf, pos + T) if output_final_state else None
    if not return_maps:
        return o, final
    idx, w, p, a = maps
    return o, final, {"indices": idx.reshape(B, T, H, top_k), "weights": w.reshape(B, T, H, top_k),
                      "read": p.reshape(B, T, H, S), "s2s": a, "s2s_pos": ends}


def chunked_nstm(q, k, v, route_logits, write_gate, top_k: int, s2s: Optional[S2SParams] = None,
                 comm_every: int = 64, initial_state: Optional[NSTMState] = None,
                 output_final_state: bool = False, scale: Optional[float] = None,
                 return_maps: bool = False, cu_seqlens=None, **kw):
    """The ``"chunked"`` backend: the C++ kernel for CPU tensors where it can run, else the
    PyTorch chunk form (``chunk_nstm``, which also takes ``chunk_size=``)."""
    if not kw and usable(q, top_k, return_maps):
        return cpu_nstm(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, initial_state,
                        output_final_state, scale, return_maps=return_maps, cu_seqlens=cu_seqlens)
    from .chunked import chunk_nstm
    return chunk_nstm(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, initial_state,
                      output_final_state, scale, return_maps=return_maps, cu_seqlens=cu_seqlens, **kw)


def _step_args(q, k, v, route_logits, write_gate, s2s, dt):
    xs = [x.to(dt).contiguous() for x in (q, k, v, route_logits, write_gate)]
    if s2s is not None:
        w = [s2s.w_q.to(dt).contiguous(), s2s.w_k.to(dt).contiguous(),
             torch.sigmoid(s2s.gate.to(dt)).contiguous()]
    else:
        w = [xs[0].new_zeros(0)] * 3
    return xs, w


def _pos_tensor(pos) -> torch.Tensor:
    if isinstance(pos, torch.Tensor):
        return pos.reshape(-1).to(torch.int64).contiguous()
    return torch.tensor([int(pos)], dtype=torch.int64)


@torch.no_grad()
def cpu_nstm_step_(q, k, v, route_logits, write_gate, top_k: int, s2s, comm_every: int,
                   state_k: torch.Tensor, state_v: torch.Tensor, pos, scale=None) -> torch.Tensor:
    """``recurrent_nstm_step_`` through the C++ kernel: one call for all rows and heads.
    ``state_k``/``state_v`` must be contiguous in q's compute dtype (they are updated in place)."""
    dt = compute_dtype(q.dtype)
    xs, w = _step_args(q, k, v, route_logits, write_gate, s2s, dt)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    o = torch.ops.nstm_cpu.step_(*xs, state_k, state_v, _pos_tensor(pos), *w, int(top_k),
                                 int(comm_every), s2s is not None, scale)
    return o.to(q.dtype)


def _step_ok(q, top_k, state_k, state_v) -> bool:
    dt = compute_dtype(q.dtype)
    return (usable(q, top_k, False) and state_k.dtype == dt and state_v.dtype == dt
            and state_k.device.type == "cpu" and state_k.is_contiguous() and state_v.is_contiguous())


def chunked_nstm_step_(q, k, v, route_logits, write_gate, top_k: int, s2s, comm_every: int,
                       state_k, state_v, pos, scale=None):
    """The ``"chunked"`` in-place step: the C++ kernel for CPU tensors where it runs, else
    ``recurrent_nstm_step_``."""
    if _step_ok(q, top_k, state_k, state_v):
        return cpu_nstm_step_(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state_k,
                              state_v, pos, scale)
    from .chunked import recurrent_nstm_step_
    return recurrent_nstm_step_(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state_k,
                                state_v, pos, scale)


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                           for x in xs)


def chunked_nstm_step(q, k, v, route_logits, write_gate, top_k: int, s2s, comm_every: int,
                      state: Optional[NSTMState], scale=None):
    """The ``"chunked"`` functional step: without gradients on CPU tensors, the C++ kernel on a
    copy of the state; else ``recurrent_nstm_step`` (differentiable)."""
    from .chunked import recurrent_nstm_step
    tensors = [q, k, v, route_logits, write_gate] + (list(s2s) if s2s is not None else []) + \
        ([state.k, state.v] if state is not None else [])
    if not _needs_grad(*tensors) and usable(q, top_k, False):
        B, H, K = q.shape
        V, S = v.shape[-1], route_logits.shape[-1]
        dt = compute_dtype(q.dtype)
        if state is None:
            sk, sv, pos = q.new_zeros(B, H, S, K, dtype=dt), q.new_zeros(B, H, S, V, dtype=dt), 0
        else:
            sk = state.k.to(dt, memory_format=torch.contiguous_format, copy=True)
            sv = state.v.to(dt, memory_format=torch.contiguous_format, copy=True)
            pos = state.pos if isinstance(state.pos, torch.Tensor) else int(state.pos)
        o = cpu_nstm_step_(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, sk, sv, pos,
                           scale)
        return o, NSTMState(sk, sv, pos + 1)
    return recurrent_nstm_step(q, k, v, route_logits, write_gate, top_k, s2s, comm_every, state,
                               scale)


def chunked_sparse_route(route_logits, write_gate, top_k: int):
    """The ``"chunked"`` routing: without gradients on CPU tensors, the kernel's own routing (the
    same tie rule; one parallel call); else ``route_torch`` (differentiable)."""
    from .routing import route_torch
    if not _needs_grad(route_logits, write_gate) and usable(route_logits, top_k, False):
        dt = compute_dtype(route_logits.dtype)
        lead, S = route_logits.shape[:-1], route_logits.shape[-1]
        idx, w = torch.ops.nstm_cpu.route(route_logits.to(dt).reshape(-1, S).contiguous(),
                                          write_gate.to(dt).reshape(-1).contiguous(), int(top_k))
        return idx.reshape(*lead, top_k), w.reshape(*lead, top_k)
    return route_torch(route_logits, write_gate, top_k)


#: the conv ops' ``seg`` argument for an unpacked batch (every row of x is one sequence)
NO_SEGMENTS = torch.empty(0, 2, dtype=torch.long)


class _ConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cache, w, b, seg):
        ctx.save_for_backward(x, cache, w, b, seg)
        return torch.ops.nstm_cpu.conv_forward(x, cache, w, b, seg)

    @staticmethod
    def backward(ctx, g):
        x, cache, w, b, seg = ctx.saved_tensors
        dx, dcache, dw, db = torch.ops.nstm_cpu.conv_backward(g.contiguous(), x, cache, w, b, seg)
        if not ctx.needs_input_grad[1]:
            dcache = None
        elif not cache.numel():               # a width-1 conv's [B, 0, C] cache
            dcache = torch.zeros_like(cache)
        return dx, dcache, dw, db, None


def conv_usable(x: torch.Tensor) -> bool:
    """Whether ``short_conv`` runs on ``x`` (fp32 / fp64 CPU tensors, the kernel buildable)."""
    return x.dtype in (torch.float32, torch.float64) and usable(x, 1, False)


def short_conv(x: torch.Tensor, cache: Optional[torch.Tensor], weight: torch.Tensor,
               bias: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``silu(bias + sum_j weight[j] * xc[:, t + j])`` with ``xc = [cache; x]``: the causal
    depthwise convolution of ``nstm.modules.ShortConv`` and its SiLU in one C++ pass (and one for
    the backward), for ``x [B, T, C]`` (any view with contiguous channels), ``cache [B, W - 1, C]``
    or None (zeros), ``weight [W, C]`` (tap ``W - 1`` multiplies the current token, tap ``j`` the
    one ``W - 1 - j`` tokens back), ``bias [C]``. Returns ``y [B, T, C]``, differentiable in every input.

    With ``cu_seqlens`` (int64 ``[N + 1]``, already checked: B = 1, strictly increasing, 0 to T)
    ``x`` is N packed documents: each one's window starts from its own ``cache[n]`` (``[N, W - 1,
    C]``, zeros if None) and never reads the document before it.
    Call only where ``conv_usable(x)``."""
    dt = x.dtype
    if x.stride(-1) != 1:
        x = x.contiguous()
    cache = x.new_empty(0) if cache is None else cache.to(dt).contiguous()
    if cu_seqlens is None:
        seg = NO_SEGMENTS
    else:
        cu = cu_seqlens.to(device="cpu", dtype=torch.long)
        seg = torch.stack([cu[:-1], cu[1:] - cu[:-1]], 1).contiguous()
    return _ConvFunction.apply(x, cache, weight.to(dt).contiguous(), bias.to(dt).contiguous(), seg)
