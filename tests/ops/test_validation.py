"""Bad input gets a clear error (spec §3), and no call changes its inputs.

One test per public function per kind of mistake, for ``nstm_attention``, ``nstm_step``,
``sparse_route``, ``state_attention`` and for the backend choice (``backend=`` and
``NSTM_BACKEND``). Every test checks the exception type (ValueError for shapes, ranges and
devices; TypeError for wrong types) and that the message names the argument at fault. A second
device is simulated with the "meta" device, so all of this runs on CPU in a few seconds.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from nstm_kernels import (
    NSTMState,
    S2SParams,
    nstm_attention,
    nstm_attention_with_maps,
    nstm_step,
    sparse_route,
    state_attention,
)

B, T, H, K, V, S = 2, 5, 3, 4, 6, 7      # all different, so that any mix-up shows
TOP_K = 2
POS = 3                                 # with comm_every=2 the s2s step runs inside these calls
SIZES = dict(B=B, T=T, H=H, K=K, V=V, S=S)
INT_DTYPES = [torch.int64, torch.int32, torch.bool]

# layouts (one letter per dim) of every tensor argument, per function; dotted names are fields
S2S_LAYOUT = {"s2s.w_q": "HVV", "s2s.w_k": "HVV", "s2s.gate": "H"}
ATTN_LAYOUT = {"q": "BTHK", "k": "BTHK", "v": "BTHV", "route_logits": "BTHS", "write_gate": "BTH",
               "initial_state.k": "BHSK", "initial_state.v": "BHSV", **S2S_LAYOUT}
STEP_LAYOUT = {"q": "BHK", "k": "BHK", "v": "BHV", "route_logits": "BHS", "write_gate": "BH",
               "state.k": "BHSK", "state.v": "BHSV", **S2S_LAYOUT}
ROUTE_LAYOUT = {"route_logits": "BTHS", "write_gate": "BTH"}
SA_LAYOUT = {"v_state": "BHSV", **S2S_LAYOUT}


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("NSTM_BACKEND", raising=False)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

_gen = torch.Generator().manual_seed(0)


def rand(layout: str, dtype=torch.float32, bump: str = "") -> torch.Tensor:
    """A random tensor of ``layout``; the first dim named ``bump`` is one too large."""
    shape = [SIZES[d] for d in layout]
    if bump:
        shape[layout.index(bump)] += 1
    return torch.randn(*shape, generator=_gen, dtype=dtype)


def make_s2s() -> S2SParams:
    return S2SParams(rand("HVV") * 0.3, rand("HVV") * 0.3, rand("H"))


def make_state() -> NSTMState:
    return NSTMState(rand("BHSK"), rand("BHSV"), POS)


def attention_args() -> dict:
    return dict(q=rand("BTHK"), k=rand("BTHK"), v=rand("BTHV"), route_logits=rand("BTHS"),
                write_gate=rand("BTH"), top_k=TOP_K, s2s=make_s2s(), comm_every=2,
                initial_state=make_state(), output_final_state=True, scale=None, backend=None)


def step_args() -> dict:
    return dict(q=rand("BHK"), k=rand("BHK"), v=rand("BHV"), route_logits=rand("BHS"),
                write_gate=rand("BH"), top_k=TOP_K, s2s=make_s2s(), comm_every=2,
                state=make_state(), scale=None, backend=None)


def route_args() -> dict:
    return dict(route_logits=rand("BTHS"), write_gate=rand("BTH"), top_k=TOP_K, backend=None)


def sa_args() -> dict:
    return dict(v_state=rand("BHSV"), s2s=make_s2s(), backend=None)


def get(args: dict, name: str):
    if "." in name:
        parent, field = name.split(".")
        return getattr(args[parent], field)
    return args[name]


def put(args: dict, name: str, value) -> dict:
    """``args`` with ``name`` (possibly ``parent.field`` of a NamedTuple) replaced by ``value``."""
    args = dict(args)
    if "." in name:
        parent, field = name.split(".")
        args[parent] = args[parent]._replace(**{field: value})
    else:
        args[name] = value
    return args


def call(fn, args: dict, **over):
    for name, value in over.items():
        args = put(args, name, value)
    return fn(**args)


def shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def named(name: str, rest: str) -> str:
    """A pattern for a message that begins with the argument's name."""
    return "^" + re.escape(name) + rest


def expect_bad_tensor(fn, args, name, bad, exc, rest):
    """``fn`` with ``name`` set to ``bad`` raises ``exc`` naming ``name`` (and the bad shape)."""
    with pytest.raises(exc, match=named(name, rest)) as info:
        call(fn, args, **{name: bad})
    if exc is ValueError and isinstance(bad, torch.Tensor) and "must have shape" in rest:
        assert shape_str(bad) in str(info.value), "the message should show the shape it got"


def tensors_in(args: dict) -> dict:
    out = {}
    for name, val in args.items():
        if isinstance(val, torch.Tensor):
            out[name] = val
        elif isinstance(val, (NSTMState, S2SParams)):
            for field in val._fields:
                x = getattr(val, field)
                if isinstance(x, torch.Tensor):
                    out[f"{name}.{field}"] = x
    return out


def snapshot(args: dict) -> dict:
    return {n: (t, t.detach().clone(), t.data_ptr(), t._version)
            for n, t in tensors_in(args).items()}


def assert_unchanged(snap: dict) -> None:
    for name, (t, copy, ptr, version) in snap.items():
        assert t.data_ptr() == ptr, f"{name}: storage was replaced"
        assert t._version == version, f"{name} was modified in place"
        assert torch.equal(t, copy), f"{name}: values changed"


# the tensor arguments of each function, and typical mistakes, as parameter lists
ATTN_TENSORS = list(ATTN_LAYOUT)
STEP_TENSORS = list(STEP_LAYOUT)
NOT_INTS = [2.0, True, False, "2", None]
NOT_INTS_IDS = ["float", "True", "False", "str", "None"]
BAD_BACKENDS = ["bogus", "Triton", "CHUNKED", "naive", ""]
BAD_ENV_BACKENDS = ["bogus", "Triton", "naive"]
S2S_BAD_SHAPES = [("s2s.w_q", (H + 1, V, V)), ("s2s.w_q", (H, V + 1, V)),
                  ("s2s.w_q", (H, V, V + 1)), ("s2s.w_k", (H, V + 1, V)),
                  ("s2s.w_k", (H + 1, V, V))]
S2S_BAD_SHAPE_IDS = ["w_q-H", "w_q-V_in", "w_q-V_out", "w_k-V", "w_k-H"]
GATE_BAD_SHAPES = [(H + 1,), (H, 1), (1, H), ()]


def rank_cases(names):
    """(name, how) pairs: drop the first dim, or add a trailing one."""
    return [(n, how) for n in names for how in ("drop", "add")]


def change_rank(t: torch.Tensor, how: str) -> torch.Tensor:
    return t[0] if how == "drop" else t.unsqueeze(-1)


# ----------------------------------------------------------------------------------------------
# nstm_attention
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ATTN_TENSORS)
def test_attention_not_a_tensor(name):
    args = attention_args()
    expect_bad_tensor(nstm_attention, args, name, get(args, name).tolist(), TypeError,
                      " must be a torch\\.Tensor")


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("name", ATTN_TENSORS)
def test_attention_integer_dtype(name, dtype):
    args = attention_args()
    expect_bad_tensor(nstm_attention, args, name, get(args, name).to(dtype), TypeError,
                      " must be a floating tensor")


@pytest.mark.parametrize("name,how", rank_cases([n for n in ATTN_TENSORS if n != "s2s.gate"]))
def test_attention_wrong_rank(name, how):
    args = attention_args()
    expect_bad_tensor(nstm_attention, args, name, change_rank(get(args, name), how), ValueError,
                      rf" must have shape \[.*\] \({len(ATTN_LAYOUT[name])} dims\)")


@pytest.mark.parametrize("name,dim", [("k", d) for d in "BTHK"] + [("v", d) for d in "BTH"]
                         + [("route_logits", d) for d in "BTH"]
                         + [("write_gate", d) for d in "BTH"])
def test_attention_shape_disagreement(name, dim):
    args = attention_args()
    expect_bad_tensor(nstm_attention, args, name, rand(ATTN_LAYOUT[name], bump=dim), ValueError,
                      " must have shape")


@pytest.mark.parametrize("name", ["k", "v"])
def test_attention_qkv_dtype_mismatch(name):
    args = attention_args()
    expect_bad_tensor(nstm_attention, args, name, get(args, name).double(), TypeError,
                      " has dtype torch.float64 but q has torch.float32")


@pytest.mark.parametrize("name", ATTN_TENSORS)
def test_attention_different_devices(name):
    args = attention_args()
    with pytest.raises(ValueError, match=rf"\b{re.escape(name)} is on meta\b.*same device"):
        call(nstm_attention, args, **{name: get(args, name).to("meta")})


def test_attention_empty_dimension():
    args = attention_args()
    for name, layout in list(ATTN_LAYOUT.items())[:5]:       # q, k, v, route_logits, write_gate
        args = put(args, name, rand(layout)[:, :0])
    with pytest.raises(ValueError, match=r"every dimension must be >= 1, got T = 0"):
        nstm_attention(**args)


@pytest.mark.parametrize("top_k", [0, -1])
def test_attention_top_k_too_small(top_k):
    with pytest.raises(ValueError, match=rf"^top_k must be in \[1, {S}\], got {top_k}"):
        call(nstm_attention, attention_args(), top_k=top_k)


@pytest.mark.parametrize("top_k", [S + 1, 100])
def test_attention_top_k_larger_than_num_slots(top_k):
    with pytest.raises(ValueError, match=rf"^top_k must be in \[1, {S}\], got {top_k}"):
        call(nstm_attention, attention_args(), top_k=top_k)


@pytest.mark.parametrize("top_k", NOT_INTS, ids=NOT_INTS_IDS)
def test_attention_top_k_not_int(top_k):
    with pytest.raises(TypeError, match=r"^top_k must be an int"):
        call(nstm_attention, attention_args(), top_k=top_k)


@pytest.mark.parametrize("comm_every", [0, -2])
def test_attention_comm_every_not_positive(comm_every):
    with pytest.raises(ValueError, match=rf"^comm_every must be >= 1, got {comm_every}"):
        call(nstm_attention, attention_args(), comm_every=comm_every)


@pytest.mark.parametrize("comm_every", NOT_INTS, ids=NOT_INTS_IDS)
def test_attention_comm_every_not_int(comm_every):
    with pytest.raises(TypeError, match=r"^comm_every must be an int"):
        call(nstm_attention, attention_args(), comm_every=comm_every)


@pytest.mark.parametrize("make", [lambda: tuple(make_s2s()), lambda: list(make_s2s()), make_state,
                                  lambda: "s2s", lambda: rand("HVV")],
                         ids=["tuple", "list", "NSTMState", "str", "tensor"])
def test_attention_s2s_wrong_type(make):
    with pytest.raises(TypeError, match=r"^s2s must be an S2SParams"):
        call(nstm_attention, attention_args(), s2s=make())


@pytest.mark.parametrize("name,shape", S2S_BAD_SHAPES, ids=S2S_BAD_SHAPE_IDS)
def test_attention_s2s_wrong_weight_shape(name, shape):
    expect_bad_tensor(nstm_attention, attention_args(), name, torch.randn(shape), ValueError,
                      r" must have shape \[H, V, V\]")


@pytest.mark.parametrize("shape", GATE_BAD_SHAPES, ids=str)
def test_attention_s2s_wrong_gate_shape(shape):
    expect_bad_tensor(nstm_attention, attention_args(), "s2s.gate", torch.randn(shape), ValueError,
                      r" must have shape \[H\]")


@pytest.mark.parametrize("make", [lambda: tuple(make_state()), lambda: make_state()._asdict(),
                                  make_s2s, lambda: rand("BHSK")],
                         ids=["tuple", "dict", "S2SParams", "tensor"])
def test_attention_initial_state_wrong_type(make):
    with pytest.raises(TypeError, match=r"^initial_state must be an NSTMState"):
        call(nstm_attention, attention_args(), initial_state=make())


@pytest.mark.parametrize("dim", "BHSK")
def test_attention_initial_state_wrong_k_shape(dim):
    expect_bad_tensor(nstm_attention, attention_args(), "initial_state.k", rand("BHSK", bump=dim),
                      ValueError, r" must have shape \[B, H, S, K\]")


@pytest.mark.parametrize("dim", "BHSV")
def test_attention_initial_state_wrong_v_shape(dim):
    expect_bad_tensor(nstm_attention, attention_args(), "initial_state.v", rand("BHSV", bump=dim),
                      ValueError, r" must have shape \[B, H, S, V\]")


def test_attention_initial_state_negative_pos():
    with pytest.raises(ValueError, match=r"^initial_state\.pos must be >= 0, got -1"):
        call(nstm_attention, attention_args(), **{"initial_state.pos": -1})


@pytest.mark.parametrize("pos", [3.0, True, "3", None, torch.tensor(3)],
                         ids=["float", "bool", "str", "None", "tensor"])
def test_attention_initial_state_pos_not_int(pos):
    with pytest.raises(TypeError, match=r"^initial_state\.pos must be an int"):
        call(nstm_attention, attention_args(), **{"initial_state.pos": pos})


@pytest.mark.parametrize("scale", [0, 0.0, -0.5])
def test_attention_scale_not_positive(scale):
    with pytest.raises(ValueError, match=r"^scale must be a finite positive number"):
        call(nstm_attention, attention_args(), scale=scale)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_attention_scale_not_finite(scale):
    with pytest.raises(ValueError, match=r"^scale must be a finite positive number"):
        call(nstm_attention, attention_args(), scale=scale)


@pytest.mark.parametrize("scale", ["0.5", True, [0.5]], ids=["str", "bool", "list"])
def test_attention_scale_wrong_type(scale):
    with pytest.raises(TypeError, match=r"^scale must be a float or None"):
        call(nstm_attention, attention_args(), scale=scale)


@pytest.mark.parametrize("flag", [1, 0, "True", None], ids=["1", "0", "str", "None"])
def test_attention_output_final_state_not_bool(flag):
    with pytest.raises(TypeError, match=r"^output_final_state must be a bool"):
        call(nstm_attention, attention_args(), output_final_state=flag)


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_attention_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"^backend must be one of .*'chunked'.*" + repr(backend)):
        call(nstm_attention, attention_args(), backend=backend)


@pytest.mark.parametrize("backend", BAD_ENV_BACKENDS)
def test_attention_unknown_backend_env(monkeypatch, backend):
    monkeypatch.setenv("NSTM_BACKEND", backend)
    with pytest.raises(ValueError,
                       match=r"^NSTM_BACKEND must be one of .*'chunked'.*" + repr(backend)):
        call(nstm_attention, attention_args())


# nstm_attention_with_maps (the attention op that also returns the maps) resolves backends the
# same way; it used to ignore an unknown name
def test_attention_with_maps_unknown_backend():
    with pytest.raises(ValueError, match=r"^backend must be one of .*'bogus'"):
        call(nstm_attention_with_maps, attention_args(), backend="bogus")


def test_attention_with_maps_unknown_backend_env(monkeypatch):
    monkeypatch.setenv("NSTM_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"^NSTM_BACKEND must be one of .*'bogus'"):
        call(nstm_attention_with_maps, attention_args())


FAILURES_ATTN = [{"top_k": S + 1}, {"scale": -1.0}, {"output_final_state": 1}, {"backend": "bogus"},
                 {"initial_state.pos": -1}, {"comm_every": 0},
                 {"write_gate": rand("BTH", bump="H")}, {"s2s.gate": torch.randn(H + 1)}]


@pytest.mark.parametrize("over", FAILURES_ATTN, ids=lambda o: next(iter(o)))
def test_attention_failed_call_leaves_inputs_unchanged(over):
    args = attention_args()
    for name, value in over.items():
        args = put(args, name, value)
    snap = snapshot(args)
    with pytest.raises((ValueError, TypeError)):
        nstm_attention(**args)
    assert_unchanged(snap)


@pytest.mark.parametrize("backend", [None, "reference", "chunked"])
def test_attention_success_does_not_modify_inputs(backend):
    args = attention_args()
    args["backend"] = backend
    snap = snapshot(args)
    o, final = nstm_attention(**args)
    assert_unchanged(snap)
    assert o.shape == (B, T, H, V) and final.pos == POS + T and args["initial_state"].pos == POS
    assert final.k.data_ptr() != args["initial_state"].k.data_ptr()
    assert final.v.data_ptr() != args["initial_state"].v.data_ptr()


# ----------------------------------------------------------------------------------------------
# nstm_step
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", STEP_TENSORS)
def test_step_not_a_tensor(name):
    args = step_args()
    expect_bad_tensor(nstm_step, args, name, get(args, name).tolist(), TypeError,
                      " must be a torch\\.Tensor")


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("name", STEP_TENSORS)
def test_step_integer_dtype(name, dtype):
    args = step_args()
    expect_bad_tensor(nstm_step, args, name, get(args, name).to(dtype), TypeError,
                      " must be a floating tensor")


@pytest.mark.parametrize("name,how", rank_cases([n for n in STEP_TENSORS if n != "s2s.gate"])
                         + [(n, "seq") for n in ("q", "k", "v", "route_logits", "write_gate")])
def test_step_wrong_rank(name, how):
    args = step_args()
    t = get(args, name)
    bad = t.unsqueeze(1) if how == "seq" else change_rank(t, how)   # "seq": the [B, 1, H, *] form
    expect_bad_tensor(nstm_step, args, name, bad, ValueError,
                      rf" must have shape \[.*\] \({len(STEP_LAYOUT[name])} dims\)")


@pytest.mark.parametrize("name,dim", [("k", d) for d in "BHK"] + [("v", d) for d in "BH"]
                         + [("route_logits", d) for d in "BH"] + [("write_gate", d) for d in "BH"])
def test_step_shape_disagreement(name, dim):
    args = step_args()
    expect_bad_tensor(nstm_step, args, name, rand(STEP_LAYOUT[name], bump=dim), ValueError,
                      " must have shape")


@pytest.mark.parametrize("name", ["k", "v"])
def test_step_qkv_dtype_mismatch(name):
    args = step_args()
    expect_bad_tensor(nstm_step, args, name, get(args, name).to(torch.float16), TypeError,
                      " has dtype torch.float16 but q has torch.float32")


@pytest.mark.parametrize("name", STEP_TENSORS)
def test_step_different_devices(name):
    args = step_args()
    with pytest.raises(ValueError, match=rf"\b{re.escape(name)} is on meta\b.*same device"):
        call(nstm_step, args, **{name: get(args, name).to("meta")})


@pytest.mark.parametrize("top_k", [0, -1])
def test_step_top_k_too_small(top_k):
    with pytest.raises(ValueError, match=rf"^top_k must be in \[1, {S}\], got {top_k}"):
        call(nstm_step, step_args(), top_k=top_k)


@pytest.mark.parametrize("top_k", [S + 1, 100])
def test_step_top_k_larger_than_num_slots(top_k):
    with pytest.raises(ValueError, match=rf"^top_k must be in \[1, {S}\], got {top_k}"):
        call(nstm_step, step_args(), top_k=top_k)


@pytest.mark.parametrize("top_k", NOT_INTS, ids=NOT_INTS_IDS)
def test_step_top_k_not_int(top_k):
    with pytest.raises(TypeError, match=r"^top_k must be an int"):
        call(nstm_step, step_args(), top_k=top_k)


@pytest.mark.parametrize("comm_every", [0, -2])
def test_step_comm_every_not_positive(comm_every):
    with pytest.raises(ValueError, match=rf"^comm_every must be >= 1, got {comm_every}"):
        call(nstm_step, step_args(), comm_every=comm_every)


@pytest.mark.parametrize("comm_every", NOT_INTS, ids=NOT_INTS_IDS)
def test_step_comm_every_not_int(comm_every):
    with pytest.raises(TypeError, match=r"^comm_every must be an int"):
        call(nstm_step, step_args(), comm_every=comm_every)


@pytest.mark.parametrize("make", [lambda: tuple(make_s2s()), make_state, lambda: "s2s"],
                         ids=["tuple", "NSTMState", "str"])
def test_step_s2s_wrong_type(make):
    with pytest.raises(TypeError, match=r"^s2s must be an S2SParams"):
        call(nstm_step, step_args(), s2s=make())


@pytest.mark.parametrize("name,shape", S2S_BAD_SHAPES, ids=S2S_BAD_SHAPE_IDS)
def test_step_s2s_wrong_weight_shape(name, shape):
    expect_bad_tensor(nstm_step, step_args(), name, torch.randn(shape), ValueError,
                      r" must have shape \[H, V, V\]")


@pytest.mark.parametrize("shape", GATE_BAD_SHAPES, ids=str)
def test_step_s2s_wrong_gate_shape(shape):
    expect_bad_tensor(nstm_step, step_args(), "s2s.gate", torch.randn(shape), ValueError,
                      r" must have shape \[H\]")


@pytest.mark.parametrize("make", [lambda: tuple(make_state()), lambda: make_state()._asdict(),
                                  make_s2s, lambda: rand("BHSK")],
                         ids=["tuple", "dict", "S2SParams", "tensor"])
def test_step_state_wrong_type(make):
    with pytest.raises(TypeError, match=r"^state must be an NSTMState"):
        call(nstm_step, step_args(), state=make())


@pytest.mark.parametrize("dim", "BHSK")
def test_step_state_wrong_k_shape(dim):
    expect_bad_tensor(nstm_step, step_args(), "state.k", rand("BHSK", bump=dim), ValueError,
                      r" must have shape \[B, H, S, K\]")


@pytest.mark.parametrize("dim", "BHSV")
def test_step_state_wrong_v_shape(dim):
    expect_bad_tensor(nstm_step, step_args(), "state.v", rand("BHSV", bump=dim), ValueError,
                      r" must have shape \[B, H, S, V\]")


def test_step_state_negative_pos():
    with pytest.raises(ValueError, match=r"^state\.pos must be >= 0, got -5"):
        call(nstm_step, step_args(), **{"state.pos": -5})


@pytest.mark.parametrize("pos", [3.0, True, "3", None, torch.tensor(3)],
                         ids=["float", "bool", "str", "None", "tensor"])
def test_step_state_pos_not_int(pos):
    with pytest.raises(TypeError, match=r"^state\.pos must be an int"):
        call(nstm_step, step_args(), **{"state.pos": pos})


@pytest.mark.parametrize("scale", [0, 0.0, -0.5])
def test_step_scale_not_positive(scale):
    with pytest.raises(ValueError, match=r"^scale must be a finite positive number"):
        call(nstm_step, step_args(), scale=scale)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_step_scale_not_finite(scale):
    with pytest.raises(ValueError, match=r"^scale must be a finite positive number"):
        call(nstm_step, step_args(), scale=scale)


@pytest.mark.parametrize("scale", ["0.5", True, [0.5]], ids=["str", "bool", "list"])
def test_step_scale_wrong_type(scale):
    with pytest.raises(TypeError, match=r"^scale must be a float or None"):
        call(nstm_step, step_args(), scale=scale)


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_step_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"^backend must be one of .*'chunked'.*" + repr(backend)):
        call(nstm_step, step_args(), backend=backend)


@pytest.mark.parametrize("backend", BAD_ENV_BACKENDS)
def test_step_unknown_backend_env(monkeypatch, backend):
    monkeypatch.setenv("NSTM_BACKEND", backend)
    with pytest.raises(ValueError,
                       match=r"^NSTM_BACKEND must be one of .*'chunked'.*" + repr(backend)):
        call(nstm_step, step_args())


FAILURES_STEP = [{"top_k": 0}, {"scale": math.nan}, {"backend": "bogus"}, {"state.pos": 1.0},
                 {"comm_every": 2.0}, {"state.v": rand("BHSV", bump="V")},
                 {"s2s": tuple(make_s2s())}]


@pytest.mark.parametrize("over", FAILURES_STEP, ids=lambda o: next(iter(o)))
def test_step_failed_call_leaves_inputs_unchanged(over):
    args = step_args()
    for name, value in over.items():
        args = put(args, name, value)
    snap = snapshot(args)
    with pytest.raises((ValueError, TypeError)):
        nstm_step(**args)
    assert_unchanged(snap)


@pytest.mark.parametrize("backend", [None, "reference", "chunked"])
def test_step_success_does_not_modify_inputs(backend):
    args = step_args()
    args["backend"] = backend
    snap = snapshot(args)          # includes state.k, state.v and the s2s weights
    o, new = nstm_step(**args)
    assert_unchanged(snap)
    assert o.shape == (B, H, V) and new.pos == POS + 1 and args["state"].pos == POS
    assert new.k.data_ptr() != args["state"].k.data_ptr()
    assert new.v.data_ptr() != args["state"].v.data_ptr()


# ----------------------------------------------------------------------------------------------
# sparse_route
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ROUTE_LAYOUT))
def test_route_not_a_tensor(name):
    args = route_args()
    expect_bad_tensor(sparse_route, args, name, get(args, name).tolist(), TypeError,
                      " must be a torch\\.Tensor")


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ROUTE_LAYOUT))
def test_route_integer_dtype(name, dtype):
    args = route_args()
    expect_bad_tensor(sparse_route, args, name, get(args, name).to(dtype), TypeError,
                      " must be a floating tensor")


@pytest.mark.parametrize("how", ["drop", "add"])
def test_route_wrong_rank_write_gate(how):
    # route_logits may have any leading dims; write_gate must have exactly those
    args = route_args()
    expect_bad_tensor(sparse_route, args, "write_gate", change_rank(args["write_gate"], how),
                      ValueError, r" must have shape \[B, T, H\] \(3 dims\)")


def test_route_wrong_rank_route_logits_scalar():
    with pytest.raises(ValueError, match=r"^route_logits must have shape \[B, T, H, S\]"):
        sparse_route(torch.tensor(1.0), torch.tensor(0.0), 1)


@pytest.mark.parametrize("dim", "BTH")
def test_route_shape_disagreement(dim):
    expect_bad_tensor(sparse_route, route_args(), "write_gate", rand("BTH", bump=dim), ValueError,
                      " must have shape")


def test_route_no_slots():
    with pytest.raises(ValueError, match=r"^route_logits must have at least one slot"):
        sparse_route(rand("BTHS")[..., :0], rand("BTH"), 1)


@pytest.mark.parametrize("name", list(ROUTE_LAYOUT))
def test_route_different_devices(name):
    args = route_args()
    with pytest.raises(ValueError, match=rf"\b{re.escape(name)} is on meta\b.*same device"):
        call(sparse_route, args, **{name: get(args, name).to("meta")})


@pytest.mark.parametrize("top_k", [0, -1])
def test_route_top_k_too_small(top_k):
    with pytest.raises(ValueError, match=rf"^top_k must be in \[1, {S}\], got {top_k}"):
        call(sparse_route, route_args(), top_k=top_k)


@pytest.mark.parametrize("top_k", [S + 1, 100])
def test_route_top_k_larger_than_num_slots(top_k):
    with pytest.raises(ValueError, match=rf"^top_k must be in \[1, {S}\], got {top_k}"):
        call(sparse_route, route_args(), top_k=top_k)


@pytest.mark.parametrize("top_k", NOT_INTS, ids=NOT_INTS_IDS)
def test_route_top_k_not_int(top_k):
    with pytest.raises(TypeError, match=r"^top_k must be an int"):
        call(sparse_route, route_args(), top_k=top_k)


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_route_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"^backend must be one of .*'chunked'.*" + repr(backend)):
        call(sparse_route, route_args(), backend=backend)


@pytest.mark.parametrize("backend", BAD_ENV_BACKENDS)
def test_route_unknown_backend_env(monkeypatch, backend):
    monkeypatch.setenv("NSTM_BACKEND", backend)
    with pytest.raises(ValueError,
                       match=r"^NSTM_BACKEND must be one of .*'chunked'.*" + repr(backend)):
        call(sparse_route, route_args())


@pytest.mark.parametrize("over", [{"top_k": S + 1}, {"top_k": 1.0}, {"backend": "bogus"},
                                  {"write_gate": rand("BTH", bump="T")}],
                         ids=lambda o: next(iter(o)))
def test_route_failed_call_leaves_inputs_unchanged(over):
    args = route_args()
    for name, value in over.items():
        args = put(args, name, value)
    snap = snapshot(args)
    with pytest.raises((ValueError, TypeError)):
        sparse_route(**args)
    assert_unchanged(snap)


@pytest.mark.parametrize("backend", [None, "reference", "chunked"])
def test_route_success_does_not_modify_inputs(backend):
    args = route_args()
    args["backend"] = backend
    snap = snapshot(args)
    idx, w = sparse_route(**args)
    assert_unchanged(snap)
    assert idx.shape == w.shape == (B, T, H, TOP_K)


# ----------------------------------------------------------------------------------------------
# state_attention
# ----------------------------------------------------------------------------------------------

SA_TENSORS = list(SA_LAYOUT)


@pytest.mark.parametrize("name", SA_TENSORS)
def test_state_attention_not_a_tensor(name):
    args = sa_args()
    expect_bad_tensor(state_attention, args, name, get(args, name).tolist(), TypeError,
                      " must be a torch\\.Tensor")


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("name", SA_TENSORS)
def test_state_attention_integer_dtype(name, dtype):
    args = sa_args()
    expect_bad_tensor(state_attention, args, name, get(args, name).to(dtype), TypeError,
                      " must be a floating tensor")


@pytest.mark.parametrize("name,how", rank_cases([n for n in SA_TENSORS if n != "s2s.gate"]))
def test_state_attention_wrong_rank(name, how):
    args = sa_args()
    expect_bad_tensor(state_attention, args, name, change_rank(get(args, name), how), ValueError,
                      rf" must have shape \[.*\] \({len(SA_LAYOUT[name])} dims\)")


@pytest.mark.parametrize("dim", "SV")
def test_state_attention_empty_dimension(dim):
    bad = rand("BHSV")[:, :, :0] if dim == "S" else rand("BHSV")[..., :0]
    with pytest.raises(ValueError, match=rf"^v_state: every dimension must be >= 1, got {dim} = 0"):
        call(state_attention, sa_args(), v_state=bad)


@pytest.mark.parametrize("make", [lambda: None, lambda: tuple(make_s2s()), make_state,
                                  lambda: make_s2s()._asdict()],
                         ids=["None", "tuple", "NSTMState", "dict"])
def test_state_attention_s2s_wrong_type(make):
    with pytest.raises(TypeError, match=r"^s2s must be an S2SParams"):
        call(state_attention, sa_args(), s2s=make())


@pytest.mark.parametrize("name,shape", S2S_BAD_SHAPES, ids=S2S_BAD_SHAPE_IDS)
def test_state_attention_s2s_wrong_weight_shape(name, shape):
    expect_bad_tensor(state_attention, sa_args(), name, torch.randn(shape), ValueError,
                      r" must have shape \[H, V, V\]")


@pytest.mark.parametrize("shape", GATE_BAD_SHAPES, ids=str)
def test_state_attention_s2s_wrong_gate_shape(shape):
    expect_bad_tensor(state_attention, sa_args(), "s2s.gate", torch.randn(shape), ValueError,
                      r" must have shape \[H\]")


@pytest.mark.parametrize("dim", "HV")
def test_state_attention_shape_disagreement(dim):
    # v_state's H or V disagrees with the s2s weights: the message names the weights (they are
    # checked against v_state's H and V) and shows both shapes
    with pytest.raises(ValueError, match=r"^s2s\.w_q must have shape \[H, V, V\]"):
        call(state_attention, sa_args(), v_state=rand("BHSV", bump=dim))


@pytest.mark.parametrize("name", SA_TENSORS)
def test_state_attention_different_devices(name):
    # the message names both tensors: the one on meta, and v_state (there is no q here)
    args = sa_args()
    pattern = (r"is on cpu but v_state is on meta" if name == "v_state"
               else rf"^{re.escape(name)} is on meta but v_state is on cpu")
    with pytest.raises(ValueError, match=pattern + ".*same device"):
        call(state_attention, args, **{name: get(args, name).to("meta")})


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_state_attention_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"^backend must be one of .*'chunked'.*" + repr(backend)):
        call(state_attention, sa_args(), backend=backend)


@pytest.mark.parametrize("backend", BAD_ENV_BACKENDS)
def test_state_attention_unknown_backend_env(monkeypatch, backend):
    monkeypatch.setenv("NSTM_BACKEND", backend)
    with pytest.raises(ValueError,
                       match=r"^NSTM_BACKEND must be one of .*'chunked'.*" + repr(backend)):
        call(state_attention, sa_args())


@pytest.mark.parametrize("over", [{"backend": "bogus"}, {"s2s.gate": torch.randn(H, 1)},
                                  {"s2s.w_k": rand("HVV").to(torch.int64)}],
                         ids=lambda o: next(iter(o)))
def test_state_attention_failed_call_leaves_inputs_unchanged(over):
    args = sa_args()
    for name, value in over.items():
        args = put(args, name, value)
    snap = snapshot(args)
    with pytest.raises((ValueError, TypeError)):
        state_attention(**args)
    assert_unchanged(snap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", [None, "reference", "chunked"])
def test_state_attention_success_does_not_modify_inputs(backend, dtype):
    args = sa_args()
    args["v_state"] = args["v_state"].to(dtype)
    args["backend"] = backend
    snap = snapshot(args)
    out = state_attention(**args)
    assert_unchanged(snap)
    assert out.shape == (B, H, S, V) and out.dtype == dtype
    assert out.data_ptr() != args["v_state"].data_ptr()
