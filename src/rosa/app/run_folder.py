"""A run's output folder: who holds it, what resumes it, and how a stop leaves it.

Why apart from the loop: these are the guarantees ``rosa train`` makes about the folder (one run at a time, a
checkpoint written at a step boundary on Ctrl-C, a resume that refuses changed settings or a different
process count and restores every rank's RNG), each testable without training anything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from .. import distributed
from .checkpoint import latest_checkpoint
from .run_config import RunConfig


class RunError(RuntimeError):
    """A run cannot start (bad model, bad data, nothing to resume)."""


class RunStopped(KeyboardInterrupt):
    """Training stopped on request (Ctrl-C, SIGTERM) with a checkpoint in ``output_dir``, the run's folder, which
    ``rosa train --resume output_dir=...`` continues."""

    def __init__(self, output_dir: str) -> None:
        super().__init__(output_dir)
        self.output_dir = output_dir


# Everything ``rosa train`` writes into a run folder: what --overwrite may remove, and nothing else.
RUN_FILES = (
    "run_config.yaml",
    "log.jsonl",
    "results.json",
    "adapter",
    ".adapter.tmp",
    "checkpoints",
    "mask.safetensors",
    "tensorboard",
    "loss.png",
)


def holds_run(out: Path) -> bool:
    names = (*RUN_FILES, ASIDE_NAME)
    return any((out / name).exists() or (out / name).is_symlink() for name in names)


def choose_run_folder(
    out: Path, *, resume: bool, overwrite: bool, given: bool
) -> tuple[Path, Path | None, bool]:
    """Where this run writes, the checkpoint it resumes from, and whether it replaces the run in the folder.
    Nothing is replaced without being asked:

    - ``--resume``: the folder's latest checkpoint (a finished run has one at its last step: extend it with a
      larger ``train.steps``);
    - a folder that holds no run: used as it is (other files in it are left alone);
    - a folder holding a run: with ``--overwrite`` rosa's own files in it are replaced (never anything else;
      see :func:`replacing_run`: not before the new run has started); when ``output_dir`` was not given, the next
      free ``<folder>-2``, ``-3``, ... (so the default command can be run again and again); when it was given,
      refused.
    """
    check_writable(out)
    check_not_in_use(out)
    if resume:
        if overwrite:
            raise RunError(
                "--resume continues the run in output_dir, --overwrite replaces it: give one of them"
            )
        _check_nothing_set_aside(out)
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise RunError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        return out, checkpoint, False
    if not holds_run(out):
        return out, None, False
    if overwrite:
        _check_nothing_set_aside(out)
        return out, None, True
    if given:
        raise RunError(
            f"{out} already holds a run: pass --resume to continue it (with train.steps=N to extend a finished "
            "one), --overwrite to replace it, or choose another output_dir"
        )
    n = 2
    while holds_run(out.with_name(f"{out.name}-{n}")) or out.with_name(f"{out.name}-{n}").is_file():
        n += 1
    return out.with_name(f"{out.name}-{n}"), None, False


def _check_nothing_set_aside(out: Path) -> None:
    if (out / ASIDE_NAME).exists():
        raise RunError(
            f"{out / ASIDE_NAME} holds the files of a run that an interrupted --overwrite set aside: move them "
            f"back into {out} or remove that folder, then run again"
        )


def check_not_in_use(out: Path) -> None:
    """A live rosa run holds ``out``: say so before anything else (its files are not a finished run's)."""
    import fcntl

    lock = out / LOCK_NAME
    if not lock.is_file():
        return
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "another process"
            raise RunError(
                f"{out} is in use by another rosa run ({holder}); wait for it or choose another output_dir"
            ) from None


def check_writable(out: Path) -> None:
    """``out`` can be a run folder: a non-empty path that is or can become a writable folder (checked before
    any work starts)."""
    if str(out) in ("", "."):
        raise RunError("output_dir must name a folder (got an empty path)")
    if out.exists() and not out.is_dir():
        raise RunError(f"output_dir {out} is an existing file, not a folder")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise RunError(f"output_dir {out}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"output_dir {out}: {existing} is not writable")


def remove_run_files(out: Path) -> None:
    """Remove what ``rosa train`` writes into ``out`` (``RUN_FILES``), leaving every other file in place."""
    import shutil

    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


ASIDE_NAME = ".rosa-replaced"  # where --overwrite keeps the old run's files until the new run has started


@contextlib.contextmanager
def replacing_run(out: Path, replace: bool, ctx: distributed.ProcessContext):
    """``--overwrite``: the old run's files (``RUN_FILES``) are moved aside while the new run is set up, and put
    back if it cannot start (bad data, a model that does not load, Ctrl-C, a SIGTERM from torchrun because another
    rank failed): a mistyped command loses nothing. They are removed once every rank has set up. Every rank
    enters; rank 0 alone moves files."""
    import shutil

    if not replace:
        yield
        return
    aside = out / ASIDE_NAME
    moved: list[str] = []
    if ctx.is_main:
        aside.mkdir()
        moved = [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
        for name in moved:
            os.replace(out / name, aside / name)
    try:
        with _sigterm_interrupts():
            yield
            distributed.barrier(ctx)  # every rank has set up (a rank that failed never gets here)
    except BaseException:
        if ctx.is_main:
            remove_run_files(out)  # whatever the failed start wrote
            for name in moved:
                os.replace(aside / name, out / name)
            aside.rmdir()
        raise
    if ctx.is_main:
        shutil.rmtree(aside)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt meanwhile (its default action would end the process past any cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


LOCK_NAME = ".rosa-run.lock"


@contextlib.contextmanager
def run_folder_lock(out: Path):
    """Hold ``out`` for this run: a second run on the same folder is refused while this one lives. An OS lock
    (flock), so a killed process leaves nothing stuck. A folder this call created and nothing else wrote into
    is removed again on the way out."""
    import fcntl

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_NAME, "a+")  # noqa: SIM115 (held for the whole run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunError(
            f"{out} is in use by another rosa run ({holder}); wait for it or choose another output_dir"
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        if created and {p.name for p in out.iterdir()} == {LOCK_NAME}:
            (out / LOCK_NAME).unlink()
            out.rmdir()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


class GracefulStop:
    """The first SIGINT / SIGTERM asks the loop to stop at the next step boundary (where a checkpoint is exact);
    a second one stops at once. Installed only in the main thread (signal handlers cannot be set elsewhere)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested_everywhere(self, ctx: distributed.ProcessContext) -> bool:
        """Whether any rank was asked to stop (every rank must stop at the same step)."""
        flag = float(self.requested)
        return (distributed.all_reduce_sum([flag], ctx)[0] if ctx.distributed else flag) > 0

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\nrosa: {signal.Signals(signum).name}: stopping after this step with a checkpoint "
            "(again to stop at once)",
            file=sys.stderr,
        )


def check_resume_settings(saved: RunConfig, given: RunConfig, keys: list[str]) -> RunConfig:
    """A resumed run keeps the settings it started with: refuse any setting given now that differs, except a
    larger ``train.steps`` (the run is extended; its cosine schedule stretches to the new length). Returns the
    settings the run continues with."""
    for key in keys:
        if key in ("output_dir", "train.steps"):
            continue
        then, now = _setting(saved, key), _setting(given, key)
        if then != now:
            raise RunError(
                f"--resume continues the run with its own settings: {key} was {then!r}, given {now!r} "
                "(drop the override, or start a new run in another output_dir)"
            )
    if "train.steps" in keys:
        if given.train.steps < saved.train.steps:
            raise RunError(
                f"--resume: train.steps={given.train.steps} is fewer than the run's {saved.train.steps}"
            )
        saved.train.steps = given.train.steps
    return saved


def _setting(run: RunConfig, key: str) -> Any:
    """A setting's value; a ``rosa.*`` one as the adapter resolves it (its default when unset, a set of module
    names in sorted order), so ``rosa.r=16`` given again matches a run that left r at its default of 16."""
    if key.startswith("rosa."):  # (a YAML file gives nested keys too: rosa.rank_pattern.q_proj)
        return _get_path({"rosa": run.with_every_rosa_setting().rosa}, key)
    return _get_path(run.to_dict(), key)


def _get_path(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def check_process_count(state: dict[str, Any], ctx: distributed.ProcessContext) -> None:
    """The data order and every rank's RNG belong to the process count the checkpoint was written with."""
    saved_world = int(state.get("processes", 1))
    if saved_world != ctx.world:
        raise RunError(
            f"the checkpoint was written by a run of {saved_world} process(es); resume it with the same number "
            f"(this run has {ctx.world})"
        )
