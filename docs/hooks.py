"""mkdocs hooks: the command line reference is generated from the parser when the site builds.

``docs/cli.md`` holds the marker ``<!-- all flags -->``; this hook replaces it with one table per
option group of :func:`polyreg_cnf.app.config.make_parser` (flag, choices, help with default),
so the reference cannot drift from ``polyreg-cnf train --help``.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["flag_tables", "on_page_markdown"]

MARKER = "<!-- all flags -->"
PAGE = "cli.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def flag_tables(parser: argparse.ArgumentParser) -> str:
    """One markdown table per option group of ``parser`` (help flags left out)."""
    blocks = []
    # argparse keeps its groups in _action_groups: the only way to read them back in order
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.option_strings and not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        rows = ["| flag | choices | meaning |", "|---|---|---|"]
        for action in actions:
            flags = ", ".join(f"`{s}`" for s in action.option_strings)
            choices = ", ".join(f"`{c}`" for c in action.choices) if action.choices else ""
            rows.append(f"| {flags} | {choices} | {_cell(action.help or '')} |")
        title = group.title or ""
        blocks.append(f"### {title[:1].upper()}{title[1:]}\n\n" + "\n".join(rows))
    return "\n\n".join(blocks)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Replace the marker on the command line page with the generated flag tables."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"docs/{PAGE} lost its {MARKER!r} marker: the flag tables go there")
    from polyreg_cnf.app.config import make_parser

    return markdown.replace(MARKER, flag_tables(make_parser("polyreg-cnf train")))
