"""RosaLinear against the independent float64 reference, PEFT's LoRA, and its own merge / error paths."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import generator
from peft import LoraConfig, get_peft_model
from reference import (
    assert_matches,
    base_weight_out_in,
    check_layer,
    dense_from_mask,
    density_mask,
    make_base,
    make_rosa,
    mask_with_empty_lines,
    run_layer,
    single_entry_mask,
)
from torch import nn

import rosa.sparse.ops as ops_module
from rosa import RosaConfig, RosaConfigError, RosaLinear
from rosa.sparse import empty_support, support_from_mask
from rosa.sparse.strategy import choose_strategy

OUT, IN = 12, 10


# name -> (mask builder, x shape (without IN), r, non-contiguous)
CASES = {
    "random": (lambda g: density_mask(OUT, IN, 0.3, g), (7,), 3, False),
    "3d": (lambda g: density_mask(OUT, IN, 0.2, g), (2, 5), 3, False),
    "empty_rows_cols": (lambda g: mask_with_empty_lines(OUT, IN, 0.8, g), (6,), 2, False),
    "single_nonzero": (lambda g: single_entry_mask(OUT, IN, 4, 7), (5,), 2, False),
    "density_1": (lambda g: density_mask(OUT, IN, 1.0, g), (4,), 2, False),
    "density_0": (lambda g: density_mask(OUT, IN, 0.0, g), (4,), 2, False),
    "r_0": (lambda g: density_mask(OUT, IN, 0.3, g), (6,), 0, False),
    "r_0_density_0": (lambda g: density_mask(OUT, IN, 0.0, g), (3,), 0, False),
    "non_contiguous_3d": (lambda g: density_mask(OUT, IN, 0.3, g), (3, 4), 3, True),
    "one_token": (lambda g: density_mask(OUT, IN, 0.3, g), (1,), 3, False),
}

BASES = [("linear", True), ("linear", False), ("conv1d", True)]


class _Spy:
    """Counts calls of the two differentiable ops the layer may use."""

    def __init__(self, monkeypatch):
        self.calls = {"sparse_linear": 0, "folded_linear": 0}
        for name in self.calls:
            original = getattr(ops_module, name)

            def wrapper(*args, _name=name, _original=original):
                self.calls[_name] += 1
                return _original(*args)

            monkeypatch.setattr(ops_module, name, wrapper)


@pytest.mark.parametrize("strategy", ["spmm", "fold"])
@pytest.mark.parametrize(("kind", "bias"), BASES, ids=["linear-bias", "linear-nobias", "conv1d"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_reference(case, kind, bias, strategy, monkeypatch):
    build, lead, r, non_contiguous = CASES[case]
    g = generator(list(CASES).index(case))
    mask = build(g)
    base = make_base(kind, IN, OUT, bias, torch.float32, seed=1)
    layer = make_rosa(base, mask, r=r, strategy=strategy, extra_capacity=3, seed=2)
    x = torch.randn(*lead, IN, generator=g)
    grad_out = torch.randn(*lead, OUT, generator=g)
    spy = _Spy(monkeypatch)
    check_layer(layer, mask, x, grad_out, non_contiguous=non_contiguous)
    nnz = int(mask.sum())
    expected = {"sparse_linear": 0, "folded_linear": 0}
    if nnz:
        expected["folded_linear" if strategy == "fold" else "sparse_linear"] = 1
    assert spy.calls == expected


@pytest.mark.parametrize("strategy", ["spmm", "fold"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype", ["float32", "same"])
def test_layer_low_precision(dtype, adapter_dtype, kind, strategy):
    g = generator(5)
    mask = density_mask(OUT, IN, 0.3, g)
    base = make_base(kind, IN, OUT, True, dtype, seed=3)
    adapter = torch.float32 if adapter_dtype == "float32" else dtype
    layer = make_rosa(base, mask, r=4, strategy=strategy, adapter_dtype=adapter, seed=4)
    x = torch.randn(2, 6, IN, generator=g).to(dtype)
    grad_out = torch.randn(2, 6, OUT, generator=g).to(dtype)
    check_layer(layer, mask, x, grad_out)


def test_layer_zero_tokens():
    mask = density_mask(OUT, IN, 0.3, generator(0))
    for strategy in ("spmm", "fold"):
        layer = make_rosa(make_base("linear", IN, OUT, True, torch.float32, 0), mask, strategy=strategy)
        run = run_layer(layer, torch.randn(0, IN), torch.randn(0, OUT))
        assert run.y.shape == (0, OUT)
        assert run.grad_x.shape == (0, IN)
        assert bool((run.grad_values == 0).all())


def test_layer_rslora_scaling():
    mask = density_mask(OUT, IN, 0.2, generator(1))
    layer = make_rosa(
        make_base("linear", IN, OUT, True, torch.float32, 0), mask, r=4, lora_alpha=8, use_rslora=True
    )
    assert layer.scaling["default"] == pytest.approx(8 / 2)
    check_layer(layer, mask, torch.randn(5, IN), torch.randn(5, OUT))


@pytest.mark.parametrize("strategy", ["spmm", "fold"])
@pytest.mark.parametrize(("kind", "bias"), [("linear", True), ("linear", False), ("conv1d", True)])
def test_layer_gradcheck(kind, bias, strategy):
    """gradcheck of the whole layer in float64, through x, A, B and the sparse values."""
    g = generator(7)
    out_features, in_features = 5, 4
    mask = mask_with_empty_lines(out_features, in_features, 1.0, g) | single_entry_mask(
        out_features, in_features, 0, 0
    )
    base = make_base(kind, in_features, out_features, bias, torch.float64, seed=5)
    layer = make_rosa(
        base, mask, r=2, strategy=strategy, adapter_dtype=torch.float64, extra_capacity=1, seed=6
    )
    x = torch.randn(2, 3, in_features, dtype=torch.float64, generator=g, requires_grad=True)
    params = {
        "rosa_A.default.weight": layer.rosa_A["default"].weight.detach().clone().requires_grad_(True),
        "rosa_B.default.weight": layer.rosa_B["default"].weight.detach().clone().requires_grad_(True),
        "rosa_values.default": layer.rosa_values["default"].detach().clone().requires_grad_(True),
    }
    names = list(params)

    def fn(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x,))

    # fast_mode: checks J v against a numerical directional derivative for random v (one perturbation per
    # input tensor instead of one per element), which keeps the six cases at a fraction of a second each.
    assert torch.autograd.gradcheck(fn, (x, *params.values()), fast_mode=True)


def test_auto_strategy_follows_the_cost_rule(monkeypatch):
    out_features, in_features = 64, 48
    base = make_base("linear", in_features, out_features, True, torch.float32, seed=0)
    for density, tokens in [(0.01, 4), (1.0, 256)]:
        mask = density_mask(out_features, in_features, density, generator(0))
        layer = make_rosa(base, mask, strategy="auto")
        expected = choose_strategy("cpu", out_features, in_features, int(mask.sum()), tokens)
        spy = _Spy(monkeypatch)
        check_layer(layer, mask, torch.randn(tokens, in_features), torch.randn(tokens, out_features))
        used = "fold" if spy.calls["folded_linear"] else "spmm"
        assert used == expected
        monkeypatch.undo()


def test_fold_falls_back_to_spmm_with_a_trainable_base(monkeypatch):
    mask = density_mask(OUT, IN, 0.3, generator(0))
    base = make_base("linear", IN, OUT, True, torch.float32, seed=0)
    layer = make_rosa(base, mask, strategy="fold")
    base.weight.requires_grad_(True)
    spy = _Spy(monkeypatch)
    check_layer(layer, mask, torch.randn(4, IN), torch.randn(4, OUT))
    assert spy.calls == {"sparse_linear": 1, "folded_linear": 0}


@pytest.mark.parametrize(("first", "second"), [("fold", "spmm"), ("spmm", "fold"), ("fold", "fold")])
def test_two_active_adapters(first, second):
    """Both adapters' LoRA and sparse terms are added, at most one of them folded into the weight."""
    g = generator(21)
    base = make_base("linear", IN, OUT, True, torch.float64, seed=0)
    masks = {"default": density_mask(OUT, IN, 0.3, g), "second": density_mask(OUT, IN, 0.2, g)}
    layer = make_rosa(base, masks["default"], r=2, strategy=first, adapter_dtype=torch.float64)
    layer.update_layer(
        "second", r=3, lora_alpha=5, density=0.2, adapter_dtype=torch.float64, sparse_strategy=second
    )
    layer.set_support("second", support_from_mask(masks["second"]))
    with torch.no_grad():
        layer.rosa_values["second"].normal_(generator=g)
        layer.rosa_B["second"].weight.normal_(generator=g)
    layer.set_adapter(["default", "second"])
    x = torch.randn(2, 3, IN, dtype=torch.float64, generator=g)
    grad_out = torch.randn(2, 3, OUT, dtype=torch.float64, generator=g)
    run = run_layer(layer, x, grad_out)

    # Reference: leaves copied from the layer, dense S from the masks, plain float64 autograd.
    xr = x.clone().requires_grad_(True)
    expected = xr @ base.weight.t() + base.bias
    leaves = {}
    for name, mask in masks.items():
        a = layer.rosa_A[name].weight.detach().clone().requires_grad_(True)
        b = layer.rosa_B[name].weight.detach().clone().requires_grad_(True)
        s = dense_from_mask(mask, layer.rosa_values[name][: int(mask.sum())]).requires_grad_(True)
        leaves[name] = (a, b, s)
        expected = expected + layer.scaling[name] * (xr @ a.t()) @ b.t() + xr @ s.t()
    expected.backward(grad_out)
    assert_matches(run.y, expected, 1e-12, "y")
    assert_matches(run.grad_x, xr.grad, 1e-12, "grad x")
    for name, mask in masks.items():
        a, b, s = leaves[name]
        nnz = int(mask.sum())
        assert_matches(layer.rosa_A[name].weight.grad, a.grad, 1e-12, f"grad A {name}")
        assert_matches(layer.rosa_B[name].weight.grad, b.grad, 1e-12, f"grad B {name}")
        assert_matches(layer.rosa_values[name].grad[:nnz], s.grad[mask], 1e-12, f"grad values {name}")


# --- density 0 is PEFT's LoRA ------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("strategy", ["spmm", "fold"])
@pytest.mark.parametrize(("kind", "bias"), BASES, ids=["linear-bias", "linear-nobias", "conv1d"])
def test_density_zero_equals_peft_lora(kind, bias, strategy):
    r, alpha = 4, 8
    base = make_base(kind, IN, OUT, bias, torch.float32, seed=11)
    peft_model = get_peft_model(
        _Tiny(base),
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=["proj"],
            init_lora_weights=False,
            fan_in_fan_out=kind == "conv1d",
        ),
    )
    lora = peft_model.base_model.model.proj
    rosa_base = make_base(kind, IN, OUT, bias, torch.float32, seed=11)
    layer = RosaLinear(rosa_base, "default", r=r, lora_alpha=alpha, density=0.0, sparse_strategy=strategy)
    with torch.no_grad():
        layer.rosa_A["default"].weight.copy_(lora.lora_A["default"].weight)
        layer.rosa_B["default"].weight.copy_(lora.lora_B["default"].weight)
    assert layer.scaling["default"] == lora.scaling["default"]
    g = generator(12)
    x = torch.randn(3, 5, IN, generator=g)
    grad_out = torch.randn(3, 5, OUT, generator=g)

    x_peft = x.clone().requires_grad_(True)
    y_peft = lora(x_peft)
    y_peft.backward(grad_out)
    run = run_layer(layer, x, grad_out)
    assert run.grad_values is None
    torch.testing.assert_close(run.y, y_peft.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run.grad_x, x_peft.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run.grad_a, lora.lora_A["default"].weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run.grad_b, lora.lora_B["default"].weight.grad, rtol=1e-6, atol=1e-6)


# --- values before a support exists, set_support ----------------------------------------------------------


@pytest.mark.parametrize("strategy", ["spmm", "fold", "auto"])
def test_values_get_no_gradient_before_a_support(strategy):
    base = make_base("linear", IN, OUT, True, torch.float32, seed=0)
    layer = RosaLinear(base, "default", r=2, lora_alpha=4, density=0.25, sparse_strategy=strategy)
    values = layer.rosa_values["default"]
    assert values.numel() == round(0.25 * OUT * IN)
    assert values.requires_grad
    assert layer.nnz("default") == 0
    with torch.no_grad():
        values.normal_()  # even nonzero values take no part while the support is empty
    x = torch.randn(4, IN, requires_grad=True)
    y = layer(x)
    expected = base(x) + layer.scaling["default"] * layer.rosa_B["default"](layer.rosa_A["default"](x))
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert values.grad is None
    assert layer.rosa_A["default"].weight.grad is not None


def test_set_support_resets_values_and_moves_nothing_else():
    base = make_base("linear", IN, OUT, True, torch.float32, seed=0)
    mask = density_mask(OUT, IN, 0.3, generator(0))
    layer = make_rosa(base, mask, strategy="spmm")
    values = layer.rosa_values["default"]
    assert bool((values != 0).any())
    mask2 = density_mask(OUT, IN, 0.2, generator(9))
    layer.set_support("default", support_from_mask(mask2))
    assert layer.rosa_values["default"] is values  # the parameter object survives (optimizers hold it)
    assert bool((values == 0).all())
    assert layer.nnz("default") == int(mask2.sum())
    assert torch.equal(layer.support("default").to_dense_mask(), mask2)


# --- merge / unmerge ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "bias"), BASES, ids=["linear-bias", "linear-nobias", "conv1d"])
@pytest.mark.parametrize("r", [0, 3])
def test_merge_unmerge_and_delta_weight(kind, bias, r):
    mask = mask_with_empty_lines(OUT, IN, 0.7, generator(3))
    base = make_base(kind, IN, OUT, bias, torch.float32, seed=4)
    w0 = base_weight_out_in(base).detach().clone()
    layer = make_rosa(base, mask, r=r, extra_capacity=2, seed=5)
    nnz = int(mask.sum())
    s = dense_from_mask(mask, layer.rosa_values["default"][:nnz])
    expected_delta = s
    if r:
        a = layer.rosa_A["default"].weight.double()
        b = layer.rosa_B["default"].weight.double()
        expected_delta = expected_delta + layer.scaling["default"] * b @ a
    delta = layer.get_delta_weight("default")
    assert delta.shape == (OUT, IN)
    assert_matches(delta, expected_delta, 1e-6, "delta weight")

    x = torch.randn(2, 3, IN)
    with torch.no_grad():
        y_unmerged = layer(x)
        layer.merge()
        assert layer.merged
        assert_matches(base_weight_out_in(base), w0.double() + expected_delta, 1e-6, "merged weight")
        y_merged = layer(x)
        assert_matches(y_merged, y_unmerged.double(), 1e-5, "merged forward")
        layer.unmerge()
        assert not layer.merged
        assert_matches(base_weight_out_in(base), w0.double(), 1e-6, "unmerged weight")
        assert_matches(layer(x), y_unmerged.double(), 1e-5, "forward after unmerge")


def test_safe_merge_refuses_non_finite():
    mask = density_mask(OUT, IN, 0.3, generator(0))
    base = make_base("linear", IN, OUT, True, torch.float32, seed=0)
    w0 = base.weight.detach().clone()
    layer = make_rosa(base, mask)
    with torch.no_grad():
        layer.rosa_values["default"][0] = float("inf")
    with pytest.raises(ValueError, match="NaNs or infs"):
        layer.merge(safe_merge=True)
    assert torch.equal(base.weight, w0)


def test_disable_adapters_gives_the_base_output():
    mask = density_mask(OUT, IN, 0.3, generator(0))
    base = make_base("linear", IN, OUT, True, torch.float32, seed=0)
    layer = make_rosa(base, mask)
    x = torch.randn(3, IN)
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), base(x))
    layer.enable_adapters(True)
    assert not torch.allclose(layer(x), base(x))


# --- bad input gives a clear error --------------------------------------------------------------------------


@pytest.mark.parametrize("density", [-0.1, 1.5, float("nan"), True])
def test_config_rejects_density_outside_unit_interval(density):
    with pytest.raises(RosaConfigError, match=r"density must be a number in \[0, 1\]"):
        RosaConfig(density=density)


def test_config_rejects_bad_rank_and_patterns():
    with pytest.raises(RosaConfigError, match="r must be a non-negative integer, got -1"):
        RosaConfig(r=-1)
    with pytest.raises(RosaConfigError, match="r must be a non-negative integer"):
        RosaConfig(r=2.5)
    with pytest.raises(RosaConfigError, match=r"rank_pattern\['q_proj'\] must be a non-negative integer"):
        RosaConfig(rank_pattern={"q_proj": -2})
    with pytest.raises(RosaConfigError, match=r"density_pattern\['v_proj'\] must be a number in \[0, 1\]"):
        RosaConfig(density_pattern={"v_proj": 2.0})
    with pytest.raises(RosaConfigError, match="sparse_strategy must be"):
        RosaConfig(sparse_strategy="dense")
    cfg = RosaConfig(r=0, density=0.0)
    assert (cfg.r, cfg.density) == (0, 0.0)


def test_update_layer_rejects_bad_rank_density_and_capacity():
    base = make_base("linear", IN, OUT, True, torch.float32, seed=0)
    with pytest.raises(ValueError, match="r must be >= 0, got -1"):
        RosaLinear(base, "default", r=-1, lora_alpha=1, density=0.1)
    layer = RosaLinear(base, "default", r=2, lora_alpha=4, density=0.1)
    with pytest.raises(ValueError, match="r must be >= 0, got -3"):
        layer.update_layer("other", r=-3, lora_alpha=1, density=0.1)
    for density in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
            layer.update_layer("other", r=2, lora_alpha=1, density=density)
    with pytest.raises(ValueError, match=r"capacity 3 must lie in \[12, 120\]"):
        layer.update_layer("other", r=2, lora_alpha=1, density=0.1, capacity=3)
    assert "other" not in layer.rosa_values


def test_set_support_rejects_wrong_shape_and_over_capacity():
    base = make_base("linear", IN, OUT, True, torch.float32, seed=0)
    layer = RosaLinear(base, "default", r=2, lora_alpha=4, density=0.1)  # capacity 12
    with pytest.raises(ValueError, match=r"support shape \(10, 12\) does not match the layer's \(12, 10\)"):
        layer.set_support("default", empty_support((IN, OUT)))
    with pytest.raises(ValueError, match=r"support has 13 nonzeros but adapter 'default' holds at most 12"):
        layer.set_support("default", support_from_mask(density_mask(OUT, IN, 13 / 120, generator(0))))
    assert layer.nnz("default") == 0
    layer.set_support("default", support_from_mask(density_mask(OUT, IN, 0.1, generator(0))))
    assert layer.nnz("default") == 12


@pytest.mark.parametrize("strategy", ["spmm", "fold"])
def test_input_on_another_device_fails_clearly(strategy):
    mask = density_mask(OUT, IN, 0.3, generator(0))
    layer = make_rosa(make_base("linear", IN, OUT, True, torch.float32, 0), mask, r=0, strategy=strategy)
    with pytest.raises(RuntimeError, match="device"):
        layer(torch.randn(3, IN, device="meta"))


# --- torch.compile ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["spmm", "fold"])
def test_torch_compile_matches_eager(strategy):
    torch._dynamo.reset()
    mask = density_mask(OUT, IN, 0.3, generator(0))
    base = make_base("linear", IN, OUT, True, torch.float32, seed=0)
    layer = make_rosa(base, mask, r=3, strategy=strategy, extra_capacity=2)
    x = torch.randn(2, 5, IN, generator=generator(1))
    grad_out = torch.randn(2, 5, OUT, generator=generator(2))
    eager = run_layer(layer, x, grad_out)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = run_layer(compiled, x, grad_out)
    for name in ("y", "grad_x", "grad_a", "grad_b", "grad_values"):
        torch.testing.assert_close(getattr(got, name), getattr(eager, name), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("strategy", ["spmm", "fold"])
def test_bf16_layer_saves_no_second_copy_of_its_input(strategy):
    """With a bf16 base and fp32 adapters, the sparse ops reuse the fp32 input the LoRA branch saves, so RoSA
    keeps no more activation memory than PEFT's LoRA on the same layer (only the support's own indices)."""
    from peft import LoraConfig, get_peft_model

    from rosa import get_rosa_model
    from rosa.masks import collect_mask, mask_layers

    def saved_bytes(model, x) -> int:
        weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
        seen: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage()._cdata not in weights:
                seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(seen.values())

    torch.manual_seed(0)
    x = torch.randn(256, 96, dtype=torch.bfloat16)
    base = nn.Sequential(nn.Linear(96, 160)).to(torch.bfloat16)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    rosa = get_rosa_model(
        copy.deepcopy(base),
        RosaConfig(r=4, lora_alpha=8, density=0.05, target_modules=["0"], sparse_strategy=strategy),
    )
    collect_mask(rosa, [None], lambda m, _: m(x).float().pow(2).sum(), method="random")
    nnz = sum(layer.nnz("default") for layer in mask_layers(rosa).values())
    index_bytes = nnz * 8 * 3 + (160 + 1) * 8 * 2  # at most: column, flat and transposed indices, two offsets
    assert saved_bytes(rosa, x) <= saved_bytes(lora, x) + index_bytes
    assert rosa(x).dtype == torch.bfloat16


@pytest.mark.parametrize("r", [4, 0])
def test_forward_makes_at_most_one_activation_more_than_peft_lora_and_leaves_the_base_output_alone(r):
    """The sparse term goes into the LoRA sum in place (fresh activation-sized tensors cost page faults on CPU),
    never into the base layer's own output, which a hook or another adapter may hold."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rosa import get_rosa_model
    from rosa.masks import collect_mask

    tokens, out_features = 64, 40

    class CountActivations(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.fresh = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            name = func._schema.name
            if not name.endswith("_") and func not in (
                torch.ops.aten.view.default,
                torch.ops.aten._unsafe_view.default,
            ):
                outs = result if isinstance(result, (tuple, list)) else (result,)
                self.fresh += sum(
                    isinstance(t, torch.Tensor) and t.numel() == tokens * out_features for t in outs
                )
            return result

    def fresh_activations(model, x) -> int:
        with CountActivations() as counter:
            model(x).sum().backward()
        return counter.fresh

    torch.manual_seed(0)
    x = torch.randn(tokens, 24)
    base = nn.Sequential(nn.Linear(24, out_features))
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    rosa = get_rosa_model(
        copy.deepcopy(base), RosaConfig(r=r, lora_alpha=8, density=0.1, target_modules=["0"])
    )
    collect_mask(rosa, [None], lambda m, _: m(x).pow(2).sum(), method="random")
    with torch.no_grad():
        for layer in rosa.modules():
            if isinstance(layer, RosaLinear):
                layer.rosa_values["default"].normal_()
    if r:
        assert fresh_activations(rosa, x) <= fresh_activations(lora, x) + 1  # + the sparse op's output

    seen = []
    layer = next(m for m in rosa.modules() if isinstance(m, RosaLinear))
    layer.base_layer.register_forward_hook(lambda module, args, output: seen.append((output, output.clone())))
    y = rosa(x)
    ((output, as_made),) = seen
    assert torch.equal(output, as_made)
    delta = layer.get_delta_weight("default").double()
    torch.testing.assert_close(y.double(), as_made.double() + x.double() @ delta.t(), rtol=1e-5, atol=1e-5)
