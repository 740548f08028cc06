"""The amortized posterior with its factors split once per solve computes today's gradients.

The reference is the formula of commit 4156f03, kept here: every evaluation slices the context
into U, V and c and divides U and V by their scales. The new path (views made once per solve,
scales folded into the (B, r) products, forward-mode divergence) must give the same gradients
to 1e-10 relative in float64 under every backprop strategy, and the same NFE over a 20-step run.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from polyreg_cnf.engine.amortized import AmortizedODENet
from polyreg_cnf.engine.cnf import CNF
from polyreg_cnf.engine.forward_divergence import field_and_divergence
from polyreg_cnf.engine.recording import TrajectoryRecorder
from polyreg_cnf.engine.solver_config import SolverConfig
from polyreg_cnf.engine.strategies import Adjoint, Direct, StepCheckpoint
from polyreg_cnf.engine.trace import divergence_exact
from polyreg_cnf.models.vae import CNFVAE

BACKPROPS = {"direct": Direct(), "adjoint": Adjoint(), "adjoint_stock": Adjoint(carry=False),
             "checkpoint": StepCheckpoint()}


class TodaysNet(AmortizedODENet):
    """AmortizedODENet's forward as of 4156f03: unpack (slice and divide) in every evaluation."""

    # No per-solve preparation: the CNF block hands the whole context to every evaluation.
    prepare_context = None

    def old_unpack(self, context: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        out, start = [], 0
        B, r = context.shape[0], self.rank
        for n_in, n_out in self.shapes:
            U, V, c = context[:, start:start + self.rank * (n_in + n_out) + n_out].split(
                [n_out * r, n_in * r, n_out], dim=1)
            start += r * (n_in + n_out) + n_out
            out.append((U.reshape(B, n_out, r) / math.sqrt(r),
                        V.reshape(B, n_in, r) / math.sqrt(n_in), c))
        return out

    def forward(self, t: Tensor, z: Tensor, context: Tensor) -> Tensor:
        tt = t.to(z.dtype).expand(z.shape[0], 1)
        for i, (layer, (U, V, c)) in enumerate(zip(self.layers, self.old_unpack(context))):
            u = torch.cat([tt, z], dim=1)
            projected = torch.einsum("bir,bi->br", V, u)
            z = torch.nn.functional.linear(u, layer.weight, layer.bias) + torch.einsum(
                "bor,br->bo", U, projected) + c
            if i < len(self.layers) - 1:
                z = self.act(z)
        return z


def _vae(backprop, divergence: str = "auto", reference: bool = False, **solver) -> CNFVAE:
    torch.manual_seed(3)
    config = SolverConfig(backprop=backprop, **solver)
    model = CNFVAE((1, 8, 8), "bernoulli", z_dim=3, hidden_dims=[8, 8], rank=2, feature_dim=8,
                   mlp_hidden=16, num_blocks=2, solver=config, divergence=divergence,
                   warmup_epochs=0).double()
    with torch.no_grad():  # larger dynamics than at initialisation, for a real test
        for p in model.flow.parameters():
            p.mul_(3)
    if reference:
        for i, block in enumerate(model.flow.blocks):
            net = TodaysNet(3, (8, 8), rank=2).double()
            net.load_state_dict(block.net.state_dict())
            model.flow.blocks[i] = CNF(net, T=0.5, solver=config, trace=block.trace,
                                       eval_trace=block.eval_trace, divergence="reverse")
    return model


def _images(n: int) -> Tensor:
    return (torch.rand(n, 64, generator=torch.Generator().manual_seed(1)) > 0.5).double()


def _gradients(model: CNFVAE, x: Tensor, penalise: bool) -> dict[str, Tensor]:
    eps = torch.randn(x.shape[0], 3, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)  # the Hutchinson probes
    with TrajectoryRecorder(2, 1) as recorder:
        log_px, kl = model.elbo_terms(x, eps)
    loss = (kl - log_px).mean() + (5 * recorder.penalty() if penalise else 0)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_equal_gradients(new: dict[str, Tensor], ref: dict[str, Tensor]) -> None:
    assert new.keys() == ref.keys()
    for name in ref:
        scale = ref[name].abs().max()
        assert scale > 0, name
        error = (new[name] - ref[name]).abs().max() / scale
        assert error < 1e-10, f"{name}: relative error {float(error):.3g}"


@pytest.mark.parametrize("backprop", list(BACKPROPS))
@pytest.mark.parametrize("divergence", ["auto", "reverse"])
def test_gradients_equal_todays_formula(backprop, divergence):
    x = _images(6)
    tight = dict(atol=1e-9, rtol=1e-9)
    ref = _gradients(_vae(BACKPROPS[backprop], reference=True, **tight), x, penalise=True)
    new = _gradients(_vae(BACKPROPS[backprop], divergence, **tight), x, penalise=True)
    # the heads (and through them the encoder) get gradient only through the factors
    assert all(new[n].abs().sum() > 0 for n in new if n.startswith("flow.heads"))
    _assert_equal_gradients(new, ref)


def test_field_and_exact_trace_equal_todays_formula():
    torch.manual_seed(0)
    net = AmortizedODENet(4, (16, 16), rank=3).double()
    old = TodaysNet(4, (16, 16), rank=3).double()
    old.load_state_dict(net.state_dict())
    context = net.make_head(5).double()(torch.randn(7, 5, dtype=torch.float64))
    t, z = torch.tensor(0.3, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    zg = z.clone().requires_grad_(True)
    f_old = old(t, zg, context)
    div_old = divergence_exact(f_old, zg, create_graph=False)
    for factors in (context, net.prepare_context(context)):
        torch.testing.assert_close(net(t, z, factors), f_old.detach(), rtol=1e-13, atol=0)
        f, div = field_and_divergence(net, t, z, probe=None, context=factors)
        torch.testing.assert_close(f, f_old.detach(), rtol=1e-13, atol=0)
        torch.testing.assert_close(div, div_old, rtol=1e-12, atol=1e-14)


def test_factors_are_views_made_once_per_solve():
    net = AmortizedODENet(3, (8,), rank=2)
    context = torch.randn(4, net.context_size)
    factors = net.prepare_context(context)
    assert len(factors) == 3 * len(net.shapes)
    # views of the context itself: an evaluation copies nothing of their size
    assert all(f.untyped_storage().data_ptr() == context.untyped_storage().data_ptr()
               for f in factors)
    calls = []
    original = AmortizedODENet.prepare_context

    def counting(self, c):
        calls.append(c.shape)
        return original(self, c)

    cnf = CNF(net, T=0.5, solver=SolverConfig(backprop="direct"))
    AmortizedODENet.prepare_context = counting
    try:
        cnf(torch.randn(4, 3), context=context)
    finally:
        AmortizedODENet.prepare_context = original
    assert cnf.nfe.forward > 6 and len(calls) == 1
    with pytest.raises(ValueError, match="factors must be prepare_context's tuple"):
        net(torch.tensor(0.0), torch.zeros(4, 3), factors[:2])


def test_nfe_of_a_20_step_run_equals_todays():
    def run(reference: bool) -> tuple[list[tuple[int, int]], dict[str, Tensor]]:
        model = _vae(Direct(), reference=reference)
        optimizer = torch.optim.Adamax(model.parameters(), lr=5e-3)
        x = _images(10)
        counts = []
        for step in range(20):
            torch.manual_seed(100 + step)
            for block in model.flow.blocks:
                block.nfe.reset()
            log_px, kl = model.elbo_terms(x)
            optimizer.zero_grad()
            (kl - log_px).mean().backward()
            optimizer.step()
            counts.append((sum(b.nfe.forward for b in model.flow.blocks),
                           sum(b.nfe.backward for b in model.flow.blocks)))
        return counts, dict(model.named_parameters())

    new, new_params = run(False)
    ref, ref_params = run(True)
    assert new == ref
    assert sum(f for f, _ in new) > 20 * 2 * 8  # real adaptive solves, not a fixed grid
    for name, p in ref_params.items():
        torch.testing.assert_close(new_params[name], p, rtol=1e-9, atol=1e-12, msg=name)


def _graph_names(out: Tensor) -> list[str]:
    seen, pending, names = set(), [out.grad_fn], []
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        pending.extend(n for n, _ in node.next_functions)
    return names


def test_training_solves_gather_the_factor_gradients():
    net = AmortizedODENet(3, (8,), rank=2).double()
    head = net.make_head(4).double()
    cnf = CNF(net, T=0.5, solver=SolverConfig(backprop="direct"))
    h = torch.randn(5, 4, dtype=torch.float64)
    z, ladj = cnf(torch.randn(5, 3, dtype=torch.float64), context=head(h))
    names = _graph_names(ladj.sum())
    # one split of the context per solve, one anchor per U and V of each layer, read by
    # every evaluation (the value and Hutchinson's tangent: 4 reads per layer)
    assert names.count("SplitWithSizesBackward0") == 1
    assert names.count("_AnchorBackward") == 2 * len(net.shapes)
    # (the evaluation that picks dopri5's first step only sizes it: not in the graph)
    reads = names.count("_DeferredMatmulBackward")
    assert reads == 4 * len(net.shapes) * (cnf.nfe.forward - 1)


def test_a_pass_that_stops_short_of_the_factors_leaves_nothing_behind():
    # A gradient with respect to the state only runs the evaluations' backward but not the
    # factors': what they gathered must not leak into the next pass over the same graph.
    torch.manual_seed(0)
    net = AmortizedODENet(3, (8,), rank=2).double()
    head = net.make_head(4).double()
    cnf = CNF(net, T=0.5, solver=SolverConfig(backprop="direct", atol=1e-9, rtol=1e-9))
    z0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(5, 4, dtype=torch.float64)
    torch.manual_seed(1)
    z, ladj = cnf(z0, context=head(h))
    loss = (z.square().sum() + ladj.sum())
    torch.autograd.grad(loss, z0, retain_graph=True)
    (once,) = torch.autograd.grad(loss, head.weight, retain_graph=True)
    (twice,) = torch.autograd.grad(loss, head.weight)
    torch.testing.assert_close(once, twice, rtol=0, atol=0)
    ref = TodaysNet(3, (8,), rank=2).double()
    ref.load_state_dict(net.state_dict())
    cnf_ref = CNF(ref, T=0.5, solver=SolverConfig(backprop="direct", atol=1e-9, rtol=1e-9),
                  divergence="reverse")
    torch.manual_seed(1)
    z, ladj = cnf_ref(z0, context=head(h))
    (expected,) = torch.autograd.grad(z.square().sum() + ladj.sum(), head.weight)
    assert float((once - expected).abs().max() / expected.abs().max()) < 1e-10
