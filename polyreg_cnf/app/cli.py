"""The ``polyreg-cnf`` console command: ``polyreg-cnf train ...`` is ``python train.py ...``.

    polyreg-cnf train --model cnf --data checkerboard --reg poly
    polyreg-cnf train --model vae --reg poly
    polyreg-cnf train --data power --print-config
    polyreg-cnf --help

Both front doors share :func:`train`: the same flags, messages and exit codes (0 done, 2 bad
flags or bad data, 3 numerical fault, 130 / 143 interrupted by SIGINT / SIGTERM).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main", "make_parser", "train"]

PROG = "polyreg-cnf"

TRAIN_DESCRIPTION = """\
Train a CNF density model (or a VAE with a CNF posterior), with or without the trajectory
polynomial regularizer.

    polyreg-cnf train --model cnf --data checkerboard --reg poly
    polyreg-cnf train --model cnf --data power --data-dir ~/maf-data --reg poly
    polyreg-cnf train --model cnf --data my_table.csv --reg none
    polyreg-cnf train --model vae --reg poly
    polyreg-cnf train --config runs/cnf-checkerboard-poly-s0/config.yaml --seed 1
    polyreg-cnf train --data power --print-config

Options left unset come from the data set's preset (polyreg_cnf/app/presets.py). Every run
folder keeps its resolved configuration as config.yaml; --config FILE runs it again from
scratch (flags after it override it), --ckpt-path resumes a run.
"""


def train(argv: Sequence[str], prog: str = f"{PROG} train",
          description: str | None = TRAIN_DESCRIPTION, **build_options: Any) -> int:
    """Parse training flags, build the run, train, test, print a summary.

    Args:
        argv: The flags, without the program or command name.
        prog: Name used in usage lines and messages (``train.py`` for the script).
        description: The text ``--help`` prints above the flags.
        **build_options: Passed to :func:`polyreg_cnf.app.build.build`: ``callbacks``,
            ``plugins``, ``trainer_kwargs``, ``datamodule`` (a launcher script's additions).

    Returns:
        The exit code: 0 done (or the configuration printed), 2 bad data or settings found
        while building, 3 numerical fault, 130 / 143 interrupted by SIGINT / SIGTERM.

    Raises:
        SystemExit: Bad flags, argparse's way (a message on stderr, status 2), or ``--help``
            (status 0).
    """
    from polyreg_cnf.app.config import ConfigError, make_parser, parse_command_line, resolve

    parser = make_parser(prog, description)
    try:
        options, run_flags = parse_command_line(parser, list(argv))
        config = resolve(options)
    except ConfigError as err:
        parser.error(str(err))
    except FileNotFoundError as err:
        parser.error(f"--config: {err}")
    if run_flags["print_config"]:
        from polyreg_cnf.app.config import dump_config

        print(dump_config(config), end="")
        return 0

    from polyreg_cnf.app.build import build, execute

    try:
        run = build(config, ckpt_path=run_flags["ckpt_path"], **build_options)
        return execute(run, prog=prog)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


#: Command name -> (one line for ``--help``, the function that runs it on the remaining flags).
COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {
    "train": ("train and test a model (the flags of train.py; 'polyreg-cnf train --help')",
              train),
}


def make_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``polyreg-cnf COMMAND ...``, which lists the commands in ``--help``.

    Example:
        >>> make_parser().parse_args(["train"]).command
        'train'
    """
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Continuous normalizing flows with the trajectory polynomial regularizer.",
        epilog=f"Each command has its own flags: {PROG} COMMAND --help.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (text, _) in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``polyreg-cnf COMMAND [FLAGS]``; return the command's exit code.

    Only the first word is parsed here (the command, or ``--help``); the rest goes to the
    command untouched, so ``polyreg-cnf train FLAGS`` parses exactly as ``train.py FLAGS``.

    Args:
        argv: The words after the program name (default: ``sys.argv[1:]``).

    Returns:
        The command's exit code (see :func:`train`).

    Raises:
        SystemExit: No command or an unknown one (status 2), ``--help`` (status 0), or the
            command's own flag errors (status 2).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    head = argv[:1]
    if head and not head[0].startswith("-") and head[0] not in COMMANDS:
        make_parser().error(f"unknown command {head[0]!r}; the commands are: "
                            f"{', '.join(COMMANDS)}")
    command = make_parser().parse_args(head).command
    return COMMANDS[command][1](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
