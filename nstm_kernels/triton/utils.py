"""What the Triton kernels share: tile helpers (``@triton.jit``), launch settings, the chunk
layout and the backward set-up. Every op file imports from here; this file imports none of them.

* jit helpers: ``mm`` (a dot with fp32/fp64 accumulation), ``slot_tiles`` (index vectors and
  masks of a program's slot tiles), ``convex_write`` / ``read_probs`` (spec §2 steps 2 and 3 on a
  tile), ``load_tile`` / ``store_tile``, and the chunk helpers
  ``dense_weights``, ``log_retain``, ``advance`` (the closed-form state step of spec §4).
* host side: ``dot_precision`` (the fp32 ``tl.dot`` precision), ``chunk_meta`` / ``recurrent_meta``
  (the constexpr launch arguments of the chunk and the recurrent kernels), ``state_warps``,
  ``chunk_starts`` (where chunks, and the recurrent kernels' segments, start), and
  ``backward_setup`` / ``backward_result`` (what both sequence backwards start from and return).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from types import SimpleNamespace
from typing import List, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from .. import settings
from .device import compute_tl_dtype, device_info, dot_block, pow2, tile_warps


def resolve_dot_precision(dtype: torch.dtype, device=None, chunk: bool = False,
                          kind: Optional[str] = None) -> str:
    """The ``input_precision`` of the kernels' fp32 ``tl.dot``s.

    ``kind`` ("ieee", "tf32" or "tf32x3"; None: ``NSTM_TRITON_DOT``, else the default) picks it;
    fp64 and GPUs without tf32 tensor cores (before sm_80) always get "ieee". Defaults: "tf32x3"
    for the s2s, step and recurrent kernels, "ieee" for the chunk passes (``chunk=True``).

    "ieee" keeps every product exact to fp32 but runs on the FMA units, and at S = K = V = 64
    ptxas then keeps whole [64, 64] tiles in local memory: 14-19 KB of stack per thread in the s2s,
    step and recurrent kernels (bench/compile_check.py, bench/NOTES.md). "tf32x3" splits each fp32
    operand into two tf32 parts and sums three tensor-core products, which recovers about fp32
    accuracy, and the same kernels compile with at most 0.7 KB of stack. The chunk passes go the
    other way (sm_80 boundary pass: 1.9 KB with "ieee", 10.7 KB with "tf32x3"), so they keep
    "ieee" unless asked. "tf32" is one pass with the inputs rounded to 10 mantissa bits. Under the
    interpreter the precision makes no difference.
    """
    chosen = settings.dot_precision(kind, "ieee" if chunk else "tf32x3")
    if dtype == torch.float64:
        return "ieee"
    if device is not None and device_info(torch.device(device)).capability < (8, 0):
        return "ieee"
    return chosen


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """``a @ b`` with fp32 (fp64) accumulation. fp64 tiles go through a broadcast multiply-sum:
    Triton's fp64 MMA path does not take K > 16 tiles (fp64 is for gradcheck, not for speed)."""
    if a.dtype == tl.float64:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def slot_tiles(S, K, V, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """Index vectors, masks and row-major offsets of a program's ``[S, K]`` / ``[S, V]`` slot tiles
    (padded to the blocks): ``(rs, rk, rv, smask, mk, mv, sk_off, sv_off)``."""
    rs = tl.arange(0, BLOCK_S)
    rk = tl.arange(0, BLOCK_K)
    rv = tl.arange(0, BLOCK_V)
    smask = rs < S
    mk = smask[:, None] & (rk[None, :] < K)
    mv = smask[:, None] & (rv[None, :] < V)
    return rs, rk, rv, smask, mk, mv, rs[:, None] * K + rk[None, :], rs[:, None] * V + rv[None, :]


@triton.jit
def convex_write(Ks, Vs, routed, wc, kt, vt):
    """Spec §2 step 2 on the routed rows only: ``X_i <- (1 - w_i) X_i + w_i x`` (``wc [S, 1]``)."""
    Ks = tl.where(routed[:, None], (1.0 - wc) * Ks + wc * kt[None, :], Ks)
    Vs = tl.where(routed[:, None], (1.0 - wc) * Vs + wc * vt[None, :], Vs)
    return Ks, Vs


@triton.jit
def read_probs(Ks, qt, smask, scale):
    """Spec §2 step 3: ``p = softmax_i(scale * K_i . q)`` over the real slots."""
    sc = tl.where(smask, tl.sum(Ks * qt[None, :], axis=1) * scale, float("-inf"))
    e = tl.exp(sc - tl.max(sc, axis=0))
    return e / tl.sum(e, axis=0)


@triton.jit
def load_tile(ptr, S, V, BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, DT: tl.constexpr):
    rs = tl.arange(0, BLOCK_S)
    rv = tl.arange(0, BLOCK_V)
    m = (rs[:, None] < S) & (rv[None, :] < V)
    return tl.load(ptr + rs[:, None] * V + rv[None, :], mask=m, other=0.0).to(DT)


@triton.jit
def store_tile(ptr, X, S, V, BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr):
    rs = tl.arange(0, BLOCK_S)
    rv = tl.arange(0, BLOCK_V)
    m = (rs[:, None] < S) & (rv[None, :] < V)
    tl.store(ptr + rs[:, None] * V + rv[None, :], X.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def dense_weights(idx_ptr, w_ptr, tok, rmask, BLOCK_S: tl.constexpr, TOP_K: tl.constexpr,
                   DT: tl.constexpr):
    """The write weights of the tokens ``tok [BLOCK_L]`` (int64 row indices into ``[*, TOP_K]``)
    dense over the slots: ``[BLOCK_L, BLOCK_S]``, 0 off-route and on the masked rows."""
    rs = tl.arange(0, BLOCK_S)
    W = tl.zeros([tok.shape[0], BLOCK_S], DT)
    for j in range(TOP_K):   # constexpr bound: unrolled; the routed slots of a token are distinct
        ij = tl.load(idx_ptr + tok * TOP_K + j, mask=rmask, other=0).to(tl.int32)
        wj = tl.load(w_ptr + tok * TOP_K + j, mask=rmask, other=0.0).to(DT)
        W = tl.where(rs[None, :] == ij[:, None], wj[:, None], W)
    return W


@triton.jit
def log_retain(W, EPS: tl.constexpr):
    """``log(1 - w)``, accurate for small w too (log1p through ``log(u) x / (u - 1)`` with
    ``u = 1 + x`` rounded, Goldberg's trick), exactly 0 at w = 0.

    A full write (w = 1 exactly) gets ``-FULL`` with FULL = 110 (fp32) or 750 (fp64): finite, so
    differences of cumulative sums never meet inf - inf, and large enough that every decay across
    it, ``exp(<= -FULL)``, underflows to exactly 0: the slot is replaced, nothing of the old content
    survives. (The price: decays between two later tokens of the same chunk carry the rounding of
    a sum near -FULL, about 1e-5 relative in fp32.) Below 1, w is clamped to ``1 - eps``."""
    FULL: tl.constexpr = 750.0 if W.dtype == tl.float64 else 110.0
    eps = tl.full([], EPS, W.dtype)
    x = -tl.minimum(W, 1.0 - eps)
    u = 1.0 + x
    den = tl.where(u == 1.0, 1.0, u - 1.0)
    lw = tl.where(u == 1.0, x, tl.log(u) * (x / den))
    return tl.where(W >= 1.0, -FULL, lw)


@triton.jit
def advance(Ks, Vs, W, lw, lc, kc, vc, PREC: tl.constexpr):
    """The state at the end of a block of tokens from the state at its start, in closed form:
    ``X_end[i] = exp(lc_end[i]) X[i] + sum_s w[s, i] exp(lc_end[i] - lc[s, i]) x_s``."""
    lend = tl.sum(lw, axis=0)                                          # [BLOCK_S]
    D = W * tl.exp(tl.minimum(lend[None, :] - lc, 0.0))               # [BLOCK_L, BLOCK_S]
    Dt = tl.trans(D)
    keep = tl.exp(lend)[:, None]
    Ks = keep * Ks + mm(Dt, kc.to(Ks.dtype), PREC)
    Vs = keep * Vs + mm(Dt, vc.to(Vs.dtype), PREC)
    return Ks, Vs


def chunk_starts(T: int, pos: int, comm_every: int, has_s2s: bool, L: int) -> List[int]:
    """Token indices where a chunk starts, plus ``T``. On absolute positions ``tau = pos + t``:
    with s2s, at every period start (tau % C == 0, so every s2s event ends a chunk) and every
    ``L`` tokens from a period start; without s2s, at every tau % L == 0. Chunks are at most ``L``
    long; a call that starts mid-chunk gets a shorter first chunk."""
    cuts = {0, T}
    if has_s2s:
        C = comm_every
        for p0 in range(-(pos % C), T, C):      # period starts; the first one may be before t = 0
            cuts.update(t for t in range(p0, min(p0 + C, T), L) if t > 0)
    else:
        cuts.update(range((-pos) % L, T, L))
    return sorted(cuts)


class Layout(NamedTuple):
    """Where the chunks of a call lie, for every sequence at once (one launch per pass).

    The sequences (the rows of a batch, or the documents of a packed one) are laid end to end on
    the flattened token axis (row ``b``'s token ``t`` is token ``b * T + t``); chunk ``g`` covers
    tokens ``seg[g] .. seg[g + 1] - 1`` and never crosses a sequence boundary; sequence ``n`` owns
    chunks ``cuc[n] .. cuc[n + 1] - 1``; ``ev[g]`` is 1 when the chunk's last token ends a period
    (an s2s event). ``table`` holds the three int32 vectors in one device tensor (one copy, cached).
    """

    table: torch.Tensor
    seg: torch.Tensor        # [G + 1]
    cuc: torch.Tensor        # [N + 1]
    ev: torch.Tensor         # [G]
    G: int                   # chunks, all sequences
    N: int                   # sequences
    lmax: int                # the longest chunk


_LAYOUTS: OrderedDict[tuple, Layout] = OrderedDict()
_LAYOUT_CACHE_SIZE = 64


def layout(starts: Sequence[int], lengths: Sequence[int], pos: Sequence[int], comm_every: int,
           has_s2s: bool, L: int, device) -> Layout:
    """The :class:`Layout` of sequences at flattened ``starts`` with ``lengths`` and first absolute
    positions ``pos``. Cached per device: a repeated call shape costs no host-to-device copy (and
    so no host sync: the kernels' launches can be captured in a CUDA graph once it is warm)."""
    C = comm_every
    phase = tuple((p % C) if has_s2s else (p % L) for p in pos)
    key = (str(device), tuple(starts), tuple(lengths), phase, C if has_s2s else 0, has_s2s, L)
    hit = _LAYOUTS.get(key)
    if hit is not None:
        _LAYOUTS.move_to_end(key)
        return hit
    seg, cuc, ev, lmax, cache = [], [0], [], 0, {}
    for a, n, p in zip(starts, lengths, phase):
        local = cache.get((n, p))
        if local is None:
            local = cache[(n, p)] = chunk_starts(n, p, C, has_s2s, L)
        seg.extend(a + t for t in local[:-1])
        ev.extend(int(has_s2s and (p + t1) % C == 0) for t1 in local[1:])
        lmax = max([lmax] + [b - a for a, b in zip(local[:-1], local[1:])])
        cuc.append(len(seg))
    seg.append(starts[-1] + lengths[-1] if len(starts) else 0)
    G, N = len(ev), len(cuc) - 1
    table = torch.tensor(seg + cuc + ev, dtype=torch.int32).to(device)
    out = Layout(table, table[:G + 1], table[G + 1:G + N + 2], table[G + N + 2:], G, N, lmax)
    _LAYOUTS[key] = out
    if len(_LAYOUTS) > _LAYOUT_CACHE_SIZE:
        _LAYOUTS.popitem(last=False)
    return out


_DENSE: OrderedDict[tuple, Layout] = OrderedDict()


def dense_layout(B: int, T: int, pos: int, comm_every: int, has_s2s: bool, L: int, device) -> Layout:
    """:func:`layout` of ``B`` rows of ``T`` tokens that all start at position ``pos``; its own
    cache keyed by the few numbers that decide it (no per-row lists on a warm call)."""
    key = (str(device), B, T, (pos % comm_every) if has_s2s else (pos % L), comm_every if has_s2s else 0,
           has_s2s, L)
    hit = _DENSE.get(key)
    if hit is None:
        hit = _DENSE[key] = layout([b * T for b in range(B)], [T] * B, [pos] * B, comm_every, has_s2s,
                                   L, device)
        if len(_DENSE) > _LAYOUT_CACHE_SIZE:
            _DENSE.popitem(last=False)
    return hit


def s2s_scratch_size(S: int, V: int, backward: bool) -> int:
    """Elements of scratch one program's s2s tile needs (forward: X, Q, Kx, O and P; the backward
    adds dO, dQ, dKx, dX and dS)."""
    return (8 * S * V + 2 * S * S) if backward else (4 * S * V + S * S)


def s2s_scratch(programs: int, S: int, V: int, backward: bool, dtype, device) -> torch.Tensor:
    """The scratch of ``programs`` programs, ``s2s_scratch_size`` elements each."""
    return torch.empty(max(1, programs) * s2s_scratch_size(S, V, backward), dtype=dtype, device=device)


class DoesNotFit(RuntimeError):
    """A kernel needs more shared memory than the GPU it would run on has (or Triton refused the
    launch for lack of resources). The public Triton ops catch it and run the PyTorch ``chunked``
    path instead (``fallback.py``), with one log line."""

    def __init__(self, kernel: str, required: int, limit: int, what: str = "shared memory"):
        super().__init__(f"{kernel} needs {required} bytes of {what}, the GPU has {limit}")
        self.kernel, self.required, self.limit, self.what = kernel, required, limit, what


_DRY = [False]


@contextlib.contextmanager
def dry_run():
    """Within: ``launch`` compiles each kernel (Triton's cache keeps it for the real launch) and
    checks its shared memory against the device's limit, but runs nothing. The sequence forward
    uses it once per configuration to learn whether its backward will fit before it commits."""
    _DRY.append(True)
    try:
        yield
    finally:
        _DRY.pop()


def shared_bytes(kernel, grid, args, kwargs) -> int:
    """Shared memory of the compiled kernel for these arguments (compiled now, or from the cache)."""
    return int(kernel.warmup(*args, grid=grid, **kwargs).metadata.shared)


def limit_applies(device: torch.device) -> bool:
    """Whether kernels on ``device`` have a shared-memory limit to check (a GPU: yes; CPU tensors
    under the interpreter: no)."""
    return device.type == "cuda"


def _device_of(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, the one way the ops launch their kernels.

    The limit is the device's shared memory per block (``device.device_info``, read from the GPU
    once); a kernel over it raises :class:`DoesNotFit` instead of Triton's ``OutOfResources``, in a
    dry run (see ``dry_run``) before anything ran."""
    name = getattr(getattr(kernel, "fn", None), "__name__", str(kernel))
    dev = _device_of(args)
    if _DRY[-1]:
        if limit_applies(dev):
            need, have = shared_bytes(kernel, grid, args, kwargs), device_info(dev).shared_mem
            if need > have:
                raise DoesNotFit(name, need, have)
        return None
    try:
        return kernel[grid](*args, **kwargs)
    except triton.runtime.errors.OutOfResources as e:
        raise DoesNotFit(name, int(getattr(e, "required", 0)), int(getattr(e, "limit", 0)),
                         str(getattr(e, "name", "resources"))) from e


_FITS: dict = {}


def check_fits(device: torch.device, key, dry) -> None:
    """Raise :class:`DoesNotFit` when ``dry()``, whose launches run under :func:`dry_run`, finds a
    kernel over ``device``'s limit. The verdict is cached per ``key`` (a configuration). CPU
    tensors (the interpreter) have no limit to check."""
    if not limit_applies(device):
        return
    verdict = _FITS.get(key)
    if verdict is None:
        try:
            with dry_run():
                dry()
            verdict = True
        except DoesNotFit as e:
            verdict = e
        _FITS[key] = verdict
    if verdict is not True:
        raise verdict


def check_backward_fits(backward, saved: tuple, cfg: tuple, lay, opts: tuple, o: torch.Tensor):
    """Raise :class:`DoesNotFit` now, in the forward, when ``backward`` (a sequence backward
    taking ``(ctx, do, dkf, dvf)``) would not fit the GPU: a forward that commits and a backward
    that then cannot launch would leave the caller with no gradient. The dry run compiles its
    kernels once per configuration (Triton caches them for the real backward)."""
    q, w, wq = saved[0], saved[3], saved[7]
    key = (str(o.device), backward.__name__, tuple(q.shape[2:]), saved[2].shape[-1], cfg[0], cfg[2],
           q.dtype, w.dtype, wq is not None, opts)
    ctx = SimpleNamespace(saved_tensors=saved, cfg=cfg, lay=lay, opts=opts, stored=True)
    check_fits(o.device, key, lambda: backward(ctx, torch.empty_like(o), None, None))


def keep_for_backward(ctx, backward, saved: tuple, cfg: tuple, lay, opts: tuple, o: torch.Tensor):
    """What both sequence Functions' forwards keep for ``backward`` (after checking it fits)."""
    check_backward_fits(backward, saved, cfg, lay, opts, o)
    ctx.save_for_backward(*saved)
    ctx.cfg = cfg
    ctx.lay = lay


def on_device(t: torch.Tensor):
    """A device guard for a launch: Triton launches on the *current* CUDA device, so tensors on
    ``cuda:1`` with ``cuda:0`` current would run on the wrong GPU (an illegal address). Every
    launcher wraps its launches in this; for CPU tensors (the interpreter) it does nothing."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def state_warps(BS: int, BD: int) -> int:
    """``num_warps`` of the sequential pass: B * H programs only, so a program may take a whole SM.
    Its ``[64, 64]`` tiles (state, chunk, decays, the s2s tiles) spill at 8 warps (sm_90 offline
    compile: 255 registers + 728 B stack with s2s), less at 16 (128 registers, 464 B)."""
    return min(16, max(4, BS * BD // 256))


def chunk_meta(S, K, V, top_k, dt, prec: str):
    return dict(TOP_K=top_k, EPS=torch.finfo(dt).eps, BLOCK_S=dot_block(S), BLOCK_K=dot_block(K),
                BLOCK_V=dot_block(V), DT=compute_tl_dtype(dt), PREC=prec)


def recurrent_meta(S, K, V, top_k, dt, device, prec: str):
    BS, BK, BV = dot_block(S), pow2(K, 16), dot_block(V)
    return dict(TOP_K=top_k, BLOCK_S=BS, BLOCK_K=BK, BLOCK_V=BV, BLOCK_TK=pow2(top_k, 2),
                DT=compute_tl_dtype(dt), PREC=prec,
                num_warps=tile_warps(BS * max(BK, BV), device))


def backward_setup(ctx, do, dkf, dvf) -> SimpleNamespace:
    """What both Triton backwards (``recurrent.py``'s and ``chunk_bwd.py``'s) start from: the saved
    tensors, the layout and the constants of the forward, contiguous output gradients in the state
    dtype (zeros for an unused final state), and the gradient buffers they fill (state-shaped ones
    ``[N, H, S, *]``: one row per sequence)."""
    if not ctx.stored:
        raise RuntimeError("triton_nstm: the forward ran without grad; no states were stored")
    q, k, v, w, idx, bk, bv, wq, wk, mix = ctx.saved_tensors
    top_k, scale, S = ctx.cfg
    lay = ctx.lay
    seq_prec, chunk_prec, _ = ctx.opts
    B, T, H, K = q.shape
    V, N = v.shape[-1], lay.N
    dt, dev = w.dtype, q.device
    has_s2s = wq is not None
    dkf = torch.zeros(N, H, S, K, dtype=dt, device=dev) if dkf is None else dkf.contiguous().to(dt)
    dvf = torch.zeros(N, H, S, V, dtype=dt, device=dev) if dvf is None else dvf.contiguous().to(dt)
    dk0 = torch.empty(N, H, S, K, dtype=dt, device=dev)
    if has_s2s:
        dws = [torch.zeros(N, H, V, V, dtype=dt, device=dev) for _ in range(2)]
        dmix = torch.zeros(N, H, dtype=dt, device=dev)
        s2s_args = (wq, wk, mix)
        scr, scr_stride = s2s_scratch(N * H, S, V, True, dt, dev), s2s_scratch_size(S, V, True)
    else:   # placeholders the kernels never touch (HAS_S2S=False)
        dws, dmix, s2s_args = [dk0, dk0], dk0, (dk0,) * 3
        scr, scr_stride = dk0, 0
    return SimpleNamespace(
        q=q, k=k, v=v, w=w, idx=idx, lay=lay, bk=bk, bv=bv, s2s_args=s2s_args, has_s2s=has_s2s,
        top_k=top_k, scale=scale, B=B, T=T, H=H, S=S, K=K, V=V, N=N, dt=dt,
        dev=dev, seq_prec=seq_prec, chunk_prec=chunk_prec, do=do.contiguous(), dkf=dkf, dvf=dvf,
        dq=torch.empty_like(q), dk=torch.empty_like(k), dv=torch.empty_like(v),
        dw=torch.empty_like(w), dk0=dk0, dv0=torch.empty(N, H, S, V, dtype=dt, device=dev),
        dws=dws, dmix=dmix, scr=scr, scr_stride=scr_stride)


def backward_result(g: SimpleNamespace) -> tuple:
    """The gradient tuple of the sequence Functions' ``forward`` arguments."""
    if g.has_s2s:
        g_s2s = (g.dws[0].sum(0), g.dws[1].sum(0), g.dmix.sum(0))
    else:
        g_s2s = (None, None, None)
    # no gradients for the constants: idx, top_k, lay, scale, store, opts
    return (g.dq, g.dk, g.dv, g.dw, g.dk0, g.dv0, *g_s2s) + (None,) * 6
