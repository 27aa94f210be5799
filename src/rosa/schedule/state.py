"""The schedule's state in a checkpoint file (safetensors: nothing is unpickled), and its names, in one place.

A run resumed before the mask is fixed needs the restart snapshot of A and B (their values when the schedule
started); one resumed after it needs the step the mask was fixed at (the re-warm-up goes on from there).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..mask.layers import MaskError

SCHEDULE_FILE = "rosa_schedule.safetensors"
SNAPSHOT_PREFIX = "snapshot."


def snapshot_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """:meth:`RosaSchedule.state_dict`'s snapshot as flat tensors named ``snapshot.<layer>.<A|B>``."""
    return {f"{SNAPSHOT_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in state["snapshot"].items()}


def snapshot_from(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The snapshot held among a checkpoint's tensors (the inverse of :func:`snapshot_tensors`)."""
    return {k[len(SNAPSHOT_PREFIX) :]: v for k, v in tensors.items() if k.startswith(SNAPSHOT_PREFIX)}


def save_schedule_state(scheduler: Any, path: str | os.PathLike) -> None:
    """Write :meth:`RosaSchedule.state_dict` as safetensors (tensors + one metadata field)."""
    from safetensors.torch import save_file

    state = scheduler.state_dict()
    fixed = state["mask_fixed_step"]
    metadata = {"mask_fixed_step": "" if fixed is None else str(fixed)}
    save_file(snapshot_tensors(state), os.fspath(path), metadata=metadata)


def load_schedule_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`save_schedule_state`."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        fixed = (f.metadata() or {}).get("mask_fixed_step", "")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    if fixed and not fixed.isdigit():
        raise MaskError(f"{path}: mask_fixed_step must be a non-negative integer, got {fixed!r}")
    return {"mask_fixed_step": int(fixed) if fixed else None, "snapshot": snapshot_from(tensors)}
