"""The file formats users hold: an adapter folder and a mask file written by an earlier version of rosa
(``tests/fixtures``, see ``make_fixtures.py``) load into a fresh model and give the logits they gave then, and
saving them again writes the same tensors (bitwise: tensors are stored, not computed).

The logits were recorded on another machine: a different CPU (Intel or AMD) may pick other kernels and round the
last bits differently, so they are compared within fp32 rounding, never bitwise. The adapter's own effect on the
logits is checked to be far above that tolerance, so a wrong or missing adapter still fails."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from fixtures.make_fixtures import ADAPTER, LOGITS, MASK, SEED, config
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import tiny_llama

import rosa
from rosa.masks import load_mask, save_mask


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread, as when the logits were written: the same reduction order where the CPU allows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# torch.testing's fp32 defaults: a few units in the last place, the spread seen between Intel and AMD CPUs
FP32_RTOL, FP32_ATOL = 1.3e-6, 1e-5


def _expected() -> dict[str, torch.Tensor]:
    return load_file(LOGITS)


@pytest.mark.parametrize("loader", ["peft", "rosa"])
def test_saved_adapter_gives_the_same_logits(loader):
    base = tiny_llama(SEED).eval()
    if loader == "peft":
        model = PeftModel.from_pretrained(base, ADAPTER)
    else:
        model = rosa.load_rosa_model(base, ADAPTER)
    expected = _expected()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
        with model.disable_adapter():
            base_logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=FP32_RTOL, atol=FP32_ATOL)
    # the adapter moves the logits by far more than the tolerance: the comparison above can fail
    assert (expected["logits"] - base_logits).abs().max() > 1000 * FP32_ATOL


def test_saved_adapter_is_written_again_unchanged(tmp_path):
    model = PeftModel.from_pretrained(tiny_llama(SEED).eval(), ADAPTER)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    original = load_file(ADAPTER / "adapter_model.safetensors")
    assert saved.keys() == original.keys()
    for key, tensor in original.items():
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key
    written, kept = (
        json.loads((folder / "adapter_config.json").read_text()) for folder in (tmp_path, ADAPTER)
    )
    # target_modules is a set in memory: PEFT writes it in no fixed order
    assert set(written.pop("target_modules")) == set(kept.pop("target_modules"))
    # fields added since the fixture was written appear with their defaults, which is what the old file means
    defaults = {f.name: f.default for f in dataclasses.fields(rosa.RosaConfig)}
    added = {k: written.pop(k) for k in set(written) - set(kept)}
    assert added == {k: defaults[k] for k in added}
    assert written == kept


def test_saved_mask_loads_as_the_adapter_support_and_is_written_again_unchanged(tmp_path):
    model = rosa.get_rosa_model(tiny_llama(SEED).eval(), config())
    load_mask(model, MASK)
    adapter = load_file(ADAPTER / "adapter_model.safetensors")
    for name, layer in rosa.rosa_layers(model).items():
        key = name.removeprefix("base_model.model.")
        support = layer.support("default")
        assert torch.equal(support.row_offsets, adapter[f"base_model.model.{key}.rosa_row_offsets"].int())
        assert torch.equal(support.col_idx, adapter[f"base_model.model.{key}.rosa_col_idx"].int())
    save_mask(model, tmp_path / "mask.safetensors", method="fisher")
    saved, original = load_file(tmp_path / "mask.safetensors"), load_file(MASK)
    assert saved.keys() == original.keys()
    for key, tensor in original.items():
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key
    with safe_open(tmp_path / "mask.safetensors", "pt") as a, safe_open(MASK, "pt") as b:
        assert a.metadata() == b.metadata()
