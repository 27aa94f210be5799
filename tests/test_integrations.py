"""The pinned set (constraints.txt) works with its own integrations, and our calls raise no FutureWarning.

transformers' own PEFT integration (``model.add_adapter(LoraConfig(...))``) checks the installed PEFT version:
a transformers too new for the pinned PEFT breaks it for every user of the set. The checks run on whatever is
installed; in the project's venv (scripts/setup.sh) that is exactly constraints.txt.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_llama

import rosa


@pytest.fixture
def future_warnings_fail():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        yield


def test_transformers_add_adapter_with_a_lora_config(future_warnings_fail):
    model = tiny_llama(0)
    model.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert names and all(("q_proj" in n) or ("v_proj" in n) for n in names)
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with_adapter = model(ids).logits
    model.disable_adapters()
    assert not torch.allclose(with_adapter, model(ids).logits)  # the adapter is in the forward


@pytest.mark.parametrize(
    "config",
    [
        rosa.RosaConfig(r=2, density=0.05, task_type="CAUSAL_LM"),
        LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    ],
    ids=["rosa", "lora"],
)
def test_get_peft_model_raises_no_future_warning(config, future_warnings_fail):
    model = get_peft_model(tiny_llama(0), config)
    model.print_trainable_parameters()
    assert model.peft_config["default"] is config
