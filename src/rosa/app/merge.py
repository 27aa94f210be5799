"""``rosa merge``: load base + adapter, merge (:func:`rosa.merge.merge_to_dense`) and save the merged model.

The lossless path is the default. Requantizing to NF4 is available on request and warns with the error it
measured.
"""

from __future__ import annotations

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

from ..config import DTYPES
from ..layer import RosaLayer
from ..mask.files import readable_by_umask
from ..merge import dequantized_weight, is_4bit, merge_to_dense, nf4_config

logger = logging.getLogger(__name__)


class MergeOutputError(ValueError):
    """The merge's output path cannot be written without destroying something the caller did not ask to replace."""


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
    from ..model import load_rosa_model
    from ..serialization import check_adapter_folder
    from .loading import load_model_and_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    from .default_model import DEFAULT_MODEL, default_model_cache_dir

    out = Path(os.path.abspath(out))
    inputs = {"the adapter": Path(adapter), "the current folder": Path.cwd()}
    if Path(model_section.name).exists():
        inputs["the base model"] = Path(model_section.name)
    if model_section.name == DEFAULT_MODEL:
        inputs["the built-in base model"] = default_model_cache_dir()
    check_merge_target(out, overwrite, inputs)
    check_adapter_folder(adapter)
    model, tokenizer = load_model_and_tokenizer(model_section, for_training=False)
    model = load_rosa_model(model, adapter)
    delta_norms = _delta_norms(model) if requantize else {}
    merged = merge_to_dense(model, DTYPES[dtype])

    def write(folder: Path) -> None:
        if requantize:
            _save_requantized(merged, folder, delta_norms, model_section.trust_remote_code)
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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the result is a folder like any other
    try:
        write(tmp)
        for file in tmp.rglob("*"):  # some writers create private files (0600): like any other file instead
            if file.is_file() and not file.is_symlink():
                readable_by_umask(file)
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


def _save_requantized(
    merged: nn.Module, out: Path, delta_norms: dict[str, float], trust_remote_code: bool = False
) -> None:
    """Quantize ``merged`` to NF4 through transformers (save, reload with the NF4 config) and save it to ``out``.
    A checkpoint of unquantized weights with a ``quantization_config`` attached would not load: transformers
    takes such a config as a promise of pre-quantized weights."""
    from transformers import AutoModelForCausalLM

    device = next(merged.parameters()).device
    staging = Path(tempfile.mkdtemp(prefix=".requantize-", dir=out.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        quantized = AutoModelForCausalLM.from_pretrained(
            staging,
            quantization_config=nf4_config(),
            dtype=merged.dtype,
            device_map=str(device),
            trust_remote_code=trust_remote_code,  # the base model's own setting: never a prompt
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
        if not is_4bit(module) or name not in reference:
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
    warnings.warn(message, stacklevel=3)  # once: the rosa command shows Python warnings as they are
