"""Mistakes a PEFT user makes in the first hour, each caught where it is made: with an error or a warning that
says what to do, or handled the way PEFT's LoRA handles it."""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stdout

import pytest
import torch
from helpers import TokenData, logits_of, sample_ids, set_random_masks, word_llama
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import rosa
from rosa import AdapterFileError, RosaConfig, RosaConfigError
from rosa.masks import MaskError, collect_mask, mask_layers
from rosa.scheduler import RosaScheduler, RosaTrainerCallback

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**kw) -> RosaConfig:
    return RosaConfig(task_type="CAUSAL_LM", **{"r": 4, "lora_alpha": 8, "density": 0.05, **kw})


def test_sparse_only_with_a_lora_warmup_is_refused_at_once():
    with pytest.raises(RosaConfigError, match=r"r=0 .* warmup_steps=2 would train nothing"):
        _config(r=0, warmup_steps=2)
    _config(r=0, warmup_steps=0)  # fine: the mask is scored before the first step


def test_sparse_only_schedule_without_a_mask_says_how_to_get_one():
    model = rosa.get_rosa_model(word_llama(0), _config(r=0))
    with pytest.raises(MaskError, match="score the mask before training"):
        RosaScheduler(model)


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


def test_printed_trainable_parameters_are_the_budget_not_the_allocation():
    """Global allocation allocates up to twice each layer's budget (the budget moves between layers): what
    trains is the budget, and that is what print_trainable_parameters reports."""
    layer_model = rosa.get_rosa_model(word_llama(0), _config())
    global_model = rosa.get_rosa_model(word_llama(0), _config(mask_allocation="global"))
    counts = [m.get_nb_trainable_parameters() for m in (layer_model, global_model)]
    assert counts[0] == counts[1]
    lora = sum(p.numel() for n, p in layer_model.named_parameters() if ".rosa_A." in n or ".rosa_B." in n)
    budget = sum(
        round(0.05 * layer.out_features * layer.in_features) for layer in mask_layers(layer_model).values()
    )
    assert counts[0][0] == lora + budget
    out = io.StringIO()
    with redirect_stdout(out):
        global_model.print_trainable_parameters()
    assert f"trainable params: {lora + budget:,d}" in out.getvalue()


def _trainer(model, tmp_path, callbacks):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=callbacks)


def _schedule_warnings(record) -> list:
    return [w for w in record if "no schedule to choose one" in str(w.message)]


def test_trainer_without_the_callback_warns_once_with_the_fix(tmp_path):
    model = rosa.get_rosa_model(word_llama(0), _config(warmup_steps=1, mask_steps=1))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _trainer(model, tmp_path, []).train()
    found = _schedule_warnings(record)
    assert len(found) == 1 and "callbacks=[rosa.scheduler.RosaTrainerCallback()]" in str(found[0].message)
    model = rosa.get_rosa_model(word_llama(0), _config(warmup_steps=1, mask_steps=1))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _trainer(model, tmp_path, [RosaTrainerCallback()]).train()
    assert not _schedule_warnings(record)


def test_no_schedule_warning_for_a_mask_collected_before_training():
    model = rosa.get_rosa_model(word_llama(0), _config())
    ids = sample_ids()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.train()
        collect_mask(model, [{"input_ids": ids, "labels": ids}])
        model(input_ids=ids, labels=ids).loss.backward()
    assert not _schedule_warnings(record)


def test_trainer_callback_scores_a_sparse_only_mask_from_the_first_batches(tmp_path):
    model = rosa.get_rosa_model(word_llama(0), _config(r=0, mask_steps=2))
    values = [layer.rosa_values["default"] for layer in mask_layers(model).values()]
    before = [v.detach().clone() for v in values]
    callback = RosaTrainerCallback()
    _trainer(model, tmp_path, [callback]).train()
    assert callback.scheduler.events[0]["event"] == "mask_present"
    assert all(layer.nnz("default") > 0 for layer in mask_layers(model).values())
    assert any(not torch.equal(v, b) for v, b in zip(values, before))


def test_transformers_load_adapter_fails_with_what_to_call_instead(tmp_path):
    model = rosa.get_rosa_model(word_llama(0), _config())
    set_random_masks(model, seed=1)
    model.save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match=r"PeftModel.from_pretrained\(model, path\)"):
        word_llama(0).load_adapter(str(tmp_path))
