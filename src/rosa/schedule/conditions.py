"""What a RoSA model's state asks of its schedule: whether one is needed, whether the mask must be scored before
step 0 (sparse-only), and whether a saved mask fills the budget the config gives."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..mask.layers import MaskError, has_mask, mask_layers, resolve_adapter
from ..mask.selection import Method, default_stats


def needs_mask_before_training(
    model: nn.Module, config: Any, adapter_name: str | None = None, method: Method | None = None
) -> bool:
    """Sparse-only (no layer has a LoRA pair), no mask yet and a data-driven method: a driver that has the
    first batches scores the mask on them before step 0 (:meth:`RosaSchedule.score_before_training`), since
    nothing would train while it is collected."""
    adapter = resolve_adapter(model, adapter_name)
    layers = mask_layers(model, adapter).values()
    method = method if method is not None else config.mask_method
    return (
        not any(adapter in layer.rosa_A for layer in layers)
        and any(layer.capacity.get(adapter, 0) for layer in layers)
        and not has_mask(model, adapter)
        and bool(default_stats(method))
    )


def check_mask_fills_budget(
    layers: dict, adapter: str, allocation: str, path: Any, nnz: Mapping[str, int]
) -> None:
    """A saved mask (``nnz`` entries per layer) must spend the budget the config gives (per layer, or in total
    for global allocation): a mask scored at another density would leave values allocated that never train, or
    train fewer than asked. Checked before the mask is set, so a refused mask leaves the model as it was."""
    budget = {n: layer.budget(adapter) for n, layer in layers.items()}
    if allocation == "global":
        if sum(nnz.values()) != sum(budget.values()):
            raise MaskError(
                f"{path}: the mask holds {sum(nnz.values()):,} entries, the config's density a budget of "
                f"{sum(budget.values()):,}: set the density the mask was scored at"
            )
        return
    wrong = [n for n in layers if nnz[n] != budget[n]]
    if wrong:
        n = wrong[0]
        density = nnz[n] / (layers[n].out_features * layers[n].in_features)
        raise MaskError(
            f"{path}: layer {n} holds {nnz[n]:,} mask entries but the config's density gives it {budget[n]:,} "
            f"({len(wrong)} layer(s) differ): set the density the mask was scored at (about {density:.2g})"
        )


def needs_schedule(model: nn.Module) -> bool:
    """Whether training the model's active adapter needs a schedule: it has sparse capacity and trainable sparse
    values, and either no mask yet (one to choose) or a mask (the values move at ``sparse_lr_ratio``, and a run
    resumed in the re-warm-up goes on with it: the optimizer's saved counters say where). Frozen values (an
    adapter loaded for inference, a collection pass) need none."""
    try:
        adapter = resolve_adapter(model)
        layers = mask_layers(model, adapter)
    except MaskError:
        return False
    return any(
        layer.capacity.get(adapter, 0) and layer.rosa_values[adapter].requires_grad
        for layer in layers.values()
    )
