"""What a run loads: the model and tokenizer, the task's examples, and the learning-rate curve.

Shared by ``rosa train``, ``rosa eval``, ``rosa merge`` and ``rosa mask``, and by the benchmarks, so that each
loads a model and its data the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .data import Example, load_examples, split_rows, synthetic_splits
from .run_config import DataSection, ModelSection, RunConfigError
from .run_folder import RunError

GENERIC_TASKS = {"jsonl": "generic", "csv": "generic", "generic": "generic"}


def load_model_and_tokenizer(
    section: ModelSection, for_training: bool = True, device: torch.device | str | None = None
):
    """A causal LM and its tokenizer from a hub id, a local path or the built-in default, on ``device``
    (default: the CPU). ``trust_remote_code`` is passed explicitly (``model.trust_remote_code``, false by default),
    so transformers never prompts, and never runs a model folder's own Python files unless the user said so."""
    import os

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .default_model import resolve_model_path

    path = resolve_model_path(section.name)
    # transformers would block forever on a FIFO in the folder (config.json, a weight file, ...)
    if os.path.isdir(path):
        for entry in os.scandir(path):
            if not (entry.is_file() or entry.is_dir()):
                raise RunError(
                    f"model {section.name!r}: {entry.path} is not a regular file (a FIFO, socket, device or broken "
                    "link); refusing to read the folder"
                )
    remote = {"trust_remote_code": section.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(path, **remote)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise RunError(
                f"model {section.name!r} ships its own Python code (auto_map in its config), which rosa runs only "
                "with model.trust_remote_code=true"
            ) from None
        reason = (str(e).strip().splitlines() or [""])[0]
        raise RunError(f"model {section.name!r} not found or not a transformers model: {reason}") from None
    custom = section.trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not custom:
        raise RunError(
            f"model {section.name!r} is a {config.model_type!r} model, not a causal language model"
        )
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if section.dtype not in dtypes:
        raise RunConfigError(f"model.dtype must be float32 or bfloat16, got {section.dtype!r}")
    kwargs: dict[str, Any] = {"dtype": dtypes[section.dtype], **remote}
    if section.load_in_4bit:
        from ..merge import nf4_config

        kwargs["quantization_config"] = nf4_config()
    if device is not None and torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}  # 4-bit weights are quantized on the way to the GPU
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **remote)
    if section.load_in_4bit and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=section.gradient_checkpointing
        )
    elif section.gradient_checkpointing and for_training:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, tokenizer


# the run-config keys that choose the generic task's columns, named in missing-column errors
COLUMN_SETTINGS = {"prompt": "data.prompt_column", "response": "data.response_column"}


def load_task_examples(section: DataSection) -> tuple[str, list[Example], list[Example]]:
    """(metric task name, train examples, held-out examples) for the configured data."""
    task = GENERIC_TASKS.get(section.task, section.task)
    if task == "synthetic" and section.path is None:
        train, held_out = synthetic_splits(seed=section.split_seed)
    else:
        if section.path is None:
            raise RunConfigError(f"data.path is required for task {section.task!r}")
        column_map = None
        if task == "generic":
            if not (section.prompt_column and section.response_column):
                raise RunConfigError(
                    "generic jsonl/csv data needs data.prompt_column and data.response_column"
                )
            column_map = {"prompt": section.prompt_column, "response": section.response_column}
        try:
            rows = load_examples(
                task, section.path, split="train", column_map=column_map, column_settings=COLUMN_SETTINGS
            )
            if section.eval_path is not None:
                held_out = load_examples(
                    task,
                    section.eval_path,
                    split="validation",
                    column_map=column_map,
                    column_settings=COLUMN_SETTINGS,
                )
                train = rows
            else:
                if len(rows) <= section.val_size:
                    raise RunConfigError(
                        f"{section.path} has {len(rows)} rows: data.val_size={section.val_size} leaves none to "
                        "train on (lower data.val_size, or give data.eval_path)"
                    )
                train, held_out = split_rows(rows, val_size=section.val_size, seed=section.split_seed)
        except (FileNotFoundError, KeyError) as e:
            raise RunError(str(e)) from None
    if section.train_size is not None:
        train = train[: section.train_size]
    if not train:
        raise RunError("no training examples")
    return task, train, held_out


# --------------------------------------------------------------------------------------------- training


def warmup_cosine(warmup: int, total: int):
    """LR factor per step: linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
