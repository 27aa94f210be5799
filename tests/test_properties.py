"""Property-based tests: random shapes, supports, densities, dtypes, strategies and base layers, every output and
gradient compared with the independent float64 reference."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import (
    assert_matches,
    check_layer,
    csr_of,
    flat_index_of,
    make_base,
    make_rosa,
    reference_linear,
    strided,
    tol_for,
    widen,
)

from rosa.sparse import ops, support_from_csr, support_from_mask

# ROSA_HYPOTHESIS_EXAMPLES raises the budget for a longer local hunt.
EXAMPLES = int(os.environ.get("ROSA_HYPOTHESIS_EXAMPLES", "40"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@st.composite
def masks(draw, max_side: int = 10) -> torch.Tensor:
    """A boolean (out, in) mask: empty, full, a single entry, a set of entries, or an arbitrary bit pattern."""
    out_features = draw(st.integers(1, max_side))
    in_features = draw(st.integers(1, max_side))
    total = out_features * in_features
    kind = draw(st.sampled_from(["empty", "full", "single", "sparse", "bits"]))
    flat = torch.zeros(total, dtype=torch.bool)
    if kind == "full":
        flat[:] = True
    elif kind == "single":
        flat[draw(st.integers(0, total - 1))] = True
    elif kind == "sparse":
        flat[list(draw(st.sets(st.integers(0, total - 1), max_size=max(1, total // 5))))] = True
    elif kind == "bits":
        flat[:] = torch.tensor(draw(st.lists(st.booleans(), min_size=total, max_size=total)))
    return flat.view(out_features, in_features)


def _randn(shape, seed, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@SETTINGS
@given(
    mask=masks(),
    lead=st.sampled_from([(0,), (1,), (5,), (2, 3), (1, 4)]),
    r=st.integers(0, 4),
    dtype=st.sampled_from(DTYPES),
    adapter_same_dtype=st.booleans(),
    strategy=st.sampled_from(["spmm", "fold", "auto"]),
    base=st.sampled_from([("linear", True), ("linear", False), ("conv1d", True)]),
    non_contiguous=st.booleans(),
    extra_capacity=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_layer_matches_reference(
    mask, lead, r, dtype, adapter_same_dtype, strategy, base, non_contiguous, extra_capacity, seed
):
    out_features, in_features = mask.shape
    kind, bias = base
    adapter_dtype = dtype if adapter_same_dtype else torch.float32
    base_layer = make_base(kind, in_features, out_features, bias, dtype, seed=seed)
    layer = make_rosa(
        base_layer,
        mask,
        r=r,
        lora_alpha=2.0 * max(r, 1),
        strategy=strategy,
        adapter_dtype=adapter_dtype,
        extra_capacity=extra_capacity,
        seed=seed,
    )
    x = _randn((*lead, in_features), seed + 1, dtype)
    grad_out = _randn((*lead, out_features), seed + 2, dtype)
    check_layer(layer, mask, x, grad_out, non_contiguous=non_contiguous)


@SETTINGS
@given(
    mask=masks(max_side=16),
    tokens=st.integers(0, 9),
    dtype=st.sampled_from(DTYPES),
    values_dtype=st.sampled_from(["same", "float32"]),
    op=st.sampled_from(["sparse_linear", "folded_linear"]),
    non_contiguous=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ops_match_reference(mask, tokens, dtype, values_dtype, op, non_contiguous, seed):
    out_features, in_features = mask.shape
    nnz = int(mask.sum())
    vdtype = dtype if values_dtype == "same" else torch.float32
    csr = csr_of(mask)
    x = _randn((tokens, in_features), seed, dtype)
    grad_out = _randn((tokens, out_features), seed + 1, dtype)
    values = _randn((nnz,), seed + 2, vdtype)
    weight = _randn((out_features, in_features), seed + 3, dtype) if op == "folded_linear" else None
    ref = reference_linear(x, weight, None, None, None, 0.0, mask, values, grad_out)

    leaf_x = (widen(x) if non_contiguous else x.clone()).requires_grad_(True)
    xin = strided(leaf_x) if non_contiguous else leaf_x
    leaf_values = values.clone().requires_grad_(True)
    if op == "sparse_linear":
        y = ops.sparse_linear(xin, leaf_values, *csr.args())
    else:
        y = ops.folded_linear(xin, weight, leaf_values, flat_index_of(mask), csr.row_offsets, csr.col_idx)
    y.backward(grad_out)
    tol = tol_for(dtype, vdtype)
    assert y.dtype == dtype
    assert_matches(y, ref.y, tol, "y", ref.mag.y)
    grad_x = strided(leaf_x.grad) if non_contiguous else leaf_x.grad
    assert grad_x.dtype == dtype
    assert_matches(grad_x, ref.grad_x, tol, "grad x", ref.mag.grad_x)
    assert leaf_values.grad is not None and leaf_values.grad.dtype == vdtype
    assert_matches(leaf_values.grad, ref.grad_values, tol, "grad values", ref.mag.grad_values)


@SETTINGS
@given(mask=masks(max_side=24))
def test_support_round_trips(mask):
    support = support_from_mask(mask)
    assert torch.equal(support.to_dense_mask(), mask)
    csr = csr_of(mask)
    for field in ("row_offsets", "col_idx", "t_row_offsets", "t_col_idx", "t_perm"):
        assert torch.equal(getattr(support, field).long(), getattr(csr, field).long()), field
    again = support_from_csr(support.row_offsets, support.col_idx, mask.shape[1])
    assert torch.equal(again.t_perm, support.t_perm)
