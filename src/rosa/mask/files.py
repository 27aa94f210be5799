"""Mask files: every adapted layer's support in a safetensors file, read back with every index checked.

Per layer the CSR ``row_offsets`` and ``col_idx`` (int32) under ``"<layer>.row_offsets"`` /
``"<layer>.col_idx"``, with the canonical layer names of :mod:`rosa.mask.layers`, and metadata ``format``,
``format_version``, ``method``, ``layers`` (JSON list) and ``shapes`` (JSON ``{layer: [out, in]}``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..sparse.support import Support, SupportError, support_from_csr, validate_csr
from .layers import MaskError, mask_layers, resolve_adapter
from .selection import Method, method_name

MASK_FORMAT = "rosa-mask"
MASK_FORMAT_VERSION = 1


class MaskFileError(MaskError, SupportError):
    """A mask file is malformed or does not fit the model. Nothing was applied."""


def readable_by_umask(path: str | os.PathLike) -> None:
    """safetensors writes its files private (0600); a mask is an ordinary file: the mode the umask gives."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_mask(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    method: Method | None = None,
) -> None:
    """Write every adapted layer's support to a safetensors file (CSR, int32, plus a metadata header)."""
    from safetensors.torch import save_file

    adapter = resolve_adapter(model, adapter_name)
    layers = mask_layers(model, adapter)
    if all(layer.nnz(adapter) == 0 for layer in layers.values()):
        raise MaskError("the model has no mask yet: every adapted layer has an empty support")
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, layer in layers.items():
        support = layer.support(adapter)
        tensors[f"{name}.row_offsets"] = support.row_offsets.to(torch.int32).cpu().contiguous()
        tensors[f"{name}.col_idx"] = support.col_idx.to(torch.int32).cpu().contiguous()
        shapes[name] = [layer.out_features, layer.in_features]
    metadata = {
        "format": MASK_FORMAT,
        "format_version": str(MASK_FORMAT_VERSION),
        "method": method_name(method) if method is not None else "unknown",
        "layers": json.dumps(list(layers)),
        "shapes": json.dumps(shapes),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)
    readable_by_umask(path)


def read_mask_file(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a mask file, without checking them against any model."""
    from safetensors import safe_open

    from ..serialization import AdapterFileError, regular_file

    try:
        if not regular_file(Path(path)):
            raise FileNotFoundError(f"mask file not found: {os.fspath(path)}")
    except AdapterFileError as e:  # a FIFO or device would block safetensors forever
        raise MaskFileError(str(e)) from None
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise MaskFileError(f"{os.fspath(path)}: not a readable safetensors file: {e}") from None
    return metadata, tensors


def load_mask(
    model: nn.Module, path: str | os.PathLike, *, adapter_name: str | None = None, apply: bool = True
) -> dict[str, Support]:
    """Read a mask file written by :func:`save_mask` and set it on the model.

    The file is untrusted: its header, the layer set, every tensor's name, dtype and shape, every CSR pair
    (offsets monotone, indices in range and sorted) and each layer's capacity are checked before anything is
    applied; the first problem raises :class:`MaskFileError` naming the tensor or layer, and the model is left
    unchanged.
    """
    where = os.fspath(path)
    adapter = resolve_adapter(model, adapter_name)
    layers = mask_layers(model, adapter)
    metadata, tensors = read_mask_file(path)

    if metadata.get("format") != MASK_FORMAT:
        raise MaskFileError(f"{where}: not a RoSA mask file (metadata format={metadata.get('format')!r})")
    if metadata.get("format_version") != str(MASK_FORMAT_VERSION):
        raise MaskFileError(
            f"{where}: unsupported mask format version {metadata.get('format_version')!r} "
            f"(this reader understands {MASK_FORMAT_VERSION})"
        )
    try:
        names = json.loads(metadata["layers"])
        shapes = json.loads(metadata["shapes"])
    except (KeyError, ValueError) as e:
        raise MaskFileError(f"{where}: bad metadata 'layers'/'shapes': {e}") from None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and isinstance(shapes, dict)):
        raise MaskFileError(f"{where}: metadata 'layers' must be a list of names and 'shapes' a mapping")
    if len(set(names)) != len(names):
        raise MaskFileError(f"{where}: metadata lists a layer twice")
    missing = [n for n in layers if n not in names]
    if missing:
        raise MaskFileError(
            f"{where}: no mask for layer {missing[0]!r} of the model ({len(missing)} missing)"
        )
    extra = [n for n in names if n not in layers]
    if extra:
        raise MaskFileError(f"{where}: mask for layer {extra[0]!r}, which the model does not have")
    expected = {f"{n}.{field}" for n in names for field in ("row_offsets", "col_idx")}
    for key in tensors:
        if key not in expected:
            raise MaskFileError(f"{where}: unexpected tensor {key!r}")

    supports: dict[str, Support] = {}
    for name in names:
        layer = layers[name]
        out_features, in_features = layer.out_features, layer.in_features
        if shapes.get(name) != [out_features, in_features]:
            raise MaskFileError(
                f"{where}: layer {name!r} is {out_features}x{in_features} in the model but the file says "
                f"{shapes.get(name)!r}"
            )
        offsets_key, cols_key = f"{name}.row_offsets", f"{name}.col_idx"
        for key in (offsets_key, cols_key):
            if key not in tensors:
                raise MaskFileError(f"{where}: missing tensor {key!r}")
            if tensors[key].dtype != torch.int32 or tensors[key].dim() != 1:
                raise MaskFileError(
                    f"{where}: tensor {key!r} must be 1-D int32, got {tensors[key].dtype} "
                    f"of shape {tuple(tensors[key].shape)}"
                )
        offsets, cols = tensors[offsets_key], tensors[cols_key]
        if offsets.numel() != out_features + 1:
            raise MaskFileError(
                f"{where}: tensor {offsets_key!r} has {offsets.numel()} entries; the layer has {out_features} "
                f"rows, so it needs {out_features + 1}"
            )
        try:
            validate_csr(offsets, cols, in_features, name=f"tensors {offsets_key!r}/{cols_key!r}")
            support = support_from_csr(offsets, cols, in_features)
        except SupportError as e:
            raise MaskFileError(f"{where}: {e}") from None
        capacity = layer.capacity[adapter]
        if support.nnz > capacity:
            raise MaskFileError(
                f"{where}: tensor {cols_key!r} has {support.nnz} nonzeros but layer {name!r} holds at most "
                f"{capacity} sparse values"
            )
        supports[name] = support
    if supports and all(support.nnz == 0 for support in supports.values()):
        raise MaskFileError(
            f"{where}: every layer's support is empty: not a mask (save_mask never writes one; was it saved before "
            "the mask was chosen?)"
        )
    if apply:
        for name, layer in layers.items():
            layer.set_support(adapter, supports[name])
    return {name: supports[name] for name in layers}
