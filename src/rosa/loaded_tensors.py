"""The check of an adapter's tensors against the model they are about to be copied into (after PEFT's key
remapping, before any copy): ownership, shapes of non-RoSA tensors, finiteness, and every RoSA layer present.
File-level checks (names, sizes, kinds of file, the config) are :mod:`rosa.serialization`'s."""

from __future__ import annotations

import torch

from .serialization import PREFIX, AdapterFileError, _name, _short, check_float_tensor


def check_loaded_state_dict(model, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """The tensors PEFT is about to copy into ``model`` for ``adapter_name`` (keys as the model names them, adapter
    name included: after PEFT's remapping), checked against the model before anything is copied: every tensor is
    one of this adapter's own (a RoSA layer's, its ``modules_to_save`` copy, its trainable token rows) on a module
    the model has; a non-RoSA tensor has the model's shape; every floating-point tensor is finite; and every RoSA
    layer of the adapter is in the file (PEFT would only warn, and the layer would keep its fresh initialisation).
    The RoSA tensors' own shapes and indices are the layers' load hooks' (``RosaLayer.check_state_dict``)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    model_tensors = {_unwrapped(name): tensor for name, tensor in named}
    # set_peft_model_state_dict on a model the adapter was injected into directly: no PeftModel prefix
    unprefixed = not any(name.startswith("base_model.model.") for name in model_tensors)
    for key, tensor in state_dict.items():
        name = _unwrapped(key.removeprefix("base_model.model.") if unprefixed else key)
        target = model_tensors.get(name)
        if target is None:
            raise AdapterFileError(
                f"tensor {_short(key)}: the model has no such parameter (a layer it does not have, or a name rosa "
                "never saves: was the adapter saved for another model?)"
            )
        if not _owned_by(name.split("."), adapter_name):
            raise AdapterFileError(
                f"tensor {_short(key)} is not a tensor of adapter {adapter_name!r} (a base model weight, or another "
                "adapter's); refusing to load it over the model's weights"
            )
        if not isinstance(tensor, torch.Tensor):
            raise AdapterFileError(f"tensor {_short(key)}: not a tensor ({type(tensor).__name__})")
        rosa = any(part.startswith(PREFIX) for part in name.split("."))
        if not rosa:  # a modules_to_save copy or token rows: nothing else sizes or validates them
            check_float_tensor(key, tensor, target.shape)
        elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterFileError(f"{_name(key)}: contains NaN or infinite values")
    layers = _adapter_layers(model, adapter_name)
    state_dict = {_unwrapped(key): tensor for key, tensor in state_dict.items()}
    missing = [name for name, keys in layers.items() if not any(k in state_dict for k in keys)]
    if layers and len(missing) == len(layers):
        raise AdapterFileError(
            f"the adapter's tensors hold none of the {len(layers)} RoSA layers of adapter {adapter_name!r} "
            f"({len(state_dict)} tensors, none of them RoSA's): an empty file, or one saved for another model"
        )
    if missing:
        raise AdapterFileError(
            f"no tensors for RoSA layer {missing[0]!r} of adapter {adapter_name!r} ({len(missing)} of "
            f"{len(layers)} layers missing): the file is incomplete or was saved for another model"
        )
    for name, keys in layers.items():
        lora, sparse = keys[3:], keys[:3]
        # a sparse part given in part (values without their support, a transposed support alone) is the layer's
        # load hook's to name precisely; here: a part that is not there at all
        derived = [
            f"{name}.{PREFIX}{part}.{adapter_name}" for part in ("t_row_offsets", "t_col_idx", "t_perm")
        ]
        absent = [k for k in lora if k not in state_dict]
        if not any(k in state_dict for k in (*sparse, *derived)):
            absent.append(sparse[0])
        if absent:
            raise AdapterFileError(
                f"{absent[0]}: missing from the adapter's tensors (layer {name!r} lacks {len(absent)} of its "
                f"{len(keys)}); the file is incomplete"
            )


# What FSDP, activation checkpointing and torch.compile put in module names (never in state-dict keys)
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _unwrapped(name: str) -> str:
    for part in WRAPPER_PREFIXES:
        name = name.replace(part, "")
    return name


def _owned_by(parts: list[str], adapter_name: str) -> bool:
    """A model key of ``adapter_name``'s own tensors: ``<layer>.rosa_X.<adapter>[.weight]``,
    ``<module>.modules_to_save.<adapter>.<param>`` or ``<module>.token_adapter.trainable_tokens_delta.<adapter>``;
    never below a wrapped base layer or a module's original copy."""
    if "base_layer" in parts or "original_module" in parts:
        return False
    for i, part in enumerate(parts[:-1]):
        owner = part.startswith(PREFIX) or part in ("modules_to_save", "trainable_tokens_delta")
        if owner and parts[i + 1] == adapter_name:
            return True
    return False


def _adapter_layers(model, adapter_name: str) -> dict[str, list[str]]:
    """The model keys every RoSA layer of ``adapter_name`` must be given, by layer name (a RoSA layer is found by
    its storage, ``rosa_values``: this module does not import the layer classes)."""
    layers = {}
    for name, module in model.named_modules():
        name = _unwrapped(name)
        values = getattr(module, f"{PREFIX}values", None)
        if not isinstance(values, torch.nn.ParameterDict) or adapter_name not in values:
            continue
        keys = [f"{name}.{PREFIX}{part}.{adapter_name}" for part in ("values", "row_offsets", "col_idx")]
        if adapter_name in getattr(module, f"{PREFIX}A", {}):
            keys += [f"{name}.{PREFIX}{part}.{adapter_name}.weight" for part in ("A", "B")]
        layers[name] = keys
    return layers
