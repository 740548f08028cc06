"""A generated table with a known density, for benchmarks whose NLL differences must not be noise.

A fixed random mixture of Gaussians in ``dim`` dimensions whose log density is known exactly;
why it is sized as it is: docs/benchmarks.md, `benchmarks.tables`.

    python -m benchmarks.tables --out /tmp/mixture16.npy   # writes the table, prints its facts
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

__all__ = ["TABLE_SEED", "mixture_log_density", "mixture_parameters", "mixture_rows",
           "write_mixture_table"]

#: The density is fixed: every benchmark run sees the same parameters and rows.
TABLE_SEED = 20261129


def mixture_parameters(dim: int = 16, components: int = 6, seed: int = TABLE_SEED
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights (K,), means (K, D) and Cholesky factors (K, D, D) of the fixed mixture."""
    if dim < 1 or components < 1:
        raise ValueError(f"dim and components must be >= 1, got {dim}, {components}")
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(components, 5.0))
    means = rng.normal(0.0, 2.0, size=(components, dim))
    a = rng.normal(0.0, 1.0, size=(components, dim, dim)) / np.sqrt(dim)
    return weights, means, np.linalg.cholesky(a @ a.transpose(0, 2, 1) + 0.1 * np.eye(dim))


def mixture_log_density(x: np.ndarray, weights: np.ndarray, means: np.ndarray,
                        chols: np.ndarray) -> np.ndarray:
    """Exact log density of each row of ``x`` (N, D) under the mixture, in nats."""
    n, d = x.shape
    logs = []
    for w, mu, chol in zip(weights, means, chols):
        # Solve L u = (x - mu): |u|^2 is the Mahalanobis distance.
        u = np.linalg.solve(chol, (x - mu).T).T
        log_det = np.log(np.diag(chol)).sum()
        logs.append(np.log(w) - 0.5 * (u ** 2).sum(1) - log_det - 0.5 * d * np.log(2 * np.pi))
    stacked = np.stack(logs, axis=1)
    top = stacked.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(stacked - top).sum(axis=1, keepdims=True)))[:, 0]


def mixture_rows(rows: int, dim: int, seed: int = TABLE_SEED) -> np.ndarray:
    """``rows`` samples (N, D) of the mixture :func:`mixture_parameters` fixes for ``seed``."""
    weights, means, chols = mixture_parameters(dim, seed=seed)
    rng = np.random.default_rng(seed + 1)
    component = rng.choice(len(weights), size=rows, p=weights)
    eps = rng.normal(size=(rows, dim))
    return means[component] + np.einsum("nij,nj->ni", chols[component], eps)


def write_mixture_table(path: str | Path, rows: int = 50_000, dim: int = 16,
                        seed: int = TABLE_SEED) -> dict[str, float]:
    """Sample the table to ``path`` (.npy) and return its facts (true mean NLL of all rows)."""
    weights, means, chols = mixture_parameters(dim, seed=seed)
    x = mixture_rows(rows, dim, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, x)
    log_p = mixture_log_density(x, weights, means, chols)
    return {"rows": rows, "dim": dim, "seed": seed, "true_nll_raw": float(-log_p.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=16)
    args = parser.parse_args()
    print(json.dumps(write_mixture_table(args.out, args.rows, args.dim), indent=2))


if __name__ == "__main__":
    main()
