r"""Gradients of per-sample factors gathered over a solve: one product, not one per evaluation.

An amortized ODE net reads per-sample factors F (B, n, r) that stay constant during a solve
(:class:`~polyreg_cnf.engine.amortized.AmortizedODENet`). Each evaluation reads them as
``X @ F`` with a thin X (B, K, n), K = 1 for the value and Hutchinson's tangent, so each
evaluation's share of F's gradient, :math:`X^\top G`, is a rank-K matrix the size of F.
Autograd would allocate, zero-fill and add one such buffer per evaluation: memory traffic of
F's size, NFE times. Here the thin pairs (X, G) are kept during the backward pass and F's
gradient is one ``bmm`` over all of them, written once, when the pass reaches F:

.. math:: \frac{\partial L}{\partial F} = \sum_{e} X_e^\top G_e
          = [X_1 \cdots X_n]^\top [G_1 \cdots G_n].

Usage (once per solve, then in every evaluation)::

    handle = anchor(F)                   # while gradients are on
    y = factor_bmm(x, F, handle)         # = torch.bmm(x, F), F's gradient gathered
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

__all__ = ["FactorGrad", "anchor", "factor_bmm"]


class _Pending:
    """The terms of one factor's gradient, gathered during ONE backward pass.

    Every evaluation that reads a factor F as ``X @ F`` contributes :math:`X^\top G` to its
    gradient, a rank-K product of the size of F (K = 1 for the value and Hutchinson's tangent).
    Summing those products evaluation by evaluation writes (and zero-fills) a buffer of F's
    size per evaluation; here the small pairs (X, G) are kept and the sum is ONE ``bmm`` over
    all of them, :math:`[X_1 \\dots X_n]^\top [G_1 \\dots G_n]`, when the pass reaches F.
    Entries are tagged with the autograd graph task, so pairs left by a pass that never
    reached F (a gradient taken with respect to the state only) are dropped, not reused.
    """

    __slots__ = ("task", "left", "right")

    def __init__(self) -> None:
        self.task: int | None = None
        self.left: list[Tensor] = []
        self.right: list[Tensor] = []

    def add(self, left: Tensor, right: Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self.task:
            self.task = task
            self.left.clear()
            self.right.clear()
        self.left.append(left)
        self.right.append(right)

    def take(self) -> Tensor | None:
        current = torch._C._current_graph_task_id() == self.task
        left, right = self.left, self.right
        self.left, self.right, self.task = [], [], None
        if not current or not left:
            return None
        return torch.bmm(torch.cat(left, dim=1).transpose(1, 2), torch.cat(right, dim=1))


class _Anchor(torch.autograd.Function):
    """A scalar that stands for a factor in every evaluation of a solve.

    Its backward runs once per backward pass, after every evaluation's (autograd runs a node
    when all its consumers are done), and writes the factor's gradient from the gathered terms.
    """

    @staticmethod
    def forward(ctx: Any, factor: Tensor, pending: _Pending) -> Tensor:
        ctx.pending = pending
        return factor.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, _grad: Tensor) -> tuple[Tensor | None, None]:
        return ctx.pending.take(), None


class _DeferredMatmul(torch.autograd.Function):
    """``X @ F[:, offset:]`` (or ``X @ F^T``) whose gradient for F goes to the factor's
    :class:`_Pending` instead of a buffer of F's size."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, anchor: Tensor, factor: Tensor, pending: _Pending,
                transpose: bool, offset: int) -> Tensor:
        ctx.save_for_backward(x, factor)  # factor is a view of the context: nothing copied
        ctx.pending, ctx.transpose, ctx.offset = pending, transpose, offset
        f = factor[:, offset:]
        return torch.bmm(x, f.transpose(1, 2) if transpose else f)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, factor = ctx.saved_tensors
        f = factor[:, ctx.offset:]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad, f if ctx.transpose else f.transpose(1, 2))
        grad_anchor = None
        if ctx.needs_input_grad[1]:
            if ctx.transpose:  # out = X F^T: dF = G^T X
                ctx.pending.add(grad, x)
            else:  # out = X F[offset:]: dF[offset:] = X^T G, zero rows above
                ctx.pending.add(F.pad(x, (ctx.offset, 0)) if ctx.offset else x, grad)
            grad_anchor = torch.zeros((), dtype=grad.dtype, device=grad.device)
        return grad_x, grad_anchor, None, None, None, None


class FactorGrad(NamedTuple):
    """A factor's per-solve handle for gathered gradients (see :func:`factor_bmm`)."""

    anchor: Tensor
    pending: _Pending


def anchor(factor: Tensor) -> FactorGrad:
    """The handle of ``factor``'s gathered gradient, made once per solve (gradients on)."""
    pending = _Pending()
    return FactorGrad(_Anchor.apply(factor, pending), pending)


def factor_bmm(x: Tensor, factor: Tensor, grad: FactorGrad | None, transpose: bool = False,
               offset: int = 0) -> Tensor:
    r"""``x @ factor[:, offset:]`` (or ``x @ factor^T``) for a per-sample factor, batched.

    With a :class:`FactorGrad` (made once per solve by :func:`anchor`, e.g. in
    :meth:`~polyreg_cnf.engine.amortized.AmortizedODENet.prepare_context`, while gradients
    are on) the factor's gradient is one ``bmm`` over all evaluations of the backward pass
    instead of one buffer of the factor's size per evaluation; the result is first-order
    differentiable only (the forward-mode divergence needs no more). Without one, a plain ``bmm``.

    Args:
        x: (B, K, n) (``transpose``: (B, K, r)).
        factor: (B, n_all, r) with n = n_all - offset, or (B, n_out, r) with ``transpose``.
        grad: The factor's handle, or None.
        transpose: Multiply by the factor's transpose (offset must then be 0).
        offset: Rows of the factor skipped (the concat layer's time row).
    """
    if grad is None or not torch.is_grad_enabled():
        f = factor[:, offset:]
        return torch.bmm(x, f.transpose(1, 2) if transpose else f)
    return _DeferredMatmul.apply(x, grad.anchor, factor.detach(), grad.pending, transpose,
                                 offset)
