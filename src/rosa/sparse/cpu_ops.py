"""The three sparse operations with rosa's own compiled CPU kernels (``csrc/rosa_cpu.cpp``, built by
:mod:`rosa.sparse.cpu_build`); the same functions as :mod:`rosa.sparse.torch_ops`, which they fall back to.

fp32 and bf16 operands are read as they are (strided views too: no transposing or widening copy) and every sum is
accumulated in fp32; spmm / spmm_t return x.dtype / dy.dtype, sddmm fp32. Other dtypes (fp64 for gradcheck, fp16)
and other devices go to the MKL path, as does everything when the kernels cannot be built.

The token dimension is cut into panels (``tiles``); each panel of the operand is packed feature-major into fp32, and
its columns are taken in blocks that stay in a core's L2 cache while every row's nonzeros use them (see the C++
source for the rest).
"""

from __future__ import annotations

import ctypes

import torch

from . import cpu_build, torch_ops

SUPPORTED = {torch.float32: 0, torch.bfloat16: 1}  # dtype -> the kernels' dtype code
PANELS = (8, 16, 32, 64)  # token panel widths the kernels are compiled for
# The widest panel used and the bytes of a column block of a packed panel (block columns x panel tokens, fp32),
# which should stay in a core's L2 cache (512 KiB a core is common) while the nonzeros of every row use it; both
# were chosen by timing the neighbouring sizes with benchmarks/layer.py.
WIDEST_PANEL = 32
BLOCK_BYTES = 512 * 1024
MIN_BLOCK_COLUMNS = 64

fold = torch_ops.fold  # dense by nature: the same on every CPU path
acc_dtype = torch_ops.acc_dtype


def available() -> bool:
    """True when the compiled kernels are (or could now be) loaded; builds them at the first call."""
    return cpu_build.library() is not None


def panel_tokens(tokens: int) -> int:
    """Tokens per panel: WIDEST_PANEL, or the narrowest panel that holds every token."""
    return next((w for w in PANELS if w >= min(tokens, WIDEST_PANEL)), WIDEST_PANEL)


def tiles(tokens: int) -> tuple[int, int]:
    """(tokens per panel, columns per block)."""
    width = panel_tokens(tokens)
    return width, max(MIN_BLOCK_COLUMNS, BLOCK_BYTES // (4 * width))


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _index(t: torch.Tensor) -> torch.Tensor:
    """int32 and contiguous, as the kernels read it (a no-op for a Support's own buffers)."""
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def _values(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _usable(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library when every operand is a CPU tensor of a dtype the kernels read, else None."""
    if not all(t.device.type == "cpu" and t.dtype in SUPPORTED for t in tensors):
        return None
    return cpu_build.library()


def _check(rc: int, op: str) -> None:
    if rc != 0:
        reason = {1: "bad argument", 2: "out of memory", 3: "index out of bounds"}.get(rc, f"code {rc}")
        raise RuntimeError(f"rosa: the compiled CPU kernel for {op} failed: {reason}")


def _spmm(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    col_idx: torch.Tensor,
    rows: int,
    op: str,
) -> torch.Tensor:
    tokens, cols = x.shape
    out = torch.empty(tokens, rows, dtype=x.dtype)
    if tokens == 0 or rows == 0:
        return out
    values, row_offsets, col_idx = _values(values), _index(row_offsets), _index(col_idx)
    rc = lib.rosa_spmm(
        _ptr(x),
        SUPPORTED[x.dtype],
        x.stride(0),
        x.stride(1),
        tokens,
        cols,
        _ptr(values),
        _ptr(row_offsets),
        _ptr(col_idx),
        rows,
        _ptr(out),
        SUPPORTED[x.dtype],
        *tiles(tokens),
        torch.get_num_threads(),
    )
    _check(rc, op)
    return out


def spmm(
    x: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, col_idx: torch.Tensor, out_features: int
) -> torch.Tensor:
    """``x @ S^T`` for 2-D ``x`` (tokens, in); returns (tokens, out) in x.dtype."""
    lib = _usable(x)
    if lib is None:
        return torch_ops.spmm(x, values, row_offsets, col_idx, out_features)
    return _spmm(lib, x, values, row_offsets, col_idx, out_features, "spmm")


def spmm_t(
    dy: torch.Tensor,
    values: torch.Tensor,
    t_row_offsets: torch.Tensor,
    t_col_idx: torch.Tensor,
    t_perm: torch.Tensor,
    in_features: int,
) -> torch.Tensor:
    """``dy @ S`` through the prebuilt CSR of ``S^T`` (the values gathered into its order once, through
    ``t_perm``: a kernel gathering them itself would do it again for every panel); returns (tokens, in) in
    dy.dtype."""
    lib = _usable(dy)
    if lib is None:
        return torch_ops.spmm_t(dy, values, t_row_offsets, t_col_idx, t_perm, in_features)
    values_t = _values(values).index_select(0, t_perm)  # index_select: an int32 index takes no slow path
    return _spmm(lib, dy, values_t, t_row_offsets, t_col_idx, in_features, "spmm_t")


def sddmm(
    dy: torch.Tensor, x: torch.Tensor, row_offsets: torch.Tensor, col_idx: torch.Tensor
) -> torch.Tensor:
    """``(dy^T x)`` sampled at the support, in CSR order, fp32: the value gradient."""
    lib = _usable(dy, x)
    if lib is None:
        return torch_ops.sddmm(dy, x, row_offsets, col_idx)
    tokens, rows = dy.shape
    cols = x.shape[1]
    out = torch.empty(col_idx.numel(), dtype=torch.float32)
    if out.numel() == 0:
        return out
    row_offsets, col_idx = _index(row_offsets), _index(col_idx)
    rc = lib.rosa_sddmm(
        _ptr(dy),
        SUPPORTED[dy.dtype],
        dy.stride(0),
        dy.stride(1),
        _ptr(x),
        SUPPORTED[x.dtype],
        x.stride(0),
        x.stride(1),
        tokens,
        rows,
        cols,
        _ptr(row_offsets),
        _ptr(col_idx),
        _ptr(out),
        *tiles(tokens),
        torch.get_num_threads(),
    )
    _check(rc, "sddmm")
    return out
