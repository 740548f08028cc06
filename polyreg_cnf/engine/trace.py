"""Divergence (trace of the Jacobian) estimators, as pure functions of tensors."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NOISE_TYPES", "divergence_exact", "divergence_hutchinson", "hutchinson_with_vjp",
           "sample_probe"]

NOISE_TYPES = ("rademacher", "gaussian")


def divergence_exact(f: Tensor, z: Tensor, create_graph: bool) -> Tensor:
    r"""Exact :math:`\operatorname{tr}(\partial f / \partial z)` per sample, by D backward passes.

    Args:
        f: Output of the vector field, shape (B, D), computed from ``z``.
        z: Input, shape (B, D), with ``requires_grad``.
        create_graph: Keep the graph so the result can be differentiated again (training).

    Returns:
        Shape (B,).

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
        >>> z = torch.randn(5, 2, requires_grad=True)
        >>> divergence_exact(z @ A.T, z, create_graph=False)  # tr A = -3
        tensor([-3., -3., -3., -3., -3.])
    """
    flat_f = f.reshape(f.shape[0], -1)
    total = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    for i in range(flat_f.shape[1]):
        (grad,) = torch.autograd.grad(flat_f[:, i].sum(), z, create_graph=create_graph,
                                      retain_graph=True)
        total = total + grad.reshape(grad.shape[0], -1)[:, i]
    return total


def divergence_hutchinson(f: Tensor, z: Tensor, eps: Tensor, create_graph: bool) -> Tensor:
    r"""Hutchinson's unbiased estimate :math:`\epsilon^\top (\partial f / \partial z) \epsilon`.

    One vector-Jacobian product whatever the dimension (Grathwohl et al., FFJORD, ICLR 2019).
    ``eps`` must stay fixed for the whole of one ODE solve: a probe redrawn at every evaluation
    makes the vector field noisy and the adaptive solver's NFE explodes.

    Args:
        f: Output of the vector field, shape (B, ...), computed from ``z``.
        z: Input with ``requires_grad``, same shape as ``f``.
        eps: Probe with E[eps eps^T] = I, same shape as ``f``.
        create_graph: Keep the graph for a later backward pass.

    Returns:
        Shape (B,).

    Example:
        With a Rademacher probe the estimate is :math:`\operatorname{tr} A` plus the
        off-diagonal terms :math:`\sum_{i \ne j} \epsilon_i A_{ij} \epsilon_j`, exact for a
        diagonal Jacobian:

        >>> z = torch.randn(3, 2, requires_grad=True)
        >>> f = z * torch.tensor([2.0, -0.5])
        >>> divergence_hutchinson(f, z, sample_probe(z), create_graph=False)
        tensor([1.5000, 1.5000, 1.5000])
    """
    return hutchinson_with_vjp(f, z, eps, create_graph)[0]


def hutchinson_with_vjp(f: Tensor, z: Tensor, eps: Tensor, create_graph: bool
                        ) -> tuple[Tensor, Tensor]:
    r""":func:`divergence_hutchinson`'s estimate and the vector-Jacobian product
    :math:`\epsilon^\top \partial f / \partial z` it came from (for callers that use it again,
    e.g. RNODE's Jacobian term). Same arguments; returns ``(estimate (B,), vjp like f)``."""
    (vjp,) = torch.autograd.grad(f, z, eps, create_graph=create_graph, retain_graph=True)
    return (vjp * eps).reshape(f.shape[0], -1).sum(dim=1), vjp


def sample_probe(like: Tensor, kind: str = "rademacher",
                 generator: torch.Generator | None = None) -> Tensor:
    """A Hutchinson probe shaped like ``like``: Rademacher (+-1) or standard Gaussian.

    Example:
        >>> sample_probe(torch.zeros(2, 3), generator=torch.Generator().manual_seed(0)).abs()
        tensor([[1., 1., 1.],
                [1., 1., 1.]])
    """
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype,
                           device=like.device)
    if kind == "rademacher":
        bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
        return (2 * bits - 1).to(like.dtype)
    raise ValueError(f"unknown probe kind {kind!r}; valid: {', '.join(NOISE_TYPES)}")
