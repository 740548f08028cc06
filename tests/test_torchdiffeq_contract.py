"""The torchdiffeq behaviours polyreg_cnf.engine.adjoint and .step_checkpoint rely on (0.2.5).

The restart-free adjoint steers torchdiffeq's adaptive Runge-Kutta solvers through options and
callbacks whose exact semantics are not documented API. pyproject.toml pins torchdiffeq to the
range these tests passed on; if one fails after an upgrade, the message names the behaviour
that changed and odeint_adjoint_carry must be revisited before the pin is widened.
"""

import numpy as np
import pytest
import torch
import torchdiffeq
from torchdiffeq import odeint, odeint_adjoint

CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")


def broken(behaviour):
    return f"torchdiffeq contract broken ({torchdiffeq.__version__}): {behaviour}"


class Recorder:
    """y' = rate(t) * y; records every evaluation time and every callback call."""

    def __init__(self, jumps=()):
        self.jumps = tuple(jumps)
        self.evals, self.calls = [], []

    def __call__(self, t, y):
        self.evals.append(t.detach().clone())
        rate = -1.0 - sum(float(t >= tj) for tj in self.jumps)
        return rate * y

    def _record(self, name, t0, y0, dt):
        self.calls.append((name, float(t0), float(dt)))

    def callback_step(self, t0, y0, dt):
        self._record("step", t0, y0, dt)

    def callback_accept_step(self, t0, y0, dt):
        self._record("accept", t0, y0, dt)

    def callback_reject_step(self, t0, y0, dt):
        self._record("reject", t0, y0, dt)

    def named(self, name):
        return [c for c in self.calls if c[0] == name]

    def eval_times(self):
        return {float(t) for t in self.evals}


def solve(field, t, **options):
    y0 = torch.ones(2, dtype=torch.float64)
    return odeint(field, y0, torch.tensor(t, dtype=torch.float64), rtol=1e-6, atol=1e-6,
                  method="dopri5", options=options)


def test_callback_step_receives_the_proposed_step_before_clipping():
    """adjoint.py carries the step *proposed* by the error control across output intervals:
    callback_step must get dt before it is clipped onto a step_t/jump_t, callback_accept_step
    the clipped one."""
    for barrier in ("step_t", "jump_t"):
        field = Recorder()
        solve(field, [0.0, 1.0], first_step=0.5, **{barrier: torch.tensor([0.2])})
        step, accept = field.named("step")[0], field.named("accept")[0]
        assert step[2] == 0.5, broken(f"callback_step got dt={step[2]} for a first step of 0.5 "
                                      f"clipped onto {barrier}=0.2; expected the unclipped 0.5")
        assert accept[2] == pytest.approx(0.2), broken(
            f"callback_accept_step got dt={accept[2]}; expected the clipped step 0.2")


def test_each_step_attempt_is_one_callback_step_then_accept_or_reject():
    """adjoint.py records the proposal in callback_step and reads it in callback_accept_step."""
    field = Recorder()
    solve(field, [0.0, 3.0], first_step=2.0)  # too large a first step: at least one rejection
    names = [c[0] for c in field.calls]
    assert names[0::2] == ["step"] * (len(names) // 2) and len(names) % 2 == 0, broken(
        f"callbacks are not (callback_step, accept|reject) pairs: {names}")
    assert set(names[1::2]) == {"accept", "reject"}, broken(f"no accept/reject seen: {names}")


def test_callback_names_and_which_solve_calls_them():
    """The names adjoint.py forwards (callback_* during a forward solve, callback_*_adjoint during
    torchdiffeq's own backward solve), all of them known to the adaptive RK solvers."""
    from torchdiffeq._impl.misc import _all_adjoint_callback_names, _all_callback_names
    from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

    assert tuple(_all_callback_names) == CALLBACKS, broken(f"callbacks {_all_callback_names}")
    assert tuple(_all_adjoint_callback_names) == tuple(n + "_adjoint" for n in CALLBACKS), broken(
        f"adjoint callbacks {_all_adjoint_callback_names}")
    assert set(CALLBACKS) <= RKAdaptiveStepsizeODESolver.valid_callbacks(), broken(
        "the adaptive RK solvers no longer accept every step callback")

    field = LoggingModule()
    y0 = torch.ones(2, dtype=torch.float64, requires_grad=True)
    out = odeint_adjoint(field, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-6,
                         atol=1e-6)
    forward_calls, field.calls = set(field.calls), []
    out[-1].sum().backward()
    backward_calls = set(field.calls)
    assert {"callback_step", "callback_accept_step"} <= forward_calls <= set(CALLBACKS), broken(
        f"the forward solve called {forward_calls}")
    adjoint_names = {n + "_adjoint" for n in CALLBACKS}
    assert {"callback_step_adjoint", "callback_accept_step_adjoint"} <= backward_calls \
        <= adjoint_names, broken(f"the stock adjoint's backward solve called {backward_calls}")


class LoggingModule(torch.nn.Module):
    """y' = a y with every forward and adjoint callback logging its name."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(-0.5, dtype=torch.float64))
        self.calls = []
        for name in CALLBACKS + tuple(n + "_adjoint" for n in CALLBACKS):
            setattr(self, name, lambda t0, y0, dt, _name=name: self.calls.append(_name))

    def forward(self, t, y):
        return self.a * y


def test_decreasing_time_options_are_given_in_the_caller_time():
    """For a decreasing grid torchdiffeq negates time internally. adjoint.py (whose backward
    solves run against the forward direction) relies on: first_step a positive magnitude,
    step_t/jump_t tensors given in the caller's time (it flips them), callbacks given the
    caller's t0 and a positive dt."""
    field = Recorder()
    solve(field, [1.0, 0.0], first_step=0.5, step_t=torch.tensor([0.8], dtype=torch.float64))
    step, accept = field.named("step")[0], field.named("accept")[0]
    assert step[1] == 1.0 and step[2] == 0.5, broken(
        f"decreasing t: first callback_step got (t0, dt) = {step[1:]}, expected (1.0, 0.5)")
    assert accept[2] == pytest.approx(0.2), broken(
        f"decreasing t: step_t=0.8 did not clip the first step (accepted dt={accept[2]})")
    assert np.nextafter(0.8, np.inf) in field.eval_times(), broken(
        "decreasing t: no step landed on step_t=0.8")


@pytest.mark.parametrize("decreasing", [False, True])
def test_stopping_at_a_jump_and_evaluating_just_beyond_it(decreasing):
    """At a jump_t the step lands on the jump with its last stage one ulp before it (on the side
    it came from), then the right-hand side is evaluated again one ulp beyond it; no evaluation
    sits on the jump itself. adjoint.py relies on this for the user's jump times and evaluates
    an interval that starts on a jump one ulp inside it in the same way."""
    field = Recorder(jumps=(0.3,))
    grid = [1.0, 0.0] if decreasing else [0.0, 1.0]
    solve(field, grid, jump_t=torch.tensor([0.3], dtype=torch.float64))
    beyond, before = (-np.inf, np.inf) if decreasing else (np.inf, -np.inf)
    times = field.eval_times()
    assert 0.3 not in times, broken("a stage was evaluated exactly on a jump time")
    assert np.nextafter(0.3, before) in times, broken(
        "the step onto a jump time no longer evaluates its last stage one ulp before it")
    assert np.nextafter(0.3, beyond) in times, broken(
        "no re-evaluation one ulp beyond a jump time after stopping there")


def test_evaluation_times_are_in_the_state_dtype_and_start_unperturbed():
    """The first evaluation is at t[0] exactly (adjoint.py perturbs a start on a jump itself),
    and the field sees t in the state's dtype even for a float64 grid (adjoint.py takes the ulp
    of that dtype)."""
    field = Recorder()
    odeint(field, torch.ones(2), torch.tensor([0.25, 1.0], dtype=torch.float64), rtol=1e-5,
           atol=1e-5, method="dopri5")
    assert field.evals[0].dtype == torch.float32, broken(
        f"float32 state, float64 grid: the field got t in {field.evals[0].dtype}")
    assert float(field.evals[0]) == 0.25, broken("the first evaluation is not at t[0]")


@pytest.mark.parametrize("first_step", [None, 0.05])
def test_dopri5_evaluation_count(first_step):
    """dopri5: 1 evaluation at the start, 1 more to select the first step (none if first_step is
    given), 6 per attempted step, 1 per jump passed. adjoint.py's NFE accounting (and the
    backward NFE figures in the README) rest on it."""
    for jumps in ((), (0.4, 0.7)):
        field = Recorder(jumps)
        options = {"jump_t": torch.tensor(jumps, dtype=torch.float64)} if jumps else {}
        if first_step is not None:
            options["first_step"] = first_step
        solve(field, [0.0, 1.0], **options)
        steps = len(field.named("step"))
        expected = (1 if first_step else 2) + 6 * steps + len(jumps)
        assert steps > 0 and len(field.evals) == expected, broken(
            f"dopri5 made {len(field.evals)} evaluations for {steps} steps, {len(jumps)} jumps, "
            f"first_step={first_step}; expected {expected}")


def test_the_internals_the_step_checkpoints_recompute_with():
    """checkpointed_solve recomputes accepted steps with torchdiffeq's own tableau, step and
    interpolation functions (private), so that the recomputation IS the forward solve. Every
    adaptive method must expose them; an accepted step recomputed from the state the accept
    callback saw must land exactly where the solver's next step starts."""
    from torchdiffeq._impl.interp import _interp_evaluate, _interp_fit  # noqa: F401
    from torchdiffeq._impl.misc import Perturb, _mixed_norm, _PerturbFunc
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver, _runge_kutta_step

    adaptive = [n for n, c in SOLVERS.items()
                if isinstance(c, type) and issubclass(c, RKAdaptiveStepsizeODESolver)]
    assert {"dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"} <= set(adaptive), broken(
        f"adaptive Runge-Kutta solvers are now {adaptive}")
    for name in adaptive:
        assert hasattr(SOLVERS[name], "tableau") and hasattr(SOLVERS[name], "mid"), broken(
            f"{name} has no class-level tableau/mid")
    assert callable(_mixed_norm) and Perturb.PREV is not Perturb.NONE
    accepted = []

    class Field(Recorder):
        def callback_accept_step(self, t0, y0, dt):
            accepted.append((t0, y0.clone(), dt))

    odeint(Field(), torch.ones(2, dtype=torch.float64),
           torch.tensor([0.0, 2.0], dtype=torch.float64), rtol=1e-6, atol=1e-6)
    func = _PerturbFunc(Recorder())
    tableau = SOLVERS["dopri5"].tableau
    tableau = type(tableau)(alpha=tableau.alpha.double(), beta=[b.double() for b in tableau.beta],
                            c_sol=tableau.c_sol.double(), c_error=tableau.c_error.double())
    for (t0, y0, dt), (t_next, y_next, _) in zip(accepted, accepted[1:]):
        f0 = func(t0, y0, perturb=Perturb.PREV if t0 > 0 else Perturb.NONE)
        y1 = _runge_kutta_step(func, y0, f0, t0, dt, t0 + dt, tableau=tableau)[0]
        assert torch.equal(t0 + dt, t_next) and torch.equal(y1, y_next), broken(
            "recomputing an accepted dopri5 step does not reproduce the next step's start")


def test_the_fixed_grid_internals_the_step_checkpoints_recompute_with():
    """On a fixed grid checkpointed_solve keeps each step from ``callback_step`` and redoes it
    with the solver's private ``_step_func`` (and ``_linear_interp`` / ``_cubic_hermite_interp``
    for output times inside it), built with only ``interp`` and ``perturb``: a step redone from
    the state the callback saw must land exactly where the next step starts."""
    from torchdiffeq._impl.misc import _PerturbFunc
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.solvers import FixedGridODESolver

    class Field:  # only the callback a fixed grid calls (torchdiffeq warns about others)
        def __init__(self):
            self.steps = []

        def __call__(self, t, y):
            return torch.sin(1e8 * t) * y - y  # a one-ulp change of t shows

        def callback_step(self, t0, y0, dt):
            self.steps.append((t0, y0.clone(), dt))

    for name in ("euler", "midpoint", "heun2", "heun3", "rk4"):
        cls = SOLVERS[name]
        assert issubclass(cls, FixedGridODESolver) and all(
            hasattr(cls, f) for f in ("_step_func", "_linear_interp", "_cubic_hermite_interp")), \
            broken(f"{name} lost its step or interpolation function")
        field = Field()
        steps = field.steps
        odeint(field, torch.ones(2, dtype=torch.float64),
               torch.tensor([0.0, 1.0], dtype=torch.float64), method=name,
               options={"step_size": 0.3})
        stepper = cls(func=None, y0=steps[0][1], atol=0.0, interp="cubic", perturb=False)
        func = _PerturbFunc(Field())
        for (t0, y0, dt), (t1, y_next, _) in zip(steps, steps[1:]):
            dy, _ = stepper._step_func(func, t0, dt, t1, y0)
            assert torch.equal(y0 + dy, y_next), broken(
                f"redoing a {name} step does not reproduce the next step's start")
