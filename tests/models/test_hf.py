"""nstm.hf: the Hugging Face config / causal LM around NSTMLM, its cache, save/load and conversions."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

import nstm.hf as H  # noqa: E402
from nstm import NSTMLM, NSTMClassifier  # noqa: E402
from nstm import NSTMConfig as ProjectConfig  # noqa: E402
from nstm.checkpoint import CheckpointError, ModelSpec, load_model, save_checkpoint  # noqa: E402
from tests.helpers import REPO_ROOT  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 20
TINY = dict(vocab_size=V, d_model=16, num_layers=2, num_heads=2, num_states=8, top_k=2, comm_every=3,
            backend="chunked")


def tiny(seed: int = 0, scramble: bool = True, **kw) -> H.NSTMForCausalLM:
    """A tiny model in eval mode. ``scramble``: weights drawn large enough (and the s2s gates open) that
    greedy decoding does not just repeat a token, and period ends (comm_every = 3) matter."""
    torch.manual_seed(seed)
    model = H.NSTMForCausalLM(H.NSTMConfig(**{**TINY, **kw})).eval()
    if scramble:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 1.5 / p.shape[-1] ** 0.5)
            for b in model.model.blocks:
                b.mixer.s2s.gate.fill_(0.8)
    return model


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))


def greedy_by_full_forwards(model, prompt, n):
    cur = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(cur, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            cur = torch.cat([cur, nxt], dim=1)
    return cur


# ---- import, registration, config ---------------------------------------------------------------
def test_import_without_transformers_says_how_to_install():
    code = "import sys; sys.modules['transformers'] = None; import nstm.hf"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "pip install nstm-kernels[hf]" in r.stderr


def test_auto_classes_are_registered_and_round_trip(tmp_path):
    assert H.NSTMConfig is H.NSTMHFConfig and issubclass(H.NSTMConfig, PretrainedConfig)
    assert issubclass(H.NSTMForCausalLM, PreTrainedModel)
    cfg = AutoConfig.for_model("nstm", **TINY)
    assert type(cfg) is H.NSTMHFConfig and cfg.model_type == "nstm"
    model = AutoModelForCausalLM.from_config(cfg)
    assert type(model) is H.NSTMForCausalLM and isinstance(model.model, NSTMLM)
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "nstm"
    again = AutoConfig.from_pretrained(tmp_path)
    assert type(again) is H.NSTMHFConfig
    assert again.to_nstm_config() == cfg.to_nstm_config()


def test_config_defaults_and_fields_are_the_projects():
    cfg = H.NSTMConfig()
    project = ProjectConfig()
    assert cfg.to_nstm_config() == project                 # every default, vocab_size None included
    lm_defaults = {k: p.default for k, p in inspect.signature(NSTMLM.__init__).parameters.items()
                   if p.default is not inspect.Parameter.empty}
    renamed = {"n_layers": "num_layers", "tie_weights": "tie_word_embeddings"}
    for name, default in lm_defaults.items():
        assert getattr(cfg, renamed.get(name, name)) == default, name
    cfg = H.NSTMConfig(**TINY, head_dim=4, conv_size=0, mlp_ratio=2.0, use_s2s=False, tie_word_embeddings=False)
    assert (cfg.num_layers, cfg.top_k, cfg.head_dim, cfg.conv_size, cfg.use_s2s) == (2, 2, 4, 0, False)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (16, 2, 2)
    nc = cfg.to_nstm_config()
    assert (nc.n_layers, nc.tie_weights, nc.mlp_ratio, nc.backend) == (2, False, 2.0, "chunked")
    assert H.NSTMConfig.from_nstm_config(nc).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("kw,match", [
    (dict(n_layers=2), "num_layers"),
    (dict(tie_weights=False), "tie_word_embeddings"),
    (dict(top_k=9, num_states=8), "top_k"),
    (dict(d_model=10, num_heads=4), "divisible"),
    (dict(num_layers=0), "num_layers"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(backend="gpu"), "backend"),
    (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(use_s2s="yes"), "use_s2s"),
])
def test_config_rejects_bad_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        H.NSTMConfig(**kw)


def test_model_is_the_project_lm_built_from_the_config():
    torch.manual_seed(3)
    hf = H.NSTMForCausalLM(H.NSTMConfig(**TINY)).eval()
    torch.manual_seed(3)
    lm = NSTMLM.from_config(hf.config.to_nstm_config()).eval()
    sd, want = hf.model.state_dict(), lm.state_dict()
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in sd)  # the project's init
    assert {n for n, _ in hf.named_parameters()} == {f"model.{n}" for n, _ in lm.named_parameters()}
    x = tokens(2, 6)
    out = hf(x)
    assert isinstance(out, CausalLMOutputWithPast)
    assert torch.equal(out.logits, lm(x))
    assert hf.model.head.weight is hf.model.embed.weight
    assert H.NSTMForCausalLM(H.NSTMConfig(**TINY, tie_word_embeddings=False)).model.head.weight is not \
        hf.model.embed.weight
    with pytest.raises(ValueError, match="vocab_size"):
        H.NSTMForCausalLM(H.NSTMConfig())


# ---- save / load --------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_is_safetensors_and_reloads_identical_logits(tmp_path, tie):
    model = tiny(tie_word_embeddings=tie)
    x = tokens(2, 8)
    want = model(x).logits
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    assert path.is_file() and not list(tmp_path.glob("*.bin"))
    with safe_open(str(path), framework="pt") as f:            # a real safetensors file
        keys = set(f.keys())
    assert "model.embed.weight" in keys and ("model.head.weight" in keys) == (not tie)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back) is H.NSTMForCausalLM and not back.training
    assert (back.model.head.weight is back.model.embed.weight) == tie
    assert torch.equal(back(x).logits, want)
    # the routing top_k is no sampling cut-off, with or without a generation_config.json
    assert back.generation_config.top_k is None
    os.remove(tmp_path / "generation_config.json")
    assert AutoModelForCausalLM.from_pretrained(tmp_path).generation_config.top_k is None


def test_weights_missing_from_a_checkpoint_get_the_constructor_init(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    sd = load_file(path)
    for k in ("model.blocks.0.mixer.states.iota", "model.blocks.1.mixer.in_proj.weight", "model.norm.weight"):
        del sd[k]
    save_file(sd, path, metadata={"format": "pt"})
    back = H.NSTMForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(back.model.blocks[0].mixer.states.iota, torch.full((2, 8), 3.0))
    assert torch.equal(back.model.norm.weight, torch.ones(16))
    w = back.model.blocks[1].mixer.in_proj.weight
    assert torch.isfinite(w).all() and 0.1 < w.std() < 0.5                  # N(0, 1/sqrt(d_model))
    assert torch.equal(back.model.blocks[1].mixer.router.weight, model.model.blocks[1].mixer.router.weight)
    assert torch.isfinite(back(tokens(1, 5)).logits).all()


# ---- loss ---------------------------------------------------------------------------------------
def test_labels_give_the_shifted_cross_entropy_and_nothing_else():
    model = tiny().train()
    x = tokens(2, 9)
    labels = x.clone()
    labels[0, 4] = -100
    out = model(x, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert model.aux_loss > 0                               # training mode: a load-balancing loss exists...
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-6)   # ...and is not in the loss
    out.loss.backward()
    assert model.model.embed.weight.grad is not None
    assert out.past_key_values is None                       # no cache in training by default
    loss, logits = model(x, labels=labels, return_dict=False)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)


# ---- generation and the cache -------------------------------------------------------------------
def test_greedy_generate_equals_greedy_full_forwards():
    model = tiny()
    prompt = tokens(2, 7)
    want = greedy_by_full_forwards(model, prompt, 8)
    assert len(set(want[:, 7:].flatten().tolist())) > 3      # not a degenerate repeat
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), want)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False), want)
    out = model.generate(prompt, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, H.NSTMCache) and out.past_key_values.batch_size == 2


def test_cache_continues_a_stream_and_its_size_is_constant_in_the_context():
    model = tiny()
    x = tokens(2, 40)
    full = model(x).logits
    out = model(x[:, :13])
    cache = out.past_key_values
    assert isinstance(cache, H.NSTMCache) and cache.get_seq_length() == 13
    size = cache.state_bytes()
    assert size > 0
    nxt = model(x[:, 13:], past_key_values=cache)
    assert nxt.past_key_values is cache and cache.get_seq_length() == 40
    torch.testing.assert_close(nxt.logits, full[:, 13:], rtol=1e-4, atol=1e-5)
    assert cache.state_bytes() == size                      # 13 or 40 tokens: the same state
    with torch.no_grad():                                    # one-token decode steps
        for t in range(3):
            cache = model(tokens(2, 1, seed=t), past_key_values=cache).past_key_values
    assert cache.state_bytes() == size and cache.get_seq_length() == 43
    short = model.generate(tokens(2, 4), max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    long = model.generate(tokens(2, 64), max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
    assert short.past_key_values.state_bytes() == long.past_key_values.state_bytes() == size
    peek = model(tokens(2, 2), past_key_values=cache, use_cache=False)
    assert peek.past_key_values is None and cache.get_seq_length() == 43   # read, not advanced


def test_beam_search_and_sampling_run_on_the_cache():
    model = tiny()
    prompt = tokens(2, 5)
    beams = model.generate(prompt, max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams.shape == (2, 9) and torch.equal(beams[:, :5], prompt)
    torch.manual_seed(0)
    a = model.generate(prompt, max_new_tokens=4, do_sample=True, num_return_sequences=2)
    torch.manual_seed(0)
    b = model.generate(prompt, max_new_tokens=4, do_sample=True, num_return_sequences=2)
    assert a.shape == (4, 9) and torch.equal(a, b)


# ---- padding ------------------------------------------------------------------------------------
def test_left_padding_runs_each_row_as_if_alone():
    model = tiny()
    x = tokens(2, 8)
    padded, mask = x.clone(), torch.ones_like(x)
    padded[1, :3], mask[1, :3] = 0, 0                       # row 1: 3 pads, then its 5 tokens
    logits = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(logits[0], model(x[:1]).logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[1, 3:], model(x[1:, 3:]).logits[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(logits[1, :3], torch.zeros(3, V))    # masked positions: zero logits
    # generate: every row continues as it would alone
    gen = model.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen[0], greedy_by_full_forwards(model, x[:1], 6)[0])
    assert torch.equal(gen[1, 3:], greedy_by_full_forwards(model, x[1:, 3:], 6)[0])
    # the loss counts the pairs each row has alone
    loss = model(padded, attention_mask=mask, labels=padded).loss
    lg0, lg1 = model(x[:1]).logits[0], model(x[1:, 3:]).logits[0]
    want = torch.cat([F.cross_entropy(lg0[:-1], x[0, 1:], reduction="none"),
                      F.cross_entropy(lg1[:-1], x[1, 4:], reduction="none")]).mean()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)


def test_right_padding_and_all_ones_masks():
    model = tiny()
    x = tokens(2, 8)
    plain = model(x).logits
    assert torch.equal(model(x, attention_mask=torch.ones_like(x)).logits, plain)
    assert torch.equal(model(x, attention_mask=torch.ones_like(x, dtype=torch.bool)).logits, plain)
    mask = torch.ones_like(x)
    mask[0, 5:] = 0                                          # row 0: 5 tokens, then 3 pads
    out = model(x, attention_mask=mask, labels=x)
    torch.testing.assert_close(out.logits[0, :5], plain[0, :5], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.logits[1], plain[1], rtol=1e-4, atol=1e-5)
    # the state after row 0 is the one after its 5 tokens
    cont = model(x[:, 7:], past_key_values=out.past_key_values).logits
    alone = model(torch.cat([x[:1, :5], x[:1, 7:]], 1)).logits[0, -1]
    torch.testing.assert_close(cont[0, 0], alone, rtol=1e-4, atol=1e-5)


# ---- conversions --------------------------------------------------------------------------------
def test_convert_to_and_from_project_checkpoints(tmp_path):
    torch.manual_seed(5)
    lm = NSTMLM(V, d_model=16, n_layers=2, num_heads=2, num_states=8, top_k=2, comm_every=3,
                backend="chunked").eval()
    x = tokens(2, 7)
    want = lm(x)
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint(ckpt, lm, step=3, model_spec=ModelSpec("NSTMLM", lm.config))
    hf = H.from_nstm_checkpoint(ckpt)
    assert isinstance(hf, H.NSTMForCausalLM) and not hf.training
    assert hf.config.to_nstm_config() == lm.config
    assert torch.equal(hf(x).logits, want)
    assert torch.equal(H.NSTMForCausalLM.from_nstm(lm)(x).logits, want)
    assert H.NSTMForCausalLM.from_nstm(lm).to_nstm() is not lm
    back_path = H.to_nstm_checkpoint(hf, str(tmp_path / "back.pt"))
    back = load_model(back_path).eval()
    assert type(back) is NSTMLM and back.config == lm.config
    assert torch.equal(back(x), want)
    # and through save_pretrained in between
    hf.save_pretrained(tmp_path / "hf")
    again = H.to_nstm_checkpoint(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), str(tmp_path / "again.pt"))
    assert torch.equal(load_model(again).eval()(x), want)


def test_conversions_refuse_what_they_cannot_convert(tmp_path):
    clf = NSTMClassifier(3, vocab_size=V, d_model=16, n_layers=1, num_heads=2, num_states=8, top_k=2)
    path = str(tmp_path / "clf.pt")
    save_checkpoint(path, clf, model_spec=ModelSpec("NSTMClassifier", clf.config,
                                                    dict(num_classes=3, input_dim=None, pool="mean")))
    with pytest.raises(ValueError, match="NSTMClassifier"):
        H.from_nstm_checkpoint(path)
    bare = str(tmp_path / "bare.pt")
    save_checkpoint(bare, NSTMLM(V, d_model=16, n_layers=1, num_heads=2, num_states=8, top_k=2))
    with pytest.raises(CheckpointError, match="does not describe its model"):
        H.from_nstm_checkpoint(bare)
    with pytest.raises(CheckpointError, match="not found"):
        H.from_nstm_checkpoint(str(tmp_path / "missing.pt"))
    with pytest.raises(TypeError, match="NSTMLM"):
        H.NSTMForCausalLM.from_nstm(clf)
    with pytest.raises(TypeError, match="NSTMForCausalLM"):
        H.to_nstm_checkpoint(clf, str(tmp_path / "x.pt"))
    pruned = NSTMLM(V, d_model=16, n_layers=1, num_heads=2, num_states=8, top_k=2)
    with torch.no_grad():
        pruned.blocks[0].mixer.states.iota[:, :3] = -10.0
    pruned.prune_states(0.5)
    with pytest.raises(ValueError, match="pruned"):
        H.NSTMForCausalLM.from_nstm(pruned)


# ---- bad inputs ---------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors():
    model = tiny()
    x = tokens(2, 6)
    holes = torch.ones_like(x)
    holes[0, 2] = 0
    with pytest.raises(ValueError, match="contiguous"):
        model(x, attention_mask=holes)
    with pytest.raises(ValueError, match="no token in row"):
        model(x, attention_mask=torch.tensor([[1] * 6, [0] * 6]))
    with pytest.raises(ValueError, match="shape"):
        model(x, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="4D masks"):
        model(x, attention_mask=torch.ones(2, 1, 6, 6))
    with pytest.raises(ValueError, match="only 0"):
        model(x, attention_mask=torch.full_like(x, 2))
    with pytest.raises(ValueError, match="input_ids"):
        model(x.float())
    with pytest.raises(ValueError, match="input_ids"):
        model()
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        model(torch.full((1, 3), V))
    with pytest.raises(ValueError, match="labels"):
        model(x, labels=x[:, :3])
    with pytest.raises(ValueError, match="labels"):
        model(x, labels=torch.full_like(x, V))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(x, inputs_embeds=torch.zeros(2, 6, 16))
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(x, output_hidden_states=True)
    with pytest.raises(TypeError, match="NSTMCache"):
        model(x, past_key_values=DynamicCache())
    cache = model(x).past_key_values
    with pytest.raises(ValueError, match="batch 2"):
        model(x[:1], past_key_values=cache)
    with pytest.raises(NotImplementedError, match="rolled back"):
        cache.crop(-1)
    with pytest.raises(TypeError, match="recurrent"):
        cache.update(None, None, 0)
