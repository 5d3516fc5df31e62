"""Hugging Face ``transformers`` integration (optional: ``pip install nstm-kernels[hf]``).

Importing this module registers the ``"nstm"`` model type with the Auto classes::

    import nstm.hf                                   # registers NSTMConfig / NSTMForCausalLM
    from transformers import AutoModelForCausalLM

    cfg = nstm.hf.NSTMConfig(vocab_size=256, d_model=128, num_layers=4, num_states=32, top_k=4)
    model = nstm.hf.NSTMForCausalLM(cfg)             # wraps an nstm.NSTMLM (model.model)
    out = model(input_ids, labels=input_ids)         # CausalLMOutputWithPast: loss, logits, past_key_values
    model.save_pretrained("out/")                    # config.json + model.safetensors
    model = AutoModelForCausalLM.from_pretrained("out/")
    ids = model.generate(input_ids, max_new_tokens=20, do_sample=False)   # constant-size NSTMCache

    model = nstm.hf.from_nstm_checkpoint("run/ckpt.pt")   # an nstm-train checkpoint holding an NSTMLM
    nstm.hf.to_nstm_checkpoint(model, "run/hf.pt")         # and back (nstm.checkpoint.load_model reads it)

Choices (see ``NSTMForCausalLM.forward``): ``loss`` is the shifted next-token cross-entropy only; the
routing's load-balancing loss is not added, it is ``model.aux_loss`` (add ``w * model.aux_loss``
yourself). ``attention_mask`` zeros (left or right padding) are skipped: each row runs as if its
unmasked tokens were alone, and masked positions get zero logits. ``import nstm.hf`` must run before
``AutoModelForCausalLM.from_pretrained`` of a saved NSTM model (no remote code is saved). The config's
``top_k`` is the routing's slots per token: it is kept out of the generation config (``generate``'s
``top_k`` is the sampling cut-off).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from nstm_kernels.settings import BACKENDS

from .checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from .config import NSTMConfig as ProjectConfig
from .layer import NSTMLayerState
from .models import NSTMLM
from .modules import RMSNorm, ShortConv
from .router import TokenToStateRouter
from .s2s import GATE_INIT, StateToStateAttention
from .state_manager import StateManager

_HINT = "nstm.hf needs Hugging Face transformers >= 5 and safetensors: pip install nstm-kernels[hf]"

try:
    import safetensors  # noqa: F401  (save_pretrained writes safetensors)
    import transformers
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        GenerationConfig,
        GenerationMixin,
        PreTrainedConfig,
        PreTrainedModel,
    )
    from transformers import initialization as hf_init
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:  # exercised in a subprocess by the tests
    raise ImportError(f"{_HINT} ({e})") from e

if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover
    raise ImportError(f"{_HINT} (found transformers {transformers.__version__})")

__all__ = ["NSTMConfig", "NSTMHFConfig", "NSTMForCausalLM", "NSTMCache", "from_nstm_checkpoint",
           "to_nstm_checkpoint"]


def _check_int(name: str, val: Any, low: int) -> None:
    if isinstance(val, bool) or not isinstance(val, int) or val < low:
        raise ValueError(f"{name} must be an int >= {low}, got {val!r}")


def _check_bool(name: str, val: Any) -> None:
    if not isinstance(val, bool):
        raise ValueError(f"{name} must be a bool, got {val!r}")


# ---- config ------------------------------------------------------------------------------------
class NSTMHFConfig(PreTrainedConfig):
    """``transformers`` config of an NSTM language model (``model_type = "nstm"``); exported as
    ``nstm.hf.NSTMConfig`` too.

    The fields are those of the project's ``nstm.NSTMConfig`` with its defaults, except two names:
    ``num_layers`` (the project's ``n_layers``) and ``tie_word_embeddings`` (``tie_weights``).
    ``vocab_size`` has no default (None, as in ``nstm.NSTMConfig``); a model needs it.
    ``hidden_size``, ``num_hidden_layers`` and ``num_attention_heads`` read ``d_model``,
    ``num_layers`` and ``num_heads``. ``to_nstm_config()`` / ``from_nstm_config(cfg)`` convert.
    """

    model_type = "nstm"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "num_layers",
                     "num_attention_heads": "num_heads"}

    vocab_size: Optional[int] = None
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_states: int = 64
    top_k: int = 8
    comm_every: int = 64
    head_dim: Optional[int] = None
    conv_size: int = 4
    mlp_ratio: float = 4.0
    use_s2s: bool = True
    tie_word_embeddings: bool = True
    backend: Optional[str] = None
    write_pointer: int = 0
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, List[int]]] = None

    def __post_init__(self, **kwargs):
        for project_name, name in (("n_layers", "num_layers"), ("tie_weights", "tie_word_embeddings")):
            if project_name in kwargs:
                raise ValueError(f"NSTMHFConfig calls {project_name!r} {name!r} (the transformers name); "
                                 f"got {project_name}={kwargs[project_name]!r}")
        if self.vocab_size is not None:
            _check_int("vocab_size", self.vocab_size, 1)
        for name, low in (("d_model", 1), ("num_layers", 1), ("num_heads", 1), ("num_states", 1),
                          ("top_k", 1), ("comm_every", 1), ("conv_size", 0), ("write_pointer", 0)):
            _check_int(name, getattr(self, name), low)
        if self.top_k > self.num_states:
            raise ValueError(f"top_k must be <= num_states ({self.num_states}), got {self.top_k}")
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}) "
                                 "unless head_dim is given")
        else:
            _check_int("head_dim", self.head_dim, 1)
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) \
                or not self.mlp_ratio > 0 or not math.isfinite(self.mlp_ratio):
            raise ValueError(f"mlp_ratio must be a number > 0, got {self.mlp_ratio!r}")
        for name in ("use_s2s", "tie_word_embeddings", "use_cache"):
            _check_bool(name, getattr(self, name))
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {BACKENDS}, got {self.backend!r}")
        super().__post_init__(**kwargs)

    def to_nstm_config(self) -> ProjectConfig:
        """The project's ``nstm.NSTMConfig`` of this model (``NSTMLM.from_config`` builds it)."""
        return ProjectConfig(d_model=self.d_model, num_heads=self.num_heads, num_states=self.num_states,
                             top_k=self.top_k, comm_every=self.comm_every, head_dim=self.head_dim,
                             conv_size=self.conv_size, use_s2s=self.use_s2s, backend=self.backend,
                             write_pointer=self.write_pointer, n_layers=self.num_layers, mlp_ratio=self.mlp_ratio,
                             vocab_size=self.vocab_size,
                             tie_weights=self.tie_word_embeddings)

    @classmethod
    def from_nstm_config(cls, config: ProjectConfig, **kwargs) -> NSTMHFConfig:
        """The transformers config of a project ``nstm.NSTMConfig`` (``kwargs``: more fields, e.g.
        ``eos_token_id``)."""
        if not isinstance(config, ProjectConfig):
            raise TypeError(f"config must be an nstm.NSTMConfig, got {type(config).__name__}")
        d = config.to_dict()
        d["num_layers"] = d.pop("n_layers")
        d["tie_word_embeddings"] = d.pop("tie_weights")
        d.update(kwargs)
        return cls(**d)


NSTMConfig = NSTMHFConfig


# ---- cache -------------------------------------------------------------------------------------
def _rows(state: NSTMLayerState, fn) -> NSTMLayerState:
    """``state`` with ``fn`` applied to every per-row tensor (slot keys/values, positions, conv)."""
    op = state.op
    pos = fn(op.pos) if isinstance(op.pos, torch.Tensor) else op.pos
    conv = None if state.conv is None else fn(state.conv)
    return NSTMLayerState(type(op)(fn(op.k), fn(op.v), pos), conv)


class NSTMCache(Cache):
    """The decode cache of ``NSTMForCausalLM``: the per-layer ``NSTMLayerState`` (slot memories and
    short-conv windows) after the tokens seen so far. Its size does not grow with the context
    (``state_bytes()``); ``get_seq_length()`` counts the token columns fed (padding included).

    A recurrent state cannot be rolled back, so ``crop`` (assisted decoding) is refused; beam search
    works (``reorder_cache``)."""

    def __init__(self, states: Optional[List[NSTMLayerState]] = None, seen_tokens: int = 0):
        super().__init__(layers=[])
        self.states: Optional[List[NSTMLayerState]] = None if states is None else list(states)
        self.seen_tokens = seen_tokens

    def __repr__(self) -> str:
        return (f"NSTMCache(layers={len(self)}, batch={self.batch_size}, seen_tokens={self.seen_tokens}, "
                f"bytes={self.state_bytes()})")

    def __len__(self) -> int:
        return 0 if self.states is None else len(self.states)

    # what generate() asks of a cache
    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.states is not None

    @property
    def is_sliding(self) -> List[bool]:
        return [False] * len(self)

    @property
    def is_linear(self) -> List[bool]:
        return [True] * len(self)

    @property
    def batch_size(self) -> int:
        return -1 if self.states is None else int(self.states[0].op.k.shape[0])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> Tuple[int, int]:
        return query_length, 0

    def has_previous_state(self, layer_idx: Optional[int] = None, state_idx: Optional[int] = None) -> bool:
        return self.states is not None

    def update(self, *args, **kwargs):
        raise TypeError("NSTMCache holds recurrent NSTM states, not attention keys/values; it is filled by "
                        "NSTMForCausalLM.forward")

    def update_states(self, states: List[NSTMLayerState], new_tokens: int) -> None:
        """Replace the states with those after ``new_tokens`` more token columns."""
        self.states = list(states)
        self.seen_tokens += new_tokens

    def reset(self) -> None:
        self.states, self.seen_tokens = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("NSTMCache cannot be cropped: a recurrent state cannot be rolled back "
                                  "(assisted / speculative decoding is not supported)")

    def _map(self, fn) -> None:
        if self.states is not None:
            self.states = [_rows(s, fn) for s in self.states]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self, *args, **kwargs) -> None:
        pass

    def prefetch(self, *args, **kwargs) -> None:
        pass

    def state_bytes(self) -> int:
        """Bytes held: slot keys and values and conv windows of all layers (0 before the first forward)."""
        total = 0
        for s in self.states or []:
            total += s.op.k.numel() * s.op.k.element_size() + s.op.v.numel() * s.op.v.element_size()
            if s.conv is not None:
                total += s.conv.numel() * s.conv.element_size()
        return total


# ---- model -------------------------------------------------------------------------------------
class _NSTMGenerationConfig(GenerationConfig):
    """The model's default generation config: ``GenerationConfig.from_model_config`` without the
    config's ``top_k``, which is the routing's slots per token, not the sampling cut-off."""

    @classmethod
    def from_model_config(cls, model_config) -> GenerationConfig:
        d = dict(model_config) if isinstance(model_config, dict) else model_config.to_dict()
        d.pop("top_k", None)
        return GenerationConfig.from_model_config(d)


def _check_mask(mask: Any, B: int, L: int, past: int) -> Optional[torch.Tensor]:
    """The mask of the ``L`` new columns as a bool ``[B, L]``, or None when all are kept."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor [batch, seq_len] of 0/1, got {type(mask).__name__}")
    if mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] not in (L, past + L):
        want = f"[{B}, {L}]" if past == 0 else f"[{B}, {L}] or [{B}, {past + L}] (past + new tokens)"
        raise ValueError(f"attention_mask must have shape {want} (a 2D padding mask; 4D masks are not "
                         f"supported), got {list(mask.shape)}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    keep = mask[:, mask.shape[1] - L:].bool()
    if bool(keep.all()):
        return None
    counts = keep.sum(1)
    if bool((counts == 0).any()):
        rows = torch.nonzero(counts == 0)[:, 0].tolist()
        raise ValueError(f"attention_mask leaves no token in row(s) {rows}: every row needs at least one "
                         "unmasked token")
    # the kept tokens of a row must be one run (left and/or right padding), not holes in the middle
    idx = torch.arange(L, device=keep.device).expand(B, L)
    first = torch.where(keep, idx, L).min(1).values
    last = torch.where(keep, idx, -1).max(1).values
    if bool((last - first + 1 != counts).any()):
        raise ValueError("attention_mask may pad on the left and/or the right only: the unmasked tokens of "
                         "each row must be contiguous")
    return keep


class NSTMForCausalLM(PreTrainedModel, GenerationMixin):
    """``transformers`` causal LM around the project's ``nstm.NSTMLM`` (``self.model``: the same modules
    and parameter names, prefixed ``model.``).

    ``generate()`` decodes from an ``NSTMCache`` (the per-layer NSTM states, constant size in the
    context length): the prompt runs through the sequence operator once, then one token per step.
    Greedy search, sampling and beam search work; assisted decoding does not (a recurrent state
    cannot be rolled back).
    """

    config_class = NSTMHFConfig
    generation_config_class = _NSTMGenerationConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["NSTMBlock"]
    _is_stateful = True
    supports_gradient_checkpointing = False
    # transformers 5: {target: source}; only applied when config.tie_word_embeddings is True
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}

    def __init__(self, config: NSTMHFConfig):
        if not isinstance(config, NSTMHFConfig):
            raise TypeError(f"config must be an nstm.hf.NSTMConfig, got {type(config).__name__}")
        if config.vocab_size is None:
            raise ValueError("NSTMForCausalLM needs config.vocab_size")
        super().__init__(config)
        self.model = NSTMLM.from_config(config.to_nstm_config())
        if torch.tensor([]).device.type != "meta":
            # NSTMLM initialised every weight itself: keep that (HF's init pass would redraw them).
            # from_pretrained builds the model under a meta-device context: then this is skipped, and
            # weights missing from the checkpoint are drawn by _init_weights.
            for t in list(self.parameters()) + list(self.buffers()):
                t._is_hf_initialized = True
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not make a DynamicCache (attention keys/values): forward makes an NSTMCache
        return False

    def adjust_generation_fn(self, *args, **kwargs):
        # from_pretrained without a generation_config.json reads generate()'s settings from config.json,
        # where top_k is the routing's: not the sampling cut-off
        out = super().adjust_generation_fn(*args, **kwargs)
        gc = self.generation_config
        if gc is not None and getattr(gc, "_from_model_config", False) and gc.top_k == self.config.top_k:
            gc.top_k = None
        return out

    # ---- embeddings (PreTrainedModel API) -------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value
        self.model.vocab_size = value.num_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.head = value

    @property
    def aux_loss(self) -> torch.Tensor:
        """The routing's load-balancing loss of the last forward (``NSTMLM.aux_loss``): never part of
        ``loss``; add ``weight * model.aux_loss`` to it in training."""
        return self.model.aux_loss

    # ---- weights missing from a checkpoint: the constructors' distributions ---------------------
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        names = {m: n for n, m in self.named_modules()}
        name = names.get(module, "")
        if isinstance(module, nn.Embedding):
            hf_init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Linear):
            if name.endswith("in_proj"):
                hf_init.normal_(module.weight, std=1.0 / math.sqrt(module.in_features))
            elif name.endswith("out_proj") or name.endswith("mlp.down"):
                hf_init.normal_(module.weight, std=0.02 / math.sqrt(2 * self.config.num_layers))
            else:                                    # mlp.up, an untied head: torch's Linear default
                hf_init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                hf_init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            hf_init.ones_(module.weight)
        elif isinstance(module, ShortConv):
            hf_init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            hf_init.zeros_(module.bias)
        elif isinstance(module, TokenToStateRouter):
            hf_init.normal_(module.weight, std=1.0 / math.sqrt(module.weight.shape[1]))
            hf_init.zeros_(module.bias)
        elif isinstance(module, StateManager):
            hf_init.normal_(module.init_k, std=1.0 / math.sqrt(module.init_k.shape[-1]))
            hf_init.normal_(module.init_v, std=0.02)
            hf_init.constant_(module.iota, float(module.init_importance))
            hf_init.zeros_(module.usage)
            hf_init.zeros_(module.usage_tokens)
        elif isinstance(module, StateToStateAttention):
            hf_init.normal_(module.w_q, std=1.0 / math.sqrt(module.w_q.shape[-1]))
            hf_init.normal_(module.w_k, std=1.0 / math.sqrt(module.w_k.shape[-1]))
            hf_init.constant_(module.gate, GATE_INIT)
        # the containers (NSTMLM, NSTMBlock, NSTMLayer, MLP) hold no tensors of their own: nothing to do

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None,
                past_key_values: Optional[NSTMCache] = None,
                use_cache: Optional[bool] = None,
                return_dict: Optional[bool] = None,
                logits_to_keep: Union[int, torch.Tensor] = 0,
                **kwargs) -> Union[CausalLMOutputWithPast, Tuple]:
        """``input_ids [B, L]`` -> ``CausalLMOutputWithPast(loss, logits [B, L, vocab], past_key_values)``.

        * ``past_key_values``: an ``NSTMCache`` to continue (``input_ids`` are then the new tokens
          only); it is advanced in place and returned. With ``use_cache`` (default
          ``config.use_cache`` in eval mode, False in training) a new one is made when none is given.
          ``use_cache=False`` with a cache reads it without changing it.
        * ``attention_mask [B, L]`` (or ``[B, past + L]``; only the last ``L`` columns are read): 0
          marks padding, on the left and/or the right of each row. Masked tokens are skipped: they
          change no state, each row's logits and state are those of its unmasked tokens run alone,
          and masked positions get zero logits. An all-ones mask is the same as none.
        * ``labels [B, L]``: the shifted next-token cross-entropy as in transformers (position
          ``t`` predicts ``labels[t + 1]``, -100 ignored), and nothing else (the load-balancing
          loss is ``model.aux_loss``). With a mask, pairs whose source or target is masked are
          ignored too, so a padded row counts what it would alone.
        * ``logits_to_keep``: as in transformers (0: all positions; ``n``: the last ``n``).
        * ``inputs_embeds``, ``output_attentions`` and ``output_hidden_states`` are not supported;
          other keyword arguments (``position_ids``: NSTM has no positions) are ignored.
        """
        for name in ("inputs_embeds", "output_attentions", "output_hidden_states"):
            if kwargs.get(name) is not None and kwargs.get(name) is not False:
                raise ValueError(f"NSTMForCausalLM does not support {name}; pass input_ids (token ids)")
        if input_ids is None:
            raise ValueError("input_ids (token ids [batch, seq_len]) is required")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32) \
                or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be an int64 tensor [batch, seq_len], got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{list(getattr(input_ids, 'shape', []))}")
        B, L = input_ids.shape
        if L < 1 or B < 1:
            raise ValueError(f"input_ids must hold at least one token per row, got shape {list(input_ids.shape)}")
        if past_key_values is not None and not isinstance(past_key_values, NSTMCache):
            raise TypeError(f"past_key_values must be an nstm.hf.NSTMCache (or None), got "
                            f"{type(past_key_values).__name__}")
        state = None
        if past_key_values is not None and past_key_values.states is not None:
            if past_key_values.batch_size != B:
                raise ValueError(f"past_key_values holds batch {past_key_values.batch_size}, input_ids has batch {B}")
            state = past_key_values.states
        if use_cache is None:
            use_cache = past_key_values is not None or (self.config.use_cache and not self.training)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        past = past_key_values.seen_tokens if past_key_values is not None else 0
        keep = None if attention_mask is None else _check_mask(attention_mask, B, L, past)

        if keep is None:
            if L == 1 and state is not None and not torch.is_grad_enabled():
                step_logits, new_state = self.model.step(input_ids[:, 0], state)   # the decode step
                logits = step_logits[:, None]
            else:
                out = self.model(input_ids, state=state, return_state=True)
                logits, new_state = out.logits, out.state
        else:
            # the rows' unmasked tokens laid end to end, one document per row (cu_seqlens)
            counts = keep.sum(1)
            cu = torch.zeros(B + 1, dtype=torch.int64, device=input_ids.device)
            cu[1:] = torch.cumsum(counts, 0)
            out = self.model(input_ids[keep][None], state=state, return_state=True, cu_seqlens=cu)
            logits = out.logits.new_zeros(B, L, out.logits.shape[-1])
            logits[keep] = out.logits[0]
            new_state = out.state

        loss = None
        if labels is not None:
            loss = self._loss(logits, labels, keep, input_ids.shape, kwargs.get("num_items_in_batch"))
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        else:
            logits = logits[:, logits_to_keep]

        cache = None
        if use_cache:
            cache = past_key_values if past_key_values is not None else NSTMCache()
            cache.update_states(new_state, L)
        if not return_dict:
            return tuple(x for x in (loss, logits, cache) if x is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def _loss(self, logits, labels, keep, shape, num_items_in_batch):
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32) \
                or tuple(labels.shape) != tuple(shape):
            raise ValueError(f"labels must be an int64 tensor of input_ids' shape {list(shape)}, got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)} {list(getattr(labels, 'shape', []))}")
        V = self.config.vocab_size
        bad = (labels != -100) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            raise ValueError(f"labels must be token ids in [0, {V}) or -100 (ignored)")
        labels = labels.long()
        if keep is not None:
            labels = labels.masked_fill(~keep, -100)
            labels[:, 1:] = labels[:, 1:].masked_fill(~keep[:, :-1], -100)
        return self.loss_function(logits=logits, labels=labels, vocab_size=V, num_items_in_batch=num_items_in_batch)

    # ---- the project's models and checkpoints ---------------------------------------------------
    def _load_nstm_weights(self, state_dict: Dict[str, torch.Tensor]) -> None:
        try:
            self.model.load_state_dict(state_dict)
        except RuntimeError as e:
            raise ValueError("the NSTMLM weights do not fit the model their config describes (was the model "
                             f"pruned after it was built? pruned models are not supported): {e}") from e

    @classmethod
    def from_nstm(cls, nstm_model: NSTMLM, **config_kwargs) -> NSTMForCausalLM:
        """A transformers model with a copy of ``nstm_model``'s weights (same device, dtype and
        train/eval mode); ``config_kwargs``: more config fields (``eos_token_id``...)."""
        if not isinstance(nstm_model, NSTMLM):
            raise TypeError(f"from_nstm takes an nstm.NSTMLM, got {type(nstm_model).__name__}")
        model = cls(NSTMHFConfig.from_nstm_config(nstm_model.config, **config_kwargs))
        model._load_nstm_weights(nstm_model.state_dict())
        weight = nstm_model.embed.weight
        model.to(device=weight.device)
        if weight.dtype != model.model.embed.weight.dtype:
            model.to(dtype=weight.dtype)
        return model.train(nstm_model.training)

    def to_nstm(self) -> NSTMLM:
        """The wrapped ``nstm.NSTMLM`` itself (``self.model``; shares the weights)."""
        return self.model


def from_nstm_checkpoint(path: str, map_location="cpu", **config_kwargs) -> NSTMForCausalLM:
    """The ``NSTMForCausalLM`` of a project checkpoint (``nstm-train``'s ``ckpt.pt``, or
    ``to_nstm_checkpoint``) holding an ``NSTMLM``, in eval mode. ``CheckpointError`` for a missing or
    foreign file or one saved without its model description; ``ValueError`` for another model class."""
    ckpt = load_checkpoint(path, map_location=map_location)
    spec = ModelSpec.from_checkpoint(ckpt)
    if spec.model_class != "NSTMLM":
        raise ValueError(f"{path} holds a {spec.model_class}; nstm.hf converts NSTMLM checkpoints only")
    model = NSTMForCausalLM(NSTMHFConfig.from_nstm_config(spec.config, **config_kwargs))
    model._load_nstm_weights(ckpt["model"])
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def to_nstm_checkpoint(model: NSTMForCausalLM, path: str, step: int = 0, config: Optional[Dict] = None,
                       extra: Optional[Dict] = None) -> str:
    """Write ``model`` as a project checkpoint (``nstm.checkpoint.save_checkpoint`` with its
    ``ModelSpec``): ``nstm.checkpoint.load_model(path)`` rebuilds the ``NSTMLM``. ``config`` / ``extra``:
    the run settings and extra data to store (a vocabulary for ``nstm-sample``...). Returns ``path``."""
    if not isinstance(model, NSTMForCausalLM):
        raise TypeError(f"to_nstm_checkpoint takes an NSTMForCausalLM, got {type(model).__name__}")
    spec = ModelSpec("NSTMLM", model.config.to_nstm_config())
    return save_checkpoint(path, model.model, step=step, config=config, extra=extra, model_spec=spec)


AutoConfig.register(NSTMHFConfig.model_type, NSTMHFConfig, exist_ok=True)
AutoModelForCausalLM.register(NSTMHFConfig, NSTMForCausalLM, exist_ok=True)
