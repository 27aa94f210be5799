"""The pieces of a ``rosa train`` run that the step loop (``rosa.app.train``) uses: set-up (model, data,
optimizer, LR schedule, the RoSA schedule, a resumed checkpoint), one optimizer step over its micro-batches,
and the held-out evaluation.

Under ``torchrun`` / ``accelerate launch`` every process builds the same job: the model is wrapped in DDP, each
global batch of ``batch_size * world`` rows is split between the ranks, and the loss is normalised by the global
number of response tokens (so the gradient equals a single process's over the same global batch).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from .batches import CausalLMCollator, LengthGroupedBatchSampler, tokenize_examples
from .checkpoint import load_checkpoint, restore_optimizer, restore_rng
from .data import Example
from .evaluate import response_token_count, summed_response_loss
from .run_config import RunConfig, RunConfigError, lr_warmup
from .run_folder import RunError, check_process_count

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything one process holds for a run."""

    run: RunConfig
    ctx: distributed.ProcessContext
    task: str
    held_out: list[Example]
    model: Any  # the PEFT model
    trained: Any  # what runs forward: the PEFT model, or DDP around it
    tokenizer: Any
    features: list[dict[str, list[int]]]
    sampler: LengthGroupedBatchSampler
    collate: CausalLMCollator
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    schedule: Any  # rosa.schedule.RosaSchedule
    start_step: int = 0
    before: dict[str, Any] | None = None  # the held-out scores before training (kept across a resume)
    past_events: list[dict[str, Any]] = field(default_factory=list)  # the schedule's events before a resume
    _batches: Any = None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def events(self) -> list[dict[str, Any]]:
        """The schedule's events over the whole run, a resume included."""
        return self.past_events + self.schedule.events

    def micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the next ``grad_accum`` global batches (a new epoch starts when one ends)."""
        micro = []
        for _ in range(self.run.train.grad_accum):
            batch = next(self._batches, None) if self._batches is not None else None
            if batch is None:
                self._batches = iter(self.sampler)
                batch = next(self._batches)
            rows = distributed.shard(batch, self.ctx)
            micro.append(self.collate([self.features[i] for i in rows]))
        return micro

    def train_step(self, micro: list[dict[str, torch.Tensor]]) -> tuple[float, float, int]:
        """Forward and backward over the micro-batches, then one optimizer step: (loss, grad norm, tokens)."""
        ctx = self.ctx
        targets, tokens = distributed.all_reduce_sum(
            [
                sum(response_token_count(m["labels"]) for m in micro),
                sum(int(m["attention_mask"].sum()) for m in micro),
            ],
            ctx,
        )
        loss_sum = 0.0
        for i, inputs in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last or not ctx.distributed else self.trained.no_sync():
                loss = summed_response_loss(self.trained, inputs, ctx.device) / max(targets, 1.0)
                (loss * ctx.world).backward()  # DDP averages gradients over ranks: undo its 1/world
            self.schedule.micro_batch_end()
            loss_sum += loss.item()
        norm = self.run.train.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, norm if norm > 0 else math.inf)
        self.optimizer.step()  # the RoSA schedule advances inside (rosa.schedule.hooks)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return distributed.all_reduce_sum([loss_sum], ctx)[0], float(grad_norm), int(tokens)


def build(
    run: RunConfig,
    ctx: distributed.ProcessContext,
    checkpoint: Path | None,
    mask_path: Path | None,
    evaluate_before: Any = None,
) -> Job:
    """Load the data and model, adapt it, build the optimizer and schedules, and restore ``checkpoint``.

    ``mask_path``: where the schedule writes the mask once fixed (None: nowhere). ``evaluate_before(model,
    tokenizer, held_out, task)`` scores the base model when the run starts fresh."""
    from ..model import get_rosa_model
    from ..optim import create_rosa_optimizer
    from ..schedule import RosaSchedule
    from .loading import load_model_and_tokenizer, load_task_examples, warmup_cosine

    rosa_config = run.rosa_config()
    start_mask = run.train.mask_path if checkpoint is None else None
    if start_mask is not None and not Path(start_mask).is_file():
        raise RunConfigError(f"train.mask_path: no mask file at {start_mask}")
    task, train_examples, held_out = load_task_examples(run.data)
    if run.eval.limit is not None:
        held_out = held_out[: run.eval.limit]
    torch.manual_seed(run.train.seed)
    model, tokenizer = load_model_and_tokenizer(run.model, device=ctx.device)
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    before = None
    if checkpoint is not None:
        tensors, state = load_checkpoint(checkpoint)
        check_process_count(state, ctx)
        before = state.get("before")
    elif evaluate_before is not None and held_out:
        before = evaluate_before(model, tokenizer, held_out, task)
    model = get_rosa_model(model, rosa_config)
    model.peft_config[model.active_adapter].base_model_name_or_path = run.model.name  # as the user named it
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
    optimizer = create_rosa_optimizer(
        model,
        lr=run.train.lr,
        sparse_lr_ratio=rosa_config.sparse_lr_ratio,
        weight_decay=run.train.weight_decay,
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(lr_warmup(run.train), run.train.steps)
    )
    start_step = 0
    if checkpoint is not None:
        _load_adapter(model, checkpoint)
        restore_optimizer(optimizer, tensors, state)
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        factor = warmup_cosine(lr_warmup(run.train), run.train.steps)  # an extended run: its new length
        lr_scheduler.lr_lambdas = [factor] * len(optimizer.param_groups)
        sampler.load_state_dict(state["sampler"])
        restore_rng(tensors, ctx)
        start_step = int(state["step"])
    trained = distributed.wrap_ddp(model, ctx)
    schedule = RosaSchedule(
        trained,
        rosa_config,
        start_step=start_step,
        optimizer=optimizer,
        mask_path=start_mask,
        save_mask_path=None if start_mask is not None else mask_path,
        lr_warmup_steps=lr_warmup(run.train),
        started_by="rosa train",
    )
    collate = CausalLMCollator(tokenizer)
    if checkpoint is not None:
        from ..schedule.state import snapshot_from

        schedule.load_state_dict(
            {"mask_fixed_step": state.get("mask_fixed_step"), "snapshot": snapshot_from(tensors)}
        )
    else:  # sparse only: the mask from the run's own first batches, before step 0
        first = [
            collate([features[i] for i in distributed.shard(batch, ctx)])
            for batch in sampler.batches(0)[: rosa_config.mask_steps]
        ]
        schedule.score_before_training(first, lambda m, b: summed_response_loss(m, b, ctx.device))
    return Job(
        run=run,
        ctx=ctx,
        task=task,
        held_out=held_out,
        model=model,
        trained=trained,
        tokenizer=tokenizer,
        features=features,
        sampler=sampler,
        collate=collate,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        schedule=schedule,
        start_step=start_step,
        before=before,
        past_events=list(state.get("schedule_events", [])),
    )


def _load_adapter(model: Any, checkpoint: Path) -> None:
    """A checkpoint's adapter goes through the same file checks as any adapter folder a user gives."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..serialization import check_adapter_folder

    check_adapter_folder(checkpoint)
    set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
