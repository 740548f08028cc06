"""Every docstring example of every module runs and prints what it says.

Modules are imported by their canonical names: ``polyreg_cnf`` and the repository's
``callbacks/`` and ``datamodules/`` folders, which are installed as ``polyreg_cnf.callbacks`` and
``polyreg_cnf.datamodules`` (a bare ``import callbacks`` is refused on purpose, so pytest's
``--doctest-modules`` cannot collect those folders).
"""

import doctest
import importlib
import pkgutil

import pytest
import torch

#: Packages to walk. The last two live outside polyreg_cnf/ in the repository and are mapped
#: into it by the installation, which an editable install's path walk does not see.
ROOTS = ("polyreg_cnf", "polyreg_cnf.callbacks", "polyreg_cnf.datamodules")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
#: Checked examples (with an expected output or exception) across the package, at least.
FLOOR = 60


def module_names():
    names = set(ROOTS)
    for root in ROOTS:
        package = importlib.import_module(root)
        names.update(m.name for m in pkgutil.walk_packages(package.__path__, root + "."))
    return sorted(names)


MODULES = module_names()


def examples(module):
    """The module's doctests that hold at least one example."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(module, module.__name__) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    tests = examples(module)
    skipped = [f"{t.name} line {e.lineno}" for t in tests for e in t.examples
               if e.options.get(doctest.SKIP)]
    assert not skipped, f"{name}: examples must run, these are skipped: {skipped}"
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = []
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for test in tests:
            runner.run(test, out=report.append)
    finally:
        torch.set_num_threads(threads)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)
    assert result.attempted == sum(len(t.examples) for t in tests)


def test_every_module_is_walked_and_examples_exist():
    """A walk that silently finds nothing (or loses a folder) must fail, not pass vacuously."""
    for expected in ("polyreg_cnf.engine.adjoint", "polyreg_cnf.engine.penalty",
                     "polyreg_cnf.models.vae", "polyreg_cnf.callbacks.polynomial",
                     "polyreg_cnf.callbacks.guard", "polyreg_cnf.datamodules.toy",
                     "polyreg_cnf.datamodules.images.sets", "polyreg_cnf.app.report"):
        assert expected in MODULES, expected
    assert len(MODULES) >= 35, MODULES
    # Only examples that check something count: an import or an assignment prints nothing.
    counts = {name: sum(1 for t in examples(importlib.import_module(name)) for e in t.examples
                        if e.want or e.exc_msg)
              for name in MODULES}
    assert sum(counts.values()) >= FLOOR, counts
    # The modules whose public entry points carry an example.
    for name in ("polyreg_cnf.engine.adjoint", "polyreg_cnf.engine.amortized",
                 "polyreg_cnf.engine.cnf", "polyreg_cnf.engine.nets", "polyreg_cnf.engine.nfe",
                 "polyreg_cnf.engine.penalty", "polyreg_cnf.engine.solver_config",
                 "polyreg_cnf.engine.trace", "polyreg_cnf.models.density",
                 "polyreg_cnf.models.vae", "polyreg_cnf.callbacks.guard",
                 "polyreg_cnf.callbacks.plots", "polyreg_cnf.datamodules.toy",
                 "polyreg_cnf.datamodules.tabular", "polyreg_cnf.datamodules.user_table",
                 "polyreg_cnf.datamodules.images.factory"):
        assert counts[name] > 0, f"{name} has no docstring example"
