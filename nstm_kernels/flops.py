"""FLOPs of the NSTM operator, by its definition (spec §2), and the formula FlopCounterMode uses.

Counted as ``torch.utils.flop_counter`` counts matmuls and attention: a multiply-add is 2 FLOPs,
and elementwise work (softmax, gates, the routing's top-k) is not counted. Per token and head:

* write: the ``top_k`` routed slots blend key and value, ``X + w (x - X)``: ``2 top_k (K + V)``;
* read: the scores over the S slots and the weighted sum of their values: ``2 S (K + V)``;

and per period end (an s2s event) and head, on ``V̂ [S, V]``: the queries and keys ``V W_q``,
``V W_k`` (``4 S V^2``), the scores and the mix ``A V`` (``4 S^2 V``).

The backward is counted at twice the forward, the convention of FlopCounterMode's matmul formulas
(a gradient for each operand of each product). Nothing here depends on the sequence length except
through the token count: the cost is O(T S), for any period C.
"""
from __future__ import annotations


def period_ends(T: int, pos: int, comm_every: int) -> int:
    """How many tokens of positions ``pos .. pos + T - 1`` end a period (``(tau + 1) % C == 0``)."""
    return (pos + T) // comm_every - pos // comm_every


def nstm_flops(B: int, T: int, H: int, K: int, V: int, S: int, top_k: int, comm_every: int,
               s2s: bool = True, pos: int = 0, backward: bool = False) -> int:
    """FLOPs of one ``nstm_attention`` call (forward; with ``backward``, forward + backward)."""
    per_token = 2 * top_k * (K + V) + 2 * S * (K + V)
    total = B * H * T * per_token
    if s2s:
        total += B * H * period_ends(T, pos, comm_every) * (4 * S * V * V + 4 * S * S * V)
    return total * (3 if backward else 1)


def register_flop_formulas() -> None:
    """Teach ``FlopCounterMode`` the custom ops of ``compile.py`` (idempotent)."""
    import torch
    from torch.utils.flop_counter import register_flop_formula

    from . import compile as _compile  # noqa: F401  (defines the ops)

    ops = torch.ops.nstm_kernels
    if getattr(register_flop_formulas, "done", False):
        return

    def forward(q, k, v, route_logits, write_gate, k0, v0, w_q, w_k, gate, top_k, comm_every, pos,
                scale, backend, *args, out_shape=None, **kwargs) -> int:
        B, T, H, K = q
        return nstm_flops(B, T, H, K, v[-1], route_logits[-1], top_k, comm_every, w_q is not None, pos)

    def backward(q, k, v, route_logits, write_gate, k0, v0, w_q, w_k, gate, d_o, d_k, d_v, top_k,
                 comm_every, pos, scale, backend, *args, out_shape=None, **kwargs) -> int:
        B, T, H, K = q
        return 2 * nstm_flops(B, T, H, K, v[-1], route_logits[-1], top_k, comm_every,
                              w_q is not None, pos)

    register_flop_formula(ops.attention)(forward)
    register_flop_formula(ops.attention_backward)(backward)
    register_flop_formulas.done = True


def counting_flops() -> bool:
    """True inside ``torch.utils.flop_counter.FlopCounterMode``: ``nstm_attention`` then goes
    through its custom op, so the counter sees the operator once, by the formula above, instead of
    the matmuls of whichever backend happens to implement it."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    return any("FlopCounter" in type(m).__name__ for m in _get_current_dispatch_mode_stack())
