"""2-D toy densities of the FFJORD paper, generated from a seed (no files, no network)."""

from __future__ import annotations

import numpy as np
from polyreg_cnf.datamodules.base import ArrayDataModule
from sklearn.datasets import make_circles, make_moons, make_swiss_roll

from polyreg_cnf.engine._checks import check_int

__all__ = ["TOY_DENSITIES", "ToyDataModule", "sample_toy"]


def _swissroll(n: int, rng: np.random.RandomState) -> np.ndarray:
    data = make_swiss_roll(n_samples=n, noise=1.0, random_state=rng)[0]
    return data[:, [0, 2]] / 5.0


def _circles(n: int, rng: np.random.RandomState) -> np.ndarray:
    return make_circles(n_samples=n, factor=0.5, noise=0.08, random_state=rng)[0] * 3.0


def _rings(n: int, rng: np.random.RandomState) -> np.ndarray:
    # Four concentric rings of equal share (the remainder goes to the innermost).
    sizes = [n // 4] * 3
    sizes.append(n - sum(sizes))
    parts = []
    for radius, size in zip((3.0, 2.25, 1.5, 0.75), sizes):
        angle = np.linspace(0, 2 * np.pi, size, endpoint=False)
        parts.append(np.stack([np.cos(angle), np.sin(angle)], axis=1) * radius)
    data = np.concatenate(parts)
    data = data[rng.permutation(n)]
    return data + rng.normal(scale=0.08, size=data.shape)


def _moons(n: int, rng: np.random.RandomState) -> np.ndarray:
    data = make_moons(n_samples=n, noise=0.1, random_state=rng)[0]
    return data * 2.0 + np.array([-1.0, -0.2])


def _eight_gaussians(n: int, rng: np.random.RandomState) -> np.ndarray:
    angles = np.arange(8) * np.pi / 4
    centers = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    idx = rng.randint(8, size=n)
    return (rng.normal(scale=0.5, size=(n, 2)) + centers[idx]) / 1.414


def _pinwheel(n: int, rng: np.random.RandomState) -> np.ndarray:
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    rads = np.linspace(0, 2 * np.pi, num_classes, endpoint=False)
    features = rng.normal(size=(n, 2)) * np.array([radial_std, tangential_std])
    features[:, 0] += 1.0
    labels = rng.randint(num_classes, size=n)
    angles = rads[labels] + rate * np.exp(features[:, 0])
    rot = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)], axis=1)
    rot = rot.reshape(-1, 2, 2)
    return 2.0 * np.einsum("ti,tij->tj", features, rot)


def _two_spirals(n: int, rng: np.random.RandomState) -> np.ndarray:
    half = n // 2
    turns = np.sqrt(rng.rand(half, 1)) * 540 * (2 * np.pi) / 360
    d1x = -np.cos(turns) * turns + rng.rand(half, 1) * 0.5
    d1y = np.sin(turns) * turns + rng.rand(half, 1) * 0.5
    data = np.vstack((np.hstack((d1x, d1y)), np.hstack((-d1x, -d1y)))) / 3.0
    data = data + rng.normal(size=data.shape) * 0.1
    if data.shape[0] < n:  # odd n: one more point from the first arm
        data = np.vstack([data, data[:1]])
    return data[rng.permutation(n)]


def _checkerboard(n: int, rng: np.random.RandomState) -> np.ndarray:
    x1 = rng.rand(n) * 4 - 2
    x2 = rng.rand(n) - rng.randint(0, 2, n) * 2
    x2 = x2 + (np.floor(x1) % 2)
    return np.stack([x1, x2], axis=1) * 2.0


TOY_DENSITIES = {
    "8gaussians": _eight_gaussians, "checkerboard": _checkerboard, "circles": _circles,
    "moons": _moons, "pinwheel": _pinwheel, "rings": _rings, "swissroll": _swissroll,
    "2spirals": _two_spirals,
}


def sample_toy(name: str, n: int, seed: int = 0) -> np.ndarray:
    """Draw ``n`` float32 points of a named 2-D toy density with a seeded RandomState.

    Example:
        >>> x = sample_toy("checkerboard", 1000, seed=0)
        >>> x.shape, x.dtype, bool((np.abs(x) <= 4).all())
        ((1000, 2), dtype('float32'), True)
        >>> bool((sample_toy("checkerboard", 5, seed=1) == sample_toy("checkerboard", 5, 1)).all())
        True
    """
    if name not in TOY_DENSITIES:
        raise ValueError(f"unknown toy density {name!r}; valid: {', '.join(TOY_DENSITIES)}")
    check_int("n", n)
    return TOY_DENSITIES[name](n, np.random.RandomState(seed)).astype(np.float32)


class ToyDataModule(ArrayDataModule):
    """A 2-D toy density as fixed, seeded train/val/test sets.

    Args:
        name: One of ``TOY_DENSITIES``.
        num_train: Training points.
        num_val: Validation points.
        num_test: Test points.
        seed: Seed of the generator; the three splits use seed, seed + 1 and seed + 2.
        batch_size: Training batch size.
        eval_batch_size: Evaluation batch size.
        num_workers: DataLoader workers.

    Example:
        >>> dm = ToyDataModule("8gaussians", num_train=256, num_val=64, num_test=64,
        ...                    batch_size=64)
        >>> dm.setup()
        >>> dm.dim, len(dm.train_dataloader())
        (2, 4)
    """

    def __init__(self, name: str = "checkerboard", num_train: int = 50_000,
                 num_val: int = 5_000, num_test: int = 5_000, seed: int = 0,
                 batch_size: int = 512, eval_batch_size: int | None = None,
                 num_workers: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed=seed)
        if name not in TOY_DENSITIES:
            raise ValueError(f"unknown toy density {name!r}; valid: {', '.join(TOY_DENSITIES)}")
        for key, value in (("num_train", num_train), ("num_val", num_val),
                           ("num_test", num_test)):
            check_int(key, value)
        self.name = name
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed = seed

    @property
    def source(self) -> str:
        return f"toy density '{self.name}' (seed {self.seed})"

    def load_splits(self) -> dict[str, np.ndarray]:
        return {split: sample_toy(self.name, size, self.seed + i)
                for i, (split, size) in enumerate(self.sizes.items())}
