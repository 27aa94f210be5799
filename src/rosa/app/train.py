"""``rosa train``: load, adapt, run the RoSA schedule, checkpoint, evaluate; the loop is :func:`train_loop`.

A plain PyTorch loop (not ``transformers.Trainer``) so that a checkpoint captures exactly what an uninterrupted
run would have in memory: adapter, optimizer, LR schedule, RNG, data position and the RoSA schedule's restart
snapshot. ``--resume`` after Ctrl-C or a killed process therefore reaches the same final adapter as a run that
was never stopped. Set-up and one step are :mod:`rosa.app.job`'s, the folder's rules :mod:`rosa.app.run_folder`'s,
the logs :mod:`rosa.app.run_log`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from .. import distributed
from ..mask.files import readable_by_umask
from .checkpoint import CheckpointSaver, latest_checkpoint, write_atomic
from .run_config import RunConfig, load_run_config
from .run_folder import (
    GracefulStop,
    RunError,
    RunStopped,
    check_resume_settings,
    choose_run_folder,
    replacing_run,
    run_folder_lock,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: str
    adapter: str
    steps: int
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    wall_seconds: float


MODEL_CARD = """---
library_name: peft
tags:
- rosa
---

# A RoSA adapter

Trained with [rosa](https://pypi.org/project/rosa/) (RoSA: low-rank plus sparse adaptation) on {base}.
Loading it needs rosa installed and imported first, which registers RoSA with PEFT:

```python
import rosa  # noqa: F401  (registers PeftType.ROSA)
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/to/this/folder")
```
"""


def train(
    run: RunConfig,
    resume: bool = False,
    show_progress: bool = True,
    given_keys: list[str] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Run (or resume, or extend) one training job in its run folder (``run_folder.choose_run_folder``).

    ``given_keys``: the settings the user gave explicitly (``section.key``); with ``resume`` each must equal
    the run's saved setting (``train.steps`` may grow). The folder is locked for the whole run (rank 0).
    Under ``torchrun`` / ``accelerate launch`` every process runs this; only rank 0 writes files.
    """
    given_keys = given_keys or []
    ctx = distributed.init_from_env()
    try:
        with contextlib.ExitStack() as held:
            # rank 0 alone reads, chooses and locks the folder; the others follow its choice or its refusal
            choice: tuple[Path, Path | None, RunConfig, bool] | Exception = RunError("no choice")
            if ctx.is_main:
                try:
                    choice = _choose(run, resume, overwrite, given_keys)
                    held.enter_context(run_folder_lock(choice[0]))
                except Exception as error:  # every rank raises it, not only rank 0
                    choice = error
            choice = distributed.from_main(choice, ctx)
            if isinstance(choice, Exception):
                raise choice
            out, checkpoint, run, replace = choice
            try:
                return _run(run, ctx, out, checkpoint, show_progress, replace)
            except KeyboardInterrupt:  # at a step boundary or at once: the hint names the folder to resume
                if latest_checkpoint(out) is None:
                    raise
                raise RunStopped(str(out)) from None
    finally:
        distributed.close(ctx)


def _choose(
    run: RunConfig, resume: bool, overwrite: bool, given_keys: list[str]
) -> tuple[Path, Path | None, RunConfig, bool]:
    """The run folder, the checkpoint to resume from, the settings the run goes on with, and whether it
    replaces the run in the folder (``--overwrite``)."""
    out, checkpoint, replace = choose_run_folder(
        Path(run.output_dir), resume=resume, overwrite=overwrite, given="output_dir" in given_keys
    )
    if checkpoint is not None:  # the run continues with the settings it was started with
        run = check_resume_settings(load_run_config(out / "run_config.yaml"), run, given_keys)
        if int(json.loads((checkpoint / "state.json").read_text())["step"]) >= run.train.steps:
            raise RunError(
                f"--resume: the run in {out} has finished its {run.train.steps} steps; "
                "give a larger train.steps to extend it"
            )
    run.output_dir = str(out)
    return out, checkpoint, run, replace


def _run(run, ctx, out: Path, checkpoint: Path | None, show_progress: bool, replace: bool) -> TrainResult:
    from ..model import sparse_parameter_count
    from .evaluate import evaluate_examples
    from .job import build
    from .run_log import RunLog

    started = time.perf_counter()
    show_progress = show_progress and ctx.is_main

    def evaluate(model, tokenizer, examples, task, label):
        return evaluate_examples(model, tokenizer, examples, task, run, label, show_progress, ctx)

    before = (lambda *a: evaluate(*a, "before training")) if run.eval.before else None
    with replacing_run(out, replace, ctx):  # --overwrite: the old run goes only once this one has started
        job = build(run, ctx, checkpoint, out / "mask.safetensors", evaluate_before=before)
    run = run.with_every_rosa_setting()  # recorded in full: a resume never takes a later default
    if ctx.is_main:
        write_atomic(out / "run_config.yaml", yaml.safe_dump(run.to_dict(), sort_keys=False))
    log = RunLog(out, ctx.is_main, resumed_at=job.start_step if checkpoint is not None else None)
    saver = CheckpointSaver(
        out, job.model, job.optimizer, job.lr_scheduler, job.sampler, job.schedule, run, ctx
    )
    try:
        step = train_loop(job, log, saver, show_progress)
    finally:
        job.schedule.close()
    if saver.last_step != step:  # the last step is a checkpoint too: --resume train.steps=N extends the run
        saver.save(step, job.before, job.events())
    if ctx.is_main:
        tmp = out / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "README.md").write_text(MODEL_CARD.format(base=run.model.name))  # PEFT adds its own part
        job.model.save_pretrained(tmp)
        for file in tmp.iterdir():  # safetensors writes 0600: the adapter is an ordinary folder
            readable_by_umask(file)
        shutil.rmtree(out / "adapter", ignore_errors=True)
        os.replace(tmp, out / "adapter")
    after = (
        evaluate(job.model, job.tokenizer, job.held_out, job.task, "after training") if job.held_out else None
    )
    result = TrainResult(
        str(out), str(out / "adapter"), step, job.before, after, time.perf_counter() - started
    )
    if ctx.is_main:
        summary = {
            **result.__dict__,
            "trainable": sparse_parameter_count(job.model),
            "schedule_events": job.events(),
            "task": job.task,
            "processes": ctx.world,
        }
        write_atomic(out / "results.json", json.dumps(summary, indent=2))
        log.close(job.schedule.mask_fixed_step)
    distributed.barrier(ctx)  # nobody leaves (and tears the group down) before rank 0 has written
    return result


def train_loop(job, log, saver, show_progress: bool = True) -> int:
    """The steps from ``job.start_step`` to ``train.steps``: train, log, validate, checkpoint, stop on request.

    A first Ctrl-C / SIGTERM stops at the next step boundary with a checkpoint (none while the mask statistics
    are being collected: those live only in memory); a second stops at once."""
    from ..schedule import COLLECT
    from .evaluate import heldout_loss_of

    t, ctx, step = job.run.train, job.ctx, job.start_step
    bar = tqdm(total=t.steps, initial=step, desc="training", unit="step", disable=not show_progress)
    seen_events = len(job.schedule.events)
    log.events(job.schedule.events)
    with GracefulStop() as stop, contextlib.closing(bar):
        job.trained.train()
        while step < t.steps:
            tick = time.perf_counter()
            loss, grad_norm, tokens = job.train_step(job.micro_batches())
            step += 1
            lr, phase = job.lr_scheduler.get_last_lr()[0], job.schedule.phase
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", phase=phase)
            if step % t.log_every == 0 or step == t.steps:
                log.step(step, loss, lr, tokens / (time.perf_counter() - tick), phase, grad_norm)
            log.events(job.schedule.events[seen_events:])
            seen_events = len(job.schedule.events)
            if t.eval_every and step % t.eval_every == 0 and job.held_out:
                log.validation(step, heldout_loss_of(job, job.held_out))
            collecting = phase == COLLECT
            if step % t.save_every == 0 and step < t.steps and not collecting:
                saver.save(step, job.before, job.events())
            if step < t.steps and stop.requested_everywhere(ctx):
                if not collecting and saver.last_step != step:
                    saver.save(step, job.before, job.events())
                elif collecting and ctx.is_main:
                    print("rosa: stopped during mask collection: no checkpoint of this step", file=sys.stderr)
                raise KeyboardInterrupt  # train() names the folder to resume
    return step
