"""The adapter file's compact sparse support, and the checks an untrusted file must pass before use.

In memory a layer keeps five support buffers (CSR and transposed CSR, see ``rosa.sparse.support``). On disk it
keeps only the CSR: row offsets (int32) and column indices (int16 when the input dimension allows, else int32).
The transpose is rebuilt at load time, so a file cannot smuggle in an inconsistent transpose, and the file is
about as small as a LoRA file with the same number of trainable parameters.
"""

from __future__ import annotations

import torch

from .sparse.support import SupportError, support_from_csr

SAVED_SUPPORT = ("rosa_row_offsets", "rosa_col_idx")
DERIVED_SUPPORT = ("rosa_t_row_offsets", "rosa_t_col_idx", "rosa_t_perm")
INT16_MAX = torch.iinfo(torch.int16).max


class AdapterFileError(ValueError):
    """An adapter file (or state dict) cannot be loaded into this model."""


def compact_support(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the derived transposed support and narrow column indices to int16 where they fit."""
    out = {}
    for key, tensor in state_dict.items():
        if _attr_of(key) in DERIVED_SUPPORT:
            continue
        if _attr_of(key) == "rosa_col_idx" and (tensor.numel() == 0 or int(tensor.max()) <= INT16_MAX):
            tensor = tensor.to(torch.int16)
        out[key] = tensor
    return out


def expand_layer_support(
    layer, state_dict: dict[str, torch.Tensor], prefix: str, adapter_names: list[str]
) -> None:
    """Load-time pre-hook body for one RosaLayer: validate the saved CSR of each adapter in ``state_dict``, add the
    derived transpose, and resize the layer's support buffers to the checkpoint's sizes. Raises before anything
    is changed if any tensor of this layer is malformed."""
    staged: dict[str, dict[str, torch.Tensor]] = {}
    for name in adapter_names:
        _check_float_tensors(layer, state_dict, prefix, name)
        offsets_key = f"{prefix}rosa_row_offsets.{name}"
        cols_key = f"{prefix}rosa_col_idx.{name}"
        values_key = f"{prefix}rosa_values.{name}"
        if offsets_key not in state_dict and cols_key not in state_dict:
            derived = [f"{prefix}{attr}.{name}" for attr in DERIVED_SUPPORT]
            smuggled = [key for key in derived if key in state_dict]
            if smuggled:  # the transpose is derived from the CSR, never taken from a file on its own
                raise AdapterFileError(
                    f"{smuggled[0]}: a transposed support without the CSR it derives from "
                    f"({offsets_key}, {cols_key}); rosa never saves it: the file was not written by rosa"
                )
            if values_key in state_dict:  # a value belongs to a position: never one without the other
                raise AdapterFileError(f"{values_key}: sparse values without their support ({cols_key})")
            continue
        if values_key not in state_dict:
            raise AdapterFileError(f"{cols_key}: a sparse support without its values ({values_key})")
        if offsets_key not in state_dict or cols_key not in state_dict:
            missing = offsets_key if offsets_key not in state_dict else cols_key
            raise AdapterFileError(
                f"{missing}: missing (the sparse support needs both row offsets and columns; note that loading with "
                "ignore_mismatched_sizes=True drops the column indices, whose size changes once a mask is set)"
            )
        offsets, cols = state_dict[offsets_key], state_dict[cols_key]
        if offsets.numel() != layer.out_features + 1:
            raise AdapterFileError(
                f"{offsets_key}: has {offsets.numel()} row offsets, the layer needs {layer.out_features + 1} "
                f"(out_features + 1): the file was saved for a different model"
            )
        try:
            support = support_from_csr(offsets.cpu(), cols.cpu(), layer.in_features)
        except SupportError as e:
            # name the tensor at fault: validate_csr's messages about the offsets all say "row offset"
            raise AdapterFileError(f"{offsets_key if 'row offset' in str(e) else cols_key}: {e}") from None
        if support.nnz > layer.capacity[name]:
            raise AdapterFileError(
                f"{cols_key}: {support.nnz} nonzeros but the layer holds at most {layer.capacity[name]} sparse values "
                "(was it saved with a larger density?)"
            )
        staged[name] = {
            f"rosa_{field}": getattr(support, field)
            for field in ("row_offsets", "col_idx", "t_row_offsets", "t_col_idx", "t_perm")
        }
    for name, tensors in staged.items():
        for attr, tensor in tensors.items():
            state_dict[f"{prefix}{attr}.{name}"] = tensor
            device = getattr(layer, attr)[name].device  # the buffer's own: the values may still be on meta
            getattr(layer, attr)[name] = torch.empty_like(tensor, device=device)


def _check_float_tensors(layer, state_dict, prefix: str, name: str) -> None:
    """A, B and the values must be finite floats of exactly the shapes this layer was built with."""
    expected = {f"{prefix}rosa_values.{name}": layer.rosa_values[name]}
    if name in layer.rosa_A:
        expected[f"{prefix}rosa_A.{name}.weight"] = layer.rosa_A[name].weight
        expected[f"{prefix}rosa_B.{name}.weight"] = layer.rosa_B[name].weight
    for key, current in expected.items():
        tensor = state_dict.get(key)
        if tensor is None:
            continue
        if not tensor.is_floating_point():
            raise AdapterFileError(f"{key}: expected a floating-point tensor, got {tensor.dtype}")
        if tensor.shape != current.shape:
            raise AdapterFileError(
                f"{key}: shape {tuple(tensor.shape)} does not match the model's {tuple(current.shape)} "
                "(different rank, density or base model?)"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterFileError(f"{key}: contains NaN or infinite values")


def _attr_of(key: str) -> str | None:
    """The rosa_* attribute a state-dict key belongs to, e.g. 'a.q_proj.rosa_col_idx.default' -> 'rosa_col_idx'."""
    for part in reversed(key.split(".")):
        if part.startswith("rosa_"):
            return part
    return None
