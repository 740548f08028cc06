"""The project's exceptions share one base, :class:`PolyregCNFError`; solver failures are one type.

``except PolyregCNFError`` catches every error polyreg-cnf raises on purpose. Each class also
derives from the builtin its callers caught before (``ValueError``, ``RuntimeError``,
``FileNotFoundError``), so existing ``except`` clauses keep working. The hierarchy:

- :class:`PolyregCNFError`
  - :class:`SolverError` (``RuntimeError``): an ODE solve failed (torchdiffeq gave up: step
    size underflow, ``max_num_steps`` exceeded, a non-finite state, an invalid solver input)
    - :class:`NFELimitError`: a forward solve needed more evaluations than ``max_nfe``
  - ``ConfigError`` (``ValueError``, :mod:`polyreg_cnf.app.config`)
  - ``ReportError`` (``ValueError``, :mod:`polyreg_cnf.app.run_log`)
  - ``CheckpointKindError`` (``ValueError``, :mod:`polyreg_cnf.models.checkpoint`)
  - ``NumericalFaultError`` (``RuntimeError``, :mod:`polyreg_cnf.callbacks.guard`)
  - ``DataFileError`` (``FileNotFoundError``, :mod:`polyreg_cnf.datamodules`)
"""

from __future__ import annotations

__all__ = ["NFELimitError", "PolyregCNFError", "SolverError"]


class PolyregCNFError(Exception):
    """Base of every exception polyreg-cnf raises on purpose."""


class SolverError(PolyregCNFError, RuntimeError):
    """An ODE solve failed: torchdiffeq gave up or refused its input (its message says why).

    The engine raises it for every failure of a solve it runs (the torchdiffeq
    ``AssertionError`` is its ``__cause__``), so callers recognise solver failures by type,
    never by message text. The one solve torchdiffeq runs out of the engine's reach, the
    backward pass of its own adjoint, is recognised by where its error was raised
    (:func:`polyreg_cnf.engine.solver_failure`).
    """


class NFELimitError(SolverError):
    """A forward solve needed more function evaluations than ``SolverConfig.max_nfe`` allows."""
