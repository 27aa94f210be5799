"""Merge a RoSA adapter into its base model, dequantizing a 4-bit base: a plain transformers model comes out.

For a 4-bit (QRoSA) base every NF4 weight is dequantized (the values the adapter was trained against), the
adapted ones get ``s * B @ A + S`` added, and the result holds ordinary ``nn.Linear`` layers in bf16/fp32,
loadable by transformers without rosa or bitsandbytes. (PEFT's ``merge_and_unload`` instead requantizes the
merged weight, and warns with the error that adds.) ``rosa merge`` saves the result (:mod:`rosa.app.merge`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .layer import RosaLayer


def is_4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 weight of a plain or bitsandbytes 4-bit linear layer rosa did not adapt, (out, in) (for an
    adapted one, ``RosaLayer.base_weight``)."""
    if is_4bit(module):
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

    Returns the underlying transformers model with plain ``nn.Linear`` layers and no quantization config. What
    PEFT wraps beside the RoSA layers (``modules_to_save``, ``trainable_token_indices``) is unwrapped as PEFT's own
    ``merge_and_unload`` does: the trained copy, the trained token rows. An adapter merged already
    (``merge_adapter()``) is in its layer's base weight and is not added again.
    """
    from peft.utils.other import AuxiliaryTrainingWrapper

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for module in base.modules():
        for child_name, child in module.named_children():
            if isinstance(child, AuxiliaryTrainingWrapper):
                unwrapped = child.unload_and_optionally_merge_module(
                    merge=True, safe_merge=False, adapter_names=None
                )
                replacements.append((module, child_name, unwrapped))
            elif isinstance(child, RosaLayer):
                inner = child.get_base_layer()
                weight = child.base_weight().float()
                for adapter in child.active_adapters:  # (one merged already is in the base weight)
                    if adapter in child.rosa_values and adapter not in child.merged_adapters:
                        weight = weight + child.get_delta_weight(adapter).to(weight.device)
                if child.fan_in_fan_out:  # keep GPT-2's Conv1D layout so the checkpoint stays loadable
                    inner.weight.data = weight.t().contiguous().to(dtype)
                    replacements.append((module, child_name, inner))
                else:
                    bias = inner.bias.detach().float() if inner.bias is not None else None
                    replacements.append((module, child_name, _dense_linear(weight, bias, dtype)))
            elif is_4bit(child):
                bias = child.bias.detach().float() if child.bias is not None else None
                replacements.append(
                    (module, child_name, _dense_linear(dequantized_weight(child), bias, dtype))
                )
    for parent, child_name, new in replacements:
        setattr(parent, child_name, new)
    if "peft_config" in vars(base):  # PEFT's copy of the adapter configs: the model holds no adapter any more
        del base.peft_config
    from .schedule.auto import remove_schedule_hook

    remove_schedule_hook(base)
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


def nf4_config(compute_dtype: torch.dtype = torch.bfloat16):
    """The QRoSA quantization: bitsandbytes NF4 with double quantization."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
