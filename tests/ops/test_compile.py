"""torch.compile: the operator is a registered custom op with a fake implementation, so a model that
calls ``nstm_attention`` compiles with ``fullgraph=True`` and gives the eager results, values and
gradients."""
import pytest
import torch

from nstm import NSTMLM
from nstm_kernels import nstm_attention
from nstm_kernels.compile import attention_op
from tests.helpers import grad_leaves, make_inputs

B, T, H, K, V, S = 2, 37, 2, 8, 8, 8


def _inputs(dtype=torch.float32, s2s=True, state=True, seed=0):
    """Leaf inputs that take gradients; logits without a gap and s2s gates ~ N(0, 1)."""
    return make_inputs(B=B, T=T, H=H, K=K, V=V, S=S, dtype=dtype, s2s=s2s, state=state, pos=5,
                       gap=False, s2s_gate=None, seed=seed, requires_grad=True)


def _leaves(ins):
    return [t for _, t in grad_leaves(ins)]


def _loss(ins, final):
    o, st = nstm_attention(ins.q * 1.5, ins.k, ins.v, ins.route_logits, ins.write_gate, 3, ins.s2s, 16,
                           ins.initial_state, final)
    loss = o.sin().sum()
    if final:
        loss = loss + 0.1 * st.v.square().sum() + 0.01 * st.k.sum()
    return loss


@pytest.mark.parametrize("s2s,state,final", [(True, True, True), (False, False, False),
                                             (True, False, True)])
def test_compiled_operator_matches_eager(s2s, state, final):
    torch._dynamo.reset()
    ins = _inputs(s2s=s2s, state=state)
    leaves = _leaves(ins)
    eager = _loss(ins, final)
    g_eager = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(_loss, fullgraph=True, backend="aot_eager")
    got = compiled(ins, final)
    g_got = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_got, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_custom_op_passes_opcheck():
    ins = _inputs(s2s=True, state=True, seed=1)
    st, s2s = ins.initial_state, ins.s2s
    args = (*ins[:5], st.k, st.v, *s2s, 3, 16, 5, K ** -0.5, "chunked")
    torch.library.opcheck(attention_op, args)
    no_opt = (*ins[:5], None, None, None, None, None, 2, 7, 0, 0.3, "chunked")
    torch.library.opcheck(attention_op, no_opt)


def test_custom_op_backward_equals_backend_autograd():
    """The op's backward (a recompute) gives the gradients the backend's own autograd gives."""
    ins = _inputs(dtype=torch.float64, seed=2)
    st, s2s = ins.initial_state, ins.s2s
    o, fk, fv = attention_op(*ins[:5], st.k, st.v, *s2s, 3, 16, st.pos, K ** -0.5, "chunked")
    want_o, want_st = nstm_attention(*ins[:5], 3, s2s, 16, st, True)
    torch.testing.assert_close(o, want_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fv, want_st.v, rtol=1e-12, atol=1e-12)
    leaves = _leaves(ins)
    w = torch.randn_like(o)
    got = torch.autograd.grad((o * w).sum() + fk.sum() + fv.square().sum(), leaves)
    want = torch.autograd.grad((want_o * w).sum() + want_st.k.sum() + want_st.v.square().sum(),
                               leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _small_lm():
    torch.manual_seed(0)
    return NSTMLM(50, d_model=32, n_layers=1, num_heads=2, num_states=8, top_k=2, comm_every=8)


def test_compiled_model_training_step_matches_eager():
    """A training forward + backward of a whole model, one graph (aot_eager: fast to build)."""
    torch._dynamo.reset()
    model = _small_lm().train()
    x = torch.randint(0, 50, (2, 24))
    eager = model(x).logsumexp(-1).mean()
    eager.backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(x).logsumexp(-1).mean()
    got.backward()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for a, p in zip(g_eager, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager():
    """Inductor generates code for everything around the op (eval forward, the inference use)."""
    torch._dynamo.reset()
    model = _small_lm().eval()
    x = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        eager = model(x)
        got = torch.compile(model, fullgraph=True, backend="inductor")(x)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)
