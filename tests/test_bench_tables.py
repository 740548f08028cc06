"""The generated benchmark table: its density is the one it claims (checked against scipy)."""

import numpy as np
from scipy.stats import multivariate_normal

from benchmarks.tables import mixture_log_density, mixture_parameters, write_mixture_table


def test_log_density_equals_scipy_mixture():
    w, m, c = mixture_parameters(dim=3, components=4, seed=7)
    x = np.random.default_rng(0).normal(size=(20, 3)) * 3
    expected = np.log(sum(wi * multivariate_normal(mi, ci @ ci.T).pdf(x)
                          for wi, mi, ci in zip(w, m, c)))
    np.testing.assert_allclose(mixture_log_density(x, w, m, c), expected, rtol=1e-10)


def test_table_is_fixed_and_its_true_nll_matches_its_rows(tmp_path):
    facts = write_mixture_table(tmp_path / "a.npy", rows=2000, dim=5)
    again = write_mixture_table(tmp_path / "b.npy", rows=2000, dim=5)
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (2000, 5) and np.array_equal(a, b) and facts == again
    w, m, c = mixture_parameters(dim=5)
    assert facts["true_nll_raw"] == -mixture_log_density(a, w, m, c).mean()
    # Monte Carlo check of the sampler: the mean NLL of samples is the entropy, which a wrong
    # sampler (e.g. covariance L instead of L L^T) would miss by far more than 0.2 nats.
    big = write_mixture_table(tmp_path / "c.npy", rows=20000, dim=5, seed=3)
    w3, m3, c3 = mixture_parameters(dim=5, seed=3)
    probe = np.random.default_rng(9)
    counts = probe.multinomial(20000, w3)
    y = np.concatenate([multivariate_normal(mi, ci @ ci.T).rvs(size=n, random_state=probe)
                        .reshape(n, 5) for n, mi, ci in zip(counts, m3, c3)])
    assert abs(big["true_nll_raw"] - (-mixture_log_density(y, w3, m3, c3).mean())) < 0.2
