"""The PEFT user's own recipes train the whole RoSA method with nothing added: ``SFTTrainer(peft_config=
RosaConfig())``, ``Trainer`` on ``get_peft_model(model, RosaConfig())`` and a plain loop each end with a fixed mask,
sparse values that moved at ``sparse_lr_ratio`` of the optimizer's step, and an adapter that reloads.

The reference for "moved at the ratio" is the same training with the sparse values in an optimizer group of
their own rate (``create_rosa_optimizer``), where the optimizer itself applies it: Trainer's own AdamW plus the
schedule's update scaling must land on the same adapter."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers import (
    VOCAB,
    TokenData,
    lora_weights,
    sample_ids,
    set_random_masks,
    sparse_values,
    training_args,
    word_llama,
)
from peft import PeftModel, PeftModelForCausalLM, get_peft_model
from tiny_models import tiny_llama, tiny_tokenizer
from transformers import Trainer, TrainingArguments

import rosa
from rosa import RosaConfig
from rosa.mask import mask_layers
from rosa.optim import create_rosa_optimizer
from rosa.schedule import JOINT, schedule_of

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
# fp32 rounding, amplified by Adam where a gradient is near zero (A right after the restart, while B = 0)
RTOL, ATOL = 1e-4, 5e-5


def _config(**kw) -> RosaConfig:
    base = {"task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "density": 0.05, "mask_steps": 2}
    return RosaConfig(**{**base, **kw})


def _args(tmp_path, **kw) -> TrainingArguments:
    settings = {"max_steps": STEPS, "learning_rate": 1e-2, "lr_scheduler_type": "constant", "seed": 0}
    return training_args(tmp_path, **{**settings, **kw})


def _model(seed: int = 0):
    torch.manual_seed(seed)  # the LoRA A init
    return get_peft_model(tiny_llama(0, initializer_range=0.2), _config())


def _trained(model, tmp_path, optimizers=(None, None)):
    Trainer(model=model, args=_args(tmp_path), train_dataset=TokenData(), optimizers=optimizers).train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_without_anything_added_runs_the_whole_schedule(tmp_path):
    model = _model()
    values = sparse_values(model)
    trained = _trained(model, tmp_path / "plain")
    schedule = schedule_of(model)
    assert schedule is not None and schedule.phase == JOINT
    events = [(e["event"], e["optimizer_step"]) for e in schedule.events]
    assert events[1:] == [("collect_start", 0), ("group_done", 1), ("mask_fixed", 2)]
    assert all(layer.nnz("default") == layer.budget("default") > 0 for layer in mask_layers(model).values())
    assert all(v.count_nonzero() > 0 for v in values)
    # the same run with the ratio applied by the optimizer's own groups: the same adapter
    reference = _model()
    optimizer = create_rosa_optimizer(reference, lr=1e-2)
    expected = _trained(reference, tmp_path / "grouped", (optimizer, None))
    assert trained.keys() == expected.keys()
    for name, p in trained.items():
        torch.testing.assert_close(p, expected[name], rtol=RTOL, atol=ATOL, msg=name)


def test_a_peft_model_without_task_type_runs_the_whole_schedule(tmp_path):
    """``get_peft_model(model, RosaConfig())`` (no task_type) is a plain PeftModel, whose forward calls the base
    model directly, past the tuner: the same adapter as with task_type, mask and sparse rate included."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(0, initializer_range=0.2), _config(task_type=None))
    assert type(model) is PeftModel
    trained = _trained(model, tmp_path / "plain")
    assert schedule_of(model) is not None and schedule_of(model).phase == JOINT
    expected = _trained(_model(), tmp_path / "causal")
    assert trained.keys() == expected.keys()
    for name, p in trained.items():
        torch.testing.assert_close(p, expected[name], rtol=RTOL, atol=ATOL, msg=name)


def test_the_ratio_is_what_moves_the_sparse_values(tmp_path):
    """Without the scaling (ratio 1) the values end elsewhere: the comparison above can fail."""
    trained = _trained(_model(), tmp_path / "a")
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(0, initializer_range=0.2), _config(sparse_lr_ratio=1.0))
    other = _trained(model, tmp_path / "b")
    values = [n for n in trained if "rosa_values" in n]
    assert values and all((trained[n] - other[n]).abs().max() > 100 * ATOL for n in values)


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])  # None: RosaConfig()'s own, a plain PeftModel
def test_sft_trainer_given_the_config_trains_rosa_and_the_adapter_reloads(tmp_path, task_type):
    from trl import SFTConfig, SFTTrainer

    tokenizer = tiny_tokenizer(VOCAB)
    texts = [" ".join(f"w{(i * 7 + j) % (VOCAB - 4)}" for j in range(10)) for i in range(16)]
    args = _args(tmp_path / "out").to_dict()
    args.update(max_length=16, bf16=False, output_dir=str(tmp_path / "out"))
    sft = SFTTrainer(
        model=word_llama(0),
        processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"text": texts}),
        peft_config=_config(task_type=task_type),
        args=SFTConfig(**{k: v for k, v in args.items() if k in SFTConfig.__dataclass_fields__}),
    )
    assert type(sft.model) is (PeftModel if task_type is None else PeftModelForCausalLM)
    values = [v.detach().clone() for v in sparse_values(sft.model)]
    sft.train()
    model = sft.model
    assert schedule_of(model).phase == JOINT
    assert all(layer.nnz("default") > 0 for layer in mask_layers(model).values())
    assert all(not torch.equal(v, b) for v, b in zip(sparse_values(model), values))
    sft.save_model(tmp_path / "adapter")
    ids = sample_ids()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(word_llama(0), tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


def _batch(data: TokenData, step: int) -> dict[str, torch.Tensor]:
    """Rows 4 * step .. 4 * step + 3 of ``data``, stacked."""
    rows = range(4 * step, 4 * step + 4)
    return {k: torch.stack([data[i][k] for i in rows]) for k in ("input_ids", "labels")}


def test_a_plain_loop_needs_no_driver():
    model = _model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    initial = [p.detach().clone() for p in lora_weights(model)]
    data = TokenData()
    model.train()
    for step in range(4):
        model(**_batch(data, step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1:  # the mask was fixed at this step's end: A and B are back at their initial values
            assert all(torch.equal(p, p0) for p, p0 in zip(lora_weights(model), initial))
    schedule = schedule_of(model)
    assert schedule.phase == JOINT and schedule.mask_fixed_step == 2
    assert schedule.rewarmup_steps == 2  # no trainer told it a warm-up: as many steps as the mask took


def test_sparse_only_without_a_mask_collects_while_nothing_trains():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(0), _config(r=0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = TokenData()
    model.train()
    for step in range(3):
        model(**_batch(data, step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        values = sparse_values(model)
        assert all(v.count_nonzero() == 0 for v in values) == (step < 2), step
    assert schedule_of(model).mask_fixed_step == 2


def _train_on_samples(model, optimizer, steps: int) -> None:
    """A plain loop: ``steps`` optimizer steps, each on its own seeded batch of ``sample_ids``."""
    model.train()
    for step in range(steps):
        ids = sample_ids(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_a_model_with_its_mask_trains_jointly_at_the_sparse_rate():
    """A model that has its mask already (set by hand, or an adapter loaded to train on) collects nothing: its
    schedule starts joint and applies the sparse values' rate, the same adapter as an optimizer holding them in a
    group at lr / ratio. (A resumed run is such a model: its sparse values must not jump to the full rate.)"""

    def run(grouped: bool):
        torch.manual_seed(0)
        model = rosa.get_rosa_model(word_llama(0), _config())
        set_random_masks(model, seed=1)
        masks = {n: layer.support("default").to_dense_mask() for n, layer in mask_layers(model).items()}
        params = [p for p in model.parameters() if p.requires_grad]
        plain = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        optimizer = create_rosa_optimizer(model, lr=1e-2) if grouped else plain
        _train_on_samples(model, optimizer, 3)
        for n, layer in mask_layers(model).items():
            assert torch.equal(layer.support("default").to_dense_mask(), masks[n]), n
        return model

    plain, grouped = run(False), run(True)
    schedule = schedule_of(plain)
    assert [e["event"] for e in schedule.events] == ["schedule_started", "mask_present"]
    assert schedule.phase == JOINT and schedule.mask_fixed_step is None
    expected = dict(grouped.named_parameters())
    for name, p in plain.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, expected[name], rtol=RTOL, atol=ATOL, msg=name)


def test_sparse_values_in_a_group_of_their_own_keep_its_rate():
    """A user who split the sparse values off into a group at lr / ratio set their rate: the schedule does not
    apply the ratio again (the same adapter as create_rosa_optimizer's named group)."""

    def run(optimizer_of):
        torch.manual_seed(0)
        model = rosa.get_rosa_model(word_llama(0), _config())
        set_random_masks(model, seed=1)
        optimizer = optimizer_of(model)
        _train_on_samples(model, optimizer, 3)
        return model

    def own_groups(model):
        values = sparse_values(model)
        rest = [p for p in model.parameters() if p.requires_grad and all(p is not v for v in values)]
        groups = [{"params": rest}, {"params": values, "lr": 1e-2 / 3.5}]
        return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.0)

    mine, reference = run(own_groups), run(lambda m: create_rosa_optimizer(m, lr=1e-2))
    expected = dict(reference.named_parameters())
    for name, p in mine.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, expected[name], rtol=RTOL, atol=ATOL, msg=name)


def test_frozen_sparse_values_start_no_schedule():
    """Values frozen by the user (only LoRA trains): no mask is chosen, nothing is refused, the values stay 0."""
    torch.manual_seed(0)
    model = rosa.get_rosa_model(word_llama(0), _config(warmup_steps=1, mask_steps=1))
    for v in sparse_values(model):
        v.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train_on_samples(model, optimizer, 4)
    assert schedule_of(model) is None
    assert all(v.count_nonzero() == 0 for v in sparse_values(model))
