r"""Variational autoencoder with a continuous-normalizing-flow posterior (FFJORD's VAE).

.. math:: -\text{ELBO}(x) = \mathbb{E}_{q_0(z_0|x)}\Big[-\log p(x|z_K)
          + \underbrace{\log q_0(z_0|x) - \log|\det \partial z_K/\partial z_0|
          - \log p(z_K)}_{\text{KL part}}\Big], \qquad z_K = F_x(z_0)

References:
    W. Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
    Generative Models", ICLR 2019 (CNF posterior, low-rank amortization, hyperparameters).
    R. van den Berg et al., "Sylvester Normalizing Flows for Variational Inference", UAI 2018
    (gated convolutional encoder and decoder).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from typing_extensions import override

from polyreg_cnf.callbacks.step_log import log_step
from polyreg_cnf.engine._checks import check_int, check_ints, check_number
from polyreg_cnf.engine.amortized import POSTERIORS, FlowPosterior
from polyreg_cnf.engine.cnf import standard_normal_logprob
from polyreg_cnf.engine.flow_config import FlowConfig
from polyreg_cnf.engine.solver_config import SolverConfig
from polyreg_cnf.models.schedule import check_schedule
from polyreg_cnf.models.system import FlowSystem
from polyreg_cnf.models.vae_nets import (
    GatedConv2d,
    GatedConvTranspose2d,
    conv_decoder,
    conv_encoder,
    mlp,
)
from polyreg_cnf.models.vae_solver_gap import VAESolverGap, elbo_solver_gap

__all__ = [
    "ARCHITECTURES",
    "LIKELIHOODS",
    "CNFVAE",
    "GatedConv2d",
    "GatedConvTranspose2d",
    "bernoulli_log_prob",
    "categorical256_log_prob",
    "kl_warmup",
]

LIKELIHOODS = ("bernoulli", "categorical256")
ARCHITECTURES = ("auto", "conv", "mlp")
_LN2 = math.log(2.0)


# ---------------------------------------------------------------------------- maths
def bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    r"""Per-pixel :math:`\log \text{Bernoulli}(x; \sigma(\text{logits}))`, shape of ``x``."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none")


def categorical256_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    r"""Per-pixel log-probability of a 256-way categorical over grey levels.

    .. math:: \log p(x_d) = \log \operatorname{softmax}(\ell_d)_{k_d}, \qquad
              k_d = \operatorname{round}(255\, x_d)

    Args:
        logits: Shape (B, D, 256).
        x: Grey levels in [0, 1], shape (B, D).

    Returns:
        Shape (B, D).
    """
    levels = torch.round(x * 255).long().clamp_(0, 255)
    return logits.log_softmax(dim=-1).gather(-1, levels.unsqueeze(-1)).squeeze(-1)


def kl_warmup(epoch: int, batch_idx: int, num_batches: float, warmup_epochs: float) -> float:
    r"""KL weight :math:`\beta = \min(1, (\text{epoch} + \text{batch\_idx}/\text{num\_batches}) /
    \text{warmup\_epochs})`, rising linearly from 0; 1 when ``warmup_epochs`` is 0."""
    if warmup_epochs <= 0:
        return 1.0
    within = batch_idx / num_batches if 0 < num_batches < float("inf") else 0.0
    return min(1.0, (epoch + within) / warmup_epochs)


def _diag_normal_logprob(eps: Tensor, log_sigma: Tensor) -> Tensor:
    r""":math:`\log \mathcal{N}(\mu + \sigma\epsilon; \mu, \sigma^2)` summed over the last axis."""
    return -0.5 * (eps.square() + math.log(2 * math.pi)).sum(-1) - log_sigma.sum(-1)


# ---------------------------------------------------------------------------- the system
class CNFVAE(FlowSystem):
    r"""VAE whose approximate posterior is a (low-rank amortized) CNF, as in FFJORD.

    Encoder: :math:`x \mapsto (\mu, \log\sigma, h)`; :math:`z_0 = \mu + \sigma \odot \epsilon`;
    :math:`z_K = F_x(z_0)` through ``num_blocks`` CNF blocks (:class:`FlowPosterior`); decoder:
    :math:`z_K \mapsto` Bernoulli logits, or 256-way categorical logits per pixel. Training
    minimises

    .. math:: -\log p(x|z_K) + \beta\,[\log q_0(z_0|x) - \log|\det J| - \log p(z_K)]

    with :math:`\beta` rising linearly from 0 to 1 over ``warmup_epochs`` (from the trainer's
    epoch and batch index, so it resumes correctly from a checkpoint). Validation and test use
    :math:`\beta = 1`, the evaluation solver (``solver.eval_method``, dopri5 by default, at the
    evaluation tolerances, whatever the training method), the evaluation trace, and the
    importance-sampled log-likelihood with S samples :math:`z_K^s \sim q(\cdot|x)`

    .. math:: \log p(x) \approx \operatorname{logsumexp}_s\,[\log p(x|z_K^s) + \log p(z_K^s)
              - \log q(z_K^s|x)] - \log S,

    computed ``is_chunk`` samples at a time (memory grows with ``is_chunk`` x batch, not S).

    Logged: ``train/loss`` (the beta-weighted loss), ``train/neg_elbo``, ``train/recon``,
    ``train/kl``, ``train/beta``; ``val/neg_elbo``, ``val/nll`` (IS NLL when
    ``val_is_samples`` > 0, else the negative ELBO); ``test/neg_elbo``, ``test/is_nll`` (when
    ``is_samples`` > 0), ``test/nll`` (IS NLL or negative ELBO) and, for the categorical
    likelihood, ``test/bits_per_dim`` (of ``test/nll``) and ``test/neg_elbo_bits_per_dim``. All
    in nats per image; bits/dim = nats / (D ln 2). When the training solve differs from the
    evaluation solve in method or grid (:attr:`SolverConfig.evaluation_differs`) and the
    posterior is a flow, every validation also logs ``val/solver_gap``: the mean per-image
    |single-sample ELBO(training solver) - ELBO(evaluation solver)| with the same noise, over
    the first ``solver_gap_rows`` validation images of each process
    (:mod:`polyreg_cnf.models.vae_solver_gap` says why the ELBO); the run summary prints it.

    Args:
        image_shape: (C, H, W).
        likelihood: ``"bernoulli"`` (binary images) or ``"categorical256"`` (grey levels in
            [0, 1], class round(255 x)).
        z_dim: Latent dimension (published: 64).
        posterior: ``"amortized"``, ``"cnf"`` or ``"gaussian"`` (plain VAE baseline).
        flow: The posterior's blocks (:class:`~polyreg_cnf.engine.flow_config.FlowConfig`; a
            dict as checkpoints store it is read too); default :attr:`default_flow`, FFJORD's
            published MNIST posterior. Its nets are concat layers whatever ``layer_type`` says.
        solver: Solver settings (published: dopri5, train 1e-4, evaluation 1e-5).
        rank: Rank of the amortized weight updates (published: 64 MNIST, 20 otherwise).
        feature_dim: Width of the encoder feature h (published: 256).
        architecture: ``"conv"`` (gated convolutions; H and W multiples of 4), ``"mlp"``, or
            ``"auto"``: conv when H, W >= 16 are multiples of 4 (28 x 28, 28 x 20), else mlp.
        mlp_hidden: Hidden width of the MLP encoder/decoder.
        lr: Adamax learning rate (published: 5e-4).
        weight_decay: Adamax weight decay.
        lr_schedule: ``"constant"`` or ``"cosine"`` (see :mod:`polyreg_cnf.models.schedule`).
        warmup_epochs: Epochs over which beta rises from 0 to 1 (published: 100; 0 = none).
        is_samples: Importance samples S per test image (0 = skip the IS estimate).
        val_is_samples: Importance samples per validation image (0 = skip).
        is_chunk: Samples per image evaluated at once in the IS estimate.
        solver_gap_rows: Validation images per process ``val/solver_gap`` is measured on (0:
            never measured).
        **flow_fields: Fields of ``flow`` as flat keywords (``hidden_dims=(64,), T=0.5``), over
            ``flow``'s: the constructor of release 0.2 took them so, and its checkpoints load
            through them.

    Example:
        A small posterior: flat flow fields go over :attr:`default_flow` (``flow=`` replaces it
        whole):

        >>> vae = CNFVAE((1, 8, 8), z_dim=4, rank=2, feature_dim=16, mlp_hidden=32,
        ...              hidden_dims=(16,), num_blocks=1)
        >>> vae.architecture, vae.flow_config.T  # MLP below 16 x 16; default_flow's T
        ('mlp', 0.5)
        >>> log_px, kl = vae.elbo_terms(torch.rand(3, 64).round())
        >>> log_px.shape, kl.shape
        (torch.Size([3]), torch.Size([3]))
    """

    optimizer = torch.optim.Adamax
    #: The posterior of FFJORD's published MNIST VAE: two blocks of a 1024-1024 softplus net
    #: (concat layers), T = 0.5. ``train.py --model vae`` starts from it too.
    default_flow: ClassVar[FlowConfig] = FlowConfig(
        hidden_dims=(1024, 1024), layer_type="concat", nonlinearity="softplus", num_blocks=2,
        T=0.5)

    def __init__(self, image_shape: Sequence[int], likelihood: str = "bernoulli",
                 z_dim: int = 64, posterior: str = "amortized",
                 flow: FlowConfig | dict[str, Any] | None = None,
                 solver: SolverConfig | dict[str, Any] | None = None, rank: int = 64,
                 feature_dim: int = 256, architecture: str = "auto", mlp_hidden: int = 256,
                 lr: float = 5e-4, weight_decay: float = 0.0, lr_schedule: str = "constant",
                 warmup_epochs: float = 100, is_samples: int = 1000, val_is_samples: int = 0,
                 is_chunk: int = 10, solver_gap_rows: int = 1000, **flow_fields: Any) -> None:
        super().__init__()
        image_shape = tuple(image_shape)
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be three positive ints (C, H, W), got "
                             f"{image_shape!r}")
        check_ints("image_shape", image_shape)
        for name, value, valid in (("likelihood", likelihood, LIKELIHOODS),
                                   ("posterior", posterior, POSTERIORS),
                                   ("architecture", architecture, ARCHITECTURES)):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        flow = FlowConfig.resolve(flow, "CNFVAE", self.default_flow, **flow_fields)
        flow = dataclasses.replace(flow, hidden_dims=flow.widths(z_dim))
        for name, value, low in (("z_dim", z_dim, 1), ("feature_dim", feature_dim, 1),
                                 ("mlp_hidden", mlp_hidden, 1), ("is_samples", is_samples, 0),
                                 ("val_is_samples", val_is_samples, 0), ("is_chunk", is_chunk, 1),
                                 ("solver_gap_rows", solver_gap_rows, 0)):
            check_int(name, value, minimum=low)
        check_number("lr", lr, strict=True)
        check_number("weight_decay", weight_decay)
        self.lr_schedule = check_schedule(lr_schedule)
        check_number("warmup_epochs", warmup_epochs)
        solver = SolverConfig.for_model(solver)
        C, H, W = image_shape
        if architecture == "auto":
            architecture = "conv" if H >= 16 and W >= 16 and H % 4 == 0 and W % 4 == 0 \
                else "mlp"
        if architecture == "conv" and (H % 4 or W % 4):
            raise ValueError(f"architecture='conv' needs H and W multiples of 4, got "
                             f"image_shape={image_shape}")
        # Plain values only, so a checkpoint reloads without this package's classes.
        self.save_hyperparameters(dict(
            image_shape=list(image_shape), likelihood=likelihood, z_dim=z_dim,
            posterior=posterior, flow=flow.to_dict(), solver=solver.to_dict(), rank=rank,
            feature_dim=feature_dim, architecture=architecture, mlp_hidden=mlp_hidden, lr=lr,
            weight_decay=weight_decay, lr_schedule=lr_schedule, warmup_epochs=warmup_epochs,
            is_samples=is_samples, val_is_samples=val_is_samples, is_chunk=is_chunk,
            solver_gap_rows=solver_gap_rows))
        self.flow_config = flow
        self.image_shape = image_shape
        self.architecture = architecture
        self.likelihood = likelihood
        self.data_dim = C * H * W
        self.classes = 1 if likelihood == "bernoulli" else 256
        self.z_dim = z_dim
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.warmup_epochs = float(warmup_epochs)
        self.is_samples, self.val_is_samples, self.is_chunk = is_samples, val_is_samples, is_chunk

        if architecture == "conv":
            self.encoder = conv_encoder(C, H, W, feature_dim)
            self.decoder = conv_decoder(C, H, W, z_dim, self.classes)
        else:
            self.encoder = mlp([self.data_dim, mlp_hidden, feature_dim], last_act=True)
            self.decoder = mlp([z_dim, mlp_hidden, mlp_hidden, self.data_dim * self.classes],
                               last_act=False)
        self.q_mean = nn.Linear(feature_dim, z_dim)
        self.q_log_sigma = nn.Linear(feature_dim, z_dim)
        self.flow = FlowPosterior(posterior, z_dim, feature_dim, flow, solver, rank=rank)
        self.val_neg_elbo, self.val_nll = MeanMetric(), MeanMetric()
        self.test_neg_elbo, self.test_is_nll, self.test_nll = (MeanMetric(), MeanMetric(),
                                                               MeanMetric())
        self.test_bpd, self.test_elbo_bpd = MeanMetric(), MeanMetric()
        measured = solver.evaluation_differs and posterior != "gaussian"
        self.solver_gap = VAESolverGap(solver_gap_rows if measured else 0)
        #: The last validation's ``val/solver_gap`` (None before one measured it), for the run
        #: summary (printed after testing, which replaces the trainer's logged metrics).
        self.last_solver_gap: float | None = None

    # ------------------------------------------------------------------ model
    def _check(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"expected flattened images of shape (B, {self.data_dim}) for "
                             f"image_shape={self.image_shape}, got {tuple(x.shape)}")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Flattened images (B, C*H*W) -> ``(mu, log_sigma, h)`` of q_0(z_0|x) and the feature."""
        self._check(x)
        h = self.encoder(x.reshape(x.shape[0], *self.image_shape)
                         if self.architecture == "conv" else x)
        return self.q_mean(h), self.q_log_sigma(h), h

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, z_dim) -> logits: (B, D) Bernoulli, or (B, D, 256) categorical."""
        out = self.decoder(z)
        B = z.shape[0]
        if self.classes == 1:
            return out.reshape(B, self.data_dim)
        if out.ndim == 4:  # conv: (B, C*256, H, W) -> (B, C*H*W, 256)
            C, H, W = self.image_shape
            return out.reshape(B, C, 256, H, W).permute(0, 1, 3, 4, 2).reshape(B, -1, 256)
        return out.reshape(B, self.data_dim, 256)

    def log_likelihood(self, x: Tensor, logits: Tensor) -> Tensor:
        """:math:`\\log p(x|z)` summed over pixels, shape (B,)."""
        if self.likelihood == "bernoulli":
            return bernoulli_log_prob(logits, x).sum(-1)
        return categorical256_log_prob(logits, x).sum(-1)

    def log_weights(self, x: Tensor, mu: Tensor, log_sigma: Tensor, h: Tensor,
                    eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""One posterior sample per row: returns :math:`\log p(x|z_K)` and the KL part
        :math:`\log q_0(z_0|x) - \log|\det J| - \log p(z_K)`, each (B,).

        ``eps`` (B, z_dim) fixes the base noise :math:`z_0 = \mu + \sigma\epsilon`.
        """
        if eps is None:
            eps = torch.randn_like(mu)
        z0 = mu + log_sigma.exp() * eps
        zK, ladj = self.flow(z0, h)
        kl = _diag_normal_logprob(eps, log_sigma) - ladj - standard_normal_logprob(zK)
        return self.log_likelihood(x, self.decode(zK)), kl

    def elbo_terms(self, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(log p(x|z_K), KL part)`` per image for one posterior sample each, shapes (B,)."""
        mu, log_sigma, h = self.encode(x)
        return self.log_weights(x, mu, log_sigma, h, eps)

    @torch.no_grad()
    def importance_nll(self, x: Tensor, num_samples: int, chunk: int | None = None
                       ) -> tuple[Tensor, Tensor]:
        r"""Importance-sampled :math:`-\log p(x)` and the S-sample negative ELBO, each (B,).

        Both come from the same S log-weights :math:`w_s`: NLL :math:`= -(\operatorname{
        logsumexp}_s w_s - \log S)` and :math:`-\text{ELBO} = -\frac1S\sum_s w_s`, so NLL <=
        -ELBO per image (Jensen); the NLL's expectation decreases towards :math:`-\log p(x)` as
        S grows.

        Args:
            x: Flattened images (B, D).
            num_samples: S >= 1.
            chunk: Samples per image evaluated at once (default ``is_chunk``).
        """
        check_int("num_samples", num_samples)
        chunk = check_int("chunk", self.is_chunk if chunk is None else chunk)
        with torch.inference_mode(False), torch.no_grad():
            # Under inference mode (Lightning evaluation) the context made from h could not
            # enter the trace's autograd graph inside the solve: work on an ordinary copy.
            return self._importance_nll(x.clone(), num_samples, chunk)

    def _importance_nll(self, x: Tensor, num_samples: int, chunk: int) -> tuple[Tensor, Tensor]:
        mu, log_sigma, h = self.encode(x)
        B = x.shape[0]
        lse_parts, total = [], torch.zeros(B, dtype=mu.dtype, device=mu.device)
        for start in range(0, num_samples, chunk):
            s = min(chunk, num_samples - start)
            # Rows ordered (sample, image): row i * B + b is sample i of image b.
            log_px, kl = self.log_weights(x.repeat(s, 1), mu.repeat(s, 1),
                                          log_sigma.repeat(s, 1), h.repeat(s, 1))
            w = (log_px - kl).reshape(s, B)
            lse_parts.append(torch.logsumexp(w, dim=0))
            total = total + w.sum(dim=0)
        log_px_is = torch.logsumexp(torch.stack(lse_parts), dim=0) - math.log(num_samples)
        return -log_px_is, -total / num_samples

    @torch.no_grad()
    def sample(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        """Mean images of p(x|z) for z ~ N(0, I): (num, D) in [0, 1]."""
        z = torch.randn(num, self.z_dim, generator=generator, device=self.device)
        logits = self.decode(z)
        if self.classes == 1:
            return torch.sigmoid(logits)
        levels = torch.arange(256, dtype=logits.dtype, device=logits.device) / 255
        return logits.softmax(-1) @ levels

    # ------------------------------------------------------------------ Lightning
    def kl_weight(self, batch_idx: int) -> float:
        """Current beta from the trainer's epoch and batch (1 outside a fit)."""
        if self._trainer is None or not self.trainer.training:
            return 1.0
        return kl_warmup(self.current_epoch, batch_idx, self.trainer.num_training_batches,
                         self.warmup_epochs)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0]
        log_px, kl = self.elbo_terms(x)
        beta = self.kl_weight(batch_idx)
        loss = (beta * kl - log_px).mean()
        B = x.shape[0]
        log_step(self, {"train/loss": loss, "train/neg_elbo": (kl - log_px).mean(),
                        "train/beta": beta}, prog_bar=("train/neg_elbo",))
        self.log("train/recon", -log_px.mean().detach(), on_step=False, on_epoch=True,
                 batch_size=B)
        self.log("train/kl", kl.mean().detach(), on_step=False, on_epoch=True, batch_size=B)
        return loss

    def _evaluate(self, x: Tensor, samples: int) -> tuple[Tensor, Tensor | None]:
        """(negative ELBO, IS NLL or None) per image, with beta = 1."""
        # Lightning evaluates under inference mode; the CNF's trace needs autograd inside the
        # solve, and the per-sample context must be an ordinary tensor to enter that graph.
        if samples > 0:
            nll, neg_elbo = self.importance_nll(x, samples)
            return neg_elbo, nll
        with torch.inference_mode(False), torch.no_grad():
            log_px, kl = self.elbo_terms(x.clone())
            return kl - log_px, None

    @override
    def on_validation_epoch_start(self) -> None:
        self.solver_gap.start()

    @override
    def on_validation_epoch_end(self) -> None:
        gap = self.solver_gap.finish()
        if gap is not None:
            self.last_solver_gap = gap

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = batch[0]
        take = self.solver_gap.take(x.shape[0])
        if take:
            self.solver_gap.metric.update(elbo_solver_gap(
                self, x[:take], self.solver_gap.noise(take, self.z_dim, x)))
            self.log("val/solver_gap", self.solver_gap.metric, on_epoch=True)
        neg_elbo, nll = self._evaluate(x, self.val_is_samples)
        self.val_neg_elbo.update(neg_elbo)
        self.val_nll.update(neg_elbo if nll is None else nll)
        self.log("val/neg_elbo", self.val_neg_elbo, on_epoch=True)
        self.log("val/nll", self.val_nll, on_epoch=True, prog_bar=True)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        neg_elbo, nll = self._evaluate(batch[0], self.is_samples)
        self.test_neg_elbo.update(neg_elbo)
        self.log("test/neg_elbo", self.test_neg_elbo, on_epoch=True)
        if nll is not None:
            self.test_is_nll.update(nll)
            self.log("test/is_nll", self.test_is_nll, on_epoch=True)
        best = neg_elbo if nll is None else nll
        self.test_nll.update(best)
        self.log("test/nll", self.test_nll, on_epoch=True)
        if self.likelihood == "categorical256":
            self.test_bpd.update(best / (self.data_dim * _LN2))
            self.test_elbo_bpd.update(neg_elbo / (self.data_dim * _LN2))
            self.log("test/bits_per_dim", self.test_bpd, on_epoch=True)
            self.log("test/neg_elbo_bits_per_dim", self.test_elbo_bpd, on_epoch=True)

    def checkpoint_kind(self) -> tuple[str, dict[str, Any]]:
        return "vae", {"image_shape": list(self.image_shape), "z_dim": self.z_dim}

