"""What ``rosa merge`` may write over, and the one-line errors of ``rosa eval``/``rosa merge`` for damaged adapter
folders and of ``rosa train`` for unusable data files, on a tiny random LLaMA and a real saved adapter."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import set_random_masks
from transformers import LlamaForCausalLM

import rosa
from rosa.cli import main

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A genuine RoSA adapter (mask, values, LoRA) for the tiny model."""
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    config = rosa.RosaConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, density=0.05)
    model = rosa.get_rosa_model(base, config)
    set_random_masks(model)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    assert {p.name for p in path.iterdir()} >= ADAPTER_FILES
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rosa: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _merge(model_dir, adapter, out, *extra: str) -> int:
    args = ["merge", f"model.name={model_dir}", "--adapter", str(adapter), "--out", str(out)]
    return main([*args, "--dtype", "float32", *extra])


def _precious(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "notes.txt").write_text("years of work")
    return folder / "sub" / "notes.txt"


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# --- rosa merge --out ------------------------------------------------------------------------------------------


def test_merge_refuses_a_non_empty_folder_and_deletes_nothing(tiny_model_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    notes = _precious(out)
    assert _merge(tiny_model_dir, adapter_dir, out) == 2
    line = _one_error_line(capsys)
    assert str(out) in line and "not empty" in line and "--overwrite" in line
    assert notes.read_text() == "years of work" and sorted(p.name for p in out.iterdir()) == ["sub"]
    assert _siblings(out) == []
    # what may be written without --overwrite: an empty folder, or one that does not exist yet
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "nested"):
        assert _merge(tiny_model_dir, adapter_dir, out) == 0
        assert (out / "model.safetensors").is_file() and _siblings(out) == []


def test_merge_checks_the_target_before_loading_anything(tmp_path, capsys):
    """Neither the model nor the adapter exists: the refusal must be about --out, so it came first."""
    out = tmp_path / "merged"
    _precious(out)
    assert _merge(tmp_path / "no-model", tmp_path / "no-adapter", out) == 2
    assert f"merge output {out} is a folder that is not empty" in _one_error_line(capsys)


def test_merge_overwrite_replaces_a_folder(tiny_model_dir, adapter_dir, tmp_path):
    out = tmp_path / "merged"
    _precious(out)
    assert _merge(tiny_model_dir, adapter_dir, out, "--overwrite") == 0
    names = {p.name for p in out.iterdir()}
    assert "sub" not in names and {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert _siblings(out) == []  # neither the new folder's staging copy nor the old folder is left behind


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_merge_never_replaces_a_file_or_a_link(tiny_model_dir, adapter_dir, tmp_path, capsys, overwrite):
    target = tmp_path / "model.bin"
    target.write_text("not a folder")
    link = tmp_path / "link"
    _precious(tmp_path / "real")
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    for out, kind in ((target, "a file"), (link, "a symbolic link")):
        assert _merge(tiny_model_dir, adapter_dir, out, *overwrite) == 2
        assert f"merge output {out} is {kind}, not a folder" in _one_error_line(capsys)
    assert target.read_text() == "not a folder"
    assert (tmp_path / "real" / "sub" / "notes.txt").read_text() == "years of work"
    assert _merge(tiny_model_dir, adapter_dir, target / "below", *overwrite) == 2
    assert f"{target} is a file, not a folder" in _one_error_line(capsys)


def test_merge_overwrite_never_replaces_its_own_inputs(tiny_model_dir, adapter_dir, tmp_path, capsys):
    """--overwrite on the folder holding the adapter (here a copy, inside the run folder) or the base model."""
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "adapter")
    for out, label in (
        (run, "the adapter"),
        (run / "adapter", "the adapter"),
        (tiny_model_dir, "the base model"),
    ):
        assert _merge(tiny_model_dir, run / "adapter", out, "--overwrite") == 2
        assert f"merge output {out} holds {label}" in _one_error_line(capsys)
    assert {p.name for p in (run / "adapter").iterdir()} >= ADAPTER_FILES
    assert (tiny_model_dir / "config.json").is_file()


# --- damaged adapter folders -----------------------------------------------------------------------------------


def _damage(folder: Path, case: str) -> Path:
    """Edit a copy of a genuine adapter; returns the file the message must name."""
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if case == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif case == "garbage_weights":
        weights.write_bytes(b"\x00" * 8 + b"not a header")
    elif case == "no_weights":
        weights.unlink()
    elif case == "config_list":
        config.write_text("[1, 2]")
    elif case == "config_not_json":
        config.write_text("{peft_type: ROSA")
    elif case == "config_without_peft_type":
        settings = json.loads(config.read_text())
        del settings["peft_type"]
        config.write_text(json.dumps(settings))
    elif case == "config_of_lora":
        config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "LORA"}))
    elif case == "config_bad_rank":
        config.write_text(json.dumps({**json.loads(config.read_text()), "r": "two"}))
    else:  # pragma: no cover
        raise ValueError(case)
    return config if case.startswith("config") else weights


DAMAGE = {
    "truncated_weights": "not a readable safetensors file",
    "garbage_weights": "not a readable safetensors file",
    "no_weights": "missing",
    "config_list": "expected a JSON object, got a list",
    "config_not_json": "not valid JSON",
    "config_without_peft_type": "no 'peft_type' key",
    "config_of_lora": "peft_type is 'LORA', not 'ROSA'",
    "config_bad_rank": "r must be a non-negative integer, got 'two'",
}


@pytest.mark.parametrize("command", ["eval", "merge"])
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_adapter_is_one_line_naming_the_file(
    tiny_model_dir, adapter_dir, tmp_path, capsys, case, command
):
    folder = tmp_path / "adapter"
    shutil.copytree(adapter_dir, folder)
    named = _damage(folder, case)
    out = tmp_path / "out"
    message = DAMAGE[case]
    if command == "eval" and case == "config_of_lora":  # eval scores any PEFT adapter: the file is not LoRA's
        named, message = folder / "adapter_model.safetensors", "not those of the LORA adapter its config"
    argv = [command, "-q", f"model.name={tiny_model_dir}", "data.task=synthetic", "--adapter", str(folder)]
    assert main([*argv, "--out", str(out)]) == 2
    assert re.search(
        rf"^rosa: error: {re.escape(str(named))}: .*{re.escape(message)}", _one_error_line(capsys)
    )
    assert not out.exists()


@pytest.mark.parametrize("command", ["eval", "merge"])
def test_missing_adapter_folder(tiny_model_dir, tmp_path, capsys, command):
    missing = tmp_path / "runs" / "nope" / "adapter"
    out = tmp_path / "out"
    assert (
        main([command, "-q", f"model.name={tiny_model_dir}", "--adapter", str(missing), "--out", str(out)])
        == 2
    )
    assert _one_error_line(capsys) == f"rosa: error: {missing}: adapter folder not found"
    assert not out.exists()


# --- data files ------------------------------------------------------------------------------------------------


def _train_on(tmp_path: Path, model_dir: Path, data: Path, *overrides: str) -> int:
    return main(
        [
            "train",
            "-q",
            f"model.name={model_dir}",
            f"output_dir={tmp_path / 'run'}",
            f"data.path={data}",
            *overrides,
        ]
    )


GENERIC = ["data.task=jsonl", "data.prompt_column=instruction", "data.response_column=output"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "the file has no rows"),
        ("header-only.csv", b"instruction,output\n", "the file has no rows"),
        ("latin1.jsonl", '{"instruction": "caf\u00e9", "output": "x"}\n'.encode("latin-1"), "not UTF-8 text"),
        ("latin1.csv", "instruction,output\ncaf\u00e9,x\n".encode("latin-1"), "not UTF-8 text"),
        ("numbers.jsonl", b"1\n2\n", r"numbers.jsonl:1: expected a JSON object"),
    ],
)
def test_unreadable_data_file_is_named(tiny_model_dir, tmp_path, capsys, name, content, message):
    data = tmp_path / name
    data.write_bytes(content)
    task = ["data.task=csv", *GENERIC[1:]] if name.endswith(".csv") else GENERIC
    assert _train_on(tmp_path, tiny_model_dir, data, *task) == 2
    line = _one_error_line(capsys)
    assert str(tmp_path) in line and re.search(message, line), line
    assert not (tmp_path / "run").exists()


def test_missing_generic_column_names_the_setting_and_the_file(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"a": "x", "b": "y"}) + "\n")
    generic = ["data.task=jsonl", "data.prompt_column=instruction", "data.response_column=b"]
    assert _train_on(tmp_path, tiny_model_dir, data, *generic) == 2
    line = _one_error_line(capsys)
    assert line == f"rosa: error: data.prompt_column='instruction' not found in {data}; columns: a, b"


def test_missing_task_columns_name_the_task_columns_and_the_file(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"a": "x", "b": "y"}) + "\n")
    assert _train_on(tmp_path, tiny_model_dir, data, "data.task=gsm8k") == 2
    assert _one_error_line(capsys) == (
        "rosa: error: task 'gsm8k' expects columns 'question', 'answer'; 'question', 'answer' not found in "
        f"{data}; columns: a, b"
    )
