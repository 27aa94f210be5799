"""The custom ops of rosa.sparse.ops against the independent float64 reference, gradcheck and opcheck."""

from __future__ import annotations

import pytest
import torch
from helpers import generator
from reference import (
    assert_matches,
    csr_of,
    dense_from_mask,
    density_mask,
    flat_index_of,
    mask_with_empty_lines,
    random_mask,
    reference_linear,
    single_entry_mask,
    strided,
    tol_for,
    widen,
)

from rosa.sparse import ops
from rosa.sparse.strategy import COST_MODELS, choose_strategy

# name -> mask; shapes chosen to cover square, tall, wide, 1-wide and a size above one cache line of indices.
MASKS = {
    "random_7x5": lambda: density_mask(7, 5, 0.4, generator(1)),
    "random_16x33": lambda: density_mask(16, 33, 0.1, generator(2)),
    "random_40x3": lambda: density_mask(40, 3, 0.5, generator(3)),
    "empty_rows_cols": lambda: mask_with_empty_lines(11, 13, 0.9, generator(4)),
    "single_nonzero": lambda: single_entry_mask(6, 9, 5, 0),
    "one_by_one": lambda: single_entry_mask(1, 1, 0, 0),
    "density_1": lambda: density_mask(8, 6, 1.0, generator(5)),
    "density_0": lambda: density_mask(8, 6, 0.0, generator(6)),
    "row_vector": lambda: random_mask(1, 17, 5, generator(7)),
    "column_vector": lambda: random_mask(17, 1, 5, generator(8)),
}

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["default", "mkl"])
def cpu_path(request, monkeypatch):
    """The CPU kernels a test runs on: the default (rosa's compiled kernels where they can be built) and
    PyTorch's MKL ones, the fallback (tests/test_cpu_kernels.py checks that it is taken when it must be)."""
    if request.param == "mkl":
        monkeypatch.setenv("ROSA_SPARSE_BACKEND", "torch")
    return request.param


def _inputs(mask, tokens, dtype, seed, non_contiguous=False):
    out_features, in_features = mask.shape
    g = generator(seed)
    x = torch.randn(tokens, in_features, generator=g).to(dtype)
    dy = torch.randn(tokens, out_features, generator=g).to(dtype)
    values = torch.randn(int(mask.sum()), generator=g).to(dtype)
    if non_contiguous:
        x, dy = strided(widen(x)), strided(widen(dy))
        assert not x.is_contiguous() or x.shape[1] == 1
    return x, dy, values


@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(MASKS))
def test_primitive_ops_match_reference(case, dtype, non_contiguous, cpu_path):
    mask = MASKS[case]()
    out_features, in_features = mask.shape
    csr = csr_of(mask)
    x, dy, values = _inputs(mask, 6, dtype, seed=len(case), non_contiguous=non_contiguous)
    s = dense_from_mask(mask, values)
    tol = tol_for(dtype)

    y = ops.spmm(x, values, csr.row_offsets, csr.col_idx, out_features)
    assert y.dtype == dtype and y.shape == (6, out_features)
    ax, ady, a_s = x.double().abs(), dy.double().abs(), s.abs()
    assert_matches(y, x.double() @ s.t(), tol, "spmm", ax @ a_s.t())

    dx = ops.spmm_t(dy, values, csr.t_row_offsets, csr.t_col_idx, csr.t_perm, in_features)
    assert dx.dtype == dtype and dx.shape == (6, in_features)
    assert_matches(dx, dy.double() @ s, tol, "spmm_t", ady @ a_s)

    dv = ops.sddmm(dy, x, csr.row_offsets, csr.col_idx)
    assert dv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Products of two half-precision numbers are exact in fp32: the value gradient has fp32 accuracy.
    assert_matches(dv, (dy.double().t() @ x.double())[mask], tol_for(dv.dtype), "sddmm", (ady.t() @ ax)[mask])

    weight = torch.randn(out_features, in_features, generator=generator(99)).to(dtype)
    if non_contiguous:
        weight = weight.t().contiguous().t()  # a transposed view, as a Conv1D weight is seen
    folded = ops.fold(weight, values, flat_index_of(mask))
    assert folded.dtype == dtype and folded.is_contiguous()
    assert_matches(folded, weight.double() + s, tol, "fold", weight.double().abs() + a_s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(MASKS))
@pytest.mark.parametrize("op", ["sparse_linear", "folded_linear"])
def test_differentiable_ops_match_reference(op, case, dtype, cpu_path):
    mask = MASKS[case]()
    out_features, in_features = mask.shape
    csr = csr_of(mask)
    x, grad_out, values = _inputs(mask, 5, dtype, seed=3 + len(case), non_contiguous=True)
    weight = torch.randn(out_features, in_features, generator=generator(4)).to(dtype)
    ref = reference_linear(
        x, weight if op == "folded_linear" else None, None, None, None, 0.0, mask, values, grad_out
    )
    leaf_x = widen(x).requires_grad_(True)
    leaf_values = values.clone().requires_grad_(True)
    if op == "sparse_linear":
        y = ops.sparse_linear(strided(leaf_x), leaf_values, *csr.args())
    else:
        y = ops.folded_linear(
            strided(leaf_x), weight, leaf_values, flat_index_of(mask), csr.row_offsets, csr.col_idx
        )
    y.backward(grad_out)
    tol = tol_for(dtype)
    assert y.dtype == dtype
    assert_matches(y, ref.y, tol, "y", ref.mag.y)
    assert_matches(strided(leaf_x.grad), ref.grad_x, tol, "grad x", ref.mag.grad_x)
    assert leaf_values.grad.dtype == dtype
    assert_matches(leaf_values.grad, ref.grad_values, tol, "grad values", ref.mag.grad_values)


def test_values_only_and_x_only_gradients():
    mask = density_mask(9, 7, 0.3, generator(0))
    csr = csr_of(mask)
    x, grad_out, values = _inputs(mask, 4, torch.float64, seed=1)
    ref = reference_linear(x, None, None, None, None, 0.0, mask, values, grad_out)
    v = values.clone().requires_grad_(True)
    ops.sparse_linear(x, v, *csr.args()).backward(grad_out)
    assert_matches(v.grad, ref.grad_values, 1e-12, "grad values", ref.mag.grad_values)
    xx = x.clone().requires_grad_(True)
    ops.sparse_linear(xx, values, *csr.args()).backward(grad_out)
    assert_matches(xx.grad, ref.grad_x, 1e-12, "grad x", ref.mag.grad_x)


def test_sparse_linear_dispatches_once_in_the_forward():
    """The forward runs one rosa op, not sparse_linear and then spmm: the second dispatch cost a layer call about
    as much as the kernel at one token. The backward still goes through the spmm_t / sddmm ops (torch.compile
    traces it)."""
    from torch.profiler import ProfilerActivity, profile

    mask = density_mask(9, 7, 0.3, generator(0))
    csr = csr_of(mask)
    x, grad_out, values = _inputs(mask, 4, torch.float32, seed=1)
    v = values.clone().requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = ops.sparse_linear(x, v, *csr.args())
    forward = [e.name for e in prof.events() if e.name.startswith("rosa::")]
    assert forward == ["rosa::sparse_linear"]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y.backward(grad_out)
    assert "rosa::sddmm" in {e.name for e in prof.events()}


# --- gradcheck and opcheck -----------------------------------------------------------------------------

GRADCHECK_MASKS = [
    "random_7x5",
    "empty_rows_cols",
    "single_nonzero",
    "density_1",
    "density_0",
    "column_vector",
]


@pytest.mark.parametrize("case", GRADCHECK_MASKS)
def test_gradcheck_sparse_linear(case):
    mask = MASKS[case]()
    csr = csr_of(mask)
    x, _, values = _inputs(mask, 3, torch.float64, seed=5)
    x.requires_grad_(True)
    values.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, v: ops.sparse_linear(x, v, *csr.args()), (x, values))


@pytest.mark.parametrize("case", GRADCHECK_MASKS)
def test_gradcheck_folded_linear(case):
    mask = MASKS[case]()
    csr = csr_of(mask)
    x, _, values = _inputs(mask, 3, torch.float64, seed=6)
    weight = torch.randn(mask.shape, dtype=torch.float64, generator=generator(7))
    flat = flat_index_of(mask)
    x.requires_grad_(True)
    values.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, v: ops.folded_linear(x, weight, v, flat, csr.row_offsets, csr.col_idx), (x, values)
    )


def _op_samples(mask, dtype, non_contiguous, requires_grad):
    out_features, in_features = mask.shape
    csr = csr_of(mask)
    x, dy, values = _inputs(mask, 4, dtype, seed=8, non_contiguous=non_contiguous)
    weight = torch.randn(out_features, in_features, generator=generator(9)).to(dtype)
    flat = flat_index_of(mask)
    xg = x.detach().clone().requires_grad_(requires_grad)
    vg = values.detach().clone().requires_grad_(requires_grad)
    return {
        "spmm": (x, values, csr.row_offsets, csr.col_idx, out_features),
        "spmm_t": (dy, values, csr.t_row_offsets, csr.t_col_idx, csr.t_perm, in_features),
        "sddmm": (dy, x, csr.row_offsets, csr.col_idx),
        "fold": (weight, values, flat),
        "sparse_linear": (xg, vg, *csr.args()),
        "folded_linear": (xg, weight, vg, flat, csr.row_offsets, csr.col_idx),
    }


@pytest.mark.parametrize(
    ("case", "dtype", "non_contiguous", "requires_grad"),
    [
        ("random_16x33", torch.float32, False, True),
        ("empty_rows_cols", torch.float64, True, True),
        ("density_0", torch.float32, False, True),
        ("density_1", torch.bfloat16, True, False),
    ],
)
@pytest.mark.parametrize("op", ["spmm", "spmm_t", "sddmm", "fold", "sparse_linear", "folded_linear"])
def test_opcheck(op, case, dtype, non_contiguous, requires_grad, cpu_path):
    """Schema, fake-tensor (shapes, dtypes and strides), autograd registration and AOT dispatch."""
    args = _op_samples(MASKS[case](), dtype, non_contiguous, requires_grad)[op]
    torch.library.opcheck(getattr(ops, op), args)


# --- bad input gives a clear error ---------------------------------------------------------------------


@pytest.mark.parametrize("op", ["spmm", "spmm_t", "sddmm", "fold", "sparse_linear", "folded_linear"])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_mismatched_devices_fail_clearly(op, which):
    """One argument on the meta device (a stand-in for another GPU) is refused, not read through."""
    args = list(_op_samples(density_mask(8, 6, 0.3, generator(0)), torch.float32, False, False)[op])
    tensor_positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    pos = tensor_positions[which]
    args[pos] = args[pos].to("meta")
    with pytest.raises(
        RuntimeError, match=rf"rosa::{op}: all tensors must be on the same device, got .* on meta"
    ):
        getattr(ops, op)(*args)


def test_inconsistent_lengths_fail_clearly():
    mask = density_mask(8, 6, 0.3, generator(0))
    csr = csr_of(mask)
    x, dy, values = _inputs(mask, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"rosa::spmm: 13 values for 14 nonzeros"):
        ops.spmm(x, values[:-1], csr.row_offsets, csr.col_idx, 8)
    with pytest.raises(ValueError, match=r"rosa::spmm: 9 row offsets for 7 rows"):
        ops.spmm(x, values, csr.row_offsets, csr.col_idx, 7)
    with pytest.raises(ValueError, match=r"rosa::spmm_t: 13 values, 14 transposed indices"):
        ops.spmm_t(dy, values[:-1], csr.t_row_offsets, csr.t_col_idx, csr.t_perm, 6)
    with pytest.raises(ValueError, match=r"rosa::sddmm: dy and x must be 2-D with the same number of tokens"):
        ops.sddmm(dy[:3], x, csr.row_offsets, csr.col_idx)
    with pytest.raises(
        ValueError, match=r"rosa::sparse_linear: x must be 2-D with 6 features, got shape \(4, 5\)"
    ):
        ops.sparse_linear(x[:, :5], values, *csr.args())
    with pytest.raises(ValueError, match=r"rosa::sparse_linear: x must be 2-D"):
        ops.sparse_linear(x[None], values, *csr.args())
    with pytest.raises(ValueError, match=r"rosa::fold: 14 values for 13 nonzeros"):
        ops.fold(torch.zeros(8, 6), values, flat_index_of(mask)[:-1])
    with pytest.raises(ValueError, match=r"rosa::folded_linear: x \(4, 6\) and weight \(6, 8\)"):
        ops.folded_linear(x, torch.zeros(6, 8), values, flat_index_of(mask), csr.row_offsets, csr.col_idx)


def test_folded_linear_refuses_a_trainable_weight():
    mask = density_mask(8, 6, 0.3, generator(0))
    csr = csr_of(mask)
    x, _, values = _inputs(mask, 4, torch.float32, seed=0)
    weight = torch.randn(8, 6, requires_grad=True)
    y = ops.folded_linear(x, weight, values, flat_index_of(mask), csr.row_offsets, csr.col_idx)
    with pytest.raises(RuntimeError, match="the fold strategy needs a frozen base weight"):
        y.sum().backward()


# --- the cost rule ---------------------------------------------------------------------------------------


def test_cost_rule_is_monotone_in_nnz_and_tokens():
    out_features, in_features = 4096, 4096
    assert choose_strategy("cpu", out_features, in_features, 0, 512) == "spmm"
    picks = [
        choose_strategy("cpu", out_features, in_features, nnz, 512) for nnz in (0, 10**4, 10**5, 10**6, 10**7)
    ]
    assert picks == sorted(picks, key=lambda p: p == "fold"), picks  # once fold, always fold as nnz grows
    assert choose_strategy("cpu", out_features, in_features, out_features * in_features, 512) == "fold"
    for model in COST_MODELS.values():
        assert model.spmm_cost(64, 64, 100, 8) < model.spmm_cost(64, 64, 100, 16)
    assert choose_strategy("unknown-device", 64, 64, 10, 8) == choose_strategy("cpu", 64, 64, 10, 8)


def test_auto_never_folds_on_cuda_until_rates_are_measured():
    """CUDA has no measured rates (benchmarks/gpu.py has not run on a GPU), so `auto` builds nothing dense there:
    spmm for every LLaMA-7B and SmolLM2 shape at any token count and density, where the CPU rule folds some."""
    assert "cuda" not in COST_MODELS
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008), (576, 576), (1536, 576)]
    picks = {
        (device, out_f, in_f, density, tokens): choose_strategy(
            device, out_f, in_f, round(density * out_f * in_f), tokens
        )
        for device in ("cuda", "cpu")
        for out_f, in_f in shapes
        for density in (0.001, 0.01, 0.05)
        for tokens in (1, 512, 2048, 65536)
    }
    assert {p for k, p in picks.items() if k[0] == "cuda"} == {"spmm"}
    assert "fold" in {p for k, p in picks.items() if k[0] == "cpu"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["random_16x33", "empty_rows_cols", "single_nonzero", "density_1"])
def test_sddmm_in_token_blocks_matches_reference(case, dtype, monkeypatch):
    """The CPU SDDMM sums its value gradient over blocks of tokens: blocks of 3 over 37 tokens (a ragged last
    block) must give the float64 reference, alone and inside sparse_linear's backward."""
    from rosa.sparse import torch_ops

    monkeypatch.setenv("ROSA_SPARSE_BACKEND", "torch")  # the blocks are the MKL path's
    monkeypatch.setattr(torch_ops, "SDDMM_BLOCK_BYTES", 1)
    monkeypatch.setattr(torch_ops, "SDDMM_UNBLOCKED_BYTES", 0)
    monkeypatch.setattr(torch_ops, "SDDMM_MIN_BLOCK", 3)
    assert torch_ops.sddmm_token_block(37, 33, 4) == 3
    mask = MASKS[case]()
    csr = csr_of(mask)
    x, grad_out, values = _inputs(mask, 37, dtype, seed=11, non_contiguous=True)
    ref = reference_linear(x, None, None, None, None, 0.0, mask, values, grad_out)
    dv = ops.sddmm(grad_out, x, csr.row_offsets, csr.col_idx)
    assert_matches(dv, ref.grad_values, tol_for(dv.dtype), "sddmm", ref.mag.grad_values)
    leaf_values = values.clone().requires_grad_(True)
    ops.sparse_linear(x, leaf_values, *csr.args()).backward(grad_out)
    assert_matches(leaf_values.grad, ref.grad_values, tol_for(dtype), "grad values", ref.mag.grad_values)


def test_sparse_products_never_read_the_unfilled_result(monkeypatch):
    """_csr_mm leaves its result unfilled only where the kernel ignores it (MKL, beta=0): a result full of NaN
    must come out exact, also for empty rows of S."""
    from rosa.sparse import torch_ops

    mask = MASKS["empty_rows_cols"]()
    csr = csr_of(mask)
    x, _, values = _inputs(mask, 9, torch.float32, seed=5)
    real_new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda self, *a, **k: real_new_empty(self, *a, **k).fill_(float("nan"))
    )
    y = torch_ops.spmm(x, values, csr.row_offsets, csr.col_idx, mask.shape[0])
    assert not y.isnan().any()
    assert_matches(y, x.double() @ dense_from_mask(mask, values).t(), tol_for(torch.float32), "spmm")
