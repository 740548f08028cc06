r"""Amortized low-rank ODE nets and the flow posterior of a CNF-VAE.

In FFJORD's VAE experiments the dynamics of the approximate posterior depend on the data point:
every layer of the MLP vector field gets a per-sample low-rank change of its weight and a
per-sample bias, computed by linear heads from the encoder's feature vector h.

Reference: W. Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
Generative Models", ICLR 2019, section 4.2 ("Variational autoencoders").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from polyreg_cnf.engine._checks import check_int, check_ints
from polyreg_cnf.engine.cnf import CNF
from polyreg_cnf.engine.factor_grad import FactorGrad, anchor, factor_bmm
from polyreg_cnf.engine.flow_config import FlowConfig
from polyreg_cnf.engine.forward_divergence import LayerJacobian
from polyreg_cnf.engine.nets import NONLINEARITIES, ODENet
from polyreg_cnf.engine.solver_config import SolverConfig

__all__ = ["POSTERIORS", "AmortizedODENet", "FlowPosterior", "LayerFactors", "LowRankContext",
           "low_rank_linear"]

#: Kinds of approximate posterior: low-rank amortized CNF, one shared CNF, or none (Gaussian).
POSTERIORS = ("amortized", "cnf", "gaussian")


def low_rank_linear(u: Tensor, weight: Tensor, bias: Tensor, U: Tensor, V: Tensor,
                    c: Tensor, scale: float = 1.0,
                    grads: tuple[FactorGrad | None, FactorGrad | None] = (None, None)
                    ) -> Tensor:
    r"""A linear layer with a per-sample rank-r weight update and a per-sample bias.

    .. math:: y_b = (W + s\, U_b V_b^\top)\, u_b + a + c_b

    computed as :math:`W u_b + (s\, u_b^\top V_b) U_b^\top + a + c_b`, i.e. without forming the
    per-sample matrix (cost O(r (n_in + n_out)) per sample instead of O(n_in n_out)). The scale
    s multiplies the small projected vector (B, r), never the factors: U and V may be strided
    views of a larger tensor and are read in place (``bmm`` takes any batch stride), so an
    evaluation copies nothing of their size.

    Args:
        u: Inputs, shape (B, n_in).
        weight: Shared weight W, shape (n_out, n_in).
        bias: Shared bias a, shape (n_out,).
        U: Per-sample left factors, shape (B, n_out, r).
        V: Per-sample right factors, shape (B, n_in, r).
        c: Per-sample biases, shape (B, n_out).
        scale: The scalar s.
        grads: ``(U's, V's)`` :class:`FactorGrad` handles (see :func:`factor_bmm`), or None.

    Returns:
        Shape (B, n_out).
    """
    projected = factor_bmm(u.unsqueeze(1), V, grads[1])  # (B, 1, r)
    if scale != 1.0:
        projected = projected * scale
    update = factor_bmm(projected, U, grads[0], transpose=True).squeeze(1)
    return F.linear(u, weight, bias) + update + c


def low_rank_layer(t: Tensor, x: Tensor, weight: Tensor, bias: Tensor, U: Tensor, V: Tensor,
                   c: Tensor, scale: float = 1.0, grads: tuple[Any, Any] = (None, None)
                   ) -> tuple[Tensor, LayerJacobian]:
    r"""Amortized concat layer :math:`y_b = (W + s\, U_b V_b^\top) [t; x_b] + a + c_b`.

    Jacobian :math:`W_{:, 1:} + s\, U_b (V_{b, 1:})^\top` (a view of V: nothing copied).
    Same operations as :class:`AmortizedODENet`'s layers; with
    ``grads`` the factors' gradients are gathered over the solve's evaluations
    (:func:`~polyreg_cnf.engine.factor_grad.factor_bmm`).
    """
    tt = t.to(x.dtype).expand(x.shape[0], 1)
    y = low_rank_linear(torch.cat([tt, x], dim=1), weight, bias, U, V, c, scale, grads)
    return y, LayerJacobian(weight[:, 1:], U, V, scale, grads)


class LayerFactors(NamedTuple):
    """One layer's per-sample factors, the scale s of its update s U V^T, and (while
    gradients are on, for the forward-mode divergence) the handles of U's and V's gathered
    gradients."""

    U: Tensor
    V: Tensor
    c: Tensor
    scale: float
    grads: tuple[FactorGrad | None, FactorGrad | None] = (None, None)


class LowRankContext(tuple):
    """:meth:`AmortizedODENet.prepare_context`'s result: the flat factors (a tuple of views of
    the context, what the adjoint differentiates) and their :class:`FactorGrad` handles."""

    grads: tuple[FactorGrad | None, ...] = ()


class AmortizedODENet(nn.Module):
    r"""MLP vector field :math:`f(t, z; h)` whose every layer is amortized on the encoder.

    Each layer reads the time as an extra input (concat layer, :math:`u = [t; x]`) and computes

    .. math:: y_b = (W + U_b V_b^\top) u_b + a + c_b, \qquad
              (U_b, V_b, c_b) = \text{unpack}(\text{context}_b)

    with a nonlinearity between layers. The net owns the shared :math:`W, a`; the per-sample
    factors arrive flattened in ONE tensor ``context`` of shape (B, :attr:`context_size`) (made
    by the head of :meth:`make_head` from h); a CNF block splits it once per solve
    (:meth:`prepare_context`) and hands the views to the adjoint, so gradients reach the
    encoder through it. The update is scaled by
    :math:`1/\sqrt{r\, n_{in}}` (:math:`V_b` by :math:`1/\sqrt{n_{in}}`, :math:`U_b` by
    :math:`1/\sqrt{r}`) so that it starts at the size of an ordinary layer's output whatever
    the width and rank.

    Reference: Grathwohl et al., FFJORD, ICLR 2019 (low-rank amortized CNF posterior).

    Args:
        dim: Latent dimension D.
        hidden_dims: Hidden widths (published: 1024-1024 for MNIST, 512-512 Omniglot/Frey).
        rank: Rank r of each per-sample weight update (published: 64 MNIST, 20 otherwise).
        nonlinearity: A name of :data:`polyreg_cnf.engine.nets.NONLINEARITIES` (``"softplus"``,
            ``"tanh"``, ...).

    Example:
        >>> net = AmortizedODENet(4, (8,), rank=2)
        >>> head = net.make_head(16)
        >>> net(torch.tensor(0.0), torch.zeros(3, 4), head(torch.randn(3, 16))).shape
        torch.Size([3, 4])
    """

    def __init__(self, dim: int, hidden_dims: Sequence[int] = (64, 64), rank: int = 8,
                 nonlinearity: str = "softplus") -> None:
        super().__init__()
        check_int("dim", dim)
        hidden_dims = check_ints("hidden_dims", hidden_dims)
        check_int("rank", rank)
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}; valid: "
                             f"{', '.join(NONLINEARITIES)}")
        self.dim = dim
        self.rank = rank
        widths = (dim, *hidden_dims, dim)
        # (n_in, n_out) per layer; n_in counts the time input of the concat layer.
        self.shapes = [(a + 1, b) for a, b in zip(widths[:-1], widths[1:])]
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in self.shapes)
        self.act = NONLINEARITIES[nonlinearity]()

    @property
    def context_size(self) -> int:
        """Length P of one sample's flattened parameters: sum of r (n_in + n_out) + n_out."""
        return sum(self.rank * (n_in + n_out) + n_out for n_in, n_out in self.shapes)

    def make_head(self, feature_dim: int) -> nn.Linear:
        """The linear head h -> context of this net (one per CNF block)."""
        check_int("feature_dim", feature_dim)
        return nn.Linear(feature_dim, self.context_size)

    def prepare_context(self, context: Tensor) -> LowRankContext:
        r"""Split ``context`` (B, P) into the flat factors :math:`(U_1, V_1, c_1, \dots, c_L)`.

        Views of ``context`` made by ONE split (U (B, n_out, r), V (B, n_in, r), c (B, n_out)
        per layer, unscaled), so a solve does this once and every evaluation reads them in
        place: the backward pass sums each factor's gradient over the evaluations and writes
        the context's gradient once, instead of one context-sized buffer per evaluation and
        factor. A CNF block calls it once per solve and hands the result to :meth:`forward`
        and, as the tensors to differentiate, to the adjoint.
        """
        shaped = self._split(context)
        out = LowRankContext(shaped)
        if torch.is_grad_enabled() and context.requires_grad:
            # U and V of every layer get a handle for gathered gradients; c's gradient is
            # (B, n_out) per evaluation and is left to autograd.
            out.grads = tuple(anchor(f) if i % 3 != 2 else None for i, f in enumerate(shaped))
        return out

    def _split(self, context: Tensor) -> list[Tensor]:
        if not isinstance(context, Tensor) or context.ndim != 2 \
                or context.shape[1] != self.context_size:
            got = tuple(context.shape) if isinstance(context, Tensor) else context
            raise ValueError(f"context must have shape (B, {self.context_size}), got {got!r}")
        B, r = context.shape[0], self.rank
        sizes = [n for n_in, n_out in self.shapes for n in (n_out * r, n_in * r, n_out)]
        parts = context.split(sizes, dim=1)
        shaped = []
        for i, (n_in, n_out) in enumerate(self.shapes):
            U, V, c = parts[3 * i:3 * i + 3]
            shaped += [U.reshape(B, n_out, r), V.reshape(B, n_in, r), c]
        return shaped

    def unpack(self, context: Tensor | Sequence[Tensor]) -> list[LayerFactors]:
        r""":class:`LayerFactors` per layer, from ``context`` (B, P) or from
        :meth:`prepare_context`.

        The layer's update is :math:`s\, U_b V_b^\top` with :math:`s = 1/\sqrt{r\, n_{in}}`
        (the scaling described above, applied by :func:`low_rank_linear` to a (B, r) tensor
        instead of to the factors).
        """
        factors = self._split(context) if isinstance(context, Tensor) \
            else self._check_factors(context)
        grads = getattr(factors, "grads", ()) or (None,) * len(factors)
        return [LayerFactors(factors[3 * i], factors[3 * i + 1], factors[3 * i + 2],
                             1.0 / (math.sqrt(self.rank) * math.sqrt(n_in)),
                             (grads[3 * i], grads[3 * i + 1]))
                for i, (n_in, _) in enumerate(self.shapes)]

    def _check_factors(self, factors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        if not isinstance(factors, LowRankContext):
            factors = tuple(factors)
        r = self.rank
        want = [s for n_in, n_out in self.shapes for s in ((n_out, r), (n_in, r), (n_out,))]
        got = [tuple(f.shape[1:]) if isinstance(f, Tensor) else f for f in factors]
        if len(factors) != len(want) or any(g != w for g, w in zip(got, want)) \
                or len({f.shape[0] for f in factors}) != 1:
            raise ValueError(f"factors must be prepare_context's tuple, per-sample shapes "
                             f"{want}, got {got}")
        return factors

    @property
    def forward_mode_native(self) -> bool:
        """Whether this is AmortizedODENet itself (no subclass)."""
        return type(self) is AmortizedODENet

    def forward_mode_matches(self) -> bool:
        """Whether :meth:`forward_mode_layers` computes what :meth:`forward` does."""
        cls = type(self)
        return (cls.forward is AmortizedODENet.forward and cls.unpack is AmortizedODENet.unpack
                and cls.prepare_context is AmortizedODENet.prepare_context
                and all(type(layer) is nn.Linear for layer in self.layers))

    def forward_mode_layers(self, t: Tensor, z: Tensor, context: Tensor | Sequence[Tensor] | None
                            ) -> list[Callable[[Tensor], tuple[Tensor, LayerJacobian]]]:
        """The layers at time ``t`` for the state ``z`` (B, D) and ``context`` (B, P) or its
        :meth:`prepare_context` factors, as functions ``x -> (value, Jacobian)``
        (:func:`low_rank_layer`).

        Raises:
            ValueError: No context, or one of another batch than ``z``'s.
        """
        factors = None if context is None else self.unpack(context)
        if factors is None or factors[0][0].shape[0] != z.shape[0]:
            shapes = (None if context is None else tuple(context.shape)
                      if isinstance(context, Tensor) else [tuple(x.shape) for x in context])
            raise ValueError(f"an AmortizedODENet needs a context of shape ({z.shape[0]}, "
                             f"{self.context_size}) or its prepare_context factors, got "
                             f"{shapes}")
        return [(lambda x, lin=lin, p=p: low_rank_layer(t, x, lin.weight, lin.bias, *p))
                for lin, p in zip(self.layers, factors)]

    def forward(self, t: Tensor, z: Tensor, context: Tensor | Sequence[Tensor]) -> Tensor:
        """dz/dt for each sample under its own parameters; z (B, D), context (B, P) or the
        factors of :meth:`prepare_context`."""
        params = self.unpack(context)
        if params[0][0].shape[0] != z.shape[0]:
            raise ValueError(f"context and z need the same batch size, got "
                             f"{params[0][0].shape[0]} and {z.shape[0]}")
        tt = t.to(z.dtype).expand(z.shape[0], 1)
        for i, (layer, f) in enumerate(zip(self.layers, params)):
            # Plain products (no gathered gradients): the reverse-mode trace differentiates
            # this forward twice.
            z = low_rank_linear(torch.cat([tt, z], dim=1), layer.weight, layer.bias, f.U, f.V,
                                f.c, f.scale)
            if i < len(self.layers) - 1:
                z = self.act(z)
        return z


class FlowPosterior(nn.Module):
    r"""Pushes :math:`z_0 \sim q_0(z_0 | x)` through K CNF blocks: :math:`z_K = F_x(z_0)`.

    .. math:: \log q(z_K | x) = \log q_0(z_0 | x) - \log\left|\det \frac{\partial z_K}
              {\partial z_0}\right|

    ``posterior`` selects the dynamics:

    - ``"amortized"``: :class:`AmortizedODENet` per block, its parameters computed from h by a
      per-block linear head (FFJORD's VAE);
    - ``"cnf"``: a plain :class:`polyreg_cnf.ODENet` per block, shared by all data points (h is
      ignored);
    - ``"gaussian"``: no flow, :math:`z_K = z_0` (the plain VAE).

    Args:
        posterior: One of :data:`POSTERIORS`.
        dim: Latent dimension.
        feature_dim: Width of the encoder feature h (published: 256).
        flow: The blocks (:class:`FlowConfig`; default its defaults): hidden widths (of
            ``dim``), nonlinearity, number of blocks (ignored for ``"gaussian"``), end time,
            trace estimators, probe and divergence. The nets are concat layers whatever
            ``layer_type`` says (an amortized layer is one).
        solver: Solver settings of every block.
        rank: Rank of the amortized updates (``"amortized"`` only, where it is required).
        **flow_fields: Fields of ``flow`` as flat keywords (``T=0.5``), over ``flow``'s.
    """

    def __init__(self, posterior: str, dim: int, feature_dim: int,
                 flow: FlowConfig | None = None, solver: SolverConfig | None = None,
                 rank: int | None = None, **flow_fields: Any) -> None:
        super().__init__()
        if posterior not in POSTERIORS:
            raise ValueError(f"unknown posterior {posterior!r}; valid: {', '.join(POSTERIORS)}")
        flow = FlowConfig.resolve(flow, "FlowPosterior", **flow_fields)
        if posterior == "amortized" and rank is None:
            raise TypeError("FlowPosterior('amortized', ...) needs rank=, the rank of the "
                            "amortized weight updates")
        self.posterior = posterior
        self.blocks = nn.ModuleList()
        self.heads = nn.ModuleList()
        if posterior == "gaussian":
            return
        hidden_dims = flow.widths(dim)
        for _ in range(flow.num_blocks):
            if posterior == "amortized":
                net: nn.Module = AmortizedODENet(dim, hidden_dims, rank, flow.nonlinearity)
                self.heads.append(net.make_head(feature_dim))
            else:
                net = ODENet(dim, hidden_dims, "concat", flow.nonlinearity)
            self.blocks.append(CNF(net, flow, solver))

    def forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(z_K, log|det dz_K/dz_0|)`` with shapes (B, D) and (B,)."""
        ladj = torch.zeros(z0.shape[0], dtype=z0.dtype, device=z0.device)
        z = z0
        for i, block in enumerate(self.blocks):
            # Each block gets its own per-sample parameters; the CNF block passes them to the
            # adjoint as an extra parameter so the encoder receives their gradients.
            context = self.heads[i](h) if self.posterior == "amortized" else None
            z, block_ladj = block(z, context=context)
            ladj = ladj + block_ladj
        return z, ladj
