"""The RoSA training schedule: LoRA-only warm-up, mask collection, restart, re-warm-up, the sparse rate.

- :mod:`~rosa.schedule.core`: :class:`RosaSchedule`, which owns every rule (see its module docstring).
- :mod:`~rosa.schedule.hooks`: what drives it with no driver: the optimizer's own steps.
- :mod:`~rosa.schedule.auto`: the model's own training forward, which starts one when nobody did.
- :mod:`~rosa.schedule.optimizer`: what it does to an optimizer it did not build (reset state, scale updates).
- :mod:`~rosa.schedule.state`: its state in a checkpoint.
- :mod:`~rosa.schedule.callback`: :class:`RosaTrainerCallback`, what only ``transformers.Trainer`` knows
  (imported on first use: it needs transformers' Trainer).
"""

from __future__ import annotations

from typing import Any

from .conditions import needs_mask_before_training, needs_schedule
from .core import COLLECT, JOINT, WARMUP, RosaSchedule
from .hooks import schedule_of
from .optimizer import reset_optimizer_state, unwrap_optimizer
from .state import SCHEDULE_FILE, load_schedule_state, save_schedule_state

RosaScheduler = RosaSchedule  # its first name

__all__ = [
    "COLLECT",
    "JOINT",
    "SCHEDULE_FILE",
    "WARMUP",
    "RosaSchedule",
    "RosaScheduler",
    "RosaTrainerCallback",
    "load_schedule_state",
    "needs_mask_before_training",
    "needs_schedule",
    "reset_optimizer_state",
    "save_schedule_state",
    "schedule_of",
    "unwrap_optimizer",
]


def __getattr__(name: str) -> Any:
    if name == "RosaTrainerCallback":
        from .callback import RosaTrainerCallback

        return RosaTrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
