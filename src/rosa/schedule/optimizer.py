"""What the schedule does to an optimizer it did not build: reset some parameters' state, scale their updates.

Both work on any ``torch.optim.Optimizer`` (and on wrappers such as accelerate's, which hold it as
``.optimizer``) without replacing it or touching its param groups' rates, so Trainer, accelerate, a plain loop
and their LR schedulers keep their own optimizer and rates.

Scaling the update instead of the rate: after ``optimizer.step()`` a parameter is moved back to
``before + factor * (after - before)``. For an optimizer whose step is proportional to its learning rate (SGD,
Adam, AdamW with its decoupled weight decay, Lion, ...) that is exactly the step it would have taken at
``factor * lr``: its moments only ever see the gradient. That is how the sparse values get their own rate under
an optimizer built by someone else (``RosaConfig.sparse_lr_ratio``), and how what restarts at the mask re-warms up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..mask.layers import MaskError

SPARSE_GROUP_PREFIX = "rosa_sparse"  # create_rosa_optimizer's group of sparse values: already at their rate
COUNTERS_KEY = "rosa_schedule"  # a param group entry: saved and restored with the optimizer's state_dict


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer (accelerate's AcceleratedOptimizer and similar wrappers hold it as
    ``.optimizer``)."""
    while hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def holds_any(optimizer: Any, params: Iterable[torch.Tensor]) -> bool:
    ids = {id(p) for p in params}
    return any(id(p) in ids for g in unwrap_optimizer(optimizer).param_groups for p in g["params"])


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


def at_own_rate(optimizer: Any, params: Iterable[torch.Tensor]) -> set[int]:
    """Ids of ``params`` (the sparse values) in a group of their own rate: ``create_rosa_optimizer``'s
    ``rosa_sparse*`` groups, or any group holding sparse values and nothing else beside a group holding other
    parameters (whoever split them off set their rate; scaling it again would apply the ratio twice). A
    sparse-only model's optimizer holds nothing else: there the ratio still applies."""
    ids = {id(p) for p in params}
    groups = unwrap_optimizer(optimizer).param_groups
    only_values = [all(id(q) in ids for q in g["params"]) for g in groups]
    split_off = not all(only_values)
    return {
        id(p)
        for g, alone in zip(groups, only_values, strict=True)
        if str(g.get("name", "")).startswith(SPARSE_GROUP_PREFIX) or (alone and split_off)
        for p in g["params"]
        if id(p) in ids
    }


def snapshot(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def scale_updates(params: Sequence[torch.Tensor], before: Sequence[torch.Tensor], factor: float) -> None:
    """Move each parameter to ``before + factor * (now - before)``: the step at ``factor`` times the rate."""
    for p, b in zip(params, before, strict=True):
        p.sub_(b).mul_(factor).add_(b)


def write_counters(optimizer: Any, params: Iterable[torch.Tensor], counters: dict[str, Any]) -> None:
    """Keep the schedule's counters in the first param group holding RoSA parameters: the optimizer's
    ``state_dict`` carries them into a checkpoint and ``load_state_dict`` brings them back on resume."""
    groups = [g for g in unwrap_optimizer(optimizer).param_groups if holds_any_group(g, params)]
    if groups:
        groups[0][COUNTERS_KEY] = dict(counters)


def read_counters(optimizer: Any, params: Iterable[torch.Tensor]) -> dict[str, Any] | None:
    for g in unwrap_optimizer(optimizer).param_groups:
        if holds_any_group(g, params) and isinstance(g.get(COUNTERS_KEY), dict):
            return g[COUNTERS_KEY]
    return None


def holds_any_group(group: dict[str, Any], params: Iterable[torch.Tensor]) -> bool:
    ids = {id(p) for p in params}
    return any(id(p) in ids for p in group["params"])
