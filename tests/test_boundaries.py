"""The engine's boundaries: one torchdiffeq module, no import cycles, strategies that act, one
typed solver error under one exception base."""

import ast
from pathlib import Path

import pytest
import torch
from polyreg_cnf.callbacks.backprop import BackpropSelector
from polyreg_cnf.callbacks.plots import sample_trajectories
from torch import nn

import polyreg_cnf
from polyreg_cnf import (
    CNF,
    Adjoint,
    Auto,
    Backprop,
    Direct,
    NFECounter,
    ODENet,
    PolyregCNFError,
    SolverError,
    StepCheckpoint,
    odeint,
    odeint_adjoint,
    record_nfe,
    solve,
)
from polyreg_cnf.engine.strategies import MEMORY_BOUNDED, AutoDecision

ROOT = Path(__file__).resolve().parents[1]
#: The installed package's folders: polyreg_cnf/, and callbacks/, datamodules/ installed inside it.
FOLDERS = {"polyreg_cnf": ROOT / "polyreg_cnf", "polyreg_cnf.callbacks": ROOT / "callbacks",
           "polyreg_cnf.datamodules": ROOT / "datamodules"}


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    found = {}
    for prefix, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((prefix, *parts))] = path
    return found


def _imports(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules imported anywhere in ``tree`` (function bodies too): ``import a.b`` names
    a.b; ``from a import b`` names a.b where that is a module of ``modules``, else a."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return out


def _graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports."""
    modules = _modules()
    return {name: {m for m in _imports(ast.parse(path.read_text()), name,
                                       path.name == "__init__.py", set(modules))
                   if m in modules and m != name}
            for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_exactly_one_module_imports_torchdiffeq():
    importers = set()
    for name, path in _modules().items():
        named = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", set())
        if any(m == "torchdiffeq" or m.startswith("torchdiffeq.") for m in named):
            importers.add(name)
    assert importers == {"polyreg_cnf.engine._torchdiffeq"}


def test_the_package_has_no_import_cycle():
    graph = _graph()
    assert "polyreg_cnf.engine.forward_divergence" in graph  # the graph covers the engine
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_engine_module_is_over_450_lines():
    long = {p.name: n for p in (ROOT / "polyreg_cnf" / "engine").glob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


# ------------------------------------------------------------------------------ strategies
class Recorded(Backprop):
    """A strategy of the user's own: solve() must hand it the solve without knowing its class."""

    kind = "recorded"

    def __init__(self):
        self.problems = []

    def solve(self, problem):
        self.problems.append(problem)
        return Direct().solve(problem)


def test_solve_hands_the_solve_to_any_strategy():
    strategy = Recorded()
    y0, t = torch.ones(3, 2), torch.linspace(0.0, 1.0, 3)
    func = ODENet(2, (8,))
    y = solve(func, y0, t, rtol=1e-6, atol=1e-6, backprop=strategy)
    assert len(strategy.problems) == 1 and strategy.problems[0].field is func
    assert torch.equal(y, solve(func, y0, t, rtol=1e-6, atol=1e-6))


@pytest.mark.parametrize("strategy", [Direct(), Adjoint(), Adjoint(carry=False),
                                      StepCheckpoint(), Auto()])
def test_every_strategy_solves_the_same_forward_and_reaches_the_parameters(strategy):
    torch.manual_seed(0)
    func = ODENet(2, (8,))
    y0, t = torch.randn(4, 2), torch.linspace(0.0, 1.0, 4)
    y = solve(func, y0, t, rtol=1e-6, atol=1e-6, backprop=strategy)
    with torch.no_grad():
        reference = solve(func, y0, t, rtol=1e-6, atol=1e-6)
    assert torch.equal(y, reference)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in func.parameters())


def test_a_non_strategy_is_refused_with_what_was_received():
    with pytest.raises(TypeError, match="backprop must be a Backprop strategy or None, got 'adj"):
        solve(ODENet(2, (8,)), torch.ones(1, 2), torch.tensor([0.0, 1.0]), rtol=1e-3,
              atol=1e-3, backprop="adjoint")


def test_auto_decides_per_block_and_reads_the_old_name():
    cnf = CNF(ODENet(2, (8,)))
    cnf(torch.randn(8, 2))  # the first training solve measures, then proposes
    assert cnf.backprop_decision.bytes_per_row > 0
    assert cnf.backprop_decision.choice in ("direct", MEMORY_BOUNDED)
    assert CNF(ODENet(2, (8,))).backprop_decision == AutoDecision()  # a block of its own
    decision = AutoDecision()
    decision.agree("adjoint", False)  # a 0.2 checkpoint's name for memory-bounded
    assert decision.choice == MEMORY_BOUNDED and decision.wants_memory_bound is False
    selector = BackpropSelector()
    selector.load_state_dict({"choice": "adjoint", "fell_back": False})
    assert selector.state_dict() == {"choice": MEMORY_BOUNDED, "fell_back": False}
    with pytest.raises(ValueError, match="got 'bounded'"):
        decision.agree("bounded", False)


# ------------------------------------------------------------------------------ observed solves
def test_the_trajectory_plots_solve_through_the_engine():
    blocks = [CNF(ODENet(2, (8,)), T=0.5), CNF(ODENet(2, (8,)))]
    counter = NFECounter()
    with record_nfe(counter):
        sample_trajectories(blocks, num_points=5, num_times=3)
    assert counter.solves == 2 and counter.forward > 0
    assert all(block.nfe.forward == 0 for block in blocks)  # the blocks' own counts untouched


def test_odeint_adjoint_of_a_plain_function_goes_through_solve():
    A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    counter = NFECounter()
    with record_nfe(counter):
        y = odeint_adjoint(lambda t, y: y @ A.T, torch.ones(2, 2), torch.linspace(0, 1, 3),
                           adjoint_params=(A,))
    y.sum().backward()
    assert counter.forward > 0 and counter.backward > 0 and A.grad is not None
    with pytest.raises(ValueError, match="must be an instance of nn.Module.*adjoint_params="):
        odeint_adjoint(lambda t, y: -y, torch.ones(2), torch.linspace(0, 1, 3))


# ------------------------------------------------------------------------------ errors
def test_a_solver_failure_is_one_typed_error():
    with pytest.raises(SolverError, match="max_num_steps exceeded") as info:
        odeint(lambda t, y: -50 * y, torch.ones(2), torch.tensor([0.0, 10.0]), rtol=1e-9,
               atol=1e-9, options={"max_num_steps": 3})
    assert isinstance(info.value.__cause__, AssertionError)
    assert polyreg_cnf.solver_failure(info.value) is info.value

    def own_assert(t, y):
        raise AssertionError("the user's own")

    with pytest.raises(AssertionError, match="the user's own") as info:  # not ours to retype
        odeint(own_assert, torch.ones(2), torch.tensor([0.0, 1.0]))
    assert not isinstance(info.value, SolverError)
    assert polyreg_cnf.solver_failure(info.value) is None


def test_torchdiffeqs_own_adjoint_failing_backward_is_recognised_by_origin():
    class Stiffening(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.tensor(1.0))

        def forward(self, t, y):
            # tame forward, explosive in the backward pass's augmented system
            return -self.k * y if torch.is_grad_enabled() is False else -self.k * y * 1e6

    func = Stiffening()
    y = solve(func, torch.ones(2), torch.tensor([0.0, 1.0]), rtol=1e-9, atol=1e-9,
              options={"max_num_steps": 50}, backprop=Adjoint(carry=False,
                                                               options={"max_num_steps": 3}))
    with pytest.raises(AssertionError) as info:
        y.sum().backward()
    assert isinstance(polyreg_cnf.solver_failure(info.value), SolverError)


def test_the_projects_exceptions_share_one_base():
    from polyreg_cnf.callbacks.guard import NumericalFaultError
    from polyreg_cnf.datamodules import DataFileError

    from polyreg_cnf.app.config import ConfigError
    from polyreg_cnf.app.report import ReportError
    from polyreg_cnf.models.checkpoint import CheckpointKindError

    classes = [ConfigError, ReportError, NumericalFaultError, DataFileError, CheckpointKindError,
               polyreg_cnf.NFELimitError, SolverError]
    assert all(issubclass(c, PolyregCNFError) for c in classes)
    # every class defined in the package is one of them (grep-free: the package's own ASTs)
    defined = set()
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Exception")):
                defined.add(node.name)
    assert defined == {c.__name__ for c in classes} | {"PolyregCNFError"}
