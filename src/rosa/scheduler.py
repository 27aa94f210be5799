"""The RoSA schedule under its first name: :mod:`rosa.mask.schedule` and :mod:`rosa.mask.callback` hold it."""

from .mask.callback import RosaTrainerCallback
from .mask.optimizer import reset_optimizer_state, unwrap_optimizer
from .mask.schedule import (
    COLLECT,
    JOINT,
    WARMUP,
    RosaScheduler,
    load_schedule_state,
    needs_mask_before_training,
    save_schedule_state,
)

__all__ = [
    "COLLECT",
    "JOINT",
    "WARMUP",
    "RosaScheduler",
    "RosaTrainerCallback",
    "load_schedule_state",
    "needs_mask_before_training",
    "reset_optimizer_state",
    "save_schedule_state",
    "unwrap_optimizer",
]
