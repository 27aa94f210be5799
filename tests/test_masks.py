"""Mask statistics and selection (rosa.mask) against brute-force dense gradients, on a tiny random LLaMA."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import ADAPTER, make_batches, supports, wrap_rosa
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama
from torch import nn

from rosa.layer import RosaLayer, RosaLinear
from rosa.mask import (
    MaskError,
    MaskFileError,
    collect_mask,
    layer_budget,
    load_mask,
    mask_layers,
    plan_layer_groups,
    read_mask_file,
    save_mask,
    topk_flat_index,
)
from rosa.sparse import Support

pytestmark = pytest.mark.usefixtures("one_thread")


# --- helpers --------------------------------------------------------------------------------------------


def merged_dense_copy(rosa_model: nn.Module, plain: nn.Module) -> nn.Module:
    """``plain`` (a copy of the original model) with every adapted weight set to W0 + s B A and unfrozen."""
    plain = copy.deepcopy(plain)
    for p in plain.parameters():
        p.requires_grad_(False)
    plain_modules = dict(plain.named_modules())
    for name, layer in mask_layers(rosa_model).items():
        lin = plain_modules[name]
        with torch.no_grad():
            w = layer.get_base_weight().detach().float()
            if layer.r[ADAPTER] > 0:
                a, b = layer.rosa_A[ADAPTER].weight, layer.rosa_B[ADAPTER].weight
                w = w + layer.scaling[ADAPTER] * (b @ a)
            lin.weight = nn.Parameter(w.clone())
        lin.weight.requires_grad_(True)
    return plain


def brute_force_grads(
    plain: nn.Module, names: list[str], batches: list[dict]
) -> dict[str, list[torch.Tensor]]:
    """Per micro-batch full-weight gradients by autograd on a dense, unfrozen copy."""
    modules = dict(plain.named_modules())
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for batch in batches:
        plain.zero_grad(set_to_none=True)
        plain(**batch).loss.backward()
        for n in names:
            grads[n].append(modules[n].weight.grad.detach().clone())
    return grads


def reference_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Independent top-k: stable descending sort (ties -> lower flat index), as a sorted flat index."""
    order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def flat_indices(supports: dict[str, Support]) -> dict[str, list[int]]:
    return {n: s.flat_index().tolist() for n, s in supports.items()}


@pytest.fixture
def pair():
    """(rosa model with random B, plain copy of the original weights)."""
    plain = tiny_llama()
    rosa = wrap_rosa(copy.deepcopy(plain), init_lora_weights=False)
    return rosa, plain


# --- statistics against brute force ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fisher", "grad"])
def test_data_methods_match_brute_force(pair, method):
    """Micro-batch statistics: the top-k of mean_b G_b^2 (fisher) or |mean_b G_b| (grad)."""
    rosa, plain = pair
    batches = make_batches()
    supports = collect_mask(rosa, batches, method=method, fisher_granularity="micro_batch")
    layers = mask_layers(rosa)
    assert len(layers) == 14
    grads = brute_force_grads(merged_dense_copy(rosa, plain), list(layers), batches)
    for name, layer in layers.items():
        g = torch.stack(grads[name])
        scores = (g**2).mean(0) if method == "fisher" else g.mean(0).abs()
        expected = reference_topk(scores, layer_budget(layer, ADAPTER))
        assert supports[name].flat_index().tolist() == expected.tolist(), name
        assert layer.nnz(ADAPTER) == layer_budget(layer, ADAPTER)
        # the support was applied to the layer
        assert layer.support(ADAPTER).flat_index().tolist() == expected.tolist()


def test_fisher_statistic_values_match_brute_force(pair):
    """The statistic itself (not just the chosen set) equals mean_b (dL_b/dW)^2."""
    rosa, plain = pair
    batches = make_batches()
    seen = {}

    def keep(name, layer, stats):
        seen[name] = (stats["fisher"].clone(), stats["grad"].clone(), stats["micro_batches"])
        return stats["fisher"]

    collect_mask(rosa, batches, method=keep, stats=("fisher", "grad"), fisher_granularity="micro_batch")
    grads = brute_force_grads(merged_dense_copy(rosa, plain), list(seen), batches)
    for name, (fisher, grad, count) in seen.items():
        g = torch.stack(grads[name])
        assert count == len(batches)
        torch.testing.assert_close(fisher, (g**2).mean(0), rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(grad, g.mean(0), rtol=1e-4, atol=1e-7)


def per_example_grads_float64(plain: nn.Module, names: list[str], batches: list[dict]) -> dict[str, list]:
    """Each example's share of its micro-batch's loss gradient, by autograd in float64: the example run alone
    (a causal LM without padding: examples do not interact), the cross-entropy of its own tokens summed and
    divided by the micro-batch's token count (the mean the model's loss takes over the whole micro-batch)."""
    plain = plain.double()
    modules = dict(plain.named_modules())
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        tokens = (labels[:, 1:] != -100).sum()
        for i in range(ids.shape[0]):
            plain.zero_grad(set_to_none=True)
            logits = plain(input_ids=ids[i : i + 1]).logits[0, :-1]
            loss = nn.functional.cross_entropy(logits, labels[i, 1:], reduction="sum") / tokens
            loss.backward()
            for n in names:
                grads[n].append(modules[n].weight.grad.detach().clone())
    return grads


def _fisher_of(model: nn.Module, batches: list[dict], granularity: str) -> dict[str, torch.Tensor]:
    seen = {}

    def keep(name, layer, stats):
        seen[name] = (stats["fisher"].clone(), stats.get("examples"))
        return stats["fisher"]

    collect_mask(model, batches, method=keep, fisher_granularity=granularity)
    return seen


def test_per_example_fisher_matches_float64_autograd(pair):
    """The default statistic (the reference's): mean over examples of each example's squared gradient."""
    rosa, plain = pair
    batches = make_batches(n=3, batch=3)
    seen = _fisher_of(rosa, batches, "example")
    grads = per_example_grads_float64(merged_dense_copy(rosa, plain), list(seen), batches)
    for name, (fisher, examples) in seen.items():
        assert examples == 9
        expected = torch.stack(grads[name]).pow(2).mean(0)
        torch.testing.assert_close(fisher.double(), expected, rtol=2e-4, atol=1e-12)
    # not the micro-batch statistic: the examples disagree, so the two rank entries differently
    micro = _fisher_of(rosa, batches, "micro_batch")
    name = next(iter(seen))
    assert not torch.allclose(seen[name][0], micro[name][0], rtol=0.05)


def test_per_example_fisher_is_the_same_one_example_at_a_time(pair, monkeypatch):
    """Bounded memory: per-example gradients formed one at a time give the same statistic."""
    from rosa.mask import statistics

    rosa, _ = pair
    batches = make_batches(n=2, batch=4)
    whole = _fisher_of(rosa, batches, "example")
    monkeypatch.setattr(statistics, "EXAMPLE_CHUNK_BYTES", 1)
    assert statistics.example_chunk(64, 64) == 1
    chunked = _fisher_of(rosa, batches, "example")
    for name, (fisher, _) in whole.items():
        torch.testing.assert_close(chunked[name][0], fisher, rtol=1e-5, atol=1e-12)


def test_collect_mask_leaves_no_gradients_and_restores_requires_grad(pair):
    rosa, _ = pair
    before = {n: p.requires_grad for n, p in rosa.named_parameters()}
    collect_mask(rosa, make_batches(2))
    assert {n: p.requires_grad for n, p in rosa.named_parameters()} == before
    assert all(p.grad is None for p in rosa.parameters())


def test_magnitude_is_topk_of_base_weight(pair):
    rosa, plain = pair
    supports = collect_mask(rosa, method="magnitude")
    modules = dict(plain.named_modules())
    for name, layer in mask_layers(rosa).items():
        expected = reference_topk(modules[name].weight.abs(), layer_budget(layer, ADAPTER))
        assert supports[name].flat_index().tolist() == expected.tolist()


@pytest.mark.parametrize("method", ["fisher", "grad", "magnitude", "random"])
@pytest.mark.parametrize("allocation", ["layer", "global"])
def test_scoring_changes_nothing_but_the_support(method, allocation):
    """Scoring must not write into what it reads: an fp32 base weight is shared, not copied, by the scorer (a
    magnitude mask once took ``abs_()`` of it and flipped every negative weight of the model)."""
    model = wrap_rosa(tiny_llama(), init_lora_weights=False)
    batch = make_batches(1)[0]
    with torch.no_grad():
        before_out = model(**batch).logits
    before = {k: v.clone() for k, v in model.state_dict().items() if "rosa_" not in k}
    collect_mask(model, make_batches(2), method=method, allocation=allocation)
    after = {k: v for k, v in model.state_dict().items() if "rosa_" not in k}
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    with torch.no_grad():  # the new sparse values are zero: the function is unchanged
        torch.testing.assert_close(model(**batch).logits, before_out, rtol=0, atol=1e-6)


def test_random_is_deterministic_per_seed():
    model = wrap_rosa(tiny_llama())
    a = flat_indices(collect_mask(model, method="random", seed=3, apply=False))
    b = flat_indices(collect_mask(wrap_rosa(tiny_llama(seed=5)), method="random", seed=3, apply=False))
    c = flat_indices(collect_mask(model, method="random", seed=4, apply=False))
    assert a == b  # the model's weights do not matter, only (seed, layer name)
    assert a != c
    assert len(set(map(tuple, a.values()))) == len(a)  # layers of equal shape get different masks
    layers = mask_layers(model)
    assert all(len(v) == layer_budget(layers[n], ADAPTER) for n, v in a.items())


def test_user_callable_is_honoured(pair):
    rosa, _ = pair
    calls = []

    def first_entries(name, layer, stats):  # prefer low flat indices: the mask is the first k entries
        calls.append((name, sorted(stats)))
        assert stats["fisher"].shape == (layer.out_features, layer.in_features)
        n = layer.out_features * layer.in_features
        return -torch.arange(n, dtype=torch.float32).reshape(layer.out_features, layer.in_features)

    supports = collect_mask(rosa, make_batches(1), method=first_entries)
    layers = mask_layers(rosa)
    assert [c[0] for c in calls] == list(layers)
    assert all(c[1] == ["fisher", "micro_batches"] for c in calls)  # the default fisher: per micro-batch
    for name, layer in layers.items():
        assert supports[name].flat_index().tolist() == list(range(layer_budget(layer, ADAPTER)))

    # data-free callable: no batches, empty stats
    def diagonal(name, layer, stats):
        assert stats == {}
        return torch.eye(layer.out_features, layer.in_features)

    supports = collect_mask(rosa, method=diagonal, apply=False)
    for name, layer in layers.items():
        idx = supports[name].flat_index()
        k = min(layer_budget(layer, ADAPTER), min(layer.out_features, layer.in_features))
        diag = [i * layer.in_features + i for i in range(min(layer.out_features, layer.in_features))]
        assert set(diag[:k]) <= set(idx.tolist())

    with pytest.raises(MaskError, match="expected a tensor of shape"):
        collect_mask(rosa, method=lambda n, layer, s: torch.zeros(3), apply=False)


def test_topk_ties_go_to_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0], [3.0, 0.0, 3.0]])
    assert topk_flat_index(scores, 2).tolist() == [1, 2]
    assert topk_flat_index(scores, 3).tolist() == [1, 2, 3]
    assert topk_flat_index(scores, 5).tolist() == [0, 1, 2, 3, 5]
    assert topk_flat_index(scores, 0).tolist() == []
    assert topk_flat_index(torch.zeros(4, 4), 3).tolist() == [0, 1, 2]


def test_nan_scores_are_refused():
    model = wrap_rosa(tiny_llama())
    with pytest.raises(MaskError, match="NaN"):
        collect_mask(
            model,
            method=lambda n, layer, s: torch.full((layer.out_features, layer.in_features), float("nan")),
        )


# --- global allocation -----------------------------------------------------------------------------------


def test_global_allocation_spends_exact_budget_within_capacity():
    model = wrap_rosa(tiny_llama(), capacity_factor=2.0, init_lora_weights=False)
    layers = mask_layers(model)
    total = sum(layer_budget(layer, ADAPTER) for layer in layers.values())
    seen = {}

    def fisher(name, layer, stats):
        seen[name] = stats["fisher"].clone()
        return stats["fisher"]

    supports = collect_mask(model, make_batches(), method=fisher, allocation="global")
    nnz = {n: s.nnz for n, s in supports.items()}
    assert sum(nnz.values()) == total
    assert all(nnz[n] <= layers[n].capacity[ADAPTER] for n in layers)
    assert any(nnz[n] != layer_budget(layers[n], ADAPTER) for n in layers)  # budget actually moved

    # Reference: normalise by the layer's mean, candidates = top-capacity per layer, the best `total` overall.
    cands = []
    for i, (name, layer) in enumerate(layers.items()):
        flat = seen[name].reshape(-1)
        idx = reference_topk(flat, layer.capacity[ADAPTER])
        mean = flat.double().mean().float()
        cands += [(float(flat[j] / mean), i, int(j)) for j in idx]
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    chosen = {n: [] for n in layers}
    names = list(layers)
    for _, i, j in cands[:total]:
        chosen[names[i]].append(j)
    assert flat_indices(supports) == {n: sorted(v) for n, v in chosen.items()}


def test_global_allocation_caps_layers_and_breaks_ties_by_module_order():
    model = wrap_rosa(tiny_llama(), capacity_factor=2.0)
    layers = mask_layers(model)
    names = list(layers)
    hot = "model.layers.1.mlp.up_proj"

    def scores(name, layer, stats):
        s = torch.ones(layer.out_features, layer.in_features)
        if name == hot:  # half the entries 3x the rest: normalised 1.5 against 0.5, every other layer 1.0
            s[: layer.out_features // 2] = 3.0
        return s

    supports = collect_mask(model, method=scores, allocation="global")
    total = sum(layer_budget(x, ADAPTER) for x in layers.values())
    assert supports[hot].nnz == layers[hot].capacity[ADAPTER]  # capped, although 1024 entries beat the rest
    assert supports[hot].flat_index().tolist() == list(range(layers[hot].capacity[ADAPTER]))
    left = total - layers[hot].capacity[ADAPTER]
    for name in names:  # equal normalised scores: earlier modules first, lower flat index first
        if name == hot:
            continue
        take = min(left, layers[name].capacity[ADAPTER])
        assert supports[name].flat_index().tolist() == list(range(take)), name
        left -= take
    assert sum(s.nnz for s in supports.values()) == total


def test_global_allocation_with_capacity_equal_budget_is_per_layer():
    a = wrap_rosa(tiny_llama(), capacity_factor=1.0)
    b = wrap_rosa(tiny_llama(), capacity_factor=1.0)
    batches = make_batches(2)
    assert flat_indices(collect_mask(a, batches, allocation="global")) == flat_indices(
        collect_mask(b, batches)
    )


def test_global_allocation_is_budget_exact_for_data_free_methods():
    model = wrap_rosa(tiny_llama(), capacity_factor=3.0)
    layers = mask_layers(model)
    supports = collect_mask(model, method="magnitude", allocation="global")
    assert sum(s.nnz for s in supports.values()) == sum(layer_budget(x, ADAPTER) for x in layers.values())
    assert all(supports[n].nnz <= layers[n].capacity[ADAPTER] for n in layers)


# --- memory cap ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("allocation", ["layer", "global"])
def test_memory_capped_collection_gives_the_same_mask(allocation):
    # LoRA dropout in train mode: every group's pass must replay the same dropout masks.
    def build():
        return wrap_rosa(tiny_llama(), capacity_factor=2.0, init_lora_weights=False, lora_dropout=0.2).train()

    batches = make_batches(2)
    layers = mask_layers(build())
    budget_gib = (2 * 4 * 32 * 64 + 3 * 4 * 32 * 64) / 2**30  # reserve + about three of the largest layers
    groups = plan_layer_groups(layers, budget_gib)
    assert len(groups) > 2 and [n for g in groups for n in g] == list(layers)
    torch.manual_seed(123)
    capped = collect_mask(build(), batches, allocation=allocation, memory_budget=budget_gib)
    torch.manual_seed(123)
    uncapped = collect_mask(build(), batches, allocation=allocation)
    assert flat_indices(capped) == flat_indices(uncapped)


def test_plan_layer_groups_respects_budget():
    layers = mask_layers(wrap_rosa(tiny_llama()))
    assert plan_layer_groups(layers, None) == [list(layers)]
    budget = 0.0005  # GiB
    for group in plan_layer_groups(layers, budget, n_stats=2):
        need = sum(layers[n].out_features * layers[n].in_features * 4 * 2 for n in group)
        assert need + 2 * 4 * 64 * 32 <= budget * 2**30
    with pytest.warns(UserWarning, match="too small"):
        groups = plan_layer_groups(layers, 1e-6)
    assert all(len(g) == 1 for g in groups)


def test_bf16_accumulator_runs_and_mostly_agrees():
    batches = make_batches()
    a = collect_mask(wrap_rosa(tiny_llama()), batches)
    b = collect_mask(wrap_rosa(tiny_llama()), batches, accumulator_dtype=torch.bfloat16)
    overlap = sum(len(set(a[n].flat_index().tolist()) & set(b[n].flat_index().tolist())) for n in a)
    assert overlap >= 0.9 * sum(s.nnz for s in a.values())


# --- robustness of the hooks -----------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_mask():
    batches = make_batches()
    plain_mask = flat_indices(collect_mask(wrap_rosa(tiny_llama()).train(), batches))
    model = wrap_rosa(tiny_llama())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert flat_indices(collect_mask(model, batches)) == plain_mask


def test_layer_called_twice_squares_the_sum():
    """G_b sums over every call of the layer in the micro-batch before squaring."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8, bias=False)

    class Twice(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x)))

    dense = Twice(copy.deepcopy(lin))
    model = Twice(
        RosaLinear(copy.deepcopy(lin).requires_grad_(False), ADAPTER, r=2, lora_alpha=2, density=0.25)
    )
    xs = [torch.randn(5, 8) for _ in range(3)]
    grads = []
    for x in xs:
        dense.zero_grad()
        dense(x).pow(2).sum().backward()
        grads.append(dense.layer.weight.grad.clone())
    expected = reference_topk(torch.stack(grads).pow(2).mean(0), 16)
    supports = collect_mask(model, xs, lambda m, x: m(x).pow(2).sum())
    assert supports["layer"].flat_index().tolist() == expected.tolist()


def test_layer_called_twice_per_example_squares_each_examples_sum():
    """Per example, an example's G_i sums over every call of the layer before it is squared."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8, bias=False)

    class Twice(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x)))

    dense = Twice(copy.deepcopy(lin).double())
    model = Twice(
        RosaLinear(copy.deepcopy(lin).requires_grad_(False), ADAPTER, r=2, lora_alpha=2, density=0.25)
    )
    xs = [torch.randn(3, 4, 8) for _ in range(2)]  # (examples, tokens, features)
    grads = []
    for x in xs:
        for example in x.double():
            dense.zero_grad()
            dense(example).pow(2).sum().backward()
            grads.append(dense.layer.weight.grad.clone())
    expected = reference_topk(torch.stack(grads).pow(2).mean(0), 16)
    supports = collect_mask(model, xs, lambda m, x: m(x).pow(2).sum(), fisher_granularity="example")
    assert supports["layer"].flat_index().tolist() == expected.tolist()


def test_conv1d_layout_fisher_and_magnitude():
    """GPT-2 Conv1D stores (in, out); scores are still out x in."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 10)  # nf=6 outputs, nx=10 inputs, weight (10, 6)
    model = nn.Sequential(
        RosaLinear(copy.deepcopy(conv).requires_grad_(False), ADAPTER, r=2, lora_alpha=2, density=0.2)
    )
    xs = [torch.randn(4, 10) for _ in range(2)]
    grads = []
    for x in xs:
        conv.zero_grad()
        conv(x).pow(2).sum().backward()
        grads.append(conv.weight.grad.t().clone())
    supports = collect_mask(model, xs, lambda m, x: m(x).pow(2).sum())
    assert (
        supports["0"].flat_index().tolist() == reference_topk(torch.stack(grads).pow(2).mean(0), 12).tolist()
    )
    supports = collect_mask(model, method="magnitude")
    assert supports["0"].flat_index().tolist() == reference_topk(conv.weight.t().abs(), 12).tolist()


def test_same_seed_and_data_give_the_same_mask():
    batches = make_batches()
    a = collect_mask(wrap_rosa(tiny_llama(seed=7)), batches)
    b = collect_mask(wrap_rosa(tiny_llama(seed=7)), batches)
    assert flat_indices(a) == flat_indices(b)


def test_sparse_only_layers_without_trainable_params():
    """r=0 (SpA): nothing in the forward requires grad before the mask, yet the statistics are collected."""
    plain = tiny_llama()
    rosa = wrap_rosa(copy.deepcopy(plain), r=0)
    batches = make_batches(2)
    supports = collect_mask(rosa, batches, fisher_granularity="example")
    grads = per_example_grads_float64(merged_dense_copy(rosa, plain), list(supports), batches)
    for name, layer in mask_layers(rosa).items():
        expected = reference_topk(torch.stack(grads[name]).pow(2).mean(0), layer_budget(layer, ADAPTER))
        assert supports[name].flat_index().tolist() == expected.tolist()


def test_collect_mask_needs_batches_for_data_methods():
    with pytest.raises(MaskError, match="needs batches"):
        collect_mask(wrap_rosa(tiny_llama()))


# --- 4-bit base ------------------------------------------------------------------------------------------


def test_collection_with_bitsandbytes_4bit_base():
    bnb = pytest.importorskip("bitsandbytes")
    plain = tiny_llama()
    quantized = copy.deepcopy(plain)
    for parent in list(quantized.model.layers.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=False,
                    compute_dtype=torch.float32,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
                setattr(parent, child_name, q.to("cpu"))
    rosa = wrap_rosa(quantized, init_lora_weights=False)
    layers = mask_layers(rosa)
    assert all(type(layer.get_base_layer()).__name__ == "Linear4bit" for layer in layers.values())
    batches = make_batches()
    seen = {}

    def fisher(name, layer, stats):
        seen[name] = stats["fisher"].clone()
        return stats["fisher"]

    supports = collect_mask(rosa, batches, method=fisher, fisher_granularity="micro_batch")
    # brute force on a dense copy holding the dequantised weights (+ s B A)
    grads = brute_force_grads(merged_dense_copy(rosa, plain), list(layers), batches)
    for name, layer in layers.items():
        reference = torch.stack(grads[name]).pow(2).mean(0)
        torch.testing.assert_close(seen[name], reference, rtol=1e-4, atol=1e-10)
        expected = reference_topk(reference, layer_budget(layer, ADAPTER))
        assert supports[name].flat_index().tolist() == expected.tolist(), name
    magnitude = collect_mask(rosa, method="magnitude", apply=False)
    for name, layer in layers.items():
        w = layer.get_base_weight().detach().float().abs()
        assert (
            magnitude[name].flat_index().tolist() == reference_topk(w, layer_budget(layer, ADAPTER)).tolist()
        )


# --- save / load -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = wrap_rosa(tiny_llama(), capacity_factor=2.0)
    collect_mask(model, make_batches(2), allocation="global")
    path = tmp_path_factory.mktemp("mask") / "mask.safetensors"
    save_mask(model, path, method="fisher")
    return model, path


def test_save_load_roundtrip(saved):
    model, path = saved
    fresh = wrap_rosa(tiny_llama(seed=9), capacity_factor=2.0)
    supports = load_mask(fresh, path)
    for name, layer in mask_layers(model).items():
        a, b = layer.support(ADAPTER), mask_layers(fresh)[name].support(ADAPTER)
        for field in ("row_offsets", "col_idx", "t_row_offsets", "t_col_idx", "t_perm"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (name, field)
        assert supports[name].nnz == a.nnz
    metadata, tensors = read_mask_file(path)
    assert metadata["format"] == "rosa-mask" and metadata["format_version"] == "1"
    assert metadata["method"] == "fisher"
    assert json.loads(metadata["layers"]) == list(mask_layers(model))
    assert json.loads(metadata["shapes"])["model.layers.0.mlp.up_proj"] == [64, 32]
    assert all(t.dtype == torch.int32 for t in tensors.values())


def test_save_refuses_a_model_without_mask(tmp_path):
    with pytest.raises(MaskError, match="no mask"):
        save_mask(wrap_rosa(tiny_llama()), tmp_path / "m.safetensors")


def _tamper(path, tmp_path, edit, metadata_edit=None):
    tensors = load_file(path)
    metadata, _ = read_mask_file(path)
    edit(tensors)
    if metadata_edit:
        metadata_edit(metadata)
    out = tmp_path / "bad.safetensors"
    save_file(tensors, out, metadata=metadata)
    return out


Q = "model.layers.0.self_attn.q_proj"


def _set(key, fn):
    def edit(t):
        t[key] = fn(t[key])

    return edit


BAD_FILES = {
    "out-of-range column": (
        _set(f"{Q}.col_idx", lambda c: torch.where(c == c.max(), 32, c)),
        None,
        "out of range",
    ),
    "non-monotone offsets": (
        _set(f"{Q}.row_offsets", lambda o: torch.cat([o[:1], o[-1:], o[2:]])),
        None,
        "not monotone",
    ),
    "wrong offsets length": (_set(f"{Q}.row_offsets", lambda o: o[:-1]), None, "row_offsets"),
    "wrong dtype": (_set(f"{Q}.col_idx", lambda c: c.long()), None, "int32"),
    "2-D tensor": (_set(f"{Q}.col_idx", lambda c: c.reshape(1, -1)), None, "1-D"),
    "missing tensor": (lambda t: t.pop(f"{Q}.col_idx"), None, "missing tensor"),
    "extra tensor": (
        lambda t: t.update({"evil": torch.zeros(1, dtype=torch.int32)}),
        None,
        "unexpected tensor",
    ),
    "missing layer": (
        lambda t: [t.pop(f"{Q}.{f}") for f in ("row_offsets", "col_idx")],
        lambda m: m.update(layers=json.dumps([n for n in json.loads(m["layers"]) if n != Q])),
        "no mask for layer",
    ),
    "extra layer": (
        lambda t: None,
        lambda m: m.update(layers=json.dumps([*json.loads(m["layers"]), "model.layers.9.x"])),
        "model.layers.9.x",
    ),
    "wrong shape metadata": (
        lambda t: None,
        lambda m: m.update(shapes=json.dumps({**json.loads(m["shapes"]), Q: [32, 64]})),
        "32x32 in the model",
    ),
    "not a mask file": (lambda t: None, lambda m: m.update(format="something"), "not a RoSA mask"),
    "future version": (lambda t: None, lambda m: m.update(format_version="2"), "version"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_load_refuses_bad_files_and_leaves_model_unchanged(saved, tmp_path, case):
    _, path = saved
    edit, metadata_edit, message = BAD_FILES[case]
    bad = _tamper(path, tmp_path, edit, metadata_edit)
    model = wrap_rosa(tiny_llama(), capacity_factor=2.0)
    collect_mask(model, method="random")  # a prior mask that must survive
    before = supports(model)
    with pytest.raises(MaskFileError, match=message):
        load_mask(model, bad)
    assert supports(model) == before


def test_load_refuses_more_nonzeros_than_capacity(saved):
    _, path = saved  # saved with capacity 2x budget and global allocation: some layer exceeds its budget
    small = wrap_rosa(tiny_llama())  # capacity == budget
    with pytest.raises(MaskFileError, match="holds at most"):
        load_mask(small, path)
    assert all(layer.nnz(ADAPTER) == 0 for layer in mask_layers(small).values())


def test_load_refuses_wrong_model_shape(saved):
    _, path = saved
    other = wrap_rosa(tiny_llama(0, hidden_size=48), density=0.1)
    with pytest.raises(MaskFileError, match="in the model but the file says"):
        load_mask(other, path)


def test_load_refuses_garbage(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(MaskFileError, match="not a readable safetensors"):
        load_mask(wrap_rosa(tiny_llama()), path)


def test_names_ignore_peft_prefix():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.base_model = nn.Module()
            self.base_model.model = inner

    model = wrap_rosa(tiny_llama())
    assert list(mask_layers(Wrapper(model))) == list(mask_layers(model))
    assert all(isinstance(x, RosaLayer) for x in mask_layers(model).values())


def test_mask_summary_counts_what_each_layer_holds():
    """nnz from the layer's support, realised density = nnz / (out * in), against the budget the configured
    density gives (a random mask fills the budget exactly)."""
    from rosa.mask import mask_summary

    model = wrap_rosa(tiny_llama(), density=0.05)
    collect_mask(model, make_batches(1), method="random")
    summary = mask_summary(model)
    assert summary and summary.keys() == {n for n, _ in _rosa_layers(model)}
    for name, layer in _rosa_layers(model):
        row = summary[name]
        weights = layer.out_features * layer.in_features
        assert row["nnz"] == layer.nnz(ADAPTER) == row["budget"] == round(0.05 * weights)
        assert row["realised_density"] == pytest.approx(row["nnz"] / weights)


def _rosa_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RosaLayer)]
