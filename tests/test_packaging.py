"""The wheel installs one top-level package, usable from a project with its own `callbacks`."""

import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "polyreg_cnf", "callbacks", "datamodules")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel from a copy of the sources (the working tree gets no build/ folder)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("polyreg_cnf-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """The wheel installed into a folder of its own (no dependencies: they come from the venv)."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                           "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def test_wheel_holds_polyreg_cnf_as_its_only_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"polyreg_cnf"}
    for required in ("polyreg_cnf/callbacks/polynomial.py", "polyreg_cnf/datamodules/__init__.py",
                     "polyreg_cnf/engine/dropin.py"):
        assert required in names, required


def user_project(folder, layout):
    """A Lightning project with its own `callbacks` (a module or a package) and `datamodules`."""
    folder.mkdir()
    if layout == "module":
        (folder / "callbacks.py").write_text("WHOSE = 'user module'\n")
    else:
        (folder / "callbacks").mkdir()
        (folder / "callbacks" / "__init__.py").write_text("WHOSE = 'user package'\n")
    (folder / "datamodules").mkdir()
    (folder / "datamodules" / "__init__.py").write_text("WHOSE = 'user datamodules'\n")
    return folder


@pytest.mark.parametrize("layout", ["module", "package"])
def test_installed_wheel_imports_beside_a_users_own_callbacks(installed, tmp_path, layout):
    target = installed
    project = user_project(tmp_path / "project", layout)
    script = textwrap.dedent(f"""
        import callbacks, datamodules
        from polyreg_cnf.callbacks import PolynomialTrajectoryRegularizer
        import polyreg_cnf, polyreg_cnf.datamodules
        from polyreg_cnf.datamodules.toy import ToyDataModule
        assert callbacks.WHOSE == {"user " + layout!r}, callbacks.__file__
        assert datamodules.WHOSE == "user datamodules", datamodules.__file__
        assert polyreg_cnf.__file__.startswith({str(target)!r}), polyreg_cnf.__file__
        assert PolynomialTrajectoryRegularizer.__module__ == "polyreg_cnf.callbacks.polynomial"
        print("ok", PolynomialTrajectoryRegularizer(coef=1.0).coef)
    """)
    # -S: no site hooks, so the editable install of the repository cannot answer the import;
    # the venv's site-packages come in through PYTHONPATH for the dependencies only.
    path = f"{target}{':'}{sysconfig.get_paths()['purelib']}"
    proc = subprocess.run([sys.executable, "-S", "-c", script], cwd=project,
                          env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok 1.0"


@pytest.mark.parametrize("name,right", [("callbacks", "polyreg_cnf.callbacks"),
                                        ("datamodules", "polyreg_cnf.datamodules")])
def test_bare_import_from_the_repository_root_is_refused_with_the_right_name(name, right):
    script = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import {name}"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and f"`from {right} import" in last, last
