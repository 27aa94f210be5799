"""An independent float64 reference for RoSA's sparse ops and layers.

Nothing here goes through ``rosa.sparse.Support``: the sparse matrix is a dense float64 tensor built from the
boolean mask a test drew (``S[mask] = values``, which lists the nonzeros in row-major order, i.e. CSR order),
and every output and gradient comes from plain float64 autograd of

    y = x W^T + b + s * (x A^T) B^T + x S^T
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

# Tolerances for a result compared with the float64 reference computed from the same (already rounded) inputs,
# relative to the result's *magnitude* (see assert_matches): every rounding error in a sum of products is bounded
# by a multiple of the unit roundoff times the sum of the absolute values of its terms, so a result that is
# small through cancellation is only accurate to a fraction of that sum. A few roundings along the chain
# (input cast, matmul output, gradient cast, accumulation) are allowed for.
TOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,  # unit roundoff 6e-8
    torch.float16: 4e-3,  # unit roundoff 4.9e-4
    torch.bfloat16: 3e-2,  # unit roundoff 3.9e-3
}


def tol_for(*dtypes: torch.dtype) -> float:
    """The loosest tolerance among the dtypes a computation went through."""
    return max(TOL[d] for d in dtypes)


def assert_matches(
    actual: torch.Tensor | None,
    expected: torch.Tensor,
    tol: float,
    what: str = "",
    magnitude: torch.Tensor | None = None,
) -> None:
    """Elementwise ``|actual - expected| <= tol * magnitude`` in float64, where ``magnitude`` is the same
    computation on the absolute values of every input (the sum of the absolute values of the terms), or, when
    not given, ``|expected| + max|expected|``. A tiny floor (1e-6 of the largest magnitude) allows for
    underflow."""
    assert actual is not None, f"{what}: no value (None) where the reference has one"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values"
    if not actual.numel():
        return
    if magnitude is None:
        magnitude = expected.abs() + expected.abs().max()
    magnitude = magnitude.detach().double().cpu()
    bound = tol * (magnitude + 1e-6 * magnitude.max() + 1e-300)
    err = (actual - expected).abs()
    if bool((err > bound).any()):
        i = int((err / bound).argmax())
        raise AssertionError(
            f"{what}: {int((err > bound).sum())} / {err.numel()} elements off; worst at flat index {i}: "
            f"got {actual.reshape(-1)[i].item():.8g}, expected {expected.reshape(-1)[i].item():.8g}, error "
            f"{err.reshape(-1)[i].item():.3g} > bound {bound.reshape(-1)[i].item():.3g} (tol {tol:g} x magnitude "
            f"{magnitude.reshape(-1)[i].item():.3g})"
        )


# --- masks and an independent CSR -------------------------------------------------------------------------


def random_mask(out_features: int, in_features: int, nnz: int, generator: torch.Generator) -> torch.Tensor:
    """A boolean (out, in) mask with exactly ``nnz`` True entries, uniformly placed."""
    total = out_features * in_features
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total, generator=generator)[:nnz]] = True
    return mask.view(out_features, in_features)


def density_mask(
    out_features: int, in_features: int, density: float, generator: torch.Generator
) -> torch.Tensor:
    return random_mask(out_features, in_features, round(density * out_features * in_features), generator)


def mask_with_empty_lines(
    out_features: int, in_features: int, density: float, generator: torch.Generator
) -> torch.Tensor:
    """A dense-ish mask in which the first, the last and every third row and column are empty."""
    mask = torch.rand(out_features, in_features, generator=generator) < density
    mask[::3] = False
    mask[-1] = False
    mask[:, ::3] = False
    mask[:, -1] = False
    return mask


def single_entry_mask(out_features: int, in_features: int, row: int, col: int) -> torch.Tensor:
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    mask[row, col] = True
    return mask


@dataclass
class Csr:
    """CSR of a mask and of its transpose, built with Python loops (independent of rosa.sparse.support)."""

    row_offsets: torch.Tensor
    col_idx: torch.Tensor
    t_row_offsets: torch.Tensor
    t_col_idx: torch.Tensor
    t_perm: torch.Tensor  # values[t_perm] lists the values in transposed-CSR (column-major) order

    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.row_offsets, self.col_idx, self.t_row_offsets, self.t_col_idx, self.t_perm)


def csr_of(mask: torch.Tensor) -> Csr:
    out_features, in_features = mask.shape
    m = mask.tolist()
    position = {}
    row_offsets, col_idx = [0], []
    for i in range(out_features):
        for j in range(in_features):
            if m[i][j]:
                position[i, j] = len(col_idx)
                col_idx.append(j)
        row_offsets.append(len(col_idx))
    t_row_offsets, t_col_idx, t_perm = [0], [], []
    for j in range(in_features):
        for i in range(out_features):
            if m[i][j]:
                t_col_idx.append(i)
                t_perm.append(position[i, j])
        t_row_offsets.append(len(t_col_idx))

    def i32(v):
        return torch.tensor(v, dtype=torch.int32)

    return Csr(i32(row_offsets), i32(col_idx), i32(t_row_offsets), i32(t_col_idx), i32(t_perm))


def flat_index_of(mask: torch.Tensor) -> torch.Tensor:
    """Row-major flat positions of the nonzeros, CSR order."""
    return torch.arange(mask.numel()).view(mask.shape)[mask]


def dense_from_mask(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float64 (out, in) S with ``values`` at the True entries of ``mask`` in row-major (CSR) order."""
    s = torch.zeros(mask.shape, dtype=torch.float64)
    s[mask] = values.detach().double().cpu()
    return s


# --- the reference computation -----------------------------------------------------------------------


@dataclass
class Reference:
    y: torch.Tensor
    grad_x: torch.Tensor
    grad_a: torch.Tensor | None
    grad_b: torch.Tensor | None
    grad_values: torch.Tensor
    mag: Reference | None = None  # the same on |inputs|: the scale of each result's rounding error


def reference_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    scaling: float,
    mask: torch.Tensor,
    values: torch.Tensor,
    grad_out: torch.Tensor,
    _magnitude: bool = True,
) -> Reference:
    """float64 ``y = x W^T + b + s (x A^T) B^T + x S^T`` and the gradients of ``sum(y * grad_out)``.

    ``weight`` is (out, in); ``a`` (r, in) and ``b`` (out, r) may be None (r = 0); x may have any leading dims.
    ``.mag`` holds the same computation on the absolute values of every input.
    """
    mag = None
    if _magnitude:

        def absolute(t):
            return None if t is None else t.detach().double().abs()

        mag = reference_linear(
            *(absolute(t) for t in (x, weight, bias, a, b)),
            abs(scaling),
            mask,
            absolute(values),
            absolute(grad_out),
            _magnitude=False,
        )

    def leaf(t):
        return None if t is None else t.detach().double().cpu().requires_grad_(True)

    x64, a64, b64 = leaf(x), leaf(a), leaf(b)
    s64 = dense_from_mask(mask, values).requires_grad_(True)
    y = x64 @ s64.t()
    if weight is not None:
        y = y + x64 @ weight.detach().double().cpu().t()
    if bias is not None:
        y = y + bias.detach().double().cpu()
    if a64 is not None:
        y = y + scaling * ((x64 @ a64.t()) @ b64.t())
    y.backward(grad_out.detach().double().cpu())
    return Reference(
        y=y.detach(),
        grad_x=x64.grad,
        grad_a=None if a64 is None else a64.grad,
        grad_b=None if b64 is None else b64.grad,
        grad_values=s64.grad[mask],
        mag=mag,
    )


# --- building layers -----------------------------------------------------------------------------------


def make_base(kind: str, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, seed: int):
    """A frozen base layer with random weights: ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored (in, out)).

    GPT-2's Conv1D always has a bias (its forward is ``addmm(bias, ...)``), so ``bias=False`` zeroes it.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        base = nn.Linear(in_features, out_features, bias=bias)
    elif kind == "conv1d":
        base = Conv1D(out_features, in_features)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g))
        if base.bias is not None:
            base.bias.copy_(
                torch.randn(base.bias.shape, generator=g) if bias else torch.zeros(base.bias.shape)
            )
    base.to(dtype)
    base.requires_grad_(False)
    return base


def base_weight_out_in(base: nn.Module) -> torch.Tensor:
    return base.weight.t() if Conv1D is not None and isinstance(base, Conv1D) else base.weight


def make_rosa(
    base: nn.Module,
    mask: torch.Tensor,
    *,
    r: int = 3,
    lora_alpha: float = 6.0,
    strategy: str = "spmm",
    adapter_dtype: torch.dtype = torch.float32,
    extra_capacity: int = 0,
    seed: int = 0,
    use_rslora: bool = False,
):
    """A RosaLinear around ``base`` with support ``mask`` and random A, B and values (the ones past the
    support's nnz too: they must take no part)."""
    from rosa import RosaLinear
    from rosa.sparse import support_from_mask

    out_features, in_features = mask.shape
    nnz = int(mask.sum())
    layer = RosaLinear(
        base,
        "default",
        r=r,
        lora_alpha=lora_alpha,
        density=nnz / (out_features * in_features),
        capacity=min(nnz + extra_capacity, out_features * in_features),
        use_rslora=use_rslora,
        init_lora_weights=False,
        adapter_dtype=adapter_dtype,
        sparse_strategy=strategy,
    )
    layer.set_support("default", support_from_mask(mask))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        values = layer.rosa_values["default"]
        values.copy_(torch.randn(values.shape, generator=g))
        if r > 0:
            for lin in (layer.rosa_A["default"], layer.rosa_B["default"]):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5)
    return layer


@dataclass
class Run:
    y: torch.Tensor
    grad_x: torch.Tensor | None
    grad_a: torch.Tensor | None
    grad_b: torch.Tensor | None
    grad_values: torch.Tensor | None  # the whole parameter, capacity long


def strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view of every other element of the last dim (for a tensor twice as wide)."""
    return t[..., ::2]


def widen(x: torch.Tensor) -> torch.Tensor:
    """A tensor whose ``strided`` view equals ``x``."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    return wide


def run_layer(
    layer: nn.Module,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    non_contiguous: bool = False,
    adapter: str = "default",
) -> Run:
    """Forward and backward of ``sum(layer(x) * grad_out)``; with ``non_contiguous`` the layer sees a strided
    view of a wider leaf tensor instead of a contiguous one."""
    for p in layer.parameters():
        p.grad = None
    leaf = (widen(x) if non_contiguous else x.detach().clone()).requires_grad_(True)
    xin = strided(leaf) if non_contiguous else leaf
    assert xin.stride(-1) == (2 if non_contiguous else 1)
    y = layer(xin)
    y.backward(grad_out)
    r = layer.r[adapter]
    return Run(
        y=y.detach(),
        grad_x=strided(leaf.grad) if non_contiguous else leaf.grad,
        grad_a=layer.rosa_A[adapter].weight.grad if r else None,
        grad_b=layer.rosa_B[adapter].weight.grad if r else None,
        grad_values=layer.rosa_values[adapter].grad,
    )


def check_layer(
    layer: nn.Module,
    mask: torch.Tensor,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    tol: float | None = None,
    non_contiguous: bool = False,
) -> Run:
    """Run ``layer`` forward and backward and compare y and every gradient with the float64 reference."""
    base = layer.get_base_layer()
    a = layer.rosa_A["default"].weight if layer.r["default"] else None
    b = layer.rosa_B["default"].weight if layer.r["default"] else None
    values = layer.rosa_values["default"]
    nnz = int(mask.sum())
    ref = reference_linear(
        x, base_weight_out_in(base), base.bias, a, b, layer.scaling["default"], mask, values[:nnz], grad_out
    )
    run = run_layer(layer, x, grad_out, non_contiguous=non_contiguous)
    if tol is None:
        tol = tol_for(x.dtype, values.dtype)
    assert run.y.dtype == x.dtype
    assert_matches(run.y, ref.y, tol, "y", ref.mag.y)
    assert run.grad_x.dtype == x.dtype
    assert_matches(run.grad_x, ref.grad_x, tol, "grad x", ref.mag.grad_x)
    if a is not None:
        assert_matches(run.grad_a, ref.grad_a, tol, "grad A", ref.mag.grad_a)
        assert_matches(run.grad_b, ref.grad_b, tol, "grad B", ref.mag.grad_b)
    if nnz == 0:
        assert run.grad_values is None, "values got a gradient with an empty support"
    else:
        assert run.grad_values.dtype == values.dtype
        assert_matches(run.grad_values[:nnz], ref.grad_values, tol, "grad values", ref.mag.grad_values)
        assert bool((run.grad_values[nnz:] == 0).all()), "values past the support's nnz got a gradient"
    return run
