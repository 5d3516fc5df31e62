"""Plots a person wants to see: routing over time, slot usage, importance, s2s maps, training curves.

matplotlib is imported lazily (it is an optional dependency: ``pip install nstm-kernels[tools]``).
Every function writes one PNG atomically and returns its path.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import torch


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("plots need matplotlib: pip install 'nstm-kernels[tools]'") from e
    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    os.replace(tmp, path)
    return path


def routing_map(indices: torch.Tensor, weights: torch.Tensor, num_states: int, path: str,
                batch: int = 0, heads: Optional[Sequence[int]] = None, title: str = "") -> str:
    """Heatmap of write weight per slot (rows) over time (columns), one panel per head.

    ``indices/weights [B, T, H, k]`` as returned by ``sparse_route`` or ``return_maps``."""
    plt = _plt()
    B, T, H, k = indices.shape
    heads = list(range(H)) if heads is None else list(heads)
    dense = torch.zeros(T, H, num_states).scatter(-1, indices[batch].cpu(), weights[batch].detach().float().cpu())
    fig, axes = plt.subplots(len(heads), 1, figsize=(min(14, 2 + T / 12), 1.2 + 1.6 * len(heads)),
                             squeeze=False)
    for ax, h in zip(axes[:, 0], heads):
        im = ax.imshow(dense[:, h].T.numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                       origin="lower")
        ax.set_ylabel(f"head {h}\nslot")
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, label="write weight")
    axes[-1, 0].set_xlabel("token position")
    fig.suptitle(title or "Routing: which slots each token wrote to")
    return _save(fig, path)


def slot_usage(usage: torch.Tensor, path: str, title: str = "") -> str:
    """Bar chart of the share of write weight each slot received ``usage [H, S]``, per head."""
    plt = _plt()
    u = usage.detach().float().cpu()
    u = u / u.sum(1, keepdim=True).clamp(min=1e-30)
    H, S = u.shape
    fig, ax = plt.subplots(figsize=(min(14, 3 + S * 0.25 * max(1, H / 2)), 3.2))
    width = 0.8 / H
    for h in range(H):
        ax.bar([i + h * width for i in range(S)], u[h].numpy(), width=width, label=f"head {h}")
    ax.axhline(1.0 / S, color="k", ls="--", lw=0.8, label="uniform")
    ax.set_xlabel("slot")
    ax.set_ylabel("share of write weight")
    ax.legend(fontsize=7, ncol=min(H + 1, 6))
    ax.set_title(title or "Slot usage")
    return _save(fig, path)


def importance(before: torch.Tensor, path: str, after: Optional[torch.Tensor] = None,
               threshold: Optional[float] = None, title: str = "") -> str:
    """Slot importance sigmoid(iota) per head, sorted; optionally after pruning, with the threshold."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for h, row in enumerate(before.detach().float().cpu()):
        ax.plot(sorted(row.tolist(), reverse=True), marker=".", label=f"head {h} before")
    if after is not None:
        for h, row in enumerate(after.detach().float().cpu()):
            ax.plot(sorted(row.tolist(), reverse=True), ls=":", marker="x", label=f"head {h} after")
    if threshold is not None:
        ax.axhline(threshold, color="r", lw=0.8, label="threshold")
    ax.set_xlabel("slot rank")
    ax.set_ylabel("importance")
    ax.legend(fontsize=7)
    ax.set_title(title or "Slot importance")
    return _save(fig, path)


def s2s_maps(maps: torch.Tensor, path: str, batch: int = 0, event: int = -1, title: str = "") -> str:
    """State-to-state attention ``maps [E, B, H, S, S]`` at one period end, one panel per head."""
    plt = _plt()
    if maps.shape[0] == 0:
        raise ValueError("no state-to-state event in these maps (the sequence is shorter than comm_every)")
    m = maps[event, batch].detach().float().cpu()
    H = m.shape[0]
    fig, axes = plt.subplots(1, H, figsize=(3 * H, 3), squeeze=False)
    for h in range(H):
        axes[0, h].imshow(m[h].numpy(), cmap="magma", vmin=0)
        axes[0, h].set_title(f"head {h}")
        axes[0, h].set_xlabel("key slot")
    axes[0, 0].set_ylabel("query slot")
    fig.suptitle(title or "State-to-state attention")
    return _save(fig, path)


def curves(history: Dict[str, Sequence[float]], path: str, x_key: str = "step", title: str = "") -> str:
    """Line plots of every series in ``history`` against ``history[x_key]``, one panel each."""
    plt = _plt()
    keys = [k for k in history if k != x_key and len(history[k])]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        xs = history[x_key][: len(history[k])] if x_key in history else range(len(history[k]))
        ax.plot(list(xs), list(history[k]))
        ax.set_xlabel(x_key)
        ax.set_title(k)
    fig.suptitle(title)
    return _save(fig, path)
