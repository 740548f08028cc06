"""backprop="auto": measured, direct when it fits, else the adjoint; agreed, logged, resumed."""

import contextlib
import os

import lightning as L
import pytest
import torch
from polyreg_cnf.callbacks import BackpropSelector, NFEMonitor, PolynomialTrajectoryRegularizer
from polyreg_cnf.datamodules.toy import ToyDataModule

from polyreg_cnf import CNF, Auto, ODENet, SolverConfig, TrajectoryRecorder
from polyreg_cnf.engine import memory
from polyreg_cnf.models import CNFDensityEstimator


class StepNFE(L.Callback):
    """Backward NFE and the logged choice of every training step."""

    def __init__(self):
        self.backward, self.logged = [], []

    def _read_logged(self, trainer):
        # The selector logs at the end of a step, after this callback's on_train_batch_end.
        if "backprop/memory_bounded" in trainer.callback_metrics:
            self.logged.append(float(trainer.callback_metrics["backprop/memory_bounded"]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._read_logged(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.backward.append(sum(b.nfe.backward for b in pl_module.flow.blocks))

    def on_train_end(self, trainer, pl_module):
        self._read_logged(trainer)


def fit(model, steps=3, callbacks=(), ckpt_path=None, root=None, **kwargs):
    dm = ToyDataModule("8gaussians", num_train=512, num_val=64, num_test=64, batch_size=64,
                       seed=0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", callbacks=[NFEMonitor(), *callbacks],
                        logger=False, enable_checkpointing=root is not None,
                        default_root_dir=root, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        **kwargs)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer


def model(tol=1e-3, **solver):
    L.seed_everything(0)
    return CNFDensityEstimator(2, hidden_dims=[16, 16],
                               solver=SolverConfig(atol=tol, rtol=tol, **solver))


def test_default_is_auto_and_our_models_bring_the_selector():
    m = model()
    assert isinstance(m.flow.blocks[0].solver.backprop, Auto)
    assert [type(c) for c in m.configure_callbacks()] == [BackpropSelector]
    assert model(backprop="direct").configure_callbacks() == []


def test_auto_measures_on_the_adjoint_then_backpropagates_directly():
    spy = StepNFE()
    trainer = fit(model(), steps=4, callbacks=[spy])
    # step 1: the adjoint while the block measures; then direct backprop (no backward solve)
    assert spy.backward[0] > 0 and spy.backward[1:] == [0, 0, 0]
    assert spy.logged == [0.0, 0.0, 0.0, 0.0]  # the decision logged after each step: direct
    selector = next(c for c in trainer.callbacks if isinstance(c, BackpropSelector))
    assert selector.state_dict() == {"choice": "direct", "fell_back": False}


def test_auto_keeps_the_adjoint_when_the_estimate_does_not_fit():
    spy = StepNFE()
    fit(model(backprop=Auto(memory_share=1e-12)), steps=3, callbacks=[spy])
    assert all(n > 0 for n in spy.backward)
    assert spy.logged == [1.0, 1.0, 1.0]


class FirstGradients(L.Callback):
    """The gradients of the first optimiser step, before Adam uses them."""

    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}


def test_the_measuring_step_trains_like_direct_backprop():
    # auto's first step runs the adjoint: the same gradient as direct backprop up to the
    # solver's tolerance. Adam's first step only sees the gradients' signs, so the gradients
    # themselves are compared.
    spies = {}
    for name, solver in (("auto", {}), ("direct", {"backprop": "direct"})):
        spies[name] = FirstGradients()
        m = model(tol=1e-7, **solver)  # each model seeds the global RNG: built and fitted one
        fit(m, steps=1, callbacks=[spies[name]])  # after the other, both see the same probe
        assert (m.flow.blocks[0].nfe.backward > 0) == (name == "auto")
    auto, direct = spies["auto"].grads, spies["direct"].grads
    assert auto.keys() == direct.keys()
    for name in direct:
        assert direct[name].abs().max() > 1e-4, name  # a real gradient, not zeros
        # the adjoint's error is the solver's (1e-7 tolerances): 1e-5 against gradients of 0.01-0.3
        torch.testing.assert_close(auto[name], direct[name], rtol=1e-3, atol=1e-5, msg=name)


def test_choice_is_resumed_from_the_checkpoint(tmp_path):
    fit(model(), steps=2, root=tmp_path)
    ckpt = next((tmp_path).rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    assert state["BackpropSelector"] == {"choice": "direct", "fell_back": False}
    spy = StepNFE()
    fit(model(), steps=4, ckpt_path=ckpt, callbacks=[spy])
    assert spy.backward == [0, 0]  # no adjoint step to re-measure: the choice came back


class OOMOnce(torch.nn.Module):
    """A field that, once armed, runs out of memory in its first graph-building evaluation."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.armed = False
        self.raised = 0

    def forward(self, t, z):
        if self.armed and torch.is_grad_enabled() and self.raised == 0:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.tanh(self.lin(z))


def test_out_of_memory_in_a_direct_solve_falls_back_to_the_adjoint_for_good():
    net = OOMOnce()
    cnf = CNF(net, solver=SolverConfig(atol=1e-5, rtol=1e-5), trace="exact")
    x = torch.randn(8, 2)
    cnf(x)  # the first training solve measures (on the adjoint) and chooses direct backprop
    assert _site(cnf).choice == "direct"
    net.armed = True
    cnf.nfe.reset()
    with pytest.warns(RuntimeWarning, match="ran out of memory"):
        z, _ = cnf(x)
    assert net.raised == 1 and _site(cnf).fell_back and _site(cnf).choice == "memory_bounded"
    z.sum().backward()
    assert cnf.nfe.backward > 0  # the redone solve was the adjoint
    reference = CNF(OOMOnce(), solver=SolverConfig(atol=1e-5, rtol=1e-5, backprop="adjoint"),
                    trace="exact")
    reference.load_state_dict(cnf.state_dict())
    reference.net.raised = 1
    torch.testing.assert_close(z, reference(x)[0])
    cnf.backprop_decision.agree("direct", False)  # a selector cannot undo the fallback
    cnf.nfe.reset()
    cnf(x)[0].sum().backward()
    assert cnf.nfe.backward > 0


def test_measured_bytes_scale_with_the_batch_and_decide_by_the_rule(monkeypatch):
    cnf = CNF(ODENet(2, (16, 16)), solver=SolverConfig(atol=1e-3, rtol=1e-3))
    cnf(torch.randn(64, 2))
    per_row = _site(cnf).bytes_per_row
    assert per_row > 0 and _site(cnf).choice == "direct"
    # exactly the documented inequality: NFE x bytes x 2 <= share x free
    nfe = cnf.nfe.forward
    need = per_row * 64 * nfe * memory.HEADROOM
    monkeypatch.setattr("polyreg_cnf.engine.strategies.available_memory",
                        lambda device: int(need / memory.CPU_MEMORY_SHARE * 0.99))
    cnf.nfe.reset()
    cnf(torch.randn(64, 2))
    assert cnf.nfe.forward == nfe and _site(cnf).choice == "memory_bounded"


def test_memory_bounded_auto_uses_step_checkpoints_where_the_adjoint_would_stop(monkeypatch):
    # Direct backprop does not fit, one step's graph does: penalised solves (interior output
    # times) use the step checkpoints, plain [0, T] solves the adjoint, as measured in
    # benchmarks/results/adjoint_overhead.md.
    torch.manual_seed(0)
    cnf = CNF(ODENet(2, (16, 16)), solver=SolverConfig(atol=1e-6, rtol=1e-6))
    x = torch.randn(64, 2)
    cnf(x)  # measures
    need = _site(cnf).bytes_per_row * 64 * memory.HEADROOM / memory.CPU_MEMORY_SHARE
    nfe = cnf.nfe.forward
    assert nfe >= 20  # so that the budget below fits 7 evaluations but not the whole solve
    monkeypatch.setattr("polyreg_cnf.engine.strategies.available_memory",
                        lambda device: int(need * 10))
    cnf(x)
    assert _site(cnf).choice == "memory_bounded" and _site(cnf).checkpoint_fits

    def step(penalised):
        cnf.nfe.reset()
        recorder = TrajectoryRecorder(2, 1, generator=torch.Generator().manual_seed(1))
        with recorder if penalised else contextlib.nullcontext():
            z, ladj = cnf(x)
        loss = (z.square().sum(1) / 2 - ladj).mean()
        if penalised:
            loss = loss + 5 * recorder.penalty()
        loss.backward()
        return cnf.nfe

    n = step(penalised=True)
    assert n.accepted_backward == 0 and n.backward == 7 * n.accepted  # recomputed steps
    n = step(penalised=False)
    assert n.accepted_backward > 0  # the adjoint's own steps
    # not even one step's graph fits: the adjoint, stops and all
    monkeypatch.setattr("polyreg_cnf.engine.strategies.available_memory", lambda device: int(need))
    cnf(x)
    assert not _site(cnf).checkpoint_fits
    n = step(penalised=True)
    assert n.accepted_backward > 0


def test_a_model_trains_with_step_checkpoints_and_the_regularizer():
    spy = StepNFE()
    m = model(tol=1e-5, backprop="checkpoint")
    assert m.configure_callbacks() == []  # a fixed choice: nothing to agree on
    fit(m, steps=3, callbacks=[spy, PolynomialTrajectoryRegularizer()])
    block = m.flow.blocks[0]
    assert all(n > 0 for n in spy.backward)
    # the last step: 7 recomputed evaluations per accepted forward step, no adjoint steps
    assert block.nfe.accepted_backward == 0 and spy.backward[-1] == 7 * block.nfe.accepted


class RankOneIsShort(CNFDensityEstimator):
    """Rank 1 has (as if) no memory to spare: its blocks propose the adjoint."""

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_rank == 1:
            for block in self.flow.blocks:
                object.__setattr__(block.solver.backprop, "memory_share", 1e-12)


class SaveChoice(L.Callback):
    def __init__(self, out):
        self.out = str(out)

    def on_fit_end(self, trainer, pl_module):
        choices = [_site(b).choice for b in pl_module.flow.blocks]
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"choices": choices, "state": state},
                   os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def test_ddp_ranks_agree_on_the_adjoint_if_one_rank_needs_it(tmp_path):
    L.seed_everything(0)
    m = RankOneIsShort(2, hidden_dims=[16, 16], solver=SolverConfig(atol=1e-3, rtol=1e-3))
    fit(m, steps=3, callbacks=[PolynomialTrajectoryRegularizer(), SaveChoice(tmp_path)],
        strategy="ddp_spawn", devices=2)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    assert r0["choices"] == r1["choices"] == ["memory_bounded"]
    for key in r0["state"]:
        torch.testing.assert_close(r0["state"][key], r1["state"][key], rtol=0, atol=0)


def _site(block):
    """What the block's Auto strategy decided for it (the decision lives in the block)."""
    return block.backprop_decision
