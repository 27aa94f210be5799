"""Mistakes a PEFT user makes in the first hour, each caught where it is made: with an error or a warning that
says what to do, or handled the way PEFT's LoRA handles it."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest
import torch
from helpers import TokenData, logits_of, sample_ids, set_random_masks, training_args, word_llama
from peft import LoraConfig, get_peft_model
from transformers import Trainer

import rosa
from rosa import AdapterFileError, RosaConfig, RosaConfigError
from rosa.masks import mask_layers
from rosa.scheduler import RosaTrainerCallback

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**kw) -> RosaConfig:
    return RosaConfig(task_type="CAUSAL_LM", **{"r": 4, "lora_alpha": 8, "density": 0.05, **kw})


def test_sparse_only_with_a_lora_warmup_is_refused_at_once():
    with pytest.raises(RosaConfigError, match=r"r=0 .* warmup_steps=2 would train nothing"):
        _config(r=0, warmup_steps=2)
    _config(r=0, warmup_steps=0)  # fine: the mask is scored before the first step


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_init_lora_weights_means_what_it_means_in_peft(init):
    """Same seed, same shapes: RoSA's A and B equal PEFT LoRA's for every initialisation both support."""
    torch.manual_seed(3)
    ours = rosa.get_rosa_model(word_llama(0), _config(init_lora_weights=init))
    torch.manual_seed(3)
    theirs = get_peft_model(
        word_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init)
    )
    a = {
        n.replace("rosa_", "lora_"): p
        for n, p in ours.named_parameters()
        if ".rosa_A." in n or ".rosa_B." in n
    }
    b = {n: p for n, p in theirs.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    zero_b = all(torch.count_nonzero(p) == 0 for n, p in a.items() if ".lora_B." in n)
    assert zero_b == (init is not False)


def test_unsupported_initialisations_are_refused():
    for init in ("pissa", "olora", "loftq", 1):
        with pytest.raises(RosaConfigError, match="init_lora_weights must be True, False or 'gaussian'"):
            _config(init_lora_weights=init)


def test_fan_in_fan_out_that_disagrees_with_the_layer_is_corrected_with_a_warning():
    ids = sample_ids()
    torch.manual_seed(0)
    plain = rosa.get_rosa_model(word_llama(0), _config(init_lora_weights=False))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"fan_in_fan_out=True but .* stores its weight as \(out, in\)"):
        wrong = rosa.get_rosa_model(word_llama(0), _config(init_lora_weights=False, fan_in_fan_out=True))
    assert torch.equal(logits_of(plain, ids), logits_of(wrong, ids))


def test_printed_trainable_parameters_are_the_same_whoever_wraps_the_model():
    """get_peft_model and rosa.get_rosa_model give the same PeftModel (no per-instance patching): with per-layer
    allocation the count is LoRA plus the sparse budget; with global allocation PEFT counts every allocated
    value (up to global_capacity_factor times a layer's budget), which rosa.sparse_parameter_count sets apart."""
    counts = []
    for wrap in (rosa.get_rosa_model, get_peft_model):
        counts.append(wrap(word_llama(0), _config()).get_nb_trainable_parameters())
    assert counts[0] == counts[1]
    model = rosa.get_rosa_model(word_llama(0), _config())
    lora = sum(p.numel() for n, p in model.named_parameters() if ".rosa_A." in n or ".rosa_B." in n)
    budget = sum(
        round(0.05 * layer.out_features * layer.in_features) for layer in mask_layers(model).values()
    )
    assert counts[0][0] == lora + budget
    out = io.StringIO()
    with redirect_stdout(out):
        model.print_trainable_parameters()
    assert f"trainable params: {lora + budget:,d}" in out.getvalue()
    global_model = rosa.get_rosa_model(word_llama(0), _config(mask_allocation="global"))
    capacity = rosa.sparse_parameter_count(global_model)["sparse_capacity"]
    assert capacity > budget and global_model.get_nb_trainable_parameters()[0] == lora + capacity


def _trainer(model, tmp_path, callbacks):
    args = training_args(tmp_path, max_steps=3, learning_rate=1e-3)
    return Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=callbacks)


def test_trainer_callback_scores_a_sparse_only_mask_from_the_first_batches(tmp_path):
    model = rosa.get_rosa_model(word_llama(0), _config(r=0, mask_steps=2))
    values = [layer.rosa_values["default"] for layer in mask_layers(model).values()]
    before = [v.detach().clone() for v in values]
    callback = RosaTrainerCallback()
    _trainer(model, tmp_path, [callback]).train()
    fixed = [e for e in callback.scheduler.events if e["event"] == "mask_fixed"]
    assert [e["optimizer_step"] for e in fixed] == [0]  # scored on the first batches, before any step
    assert all(layer.nnz("default") > 0 for layer in mask_layers(model).values())
    assert any(not torch.equal(v, b) for v, b in zip(values, before))


def test_transformers_load_adapter_fails_with_what_to_call_instead(tmp_path):
    model = rosa.get_rosa_model(word_llama(0), _config())
    set_random_masks(model, seed=1)
    model.save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match=r"PeftModel.from_pretrained\(model, path\)"):
        word_llama(0).load_adapter(str(tmp_path))
