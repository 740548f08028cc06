"""Divergence (trace of the Jacobian) estimators, as pure functions of tensors."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NOISE_TYPES", "divergence_exact", "divergence_hutchinson", "sample_probe"]

NOISE_TYPES = ("rademacher", "gaussian")


def divergence_exact(f: Tensor, z: Tensor, create_graph: bool) -> Tensor:
    r"""Exact :math:`\operatorname{tr}(\partial f / \partial z)` per sample, by D backward passes.

    Args:
        f: Output of the vector field, shape (B, D), computed from ``z``.
        z: Input, shape (B, D), with ``requires_grad``.
        create_graph: Keep the graph so the result can be differentiated again (training).

    Returns:
        Shape (B,).
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
    """
    (vjp,) = torch.autograd.grad(f, z, eps, create_graph=create_graph, retain_graph=True)
    return (vjp * eps).reshape(f.shape[0], -1).sum(dim=1)


def sample_probe(like: Tensor, kind: str = "rademacher",
                 generator: torch.Generator | None = None) -> Tensor:
    """A Hutchinson probe shaped like ``like``: Rademacher (+-1) or standard Gaussian."""
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype,
                           device=like.device)
    if kind == "rademacher":
        bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
        return (2 * bits - 1).to(like.dtype)
    raise ValueError(f"unknown probe kind {kind!r}; valid: {', '.join(NOISE_TYPES)}")
