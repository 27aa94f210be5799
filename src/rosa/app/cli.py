"""The ``rosa`` command: train, eval, merge, mask.

Every subcommand takes an optional YAML config and ``section.key=value`` overrides (see ``rosa.app.run_config``);
with no arguments at all, ``rosa train`` fine-tunes the built-in SmolLM2-135M on the built-in synthetic task,
offline, and prints exact-match accuracy before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

EXAMPLES = """
examples:
  rosa train                                   # built-in model + task, offline, ~minutes on a CPU
  rosa train my.yaml train.steps=500 rosa.density=0.006
  rosa train data.task=jsonl data.path=pairs.jsonl data.prompt_column=instruction data.response_column=output
  rosa train --load-in-4bit                    # QRoSA (= model.load_in_4bit=true)
  rosa train --resume output_dir=runs/rosa-default
  rosa eval --adapter runs/rosa-default/adapter
  rosa merge --adapter runs/rosa-default/adapter --out merged/
  rosa mask --out mask.safetensors rosa.mask_steps=32
"""


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's own parser, by name."""
    parser = argparse.ArgumentParser(
        prog="rosa",
        description="Fine-tune causal language models with RoSA (low-rank + sparse adaptation).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", nargs="?", help="YAML run config (optional)")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        p.add_argument(
            "--load-in-4bit", action="store_true", help="QRoSA: NF4 base (same as model.load_in_4bit=true)"
        )

    p = sub.add_parser(
        "train",
        help="fine-tune with RoSA and evaluate before/after",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(p)
    p.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir from its last checkpoint"
    )

    p = sub.add_parser("eval", help="score a model (optionally with an adapter) on the held-out split")
    common(p)
    p.add_argument("--adapter", help="folder written by save_pretrained / rosa train (omit: the base model)")
    p.add_argument("--out", help="write the results JSON here (default: print only)")

    p = sub.add_parser(
        "merge", help="merge an adapter into its base model and save a plain transformers model"
    )
    common(p)
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="output folder for the merged model")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--requantize", action="store_true", help="save 4-bit NF4 again (lossy; default: lossless)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out if it is a non-empty folder (never a file)"
    )

    p = sub.add_parser("mask", help="run warm-up and mask collection only, and save the mask")
    common(p)
    p.add_argument("--out", required=True, help="mask file (.safetensors)")
    return parser, dict(sub.choices)


def _parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options may stand anywhere among the overrides (``rosa train a=1 -q b=2``).

    ``parse_intermixed_args`` refuses a parser with subcommands, so the top level only picks the command and
    the command's own parser reads the rest, intermixed.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands = _parsers()
    if argv and argv[0] in commands:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def _split_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """argparse cannot tell 'config' from a first override; an argument with '=' is an override."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        overrides.insert(0, config)
        config = None
    if args.load_in_4bit:
        overrides.append("model.load_in_4bit=true")
    return config, overrides


def main(argv: list[str] | None = None) -> int:
    """Parse first: torch, PEFT and transformers are imported only by the command that runs (not for --help)."""
    args = parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    _configure_logging()
    with _quiet_third_parties(args.quiet):
        return _run(args)


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
    # bitsandbytes (imported by PEFT) tries to fetch an optional CPU kernel from the hub and warns when offline.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


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


def _run(args: argparse.Namespace) -> int:
    """Load the run config and run the command; a user's mistake is one line, anything else a traceback."""
    from .run_config import load_run_config

    try:
        config_path, overrides = _split_overrides(args)
        run = load_run_config(config_path, overrides)
        if args.command == "train":
            return _train(run, args)
        if args.command == "eval":
            return _eval(run, args)
        if args.command == "merge":
            return _merge(run, args)
        return _mask(run, args)
    except KeyboardInterrupt:
        print(
            "\nrosa: interrupted; continue with: rosa train --resume (same config and overrides)",
            file=sys.stderr,
        )
        return 130
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


def _train(run, args) -> int:
    from .run_config import given_keys
    from .train import train

    keys = given_keys(*_split_overrides(args))
    result = train(run, resume=args.resume, show_progress=not args.quiet, given_keys=keys)
    before = result.before["exact_match"] if result.before else None
    after = result.after["exact_match"] if result.after else None
    print(f"\nrun folder: {result.output_dir} ({result.steps} steps, {result.wall_seconds:.0f} s)")
    if before is not None:
        print(
            f"exact match before training: {before:.1%} ({result.before['correct']}/{result.before['count']})"
        )
    if after is not None:
        print(f"exact match after training:  {after:.1%} ({result.after['correct']}/{result.after['count']})")
    return 0


def _eval(run, args) -> int:
    from ..model import load_rosa_model
    from ..serialization import check_adapter_folder
    from .train import evaluate_heldout, load_model_and_tokenizer, load_task_examples

    if args.adapter:
        check_adapter_folder(args.adapter)  # before the base model loads
    task, _, held_out = load_task_examples(run.data)
    if run.eval.limit is not None:
        held_out = held_out[: run.eval.limit]
    model, tokenizer = load_model_and_tokenizer(run.model, for_training=False)
    if args.adapter:
        model = load_rosa_model(model, args.adapter)
    result = evaluate_heldout(model, tokenizer, held_out, task, run, "eval", not args.quiet)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(
        f"exact match: {result['exact_match']:.1%} ({result['correct']}/{result['count']}), "
        f"held-out loss {result['heldout_loss']:.4f}"
    )
    return 0


def _merge(run, args) -> int:
    from .merge import merge_adapter_to_disk

    path = merge_adapter_to_disk(
        run.model,
        args.adapter,
        args.out,
        dtype=args.dtype,
        requantize=args.requantize,
        overwrite=args.overwrite,
    )
    print(f"merged model written to {path}")
    return 0


def _mask(run, args) -> int:
    from .train import collect_mask_only

    path = collect_mask_only(run, Path(args.out), show_progress=not args.quiet)
    print(f"mask written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
