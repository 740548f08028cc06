"""train.py: the front door runs, and bad flags or bad data stop with a clear message."""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

FAST = ["--hidden-dims", "16,16", "--batch-size", "64", "--eval-batch-size", "1000",
        "--atol", "1e-3", "--rtol", "1e-3", "--eval-atol", "1e-3", "--eval-rtol", "1e-3",
        "--accelerator", "cpu"]


def test_toy_run_prints_the_summary_and_writes_a_checkpoint(tmp_path, capsys):
    code = train.main(["--data", "8gaussians", "--reg", "poly", "--max-steps", "3",
                       "--output-dir", str(tmp_path / "runs"), *FAST])
    out = capsys.readouterr().out
    assert code == 0
    for label in ("test NLL (nats):", "forward NFE per step:", "backward NFE per step:",
                  "training wall time (s):", "checkpoint:", "logs:"):
        assert label in out
    run = tmp_path / "runs" / "cnf-8gaussians-poly-s0"
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "metrics.csv").exists()
    nll = float(out.split("test NLL (nats):")[1].split()[0])
    assert np.isfinite(nll)


def test_user_table_run(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "table.csv"
    data = rng.normal(size=(300, 3)) * [1.0, 5.0, 0.1] + [0.0, 10.0, -3.0]
    np.savetxt(path, data, delimiter=",", header="a,b,c", comments="")
    code = train.main(["--data", str(path), "--reg", "none", "--max-steps", "2",
                       "--output-dir", str(tmp_path / "runs"), *FAST])
    assert code == 0
    assert "cnf on " in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--reg", "foo"], "invalid choice: 'foo'"),
    (["--model", "gan"], "invalid choice: 'gan'"),
    (["--atol", "0"], "expected a finite number > 0, got '0'"),
    (["--rtol", "abc"], "expected a finite number > 0, got 'abc'"),
    (["--batch-size=-4"], "expected a positive integer, got '-4'"),
    (["--hidden-dims", "64,x"], "expected comma-separated positive widths like 64,64,64, got "
                                "'64,x'"),
    (["--poly-coef=-1"], "expected a finite number >= 0, got '-1'"),
    (["--data", "nosuchset"], "'nosuchset' is not a known data set or a table file"),
    (["--poly-samples", "0", "--poly-order", "1"], "--poly-samples must be >= --poly-order"),
    (["--solver", "rk4"], "fixed-grid method 'rk4' needs step_size"),
    (["--max-steps", "0"], "expected a positive integer, got '0'"),
])
def test_bad_flags_stop_with_a_clear_message(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2
    assert match in capsys.readouterr().err


def test_nonfinite_rows_are_refused_with_a_count_not_a_traceback(tmp_path, capsys):
    data = np.random.default_rng(0).normal(size=(50, 2))
    data[[3, 7], 1] = np.nan
    data[9, 0] = np.inf
    path = tmp_path / "bad.npy"
    np.save(path, data)
    code = train.main(["--data", str(path), "--max-steps", "1", *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert "3 of 50 rows" in err and "--drop-nonfinite" in err
    assert "Traceback" not in err


def test_missing_standard_files_name_the_path(tmp_path, capsys):
    code = train.main(["--data", "power", "--data-dir", str(tmp_path / "nowhere"),
                       "--max-steps", "1", *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "nowhere") in err and "data.npy" in err


def test_vae_front_door_runs_on_the_embedded_digits(tmp_path, capsys):
    code = train.main(["--model", "vae", "--reg", "poly", "--max-steps", "3", "--is-samples",
                       "4", "--is-chunk", "2", "--logger", "csv", "--accelerator", "cpu",
                       "--output-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0
    for label in ("test -ELBO (nats):", "test IS-NLL (nats):", "forward NFE per step:",
                  "backward NFE per step:", "training wall time (s):"):
        assert label in out
    elbo = float(out.split("test -ELBO (nats):")[1].split()[0])
    is_nll = float(out.split("test IS-NLL (nats):")[1].split()[0])
    assert np.isfinite(elbo) and is_nll <= elbo + 1e-4


@pytest.mark.parametrize("argv,match", [
    (["--model", "vae", "--data", "power"], "--model vae needs an image data set"),
    (["--model", "vae", "--posterior", "gaussian", "--reg", "poly"], "has no flow"),
    (["--model", "vae", "--posterior", "normal"], "invalid choice: 'normal'"),
])
def test_bad_vae_flags(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2
    assert match in capsys.readouterr().err
