"""LightningModule for density estimation with a stack of CNF blocks (FFJORD)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric
from typing_extensions import override

from polyreg_cnf.callbacks.step_log import log_step
from polyreg_cnf.engine._checks import check_int, check_number
from polyreg_cnf.engine.cnf import CNF, CNFStack, standard_normal_logprob
from polyreg_cnf.engine.flow_config import FlowConfig
from polyreg_cnf.engine.ode import solving_with, training_solves
from polyreg_cnf.engine.solver_config import FIXED_METHODS, SolverConfig
from polyreg_cnf.models.schedule import check_schedule
from polyreg_cnf.models.system import FlowSystem

__all__ = ["CNFDensityEstimator"]


class CNFDensityEstimator(FlowSystem):
    r"""Density estimation :math:`\log p(x) = \log \mathcal{N}(z(T); 0, I) + \log|\det J|`.

    Training minimises the mean negative log-likelihood (nats) of standardised data; validation
    and test report it with the evaluation solver (``solver.eval_method``, dopri5 by default,
    at the evaluation tolerances, whatever the training method) and the evaluation trace
    (exact by default), aggregated with torchmetrics so that under DDP the logged value is the
    mean over every sample of every process. Optional ``data_mean`` / ``data_std`` (saved with
    the model) let :meth:`log_prob_raw` score data in its original units.

    When the training solve differs from the evaluation solve in method or grid
    (:attr:`SolverConfig.evaluation_differs`), every validation also logs ``val/solver_gap``:
    the mean per-row :math:`|\log p_{train\,solver}(x) - \log p_{eval\,solver}(x)|` over the
    first ``solver_gap_rows`` validation rows of each process (the same rows every validation:
    validation loaders do not shuffle), both in eval mode with the evaluation trace, so only the
    solver differs. Above :data:`polyreg_cnf.app.report.SOLVER_GAP_WARNING` the run summary
    warns.

    Args:
        dim: Data dimension D.
        flow: The network and the blocks (:class:`~polyreg_cnf.engine.flow_config.FlowConfig`:
            hidden widths, layer type, nonlinearity, number of blocks, end time, trace
            estimators, probe, divergence); default FlowConfig's, FFJORD's toy network. A dict
            (as checkpoints store it) is read with ``FlowConfig.from_dict``.
        solver: Solver settings (tolerances for training and evaluation, backprop, ...).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        lr_schedule: ``"constant"`` or ``"cosine"`` (from ``lr`` down to 0 over the run's
            training steps; see :mod:`polyreg_cnf.models.schedule`).
        data_mean: Per-feature mean used to standardise the data (for raw scoring).
        data_std: Per-feature std used to standardise the data.
        solver_gap_rows: Validation rows per process ``val/solver_gap`` is measured on (0: never
            measured).
        **flow_fields: Fields of ``flow`` as flat keywords (``hidden_dims=(16,), T=0.5``), over
            ``flow``'s: the constructor of release 0.2 took them so, and its checkpoints load
            through them.

    Example:
        With every weight zero the vector field vanishes, the flow is the identity and
        :math:`\log p` is the standard normal's; raw scoring adds :math:`-\sum_j \log
        \sigma_j`:

        >>> model = CNFDensityEstimator(2, FlowConfig(hidden_dims=(16,)), data_mean=[1.0, 0.0],
        ...                             data_std=[2.0, 2.0]).eval()
        >>> with torch.no_grad():
        ...     for p in model.parameters():
        ...         _ = p.zero_()
        >>> x = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
        >>> model.log_prob(x).detach()  # -log(2 pi) - |x|^2 / 2
        tensor([-1.8379, -2.8379])
        >>> model.log_prob_raw(torch.tensor([[1.0, 0.0]])).detach()  # (0, 0) after; - log 4
        tensor([-3.2242])
    """

    def __init__(self, dim: int, flow: FlowConfig | dict[str, Any] | None = None,
                 solver: SolverConfig | dict[str, Any] | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.0, lr_schedule: str = "constant",
                 data_mean: Sequence[float] | None = None,
                 data_std: Sequence[float] | None = None,
                 solver_gap_rows: int = 1000, **flow_fields: Any) -> None:
        super().__init__()
        flow = FlowConfig.resolve(flow, "CNFDensityEstimator", **flow_fields)
        # The widths as numbers (hdim_factor x D resolved): what the checkpoint records.
        flow = dataclasses.replace(flow, hidden_dims=flow.widths(dim))
        self.solver_gap_rows = check_int("solver_gap_rows", solver_gap_rows, minimum=0)
        check_number("lr", lr, strict=True)
        check_number("weight_decay", weight_decay)
        self.lr_schedule = check_schedule(lr_schedule)
        solver = SolverConfig.for_model(solver)
        # Hyperparameters as plain values so checkpoints reload without this package's classes.
        self.save_hyperparameters(dict(
            dim=dim, flow=flow.to_dict(), solver=solver.to_dict(), lr=lr,
            weight_decay=weight_decay, lr_schedule=lr_schedule, solver_gap_rows=solver_gap_rows))
        self.solver = solver
        self.flow_config = flow
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.dim = dim
        self.flow = CNFStack([CNF(flow.make_net(dim), flow, solver)
                              for _ in range(flow.num_blocks)])
        mean = torch.zeros(dim) if data_mean is None else torch.as_tensor(data_mean).float()
        std = torch.ones(dim) if data_std is None else torch.as_tensor(data_std).float()
        if mean.shape != (dim,) or std.shape != (dim,) or not bool((std > 0).all()):
            raise ValueError(f"data_mean and data_std must have shape ({dim},) with std > 0, "
                             f"got {tuple(mean.shape)} and {tuple(std.shape)}")
        self.register_buffer("data_mean", mean)
        self.register_buffer("data_std", std)
        self.val_nll = MeanMetric()
        self.test_nll = MeanMetric()
        self.val_solver_gap = MeanMetric()
        self._gap_rows_seen = 0
        #: The last validation's ``val/solver_gap`` (None before one measured it): the run
        #: summary prints it after testing, which replaces the trainer's logged metrics.
        self.last_solver_gap: float | None = None

    # ------------------------------------------------------------------ model
    def log_prob(self, x: Tensor) -> Tensor:
        """Log density (nats) of standardised data x, shape (B, D) -> (B,)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected a batch of shape (B, {self.dim}), got {tuple(x.shape)}")
        z, ladj = self.flow(x)
        return standard_normal_logprob(z) + ladj

    def log_prob_raw(self, x_raw: Tensor) -> Tensor:
        """Log density of data in original units: standardise, then subtract sum(log std)."""
        x = (x_raw - self.data_mean) / self.data_std
        return self.log_prob(x) - self.data_std.log().sum()

    @torch.no_grad()
    def sample(self, num: int, generator: torch.Generator | None = None,
               steps: int | None = None, method: str = "rk4") -> Tensor:
        """Draw ``num`` samples (standardised units) by integrating the flow backwards.

        Args:
            num: Number of samples.
            generator: Random generator of the latent draws.
            steps: Solve each block with ``steps`` equal steps of the fixed-grid ``method``
                (``steps`` times the method's stages evaluations per block: rk4 has 4), in eval
                mode. ``None``: the solver of the module's mode (the evaluation solver in eval
                mode).
            method: The fixed-grid method of ``steps`` (one of ``FIXED_METHODS``).

        Returns:
            Samples of shape (num, D).

        Raises:
            ValueError: ``steps`` not a positive int, or ``method`` not fixed-grid.
        """
        check_int("num", num)
        z = torch.randn(num, self.dim, generator=generator, device=self.device,
                        dtype=self.data_std.dtype)
        if steps is None:
            return self.flow(z, reverse=True)[0]
        check_int("steps", steps)
        if method not in FIXED_METHODS:
            raise ValueError(f"sample(steps=...) needs a fixed-grid method, got {method!r}; "
                             f"valid: {', '.join(FIXED_METHODS)}")
        fixed = dataclasses.replace(self.solver, eval_method=method, eval_steps=steps)
        was_training = self.flow.training
        self.flow.eval()
        try:
            with solving_with(self.flow, fixed):
                return self.flow(z, reverse=True)[0]
        finally:
            self.flow.train(was_training)

    # ------------------------------------------------------------------ Lightning
    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0]
        nll = -self.log_prob(x).mean()
        log_step(self, {"train/nll": nll, "train/loss": nll}, prog_bar=("train/nll",))
        return nll

    @override
    def on_validation_epoch_start(self) -> None:
        self._gap_rows_seen = 0

    @override
    def on_validation_epoch_end(self) -> None:
        if self._gap_rows_seen:
            self.last_solver_gap = float(self.val_solver_gap.compute())

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = batch[0]
        log_p = self.log_prob(x)
        self.val_nll.update(-log_p)
        self.log("val/nll", self.val_nll, on_epoch=True, prog_bar=True)
        take = min(self.solver_gap_rows - self._gap_rows_seen, x.shape[0])
        if self.solver.evaluation_differs and take > 0:
            with training_solves(self.flow):
                gap = (self.log_prob(x[:take]) - log_p[:take]).abs()
            self._gap_rows_seen += take
            self.val_solver_gap.update(gap)
            self.log("val/solver_gap", self.val_solver_gap, on_epoch=True)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        nll = -self.log_prob(batch[0])
        self.test_nll.update(nll)
        self.log("test/nll", self.test_nll, on_epoch=True)

    def checkpoint_kind(self) -> tuple[str, dict[str, Any]]:
        return "cnf", {"dim": self.dim, "num_blocks": len(self.flow.blocks)}
