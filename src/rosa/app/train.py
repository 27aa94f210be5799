"""The training job behind ``rosa train``: load, adapt, run the RoSA schedule, checkpoint, evaluate.

A plain PyTorch loop (not ``transformers.Trainer``) so that a checkpoint captures exactly what an
uninterrupted run would have in memory: adapter, optimizer, LR schedule, RNG, data position and the RoSA
schedule's restart snapshot. ``--resume`` after Ctrl-C or a killed process therefore reaches the same final
adapter as a run that was never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from .. import distributed
from .batches import CausalLMCollator, LengthGroupedBatchSampler, tokenize_examples
from .checkpoint import load_checkpoint, restore_optimizer
from .data import Example, load_examples, split_rows, synthetic_splits
from .evaluate import (
    generate_responses,
    heldout_loss_sums,
    max_new_tokens_for,
    response_token_count,
    score_predictions,
    summed_response_loss,
)
from .run_config import DataSection, ModelSection, RunConfig, RunConfigError, load_run_config
from .run_folder import (
    CheckpointSaver,
    GracefulStop,
    RunError,
    append_jsonl,
    check_process_count,
    check_resume_settings,
    prepare_output,
    restore_rng,
    run_folder_lock,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

GENERIC_TASKS = {"jsonl": "generic", "csv": "generic", "generic": "generic"}


# --------------------------------------------------------------------------------------------- loading


def load_model_and_tokenizer(
    section: ModelSection, for_training: bool = True, device: torch.device | str | None = None
):
    """A causal LM and its tokenizer from a hub id, a local path or the built-in default, on ``device``
    (default: the CPU). ``trust_remote_code`` is passed explicitly (``model.trust_remote_code``, false by default),
    so transformers never prompts, and never runs a model folder's own Python files unless the user said so."""
    import os

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .default_model import resolve_model_path

    path = resolve_model_path(section.name)
    # transformers would block forever on a FIFO in the folder (config.json, a weight file, ...)
    if os.path.isdir(path):
        for entry in os.scandir(path):
            if not (entry.is_file() or entry.is_dir()):
                raise RunError(
                    f"model {section.name!r}: {entry.path} is not a regular file (a FIFO, socket, device or broken "
                    "link); refusing to read the folder"
                )
    remote = {"trust_remote_code": section.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(path, **remote)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise RunError(
                f"model {section.name!r} ships its own Python code (auto_map in its config), which rosa runs only "
                "with model.trust_remote_code=true"
            ) from None
        reason = (str(e).strip().splitlines() or [""])[0]
        raise RunError(f"model {section.name!r} not found or not a transformers model: {reason}") from None
    custom = section.trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not custom:
        raise RunError(
            f"model {section.name!r} is a {config.model_type!r} model, not a causal language model"
        )
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if section.dtype not in dtypes:
        raise RunConfigError(f"model.dtype must be float32 or bfloat16, got {section.dtype!r}")
    kwargs: dict[str, Any] = {"dtype": dtypes[section.dtype], **remote}
    if section.load_in_4bit:
        from ..merge import nf4_config

        kwargs["quantization_config"] = nf4_config()
    if device is not None and torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}  # 4-bit weights are quantized on the way to the GPU
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **remote)
    if section.load_in_4bit and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=section.gradient_checkpointing
        )
    elif section.gradient_checkpointing and for_training:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, tokenizer


# the run-config keys that choose the generic task's columns, named in missing-column errors
COLUMN_SETTINGS = {"prompt": "data.prompt_column", "response": "data.response_column"}


def load_task_examples(section: DataSection) -> tuple[str, list[Example], list[Example]]:
    """(metric task name, train examples, held-out examples) for the configured data."""
    task = GENERIC_TASKS.get(section.task, section.task)
    if task == "synthetic" and section.path is None:
        train, held_out = synthetic_splits(seed=section.split_seed)
    else:
        if section.path is None:
            raise RunConfigError(f"data.path is required for task {section.task!r}")
        column_map = None
        if task == "generic":
            if not (section.prompt_column and section.response_column):
                raise RunConfigError(
                    "generic jsonl/csv data needs data.prompt_column and data.response_column"
                )
            column_map = {"prompt": section.prompt_column, "response": section.response_column}
        try:
            rows = load_examples(
                task, section.path, split="train", column_map=column_map, column_settings=COLUMN_SETTINGS
            )
            if section.eval_path is not None:
                held_out = load_examples(
                    task,
                    section.eval_path,
                    split="validation",
                    column_map=column_map,
                    column_settings=COLUMN_SETTINGS,
                )
                train = rows
            else:
                if len(rows) <= section.val_size:
                    raise RunConfigError(
                        f"{section.path} has {len(rows)} rows: data.val_size={section.val_size} leaves none to "
                        "train on (lower data.val_size, or give data.eval_path)"
                    )
                train, held_out = split_rows(rows, val_size=section.val_size, seed=section.split_seed)
        except (FileNotFoundError, KeyError) as e:
            raise RunError(str(e)) from None
    if section.train_size is not None:
        train = train[: section.train_size]
    if not train:
        raise RunError("no training examples")
    return task, train, held_out


# --------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    wall_seconds: float


def warmup_cosine(warmup: int, total: int):
    """LR factor per step: linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def collect_mask_only(run: RunConfig, mask_out: Path, show_progress: bool = True) -> Path:
    """``rosa mask``: warm-up and mask collection only; writes the mask file and nothing else."""
    from ..mask import default_stats

    config = run.rosa_config()
    if config.density == 0 and not any(config.density_pattern.values()):
        raise RunConfigError("rosa.density is 0 (plain LoRA): there is no sparse support to select")
    if not default_stats(config.mask_method):  # a data-free method: nothing to warm up for
        run.rosa = {**run.rosa, "warmup_steps": 0}
    train(run, show_progress=show_progress, mask_out=mask_out)
    return mask_out


def train(
    run: RunConfig,
    resume: bool = False,
    show_progress: bool = True,
    mask_out: Path | None = None,
    given_keys: list[str] | None = None,
) -> TrainResult:
    """Run (or resume) one training job; see the module docstring. With ``mask_out``, stop as soon as the mask
    is fixed, write it there, and write nothing else (no evaluation, no checkpoints, no run folder).

    Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) every process runs this function: the
    model is wrapped in DDP, each global batch of ``batch_size * world`` rows is split between the ranks, the
    loss is normalised by the global number of response tokens (so the gradient equals a single process's
    over the same global batch), evaluation is split between the ranks, and only rank 0 writes files.

    ``given_keys``: the settings the user gave explicitly (``section.key``); with ``resume`` each must equal the
    run's saved setting. The output folder is locked for the whole run (rank 0).
    """
    ctx = distributed.init_from_env()
    try:
        hold = mask_out is None and ctx.is_main
        with run_folder_lock(Path(run.output_dir)) if hold else contextlib.nullcontext():
            return _train(run, resume, show_progress, mask_out, ctx, given_keys or [])
    finally:
        distributed.close(ctx)


def _train(
    run: RunConfig,
    resume: bool,
    show_progress: bool,
    mask_out: Path | None,
    ctx: distributed.ProcessContext,
    given_keys: list[str],
) -> TrainResult:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..mask import collect_mask, save_mask
    from ..mask.schedule import RosaScheduler, needs_mask_before_training
    from ..model import get_rosa_model, sparse_parameter_count
    from ..optim import create_rosa_optimizer

    started = time.perf_counter()
    show_progress = show_progress and ctx.is_main
    out, checkpoint = prepare_output(run, resume) if mask_out is None else (Path(run.output_dir), None)
    distributed.barrier(ctx)  # every rank has checked the folder before rank 0 writes into it
    if checkpoint is not None:  # the run continues with the settings it was started with
        saved = load_run_config(out / "run_config.yaml")
        check_resume_settings(saved, run, given_keys)
        run = saved
    rosa_config = run.rosa_config()
    if run.train.mask_path is not None and not Path(run.train.mask_path).is_file():
        raise RunConfigError(f"train.mask_path: no mask file at {run.train.mask_path}")
    task, train_examples, held_out = load_task_examples(run.data)
    torch.manual_seed(run.train.seed)
    model, tokenizer = load_model_and_tokenizer(run.model, device=ctx.device)
    if run.eval.limit is not None:
        held_out = held_out[: run.eval.limit]

    before = None
    state: dict[str, Any] = {}
    if checkpoint is not None:
        tensors, state = load_checkpoint(checkpoint)
        check_process_count(state, ctx)
        before = state.get("before")
    elif run.eval.before and held_out and mask_out is None:
        before = evaluate_heldout(
            model, tokenizer, held_out, task, run, "before training", show_progress, ctx
        )

    if mask_out is None and ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if checkpoint is None and mask_out is None and ctx.is_main:
        write_text_atomic(out / "run_config.yaml", yaml.safe_dump(run.to_dict(), sort_keys=False))

    model = get_rosa_model(model, rosa_config)
    if any(p.device != ctx.device for p in model.parameters()):  # (4-bit models are placed at load time)
        model.to(ctx.device)
    features = tokenize_examples(train_examples, tokenizer, run.data.max_length)
    sampler = LengthGroupedBatchSampler(
        [len(f["input_ids"]) for f in features],
        run.train.batch_size * ctx.world,
        seed=run.train.seed,
        drop_last=ctx.distributed,  # every rank needs rows in every step
    )
    if len(sampler) == 0:
        raise RunError(
            f"{len(features)} training examples cannot fill one global batch of "
            f"{run.train.batch_size} rows x {ctx.world} processes"
        )
    collate = CausalLMCollator(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = create_rosa_optimizer(
        model, lr=run.train.lr, sparse_lr_ratio=run.train.sparse_lr_ratio, weight_decay=run.train.weight_decay
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(run.train.lr_warmup_steps, run.train.steps)
    )

    start_step = 0
    if checkpoint is not None:
        adapter = load_file(checkpoint / "adapter_model.safetensors")
        set_peft_model_state_dict(model, adapter)
        restore_optimizer(optimizer, tensors, state)
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        sampler.load_state_dict(state["sampler"])
        restore_rng(tensors, ctx)
        start_step = int(state["step"])
    trained = distributed.wrap_ddp(model, ctx)
    mask_path = mask_out if mask_out is not None else out / "mask.safetensors"
    start_mask = run.train.mask_path if checkpoint is None and start_step == 0 else None
    if checkpoint is None and start_mask is None and needs_mask_before_training(model, rosa_config):
        # sparse-only: score the mask on the run's own first batches before step 0 (nothing trains without it)
        first = [
            collate([features[i] for i in distributed.shard(batch, ctx)])
            for batch in sampler.batches(0)[: rosa_config.mask_steps]
        ]
        collect_mask(model, first, lambda m, b: summed_response_loss(m, b, ctx.device), config=rosa_config)
        if ctx.is_main:
            save_mask(model, mask_path, method=rosa_config.mask_method)
        if mask_out is not None:
            return TrainResult(str(mask_out), 0, None, None, time.perf_counter() - started)
    schedule = RosaScheduler(
        trained,
        rosa_config,
        start_step=start_step,
        save_mask_path=None if start_mask is not None else mask_path,
        mask_path=start_mask,
        optimizer=optimizer,
        rewarmup_steps=run.train.lr_warmup_steps if rosa_config.rewarmup_steps is None else None,
    )
    if mask_out is not None and schedule.mask_ready:
        schedule.close()
        return TrainResult(str(mask_out), 0, None, None, time.perf_counter() - started)
    if checkpoint is not None:
        prefix = "snapshot."
        schedule.load_state_dict(
            {
                "mask_fixed_step": state.get("mask_fixed_step"),
                "snapshot": {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
            }
        )

    counts = sparse_parameter_count(model)
    logger.info("trainable parameters: %s", counts)
    writer = _tensorboard(out / "tensorboard") if mask_out is None and ctx.is_main else None
    saver = CheckpointSaver(out, model, optimizer, lr_scheduler, sampler, schedule, run, ctx)
    batches = iter(sampler)
    bar = tqdm(
        total=run.train.steps, initial=start_step, desc="training", unit="step", disable=not show_progress
    )
    trained.train()
    step = start_step
    with GracefulStop() as stop:
        try:
            while step < run.train.steps:
                tick = time.perf_counter()
                micro = []
                for _ in range(run.train.grad_accum):
                    batch = next(batches, None)
                    if batch is None:
                        batches = iter(sampler)
                        batch = next(batches)
                    micro.append(collate([features[i] for i in distributed.shard(batch, ctx)]))
                global_targets, global_tokens = distributed.all_reduce_sum(
                    [
                        sum(response_token_count(m["labels"]) for m in micro),
                        sum(int(m["attention_mask"].sum()) for m in micro),
                    ],
                    ctx,
                )
                loss_sum = 0.0
                for i, inputs in enumerate(micro):
                    last = i == len(micro) - 1
                    with contextlib.nullcontext() if last or not ctx.distributed else trained.no_sync():
                        loss = summed_response_loss(trained, inputs, ctx.device) / max(global_targets, 1.0)
                        (loss * ctx.world).backward()  # DDP averages gradients over ranks: undo its 1/world
                    schedule.micro_batch_end()
                    loss_sum += loss.item()
                if run.train.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, run.train.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step(optimizer)
                step += 1
                if mask_out is not None and schedule.mask_ready:
                    bar.close()
                    return TrainResult(str(mask_out), step, None, None, time.perf_counter() - started)
                loss_sum = distributed.all_reduce_sum([loss_sum], ctx)[0]
                lr = lr_scheduler.get_last_lr()[0]
                rate = global_tokens / (time.perf_counter() - tick)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}", phase=schedule.phase
                )
                if writer is not None:
                    writer.add_scalar("train/loss", loss_sum, step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/tokens_per_s", rate, step)
                saved = False
                if mask_out is None:
                    if ctx.is_main and (step % run.train.log_every == 0 or step == run.train.steps):
                        append_jsonl(
                            out / "log.jsonl",
                            {"step": step, "loss": loss_sum, "lr": lr, "phase": schedule.phase},
                        )
                    saved = (
                        step % run.train.save_every == 0
                        and step < run.train.steps
                        and schedule.phase != "collect"
                    )
                    if saved:
                        saver.save(step, before)
                if step < run.train.steps and stop.requested_everywhere(ctx):
                    if mask_out is None and schedule.phase != "collect" and not saved:
                        saver.save(step, before)
                    elif schedule.phase == "collect" and ctx.is_main:
                        print(
                            "rosa: stopped during mask collection: no checkpoint of this step",
                            file=sys.stderr,
                        )
                    raise KeyboardInterrupt
        except KeyboardInterrupt:  # a graceful stop has checkpointed; a second signal stops without one
            bar.close()
            schedule.close()
            raise
    bar.close()
    schedule.close()
    if writer is not None:
        writer.close()

    if ctx.is_main:
        final = out / "adapter"
        tmp = out / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    after = (
        evaluate_heldout(model, tokenizer, held_out, task, run, "after training", show_progress, ctx)
        if held_out
        else None
    )
    result = TrainResult(str(out), step, before, after, time.perf_counter() - started)
    if ctx.is_main:
        summary = {**result.__dict__, "trainable": counts, "schedule_events": schedule.events, "task": task}
        write_text_atomic(out / "results.json", json.dumps({**summary, "processes": ctx.world}, indent=2))
    distributed.barrier(ctx)  # nobody leaves (and tears the group down) before rank 0 has written
    return result


def evaluate_heldout(
    model,
    tokenizer,
    examples,
    task: str,
    run: RunConfig,
    label: str,
    show_progress: bool = True,
    ctx: distributed.ProcessContext | None = None,
) -> dict[str, Any]:
    """Exact match and held-out loss; with several processes each scores a share and the results are merged."""
    from torch.utils.data import DataLoader

    ctx = ctx or distributed.ProcessContext()
    mine = distributed.shard(list(examples), ctx)
    predictions = generate_responses(
        model,
        tokenizer,
        [e.prompt for e in mine],
        max_new_tokens=max_new_tokens_for(task, run.eval.max_new_tokens),
        batch_size=run.eval.batch_size,
        show_progress=show_progress,
    )
    features = tokenize_examples(mine, tokenizer, run.data.max_length)
    loader = DataLoader(features, batch_size=run.eval.batch_size, collate_fn=CausalLMCollator(tokenizer))
    total, count = heldout_loss_sums(model, loader)
    predictions = [p for share in distributed.gather_objects(predictions, ctx) for p in share]
    total, count = distributed.all_reduce_sum([total, count], ctx)
    result = score_predictions(examples, predictions, task, run.eval.max_new_tokens)
    result["heldout_loss"] = total / count if count else math.nan
    result["label"] = label
    return result


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(path))
