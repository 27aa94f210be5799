"""RosaTrainerCallback: what ``transformers.Trainer`` can tell the schedule that the model cannot see itself.

Without it, a RoSA model under Trainer already runs the whole schedule (:mod:`rosa.schedule.core`). The callback
adds Trainer's knowledge: its LR warm-up (the re-warm-up's default), its first batches (a sparse-only model
scores its mask on them before step 0 instead of in the first steps), its checkpoints (each gets a
``rosa_schedule.safetensors`` with the restart snapshot and the mask's step, read back by
``train(resume_from_checkpoint=...)``), and under ``torchrun`` / ``accelerate launch`` the support buffers kept
out of DDP's buffer broadcast (every rank sets the same mask itself). The schedule is ``callback.scheduler``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import TrainerCallback

from ..distributed import support_buffer_names
from ..mask.layers import MaskError
from .core import RosaSchedule
from .state import SCHEDULE_FILE, load_schedule_state, save_schedule_state

logger = logging.getLogger(__name__)


# RosaSchedule's keywords that belong to whoever drives it (the step it starts at, the optimizer, the trainer's
# warm-up, its name); the others are the user's choice (user_options()), which the callback passes on.
DRIVER_OPTIONS = ("start_step", "optimizer", "lr_warmup_steps", "started_by")


def user_options() -> tuple[str, ...]:
    """The keyword options of :class:`RosaSchedule` a user chooses (the callback takes the same)."""
    import inspect

    parameters = inspect.signature(RosaSchedule.__init__).parameters.values()
    return tuple(p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in DRIVER_OPTIONS)


class RosaTrainerCallback(TrainerCallback):
    """Creates the model's :class:`RosaSchedule` from Trainer's state at ``on_train_begin``; the keyword
    arguments are :class:`RosaSchedule`'s."""

    def __init__(self, config: Any = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(user_options()))
        if unknown:
            raise TypeError(
                f"RosaTrainerCallback got {', '.join(unknown)}: it takes RosaSchedule's options "
                f"({', '.join(user_options())})"
            )
        self.config = config
        self.options = options
        self.scheduler: RosaSchedule | None = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # Trainer wraps the model in DDP later, in train(): keep the support buffers out of its buffer sync.
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
        self.scheduler = RosaSchedule(
            model,
            self.config,
            start_step=state.global_step,
            optimizer=optimizer,
            lr_warmup_steps=args.get_warmup_steps(state.max_steps) if state.max_steps else None,
            started_by="RosaTrainerCallback",
            **self.options,
        )
        if state.global_step == 0 and train_dataloader is not None and self.options.get("mask_path") is None:
            with torch.random.fork_rng(devices=[]):  # the training order stays what it would have been
                first = [b for _, b in zip(range(self.scheduler.mask_steps), train_dataloader)]
            self.scheduler.score_before_training(first)
        if state.global_step > 0:  # resumed: the restart snapshot and mask step come from the checkpoint
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", SCHEDULE_FILE)
            if os.path.isfile(path):
                self.scheduler.load_state_dict(load_schedule_state(path))
            # a checkpoint from elsewhere: its optimizer carries the mask's step (and the schedule warns if a
            # restart is still to come)
            elif not self.scheduler.resume_from_optimizer(optimizer):
                logger.warning(
                    "resumed at step %d without %s or the schedule's counters in the optimizer: the re-warm-up "
                    "does not go on, and a later restart returns A and B to their values at resume",
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
