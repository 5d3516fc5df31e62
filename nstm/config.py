"""``NSTMConfig``: the one description of an NSTM model, from the command line to the checkpoint.

The same field names are used everywhere: the ``NSTMLayer`` arguments, the ``NSTMLM`` /
``NSTMClassifier`` arguments, the ``nstm-train`` flags (``--num-states`` is ``num_states``) and
the ``"model_config"`` entry of a checkpoint. As nanoGPT's ``GPTConfig``::

    cfg = NSTMConfig(vocab_size=256, d_model=128, n_layers=4, num_states=32, top_k=4)
    model = NSTMLM.from_config(cfg)          # or NSTMLM(256, d_model=128, ...): same model
    model.config == cfg                      # True
    NSTMLM.from_config(NSTMConfig.from_dict(cfg.to_dict()))   # what a checkpoint stores
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

# the fields that describe one NSTMLayer (the rest are the model's)
LAYER_FIELDS = ("num_states", "top_k", "comm_every", "head_dim", "conv_size", "use_s2s", "backend",
                "write_pointer")


@dataclass(frozen=True)
class NSTMConfig:
    """Every setting of an NSTM model (defaults are ``NSTMLM``'s).

    Layer (``NSTMLayer``):
        d_model: model width D.
        num_heads: heads H.
        num_states: slots per head S.
        top_k: slots each token writes to (the operator's routing top-k; 1 <= top_k <= S).
        comm_every: the slots attend to each other after every ``comm_every``-th token.
        head_dim: K = V per head (None: ``d_model // num_heads``).
        conv_size: width of the short causal conv on q, k, v (0: none).
        use_s2s: include the state-to-state attention.
        backend: operator backend (None: the fastest for the tensors' device).
        write_pointer: period of the position-aware write (0: content-only routing).
    Model:
        n_layers: NSTM blocks.
        mlp_ratio: SwiGLU hidden size over d_model.
        vocab_size: token vocabulary (language model; token-id classifier input), or None.
        tie_weights: the LM head shares the embedding matrix.
    """

    d_model: int = 256
    num_heads: int = 4
    num_states: int = 64
    top_k: int = 8
    comm_every: int = 64
    head_dim: Optional[int] = None
    conv_size: int = 4
    use_s2s: bool = True
    backend: Optional[str] = None
    write_pointer: int = 0
    n_layers: int = 4
    mlp_ratio: float = 4.0
    vocab_size: Optional[int] = None
    tie_weights: bool = True

    def layer_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of ``NSTMLayer`` after ``d_model`` and ``num_heads``."""
        return {name: getattr(self, name) for name in LAYER_FIELDS}

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> NSTMConfig:
        """The config of ``to_dict``; an unknown key is an error (a typo must not pass silently)."""
        if not isinstance(d, dict):
            raise TypeError(f"an NSTMConfig is made from a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown NSTMConfig field(s) {unknown}; the fields are {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> NSTMConfig:
        return dataclasses.replace(self, **changes)
