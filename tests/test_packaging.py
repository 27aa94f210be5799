"""What pyproject.toml promises users: version ranges, not our machine's pins (those live in constraints.txt,
used by scripts/setup.sh), and floors that were actually installed and run.

``test_lowest_declared_versions_work`` builds a plain venv with every declared floor (torch: the one wheel on
this disk) and runs a smoke script in it; it takes minutes and the network, so it runs only with
``ROSA_TEST_LOWEST=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
TORCH_ON_DISK = "2.13.0"  # the CPU wheel this machine has; any other torch is a multi-GB CUDA download


def declared() -> dict[str, Requirement]:
    """pyproject's runtime dependencies, by name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {(r := Requirement(line)).name.lower(): r for line in project["dependencies"]}


def constraints() -> dict[str, Version]:
    """constraints.txt's exact pins, by name."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            (spec,) = r.specifier
            assert spec.operator == "==", line
            pins[r.name.lower()] = Version(spec.version)
    return pins


def floor(requirement: Requirement) -> str | None:
    """The ``>=`` bound of a requirement, if it has one."""
    return next((s.version for s in requirement.specifier if s.operator == ">="), None)


def test_dependencies_are_ranges_and_our_pins_satisfy_them():
    deps = declared()
    assert all(s.operator != "==" for r in deps.values() for s in r.specifier), "pin in constraints.txt"
    for name in ("torch", "transformers", "peft", "safetensors", "accelerate"):
        assert floor(deps[name]) is not None, f"{name} needs a floor"
    pins = constraints()
    assert pins["torch"] == Version(TORCH_ON_DISK)
    for name, requirement in deps.items():
        assert name in pins, f"constraints.txt does not pin {name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    assert "-c constraints.txt" in (ROOT / "scripts" / "setup.sh").read_text()


def test_floors_cover_the_apis_rosa_uses():
    """torch.library.custom_op came in torch 2.4; BaseTuner._get_adapter_state_dict (RosaModel overrides it)
    in PEFT 0.21.0."""
    deps = declared()
    assert not deps["torch"].specifier.contains("2.3.1")
    assert not deps["peft"].specifier.contains("0.20.0")
    from peft.tuners.tuners_utils import BaseTuner

    assert hasattr(BaseTuner, "_get_adapter_state_dict")


def lowest_requirements() -> list[str]:
    """Every runtime dependency at its declared floor (torch: the wheel on disk); the rest unpinned."""
    out = []
    for name, requirement in declared().items():
        if name == "torch":
            out.append(f"torch=={TORCH_ON_DISK}")
        elif (low := floor(requirement)) is not None:
            out.append(f"{name}=={low}")
        else:
            out.append(str(requirement))
    return out


SMOKE = textwrap.dedent(
    """
    import sys
    import torch
    import rosa  # light: PEFT, imported next, finds RosaConfig by itself
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM
    from rosa.sparse.support import support_from_mask

    torch.set_num_threads(1)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(config)

    rosa_config = rosa.RosaConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, density=0.05,
                                  target_modules=["q_proj", "v_proj"])
    model = rosa.get_rosa_model(base(), rosa_config)
    g = torch.Generator().manual_seed(0)
    for layer in rosa.rosa_layers(model).values():
        flat = torch.zeros(layer.out_features * layer.in_features, dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=g)[: layer.capacity["default"]]] = True
        layer.set_support("default", support_from_mask(flat.view(layer.out_features, layer.in_features)))
    ids = torch.randint(0, 128, (2, 8), generator=g)
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("rosa_values" in n for n in trainable), sorted(trainable)
    with torch.no_grad():
        for name, p in trainable.items():
            assert p.grad is not None, name
            p -= 0.5 * p.grad
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(sys.argv[1])
    loaded = PeftModel.from_pretrained(base(), sys.argv[1]).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    import peft, safetensors, transformers, accelerate
    print("SMOKE OK", torch.__version__, transformers.__version__, peft.__version__, safetensors.__version__,
          accelerate.__version__)
    """
)


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=1800, **kwargs)
    assert result.returncode == 0, f"{argv}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ROSA_TEST_LOWEST") != "1", reason="ROSA_TEST_LOWEST=1: a venv at the declared floors"
)
def test_lowest_declared_versions_work(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, *lowest_requirements()])
    _run([*pip, "--no-deps", str(ROOT)])
    (tmp_path / "smoke.py").write_text(SMOKE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "", "PYTHONNOUSERSITE": "1"}
    result = _run([python, str(tmp_path / "smoke.py"), str(tmp_path / "adapter")], cwd=tmp_path, env=env)
    assert "SMOKE OK" in result.stdout
    print(result.stdout.strip().splitlines()[-1], file=sys.stderr)
