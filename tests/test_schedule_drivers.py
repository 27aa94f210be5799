"""The schedule's rules live in one place: ``rosa train``'s loop, ``transformers.Trainer`` with
``RosaTrainerCallback`` and a plain PyTorch loop, given the same model, data, optimizer and LR schedule, drive
the same warm-up, mask, restart, re-warm-up and sparse rate, and end on the same adapter."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli_train, training_args
from safetensors.torch import load_file

STEPS, BATCH, LR, LR_WARMUP = 10, 4, 5e-3, 2
ROSA = {  # LoRA-only warm-up, mask over two micro-batches, restart, re-warm-up, sparse values at lr / 2
    "r": 2,
    "lora_alpha": 4,
    "lora_dropout": 0.0,
    "density": 0.05,
    "target_modules": ["q_proj", "v_proj", "down_proj"],
    "warmup_steps": 2,
    "mask_steps": 2,
    "restart_after_mask": True,
    "rewarmup_steps": 3,
    "sparse_lr_ratio": 2.0,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Every row the same: each driver's batches are then the same whatever order it draws them in."""
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text((json.dumps({"question": "Say alpha beta gamma", "answer": "delta epsilon"}) + "\n") * 24)
    return path


def _section(data):
    from rosa.app.run_config import DataSection

    return DataSection(
        task="jsonl", path=str(data), prompt_column="question", response_column="answer", val_size=2
    )


def _fresh(model_dir):
    """The model as ``rosa train`` builds it (seed, then load, then adapt), its optimizer and LR schedule."""
    from rosa import RosaConfig, get_rosa_model
    from rosa.app.loading import load_model_and_tokenizer, warmup_cosine
    from rosa.app.run_config import ModelSection
    from rosa.optim import create_rosa_optimizer

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(ModelSection(name=str(model_dir)))
    model = get_rosa_model(model, RosaConfig(task_type="CAUSAL_LM", **ROSA))
    optimizer = create_rosa_optimizer(model, lr=LR, sparse_lr_ratio=ROSA["sparse_lr_ratio"])
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(LR_WARMUP, STEPS))
    return model, tokenizer, optimizer, lr_schedule


def _features(data, tokenizer):
    from rosa.app.batches import tokenize_examples
    from rosa.app.loading import load_task_examples

    _, train, _ = load_task_examples(_section(data))
    return tokenize_examples(train, tokenizer, 96)


def _saved(model, folder) -> dict[str, torch.Tensor]:
    model.save_pretrained(folder)
    return load_file(folder / "adapter_model.safetensors")


def _events(schedule_events) -> list[tuple]:
    return [(e["event"], e["optimizer_step"]) for e in schedule_events if e["event"] != "schedule_started"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_model_dir, data):
    tmp = tmp_path_factory.mktemp("cli")
    overrides = [f"rosa.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in ROSA.items()]
    code, out = cli_train(
        tmp, tiny_model_dir, "data.task=jsonl", f"data.path={data}", "data.prompt_column=question",
        "data.response_column=answer", "data.train_size=null", "data.val_size=2", f"train.steps={STEPS}",
        f"train.batch_size={BATCH}", f"train.lr={LR}", f"train.lr_warmup_steps={LR_WARMUP}", "eval.before=false",
        "train.save_every=100", *overrides,
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    return load_file(out / "adapter" / "adapter_model.safetensors"), _events(results["schedule_events"])


def test_a_plain_loop_ends_where_rosa_train_does(cli, tiny_model_dir, data, tmp_path):
    from rosa.app.batches import CausalLMCollator
    from rosa.schedule import schedule_of

    model, tokenizer, optimizer, lr_schedule = _fresh(tiny_model_dir)
    batch = CausalLMCollator(tokenizer)(_features(data, tokenizer)[:BATCH])
    model.train()
    for _ in range(STEPS):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
    _assert_same(_saved(model, tmp_path / "plain"), _events(schedule_of(model).events), cli)


def test_trainer_with_the_callback_ends_where_rosa_train_does(cli, tiny_model_dir, data, tmp_path):
    from transformers import Trainer

    from rosa.app.batches import CausalLMCollator
    from rosa.schedule import RosaTrainerCallback

    model, tokenizer, optimizer, lr_schedule = _fresh(tiny_model_dir)
    callback = RosaTrainerCallback()
    trainer = Trainer(
        model=model,
        args=training_args(
            tmp_path / "out", max_steps=STEPS, per_device_train_batch_size=BATCH, max_grad_norm=1.0
        ),
        train_dataset=_features(data, tokenizer),
        data_collator=CausalLMCollator(tokenizer),
        optimizers=(optimizer, lr_schedule),
        callbacks=[callback],
    )
    trainer.train()
    _assert_same(_saved(model, tmp_path / "trainer"), _events(callback.scheduler.events), cli)


def _assert_same(adapter, events, cli) -> None:
    expected, expected_events = cli
    assert events == expected_events
    assert ("mask_fixed", ROSA["warmup_steps"] + ROSA["mask_steps"]) in events
    assert adapter.keys() == expected.keys()
    for name, tensor in expected.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(adapter[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert torch.equal(adapter[name], tensor), name
