"""Numbers in the prose, checked against (or rendered from) the committed results files.

    python -m benchmarks.claims --check      # exit 1 and name every claim that differs
    python -m benchmarks.claims --write      # rewrite the claimed numbers and words from data
    python -m benchmarks.claims --uncovered  # list numbers that no claim and no exemption covers

A claim (:class:`Claim`) is a piece of text on one page (README.md or docs/*.md) with slots
written ``{name}``, and a function that computes every slot's value from the JSON files in
benchmarks/results/. ``--check`` finds the text on its page (whitespace may differ: the prose
is wrapped), reads what the page states in each slot and compares it with the computed value
at the precision the page prints: a stated ``0.83`` holds for any value in [0.825, 0.835], and
one unit more in its last digit does not. Words are slots too ("every", "never", "3 of 6"):
the registry computes them from the data, and the check compares them exactly. ``--write``
puts the computed values into the slots, at the precision and in the style (sign, thousands
separator) the page already uses.

Every number of the pages that is not in a claim's slot must be exempted with a reason
(:class:`Exempt`: a configuration value, a paper figure, a label); ``--check`` fails on a
number that is neither. The registry is benchmarks/claims_registry.py; this module reads JSON
only and imports no other benchmark module.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["Claim", "Exempt", "Finding", "Located", "Results", "agrees", "check", "locate", "main",
           "numbers_of", "render", "write"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: A number as the pages write it: optional sign, thousands separators, decimals.
NUMBER = r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?"
#: A word slot: one token ("every", "never", "wins", "2/3").
WORD = r"[A-Za-z0-9/][\w/'-]*"

Value = float | int | str


class Results:
    """The committed JSON results, loaded once per file."""

    def __init__(self, folder: Path = RESULTS) -> None:
        self.folder = folder

    @cache  # noqa: B019 - one instance per run; the files are read once
    def __call__(self, name: str) -> Any:
        """The parsed JSON of ``benchmarks/results/<name>`` (``.json`` may be left out)."""
        path = self.folder / (name if name.endswith(".json") else name + ".json")
        if not path.is_file():
            raise FileNotFoundError(f"no results file {path}")
        return json.loads(path.read_text())


@dataclass(frozen=True)
class Claim:
    """Numbers (and words) stated on a page, with the function that computes them.

    Attributes:
        name: Unique name, used in messages and in tests.
        page: The page, relative to the repository root (``README.md``, ``docs/results.md``).
        text: The stated text with ``{slot}`` placeholders; any run of whitespace matches any
            other (the prose is wrapped). It must occur exactly once on the page.
        source: The results file and key the values come from, for messages.
        compute: Computes every slot's value from :class:`Results`: floats and ints are
            compared at the page's printed precision, strings exactly.
        table_after: For a table row: the text (a heading) after which the row's table is
            the first one on the page; the row must occur exactly once in that table.
    """

    name: str
    page: str
    text: str
    source: str
    compute: Callable[[Results], dict[str, Value]]
    table_after: str = ""

    def slots(self) -> list[str]:
        return re.findall(r"\{(\w+)\}", self.text)

    def pattern(self, values: dict[str, Value]) -> re.Pattern[str]:
        """The text as a regex whose groups are the slots (number or word, by value type)."""
        out = []
        for i, piece in enumerate(re.split(r"\{(\w+)\}", self.text)):
            if i % 2:
                kind = WORD if isinstance(values[piece], str) else NUMBER
                out.append(f"(?P<{piece}>{kind})")
            else:
                out.append(r"\s+".join(re.escape(w) for w in re.split(r"\s+", piece)))
        return re.compile("".join(out))


@dataclass(frozen=True)
class Exempt:
    """Numbers that are not benchmark results (a configuration value, a paper's figure, a
    label), matched by ``pattern`` on ``page`` (``*``: every page), with the reason. A space in
    the pattern matches any run of whitespace."""

    page: str
    pattern: str
    reason: str


@dataclass
class Finding:
    """One problem found by :func:`check`, printed as one line."""

    page: str
    line: int
    claim: str
    message: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: [{self.claim}] {self.message}"


@dataclass
class Located:
    """A claim found on its page: computed values, and each slot's span and stated text."""

    claim: Claim
    values: dict[str, Value]
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    stated: dict[str, str] = field(default_factory=dict)


def table_region(text: str, after: str) -> tuple[int, int]:
    """Start and end of the first table (consecutive lines starting with ``|``) after the
    only occurrence of ``after``."""
    if text.count(after) != 1:
        raise ValueError(f"table anchor found {text.count(after)} times: {after!r}")
    pos = text.index(after)
    start = text.find("\n|", pos)
    if start < 0:
        raise ValueError(f"no table after {after!r}")
    end = start + 1
    while text.startswith("|", end):
        nl = text.find("\n", end)
        end = len(text) if nl < 0 else nl + 1
    return start + 1, end


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def decimals(stated: str) -> int:
    """Digits after the decimal point of a stated number."""
    return len(stated.split(".")[1]) if "." in stated else 0


def agrees(stated: str, value: Value) -> bool:
    """Whether a stated slot says ``value``: words exactly, numbers within half a unit of the
    last printed digit (``0.83`` holds for [0.825, 0.835])."""
    if isinstance(value, str):
        return stated == value
    number = float(stated.replace(",", ""))
    half = 0.5 * 10.0 ** -decimals(stated)
    return abs(number - float(value)) <= half * (1 + 1e-9) + 1e-12


def render(stated: str, value: Value) -> str:
    """``value`` written as the page writes ``stated``: same decimals, sign style, separator."""
    if isinstance(value, str):
        return value
    spec = ("+" if stated[:1] in "+-" and float(value) != 0 or stated[:1] == "+" else "")
    spec += "," if "," in stated else ""
    text = f"{float(value):{spec}.{decimals(stated)}f}"
    return "0" if text in ("-0", "+0") else text


def locate(claim: Claim, pages: dict[str, str], results: Results
           ) -> tuple[Located | None, list[Finding]]:
    """Find ``claim`` on its page; None and the reason when it cannot be computed or found."""
    text = pages.get(claim.page)
    if text is None:
        return None, [Finding(claim.page, 0, claim.name, "page not found")]
    try:
        values = claim.compute(results)
    except Exception as exc:  # a claim whose source is gone or changed shape
        return None, [Finding(claim.page, 0, claim.name,
                              f"cannot compute from {claim.source}: {exc!r}")]
    if set(values) != set(claim.slots()):
        return None, [Finding(claim.page, 0, claim.name,
                              f"computes {sorted(values)}, the text has {claim.slots()}")]
    start, end = 0, len(text)
    if claim.table_after:
        try:
            start, end = table_region(text, claim.table_after)
        except ValueError as exc:
            return None, [Finding(claim.page, 0, claim.name, str(exc))]
    found = list(claim.pattern(values).finditer(text, start, end))
    if len(found) != 1:
        what = "not found" if not found else f"found {len(found)} times"
        return None, [Finding(claim.page, 0, claim.name, f"text {what}: {claim.text!r}")]
    m = Located(claim, values)
    for slot in claim.slots():
        m.spans[slot] = found[0].span(slot)
        m.stated[slot] = found[0].group(slot)
    return m, []


def _mismatches(m: Located, text: str) -> list[Finding]:
    out = []
    for slot, stated in m.stated.items():
        value = m.values[slot]
        if not agrees(stated, value):
            shown = value if isinstance(value, str) else f"{float(value):.6g}"
            out.append(Finding(m.claim.page, _line(text, m.spans[slot][0]), m.claim.name,
                               f"{slot}: the page states {stated}, the data says {shown} "
                               f"(would print {render(stated, value)}; "
                               f"source {m.claim.source})"))
    return out


#: A number in prose: not inside a word, except after "x" (``x1.07``) and before "x" ("1.2x").
_PROSE_NUMBER = r"(?<![A-Za-wyz_\d.])\d+(?:,\d{3})*(?:\.\d+)?(?![A-Za-wyz_\d]|\.\d)"
_SKIP = [r"```.*?```", r"<!--.*?-->", r"`[^`]+`", r"\]\([^)\s]*\)", r"https?://\S+"]


def numbers_of(text: str) -> list[tuple[int, int]]:
    """Spans of the numbers in a page's prose: not in code, comments, link targets or URLs,
    and not part of a word (``x1``, ``2-D`` count as numbers, ``bench_v2`` does not)."""
    hidden = [False] * len(text)
    masked = text
    for pattern in _SKIP:  # in order: code blocks first, so their backticks pair no further
        for m in re.finditer(pattern, masked, flags=re.S):
            hidden[m.start():m.end()] = [True] * (m.end() - m.start())
            masked = masked[:m.start()] + " " * (m.end() - m.start()) + masked[m.end():]
    spans = []
    for m in re.finditer(_PROSE_NUMBER, text):
        if not hidden[m.start()]:
            spans.append(m.span())
    return spans


def _covered(text: str, page: str, matches: Iterable[Located], exempt: Iterable[Exempt]
             ) -> list[bool]:
    cover = [False] * len(text)
    for m in matches:
        for a, b in m.spans.values():
            cover[a:b] = [True] * (b - a)
    for e in exempt:
        if e.page in ("*", page):
            # a space in the pattern matches any run of whitespace: the prose is wrapped
            for found in re.finditer(e.pattern.replace(" ", r"\s+"), text, flags=re.S):
                cover[found.start():found.end()] = [True] * (found.end() - found.start())
    return cover


def load_pages(root: Path, names: Iterable[str]) -> dict[str, str]:
    return {n: (root / n).read_text() for n in names if (root / n).is_file()}


def check(claims: list[Claim], exempt: list[Exempt], pages: dict[str, str],
          results: Results, coverage: bool = True) -> list[Finding]:
    """Every problem: a claim not found or differing from its data, a name used twice, and
    (with ``coverage``) a number on a page that no claim and no exemption covers."""
    findings: list[Finding] = []
    names = [c.name for c in claims]
    for name in sorted({n for n in names if names.count(n) > 1}):
        findings.append(Finding("-", 0, name, "claim name registered twice"))
    matches = []
    for claim in claims:
        m, problems = locate(claim, pages, results)
        findings += problems
        if m is not None:
            matches.append(m)
            findings += _mismatches(m, pages[claim.page])
    if coverage:
        for page, text in pages.items():
            cover = _covered(text, page, [m for m in matches if m.claim.page == page], exempt)
            for a, b in numbers_of(text):
                if not all(cover[a:b]):
                    context = text[max(0, a - 40):b + 20].replace("\n", " ")
                    findings.append(Finding(page, _line(text, a), "uncovered",
                                            f"{text[a:b]} is in no claim and not exempt: "
                                            f"...{context}..."))
    return findings


def write(claims: list[Claim], pages: dict[str, str], results: Results) -> dict[str, str]:
    """The pages with every slot that disagrees with its data set to the computed value."""
    out = dict(pages)
    edits: dict[str, list[tuple[int, int, str]]] = {}
    for claim in claims:
        m, _ = locate(claim, pages, results)
        if m is not None:
            for slot, (a, b) in m.spans.items():
                if not agrees(m.stated[slot], m.values[slot]):  # a tie at .5 stays as written
                    edits.setdefault(claim.page, []).append(
                        (a, b, render(m.stated[slot], m.values[slot])))
    for page, page_edits in edits.items():
        text = pages[page]
        for a, b, new in sorted(page_edits, reverse=True):
            text = text[:a] + new + text[b:]
        out[page] = text
    return out


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1 when ``--check`` finds a problem)."""
    from benchmarks.claims_registry import CLAIMS, EXEMPT, PAGES

    parser = argparse.ArgumentParser(prog="python -m benchmarks.claims",
                                     description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="compare every claim with its data")
    mode.add_argument("--write", action="store_true", help="rewrite the claims from the data")
    mode.add_argument("--uncovered", action="store_true",
                      help="list the numbers that no claim and no exemption covers")
    mode.add_argument("--list", action="store_true", help="list the claims and their values")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the folder holding README.md and docs/ (default: this checkout)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="the folder holding the results JSON (default: benchmarks/results)")
    args = parser.parse_args(argv)
    if not (args.root / "README.md").is_file():
        parser.error(f"--root {args.root} holds no README.md")
    if not args.results.is_dir():
        parser.error(f"--results {args.results} is not a folder")
    pages = load_pages(args.root, PAGES)
    results = Results(args.results)
    # a new page is checked too: it must be registered (its numbers claimed or exempt)
    found = {"README.md", *(f"docs/{p.name}" for p in (args.root / "docs").glob("*.md"))}
    unlisted = [Finding(page, 0, "unlisted", "a page that benchmarks/claims_registry.py PAGES "
                        "does not list: add it, then claim or exempt its numbers")
                for page in sorted(found - set(PAGES))]
    if args.write:
        for page, text in write(CLAIMS, pages, results).items():
            if text != pages[page]:
                (args.root / page).write_text(text)
                print(f"rewrote {page}")
        return 0
    if args.list:
        for claim in CLAIMS:
            print(f"{claim.page}: {claim.name} = {claim.compute(results)}  ({claim.source})")
        return 0
    findings = unlisted + check(CLAIMS, EXEMPT, pages, results)
    for f in findings:
        if not args.uncovered or f.claim == "uncovered":
            print(f)
    numbers = sum(len(numbers_of(t)) for t in pages.values())
    print(f"{len(CLAIMS)} claims and {len(EXEMPT)} exemptions, {numbers} numbers on "
          f"{len(pages)} pages: {len(findings)} problem(s)", file=sys.stderr)
    return 1 if findings and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
