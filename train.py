#!/usr/bin/env python
"""Train a CNF density model (or a VAE with a CNF posterior), with or without the trajectory
polynomial regularizer.

    python train.py --model cnf --data checkerboard --reg poly
    python train.py --model cnf --data power --data-dir ~/maf-data --reg poly
    python train.py --model cnf --data my_table.csv --reg none
    python train.py --model vae --reg poly
    python train.py --config runs/cnf-checkerboard-poly-s0/config.yaml --seed 1
    python train.py --data power --print-config

Options left unset come from the data set's preset (polyreg_cnf/app/presets.py). Every run
folder keeps its resolved configuration as config.yaml; --config FILE runs it again from
scratch (flags after it override it), --ckpt-path resumes a run.
"""

from __future__ import annotations

import sys
from typing import Any


def main(argv: list[str] | None = None, **build_options: Any) -> int:
    """Parse flags, build the run, train, test, print a summary; return the exit code.

    Args:
        argv: The flags (default: ``sys.argv[1:]``).
        **build_options: Passed to :func:`polyreg_cnf.app.build.build`: ``callbacks``,
            ``plugins``, ``trainer_kwargs``, ``datamodule`` (a launcher script's additions).
    """
    from polyreg_cnf.app.cli import train

    argv = sys.argv[1:] if argv is None else list(argv)
    return train(argv, prog="train.py", description=__doc__, **build_options)


if __name__ == "__main__":
    sys.exit(main())
