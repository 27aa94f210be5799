"""RosaModel: injects RoSA layers into a transformers model as a PEFT tuner.

Everything user-facing is PEFT's own: ``get_peft_model`` returns a ``PeftModel``, ``save_pretrained`` writes
``adapter_config.json`` + ``adapter_model.safetensors``, ``PeftModel.from_pretrained`` reads them back, and
merge/unload, multiple adapters and disabling come from ``BaseTuner``. This module adds what is RoSA-specific:
how a layer is built from the config, and the compact on-disk sparse support.

Load checks on PEFT's own paths. ``PeftModel.from_pretrained(base, path)`` loads the config through
``RosaConfig.from_pretrained``, which checks the folder first (:func:`rosa.serialization.check_adapter_dir`). Given
``config=``, PEFT skips that call and reads the files itself, and the only RoSA code that runs before it does is
this tuner's constructor. PEFT offers no extension point that sees the path before the files are opened (its
``load_peft_weights`` is a module function, and rosa does not patch PEFT), so ``RosaModel.__init__`` finds the
``PeftModel.from_pretrained`` call that is building it on the stack, by that function's code object (read-only: no
PEFT function, attribute or instance is replaced), and checks the path it was given against the config it was
given, as ``rosa.load_rosa_model`` does; ``tests/test_reliability_loading.py`` pins the PEFT behaviour this relies
on. Whatever the path, the tensors themselves are checked against the model before PEFT copies them in, through
the tuner classmethod PEFT calls on every load (``_remap_adapter_state_dict_for_load``, see
:func:`rosa.loaded_tensors.check_loaded_state_dict`). One path is left: ``PeftModel.load_adapter(path, name)`` for an
adapter ``name`` that is already loaded reads the file with no RoSA code before it; its tensors are still checked,
but a FIFO in place of the file would block there, and a pickle-only folder reaches torch's ``weights_only``
unpickler (which refuses code) before rosa can refuse it.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import RosaConfig, RosaConfigError
from .layer import Conv1D, RosaLayer, RosaLinear, nnz_budget, rosa_layers
from .loaded_tensors import check_loaded_state_dict
from .schedule.auto import remove_schedule_hook, watch_training_forwards
from .serialization import (
    PREFIX,
    SAFETENSORS_NAME,
    AdapterFileError,
    check_adapter_source,
)
from .sparse.delta import compact_state_dict


class RosaModel(BaseTuner):
    """The PEFT tuner for RoSA (``peft_type == "ROSA"``)."""

    prefix: str = PREFIX
    tuner_layer_cls = RosaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name, *args, **kwargs) -> None:
        _refuse_transformers_load_adapter()
        _check_peft_load_source(config.get(adapter_name) if isinstance(config, dict) else config)
        super().__init__(model, config, adapter_name, *args, **kwargs)
        if hasattr(model, "add_model_tags"):  # the saved model card's tags: loading it needs rosa
            model.add_model_tags(["rosa"])
        watch_training_forwards(self.model)  # its training forwards run the RoSA schedule

    def add_weighted_adapter(self, *args, **kwargs):
        """PEFT's LoRA can mix adapters by weights; RoSA adapters cannot be: each has its own sparse support."""
        raise NotImplementedError(
            "add_weighted_adapter is not supported for RoSA adapters: their sparse supports differ, so they cannot "
            "be mixed into one; merge each into the base (merge_and_unload) or switch with set_adapter"
        )

    def _unload_and_optionally_merge(self, *args, **kwargs):
        """PEFT's unload and merge_and_unload; the plain model they return keeps no hook of rosa's."""
        unloaded = super()._unload_and_optionally_merge(*args, **kwargs)
        remove_schedule_hook(unloaded)
        return unloaded

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

    def _check_new_adapter_config(self, config) -> None:
        """Validate the config again as it is injected (every adapter, ``add_adapter`` included): a field changed
        after construction (``config.lora_alpha = float("nan")``) is refused before PEFT reads it or any layer is
        built."""
        if isinstance(config, RosaConfig):
            config.validate()
            _check_token_indices_fit(self.model, config)
        super()._check_new_adapter_config(config)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's remapping of a file's keys to the model's, then RoSA's check of every tensor against the model
        before PEFT copies any in (PEFT calls this on every load, whatever the entry point)."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_loaded_state_dict(model, adapter_name, remapped)
        return remapped

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        full = super()._get_adapter_state_dict(
            model, config, adapter_name, state_dict, unwanted_adapter_names
        )
        return compact_state_dict(full)


def _check_token_indices_fit(model: nn.Module, config: RosaConfig) -> None:
    """Every ``trainable_token_indices`` entry names a row of its embedding: PEFT indexes the weight with them
    unchecked (an IndexError on CPU, a device-side assert on CUDA), and they may come from an adapter file."""
    spec = config.trainable_token_indices
    if not spec:
        return
    if isinstance(spec, dict):
        targets = [
            (f"trainable_token_indices[{name!r}]", indices, module)
            for name, indices in spec.items()
            for key, module in model.named_modules()
            if key.endswith(name)
        ]
    else:
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        targets = [("trainable_token_indices", spec, embedding)] if embedding is not None else []
    for label, indices, module in targets:
        rows = getattr(module, "num_embeddings", None)
        weight = getattr(module, "weight", None)
        if rows is None and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            rows = weight.shape[0]
        if rows is None:
            continue
        outside = [i for i in indices if not 0 <= i < rows]
        if outside:
            raise RosaConfigError(
                f"{label}: token {outside[0]} is outside the embedding's {rows} rows ({len(outside)} such)"
            )


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


_PEFT_FROM_PRETRAINED = PeftModel.from_pretrained.__func__.__code__


def _check_peft_load_source(peft_config) -> None:
    """When ``PeftModel.from_pretrained`` is building this tuner, check the adapter it is about to read (PEFT
    opens the files right after; with ``config=`` nothing of rosa's has seen them yet): see the module docstring.
    Read-only: the caller's frame is found by the identity of PEFT's code object, and its locals are only read."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return
        if frame.f_code is _PEFT_FROM_PRETRAINED:
            break
        frame = frame.f_back
    else:
        return
    caller = frame.f_locals
    if caller.get("config") is not peft_config or "model_id" not in caller:
        return  # not the tuner of that call's adapter
    kwargs = dict(caller.get("kwargs") or {})
    subfolder = kwargs.pop("subfolder", None)
    check_adapter_source(caller["model_id"], subfolder, peft_config, **kwargs)


def layer_kwargs(config: RosaConfig, module_name: str, target: nn.Module) -> dict:
    """RosaLinear arguments for one module, with the per-module rank/alpha/density overrides applied. Checked
    against the layer before anything is allocated: a linear layer (anything else would fail at its first
    forward), a rank no larger than the layer's own (a huge one would die in the allocator)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    weight = getattr(base, "weight", None)
    if weight is None:
        raise RosaConfigError(f"RoSA cannot adapt {module_name} ({type(base).__name__}): it has no weight")
    if not isinstance(base, (nn.Linear, Conv1D)):  # bitsandbytes' 4- and 8-bit layers are nn.Linear too
        raise RosaConfigError(
            f"RoSA adapts linear layers only, and target_modules selects {module_name} ({type(base).__name__}); "
            "leave it out of target_modules (modules_to_save trains a whole module)"
        )
    out_features, in_features = _out_in(base)
    rank = config.rank_for(module_name)
    if rank > min(out_features, in_features):
        raise RosaConfigError(
            f"rank {rank} for {module_name} exceeds the layer's own rank min({out_features}, {in_features}) = "
            f"{min(out_features, in_features)}; lower r, or set rank_pattern for this layer"
        )
    _check_fan_in_fan_out(config, base, module_name)
    density = config.density_for(module_name)
    budget = nnz_budget(density, out_features, in_features)
    capacity = budget
    if config.mask_allocation == "global":
        capacity = min(out_features * in_features, math.ceil(budget * config.global_capacity_factor))
    return {
        "r": rank,
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
    return get_peft_model(model, config, adapter_name=adapter_name, **kwargs)


def load_rosa_model(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs,
) -> PeftModel:
    """Load a saved RoSA adapter onto ``model`` (``PeftModel.from_pretrained`` with RoSA's file checks)."""
    hub_kwargs = {k: v for k, v in kwargs.items() if k not in ("subfolder", "config")}
    # given config=, PEFT loads the file under it; otherwise RosaConfig.from_pretrained fetches a hub id (once)
    check_adapter_source(path, kwargs.get("subfolder"), kwargs.get("config"), fetch=False, **hub_kwargs)
    try:
        return PeftModel.from_pretrained(
            model, path, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs
        )
    except KeyError as e:  # PEFT looks up each declared module's tensors in the file blindly
        where = os.path.join(path, kwargs.get("subfolder") or "", SAFETENSORS_NAME)
        raise AdapterFileError(
            f"{where}: no tensor {e.args[0] if e.args else ''!r}, which the adapter config declares "
            "(modules_to_save or trainable_token_indices): the file is incomplete"
        ) from None


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
