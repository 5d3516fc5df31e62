"""Generation at constant memory: prefill + step decode, the static in-place decoder, CUDA graphs,
and the state size over a 1M-token stream.

(``generate`` == greedy full forwards for the plain path is in test_layer.py; here the other paths
are held to it.)
"""
from __future__ import annotations

import time

import pytest
import torch

from nstm import NSTMLM
from nstm.decode import StaticDecoder
from nstm_kernels import nstm_step_
from nstm_kernels.chunked import recurrent_nstm_step
from tests.helpers import REPO_ROOT, as_step, make_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def small_lm(**kw):
    args = dict(vocab_size=30, d_model=32, n_layers=2, num_heads=2, num_states=8, top_k=2,
                comm_every=3)
    args.update(kw)
    return NSTMLM(**args).eval()


def greedy_by_full_forwards(model, prompt, n):
    cur = prompt
    for _ in range(n):
        cur = torch.cat([cur, model(cur)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return cur


@pytest.mark.parametrize("conv_size,use_s2s", [(4, True), (0, True), (4, False)])
def test_generate_paths_equal_greedy_full_forwards(conv_size, use_s2s):
    torch.manual_seed(4)
    model = small_lm(conv_size=conv_size, use_s2s=use_s2s)
    with torch.no_grad():                       # open the s2s gates so that the period ends matter
        for b in model.blocks:
            if b.mixer.s2s is not None:
                b.mixer.s2s.gate.fill_(0.8)
    prompt = torch.randint(0, 30, (2, 7))
    want = greedy_by_full_forwards(model, prompt, 12)
    assert torch.equal(model.generate(prompt, 12, greedy=True, prefill_chunk=3), want)
    assert torch.equal(model.generate(prompt, 12, greedy=True, cuda_graph=True), want)


def test_generate_cuda_graph_on_cpu_falls_back_with_one_warning(caplog):
    import nstm.decode as dec
    dec._warned.clear()
    torch.manual_seed(5)
    model = small_lm(n_layers=1)
    prompt = torch.randint(0, 30, (3, 4))
    with caplog.at_level("WARNING", logger="nstm"):
        a = model.generate(prompt, 6, temperature=0.8, sample_top_k=5, cuda_graph=True,
                           generator=torch.Generator().manual_seed(1))
        model.generate(prompt, 2, greedy=True, cuda_graph=True)
    b = model.generate(prompt, 6, temperature=0.8, sample_top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert len([r for r in caplog.records if "cuda_graph=True needs CUDA" in r.getMessage()]) == 1
    with pytest.raises(TypeError, match="cuda_graph"):
        model.generate(prompt, 2, cuda_graph=1)


def test_static_decoder_equals_functional_step_bit_for_bit():
    torch.manual_seed(6)
    model = small_lm()
    with torch.no_grad():
        for b in model.blocks:
            b.mixer.s2s.gate.fill_(0.5)
    logits, state = model.prefill(torch.randint(0, 30, (2, 5)))
    dec = model.static_decoder(state)
    size0 = dec.state_bytes()
    tok = logits.argmax(-1)
    for _ in range(14):                          # several period ends (C = 3)
        l1, state = model.step(tok, state)
        l2 = dec.step(tok)
        assert torch.equal(l1, l2)
        tok = l1.argmax(-1)
    assert dec.state_bytes() == size0
    for a, b in zip(state, dec.export()):
        assert torch.equal(a.op.k, b.op.k) and torch.equal(a.op.v, b.op.v) and a.op.pos == b.op.pos
        assert torch.equal(a.conv, b.conv)
    with pytest.raises(ValueError, match="tokens must have shape"):
        dec.step(torch.zeros(3, dtype=torch.long))


def test_static_decoder_with_a_position_tensor_equals_functional_step():
    """The graph-capturable form (position read from a tensor, period ends decided by torch.where),
    run eagerly on the CPU: the same logits as model.step."""
    torch.manual_seed(12)
    model = small_lm()
    with torch.no_grad():
        for b in model.blocks:
            b.mixer.s2s.gate.fill_(0.5)
    logits, state = model.prefill(torch.randint(0, 30, (2, 4)))
    dec = model.static_decoder(state)
    tok = logits.argmax(-1)
    with torch.no_grad():
        for _ in range(9):
            l1, state = model.step(tok, state)
            l2 = dec._forward(tok, dec.pos_t)       # what the captured graph runs
            dec.pos_t.add_(1)
            torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-6)
            tok = l1.argmax(-1)
    assert int(dec.pos_t) == state[0].op.pos == 13


def test_prefill_in_pieces_equals_one_pass():
    torch.manual_seed(7)
    model = small_lm()
    idx = torch.randint(0, 30, (2, 23))
    full_logits = model(idx)[:, -1]
    l1, s1 = model.prefill(idx)
    l2, s2 = model.prefill(idx, chunk_size=5)
    torch.testing.assert_close(l1, full_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    for a, b in zip(s1, s2):
        torch.testing.assert_close(a.op.v, b.op.v, rtol=1e-5, atol=1e-5)
        assert a.op.pos == b.op.pos == 23
    with pytest.raises(ValueError, match="chunk_size"):
        model.prefill(idx, chunk_size=0)


@pytest.mark.parametrize("pos", [3, torch.tensor([3])])
@pytest.mark.parametrize("impl", ["pytorch", "chunked"])
def test_in_place_torch_step_equals_recurrent_step(pos, impl):
    """The in-place step equals the functional one bit for bit: the PyTorch pair, and the chunked
    backend's pair (the C++ kernel on CPU tensors)."""
    from nstm_kernels import nstm_step
    from nstm_kernels.chunked import recurrent_nstm_step_
    inp = as_step(make_inputs(B=2, T=1, H=2, K=8, V=8, S=6, dtype=torch.float32, pos=3))
    args = (*inp[:5], 2, inp.s2s, 4)
    sk, sv = inp.initial_state.k.clone(), inp.initial_state.v.clone()
    if impl == "pytorch":
        o = recurrent_nstm_step_(*args, sk, sv, pos)            # pos 3 ends a period (C = 4)
        eo, es = recurrent_nstm_step(*args, inp.initial_state)
    else:
        o = nstm_step_(*args, sk, sv, pos, backend="chunked")
        eo, es = nstm_step(*args, inp.initial_state, backend="chunked")
    torch.testing.assert_close(o, eo, rtol=0, atol=0)
    torch.testing.assert_close(sv, es.v, rtol=0, atol=0)
    torch.testing.assert_close(sk, es.k, rtol=0, atol=0)


def test_step_decode_keeps_the_state_size():
    """2,000 tokens through model.step and through the static decoder: the same bytes throughout."""
    torch.manual_seed(8)
    model = NSTMLM(32, d_model=16, n_layers=1, num_heads=2, num_states=4, top_k=2, comm_every=64).eval()
    state = model.init_state(2)
    size0 = model.state_bytes(state)
    dec = StaticDecoder(model, state)
    dsize0 = dec.state_bytes()
    tok = torch.zeros(2, dtype=torch.long)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(2000):
            logits, state = model.step(tok, state)
            tok = logits.argmax(-1)
            assert model.state_bytes(state) == size0
        for _ in range(2000):
            tok = dec.step(tok).argmax(-1)
    finally:
        torch.set_num_threads(threads)
    assert state[0].op.pos == 2000
    assert dec.state_bytes() == dsize0 and dec.pos == 2000
    assert model.state_bytes(dec.export()) == size0


@pytest.mark.slow
def test_one_million_token_stream_keeps_the_state_size():
    """A 1,000,000-token stream through forward(state=..., return_state=True) in 64K pieces: the
    state is the same size at the start and the end (CPU, one thread, ~15 s on 2 cores)."""
    torch.manual_seed(9)
    model = NSTMLM(32, d_model=16, n_layers=1, num_heads=2, num_states=4, top_k=2, comm_every=64).eval()
    state = model.init_state(1)
    size0 = model.state_bytes(state)
    piece, total = 65536, 1_000_000
    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # tiny matrices: threads only add overhead (and contention)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            done = 0
            while done < total:
                n = min(piece, total - done)
                idx = torch.randint(0, 32, (1, n))
                logits, state, _ = model(idx, state=state, return_state=True)
                done += n
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start
    assert state[0].op.pos == total
    assert model.state_bytes(state) == size0
    assert torch.isfinite(logits).all() and torch.isfinite(state[0].op.v).all()
    print(f"1M-token stream: {elapsed:.1f} s ({total / elapsed:,.0f} tokens/s), state {size0} bytes")


# ------------------------------------------------------------------------------------------ GPU
def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, "cuda"])
def test_cuda_graph_generate_equals_eager_on_gpu(backend):
    _gpu()
    torch.manual_seed(10)
    model = NSTMLM(100, d_model=64, n_layers=2, num_heads=2, num_states=16, top_k=4, comm_every=5,
                   backend=backend).cuda().eval()
    with torch.no_grad():
        for b in model.blocks:
            b.mixer.s2s.gate.fill_(0.5)
    prompt = torch.randint(0, 100, (3, 9), device="cuda")
    eager = model.generate(prompt, 40, greedy=True)
    graph = model.generate(prompt, 40, greedy=True, cuda_graph=True)
    assert torch.equal(eager, graph)
    assert torch.equal(eager, greedy_by_full_forwards(model, prompt, 40))


@pytest.mark.gpu
def test_static_decoder_graph_state_matches_eager_on_gpu():
    _gpu()
    torch.manual_seed(11)
    model = NSTMLM(50, d_model=64, n_layers=2, num_heads=4, num_states=16, top_k=4,
                   comm_every=4).cuda().eval()
    logits, state = model.prefill(torch.randint(0, 50, (2, 6), device="cuda"))
    a = model.static_decoder(state, cuda_graph=True)
    b = model.static_decoder(state, cuda_graph=False)
    tok = logits.argmax(-1)
    for _ in range(20):
        la = a.step(tok).clone()
        lb = b.step(tok)
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
        tok = lb.argmax(-1)
    for x, y in zip(a.export(), b.export()):
        torch.testing.assert_close(x.op.v, y.op.v, rtol=1e-4, atol=1e-4)
        assert x.op.pos == y.op.pos == 26


@pytest.mark.slow
def test_models_bench_quick_smoke(tmp_path):
    """bench/models.py --quick: the CPU smoke run writes its JSON/MD with device and commit in
    every row, NSTM's state the same size at every context."""
    import json
    import os

    mod = _bench_models_module()
    threads = torch.get_num_threads()
    try:
        rows, meta, stem = mod.main(["--quick", "--no-progress", "--no-plot", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(open(stem + ".json").read())
    assert data["rows"] and all(r["device"] and r["commit"] for r in data["rows"])
    assert data["meta"]["partial"] is False and "partial" not in open(stem + ".md").read()
    nstm = [r for r in rows if r["section"] == "decode" and r["model"] == "nstm"]
    assert nstm and all(r["status"] == "ok" for r in nstm)
    assert len({r["state_bytes_per_seq"] for r in nstm if r["mode"] == "step"}) == 1
    assert {r["section"] for r in rows} == {"decode", "train"}
    assert os.path.exists(stem + ".md")


def _bench_models_module():
    import importlib.util
    import os

    path = os.path.join(REPO_ROOT, "bench", "models.py")
    spec = importlib.util.spec_from_file_location("bench_models_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_models_bench_sizes():
    """--size issue runs the GPU's 12 x 768 models on the CPU (fp32, 2 threads, KV cache up to
    12 GiB); the CPU default stays small; --quick refuses the issue size."""
    mod = _bench_models_module()
    cpu_issue = mod.pick_config("cpu", size="issue")
    assert cpu_issue["model"] == mod.GPU_CFG["model"] and cpu_issue["model"]["d_model"] == 768
    assert cpu_issue["model"]["n_layers"] == 12 and cpu_issue["dtype"] == "float32"
    assert cpu_issue["size"] == "issue" and cpu_issue["threads"] == 2
    assert mod.pick_config("cpu")["model"]["d_model"] == 64
    assert mod.pick_config("cuda")["model"]["d_model"] == 768
    assert mod.pick_config("cuda", size="small")["size"] == "small"
    with pytest.raises(ValueError, match="cannot be combined"):
        mod.pick_config("cpu", quick=True, size="issue")
    with pytest.raises(ValueError, match="size must be"):
        mod.pick_config("cpu", size="large")


def test_models_bench_cpu_summary_lists_this_models_numbers_only():
    """The CPU summary lists NSTM's best decode tokens/s per batch and each training row, for this
    model on this machine (no share of a target set for another model on another device); failed
    rows are left out."""
    mod = _bench_models_module()
    dec = [dict(model="nstm", batch=1, status="ok", tokens_per_s=10.0),
           dict(model="nstm", batch=1, status="ok", tokens_per_s=12.0),
           dict(model="transformer", batch=1, status="ok", tokens_per_s=99.0),
           dict(model="nstm", batch=64, status="OOM")]
    tr = [dict(model="nstm", T=2048, batch=1, status="ok", tokens_per_s=1500.0),
          dict(model="transformer", T=2048, batch=1, status="ok", tokens_per_s=2000.0)]
    lines = mod.cpu_summary(dec, tr, dict(size="issue", device="cpu X", threads=2, commit="abc",
                                          nstm_params=123_456))
    text = "\n".join(lines)
    assert "12 x 768" in text and "123,456 parameters" in text
    assert "15,000" not in text and "target" not in text and "%" not in text
    assert "| decode | batch 1, best over contexts and modes | 12 |" in text
    assert "batch 64" not in text and "99" not in text
    assert "| training | T = 2,048, batch 1 | 1,500 |" in text
