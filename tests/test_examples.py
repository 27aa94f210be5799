"""Every script in examples/ runs end to end (on the tiny model, a few steps) and leaves an adapter that PEFT
loads back with the same logits as the model that was saved."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import child_env
from peft import PeftModel
from transformers import AutoModelForCausalLM

import rosa
from rosa.masks import mask_layers

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def test_every_example_is_tested():
    assert SCRIPTS == ["plain_loop.py", "qrosa.py", "sft_trainer.py", "trainer.py", "two_run_mask.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_and_its_adapter_loads(script, tiny_model_dir, tmp_path):
    if script == "qrosa.py":
        pytest.importorskip("bitsandbytes")
    out = tmp_path / "adapter"
    env = child_env()
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / script),
            "--model",
            str(tiny_model_dir),
            "--steps",
            "12",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    if script == "qrosa.py":
        return  # its base is 4-bit: reloading it needs the same quantization (tests/test_qrosa.py covers that)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    assert isinstance(model.peft_config["default"], rosa.RosaConfig)
    assert all(layer.nnz("default") > 0 for layer in mask_layers(model).values())  # the mask was fixed
