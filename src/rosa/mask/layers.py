"""Which layers of a model a mask covers, and by what names; setting a mask on them.

A mask covers every RosaLayer carrying the adapter, keyed by its *canonical* name: the module name without
wrapper prefixes (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, PEFT's ``base_model.model.``), so the same
layer has the same name however the model is wrapped, and a mask saved from a ``PeftModel`` loads into its base
model and vice versa.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..layer import RosaLayer, rosa_layers
from ..sparse.support import Support

_NAME_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


class MaskError(ValueError):
    """A mask cannot be computed or applied as asked."""


def canonical_layer_name(name: str) -> str:
    """Module name without wrapper prefixes (DDP ``module.``, ``torch.compile`` ``_orig_mod.``, PEFT's
    ``base_model.model.``), so the same layer has the same name however the model is wrapped."""
    changed = True
    while changed:
        changed = False
        for prefix in _NAME_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def resolve_adapter(model: nn.Module, adapter_name: str | None = None) -> str:
    """``adapter_name`` if given, else the active adapter of the first RosaLayer in ``model``."""
    if adapter_name is not None:
        return adapter_name
    for module in model.modules():
        if isinstance(module, RosaLayer):
            return module.active_adapters[0]
    raise MaskError("the model contains no RosaLayer")


def mask_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, RosaLayer]:
    """Every RosaLayer of ``model`` carrying ``adapter_name`` (default: the active adapter), by canonical name,
    in module order."""
    adapter = resolve_adapter(model, adapter_name)
    layers: dict[str, RosaLayer] = {}
    for name, layer in rosa_layers(model).items():
        if adapter in layer.rosa_values:
            key = canonical_layer_name(name)
            if key in layers:
                raise MaskError(f"two adapted layers share the name {key!r}")
            layers[key] = layer
    if not layers:
        raise MaskError(f"the model has no RosaLayer with adapter {adapter!r}")
    return layers


def layer_budget(layer: RosaLayer, adapter_name: str) -> int:
    """Sparse entries the layer gets under per-layer allocation: round(density * out * in)."""
    return layer.budget(adapter_name)


def apply_mask(model: nn.Module, supports: Mapping[str, Support], adapter_name: str | None = None) -> None:
    """Set the support of every adapted layer. Every name, shape and capacity is checked before any layer is
    changed; each layer must be given a support."""
    adapter = resolve_adapter(model, adapter_name)
    layers = mask_layers(model, adapter)
    missing = [n for n in layers if n not in supports]
    extra = [n for n in supports if n not in layers]
    if missing or extra:
        raise MaskError(f"mask does not match the model: missing layers {missing}, unknown layers {extra}")
    for name, layer in layers.items():  # every layer is checked before any is changed
        try:
            layer.check_support(adapter, supports[name])
        except ValueError as e:
            raise MaskError(f"{name}: {e}") from None
    for name, layer in layers.items():
        layer.set_support(adapter, supports[name])


def has_mask(model: nn.Module, adapter_name: str | None = None) -> bool:
    """True if any adapted layer already has a non-empty support."""
    adapter = resolve_adapter(model, adapter_name)
    return any(layer.nnz(adapter) > 0 for layer in mask_layers(model, adapter).values())


def mask_summary(model: nn.Module, adapter_name: str | None = None) -> dict[str, dict[str, float]]:
    """Per layer: nnz, budget, capacity and ``realised_density`` (nnz over the layer's weights; the layer's
    configured ``density`` is what sets its budget)."""
    adapter = resolve_adapter(model, adapter_name)
    out = {}
    for name, layer in mask_layers(model, adapter).items():
        nnz = layer.nnz(adapter)
        out[name] = {
            "nnz": nnz,
            "budget": layer_budget(layer, adapter),
            "capacity": layer.capacity[adapter],
            "realised_density": nnz / max(1, layer.out_features * layer.in_features),
        }
    return out


def model_config(model: nn.Module, adapter_name: str) -> Any:
    """The adapter's RosaConfig when ``model`` is a PEFT model, else None."""
    peft_config = getattr(model, "peft_config", None)
    return peft_config.get(adapter_name) if isinstance(peft_config, Mapping) else None
