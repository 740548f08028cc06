"""Reading and writing run configurations: the YAML file every run stores, the ``train.py``
command line (one flag per option of :mod:`polyreg_cnf.app.schema`) and rebuilding the command
line that gives a configuration.

Example:
    >>> from polyreg_cnf.app.schema import resolve
    >>> given, run = parse_command_line(make_parser(), ["--data", "power", "--lr", "0.01"])
    >>> given, run["print_config"]
    ({'data': 'power', 'lr': 0.01}, False)
    >>> "lr: 0.01" in dump_config(resolve(given))
    True
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from polyreg_cnf.app.options import ConfigError
from polyreg_cnf.app.schema import GROUPS, OPTIONS, RunConfig, model_defaults, resolve

__all__ = ["command_line", "dump_config", "load_config", "make_parser", "parse_command_line"]


class _Dumper(yaml.SafeDumper):
    """Safe YAML with lists on one line (``hidden_dims: [64, 64, 64]``)."""


_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))


def dump_config(config: RunConfig) -> str:
    """The YAML text of ``config`` (grouped as :class:`RunConfig` is); :func:`load_config`
    reads it back."""
    header = ("# polyreg-cnf run configuration. Run it again from scratch with\n"
              "#   python train.py --config THIS_FILE [flags that override it]\n")
    return header + yaml.dump(config.nested(), Dumper=_Dumper, sort_keys=False)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a config file (as :func:`dump_config` writes it) as flat option name -> value.

    Group sections (``ode:``, ``flow:``, ...) and top-level option names are both accepted.

    Raises:
        FileNotFoundError: No such file.
        ConfigError: Not a YAML mapping, or unknown sections or names.
    """
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {str(path)!r} must hold a mapping of options, got "
                          f"{type(loaded).__name__}")
    flat: dict[str, Any] = {}
    for key, value in loaded.items():
        if key in GROUPS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"--config {str(path)!r} has unknown options {unknown}; valid: "
                          f"{', '.join(OPTIONS)}")
    for name, value in flat.items():
        # YAML 1.1 reads 1e-4 (no dot) as a string: take numbers written that way too.
        kind = OPTIONS[name].kind
        if isinstance(value, str) and kind in (int, float):
            try:
                flat[name] = kind(value)
            except ValueError:
                pass  # the checks report it with the allowed values
    return flat


# ------------------------------------------------------------------------------ command line
_TITLES = {None: "what to train", "source": "data", "flow": "network",
           "vae": "VAE (--model vae)", "ode": "solver (paper: dopri5, train 1e-4, evaluation 1e-5)",
           "poly": "trajectory polynomial regularizer (--reg poly)",
           "kinetic": "RNODE kinetic regularizer (--reg kinetic)", "training": "optimisation",
           "hardware": "hardware", "output": "outputs"}


def _shown(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def make_parser(prog: str = "train.py", description: str | None = None
                ) -> argparse.ArgumentParser:
    """The command line of :class:`RunConfig`: one flag per option, plus ``--config``,
    ``--print-config`` and ``--ckpt-path``.

    An option left off the command line is absent from the parsed namespace (so presets and
    config files can fill it); use :func:`parse_command_line` to get the given options.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False,
        argument_default=argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {g: parser.add_argument_group(title) for g, title in _TITLES.items()}
    vae = model_defaults("vae")
    for spec in OPTIONS.values():
        default, own = (_shown(spec.default), _shown(vae.get(spec.name)))
        text = spec.help if default is None else f"{spec.help} (default: {default}" + \
            ("" if own is None else f"; --model vae: {own}") + ")"
        group = groups[spec.group]
        if spec.kind is bool and spec.optional:
            group.add_argument(spec.flag, dest=spec.name, action=argparse.BooleanOptionalAction,
                               help=text)
        elif spec.kind is bool:
            group.add_argument(spec.flag, dest=spec.name, help=spec.help,
                               action="store_false" if spec.default else "store_true")
        elif spec.choices is not None:
            group.add_argument(spec.flag, dest=spec.name, choices=spec.choices, help=text)
        else:
            group.add_argument(spec.flag, dest=spec.name, type=spec.parse, help=text,
                               metavar=spec.name.upper())
    run = parser.add_argument_group("run")
    run.add_argument("--config", metavar="FILE",
                     help="run a stored configuration (a run folder's config.yaml) again from "
                          "scratch; flags after it override it")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved configuration (YAML) and exit")
    run.add_argument("--ckpt-path", help="checkpoint to resume from, or 'last' (the latest "
                                         "run of this name)")
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options given on a command line, with ``--config`` files applied in order.

    A ``--config FILE`` replaces what came before it; flags after it override the file.

    Returns:
        ``(options, run)``: option name -> value, and the run flags (``print_config``,
        ``ckpt_path``) that are not part of a configuration.

    Raises:
        SystemExit: Bad flags (argparse's message and exit status 2).
        ConfigError: A config file that cannot be read.
    """
    argv = list(argv)
    starts = [i for i, token in enumerate(argv)
              if token == "--config" or token.startswith("--config=")]
    bounds = [0, *starts, len(argv)]
    options: dict[str, Any] = {}
    run: dict[str, Any] = {"print_config": False, "ckpt_path": None}
    for begin, end in zip(bounds[:-1], bounds[1:]):
        parsed = vars(parser.parse_args(argv[begin:end]))
        if "config" in parsed:
            options.update(load_config(parsed.pop("config")))
        for key in run:
            if key in parsed:
                run[key] = parsed.pop(key)
        options.update(parsed)
    return options, run


def command_line(config: RunConfig) -> list[str]:
    """The ``train.py`` flags that give ``config``: ``--model``, ``--data`` and every option
    whose value differs from what the data set's preset gives.

    Example:
        >>> command_line(resolve({"data": "power", "lr": 0.01, "backprop": "direct"}))
        ['--model', 'cnf', '--data', 'power', '--backprop', 'direct', '--lr', '0.01']

    Raises:
        ConfigError: ``config`` holds a value no flag can give (e.g. ``hidden_dims=None`` for
            a data set whose preset sets the widths).
    """
    base = resolve({"model": config.model, "data": config.data}).flat()
    argv = ["--model", config.model, "--data", config.data]
    for name, value in config.flat().items():
        spec = OPTIONS[name]
        if name in ("model", "data") or value == base[name] or value is None:
            continue
        if spec.kind is bool:
            stem = name.replace("_", "-")
            argv.append(f"--{stem}" if spec.optional and value else
                        f"--no-{stem}" if spec.optional else spec.flag)
        else:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            argv += [spec.flag, text]
    given, _ = parse_command_line(make_parser(), argv)
    if resolve(given) != config:
        differ = sorted(k for k, v in resolve(given).flat().items() if config.flat()[k] != v)
        raise ConfigError(f"no flags give this configuration: options {differ} hold values "
                          f"that only a config file can set")
    return argv
