"""Continuous normalizing flows: one CNF block and a stack of them.

Reference: W. Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
Generative Models", ICLR 2019.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polyreg_cnf.engine.flow_config import DIVERGENCE_MODES, TRACE_TYPES, FlowConfig
from polyreg_cnf.engine.forward_divergence import (
    compiled_field_and_divergence,
    field_and_divergence,
    supports_forward_divergence,
)
from polyreg_cnf.engine.observers import IntegrandObserver, active
from polyreg_cnf.engine.ode import ODEBlock, per_solve_context
from polyreg_cnf.engine.solver_config import SolverConfig
from polyreg_cnf.engine.trace import divergence_exact, hutchinson_with_vjp, sample_probe

__all__ = ["CNF", "DIVERGENCE_MODES", "TRACE_TYPES", "CNFStack", "standard_normal_logprob"]


def standard_normal_logprob(z: Tensor) -> Tensor:
    r"""Log density of N(0, I) summed over all but the first axis: shape (B,).

    Example:
        >>> standard_normal_logprob(torch.zeros(2, 3))  # -(3/2) log(2 pi)
        tensor([-2.7568, -2.7568])
    """
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * (flat.square().sum(dim=1) + flat.shape[1] * math.log(2 * math.pi))


class CNF(ODEBlock):
    r"""One continuous normalizing flow block.

    Solves the augmented system

    .. math:: \frac{dz}{dt} = f(t, z), \qquad \frac{d\ell}{dt} = \operatorname{tr}
              \frac{\partial f}{\partial z}, \qquad \ell(0) = 0

    from 0 to T and returns :math:`(z(T), \ell(T))`, where :math:`\ell(T) = \log|\det
    \partial z(T) / \partial z(0)|`. Hence :math:`\log p(x) = \log p_{base}(z(T)) + \ell(T)`;
    with ``reverse=True`` it maps back from T to 0 and returns the log-determinant of that map.

    Args:
        net: Vector field ``net(t, z)`` or ``net(t, z, context)``, z of shape (B, D).
        flow: The block's settings (the network fields are ``net``'s business and unused here):
            ``T`` (end time), ``train_T`` (learn it), ``trace`` (estimator while training:
            ``"hutchinson"``, one vector-Jacobian product with the probe fixed for the whole
            solve and redrawn for each solve, or ``"exact"``, D backward passes),
            ``eval_trace`` (in evaluation), ``noise`` (Hutchinson probe: ``"rademacher"`` or
            ``"gaussian"``) and ``divergence``. Defaults: :class:`FlowConfig`'s.
        solver: Solver settings.
        **flow_fields: Fields of ``flow`` given as flat keywords (``T=2.0, trace="exact"``),
            over ``flow``'s.

    The divergence: ``"reverse"``: reverse-mode autograd (:mod:`polyreg_cnf.engine.trace`; a
    training step is then a double backward), for any field. ``"forward"``: the tangents travel
    through the layers with the values (:mod:`polyreg_cnf.engine.forward_divergence`; one
    first-order backward), for the project's own nets. ``"compiled"``: the forward mode through
    ``torch.compile`` (one graph for every batch size; the first call compiles). ``"auto"``
    (default): forward mode where the net supports it, reverse mode otherwise
    (``benchmarks/results/engine_speed.md`` measures them). Solves that integrate RNODE's
    Jacobian term use reverse mode: it needs :math:`\epsilon^\top J`.

    Example:
        For linear dynamics :math:`f = A z` the flow is :math:`z(T) = e^{TA} z(0)` and
        :math:`\ell(T) = T \operatorname{tr} A`:

        >>> class Linear(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.A = nn.Parameter(torch.tensor([[0.5, 1.0], [0.0, -0.3]]))
        ...     def forward(self, t, z):
        ...         return z @ self.A.T
        >>> tight = SolverConfig(atol=1e-7, rtol=1e-7)
        >>> cnf = CNF(Linear(), FlowConfig(T=2.0, trace="exact"), tight)
        >>> z, ladj = cnf(torch.randn(4, 2))
        >>> ladj  # 2.0 * (0.5 - 0.3)
        tensor([0.4000, 0.4000, 0.4000, 0.4000], grad_fn=<...>)
        >>> x_back, ladj_back = cnf(z, reverse=True)
        >>> float((ladj + ladj_back).abs().max().detach()) < 1e-5
        True
    """

    def __init__(self, net: nn.Module, flow: FlowConfig | None = None,
                 solver: SolverConfig | None = None, **flow_fields: Any) -> None:
        flow = FlowConfig.resolve(flow, "CNF", **flow_fields)
        super().__init__(net, T=flow.T, train_T=flow.train_T, solver=solver)
        divergence = flow.divergence
        supported = supports_forward_divergence(net)
        if divergence in ("forward", "compiled") and not supported:
            raise ValueError(f"divergence={divergence!r} needs one of the project's nets "
                             f"(ODENet, AmortizedODENet), got {type(net).__name__}; use "
                             f"'auto' or 'reverse' for other fields")
        # The forward-mode function of this block, or None for the reverse mode.
        self._forward_mode = (None if divergence == "reverse" or not supported else
                              compiled_field_and_divergence if divergence == "compiled"
                              else field_and_divergence)
        self.divergence = divergence
        self.trace = flow.trace
        self.eval_trace = flow.eval_trace
        self.noise = flow.noise

    def forward(self, z: Tensor, context: Tensor | None = None,  # type: ignore[override]
                reverse: bool = False) -> tuple[Tensor, Tensor]:
        """Push z through the flow.

        Args:
            z: Shape (B, D).
            context: Optional per-sample conditioning for ``net``.
            reverse: Map from T back to 0 (sampling direction).

        Returns:
            ``(z_out, log_abs_det)`` with shapes (B, D) and (B,).
        """
        if not isinstance(z, Tensor) or not z.is_floating_point():
            raise TypeError(f"CNF expects a floating-point tensor, got "
                            f"{getattr(z, 'dtype', type(z).__name__)}")
        if z.ndim != 2:
            raise ValueError(f"CNF expects z of shape (B, D), got {tuple(z.shape)}")
        net = self.net
        mode = self.trace if self.training else self.eval_trace
        # An integrand observer (RNODE's kinetic terms) adds states to training solves only.
        observer = active(IntegrandObserver)
        if observer is not None and not (self.training and torch.is_grad_enabled()
                                         and not reverse):
            observer = None
        wants_vjp = observer is not None and observer.needs_vjp
        eps = sample_probe(z, self.noise) if mode == "hutchinson" or wants_vjp else None
        exact = mode == "exact"
        forward_mode = None if wants_vjp else self._forward_mode
        # Once per solve: an amortized net's factors as views of the context (see
        # per_solve_context); the adjoint differentiates those views.
        context, extra = per_solve_context(net, context)

        def field(t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            y = state[0]
            if forward_mode is not None:
                # One pass for the value and the divergence: differentiable with a first-order
                # graph where gradients are on, no graph at all in evaluation.
                dz, div = forward_mode(net, t, y, probe=None if exact else eps, context=context)
                extra = () if observer is None else observer.integrands(dz, None)
                return (dz, div, *extra)
            # Gradients wanted from this call: direct backprop in training, or the adjoint's
            # backward pass (which calls us under enable_grad). In evaluation and in the adjoint's
            # forward solve only the value matters, so the trace's graph is dropped.
            keep_graph = torch.is_grad_enabled()
            with torch.enable_grad():
                if not (keep_graph and y.requires_grad):
                    # A fresh leaf: the trace differentiates with respect to exactly this tensor.
                    y = y.detach().requires_grad_(True)
                dz = net(t, y) if context is None else net(t, y, context)
                vjp = div = None
                if wants_vjp or not exact:
                    # One vector-Jacobian product serves the trace estimate and the observer.
                    div, vjp = hutchinson_with_vjp(dz, y, eps, create_graph=keep_graph)
                if exact:
                    div = divergence_exact(dz, y, create_graph=keep_graph)
                extra = () if observer is None else observer.integrands(dz, vjp)
            out = (dz, div, *extra)
            return out if keep_graph else tuple(o.detach() for o in out)

        zeros = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        state = (z, zeros) + ((zeros,) * observer.size if observer is not None else ())
        out = self.solve(field, state, extra_params=extra, reverse=reverse)
        if observer is not None:
            observer.record(tuple(out[2:]))
        return out[0], out[1]


class CNFStack(nn.Module):
    """A sequence of CNF blocks applied one after another.

    Args:
        blocks: The CNF blocks, applied in order from data to base.
    """

    def __init__(self, blocks: Sequence[CNF]) -> None:
        super().__init__()
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, CNF) for b in blocks):
            raise ValueError(f"CNFStack needs a non-empty sequence of CNF blocks, got "
                             f"{[type(b).__name__ for b in blocks]}")
        self.blocks = nn.ModuleList(blocks)

    def forward(self, z: Tensor, context: Tensor | None = None,
                reverse: bool = False) -> tuple[Tensor, Tensor]:
        """Apply every block (in reverse order when ``reverse``); log-determinants add up."""
        total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        order = reversed(self.blocks) if reverse else self.blocks
        for block in order:
            z, ladj = block(z, context=context, reverse=reverse)
            total = total + ladj
        return z, total
