"""The RoSA schedule: every rule of RoSA's training in one object, driven by the optimizer's own steps.

1. ``warmup_steps`` optimizer steps of LoRA-only training. The sparse values exist from the first step
   (allocated at capacity) but the support is empty, so they take no part in the forward, get no gradient and
   the optimizer neither updates nor weight-decays them, nor creates state for them.
2. The next ``mask_steps`` micro-batches of *ordinary training* are observed by hooks (LoRA keeps training;
   with ``r=0`` nothing trains meanwhile): each layer group (``RosaConfig.mask_memory_budget``) observes its own
   ``mask_steps`` micro-batches, one group after another. Data-free methods (``magnitude``, ``random``) skip this.
3. At the first optimizer step after the last group is complete the mask is selected and set. With
   ``restart_after_mask`` (the paper's best runs) A and B go back, in place, to their values when the schedule
   started, and the optimizer state of A, B and the sparse values is deleted: an Adam-type optimizer starts them
   afresh (step 0, zero moments) as a new optimizer would; no parameter appears or disappears.
4. What starts afresh re-warms up, as in the paper's second run: for ``rewarmup_steps`` optimizer steps its
   update is ``min(1, (k + 1) / rewarmup_steps)`` of the optimizer's (k counts the steps since the mask).
   ``rewarmup_steps`` is, in order: ``RosaConfig.rewarmup_steps``; the trainer's LR warm-up where the trainer
   tells rosa (``rosa train``, ``RosaTrainerCallback``, ``lr_warmup_steps=``) and has one; else as many optimizer
   steps as the run took to fix the mask.
5. Throughout, the sparse values move at ``1 / RosaConfig.sparse_lr_ratio`` of the optimizer's step (unless the
   optimizer already holds them in a group of their own rate: ``rosa.optim.create_rosa_optimizer``).

Steps 4 and 5 scale the update after ``optimizer.step()`` (see :mod:`rosa.schedule.optimizer`), never the
optimizer's rates, so any optimizer and LR scheduler keep their own values.

Who drives it: nobody needs to. Torch's global optimizer-step hooks advance it (:mod:`rosa.schedule.hooks`) and a
RoSA model starts its own at its first training forward (:mod:`rosa.schedule.auto`). ``RosaSchedule(model, ...)``
creates one explicitly (other options, a saved mask); ``RosaTrainerCallback`` does that from Trainer's arguments.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..distributed import is_main_process
from ..mask.builder import MaskBuilder
from ..mask.collect import collect_mask
from ..mask.files import load_mask, save_mask
from ..mask.layers import MaskError, apply_mask, has_mask, mask_layers, model_config, resolve_adapter
from ..mask.selection import Method, method_name
from . import optimizer as opt
from .conditions import check_mask_fills_budget, needs_mask_before_training
from .hooks import register

logger = logging.getLogger(__name__)

WARMUP, COLLECT, JOINT = "warmup", "collect", "joint"


class RosaSchedule:
    """The schedule of one RoSA model; see the module docstring.

    ``config`` defaults to the PEFT model's ``peft_config[adapter]``. ``method`` overrides
    ``config.mask_method`` (and may be a callable, see :mod:`rosa.mask.selection`); ``stats`` names the
    statistics a callable needs. ``start_step`` is the number of optimizer steps already done (a resumed run);
    ``lr_warmup_steps`` the trainer's own LR warm-up (the re-warm-up's default unless 0); ``rewarmup_steps``
    overrides the config's. Creating it replaces any schedule the model had.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Any = None,
        *,
        adapter_name: str | None = None,
        method: Method | None = None,
        stats: Iterable[str] | None = None,
        accumulator_dtype: torch.dtype = torch.float32,
        mask_path: str | os.PathLike | None = None,
        save_mask_path: str | os.PathLike | None = None,
        start_step: int = 0,
        optimizer: Any = None,
        rewarmup_steps: int | None = None,
        lr_warmup_steps: int | None = None,
        started_by: str | None = None,
    ) -> None:
        self.model = model
        self.adapter_name = resolve_adapter(model, adapter_name)
        config = config if config is not None else model_config(model, self.adapter_name)
        if config is None:
            raise MaskError("a RoSA schedule needs a RosaConfig (none found on the model)")
        self.config = config
        self.layers = mask_layers(model, self.adapter_name)
        self.method = method if method is not None else config.mask_method
        self.stats = stats
        self.accumulator_dtype = accumulator_dtype
        self.save_mask_path = save_mask_path
        self.warmup_steps = int(config.warmup_steps)
        self.mask_steps = int(config.mask_steps)
        self.restart_after_mask = bool(config.restart_after_mask)
        self.sparse_lr_ratio = float(getattr(config, "sparse_lr_ratio", 1.0))
        configured = rewarmup_steps if rewarmup_steps is not None else getattr(config, "rewarmup_steps", None)
        # a trainer without an LR warm-up has none to lend: the fallback below applies, as without a trainer
        self._rewarmup = configured if configured is not None else (lr_warmup_steps or None)
        self.optimizer = optimizer
        self.optimizer_steps = int(start_step)
        self.mask_fixed_step: int | None = None  # optimizer steps done when the mask was fixed mid-run
        self.events: list[dict[str, Any]] = []
        self.builder: MaskBuilder | None = None
        self._unacknowledged = 0  # optimizer steps the hooks handled that step() has not been told of
        self._scaled: list[tuple[list[torch.Tensor], list[torch.Tensor], float]] = []
        self._forwards_since_step = 0
        self._warned_no_step = False
        self._snapshot_restored = False
        a = self.adapter_name
        if started_by is not None:
            self._event("schedule_started", by=started_by)
        self._snapshot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # A and B to restart to: see below
        if not any(layer.capacity.get(a, 0) for layer in self.layers.values()):
            self.phase = JOINT  # density 0 everywhere: plain LoRA, nothing to select
            self._event("no_sparse_budget")
        elif mask_path is not None:
            supports = load_mask(model, mask_path, adapter_name=a, apply=False)
            nnz = {name: support.nnz for name, support in supports.items()}
            check_mask_fills_budget(self.layers, a, config.mask_allocation, mask_path, nnz)
            apply_mask(model, supports, a)
            self.phase = JOINT
            self._event("mask_loaded", path=os.fspath(mask_path))
        elif has_mask(model, a):
            self.phase = JOINT
            self._event("mask_present")
        else:  # a mask to choose: A and B as they start, for the restart after it
            self._snapshot = {
                name: (layer.rosa_A[a].weight.detach().clone(), layer.rosa_B[a].weight.detach().clone())
                for name, layer in self.layers.items()
                if a in layer.rosa_A
            }
            self.phase = WARMUP
            self.builder = MaskBuilder(
                self.layers,
                a,
                method=self.method,
                allocation=config.mask_allocation,
                seed=config.mask_seed,
                memory_budget=config.mask_memory_budget,
                accumulator_dtype=accumulator_dtype,
                stats=stats,
                max_micro_batches=self.mask_steps,
                fisher_granularity=getattr(config, "fisher_granularity", None),  # None: RosaConfig's default
            )
            if self.builder.needs_data and self.mask_steps < 1:
                raise MaskError(f"mask method {method_name(self.method)!r} needs mask_steps >= 1")
            if self.optimizer_steps >= self.warmup_steps:
                self._begin_collection()
                if self.builder.done:  # data-free method and no warm-up: fix the mask before any step
                    self._fix_mask(None)
        register(self)

    # --- public -------------------------------------------------------------------------------------------

    @property
    def mask_ready(self) -> bool:
        return self.phase == JOINT

    @property
    def rewarmup_steps(self) -> int:
        """The re-warm-up length (see the module docstring); until the mask is fixed mid-run and no setting
        gives it, the steps taken so far."""
        if self._rewarmup is not None:
            return int(self._rewarmup)
        return int(self.mask_fixed_step if self.mask_fixed_step is not None else self.optimizer_steps)

    @property
    def lr_factor(self) -> float:
        """The share of its optimizer step what restarted at the mask takes at the next step."""
        if self.mask_fixed_step is None or self.rewarmup_steps <= 0:
            return 1.0
        return min(1.0, (self.optimizer_steps - self.mask_fixed_step + 1) / self.rewarmup_steps)

    @property
    def micro_batches_collected(self) -> int:
        """Micro-batches observed by the group being collected (0 outside the collection phase)."""
        if self.builder is None or self.builder.collector is None:
            return 0
        return self.builder.collector.micro_batches

    def parameters(self) -> list[torch.Tensor]:
        """The adapter's A, B and sparse values: what an optimizer driving this schedule holds."""
        return self._values() + self._lora()

    def score_before_training(
        self, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    ) -> bool:
        """Sparse-only runs (:func:`needs_mask_before_training`): score the mask on ``batches`` (the run's own
        first batches) now, so that no step is spent collecting. Returns whether it did."""
        if self.phase == JOINT or not needs_mask_before_training(
            self.model, self.config, self.adapter_name, self.method
        ):
            return False
        batches = list(itertools.islice(batches, self.mask_steps))
        collect_mask(
            self.model,
            batches,
            loss_fn,
            config=self.config,
            method=self.method,
            stats=self.stats,
            adapter_name=self.adapter_name,
            accumulator_dtype=self.accumulator_dtype,
        )
        self.close()
        self.phase = JOINT
        self._event("mask_fixed", nnz=self._nnz(), restart=False, method=method_name(self.method), rewarmup=0)
        self._save_mask()
        return True

    def micro_batch_end(self) -> None:
        """Mark the end of a micro-batch (forward + backward). Optional: ordinary layers are counted without it;
        a layer called several times per forward is counted exactly with it."""
        if self.phase == COLLECT and self.builder.collector is not None:
            self.builder.collector.end_micro_batch()
            self._advance_groups()

    def step(self, optimizer: Any = None) -> None:
        """Optional: the optimizer's own step already advanced the schedule (global hooks). Calling this after
        ``optimizer.step()`` is harmless; it advances the schedule only for an optimizer whose steps run no
        torch optimizer hooks (then without the update scaling of the re-warm-up and the sparse rate)."""
        if self._unacknowledged > 0:
            self._unacknowledged -= 1
            return
        self._advance(optimizer)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the model and optimizer: ``{"mask_fixed_step": int | None,
        "snapshot": {name: tensor}}`` (the restart snapshot of A and B, only before the mask is fixed)."""
        snapshot = {}
        if not self.mask_ready:
            for name, (a0, b0) in self._snapshot.items():
                snapshot[f"{name}.A"], snapshot[f"{name}.B"] = a0, b0
        return {"mask_fixed_step": self.mask_fixed_step, "snapshot": snapshot}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a schedule built for the resumed run (same ``start_step``)."""
        if not self.mask_ready and state.get("snapshot"):
            for name, (a0, b0) in self._snapshot.items():
                a0.copy_(state["snapshot"][f"{name}.A"])
                b0.copy_(state["snapshot"][f"{name}.B"])
            self._snapshot_restored = True
        fixed = state.get("mask_fixed_step")
        if fixed is not None and self.mask_ready:
            self.mask_fixed_step = int(fixed)

    def close(self) -> None:
        """Remove the collection hooks and accumulators (e.g. when training stops during collection)."""
        if self.builder is not None:
            self.builder.close()

    # --- driven by the hooks ------------------------------------------------------------------------------

    def training_forward(self) -> None:
        """A training forward pass of the model: notices when no optimizer ever steps the schedule."""
        self._forwards_since_step += 1
        if self._forwards_since_step > 4 * max(self.mask_steps, 8) and not self._warned_no_step:
            self._warned_no_step = True
            logger.warning(
                "rosa: %d training forward passes and no step of an optimizer holding the RoSA parameters: the "
                "schedule (mask, restart) cannot advance. Build the optimizer over the model's own parameters "
                "(not flattened copies, as DeepSpeed ZeRO or FSDP1 without use_orig_params make)",
                self._forwards_since_step,
            )

    def before_optimizer_step(self, optimizer: Any) -> None:
        """Snapshot what this step must scale (the re-warm-up, the sparse rate)."""
        if self.optimizer_steps == 0:
            self.resume_from_optimizer(optimizer)
        ramp, sparse = self.lr_factor, 1.0 / self.sparse_lr_ratio
        own = opt.at_own_rate(optimizer, self._values()) if sparse != 1.0 else set()
        factors: dict[float, list[torch.Tensor]] = {}
        for p in self._values():
            f = ramp * (1.0 if id(p) in own else sparse)
            if p.grad is not None and f != 1.0:
                factors.setdefault(f, []).append(p)
        if self.restart_after_mask and ramp != 1.0:
            for p in self._lora():
                if p.grad is not None:
                    factors.setdefault(ramp, []).append(p)
        self._scaled = [(params, opt.snapshot(params), f) for f, params in factors.items()]

    def after_optimizer_step(self, optimizer: Any) -> None:
        for params, before, factor in self._scaled:
            opt.scale_updates(params, before, factor)
        self._scaled = []
        self._unacknowledged += 1
        self._advance(optimizer)
        opt.write_counters(
            optimizer,
            self.parameters(),
            {"optimizer_steps": self.optimizer_steps, "mask_fixed_step": self.mask_fixed_step},
        )

    # --- internals ----------------------------------------------------------------------------------------

    def _values(self) -> list[torch.Tensor]:
        return [layer.rosa_values[self.adapter_name] for layer in self.layers.values()]

    def _lora(self) -> list[torch.Tensor]:
        a = self.adapter_name
        return [
            p
            for layer in self.layers.values()
            if a in layer.rosa_A
            for p in (layer.rosa_A[a].weight, layer.rosa_B[a].weight)
        ]

    def resume_from_optimizer(self, optimizer: Any) -> bool:
        """Take the counters an optimizer restored from a checkpoint carries (every step writes them into it):
        the steps done, unless this schedule was told (``start_step``), and the step the mask was fixed at, so the
        re-warm-up goes on where it stopped. Trainer's ``resume_from_checkpoint`` restores the optimizer, not the
        schedule. Returns whether the optimizer had counters."""
        counters = opt.read_counters(optimizer, self.parameters()) if optimizer is not None else None
        if not counters or not counters.get("optimizer_steps"):
            return False
        if self.optimizer_steps == 0:
            self.optimizer_steps = int(counters["optimizer_steps"])
        fixed = counters.get("mask_fixed_step")
        if fixed is not None and self.mask_ready and self.mask_fixed_step is None:
            self.mask_fixed_step = int(fixed)
        if not self.mask_ready and self.restart_after_mask and not self._snapshot_restored:
            logger.warning(
                "rosa: resumed at optimizer step %d, before the mask was fixed, without the schedule's saved state "
                "(RosaTrainerCallback writes it into each checkpoint): the mask's statistics are collected afresh "
                "from the next step, and the restart after the mask returns A and B to their values at the resume, "
                "not at the start",
                self.optimizer_steps,
            )
        self._event("resumed_from_optimizer", mask_fixed_step=self.mask_fixed_step)
        return True

    def _advance(self, optimizer: Any) -> None:
        if self.phase == COLLECT and self.builder.collector is not None:  # (counted at the step that ran it)
            self.builder.collector.end_micro_batch()
            self._advance_groups()
        self.optimizer_steps += 1
        self._forwards_since_step = 0
        if optimizer is not None:
            self.optimizer = optimizer
        if self.phase == WARMUP and self.optimizer_steps >= self.warmup_steps:
            self._begin_collection()
        if self.phase == COLLECT and self.builder.done:
            self._fix_mask(self.optimizer)

    def _event(self, kind: str, **info: Any) -> None:
        event = {"event": kind, "optimizer_step": self.optimizer_steps, **info}
        self.events.append(event)
        logger.info("rosa schedule: %s", event)

    def _begin_collection(self) -> None:
        self.phase = COLLECT
        if self.builder.needs_data:
            self.builder.start_group()
        self._event("collect_start", groups=len(self.builder.groups) if self.builder.needs_data else 0)

    def _advance_groups(self) -> None:
        builder = self.builder
        while builder.collector is not None and builder.collector.micro_batches >= self.mask_steps:
            builder.finish_group()
            self._event("group_done", group=builder.current_group - 1)
            if not builder.done:
                builder.start_group()

    def _nnz(self) -> int:
        return sum(layer.nnz(self.adapter_name) for layer in self.layers.values())

    def _fix_mask(self, optimizer: Any) -> None:
        apply_mask(self.model, self.builder.build(), self.adapter_name)
        if self.restart_after_mask:
            with torch.no_grad():
                for name, (a0, b0) in self._snapshot.items():
                    self.layers[name].rosa_A[self.adapter_name].weight.copy_(a0)
                    self.layers[name].rosa_B[self.adapter_name].weight.copy_(b0)
        restarted = self._values() + (self._lora() if self.restart_after_mask else [])
        if optimizer is not None:
            opt.reset_optimizer_state(optimizer, restarted)
        elif self.restart_after_mask and self.optimizer_steps > 0:
            logger.warning("restart_after_mask without an optimizer: the A/B optimizer state was not reset")
        if self.optimizer_steps > 0:  # mid-run: what starts now re-warms up
            self.mask_fixed_step = self.optimizer_steps
        self.phase = JOINT
        self.builder = None
        self._snapshot.clear()
        self._event(
            "mask_fixed",
            nnz=self._nnz(),
            restart=self.restart_after_mask,
            method=method_name(self.method),
            rewarmup=self.rewarmup_steps if self.mask_fixed_step is not None else 0,
        )
        self._save_mask()

    def _save_mask(self) -> None:
        if self.save_mask_path is not None and is_main_process():  # every rank holds the same mask
            save_mask(self.model, self.save_mask_path, adapter_name=self.adapter_name, method=self.method)
