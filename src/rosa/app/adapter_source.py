"""Where ``rosa eval`` and ``rosa merge`` take an adapter from, and what it was trained on.

``--adapter`` may name an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, any PEFT method)
or a run folder of ``rosa train`` (its ``adapter/``). The base model is the one the adapter records
(``base_model_name_or_path``) and the task the one its run folder records (``run_config.yaml``), unless the user
sets ``model.*`` / ``data.*`` themselves; an adapter that does not fit the base names the base it records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..serialization import PEFT_TYPE
from .run_config import RunConfig, load_run_config
from .run_folder import RunError

CONFIG_NAME, WEIGHTS_NAME, RUN_CONFIG = "adapter_config.json", "adapter_model.safetensors", "run_config.yaml"


@dataclass(frozen=True)
class AdapterSource:
    folder: Path  # the adapter folder itself
    config: dict[str, Any]  # its adapter_config.json
    run_config: Path | None  # the run_config.yaml of the run that wrote it, if it sits in a run folder

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", ""))

    @property
    def base(self) -> str | None:
        base = self.config.get("base_model_name_or_path")
        return base if isinstance(base, str) and base else None


def find_adapter(path: str | Path) -> AdapterSource:
    """The adapter under ``path`` (an adapter folder or a ``rosa train`` run folder), checked before any model
    loads: a RoSA adapter with every check of :func:`rosa.serialization.check_adapter_folder`, any other PEFT
    adapter with those that apply to it (regular files, a readable and finite safetensors file: nothing is ever
    unpickled)."""
    from ..serialization import (
        AdapterFileError,
        check_adapter_folder,
        check_finite_file,
        read_adapter_config,
        regular_file,
    )

    path = Path(path)
    folder = path / "adapter" if (path / RUN_CONFIG).is_file() and (path / "adapter").is_dir() else path
    if not folder.exists():
        raise AdapterFileError(f"{folder}: adapter folder not found")
    if not folder.is_dir():
        raise AdapterFileError(f"{path}: not a folder (give an adapter folder or a rosa train run folder)")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not regular_file(folder / name):
            raise AdapterFileError(
                f"{folder / name}: missing, so {folder} is not an adapter folder written by save_pretrained"
            )
    config = read_adapter_config(folder / CONFIG_NAME)
    if config["peft_type"] == PEFT_TYPE:
        check_adapter_folder(folder)
    else:
        check_finite_file(folder / WEIGHTS_NAME)
    run_config = next((p / RUN_CONFIG for p in (folder, folder.parent) if (p / RUN_CONFIG).is_file()), None)
    return AdapterSource(folder, config, run_config)


def settle_model(run: RunConfig, source: AdapterSource, given: list[str]) -> RunConfig:
    """``run`` with the base model the adapter was trained on, unless the user gave ``model.*``."""
    if not any(k.startswith("model.") for k in given):
        if source.run_config is not None:
            run.model = load_run_config(source.run_config).model
        elif source.base is not None:
            run.model.name = source.base
    return run


def settle_run(run: RunConfig, source: AdapterSource, given: list[str]) -> RunConfig:
    """``run`` with the model, data and evaluation settings the adapter was trained with, except where the user
    gave them."""
    run = settle_model(run, source, given)
    trained = load_run_config(source.run_config) if source.run_config is not None else None
    if not any(k.startswith("data.") for k in given):
        if trained is None:
            raise RunError(
                f"--adapter {source.folder}: no run_config.yaml beside it says what it was trained on; "
                "give the data to score it on (data.task=... data.path=...)"
            )
        run.data = trained.data
    if trained is not None and not any(k.startswith("eval.") for k in given):
        run.eval = trained.eval  # the rows and generation settings the run itself was scored with
    return run


def load_adapter(model: Any, source: AdapterSource, model_name: str) -> Any:
    """``model`` with the adapter loaded: RoSA through rosa's checked loader, other PEFT methods (LoRA, ...)
    through PEFT's own; a base that does not fit is named against the one the adapter records."""
    from peft import PeftModel

    from ..model import load_rosa_model

    try:
        if source.peft_type == PEFT_TYPE:
            return load_rosa_model(model, source.folder)
        loaded = PeftModel.from_pretrained(model, str(source.folder))  # safetensors: checked by find_adapter
        _check_all_tensors_loaded(loaded, source.folder / WEIGHTS_NAME, source.peft_type)
        return loaded
    except (RuntimeError, ValueError, KeyError) as e:
        if source.base is not None and source.base != model_name:
            raise RunError(
                f"--adapter {source.folder} was trained on {source.base} (its {CONFIG_NAME}) and does not fit "
                f"the model given, {model_name}: {str(e).splitlines()[0]}"
            ) from None
        raise


def _check_all_tensors_loaded(model: Any, weights: Path, peft_type: str) -> None:
    """PEFT only warns when a file's tensors are not the adapter's: an adapter that loaded nothing would be
    scored as the base model. Refuse that, naming the file."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    from ..serialization import AdapterFileError

    with safe_open(weights, framework="pt") as f:
        in_file = set(f.keys())
    expected = set(get_peft_model_state_dict(model))
    if in_file != expected:
        missing, unexpected = sorted(expected - in_file), sorted(in_file - expected)
        example = (missing or unexpected)[0]
        raise AdapterFileError(
            f"{weights}: its tensors are not those of the {peft_type} adapter its config "
            f"describes ({len(missing)} missing, {len(unexpected)} unexpected, e.g. {example})"
        )
