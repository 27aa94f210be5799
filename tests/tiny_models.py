"""The tiny random LLaMA most tests train: real architecture, a fraction of a second per step."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}


def tiny_llama_config(**overrides) -> LlamaConfig:
    """``TINY_LLAMA`` with ``overrides`` (e.g. a real tokenizer's vocabulary and special tokens)."""
    return LlamaConfig(**{**TINY_LLAMA, **overrides})


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A freshly initialised model: the same weights for the same ``seed`` and ``overrides``."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides))
