"""RoSA under ``transformers.Trainer`` and ``trl.SFTTrainer`` on a tiny LLaMA with an offline word-level tokenizer:
a few steps train the LoRA pair and the sparse values (never the support), ``save_model`` writes a PEFT adapter,
and a fresh process that only does ``import rosa`` + ``PeftModel.from_pretrained`` on the same seeded base
reproduces the logits exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from helpers import VOCAB, WORD_LLAMA, child_env, logits_of, sample_ids, set_random_masks, word_llama
from tiny_models import tiny_tokenizer
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import rosa
from rosa import RosaConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _texts(n: int = 8) -> list[str]:
    return [" ".join(f"w{(i * 7 + j) % (VOCAB - 4)}" for j in range(10)) for i in range(n)]


def _config() -> RosaConfig:
    return RosaConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, density=0.05)


def _trainable_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _common_args(output_dir) -> dict:
    return {
        "output_dir": str(output_dir),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train with both trainers once; the tests below inspect the results."""
    root = tmp_path_factory.mktemp("trainers")
    tokenizer = tiny_tokenizer(VOCAB)
    ids = sample_ids()
    results = {}

    # transformers.Trainer on a model wrapped by rosa.get_rosa_model, with its mask set before training
    model = rosa.get_rosa_model(word_llama(0), _config())
    set_random_masks(model, seed=1)
    encoded = tokenizer(_texts())
    dataset = Dataset.from_dict(
        {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    )
    before, supports = _trainable_snapshot(model), _supports(model)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**_common_args(root / "trainer_out")),
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    output = trainer.train()
    trainer.save_model(root / "trainer")
    model.eval()
    results["trainer"] = {
        "seed": 0,
        "path": root / "trainer",
        "loss": output.training_loss,
        "before": before,
        "supports": supports,
        "model": model,
        "logits": logits_of(model, ids),
    }

    # trl.SFTTrainer given the RosaConfig: it calls get_peft_model itself; the mask is set on its model
    from trl import SFTConfig, SFTTrainer

    sft = SFTTrainer(
        model=word_llama(1),
        processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"text": _texts()}),
        peft_config=_config(),
        args=SFTConfig(**_common_args(root / "sft_out"), max_length=16),
    )
    assert sft.args.bf16  # SFTConfig's default: training runs under bf16 autocast, on CPU too
    set_random_masks(sft.model, seed=2)
    before, supports = _trainable_snapshot(sft.model), _supports(sft.model)
    output = sft.train()
    sft.save_model(root / "sft")
    # SFTConfig defaults to bf16=True: accelerate wrapped the model's forward in autocast; drop the wrapper so the
    # logits below are the adapter's fp32 ones, like the fresh process computes
    sft_model = sft.accelerator.unwrap_model(sft.model, keep_fp32_wrapper=False).eval()
    results["sft"] = {
        "seed": 1,
        "path": root / "sft",
        "loss": output.training_loss,
        "before": before,
        "supports": supports,
        "model": sft_model,
        "logits": logits_of(sft_model, ids),
    }
    return results


def _supports(model) -> dict[str, torch.Tensor]:
    return {n: layer.support("default").to_dense_mask() for n, layer in rosa.rosa_layers(model).items()}


@pytest.mark.parametrize("which", ["trainer", "sft"])
def test_trainer_trains_lora_and_sparse_values(trained, which):
    run = trained[which]
    model = run["model"]
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert torch.isfinite(torch.tensor(run["loss"]))
    after = _trainable_snapshot(model)
    assert after.keys() == run["before"].keys()
    changed = {n for n in after if not torch.equal(after[n], run["before"][n])}
    assert changed == set(after)  # every A, B and value vector moved
    assert any("rosa_values" in n for n in changed)
    for name, mask in run["supports"].items():
        assert torch.equal(rosa.rosa_layers(model)[name].support("default").to_dense_mask(), mask), name
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # bf16 autocast only
    files = set(os.listdir(run["path"]))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"adapter_model.bin", "pytorch_model.bin"}


_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    import rosa  # registers PeftType.ROSA: must come before PeftConfig.from_pretrained
    from peft import PeftConfig, PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = json.loads(sys.argv[1])
    ids = torch.load(spec["ids"])
    for job in spec["jobs"]:
        config = PeftConfig.from_pretrained(job["path"])
        assert type(config) is rosa.RosaConfig, type(config)
        torch.manual_seed(job["seed"])
        base = LlamaForCausalLM(LlamaConfig(**spec["llama"])).eval()
        model = PeftModel.from_pretrained(base, job["path"])
        nnz = [layer.nnz("default") for layer in rosa.rosa_layers(model).values()]
        assert nnz and min(nnz) > 0, nnz
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, job["out"])
    print("CHILD OK")
    """
)


def test_reload_in_a_fresh_process_gives_identical_logits(trained, tmp_path):
    ids_path = tmp_path / "ids.pt"
    torch.save(sample_ids(), ids_path)
    jobs = [
        {"path": str(run["path"]), "seed": run["seed"], "out": str(tmp_path / f"{name}.pt")}
        for name, run in trained.items()
    ]
    spec = json.dumps({"ids": str(ids_path), "llama": WORD_LLAMA, "jobs": jobs})
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, spec],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(PYTHONWARNINGS="ignore"),
    )
    assert result.returncode == 0 and "CHILD OK" in result.stdout, result.stderr[-4000:]
    for (name, run), job in zip(trained.items(), jobs):
        reloaded = torch.load(job["out"])
        assert torch.equal(reloaded, run["logits"]), (name, (reloaded - run["logits"]).abs().max())
