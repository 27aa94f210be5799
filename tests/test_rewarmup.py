"""The fresh learning-rate warm-up of what starts when the mask is fixed mid-run (RosaConfig.rewarmup_steps):
the update it applies, step by step, against a plain SGD step at the expected rate; under an LR scheduler, under
transformers.Trainer (its own optimizer, where the schedule also applies the sparse rate), and across a resume in
the middle of the ramp (plain loop and Trainer checkpoints). The schedule scales updates, never the optimizer's
rates: outside and inside ``optimizer.step()`` the groups hold the LR scheduler's own values."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TokenData, lora_weights, make_batches, rosa_config, sparse_values, wrap_rosa
from tiny_models import tiny_llama
from transformers import Trainer, TrainerCallback, TrainingArguments

import rosa
from rosa.masks import MaskError
from rosa.optim import LORA_GROUP, SPARSE_GROUP, create_rosa_optimizer
from rosa.schedule import schedule_of
from rosa.scheduler import JOINT, RosaScheduler, RosaTrainerCallback, load_schedule_state

pytestmark = pytest.mark.usefixtures("one_thread")


def _optimizer(model, optimizer_cls=torch.optim.SGD, **kw):
    """create_rosa_optimizer works on any module: name the groups the way a PEFT model's would be."""
    return create_rosa_optimizer(model, optimizer_cls, **kw)


def _measured_rate(before: torch.Tensor, after: torch.Tensor, grad: torch.Tensor) -> float:
    """The rate a plain SGD step used: ``(before - after) . g / g . g``."""
    g = grad.flatten()
    return float((before - after).flatten() @ g / (g @ g))


def _rates(params, before, grads) -> float:
    rates = [
        _measured_rate(before[id(p)], p.detach(), grads[id(p)])
        for p in params
        if grads[id(p)].abs().sum() > 0
    ]
    return sum(rates) / len(rates)


@pytest.mark.parametrize("restart", [True, False])
def test_each_step_after_the_mask_moves_at_the_ramped_rate(restart):
    """SGD: the update is -rate * grad, so the rate each parameter really used is measured exactly."""
    model = wrap_rosa(tiny_llama())
    opt = _optimizer(model, lr=0.1, sparse_lr_ratio=4.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - 0.05 * step)
    cfg = rosa_config(warmup_steps=2, mask_steps=1, restart_after_mask=restart, rewarmup_steps=4)
    sched = RosaScheduler(model, cfg)
    used = []  # per step after the mask: (step, rate of B, rate of the sparse values, the groups' rates)
    for step, batch in enumerate(make_batches(9)):
        model(**batch).loss.backward()
        params = lora_weights(model) + sparse_values(model)
        before = {id(p): p.detach().clone() for p in params}
        grads = {id(p): p.grad.clone() for p in params if p.grad is not None}
        scheduled = {g["name"]: g["lr"] for g in opt.param_groups}
        opt.step()  # the schedule advances inside: the mask is fixed at the end of step 2 (3 steps done)
        assert {g["name"]: g["lr"] for g in opt.param_groups} == scheduled  # rates untouched
        if sched.mask_fixed_step is not None and step >= sched.mask_fixed_step:
            # B, not A: right after a restart B = 0, so A's gradient (and step) is too small to measure in fp32
            used.append(
                (
                    step,
                    _rates(lora_weights(model)[1::2], before, grads),
                    _rates(sparse_values(model), before, grads),
                    scheduled,
                )
            )
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        sched.step(opt)  # optional now: acknowledged, not a second step
        assert [g["lr"] for g in opt.param_groups] == lr_sched.get_last_lr()
    assert sched.mask_fixed_step == 3 and sched.optimizer_steps == 9
    fixed = next(e for e in sched.events if e["event"] == "mask_fixed")
    assert fixed["rewarmup"] == 4
    assert [u[0] for u in used] == list(range(3, 9))
    for k, (step, lora_rate, sparse_rate, scheduled) in enumerate(used):
        factor = min(1.0, (k + 1) / 4)
        assert sparse_rate == pytest.approx(scheduled[SPARSE_GROUP] * factor, rel=1e-4), step
        lora_factor = factor if restart else 1.0  # without restart A and B simply go on
        assert lora_rate == pytest.approx(scheduled[LORA_GROUP] * lora_factor, rel=1e-4), step
    assert sched.lr_factor == 1.0


def _sgd_steps(model, opt, sched, steps: int) -> None:
    """The loop a user writes, with the scheduler stepped after the optimizer."""
    for batch in make_batches(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step(opt)


def test_zero_rewarmup_and_mask_before_the_first_step_apply_no_ramp():
    model = wrap_rosa(tiny_llama())
    opt = _optimizer(model, lr=0.1)
    sched = RosaScheduler(model, rosa_config(warmup_steps=1, mask_steps=1, rewarmup_steps=0))
    _sgd_steps(model, opt, sched, 3)
    assert sched.mask_fixed_step == 2 and sched.lr_factor == 1.0
    # a data-free mask fixed before any step: the run's own LR warm-up covers it
    model = wrap_rosa(tiny_llama())
    sched = RosaScheduler(model, rosa_config(warmup_steps=0, mask_method="random", rewarmup_steps=5))
    assert sched.phase == JOINT and sched.mask_fixed_step is None and sched.lr_factor == 1.0


@pytest.mark.parametrize(("lr_warmup", "expected"), [(0, 3), (None, 3), (5, 5)])
def test_the_trainers_lr_warmup_is_the_ramp_unless_it_has_none(lr_warmup, expected):
    """``lr_warmup_steps`` as ``rosa train`` passes it: 0 (no LR warm-up) lends no length, and the ramp lasts as
    many optimizer steps as fixing the mask took (1 LoRA-only step + 2 collection steps)."""
    model = wrap_rosa(tiny_llama())
    opt = _optimizer(model, lr=0.1)
    sched = RosaScheduler(model, rosa_config(warmup_steps=1, mask_steps=2), lr_warmup_steps=lr_warmup)
    _sgd_steps(model, opt, sched, 4)
    assert sched.mask_fixed_step == 3 and sched.rewarmup_steps == expected
    assert sched.lr_factor == pytest.approx(2 / expected)  # the second step after the mask is next


def test_an_optimizer_without_the_rosa_parameters_is_refused():
    """FSDP1 without use_orig_params or DeepSpeed hold flattened copies: a restart would silently do nothing."""
    model = wrap_rosa(tiny_llama())
    stand_in = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([stand_in], lr=1e-3)
    sched = RosaScheduler(model, rosa_config(warmup_steps=0, mask_steps=1))
    model(**make_batches(1)[0]).loss.backward()
    with pytest.raises(MaskError, match="does not hold"):
        sched.step(opt)


def _run_plain(model, steps, *, state=None, start=0, batches):
    """A plain loop with AdamW + LambdaLR; returns what a checkpoint needs. ``state`` resumes from one."""
    opt = _optimizer(model, torch.optim.AdamW, lr=2e-2, sparse_lr_ratio=2.0, weight_decay=0.01)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    cfg = rosa_config(warmup_steps=2, mask_steps=2, restart_after_mask=True, rewarmup_steps=4)
    sched = RosaScheduler(model, cfg, start_step=start, optimizer=opt)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr"])
        sched.load_state_dict(state["schedule"])
    for batch in batches[start:steps]:
        model(**batch).loss.backward()
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        sched.step(opt)
    return {
        "optimizer": copy.deepcopy(opt.state_dict()),
        "lr": lr_sched.state_dict(),
        "schedule": copy.deepcopy(sched.state_dict()),
        "model": {k: v.clone() for k, v in model.state_dict().items()},
    }


@pytest.mark.parametrize(
    "stop", [2, 6]
)  # 2: before collection (snapshot needed); 6: in the middle of the ramp
def test_plain_loop_resume_reaches_the_same_adapter(stop):
    batches = make_batches(10)
    full = _run_plain(wrap_rosa(tiny_llama()), 10, batches=batches)
    first = _run_plain(wrap_rosa(tiny_llama()), stop, batches=batches)
    # a fresh process: a model with other initial A values, then the checkpoint's adapter and schedule state
    fresh = wrap_rosa(tiny_llama(seed=7))
    fresh.load_state_dict(first["model"])
    resumed = _run_plain(fresh, 10, state=first, start=stop, batches=batches)
    assert first["schedule"]["mask_fixed_step"] == (None if stop == 2 else 4)
    for name, value in full["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=1e-7, msg=name)


def _trainer(model, out, max_steps, callback, own_optimizer=False, warmup=3, **kw):
    opt = None if own_optimizer else create_rosa_optimizer(model, lr=1e-2, sparse_lr_ratio=3.5)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=max_steps,
        learning_rate=1e-2,
        warmup_steps=warmup,
        lr_scheduler_type="linear",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **kw,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=TokenData(),
        optimizers=(opt, None),
        callbacks=[callback],
    )


def _peft_rosa(adapter_seed=0):
    """The same base model every time; ``adapter_seed`` draws the initial A."""
    cfg = rosa.RosaConfig(r=4, lora_alpha=8, density=0.05, warmup_steps=2, mask_steps=2)
    base = tiny_llama(0, initializer_range=0.2)
    torch.manual_seed(adapter_seed)
    return rosa.get_rosa_model(base, cfg)


def test_trainer_puts_the_sparse_values_under_trainers_warmup_after_the_mask(tmp_path):
    """Trainer's own SGD (no rosa groups): the sparse values move at lr / 3.5 times the ramp, B at the ramp."""
    model = _peft_rosa()
    callback = RosaTrainerCallback()
    trainer = _trainer(model, tmp_path, 8, callback, save_strategy="no", optim="sgd", own_optimizer=True)
    steps = []

    def before_step(optimizer, args, kwargs):  # runs after rosa's global pre-hook: sees the plain state
        params = lora_weights(model)[1::2] + sparse_values(model)
        steps.append(
            {
                "lr": optimizer.param_groups[0]["lr"],
                "before": {id(p): p.detach().clone() for p in params},
                "grads": {id(p): p.grad.clone() for p in params if p.grad is not None},
            }
        )

    class Measure(TrainerCallback):  # after the whole step, rosa's global post-hook included
        def on_step_end(self, args, state, control, **kwargs):
            last = steps[-1]
            if (
                callback.scheduler.mask_fixed_step is not None
                and state.global_step > callback.scheduler.mask_fixed_step
            ):
                last["b"] = _rates(lora_weights(model)[1::2], last["before"], last["grads"])
                last["values"] = _rates(sparse_values(model), last["before"], last["grads"])

    trainer.add_callback(Measure())
    trainer.create_optimizer_and_scheduler(num_training_steps=8)
    trainer.optimizer.register_step_pre_hook(before_step)
    trainer.train()
    sched = callback.scheduler
    assert sched.rewarmup_steps == 3  # Trainer's own warm-up
    assert sched.mask_fixed_step == 4  # 2 LoRA-only steps + 2 collection micro-batches (one per step)
    measured = [s for s in steps if "values" in s]
    assert len(measured) == 4
    for k, step in enumerate(measured):
        factor = min(1.0, (k + 1) / 3)
        assert step["b"] == pytest.approx(step["lr"] * factor, rel=1e-4), k
        assert step["values"] == pytest.approx(step["lr"] * factor / 3.5, rel=1e-4), k


def test_a_trainer_without_lr_warmup_ramps_over_the_mask_steps_with_or_without_the_callback(tmp_path):
    """No LR warm-up to borrow: the re-warm-up is the steps it took to fix the mask on either path (it was no
    ramp at all with the callback), and both paths train the same adapter."""
    with_callback, without = _peft_rosa(), _peft_rosa()
    _trainer(with_callback, tmp_path / "a", 8, RosaTrainerCallback(), warmup=0, save_strategy="no").train()
    _trainer(without, tmp_path / "b", 8, TrainerCallback(), warmup=0, save_strategy="no").train()
    for model in (with_callback, without):
        schedule = schedule_of(model)
        assert schedule.mask_fixed_step == 4 and schedule.rewarmup_steps == 4
    expected = dict(without.named_parameters())
    for name, p in with_callback.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("resume_at", [2, 6])  # 2: before the mask (snapshot); 6: in the middle of the ramp
def test_trainer_resume_reaches_the_same_adapter(tmp_path, resume_at):
    full = _peft_rosa()
    _trainer(full, tmp_path / "full", 8, RosaTrainerCallback(), save_strategy="no").train()
    first = _peft_rosa()
    _trainer(first, tmp_path / "run", 8, RosaTrainerCallback(), save_strategy="steps", save_steps=2).train()
    saved = load_schedule_state(tmp_path / "run" / f"checkpoint-{resume_at}" / "rosa_schedule.safetensors")
    assert saved["mask_fixed_step"] == (None if resume_at == 2 else 4)
    assert bool(saved["snapshot"]) == (resume_at == 2)
    # a new process: other initial A values (the restart must use the checkpoint's snapshot, not these)
    again = _peft_rosa(adapter_seed=5)
    trainer = _trainer(again, tmp_path / "run", 8, RosaTrainerCallback(), save_strategy="no")
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{resume_at}"))
    expected = {n: p for n, p in full.named_parameters() if p.requires_grad}
    for name, p in again.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def _plain_trainer(model, out, **kw):
    """Trainer with its own AdamW and nothing of rosa's added: the schedule starts itself."""
    return _trainer(model, out, 8, callback=TrainerCallback(), own_optimizer=True, **kw)


def test_trainer_without_the_callback_resumes_in_the_ramp_where_it_stopped(tmp_path):
    """Resumed mid-ramp (step 6; mask fixed at 4), the model's own schedule takes the step counters Trainer
    restored with the optimizer: the sparse rate and the rest of the re-warm-up go on, and the run ends where the
    uninterrupted one does."""
    full = _peft_rosa()
    _plain_trainer(full, tmp_path / "full", save_strategy="no").train()
    first = _peft_rosa()
    _plain_trainer(first, tmp_path / "run", save_strategy="steps", save_steps=2).train()
    again = _peft_rosa(adapter_seed=5)
    _plain_trainer(again, tmp_path / "run", save_strategy="no").train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6")
    )
    schedule = schedule_of(again)
    assert schedule.mask_fixed_step == 4 and schedule.rewarmup_steps == 4
    expected = {n: p for n, p in full.named_parameters() if p.requires_grad}
    for name, p in again.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_callback_resumes_a_checkpoint_from_another_folder(tmp_path):
    """A checkpoint outside ``output_dir`` (its schedule file is not where the callback looks): the mask's step
    comes from the optimizer's counters, and the run ends where the uninterrupted one does."""
    full = _peft_rosa()
    _trainer(full, tmp_path / "full", 8, RosaTrainerCallback(), save_strategy="no").train()
    first = _peft_rosa()
    _trainer(first, tmp_path / "run", 8, RosaTrainerCallback(), save_strategy="steps", save_steps=6).train()
    moved = tmp_path / "elsewhere" / "checkpoint-6"
    moved.parent.mkdir()
    (tmp_path / "run" / "checkpoint-6").rename(moved)
    again = _peft_rosa(adapter_seed=5)
    callback = RosaTrainerCallback()
    _trainer(again, tmp_path / "other", 8, callback, save_strategy="no").train(
        resume_from_checkpoint=str(moved)
    )
    assert callback.scheduler.mask_fixed_step == 4
    expected = {n: p for n, p in full.named_parameters() if p.requires_grad}
    for name, p in again.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_resume_before_the_mask_without_the_schedules_state_says_what_the_restart_will_do(tmp_path, caplog):
    """Trainer without the callback, resumed at step 2 (before the mask): no snapshot of the initial A and B was
    saved, so the restart cannot return to them. The run goes on, and says so. (The schedule learns the step count
    at the first optimizer step, so the resumed step's micro-batch is not collected: the mask comes one step later
    than in the uninterrupted run; the callback's checkpoint file avoids both.)"""
    first = _peft_rosa()
    _plain_trainer(first, tmp_path / "run", save_strategy="steps", save_steps=2).train()
    again = _peft_rosa(adapter_seed=5)
    with caplog.at_level("WARNING", logger="rosa.schedule.core"):
        _plain_trainer(again, tmp_path / "run", save_strategy="no").train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2")
        )
    assert "before the mask was fixed" in caplog.text and "at the resume, not at the start" in caplog.text
    # the schedule learns the step count at the first optimizer step: collection starts at the next micro-batch
    assert schedule_of(again).mask_fixed_step == 5
