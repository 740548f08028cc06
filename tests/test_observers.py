"""Observers: how a regularizer plugs into every solve without an edit inside the engine.

A new regularizer is an observer plus a loss term. The one written here, the path length
:math:`\\int_0^T \\|f\\| dt` of every CNF trajectory, touches no engine file: it is checked against
the closed form of linear dynamics and trained through the Lightning loss term.
"""

import lightning as L
import numpy as np
import pytest
import torch
from polyreg_cnf.callbacks.loss_term import LossTermCallback
from polyreg_cnf.datamodules.toy import ToyDataModule
from scipy.linalg import expm
from torch import nn

from polyreg_cnf import CNF, NFECounter, SolverConfig, TrajectoryRecorder, observe, odeint
from polyreg_cnf.engine.observers import IntegrandObserver, active
from polyreg_cnf.models import CNFDensityEstimator


class PathLength(IntegrandObserver):
    """Integrates the speed ||f|| of every training CNF solve (batch mean per solve)."""

    size = 1

    def __init__(self):
        self.lengths = []

    def integrands(self, f, vjp):
        return (f.norm(dim=1),)

    def record(self, finals):
        self.lengths.append(finals[0].mean())

    def clear(self):
        self.lengths = []


class PathLengthRegularizer(LossTermCallback):
    metric = "reg/path"

    def make_observer(self, pl_module):
        return PathLength()

    def terms(self):
        if self.observer is None or not self.observer.lengths:
            return {}
        return {self.metric: (1.0, torch.stack(self.observer.lengths).sum())}

    def settings(self):
        return {"coef": self.coef}

    def _nothing_to_regularize(self, pl_module):
        return None if self.observer.lengths else "no CNF solve"


class Linear(nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(torch.as_tensor(A))

    def forward(self, t, z):
        return z @ self.A.T


def test_a_new_integrand_observer_matches_the_closed_form():
    A = np.array([[-0.5, 1.0], [-1.0, -0.2]])
    T = 1.2
    cnf = CNF(Linear(A), T=T, trace="exact",
              solver=SolverConfig(atol=1e-9, rtol=1e-9, backprop="direct")).double()
    z0 = torch.tensor([[1.0, -0.5], [0.3, 2.0]], dtype=torch.float64)
    with PathLength() as observer:
        z, _ = cnf(z0)
    ts = np.linspace(0, T, 4001)
    speeds = [[np.linalg.norm(A @ expm(t * A) @ row) for t in ts] for row in z0.numpy()]
    exact = np.mean([np.trapezoid(s, ts) for s in speeds])
    assert len(observer.lengths) == 1
    assert observer.lengths[0].item() == pytest.approx(exact, rel=1e-6)
    # the extra state leaves the flow itself alone
    np.testing.assert_allclose(z.detach().numpy(), z0.numpy() @ expm(T * A).T, atol=1e-7)
    cnf.eval()
    with PathLength() as observer:
        cnf(z0)
    assert observer.lengths == []  # evaluation solves are never regularized


def test_a_new_regularizer_trains_through_the_loss_term():
    class LossSpy(L.Callback):
        def __init__(self, reg):
            self.reg, self.pairs = reg, []

        def on_before_backward(self, trainer, pl_module, loss):
            self.pairs.append((loss.item(), self.reg.raw_penalty().item()))

    class NLLSpy(CNFDensityEstimator):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.seen = getattr(self, "seen", []) + [loss.item()]
            return loss

    L.seed_everything(0)
    reg = PathLengthRegularizer(coef=0.5)
    spy = LossSpy(reg)
    model = NLLSpy(2, hidden_dims=[8], solver=SolverConfig(backprop="direct"))
    trainer = L.Trainer(max_steps=3, callbacks=[reg, spy], logger=False, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, ToyDataModule("8gaussians", num_train=128, num_val=32, num_test=32,
                                     batch_size=32))
    assert len(spy.pairs) == len(model.seen) == 3
    for (loss, path), nll in zip(spy.pairs, model.seen):
        assert path > 0
        assert loss == pytest.approx(nll + 0.5 * path, rel=1e-6)
    assert trainer.callback_metrics["reg/path"].item() > 0
    assert active(PathLength) is None  # never left active after fit


def test_scopes_close_in_any_order_and_the_innermost_of_a_kind_acts():
    outer, inner, recorder = NFECounter(), NFECounter(), TrajectoryRecorder(2, 1)
    first, second = observe(outer), observe(recorder)
    first.__enter__()
    second.__enter__()
    with observe(inner):
        odeint(lambda t, y: -y, torch.ones(3), torch.linspace(0, 1, 3))
    first.__exit__(None, None, None)  # closed before the scope opened after it
    assert active(TrajectoryRecorder) is recorder and active(NFECounter) is None
    second.__exit__(None, None, None)
    assert active(TrajectoryRecorder) is None
    assert inner.solves == 1 and outer.solves == 0 and len(recorder.penalties) == 1
    with pytest.raises(TypeError, match="takes Observer objects"):
        with observe("counter"):
            pass
