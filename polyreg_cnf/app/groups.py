"""The option groups of a run: one frozen dataclass per group of ``train.py`` flags.

Each option is a field declared with :func:`~polyreg_cnf.app.options.option` (type, default,
help, choices, bound); its flag is ``--`` plus the field name with ``_`` as ``-``. The defaults
are read from where each component is defined (:func:`~polyreg_cnf.app.options.default_of`):
the solver's from :class:`~polyreg_cnf.engine.solver_config.SolverConfig`, the VAE's from
:class:`~polyreg_cnf.models.vae.CNFVAE`, the regularizers' from their callbacks. The network
group is the flow's own config, :class:`~polyreg_cnf.engine.flow_config.FlowConfig`
(:data:`FlowOptions`): its fields are the ``network`` flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from polyreg_cnf.app.options import default_of, option
from polyreg_cnf.app.run_logging import LOGGER_KINDS
from polyreg_cnf.callbacks import KineticRegularizer, PolynomialTrajectoryRegularizer
from polyreg_cnf.callbacks.polynomial import POLY_PRESETS
from polyreg_cnf.callbacks.selection import TEST_CHECKPOINTS
from polyreg_cnf.engine.amortized import POSTERIORS
from polyreg_cnf.engine.flow_config import FlowConfig
from polyreg_cnf.engine.solver_config import METHODS, SolverConfig
from polyreg_cnf.engine.strategies import BACKPROP_KINDS, Adjoint, Auto
from polyreg_cnf.models import CNFDensityEstimator
from polyreg_cnf.models.schedule import LR_SCHEDULES
from polyreg_cnf.models.vae import ARCHITECTURES, CNFVAE

__all__ = ["POLY_PRESET_NAMES", "SOLVER_METHODS", "DataOptions", "FlowOptions",
           "HardwareOptions", "KineticOptions", "OdeOptions", "OutputOptions", "PolyOptions",
           "TrainingOptions", "VAEOptions"]

#: The named settings of the polynomial regularizer (``--poly-preset``).
POLY_PRESET_NAMES = tuple(POLY_PRESETS)
#: Every torchdiffeq method the solver accepts (torchdiffeq's registry).
SOLVER_METHODS = METHODS
#: The network group (``--hidden-dims``, ``--T``, ``--trace``, ...) is the flow's own config.
FlowOptions = FlowConfig


def _density(name: str) -> Any:
    return default_of(CNFDensityEstimator, name)


def _vae(name: str) -> Any:
    return default_of(CNFVAE, name)


def _solver(name: str) -> Any:
    return default_of(SolverConfig, name)


@dataclass(frozen=True)
class DataOptions:
    """Where the data comes from (``--data`` itself is :attr:`RunConfig.data`)."""

    data_dir: str = option("data", "root folder of the standard data files")
    download: bool = option(False, "download missing standard files (checksum-verified)")
    columns: str | None = option(None, "your table: comma-separated column names or indices "
                                       "to use")
    drop_nonfinite: bool = option(False, "your table: drop rows with NaN/inf instead of "
                                         "refusing them")




@dataclass(frozen=True)
class VAEOptions:
    """The VAE with a CNF posterior (``--model vae``)."""

    posterior: str = option(_vae("posterior"), "amortized low-rank CNF (FFJORD), plain CNF, "
                            "or no flow (plain VAE)", choices=POSTERIORS)
    z_dim: int = option(_vae("z_dim"), "latent dimension", low=1)
    rank: int = option(_vae("rank"), "rank of the amortized weight updates", low=1)
    warmup_epochs: int = option(_vae("warmup_epochs"), "KL warm-up: beta goes from 0 to 1 over "
                                "this many epochs", low=0)
    is_samples: int = option(_vae("is_samples"), "importance samples for the test NLL (0: skip)",
                             low=0)
    val_is_samples: int = option(_vae("val_is_samples"), "importance samples for the validation "
                                 "NLL (0: -ELBO)", low=0)
    is_chunk: int = option(_vae("is_chunk"), "importance samples evaluated at once (bounds "
                           "memory)", low=1)
    feature_dim: int = option(_vae("feature_dim"), "width of the encoder feature", low=1)
    architecture: str = option(_vae("architecture"), "encoder/decoder: gated convolutions, MLP, "
                               "or auto (conv for images of 16 x 16 and larger)",
                               choices=ARCHITECTURES)
    mlp_hidden: int = option(_vae("mlp_hidden"), "hidden width of the MLP encoder/decoder", low=1)


@dataclass(frozen=True)
class OdeOptions:
    """How each block's ODE is solved and differentiated (paper: dopri5, train 1e-4, eval
    1e-5). Defaults are :class:`~polyreg_cnf.engine.solver_config.SolverConfig`'s and its backprop
    strategies'."""

    solver: str = option(_solver("method"), "torchdiffeq method", choices=SOLVER_METHODS)
    step_size: float | None = option(None, "fixed-grid solvers only", low=0.0, strict=True)
    atol: float = option(_solver("atol"), "absolute tolerance while training", low=0.0,
                         strict=True)
    rtol: float = option(_solver("rtol"), "relative tolerance while training", low=0.0,
                         strict=True)
    eval_atol: float = option(_solver("eval_atol"), "absolute tolerance in evaluation", low=0.0,
                              strict=True)
    eval_rtol: float = option(_solver("eval_rtol"), "relative tolerance in evaluation", low=0.0,
                              strict=True)
    # Evaluation solver apart from the training one (issue 28): scores never come from the grid
    # a model was trained on unless asked for.
    eval_solver: str = option(_solver("eval_method"), "method of every evaluation solve "
                              "(validation, test), whatever --solver trains with",
                              choices=SOLVER_METHODS)
    eval_steps: int | None = option(_solver("eval_steps"), "equal steps over each block's "
                                    "[0, T] of a fixed-grid --eval-solver", low=1)
    backprop: str = option(_solver("backprop").kind, "gradients: auto (direct backprop while its "
                           "memory fits --memory-share of the free memory, else memory-bounded: "
                           "step checkpoints for penalised solves, the adjoint for others), "
                           "direct (through the solver), adjoint, or checkpoint (one recomputed "
                           "step at a time)", choices=BACKPROP_KINDS)
    memory_share: float | None = option(default_of(Auto, "memory_share"), "--backprop auto: share "
                                        "of free memory direct backprop may use (default 0.25 "
                                        "on CPU, 0.5 on CUDA)", low=0.0, strict=True)
    adjoint_carry_step: bool = option(default_of(Adjoint, "carry"), "restart-free adjoint "
                                      "(--no-adjoint-carry-step: torchdiffeq's stock adjoint)")
    seminorm: bool = option(default_of(Adjoint, "seminorm"), "seminorm adjoint (fewer backward "
                            "NFE)")
    max_nfe: int | None = option(_solver("max_nfe"), "fail a forward solve that needs more "
                                 "evaluations than this", low=1)


@dataclass(frozen=True)
class PolyOptions:
    """The trajectory polynomial regularizer (``--reg poly``)."""

    poly_preset: str = option("paper", "named setting of coef, K and m (paper: 5, 2, 1); the "
                                       "three flags below override it", choices=POLY_PRESET_NAMES)
    poly_coef: float | None = option(None, "weight of the penalty (default: the preset's)",
                                     low=0.0)
    poly_samples: int | None = option(None, "interior time points K per solve (default: the "
                                            "preset's)", low=0)
    poly_order: int | None = option(None, "polynomial degree m (default: the preset's)", low=0)
    poly_start_step: int = option(default_of(PolynomialTrajectoryRegularizer, "start_step"),
                                  "training step the penalty starts at (off before it)", low=0)

    def settings(self) -> dict[str, float | int]:
        """``coef``, ``num_samples`` and ``order`` (the preset's, overridden where given) and
        ``start_step``."""
        given = {"coef": self.poly_coef, "num_samples": self.poly_samples,
                 "order": self.poly_order}
        return {**POLY_PRESETS[self.poly_preset],
                **{k: v for k, v in given.items() if v is not None},
                "start_step": self.poly_start_step}


@dataclass(frozen=True)
class KineticOptions:
    """The RNODE kinetic regularizer (``--reg kinetic``)."""

    kinetic_coef: float = option(default_of(KineticRegularizer, "kinetic_coef"),
                                 "weight of the kinetic energy", low=0.0)
    jacobian_coef: float = option(default_of(KineticRegularizer, "jacobian_coef"),
                                  "weight of the Jacobian Frobenius norm", low=0.0)


@dataclass(frozen=True)
class TrainingOptions:
    """Optimisation and evaluation."""

    lr: float = option(_density("lr"), "learning rate", low=0.0, strict=True)
    weight_decay: float = option(_density("weight_decay"), "weight decay", low=0.0)
    lr_schedule: str = option(_density("lr_schedule"),
                              "learning rate over the training steps: constant, or "
                                          "cosine from --lr down to 0", choices=LR_SCHEDULES)
    batch_size: int = option(512, "training batch size", low=1)
    eval_batch_size: int | None = option(None, "evaluation batch size (default: the data "
                                               "set's)", low=1)
    max_steps: int | None = option(None, "training steps (default 1000 unless --max-epochs)",
                                   low=1)
    max_epochs: int | None = option(None, "training epochs", low=1)
    val_every: int | None = option(None, "validate every N training steps (default: once per "
                                         "epoch; your table: once per epoch, within 10-200 "
                                         "steps; tabular presets: 200)", low=1)
    early_stop_patience: int = option(0, "stop after N validations without a lower validation "
                                         "NLL (0: off; presets: tabular sets 30, your table 20)",
                                      low=0)
    lr_drop: float = option(1.0, "multiply the learning rate by this after a third and again "
                                 "after two thirds of --early-stop-patience validations without "
                                 "a lower validation NLL (1: off; presets: tabular sets and "
                                 "your table 0.1, as FFJORD)", low=0.0, strict=True)
    limit_val_batches: float = option(1.0, "fraction (<= 1) or number of validation batches",
                                      low=0.0)
    seed: int = option(0, "random seed (data split, initialisation, noise)")
    test: bool = option(True, "final test evaluation (--no-test: skip it)")
    test_ckpt: str = option("best", "weights the final test uses: best (lowest validation NLL; "
                                    "the last weights when no validation ran) or last",
                            choices=TEST_CHECKPOINTS)


@dataclass(frozen=True)
class HardwareOptions:
    """Where the run trains."""

    accelerator: str = option("auto", "cpu, gpu, auto, ...")
    devices: str = option("1", "number of devices, or 'auto'")
    strategy: str = option("auto", "auto, ddp, ddp_spawn, ...")
    num_nodes: int = option(1, "number of nodes", low=1)
    num_workers: int = option(0, "data-loader worker processes", low=0)
    threads: int | None = option(None, "intra-op CPU threads per process (default on CPU: 1, "
                                       "fastest for small CNFs)", low=1)


@dataclass(frozen=True)
class OutputOptions:
    """Logs, plots, checkpoints and the terminal."""

    logger: str = option("auto", "auto: W&B (offline unless logged in) when installed; every "
                                 "kind but none also writes run_dir/metrics.csv",
                         choices=LOGGER_KINDS)
    plot_every: int = option(500, "2-D data: density and trajectory PNGs every N steps and at "
                                  "the end (0: off)", low=0)
    output_dir: str = option("runs", "folder of the run folders")
    run_name: str | None = option(None, "run folder name (default: model-data-reg-seed)")
    ckpt_every: int = option(500, "save a checkpoint every N training steps (0: only on "
                                  "interrupt and at the end)", low=0)
    verbose: bool = option(False, "show Lightning's informational messages and library "
                                  "warnings")
    progress: bool | None = option(None, "progress bar with live NFE and penalty (default: on "
                                         "in a terminal)")

