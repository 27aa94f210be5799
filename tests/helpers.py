"""Helpers shared by the test modules: RoSA-wrapped tiny models, random masks, batches and CLI runs.

Two tiny LLaMAs are in use: ``tiny_models.tiny_llama`` (vocabulary 128, what most mask and schedule tests wrap
with :func:`wrap_rosa`) and :func:`word_llama` (vocabulary 64 to match ``tiny_models.tiny_tokenizer(VOCAB)``, in
eval mode, what the PEFT-level tests wrap with ``get_rosa_model``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel
from tiny_models import TINY_LLAMA, tiny_llama
from torch import nn
from transformers import LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import rosa
from rosa import RosaConfig, RosaLayer
from rosa.layer import RosaLinear, nnz_budget
from rosa.mask import mask_layers
from rosa.sparse import support_from_mask

ADAPTER = "default"
VOCAB = 64
WORD_LLAMA = {  # the whole LlamaConfig, for child processes that do not import tiny_models
    **TINY_LLAMA,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
PEFT_PREFIX = "base_model.model."


# --- PEFT-level models, random masks and the dense reference ------------------------------------------------


def word_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, hidden-32 LLaMA with fixed random weights: the same seed gives the same model in any process."""
    return tiny_llama(seed, **WORD_LLAMA).eval()


def sample_ids(seed: int = 123, shape: tuple[int, int] = (2, 10)) -> torch.Tensor:
    return torch.randint(4, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def set_random_masks(
    model: nn.Module, adapter_name: str = "default", seed: int = 0, fill: float = 1.0, scale: float = 0.1
) -> dict[str, torch.Tensor]:
    """Give every RoSA layer a random support with ``round(fill * capacity)`` nonzeros, then random sparse values
    and a random B (so both the sparse and the low-rank part change the output). Returns the boolean masks."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, layer in rosa.rosa_layers(model).items():
        if adapter_name not in layer.rosa_values:
            continue
        total = layer.out_features * layer.in_features
        nnz = round(fill * layer.capacity[adapter_name])
        flat = torch.zeros(total, dtype=torch.bool)
        flat[torch.randperm(total, generator=g)[:nnz]] = True
        mask = flat.view(layer.out_features, layer.in_features)
        layer.set_support(adapter_name, support_from_mask(mask))
        with torch.no_grad():
            values = layer.rosa_values[adapter_name]
            values.copy_(torch.randn(values.shape, generator=g) * scale)
            if adapter_name in layer.rosa_B:
                b = layer.rosa_B[adapter_name].weight
                b.copy_(torch.randn(b.shape, generator=g) * scale)
        masks[name] = mask
    return masks


def dense_delta(layer: RosaLayer, adapter_name: str, mask: torch.Tensor | None) -> torch.Tensor:
    """``s * B @ A + S`` in (out, in) layout, in float64, with S built from the boolean mask the test drew
    (``S[mask] = values`` lists the nonzeros row-major, i.e. in CSR order): independent of rosa's own merge."""
    delta = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    if adapter_name in layer.rosa_A:
        a = layer.rosa_A[adapter_name].weight.detach().double()
        b = layer.rosa_B[adapter_name].weight.detach().double()
        delta += layer.scaling[adapter_name] * (b @ a)
    if mask is not None:
        values = layer.rosa_values[adapter_name].detach().double()
        delta[mask] = delta[mask] + values[: int(mask.sum())]
    return delta


def reference_model(
    peft_model: nn.Module, make_base, adapter_name: str | None, masks: dict[str, torch.Tensor] | None
) -> nn.Module:
    """A plain copy of the base model (``make_base()``) whose adapted weights are ``W0 + delta`` computed densely
    from the PEFT model's adapter tensors. ``adapter_name=None`` gives the untouched base model."""
    plain = make_base()
    if adapter_name is None:
        return plain
    modules = dict(plain.named_modules())
    with torch.no_grad():
        for name, layer in rosa.rosa_layers(peft_model).items():
            if adapter_name not in layer.rosa_values:
                continue
            target = modules[name.removeprefix(PEFT_PREFIX)]
            delta = dense_delta(layer, adapter_name, None if masks is None else masks.get(name))
            if isinstance(target, Conv1D):
                delta = delta.t()
            target.weight.copy_((target.weight.double() + delta).to(target.weight.dtype))
    return plain


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.detach().clone()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "", tol: float = 2e-5) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        actual, expected, rtol=tol, atol=tol * (scale + 1e-3), msg=lambda m: f"{what}: {m}"
    )


def rosa_llama(config: RosaConfig | None = None, seed: int = 0) -> PeftModel:
    config = config or RosaConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, density=0.05)
    return rosa.get_rosa_model(word_llama(seed), config)


def linear_names(model: nn.Module) -> set[str]:
    """Names of the linear layers 'all-linear' should adapt: every nn.Linear / Conv1D except the output head."""
    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head}


# --- RoSA layers wrapped by hand (no PEFT), batches, schedule helpers ---------------------------------------


def wrap_rosa(
    model: nn.Module,
    *,
    r: int = 4,
    lora_alpha: float | None = None,
    density: float = 0.05,
    capacity_factor: float | None = None,
    init_lora_weights: bool = True,
    lora_dropout: float = 0.0,
) -> nn.Module:
    """Freeze the model and wrap every nn.Linear (or 4-bit linear) under model.model.layers in a RosaLinear,
    without PEFT. ``lora_alpha`` defaults to ``2 * r``; ``init_lora_weights=False`` gives a random B, so the adapter
    is not the identity."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent in list(model.model.layers.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear and not _is_bnb4(child):
                continue
            capacity = None
            if capacity_factor is not None:
                budget = nnz_budget(density, child.out_features, child.in_features)
                capacity = min(round(budget * capacity_factor), child.out_features * child.in_features)
            layer = RosaLinear(
                child,
                ADAPTER,
                r=r,
                lora_alpha=2 * r if lora_alpha is None else lora_alpha,
                density=density,
                capacity=capacity,
                lora_dropout=lora_dropout,
            )
            if not init_lora_weights:  # a small random B (N(0, 0.02)): the adapter is not the identity
                torch.nn.init.normal_(layer.rosa_B[ADAPTER].weight, std=0.02)
            setattr(parent, child_name, layer)
    return model


def _is_bnb4(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def make_batches(n: int = 3, batch: int = 2, seq: int = 16, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def rosa_config(**kw) -> RosaConfig:
    kw.setdefault("r", 4)
    kw.setdefault("density", 0.05)
    return RosaConfig(**kw)


def sparse_values(model) -> list[torch.Tensor]:
    return [layer.rosa_values[ADAPTER] for layer in mask_layers(model).values()]


def lora_weights(model) -> list[torch.Tensor]:
    layers = mask_layers(model).values()
    return [p for layer in layers for p in (layer.rosa_A[ADAPTER].weight, layer.rosa_B[ADAPTER].weight)]


def supports(model) -> dict[str, list[int]]:
    """Each layer's support as a list of flat indices."""
    return {n: layer.support(ADAPTER).flat_index().tolist() for n, layer in mask_layers(model).items()}


class TokenData(torch.utils.data.Dataset):
    """Random sequences over 16 of the 128 token ids: learnable (the unigram alone takes the loss from
    ln 128 to ln 16)."""

    def __init__(self, n: int = 32, seq: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 16, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


# --- the rosa command ---------------------------------------------------------------------------------------

FAST = [
    "train.steps=4",
    "train.batch_size=2",
    "train.log_every=1",
    "train.save_every=2",
    "data.train_size=12",
    "data.val_size=3",
    "data.max_length=96",
    "eval.max_new_tokens=4",
    "eval.batch_size=4",
    "eval.limit=3",
    "rosa.r=2",
    "rosa.lora_alpha=4",
    "rosa.density=0.05",
    "rosa.warmup_steps=1",
    "rosa.mask_steps=1",
]


def cli_train(tmp_path: Path, model_dir: Path, *overrides: str) -> tuple[int, Path]:
    """``rosa train`` in this process on the tiny model with FAST settings; (exit code, run folder)."""
    from rosa.cli import main

    out = tmp_path / "run"
    code = main(["train", "-q", f"model.name={model_dir}", f"output_dir={out}", *FAST, *overrides])
    return code, out


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process the tests start: one thread (shared cores), no progress bars, no
    tokenizer threads, plus ``extra``."""
    base = {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return {**os.environ, **base, **extra}


def generator(seed: int) -> torch.Generator:
    """A CPU generator at ``seed``: random inputs that are the same on every run."""
    return torch.Generator().manual_seed(seed)


def training_args(output_dir, **kw):
    """transformers.TrainingArguments for a few CPU steps in a test (no reports, saves, workers or bars)."""
    from transformers import TrainingArguments

    base = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    return TrainingArguments(**{**base, **kw})


def cli_process(args: list[str], **kwargs) -> subprocess.Popen:
    """``python -m rosa.cli train -q *args`` in a child process (one thread, no progress bars)."""
    env = child_env()
    return subprocess.Popen(
        [sys.executable, "-m", "rosa.cli", "train", "-q", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kwargs,
    )


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (it is not a package), with its siblings importable as when it runs."""
    import importlib.util

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
