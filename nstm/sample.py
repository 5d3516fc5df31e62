"""``nstm-sample CHECKPOINT`` (or ``python -m nstm.sample``): text from a language model that
``nstm-train`` saved.

    nstm-sample results/shakespeare/nstm-.../ckpt.pt --prompt "ROMEO:" --max-new-tokens 300

Everything needed is in the checkpoint: the model's class and configuration (``nstm.checkpoint.
load_model``) and the task's vocabulary (characters for shakespeare and text, words for wikitext2).
Checkpoints of tasks without a vocabulary (copy, mqar, passkey) take and print token ids
(``--prompt "3 1 4"``). Classifier checkpoints cannot generate and are refused with a clear error.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from .checkpoint import CheckpointError, ModelSpec, load_checkpoint

LM_CLASSES = ("NSTMLM", "TransformerLM")


class _Codec:
    """Text <-> token ids for the vocabulary a checkpoint carries (or plain ids without one)."""

    def __init__(self, vocab: Optional[dict], vocab_size: int):
        self.vocab_size = vocab_size
        self.kind, self.chars, self.words = "ids", None, None
        if isinstance(vocab, dict) and "chars" in vocab:
            from .data.shakespeare import CharVocab
            self.kind, self.chars = "chars", CharVocab.from_dict(vocab)
        elif isinstance(vocab, (list, tuple)) and vocab and all(isinstance(w, str) for w in vocab):
            self.kind, self.words = "words", list(vocab)
            self.stoi = {w: i for i, w in enumerate(self.words)}

    def encode(self, text: str) -> List[int]:
        if self.kind == "chars":
            unknown = sorted({c for c in text if c not in self.chars})
            if unknown:
                raise ValueError(f"the prompt has characters the model never saw: {unknown!r}")
            return self.chars.encode(text).tolist()
        if self.kind == "words":
            return [self.stoi.get(w, 0) for w in text.split()]            # 0 is <unk>
        try:
            ids = [int(t) for t in text.replace(",", " ").split()]
        except ValueError:
            raise ValueError("this checkpoint has no vocabulary: give the prompt as token ids, "
                             f"e.g. --prompt '1 2 3', got {text!r}") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {bad}")
        return ids

    def decode(self, ids: List[int]) -> str:
        if self.kind == "chars":
            return self.chars.decode(ids)
        if self.kind == "words":
            return " ".join("\n" if self.words[i] == "<eos>" else self.words[i] for i in ids).replace(" \n ", "\n")
        return " ".join(str(i) for i in ids)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nstm-sample", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("checkpoint", help="a ckpt.pt that nstm-train wrote (a language-model task)")
    ap.add_argument("--prompt", default=None, help="text to continue (default: a newline, or token 0)")
    ap.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--sample-top-k", type=int, default=None, help="sample among the k most likely tokens")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
    ap.add_argument("--num-samples", type=int, default=1, help="independent continuations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    return ap


def sample(path: str, prompt: Optional[str] = None, max_new_tokens: int = 200, temperature: float = 0.8,
           sample_top_k: Optional[int] = None, top_p: Optional[float] = None, num_samples: int = 1,
           seed: int = 0, device: str = "cpu") -> List[str]:
    """The continuations (prompt included) of the checkpoint's model, decoded to text."""
    ckpt = load_checkpoint(path)
    if "model_class" not in ckpt:
        raise CheckpointError(f"{path} does not say which model it holds (saved without a model spec)")
    if ckpt["model_class"] not in LM_CLASSES:
        raise ValueError(f"{path} holds a {ckpt['model_class']}, a classifier: only language models "
                         f"({', '.join(LM_CLASSES)}) generate text")
    model = ModelSpec.from_checkpoint(ckpt).build()
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    codec = _Codec((ckpt.get("extra", {}).get("task_state") or {}).get("vocab"), model.vocab_size)
    if prompt is None:
        prompt = "\n" if codec.kind == "chars" and "\n" in codec.chars else ("" if codec.kind != "ids" else "0")
    ids = codec.encode(prompt) if prompt else []
    if not ids:
        ids = [0]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature if temperature > 0 else 1.0,
                         greedy=temperature == 0, sample_top_k=sample_top_k, top_p=top_p, generator=g)
    return [codec.decode(row.tolist()) for row in out]


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.max_new_tokens < 0 or a.num_samples < 1:
        ap.error("--max-new-tokens must be >= 0 and --num-samples >= 1")
    if a.temperature < 0:
        ap.error(f"--temperature must be >= 0 (0: greedy), got {a.temperature}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda was asked for but CUDA is not available")
    try:
        texts = sample(a.checkpoint, a.prompt, a.max_new_tokens, a.temperature, a.sample_top_k, a.top_p,
                       a.num_samples, a.seed, a.device)
    except (CheckpointError, ValueError) as e:
        print(f"nstm-sample: error: {e}", file=sys.stderr)
        return 2
    for i, t in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
