"""What a RoSA adapter folder holds, and the checks an untrusted folder must pass before PEFT reads it.

A folder written by ``save_pretrained`` holds ``adapter_config.json`` (``"peft_type": "ROSA"``) and
``adapter_model.safetensors``, whose tensors are named after the layer attributes that hold them, all of which
start with ``PREFIX`` (``...q_proj.rosa_A.weight``, ``...q_proj.rosa_values``, ``...q_proj.rosa_col_idx``). The
sparse part's own layout on disk is :mod:`rosa.sparse.delta`'s. Loading never unpickles: a folder holding only
a pickle is refused.

Two layers of checks, so that every way an adapter reaches a model is covered:

- ``check_adapter_dir`` (a folder, before PEFT opens it): every file PEFT may open is a regular file (a FIFO or a
  device would block or stream forever), the config is a RoSA config of sane size, the safetensors header is
  intact, its tensors are what the config declares and every floating-point tensor is finite. Messages name the
  file. ``RosaConfig.from_pretrained`` runs it (so ``PeftModel.from_pretrained`` and ``load_adapter`` do), as do
  ``rosa.load_rosa_model``, the CLI, and ``RosaModel`` when PEFT builds it inside ``PeftModel.from_pretrained``
  with ``config=`` (see :mod:`rosa.model`).
- ``check_loaded_state_dict`` (the tensors, against the model they are about to be copied into): called by
  ``RosaModel._remap_adapter_state_dict_for_load``, which PEFT's ``set_peft_model_state_dict`` calls on every load
  (``from_pretrained`` with or without ``config=``, ``load_adapter``, ``set_peft_model_state_dict`` itself). Every
  tensor must be one of this adapter's own (a RoSA layer's, a declared ``modules_to_save`` copy or trainable token
  rows) of a module the model has, finite, and every RoSA layer of the adapter must be in it.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import torch

PEFT_TYPE = "ROSA"  # the member rosa adds to PEFT's PeftType, written as "peft_type" in adapter_config.json
PREFIX = "rosa_"  # every adapter attribute of a RoSA layer, hence every tensor name in the file, has it
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
HUB_ID = re.compile(r"[\w][\w.-]*/[\w.-]+")  # 'owner/name': a path that does not exist may be one
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few KB; PEFT would read any size into memory


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
    a file PEFT would open that is not a regular file (a FIFO blocks forever), pickle-only weights (loading must
    never unpickle), an adapter_config.json that is not a RoSA config, a truncated or corrupt safetensors file,
    a tensor the config does not declare, a NaN or infinite value. A folder holding only a config passes
    (``RosaConfig.from_pretrained``). ``load_config``: the config PEFT will load the file under when it is not
    the folder's own (``config=``); the file's tensors must be what that one declares."""
    path = Path(path)
    if not path.is_dir():
        return  # a hub id: ``fetch_hub_adapter`` brings its files here first
    present = {name: regular_file(path / name) for name in (CONFIG_NAME, SAFETENSORS_NAME, *PICKLE_NAMES)}
    config = check_adapter_config(path / CONFIG_NAME) if present[CONFIG_NAME] else {}
    if present[SAFETENSORS_NAME]:
        weights = path / SAFETENSORS_NAME
        keys = _check_safetensors_file(weights)
        check_adapter_keys(weights, keys, config if load_config is None else load_config)
        check_finite_file(weights)
        return
    pickles = [name for name in PICKLE_NAMES if present[name]]
    if pickles:
        raise AdapterFileError(
            f"{path / pickles[0]}: RoSA adapters are loaded from safetensors only, and this folder has no "
            f"{SAFETENSORS_NAME}; refusing to unpickle {pickles[0]}"
        )


def regular_file(file: Path) -> bool:
    """Whether ``file`` exists; refused when it exists but is not a regular file (after symbolic links): a FIFO,
    socket or device would block or stream forever once opened, a folder or a dangling link gives an unclear
    error. A link to a regular file elsewhere is fine (the hub cache links every file into its blobs)."""
    if not os.path.lexists(file):
        return False
    try:
        mode = os.stat(file).st_mode
    except OSError as e:
        kind = "a symbolic link to nothing that can be read" if os.path.islink(file) else "unreadable"
        raise AdapterFileError(f"{file}: {kind} ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise AdapterFileError(
            f"{file}: {_file_kind(mode)}, not a regular file; refusing to open it (reading it could block forever "
            "or never end)"
        )
    return True


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "a special file"


def check_finite_file(file: Path) -> None:
    """Every floating-point tensor of a safetensors file is finite (one tensor in memory at a time)."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            tensor = f.get_tensor(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AdapterFileError(f"{file}: {_name(key)}: contains NaN or infinite values")


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
    config = read_adapter_config(file)
    if config["peft_type"] != PEFT_TYPE:
        raise AdapterFileError(
            f"{file}: peft_type is {_short(config['peft_type'])}, not {PEFT_TYPE!r}: not a RoSA adapter"
        )
    return config


def read_adapter_config(file: Path) -> dict:
    """An adapter config of any PEFT method: a bounded JSON object with a ``peft_type``, or one line naming the
    file."""
    size = file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise AdapterFileError(
            f"{file}: {size} bytes, far larger than any adapter config (at most {MAX_CONFIG_BYTES}); not read"
        )
    try:
        config = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise AdapterFileError(f"{file}: not UTF-8 text, so not an adapter config") from None
    except json.JSONDecodeError as e:
        raise AdapterFileError(
            f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise AdapterFileError(f"{file}: JSON nested too deeply to be an adapter config") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{file}: expected a JSON object, got {_json_kind(config)}")
    if "peft_type" not in config:
        raise AdapterFileError(f"{file}: no 'peft_type' key, so not an adapter config written by PEFT")
    return config


def _name(key: str) -> str:
    """A tensor name as messages print it: as it is, unless it holds characters that would break the line or hide
    (then quoted, escaped and cut)."""
    return key if key.isprintable() and len(key) <= 200 else _short(key)


def _short(value, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message quoting a hostile value stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


TOKEN_DELTA_SUFFIX = ".token_adapter.trainable_tokens_delta"  # PEFT's key for trainable_token_indices' rows
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # what PEFT's save_embedding_layers writes
# Parts that address a wrapper's other copies (the base layer under an adapter, a modules_to_save module's
# original or another adapter's copy): never a name of its own in a saved file.
WRAPPER_PARTS = frozenset({"base_layer", "original_module", "modules_to_save", "token_adapter"})
PEFT_PREFIX = ("base_model", "model")  # what PeftModel puts before the base model's module names


def check_adapter_keys(file: Path, keys: list[str], config: dict) -> None:
    """Every tensor must be one a RoSA adapter saves: a RoSA layer's own (``<layer>.rosa_X`` or
    ``<layer>.rosa_X.weight``), a module the config lists in ``modules_to_save`` (matched as PEFT matches it: the
    module's name ends with the entry), or trainable token rows when the config has ``trainable_token_indices``.
    PEFT loads any other tensor with ``strict=False`` straight into the model, so a file could otherwise overwrite
    base weights, or another adapter's, that no adapter setting asked for. That includes the embedding and output
    head weights PEFT's ``save_embedding_layers`` writes for a resized vocabulary: they replace the base model's
    own, so they load only where the config declares them in ``modules_to_save`` (into a trained copy, as PEFT
    keys them the same way)."""
    saved = config.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    elif isinstance(saved, (list, tuple, set)):
        saved = [m for m in saved if isinstance(m, str) and m]
    else:
        saved = []  # not a list of names: the config's own validation refuses it
    tokens = bool(config.get("trainable_token_indices"))
    for key in keys:
        parts = key.split(".")
        if _is_rosa_key(parts) or (tokens and _is_token_delta(key)):
            continue
        if _plain(parts) and _in_modules_to_save(parts, saved):
            continue
        hint = ""
        if _is_embedding_weight(parts):
            hint = (
                f" (PEFT saves {parts[-2]} for a resized vocabulary; to load it as a trained copy, declare "
                f"modules_to_save=[{parts[-2]!r}] in the adapter config or pass config= with it)"
            )
        raise AdapterFileError(
            f"{file}: tensor {_short(key)} belongs to no RoSA layer and to nothing the config declares "
            f"(modules_to_save, trainable_token_indices); refusing to load it over the model's weights{hint}"
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


def check_adapter_source(
    path: str | os.PathLike,
    subfolder: str | None = None,
    config=None,
    fetch: bool = True,
    **hub_kwargs,
) -> None:
    """Everything checked before an adapter is read, wherever it is: ``check_adapter_folder`` for a local folder
    and, for a hub id given with a ``config`` (PEFT then skips ``RosaConfig.from_pretrained``, which checks hub
    ids otherwise) or with ``fetch``, the files fetched into the cache PEFT reads them from. ``config``: the
    RosaConfig PEFT loads the file under (None: the folder's own). A config that ``RosaConfig.from_pretrained``
    loaded from this very source, unchanged since, was checked then and is not checked again."""
    load_config = None if config is None else config.to_dict()
    source = (os.fspath(path), subfolder)
    if config is not None and getattr(config, "_rosa_checked", None) == (*source, _fingerprint(load_config)):
        return
    check_adapter_folder(path, subfolder, load_config)
    if (config is not None or fetch) and not os.path.exists(os.path.join(path, subfolder or "")):
        folder = fetch_hub_adapter(str(path), subfolder, **hub_kwargs)
        if folder is not None:
            check_adapter_dir(folder, load_config)
    if config is not None:  # PeftModel.from_pretrained, building its RosaModel next, need not check again
        mark_checked(config, path, subfolder)


def mark_checked(config, path: str | os.PathLike, subfolder: str | None) -> None:
    """Record on ``config`` that it was loaded from, and checked against, this source (see
    ``check_adapter_source``)."""
    config._rosa_checked = (os.fspath(path), subfolder, _fingerprint(config.to_dict()))


def _fingerprint(settings: dict) -> str:
    """What the folder check depends on in a config (``check_adapter_keys``): not, e.g., ``inference_mode``,
    which PEFT sets between loading the config and the weights."""
    return repr([settings.get(key) for key in ("modules_to_save", "trainable_token_indices")])
