"""The optimizer RoSA trains best with: the sparse values in their own parameter group, at their own rate.

The reference implementation trains the sparse values at a lower rate than the LoRA pair (2e-4 against 7e-4 on
LLaMA-2-7B). Any optimizer gets that ratio (``RosaConfig.sparse_lr_ratio``): the RoSA schedule scales the sparse
values' update after each step (:mod:`rosa.schedule.optimizer`). As with PEFT's LoRA+
(``peft.optimizers.create_loraplus_optimizer``), this function instead returns an ordinary optimizer with the
sparse values in a group of their own rate (which the schedule then leaves alone), for those who want the rate
visible in the optimizer (``transformers.Trainer(optimizers=(opt, None))``, ``trl.SFTTrainer``, a plain loop);
LR schedulers scale every group from its own starting rate, so the ratio holds throughout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import config_default
from .layer import LORA_A, LORA_B
from .sparse.delta import VALUES

LORA_GROUP, SPARSE_GROUP, OTHER_GROUP = "rosa_lora", "rosa_sparse", "other"
# lr / sparse lr when neither is given nor found on the model: RosaConfig's own default, in one place
DEFAULT_SPARSE_LR_RATIO: float = config_default("sparse_lr_ratio")


def param_role(name: str) -> str:
    """Which group a trainable parameter belongs to, from its name in the model."""
    parts = name.split(".")
    if VALUES in parts:
        return SPARSE_GROUP
    if LORA_A in parts or LORA_B in parts:
        return LORA_GROUP
    return OTHER_GROUP


def configured_ratio(model: nn.Module) -> float:
    """The ``sparse_lr_ratio`` of the model's active RoSA config (a PEFT model), else the default."""
    configs = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(configs, dict) and isinstance(active, str) else None
    return float(getattr(config, "sparse_lr_ratio", DEFAULT_SPARSE_LR_RATIO))


def _decays(model: nn.Module) -> set[str]:
    """Names of the parameters that take weight decay, by ``transformers.Trainer``'s own rule (all but biases
    and normalisation weights), so that a RoSA optimizer decays what Trainer's default optimizer would."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state


def rosa_param_groups(
    model: nn.Module,
    *,
    lr: float,
    sparse_lr: float | None = None,
    sparse_lr_ratio: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Parameter groups for every trainable parameter of ``model``: A/B (``rosa_lora``) at ``lr``, the sparse
    values (``rosa_sparse``) at ``sparse_lr`` (or ``lr / sparse_lr_ratio``; default: the model's
    ``RosaConfig.sparse_lr_ratio``, 3.5 unless set), anything else
    trainable (``modules_to_save``, trainable tokens) at ``lr``. Weight decay follows Trainer's rule; groups
    carry a ``name`` so that code can find them later."""
    if sparse_lr is not None and sparse_lr_ratio is not None:
        raise ValueError("give sparse_lr or sparse_lr_ratio, not both")
    if sparse_lr is None and sparse_lr_ratio is None:
        sparse_lr_ratio = configured_ratio(model)
    if sparse_lr_ratio is not None:
        if not sparse_lr_ratio > 0:
            raise ValueError(f"sparse_lr_ratio must be positive, got {sparse_lr_ratio}")
        sparse_lr = lr / sparse_lr_ratio
    for name, value in (("lr", lr), ("sparse_lr", sparse_lr), ("weight_decay", weight_decay)):
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    decays = _decays(model)
    rates = {LORA_GROUP: lr, SPARSE_GROUP: sparse_lr, OTHER_GROUP: lr}
    groups: dict[tuple[str, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((param_role(name), name in decays), []).append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return [
        {
            "name": role if decay else f"{role}_no_decay",
            "params": params,
            "lr": rates[role],
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (role, decay), params in sorted(groups.items())
    ]


def create_rosa_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    sparse_lr: float | None = None,
    sparse_lr_ratio: float | None = None,
    weight_decay: float = 0.0,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """An ``optimizer_cls`` over :func:`rosa_param_groups`; extra keyword arguments go to the optimizer.

    >>> opt = create_rosa_optimizer(model, lr=7e-4, sparse_lr_ratio=3.5)      # sparse values at 2e-4
    >>> Trainer(model=model, args=args, optimizers=(opt, None), callbacks=[RosaTrainerCallback()])
    """
    groups = rosa_param_groups(
        model, lr=lr, sparse_lr=sparse_lr, sparse_lr_ratio=sparse_lr_ratio, weight_decay=weight_decay
    )
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)


__all__ = [
    "DEFAULT_SPARSE_LR_RATIO",
    "LORA_GROUP",
    "OTHER_GROUP",
    "SPARSE_GROUP",
    "create_rosa_optimizer",
    "param_role",
    "rosa_param_groups",
]
