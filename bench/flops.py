"""FLOPs per token of NSTMLM and the same-size Transformer, analytic and counted (issue 12).

    python bench/flops.py                         # T = 1K, 8K, 32K; 4 layers, d_model 128
    python bench/flops.py --contexts 256 1024     # shorter (the test's smoke run)

Both models are built as in ``bench/models.py`` (the Transformer parameter-matched by
``nstm.baseline.matched_transformer_config``), batch 1, fp32, on the CPU.

* analytic: 2 FLOPs per weight of every linear and convolution layer per token, plus the sequence
  mixer: NSTM by its definition (``nstm_kernels.flops.nstm_flops``: reads, writes and the s2s at
  period ends, O(S) per token) and causal softmax attention for the Transformer (token t attends to
  t + 1 positions: ``(T + 1) H (d_k + d_v)`` per token on average, O(T)). Training is 3x the forward
  (a gradient for each operand of each product), as FlopCounterMode counts it.
* counted: ``torch.utils.flop_counter.FlopCounterMode`` around a real forward (eval, no grad) and
  a training step (forward + cross-entropy + backward). NSTM's operator is counted by its
  registered formula (``nstm_kernels/flops.py``); PyTorch's SDPA formula counts the full T x T
  score matrix even when causal, i.e. twice the causal work, so the counted Transformer attention
  is about 2x its analytic value: both are reported as they are.

Writes ``bench/results/flops-<commit>-<date>.{json,md,png}`` (the plot: FLOPs per token against
T; ``-2``, ``-3``, ... is added to the name when such files exist, so nothing is overwritten) and
says where. A progress bar on stderr follows the rows when stdout is a terminal (``--no-progress``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import atomic_write, device_name, git_commit, plain_log_ticks, result_stem, run_date  # noqa: E402

from nstm import NSTMLM  # noqa: E402
from nstm.baseline import TransformerLM, matched_transformer_config  # noqa: E402
from nstm.progress import progress  # noqa: E402
from nstm_kernels.flops import nstm_flops  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODEL = dict(vocab_size=256, d_model=128, n_layers=4, num_heads=4, num_states=32, top_k=4,
             comm_every=64)


def weight_flops(model: torch.nn.Module) -> int:
    """2 x the weights of the projection and convolution layers: their FLOPs per token (a depthwise
    convolution's weight is its per-token work too)."""
    n = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        # projections (nn.Linear, NSTM's router) and convolutions (the short conv); not the
        # embedding lookup, not the norms' 1-D scales. A tied output head is an nn.Linear sharing
        # the embedding's weight: counted once, where it is used as a matmul.
        if isinstance(w, torch.nn.Parameter) and w.dim() >= 2 and not isinstance(mod, torch.nn.Embedding):
            n += w.numel()
    return 2 * n


def analytic(kind: str, model, T: int, cfg: dict, heads: int, d_head: int) -> int:
    """Forward FLOPs per token (see the module docstring)."""
    per_token = weight_flops(model)
    L = cfg["n_layers"]
    if kind == "nstm":
        d = cfg["d_model"] // cfg["num_heads"]
        per_token += L * nstm_flops(1, T, cfg["num_heads"], d, d, cfg["num_states"], cfg["top_k"],
                                    cfg["comm_every"]) / T
    else:
        per_token += L * (T + 1) * heads * 2 * d_head
    return int(per_token)


def register_cpu_sdpa_formulas() -> None:
    """torch's FlopCounterMode has formulas for the CUDA SDPA kernels but none for the CPU flash
    kernel that ``F.scaled_dot_product_attention`` runs here, so it would count the Transformer's
    attention as 0. Register the same formula (``sdpa_flop_count``: the full T x T square) for it."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    def fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)
    fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)(fwd)
    fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)(bwd)


def counted(model, T: int, train: bool):
    """``(total, convolution_backward)`` FLOPs of a forward (``train``: a training step) counted by
    FlopCounterMode. The second is reported apart: torch's ``convolution_backward`` formula ignores
    the groups of a depthwise convolution (NSTM's short conv), so it counts C times the work."""
    from torch.utils.flop_counter import FlopCounterMode
    register_cpu_sdpa_formulas()
    x = torch.randint(0, MODEL["vocab_size"], (1, T))
    model.train(train)
    with FlopCounterMode(display=False) as c:
        if train:
            out = model(x)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    conv_bwd = sum(n for op, n in c.get_flop_counts()["Global"].items() if "convolution_backward" in str(op))
    return c.get_total_flops(), conv_bwd


def markdown(rows, meta) -> str:
    out = ["# FLOPs per token: NSTMLM against the same-size Transformer", "",
           f"- commit {meta['commit']}; {meta['device']}; batch 1, fp32; model {meta['model']}",
           f"- parameters: NSTMLM {meta['params']['nstm']:,}, Transformer {meta['params']['transformer']:,}",
           "- analytic: 2 x weights + the mixer (NSTM by its definition, causal attention for the "
           "Transformer); counted: FlopCounterMode (SDPA counted as the full T x T square)", "",
           "- `counted train` is FlopCounterMode's total; `of it, conv bwd` is its depthwise-convolution "
           "backward, whose torch formula ignores the groups (C times the real work); the ratio uses "
           "the total without it", "",
           "| T | model | analytic fwd MFLOP/token | counted fwd | analytic train | counted train "
           "| of it, conv bwd | NSTM / Transformer (counted train, no conv bwd) |",
           "|---:|---|---:|---:|---:|---:|---:|---:|"]
    by_t = {}
    for r in rows:
        by_t.setdefault(r["T"], {})[r["model"]] = r
    for T in sorted(by_t):
        for name in ("nstm", "transformer"):
            r = by_t[T].get(name)
            if r is None:
                continue
            ratio = ""
            if name == "nstm" and "transformer" in by_t[T]:
                t = by_t[T]["transformer"]
                ratio = f"{r['counted_train_no_conv_bwd'] / t['counted_train_no_conv_bwd']:.2f}"
            out.append(f"| {T:,} | {name} | {r['analytic_fwd'] / 1e6:.2f} | {r['counted_fwd'] / 1e6:.2f} | "
                       f"{r['analytic_train'] / 1e6:.2f} | {r['counted_train'] / 1e6:.2f} | "
                       f"{r['counted_conv_backward'] / 1e6:.2f} | {ratio} |")
    return "\n".join(out) + "\n"


def plot(rows, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker, colour in (("nstm", "o", "tab:blue"), ("transformer", "s", "tab:red")):
        rs = sorted((r for r in rows if r["model"] == name), key=lambda r: r["T"])
        if not rs:
            continue
        ts = [r["T"] for r in rs]
        ax.plot(ts, [r["counted_train_no_conv_bwd"] / 1e6 for r in rs], marker=marker, ls="-",
                color=colour, label=f"{name}, counted (training, no conv backward)")
        ax.plot(ts, [r["analytic_train"] / 1e6 for r in rs], marker=marker, ls="--", color=colour,
                alpha=0.6, mfc="none", label=f"{name}, analytic (training)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.set_xlabel("context T (tokens)")
    ax.set_ylabel("MFLOP per token")
    ax.set_title(f"Training FLOPs per token ({MODEL['n_layers']} layers, d_model {MODEL['d_model']}, "
                 "batch 1)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--tag", default="")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    for T in args.contexts:
        if T < 2:
            ap.error(f"--contexts {T}: expected T >= 2 (the training step predicts token t + 1)")
    torch.manual_seed(0)
    nstm = NSTMLM(**MODEL)
    tcfg = matched_transformer_config(nstm)
    tf = TransformerLM(**tcfg)
    d_head = tcfg["d_model"] // tcfg["num_heads"]
    rows, t0 = [], time.perf_counter()
    jobs = [(T, name, model) for T in args.contexts for name, model in (("nstm", nstm), ("transformer", tf))]
    bar = progress(jobs, desc="flops", unit="row", enabled=not args.no_progress)
    for T, name, model in bar:
        a = analytic(name, model, T, MODEL, tcfg["num_heads"], d_head)
        fwd, _ = counted(model, T, False)
        train, conv_bwd = counted(model, T, True)
        r = dict(T=T, model=name, analytic_fwd=a, analytic_train=3 * a, counted_fwd=fwd / T,
                 counted_train=train / T, counted_conv_backward=conv_bwd / T,
                 counted_train_no_conv_bwd=(train - conv_bwd) / T)
        rows.append(r)
        bar.write(f"T = {T:>6,} {name:<11} analytic {a / 1e6:8.2f}  counted fwd {r['counted_fwd'] / 1e6:8.2f} "
                  f"train {r['counted_train_no_conv_bwd'] / 1e6:8.2f} MFLOP/token "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stdout)
    bar.close()
    commit = git_commit()
    meta = dict(commit=commit, device=device_name(torch.device("cpu")), model=MODEL, transformer=tcfg,
                params=dict(nstm=sum(p.numel() for p in nstm.parameters()),
                            transformer=sum(p.numel() for p in tf.parameters())))
    stem = result_stem(args.out, f"flops-{commit}-{run_date()}" + (f"-{args.tag}" if args.tag else ""),
                       [".json", ".md", ".png"])
    atomic_write(stem + ".json", json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = markdown(rows, meta)
    atomic_write(stem + ".md", md)
    plotted = plot(rows, stem + ".png")
    print(md)
    print(f"wrote {stem}.json/.md" + ("/.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
