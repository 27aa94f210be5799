"""``rosa train --help``'s list of settings: every key of the run config and of RosaConfig with its default and one
line of help (the run sections' lines here, RosaConfig's from its fields' metadata)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import RosaConfig
from .run_config import RunConfig

# One line of help per setting, shown by ``rosa train --help`` (a test keeps it complete).
HELP = {
    "output_dir": "the run folder (taken: the next free <folder>-2, -3, ... unless given explicitly)",
    "model.name": "the built-in offline default smollm2-135m, a local model folder or a Hugging Face hub id",
    "model.load_in_4bit": "QRoSA: the base weights in bitsandbytes NF4 with double quantization",
    "model.dtype": "compute dtype of a non-quantized base model: float32 or bfloat16",
    "model.gradient_checkpointing": "recompute activations in the backward pass (less memory, more time)",
    "model.trust_remote_code": "run Python code shipped with the model (auto_map); never asked interactively",
    "data.task": "synthetic | gsm8k | viggo | sql | jsonl | csv (jsonl/csv: give the two columns below)",
    "data.path": "a local .jsonl/.csv/.json file, or a Hugging Face dataset name when online",
    "data.eval_path": "a separate held-out file (else data.val_size rows are split off data.path)",
    "data.prompt_column": "jsonl/csv: the column holding the prompt",
    "data.response_column": "jsonl/csv: the column holding the response (the loss is on it alone)",
    "data.max_length": "tokens per example (prompt + response), longer ones are cut",
    "data.train_size": "use at most this many training rows (null: all)",
    "data.val_size": "rows held out for evaluation when there is no data.eval_path",
    "data.split_seed": "seed of the train / held-out split",
    "train.steps": "optimizer steps (--resume with a larger value extends a run)",
    "train.batch_size": "rows per micro-batch (per process)",
    "train.grad_accum": "micro-batches per optimizer step",
    "train.lr": "peak learning rate of A and B (the sparse values: lr / rosa.sparse_lr_ratio)",
    "train.mask_path": "start from a saved mask (rosa mask --out): joint training from step 0",
    "train.weight_decay": "AdamW weight decay (not on biases and norms)",
    "train.lr_warmup_steps": "linear LR warm-up, then cosine decay (null: 10% of train.steps); also the "
    "re-warm-up after the mask (0: that one lasts as many steps as fixing the mask took)",
    "train.max_grad_norm": "gradient clipping (0: none)",
    "train.seed": "seed of the batch order and the adapter's initialisation",
    "train.log_every": "steps between lines of log.jsonl and TensorBoard",
    "train.eval_every": "steps between validation losses on the held-out rows (0: only at the end)",
    "train.save_every": "steps between checkpoints (the last step always gets one)",
    "train.keep_checkpoints": "checkpoints kept in the run folder",
    "eval.before": "score the base model before training too",
    "eval.max_new_tokens": "generation length (null: the task's own)",
    "eval.batch_size": "rows per generation batch",
    "eval.limit": "score at most this many held-out rows (null: all)",
}


def describe_settings() -> str:
    """Every run setting with its default and one line of help: the run sections, then RosaConfig's fields."""
    lines = ["settings (section.key=value on the command line, or the same keys in a YAML file):"]
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        section = getattr(defaults, f.name)
        if f.name == "rosa":
            continue
        if not dataclasses.is_dataclass(section):
            lines.append(_setting_line(f.name, section, HELP.get(f.name, "")))
            continue
        for sf in dataclasses.fields(section):
            key = f"{f.name}.{sf.name}"
            lines.append(_setting_line(key, getattr(section, sf.name), HELP.get(key, "")))
    lines.append("rosa.*: the adapter (RosaConfig; saved in adapter_config.json):")
    for rf in dataclasses.fields(RosaConfig):
        if rf.init and "help" in rf.metadata and rf.name not in ("task_type", "peft_type"):
            default = rf.default if rf.default is not dataclasses.MISSING else rf.default_factory()
            lines.append(_setting_line(f"rosa.{rf.name}", default, rf.metadata["help"]))
    return "\n".join(lines) + "\n"


def _setting_line(key: str, default: Any, text: str) -> str:
    shown = (
        "null" if default is None else str(default).lower() if isinstance(default, bool) else repr(default)
    )
    return f"  {key} = {shown}\n      {text}" if text else f"  {key} = {shown}"
