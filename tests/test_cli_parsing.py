"""The first hour of a user: override values read as people write them (``train.lr=2e-4``), options anywhere
among the overrides, a ``--help`` that imports neither torch nor PEFT, a ``train --help`` that lists every
setting, an ``import rosa`` that registers with PEFT whatever came first, and a ``-q`` that leaves nothing from
other libraries on stderr."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import FAST, child_env

import rosa
import rosa_cli as cli
from rosa.app import run_config, settings_help

HEAVY = ("torch", "peft", "transformers", "bitsandbytes")


def _python(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (nothing imported yet), one thread."""
    env = child_env()
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


# --- override values ------------------------------------------------------------------------------------

VALUES: list[tuple[str, Any]] = [
    ("2e-4", 2e-4),
    ("1e-3", 1e-3),
    ("5E-5", 5e-5),
    ("-1e-2", -1e-2),
    ("+1e5", 1e5),
    ("1.5e-3", 1.5e-3),
    ("1.0e3", 1000.0),
    (".5", 0.5),
    ("-.5", -0.5),
    ("3.", 3.0),
    ("0.1", 0.1),
    ("42", 42),
    ("-7", -7),
    ("0", 0),
    ("true", True),
    ("false", False),
    ("null", None),
    ("", None),
    ("[q_proj, v_proj]", ["q_proj", "v_proj"]),
    ("[1e-3, 2]", [1e-3, 2]),
    ("{v_proj: 2e-2}", {"v_proj": 2e-2}),
    ("viggo", "viggo"),
    ("runs/rosa-1e-3", "runs/rosa-1e-3"),
    ("1.2.3", "1.2.3"),
    ("e5", "e5"),
    ("1e", "1e"),
    ("'2e-4'", "2e-4"),
    (".inf", math.inf),
]


def _same(actual: Any, expected: Any) -> bool:
    """Equal and of the same types all the way down (1 is not 1.0, True is not 1)."""
    if type(actual) is not type(expected):
        return False
    if isinstance(expected, list):
        return len(actual) == len(expected) and all(map(_same, actual, expected))
    if isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(_same(actual[k], expected[k]) for k in expected)
    return actual == expected


@pytest.mark.parametrize(("text", "expected"), VALUES, ids=[repr(t) for t, _ in VALUES])
def test_override_values_parse_as_written(text, expected):
    value = run_config.parse_value(text)
    assert _same(value, expected), (text, value)


def test_lr_2e_4_from_an_override_and_from_a_file(tmp_path):
    assert run_config.load_run_config(None, ["train.lr=2e-4"]).train.lr == 2e-4
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 2e-4\n  weight_decay: 1E-2\nrosa:\n  density: 5e-3\n")
    run = run_config.load_run_config(path)
    assert run.train.lr == 2e-4 and run.train.weight_decay == 1e-2
    assert _same(run.rosa["density"], 5e-3)
    assert yaml.safe_load("2e-4") == "2e-4"  # PyYAML's own loader is left as it is


def test_an_unreadable_value_is_a_one_line_config_error():
    with pytest.raises(run_config.RunConfigError, match="quote it"):
        run_config.load_run_config(None, ["rosa.target_modules=[q_proj, v_proj"])


# --- options anywhere -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "config", "overrides", "flags"),
    [
        (
            ["train", "data.task=viggo", "-q", "train.steps=50"],
            None,
            ["data.task=viggo", "train.steps=50"],
            {"quiet": True, "resume": False, "load_in_4bit": False},
        ),
        (
            ["train", "my.yaml", "train.steps=5", "--resume", "rosa.r=4", "--load-in-4bit", "eval.limit=2"],
            "my.yaml",
            ["train.steps=5", "rosa.r=4", "eval.limit=2", "model.load_in_4bit=true"],
            {"quiet": False, "resume": True, "load_in_4bit": True},
        ),
        (
            ["eval", "data.task=sql", "--adapter", "runs/a", "-q", "eval.limit=5"],
            None,
            ["data.task=sql", "eval.limit=5"],
            {"quiet": True, "adapter": "runs/a"},
        ),
        (
            ["mask", "rosa.mask_steps=8", "--out", "m.safetensors", "rosa.density=1e-3"],
            None,
            ["rosa.mask_steps=8", "rosa.density=1e-3"],
            {"out": "m.safetensors"},
        ),
    ],
)
def test_options_may_stand_between_overrides(argv, config, overrides, flags):
    args = cli.parse_args(argv)
    assert args.command == argv[0]
    assert {name: getattr(args, name) for name in flags} == flags
    assert cli.split_overrides(args) == (config, overrides)


# --- startup: parse first, import late --------------------------------------------------------------------

_HELP = """
import runpy, sys
sys.argv = ["rosa", *sys.argv[1:]]
try:
    runpy.run_module("rosa_cli", run_name="__main__")  # what the rosa console script runs
except SystemExit as e:
    assert e.code == 0, e.code
print("HEAVY", sorted(m for m in {heavy} if m in sys.modules))
"""


@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], ["eval", "a=1", "-q", "--help"], ["mask", "--help"]]
)
def test_help_imports_neither_torch_nor_peft(argv):
    result = _python(_HELP.format(heavy=HEAVY), *argv, timeout=120)
    assert result.returncode == 0, result.stderr
    assert ("usage: rosa" if argv != ["--version"] else "rosa 0.1.0") in result.stdout
    assert "HEAVY []" in result.stdout, result.stdout[-300:]
    assert result.stderr == ""  # no bitsandbytes line either


def test_train_help_lists_every_setting_with_its_default_and_help(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    defaults = run_config.RunConfig()
    for section in ("model", "data", "train", "eval"):
        for name in vars(getattr(defaults, section)):
            key = f"{section}.{name}"
            assert f"  {key} = " in text, key
            assert key in settings_help.HELP, f"{key} has no help line"
    fixed = ("task_type", "peft_type")  # set by rosa train itself
    fields = rosa.RosaConfig.__dataclass_fields__.values()
    for field in (f for f in fields if f.init and "help" in f.metadata and f.name not in fixed):
        assert f"  rosa.{field.name} = " in text, field.name
    assert "  train.lr = 0.002\n      peak learning rate" in text


_REGISTERED = """
import sys
{imports}
from peft import PeftConfig
config = PeftConfig.from_pretrained(sys.argv[1])
print("LOADED", type(config).__module__, type(config).__name__)
"""


def test_import_rosa_registers_with_peft_in_any_order(tmp_path):
    """PEFT finds a saved adapter's config class by its peft_type: ``import rosa`` must have registered it,
    whether PEFT came before rosa, after it, or through rosa's own modules."""
    from rosa import RosaConfig

    RosaConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]).save_pretrained(tmp_path)
    for imports in ("import rosa", "import peft\nimport rosa", "import rosa.model"):
        result = _python(_REGISTERED.format(imports=imports), str(tmp_path))
        assert result.returncode == 0, (imports, result.stderr[-2000:])
        assert "LOADED rosa.config RosaConfig" in result.stdout, (imports, result.stdout)


def test_sparse_ops_leave_the_process_warning_filters_alone():
    code = """
import warnings, torch, rosa  # rosa imports PEFT and transformers, which set filters of their own
before = list(warnings.filters)
from rosa.sparse import torch_ops
assert warnings.filters == before, "importing rosa.sparse.torch_ops changed the process's warning filters"
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    torch_ops.spmm(torch.ones(3, 4), torch.tensor([1.0, 2.0]), torch.tensor([0, 1, 2]), torch.tensor([0, 3]), 2)
assert not [w for w in seen if "beta" in str(w.message)], [str(w.message) for w in seen]
assert warnings.filters == before
print("OK")
"""
    result = _python(code, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


# --- quiet ------------------------------------------------------------------------------------------------


def test_the_command_quiets_import_time_notices_before_it_imports_rosa(monkeypatch):
    """bitsandbytes logs while PEFT imports it, on CPUs with AVX512-BF16 only; this checks the order on any CPU. The
    application module is replaced by one that records the loggers' levels when the command imports from it."""
    seen: dict[str, int] = {}

    class Application(types.ModuleType):
        def __getattr__(self, name: str):
            seen.update({n: logging.getLogger(n).level for n in cli._IMPORT_NOTICES})
            return lambda args, config_and_overrides: 0

    loggers = [logging.getLogger(n) for n in cli._IMPORT_NOTICES]
    before = [logger.level for logger in loggers]
    monkeypatch.setitem(sys.modules, "rosa.app.cli", Application("rosa.app.cli"))
    try:
        for logger in loggers:
            logger.setLevel(logging.NOTSET)
        assert cli.main(["train", "-q"]) == 0
    finally:
        for logger, level in zip(loggers, before):
            logger.setLevel(level)
    assert seen and set(seen.values()) == {logging.ERROR}


def test_quiet_train_leaves_only_rosa_lines_on_stderr(tmp_path, tiny_model_dir: Path):
    """Gradient checkpointing on: it draws transformers' deprecation warnings and its use_cache notice. Run as the
    console script runs (rosa_cli first): on a CPU with AVX512-BF16, bitsandbytes logs at import time."""
    argv = [
        "train",
        f"model.name={tiny_model_dir}",
        "-q",  # among the overrides, as users type it
        f"output_dir={tmp_path / 'run'}",
        *FAST,
        "model.gradient_checkpointing=true",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "rosa_cli", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run folder:" in result.stdout
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("rosa:")] == []
