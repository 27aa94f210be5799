"""How a RoSA model runs its schedule with nobody creating one: its own training forward starts it.

A forward pre-hook on the base model (put there by the RoSA tuner), not the tuner's ``forward``: a ``PeftModel``
built without ``task_type`` (what ``SFTTrainer(peft_config=RosaConfig())`` builds) calls the base model
directly, past the tuner. PEFT puts the adapters' configs on the base model (``peft_config``), so the schedule
finds them from it. Unloading or merging the adapter takes the hook off again.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .conditions import needs_schedule
from .core import RosaSchedule
from .hooks import schedule_of


def ensure_schedule(model: nn.Module) -> None:
    """Called at each training forward of a RoSA model: its schedule notes the pass, and is started here when
    nothing started one and training needs it (:func:`~rosa.schedule.conditions.needs_schedule`)."""
    schedule = schedule_of(model)
    if schedule is None:
        if not needs_schedule(model):
            return
        schedule = RosaSchedule(model, started_by="the model's first training forward")
    schedule.training_forward()


def watch_training_forwards(base_model: nn.Module) -> None:
    """Every training forward of ``base_model`` reaches :func:`ensure_schedule` (once, however many adapters)."""
    if base_model not in _HOOKS:
        _HOOKS[base_model] = base_model.register_forward_pre_hook(_before_base_forward)


def remove_schedule_hook(base_model: nn.Module) -> None:
    """Take the hook off a model whose adapters are gone (unloaded or merged)."""
    handle = _HOOKS.pop(base_model, None)
    if handle is not None:
        handle.remove()


# base model -> its hook's handle (the handle holds the model weakly)
_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _before_base_forward(base_model: nn.Module, args: tuple) -> None:
    if base_model.training and torch.is_grad_enabled():
        ensure_schedule(base_model)
