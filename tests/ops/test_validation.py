"""Bad input gets a clear error (spec §3), and no call changes its inputs.

The public functions ``nstm_attention``, ``nstm_attention_with_maps``, ``nstm_step``,
``sparse_route`` and ``state_attention`` share their checks, so the mistakes are tables: one row per
(function, argument, mistake), with an id that says which (``attention-q-int64``,
``step-top_k=0``). Every row checks the exception type (ValueError for shapes, ranges and devices;
TypeError for wrong types), that the message names the argument at fault (and, for a wrong shape,
shows the shape it got), and that the failed call left the caller's tensors as they were. A
second device is simulated with the "meta" device, so all of this runs on CPU in a few seconds.
"""
from __future__ import annotations

import math
import re
from typing import Callable, NamedTuple, Optional

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
# arguments
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


class Api(NamedTuple):
    """A public function, its valid arguments, and the layouts of its tensor arguments."""
    id: str
    fn: Callable
    args: Callable[[], dict]
    layout: dict

    def __repr__(self):
        return self.id


ATTN = Api("attention", nstm_attention, attention_args, ATTN_LAYOUT)
MAPS = Api("attention_with_maps", nstm_attention_with_maps, attention_args, ATTN_LAYOUT)
STEP = Api("step", nstm_step, step_args, STEP_LAYOUT)
ROUTE = Api("route", sparse_route, route_args, ROUTE_LAYOUT)
SA = Api("state_attention", state_attention, sa_args, SA_LAYOUT)


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


# ----------------------------------------------------------------------------------------------
# the table of mistakes: one row per (function, argument, mistake)
# ----------------------------------------------------------------------------------------------

class Bad(NamedTuple):
    """``over(args)``: the arguments to replace; ``shows``: the argument whose wrong shape the
    message must show (None: no such check)."""
    api: Api
    over: Callable[[dict], dict]
    exc: type
    pattern: str
    shows: Optional[str] = None


def bad(id_, api, over, exc, pattern, shows=None):
    return pytest.param(Bad(api, over, exc, pattern, shows), id=f"{api.id}-{id_}")


def bad_tensor(id_, api, name, make, exc, rest):
    """``name`` set to ``make(args)``: the message begins with ``name`` (and shows a wrong shape)."""
    shows = name if exc is ValueError and "must have shape" in rest else None
    return bad(id_, api, lambda args: {name: make(args)}, exc, named(name, rest), shows)


def bad_value(api, name, value, exc, pattern, id_=None):
    """``name`` set to the plain value ``value`` (or ``value()`` when it is a maker)."""
    return bad(id_ or f"{name}={value!r}", api,
               lambda args: {name: value() if callable(value) else value}, exc, pattern)


def not_a_tensor(api):
    return [bad_tensor(f"{n}-list", api, n, lambda a, n=n: get(a, n).tolist(), TypeError,
                       " must be a torch\\.Tensor") for n in api.layout]


def integer_dtype(api):
    return [bad_tensor(f"{n}-{str(dt).split('.')[1]}", api, n, lambda a, n=n, dt=dt: get(a, n).to(dt),
                       TypeError, " must be a floating tensor")
            for n in api.layout for dt in INT_DTYPES]


def change_rank(t: torch.Tensor, how: str) -> torch.Tensor:
    """Drop the first dim, add a trailing one, or (``seq``) insert a T = 1 dim: [B, 1, H, *]."""
    return {"drop": lambda: t[0], "add": lambda: t.unsqueeze(-1), "seq": lambda: t.unsqueeze(1)}[how]()


def wrong_rank(api, names, hows=("drop", "add"), rest=None):
    return [bad_tensor(f"{n}-rank-{how}", api, n, lambda a, n=n, how=how: change_rank(get(a, n), how),
                       ValueError, rest or rf" must have shape \[.*\] \({len(api.layout[n])} dims\)")
            for n in names for how in hows]


def bumped(api, pairs, rest=" must have shape"):
    """(name, dim) pairs: ``name`` with dim ``dim`` one too large."""
    return [bad_tensor(f"{n}-{d}+1", api, n, lambda a, n=n, d=d: rand(api.layout[n], bump=d), ValueError,
                       rest) for n, d in pairs]


def other_device(api, names, pattern=None):
    return [bad(f"{n}-meta", api, lambda a, n=n: {n: get(a, n).to("meta")}, ValueError,
                pattern(n) if pattern else rf"\b{re.escape(n)} is on meta\b.*same device")
            for n in names]


S2S_BAD_SHAPES = [("s2s.w_q", (H + 1, V, V), "w_q-H"), ("s2s.w_q", (H, V + 1, V), "w_q-V_in"),
                  ("s2s.w_q", (H, V, V + 1), "w_q-V_out"), ("s2s.w_k", (H, V + 1, V), "w_k-V"),
                  ("s2s.w_k", (H + 1, V, V), "w_k-H")]
GATE_BAD_SHAPES = [(H + 1,), (H, 1), (1, H), ()]


def s2s_shapes(api):
    return ([bad_tensor(f"s2s-{i}", api, n, lambda a, shape=shape: torch.randn(shape), ValueError,
                        r" must have shape \[H, V, V\]") for n, shape, i in S2S_BAD_SHAPES]
            + [bad_tensor(f"s2s.gate-shape{shape}", api, "s2s.gate", lambda a, shape=shape: torch.randn(shape),
                          ValueError, r" must have shape \[H\]") for shape in GATE_BAD_SHAPES])


def s2s_types(api, makers):
    return [bad_value(api, "s2s", make, TypeError, r"^s2s must be an S2SParams", id_=f"s2s-{i}")
            for i, make in makers.items()]


def state_cases(api, st):
    """The initial state (``initial_state`` / ``state``): type, K and V shapes, position."""
    makers = {"tuple": lambda: tuple(make_state()), "dict": lambda: make_state()._asdict(),
              "S2SParams": make_s2s, "tensor": lambda: rand("BHSK")}
    neg = {"initial_state": -1, "state": -5}[st]
    return ([bad_value(api, st, make, TypeError, rf"^{st} must be an NSTMState", id_=f"{st}-{i}")
             for i, make in makers.items()]
            + bumped(api, [(f"{st}.k", d) for d in "BHSK"], r" must have shape \[B, H, S, K\]")
            + bumped(api, [(f"{st}.v", d) for d in "BHSV"], r" must have shape \[B, H, S, V\]")
            + [bad_value(api, f"{st}.pos", neg, ValueError, rf"^{st}\.pos must be >= 0, got {neg}")]
            + [bad_value(api, f"{st}.pos", p, TypeError, rf"^{st}\.pos must be an int", id_=f"{st}.pos-{i}")
               for p, i in [(3.0, "float"), (True, "bool"), ("3", "str"), (None, "None"),
                            (lambda: torch.tensor(3), "tensor")]])


NOT_INTS = [(2.0, "float"), (True, "True"), (False, "False"), ("2", "str"), (None, "None")]


def top_k_cases(api):
    return ([bad_value(api, "top_k", k, ValueError, rf"^top_k must be in \[1, {S}\], got {k}")
             for k in (0, -1, S + 1, 100)]
            + [bad_value(api, "top_k", k, TypeError, r"^top_k must be an int", id_=f"top_k-{i}")
               for k, i in NOT_INTS])


def comm_every_cases(api):
    return ([bad_value(api, "comm_every", c, ValueError, rf"^comm_every must be >= 1, got {c}")
             for c in (0, -2)]
            + [bad_value(api, "comm_every", c, TypeError, r"^comm_every must be an int", id_=f"comm_every-{i}")
               for c, i in NOT_INTS])


def scale_cases(api):
    return ([bad_value(api, "scale", s, ValueError, r"^scale must be a finite positive number")
             for s in (0, 0.0, -0.5, math.nan, math.inf, -math.inf)]
            + [bad_value(api, "scale", s, TypeError, r"^scale must be a float or None", id_=f"scale-{i}")
               for s, i in [("0.5", "str"), (True, "bool"), ([0.5], "list")]])


BAD_BACKENDS = ["bogus", "Triton", "CHUNKED", "naive", ""]
BAD_ENV_BACKENDS = ["bogus", "Triton", "naive"]


def backend_cases(api):
    return [bad_value(api, "backend", b, ValueError, r"^backend must be one of .*'chunked'.*" + repr(b))
            for b in BAD_BACKENDS]


QKV5 = ("q", "k", "v", "route_logits", "write_gate")


def empty_t(a):
    return {n: a[n][:, :0] for n in QKV5}


BAD_INPUTS = [
    # ---- nstm_attention
    *not_a_tensor(ATTN),
    *integer_dtype(ATTN),
    *wrong_rank(ATTN, [n for n in ATTN_LAYOUT if n != "s2s.gate"]),
    *bumped(ATTN, [("k", d) for d in "BTHK"] + [(n, d) for n in ("v", "route_logits", "write_gate")
                                               for d in "BTH"]),
    *[bad_tensor(f"{n}-float64", ATTN, n, lambda a, n=n: a[n].double(), TypeError,
                 " has dtype torch.float64 but q has torch.float32") for n in ("k", "v")],
    *other_device(ATTN, ATTN_LAYOUT),
    bad("T=0", ATTN, empty_t, ValueError, r"every dimension must be >= 1, got T = 0"),
    *top_k_cases(ATTN),
    *comm_every_cases(ATTN),
    *s2s_types(ATTN, {"tuple": lambda: tuple(make_s2s()), "list": lambda: list(make_s2s()),
                      "NSTMState": make_state, "str": lambda: "s2s", "tensor": lambda: rand("HVV")}),
    *s2s_shapes(ATTN),
    *state_cases(ATTN, "initial_state"),
    *scale_cases(ATTN),
    *[bad_value(ATTN, "output_final_state", f, TypeError, r"^output_final_state must be a bool",
                id_=f"output_final_state-{i}") for f, i in [(1, "1"), (0, "0"), ("True", "str"), (None, "None")]],
    *backend_cases(ATTN),
    # ---- nstm_attention_with_maps resolves backends the same way (it used to ignore an unknown name)
    bad_value(MAPS, "backend", "bogus", ValueError, r"^backend must be one of .*'bogus'"),
    # ---- nstm_step
    *not_a_tensor(STEP),
    *integer_dtype(STEP),
    *wrong_rank(STEP, [n for n in STEP_LAYOUT if n != "s2s.gate"]),
    *wrong_rank(STEP, QKV5, hows=("seq",)),                 # the [B, 1, H, *] form
    *bumped(STEP, [("k", d) for d in "BHK"] + [(n, d) for n in ("v", "route_logits", "write_gate")
                                              for d in "BH"]),
    *[bad_tensor(f"{n}-float16", STEP, n, lambda a, n=n: a[n].to(torch.float16), TypeError,
                 " has dtype torch.float16 but q has torch.float32") for n in ("k", "v")],
    *other_device(STEP, STEP_LAYOUT),
    *top_k_cases(STEP),
    *comm_every_cases(STEP),
    *s2s_types(STEP, {"tuple": lambda: tuple(make_s2s()), "NSTMState": make_state, "str": lambda: "s2s"}),
    *s2s_shapes(STEP),
    *state_cases(STEP, "state"),
    *scale_cases(STEP),
    *backend_cases(STEP),
    # ---- sparse_route: route_logits may have any leading dims; write_gate must have exactly those
    *not_a_tensor(ROUTE),
    *integer_dtype(ROUTE),
    *wrong_rank(ROUTE, ["write_gate"], rest=r" must have shape \[B, T, H\] \(3 dims\)"),
    bad("route_logits-scalar", ROUTE, lambda a: {"route_logits": torch.tensor(1.0), "write_gate": torch.tensor(0.0),
                                                 "top_k": 1},
        ValueError, r"^route_logits must have shape \[B, T, H, S\]"),
    *bumped(ROUTE, [("write_gate", d) for d in "BTH"]),
    bad("S=0", ROUTE, lambda a: {"route_logits": a["route_logits"][..., :0], "top_k": 1}, ValueError,
        r"^route_logits must have at least one slot"),
    *other_device(ROUTE, ROUTE_LAYOUT),
    *top_k_cases(ROUTE),
    *backend_cases(ROUTE),
    # ---- state_attention
    *not_a_tensor(SA),
    *integer_dtype(SA),
    *wrong_rank(SA, [n for n in SA_LAYOUT if n != "s2s.gate"]),
    bad("S=0", SA, lambda a: {"v_state": a["v_state"][:, :, :0]}, ValueError,
        r"^v_state: every dimension must be >= 1, got S = 0"),
    bad("V=0", SA, lambda a: {"v_state": a["v_state"][..., :0]}, ValueError,
        r"^v_state: every dimension must be >= 1, got V = 0"),
    *s2s_types(SA, {"None": lambda: None, "tuple": lambda: tuple(make_s2s()), "NSTMState": make_state,
                    "dict": lambda: make_s2s()._asdict()}),
    *s2s_shapes(SA),
    # v_state's H or V disagrees with the s2s weights: the message names the weights (they are
    # checked against v_state's H and V)
    *[bad(f"v_state-{d}+1", SA, lambda a, d=d: {"v_state": rand("BHSV", bump=d)}, ValueError,
          r"^s2s\.w_q must have shape \[H, V, V\]") for d in "HV"],
    # the message names both tensors: the one on meta, and v_state (there is no q here)
    *other_device(SA, SA_LAYOUT, lambda n: (r"is on cpu but v_state is on meta" if n == "v_state" else
                                            rf"^{re.escape(n)} is on meta but v_state is on cpu") + ".*same device"),
    *backend_cases(SA),
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(case):
    args = case.api.args()
    snap = snapshot(args)                  # the caller's valid tensors
    over = case.over(args)
    with pytest.raises(case.exc, match=case.pattern) as info:
        call(case.api.fn, args, **over)
    if case.shows is not None:
        assert shape_str(over[case.shows]) in str(info.value), "the message should show the shape it got"
    assert_unchanged(snap)


@pytest.mark.parametrize("api,backend,pattern", [
    *[pytest.param(api, b, r"^NSTM_BACKEND must be one of .*'chunked'.*" + repr(b), id=f"{api.id}-{b}")
      for api in (ATTN, STEP, ROUTE, SA) for b in BAD_ENV_BACKENDS],
    pytest.param(MAPS, "bogus", r"^NSTM_BACKEND must be one of .*'bogus'", id="attention_with_maps-bogus"),
])
def test_unknown_backend_env(monkeypatch, api, backend, pattern):
    monkeypatch.setenv("NSTM_BACKEND", backend)
    with pytest.raises(ValueError, match=pattern):
        call(api.fn, api.args())


# ----------------------------------------------------------------------------------------------
# no call changes its inputs, the bad arguments included
# ----------------------------------------------------------------------------------------------

FAILED_CALLS = [
    (ATTN, [{"top_k": S + 1}, {"scale": -1.0}, {"output_final_state": 1}, {"backend": "bogus"},
            {"initial_state.pos": -1}, {"comm_every": 0}, {"write_gate": rand("BTH", bump="H")},
            {"s2s.gate": torch.randn(H + 1)}]),
    (STEP, [{"top_k": 0}, {"scale": math.nan}, {"backend": "bogus"}, {"state.pos": 1.0},
            {"comm_every": 2.0}, {"state.v": rand("BHSV", bump="V")}, {"s2s": tuple(make_s2s())}]),
    (ROUTE, [{"top_k": S + 1}, {"top_k": 1.0}, {"backend": "bogus"}, {"write_gate": rand("BTH", bump="T")}]),
    (SA, [{"backend": "bogus"}, {"s2s.gate": torch.randn(H, 1)}, {"s2s.w_k": rand("HVV").to(torch.int64)}]),
]


def _failed_id(api, over):
    name, value = next(iter(over.items()))
    return f"{api.id}-{name}" + (f"={value!r}" if name == "top_k" else "")


@pytest.mark.parametrize("api,over", [pytest.param(api, over, id=_failed_id(api, over))
                                      for api, overs in FAILED_CALLS for over in overs])
def test_failed_call_leaves_inputs_unchanged(api, over):
    args = api.args()
    for name, value in over.items():
        args = put(args, name, value)
    snap = snapshot(args)                  # the bad tensor too
    with pytest.raises((ValueError, TypeError)):
        api.fn(**args)
    assert_unchanged(snap)


def _attention_result(args, out):
    o, final = out
    assert o.shape == (B, T, H, V) and final.pos == POS + T and args["initial_state"].pos == POS
    assert final.k.data_ptr() != args["initial_state"].k.data_ptr()
    assert final.v.data_ptr() != args["initial_state"].v.data_ptr()


def _step_result(args, out):
    o, new = out
    assert o.shape == (B, H, V) and new.pos == POS + 1 and args["state"].pos == POS
    assert new.k.data_ptr() != args["state"].k.data_ptr()
    assert new.v.data_ptr() != args["state"].v.data_ptr()


def _route_result(args, out):
    idx, w = out
    assert idx.shape == w.shape == (B, T, H, TOP_K)


def _sa_result(args, out):
    assert out.shape == (B, H, S, V) and out.dtype == args["v_state"].dtype
    assert out.data_ptr() != args["v_state"].data_ptr()


SUCCESS = [(ATTN, _attention_result, [torch.float32]), (STEP, _step_result, [torch.float32]),
           (ROUTE, _route_result, [torch.float32]),
           (SA, _sa_result, [torch.float32, torch.float64, torch.bfloat16])]


@pytest.mark.parametrize("api,check,backend,dtype", [
    pytest.param(api, check, backend, dtype,
                 id=f"{api.id}-{backend}" + (f"-{str(dtype).split('.')[1]}" if len(dtypes) > 1 else ""))
    for api, check, dtypes in SUCCESS for backend in (None, "reference", "chunked") for dtype in dtypes])
def test_success_does_not_modify_inputs(api, check, backend, dtype):
    args = api.args()
    args["backend"] = backend
    if api is SA:
        args["v_state"] = args["v_state"].to(dtype)
    snap = snapshot(args)          # every tensor: the state and the s2s weights included
    out = api.fn(**args)
    assert_unchanged(snap)
    check(args, out)
