"""RoSA's sparse operations as torch.library custom ops, with autograd and fake-tensor support.

Two differentiable ops cover the two strategies:

- ``rosa::sparse_linear(x, values, support...) = x @ S^T`` (the "spmm" strategy): forward SpMM, input
  gradient by SpMM with the prebuilt transpose, value gradient by SDDMM. Nothing dense of size out x in.
- ``rosa::folded_linear(x, weight, values, support...) = x @ (W + S)^T`` (the "fold" strategy): S is added
  into a dense copy of the frozen weight for the forward and input-gradient matmuls, the values still get
  their gradient by SDDMM. The copy is rebuilt in the backward instead of being kept, so it lives only
  for the duration of one matmul.

Each op picks its backend by device: on CPU rosa's own compiled kernels (:mod:`rosa.sparse.cpu_ops`, built at
first use; PyTorch's MKL kernels with a one-time warning where they cannot be built), Triton kernels on CUDA
(falling back to cuSPARSE with a one-time warning where Triton is missing). ``ROSA_SPARSE_BACKEND=cpu|torch|triton``
forces one: ``torch`` is PyTorch's own kernels (MKL on CPU), and ``triton`` is how the Triton kernels are run on CPU
under ``TRITON_INTERPRET=1`` in tests.
"""

from __future__ import annotations

import os
import warnings
from functools import cache
from types import ModuleType

import torch
from torch import Tensor

from . import cpu_build, cpu_ops, torch_ops


@cache
def _triton_backend() -> ModuleType | None:
    try:
        from . import triton_ops
    except Exception:  # any import failure means "no Triton here"
        return None
    return triton_ops if getattr(triton_ops, "HAS_TRITON", False) else None


@cache
def _warn_no_triton() -> None:
    warnings.warn(
        "rosa: Triton is not available; CUDA tensors use PyTorch's cuSPARSE path, which is slower.",
        stacklevel=3,
    )


def backend_for(device: torch.device) -> ModuleType:
    """The module implementing spmm / spmm_t / sddmm / fold for tensors on ``device``."""
    forced = os.environ.get("ROSA_SPARSE_BACKEND", "").lower()
    if forced == "torch":
        return torch_ops
    if forced == "cpu":
        if not cpu_ops.available():
            why = cpu_build.error() or "ROSA_CPU_KERNELS=0 turns them off"
            raise RuntimeError(f"ROSA_SPARSE_BACKEND=cpu but the compiled CPU kernels are unavailable: {why}")
        return cpu_ops
    if forced == "triton" or device.type == "cuda":
        backend = _triton_backend()
        if backend is not None:
            return backend
        if forced == "triton":
            raise RuntimeError("ROSA_SPARSE_BACKEND=triton but Triton cannot be imported")
        _warn_no_triton()
        return torch_ops
    if device.type == "cpu" and cpu_ops.available():
        return cpu_ops
    return torch_ops


# --- argument checks: metadata only (no host sync), run by the real and the fake implementations alike ----


def _check_devices(op: str, **tensors: Tensor) -> None:
    """The kernels take raw pointers: a tensor on another device must fail here, not read foreign memory."""
    if len({t.device for t in tensors.values()}) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise RuntimeError(f"rosa::{op}: all tensors must be on the same device, got {where}")


def _check_shape(op: str, ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"rosa::{op}: {message}")


def _check_spmm(x, values, row_offsets, col_idx, out_features) -> None:
    _check_devices("spmm", x=x, values=values, row_offsets=row_offsets, col_idx=col_idx)
    _check_shape("spmm", x.dim() == 2, f"x must be 2-D (tokens, in), got shape {tuple(x.shape)}")
    _check_shape(
        "spmm",
        values.shape[0] == col_idx.shape[0],
        f"{values.shape[0]} values for {col_idx.shape[0]} nonzeros",
    )
    _check_shape(
        "spmm",
        row_offsets.shape[0] == out_features + 1,
        f"{row_offsets.shape[0]} row offsets for {out_features} rows",
    )


def _check_spmm_t(dy, values, t_row_offsets, t_col_idx, t_perm, in_features) -> None:
    _check_devices(
        "spmm_t", dy=dy, values=values, t_row_offsets=t_row_offsets, t_col_idx=t_col_idx, t_perm=t_perm
    )
    _check_shape("spmm_t", dy.dim() == 2, f"dy must be 2-D (tokens, out), got shape {tuple(dy.shape)}")
    _check_shape(
        "spmm_t",
        values.shape[0] == t_col_idx.shape[0] == t_perm.shape[0],
        f"{values.shape[0]} values, {t_col_idx.shape[0]} transposed indices and {t_perm.shape[0]} permutation entries",
    )
    _check_shape(
        "spmm_t",
        t_row_offsets.shape[0] == in_features + 1,
        f"{t_row_offsets.shape[0]} offsets for {in_features} columns",
    )


def _check_sddmm(dy, x, row_offsets, col_idx) -> None:
    _check_devices("sddmm", dy=dy, x=x, row_offsets=row_offsets, col_idx=col_idx)
    _check_shape(
        "sddmm",
        dy.dim() == 2 and x.dim() == 2 and dy.shape[0] == x.shape[0],
        f"dy and x must be 2-D with the same number of tokens, got {tuple(dy.shape)} and {tuple(x.shape)}",
    )
    _check_shape(
        "sddmm",
        row_offsets.shape[0] == dy.shape[1] + 1,
        f"{row_offsets.shape[0]} row offsets for {dy.shape[1]} rows",
    )


def _check_fold(weight, values, flat_index) -> None:
    _check_devices("fold", weight=weight, values=values, flat_index=flat_index)
    _check_shape("fold", weight.dim() == 2, f"weight must be 2-D, got shape {tuple(weight.shape)}")
    _check_shape(
        "fold",
        values.shape[0] == flat_index.shape[0],
        f"{values.shape[0]} values for {flat_index.shape[0]} nonzeros",
    )


def _check_sparse_linear(x, values, row_offsets, col_idx, t_row_offsets, t_col_idx, t_perm) -> None:
    _check_devices(
        "sparse_linear",
        x=x,
        values=values,
        row_offsets=row_offsets,
        col_idx=col_idx,
        t_row_offsets=t_row_offsets,
        t_col_idx=t_col_idx,
        t_perm=t_perm,
    )
    _check_shape(
        "sparse_linear",
        x.dim() == 2 and x.shape[1] == t_row_offsets.shape[0] - 1,
        f"x must be 2-D with {t_row_offsets.shape[0] - 1} features, got shape {tuple(x.shape)}",
    )
    _check_shape(
        "sparse_linear",
        values.shape[0] == col_idx.shape[0] == t_col_idx.shape[0] == t_perm.shape[0],
        f"{values.shape[0]} values for a support of {col_idx.shape[0]} nonzeros "
        f"({t_col_idx.shape[0]} transposed, {t_perm.shape[0]} permuted)",
    )


def _check_folded_linear(x, weight, values, flat_index, row_offsets, col_idx) -> None:
    _check_devices(
        "folded_linear",
        x=x,
        weight=weight,
        values=values,
        flat_index=flat_index,
        row_offsets=row_offsets,
        col_idx=col_idx,
    )
    _check_shape(
        "folded_linear",
        weight.dim() == 2 and x.dim() == 2 and x.shape[1] == weight.shape[1],
        f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not make a linear layer",
    )
    _check_shape(
        "folded_linear",
        values.shape[0] == flat_index.shape[0] == col_idx.shape[0]
        and row_offsets.shape[0] == weight.shape[0] + 1,
        f"{values.shape[0]} values for a support of {col_idx.shape[0]} nonzeros ({flat_index.shape[0]} flat) "
        f"and {row_offsets.shape[0]} row offsets for {weight.shape[0]} rows",
    )


# --- primitive ops (no autograd of their own: they are the backward of the two ops below) -----------------


@torch.library.custom_op("rosa::spmm", mutates_args=())
def spmm(x: Tensor, values: Tensor, row_offsets: Tensor, col_idx: Tensor, out_features: int) -> Tensor:
    """``x @ S^T``: (tokens, in) -> (tokens, out) in x.dtype, accumulated in fp32."""
    _check_spmm(x, values, row_offsets, col_idx, out_features)
    return backend_for(x.device).spmm(x, values, row_offsets, col_idx, out_features)


@spmm.register_fake
def _(x, values, row_offsets, col_idx, out_features):
    _check_spmm(x, values, row_offsets, col_idx, out_features)
    return _row_major_like(x, out_features)


@torch.library.custom_op("rosa::spmm_t", mutates_args=())
def spmm_t(
    dy: Tensor, values: Tensor, t_row_offsets: Tensor, t_col_idx: Tensor, t_perm: Tensor, in_features: int
) -> Tensor:
    """``dy @ S``: (tokens, out) -> (tokens, in) in dy.dtype, accumulated in fp32."""
    _check_spmm_t(dy, values, t_row_offsets, t_col_idx, t_perm, in_features)
    return backend_for(dy.device).spmm_t(dy, values, t_row_offsets, t_col_idx, t_perm, in_features)


@spmm_t.register_fake
def _(dy, values, t_row_offsets, t_col_idx, t_perm, in_features):
    _check_spmm_t(dy, values, t_row_offsets, t_col_idx, t_perm, in_features)
    return _row_major_like(dy, in_features)


@torch.library.custom_op("rosa::sddmm", mutates_args=())
def sddmm(dy: Tensor, x: Tensor, row_offsets: Tensor, col_idx: Tensor) -> Tensor:
    """``dy^T x`` sampled at the support, in CSR order, fp32 (fp64 when dy or x is fp64)."""
    _check_sddmm(dy, x, row_offsets, col_idx)
    return backend_for(dy.device).sddmm(dy, x, row_offsets, col_idx)


@sddmm.register_fake
def _(dy, x, row_offsets, col_idx):
    _check_sddmm(dy, x, row_offsets, col_idx)
    return dy.new_empty(col_idx.shape[0], dtype=torch_ops.acc_dtype(dy.dtype, x.dtype))


@torch.library.custom_op("rosa::fold", mutates_args=())
def fold(weight: Tensor, values: Tensor, flat_index: Tensor) -> Tensor:
    """A new dense ``W + S`` in weight.dtype (the fold strategy only)."""
    _check_fold(weight, values, flat_index)
    return backend_for(weight.device).fold(weight, values, flat_index)


@fold.register_fake
def _(weight, values, flat_index):
    _check_fold(weight, values, flat_index)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _row_major_like(x: Tensor, features: int) -> Tensor:
    """Fake output with the layout every backend produces: a contiguous (tokens, features) tensor."""
    return x.new_empty(x.shape[0], features)


# --- spmm strategy: y = x @ S^T -------------------------------------------------------------------------


@torch.library.custom_op("rosa::sparse_linear", mutates_args=())
def sparse_linear(
    x: Tensor,
    values: Tensor,
    row_offsets: Tensor,
    col_idx: Tensor,
    t_row_offsets: Tensor,
    t_col_idx: Tensor,
    t_perm: Tensor,
) -> Tensor:
    """``x @ S^T`` for 2-D x, differentiable in x and values."""
    _check_sparse_linear(x, values, row_offsets, col_idx, t_row_offsets, t_col_idx, t_perm)
    # The kernel itself, not the rosa::spmm op: this body only ever sees real tensors (fake ones go to the fake
    # below), the checks above cover spmm's, and a second dispatch would cost a layer call about as much as
    # the kernel does at decoding's one token.
    return backend_for(x.device).spmm(x, values, row_offsets, col_idx, row_offsets.shape[0] - 1)


@sparse_linear.register_fake
def _(x, values, row_offsets, col_idx, t_row_offsets, t_col_idx, t_perm):
    _check_sparse_linear(x, values, row_offsets, col_idx, t_row_offsets, t_col_idx, t_perm)
    return _row_major_like(x, row_offsets.shape[0] - 1)


def _sparse_linear_setup(ctx, inputs, output) -> None:
    x, values, row_offsets, col_idx, t_row_offsets, t_col_idx, t_perm = inputs
    ctx.save_for_backward(x, values, row_offsets, col_idx, t_row_offsets, t_col_idx, t_perm)


def _sparse_linear_backward(ctx, grad_out):
    x, values, row_offsets, col_idx, t_row_offsets, t_col_idx, t_perm = ctx.saved_tensors
    grad_x = grad_values = None
    if all(ctx.needs_input_grad[:2]) and backend_for(grad_out.device) is torch_ops:
        # PyTorch's CSR kernels both read dy feature-major (S^T dy^T, and dy^T for the SDDMM): transpose it once
        # here rather than once inside each (an out x tokens copy, the largest cost of this backward on CPU). A
        # blocked SDDMM (large inputs) still copies its token blocks out of it, but those reads are contiguous.
        grad_out = torch_ops.feature_major(grad_out, grad_out.dtype).t()
    if ctx.needs_input_grad[0]:
        grad_x = spmm_t(grad_out, values, t_row_offsets, t_col_idx, t_perm, x.shape[1]).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_values = sddmm(grad_out, x, row_offsets, col_idx).to(values.dtype)
    return grad_x, grad_values, None, None, None, None, None


sparse_linear.register_autograd(_sparse_linear_backward, setup_context=_sparse_linear_setup)


# --- fold strategy: y = x @ (W + S)^T ---------------------------------------------------------------------


@torch.library.custom_op("rosa::folded_linear", mutates_args=())
def folded_linear(
    x: Tensor, weight: Tensor, values: Tensor, flat_index: Tensor, row_offsets: Tensor, col_idx: Tensor
) -> Tensor:
    """``x @ (W + S)^T`` in the weight's dtype, for 2-D x and a frozen (out, in) weight; differentiable in x and
    values. ``x`` may be wider than the weight (the fp32 copy the LoRA branch keeps anyway): the product casts
    it, and the backward's SDDMM reads it at full precision without a second saved copy."""
    _check_folded_linear(x, weight, values, flat_index, row_offsets, col_idx)
    return x.to(weight.dtype) @ fold(weight, values, flat_index).t()


@folded_linear.register_fake
def _(x, weight, values, flat_index, row_offsets, col_idx):
    _check_folded_linear(x, weight, values, flat_index, row_offsets, col_idx)
    return x.new_empty(x.shape[0], weight.shape[0], dtype=weight.dtype)


def _folded_linear_setup(ctx, inputs, output) -> None:
    x, weight, values, flat_index, row_offsets, col_idx = inputs
    ctx.save_for_backward(x, weight, values, flat_index, row_offsets, col_idx)


def _folded_linear_backward(ctx, grad_out):
    x, weight, values, flat_index, row_offsets, col_idx = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise RuntimeError("rosa: the fold strategy needs a frozen base weight")
    grad_x = grad_values = None
    if ctx.needs_input_grad[0]:
        grad_x = (grad_out @ fold(weight, values, flat_index)).to(x.dtype)
    if ctx.needs_input_grad[2]:
        grad_values = sddmm(grad_out, x, row_offsets, col_idx).to(values.dtype)
    return grad_x, None, grad_values, None, None, None


folded_linear.register_autograd(_folded_linear_backward, setup_context=_folded_linear_setup)
