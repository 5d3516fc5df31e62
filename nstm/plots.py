"""Plots a person wants to see: routing over time, slot usage, importance, s2s maps, training curves.

matplotlib is imported lazily (it is an optional dependency: ``pip install nstm-kernels[tools]``).
Every function writes one PNG atomically and returns its path. Every panel has its axis labels
(with units where there are any); panels meant to be compared (heads) share one colour scale and
one colour bar; accuracy panels can show the chance level; only the values given are drawn.
"""
from __future__ import annotations

import math
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
    """Heatmap of write weight per slot (rows) over time (columns), one panel per head, all on one
    colour scale (0 to the largest weight shown) with one colour bar.

    ``indices/weights [B, T, H, k]`` as returned by ``sparse_route`` or ``return_maps``."""
    plt = _plt()
    B, T, H, k = indices.shape
    heads = list(range(H)) if heads is None else list(heads)
    dense = torch.zeros(T, H, num_states).scatter(-1, indices[batch].cpu(), weights[batch].detach().float().cpu())
    vmax = max(float(dense[:, heads].max()), 1e-12) if heads else 1.0
    fig, axes = plt.subplots(len(heads), 1, figsize=(min(14, 2 + T / 12), 1.4 + 1.8 * len(heads)),
                             squeeze=False, constrained_layout=True)
    im = None
    for ax, h in zip(axes[:, 0], heads):
        im = ax.imshow(dense[:, h].T.numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                       origin="lower", vmin=0.0, vmax=vmax)
        ax.set_ylabel(f"head {h}\nslot index")
        ax.set_xlabel("token position")
    if im is not None:
        fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.01,
                     label="write weight (gate x routing weight)")
    fig.suptitle(title or "Routing: which slots each token wrote to")
    return _save(fig, path)


def slot_usage(usage: torch.Tensor, path: str, title: str = "") -> str:
    """Bar chart of the share of write weight each slot received ``usage [H, S]``, per head, with
    the uniform share 1/S."""
    plt = _plt()
    u = usage.detach().float().cpu()
    u = u / u.sum(1, keepdim=True).clamp(min=1e-30)
    H, S = u.shape
    fig, ax = plt.subplots(figsize=(min(14, 3 + S * 0.25 * max(1, H / 2)), 3.2))
    width = 0.8 / H
    for h in range(H):
        ax.bar([i + h * width for i in range(S)], u[h].numpy(), width=width, label=f"head {h}")
    ax.axhline(1.0 / S, color="k", ls="--", lw=0.8, label=f"uniform (1/{S})")
    ax.set_xlabel("slot index")
    ax.set_ylabel("share of the head's write weight")
    ax.legend(fontsize=7, ncol=min(H + 1, 6))
    ax.set_title(title or "Slot usage")
    return _save(fig, path)


def importance(before: torch.Tensor, path: str, after: Optional[torch.Tensor] = None,
               threshold: Optional[float] = None, title: str = "") -> str:
    """Slot importance sigmoid(iota) per head, sorted; optionally after pruning (same colour per
    head, dotted), with the pruning threshold."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for h, row in enumerate(before.detach().float().cpu()):
        ax.plot(sorted(row.tolist(), reverse=True), marker=".", color=f"C{h % 10}", label=f"head {h} before")
    if after is not None:
        for h, row in enumerate(after.detach().float().cpu()):
            ax.plot(sorted(row.tolist(), reverse=True), ls=":", marker="x", color=f"C{h % 10}",
                    label=f"head {h} after")
    if threshold is not None:
        ax.axhline(threshold, color="r", lw=0.8, label=f"pruning threshold {threshold:g}")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("slot rank (highest importance first)")
    ax.set_ylabel("importance sigmoid(iota) (0 to 1)")
    ax.legend(fontsize=7)
    ax.set_title(title or "Slot importance")
    return _save(fig, path)


def s2s_maps(maps: torch.Tensor, path: str, batch: int = 0, event: int = -1, title: str = "") -> str:
    """State-to-state attention ``maps [E, B, H, S, S]`` at one period end, one panel per head, all
    on one colour scale (0 to the largest weight) with one colour bar."""
    plt = _plt()
    if maps.shape[0] == 0:
        raise ValueError("no state-to-state event in these maps (the sequence is shorter than comm_every)")
    m = maps[event, batch].detach().float().cpu()
    H = m.shape[0]
    vmax = max(float(m.max()), 1e-12)
    fig, axes = plt.subplots(1, H, figsize=(3 * H + 1, 3.2), squeeze=False, constrained_layout=True)
    im = None
    for h in range(H):
        im = axes[0, h].imshow(m[h].numpy(), cmap="magma", vmin=0.0, vmax=vmax)
        axes[0, h].set_title(f"head {h}")
        axes[0, h].set_xlabel("key slot index")
        axes[0, h].set_ylabel("query slot index")
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03, pad=0.02, label="attention weight")
    fig.suptitle(title or "State-to-state attention")
    return _save(fig, path)


#: axis labels (with units) of the series ``curves`` knows; any other series is labelled by its name
CURVE_LABELS = {
    "step": "training step",
    "loss": "cross-entropy loss (nats per token)",
    "accuracy": "accuracy (fraction correct)",
    "lr": "learning rate",
    "tokens_per_s": "throughput (tokens/s)",
}


def _is_accuracy(key: str) -> bool:
    return "acc" in key.lower()


def curves(history: Dict[str, Sequence[float]], path: str, x_key: str = "step", title: str = "",
           chance: Optional[Dict[str, float]] = None, labels: Optional[Dict[str, str]] = None) -> str:
    """Line plots of every series in ``history`` against ``history[x_key]``, one panel each.

    Each series must have one value per x (a shorter series would be drawn at x values it was not
    measured at: ``ValueError``); ``None``/NaN values are left out, not joined over. Accuracy
    panels (a name with "acc") run from 0 to 1 and draw ``chance[name]`` (the accuracy of
    guessing) as a dashed line when given. ``labels`` adds to or overrides ``CURVE_LABELS``."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    names = dict(CURVE_LABELS, **(labels or {}))
    chance = chance or {}
    keys = [k for k in history if k != x_key and len(history[k])]
    if not keys:
        raise ValueError(f"no series to plot in {sorted(history)}")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ys = list(history[k])
        if x_key in history:
            xs = list(history[x_key])
            if len(xs) != len(ys):
                raise ValueError(f"series {k!r} has {len(ys)} values for {len(xs)} values of {x_key!r}: "
                                 "plot series measured at other steps separately")
        else:
            xs = list(range(1, len(ys) + 1))
        pts = [(x, y) for x, y in zip(xs, ys)
               if y is not None and not (isinstance(y, float) and math.isnan(y))]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=k)
        if _is_accuracy(k):
            ax.set_ylim(0.0, 1.0)
            if k in chance:
                ax.axhline(chance[k], color="0.4", ls="--", lw=0.9, label=f"chance ({chance[k]:.3g})")
                ax.legend(fontsize=7)
        if all(isinstance(x, int) for x in xs):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(names.get(x_key, x_key) if x_key in history else "record")
        ax.set_ylabel(names.get(k, k))
        ax.set_title(k)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
