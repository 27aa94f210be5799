"""The library's default schedule is the one the accuracy benchmark chose on validation loss (docs/benchmarks/
accuracy.json, ``choose_schedule``): RosaConfig, the optimizer helper and ``rosa train`` all start from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_benchmark

from rosa import RosaConfig
from rosa.app.run_config import RunConfig
from rosa.optim import DEFAULT_SPARSE_LR_RATIO, SPARSE_GROUP, rosa_param_groups

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def accuracy():
    return load_benchmark("accuracy")


def test_defaults_are_the_measured_schedule(accuracy):
    chosen = accuracy.choose_schedule(json.loads((ROOT / "docs/benchmarks/accuracy.json").read_text()))
    assert chosen is not None, "no schedule candidate has run on every task"
    config = RosaConfig()
    assert RunConfig().rosa == {}  # rosa train starts from RosaConfig's own defaults: one set of them
    assert (config.warmup_steps == 0) == (not chosen["lora_warmup"])
    assert config.restart_after_mask == chosen["restart"]
    assert (config.rewarmup_steps is None) == chosen["rewarmup"]  # None: the run's own LR warm-up
    assert config.mask_steps == accuracy.MASK_STEPS
    # the sparse rate: the one-epoch protocol's last stage once it has decided (it supersedes this protocol's)
    epoch = load_benchmark("accuracy_epoch")
    decided = epoch.chosen_defaults(
        json.loads((ROOT / "docs/benchmarks/accuracy_epoch.json").read_text()), stage=3
    )
    ratio = decided["sparse_lr_ratio"] if decided is not None else chosen["sparse_lr_ratio"]
    assert DEFAULT_SPARSE_LR_RATIO == config.sparse_lr_ratio == ratio


def test_the_optimizer_helper_applies_the_default_ratio():
    from tiny_models import tiny_llama

    import rosa

    model = rosa.get_rosa_model(tiny_llama(0), RosaConfig(r=2, density=0.05, task_type="CAUSAL_LM"))
    groups = {g["name"]: g for g in rosa_param_groups(model, lr=1e-2)}
    assert groups[SPARSE_GROUP]["lr"] == pytest.approx(1e-2 / DEFAULT_SPARSE_LR_RATIO)
    same = {g["name"]: g for g in rosa_param_groups(model, lr=1e-2, sparse_lr_ratio=1.0)}
    assert same[SPARSE_GROUP]["lr"] == 1e-2


def test_the_mask_statistic_is_the_one_the_epoch_protocol_chose():
    """benchmarks/accuracy_epoch.py chooses RoSA's defaults on validation loss, one coordinate at a time; the
    library's defaults follow each choice once it is made (the fisher granularity first, the sparse rate last)."""
    epoch = load_benchmark("accuracy_epoch")
    results = json.loads((ROOT / "docs/benchmarks/accuracy_epoch.json").read_text())
    first = epoch.chosen_defaults(results, stage=1)
    assert first is not None, "the first stage of the candidates has not run on both tasks"
    assert RosaConfig().fisher_granularity == first["granularity"]
    last = epoch.chosen_defaults(results, stage=3)
    if last is not None:
        assert RosaConfig().sparse_lr_ratio == last["sparse_lr_ratio"]
