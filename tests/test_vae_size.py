"""Backprop chosen at the VAE's size: the adjoint is not the memory-bounded choice where its
parameter state dwarfs the ODE state (benchmarks/results/vae_size.md measures 4.5x)."""

from __future__ import annotations

import torch

from polyreg_cnf.engine.amortized import AmortizedODENet
from polyreg_cnf.engine.cnf import CNF
from polyreg_cnf.engine.nets import ODENet
from polyreg_cnf.engine.solver_config import SolverConfig
from polyreg_cnf.engine.strategies import ADJOINT_HEAVY_RATIO, Auto, StepCheckpoint


def _train_once(cnf: CNF, context: torch.Tensor | None) -> None:
    z, ladj = cnf(torch.randn(4, 2), context=context)
    (z.square().sum() + ladj.sum()).backward()


def test_auto_bounds_memory_with_step_checkpoints_where_the_adjoint_is_heavy():
    torch.manual_seed(0)
    auto = Auto()
    net = AmortizedODENet(2, (64,), rank=16)
    cnf = CNF(net, T=0.5, solver=SolverConfig(backprop=auto))
    head = net.make_head(3)
    # per-sample factors: hundreds of numbers per number of state
    assert 4 * net.context_size >= ADJOINT_HEAVY_RATIO * 4 * 3
    _train_once(cnf, head(torch.randn(4, 3)))
    site = cnf.backprop_decision
    assert site.adjoint_heavy and site.checkpoint_fits
    # the first (measuring) solve was memory-bounded by the step checkpoints: exactly 7
    # backward evaluations per accepted dopri5 step (the adjoint's count differs)
    assert cnf.nfe.backward == 7 * cnf.nfe.accepted > 0
    site.agree("memory_bounded", fell_back=False)  # memory-bounded from now on
    assert auto.strategy(site, torch.tensor([0.0, 0.5])) == StepCheckpoint()


def test_auto_keeps_the_adjoint_for_an_ordinary_ends_only_solve():
    torch.manual_seed(0)
    auto = Auto()
    cnf = CNF(ODENet(2, (16,)), T=0.5, solver=SolverConfig(backprop=auto))
    _train_once(cnf, None)
    site = cnf.backprop_decision
    assert site.adjoint_heavy is False
    site.agree("memory_bounded", fell_back=False)
    assert auto.strategy(site, torch.tensor([0.0, 0.5])) is auto.adjoint


def test_the_papers_vae_sizes_are_adjoint_heavy_and_the_digits_are_not():
    from polyreg_cnf.app.config import resolve

    def heavy(name: str) -> bool:
        p = resolve({"model": "vae", "data": name}).flat()  # the preset over CNFVAE's defaults
        net = AmortizedODENet(p["z_dim"], p["hidden_dims"], p["rank"])
        params = p["batch_size"] * net.context_size + sum(x.numel() for x in net.parameters())
        state = p["batch_size"] * (p["z_dim"] + 1)  # z and the log-determinant
        return params >= ADJOINT_HEAVY_RATIO * state

    assert not heavy("digits")  # the quick suites' VAE keeps its previous choices
    assert all(heavy(name) for name in ("mnist", "omniglot", "freyfaces", "caltech"))
