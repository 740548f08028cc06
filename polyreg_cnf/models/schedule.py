"""Learning-rate schedules over a run's training steps, shared by the LightningModules."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

#: The schedules ``lr_schedule`` accepts.
LR_SCHEDULES = ("constant", "cosine")


def cosine_lr(lr: float, step: int, total_steps: int) -> float:
    """The cosine schedule's rate after ``step`` of ``total_steps`` steps: ``lr`` down to 0.

    Example:
        >>> cosine_lr(1e-3, 0, 100), cosine_lr(1e-3, 50, 100), cosine_lr(1e-3, 100, 100)
        (0.001, 0.0005, 0.0)
    """
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def check_schedule(name: str) -> str:
    """``name`` if it is one of :data:`LR_SCHEDULES`, else a ValueError naming them."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {name!r}")
    return name


def optimizer_config(optimizer: torch.optim.Optimizer, schedule: str,
                     total_steps: Callable[[], int | float]) -> Any:
    """What ``configure_optimizers`` returns for ``optimizer`` under ``schedule``.

    ``"constant"``: the optimizer itself. ``"cosine"`` decays every parameter group's rate
    along :func:`cosine_lr` once per optimizer step, reaching 0 after ``total_steps()`` steps
    (the trainer's ``estimated_stepping_batches``: asked only here, so that a module with a
    constant rate needs no Trainer); its state is saved in checkpoints, so a resumed run
    continues the same curve.
    """
    if check_schedule(schedule) == "constant":
        return optimizer
    total_steps = total_steps()
    if not math.isfinite(total_steps) or total_steps < 1:
        raise ValueError(f"lr_schedule='cosine' needs a finite number of training steps "
                         f"(max_steps or max_epochs), got {total_steps}")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total_steps),
                                                           eta_min=0.0)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
