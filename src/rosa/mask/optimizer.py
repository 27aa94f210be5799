"""What the schedule does to an optimizer it did not build: reset some parameters' state, ramp their rate.

Both work on any ``torch.optim.Optimizer`` (and on wrappers such as accelerate's, which hold it as
``.optimizer``) without replacing it, so Trainer, accelerate and a plain loop keep their own optimizer and LR
scheduler.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .layers import MaskError


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer (accelerate's AcceleratedOptimizer and similar wrappers hold it as
    ``.optimizer``)."""
    while hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def reset_optimizer_state(optimizer: Any, params: Iterable[torch.Tensor]) -> int:
    """Delete the optimizer state of ``params`` (lazily re-created from scratch at their next step).

    Returns how many parameters had state. Refuses an optimizer that does not hold every one of ``params``
    (FSDP1 without ``use_orig_params``, DeepSpeed: flattened copies), where a reset would silently do nothing."""
    params = list(params)
    inner = unwrap_optimizer(optimizer)
    state = getattr(inner, "state", None)
    if state is None:
        raise MaskError(f"cannot reset the state of optimizer {type(optimizer).__name__}: it has no .state")
    groups_holding(optimizer, params)
    return sum(state.pop(p, None) is not None for p in params)


def groups_holding(optimizer: Any, params: Iterable[torch.Tensor]) -> list[dict[str, Any]]:
    """The param groups of ``optimizer`` that hold any of ``params``; every one of them must be held."""
    ids = {id(p) for p in params}
    groups = unwrap_optimizer(optimizer).param_groups
    held = {id(p) for g in groups for p in g["params"]} & ids
    if held != ids:
        raise MaskError(
            f"the optimizer does not hold {len(ids) - len(held)} of the {len(ids)} RoSA parameters the schedule "
            "restarts (flattened parameters: FSDP1 without use_orig_params=True, or DeepSpeed ZeRO?); "
            "build the optimizer over the model's own parameters"
        )
    return [g for g in groups if any(id(p) in ids for p in g["params"])]


class LRRamp:
    """Scales the rate of some param groups during ``optimizer.step()`` only, by ``factor()``."""

    def __init__(self, optimizer: Any, groups: list[dict[str, Any]], factor) -> None:
        inner = unwrap_optimizer(optimizer)
        self.groups = groups
        self.factor = factor
        self._saved: list[Any] = []
        self._handles = [inner.register_step_pre_hook(self._pre), inner.register_step_post_hook(self._post)]

    def _pre(self, *_: Any) -> None:
        f = self.factor()
        self._saved = [g["lr"] for g in self.groups]
        for g in self.groups:
            g["lr"] = g["lr"] * f

    def _post(self, *_: Any) -> None:
        for g, lr in zip(self.groups, self._saved):
            g["lr"] = lr
        self._saved = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
