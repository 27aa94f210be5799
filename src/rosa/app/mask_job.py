"""``rosa mask``: the run's first phase alone (LoRA-only warm-up and mask collection), then the mask file.

The same set-up as ``rosa train`` (:func:`rosa.app.job.build`), so the mask is the one that run would fix; it
stops at the step the mask is fixed, writes nothing but ``--out`` and makes no run folder. ``rosa train
train.mask_path=FILE`` then starts joint training from that mask at step 0 (the paper's two-run recipe).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import distributed
from .run_config import RunConfig, RunConfigError
from .run_folder import RunError


def check_output_file(path: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """``--out`` may be written: not an existing file unless ``overwrite``, never a folder, never one of the
    command's own inputs, and its folder exists and is writable (checked before any work)."""
    import os

    if str(path) in ("", "."):
        raise RunError("--out must name a file")
    resolved = path.resolve()
    for source in inputs:
        source = source.resolve()
        if resolved == source or source in resolved.parents:
            raise RunError(f"--out {path} is inside this command's input {source}: choose another path")
    if path.is_dir():
        raise RunError(f"--out {path} is a folder; give a file path")
    if path.exists() and not overwrite:
        raise RunError(f"--out {path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise RunError(f"--out {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise RunError(f"--out {path}: the folder {path.parent} is not writable")


def collect_mask_only(
    run: RunConfig, mask_out: Path, show_progress: bool = True, overwrite: bool = False
) -> Path:
    """Warm up, collect, fix the mask, write it to ``mask_out``; nothing else is written."""
    from tqdm.auto import tqdm

    from ..mask import default_stats
    from .job import build

    check_output_file(mask_out, overwrite)
    if run.train.mask_path is not None:  # the schedule would start from it and score nothing
        raise RunConfigError(
            f"train.mask_path={run.train.mask_path} gives a mask to start from; rosa mask scores a new one: leave "
            "train.mask_path out"
        )
    config = run.rosa_config()
    if config.density == 0 and not any(config.density_pattern.values()):
        raise RunConfigError("rosa.density is 0 (plain LoRA): there is no sparse support to select")
    if not default_stats(config.mask_method):  # a data-free method: nothing to warm up for
        run = dataclasses.replace(run, rosa={**run.rosa, "warmup_steps": 0})
    ctx = distributed.init_from_env()
    try:
        job = build(run, ctx, checkpoint=None, mask_path=mask_out)
        limit = job.schedule.warmup_steps + job.schedule.mask_steps  # one step per micro-batch at least
        with tqdm(total=limit, desc="mask", unit="step", disable=not (show_progress and ctx.is_main)) as bar:
            job.trained.train()
            while not job.schedule.mask_ready:
                job.train_step(job.micro_batches())
                bar.update(1)
        job.schedule.close()
    finally:
        distributed.close(ctx)
    return mask_out
