"""Argument checks shared by the public constructors: one message format everywhere."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_bool", "check_int", "check_ints", "check_number", "check_optional_int",
           "check_times"]


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum`` (bools refused), else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be {_int_phrase(minimum)}, got {value!r}")
    return value


def check_optional_int(name: str, value: object, minimum: int | None = 1) -> int | None:
    """None, or an int >= ``minimum`` (any int when ``minimum`` is None; bools refused)."""
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int)
            or (minimum is not None and value < minimum)):
        what = "an int" if minimum is None else _int_phrase(minimum)
        raise ValueError(f"{name} must be {what} or None, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool (not merely truthy), else raise TypeError."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _int_phrase(minimum: int) -> str:
    return {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")


def check_ints(name: str, values: Sequence[object], minimum: int = 1) -> tuple[int, ...]:
    """Every element an int >= ``minimum``; returns them as a tuple."""
    values = tuple(values)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ValueError(f"{name} must be ints >= {minimum}, got {values!r}")
    return values  # type: ignore[return-value]


def check_number(name: str, value: object, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite real number >= ``minimum`` (> when ``strict``); returns it as a float."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value) and (value > minimum if strict else value >= minimum))
    if not ok:
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_times(name: str, value: Any, device: torch.device) -> Tensor:
    """Times (``step_t``/``jump_t``) as a 1-D float64 tensor of finite values (torchdiffeq flips
    only tensors when t decreases, so a list would silently point the wrong way).

    Raises:
        TypeError: ``value`` cannot be read as times.
        ValueError: Not 1-D, or not finite.
    """
    try:
        times = torch.as_tensor(value.detach() if isinstance(value, Tensor) else value,
                                dtype=torch.float64, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a 1-D tensor or sequence of times, got {value!r}") from err
    if times.ndim != 1 or not bool(torch.isfinite(times).all()):
        raise ValueError(f"{name} must be a 1-D tensor of finite times, got {value!r}")
    return times
