"""The Triton kernels themselves (the design is described in :mod:`rosa.sparse.triton_ops`, which launches them).

Importable without Triton (``HAS_TRITON`` is then False); the kernels are JIT-wrapped at first use, so
``TRITON_INTERPRET`` only has to be set before the first call.
"""

from __future__ import annotations

import os
from functools import cache
from types import SimpleNamespace

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:
    triton = None
    tl = None
    HAS_TRITON = False


# --- kernels ------------------------------------------------------------------------------------------------

if HAS_TRITON:

    def _csr_spmm_kernel(
        x_ptr,  # activations, element (t, c) at x_ptr + c * stride_xc + t * stride_xt (stride_xt is 1 on GPU)
        stride_xc,
        stride_xt,
        val_ptr,  # [nnz] sparse values in the order of ci_ptr
        ro_ptr,  # int32 [n_rows + 1]
        ci_ptr,  # int32 [nnz]
        order_ptr,  # int32 [n_rows]: rows in the order they are assigned to lanes
        y_ptr,  # output, element (row, t) at y_ptr + row * stride_yr + t * stride_yt
        stride_yr,
        stride_yt,
        n_rows,
        n_tokens,
        NO_STDLIB: tl.constexpr,  # interpreter: avoid tl.max / tl.sum (see _kernels_for)
        BR: tl.constexpr,
        BT: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_t = tl.program_id(1)
        lanes = pid_r * BR + tl.arange(0, BR)
        lane_ok = lanes < n_rows
        rows = tl.load(order_ptr + lanes, mask=lane_ok, other=0)
        start = tl.load(ro_ptr + rows, mask=lane_ok, other=0)
        end = tl.load(ro_ptr + rows + 1, mask=lane_ok, other=0)
        length = end - start
        if NO_STDLIB:
            # The same maximum from scalar loads (pid_r * BR < n_rows: the grid has no empty row block).
            base = pid_r * BR
            r0 = tl.load(order_ptr + base)
            max_len = tl.load(ro_ptr + r0 + 1) - tl.load(ro_ptr + r0)
            for i in tl.static_range(1, BR):
                ok = base + i < n_rows
                ri = tl.load(order_ptr + base + i, mask=ok, other=0)
                li = tl.load(ro_ptr + ri + 1, mask=ok, other=0) - tl.load(ro_ptr + ri, mask=ok, other=0)
                max_len = tl.maximum(max_len, li)
        else:
            max_len = tl.max(length, axis=0)

        t = pid_t * BT + tl.arange(0, BT)
        t_ok = t < n_tokens
        t_off = t * stride_xt
        acc = tl.full([BR, BT], 0.0, tl.float32)
        # Column index and value of step j are fetched one step ahead, so the only memory latency on the
        # loop's critical path is the gather itself.
        k_ok = length > 0
        c = tl.load(ci_ptr + start, mask=k_ok, other=0)
        v = tl.load(val_ptr + start, mask=k_ok, other=0.0)
        for j in range(0, max_len):
            nxt_ok = j + 1 < length
            c_nxt = tl.load(ci_ptr + start + j + 1, mask=nxt_ok, other=0)
            v_nxt = tl.load(val_ptr + start + j + 1, mask=nxt_ok, other=0.0)
            xg = tl.load(
                x_ptr + c.to(tl.int64)[:, None] * stride_xc + t_off[None, :],
                mask=k_ok[:, None] & t_ok[None, :],
                other=0.0,
            )
            acc += v.to(tl.float32)[:, None] * xg.to(tl.float32)
            c, v, k_ok = c_nxt, v_nxt, nxt_ok

        y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yr + (t * stride_yt)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=lane_ok[:, None] & t_ok[None, :])

    def _sddmm_kernel(
        dy_ptr,  # element (t, r) at dy_ptr + r * stride_dr + t * stride_dt
        stride_dr,
        stride_dt,
        x_ptr,  # element (t, c) at x_ptr + c * stride_xc + t * stride_xt
        stride_xc,
        stride_xt,
        ro_ptr,
        ci_ptr,
        out_ptr,  # fp32 [splits, nnz]
        stride_os,
        nnz,
        n_rows,
        n_tokens,
        tokens_per_split,
        NO_STDLIB: tl.constexpr,
        LOG: tl.constexpr,  # binary-search steps: >= ceil(log2(n_rows))
        BK: tl.constexpr,
        BT: tl.constexpr,
        LOG_BT: tl.constexpr,  # log2(BT)
    ):
        pid_k = tl.program_id(0)
        pid_s = tl.program_id(1)
        k = pid_k * BK + tl.arange(0, BK)
        k_ok = k < nnz
        c = tl.load(ci_ptr + k, mask=k_ok, other=0)

        # Row of each nonzero: the largest r in [0, n_rows) with row_offsets[r] <= k. Invariant
        # row_offsets[lo] <= k < row_offsets[hi]; every probe is in bounds (lo <= mid < hi <= n_rows).
        lo = tl.full([BK], 0, tl.int32)
        hi = tl.full([BK], 0, tl.int32) + n_rows
        for _ in tl.static_range(LOG):
            mid = (lo + hi) // 2
            go_right = tl.load(ro_ptr + mid) <= k
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid)
        r = lo

        dy_base = r.to(tl.int64) * stride_dr
        x_base = c.to(tl.int64) * stride_xc
        t_begin = pid_s * tokens_per_split
        t_end = tl.minimum(t_begin + tokens_per_split, n_tokens)
        acc = tl.full([BK, BT], 0.0, tl.float32)
        for t0 in range(t_begin, t_end, BT):
            # tokens_per_split is a multiple of BT, so only the last tile of the last split can overhang:
            # masking with n_tokens (not t_end) keeps the mask provably constant over aligned runs and the
            # loads vectorized.
            t = t0 + tl.arange(0, BT)
            m = k_ok[:, None] & (t < n_tokens)[None, :]
            a = tl.load(dy_ptr + dy_base[:, None] + (t * stride_dt)[None, :], mask=m, other=0.0)
            b = tl.load(x_ptr + x_base[:, None] + (t * stride_xt)[None, :], mask=m, other=0.0)
            acc += a.to(tl.float32) * b.to(tl.float32)
        if NO_STDLIB:
            for _ in tl.static_range(LOG_BT):  # pairwise halving of the token axis: BT -> 1
                a, b = tl.split(tl.reshape(acc, [BK, acc.shape[1] // 2, 2]))
                acc = a + b
            res = tl.reshape(acc, [BK])
        else:
            res = tl.sum(acc, axis=1)
        tl.store(out_ptr + pid_s * stride_os + k, res, mask=k_ok)

    def _fold_kernel(
        w_ptr,  # contiguous (out, in) copy of the weight, updated in place
        val_ptr,
        flat_ptr,  # int64 [nnz]: row-major flat index row * in + col of every nonzero
        nnz,
        BK: tl.constexpr,
    ):
        k = tl.program_id(0) * BK + tl.arange(0, BK)
        k_ok = k < nnz
        offs = tl.load(flat_ptr + k, mask=k_ok, other=0).to(tl.int64)
        v = tl.load(val_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=k_ok, other=0.0).to(tl.float32) + v
        tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=k_ok)


def is_interpreting() -> bool:
    """True when Triton kernels run under its CPU interpreter (``TRITON_INTERPRET=1``) at this moment."""
    if not HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@cache
def _kernels_for(interpret: bool) -> SimpleNamespace:
    """The kernels, JIT-wrapped for the given mode (``triton.jit`` picks compiled or interpreted as it wraps).

    Wrapping lazily, per mode, makes the kernels follow TRITON_INTERPRET as it is when first used, even if
    triton was imported earlier (say by another library). Triton's own helpers (tl.sum, tl.max, tl.zeros) were
    wrapped when triton was imported and may be in the other mode, so interpreted kernels avoid them
    (NO_STDLIB).
    """
    del interpret  # the cache key; triton.jit reads the mode itself
    return SimpleNamespace(
        spmm=triton.jit(_csr_spmm_kernel), sddmm=triton.jit(_sddmm_kernel), fold=triton.jit(_fold_kernel)
    )


def kernels() -> SimpleNamespace:
    return _kernels_for(is_interpreting())
