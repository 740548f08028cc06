"""Guard for the repository's top-level ``callbacks/`` and ``datamodules/`` folders.

They are installed as ``polyreg_cnf.callbacks`` and ``polyreg_cnf.datamodules`` (setuptools
``package-dir``), never as top-level packages: generic names would collide with a user project's
own ``callbacks`` package. With the repository root on ``sys.path`` (``python train.py``, pytest
from the root) the same folder could still be imported under its bare name, giving a second copy
of every class (``isinstance`` would fail across them); that import is refused instead.
"""

from __future__ import annotations

__all__ = ["refuse_top_level"]


def refuse_top_level(name: str, example: str) -> None:
    """Raise ImportError if a folder was imported under a name other than ``polyreg_cnf.*``."""
    if not name.startswith("polyreg_cnf."):
        short = name.split(".")[0]
        raise ImportError(
            f"polyreg-cnf's {short!r} package was imported as {name!r}; import it through the "
            f"polyreg_cnf namespace instead, e.g. `{example}` (a bare `{short}` import would "
            f"load a second copy of every class, or collide with your project's own {short!r})")
