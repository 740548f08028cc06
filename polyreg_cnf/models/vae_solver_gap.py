r"""``val/solver_gap`` of the CNF-VAE: how far the training solver's ELBO is from the evaluation
solver's, on a fixed subset of the validation images.

The quantity is the per-image single-sample ELBO (the log importance weight)

.. math:: w(x; \epsilon) = \log p(x|z_K) + \log p(z_K) - \log q_0(z_0|x)
          + \log\left|\det \partial z_K / \partial z_0\right|, \qquad
          z_0 = \mu(x) + \sigma(x)\,\epsilon,\; z_K = F_x(z_0),

and the gap is the mean over images of :math:`|w_{train\,solver} - w_{eval\,solver}|` for the
same :math:`\epsilon`. Why the ELBO and not the posterior's log-density correction
:math:`\log|\det J|` alone: what a user reads (``val/neg_elbo``, ``test/neg_elbo``, the IS NLL)
is built from these weights, and the solver's error reaches them through :math:`z_K` too (the
decoder's likelihood and the prior), which the correction alone misses. The IS NLL is
:math:`-\operatorname{logsumexp}_s w_s + \log S`, so its solver error is at most the largest
per-sample weight error.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from polyreg_cnf.engine._checks import check_int
from polyreg_cnf.engine.ode import training_solves, uncounted

__all__ = ["NOISE_SEED", "ELBOModel", "VAESolverGap", "elbo_solver_gap"]

#: Seed of the base noise the gap's images are solved with (the same every validation).
NOISE_SEED = 0


class ELBOModel(Protocol):
    """What :func:`elbo_solver_gap` reads of a :class:`~polyreg_cnf.models.vae.CNFVAE`."""

    flow: nn.Module

    def elbo_terms(self, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(log p(x|z_K), KL part)`` per image for one posterior sample each."""
        ...


def elbo_solver_gap(model: ELBOModel, x: Tensor, eps: Tensor) -> Tensor:
    r"""Per-image :math:`|w_{train\,solver}(x; \epsilon) - w_{eval\,solver}(x; \epsilon)|`.

    Both solves run as the model's mode has it otherwise (in validation: eval mode, the
    evaluation trace), without gradients and without counting their evaluations, so only the
    solver differs.

    Args:
        model: The VAE (:class:`~polyreg_cnf.models.vae.CNFVAE`).
        x: Flattened images (B, D).
        eps: Base noise (B, z_dim), shared by the two solves.

    Returns:
        Shape (B,), nats.
    """
    # Lightning evaluates under inference mode; the CNF's trace needs autograd inside the
    # solve (see CNFVAE._evaluate).
    with torch.inference_mode(False), torch.no_grad(), uncounted(model.flow):
        x = x.clone()
        log_px, kl = model.elbo_terms(x, eps)
        with training_solves(model.flow):
            coarse_px, coarse_kl = model.elbo_terms(x, eps)
    return ((coarse_px - coarse_kl) - (log_px - kl)).abs()


class VAESolverGap(nn.Module):
    """The running ``val/solver_gap`` of one validation: the first ``rows`` validation images of
    each process (validation loaders do not shuffle, so the same images every validation), each
    with the same base noise every validation (row i's noise is row i of a table drawn from
    :data:`NOISE_SEED`, whatever the batch size).

    Args:
        rows: Images measured per process and validation (0: never measured).

    Example:
        >>> gap = VAESolverGap(rows=5)
        >>> gap.start(); [gap.take(3), gap.take(3), gap.take(3)]  # over batches of 3
        [3, 2, 0]
    """

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows = check_int("solver_gap_rows", rows, minimum=0)
        self.metric = MeanMetric()
        self._seen = 0
        self._noise: Tensor | None = None

    def start(self) -> None:
        """A validation begins: count from its first image again."""
        self._seen = 0

    def take(self, batch_rows: int) -> int:
        """How many of the next batch's first rows are measured (and counts them taken)."""
        take = max(min(self.rows - self._seen, batch_rows), 0)
        self._seen += take
        return take

    def noise(self, take: int, z_dim: int, like: Tensor) -> Tensor:
        """Base noise (take, z_dim) of the rows just taken: rows ``seen - take`` to ``seen`` of
        the fixed table, on ``like``'s device in its dtype."""
        if self._noise is None or self._noise.shape[1] != z_dim \
                or self._noise.device != like.device or self._noise.dtype != like.dtype:
            table = torch.randn(self.rows, z_dim, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(NOISE_SEED))
            self._noise = table.to(like.device, like.dtype)
        return self._noise[self._seen - take:self._seen]

    def finish(self) -> float | None:
        """The validation's gap, or None when it measured no image."""
        return float(self.metric.compute()) if self._seen else None
