"""Forward-mode divergence equals the reverse-mode reference: values, divergence, gradients.

The reference is today's path: ``net(t, z)`` then :mod:`polyreg_cnf.engine.trace`'s
vector-Jacobian products with ``create_graph=True``, differentiated once more.
"""

import itertools

import pytest
import torch
from torch import nn

from polyreg_cnf.engine import forward_divergence as fd
from polyreg_cnf.engine.amortized import AmortizedODENet
from polyreg_cnf.engine.forward_divergence import (
    DERIVATIVES,
    compiled_field_and_divergence,
    field_and_divergence,
    supports_forward_divergence,
)
from polyreg_cnf.engine.nets import LAYER_TYPES, NONLINEARITIES, ODENet
from polyreg_cnf.engine.trace import divergence_exact, divergence_hutchinson, sample_probe

D, B = 3, 5
# (net kind, layer type): the amortized net has concat layers only.
NETS = [("odenet", layer) for layer in LAYER_TYPES] + [("amortized", "concat")]
CASES = [(kind, layer, nl, trace) for (kind, layer), nl, trace
         in itertools.product(NETS, NONLINEARITIES, ("exact", "hutchinson"))]


def make(kind, layer, nonlinearity, dtype=torch.float64, seed=0):
    """A small net, its inputs (t and z requiring grad), a probe or None, and a context."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "odenet":
        net, context = ODENet(D, (7, 6), layer, nonlinearity).to(dtype), None
    else:
        net = AmortizedODENet(D, (7, 6), rank=2, nonlinearity=nonlinearity).to(dtype)
        context = torch.randn(B, net.context_size, generator=gen, dtype=dtype,
                              requires_grad=True)
    # Non-trivial biases and gates, so every branch of a nonlinearity (relu/elu's both sides,
    # softplus far from 0) is exercised.
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    z = torch.randn(B, D, generator=gen, dtype=dtype, requires_grad=True)
    t = torch.tensor(0.37, dtype=dtype, requires_grad=True)
    return net, t, z, context


def reference(net, t, z, probe, context):
    f = net(t, z) if context is None else net(t, z, context)
    div = (divergence_exact(f, z, create_graph=True) if probe is None
           else divergence_hutchinson(f, z, probe, create_graph=True))
    return f, div


def loss_of(f, div):
    # Weighted so that a wrong sign or a swapped coordinate changes every gradient.
    w = torch.linspace(-1.0, 2.0, f.numel(), dtype=f.dtype).reshape(f.shape)
    return (f * w).sum() + (div * torch.arange(1, div.shape[0] + 1, dtype=div.dtype)).sum() \
        + div.square().sum()


def inputs_of(net, t, z, context):
    return [*net.parameters(), t, z] + ([] if context is None else [context])


@pytest.mark.parametrize(("kind", "layer", "nonlinearity", "trace"), CASES)
def test_equals_the_reverse_mode_reference(kind, layer, nonlinearity, trace):
    net, t, z, context = make(kind, layer, nonlinearity)
    probe = None if trace == "exact" else sample_probe(z)
    assert supports_forward_divergence(net)
    f_ref, div_ref = reference(net, t, z, probe, context)
    f, div = field_and_divergence(net, t, z, probe=probe, context=context)
    assert torch.equal(f, f_ref)  # same operations in the same order
    torch.testing.assert_close(div, div_ref, rtol=1e-12, atol=1e-12)
    wrt = inputs_of(net, t, z, context)
    grads_ref = torch.autograd.grad(loss_of(f_ref, div_ref), wrt)
    grads = torch.autograd.grad(loss_of(f, div), wrt)
    for name, g, g_ref in zip(range(len(wrt)), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-11, msg=f"gradient {name}")


@pytest.mark.parametrize(("kind", "layer"), NETS)
@pytest.mark.parametrize("nonlinearity", list(NONLINEARITIES))
def test_exact_trace_equals_the_trace_of_jacrev(kind, layer, nonlinearity):
    """Independent of trace.py: the trace of the Jacobian from torch.func.jacrev."""
    net, t, z, context = make(kind, layer, nonlinearity, seed=1)
    z = z.detach()

    def one(zb, cb):
        args = (t, zb[None]) if cb is None else (t, zb[None], cb[None])
        return net(*args)[0]

    jac = torch.func.vmap(torch.func.jacrev(one), in_dims=(0, None if context is None else 0))(
        z, None if context is None else context.detach())
    _, div = field_and_divergence(net, t, z, probe=None,
                                  context=None if context is None else context.detach())
    torch.testing.assert_close(div, torch.diagonal(jac, dim1=1, dim2=2).sum(-1), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("act_class", list(DERIVATIVES))
def test_closed_form_derivative_equals_autograd(act_class):
    act = act_class()
    # Both sides of 0, 0 itself, and beyond softplus's linearisation threshold.
    a = torch.cat([torch.linspace(-30.0, 30.0, 601, dtype=torch.float64),
                   torch.tensor([0.0], dtype=torch.float64)]).requires_grad_(True)
    y = act(a)
    (expected,) = torch.autograd.grad(y.sum(), a)
    value, derivative = DERIVATIVES[act_class]
    assert torch.equal(value(a), y)
    torch.testing.assert_close(derivative(a.detach(), y.detach()), expected, rtol=0, atol=3e-9)


def test_a_wrong_derivative_is_caught(monkeypatch):
    """The equality test can fail: tanh' taken as 1 - y instead of 1 - y^2 breaks it."""
    monkeypatch.setitem(DERIVATIVES, nn.Tanh, (torch.tanh, lambda a, y: 1 - y))
    net, t, z, _ = make("odenet", "concat", "tanh")
    _, div_ref = reference(net, t, z, None, None)
    _, div = field_and_divergence(net, t, z, probe=None)
    assert not torch.allclose(div, div_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("kind", ["odenet", "amortized"])
def test_gradcheck(kind, trace):
    net, t, z, context = make(kind, "concatsquash" if kind == "odenet" else "concat", "swish")
    probe = None if trace == "exact" else sample_probe(z)
    first = net.layers[0].linear if kind == "odenet" else net.layers[0]
    weight = first.weight.detach().clone().requires_grad_(True)
    del first.weight  # a plain tensor attribute instead: gradcheck's input reaches the net

    def fn(t, z, w, *ctx):
        first.weight = w
        return field_and_divergence(net, t, z, probe=probe, context=ctx[0] if ctx else None)

    args = (t, z, weight)
    args += () if context is None else (context,)
    assert torch.autograd.gradcheck(fn, args)


def test_no_grad_and_z_without_grad():
    net, t, z, _ = make("odenet", "concat", "tanh", dtype=torch.float32)
    probe = sample_probe(z)
    with torch.no_grad():
        f, div = field_and_divergence(net, t, z, probe=None)
        f_h, div_h = field_and_divergence(net, t, z, probe=probe)
    assert not f.requires_grad and not div.requires_grad and not div_h.requires_grad
    # Without a graph, both traces are still the reference's: the exact one and the
    # Hutchinson estimate with the same probe (which differs from the exact trace).
    f_ref, div_ref = reference(net, t, z, None, None)
    _, div_h_ref = reference(net, t, z, probe, None)
    torch.testing.assert_close(f, f_ref.detach())
    torch.testing.assert_close(div, div_ref.detach())
    torch.testing.assert_close(div_h, div_h_ref.detach())
    assert not torch.allclose(div_h, div)
    # In training z may be a plain tensor: parameter gradients still flow (no vjp w.r.t. z),
    # and they are the reference's, whose z had to require grad for its vector-Jacobian product.
    weights = torch.linspace(-1.0, 2.0, B)
    expected = torch.autograd.grad((f_ref.sum(1) * weights).sum() + (div_ref * weights).sum(),
                                   list(net.parameters()))
    f, div = field_and_divergence(net, t.detach(), z.detach(), probe=None)
    ((f.sum(1) * weights).sum() + (div * weights).sum()).backward()
    for p, g in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


class OwnForward(ODENet):
    def forward(self, t, z):
        return super().forward(t, z) * 2


def test_unsupported_nets_are_refused():
    assert not supports_forward_divergence(nn.Linear(2, 2))
    assert not supports_forward_divergence(OwnForward(2, (4,)))
    soft = ODENet(2, (4,), "concat", "softplus")
    soft.act = nn.Softplus(beta=2.0)
    assert not supports_forward_divergence(soft)
    gelu = ODENet(2, (4,), "concat", "tanh")
    gelu.act = nn.GELU()
    assert not supports_forward_divergence(gelu)
    hooked = ODENet(2, (4,))
    hooked.layers[0].register_forward_hook(lambda *_: None)
    assert not supports_forward_divergence(hooked)
    with pytest.raises(TypeError, match="supports ODENet and AmortizedODENet, got Linear"):
        field_and_divergence(nn.Linear(2, 2), torch.tensor(0.0), torch.zeros(3, 2), probe=None)
    with pytest.raises(TypeError, match="got OwnForward"):
        field_and_divergence(OwnForward(2, (4,)), torch.tensor(0.0), torch.zeros(3, 2),
                             probe=None)
    with pytest.raises(TypeError, match="GELU"):
        field_and_divergence(gelu, torch.tensor(0.0), torch.zeros(3, 2), probe=None)


def test_bad_shapes_say_what_was_received():
    net = ODENet(2, (4,))
    t = torch.tensor(0.0)
    with pytest.raises(ValueError, match=r"z must have shape \(B, D\), got \(3,\)"):
        field_and_divergence(net, t, torch.zeros(3), probe=None)
    with pytest.raises(ValueError, match=r"probe must have z's shape \(3, 2\), got \(3, 1\)"):
        field_and_divergence(net, t, torch.zeros(3, 2), probe=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="takes no context"):
        field_and_divergence(net, t, torch.zeros(3, 2), probe=None, context=torch.zeros(3, 1))
    amortized = AmortizedODENet(2, (4,), rank=1)
    with pytest.raises(ValueError, match="needs a context of shape"):
        field_and_divergence(amortized, t, torch.zeros(3, 2), probe=None)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_a_whole_solve_is_unchanged(trace):
    """Through torchdiffeq's dopri5 (T 0.5, as in a CNF block): the same NFE, the same
    z(T) and log-determinant, and the same gradients of a density-like loss."""
    from polyreg_cnf.engine._torchdiffeq import odeint

    net, _, z0, _ = make("odenet", "concatsquash", "tanh")
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)  # a smooth field: a solve of a few dozen steps
    probe = None if trace == "exact" else sample_probe(z0)
    results = {}
    for name in ("reference", "forward"):
        calls = []

        def field(t, state, name=name, calls=calls):
            calls.append(1)
            if name == "forward":
                return field_and_divergence(net, t, state[0], probe=probe)
            return reference(net, t, state[0], probe, None)

        zT, ladj = odeint(field, (z0, torch.zeros(B, dtype=z0.dtype)),
                          torch.tensor([0.0, 0.5], dtype=z0.dtype), rtol=1e-6, atol=1e-6)
        loss = (0.5 * zT[-1].square().sum(dim=1) - ladj[-1]).mean()
        grads = torch.autograd.grad(loss, [*net.parameters(), z0])
        results[name] = (len(calls), zT[-1], ladj[-1], grads)
    (n_ref, z_ref, l_ref, g_ref), (n_fwd, z_fwd, l_fwd, g_fwd) = (results["reference"],
                                                                  results["forward"])
    assert n_fwd == n_ref > 10, (n_fwd, n_ref)
    torch.testing.assert_close(z_fwd, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l_fwd, l_ref, rtol=1e-11, atol=1e-11)
    for g, g_r in zip(g_fwd, g_ref):
        torch.testing.assert_close(g, g_r, rtol=1e-9, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize(("trace", "dynamic_batch"),
                         [("exact", True), ("hutchinson", True), ("exact", False)])
def test_compiled_equals_eager_across_batch_sizes(trace, dynamic_batch):
    """A batch-generic graph serves a training and an evaluation batch (no recompilation); the
    batch-specialised variant compiles once per batch size and reuses it."""
    torch._dynamo.reset()
    net = ODENet(2, (16, 16), "concat", "tanh")
    t = torch.tensor(0.25)
    counts = torch._dynamo.utils.counters
    counts.clear()
    for batch in (8, 13, 8):
        z = torch.randn(batch, 2, requires_grad=True)
        probe = None if trace == "exact" else sample_probe(z)
        f, div = compiled_field_and_divergence(net, t, z, probe=probe,
                                               dynamic_batch=dynamic_batch)
        f_e, div_e = field_and_divergence(net, t, z, probe=probe)
        torch.testing.assert_close(f, f_e)
        torch.testing.assert_close(div, div_e)
        wrt = [*net.parameters(), z]
        for g, g_e in zip(torch.autograd.grad(loss_of(f, div), wrt),
                          torch.autograd.grad(loss_of(f_e, div_e), wrt)):
            torch.testing.assert_close(g, g_e, rtol=1e-4, atol=1e-5)
    expected = 1 if dynamic_batch else 2  # batches 8, 13, then 8 again (reused)
    assert counts["stats"]["unique_graphs"] == expected, dict(counts["stats"])
    assert dynamic_batch in fd._COMPILED  # the compiled function is kept for the next call
