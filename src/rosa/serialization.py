"""What a RoSA adapter folder holds, and the checks an untrusted folder must pass before PEFT reads it.

A folder written by ``save_pretrained`` holds ``adapter_config.json`` (``"peft_type": "ROSA"``) and
``adapter_model.safetensors``, whose tensors are named after the layer attributes that hold them, all of which
start with ``PREFIX`` (``...q_proj.rosa_A.weight``, ``...q_proj.rosa_values``, ``...q_proj.rosa_col_idx``). The
sparse part's own layout on disk is :mod:`rosa.sparse.delta`'s. Loading never unpickles: a folder holding only
a pickle is refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

PEFT_TYPE = "ROSA"  # the member rosa adds to PEFT's PeftType, written as "peft_type" in adapter_config.json
PREFIX = "rosa_"  # every adapter attribute of a RoSA layer, hence every tensor name in the file, has it
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
HUB_ID = re.compile(r"[\w][\w.-]*/[\w.-]+")  # 'owner/name': a path that does not exist may be one


class AdapterFileError(ValueError):
    """An adapter file (or state dict) cannot be loaded into this model."""


def check_float_tensor(key: str, tensor: torch.Tensor, shape: torch.Size) -> None:
    """A trainable tensor read from a file: finite floats of exactly the shape the layer was built with."""
    if not tensor.is_floating_point():
        raise AdapterFileError(f"{key}: expected a floating-point tensor, got {tensor.dtype}")
    if tensor.shape != shape:
        raise AdapterFileError(
            f"{key}: shape {tuple(tensor.shape)} does not match the model's {tuple(shape)} "
            "(different rank, density or base model?)"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterFileError(f"{key}: contains NaN or infinite values")


def check_adapter_dir(path: str | os.PathLike, load_config: dict | None = None) -> None:
    """Refuse a local adapter folder PEFT would load unsafely or with a traceback, naming the file at fault:
    pickle-only weights (loading must never unpickle), an adapter_config.json that is not a RoSA config, a
    truncated or corrupt safetensors file. A folder holding only a config passes (``RosaConfig.from_pretrained``).
    ``load_config``: the config PEFT will load the file under when it is not the folder's own (``config=``); the
    file's tensors must be what that one declares."""
    path = Path(path)
    if not path.is_dir():
        return  # a hub id: ``fetch_hub_adapter`` brings its files here first
    config = check_adapter_config(path / CONFIG_NAME) if (path / CONFIG_NAME).is_file() else {}
    if (path / SAFETENSORS_NAME).is_file():
        keys = _check_safetensors_file(path / SAFETENSORS_NAME)
        check_adapter_keys(path / SAFETENSORS_NAME, keys, config if load_config is None else load_config)
        return
    pickles = [name for name in PICKLE_NAMES if (path / name).exists()]
    if pickles:
        raise AdapterFileError(
            f"{path / pickles[0]}: RoSA adapters are loaded from safetensors only, and this folder has no "
            f"{SAFETENSORS_NAME}; refusing to unpickle {pickles[0]}"
        )


def fetch_hub_adapter(repo_id: str, subfolder: str | None = None, **kwargs) -> Path | None:
    """Download a hub adapter's config and safetensors file (into the cache PEFT reads them from next) and return
    their folder, so that ``check_adapter_dir`` sees what PEFT will load; ``None`` for an id that cannot be a hub
    repo (a missing local path, which PEFT reports). A config that cannot be fetched is refused with the reason,
    once (PEFT would retry the same download). A repo without the safetensors file is refused: PEFT would fall back
    to unpickling ``adapter_model.bin``. ``kwargs``: whatever of ``hf_hub_download``'s arguments PEFT passes on
    (``revision``, ``cache_dir``, ``token``, ...); pin ``revision`` to a commit so both reads see the same files."""
    import inspect

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    if not HUB_ID.fullmatch(repo_id):
        return None  # a local path that does not exist: PEFT's loader says so
    accepted = inspect.signature(hf_hub_download).parameters
    hub_kwargs = {k: v for k, v in kwargs.items() if k in accepted and k != "filename"}  # not config=, ...
    where = f"{repo_id}/{subfolder}" if subfolder else repo_id
    try:
        hf_hub_download(repo_id, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
    except Exception as e:  # no such repo or file, offline: said once here rather than retried by PEFT
        reason = (str(e).strip().splitlines() or [""])[0]
        raise AdapterFileError(
            f"{where}: no local folder of that name, and {CONFIG_NAME} cannot be fetched from the hub "
            f"({type(e).__name__}: {reason})"
        ) from None
    try:
        weights = hf_hub_download(repo_id, SAFETENSORS_NAME, subfolder=subfolder, **hub_kwargs)
    except LocalEntryNotFoundError:
        raise AdapterFileError(
            f"{where}: {SAFETENSORS_NAME} is not in the local hub cache and the hub cannot be reached; RoSA "
            "adapters are loaded from safetensors only"
        ) from None
    except EntryNotFoundError:
        raise AdapterFileError(
            f"{where}: no {SAFETENSORS_NAME} on the hub; RoSA adapters are loaded from safetensors only, and "
            f"PEFT's fallback to a pickled {PICKLE_NAMES[0]} is refused"
        ) from None
    return Path(weights).parent


def check_adapter_config(file: Path) -> dict:
    """The config must be a JSON object of a RoSA adapter; PEFT indexes it blindly (TypeError, KeyError)."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise AdapterFileError(f"{file}: not UTF-8 text, so not an adapter config") from None
    except json.JSONDecodeError as e:
        raise AdapterFileError(
            f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{file}: expected a JSON object, got {_json_kind(config)}")
    if "peft_type" not in config:
        raise AdapterFileError(f"{file}: no 'peft_type' key, so not an adapter config written by PEFT")
    if config["peft_type"] != PEFT_TYPE:
        raise AdapterFileError(
            f"{file}: peft_type is {config['peft_type']!r}, not {PEFT_TYPE!r}: not a RoSA adapter"
        )
    return config


TOKEN_DELTA_SUFFIX = ".token_adapter.trainable_tokens_delta"  # PEFT's key for trainable_token_indices' rows
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's save_embedding_layers (a resized vocabulary)
# Parts that address a wrapper's other copies (the base layer under an adapter, a modules_to_save module's
# original or another adapter's copy): never a name of its own in a saved file.
WRAPPER_PARTS = frozenset({"base_layer", "original_module", "modules_to_save", "token_adapter"})
PEFT_PREFIX = ("base_model", "model")  # what PeftModel puts before the base model's module names


def check_adapter_keys(file: Path, keys: list[str], config: dict) -> None:
    """Every tensor must be one a RoSA adapter saves: a RoSA layer's own (``<layer>.rosa_X`` or
    ``<layer>.rosa_X.weight``), a module the config lists in ``modules_to_save`` (matched as PEFT matches it: the
    module's name ends with the entry), trainable token rows when the config has ``trainable_token_indices``, or
    an embedding / output head weight (PEFT's ``save_embedding_layers``, written for a resized vocabulary). PEFT
    loads any other tensor with ``strict=False`` straight into the model, so a file could otherwise overwrite
    base weights, or another adapter's, that no adapter setting asked for."""
    saved = config.get("modules_to_save") or []
    saved = [saved] if isinstance(saved, str) else [m for m in saved if isinstance(m, str) and m]
    tokens = bool(config.get("trainable_token_indices"))
    for key in keys:
        parts = key.split(".")
        if _is_rosa_key(parts) or (tokens and _is_token_delta(key)):
            continue
        if _plain(parts) and (_in_modules_to_save(parts, saved) or _is_embedding_weight(parts)):
            continue
        raise AdapterFileError(
            f"{file}: tensor {key!r} belongs to no RoSA layer and to nothing the config declares "
            "(modules_to_save, trainable_token_indices); refusing to load it over the model's weights"
        )


def _is_rosa_key(parts: list[str]) -> bool:
    """``<layer>.rosa_X`` or ``<layer>.rosa_X.weight``, with no other RoSA or wrapper part on the way."""
    tail = 2 if parts[-1] == "weight" else 1
    head = parts[:-tail]
    return len(parts) > tail and parts[-tail].startswith(PREFIX) and _plain(head)


def _is_token_delta(key: str) -> bool:
    return key.endswith(TOKEN_DELTA_SUFFIX) and _plain(key[: -len(TOKEN_DELTA_SUFFIX)].split("."))


def _plain(parts: list[str]) -> bool:
    """No RoSA attribute and no wrapper part among ``parts``: a path through the base model's own modules."""
    return not any(p.startswith(PREFIX) or p in WRAPPER_PARTS for p in parts)


def _in_modules_to_save(parts: list[str], saved: list[str]) -> bool:
    """A parameter below a module whose name ends with an entry (PEFT's rule), the module being one of the base
    model's own (not PeftModel's wrappers around it)."""
    first = len(PEFT_PREFIX) + 1 if tuple(parts[: len(PEFT_PREFIX)]) == PEFT_PREFIX else 1
    return any(".".join(parts[:i]).endswith(m) for i in range(first, len(parts)) for m in saved)


def _is_embedding_weight(parts: list[str]) -> bool:
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in EMBEDDING_LAYER_NAMES


def _json_kind(value) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return kinds.get(type(value), "null")


def _check_safetensors_file(file: Path) -> list[str]:
    """Parse the header (safetensors validates every tensor's dtype, shape and byte range against the file);
    the tensor names."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise AdapterFileError(
            f"{file}: not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None


def check_adapter_folder(
    path: str | os.PathLike, subfolder: str | None = None, load_config: dict | None = None
) -> None:
    """Everything ``load_rosa_model`` checks before loading, for callers that fail fast (before the base model
    loads): ``check_adapter_dir``, and a local folder that exists and holds both files. A missing path that could
    be a hub id ('owner/name') passes here; its files are checked once fetched (``fetch_hub_adapter``)."""
    local = Path(path, subfolder or "")
    if not local.exists():
        if isinstance(path, str) and HUB_ID.fullmatch(path):
            return
        raise AdapterFileError(f"{local}: adapter folder not found")
    if not local.is_dir():
        raise AdapterFileError(
            f"{path}: not a folder; pass the adapter folder (holding {CONFIG_NAME} and {SAFETENSORS_NAME})"
        )
    check_adapter_dir(local, load_config)
    for name in (CONFIG_NAME, SAFETENSORS_NAME):
        if not (local / name).is_file():
            raise AdapterFileError(
                f"{local / name}: missing, so {local} is not an adapter folder written by save_pretrained"
            )
