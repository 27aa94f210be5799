"""``collect_mask``: score and set the mask from a list of batches, with no optimizer step."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..config import config_default
from ..sparse.support import Support
from .builder import MaskBuilder
from .layers import MaskError, apply_mask, mask_layers, model_config, resolve_adapter
from .selection import Method, default_stats, method_name

logger = logging.getLogger(__name__)


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise MaskError(
            "without loss_fn each batch must be a mapping of model keyword arguments (with labels)"
        )
    out = model(**batch)
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise MaskError("the model returned no loss: pass labels in the batch or give loss_fn(model, batch)")
    return loss


def observe_backward(model: nn.Module, batches: Iterable, loss_fn, collector, what: str) -> None:
    """One backward pass per batch for ``collector``'s hooks to see, each closed as a micro-batch."""
    for batch in batches:
        loss = loss_fn(model, batch)
        if not loss.requires_grad:
            raise MaskError(f"the loss does not depend on any {what}")
        loss.backward()
        del loss
        collector.end_micro_batch()


class FrozenParams:
    """Temporarily set requires_grad=False on every parameter (collection computes no parameter gradient)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def rng_state() -> tuple:
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def collect_mask(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    *,
    config: Any = None,
    method: Method | None = None,
    allocation: str | None = None,
    memory_budget: float | None = None,
    seed: int | None = None,
    adapter_name: str | None = None,
    accumulator_dtype: torch.dtype = torch.float32,
    stats: Iterable[str] | None = None,
    apply: bool = True,
    fisher_granularity: str | None = None,
) -> dict[str, Support]:
    """Score and select the sparse support of every adapted layer; set it on the model unless ``apply=False``.

    Data-driven methods run ``loss_fn(model, batch).backward()`` once per batch and layer group (default
    loss: ``model(**batch).loss``), with every parameter temporarily frozen, so no parameter gradient is
    computed or left behind and no optimizer step happens. The model's train/eval mode is left as it is: call
    ``model.train()`` first to score with dropout as in training. Each group's pass starts from the same RNG
    state, so the groups see identical dropout and the capped collection gives exactly the uncapped mask.

    ``method``, ``allocation``, ``memory_budget``, ``seed`` and ``fisher_granularity`` default to ``config``'s
    ``mask_method``, ``mask_allocation``, ``mask_memory_budget``, ``mask_seed`` and ``fisher_granularity`` (a
    RosaConfig; found on a PeftModel's ``peft_config`` when not given), else to fisher / layer / None / 0 /
    example.
    """
    adapter = resolve_adapter(model, adapter_name)
    config = config if config is not None else model_config(model, adapter)

    def setting(value: Any, name: str) -> Any:  # given, else the config's, else RosaConfig's default
        return value if value is not None else getattr(config, name, config_default(name))

    method = setting(method, "mask_method")
    allocation = setting(allocation, "mask_allocation")
    memory_budget = setting(memory_budget, "mask_memory_budget")
    seed = setting(seed, "mask_seed")
    fisher_granularity = setting(fisher_granularity, "fisher_granularity")
    batches = list(batches) if batches is not None else []
    if stats is None:
        stats = default_stats(method, have_data=bool(batches))
    builder = MaskBuilder(
        mask_layers(model, adapter),
        adapter,
        method=method,
        allocation=allocation,
        seed=seed,
        memory_budget=memory_budget,
        accumulator_dtype=accumulator_dtype,
        stats=stats,
        fisher_granularity=fisher_granularity,
    )
    if builder.needs_data:
        if not batches:
            raise MaskError(f"mask method {method_name(method)!r} needs batches")
        loss_fn = loss_fn or default_loss
        rng = rng_state()
        with FrozenParams(model):
            while not builder.done:
                collector = builder.start_group()
                set_rng_state(rng)
                observe_backward(model, batches, loss_fn, collector, "adapted layer")
                builder.finish_group()
        logger.info("mask statistics: %d batches x %d layer group(s)", len(batches), len(builder.groups))
    supports = builder.build()
    if apply:
        apply_mask(model, supports, adapter)
    return supports
