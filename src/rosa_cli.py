"""The ``rosa`` command's front: arguments and help, answered without importing torch, PEFT or rosa itself.

``import rosa`` registers RoSA with PEFT and so imports PEFT (seconds); ``rosa --help``, ``rosa --version`` and a
mistyped command should not wait for that, so the console script starts here and imports the application
(:mod:`rosa.app.cli`) only to run a command. ``rosa train --help`` lists every setting with its default, which
needs the config classes, and so takes as long as ``import rosa``.
"""

from __future__ import annotations

import argparse
import logging
import sys

# bitsandbytes (imported by PEFT, so by ``import rosa``) logs at import time, on CPUs with AVX512-BF16, that it could
# not fetch an optional CPU kernel from the hub: a line about its own download on every command, whatever -q says.
# The command sets its logger's level before it imports rosa; ``python -m rosa.cli`` imports rosa first and so still
# shows it there.
_IMPORT_NOTICES = ("bitsandbytes.backends.cpu.ops",)

SETTINGS_HINT = "\nevery setting, with its default and meaning: rosa train --help\n"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rosa")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _settings() -> str:
    from rosa.app.settings_help import describe_settings

    return "\n" + describe_settings()


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


def _parsers(
    with_settings: bool = False,
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's own parser, by name; ``with_settings``: ``train --help`` lists
    every setting (which loads the config classes, and so torch and PEFT)."""
    parser = argparse.ArgumentParser(
        prog="rosa",
        description="Fine-tune causal language models with RoSA (low-rank + sparse adaptation).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rosa {_version()}")
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
        epilog=EXAMPLES + (_settings() if with_settings else SETTINGS_HINT),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its last checkpoint (with train.steps=N: extend a finished run)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in output_dir (only the files rosa train writes are removed)",
    )

    p = sub.add_parser("eval", help="score a model (optionally with an adapter) on the held-out split")
    common(p)
    p.add_argument(
        "--adapter",
        help="an adapter folder (any PEFT method) or a rosa train run folder; its base model and task are "
        "used unless model.*/data.* are given (omit: the base model alone)",
    )
    p.add_argument("--out", help="write the results JSON here (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser(
        "merge", help="merge an adapter into its base model and save a plain transformers model"
    )
    common(p)
    p.add_argument(
        "--adapter",
        required=True,
        help="an adapter folder or a rosa train run folder (its base model is used)",
    )
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
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser, dict(sub.choices)


def _parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options may stand anywhere among the overrides (``rosa train a=1 -q b=2``).

    ``parse_intermixed_args`` refuses a parser with subcommands, so the top level only picks the command and
    the command's own parser reads the rest, intermixed.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    wants_help = bool(argv) and argv[0] == "train" and ("-h" in argv or "--help" in argv)
    parser, commands = _parsers(with_settings=wants_help)
    if argv and argv[0] in commands:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def split_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
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
    for name in _IMPORT_NOTICES:
        logging.getLogger(name).setLevel(logging.ERROR)
    from rosa.app.cli import run_command

    return run_command(args, split_overrides(args))


if __name__ == "__main__":
    sys.exit(main())
