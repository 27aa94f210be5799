"""Merge a RoSA adapter into its base model and save a plain transformers checkpoint.

For a 4-bit (QRoSA) base the lossless path is the default: every NF4 weight is dequantized (the values the
adapter was trained against), the adapted ones get ``s * B @ A + S`` added, and the model is saved in bf16/fp32
as ordinary ``nn.Linear`` layers, loadable by transformers without rosa or bitsandbytes. Requantizing to NF4
is available on request and warns with the error it measured.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .layer import RosaLayer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MergeOutputError(ValueError):
    """The merge's output path cannot be written without destroying something the caller did not ask to replace."""


def _is_4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 weight of a plain or bitsandbytes 4-bit linear layer, (out, in)."""
    if _is_4bit(module):
        import bitsandbytes.functional as bnbf

        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            return _dequantize_cpu_packed(module.weight.data, state)
        return bnbf.dequantize_4bit(module.weight.data, state).float()
    return module.weight.detach().float()


def _dequantize_cpu_packed(packed: torch.Tensor, state) -> torch.Tensor:
    """Dequantize a weight that bitsandbytes' CPU backend repacked for inference (its first eval-mode no-grad
    forward on an AVX512-BF16 machine; adapted layers are kept out of it, see ``rosa.layer``, but other 4-bit
    layers are not): ``dequantize_4bit`` would read the new layout as the old one. This inverts the layout of
    ``bitsandbytes.functional._convert_weight_packed_for_cpu`` (blocks of 32 rows, two nibbles per byte) and
    scales by the bf16 absmax that layer now computes with, without requantizing anything."""
    out_features, in_features = state.shape
    block_n, blocksize = 32, state.blocksize
    nibbles = packed.view(torch.uint8).reshape(-1, block_n)
    codes = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1)  # low nibbles then high, 64 codes per row
    codes = codes.reshape(out_features // block_n, in_features // 2, block_n, 2).transpose(1, 2)
    codes = codes.reshape(out_features, in_features).long()
    absmax = state.absmax.float().t()  # stored (in / blocksize, out) after repacking
    values = state.code.float().to(packed.device)[codes]
    return (values.view(out_features, -1, blocksize) * absmax.unsqueeze(-1)).reshape(
        out_features, in_features
    )


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=weight.device
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


@torch.no_grad()
def merge_to_dense(peft_model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Fold the active RoSA adapter into every adapted layer and dequantize every 4-bit layer.

    Returns the underlying transformers model with plain ``nn.Linear`` layers and no quantization config.
    """
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for module in base.modules():
        for child_name, child in module.named_children():
            if isinstance(child, RosaLayer):
                inner = child.get_base_layer()
                weight = dequantized_weight(inner)
                if child.fan_in_fan_out:
                    weight = weight.t()
                for adapter in child.active_adapters:
                    if adapter in child.rosa_values:
                        weight = weight + child.get_delta_weight(adapter).to(weight.device)
                if child.fan_in_fan_out:  # keep GPT-2's Conv1D layout so the checkpoint stays loadable
                    inner.weight.data = weight.t().contiguous().to(dtype)
                    replacements.append((module, child_name, inner))
                else:
                    bias = inner.bias.detach().float() if inner.bias is not None else None
                    replacements.append((module, child_name, _dense_linear(weight, bias, dtype)))
            elif _is_4bit(child):
                bias = child.bias.detach().float() if child.bias is not None else None
                replacements.append(
                    (module, child_name, _dense_linear(dequantized_weight(child), bias, dtype))
                )
    for parent, child_name, new in replacements:
        setattr(parent, child_name, new)
    # Drop the quantization markers first: transformers refuses ``.to(dtype)`` on a bitsandbytes model.
    config = base.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attr in (
        "is_loaded_in_4bit",
        "is_quantized",
        "quantization_method",
        "hf_quantizer",
        "_weight_conversions",
    ):
        if attr in vars(base):
            delattr(base, attr)
        if getattr(base, attr, None):
            with contextlib.suppress(AttributeError):  # a read-only property
                setattr(base, attr, False if attr.startswith("is_") else None)
    return base.to(dtype)


def merge_adapter_to_disk(
    model_section,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "bfloat16",
    requantize: bool = False,
    overwrite: bool = False,
) -> Path:
    """``rosa merge``: load base + adapter, merge, and write the merged checkpoint atomically.

    The target is checked before anything loads: a file or symlink is never replaced, a non-empty folder only
    with ``overwrite``, and never a folder holding one of the merge's inputs. With ``requantize`` the merged
    model is quantized to NF4 (double quantization, bf16 compute) by transformers itself, from the merged
    weights, and saved as a pre-quantized bitsandbytes checkpoint; a warning states the error this adds,
    measured layer by layer against the merged weights."""
    from .model import check_adapter_folder, load_rosa_model
    from .train import load_model_and_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(os.path.abspath(out))
    inputs = {"the adapter": Path(adapter), "the current folder": Path.cwd()}
    if Path(model_section.name).exists():
        inputs["the base model"] = Path(model_section.name)
    check_merge_target(out, overwrite, inputs)
    check_adapter_folder(adapter)
    model, tokenizer = load_model_and_tokenizer(model_section, for_training=False)
    model = load_rosa_model(model, adapter)
    delta_norms = _delta_norms(model) if requantize else {}
    merged = merge_to_dense(model, DTYPES[dtype])

    def write(folder: Path) -> None:
        if requantize:
            _save_requantized(merged, folder, delta_norms)
        else:
            merged.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    write_folder_atomically(out, write, overwrite)
    return out


def check_merge_target(out: Path, overwrite: bool, inputs: dict[str, Path] | None = None) -> None:
    """Refuse an output path whose replacement would destroy what the caller did not ask to replace: a file or
    symlink (never), a non-empty folder (only with ``overwrite``), a folder holding one of ``inputs`` (never,
    label -> path), a path below a file. An absent path or an empty folder is fine."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise MergeOutputError(
            f"merge output {out} is {kind}, not a folder; refusing to replace it (--overwrite replaces folders only)"
        )
    real_out = Path(os.path.realpath(out))
    for label, path in (inputs or {}).items():
        real = Path(os.path.realpath(path))
        if real == real_out or real_out in real.parents:
            raise MergeOutputError(
                f"merge output {out} holds {label} ({path}); refusing to replace it, choose another folder"
            )
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise MergeOutputError(
            f"merge output {out} is a folder that is not empty; refusing to delete its contents "
            "(pass --overwrite to replace it)"
        )
    ancestor = next((p for p in out.parents if p.exists() or p.is_symlink()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise MergeOutputError(f"merge output {out}: {ancestor} is a file, not a folder")


def write_folder_atomically(out: Path, write: Callable[[Path], None], overwrite: bool = False) -> None:
    """Have ``write`` fill a fresh folder beside ``out``, then rename it into place, so ``out`` is either left as
    it was or holds the complete result. The target is checked again just before the swap (it may have changed
    while the model was merging)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        check_merge_target(out, overwrite)
        _swap_in(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, out: Path, overwrite: bool) -> None:
    """rename(2) replaces only an absent or empty folder; with ``overwrite`` a non-empty one is first renamed
    aside (and renamed back if the swap fails), and deleted only once the new folder is in place."""
    try:
        os.replace(new, out)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not overwrite:
            raise MergeOutputError(
                f"merge output {out} became non-empty while merging; refusing to delete its contents "
                "(pass --overwrite to replace it)"
            ) from None
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def nf4_config(compute_dtype: torch.dtype = torch.bfloat16):
    """The QRoSA quantization: bitsandbytes NF4 with double quantization."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


@torch.no_grad()
def _delta_norms(peft_model: nn.Module) -> dict[str, float]:
    """Frobenius norm of each adapted layer's merged delta ``s * B @ A + S``, by module name in the base model."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    norms = {}
    for name, module in base.named_modules():
        if isinstance(module, RosaLayer):
            norms[name] = sum(
                float(module.get_delta_weight(a).norm())
                for a in module.active_adapters
                if a in module.rosa_values
            )
    return norms


def _save_requantized(merged: nn.Module, out: Path, delta_norms: dict[str, float]) -> None:
    """Quantize ``merged`` to NF4 through transformers (save, reload with the NF4 config) and save it to ``out``.
    A checkpoint of unquantized weights with a ``quantization_config`` attached would not load: transformers
    takes such a config as a promise of pre-quantized weights."""
    from transformers import AutoModelForCausalLM

    device = next(merged.parameters()).device
    staging = Path(tempfile.mkdtemp(prefix=".requantize-", dir=out.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        quantized = AutoModelForCausalLM.from_pretrained(
            staging, quantization_config=nf4_config(), dtype=merged.dtype, device_map=str(device)
        )
        _warn_requantization_error(merged, quantized, delta_norms)
        quantized.save_pretrained(out, safe_serialization=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@torch.no_grad()
def requantization_errors(
    merged: nn.Module, quantized: nn.Module, delta_norms: dict[str, float] | None = None
) -> dict[str, dict[str, float]]:
    """Per 4-bit layer of ``quantized``: ``weight`` = ||Q(W) - W|| / ||W|| against the merged weight W, and for
    adapted layers ``delta`` = ||Q(W) - W|| / ||delta||, the quantization error as a fraction of the adapter's
    own contribution (at 1 or more, requantizing erases the adapter's effect on that layer)."""
    delta_norms = delta_norms or {}
    reference = dict(merged.named_modules())
    errors = {}
    for name, module in quantized.named_modules():
        if not _is_4bit(module) or name not in reference:
            continue
        w = reference[name].weight.detach().float()
        err = float((dequantized_weight(module).to(w.device) - w).norm())
        errors[name] = {"weight": err / max(float(w.norm()), 1e-12)}
        if delta_norms.get(name):
            errors[name]["delta"] = err / delta_norms[name]
    return errors


def _warn_requantization_error(
    merged: nn.Module, quantized: nn.Module, delta_norms: dict[str, float]
) -> None:
    errors = requantization_errors(merged, quantized, delta_norms)
    if not errors:
        return
    weight = [e["weight"] for e in errors.values()]
    delta = [e["delta"] for e in errors.values() if "delta" in e]
    message = (
        f"requantizing the merged model to NF4 is lossy: measured relative weight error mean {sum(weight) / len(weight):.3g}, "
        f"max {max(weight):.3g} over {len(weight)} layers"
    )
    if delta:
        message += (
            f"; as a fraction of the adapter's own weight change: mean {sum(delta) / len(delta):.3g}, "
            f"max {max(delta):.3g} over {len(delta)} adapted layers"
        )
    message += ". Omit --requantize for the lossless bf16/fp32 merge."
    logger.warning(message)
    warnings.warn(message, stacklevel=3)
