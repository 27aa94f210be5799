"""Hostile or careless settings (issue 30, items 5, 8 and 9): run settings and YAML run configs are refused before
any work starts (exit 2, one line naming the setting or the file, nothing created), RosaConfig refuses every value
it cannot use, and a model folder's own Python code never runs unless the user sets ``model.trust_remote_code``,
and never behind a prompt. ``HOSTILE`` at the end counts the cases."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rosa import RosaConfig, RosaConfigError
from rosa.app.run_config import ModelSection, RunConfigError, load_run_config
from rosa.cli import main


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rosa: error: ") and "Traceback" not in err, err[-3000:]
    assert not lines[0].startswith("rosa: error: rosa:"), lines[0]  # the doubled prefix
    return lines[0]


def _train(tmp_path: Path, *args: str, config: Path | None = None) -> tuple[int, Path]:
    out = tmp_path / "run"
    started = time.monotonic()
    first = [str(config)] if config is not None else []
    code = main(["train", "-q", *first, "model.name=/nonexistent-model", f"output_dir={out}", *args])
    # refused while reading the settings: the model (which does not exist) was never looked for
    assert time.monotonic() - started < 20
    return code, out


# --- run settings: non-finite, absurd, of the wrong type ----------------------------------------------------------

OVERRIDES = {
    "lora_alpha_nan": ("rosa.lora_alpha=.nan", r"rosa\.lora_alpha must be a finite number, got nan"),
    "lora_alpha_inf": ("rosa.lora_alpha=.inf", r"rosa\.lora_alpha must be a finite number, got inf"),
    "lora_alpha_1e300": ("rosa.lora_alpha=1e300", r"rosa\.lora_alpha must be a number in \(0, 1e\+06\]"),
    "lora_alpha_string": ("rosa.lora_alpha='32'", r"rosa\.lora_alpha must be a number, got '32'"),
    "lr_1e30": ("train.lr=1e30", r"train\.lr must be a learning rate in \(0, 1\)"),
    "lr_one": ("train.lr=1", r"train\.lr must be a learning rate in \(0, 1\)"),
    "lr_zero": ("train.lr=0", r"train\.lr must be a learning rate in \(0, 1\)"),
    "lr_nan": ("train.lr=.nan", r"train\.lr must be a finite number >= 0, got nan"),
    "lr_negative": ("train.lr=-1e-3", r"train\.lr must be a finite number >= 0"),
    "lr_integer_too_large_for_a_float": (
        "train.lr=1" + "0" * 400,
        r"train\.lr must be a finite number, got 1000",
    ),
    "weight_decay_inf": ("train.weight_decay=.inf", r"train\.weight_decay must be a finite number"),
    "max_grad_norm_nan": ("train.max_grad_norm=.nan", r"train\.max_grad_norm must be a finite number"),
    "global_capacity_factor_nan": (
        "rosa.global_capacity_factor=.nan",
        r"rosa\.global_capacity_factor must be a finite number, got nan",
    ),
    "mask_memory_budget_inf": ("rosa.mask_memory_budget=.inf", r"rosa\.mask_memory_budget must be a finite"),
    "density_nan": ("rosa.density=.nan", r"rosa\.density must be a number in \[0, 1\], got nan"),
    "lora_dropout_nan": ("rosa.lora_dropout=.nan", r"rosa\.lora_dropout must be a finite number"),
    "r_huge": ("rosa.r=1000000000", r"rosa\.r=1000000000 is larger than any layer rosa can adapt"),
    "rank_pattern_huge": (
        "rosa.rank_pattern={q_proj: 1000000000}",
        r"rosa\.rank_pattern\['q_proj'\]=1000000000 is larger",
    ),
    "target_modules_number": ("rosa.target_modules=5", r"rosa\.target_modules must be a module name"),
    "task_type": ("rosa.task_type=SEQ_CLS", r"unknown config key 'rosa\.task_type'"),
    "unknown_rosa_key": ("rosa.nonsense=1", r"unknown config key 'rosa\.nonsense'; known keys here: "),
    "model_name_empty": ("model.name=", r"model\.name must be a string, got null"),
    "model_name_blank": ("model.name='   '", r"model\.name is empty"),
    "model_name_very_long": ("model.name=" + "m" * 5000, r"model\.name is 5000 characters long"),
    "trust_remote_code_word": (
        "model.trust_remote_code=maybe",
        r"model\.trust_remote_code must be true or false",
    ),
    "trust_remote_code_null": ("model.trust_remote_code=", r"model\.trust_remote_code must be true or false"),
    "line_break_in_a_path": (
        'data.path="a\\nb.jsonl"',
        r"data\.path must not hold a NUL character or a line",
    ),
    "nul_in_output_dir": ('output_dir="run\\0x"', r"output_dir must not hold a NUL character"),
    "steps_word": ("train.steps=fast", r"train\.steps must be an integer, got 'fast'"),
    "lr_word": ("train.lr=fast", r"train\.lr must be a number, got 'fast'"),
    "model_name_list": ("model.name=[a, b]", r"model\.name must be a string, got \['a', 'b'\]"),
    "alias_in_an_override": ("rosa.target_modules=&x [q_proj]", r"anchors and aliases"),
    # null where a value is needed, and a number where a path may be null (each was a TypeError deep inside)
    "lr_null": ("train.lr=null", r"train\.lr must be a number, got null"),
    "steps_null": ("train.steps=null", r"train\.steps must be an integer, got null"),
    "output_dir_null": ("output_dir=null", r"output_dir must be a string, got null"),
    "data_path_number": ("data.path=5", r"data\.path must be a string or null, got 5"),
    "mask_path_number": ("train.mask_path=5", r"train\.mask_path must be a string or null, got 5"),
    "limit_boolean": ("eval.limit=true", r"eval\.limit must be an integer or null, got True"),
}


@pytest.mark.parametrize("case", sorted(OVERRIDES))
def test_bad_run_settings_fail_in_one_line_before_any_work(tmp_path, capsys, case):
    override, message = OVERRIDES[case]
    code, out = _train(tmp_path, override)
    line = _one_line(capsys)
    assert code == 2 and re.search(message, line), line
    assert not out.exists()
    with pytest.raises(RunConfigError, match=message):
        load_run_config(None, [override])


def test_type_messages_read_as_english():
    """'must be a int' was the message for an integer setting given a word."""
    for override, kind in (
        ("train.steps=x", "an integer"),
        ("train.lr=x", "a number"),
        ("model.name=[1]", "a string"),
    ):
        with pytest.raises(RunConfigError) as err:
            load_run_config(None, [override])
        assert f"must be {kind}, got" in str(err.value) and "must be a int" not in str(err.value)


def test_sane_settings_still_load():
    """The control: the bounds leave every ordinary value alone."""
    run = load_run_config(
        None,
        [
            "train.lr=2e-4",
            "rosa.lora_alpha=512",
            "rosa.r=64",
            "rosa.global_capacity_factor=4",
            "rosa.mask_memory_budget=0.5",
            "model.trust_remote_code=true",
        ],
    )
    assert run.train.lr == 2e-4 and run.model.trust_remote_code is True
    assert run.rosa_config().lora_alpha == 512


# --- YAML run configs (item 8) -----------------------------------------------------------------------------------


def _nested_aliases(depth: int = 6, fan_out: int = 6) -> str:
    """Each level lists the previous one ``fan_out`` times: a few hundred bytes, fan_out**depth leaves. Depth 9
    is the classic "billion laughs"; this one is kept small enough to be harmless should the loader ever expand
    it, since any alias at all is refused."""
    lines = ["l0: &l0 [q_proj, q_proj, q_proj, q_proj, q_proj, q_proj]"]
    for level in range(1, depth):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * fan_out)}]")
    lines.append(f"rosa:\n  target_modules: [{', '.join([f'*l{depth - 1}'] * fan_out)}]")
    return "\n".join(lines) + "\n"


YAML_CASES = {
    "alias_bomb": (
        _nested_aliases().encode(),
        r"anchors and aliases .* are not allowed in a run config \(line 1, column 5\)",
    ),
    "one_anchor_one_alias": (b"model: {name: &n x}\ndata: {path: *n}\n", r"anchors and aliases"),
    "merge_key": (b"train:\n  <<: {lr: 0.1}\n", r"merge keys \(<<\) are not allowed"),
    "duplicate_section": (b"train: {steps: 1}\ntrain: {steps: 2}\n", r"duplicate key 'train' \(line 2"),
    "duplicate_key": (b"train:\n  lr: 0.001\n  lr: 0.5\n", r"duplicate key 'lr' \(line 3, column 3\)"),
    "number_key": (b"train:\n  1: 2\n", r"keys must be plain names, got '1'"),
    "null_key": (b"train:\n  ~: 2\n", r"keys must be plain names"),
    "binary": (b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00", r"binary data \(a NUL character at offset 7\)"),
    "latin1": ("model:\n  name: caf\u00e9\n".encode("latin-1"), r"not UTF-8 text \(byte 0xe9 at offset 18\)"),
    "utf16": ("train:\n  lr: 0.1\n".encode("utf-16"), r"not UTF-8 text"),
    "nul_in_the_middle": (b"train:\n  lr: 0.1\x00\n", r"binary data \(a NUL character at offset 16\)"),
    "nested_too_deeply": (b"[" * 20_000 + b"]" * 20_000, r"nested too deeply to be a run config"),
    "list_at_the_top": (b"- train\n- steps\n", r"the top level must be a mapping of sections"),
    "scalar_at_the_top": (b"just words\n", r"the top level must be a mapping of sections"),
    "two_documents": (
        b"train: {lr: 0.1}\n---\ntrain: {lr: 0.2}\n",
        r"but found another document \(line 2, column 1\)",
    ),
    "python_object": (
        b"model: !!python/object/apply:os.system ['echo hacked']\n",
        r"could not determine a constructor",
    ),
    "bad_syntax": (b"train: [\n", r"not valid YAML: .*\(line 2, column 1\)"),
    "larger_than_any_config": (b"# " + b"x" * (2 << 20) + b"\n", r"too large for a run config"),
    "unknown_section": (b"trian:\n  lr: 0.1\n", r"unknown config key 'trian'"),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_hostile_run_config_files_are_refused_naming_the_file(tmp_path, capsys, case):
    content, message = YAML_CASES[case]
    config = tmp_path / "run.yaml"
    config.write_bytes(content)
    code, out = _train(tmp_path, config=config)
    line = _one_line(capsys)
    assert code == 2 and re.search(message, line), line
    if case != "unknown_section":
        assert str(config) in line
    assert not out.exists()


def test_the_alias_bomb_is_small(tmp_path):
    """What the case above stands for: under 1 KB of YAML that would expand to tens of thousands of strings."""
    text = _nested_aliases()
    assert len(text.encode()) < 1024
    with pytest.raises(RunConfigError, match="anchors and aliases"):
        (tmp_path / "bomb.yaml").write_text(text)
        load_run_config(tmp_path / "bomb.yaml")


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_config_path_that_is_not_a_regular_file_is_never_read(tmp_path, capsys, kind):
    config = tmp_path / "run.yaml"
    if kind == "fifo":
        os.mkfifo(config)
    else:
        config.mkdir()
    code, out = _train(tmp_path, config=config)
    assert code == 2 and f"config file {config} is not a regular file" in _one_line(capsys)
    assert not out.exists()


def test_a_plain_config_file_still_loads(tmp_path):
    """The control: comments, nesting, a BOM and YAML 1.2 floats."""
    config = tmp_path / "run.yaml"
    config.write_bytes(b"\xef\xbb\xbf# mine\ntrain:\n  lr: 2e-4\nrosa:\n  target_modules: [q_proj, v_proj]\n")
    run = load_run_config(config)
    assert run.train.lr == 2e-4 and run.rosa["target_modules"] == ["q_proj", "v_proj"]


# --- RosaConfig values only Python code can give --------------------------------------------------------------

ROSA_VALUES = {
    "r_bool": ({"r": True}, r"r must be a non-negative integer, got True"),
    "lora_alpha_complex": ({"lora_alpha": 1j}, r"lora_alpha must be a number, got 1j"),
    "target_modules_empty_name": ({"target_modules": ["q_proj", ""]}, r"target_modules must hold non-empty"),
    "target_modules_mapping": ({"target_modules": {"q_proj": 1}}, r"target_modules must be a module name"),
    "target_modules_very_long": ({"target_modules": "q" * 5000}, r"target_modules is 5000 characters long"),
    "exclude_modules_number": ({"exclude_modules": 5}, r"exclude_modules must be a module name"),
    "layers_pattern_number": ({"layers_pattern": 5}, r"layers_pattern must be a module name"),
    "rank_pattern_bad_regex": ({"rank_pattern": {"(": 4}}, r"pattern '\(' is not a valid regex"),
    "alpha_pattern_string": (
        {"alpha_pattern": {"q_proj": "8"}},
        r"alpha_pattern\['q_proj'\] must be a number",
    ),
    "token_indices_negative": (
        {"trainable_token_indices": {"embed_tokens": [-1]}},
        r"trainable_token_indices\['embed_tokens'\] must be a list of non-negative integers",
    ),
    "mask_seed_negative": ({"mask_seed": -1}, r"mask_seed must be a non-negative integer"),
    "inference_mode_string": ({"inference_mode": "no"}, r"inference_mode must be true or false"),
    "global_capacity_factor_huge": (
        {"global_capacity_factor": 1e300},
        r"global_capacity_factor must be a number",
    ),
    "lora_alpha_huge_int": (
        {"lora_alpha": 10**400},
        r"lora_alpha must be a finite number|lora_alpha must be a",
    ),
}


@pytest.mark.parametrize("case", sorted(ROSA_VALUES))
def test_rosa_config_refuses_values_it_cannot_use(case):
    settings, message = ROSA_VALUES[case]
    with pytest.raises(RosaConfigError, match=message) as err:
        RosaConfig(task_type="CAUSAL_LM", **settings)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


# --- trust_remote_code (item 9) ---------------------------------------------------------------------------------


def _loader():
    try:  # where rosa's model loading lives (it moves with the training loop's rewrite)
        from rosa.app.loading import load_model_and_tokenizer
    except ImportError:
        from rosa.app.train import load_model_and_tokenizer
    return load_model_and_tokenizer


def _model_with_its_own_code(folder: Path) -> Path:
    """A model folder whose config maps to a Python file of its own; importing that file creates RAN."""
    folder.mkdir()
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps({"model_type": "evilmodel", "auto_map": auto_map}))
    (folder / "evil.py").write_text(
        f"open({str(folder / 'RAN')!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evilmodel'\n"
    )
    return folder


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_models_own_code_never_runs_and_nothing_asks(tmp_path, capsys, monkeypatch, command):
    """transformers asked "[y/N]" (answered 'y' here, as a careless user would) and then ran the folder's file.
    rosa passes trust_remote_code=False: one line saying which setting allows it, nothing run."""
    evil = _model_with_its_own_code(tmp_path / "evil")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    out = tmp_path / "run"
    code = main([command, "-q", f"model.name={evil}", f"output_dir={out}", "data.task=synthetic"])
    captured = capsys.readouterr()
    assert "[y/N]" not in captured.out + captured.err
    assert not (evil / "RAN").exists()
    assert code == 2
    line = [x for x in captured.err.splitlines() if x.startswith("rosa: error: ")]
    assert len(line) == 1 and "model.trust_remote_code=true" in line[0], captured.err[-2000:]


def test_trust_remote_code_is_passed_when_the_user_sets_it(tmp_path):
    """The control: with model.trust_remote_code=true the folder's code does run (so the setting reaches
    transformers); this folder holds no model class, so loading then fails."""
    load_model_and_tokenizer = _loader()

    evil = _model_with_its_own_code(tmp_path / "evil")
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers says about the missing class
        load_model_and_tokenizer(ModelSection(name=str(evil), trust_remote_code=True), for_training=False)
    assert (evil / "RAN").exists()


def test_a_known_model_with_an_auto_map_loads_with_its_own_classes(tiny_model_dir, tmp_path):
    """A folder of a known architecture that also ships code: transformers' own classes are used, nothing runs."""
    load_model_and_tokenizer = _loader()

    folder = tmp_path / "llama"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(folder / 'RAN')!r}, 'w').write('ran')\n")
    model, _ = load_model_and_tokenizer(ModelSection(name=str(folder)), for_training=False)
    assert type(model).__name__ == "LlamaForCausalLM" and not (folder / "RAN").exists()


# --- the model folder itself ------------------------------------------------------------------------------------

MODEL_FOLDERS = {
    "config_a_list": (lambda d: (d / "config.json").write_text("[1, 2]"), r"Should have a `model_type` key"),
    "config_not_json": (lambda d: (d / "config.json").write_text("{oops"), r"is not a valid JSON file"),
    "config_a_fifo": (lambda d: os.mkfifo(d / "config.json"), r"config\.json is not a regular file \(a FIFO"),
    "weights_a_device": (
        lambda d: (d / "model.safetensors").symlink_to("/dev/zero"),
        r"model\.safetensors is not a regular file",
    ),
}


@pytest.mark.parametrize("case", sorted(MODEL_FOLDERS))
def test_a_broken_model_folder_is_one_line(tmp_path, capsys, case):
    make, message = MODEL_FOLDERS[case]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 64}))
    if case.startswith("config"):
        (folder / "config.json").unlink()
    make(folder)
    out = tmp_path / "run"
    # a regression blocks on the FIFO: a child opens it for writing after 30 s so the test fails instead of hanging
    fifo = folder / "config.json"
    child = subprocess.Popen(["sh", "-c", 'sleep 30; : > "$1"', "sh", str(fifo)]) if fifo.is_fifo() else None
    try:
        code = main(["eval", "-q", f"model.name={folder}", f"output_dir={out}", "data.task=synthetic"])
    finally:
        if child is not None:
            child.kill()
            child.wait()
    line = _one_line(capsys)
    assert code == 2 and re.search(message, line), line
    assert not out.exists()


# --- the count ------------------------------------------------------------------------------------------------

HOSTILE = {  # distinct hostile inputs this module tries, by class
    "run settings": len(OVERRIDES),
    "run config files": len(YAML_CASES) + 2,  # + a FIFO and a folder as the config path
    "RosaConfig values": len(ROSA_VALUES),
    "remote code": 2,  # the train and eval commands on a folder with its own code
    "model folders": len(MODEL_FOLDERS),
}
