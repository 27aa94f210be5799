"""The RoSA schedule: LoRA-only warm-up -> mask collection -> mask fixed -> A, B and sparse values train together.

Counting is in optimizer steps for the warm-up and in micro-batches (forward + backward passes) for the
collection:

1. ``warmup_steps`` optimizer steps of LoRA-only training. The sparse values exist from the first step
   (allocated at capacity) but the support is empty, so they take no part in the forward, get no gradient
   (``grad is None``) and the optimizer neither updates nor weight-decays them, nor creates state for them.
2. The next ``mask_steps`` micro-batches of *ordinary training* are observed by hooks (LoRA keeps training):
   each layer group (see ``RosaConfig.mask_memory_budget``) observes its own ``mask_steps`` micro-batches, one
   group after another. Data-free methods (``magnitude``, ``random``) skip this phase.
3. At the first optimizer-step boundary after the last group is complete the mask is selected and set. With
   ``restart_after_mask`` (the paper's best runs) every ``rosa_A``/``rosa_B`` is copied back, in place, to the
   exact values snapshotted when the schedule started, and the optimizer state of A, B and the sparse values
   is deleted (``optimizer.state.pop(param)``): an Adam-type optimizer then starts those parameters afresh
   (step 0, zero moments) exactly as a new optimizer would, while the parameter objects and param groups stay
   the same (no parameter appears or disappears; DDP/FSDP see no change).
4. What starts afresh also starts under a fresh learning-rate warm-up, as in the paper's second run: for
   ``rewarmup_steps`` optimizer steps the param groups holding those parameters run at
   ``min(1, (k + 1) / rewarmup_steps)`` times the LR scheduler's rate (k counts the steps since the mask).
   The factor is applied inside ``optimizer.step()`` only (step pre/post hooks) and the rate put back after
   it, so any LR scheduler (LambdaLR, Trainer's, accelerate's) keeps its own values. Starting the sparse
   values at the peak rate with empty Adam moments is what this avoids: measured, it costs RoSA its advantage.

Plain PyTorch::

    sched = RosaScheduler(model, config, optimizer=optimizer)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step(); optimizer.zero_grad()
        sched.step(optimizer)

(with gradient accumulation, calling ``sched.micro_batch_end()`` after each backward makes the micro-batch
count exact for layers called several times per forward; ordinary layers are counted without it).
Or, without interleaving: ``rosa.masks.collect_mask(model, batches)`` scores the mask in place with no
optimizer step at all.

HF Trainer: ``Trainer(..., callbacks=[RosaTrainerCallback(config)])``.

A saved mask (``mask_path``) skips warm-up and collection: joint training starts at step 0 (the paper's
two-run recipe). ``save_mask_path`` writes the mask as soon as it is fixed. A model that already has a mask
(e.g. resumed from a checkpoint after the mask was set) starts in the joint phase; ``state_dict()`` /
``load_state_dict()`` carry the restart snapshot and the step the mask was fixed at across a resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..distributed import is_main_process
from .builder import MaskBuilder
from .files import load_mask, save_mask
from .layers import MaskError, apply_mask, has_mask, mask_layers, model_config, resolve_adapter
from .optimizer import LRRamp, groups_holding, reset_optimizer_state
from .selection import Method, default_stats, method_name

logger = logging.getLogger(__name__)

WARMUP, COLLECT, JOINT = "warmup", "collect", "joint"
SCHEDULE_FILE = "rosa_schedule.safetensors"


def needs_mask_before_training(
    model: nn.Module, config: Any, adapter_name: str | None = None, method: Method | None = None
) -> bool:
    """Sparse-only (no layer has a LoRA pair), no mask yet and a data-driven method: the mask must be scored
    before the first step, since ordinary training has nothing to backpropagate into while it is collected."""
    adapter = resolve_adapter(model, adapter_name)
    layers = mask_layers(model, adapter).values()
    method = method if method is not None else config.mask_method
    return (
        not any(adapter in layer.rosa_A for layer in layers)
        and any(layer.capacity.get(adapter, 0) for layer in layers)
        and not has_mask(model, adapter)
        and bool(default_stats(method))
    )


class RosaScheduler:
    """Drives the RoSA schedule from a training loop; see the module docstring.

    ``config`` defaults to the PEFT model's ``peft_config[adapter]``. ``method`` overrides
    ``config.mask_method`` (and may be a callable, see :mod:`rosa.mask.selection`); ``stats`` names the statistics a
    callable needs. ``start_step`` is the number of optimizer steps already done (for a resumed run).
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
    ) -> None:
        self.model = model
        self.adapter_name = resolve_adapter(model, adapter_name)
        if config is None:
            config = model_config(model, self.adapter_name)
        if config is None:
            raise MaskError("RosaScheduler needs a RosaConfig (none found on the model)")
        self.config = config
        self.layers = mask_layers(model, self.adapter_name)
        for layer in self.layers.values():
            layer._rosa_scheduled = True  # the model's "no schedule" warning stays quiet
        self.method = method if method is not None else config.mask_method
        self.stats = stats
        self.accumulator_dtype = accumulator_dtype
        self.save_mask_path = save_mask_path
        self.warmup_steps = int(config.warmup_steps)
        self.mask_steps = int(config.mask_steps)
        self.restart_after_mask = bool(config.restart_after_mask)
        if rewarmup_steps is None:
            rewarmup_steps = getattr(config, "rewarmup_steps", None)
        self.rewarmup_steps = int(self.warmup_steps if rewarmup_steps is None else rewarmup_steps)
        self.optimizer = optimizer
        self.mask_fixed_step: int | None = None  # optimizer steps done when the mask was fixed mid-run
        self._ramp: LRRamp | None = None
        self.optimizer_steps = int(start_step)
        self.events: list[dict[str, Any]] = []
        self.builder: MaskBuilder | None = None
        a = self.adapter_name
        self._snapshot = {
            name: (layer.rosa_A[a].weight.detach().clone(), layer.rosa_B[a].weight.detach().clone())
            for name, layer in self.layers.items()
            if a in layer.rosa_A
        }
        if not any(layer.capacity.get(a, 0) for layer in self.layers.values()):
            self.phase = JOINT  # density 0 everywhere: plain LoRA, nothing to select
            self._event("no_sparse_budget")
        elif mask_path is not None:
            load_mask(model, mask_path, adapter_name=a)
            self.phase = JOINT
            self._event("mask_loaded", path=os.fspath(mask_path))
        elif has_mask(model, a):
            self.phase = JOINT
            self._event("mask_present")
        else:
            self.phase = WARMUP
            if needs_mask_before_training(model, config, self.adapter_name, self.method):
                raise MaskError(
                    "sparse-only RoSA (r=0) has nothing to train while mask statistics are collected: score the "
                    "mask before training (rosa.masks.collect_mask(model, first_batches)) or pass mask_path "
                    "(RosaTrainerCallback and rosa train do the first themselves)"
                )
            self._make_builder()
            if self.optimizer_steps >= self.warmup_steps:
                self._begin_collection()
                if self.builder.done:  # data-free method and no warm-up: fix the mask before any step
                    self._fix_mask(None)

    # --- public -------------------------------------------------------------------------------------------

    @property
    def mask_ready(self) -> bool:
        return self.phase == JOINT

    @property
    def micro_batches_collected(self) -> int:
        """Micro-batches observed by the group being collected (0 outside the collection phase)."""
        if self.builder is None or self.builder.collector is None:
            return 0
        return self.builder.collector.micro_batches

    def snapshot_state(self) -> dict[str, torch.Tensor]:
        """The restart snapshot of A and B as flat tensors (for checkpoints taken before the mask is fixed)."""
        state = {}
        for name, (a0, b0) in self._snapshot.items():
            state[f"{name}.A"], state[f"{name}.B"] = a0, b0
        return state

    def load_snapshot_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a restart snapshot saved by :meth:`snapshot_state` (a resumed run's A/B are not initial)."""
        for name, (a0, b0) in self._snapshot.items():
            a0.copy_(state[f"{name}.A"])
            b0.copy_(state[f"{name}.B"])

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the model and optimizer: ``{"mask_fixed_step": int | None,
        "snapshot": {name: tensor}}`` (the snapshot only before the mask is fixed)."""
        return {
            "mask_fixed_step": self.mask_fixed_step,
            "snapshot": {} if self.mask_ready else self.snapshot_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a scheduler built for the resumed run (same ``start_step``)."""
        if not self.mask_ready and state.get("snapshot"):
            self.load_snapshot_state(state["snapshot"])
        fixed = state.get("mask_fixed_step")
        if fixed is not None and self.mask_ready:
            self.mask_fixed_step = int(fixed)
            if self.optimizer is not None:
                self._start_ramp(self.optimizer)

    @property
    def lr_factor(self) -> float:
        """The factor the re-warm-up applies to the restarted parameters' rate at the next optimizer step."""
        if self.mask_fixed_step is None or self.rewarmup_steps <= 0:
            return 1.0
        return min(1.0, (self.optimizer_steps - self.mask_fixed_step + 1) / self.rewarmup_steps)

    def micro_batch_end(self) -> None:
        """Mark the end of a micro-batch (forward + backward). Optional: see the module docstring."""
        if self.phase == COLLECT and self.builder.collector is not None:
            self.builder.collector.end_micro_batch()
            self._advance_groups()

    def step(self, optimizer: Any = None) -> None:
        """Call after every optimizer step (with the optimizer, so its state can be reset on restart)."""
        self.optimizer_steps += 1
        if optimizer is not None:
            self.optimizer = optimizer
        if self._ramp is not None and self.lr_factor >= 1.0:
            self._ramp.remove()
            self._ramp = None
        elif self._ramp is None and self.lr_factor < 1.0 and optimizer is not None:
            self._start_ramp(optimizer)  # resumed without an optimizer at construction
        if self.phase == COLLECT and self.builder.collector is not None:  # None: micro_batch_end finished it
            self.builder.collector.end_micro_batch()
            self._advance_groups()
        if self.phase == WARMUP and self.optimizer_steps >= self.warmup_steps:
            self._begin_collection()
        if self.phase == COLLECT and self.builder.done:
            self._fix_mask(optimizer)

    def close(self) -> None:
        """Remove any hooks and accumulators (e.g. when training stops during collection)."""
        if self.builder is not None:
            self.builder.close()
        if self._ramp is not None:
            self._ramp.remove()
            self._ramp = None

    # --- internals ----------------------------------------------------------------------------------------

    def _event(self, kind: str, **info: Any) -> None:
        event = {"event": kind, "optimizer_step": self.optimizer_steps, **info}
        self.events.append(event)
        logger.info("rosa schedule: %s", event)

    def _make_builder(self) -> None:
        self.builder = MaskBuilder(
            self.layers,
            self.adapter_name,
            method=self.method,
            allocation=self.config.mask_allocation,
            seed=self.config.mask_seed,
            memory_budget=self.config.mask_memory_budget,
            accumulator_dtype=self.accumulator_dtype,
            stats=self.stats,
            max_micro_batches=self.mask_steps,
            fisher_granularity=getattr(self.config, "fisher_granularity", "example"),
        )
        if self.builder.needs_data and self.mask_steps < 1:
            raise MaskError(f"mask method {method_name(self.method)!r} needs mask_steps >= 1")

    def _begin_collection(self) -> None:
        self.phase = COLLECT
        if self.builder.needs_data:
            self.builder.start_group()
            self._event("collect_start", groups=len(self.builder.groups))
        else:
            self._event("collect_start", groups=0)

    def _advance_groups(self) -> None:
        builder = self.builder
        while builder.collector is not None and builder.collector.micro_batches >= self.mask_steps:
            builder.finish_group()
            self._event("group_done", group=builder.current_group - 1)
            if not builder.done:
                builder.start_group()

    def _fix_mask(self, optimizer: Any) -> None:
        supports = self.builder.build()
        apply_mask(self.model, supports, self.adapter_name)
        nnz = sum(s.nnz for s in supports.values())
        a = self.adapter_name
        if self.restart_after_mask:
            with torch.no_grad():
                for name, (a0, b0) in self._snapshot.items():
                    layer = self.layers[name]
                    layer.rosa_A[a].weight.copy_(a0)
                    layer.rosa_B[a].weight.copy_(b0)
        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is not None:
            reset_optimizer_state(optimizer, self._restarted_params())
        elif self.restart_after_mask and self.optimizer_steps > 0:
            logger.warning("restart_after_mask without an optimizer: the A/B optimizer state was not reset")
        if self.optimizer_steps > 0:  # mid-run: what starts now gets its own LR warm-up
            self.mask_fixed_step = self.optimizer_steps
            if optimizer is not None:
                self._start_ramp(optimizer)
            elif self.rewarmup_steps > 0:
                logger.warning("the mask was fixed without an optimizer: no learning-rate re-warm-up")
        self.phase = JOINT
        self.builder = None
        self._snapshot.clear()
        self._event(
            "mask_fixed",
            nnz=nnz,
            restart=self.restart_after_mask,
            method=method_name(self.method),
            rewarmup=self.rewarmup_steps if self._ramp is not None else 0,
        )
        if self.save_mask_path is not None and is_main_process():  # every rank holds the same mask
            save_mask(self.model, self.save_mask_path, adapter_name=a, method=self.method)

    def _restarted_params(self) -> list[torch.Tensor]:
        """The parameters that start afresh when the mask is fixed."""
        a = self.adapter_name
        params = [layer.rosa_values[a] for layer in self.layers.values()]
        if self.restart_after_mask:
            params += [
                p
                for layer in self.layers.values()
                if a in layer.rosa_A
                for p in (layer.rosa_A[a].weight, layer.rosa_B[a].weight)
            ]
        return params

    def _start_ramp(self, optimizer: Any) -> None:
        if self._ramp is not None or self.lr_factor >= 1.0:
            return
        groups = groups_holding(optimizer, self._restarted_params())
        self._ramp = LRRamp(optimizer, groups, lambda: self.lr_factor)


def save_schedule_state(scheduler: RosaScheduler, path: str | os.PathLike) -> None:
    """Write :meth:`RosaScheduler.state_dict` as safetensors (tensors + one metadata field)."""
    from safetensors.torch import save_file

    state = scheduler.state_dict()
    fixed = state["mask_fixed_step"]
    tensors = {f"snapshot.{k}": v.detach().cpu().contiguous() for k, v in state["snapshot"].items()}
    save_file(tensors, os.fspath(path), metadata={"mask_fixed_step": "" if fixed is None else str(fixed)})


def load_schedule_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`save_schedule_state` (safetensors: nothing is unpickled)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        fixed = (f.metadata() or {}).get("mask_fixed_step", "")
        names = [k for k in f.keys() if k.startswith("snapshot.")]  # noqa: SIM118 (not a dict)
        snapshot = {k[len("snapshot.") :]: f.get_tensor(k) for k in names}
    if fixed and not fixed.isdigit():
        raise MaskError(f"{path}: mask_fixed_step must be a non-negative integer, got {fixed!r}")
    return {"mask_fixed_step": int(fixed) if fixed else None, "snapshot": snapshot}
