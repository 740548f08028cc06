"""The architecture the folders promise: the engine needs torch and torchdiffeq only."""

import subprocess
import sys

APPLICATION = ("lightning", "pytorch_lightning", "torchmetrics", "wandb", "pandas", "h5py",
               "matplotlib", "sklearn", "yaml")


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return {name.split(".")[0] for name in out}


def test_engine_imports_neither_lightning_nor_the_application():
    top = imported_after("import polyreg_cnf, polyreg_cnf.engine.dropin, polyreg_cnf.engine.memory")
    assert "torch" in top and "torchdiffeq" in top  # the check sees real imports
    assert not top & set(APPLICATION), sorted(top & set(APPLICATION))


def test_the_application_layer_does_pull_lightning():
    # the same check on the application, so a broken probe cannot pass the test above silently
    assert "lightning" in imported_after("import polyreg_cnf.app.build")
