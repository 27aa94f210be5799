"""The RoSA schedule (rosa.scheduler): warm-up -> collection -> mask -> joint training, in a plain loop and in
transformers.Trainer, on a tiny random LLaMA."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    ADAPTER,
    TokenData,
    lora_weights,
    make_batches,
    rosa_config,
    sparse_values,
    supports,
    wrap_rosa,
)
from tiny_models import tiny_llama
from transformers import Trainer, TrainerCallback, TrainingArguments

from rosa.masks import MaskError, collect_mask, layer_budget, mask_layers
from rosa.scheduler import COLLECT, JOINT, WARMUP, RosaScheduler, RosaTrainerCallback, unwrap_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def train_loop(model, sched, optimizer, batches, *, accumulate: int = 1, on_step=None):
    """Plain PyTorch loop: `accumulate` micro-batches per optimizer step, sched.step() after each step."""
    model.train()
    it = iter(batches)
    step = 0
    while True:
        chunk = [b for _, b in zip(range(accumulate), it)]
        if len(chunk) < accumulate:
            return
        for b in chunk:
            (model(**b).loss / accumulate).backward()
        if on_step is not None:
            on_step(step, sched)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sched.step(optimizer)
        step += 1


# --- the parameter set and the frozen values --------------------------------------------------------------


def test_values_stay_frozen_until_the_mask_then_train():
    model = wrap_rosa(tiny_llama())
    cfg = rosa_config(warmup_steps=3, mask_steps=2, restart_after_mask=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    sched = RosaScheduler(model, cfg)
    vals = sparse_values(model)
    assert all(any(v is p for p in params) for v in vals)  # allocated and registered from the first step
    assert all(
        v.numel() == layer_budget(layer, ADAPTER) for v, layer in zip(vals, mask_layers(model).values())
    )
    phases = []

    def check(step, sched):
        phases.append(sched.phase)
        if sched.phase != JOINT:
            assert all(v.grad is None for v in vals), step
            assert all(torch.count_nonzero(v) == 0 for v in vals), step
            assert all(len(optimizer.state.get(v, {})) == 0 for v in vals), step
        else:
            assert all(v.grad is not None for v in vals)

    train_loop(model, sched, optimizer, make_batches(8), on_step=check)
    assert phases == [WARMUP] * 3 + [COLLECT] * 2 + [JOINT] * 3
    assert [(e["event"], e["optimizer_step"]) for e in sched.events if e["event"] != "schedule_started"] == [
        ("collect_start", 3),
        ("group_done", 4),  # during step 4, which ran the last micro-batch (with or without micro_batch_end)
        ("mask_fixed", 5),  # once step 4's update is taken
    ]
    # after the mask: values moved and AdamW holds state for them (3 joint steps)
    assert all(torch.count_nonzero(v) > 0 for v in vals)
    assert all(
        int(optimizer.state[v]["step"]) == 3 and optimizer.state[v]["exp_avg"].abs().sum() > 0 for v in vals
    )
    # the parameter set never changed
    assert [p for p in model.parameters() if p.requires_grad] == params


@pytest.mark.parametrize("restart", [True, False])
def test_restart_resets_lora_and_its_optimizer_state(restart):
    model = wrap_rosa(tiny_llama())
    initial = [p.detach().clone() for p in lora_weights(model)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = RosaScheduler(model, rosa_config(warmup_steps=2, mask_steps=1, restart_after_mask=restart))
    at_fix = {}

    def snapshot(step, sched):
        if step == 2:  # the step whose end fixes the mask (2 warm-up steps + 1 collection micro-batch)
            at_fix["before"] = [p.detach().clone() for p in lora_weights(model)]

    train_loop(model, sched, optimizer, make_batches(3), on_step=snapshot)
    assert sched.phase == JOINT and sched.events[-1]["event"] == "mask_fixed"
    assert sched.events[-1]["optimizer_step"] == 3
    if restart:
        assert all(torch.equal(p, p0) for p, p0 in zip(lora_weights(model), initial))  # exact initial values
        assert all(p not in optimizer.state for p in lora_weights(model))
    else:
        assert not all(torch.equal(p, p0) for p, p0 in zip(lora_weights(model), initial))
        assert all(int(optimizer.state[p]["step"]) == 3 for p in lora_weights(model))
    # one more step: a restarted optimizer state starts again at step 1
    b = make_batches(1, seed=5)[0]
    model(**b).loss.backward()
    optimizer.step()
    expected_step = 1 if restart else 4
    assert all(int(optimizer.state[p]["step"]) == expected_step for p in lora_weights(model))
    assert all(int(optimizer.state[v]["step"]) == 1 for v in sparse_values(model))


# --- collection inside training ---------------------------------------------------------------------------


@pytest.mark.parametrize("accumulate", [1, 2])
def test_in_loop_collection_equals_collect_mask_when_weights_do_not_move(accumulate):
    """With lr=0 the micro-batches seen during training give exactly the mask collect_mask computes offline."""
    base = wrap_rosa(tiny_llama())
    model = copy.deepcopy(base)
    batches = make_batches(2 + 4)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    sched = RosaScheduler(model, rosa_config(warmup_steps=2 // accumulate, mask_steps=4))
    train_loop(model, sched, optimizer, batches, accumulate=accumulate)
    assert sched.phase == JOINT
    assert sched.events[-1]["optimizer_step"] == 6 // accumulate
    # offline: the same micro-batches, each loss scaled as in the loop (a constant factor per batch)
    reference = collect_mask(base.train(), batches[2:], lambda m, b: m(**b).loss / accumulate)
    assert supports(model) == {n: s.flat_index().tolist() for n, s in reference.items()}


def test_memory_capped_groups_each_see_their_own_micro_batches():
    cfg = rosa_config(
        warmup_steps=1, mask_steps=2, mask_memory_budget=(2 * 4 * 64 * 32 + 4 * 4 * 64 * 32) / 2**30
    )
    base = wrap_rosa(tiny_llama())
    model = copy.deepcopy(base)
    batch = make_batches(1)[0]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    sched = RosaScheduler(model, cfg)
    groups = len(sched.builder.groups)
    assert groups > 2
    train_loop(model, sched, optimizer, [batch] * (1 + 2 * groups + 1))
    kinds = [e["event"] for e in sched.events]
    assert kinds == ["collect_start"] + ["group_done"] * groups + ["mask_fixed"]
    assert sched.events[-1]["optimizer_step"] == 1 + 2 * groups
    # the same batch everywhere and lr 0: the capped mask equals the offline one
    reference = collect_mask(base.train(), [batch, batch])
    assert supports(model) == {n: s.flat_index().tolist() for n, s in reference.items()}


def test_data_free_method_fixes_the_mask_at_the_end_of_warmup():
    model = wrap_rosa(tiny_llama())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = RosaScheduler(model, rosa_config(warmup_steps=2, mask_method="magnitude"))
    train_loop(model, sched, optimizer, make_batches(3))
    assert [(e["event"], e["optimizer_step"]) for e in sched.events if e["event"] != "schedule_started"] == [
        ("collect_start", 2),
        ("mask_fixed", 2),
    ]
    reference = collect_mask(wrap_rosa(tiny_llama()), method="magnitude", apply=False)
    assert supports(model) == {n: s.flat_index().tolist() for n, s in reference.items()}
    # no warm-up: the mask exists before the first step
    model = wrap_rosa(tiny_llama())
    assert RosaScheduler(model, rosa_config(warmup_steps=0, mask_method="random")).phase == JOINT
    assert all(layer.nnz(ADAPTER) > 0 for layer in mask_layers(model).values())


def test_user_callable_in_the_schedule():
    model = wrap_rosa(tiny_llama())
    seen = []

    def score(name, layer, stats):
        seen.append(stats["micro_batches"])
        return stats["grad"].abs()

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = RosaScheduler(model, rosa_config(warmup_steps=1, mask_steps=2), method=score, stats=("grad",))
    train_loop(model, sched, optimizer, make_batches(4))
    assert sched.phase == JOINT and seen == [2] * len(mask_layers(model))
    assert sched.events[-1]["method"].startswith("callable:")


def test_two_run_recipe_with_a_saved_mask(tmp_path):
    path = tmp_path / "mask.safetensors"
    model = wrap_rosa(tiny_llama())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = RosaScheduler(model, rosa_config(warmup_steps=1, mask_steps=2), save_mask_path=path)
    train_loop(model, sched, optimizer, make_batches(4))
    assert path.exists()
    # run 2: a fresh model starts from the saved mask, jointly, at step 0
    fresh = wrap_rosa(tiny_llama())
    sched2 = RosaScheduler(fresh, rosa_config(warmup_steps=5, mask_steps=2), mask_path=path)
    assert sched2.phase == JOINT and sched2.events[0]["event"] == "mask_loaded"
    assert supports(fresh) == supports(model)
    # a model that already has a mask (resumed run) starts joint as well
    assert RosaScheduler(fresh, rosa_config(warmup_steps=5)).phase == JOINT


def test_scheduler_needs_a_config_and_mask_steps():
    model = wrap_rosa(tiny_llama())
    with pytest.raises(MaskError, match="RosaConfig"):
        RosaScheduler(model)
    with pytest.raises(MaskError, match="mask_steps"):
        RosaScheduler(model, rosa_config(mask_steps=0))


# --- HF Trainer -------------------------------------------------------------------------------------------


def test_trainer_end_to_end(tmp_path):
    # initializer_range 0.2 instead of 0.02: with a frozen head of std 0.02 the logits cannot move far enough
    # for the loss to fall measurably.
    model = wrap_rosa(tiny_llama(initializer_range=0.2))
    cfg = rosa_config(warmup_steps=4, mask_steps=4, restart_after_mask=True)
    callback = RosaTrainerCallback(cfg)
    phase_at_step = {}
    lora_steps = {}

    class Spy(TrainerCallback):  # records the phase and the values at every optimizer step
        def on_step_end(self, args, state, control, **kwargs):
            vals = sparse_values(kwargs["model"])
            phase_at_step[state.global_step] = (
                callback.scheduler.phase,
                sum(int(v.count_nonzero()) for v in vals),
            )
            opt_state = unwrap_optimizer(kwargs["optimizer"]).state
            lora_steps[state.global_step] = {
                int(opt_state[p]["step"]) if p in opt_state else 0 for p in lora_weights(model)
            }

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=30,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[callback, Spy()])
    trainer.train()
    sched = callback.scheduler
    # warm-up: 4 optimizer steps; collection: 4 micro-batches = 2 optimizer steps (2 micro-batches each)
    assert [(e["event"], e["optimizer_step"]) for e in sched.events if e["event"] != "schedule_started"] == [
        ("collect_start", 4),
        ("group_done", 5),
        ("mask_fixed", 6),
    ]
    assert all(phase_at_step[s] == (WARMUP, 0) for s in range(1, 4))
    assert all(phase_at_step[s][1] == 0 for s in range(4, 7))  # values untouched until the mask
    assert all(phase_at_step[s][0] == JOINT and phase_at_step[s][1] > 0 for s in range(7, 31))
    # restart: the A/B optimizer state is dropped when the mask is fixed and starts again at step 1
    assert lora_steps[5] == {5} and lora_steps[6] == {0} and lora_steps[7] == {1}
    total = sum(layer_budget(layer, ADAPTER) for layer in mask_layers(model).values())
    assert sum(layer.nnz(ADAPTER) for layer in mask_layers(model).values()) == total
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 30
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.3, (first, last)


def test_the_callback_takes_the_schedules_own_options_and_refuses_others():
    from rosa.schedule.callback import DRIVER_OPTIONS, user_options

    callback = RosaTrainerCallback(rewarmup_steps=3, mask_path="mask.safetensors")
    assert callback.options == {"rewarmup_steps": 3, "mask_path": "mask.safetensors"}
    assert "mask_path" in user_options() and not set(DRIVER_OPTIONS) & set(user_options())
    for wrong in ("start_step", "optimizer", "mask_pth"):
        with pytest.raises(TypeError, match=wrong):
            RosaTrainerCallback(**{wrong: 1})


# --- the schedule's lifetime ------------------------------------------------------------------------------


def _trained_peft_model():
    """A PEFT RoSA model after one training step, its schedule started by the model itself."""
    import rosa

    model = rosa.get_rosa_model(tiny_llama(), rosa_config(task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    model(**make_batches(1)[0]).loss.backward()
    optimizer.step()
    return model


def test_a_model_no_longer_used_takes_its_schedule_with_it():
    import gc
    import weakref

    from rosa.schedule import schedule_of

    model = _trained_peft_model()
    assert schedule_of(model) is not None
    base, schedule = weakref.ref(model.get_base_model()), weakref.ref(schedule_of(model))
    del model
    gc.collect()
    assert base() is None and schedule() is None


def test_copies_of_a_model_carry_no_schedule_and_train_their_own():
    import pickle

    from rosa.schedule import schedule_of

    model = _trained_peft_model()
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert schedule_of(copied) is None and schedule_of(model) is not None
        copied(**make_batches(1)[0]).loss.backward()  # its own first training forward starts its own
        assert schedule_of(copied) not in (None, schedule_of(model))


def test_unloading_leaves_no_hook_of_rosas_on_the_plain_model():
    from rosa.schedule.auto import _before_base_forward

    model = _trained_peft_model()
    base = model.get_base_model()
    assert _before_base_forward in base._forward_pre_hooks.values()
    plain = model.merge_and_unload()
    assert plain is base and _before_base_forward not in plain._forward_pre_hooks.values()


def test_a_mask_file_scored_at_another_density_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    from rosa.masks import has_mask, save_mask

    scored = wrap_rosa(tiny_llama(), density=0.05)
    collect_mask(scored, make_batches(1))
    save_mask(scored, tmp_path / "mask.safetensors")
    model = wrap_rosa(tiny_llama(), density=0.1)
    with pytest.raises(MaskError, match="density"):
        RosaScheduler(model, rosa_config(density=0.1), mask_path=tmp_path / "mask.safetensors")
    assert not has_mask(model)


def test_scoring_before_training_reads_only_its_batches_and_scores_the_schedules_adapter():
    """Sparse-only: the mask is scored on the first mask_steps batches (the iterable is not drained) and set on
    the adapter the schedule was made for, even when another is active."""
    import rosa

    config = rosa_config(task_type="CAUSAL_LM", r=0, mask_steps=2)
    model = rosa.get_rosa_model(tiny_llama(), config)
    model.add_adapter("second", rosa_config(task_type="CAUSAL_LM", r=0, mask_steps=2))
    sched = RosaScheduler(model, model.peft_config["second"], adapter_name="second")

    def batches():
        yield from make_batches(2)
        raise AssertionError("read past mask_steps batches")

    assert sched.score_before_training(batches())
    layers = mask_layers(model, "second").values()
    assert all(layer.nnz("second") == layer.budget("second") > 0 for layer in layers)
    assert all(layer.nnz("default") == 0 for layer in layers)
