"""The offline report: CSV reading, summary numbers, PNG/HTML rendering and CLI errors."""

import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from polyreg_cnf.app.report import (
    ReportError,
    load_run,
    main,
    read_metrics,
    render_report,
    smooth,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]
HEADER = ["epoch", "nfe/backward", "nfe/forward", "reg/poly_step", "step", "time/step_seconds",
          "train/nll_epoch", "train/nll_step", "val/nfe", "val/nll"]


def write_run(folder: Path, steps: int = 60, nfe: float = 20.0, seed: int = 0,
              val_every: int = 20, hparams: str | None = None) -> Path:
    """A metrics.csv laid out as Lightning's CSVLogger writes it: one row per logging call,
    empty cells for what was not logged in it (training rows, then validation rows)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    lines = [",".join(HEADER)]
    for step in range(steps):
        row = dict.fromkeys(HEADER, "")
        row.update({"epoch": "0", "step": str(step), "nfe/forward": f"{nfe + step % 3}",
                    "nfe/backward": f"{2 * nfe + rng.integers(0, 4)}",
                    "reg/poly_step": f"{rng.random() * 1e-3}", "time/step_seconds": "0.5",
                    "train/nll_step": f"{7 - 3 * step / steps + rng.normal() * 0.05}"})
        lines.append(",".join(row[k] for k in HEADER))
        if (step + 1) % val_every == 0:
            row = dict.fromkeys(HEADER, "")
            row.update({"epoch": "0", "step": str(step), "val/nll": f"{7 - 3 * step / steps}",
                        "val/nfe": f"{nfe + 6}"})
            lines.append(",".join(row[k] for k in HEADER))
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    if hparams is not None:
        (folder / "hparams.yaml").write_text(hparams)
    return folder


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_read_metrics_is_lenient(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,a,b\n0,1.0,\n1,,2.5\nstep,a,b\n2,3.0\n3,4.0,5.0,99\n4,oops,6\n\n")
    cols = read_metrics(path)
    np.testing.assert_array_equal(cols["step"], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(cols["a"], [1.0, np.nan, 3.0, 4.0, np.nan])
    np.testing.assert_array_equal(cols["b"], [np.nan, 2.5, np.nan, 5.0, 6.0])


def test_read_metrics_empty_file(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("")
    with pytest.raises(ReportError, match="empty"):
        read_metrics(path)


def test_series_summary_and_wall_time(tmp_path):
    run = load_run(write_run(tmp_path / "a", steps=40, nfe=10.0, val_every=10))
    steps, values = run.series("train/nll")  # found under its _step column
    assert steps.tolist() == list(range(40)) and np.isfinite(values).all()
    val_steps, _ = run.series("val/nll")
    assert val_steps.tolist() == [9, 19, 29, 39]
    np.testing.assert_allclose(run.wall_time(np.array([0.0, 9.0, 39.0])), [0.5, 5.0, 20.0])
    stats = summarize(run)
    assert stats["steps"] == 40
    assert stats["train_seconds"] == pytest.approx(20.0)
    assert stats["nfe_forward_mean"] == pytest.approx(np.mean([10 + s % 3 for s in range(40)]))
    assert stats["val_nll_best"] == pytest.approx(7 - 3 * 39 / 40)
    assert math.isnan(stats["test_nll"])


def test_smooth_is_a_trailing_mean():
    np.testing.assert_allclose(smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])
    np.testing.assert_array_equal(smooth(np.array([1.0, 2.0]), 1), [1.0, 2.0])
    with pytest.raises(ValueError, match="got 0"):
        smooth(np.array([1.0]), 0)


def test_cli_renders_png_and_html(tmp_path, capsys):
    poly = write_run(tmp_path / "runs" / "checkerboard-poly", nfe=14.0, seed=1,
                     hparams="reg: poly\nseed: 0\n")
    plain = write_run(tmp_path / "runs" / "checkerboard-none", nfe=26.0, seed=2,
                      hparams="reg: none\nseed: 0\n")
    out, page = tmp_path / "out" / "report.png", tmp_path / "out" / "report.html"
    code = main([str(poly), str(plain), "--out", str(out), "--html", str(page), "--smooth", "5"])
    assert code == 0
    assert out.stat().st_size > 30_000
    assert png_size(out) == (1100, 800)
    text = page.read_text()
    assert "data:image/png;base64," in text and "checkerboard-none" in text
    printed = capsys.readouterr().out
    assert "checkerboard-poly" in printed and f"wrote {out}" in printed


def test_cli_labels_from_hparams(tmp_path, capsys):
    a = write_run(tmp_path / "x" / "run", hparams="reg: poly\n")
    b = write_run(tmp_path / "y" / "run", hparams="seed: 3\n")
    assert main([str(a), str(b), "--out", str(tmp_path / "r.png"), "--label", "reg"]) == 0
    printed = capsys.readouterr().out
    assert "reg=poly" in printed and "run " in printed


def test_cli_error_names_folder_without_metrics(tmp_path, capsys):
    good = write_run(tmp_path / "good")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    code = main([str(good), str(empty), "--out", str(tmp_path / "r.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "metrics.csv" in err and "CSVLogger" in err
    assert not (tmp_path / "r.png").exists()
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "r.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_nested_lightning_layout_is_found(tmp_path):
    write_run(tmp_path / "run" / "lightning_logs" / "version_0")
    run = load_run(tmp_path / "run")
    assert run.path == tmp_path / "run" / "lightning_logs" / "version_0" / "metrics.csv"
    assert run.name == "run"


def test_render_report_without_validation_or_times(tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "metrics.csv").write_text("step,nfe/forward\n0,10\n1,12\n")
    out = render_report([load_run(folder)], tmp_path / "bare.png")
    assert png_size(out) == (1100, 800)


def test_module_entry_point(tmp_path):
    run = write_run(tmp_path / "r1")
    proc = subprocess.run([sys.executable, "-m", "polyreg_cnf.app.report", str(run), "--out",
                           str(tmp_path / "r.png")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r.png").stat().st_size > 10_000
    proc = subprocess.run([sys.executable, "-m", "polyreg_cnf.app.report", str(tmp_path), "--out",
                           str(tmp_path / "r.png"), "--smooth", "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--smooth must be a positive integer, got 0" in proc.stderr


def test_resumed_run_parts_are_read_before_the_current_log(tmp_path):
    from polyreg_cnf.app.report import load_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.part1.csv").write_text("nfe/forward,step,train/nll\n14,0,7.0\n16,1,6.5\n")
    (run / "metrics.csv").write_text("nfe/backward,nfe/forward,step\n30,20,2\n31,22,3\n")
    log = load_run(run)
    assert list(log.columns["step"]) == [0, 1, 2, 3]
    assert list(log.columns["nfe/forward"]) == [14, 16, 20, 22]
    assert np.isnan(log.columns["nfe/backward"][0]) and log.columns["nfe/backward"][3] == 31
