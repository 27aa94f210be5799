"""RoSA as a PEFT model: wrapping, logits against an independent dense reference, merging, disabling, several
adapters and gradient checkpointing, on a tiny random LLaMA.

The tiny models, random masks and the dense reference come from ``helpers``.
"""

from __future__ import annotations

import copy
import re

import peft
import pytest
import torch
from helpers import (
    PEFT_PREFIX,
    assert_close,
    linear_names,
    logits_of,
    reference_model,
    rosa_llama,
    sample_ids,
    set_random_masks,
    word_llama,
)
from peft import PeftModelForCausalLM
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType
from peft.utils.other import AuxiliaryTrainingWrapper
from transformers import LlamaForCausalLM

import rosa
from rosa import RosaConfig, RosaLayer, RosaModel

pytestmark = pytest.mark.usefixtures("one_thread")


# --- wrapping -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["rosa", "peft"])
def test_wrapping_returns_a_peft_causal_lm(wrap, capsys):
    config = RosaConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, density=0.05)
    base = word_llama()
    expected_names = {PEFT_PREFIX + n for n in linear_names(base)}
    model = rosa.get_rosa_model(base, config) if wrap == "rosa" else peft.get_peft_model(base, config)

    assert isinstance(model, PeftModelForCausalLM)
    assert isinstance(model.base_model, RosaModel)
    assert model.peft_type is PeftType.ROSA and model.peft_config["default"].peft_type == "ROSA"
    assert set(rosa.rosa_layers(model)) == expected_names  # 'all-linear': every projection, not lm_head

    counts = rosa.sparse_parameter_count(model)
    assert counts["sparse_active"] == 0  # no mask yet
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".rosa_" in n for n in trainable)
    assert sum(trainable.values()) == counts["lora"] + counts["sparse_capacity"]
    assert counts["sparse_capacity"] == sum(
        round(0.05 * layer.out_features * layer.in_features) for layer in rosa.rosa_layers(model).values()
    )

    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    numbers = [int(x.replace(",", "")) for x in re.findall(r"params: ([\d,]+)", printed)]
    total = sum(p.numel() for p in model.parameters())
    assert numbers == [sum(trainable.values()), total], printed
    assert model.get_nb_trainable_parameters() == (sum(trainable.values()), total)


def test_get_rosa_model_refuses_other_configs():
    with pytest.raises(TypeError, match="RosaConfig"):
        rosa.get_rosa_model(word_llama(), peft.LoraConfig(r=2))


# --- forward against the dense reference, disabling ----------------------------------------------------------


def test_logits_match_dense_reference_and_disable_gives_base():
    model = rosa_llama()
    masks = set_random_masks(model, fill=0.8)
    ids = sample_ids()
    base_logits = logits_of(word_llama(), ids)

    logits = logits_of(model, ids)
    assert_close(
        logits, logits_of(reference_model(model, word_llama, "default", masks), ids), "RoSA vs dense"
    )
    assert (logits - base_logits).abs().max() > 1e-3  # the adapter really changes the output

    with model.disable_adapter():
        assert torch.equal(logits_of(model, ids), base_logits)
    assert torch.equal(logits_of(model, ids), logits)  # re-enabled on exit


def test_before_the_mask_the_adapter_is_lora_only():
    model = rosa_llama()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in rosa.rosa_layers(model).values():
            layer.rosa_B["default"].weight.copy_(
                torch.randn(layer.rosa_B["default"].weight.shape, generator=g) * 0.1
            )
            layer.rosa_values["default"].fill_(1.0)  # allocated but not in use: must not matter
    assert all(layer.nnz("default") == 0 for layer in rosa.rosa_layers(model).values())
    ids = sample_ids()
    assert_close(
        logits_of(model, ids), logits_of(reference_model(model, word_llama, "default", None), ids), "LoRA"
    )

    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        if "rosa_values" in name:
            assert param.grad is None or not param.grad.any(), name
        elif param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


# --- merging ------------------------------------------------------------------------------------------------


def test_merge_and_unload_matches_unmerged():
    model = rosa_llama()
    set_random_masks(model)
    ids = sample_ids()
    unmerged = logits_of(model, ids)
    merged = model.merge_and_unload()
    assert type(merged) is LlamaForCausalLM
    assert not any(isinstance(m, RosaLayer) for m in merged.modules())
    assert_close(logits_of(merged, ids), unmerged, "merge_and_unload")


@pytest.mark.parametrize(
    "extra, merged_first",
    [({}, True), ({"modules_to_save": ["norm"]}, False), ({"trainable_token_indices": [3, 7]}, False)],
    ids=["already_merged", "modules_to_save", "trainable_tokens"],
)
def test_merge_to_dense_gives_the_adapted_model_and_saves_as_a_plain_one(tmp_path, extra, merged_first):
    """``rosa merge``'s fold: a layer merged already adds nothing twice; the trained copy of a module_to_save
    and the trained token rows are what the plain model holds; it saves and reloads as an ordinary checkpoint
    with the adapted model's logits (PEFT's own merge_and_unload is the reference)."""
    from rosa.merge import merge_to_dense

    config = rosa.RosaConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, density=0.05, **extra)
    model = rosa_llama(config)
    set_random_masks(model)
    torch.manual_seed(1)
    with torch.no_grad():  # move every trainable tensor off its initial value, the non-RoSA ones included
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    ids = sample_ids()
    expected = logits_of(model, ids)
    if merged_first:
        model.merge_adapter()
    dense = merge_to_dense(model, torch.float32)
    assert not any(
        isinstance(m, (RosaLayer, BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in dense.modules()
    )
    assert not hasattr(dense, "peft_config") and not dense._forward_pre_hooks
    assert_close(logits_of(dense, ids), expected, "merge_to_dense")
    dense.save_pretrained(tmp_path / "dense")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "dense")
    assert_close(logits_of(reloaded, ids), expected, "reloaded")


def test_merge_adapter_then_unmerge_restores_the_base_weights():
    model = rosa_llama()
    set_random_masks(model)
    ids = sample_ids()
    layers = rosa.rosa_layers(model)
    originals = {name: layer.get_base_layer().weight.detach().clone() for name, layer in layers.items()}
    unmerged = logits_of(model, ids)

    model.merge_adapter()
    assert all(layer.merged for layer in layers.values())
    assert all(not torch.equal(layers[n].get_base_layer().weight, w) for n, w in originals.items())
    assert_close(logits_of(model, ids), unmerged, "merged")

    model.unmerge_adapter()
    assert not any(layer.merged for layer in layers.values())
    for name, weight in originals.items():
        torch.testing.assert_close(layers[name].get_base_layer().weight, weight, rtol=0, atol=1e-6, msg=name)
    assert_close(logits_of(model, ids), unmerged, "unmerged again")


def test_unload_returns_the_untouched_base_model():
    model = rosa_llama()
    set_random_masks(model)
    ids = sample_ids()
    plain = model.unload()
    assert type(plain) is LlamaForCausalLM
    assert torch.equal(logits_of(plain, ids), logits_of(word_llama(), ids))


# --- several adapters ---------------------------------------------------------------------------------------


def test_two_adapters_switch_and_delete():
    model = rosa_llama()
    masks_a = set_random_masks(model, "default", seed=1)
    ids = sample_ids()
    logits_a = logits_of(model, ids)

    second = RosaConfig(
        task_type="CAUSAL_LM", r=2, lora_alpha=4, density=0.1, target_modules=["q_proj", "down_proj"]
    )
    model.add_adapter("second", second)
    layers = rosa.rosa_layers(model)
    assert sum("second" in layer.rosa_values for layer in layers.values()) == 4  # 2 layers x 2 modules
    masks_b = set_random_masks(model, "second", seed=2)
    assert model.active_adapter == "default"
    assert torch.equal(logits_of(model, ids), logits_a)  # adding an adapter does not change the active one

    model.set_adapter("second")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second" in n for n in trainable)
    logits_b = logits_of(model, ids)
    assert_close(logits_b, logits_of(reference_model(model, word_llama, "second", masks_b), ids), "second")
    assert (logits_b - logits_a).abs().max() > 1e-3

    model.set_adapter("default")
    assert torch.equal(logits_of(model, ids), logits_a)
    assert_close(logits_a, logits_of(reference_model(model, word_llama, "default", masks_a), ids), "default")

    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"]
    for layer in layers.values():
        for attr in (
            *RosaLayer.adapter_layer_names,
            "rosa_row_offsets",
            "rosa_col_idx",
            "rosa_t_perm",
            "capacity",
        ):
            assert "second" not in getattr(layer, attr), attr
    assert torch.equal(logits_of(model, ids), logits_a)


# --- gradient checkpointing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["spmm", "fold"])
def test_gradient_checkpointing_gives_the_same_gradients(strategy):
    config = RosaConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, density=0.05, sparse_strategy=strategy)
    ids = sample_ids()

    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        model = rosa_llama(copy.deepcopy(config))
        set_random_masks(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        calls = [0]
        first = next(iter(rosa.rosa_layers(model).values()))
        first.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, calls[0]

    plain, plain_calls = grads(False)
    checkpointed, checkpointed_calls = grads(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # checkpointing really recomputed the layer
    assert plain.keys() == checkpointed.keys()
    assert any("rosa_values" in n for n in plain)
    for name, grad in plain.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert_close(checkpointed[name], grad, name, tol=1e-5)


@pytest.mark.parametrize("strategy", ["spmm", "fold"])
def test_trains_under_bf16_autocast(strategy):
    """Trainer/SFTTrainer with bf16=True run the forward under autocast (SFTConfig's default, on CPU too): the
    sparse ops must keep their own dtypes, and the fp32 adapter gets fp32 gradients close to the fp32 ones."""
    config = RosaConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, density=0.05, sparse_strategy=strategy)
    ids = sample_ids()
    grads = {}
    for autocast in (False, True):
        model = rosa_llama(copy.deepcopy(config))
        set_random_masks(model)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads[autocast] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads[True].items():
        assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        reference = grads[False][name]
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), reference.flatten(), dim=0)
        assert cosine > 0.95, (name, cosine.item())  # bf16 activations: same direction, not the same bits
