"""Packed variable-length batches (``cu_seqlens``) and per-row stream positions (spec §2).

Both come down to *segments*: independent streams laid end to end in time, each with its own
initial state row and its own absolute position. ``segments`` turns the operator's arguments into
that list; ``loop_segments`` runs a backend once per segment (the reference, and the Triton path
for now); the chunked path lays all segments into one chunk layout instead (no loop over them).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from .state import NSTMState


class Segments(NamedTuple):
    """``starts``/``lengths`` in the (flattened) time axis, ``pos`` each segment's first absolute
    position, ``rows`` how many rows the caller's batch had (1 when packed), ``packed``."""

    starts: List[int]
    lengths: List[int]
    pos: List[int]
    rows: int
    packed: bool


def needs_segments(initial_state: Optional[NSTMState], cu_seqlens) -> bool:
    """True when the call is packed or has per-row positions (a tensor ``pos``)."""
    return cu_seqlens is not None or (initial_state is not None
                                      and isinstance(initial_state.pos, torch.Tensor))


def segments(B: int, T: int, initial_state: Optional[NSTMState], cu_seqlens) -> Segments:
    """The segments of a validated call: packed (``cu_seqlens``, B = 1) or one per row."""
    pos = 0 if initial_state is None else initial_state.pos
    if cu_seqlens is not None:
        cu = [int(c) for c in cu_seqlens.tolist()]
        n = len(cu) - 1
        starts, lengths = cu[:-1], [b - a for a, b in zip(cu[:-1], cu[1:])]
    else:
        n = B
        starts, lengths = [b * T for b in range(B)], [T] * B
    if isinstance(pos, torch.Tensor):
        pos_list = [int(p) for p in pos.tolist()]
    else:
        pos_list = [int(pos)] * n
    return Segments(starts, lengths, pos_list, 1 if cu_seqlens is not None else B,
                    cu_seqlens is not None)


def flatten(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, ...]`` -> ``[1, B * T, ...]`` (rows laid end to end, as a packed batch)."""
    return x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])


def final_pos(seg: Segments, like) -> torch.Tensor:
    """The position after each segment, an int64 tensor (on ``like``'s device when it is a tensor)."""
    device = like.device if isinstance(like, torch.Tensor) else "cpu"
    return torch.tensor([p + n for p, n in zip(seg.pos, seg.lengths)], dtype=torch.int64, device=device)


def loop_segments(fn, q, k, v, route_logits, write_gate, top_k, s2s, comm_every, initial_state,
                  output_final_state, scale, cu_seqlens, **kw):
    """Run ``fn`` (a backend with the operator's signature, int positions only) once per segment
    and put the outputs and final states back together."""
    B, T = q.shape[:2]
    seg = segments(B, T, initial_state, cu_seqlens)
    xs = [flatten(x) for x in (q, k, v, route_logits, write_gate)] if not seg.packed else \
        [q, k, v, route_logits, write_gate]
    outs, ks, vs = [], [], []
    for i, (a, n, p) in enumerate(zip(seg.starts, seg.lengths, seg.pos)):
        init = None
        if initial_state is not None:
            init = NSTMState(initial_state.k[i:i + 1], initial_state.v[i:i + 1], p)
        elif p:
            raise AssertionError("a position without a state")   # validated before
        o, fin = fn(*(x[:, a:a + n] for x in xs), top_k, s2s, comm_every, init, True, scale, **kw)
        outs.append(o)
        ks.append(fin.k)
        vs.append(fin.v)
    o = torch.cat(outs, dim=1)
    if not seg.packed:
        o = o.reshape(B, T, *o.shape[2:])
    final = None
    if output_final_state:
        like = None if initial_state is None else initial_state.pos
        final = NSTMState(torch.cat(ks), torch.cat(vs), final_pos(seg, like))
    return o, final
