"""Merge a RoSA adapter into its base model and save a plain transformers checkpoint.

For a 4-bit (QRoSA) base the lossless path is the default: every NF4 weight is dequantized (the values the
adapter was trained against), the adapted ones get ``s * B @ A + S`` added, and the model is saved in bf16/fp32
as ordinary ``nn.Linear`` layers, loadable by transformers without rosa or bitsandbytes. Requantizing to NF4
is available on request and warns with the error it measured.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .layer import RosaLayer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    return module.weight.detach().float()


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=weight.device)
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
    for name, module in base.named_modules():
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
                replacements.append((module, child_name, _dense_linear(dequantized_weight(child), bias, dtype)))
    for parent, child_name, new in replacements:
        setattr(parent, child_name, new)
    base = base.to(dtype)
    config = base.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attr in ("is_loaded_in_4bit", "is_quantized", "quantization_method", "hf_quantizer"):
        if hasattr(base, attr):
            try:
                setattr(base, attr, False if attr.startswith("is_") else None)
            except AttributeError:
                pass
    return base


def merge_adapter_to_disk(model_section, adapter: str | os.PathLike, out: str | os.PathLike, dtype: str = "bfloat16",
                          requantize: bool = False) -> Path:
    """``rosa merge``: load base + adapter, merge, and write the merged checkpoint atomically."""
    from .model import load_rosa_model
    from .train import load_model_and_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model, tokenizer = load_model_and_tokenizer(model_section, for_training=False)
    model = load_rosa_model(model, adapter)
    merged = merge_to_dense(model, DTYPES[dtype])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if requantize:
            _warn_requantization_error(merged)
            from transformers import BitsAndBytesConfig

            merged.config.quantization_config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
            ).to_dict()
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@torch.no_grad()
def nf4_roundtrip_error(weight: torch.Tensor) -> float:
    """Relative Frobenius error of quantizing ``weight`` to NF4 (double quant) and back."""
    import bitsandbytes.functional as bnbf

    w = weight.float().contiguous()
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    back = bnbf.dequantize_4bit(packed, state).float()
    return float((back - w).norm() / w.norm().clamp_min(1e-12))


def _warn_requantization_error(model: nn.Module) -> None:
    errors = [nf4_roundtrip_error(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m.weight.numel()]
    if errors:
        logger.warning(
            "requantizing to NF4 is lossy: measured relative weight error mean %.3f, max %.3f over %d layers; "
            "the merged adapter's effect is partly lost. Omit --requantize for the lossless bf16/fp32 merge.",
            sum(errors) / len(errors), max(errors), len(errors),
        )
