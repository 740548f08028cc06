"""Every committed report, rendered again from its JSON alone.

    python -m benchmarks.report            # rewrite every benchmarks/results/<name>.md
    python -m benchmarks.report --check    # change nothing; exit 1 naming each report that
                                           # its JSON no longer renders byte for byte

A report ``<name>.md`` is rendered by the study that wrote it (:func:`study_of`) from
``<name>.json``; the pictures are drawn by the runs and are not redrawn here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import RESULTS

__all__ = ["PREFIXES", "UNRENDERED", "main", "render", "reports", "study_of"]

#: Committed reports that no study renders, and why (docs/benchmarks.md says more).
UNRENDERED = {
    "matched": "made before the arms were renumbered (8a9418d): its arm names are not today's",
}

#: Reports named otherwise than their study: name prefix -> study.
PREFIXES = {"frontier_": "frontier", "step_cost": "step_cost", "accuracy": "accuracy",
            "vae_size": "vae_size", "refactor_identity": "identity"}


def study_of(name: str) -> str:
    """The module of ``benchmarks`` that renders report ``name``.

    Example:
        >>> study_of("frontier_long"), study_of("long_fresh"), study_of("accuracy_pilot")
        ('frontier', 'run', 'accuracy')
    """
    from benchmarks.run import SUITES

    if name in SUITES:
        return "run"
    return next((study for prefix, study in PREFIXES.items() if name.startswith(prefix)), name)


def reports(results: Path = RESULTS) -> list[str]:
    """The names of the reports in ``results`` with a JSON to render from (and a renderer)."""
    return sorted(p.stem for p in results.glob("*.md")
                  if p.with_suffix(".json").exists() and p.stem not in UNRENDERED)


def render(name: str, results: Path = RESULTS) -> str:
    """Report ``name`` rendered from ``results/<name>.json``."""
    module = importlib.import_module(f"benchmarks.{study_of(name)}")
    return module.STUDY.render(json.loads((results / f"{name}.json").read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.report``: rewrite, or with ``--check`` compare, every report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a report differs from its rendering")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    differ = []
    for name in reports(args.results):
        text, md = render(name, args.results), args.results / f"{name}.md"
        if args.check and md.read_text() != text:
            differ.append(name)
        elif not args.check:
            md.write_text(text)
    if differ:
        print(f"reports that their JSON does not render byte for byte: {', '.join(differ)}",
              file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
