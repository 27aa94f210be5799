"""RosaModel: injects RoSA layers into a transformers model as a PEFT tuner, and saves/loads them.

Everything user-facing is PEFT's own: ``get_peft_model`` returns a ``PeftModel``, ``save_pretrained`` writes
``adapter_config.json`` + ``adapter_model.safetensors``, ``PeftModel.from_pretrained`` reads them back, and
merge/unload, multiple adapters and disabling come from ``BaseTuner``. This module adds what is RoSA-specific:
how a layer is built from the config, the compact on-disk support, and the checks on an untrusted file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import RosaConfig
from .layer import RosaLayer, RosaLinear, nnz_budget
from .serialization import AdapterFileError, compact_support

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


class RosaModel(BaseTuner):
    """The PEFT tuner for RoSA (``peft_type == "ROSA"``)."""

    prefix: str = "rosa_"
    tuner_layer_cls = RosaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

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
        return compact_support(full)


def layer_kwargs(config: RosaConfig, module_name: str, target: nn.Module) -> dict:
    """RosaLinear arguments for one module, with the per-module rank/alpha/density overrides applied."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    weight = getattr(base, "weight", None)
    if weight is None:
        raise TypeError(f"RoSA cannot adapt {module_name} ({type(base).__name__}): it has no weight")
    out_features, in_features = _out_in(base)
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


def _out_in(base: nn.Module) -> tuple[int, int]:
    from peft.tuners.tuners_utils import _get_in_out_features

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
    return get_peft_model(model, config, adapter_name=adapter_name, **kwargs)


def check_adapter_dir(path: str | os.PathLike) -> None:
    """Refuse adapter folders that hold only pickle weights: loading must never unpickle."""
    path = Path(path)
    if not path.is_dir():
        return  # a hub id: PEFT resolves it (and prefers safetensors); nothing local to check
    if (path / SAFETENSORS_NAME).is_file():
        return
    pickles = [name for name in PICKLE_NAMES if (path / name).exists()]
    if pickles:
        raise AdapterFileError(
            f"{path / pickles[0]}: RoSA adapters are loaded from safetensors only, and this folder has no "
            f"{SAFETENSORS_NAME}; refusing to unpickle {pickles[0]}"
        )


def load_rosa_model(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs,
) -> PeftModel:
    """Load a saved RoSA adapter onto ``model`` (``PeftModel.from_pretrained`` with RoSA's file checks)."""
    check_adapter_dir(path)
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
