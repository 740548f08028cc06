"""What every study shares: machine facts, the commit, the report path and the command line.

A study is a module of this package with a :class:`Study`: its arguments, its measurement (a
JSON-able payload) and its renderer (payload -> markdown). :func:`main` is the one runner: it
parses the study's flags plus ``--out`` and ``--render``, measures, and writes the payload and
its markdown through :func:`write_report`, the one report path; ``--render`` rewrites a report
from its JSON alone. Imports only the standard library at the top, so a baseline interpreter
(``python -S``, benchmarks/step_speed.py) can import it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "ROOT", "Study", "UsageError", "command", "cpu_name", "figure", "git",
           "git_commit", "header", "machine", "main", "median_range", "parser_of", "save_figure",
           "spread", "suite_header", "table", "train_py", "versions", "write_json", "write_report"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git(tree: Path, *args: str, default: str | None = "?") -> str | None:
    """What ``git args`` prints in ``tree`` (stripped), ``default`` where git answers nothing."""
    try:
        out = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return default
    return out.stdout.strip() or default


def git_commit(default: str | None = "?") -> str | None:
    """Short hash of the checkout's HEAD, ``default`` outside a git checkout."""
    return git(ROOT, "rev-parse", "--short", "HEAD", default=default)


def versions(commit_default: str | None = "?") -> dict[str, str | None]:
    """Python, torch, lightning and torchdiffeq versions and the commit (``git_commit``)."""
    import lightning
    import torch
    import torchdiffeq

    return {"python": platform.python_version(), "torch": torch.__version__,
            "lightning": lightning.__version__, "torchdiffeq": torchdiffeq.__version__,
            "git_commit": git_commit(commit_default)}


def machine() -> dict[str, Any]:
    """Where and with what the numbers were measured (CPU, cores, versions, commit, date)."""
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            **versions(None), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def command(module: str, argv: Sequence[str] | None = None) -> str:
    """The command line that ran ``benchmarks.<module>`` with ``argv`` (default: sys.argv)."""
    given = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python -m", f"benchmarks.{module}", *map(shlex.quote, given)])


def train_py(argv: Sequence[str], cwd: Path, timeout: float = 1800,
             env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python train.py argv`` in ``cwd``; the finished process and the training wall time
    it printed (``training wall time (s): ...``; nan when it printed none).

    Raises:
        RuntimeError: train.py exited non-zero (the message ends with its stderr's tail).
    """
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(argv)} exited {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
    wall = re.search(r"^training wall time \(s\):\s*([0-9.eE+-]+)", proc.stdout, re.MULTILINE)
    return proc, float(wall.group(1)) if wall else float("nan")


def write_json(path: Path, payload: Any, indent: int | None = 1) -> None:
    """Write ``payload`` to ``path`` atomically (a stopped write leaves the old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(payload, indent=indent) + "\n")
    os.replace(tmp, path)


def write_report(out: Path, payload: dict[str, Any],
                 render: Callable[[dict[str, Any]], str], indent: int | None = 1) -> str:
    """The report path: ``out``.json holds the payload, ``out``.md its rendering; returns it."""
    out = Path(out)
    write_json(out.with_suffix(".json"), payload, indent)
    text = render(payload)
    out.with_suffix(".md").write_text(text)
    return text


def figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    """A matplotlib figure and its grid of axes (``rows`` x ``cols``), drawn off-screen (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, squeeze=False)


def save_figure(fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` (a PNG of the reports' resolution), close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]],
          align: str | None = None) -> list[str]:
    """A markdown table: the header, the rule (``align`` per column: ``l`` or ``r``), the rows.

    Example:
        >>> table(["a", "b"], [[1, "x"]], align="lr")
        ['| a | b |', '|---|---:|', '| 1 | x |']
    """
    if align is not None and len(align) != len(header):
        raise ValueError(f"align needs one of 'l'/'r' per column ({len(header)}), got {align!r}")
    rule = "".join("|---:" if a == "r" else "|---" for a in (align or "l" * len(header)))
    return [f"| {' | '.join(header)} |", rule + "|",
            *(f"| {' | '.join(str(c) for c in row)} |" for row in rows)]


def header(study: str, title: str, command: str, *facts: str) -> list[str]:
    """The top of a study's report: ``title``, the command that wrote it, ``facts`` (a paragraph
    each) and where docs/benchmarks.md says how ``study`` measures and how to read it.

    Example:
        >>> header("x", "X", "python -m benchmarks.x", "On a CPU.")[2:5]
        ['Command: `python -m benchmarks.x`', '', 'On a CPU.']
    """
    return [f"# {title}", "", f"Command: `{command}`", "",
            *(line for fact in facts for line in (fact, "")),
            f"How it measures and how to read it: docs/benchmarks.md, `benchmarks.{study}`.", ""]


def suite_header(title: str, command: str, facts: dict[str, Any], *lines: str) -> list[str]:
    """A report's opening: its title, the command that made it, the machine ``facts`` as they
    were recorded ('name value, ...') and the study's own markdown ``lines``.

    Example:
        >>> suite_header("T", "python -m benchmarks.x", {"cores": 2})
        ['# T', '', 'Command: `python -m benchmarks.x`  ', 'Machine: cores 2.  ']
    """
    machine_line = ", ".join(f"{name} {value}" for name, value in facts.items())
    return [f"# {title}", "", f"Command: `{command}`  ", f"Machine: {machine_line}.  ", *lines]


def median_range(summary: dict[str, float | None], fmt: str, sep: str = "-") -> str:
    """'median (min-max)' of a ``{"median", "min", "max"}`` entry (:func:`spread`'s), '-' where
    it has no median.

    Example:
        >>> median_range({"median": 1.5, "min": 1.0, "max": 2.25}, ".2f")
        '1.50 (1.00-2.25)'
        >>> median_range({"median": None, "min": None, "max": None}, ".2f")
        '-'
    """
    if summary["median"] is None:
        return "-"
    return (f"{summary['median']:{fmt}} ({summary['min']:{fmt}}{sep}"
            f"{summary['max']:{fmt}})")


def spread(values: Sequence[float | None], skip_none: bool = False) -> dict[str, float | None]:
    """Median, min and max of per-seed values: all None if any seed has none (``skip_none``:
    over the seeds that have one; all None if none has).

    Example:
        >>> spread([3, 1, 2]), spread([1, None])["median"], spread([1, None], True)["max"]
        ({'median': 2.0, 'min': 1.0, 'max': 3.0}, None, 1.0)
    """
    vals = [v for v in values if v is not None]
    if not vals or (len(vals) < len(values) and not skip_none):
        return {"median": None, "min": None, "max": None}
    return {"median": float(statistics.median(vals)), "min": float(min(vals)),
            "max": float(max(vals))}


class UsageError(ValueError):
    """Flags that do not go together: :func:`main` prints it as a usage error (exit status 2)."""


@dataclass(frozen=True)
class Study:
    """One benchmark: its flags, its measurement and its report.

    Attributes:
        name: The module under ``benchmarks`` and the default report ``results/<name>``.
        doc: The module docstring (the ``--help`` text).
        measure: Parsed arguments -> the payload (JSON-able); it may write extra files.
        render: Payload -> the markdown report.
        arguments: Adds the study's own flags to the parser.
        report: Parsed arguments -> the default report path without suffix (default:
            ``results/<name>``).
        indent: The JSON's indentation (None: one line, for long per-step arrays).
        flags: The study's own flags as data, flag -> ``add_argument`` options (after
            ``arguments``'s).
    """

    name: str
    doc: str
    measure: Callable[[argparse.Namespace], dict[str, Any]]
    render: Callable[[dict[str, Any]], str]
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    report: Callable[[argparse.Namespace], Path] | None = None
    indent: int | None = 1
    flags: dict[str, dict[str, Any]] = field(default_factory=dict)

    def main(self, argv: Sequence[str] | None = None) -> int:
        """``python -m benchmarks.<name>``: :func:`main` of this study."""
        return main(self, argv)


def parser_of(study: Study) -> argparse.ArgumentParser:
    """The command line of ``study``: its flags, ``--out`` and ``--render``."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{study.name}",
                                     description=study.doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    study.arguments(parser)
    for flag, options in study.flags.items():
        parser.add_argument(flag, **options)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results path without suffix (writes .json and .md; default "
                             f"benchmarks/results/{study.name})")
    parser.add_argument("--render", type=Path, default=None,
                        help="write nothing new: rewrite the markdown of this results JSON")
    return parser


def main(study: Study, argv: Sequence[str] | None = None) -> int:
    """The runner of every study: parse, measure, write the report (``--render``: only render).

    Returns:
        The exit status: the payload's ``meta.exit_status`` when it has one, else 0.
    """
    parser = parser_of(study)
    args = parser.parse_args(argv)
    if args.render is not None:
        payload = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(study.render(payload))
        return 0
    args.command = command(study.name, argv)
    if args.out is None:
        args.out = study.report(args) if study.report else RESULTS / study.name
    try:
        payload = study.measure(args)
    except UsageError as err:
        parser.error(str(err))
    print(write_report(args.out, payload, study.render, study.indent))
    return int(payload.get("meta", {}).get("exit_status", 0))
