"""The numbers in README.md and docs/*.md agree with benchmarks/results/*.json, and the check
that says so fails when one of them is one unit off in its last printed digit."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def claims() -> Iterator[ModuleType]:
    patch = pytest.MonkeyPatch()
    patch.syspath_prepend(str(ROOT))
    yield importlib.import_module("benchmarks.claims")
    patch.undo()


@pytest.fixture(scope="module")
def registry(claims: ModuleType) -> ModuleType:
    return importlib.import_module("benchmarks.claims_registry")


@pytest.fixture(scope="module")
def results(claims: ModuleType) -> object:
    """The results read once for the module (the files do not change during the tests)."""
    return claims.Results()


def _pages(registry: ModuleType) -> dict[str, str]:
    return {p: (ROOT / p).read_text() for p in registry.PAGES}


def _problems(claims: ModuleType, registry: ModuleType, pages: dict[str, str],
              results: object) -> list:
    return claims.check(registry.CLAIMS, registry.EXEMPT, pages, results)


def _one_unit_off(stated: str) -> str:
    """The stated number with its last digit moved by one (up, or down from a 9)."""
    last = int(stated[-1])
    return stated[:-1] + str(last + 1 if last < 9 else last - 1)


def test_the_documented_command_passes_on_the_committed_pages() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.claims", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 problem(s)" in proc.stderr


# Claims from every page that has them, numbers of every kind: a ratio, a count, a signed
# difference, a percentage, a median's range, a seconds figure, an NFE count, table cells.
MUTATED = [("readme.frontier.bullet", "r"), ("readme.frontier.bullet", "c1c"),
           ("readme.fresh.lever", "flo"), ("readme.step_speed", "vtf"),
           ("readme.long.c1_quality", "hi"), ("results.step_cost.goal", "lo"),
           ("results.frontier.summary", "rhi"),
           ("results.frontier.row.long.checkerboard.tpr_fast", "dhi"),
           ("performance.few_steps.abs_d.checkerboard.rk4x4", "c"),
           ("results.sweep.large_coef", "nlo"), ("results.long.shorter", "lo"),
           ("results.late.counts", "k"), ("attach.dropin", "d"), ("data.cache", "hit"),
           ("results.full.breast_cancer.tpr_fast", "s1"),
           ("results.long.mixture16.tpr_fast", "dhi"),
           ("results.sweep.tpr_fast_c20", "tnp"), ("results.full.says_2d", "glo"),
           ("performance.engine_speed", "pf"), ("performance.adjoint_table.toy-2d", "cs")]


@pytest.mark.parametrize(("name", "slot"), MUTATED)
def test_one_unit_in_the_last_digit_fails(claims: ModuleType, registry: ModuleType,
                                          results: object, name: str, slot: str) -> None:
    [claim] = [c for c in registry.CLAIMS if c.name == name]
    pages = _pages(registry)
    located, problems = claims.locate(claim, pages, results)
    assert located is not None, problems
    a, b = located.spans[slot]
    stated = pages[claim.page][a:b]
    off = _one_unit_off(stated)
    pages[claim.page] = pages[claim.page][:a] + off + pages[claim.page][b:]
    problems = _problems(claims, registry, pages, results)
    assert [(f.page, f.claim) for f in problems] == [(claim.page, name)]
    message = str(problems[0])
    line = pages[claim.page].count("\n", 0, a) + 1
    assert message.startswith(f"{claim.page}:{line}: [{name}] {slot}: the page states {off},")
    assert f"source {claim.source}" in message
    # --write puts the data's value back, digit for digit
    assert claims.write(registry.CLAIMS, pages, results) == _pages(registry)


def test_a_page_the_registry_does_not_list_fails(tmp_path: Path, registry: ModuleType) -> None:
    for page in registry.PAGES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, tmp_path / page)
    (tmp_path / "docs" / "notes.md").write_text("# Notes\n\nNo numbers yet.\n")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.claims", "--check", "--root",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "docs/notes.md:0: [unlisted] a page that benchmarks/claims_registry.py PAGES" \
        in proc.stdout


@pytest.mark.slow  # 20 s of subprocesses; the in-process failures are tested below
def test_the_command_names_the_claim_and_exits_1(tmp_path: Path, registry: ModuleType,
                                                claims: ModuleType) -> None:
    for page in registry.PAGES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, tmp_path / page)
    text = (tmp_path / "docs/data.md").read_text()
    assert "0.04 s cache hit" in text
    (tmp_path / "docs/data.md").write_text(text.replace("0.04 s cache hit", "0.05 s cache hit"))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.claims", "--check", "--root",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "docs/data.md:28: [data.cache] hit: the page states 0.05, the data says 0.0416131" \
        in proc.stdout
    assert "data_cache.json" in proc.stdout
    # ... and --write repairs the copy
    subprocess.run([sys.executable, "-m", "benchmarks.claims", "--write", "--root",
                    str(tmp_path)], cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert (tmp_path / "docs/data.md").read_text() == text


def test_a_word_the_data_does_not_say_fails(claims: ModuleType, registry: ModuleType,
                                            results: object) -> None:
    pages = _pages(registry)
    before = "but not every one of the fresh seeds"
    assert pages["docs/results.md"].count(before) == 1
    pages["docs/results.md"] = pages["docs/results.md"].replace(
        before, "but also every one of the fresh seeds")
    [problem] = _problems(claims, registry, pages, results)
    assert problem.claim == "results.long.test_nfe_every"
    assert "the page states also, the data says not" in problem.message


def test_a_number_in_no_claim_fails(claims: ModuleType, registry: ModuleType,
                                    results: object) -> None:
    pages = _pages(registry)
    pages["README.md"] += "\nTPR trains 2.5x faster.\n"
    [problem] = _problems(claims, registry, pages, results)
    assert problem.claim == "uncovered" and "2.5 is in no claim" in problem.message
    # a claim whose text is gone is a problem too
    pages = _pages(registry)
    pages["docs/data.md"] = pages["docs/data.md"].replace("s first setup", "s to set up")
    found = [f.claim for f in _problems(claims, registry, pages, results)]
    assert found == ["data.cache", "uncovered", "uncovered", "uncovered"]


@pytest.mark.parametrize(("stated", "value", "holds"), [
    ("0.83", 0.8333, True), ("0.84", 0.8333, False), ("0.82", 0.8333, False),
    ("0.83", 0.8251, True), ("0.83", 0.8249, False), ("+0.020", 0.0203, True),
    ("-0.002", -0.0024, True), ("-0.002", 0.0024, False), ("10,000", 10000, True),
    ("3", 3, True), ("4", 3, False), ("every", "every", True), ("every", "not", False)])
def test_agreement_is_at_the_printed_precision(claims: ModuleType, stated: str, value: object,
                                               holds: bool) -> None:
    assert claims.agrees(stated, value) is holds


def test_render_keeps_the_page_style(claims: ModuleType) -> None:
    assert claims.render("+0.020", 0.0125) == "+0.013"
    assert claims.render("+0.020", -0.0125) == "-0.013"
    assert claims.render("0.83", 0.8125) == "0.81"
    assert claims.render("10,000", 12345.4) == "12,345"
    assert claims.render("every", "not") == "not"
