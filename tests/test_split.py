"""The automatic rank/density split (rosa.split) against a float64 brute force on a tiny random LLaMA."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_batches
from tiny_models import tiny_llama
from torch import nn

from rosa import RosaConfig, get_rosa_model, rosa_layers, sparse_parameter_count
from rosa.mask import MaskError
from rosa.split import candidate_ranks, plan_split

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
BUDGET_RANK = 3


def per_example_gradients(model: nn.Module, names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """Every example's share of its micro-batch's weight gradient, by float64 autograd (examples run alone)."""
    model = copy.deepcopy(model).double()
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        modules[n].weight.requires_grad_(True)
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        tokens = (labels[:, 1:] != -100).sum()
        for i in range(ids.shape[0]):
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids[i : i + 1]).logits[0, :-1]
            (nn.functional.cross_entropy(logits, labels[i, 1:], reduction="sum") / tokens).backward()
            for n in names:
                grads[n].append(modules[n].weight.grad.clone())
    return {n: torch.stack(g) for n, g in grads.items()}


def brute_force_shares(g: torch.Tensor, budget: int, ranks: list[int]) -> dict[int, float]:
    """The captured share of each rank, straight from the definition (full eigendecompositions, float64)."""
    _, out_features, in_features = g.shape
    total = g.square().sum()
    u = torch.linalg.eigh(torch.einsum("eoi,epi->op", g, g)).eigenvectors.flip(1)
    v = torch.linalg.eigh(torch.einsum("eoi,eoj->ij", g, g)).eigenvectors.flip(1)
    shares = {}
    for r in ranks:
        projected = u[:, :r] @ (u[:, :r].t() @ g @ v[:, :r]) @ v[:, :r].t()
        residual = (g - projected).square().sum(0).reshape(-1)
        k = budget - r * (out_features + in_features)
        held = projected.square().sum() + (torch.sort(residual, descending=True).values[:k].sum() if k else 0)
        shares[r] = float(held / total)
    return shares


def config(**kw) -> RosaConfig:
    return RosaConfig(**{"r": 2, "lora_alpha": 4, "density": 0.01, "target_modules": TARGETS, **kw})


def test_captured_shares_match_the_definition():
    model = tiny_llama()
    batches = make_batches(n=2, batch=3)
    plan = plan_split(model, config(), batches, budget_rank=BUDGET_RANK)
    names = list(plan.layers)
    assert len(names) == 4 * len(model.model.layers)
    grads = per_example_gradients(model, names, batches)
    for name, split in plan.layers.items():
        out_features, in_features = grads[name].shape[1:]
        assert split.budget == BUDGET_RANK * (out_features + in_features)
        expected = brute_force_shares(grads[name], split.budget, list(split.captured))
        for r, share in split.captured.items():
            assert share == pytest.approx(expected[r], rel=2e-3, abs=1e-6), (name, r)
        best = max(split.captured.values())
        assert split.captured[split.rank] == best
        assert split.rank == min(r for r, s in split.captured.items() if s == best)  # ties: the lower rank


def test_planned_config_trains_at_the_budget_and_leaves_the_base_model_as_it_was():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    plan = plan_split(model, config(), make_batches(n=2, batch=3), budget_rank=BUDGET_RANK)
    assert [type(m) for m in model.modules()] == modules_before
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    peft = get_rosa_model(model, plan.config)
    layers = {n.removeprefix("base_model.model."): layer for n, layer in rosa_layers(peft).items()}
    assert layers.keys() == plan.layers.keys()
    for name, layer in layers.items():
        split = plan.layers[name]
        assert layer.r["default"] == split.rank
        assert layer.budget("default") + split.rank * (layer.out_features + layer.in_features) == split.budget
        if split.rank:  # the config's scaling lora_alpha / r = 2 at every rank
            assert layer.scaling["default"] == pytest.approx(2.0)
    counts = sparse_parameter_count(peft)
    assert counts["lora"] + counts["sparse_capacity"] == sum(s.budget for s in plan.layers.values())


def test_one_rank_for_every_layer():
    plan = plan_split(tiny_llama(), config(), make_batches(n=2), budget_rank=BUDGET_RANK, per_layer=False)
    assert len({s.rank for s in plan.layers.values()}) == 1
    rank = next(iter(plan.layers.values())).rank
    mean = {r: sum(s.captured[r] for s in plan.layers.values()) for r in candidate_ranks(BUDGET_RANK)}
    assert mean[rank] == max(mean.values())


def test_memory_capped_plan_is_the_same_plan():
    batches = make_batches(n=2)
    whole = plan_split(tiny_llama(), config(), batches, budget_rank=BUDGET_RANK)
    with pytest.warns(UserWarning, match="too small"):
        grouped = plan_split(tiny_llama(), config(), batches, budget_rank=BUDGET_RANK, memory_budget=1e-6)
    assert {n: s.rank for n, s in grouped.layers.items()} == {n: s.rank for n, s in whole.layers.items()}


def test_candidate_ranks():
    assert candidate_ranks(0) == [0]
    assert candidate_ranks(4) == [0, 1, 2, 3, 4]
    assert candidate_ranks(16) == [0, 1, 2, 3, 4, 8, 12, 16]


@pytest.mark.parametrize("budget_rank", [0, -1, float("nan"), float("inf")])
def test_bad_budget_is_refused(budget_rank):
    with pytest.raises(MaskError, match="budget_rank"):
        plan_split(tiny_llama(), config(), make_batches(n=1), budget_rank=budget_rank)


def test_no_batches_is_refused():
    with pytest.raises(MaskError, match="needs batches"):
        plan_split(tiny_llama(), config(), [], budget_rank=2)


def test_second_moments_from_the_factors_equal_those_from_the_gradients():
    """G_i G_i^T summed from (dY_i, X_i) (the usual path) and from G_i itself (a layer called twice) agree."""
    from rosa.split import _LayerMeasure

    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 6, generator=g)
    grads = torch.bmm(dy.transpose(1, 2), x)
    direct, factored = (_LayerMeasure(7, 6, budget=26, device=torch.device("cpu")) for _ in range(2))
    direct.first_pass(grads, None)
    factored.first_pass(grads, (dy, x))
    for a, b in ((direct.left, factored.left), (direct.right, factored.right)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert direct.total == pytest.approx(float(grads.double().square().sum()), rel=1e-6)
    assert factored.total == pytest.approx(direct.total, rel=1e-6)


def test_the_memory_plan_counts_every_buffer_a_layer_holds(monkeypatch):
    """Groups are planned on each layer's peak: its buffers as allocated in either pass (the fp64 second moments
    of the first, the residual energies of the second) must fit what the planner was told."""
    import rosa.split as split

    planned: dict[str, int] = {}
    held: list[int] = []
    plan_groups, measure_subspaces = split.plan_layer_groups, split._LayerMeasure.subspaces

    def spy_groups(layers, memory_budget, **kw):
        planned.update(kw["layer_bytes"])
        return plan_groups(layers, memory_budget, **kw)

    def spy_subspaces(self):
        first = self.left.nbytes + self.right.nbytes
        measure_subspaces(self)
        held.append(max(first, sum(t.nbytes for t in self.residual.values())))

    monkeypatch.setattr(split, "plan_layer_groups", spy_groups)
    monkeypatch.setattr(split._LayerMeasure, "subspaces", spy_subspaces)
    plan_split(tiny_llama(), config(), make_batches(n=1), budget_rank=BUDGET_RANK, memory_budget=1.0)
    assert len(held) == len(planned) > 0
    assert all(h <= p for h, p in zip(held, planned.values(), strict=True))
