"""`make demo`: train a small NSTMLM on associative recall (or copy) on the CPU in a few minutes.

    python -m nstm.demo                       # MQAR, at most 150 s of training
    python -m nstm.demo --task copy --steps 300 --out out/copy

Prints accuracy and tokens/s, and writes the routing map (which slots each token wrote to, over time)
and the slot-usage histogram as PNGs.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from .models import NSTMLM
from .progress import progress
from .tasks import IGNORE, copy_batch, masked_accuracy, mqar_batch


def make_batch(task: str, batch: int, size: int, vocab: int, generator):
    if task == "mqar":
        return mqar_batch(batch, size, vocab, generator=generator)
    return copy_batch(batch, size, vocab, generator=generator)


def evaluate(model, task, size, vocab, n=512, seed=1234):
    model.eval()
    with torch.no_grad():
        x, y = make_batch(task, n, size, vocab, torch.Generator().manual_seed(seed))
        acc = masked_accuracy(model(x), y)
    model.train()
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["mqar", "copy"], default="mqar")
    ap.add_argument("--size", type=int, default=8, help="key-value pairs (mqar) or copy length")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--time-budget", type=float, default=150.0, help="seconds of training at most")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--states", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--comm-every", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    from . import plots

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = NSTMLM(args.vocab, d_model=args.d_model, n_layers=args.layers, num_heads=args.heads,
                   num_states=args.states, top_k=args.top_k, comm_every=args.comm_every)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"NSTMLM {n_params / 1e3:.0f}K params, task {args.task} (size {args.size}, vocab {args.vocab}), "
          f"S={args.states} top_k={args.top_k} C={args.comm_every}, device cpu")
    chance = 1.0 / (args.vocab - args.vocab // 2 if args.task == "mqar" else args.vocab - 1)
    history = {"step": [], "loss": [], "accuracy": []}
    tokens, t0 = 0, time.perf_counter()
    bar = progress(range(args.steps), desc="training", unit="step", mininterval=1.0, enabled=not args.no_progress)
    for step in bar:
        x, y = make_batch(args.task, args.batch, args.size, args.vocab, gen)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        (loss + 0.01 * model.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += x.numel()
        elapsed = time.perf_counter() - t0
        acc = masked_accuracy(logits.detach(), y)
        history["step"].append(step + 1)
        history["loss"].append(loss.item())
        history["accuracy"].append(acc)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}", tok_s=f"{tokens / elapsed:,.0f}")
        if elapsed > args.time_budget:
            bar.close()
            print(f"time budget of {args.time_budget:.0f} s reached after {step + 1} steps")
            break
    train_s = time.perf_counter() - t0
    acc = evaluate(model, args.task, args.size, args.vocab)
    print(f"test accuracy {acc:.3f} (chance {chance:.3f}) after {len(history['step'])} steps, "
          f"{train_s:.0f} s, {tokens / train_s:,.0f} training tokens/s")

    os.makedirs(args.out, exist_ok=True)
    model.eval()
    with torch.no_grad():
        x, _ = make_batch(args.task, 1, args.size, args.vocab, torch.Generator().manual_seed(7))
        maps = model(x, return_maps=True).maps
    layer0 = model.nstm_layers()[0]
    try:
        paths = [
            plots.routing_map(maps[0]["indices"], maps[0]["weights"], layer0.num_states,
                              os.path.join(args.out, "routing_map.png"),
                              title=f"Layer 0 routing on one {args.task} sequence (write weight per slot)"),
            plots.slot_usage(layer0.states.usage, os.path.join(args.out, "slot_usage.png"),
                             title="Layer 0 slot usage over training"),
            plots.curves(history, os.path.join(args.out, "training.png"), title=f"{args.task} training"),
        ]
    except ImportError as e:          # a plain `pip install`: no matplotlib, the numbers still come
        print(f"no plots: {e}")
        paths = []
    summary = {"task": args.task, "accuracy": acc, "chance": chance, "steps": len(history["step"]),
               "train_seconds": train_s, "tokens_per_second": tokens / train_s, "params": n_params,
               "config": vars(args)}
    tmp = os.path.join(args.out, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(args.out, "summary.json"))
    for p in paths:
        print(f"wrote {p}")
    return summary


def cli() -> int:
    """Console-script entry point (``nstm-demo``): runs ``main`` and exits 0 (``main`` returns the
    summary dict, which as an exit status would read as a failure)."""
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
