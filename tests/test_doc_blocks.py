"""The code blocks of README.md and docs/*.md that are meant to run do run, with tiny settings.

Fenced ``python`` blocks of the README run in order in one namespace (the model id and step count swapped for the
tiny test model and a few steps); each ``rosa ...`` line of a ``bash`` block runs as a command, in order, in one
folder (with tiny model and data settings added); ``yaml`` blocks must load as run configs. ``text`` fences and
indented blocks are illustrations and are not run. The README stays a newcomer's page: short, and no path of
one machine in it or in docs/.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import child_env

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
RUN = {"python", "bash", "yaml"}
ILLUSTRATION = {"text"}
README_LIMIT = 15_000
TINY = [
    "data.train_size=16",
    "data.val_size=4",
    "data.max_length=48",
    "train.batch_size=2",
    "eval.limit=4",
    "rosa.mask_steps=2",
]


def blocks(path: Path, language: str) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(path.read_text()) if m.group(1) == language]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_fence_names_whether_it_runs(path):
    languages = {m.group(1) for m in FENCE.finditer(path.read_text())}
    assert languages <= RUN | ILLUSTRATION, (
        f"{path.name}: fences {languages - RUN - ILLUSTRATION} are neither run nor text"
    )
    if path.name != "README.md":  # only the README's runnable blocks have a test below
        assert not languages & RUN, f"{path.name}: a runnable block outside the README has no test"


def test_readme_is_short_and_documents_hold_no_machine_paths():
    assert len((ROOT / "README.md").read_text()) <= README_LIMIT
    for path in DOCUMENTS:
        found = re.findall(r"(?<![\w.~])/(?:work|tmp|home|root|Users)/\S*", path.read_text())
        assert not found, f"{path.name}: {found[:3]}"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_relative_link_and_image_resolves_from_its_document(path):
    """A link is read relative to the document holding it (as GitHub renders it), so the same path cannot be
    right in both README.md and docs/*.md."""
    targets = [
        t.split("#")[0] for t in LINK.findall(path.read_text()) if "://" not in t and not t.startswith("#")
    ]
    missing = [t for t in targets if t and not (path.parent / t).exists()]
    assert not missing, f"{path.name}: links to {missing} resolve to nothing"


def test_readme_python_blocks_run(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    from rosa.mask import mask_layers

    code = "\n".join(blocks(ROOT / "README.md", "python"))
    assert "SFTTrainer" in code and "max_steps=200" in code
    code = code.replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(tiny_model_dir)))
    code = code.replace("max_steps=200", "max_steps=12").replace(
        'report_to="none"', 'report_to="none", use_cpu=True, per_device_train_batch_size=4'
    )
    code = code.replace("RosaConfig(", "RosaConfig(r=2, mask_steps=2, ")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    layers = mask_layers(namespace["trainer"].model).values()
    assert layers and all(layer.nnz("default") == layer.budget("default") > 0 for layer in layers)  # RoSA ran
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()
    assert type(namespace["reloaded"].peft_config["default"]).__name__ == "RosaConfig"


def test_readme_shell_commands_run(tiny_model_dir, tmp_path):
    lines = [
        line.split("  #")[0].strip()
        for block in blocks(ROOT / "README.md", "bash")
        for line in block.splitlines()
        if line.strip().startswith("rosa ")
    ]
    assert [line.split()[1] for line in lines] == ["train", "eval", "merge", "mask"]
    env = child_env(PYTHONPATH=str(ROOT / "src"))
    for line in lines:
        args = shlex.split(line)[1:]
        if args[0] in ("train", "mask"):
            args = [a for a in args if not a.startswith("train.steps=")]
            args += [f"model.name={tiny_model_dir}", "train.steps=6", *TINY]
        done = subprocess.run(
            [sys.executable, "-m", "rosa.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
    assert (tmp_path / "runs" / "tour" / "adapter").is_dir()
    assert (tmp_path / "runs" / "tour-merged" / "config.json").is_file()
    assert (tmp_path / "runs" / "tour-mask.safetensors").is_file()


def test_readme_yaml_blocks_are_valid_run_configs(tmp_path):
    from rosa.app.run_config import load_run_config

    found = blocks(ROOT / "README.md", "yaml")
    assert found
    for i, block in enumerate(found):
        path = tmp_path / f"block{i}.yaml"
        path.write_text(block)
        load_run_config(path)
