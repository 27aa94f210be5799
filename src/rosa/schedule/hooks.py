"""How the schedule is driven without a driver: torch's global optimizer-step hooks, and the model's own
training forward.

``torch.optim.optimizer.register_optimizer_step_pre_hook`` / ``..._post_hook`` run around the step of every
``torch.optim.Optimizer`` in the process (accelerate's and Trainer's wrappers step a torch optimizer inside).
They are registered once, on first use; each step is handed to the live schedules whose parameters the
optimizer holds (one set lookup per optimizer and schedule, cached). A schedule is held by its model (an
attribute of the first RoSA layer) and weakly here: a model that is no longer used takes its schedule with it,
and a copy or pickle of the model carries none (a schedule belongs to one live run).

Each model has at most one schedule: the latest created for it (a RoSA model starts one itself:
:func:`rosa.schedule.auto.ensure_schedule`).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..layer import RosaLayer
from . import optimizer as opt

RosaSchedule = Any  # rosa.schedule.core.RosaSchedule (which imports this module)

_LIVE: weakref.WeakSet = weakref.WeakSet()
_ATTRIBUTE = "_rosa_schedule"  # on the model's first RoSA layer: a _Holder
_HOLDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> {id(schedule): bool}
_lock = threading.Lock()
_installed = False


def register(schedule: RosaSchedule) -> None:
    """Make ``schedule`` the one its layers answer to and let every optimizer step reach it."""
    _install()
    first = _first_layer(schedule.model)
    previous = schedule_of(schedule.model)
    if previous is not None and previous is not schedule:
        previous.close()
        _LIVE.discard(previous)
    setattr(first, _ATTRIBUTE, _Holder(schedule))
    _LIVE.add(schedule)


def schedule_of(model: torch.nn.Module) -> RosaSchedule | None:
    """The live schedule of the RoSA model ``model`` (any wrapper of it), or None."""
    first = _first_layer(model)
    holder = getattr(first, _ATTRIBUTE, None) if first is not None else None
    schedule = holder.schedule if isinstance(holder, _Holder) else None
    return schedule if schedule is not None and schedule in _LIVE else None


def _first_layer(model: torch.nn.Module) -> RosaLayer | None:
    """Where a model's schedule is kept: its first RoSA layer, the same whatever wrapper (PeftModel, DDP) it
    was given, and found again by a short walk from any of them."""
    return next((m for m in model.modules() if isinstance(m, RosaLayer)), None)


class _Holder:
    """A model's schedule, kept on the model so that the two live and die together (a weak mapping from the
    model to a schedule that refers to the model would keep both forever). Copies and pickles of the model get
    no schedule: it belongs to the run training this model."""

    __slots__ = ("schedule",)

    def __init__(self, schedule: RosaSchedule) -> None:
        self.schedule = schedule

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return (_no_schedule, ())


def _no_schedule() -> None:
    return None


def _install() -> None:
    global _installed
    with _lock:
        if not _installed:
            register_optimizer_step_pre_hook(_before)
            register_optimizer_step_post_hook(_after)
            _installed = True


def _schedules_of(optimizer: Any) -> list[RosaSchedule]:
    """The live schedules whose parameters ``optimizer`` holds (cached per optimizer until its groups change)."""
    try:
        cache = _HOLDS.setdefault(optimizer, weakref.WeakKeyDictionary())
    except TypeError:  # not weak-referenceable: no cache
        cache = weakref.WeakKeyDictionary()
    groups = len(optimizer.param_groups)
    found = []
    for schedule in list(_LIVE):
        known = cache.get(schedule)
        if known is None or known[0] != groups:
            known = cache[schedule] = (groups, opt.holds_any(optimizer, schedule.parameters()))
        if known[1]:
            found.append(schedule)
    return found


def _before(optimizer: Any, args: Any, kwargs: Any) -> None:
    for schedule in _schedules_of(optimizer):
        schedule.before_optimizer_step(optimizer)


def _after(optimizer: Any, args: Any, kwargs: Any) -> None:
    for schedule in _schedules_of(optimizer):
        schedule.after_optimizer_step(optimizer)
