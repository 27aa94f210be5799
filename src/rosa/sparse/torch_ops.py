"""The three sparse operations with PyTorch's own sparse kernels (MKL on CPU, cuSPARSE on CUDA).

Everything is computed in fp32 whatever the input dtype: PyTorch's CSR kernels accumulate in the input dtype,
and bf16 accumulation over thousands of tokens loses the small gradients the sparse values live on.
"""

from __future__ import annotations

import torch


def _csr(values: torch.Tensor, row_offsets: torch.Tensor, col_idx: torch.Tensor, shape: tuple[int, int]):
    # Invariants were checked once when the support was built; re-checking costs a host sync per call.
    return torch.sparse_csr_tensor(row_offsets, col_idx, values, shape, check_invariants=False)


def spmm(
    x: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, col_idx: torch.Tensor, out_features: int
) -> torch.Tensor:
    """``x @ S^T`` for 2-D ``x`` (tokens, in); returns (tokens, out) in x.dtype."""
    tokens, in_features = x.shape
    if values.numel() == 0 or tokens == 0:
        return x.new_zeros(tokens, out_features)
    s = _csr(values.float(), row_offsets, col_idx, (out_features, in_features))
    # S @ X^T reads X^T through strides (no copy) and yields (out, tokens); hand back its transpose.
    return torch.sparse.mm(s, x.float().t()).t().to(x.dtype)


def spmm_t(
    dy: torch.Tensor,
    values: torch.Tensor,
    t_row_offsets: torch.Tensor,
    t_col_idx: torch.Tensor,
    t_perm: torch.Tensor,
    in_features: int,
) -> torch.Tensor:
    """``dy @ S`` through the prebuilt CSR of ``S^T``; returns (tokens, in) in dy.dtype."""
    tokens, out_features = dy.shape
    if values.numel() == 0 or tokens == 0:
        return dy.new_zeros(tokens, in_features)
    s_t = _csr(values.float()[t_perm], t_row_offsets, t_col_idx, (in_features, out_features))
    return torch.sparse.mm(s_t, dy.float().t()).t().to(dy.dtype)


def sddmm(dy: torch.Tensor, x: torch.Tensor, row_offsets: torch.Tensor, col_idx: torch.Tensor) -> torch.Tensor:
    """``(dy^T x)`` sampled at the support, in CSR order, fp32: the gradient of the sparse values."""
    out_features, in_features = dy.shape[1], x.shape[1]
    nnz = col_idx.numel()
    if nnz == 0 or dy.shape[0] == 0:
        return dy.new_zeros(nnz, dtype=torch.float32)
    pattern = _csr(dy.new_zeros(nnz, dtype=torch.float32), row_offsets, col_idx, (out_features, in_features))
    out = torch.sparse.sampled_addmm(pattern, dy.float().t().contiguous(), x.float(), beta=0.0)
    return out.values()


def fold(weight: torch.Tensor, values: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """A new dense ``weight + S`` (out, in) in weight.dtype. Builds an out x in tensor: only for the fold path."""
    folded = weight.clone(memory_format=torch.contiguous_format)
    flat = folded.view(-1)
    # Add in fp32 and round once, so a bf16 weight loses no more of S than one rounding.
    flat[flat_index] = (flat[flat_index].float() + values.float()).to(flat.dtype)
    return folded
