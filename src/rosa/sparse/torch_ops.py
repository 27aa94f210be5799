"""The three sparse operations with PyTorch's own sparse kernels (MKL on CPU, cuSPARSE on CUDA).

Everything is computed in fp32 whatever the input dtype (fp64 for fp64 inputs, so that gradcheck sees exact
derivatives): PyTorch's CSR kernels accumulate in the input dtype, and bf16 accumulation over thousands of
tokens loses the small gradients the sparse values live on.
"""

from __future__ import annotations

import warnings

import torch

_BETA_WARNING = "Sparse CSR tensor support is in beta"
_beta_warning_spent = False  # PyTorch gives it once per process: only the first CSR needs the filter


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp32, or fp64 when any input is fp64 (never a downcast of fp64)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _csr(values: torch.Tensor, row_offsets: torch.Tensor, col_idx: torch.Tensor, shape: tuple[int, int]):
    """A call-local CSR view of our own buffers, without PyTorch's "beta" warning about the layout.

    The warning is filtered here only, never process-wide, and around the first call only: PyTorch gives it
    once per process, and each ``catch_warnings`` resets every module's record of warnings already shown.
    """
    global _beta_warning_spent
    if _beta_warning_spent:
        # Invariants were checked once when the support was built; re-checking costs a host sync per call.
        return torch.sparse_csr_tensor(row_offsets, col_idx, values, shape, check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BETA_WARNING)
        csr = torch.sparse_csr_tensor(row_offsets, col_idx, values, shape, check_invariants=False)
    _beta_warning_spent = True
    return csr


def spmm(
    x: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, col_idx: torch.Tensor, out_features: int
) -> torch.Tensor:
    """``x @ S^T`` for 2-D ``x`` (tokens, in); returns (tokens, out) in x.dtype."""
    tokens, in_features = x.shape
    if values.numel() == 0 or tokens == 0:
        return x.new_zeros(tokens, out_features)
    acc = acc_dtype(x.dtype)
    s = _csr(values.to(acc), row_offsets, col_idx, (out_features, in_features))
    if x.device.type == "cpu" and out_features >= in_features and values.numel() <= 16 * out_features:
        # S @ X^T written straight into the transpose of a row-major result (X^T and the result both
        # column-major; beta=0: the empty result is never read) skips the transposing copy of the path below.
        # MKL's column-major product is the slower one for a wide S (fewer rows than columns) and once rows hold
        # more than ~16 nonzeros, hence the condition (benchmarks/sparse_ops.py measures both).
        out = torch.empty(tokens, out_features, dtype=acc, device=x.device)
        torch.addmm(out.t(), s, x.to(acc).t(), beta=0.0, out=out.t())
        return out.to(x.dtype)
    # S @ X^T reads X^T through strides and yields (out, tokens); hand back its transpose, row-major.
    return _transpose_contiguous(_csr_mm(s, x.to(acc).t()), x.dtype)


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
    acc = acc_dtype(dy.dtype)
    # index_select: advanced indexing with an int32 index takes a slow path (~0.1 ms a call even for 2k values)
    s_t = _csr(values.to(acc).index_select(0, t_perm), t_row_offsets, t_col_idx, (in_features, out_features))
    return _transpose_contiguous(_csr_mm(s_t, feature_major(dy, acc)), dy.dtype)


def _csr_mm(s: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``s @ dense`` into a fresh result. ``torch.sparse.mm`` zero-fills it before MKL overwrites it (a rows x
    tokens pass that costs a third of the product); MKL's beta=0 product never reads it, so on CPU with MKL it
    is left unfilled. Other kernels (PyTorch's own CSR loop where MKL is missing, cuSPARSE) scale the old
    contents by beta, and 0 * garbage can be NaN: they get a zeroed result."""
    if dense.device.type == "cpu" and torch.backends.mkl.is_available():
        out = dense.new_empty(s.shape[0], dense.shape[1])
    else:
        out = dense.new_zeros(s.shape[0], dense.shape[1])
    return torch.addmm(out, s, dense, beta=0.0, out=out)


def _transpose_contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The transpose of a (features, tokens) kernel result as a contiguous (tokens, features) tensor in ``dtype``
    (one copy does both). The bare transposed view would save that copy, but every later elementwise op on it
    (the layer's residual add, autograd's accumulation into dx) would then stride across memory, which costs
    more than the sparse products themselves."""
    out = t.new_empty(t.shape[::-1], dtype=dtype)
    return out.copy_(t.t())


# The CPU SDDMM reads a row of X^T for every nonzero. When X^T is larger than a core's L2 cache those rows come from
# further away each time, so the tokens are taken in blocks whose slice of X^T (in x block) fits SDDMM_BLOCK_BYTES;
# below SDDMM_UNBLOCKED_BYTES one pass over all tokens is cheaper than the blocks' copies. Blocks hold at least
# SDDMM_MIN_BLOCK tokens: shorter dot products cost more per element than the cache misses they save.
# The thresholds were set by A/B timing against one pass; benchmarks/layer.py times the result.
SDDMM_BLOCK_BYTES = 1 << 20
SDDMM_UNBLOCKED_BYTES = 4 << 20
SDDMM_MIN_BLOCK = 64


def sddmm_token_block(tokens: int, in_features: int, itemsize: int) -> int:
    """Tokens per SDDMM pass on CPU (``tokens`` itself: one pass)."""
    if tokens * in_features * itemsize <= SDDMM_UNBLOCKED_BYTES:
        return tokens
    return max(SDDMM_MIN_BLOCK, SDDMM_BLOCK_BYTES // max(1, in_features * itemsize))


def sddmm(
    dy: torch.Tensor, x: torch.Tensor, row_offsets: torch.Tensor, col_idx: torch.Tensor
) -> torch.Tensor:
    """``(dy^T x)`` sampled at the support, in CSR order, fp32 (fp64 for fp64 inputs): the value gradient.

    On CPU, once X^T outgrows the cache, the tokens are taken in blocks (``sddmm_token_block``) and the blocks'
    results summed: each block's operands are copied feature-major (a dot product per nonzero then reads two
    contiguous rows) and are small enough to stay in cache."""
    tokens, out_features = dy.shape
    in_features = x.shape[1]
    nnz = col_idx.numel()
    acc = acc_dtype(dy.dtype, x.dtype)
    if nnz == 0 or tokens == 0:
        return dy.new_zeros(nnz, dtype=acc)
    pattern = _csr(dy.new_zeros(nnz, dtype=acc), row_offsets, col_idx, (out_features, in_features))
    block = tokens if dy.device.type != "cpu" else sddmm_token_block(tokens, in_features, acc.itemsize)
    if block >= tokens:
        return torch.sparse.sampled_addmm(pattern, feature_major(dy, acc), x.to(acc), beta=0.0).values()
    out = None
    for start in range(0, tokens, block):
        dy_t = feature_major(dy[start : start + block], acc)  # (out, block)
        x_cols = feature_major(x[start : start + block], acc).t()  # (block, in), column-major
        part = torch.sparse.sampled_addmm(pattern, dy_t, x_cols, beta=0.0).values()
        out = part if out is None else out.add_(part)
    return out


def feature_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(tokens, features) -> a contiguous (features, tokens) copy in ``dtype``; one pass, or none when ``t`` is
    already a feature-major view in that dtype."""
    if t.dtype == dtype and t.t().is_contiguous():
        return t.t()
    return torch.empty(t.shape[1], t.shape[0], dtype=dtype, device=t.device).copy_(t.t())


def fold(weight: torch.Tensor, values: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """A new dense ``weight + S`` (out, in) in weight.dtype. Builds an out x in tensor: only for the fold path."""
    folded = weight.clone(memory_format=torch.contiguous_format)
    flat = folded.view(-1)
    # Add in fp32 and round once, so a bf16 weight loses no more of S than one rounding.
    acc = acc_dtype(weight.dtype, values.dtype)
    flat[flat_index] = (flat[flat_index].to(acc) + values.to(acc)).to(flat.dtype)
    return folded
