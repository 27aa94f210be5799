"""Triton kernels for RoSA's three sparse operations and the fold of the fold strategy.

``S`` is an ``out x in`` sparse matrix with a fixed CSR support (``row_offsets`` int32 [out+1], ``col_idx``
int32 [nnz]) plus the CSR of its transpose (``t_row_offsets``, ``t_col_idx``, ``t_perm`` with
``values_T = values[t_perm]``). All ops take 2-D tensors, accumulate in fp32, launch a grid whose size depends
only on shapes, and never synchronise with the host (no ``.item()``, no data-dependent output shape).

Memory layout. Every kernel reads activations with token stride 1: for a column ``c`` of ``x`` (tokens,
features) it loads ``x[t0:t0+BT, c]`` as one contiguous run. A row-major ``x`` is therefore copied once into a
transposed buffer (one pass over the activations); a tensor that already has token stride 1 (for example
``xT.t()`` of a contiguous ``xT``) is used as is, so a caller that keeps ``x^T`` around pays nothing.

- ``spmm`` / ``spmm_t`` (``x @ S^T`` / ``dy @ S``): one program per (block of ``BR`` sparse rows, block of
  ``BT`` tokens). The ``BR`` rows are processed as lanes, ELL-style: step ``j`` gathers the ``j``-th nonzero
  of every lane, i.e. a ``[BR, BT]`` tile of contiguous token runs, and does one fp32 FMA into a ``[BR, BT]``
  accumulator (no reduction, no ``tl.dot``). The result is written token-contiguous into an ``(out, T)``
  buffer and transposed once at the end.
- Load balancing: the rows are visited in order of decreasing nonzero count (a stable device-side argsort of
  the row lengths, :func:`balanced_row_order`). Rows of similar length share a program, so masked (idle) lanes
  are rare even for skewed supports, and the heaviest programs are launched first (longest-processing-time-first
  scheduling).
- ``sddmm`` (value gradient): one program per block of ``BK`` consecutive nonzeros (so work is split exactly
  by nonzeros), looping over tokens in tiles of ``BT`` with fp32 ``[BK, BT]`` products of two token-contiguous
  gathers. Each nonzero finds its row by a branch-free binary search over ``row_offsets``. When there are too
  few nonzero blocks to fill the GPU, the token range is split over a second grid axis into a
  ``(splits, nnz)`` fp32 buffer that is summed afterwards (deterministic, no atomics).
- ``fold``: one program per block of nonzeros adding ``S`` in fp32 into a contiguous copy of the weight, at
  the row-major flat index of each nonzero.

This module imports on machines without Triton (``HAS_TRITON`` is then False) and without CUDA. With
``TRITON_INTERPRET=1`` the kernels run on CPU tensors in Triton's interpreter (how the tests run them); they
are JIT-wrapped at first use, so the variable only has to be set before the first call. The interpreter
truncates fp32 to bf16 where GPUs round to nearest even, so under it a bf16 result is written in fp32 and
rounded once by torch (:func:`_store_dtype`): CPU results then match the GPU's bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from functools import cache

import torch
from torch import Tensor

from .triton_kernels import HAS_TRITON, is_interpreting, kernels, triton

__all__ = [
    "HAS_TRITON",
    "balanced_row_order",
    "choose_blocks",
    "fold",
    "is_interpreting",
    "sddmm",
    "spmm",
    "spmm_t",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


# --- block-size rules ---------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_programs_target(device: torch.device) -> int:
    """Programs needed to fill the device a few times over (matters for the sddmm token split)."""
    if device.type == "cuda" and not is_interpreting():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * _sm_count(index)
    return 4


def choose_blocks(op: str, *, tokens: int, rows: int, nnz: int, programs_target: int = 512) -> dict[str, int]:
    """Block sizes for ``op`` in {"spmm", "sddmm", "fold"} from shapes alone (no autotuning, no sync).

    - spmm / spmm_t: ``BR`` sparse rows (lanes) x ``BT`` tokens per program. Small token counts (decoding)
      get more rows per program so each program still moves a reasonable tile.
    - sddmm: ``BK`` nonzeros x ``BT`` tokens per step, and ``splits`` of the token range so that
      ``cdiv(nnz, BK) * splits`` reaches ``programs_target``.
    - fold: ``BK`` nonzeros per program.
    """
    bt = min(128, max(16, _next_pow2(tokens)))
    if op == "spmm":
        br = 16 if bt >= 64 else 32
        br = min(br, max(1, _next_pow2(rows)))
        return {"BR": br, "BT": bt, "num_warps": 4}
    if op == "sddmm":
        bk = 32
        n_blocks = max(1, -(-nnz // bk))
        n_tiles = max(1, -(-tokens // bt))
        splits = max(1, min(n_tiles, -(-programs_target // n_blocks)))
        return {"BK": bk, "BT": bt, "splits": splits, "num_warps": 8 if bt >= 128 else 4}
    if op == "fold":
        return {"BK": 256, "num_warps": 4}
    raise ValueError(f"unknown op {op!r}")


def _merge_blocks(defaults: dict[str, int], override: Mapping[str, int] | None) -> dict[str, int]:
    if not override:
        return defaults
    unknown = set(override) - set(defaults)
    if unknown:
        raise ValueError(
            f"unknown block parameters {sorted(unknown)}; expected a subset of {sorted(defaults)}"
        )
    merged = {**defaults, **{k: int(v) for k, v in override.items()}}
    for key in ("BR", "BT", "BK"):
        if key in merged and (merged[key] < 1 or merged[key] & (merged[key] - 1)):
            raise ValueError(f"{key} must be a power of two, got {merged[key]}")
    return merged


def _launch_kwargs(blocks: dict[str, int]) -> dict[str, int]:
    return {} if is_interpreting() else {"num_warps": blocks["num_warps"]}


# --- argument handling --------------------------------------------------------------------------------------


def _check_runnable(*tensors: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("rosa.sparse.triton_ops: Triton is not installed")
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type != "cuda" and not is_interpreting():
        raise RuntimeError(
            f"rosa.sparse.triton_ops: Triton kernels need CUDA tensors (got {device}); set "
            "TRITON_INTERPRET=1 to run them on CPU in Triton's interpreter"
        )


def _check_float(name: str, t: Tensor, dim: int) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _index(name: str, t: Tensor, numel: int | None = None) -> Tensor:
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} entries, got {t.numel()}")
    return t.contiguous()


def _token_contiguous(x: Tensor) -> Tensor:
    """``x`` (tokens, features) as a view with token stride 1, copying (one pass) only when needed."""
    if x.shape[0] <= 1 or x.stride(0) == 1:
        return x
    return x.t().contiguous().t()


def _device_ctx(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes a ``dtype`` result in: the interpreter truncates fp32 to bf16 where compiled
    kernels round to nearest even, so under it a bf16 result is written in fp32 and rounded once by torch."""
    return torch.float32 if dtype == torch.bfloat16 and is_interpreting() else dtype


def _search_steps(n_rows: int) -> int:
    return max(1, int(n_rows).bit_length())


# --- public ops ---------------------------------------------------------------------------------------------


def balanced_row_order(row_offsets: Tensor) -> Tensor:
    """Rows sorted by decreasing nonzero count (stable), int32, computed on device without a sync."""
    lengths = row_offsets[1:] - row_offsets[:-1]
    return torch.argsort(lengths, descending=True, stable=True).to(torch.int32)


def _rowwise(
    x: Tensor,
    values: Tensor,
    row_offsets: Tensor,
    col_idx: Tensor,
    n_rows: int,
    blocks: Mapping[str, int] | None,
) -> Tensor:
    tokens = x.shape[0]
    nnz = col_idx.numel()
    if tokens == 0 or n_rows == 0 or nnz == 0:
        return x.new_zeros(tokens, n_rows)
    cfg = _merge_blocks(choose_blocks("spmm", tokens=tokens, rows=n_rows, nnz=nnz), blocks)
    xv = _token_contiguous(x)
    y_t = torch.empty(n_rows, tokens, dtype=_store_dtype(x.dtype), device=x.device)  # token-contiguous stores
    grid = (triton.cdiv(n_rows, cfg["BR"]), triton.cdiv(tokens, cfg["BT"]))
    with _device_ctx(x):
        kernels().spmm[grid](
            xv,
            xv.stride(1),
            xv.stride(0),
            values,
            row_offsets,
            col_idx,
            balanced_row_order(row_offsets),
            y_t,
            y_t.stride(0),
            y_t.stride(1),
            n_rows,
            tokens,
            NO_STDLIB=is_interpreting(),
            BR=cfg["BR"],
            BT=cfg["BT"],
            **_launch_kwargs(cfg),
        )
    return x.new_empty(tokens, n_rows).copy_(y_t.t())


def spmm(
    x: Tensor,
    values: Tensor,
    row_offsets: Tensor,
    col_idx: Tensor,
    out_features: int,
    *,
    blocks: Mapping[str, int] | None = None,
) -> Tensor:
    """``x @ S^T``: x (tokens, in) -> (tokens, out), contiguous, in ``x.dtype``, accumulated in fp32.

    ``blocks`` overrides entries of :func:`choose_blocks` (``BR``, ``BT``, ``num_warps``).
    """
    _check_runnable(x, values, row_offsets, col_idx)
    _check_float("x", x, 2)
    _check_float("values", values, 1)
    row_offsets = _index("row_offsets", row_offsets, out_features + 1)
    col_idx = _index("col_idx", col_idx, values.numel())
    return _rowwise(x, values.contiguous(), row_offsets, col_idx, out_features, blocks)


def spmm_t(
    dy: Tensor,
    values: Tensor,
    t_row_offsets: Tensor,
    t_col_idx: Tensor,
    t_perm: Tensor,
    in_features: int,
    *,
    blocks: Mapping[str, int] | None = None,
) -> Tensor:
    """``dy @ S``: dy (tokens, out) -> (tokens, in), contiguous, in ``dy.dtype``, accumulated in fp32.

    Runs the spmm kernel on the CSR of ``S^T`` with the values gathered as ``values[t_perm]``.
    """
    _check_runnable(dy, values, t_row_offsets, t_col_idx, t_perm)
    _check_float("dy", dy, 2)
    _check_float("values", values, 1)
    t_row_offsets = _index("t_row_offsets", t_row_offsets, in_features + 1)
    t_col_idx = _index("t_col_idx", t_col_idx, values.numel())
    t_perm = _index("t_perm", t_perm, values.numel())
    # values in S^T's CSR order: one gather over nnz (cheap next to the kernel), so the kernel reads them
    # sequentially instead of through a second level of indirection.
    values_t = values.detach().index_select(0, t_perm)
    return _rowwise(dy, values_t, t_row_offsets, t_col_idx, in_features, blocks)


def sddmm(
    dy: Tensor,
    x: Tensor,
    row_offsets: Tensor,
    col_idx: Tensor,
    *,
    blocks: Mapping[str, int] | None = None,
) -> Tensor:
    """``(dy^T x)`` sampled at the support: ``out[k] = sum_t dy[t, row_k] * x[t, col_k]``, fp32, CSR order.

    ``blocks`` overrides entries of :func:`choose_blocks` (``BK``, ``BT``, ``splits``, ``num_warps``).
    """
    _check_runnable(dy, x, row_offsets, col_idx)
    _check_float("dy", dy, 2)
    _check_float("x", x, 2)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy and x must have the same number of tokens, got {dy.shape[0]} and {x.shape[0]}")
    n_rows = dy.shape[1]
    row_offsets = _index("row_offsets", row_offsets, n_rows + 1)
    col_idx = _index("col_idx", col_idx)
    tokens, nnz = x.shape[0], col_idx.numel()
    if nnz == 0 or tokens == 0:
        return torch.zeros(nnz, dtype=torch.float32, device=dy.device)
    cfg = _merge_blocks(
        choose_blocks(
            "sddmm", tokens=tokens, rows=n_rows, nnz=nnz, programs_target=_num_programs_target(dy.device)
        ),
        blocks,
    )
    n_tiles = triton.cdiv(tokens, cfg["BT"])
    splits = max(1, min(cfg["splits"], n_tiles))
    tokens_per_split = triton.cdiv(n_tiles, splits) * cfg["BT"]
    splits = triton.cdiv(tokens, tokens_per_split)  # no empty split
    dyv, xv = _token_contiguous(dy), _token_contiguous(x)
    partial = torch.empty(splits, nnz, dtype=torch.float32, device=dy.device)
    grid = (triton.cdiv(nnz, cfg["BK"]), splits)
    with _device_ctx(dy):
        kernels().sddmm[grid](
            dyv,
            dyv.stride(1),
            dyv.stride(0),
            xv,
            xv.stride(1),
            xv.stride(0),
            row_offsets,
            col_idx,
            partial,
            partial.stride(0),
            nnz,
            n_rows,
            tokens,
            tokens_per_split,
            NO_STDLIB=is_interpreting(),
            LOG=_search_steps(n_rows),
            BK=cfg["BK"],
            BT=cfg["BT"],
            LOG_BT=cfg["BT"].bit_length() - 1,
            **_launch_kwargs(cfg),
        )
    return partial[0] if splits == 1 else partial.sum(dim=0)


def fold(
    weight: Tensor, values: Tensor, flat_index: Tensor, *, blocks: Mapping[str, int] | None = None
) -> Tensor:
    """A new contiguous dense ``weight + S`` (out, in) in ``weight.dtype``; the add is done in fp32.

    ``flat_index`` (int64 [nnz]) is the row-major flat index ``row * in + col`` of every nonzero
    (``Support.flat_index()``).
    """
    _check_runnable(weight, values, flat_index)
    _check_float("weight", weight, 2)
    _check_float("values", values, 1)
    flat_index = _index("flat_index", flat_index, values.numel())
    folded = weight.to(_store_dtype(weight.dtype), memory_format=torch.contiguous_format, copy=True)
    nnz = flat_index.numel()
    if nnz:
        cfg = _merge_blocks(choose_blocks("fold", tokens=0, rows=weight.shape[0], nnz=nnz), blocks)
        with _device_ctx(weight):
            kernels().fold[(triton.cdiv(nnz, cfg["BK"]),)](
                folded, values.contiguous(), flat_index, nnz, BK=cfg["BK"], **_launch_kwargs(cfg)
            )
    return folded.to(weight.dtype)
