"""The polynomial penalty against numpy.polyfit, polynomials, gradcheck and its time sampling."""

import numpy as np
import pytest
import torch

from polyreg_cnf import sample_penalty_times, trajectory_polynomial_penalty
from polyreg_cnf.engine.penalty import MAX_TIME_POINTS


def polyfit_penalty(t, z, order):
    """Reference: numpy.polyfit residual sum over samples and dims, divided by n * B."""
    n, batch = z.shape[:2]
    flat = z.reshape(n, -1)
    total = 0.0
    for j in range(flat.shape[1]):
        coef = np.polyfit(t, flat[:, j], order)
        total += np.sum((np.polyval(coef, t) - flat[:, j]) ** 2)
    return total / (n * batch)


@pytest.mark.parametrize("order,n", [(0, 3), (1, 4), (2, 5), (3, 9), (1, 2 + 2)])
def test_matches_numpy_polyfit(order, n):
    rng = np.random.default_rng(order * 10 + n)
    t = np.sort(rng.uniform(0, 1, n))
    z = rng.normal(size=(n, 7, 3))
    got = trajectory_polynomial_penalty(torch.from_numpy(t), torch.from_numpy(z), order)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.item(), polyfit_penalty(t, z, order), rtol=1e-9)


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.0, 1e-3), (1e4, 1e4 + 5.0), (-3.0, 250.0)])
@pytest.mark.parametrize("order", [1, 3, 5])
def test_polynomials_of_degree_at_most_order_have_zero_penalty(interval, order):
    n = MAX_TIME_POINTS
    t = torch.linspace(*interval, n, dtype=torch.float64)
    s = (t - t[0]) / (t[-1] - t[0])  # any polynomial in t is a polynomial in s of equal degree
    coef = torch.randn(order + 1, 4, 2, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(order))
    z = sum(coef[j] * s.reshape(n, 1, 1) ** j for j in range(order + 1))
    scale = z.square().mean().item()
    assert trajectory_polynomial_penalty(t, z, order).item() <= 1e-20 * max(scale, 1)
    # One degree more is not in the span: the penalty of order - 1 is numpy.polyfit's residual
    # (fitted in s, since the fit is invariant to affine changes of time).
    if order >= 1:
        lower = trajectory_polynomial_penalty(t, z, order - 1).item()
        np.testing.assert_allclose(lower, polyfit_penalty(s.numpy(), z.numpy(), order - 1),
                                   rtol=1e-6)
        assert lower > 0


def test_stable_for_16_points_on_a_shifted_interval_in_float32():
    # float32 input, 16 points, an interval far from zero: still agrees with a float64 reference
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(100.0, 101.0, 16))
    z = rng.normal(size=(16, 5, 2))
    ref = polyfit_penalty(t - 100.0, z, 3)  # shifting time changes nothing; keeps polyfit sane
    got = trajectory_polynomial_penalty(torch.tensor(t), torch.tensor(z, dtype=torch.float32), 3)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.item(), ref, rtol=1e-5)


def test_normalisation_is_mean_over_time_and_samples_sum_over_dims():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    z = torch.zeros(3, 2, 3, dtype=torch.float64)
    z[1, 0, 0] = 1.0  # a single bump: residual of a line fit through (0,0),(.5,1),(1,0)
    # the fitted line is 1/3 everywhere: residuals -1/3, 2/3, -1/3 -> sum of squares 2/3
    expected = (2 / 3) / (3 * 2)
    assert trajectory_polynomial_penalty(t, z, 1).item() == pytest.approx(expected, rel=1e-12)


def test_gradcheck_in_z_and_t():
    t = torch.tensor([0.0, 0.2, 0.55, 0.8, 1.0], dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t_, z_: trajectory_polynomial_penalty(t_, z_, 2),
                                    (t, z))


def test_trailing_dims_are_flattened():
    t = torch.linspace(0, 1, 4, dtype=torch.float64)
    z = torch.randn(4, 3, 2, 5, dtype=torch.float64)
    a = trajectory_polynomial_penalty(t, z, 1)
    b = trajectory_polynomial_penalty(t, z.reshape(4, 3, 10), 1)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(3, 1), torch.zeros(3, 2, 1), 1), "shape \\(n,\\)"),
    ((torch.zeros(3), torch.zeros(4, 2, 1), 1), "n = len\\(t\\) = 3"),
    ((torch.zeros(3), torch.zeros(3), 1), "\\(n, B, ...\\)"),
    ((torch.linspace(0, 1, 2), torch.zeros(2, 2, 1), 2), "at least 3 time points"),
    ((torch.zeros(3), torch.zeros(3, 2, 1), -1), "non-negative int"),
    ((torch.zeros(3), torch.zeros(3, 2, 1), 1.5), "non-negative int"),
])
def test_bad_input_is_rejected_with_a_clear_message(args, match):
    with pytest.raises(ValueError, match=match):
        trajectory_polynomial_penalty(*args)


def test_sample_times_sorted_distinct_interior_with_endpoints():
    gen = torch.Generator().manual_seed(0)
    for k in (0, 1, 2, 5, 14):
        t = sample_penalty_times(k, 0.0, 2.5, generator=gen)
        assert t.shape == (k + 2,)
        assert t[0].item() == 0.0 and t[-1].item() == 2.5
        assert bool((t[1:] > t[:-1]).all())


def test_sample_times_are_uniform():
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_penalty_times(1, 0.0, 1.0, generator=gen)[1] for _ in range(4000)])
    # mean 1/2 and variance 1/12 of U(0, 1), within ~5 standard errors
    assert abs(draws.mean().item() - 0.5) < 5 * (1 / 12 / 4000) ** 0.5
    assert abs(draws.var().item() - 1 / 12) < 0.01


def test_sample_times_follow_a_trainable_end_time():
    end = torch.tensor(2.0, requires_grad=True)
    t = sample_penalty_times(2, 0.0, end)
    t.sum().backward()
    # t = [0, u1 T, u2 T, T] with u = t[1:3] / T: d(sum t)/dT = 1 + u1 + u2
    u = t.detach()[1:3] / end.detach()
    assert end.grad.item() == pytest.approx(1 + u.sum().item(), rel=1e-6)
    assert 0 < u[0] < u[1] < 1


@pytest.mark.parametrize("k,t0,t1,match", [(-1, 0, 1, "non-negative int"),
                                           (2, 1.0, 1.0, "t1 > t0")])
def test_sample_times_bad_input(k, t0, t1, match):
    with pytest.raises(ValueError, match=match):
        sample_penalty_times(k, t0, t1)
