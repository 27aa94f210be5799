"""RosaModel: injects RoSA layers into a transformers model as a PEFT tuner.

Everything user-facing is PEFT's own: ``get_peft_model`` returns a ``PeftModel``, ``save_pretrained`` writes
``adapter_config.json`` + ``adapter_model.safetensors``, ``PeftModel.from_pretrained`` reads them back, and
merge/unload, multiple adapters and disabling come from ``BaseTuner``. This module adds what is RoSA-specific:
how a layer is built from the config, and the compact on-disk sparse support.
"""

from __future__ import annotations

import math
import os
import sys
import types
import warnings

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import RosaConfig
from .layer import Conv1D, RosaLayer, RosaLinear, nnz_budget
from .serialization import (
    PREFIX,
    AdapterFileError,
    check_adapter_dir,
    check_adapter_folder,
    fetch_hub_adapter,
)
from .sparse.delta import compact_state_dict


class RosaModel(BaseTuner):
    """The PEFT tuner for RoSA (``peft_type == "ROSA"``)."""

    prefix: str = PREFIX
    tuner_layer_cls = RosaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name, *args, **kwargs) -> None:
        _refuse_transformers_load_adapter()
        super().__init__(model, config, adapter_name, *args, **kwargs)

    def forward(self, *args, **kwargs):
        if not getattr(self, "_schedule_checked", False) and self.training and torch.is_grad_enabled():
            self._schedule_checked = True
            _warn_if_no_schedule(self)
        return super().forward(*args, **kwargs)

    def _create_and_replace(
        self,
        rosa_config: RosaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if parameter_name is not None:
            raise ValueError(
                "RoSA adapts linear modules, not bare parameters (target_parameters is unsupported)"
            )
        kwargs = layer_kwargs(rosa_config, current_key, target)
        if isinstance(target, RosaLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = RosaLinear(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        full = super()._get_adapter_state_dict(
            model, config, adapter_name, state_dict, unwanted_adapter_names
        )
        return compact_state_dict(full)


def _refuse_transformers_load_adapter() -> None:
    """transformers' ``model.load_adapter(path)`` writes the file's tensors straight into the model, past the
    load hooks that validate a sparse support and size its buffers: refuse it with the calls that work. (Its
    ``add_adapter(config)``, which loads nothing, is fine.)"""
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return
        if frame.f_code.co_name == "load_adapter" and "transformers" in frame.f_code.co_filename:
            raise AdapterFileError(
                "transformers' model.load_adapter() cannot load a RoSA adapter (it bypasses the checks and resizing "
                "of the sparse support); use peft.PeftModel.from_pretrained(model, path) or "
                "rosa.load_rosa_model(model, path)"
            )
        frame = frame.f_back


def _warn_if_no_schedule(tuner: nn.Module) -> None:
    """Training a RoSA model with no mask and nothing that will choose one trains LoRA only, silently."""
    layers = [m for m in tuner.modules() if isinstance(m, RosaLayer)]
    waiting = [
        layer
        for layer in layers
        for name in layer.active_adapters
        if layer.capacity.get(name, 0) > 0
        and layer.nnz(name) == 0
        and not getattr(layer, "_rosa_scheduled", False)
    ]
    if waiting:
        warnings.warn(
            "RoSA is training with no mask and no schedule to choose one: the sparse values stay frozen and only "
            "LoRA trains. With transformers.Trainer add callbacks=[rosa.scheduler.RosaTrainerCallback()]; in a "
            "plain loop call rosa.scheduler.RosaScheduler(model).step(optimizer) after every optimizer step; or "
            "set a mask first (rosa.masks.collect_mask / load_mask).",
            stacklevel=4,
        )


def layer_kwargs(config: RosaConfig, module_name: str, target: nn.Module) -> dict:
    """RosaLinear arguments for one module, with the per-module rank/alpha/density overrides applied."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    weight = getattr(base, "weight", None)
    if weight is None:
        raise TypeError(f"RoSA cannot adapt {module_name} ({type(base).__name__}): it has no weight")
    out_features, in_features = _out_in(base)
    _check_fan_in_fan_out(config, base, module_name)
    density = config.density_for(module_name)
    budget = nnz_budget(density, out_features, in_features)
    capacity = budget
    if config.mask_allocation == "global":
        capacity = min(out_features * in_features, math.ceil(budget * config.global_capacity_factor))
    return {
        "r": config.rank_for(module_name),
        "lora_alpha": config.alpha_for(module_name),
        "lora_dropout": config.lora_dropout,
        "density": density,
        "capacity": capacity,
        "use_rslora": config.use_rslora,
        "init_lora_weights": config.init_lora_weights,
        "adapter_dtype": config.torch_adapter_dtype,
        "sparse_strategy": config.sparse_strategy,
        "inference_mode": config.inference_mode,
    }


def _check_fan_in_fan_out(config: RosaConfig, base: nn.Module, module_name: str) -> None:
    """The weight layout comes from the layer type; a config that says otherwise is corrected, loudly (PEFT's
    LoRA does the same)."""
    stored_in_out = isinstance(base, Conv1D)
    if config.fan_in_fan_out != stored_in_out:
        warnings.warn(
            f"fan_in_fan_out={config.fan_in_fan_out} but {module_name} is a {type(base).__name__}, which stores "
            f"its weight as {'(in, out)' if stored_in_out else '(out, in)'}: using fan_in_fan_out={stored_in_out}",
            stacklevel=4,
        )
        config.fan_in_fan_out = stored_in_out


def _out_in(base: nn.Module) -> tuple[int, int]:
    in_features, out_features = _get_in_out_features(base)
    if in_features is None:
        raise TypeError(f"RoSA adapts linear layers only, not {type(base).__name__}")
    return out_features, in_features


def get_rosa_model(
    model: nn.Module, config: RosaConfig, adapter_name: str = "default", **kwargs
) -> PeftModel:
    """Wrap ``model`` with a RoSA adapter; the same as ``peft.get_peft_model`` once rosa is imported."""
    if not isinstance(config, RosaConfig):
        raise TypeError(f"expected a RosaConfig, got {type(config).__name__}")
    peft_model = get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    # PEFT counts every element of a trainable tensor; with global allocation the sparse values are allocated
    # above the budget (the budget moves between layers), so count the budget, which is what trains.
    peft_model.get_nb_trainable_parameters = types.MethodType(_nb_trainable_at_budget, peft_model)
    return peft_model


def _nb_trainable_at_budget(self: PeftModel) -> tuple[int, int]:
    trainable, total = PeftModel.get_nb_trainable_parameters(self)
    spare = sum(
        layer.capacity[name] - layer.budget(name)
        for layer in rosa_layers(self).values()
        for name in layer.rosa_values
        if layer.rosa_values[name].requires_grad
    )
    return trainable - spare, total - spare


def load_rosa_model(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs,
) -> PeftModel:
    """Load a saved RoSA adapter onto ``model`` (``PeftModel.from_pretrained`` with RoSA's file checks)."""
    subfolder, config = kwargs.get("subfolder"), kwargs.get("config")
    load_config = None if config is None else config.to_dict()  # given config=, PEFT loads under it
    check_adapter_folder(path, subfolder, load_config)
    if config is not None and not os.path.exists(os.path.join(path, subfolder or "")):
        # a hub id given with config=: PEFT skips RosaConfig.from_pretrained, which checks hub ids otherwise
        folder = fetch_hub_adapter(str(path), **kwargs)
        if folder is not None:
            check_adapter_dir(folder, load_config)
    return PeftModel.from_pretrained(
        model, path, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs
    )


RosaModel.from_pretrained = staticmethod(load_rosa_model)


def rosa_layers(model: nn.Module) -> dict[str, RosaLayer]:
    """Every RoSA layer of a (PEFT-wrapped) model by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, RosaLayer)}


@torch.no_grad()
def sparse_parameter_count(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Trainable parameters by kind: LoRA (A and B), sparse capacity, and sparse nonzeros in use."""
    lora = capacity = active = 0
    for layer in rosa_layers(model).values():
        if adapter_name not in layer.rosa_values:
            continue
        if adapter_name in layer.rosa_A:
            lora += layer.rosa_A[adapter_name].weight.numel() + layer.rosa_B[adapter_name].weight.numel()
        capacity += layer.rosa_values[adapter_name].numel()
        active += layer.nnz(adapter_name)
    return {"lora": lora, "sparse_capacity": capacity, "sparse_active": active}
