"""Trajectory polynomial regularization: the penalty and the sampling of its time points.

Reference: H.-H. Huang and M.-Y. Yeh, "Accelerating Continuous Normalizing Flow with Trajectory
Polynomial Regularization", AAAI 2021 (arXiv:2012.04228).
"""

from __future__ import annotations

import torch
from torch import Tensor

from polyreg_cnf.engine._checks import check_int

__all__ = ["MAX_TIME_POINTS", "polynomial_projector", "sample_penalty_times",
           "trajectory_polynomial_penalty"]

#: The penalty is tested to be accurate up to this many time points (n = K + 2).
MAX_TIME_POINTS = 16


def _check_order(order: object) -> int:
    return check_int("order", order, minimum=0)


def polynomial_projector(t: Tensor, order: int) -> Tensor:
    r"""Orthogonal projector onto polynomials of degree ``order`` evaluated at the times ``t``.

    .. math:: P = Q Q^\top, \quad Q R = V, \quad V_{kj} = T_j(s_k)

    where :math:`s = (2t - t_0 - t_{n-1}) / (t_{n-1} - t_0) \in [-1, 1]` and :math:`T_j` is the
    Chebyshev polynomial of degree j. The fit is invariant to affine changes of time, so mapping
    to [-1, 1] and using a Chebyshev basis changes nothing mathematically; it keeps the
    Vandermonde matrix well conditioned for any interval (QR in float64, never the normal
    equations).

    Args:
        t: Distinct, increasing times, shape (n,), with n > order.
        order: Polynomial degree m >= 0.

    Returns:
        The (n, n) projector in float64, differentiable with respect to ``t``.
    """
    s64 = t.to(torch.float64)
    span = s64[-1] - s64[0]
    s = (2 * s64 - s64[0] - s64[-1]) / span if t.shape[0] > 1 else s64 * 0
    columns = [torch.ones_like(s)]
    if order >= 1:
        columns.append(s)
    for _ in range(2, order + 1):
        columns.append(2 * s * columns[-1] - columns[-2])
    q, _ = torch.linalg.qr(torch.stack(columns, dim=1), mode="reduced")
    return q @ q.T


def trajectory_polynomial_penalty(t: Tensor, z: Tensor, order: int = 1) -> Tensor:
    r"""Squared distance of trajectories to their least-squares polynomial fits.

    For each sample b and coordinate d, a polynomial of degree m = ``order`` is fitted by least
    squares to the points :math:`(t_k, z_{k,b,d})`, k = 0..n-1, and the squared residuals are
    summed:

    .. math:: \mathcal{L} = \frac{1}{nB} \sum_{k,b,d} \big[(I - P) Z\big]_{k,b,d}^2

    with P the projector of :func:`polynomial_projector` (a mean over time points and samples, a
    sum over dimensions). The penalty is zero exactly when every trajectory is a polynomial of
    degree <= m in t, which lets an adaptive solver take long steps (Huang & Yeh, AAAI 2021).

    Args:
        t: Times, shape (n,), strictly increasing, with n >= order + 1 (the residual is only
            non-zero for n >= order + 2).
        z: States at those times, shape (n, B, ...); any trailing shape is treated as dimensions.
        order: Polynomial degree m >= 0.

    Returns:
        A scalar tensor in the dtype of ``z``, differentiable with respect to ``z`` and ``t``.

    Example:
        >>> t = torch.linspace(0, 1, 4)
        >>> z = (3 * t - 1).reshape(4, 1, 1).expand(4, 5, 2)  # straight lines
        >>> float(trajectory_polynomial_penalty(t, z, order=1)) < 1e-10
        True
    """
    order = _check_order(order)
    if not isinstance(t, Tensor) or not isinstance(z, Tensor):
        raise TypeError(f"t and z must be tensors, got {type(t).__name__} and "
                        f"{type(z).__name__}")
    if t.ndim != 1:
        raise ValueError(f"t must have shape (n,), got {tuple(t.shape)}")
    if z.ndim < 2 or z.shape[0] != t.shape[0]:
        raise ValueError(f"z must have shape (n, B, ...) with n = len(t) = {t.shape[0]}, "
                         f"got {tuple(z.shape)}")
    n = t.shape[0]
    if n < order + 1:
        raise ValueError(f"a degree-{order} fit needs at least {order + 1} time points, "
                         f"got n = {n}")
    batch = z.shape[1]
    residual_map = torch.eye(n, dtype=torch.float64, device=z.device) - polynomial_projector(
        t.to(z.device), order)
    flat = z.reshape(n, -1)
    # The projection runs in float64: the residual of a nearly polynomial trajectory is a small
    # difference of large numbers, and float32 would bury it in rounding error.
    residual = residual_map @ flat.to(torch.float64)
    return (residual.square().sum() / (n * batch)).to(z.dtype)


def sample_penalty_times(num_samples: int, t0: Tensor | float, t1: Tensor | float, *,
                         generator: torch.Generator | None = None,
                         device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """Draw K sorted, distinct interior times uniformly on (t0, t1) and add the endpoints.

    Args:
        num_samples: K >= 0 interior times.
        t0: Start time.
        t1: End time, > t0. May be a tensor that requires grad (a trainable end time): the
            times are then ``t0 + u (t1 - t0)`` with u drawn uniformly, so gradients reach t1.
        generator: Optional torch.Generator for reproducible draws.
        device: Device of the result.
        dtype: dtype of the result.

    Returns:
        Tensor of shape (K + 2,): ``[t0, t_1, ..., t_K, t1]``, strictly increasing.
    """
    check_int("num_samples", num_samples, minimum=0)
    t0 = torch.as_tensor(t0, dtype=dtype, device=device)
    t1 = torch.as_tensor(t1, dtype=dtype, device=device)
    if not bool(t1 > t0):
        raise ValueError(f"need t1 > t0, got t0={float(t0)}, t1={float(t1)}")
    for _ in range(100):
        u = torch.rand(num_samples, generator=generator, dtype=torch.float64)
        u, _ = torch.sort(u)
        # Distinct and strictly inside (0, 1) with probability one; the loop guards the
        # measure-zero case that would make the fit rank deficient.
        if num_samples == 0 or (bool((u[1:] > u[:-1]).all()) and u[0] > 0 and u[-1] < 1):
            break
    u = u.to(device=device, dtype=dtype)
    inner = t0 + u * (t1 - t0)
    return torch.cat([t0.reshape(1), inner, t1.reshape(1)])
