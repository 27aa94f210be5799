"""rosa.optim: the sparse values in their own parameter group at their own rate, under any optimizer class,
a Trainer and an LR scheduler; weight decay by Trainer's rule."""

from __future__ import annotations

import pytest
import torch
from helpers import set_random_masks, word_llama
from transformers import Trainer

import rosa
from rosa import RosaConfig
from rosa.optim import LORA_GROUP, SPARSE_GROUP, create_rosa_optimizer, rosa_param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw):
    config = RosaConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, density=0.05, **kw)
    model = rosa.get_rosa_model(word_llama(0), config)
    set_random_masks(model, seed=1)
    return model


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_groups_partition_the_trainable_parameters_with_their_rates():
    model = _model(modules_to_save=["lm_head", "norm"])
    groups = rosa_param_groups(model, lr=1e-2, sparse_lr_ratio=4.0, weight_decay=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    seen = [n for g in groups for n in _names(model, g)]
    assert sorted(seen) == sorted(trainable)  # each exactly once
    by_name = {g["name"]: g for g in groups}
    assert by_name[SPARSE_GROUP]["lr"] == pytest.approx(2.5e-3)
    assert by_name[LORA_GROUP]["lr"] == 1e-2
    assert all(".rosa_values." in n for n in _names(model, by_name[SPARSE_GROUP]))
    assert all(".rosa_A." in n or ".rosa_B." in n for n in _names(model, by_name[LORA_GROUP]))
    # weight decay: exactly the parameters Trainer's default optimizer decays
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in _names(model, g)}
    assert decayed == set(Trainer.get_decay_parameter_names(None, model)) & trainable
    assert any("norm" in n for n in trainable - decayed)  # the saved RMSNorm copy is not decayed


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, torch.optim.SGD, torch.optim.Adam])
def test_update_of_each_group_is_the_one_of_its_own_rate(optimizer_cls):
    """One step with the grouped optimizer equals, parameter by parameter, a step of a plain optimizer built
    at that parameter's rate: the groups change nothing but the rate."""
    model = _model()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = create_rosa_optimizer(model, optimizer_cls, lr=0.05, sparse_lr=0.01, weight_decay=0.0)
    opt.step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rate = 0.01 if ".rosa_values." in name else 0.05
        ref = before[name].clone().requires_grad_(True)
        ref.grad = grads[name]
        optimizer_cls([ref], lr=rate, weight_decay=0.0).step()
        torch.testing.assert_close(p.detach(), ref.detach(), rtol=0, atol=1e-7, msg=name)


def test_a_scheduler_keeps_the_ratio():
    model = _model()
    opt = create_rosa_optimizer(model, lr=1e-2, sparse_lr_ratio=3.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for _ in range(3):
        opt.step()
        sched.step()
    rates = {g["name"]: g["lr"] for g in opt.param_groups}
    assert rates[LORA_GROUP] == pytest.approx(1e-2 / 8)
    assert rates[SPARSE_GROUP] == pytest.approx(1e-2 / 3.5 / 8)


def test_bad_arguments_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="not both"):
        rosa_param_groups(model, lr=1e-3, sparse_lr=1e-4, sparse_lr_ratio=2.0)
    with pytest.raises(ValueError, match="sparse_lr_ratio must be positive"):
        rosa_param_groups(model, lr=1e-3, sparse_lr_ratio=0.0)
    with pytest.raises(ValueError, match="sparse_lr must be a non-negative"):
        rosa_param_groups(model, lr=1e-3, sparse_lr=-1.0)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        rosa_param_groups(model, lr=1e-3)
