"""A griffe extension for the API pages: read ``Example:`` headings as examples sections.

The project's Google docstrings head their doctests ``Example:`` (the Google guide's spelling);
griffe's Google parser knows only ``Examples:`` as a section and renders ``Example:`` as an
admonition of plain Markdown, in which ``>>>`` lines become nested quotes and list outputs
such as ``['power/data.npy']`` become broken link references. This extension renames the
heading, only where it stands alone on a line of the docstring's top level, before parsing.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

__all__ = ["SingularExampleHeadings"]

_HEADING = re.compile(r"^Example:$", flags=re.MULTILINE)


class SingularExampleHeadings(griffe.Extension):
    """Rename top-level ``Example:`` headings to ``Examples:`` in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the docstring of each object as it is created (before it is parsed)."""
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub("Examples:", obj.docstring.value)
