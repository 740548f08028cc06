"""The trajectory polynomial regularizer as a Lightning callback."""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from polyreg_cnf.callbacks.loss_term import LossTermCallback
from torch import Tensor, nn
from typing_extensions import override

from polyreg_cnf.engine._checks import check_bool, check_int, check_optional_int
from polyreg_cnf.engine.dropin import redirect_torchdiffeq
from polyreg_cnf.engine.recording import TrajectoryRecorder

__all__ = ["POLY_PRESETS", "PolynomialTrajectoryRegularizer"]

#: Named settings of (coef, K, m). "paper" is Huang & Yeh's and the default; a setting is added
#: here only when the benchmarks' settings sweep showed it faster than the paper's on every
#: workload at an unchanged test NLL (benchmarks/results/sweep.md).
POLY_PRESETS: dict[str, dict[str, float | int]] = {
    "paper": {"coef": 5.0, "num_samples": 2, "order": 1},
}

#: Packages whose modules are never redirected: they are not the user's model code (and ours
#: call torchdiffeq on purpose).
_FOREIGN = ("builtins", "torch", "torchdiffeq", "lightning", "pytorch_lightning",
            "lightning_fabric", "torchmetrics", "polyreg_cnf")
#: Added to the run's seed so the regularizer's times do not replay the global RNG's stream.
_SEED_OFFSET = 0x7470_7200


class PolynomialTrajectoryRegularizer(LossTermCallback):
    r"""Pulls every ODE trajectory toward its least-squares polynomial fit.

    On each training step every ODE solve of the LightningModule draws K = ``num_samples``
    sorted uniform interior times, reads the state there from the solver's dense output (no
    extra forward steps), and the callback adds

    .. math:: \text{coef} \sum_{\text{solves}} \frac{1}{nB} \|(I - P)Z\|^2

    to the loss (see :func:`polyreg_cnf.trajectory_polynomial_penalty`); ``reg/poly`` logs the
    unweighted sum. The solves it sees: every :class:`polyreg_cnf.ODEBlock` (CNF blocks
    included), every call of the drop-in :func:`polyreg_cnf.odeint` /
    :func:`polyreg_cnf.odeint_adjoint`, and, with ``intercept_torchdiffeq=True``, the calls of
    torchdiffeq's own ``odeint``/``odeint_adjoint`` made from the modules that define the
    LightningModule's class, its base classes and the classes of its submodules. Validation, test
    and predict are untouched (the drop-in is exactly torchdiffeq outside training steps).
    Reference: Huang & Yeh, "Accelerating Continuous Normalizing Flow with Trajectory Polynomial
    Regularization", AAAI 2021.

    The interior times come from the callback's own ``torch.Generator`` (saved in checkpoints,
    the same stream on every DDP rank), so attaching the callback never shifts the run's other
    random streams: with ``coef=0`` training is that of a run without it.

    Args:
        coef: Penalty weight (paper: 5).
        num_samples: Interior time points K per solve (paper: 2).
        order: Polynomial degree m (paper: 1); needs K >= m for a non-zero penalty.
        intercept_torchdiffeq: For the duration of ``fit``, rebind the module-level names bound to
            torchdiffeq's ``odeint``/``odeint_adjoint`` (any alias) or to the ``torchdiffeq``
            module in the model's modules, so unchanged code is regularized; everything is
            restored when fit ends, fails or is interrupted. Not caught: references kept in
            attributes, closures, ``functools.partial``, imports inside function bodies, or
            modules other than the model's.
        state_index: Which element of a tuple state the drop-in penalises (a tensor state is
            penalised whole; ODE blocks always penalise their first element).
        seed: Seed of the interior times; default: the run's seed (``L.seed_everything``'s, else
            ``torch.initial_seed()``), broadcast from rank 0.
        start_step: A coefficient schedule: the penalty is off (no interior times drawn, nothing
            added) before this training step and ``coef`` from it on. TPR's saving shows late
            in training, after the baseline's NFE has grown; starting late lets the density be
            learned first (``benchmarks/results/long_fresh.md`` measures it).

    Example:
        >>> from polyreg_cnf.callbacks import NFEMonitor
        >>> reg = PolynomialTrajectoryRegularizer(coef=5.0, intercept_torchdiffeq=True)
        >>> trainer = L.Trainer(callbacks=[reg, NFEMonitor()], logger=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
    """

    metric = "reg/poly"

    def __init__(self, coef: float = POLY_PRESETS["paper"]["coef"],
                 num_samples: int = POLY_PRESETS["paper"]["num_samples"],
                 order: int = POLY_PRESETS["paper"]["order"], *, start_step: int = 0,
                 intercept_torchdiffeq: bool = False, state_index: int = 0,
                 seed: int | None = None) -> None:
        super().__init__(coef)
        for name, value in (("num_samples", num_samples), ("order", order),
                            ("state_index", state_index)):
            check_int(name, value, minimum=0)
        if num_samples < order:
            raise ValueError(
                f"num_samples must be >= order (a degree-{order} fit through num_samples + 2 "
                f"points is exact when num_samples < order, so the penalty would be zero); got "
                f"num_samples={num_samples}, order={order}")
        check_bool("intercept_torchdiffeq", intercept_torchdiffeq)
        check_optional_int("seed", seed, minimum=None)
        self.num_samples = num_samples
        self.order = order
        self.start_step = check_int("start_step", start_step, minimum=0)
        self.intercept_torchdiffeq = intercept_torchdiffeq
        self.state_index = state_index
        self.seed = seed
        # Made at fit start (a Generator does not pickle, and ddp_spawn pickles callbacks).
        self._generator: torch.Generator | None = None
        self._restored = False
        self._fit_stack: ExitStack | None = None
        #: ``(module, name)`` of the names rebound for the current fit.
        self.redirected: list[tuple[str, str]] = []

    @property
    def generator(self) -> torch.Generator:
        """The generator of the interior times (seeded at fit start unless restored)."""
        if self._generator is None:
            self._generator = torch.Generator()
        return self._generator

    # ------------------------------------------------------------------ LossTermCallback
    def make_observer(self, pl_module: L.LightningModule) -> TrajectoryRecorder:
        return TrajectoryRecorder(self.num_samples, self.order, state_index=self.state_index,
                                  generator=self.generator)

    def terms(self) -> dict[str, tuple[float, Tensor]]:
        penalty = None if self.observer is None else self.observer.penalty()
        return {} if penalty is None else {self.metric: (1.0, penalty)}

    def settings(self) -> dict[str, float | int]:
        return {"coef": self.coef, "num_samples": self.num_samples, "order": self.order,
                "start_step": self.start_step}

    def active_at(self, step: int) -> bool:
        return step >= self.start_step

    def _nothing_to_regularize(self, pl_module: L.LightningModule) -> str | None:
        if self.observer is not None and self.observer.solves:
            return None
        name = type(pl_module).__name__
        seen = ("" if not self.intercept_torchdiffeq else
                " (intercept_torchdiffeq=True rebound " + (", ".join(
                    f"{m}.{n}" for m, n in self.redirected) or "nothing") + ")")
        return (
            f"{type(self).__name__} found no ODE solve to regularize in the first training step "
            f"of {name}{seen}. Either solve with the drop-in: `from polyreg_cnf import odeint` "
            f"(or odeint_adjoint) in place of torchdiffeq's, or pass "
            f"PolynomialTrajectoryRegularizer(intercept_torchdiffeq=True) to route the "
            f"torchdiffeq calls made by {name}'s modules through it, or build the dynamics with "
            f"polyreg_cnf.ODEBlock / polyreg_cnf.CNF.")

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._restored:
            seed = trainer.strategy.broadcast(self._run_seed(), src=0)
            self.generator.manual_seed(int(seed))
        super().on_fit_start(trainer, pl_module)
        self._close_fit()
        self._fit_stack = ExitStack()
        if self.intercept_torchdiffeq:
            self.redirected = self._fit_stack.enter_context(
                redirect_torchdiffeq(_model_modules(pl_module)))

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self._finish()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._finish()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finish()

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_samples": self.num_samples, "order": self.order,
                "generator": self.generator.get_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = (state_dict.get("num_samples"), state_dict.get("order"))
        if saved != (None, None) and saved != (self.num_samples, self.order):
            rank_zero_warn(f"PolynomialTrajectoryRegularizer: checkpoint had (num_samples, "
                           f"order)={saved}, continuing with {(self.num_samples, self.order)}.")
        if "generator" in state_dict:
            self.generator.set_state(state_dict["generator"])
            self._restored = True

    # ------------------------------------------------------------------ internals
    def _run_seed(self) -> int:
        if self.seed is not None:
            base = self.seed
        elif os.environ.get("PL_GLOBAL_SEED", "").lstrip("-").isdigit():
            base = int(os.environ["PL_GLOBAL_SEED"])
        else:
            base = torch.initial_seed()
        return (base + _SEED_OFFSET) % 2**63

    def _close_fit(self) -> None:
        if self._fit_stack is not None:
            self._fit_stack.close()
            self._fit_stack = None

    def _finish(self) -> None:
        """Switch recording off and give every rebound name its original back."""
        self._close_step()
        self._close_fit()
        self._restored = False

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callbacks: a Generator does not pickle, its state does.
        state = dict(self.__dict__)
        generator = state.pop("_generator")
        state["_generator_state"] = None if generator is None else generator.get_state()
        state.update(observer=None, _fit_stack=None, _step_stack=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator_state = state.pop("_generator_state", None)
        self.__dict__.update(state)
        self._generator = None
        if generator_state is not None:
            self.generator.set_state(generator_state)

    @classmethod
    def from_preset(cls, name: str = "paper", **overrides: Any) -> PolynomialTrajectoryRegularizer:
        """The regularizer with a named setting of :data:`POLY_PRESETS`.

        Args:
            name: A key of :data:`POLY_PRESETS`.
            **overrides: Any constructor argument, e.g. ``intercept_torchdiffeq=True`` or
                ``coef=1.0`` (wins over the preset's value).

        Example:
            >>> PolynomialTrajectoryRegularizer.from_preset("paper").coef
            5.0
        """
        if name not in POLY_PRESETS:
            raise ValueError(f"unknown poly preset {name!r}; valid: {', '.join(POLY_PRESETS)}")
        return cls(**{**POLY_PRESETS[name], **overrides})

    def __repr__(self) -> str:
        return (f"PolynomialTrajectoryRegularizer(coef={self.coef}, "
                f"num_samples={self.num_samples}, order={self.order}, "
                f"intercept_torchdiffeq={self.intercept_torchdiffeq}, "
                f"state_index={self.state_index}, start_step={self.start_step})")


def _model_modules(pl_module: nn.Module) -> list[Any]:
    """The modules defining the classes of ``pl_module``, its bases and its submodules."""
    names: dict[str, None] = {}
    for module in pl_module.modules():
        for cls in type(module).__mro__:
            name = cls.__module__
            if not any(name == p or name.startswith(p + ".") for p in _FOREIGN):
                names.setdefault(name, None)
    return [sys.modules[n] for n in names if n in sys.modules]
