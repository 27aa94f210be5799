"""RosaTrainerCallback: the RoSA schedule inside ``transformers.Trainer``."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from transformers import TrainerCallback

from ..distributed import support_buffer_names
from .collect import collect_mask
from .layers import MaskError, model_config, resolve_adapter
from .schedule import (
    SCHEDULE_FILE,
    RosaScheduler,
    load_schedule_state,
    needs_mask_before_training,
    save_schedule_state,
)
from .selection import Method

logger = logging.getLogger(__name__)


class RosaTrainerCallback(TrainerCallback):
    """Runs :class:`RosaScheduler` inside ``transformers.Trainer``.

    Under ``torchrun`` / ``accelerate launch`` nothing changes: Trainer's DDP gets the support buffers marked
    as not to be synchronised (``on_init_end``), and the mask statistics are all-reduced across ranks.
    The scheduler is created at ``on_train_begin``; the end of every micro-batch (``on_substep_end``) and
    optimizer step (``on_step_end``) drive it. The re-warm-up after a mid-run mask defaults to Trainer's own
    LR warm-up (``warmup_steps`` / ``warmup_ratio``). Every Trainer checkpoint gets a ``rosa_schedule.safetensors``
    (the restart snapshot and the step the mask was fixed at), which ``train(resume_from_checkpoint=...)`` reads
    back from ``output_dir/checkpoint-N``. The scheduler is ``callback.scheduler`` (its ``events`` record the
    phase changes).
    """

    def __init__(
        self,
        config: Any = None,
        *,
        adapter_name: str | None = None,
        method: Method | None = None,
        stats: Iterable[str] | None = None,
        accumulator_dtype: torch.dtype = torch.float32,
        mask_path: str | os.PathLike | None = None,
        save_mask_path: str | os.PathLike | None = None,
        rewarmup_steps: int | None = None,
    ) -> None:
        self.config = config
        self.rewarmup_steps = rewarmup_steps
        self.kwargs = {
            "adapter_name": adapter_name,
            "method": method,
            "stats": stats,
            "accumulator_dtype": accumulator_dtype,
            "mask_path": mask_path,
            "save_mask_path": save_mask_path,
        }
        self.scheduler: RosaScheduler | None = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # Trainer wraps the model in DDP later, in train(): keep the support buffers out of its buffer sync
        # (every rank sets the same mask itself). A no-op outside DDP.
        if model is not None:
            from torch.nn.parallel import DistributedDataParallel

            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, support_buffer_names(model)
            )

    def on_train_begin(
        self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs
    ):
        if model is None:
            raise MaskError("RosaTrainerCallback needs the model (Trainer passes it to callbacks)")
        rewarmup = self.rewarmup_steps
        config = self.config
        if config is None:
            config = model_config(model, resolve_adapter(model, self.kwargs["adapter_name"]))
        if rewarmup is None and getattr(config, "rewarmup_steps", None) is None:
            rewarmup = args.get_warmup_steps(state.max_steps) if state.max_steps else None
        first_run = (
            state.global_step == 0 and self.kwargs["mask_path"] is None and train_dataloader is not None
        )
        if first_run and needs_mask_before_training(
            model, config, self.kwargs["adapter_name"], self.kwargs["method"]
        ):
            with torch.random.fork_rng(devices=[]):  # the training order stays what it would have been
                first = [batch for _, batch in zip(range(int(config.mask_steps)), train_dataloader)]
            collect_mask(
                model,
                first,
                config=config,
                method=self.kwargs["method"],
                adapter_name=self.kwargs["adapter_name"],
            )
        self.scheduler = RosaScheduler(
            model,
            config,
            start_step=state.global_step,
            optimizer=optimizer,
            rewarmup_steps=rewarmup,
            **self.kwargs,
        )
        if state.global_step > 0:  # resumed: the restart snapshot and mask step come from the checkpoint
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", SCHEDULE_FILE)
            if os.path.isfile(path):
                self.scheduler.load_state_dict(load_schedule_state(path))
            else:
                logger.warning(
                    "resumed at step %d without %s: a later restart returns A and B to their values at resume, "
                    "and a re-warm-up in progress is not continued",
                    state.global_step,
                    path,
                )

    def on_substep_end(self, args, state, control, **kwargs):
        if self.scheduler is not None:
            self.scheduler.micro_batch_end()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.scheduler is not None:
            self.scheduler.step(optimizer)

    def on_save(self, args, state, control, **kwargs):
        if self.scheduler is not None and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                save_schedule_state(self.scheduler, os.path.join(folder, SCHEDULE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        if self.scheduler is not None:
            self.scheduler.close()
