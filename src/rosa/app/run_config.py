"""The run configuration of the ``rosa`` command: a YAML file, then ``section.key=value`` overrides.

Every key is declared here with its default, so a misspelt key is an error naming the key and the ones that
exist, never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RosaConfig, RosaConfigError
from ..config_checks import short_repr as _short
from .config_file import RunConfigError, parse_value, read_yaml


@dataclass
class ModelSection:
    name: str = "smollm2-135m"  # the built-in offline default, or any causal LM id or local path
    load_in_4bit: bool = False  # QRoSA: bitsandbytes NF4 with double quantization
    dtype: str = "float32"  # compute dtype of the (non-quantized) base model: float32 or bfloat16
    gradient_checkpointing: bool = False
    # Run the Python files a model folder or hub repo ships (its config's auto_map): off unless set, and never
    # asked interactively (transformers would otherwise prompt [y/N] and run the code on 'y').
    trust_remote_code: bool = False


@dataclass
class DataSection:
    task: str = "synthetic"  # synthetic | gsm8k | viggo | sql | jsonl | csv
    path: str | None = None  # local file, or a Hugging Face dataset name when online
    eval_path: str | None = None  # optional separate evaluation file
    prompt_column: str | None = None  # generic jsonl/csv: column holding the prompt
    response_column: str | None = None  # generic jsonl/csv: column holding the response
    max_length: int = 256
    train_size: int | None = None  # cap on training rows (None: all)
    val_size: int = 64  # rows held out for evaluation when there is no eval_path
    split_seed: int = 0


@dataclass
class TrainSection:
    steps: int = 120
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-3
    mask_path: str | None = None  # start from a saved mask (`rosa mask --out`): no warm-up, no collection
    weight_decay: float = 0.0
    lr_warmup_steps: int | None = None  # linear LR warm-up before the cosine decay (None: 10% of train.steps)
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 5
    eval_every: int = 25  # validation loss on the held-out rows every this many steps (0: only at the end)
    save_every: int = 25
    keep_checkpoints: int = 2


def lr_warmup(train: TrainSection) -> int:
    """The LR warm-up in steps: ``train.lr_warmup_steps``, else 10% of the run (the RoSA schedule's re-warm-up
    after the mask takes the same length; with none, as many steps as fixing the mask took)."""
    return train.lr_warmup_steps if train.lr_warmup_steps is not None else round(0.1 * train.steps)


@dataclass
class EvalSection:
    before: bool = True  # score the base model before training
    max_new_tokens: int | None = None  # None: the task's own default (16 for synthetic, 256 for gsm8k, ...)
    batch_size: int = 16
    limit: int | None = 100  # evaluate on at most this many held-out rows (None: all)


@dataclass
class RunConfig:
    output_dir: str = "runs/rosa-default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    rosa: dict[str, Any] = field(
        default_factory=dict
    )  # RosaConfig fields; unset ones keep RosaConfig's defaults

    def rosa_config(self) -> RosaConfig:
        fixed = ("task_type", "peft_type")  # set by rosa: a causal LM adapter of type ROSA
        known = sorted(f.name for f in dataclasses.fields(RosaConfig) if f.init and f.name not in fixed)
        unknown = sorted(str(key) for key in self.rosa if key not in known)
        if unknown:
            raise RunConfigError(
                f"unknown config key 'rosa.{unknown[0]}'; known keys here: {', '.join(known)}"
            )
        try:
            return RosaConfig(task_type="CAUSAL_LM", **self.rosa)
        except RosaConfigError as e:  # its messages start with the field's name
            name = re.match(r"[a-z_]+", str(e))
            raise RunConfigError(
                f"rosa.{e}" if name and name.group() in known else f"rosa settings: {e}"
            ) from None
        except TypeError as e:
            raise RunConfigError(f"rosa settings: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_every_rosa_setting(self) -> RunConfig:
        """These settings with ``rosa`` holding every RosaConfig setting of the method, defaults resolved: what a
        run folder records, so that a resume goes on with the settings the run started with even where a later
        rosa changes a default."""
        config = self.rosa_config()
        every = {name: _plain(getattr(config, name)) for name in rosa_setting_names()}
        return dataclasses.replace(self, rosa=every)


# RosaConfig fields that are PEFT's bookkeeping (filled in when an adapter is made or saved), not the method's
PEFT_BOOKKEEPING = (
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
)


def rosa_setting_names() -> list[str]:
    """The RosaConfig fields a run config records (``rosa.<name>``)."""
    fields = dataclasses.fields(RosaConfig)
    return [
        f.name for f in fields if f.init and f.name not in PEFT_BOOKKEEPING and f.name != "inference_mode"
    ]


def _plain(value: Any) -> Any:
    """A setting as YAML writes it (PEFT turns a target_modules list into a set)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then ``section.key=value`` overrides (values parsed as YAML scalars)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = read_yaml(path)
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise RunConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RunConfigError(f"override {item!r} must look like section.key=value")
        _set_path(raw, key.strip().split("."), parse_value(value))
    return _build(RunConfig, raw, "")


def given_keys(path: str | Path | None = None, overrides: list[str] | None = None) -> list[str]:
    """The settings a user gave explicitly, as ``section.key`` (the YAML file's leaves, then the overrides)."""
    keys: list[str] = []

    def walk(tree: Any, prefix: str) -> None:
        if isinstance(tree, dict):
            for key, value in tree.items():
                walk(value, f"{prefix}{key}.")
        else:
            keys.append(prefix.rstrip("."))

    if path is not None and Path(path).is_file():
        walk(read_yaml(Path(path)) or {}, "")  # keys only (the file passed load_run_config already)
    keys += [item.partition("=")[0].strip() for item in overrides or []]
    return keys


def _set_path(tree: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise RunConfigError(f"cannot set {'.'.join(keys)}: {key} is not a section")
    tree[keys[-1]] = value


MOVED = {"train.sparse_lr_ratio": "rosa.sparse_lr_ratio"}  # settings that moved, and where to


def _build(cls, raw: dict[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        name = f"{where}{sorted(unknown)[0]}"
        if name in MOVED:
            raise RunConfigError(f"{name} is now {MOVED[name]} (the same meaning, kept with the adapter)")
        raise RunConfigError(f"unknown config key {name!r}; known keys here: {', '.join(sorted(fields))}")
    config = cls()
    hints = typing.get_type_hints(cls)
    for name, value in raw.items():
        current = getattr(config, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise RunConfigError(f"{where}{name} must be a section (a mapping), got {value!r}")
            value = _build(type(current), value, f"{where}{name}.")
        elif name == "rosa":
            if not isinstance(value, dict):
                raise RunConfigError(f"rosa must be a mapping of RosaConfig fields, got {value!r}")
            value = {**current, **value}
        else:
            value = _coerce(value, hints[name], f"{where}{name}")
        setattr(config, name, value)
    if cls is RunConfig:
        config.rosa_config()  # validate the adapter settings now, not after the model is loaded
        validate(config)
    return config


MAX_LR = 1.0  # an AdamW learning rate of 1 or more diverges at once; benchmarks/accuracy.py --lr uses the same bound
MAX_STRING_LENGTH = 4096  # PATH_MAX on Linux; no name or path setting is longer
TASKS = ("synthetic", "gsm8k", "viggo", "sql", "jsonl", "csv", "generic")
MIN_MAX_LENGTH = 32  # shorter sequences cut most prompts before their response starts


def validate(run: RunConfig) -> None:
    """Every run setting checked in one place, before any model or data is loaded: a bad value is one line."""
    t, d, e = run.train, run.data, run.eval
    for name, value, low in (
        ("train.steps", t.steps, 1),
        ("train.batch_size", t.batch_size, 1),
        ("train.grad_accum", t.grad_accum, 1),
        ("train.log_every", t.log_every, 1),
        ("train.save_every", t.save_every, 1),
        ("train.keep_checkpoints", t.keep_checkpoints, 1),
        ("data.max_length", d.max_length, MIN_MAX_LENGTH),
        ("data.val_size", d.val_size, 1),
        ("eval.batch_size", e.batch_size, 1),
    ):
        _check_int(name, value, low)
    for name, value, low in (
        ("data.train_size", d.train_size, 1),
        ("eval.limit", e.limit, 1),
        ("eval.max_new_tokens", e.max_new_tokens, 1),
    ):
        if value is not None:
            _check_int(name, value, low)
    for name, value in (
        ("train.lr", t.lr),
        ("train.weight_decay", t.weight_decay),
        ("train.max_grad_norm", t.max_grad_norm),
    ):
        if not math.isfinite(value) or value < 0:
            raise RunConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    if not 0 < t.lr < MAX_LR:
        raise RunConfigError(
            f"train.lr must be a learning rate in (0, {MAX_LR:g}) (AdamW; typical RoSA rates are 1e-4 to 1e-2), "
            f"got {t.lr!r}"
        )
    _check_strings(run)
    if not isinstance(run.model.name, str) or not run.model.name.strip():
        raise RunConfigError(
            "model.name is empty: give a hub id, a local folder or smollm2-135m (the default)"
        )
    if not isinstance(run.model.trust_remote_code, bool):  # None would let transformers prompt [y/N]
        raise RunConfigError(
            f"model.trust_remote_code must be true or false, got {_short(run.model.trust_remote_code)}"
        )
    if t.lr_warmup_steps is not None:
        _check_int("train.lr_warmup_steps", t.lr_warmup_steps, 0)
        if t.lr_warmup_steps > t.steps:
            raise RunConfigError(
                f"train.lr_warmup_steps={t.lr_warmup_steps} is longer than the run (train.steps={t.steps})"
            )
    _check_int("train.eval_every", t.eval_every, 0)
    if run.model.dtype not in ("float32", "bfloat16"):
        raise RunConfigError(f"model.dtype must be float32 or bfloat16, got {run.model.dtype!r}")
    if d.task not in TASKS:
        raise RunConfigError(f"data.task must be one of {', '.join(TASKS)}, got {d.task!r}")
    if d.task != "synthetic" and d.path is None:
        raise RunConfigError(
            f"data.task={d.task} reads a file: set data.path (a .jsonl/.csv file or a dataset name)"
        )
    if Path(run.output_dir).exists() and not Path(run.output_dir).is_dir():
        raise RunConfigError(f"output_dir {run.output_dir} is an existing file, not a folder")


def _check_strings(run: RunConfig) -> None:
    """No setting holds a NUL or a line break (a path with one fails deep in the OS with an unclear message; a
    name with one would split rosa's one-line messages), nor a string longer than any path or name."""
    sections = {name: getattr(run, name) for name in ("model", "data", "train", "eval")}
    values = [("output_dir", run.output_dir)]
    values += [
        (f"{section}.{f.name}", getattr(obj, f.name))
        for section, obj in sections.items()
        for f in dataclasses.fields(obj)
    ]
    for name, value in values:
        if not isinstance(value, str):
            continue
        if any(c in value for c in "\x00\n\r"):
            raise RunConfigError(f"{name} must not hold a NUL character or a line break, got {_short(value)}")
        if len(value) > MAX_STRING_LENGTH:
            raise RunConfigError(f"{name} is {len(value)} characters long (at most {MAX_STRING_LENGTH})")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RunConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Check a scalar against its field's type (``int | None``, ``str``, ...): ints are accepted for floats, null
    only where the field may be null. (A wrong type would otherwise fail later, deep in a path or a number.)"""
    kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    optional = type(None) in kinds
    kind = next((k for k in kinds if k is not type(None)), None)
    if value is None:
        if optional or kind not in _KINDS:
            return value
        raise RunConfigError(f"{name} must be {_KINDS[kind]}, got null")
    if kind is bool:
        if not isinstance(value, bool):
            raise RunConfigError(f"{name} must be true or false, got {_short(value)}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise RunConfigError(f"{name} must be a finite number, got {_short(value)}") from None
    if kind in _KINDS and (isinstance(value, bool) or not isinstance(value, kind)):
        raise RunConfigError(
            f"{name} must be {_KINDS[kind]}{' or null' if optional else ''}, got {_short(value)}"
        )
    return value


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
