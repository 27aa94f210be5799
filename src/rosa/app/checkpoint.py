"""Atomic, pickle-free training checkpoints: adapter, optimizer, LR schedule, RNG, data position, schedule; and
``CheckpointSaver``, which writes them for ``rosa train`` on rank 0 with every rank's RNG state.

A checkpoint is a folder ``step-<N>`` holding the PEFT adapter files, ``state.safetensors`` (every tensor of
the optimizer state, RNG states and the RoSA restart snapshot) and ``state.json`` (everything else). It is
written under a temporary name and renamed into place, then ``latest`` is replaced atomically, so a run
killed at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import distributed
from .run_config import RunConfig

LATEST = "latest"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    extra_tensors: dict[str, torch.Tensor],
    extra_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``run_dir/checkpoints/step-<step>`` atomically and point ``latest`` at it."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors = {**opt_tensors, "rng.torch": torch.get_rng_state(), **extra_tensors}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
    state = {"step": step, "optimizer": opt_meta, "lr_scheduler": lr_scheduler.state_dict(), **extra_state}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(root / LATEST, final.name)
    # keep this one and the newest keep - 1 before it; a folder of a later step is one ``latest`` no longer
    # reaches (left by a run that went back), never the one just written
    # (only folders named exactly ``step-<digits>``, as this function names them: never a user's step-best)
    ours = [p for p in root.glob("step-*") if _step_of(p) is not None and p.is_dir() and not p.is_symlink()]
    earlier = sorted((p for p in ours if _step_of(p) < step), key=_step_of)
    for old in earlier[: max(0, len(earlier) - (keep - 1))] + [p for p in ours if _step_of(p) > step]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_of(folder: Path) -> int | None:
    """The step of a checkpoint folder ``step-<N>``; None for any other name."""
    suffix = folder.name.removeprefix("step-")
    return int(suffix) if folder.name.startswith("step-") and suffix.isascii() and suffix.isdigit() else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON state of a checkpoint (the adapter is loaded separately)."""
    tensors = load_file(path / "state.safetensors")
    state = json.loads((path / "state.json").read_text())
    return tensors, state


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], state: dict
) -> None:
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` at once: a reader sees the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _rng_tensors(ctx: distributed.ProcessContext) -> dict[str, torch.Tensor]:
    """Every rank's RNG state (dropout draws differ per rank), gathered for rank 0's checkpoint (which also
    stores rank 0's torch state as ``rng.torch``, all a single-process run needs)."""
    mine = {"torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(ctx.device)
    if not ctx.distributed and "cuda" not in mine:
        return {}
    states = distributed.gather_objects(mine, ctx)
    return {
        f"rng.{kind}.rank{rank}": value.clone()
        for rank, state in enumerate(states)
        for kind, value in state.items()
    }


def restore_rng(tensors: dict[str, torch.Tensor], ctx: distributed.ProcessContext) -> None:
    torch.set_rng_state(tensors.get(f"rng.torch.rank{ctx.rank}", tensors["rng.torch"]))
    cuda = tensors.get(f"rng.cuda.rank{ctx.rank}")
    if cuda is not None and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(cuda, ctx.device)


class CheckpointSaver:
    """Checkpoints written by rank 0 holding what every rank needs to resume (each rank's RNG state)."""

    def __init__(self, out, model, optimizer, lr_scheduler, sampler, schedule, run: RunConfig, ctx) -> None:
        self.parts = (out, model, optimizer, lr_scheduler, sampler, schedule)
        self.run = run
        self.ctx = ctx
        self.last_step: int | None = None

    def save(self, step: int, before: dict | None, events: list[dict[str, Any]]) -> None:
        """At a step boundary, on every rank together (each contributes its RNG state)."""
        from ..schedule.state import snapshot_tensors

        out, model, optimizer, lr_scheduler, sampler, schedule = self.parts
        rng = _rng_tensors(self.ctx)
        if self.ctx.is_main:
            state = schedule.state_dict()  # the restart snapshot must survive a resume before the mask
            save_checkpoint(
                out,
                step,
                model,
                optimizer,
                lr_scheduler,
                {**snapshot_tensors(state), **rng},
                {
                    "sampler": sampler.state_dict(),
                    "before": before,
                    "processes": self.ctx.world,
                    "mask_fixed_step": state["mask_fixed_step"],
                    "schedule_events": events,
                },
                keep=self.run.train.keep_checkpoints,
            )
        distributed.barrier(self.ctx)
        self.last_step = step
