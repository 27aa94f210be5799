"""The ``rosa`` command's commands: train, eval, merge, mask (the arguments are parsed by :mod:`rosa_cli`).

Every subcommand takes an optional YAML config and ``section.key=value`` overrides (see ``rosa.app.run_config``);
with no arguments at all, ``rosa train`` fine-tunes the built-in SmolLM2-135M on the built-in synthetic task,
offline, and prints exact-match accuracy before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path


class _StderrHandler(logging.StreamHandler):
    """``rosa: message`` on the sys.stderr of the moment (tests swap it between runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("rosa: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging() -> None:
    """rosa's warnings as ``rosa: ...``; other libraries' log lines keep their own form (Python's default)."""
    logger = logging.getLogger("rosa")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.setLevel(logging.WARNING)


@contextlib.contextmanager
def _quiet_third_parties(quiet: bool) -> Iterator[None]:
    """With -q, nothing from other libraries on stderr for this command (restored after: nothing process-wide).

    Their log lines and transformers' progress bars ("Loading weights") go, and so do the deprecation warnings
    they raise at each other (PEFT reading transformers' ``is_gradient_checkpointing``), which a user cannot act
    on (rosa raises neither kind itself). rosa's own warnings and log lines stay.
    """
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    root = logging.getLogger()
    root_level = root.level
    hf_level = hf_logging.get_verbosity()
    hf_bars = hf_logging.is_progress_bar_enabled()
    root.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        root.setLevel(root_level)
        hf_logging.set_verbosity(hf_level)
        if hf_bars:
            hf_logging.enable_progress_bar()


def run_command(args: argparse.Namespace, config_and_overrides: tuple[str | None, list[str]]) -> int:
    """Run a parsed command (``rosa_cli`` parses): a user's mistake is one line, anything else a traceback."""
    _configure_logging()
    try:
        with _quiet_third_parties(args.quiet):
            return _run(args, *config_and_overrides)
    except KeyboardInterrupt as stop:
        import shlex

        from .run_folder import RunStopped

        hint = ""
        if isinstance(stop, RunStopped):  # the folder it ran in: the default one may have been <folder>-2
            folder = shlex.quote(f"output_dir={stop.output_dir}")
            hint = f"; continue with: rosa train --resume {folder} (same config and overrides)"
        print(f"\nrosa: interrupted{hint}", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, config_path: str | None, overrides: list[str]) -> int:
    from .run_config import given_keys, load_run_config

    try:
        run = load_run_config(config_path, overrides)
        given = given_keys(config_path, overrides)
        command = {"train": _train, "eval": _eval, "merge": _merge, "mask": _mask}[args.command]
        return command(run, args, given)
    except Exception as e:  # one clear line for the errors a user can fix; tracebacks for the rest
        if _is_user_error(e):
            print(f"rosa: error: {e}", file=sys.stderr)
            return 2
        raise


def _is_user_error(e: Exception) -> bool:
    from ..serialization import AdapterFileError
    from ..sparse.support import SupportError
    from .default_model import DefaultModelUnavailable
    from .run_config import RunConfigError
    from .run_folder import RunError

    user_errors = (RunConfigError, RunError, AdapterFileError, SupportError, DefaultModelUnavailable)
    return isinstance(e, (*user_errors, FileNotFoundError, ValueError))


def _train(run, args, given: list[str]) -> int:
    from .train import train

    result = train(
        run, resume=args.resume, show_progress=not args.quiet, given_keys=given, overwrite=args.overwrite
    )
    print(f"\nrun folder: {result.output_dir} ({result.steps} steps, {result.wall_seconds:.0f} s)")
    for label, scores in (("before training", result.before), ("after training", result.after)):
        if scores:
            print(
                f"{label + ':':16} exact match {scores['exact_match']:.1%} ({scores['correct']}/{scores['count']}), "
                f"held-out loss {scores['heldout_loss']:.4f}"
            )
    print(f"adapter: {result.adapter}")
    return 0


def _eval(run, args, given: list[str]) -> int:
    from .adapter_source import find_adapter, load_adapter, settle_run
    from .evaluate import evaluate_examples
    from .loading import load_model_and_tokenizer, load_task_examples
    from .mask_job import check_output_file

    source = find_adapter(args.adapter) if args.adapter else None  # before the base model loads
    if args.out:
        check_output_file(Path(args.out), args.overwrite, inputs=(source.folder,) if source else ())
    if source is not None:
        run = settle_run(run, source, given)
    task, _, held_out = load_task_examples(run.data)
    if run.eval.limit is not None:
        held_out = held_out[: run.eval.limit]
    model, tokenizer = load_model_and_tokenizer(run.model, for_training=False)
    if source is not None:
        model = load_adapter(model, source, run.model.name)
    result = evaluate_examples(model, tokenizer, held_out, task, run, "eval", not args.quiet)
    result = {
        "adapter": str(source.folder) if source else None,
        "model": run.model.name,
        "task": task,
        **result,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"{task}: exact match {result['exact_match']:.1%} ({result['correct']}/{result['count']}), "
        f"held-out loss {result['heldout_loss']:.4f} ({run.model.name}"
        + (f" + {source.folder})" if source else ")")
    )
    return 0


def _merge(run, args, given: list[str]) -> int:
    from .adapter_source import find_adapter, settle_model
    from .merge import check_merge_target, merge_adapter_to_disk

    out = Path(os.path.abspath(args.out))
    check_merge_target(
        out, args.overwrite, {"the adapter": Path(args.adapter), "the current folder": Path.cwd()}
    )
    source = find_adapter(args.adapter)
    run = settle_model(run, source, given)
    path = merge_adapter_to_disk(
        run.model,
        source.folder,
        args.out,
        dtype=args.dtype,
        requantize=args.requantize,
        overwrite=args.overwrite,
    )
    print(f"merged model written to {path}")
    return 0


def _mask(run, args, given: list[str]) -> int:
    from .mask_job import collect_mask_only

    path = collect_mask_only(run, Path(args.out), show_progress=not args.quiet, overwrite=args.overwrite)
    print(f"mask written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m rosa.cli``: the same as the ``rosa`` console script."""
    from rosa_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
