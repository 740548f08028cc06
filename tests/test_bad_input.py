"""One table of bad inputs to every public entry point: each must fail with a clear message."""

import numpy as np
import pytest
import torch
from polyreg_cnf.callbacks import KineticRegularizer, NFEMonitor, PolynomialTrajectoryRegularizer
from polyreg_cnf.datamodules import (
    TabularDataModule,
    ToyDataModule,
    UserTableDataModule,
    make_datamodule,
)
from polyreg_cnf.datamodules.base import check_splits

from polyreg_cnf import (
    CNF,
    ODEBlock,
    ODENet,
    SolverConfig,
    sample_penalty_times,
    trajectory_polynomial_penalty,
)
from polyreg_cnf.models import CNFVAE, CNFDensityEstimator

OK = np.zeros((4, 2), dtype=np.float32)


def nan_table(tmp_path):
    data = np.ones((20, 2))
    data[5, 1] = np.nan
    path = tmp_path / "t.npy"
    np.save(path, data)
    dm = UserTableDataModule(path)
    dm.prepare_data()
    dm.setup()


def empty_table(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("a,b\n")
    dm = UserTableDataModule(path)
    dm.prepare_data()
    dm.setup()


# (entry point, call, exception, fragment of the message)
CASES = [
    # data
    ("ToyDataModule name", lambda p: ToyDataModule("spiral"), ValueError,
     "unknown toy density 'spiral'; valid: 8gaussians"),
    ("ToyDataModule size", lambda p: ToyDataModule(num_train=0), ValueError,
     "num_train must be a positive int, got 0"),
    ("ArrayDataModule batch", lambda p: ToyDataModule(batch_size=0), ValueError,
     "batch_size must be a positive int, got 0"),
    ("TabularDataModule name", lambda p: TabularDataModule("powr", p), ValueError,
     "unknown tabular set 'powr'"),
    ("image set name", lambda p: make_datamodule("cifar", p), ValueError, "cifar"),
    ("user table NaN", nan_table, ValueError, "1 of 20 rows"),
    ("user table empty", empty_table, FileNotFoundError, "e.csv: the CSV file has a header but no "
     "data rows"),
    ("user table missing", lambda p: UserTableDataModule(p / "nope.csv").prepare_data(),
     FileNotFoundError, "nope.csv"),
    ("splits NaN", lambda p: check_splits({"train": OK + np.nan, "val": OK, "test": OK}, "x"),
     ValueError, "split 'train' has 4 rows with NaN or inf"),
    ("splits empty", lambda p: check_splits({"train": OK[:0], "val": OK, "test": OK}, "x"),
     ValueError, "split 'train' is empty"),
    ("splits 1-D", lambda p: check_splits({"train": OK[0], "val": OK, "test": OK}, "x"),
     ValueError, "must be 2-D"),
    ("splits widths", lambda p: check_splits({"train": OK, "val": OK[:, :1], "test": OK}, "x"),
     ValueError, "has 1 columns, the others have 2"),
    ("splits missing", lambda p: check_splits({"train": OK}, "x"), ValueError,
     "splits ['val', 'test'] missing"),
    ("arrays before setup", lambda p: ToyDataModule().arrays(), RuntimeError,
     "call prepare_data() and setup()"),
    # penalty and callbacks
    ("penalty shapes", lambda p: trajectory_polynomial_penalty(torch.zeros(3), torch.zeros(4, 2),
                                                               1), ValueError, "n = len(t) = 3"),
    ("penalty order", lambda p: trajectory_polynomial_penalty(torch.zeros(2), torch.zeros(2, 1),
                                                              2), ValueError,
     "at least 3 time points"),
    ("penalty types", lambda p: trajectory_polynomial_penalty([0, 1], torch.zeros(2, 1), 0),
     TypeError, "must be tensors"),
    ("times interval", lambda p: sample_penalty_times(2, 1.0, 0.5), ValueError, "t1 > t0"),
    ("poly coef", lambda p: PolynomialTrajectoryRegularizer(coef=-5), ValueError,
     "coef must be a finite number >= 0, got -5"),
    ("poly samples < order", lambda p: PolynomialTrajectoryRegularizer(num_samples=0, order=1),
     ValueError, "num_samples must be >= order"),
    ("kinetic coef", lambda p: KineticRegularizer(jacobian_coef=float("inf")), ValueError,
     "jacobian_coef must be a finite number >= 0"),
    ("monitor window", lambda p: NFEMonitor(window=0), ValueError,
     "window must be a positive int, got 0"),
    # solver, blocks, models
    ("atol <= 0", lambda p: SolverConfig(atol=0), ValueError, "atol must be a finite number > 0"),
    ("eval_rtol <= 0", lambda p: SolverConfig(eval_rtol=-1.0), ValueError, "eval_rtol"),
    ("method", lambda p: SolverConfig(method="rk45"), ValueError, "valid: dopri5"),
    ("ODEBlock net", lambda p: ODEBlock(lambda t, y: y), TypeError, "net must be an nn.Module"),
    ("ODEBlock solver", lambda p: ODEBlock(ODENet(2), solver={"atol": 1}), TypeError,
     "solver must be a SolverConfig"),
    ("CNF dtype", lambda p: CNF(ODENet(2))(torch.zeros(3, 2, dtype=torch.int64)), TypeError,
     "floating-point tensor, got torch.int64"),
    ("CNF shape", lambda p: CNF(ODENet(2))(torch.zeros(3)), ValueError, "shape (B, D)"),
    ("ODENet widths", lambda p: ODENet(2, (64, 0)), ValueError, "hidden_dims must be ints >= 1"),
    ("model blocks", lambda p: CNFDensityEstimator(2, num_blocks=0), ValueError,
     "num_blocks must be a positive int, got 0"),
    ("model lr", lambda p: CNFDensityEstimator(2, lr=0.0), ValueError,
     "lr must be a finite number > 0, got 0.0"),
    ("model stats", lambda p: CNFDensityEstimator(2, data_std=[1.0, 0.0]), ValueError,
     "std > 0"),
    ("model input", lambda p: CNFDensityEstimator(2).log_prob(torch.zeros(3, 5)), ValueError,
     "expected a batch of shape (B, 2), got (3, 5)"),
    ("vae option", lambda p: CNFVAE((1, 8, 8), "bernoulli", zdim=4), TypeError, "zdim"),
    ("vae likelihood", lambda p: CNFVAE((1, 8, 8), "gaussian"), ValueError, "gaussian"),
]


@pytest.mark.parametrize("name,call,error,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly(name, call, error, fragment, tmp_path):
    with pytest.raises(error) as info:
        call(tmp_path)
    assert fragment in str(info.value), str(info.value)

