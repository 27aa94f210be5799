"""Hostile adapter folders through every way an adapter reaches a model (issue 30, items 4, 6, 10 and 11).

Each case is a genuine saved adapter with one thing changed, loaded through each load path: ``rosa.load_rosa_model``
with and without ``config=``, ``PeftModel.from_pretrained`` (after ``import rosa``) with and without ``config=``,
``PeftModel.load_adapter`` under a new name, and ``RosaConfig.from_pretrained`` where the case is about the folder.
Every case must be refused with rosa's one-line error (``AdapterFileError``, or ``RosaConfigError`` for a setting
no layer can take) saying what is wrong, before anything is copied into the base model; the genuine folders load
through every path (the controls). ``HOSTILE`` at the end counts the cases.

What PEFT does before any RoSA code runs is pinned at the end (``test_pin_*``): those are the limits of what rosa
can check without patching PEFT (see ``rosa.model``'s docstring).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import rosa_llama, set_random_masks, word_llama
from peft import PeftModel
from safetensors.torch import load_file, save_file

import rosa
from rosa import AdapterFileError, RosaConfig, RosaConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

PREFIX = "base_model.model."
LAYER = f"{PREFIX}model.layers.0.self_attn.q_proj"
EMBED, HEAD, NORM = (
    f"{PREFIX}model.embed_tokens.weight",
    f"{PREFIX}lm_head.weight",
    f"{PREFIX}model.norm.weight",
)
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
SETTINGS = {"r": 4, "lora_alpha": 8, "density": 0.05}  # what rosa_llama() saves


def _config(**extra) -> RosaConfig:
    return RosaConfig(task_type="CAUSAL_LM", **SETTINGS, **extra)


def _saved(folder: Path, **extra) -> Path:
    model = rosa_llama(_config(**extra))
    set_random_masks(model)
    if extra.get("modules_to_save"):
        with torch.no_grad():
            model.base_model.model.model.norm.modules_to_save["default"].weight.add_(0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory.mktemp("genuine"))


@pytest.fixture(scope="module")
def declared(tmp_path_factory) -> Path:
    """An adapter that declares modules_to_save=['norm']: its file holds a trained copy of the norm weight."""
    return _saved(tmp_path_factory.mktemp("declared"), modules_to_save=["norm"])


# --- the load paths ----------------------------------------------------------------------------------------------


def _load_adapter(base, path, config):
    model = rosa.get_rosa_model(base, config)
    model.load_adapter(str(path), adapter_name="other")
    return model


LOADERS: dict[str, Callable] = {
    "rosa": lambda base, path, config: rosa.load_rosa_model(base, path),
    "rosa_config": lambda base, path, config: rosa.load_rosa_model(base, path, config=config),
    "peft": lambda base, path, config: PeftModel.from_pretrained(base, str(path)),
    "peft_config": lambda base, path, config: PeftModel.from_pretrained(base, str(path), config=config),
    "load_adapter": _load_adapter,
}
MODEL_LOADERS = sorted(LOADERS)
FOLDER_LOADERS = [*MODEL_LOADERS, "config_only"]  # RosaConfig.from_pretrained: the folder check alone
REFUSED = (AdapterFileError, RosaConfigError)


def _base_weights(base) -> dict[str, torch.Tensor]:
    inner = base.model
    return {
        "embed": inner.embed_tokens.weight.detach().clone(),
        "norm": inner.norm.weight.detach().clone(),
        "head": base.lm_head.weight.detach().clone(),
    }


def _assert_refused(loader: str, path: Path, pattern: str, config: RosaConfig | None = None) -> str:
    """The load is refused with one line matching ``pattern``, and the base model's own weights are unchanged."""
    if loader == "config_only":
        with pytest.raises(REFUSED) as err:
            RosaConfig.from_pretrained(str(path))
    else:
        base = word_llama()
        before = _base_weights(base)
        with pytest.raises(REFUSED) as err:
            LOADERS[loader](base, path, config or _config())
        after = _base_weights(base)
        assert all(torch.equal(before[k], after[k]) for k in before)
    message = str(err.value)
    assert "\n" not in message and len(message) < 1200, message
    assert re.search(pattern, message), message
    return message


# --- the controls: genuine folders load through every path ----------------------------------------------------


@pytest.mark.parametrize("loader", MODEL_LOADERS)
def test_genuine_adapters_load_through_every_path(genuine, declared, loader):
    model = LOADERS[loader](word_llama(), genuine, _config())
    name = "other" if loader == "load_adapter" else "default"
    assert rosa.rosa_layers(model)[LAYER].nnz(name) == 51
    model = LOADERS[loader](word_llama(), declared, _config(modules_to_save=["norm"]))
    copy = model.base_model.model.model.norm.modules_to_save[name].weight
    assert torch.equal(copy, load_file(declared / WEIGHTS)[NORM])


# --- tensors: base weights, non-finite values, layers that do not exist or are missing --------------------------


def _set(key: str, make: Callable[[dict], torch.Tensor]) -> Callable[[dict], None]:
    return lambda tensors: tensors.__setitem__(key, make(tensors))


def _drop_layer(tensors: dict) -> None:
    for key in [k for k in tensors if k.startswith(f"{LAYER}.")]:
        del tensors[key]


def _keep_only_norm(tensors: dict) -> None:
    """The declared copies of every *norm module, and nothing of the RoSA layers."""
    for key in [k for k in tensors if "norm" not in k]:
        del tensors[key]


def _nan_at(tensor: torch.Tensor, value: float = math.nan) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[tensor.numel() // 2] = value
    return tensor


UNDECLARED = r"belongs to no RoSA layer and to nothing the config declares"
# case -> (edit of the tensors, the folder's modules_to_save or None, what the message must say)
TENSOR_CASES = {
    "embedding_nan": (
        _set(EMBED, lambda t: torch.full((64, 32), math.nan)),
        None,
        rf"'{EMBED}' {UNDECLARED}",
    ),
    "embedding_zeros": (
        _set(EMBED, lambda t: torch.zeros(64, 32)),
        None,
        rf"'{EMBED}' {UNDECLARED}.*resized",
    ),
    "embedding_wrong_shape": (_set(EMBED, lambda t: torch.zeros(65, 32)), None, rf"'{EMBED}' {UNDECLARED}"),
    "head_inf": (_set(HEAD, lambda t: torch.full((64, 32), math.inf)), None, rf"'{HEAD}' {UNDECLARED}"),
    "norm_zeros": (_set(NORM, lambda t: torch.zeros(32)), None, rf"'{NORM}' {UNDECLARED}"),
    "base_layer_weight": (
        _set(f"{LAYER}.base_layer.weight", lambda t: torch.zeros(32, 32)),
        None,
        UNDECLARED,
    ),
    "declared_nan": (_set(NORM, lambda t: _nan_at(t[NORM])), ["norm"], rf"{WEIGHTS}: {NORM}: contains NaN"),
    "declared_minus_inf": (
        _set(NORM, lambda t: _nan_at(t[NORM], -math.inf)),
        ["norm"],
        rf"{WEIGHTS}: {NORM}: contains NaN",
    ),
    "declared_wrong_shape": (
        _set(NORM, lambda t: torch.ones(33)),
        ["norm"],
        r"norm\.modules_to_save\.(default|other)\.weight: shape \(33,\) does not match the model's \(32,\)",
    ),
    "declared_int": (
        _set(NORM, lambda t: torch.ones(32, dtype=torch.int32)),
        ["norm"],
        r"norm\.modules_to_save\.(default|other)\.weight: expected a floating-point tensor",
    ),
    "declared_and_nothing_else": (_keep_only_norm, ["norm"], r"hold none of the 14 RoSA layers"),
    "values_bf16_inf": (
        _set(f"{LAYER}.rosa_values", lambda t: _nan_at(t[f"{LAYER}.rosa_values"], math.inf).bfloat16()),
        None,
        rf"{WEIGHTS}: {LAYER}\.rosa_values: contains NaN",
    ),
    "lora_b_nan_float64": (
        _set(f"{LAYER}.rosa_B.weight", lambda t: _nan_at(t[f"{LAYER}.rosa_B.weight"]).double()),
        None,
        rf"{LAYER}\.rosa_B\.weight: contains NaN",
    ),
    "layer_that_does_not_exist": (
        _set(LAYER.replace("layers.0", "layers.7") + ".rosa_A.weight", lambda t: torch.zeros(4, 32)),
        None,
        r"layers\.7\.self_attn\.q_proj\.rosa_A\.weight': the model has no such parameter",
    ),
    "rosa_name_that_does_not_exist": (
        _set(f"{LAYER}.rosa_bogus", lambda t: torch.zeros(3)),
        None,
        r"q_proj\.rosa_bogus': the model has no such parameter",
    ),
    "another_adapters_tensor": (
        _set(f"{LAYER}.rosa_A.other.weight", lambda t: torch.zeros(4, 32)),
        None,
        r"rosa_A\.other\.weight",
    ),
    "missing_layer": (_drop_layer, None, r"no tensors for RoSA layer .*layers\.0\.self_attn\.q_proj'"),
    "missing_lora_b": (
        lambda t: t.pop(f"{LAYER}.rosa_B.weight"),
        None,
        r"q_proj\.rosa_B\.(default|other)\.weight: missing from the adapter's tensors",
    ),
    "no_tensors_at_all": (lambda t: t.clear(), None, r"hold none of the 14 RoSA layers"),
    "unicode_trick_in_name": (
        _set(LAYER.replace("q_proj", "q_pr\u043ej") + ".rosa_A.weight", lambda t: torch.zeros(4, 32)),
        None,
        r"q_pr\u043ej\.rosa_A\.weight': the model has no such parameter",
    ),
    "line_break_in_name": (
        _set(f"{PREFIX}model.norm\nrosa: ok.weight", lambda t: torch.zeros(32)),
        None,
        r"model\.norm\\nrosa: ok\.weight' belongs to no RoSA layer",
    ),
    "very_long_name": (_set(PREFIX + "x" * 20_000 + ".weight", lambda t: torch.zeros(1)), None, r"\.\.\."),
}


# refused by the folder check, naming the file (undeclared names, non-finite values); the others need the model
SEEN_IN_THE_FOLDER = {
    "embedding_nan",
    "embedding_zeros",
    "embedding_wrong_shape",
    "head_inf",
    "norm_zeros",
    "base_layer_weight",
    "another_adapters_tensor",
    "declared_nan",
    "declared_minus_inf",
    "values_bf16_inf",
    "lora_b_nan_float64",
    "line_break_in_name",
    "very_long_name",
}


def _write_case(genuine: Path, declared: Path, dest: Path, case: str) -> tuple[Path, RosaConfig]:
    edit, saved, _ = TENSOR_CASES[case]
    source = declared if saved else genuine
    shutil.copytree(source, dest)
    tensors = load_file(source / WEIGHTS)
    edit(tensors)
    save_file(tensors, dest / WEIGHTS)
    return dest, _config(modules_to_save=saved) if saved else _config()


@pytest.mark.parametrize("loader", FOLDER_LOADERS)
@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_hostile_tensors_are_refused_on_every_load_path(genuine, declared, tmp_path, case, loader):
    path, config = _write_case(genuine, declared, tmp_path / "adapter", case)
    pattern = TENSOR_CASES[case][2]
    if loader == "config_only" and case not in SEEN_IN_THE_FOLDER:
        # the folder alone is fine (a missing layer, a tensor the model lacks): only a model can tell
        assert isinstance(RosaConfig.from_pretrained(str(path)), RosaConfig)
        return
    _assert_refused(loader, path, pattern, config)


def test_the_refusal_names_the_file_and_the_tensor_for_non_finite_values(declared, tmp_path):
    """Item 4's wording: one line, naming the file and the tensor, on every path that reads a folder."""
    path, config = _write_case(declared, declared, tmp_path / "adapter", "declared_nan")
    for loader in FOLDER_LOADERS:
        message = _assert_refused(loader, path, "NaN", config)
        assert str(path / WEIGHTS) in message and NORM in message, (loader, message)


# --- raw safetensors headers no writer produces -----------------------------------------------------------------


def _raw_file(header: bytes | dict, data: bytes = b"", length: int | None = None) -> bytes:
    header = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(header) if length is None else length) + header + data


F32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
RAW_CASES = {
    "header_length_huge": _raw_file(b"{}", length=1 << 60),
    "header_length_past_the_end": _raw_file(b"{}", length=4096),
    "duplicate_tensor_names": _raw_file(
        b'{"a.rosa_values": %s, "a.rosa_values": %s}'
        % (json.dumps(F32).encode(), json.dumps({**F32, "data_offsets": [4, 8]}).encode()),
        b"\0" * 8,
    ),
    "overlapping_tensors": _raw_file(
        {"a": {**F32, "shape": [2], "data_offsets": [0, 8]}, "b": F32}, b"\0" * 8
    ),
    "shape_larger_than_the_data": _raw_file({"a": {**F32, "shape": [1 << 40]}}, b"\0" * 4),
    "header_not_json": _raw_file(b"\xff\xfe not json"),
    "metadata_not_strings": _raw_file({"__metadata__": {"a": [1, 2]}}),
    "unknown_dtype": _raw_file({"a": {**F32, "dtype": "F128"}}, b"\0" * 4),
    "empty_file": b"",
}


@pytest.mark.parametrize("loader", FOLDER_LOADERS)
@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_malformed_safetensors_headers_are_refused(genuine, tmp_path, case, loader):
    path = tmp_path / "adapter"
    shutil.copytree(genuine, path)
    (path / WEIGHTS).write_bytes(RAW_CASES[case])
    _assert_refused(loader, path, rf"{WEIGHTS}: not a readable safetensors file")


# --- files that are not regular files (item 10), links ---------------------------------------------------------


@contextlib.contextmanager
def _unblock_after(fifo: Path, seconds: float = 30.0):
    """If something opens ``fifo`` for reading and blocks, a child process opens it for writing after ``seconds``
    and closes it, so a regression fails the test (a read of nothing) instead of hanging the suite. A child, not a
    thread: the blocked open may hold the GIL (safetensors' does)."""
    child = subprocess.Popen(["sh", "-c", 'sleep "$1"; : > "$2"', "sh", str(seconds), str(fifo)])
    try:
        yield
    finally:
        child.kill()
        child.wait()


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    short = Path(tempfile.mkdtemp(prefix="rosa-sock-", dir="/tmp"))  # AF_UNIX paths are at most 107 bytes
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(short / "s"))  # the socket file stays after the socket is closed
    path.symlink_to(short / "s")


# case -> (which file, how it is replaced, what the message must say)
SPECIAL_CASES = {
    "fifo_weights": (WEIGHTS, _fifo, r"a named pipe \(FIFO\), not a regular file"),
    "fifo_config": (CONFIG, _fifo, r"a named pipe \(FIFO\), not a regular file"),
    "fifo_pickle_beside_nothing": ("adapter_model.bin", _fifo, r"a named pipe \(FIFO\)"),
    "link_to_a_character_device": (WEIGHTS, lambda p: p.symlink_to("/dev/zero"), r"a character device"),
    "link_to_a_socket": (WEIGHTS, _socket, r"a socket, not a regular file"),
    "folder_in_place_of_the_weights": (WEIGHTS, lambda p: p.mkdir(), r"a folder, not a regular file"),
    "dangling_link": (WEIGHTS, lambda p: p.symlink_to(p.parent / "nowhere"), r"a symbolic link to nothing"),
    "link_loop": (WEIGHTS, lambda p: p.symlink_to(p), r"a symbolic link to nothing"),
}
# PeftModel.from_pretrained and load_adapter read adapter_config.json in PEFT (to learn its peft_type) before any
# RoSA code runs: a FIFO there is reported by PEFT as "Can't find" (it never opens it), see test_pin_*
PEFT_READS_THE_CONFIG_FIRST = {"fifo_config"}


@pytest.mark.parametrize("loader", FOLDER_LOADERS)
@pytest.mark.parametrize("case", sorted(SPECIAL_CASES))
def test_special_files_are_refused_before_they_are_opened(genuine, tmp_path, case, loader):
    name, make, pattern = SPECIAL_CASES[case]
    path = tmp_path / "adapter"
    shutil.copytree(genuine, path)
    if name == "adapter_model.bin":
        (path / WEIGHTS).unlink()
    else:
        (path / name).unlink()
    make(path / name)
    if case in PEFT_READS_THE_CONFIG_FIRST and loader in ("peft", "load_adapter"):
        with (
            _unblock_after(path / name),
            pytest.raises(ValueError, match=r"Can't find 'adapter_config\.json'"),
        ):
            LOADERS[loader](word_llama(), path, _config())
        return
    started = time.monotonic()
    with _unblock_after(path / name) if (path / name).is_fifo() else contextlib.nullcontext():
        _assert_refused(loader, path, rf"{re.escape(str(path / name))}: .*{pattern}")
    assert time.monotonic() - started < 25  # refused, not unblocked by the watchdog


def test_links_to_regular_files_elsewhere_load(genuine, tmp_path):
    """The control: the hub cache links every file of a snapshot to a blob outside it; that must keep working."""
    blobs, path = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    path.mkdir()
    for name in (WEIGHTS, CONFIG):
        shutil.copy(genuine / name, blobs / name)
        (path / name).symlink_to(blobs / name)
    for loader in MODEL_LOADERS:
        LOADERS[loader](word_llama(), path, _config())


def test_a_config_larger_than_any_adapter_config_is_not_read(genuine, tmp_path):
    path = tmp_path / "adapter"
    shutil.copytree(genuine, path)
    settings = json.loads((path / CONFIG).read_text())
    (path / CONFIG).write_text(json.dumps({**settings, "padding": "x" * (2 << 20)}))
    for loader in ("rosa", "rosa_config", "peft_config", "config_only"):
        _assert_refused(loader, path, r"adapter_config\.json: \d+ bytes, far larger than any adapter config")


# --- settings in adapter_config.json (items 5 and 11, wrong JSON types) -----------------------------------------

NOT_A_NUMBER = float("nan")
# field -> (value, what the message must say)
CONFIG_CASES = {
    "lora_alpha_nan": ("lora_alpha", NOT_A_NUMBER, r"lora_alpha must be a finite number, got nan"),
    "lora_alpha_infinity": ("lora_alpha", math.inf, r"lora_alpha must be a finite number, got inf"),
    "lora_alpha_minus_infinity": ("lora_alpha", -math.inf, r"lora_alpha must be a finite number"),
    "lora_alpha_1e300": ("lora_alpha", 1e300, r"lora_alpha must be a number in \(0, 1e\+06\]"),
    "lora_alpha_zero": ("lora_alpha", 0, r"lora_alpha must be a number in \(0"),
    "lora_alpha_negative": ("lora_alpha", -8, r"lora_alpha must be a number in \(0"),
    "lora_alpha_string": ("lora_alpha", "32", r"lora_alpha must be a number, got '32'"),
    "lora_alpha_bool": ("lora_alpha", True, r"lora_alpha must be a number, got True"),
    "r_huge": ("r", 10**9, r"r=1000000000 is larger than any layer"),
    "r_float": ("r", 4.5, r"r must be a non-negative integer, got 4\.5"),
    "r_string": ("r", "4", r"r must be a non-negative integer, got '4'"),
    "rank_pattern_huge": (
        "rank_pattern",
        {"q_proj": 10**9},
        r"rank_pattern\['q_proj'\]=1000000000 is larger",
    ),
    "rank_pattern_list": ("rank_pattern", [4], r"rank_pattern must be a mapping"),
    "alpha_pattern_nan": (
        "alpha_pattern",
        {"q_proj": NOT_A_NUMBER},
        r"alpha_pattern\['q_proj'\] must be a finite",
    ),
    "density_nan": ("density", NOT_A_NUMBER, r"density must be a number in \[0, 1\], got nan"),
    "density_pattern_above_one": ("density_pattern", {"q_proj": 2}, r"density_pattern\['q_proj'\] must be"),
    "global_capacity_factor_nan": (
        "global_capacity_factor",
        NOT_A_NUMBER,
        r"global_capacity_factor must be a finite number, got nan",
    ),
    "global_capacity_factor_below_one": (
        "global_capacity_factor",
        0.5,
        r"global_capacity_factor must be a number",
    ),
    "mask_memory_budget_infinity": (
        "mask_memory_budget",
        math.inf,
        r"mask_memory_budget must be a finite number",
    ),
    "lora_dropout_string": ("lora_dropout", "0.1", r"lora_dropout must be a number, got '0\.1'"),
    "use_rslora_string": ("use_rslora", "yes", r"use_rslora must be true or false"),
    "target_modules_number": ("target_modules", 5, r"target_modules must be a module name, a list of them"),
    "target_modules_bad_regex": ("target_modules", "(q_proj", r"target_modules is not a valid regex"),
    "target_modules_list_of_numbers": (
        "target_modules",
        [1, 2],
        r"target_modules must hold non-empty module names",
    ),
    "modules_to_save_number": ("modules_to_save", 5, r"modules_to_save must be a module name, a list"),
    "layers_to_transform_negative": (
        "layers_to_transform",
        [-1],
        r"layers_to_transform must be a list of non",
    ),
    "trainable_token_indices_string": (
        "trainable_token_indices",
        "x",
        r"trainable_token_indices must be a list",
    ),
    "mask_steps_negative": ("mask_steps", -1, r"mask_steps must be a non-negative integer"),
    "peft_type_not_a_string": ("peft_type", 5, r"peft_type is 5, not 'ROSA'"),
    # accepted by the config, refused where the layers are built, before anything is allocated for them
    "target_modules_an_embedding": ("target_modules", ["embed_tokens"], r"linear layers only.*embed_tokens"),
    "target_modules_a_norm": (
        "target_modules",
        ["norm"],
        r"linear layers only.*model\.norm \(LlamaRMSNorm\)",
    ),
    "target_modules_attention_block": (
        "target_modules",
        ["self_attn"],
        r"self_attn \(LlamaAttention\): it has no",
    ),
    "rank_above_the_layer": (
        "rank_pattern",
        {"q_proj": 33},
        r"rank 33 for .*q_proj exceeds the layer's own rank",
    ),
}
BUILT_AT_INJECTION = {
    "target_modules_an_embedding",
    "target_modules_a_norm",
    "target_modules_attention_block",
}
BUILT_AT_INJECTION |= {"rank_above_the_layer"}
PEFT_READS_PEFT_TYPE = {"peft_type_not_a_string"}  # PEFT looks the config class up by it, before rosa


@pytest.mark.parametrize("loader", ["rosa", "peft", "load_adapter", "config_only"])
@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_hostile_settings_in_the_adapter_config_are_refused(genuine, tmp_path, case, loader):
    field, value, pattern = CONFIG_CASES[case]
    path = tmp_path / "adapter"
    shutil.copytree(genuine, path)
    settings = json.loads((path / CONFIG).read_text())
    (path / CONFIG).write_text(
        json.dumps({**settings, field: value})
    )  # NaN/Infinity: Python's JSON, as PEFT's
    if case in PEFT_READS_PEFT_TYPE and loader in ("peft", "load_adapter"):
        with pytest.raises(KeyError):  # pinned: PEFT's lookup of an unknown peft_type
            LOADERS[loader](word_llama(), path, _config())
        return
    if case in BUILT_AT_INJECTION:
        if loader == "config_only":
            RosaConfig.from_pretrained(str(path))  # a valid config; the model decides
            return
        _assert_refused(loader, path, pattern)
        return
    message = _assert_refused(loader, path, rf"{re.escape(str(path / CONFIG))}: .*{pattern}")
    assert "rosa: error" not in message


@pytest.mark.parametrize("loader", ["rosa_config", "peft_config"])
def test_the_folders_own_settings_do_not_matter_under_config(genuine, tmp_path, loader):
    """The control: given ``config=``, PEFT loads the file under that config and never reads the folder's own, so
    a NaN lora_alpha there is harmless and the adapter loads."""
    path = tmp_path / "adapter"
    shutil.copytree(genuine, path)
    settings = json.loads((path / CONFIG).read_text())
    (path / CONFIG).write_text(json.dumps({**settings, "lora_alpha": NOT_A_NUMBER}))
    model = LOADERS[loader](word_llama(), path, _config())
    assert rosa.rosa_layers(model)[LAYER].scaling["default"] == 2.0


def _mutated(field: str, value) -> RosaConfig:
    config = _config()
    setattr(config, field, value)  # after validation: the object PEFT is given
    return config


# a RosaConfig object changed after construction, given as config= or to get_rosa_model
OBJECT_CASES = {
    "lora_alpha_nan": ("lora_alpha", NOT_A_NUMBER, r"lora_alpha must be a finite number"),
    "r_huge": ("r", 10**9, r"r=1000000000 is larger than any layer"),
    "global_capacity_factor_nan": ("global_capacity_factor", NOT_A_NUMBER, r"global_capacity_factor must be"),
    "target_modules_number": ("target_modules", 5, r"target_modules must be a module name"),
    "density_above_one": ("density", 1.5, r"density must be a number in \[0, 1\]"),
}


@pytest.mark.parametrize("loader", ["rosa_config", "peft_config", "get_rosa_model"])
@pytest.mark.parametrize("case", sorted(OBJECT_CASES))
def test_a_config_object_changed_after_construction_is_refused(genuine, case, loader):
    field, value, pattern = OBJECT_CASES[case]
    config = _mutated(field, value)
    if loader == "get_rosa_model":
        with pytest.raises(RosaConfigError, match=pattern):
            rosa.get_rosa_model(word_llama(), config)
        return
    _assert_refused(loader, genuine, pattern, config)


# --- sizes checked against the layer before anything is allocated (item 11) ------------------------------------


@pytest.mark.parametrize(
    ("settings", "pattern"),
    [
        (
            {"r": 17},
            r"rank 17 for model\.layers\.0\.self_attn\.k_proj exceeds the layer's own rank min\(16, 32\)",
        ),
        ({"r": 60_000}, r"rank 60000 for .* exceeds the layer's own rank"),
        (
            {"r": 4, "rank_pattern": {"down_proj": 40}},
            r"rank 40 for .*down_proj exceeds .*min\(32, 64\) = 32",
        ),
        ({"r": 100_000}, r"r=100000 is larger than any layer rosa can adapt \(at most 65536"),
        ({"r": 4, "target_modules": ".*"}, r"RoSA cannot adapt model \(LlamaModel\): it has no weight"),
    ],
    ids=["above_k_proj", "huge_within_bound", "rank_pattern", "above_the_bound", "regex_matching_everything"],
)
def test_sizes_are_refused_before_allocation(settings, pattern):
    """A rank the layer cannot have is refused naming the layer, before its matrices are allocated (60000 x 64
    floats would be allocated otherwise; 10**9 died in the allocator)."""
    with pytest.raises(RosaConfigError, match=pattern):
        rosa.get_rosa_model(
            word_llama(), RosaConfig(task_type="CAUSAL_LM", lora_alpha=8, density=0.05, **settings)
        )


def test_a_rank_equal_to_the_layers_own_is_accepted():
    """The control: min(out, in) itself is a valid rank (k_proj is 16 x 32)."""
    model = rosa.get_rosa_model(
        word_llama(), RosaConfig(task_type="CAUSAL_LM", r=16, lora_alpha=8, density=0.05)
    )
    assert rosa.rosa_layers(model)[f"{PREFIX}model.layers.0.self_attn.k_proj"].r["default"] == 16


# --- the CLI's eval and merge use the same checks ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    model = rosa.get_rosa_model(base, RosaConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, density=0.05))
    set_random_masks(model)
    path = tmp_path_factory.mktemp("cli-adapter")
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["eval", "merge"])
@pytest.mark.parametrize("case", ["embedding_nan", "fifo_weights", "lora_alpha_nan"])
def test_cli_eval_and_merge_refuse_hostile_adapters_in_one_line(
    tiny_model_dir, cli_adapter, tmp_path, capsys, case, command
):
    from rosa.cli import main

    path = tmp_path / "adapter"
    shutil.copytree(cli_adapter, path)
    if case == "embedding_nan":
        tensors = load_file(path / WEIGHTS)
        tensors[EMBED] = torch.full((2, 2), math.nan)
        save_file(tensors, path / WEIGHTS)
        named = rf"{re.escape(str(path / WEIGHTS))}: tensor '{EMBED}'"
    elif case == "fifo_weights":
        (path / WEIGHTS).unlink()
        os.mkfifo(path / WEIGHTS)
        named = rf"{re.escape(str(path / WEIGHTS))}:? (a named pipe|is not a regular file)"
    else:
        settings = json.loads((path / CONFIG).read_text())
        (path / CONFIG).write_text(json.dumps({**settings, "lora_alpha": NOT_A_NUMBER}))
        named = rf"{re.escape(str(path / CONFIG))}: lora_alpha must be a finite number"
    out = tmp_path / "out"
    args = [command, "-q", f"model.name={tiny_model_dir}", "data.task=synthetic", "--adapter", str(path)]
    with _unblock_after(path / WEIGHTS) if case == "fifo_weights" else contextlib.nullcontext():
        code = main([*args, "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rosa: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert re.search(named, lines[0]), lines[0]
    assert not out.exists()


# --- pins: what PEFT does before any RoSA code runs (item 6) -----------------------------------------------------


class _WritesMarker:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_only(genuine: Path, folder: Path, payload) -> Path:
    folder.mkdir()
    shutil.copy(genuine / CONFIG, folder)
    if all(isinstance(v, torch.Tensor) for v in payload.values()):
        torch.save(payload, folder / "adapter_model.bin")  # what PEFT's own pickle fallback reads
    else:
        with open(folder / "adapter_model.bin", "wb") as f:
            pickle.dump(payload, f)
    return folder


def test_pin_peft_from_pretrained_locals_rosa_reads():
    """RosaModel finds PEFT's from_pretrained on the stack and reads its model_id, kwargs and config: pin them."""
    from rosa.model import _PEFT_FROM_PRETRAINED

    assert {"model_id", "kwargs", "config"} <= set(_PEFT_FROM_PRETRAINED.co_varnames)
    assert _PEFT_FROM_PRETRAINED is PeftModel.from_pretrained.__func__.__code__


def test_pin_config_path_is_checked_only_by_rosa_model(genuine, tmp_path, monkeypatch):
    """Given config=, PEFT reads the folder itself: with RosaModel's source check switched off, a pickle-only
    folder reaches torch's unpickler (PEFT's weights_only=True refuses the code, which is what stands between the
    payload and the user then); with it on, rosa refuses the pickle before anything is unpickled."""
    import rosa.model

    marker = tmp_path / "UNPICKLED"
    folder = _pickle_only(genuine, tmp_path / "pickled", {"x": _WritesMarker(str(marker))})
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin: .*refusing to unpickle"):
        PeftModel.from_pretrained(word_llama(), str(folder), config=_config())
    monkeypatch.setattr(rosa.model, "_check_peft_load_source", lambda config: None)
    with pytest.raises(pickle.UnpicklingError):
        PeftModel.from_pretrained(word_llama(), str(folder), config=_config())
    assert not marker.exists()


def test_pin_load_adapter_into_a_loaded_name_reads_the_file_first(genuine, tmp_path):
    """The one path with no RoSA code before PEFT reads the file: load_adapter under a name already loaded. Its
    tensors are still checked (a base weight in a pickle is refused) and torch's weights_only refuses code."""
    model = rosa.load_rosa_model(word_llama(), genuine)
    tensors = {**load_file(genuine / WEIGHTS), NORM: torch.zeros(32)}
    folder = _pickle_only(genuine, tmp_path / "pickled", tensors)
    with pytest.raises(AdapterFileError, match=rf"tensor '{NORM}' is not a tensor of adapter 'default'"):
        model.load_adapter(str(folder), adapter_name="default")
    assert model.base_model.model.model.norm.weight.all()
    marker = tmp_path / "UNPICKLED"
    bad = _pickle_only(genuine, tmp_path / "payload", {"x": _WritesMarker(str(marker))})
    with pytest.raises(pickle.UnpicklingError):
        model.load_adapter(str(bad), adapter_name="default")
    assert not marker.exists()


def test_pin_a_declared_module_missing_from_the_file(declared, tmp_path):
    """A file that declares modules_to_save=['norm'] but lacks one of the copies: PEFT looks each declared tensor up
    blindly (a KeyError, before RoSA's tensor check can run); rosa.load_rosa_model names the file and tensor."""
    path = tmp_path / "adapter"
    shutil.copytree(declared, path)
    tensors = load_file(path / WEIGHTS)
    del tensors[NORM]
    save_file(tensors, path / WEIGHTS)
    for loader in ("rosa", "rosa_config"):
        _assert_refused(
            loader,
            path,
            rf"{WEIGHTS}: no tensor '{NORM}', which the adapter config declares",
            _config(modules_to_save=["norm"]),
        )
    for loader in ("peft", "peft_config"):
        with pytest.raises(KeyError, match=NORM):
            LOADERS[loader](word_llama(), path, _config(modules_to_save=["norm"]))


@pytest.mark.parametrize(
    ("text", "peft_error"),
    [("{peft_type", json.JSONDecodeError), ('{"r": 4}', KeyError), ("[" * 50_000, RecursionError)],
    ids=["not_json", "no_peft_type", "nested_too_deeply"],
)
def test_pin_peft_reads_the_config_before_rosa_can(genuine, tmp_path, text, peft_error):
    """PeftModel.from_pretrained reads adapter_config.json to learn which method it is (PEFT's
    ``PeftConfig._get_peft_type``) before any RoSA code runs, and raises its own error; rosa's loaders name the
    file in one line. Pinned: if PEFT starts reporting these itself, this test says so."""
    path = tmp_path / "adapter"
    shutil.copytree(genuine, path)
    (path / CONFIG).write_text(text)
    with pytest.raises(peft_error):
        PeftModel.from_pretrained(word_llama(), str(path))
    for loader in ("rosa", "config_only"):
        _assert_refused(loader, path, rf"{re.escape(str(path / CONFIG))}: ")


# --- the count ------------------------------------------------------------------------------------------------

# distinct hostile inputs this module tries, by class (each through the load paths its test names)
HOSTILE = {
    "tensors": len(TENSOR_CASES),
    "safetensors headers": len(RAW_CASES),
    "special files": len(SPECIAL_CASES) + 1,  # + the oversized config
    "adapter config settings": len(CONFIG_CASES),
    "config objects": len(OBJECT_CASES),
    "sizes": 5,
    "cli": 3,
    "pins": 7,
}
