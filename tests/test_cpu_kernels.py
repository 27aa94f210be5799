"""rosa's own compiled CPU kernels (rosa.sparse.cpu_ops): the float64 reference for every layout they read, in
panels and column blocks small enough to cut every test case, the same bits on any number of threads, opcheck and
gradcheck through them, and the MKL fallback when they cannot be built (taken, said once, the same numbers).

Skipped where no C++ compiler exists; a compiler that cannot build them is a failure."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import generator
from reference import (
    assert_matches,
    csr_of,
    dense_from_mask,
    density_mask,
    mask_with_empty_lines,
    random_mask,
    reference_linear,
    single_entry_mask,
    strided,
    tol_for,
    widen,
)

from rosa.sparse import cpu_build, cpu_ops, ops, torch_ops
from rosa.sparse.strategy import COST_MODELS, choose_strategy, cpu_kernels

if cpu_build.compiler() is None:
    pytest.skip("no C++ compiler: the compiled CPU kernels cannot be built here", allow_module_level=True)


MASKS = {
    "random_37x29": lambda: density_mask(37, 29, 0.3, generator(1)),
    "random_19x130": lambda: density_mask(19, 130, 0.4, generator(2)),
    "empty_rows_cols": lambda: mask_with_empty_lines(23, 41, 0.9, generator(3)),
    "single_nonzero": lambda: single_entry_mask(6, 9, 5, 0),
    "density_1": lambda: density_mask(9, 17, 1.0, generator(4)),
    "density_0": lambda: density_mask(8, 6, 0.0, generator(5)),
    "column_vector": lambda: random_mask(17, 1, 5, generator(6)),
}
DTYPES = [torch.float32, torch.bfloat16]
# (tokens, panel width, block columns): one panel, a ragged last panel, many panels and blocks, one token.
TILINGS = [(5, 64, 64), (37, 8, 3), (70, 16, 7), (1, 8, 1)]
LAYOUTS = ["contiguous", "strided", "feature_major"]


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    """Every test here runs the compiled kernels: a silent fall back to MKL would fail it."""
    monkeypatch.setenv("ROSA_SPARSE_BACKEND", "cpu")
    assert cpu_ops.available(), cpu_build.error()


def _no_fallback(monkeypatch):
    for name in ("spmm", "spmm_t", "sddmm"):
        monkeypatch.setattr(torch_ops, name, lambda *a, name=name: pytest.fail(f"{name} fell back to MKL"))


def _tiling(monkeypatch, width: int, block: int):
    monkeypatch.setattr(cpu_ops, "tiles", lambda tokens: (width, block))


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "strided":
        return strided(widen(t))
    if layout == "feature_major":
        return t.t().contiguous().t()
    return t


def _inputs(mask, tokens, dtype, seed, layout="contiguous"):
    g = generator(seed)
    x = torch.randn(tokens, mask.shape[1], generator=g).to(dtype)
    dy = torch.randn(tokens, mask.shape[0], generator=g).to(dtype)
    values = torch.randn(int(mask.sum()), generator=g)
    return _layout(x, layout), _layout(dy, layout), values


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: f"T{t[0]}-panel{t[1]}-block{t[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(MASKS))
def test_kernels_match_the_float64_reference(case, dtype, tiling, layout, monkeypatch):
    tokens, width, block = tiling
    _no_fallback(monkeypatch)
    _tiling(monkeypatch, width, block)
    mask = MASKS[case]()
    out_features, in_features = mask.shape
    csr = csr_of(mask)
    x, dy, values = _inputs(mask, tokens, dtype, seed=len(case) + tokens, layout=layout)
    s = dense_from_mask(mask, values)
    ax, ady, a_s = x.double().abs(), dy.double().abs(), s.abs()
    tol = tol_for(dtype)

    y = cpu_ops.spmm(x, values, csr.row_offsets, csr.col_idx, out_features)
    assert y.dtype == dtype and y.shape == (tokens, out_features) and y.is_contiguous()
    assert_matches(y, x.double() @ s.t(), tol, "spmm", ax @ a_s.t())

    dx = cpu_ops.spmm_t(dy, values, csr.t_row_offsets, csr.t_col_idx, csr.t_perm, in_features)
    assert dx.dtype == dtype and dx.shape == (tokens, in_features) and dx.is_contiguous()
    assert_matches(dx, dy.double() @ s, tol, "spmm_t", ady @ a_s)

    dv = cpu_ops.sddmm(dy, x, csr.row_offsets, csr.col_idx)
    assert dv.dtype == torch.float32
    # Products of two bf16 numbers are exact in fp32: the value gradient has fp32 accuracy in both dtypes.
    reference = (dy.double().t() @ x.double())[mask]
    assert_matches(dv, reference, tol_for(torch.float32), "sddmm", (ady.t() @ ax)[mask])


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_sddmm_reads_operands_of_different_dtypes(dtypes, monkeypatch):
    """The fold strategy's SDDMM gets dy in the weight's dtype and the layer's fp32 copy of x."""
    _no_fallback(monkeypatch)
    mask = MASKS["random_19x130"]()
    csr = csr_of(mask)
    g = generator(0)
    dy = torch.randn(33, mask.shape[0], generator=g).to(dtypes[0])
    x = torch.randn(33, mask.shape[1], generator=g).to(dtypes[1])
    dv = cpu_ops.sddmm(dy, x, csr.row_offsets, csr.col_idx)
    ady, ax = dy.double().abs(), x.double().abs()
    assert_matches(dv, (dy.double().t() @ x.double())[mask], 1e-5, "sddmm", (ady.t() @ ax)[mask])


def test_bf16_results_round_to_nearest_even_like_torch(monkeypatch):
    """A bf16 result is its fp32 sum rounded once, as torch rounds (ties to even, NaN stays NaN)."""
    mask = density_mask(16, 16, 1.0, generator(0))
    csr = csr_of(mask)
    x = torch.randn(9, 16, generator=generator(1)).to(torch.bfloat16)
    values = torch.randn(256, generator=generator(2))
    x[3, 4] = float("nan")
    y = cpu_ops.spmm(x, values, csr.row_offsets, csr.col_idx, 16)
    y32 = cpu_ops.spmm(x.float(), values, csr.row_offsets, csr.col_idx, 16)
    assert torch.equal(y.isnan(), y32.isnan()) and bool(y[3].isnan().all())
    ok = ~y32.isnan()
    assert torch.equal(y[ok], y32.to(torch.bfloat16)[ok])


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    """(The shape is large enough for the kernels to use every thread they are given.)"""
    _tiling(monkeypatch, 16, 40)
    mask = density_mask(600, 500, 0.05, generator(0))
    csr = csr_of(mask)
    x, dy, values = _inputs(mask, 200, torch.float32, seed=1)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            results.append(
                (
                    cpu_ops.spmm(x, values, csr.row_offsets, csr.col_idx, 600),
                    cpu_ops.spmm_t(dy, values, csr.t_row_offsets, csr.t_col_idx, csr.t_perm, 500),
                    cpu_ops.sddmm(dy, x, csr.row_offsets, csr.col_idx),
                )
            )
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_sparse_linear_runs_the_compiled_kernels_both_ways(monkeypatch):
    """Forward and backward of the custom op, x and values both needing a gradient, against float64."""
    _no_fallback(monkeypatch)
    _tiling(monkeypatch, 8, 5)
    mask = MASKS["empty_rows_cols"]()
    csr = csr_of(mask)
    x, grad_out, values = _inputs(mask, 21, torch.float32, seed=3, layout="strided")
    ref = reference_linear(x, None, None, None, None, 0.0, mask, values, grad_out)
    leaf_x = widen(x).requires_grad_(True)
    leaf_values = values.clone().requires_grad_(True)
    y = ops.sparse_linear(strided(leaf_x), leaf_values, *csr.args())
    y.backward(grad_out)
    assert_matches(y, ref.y, 1e-5, "y", ref.mag.y)
    assert_matches(strided(leaf_x.grad), ref.grad_x, 1e-5, "grad x", ref.mag.grad_x)
    assert_matches(leaf_values.grad, ref.grad_values, 1e-5, "grad values", ref.mag.grad_values)


@pytest.mark.parametrize("case", ["random_37x29", "empty_rows_cols", "density_1", "density_0"])
def test_gradcheck_through_the_compiled_kernels(case, monkeypatch):
    """The kernels read fp32 (fp64 goes to MKL), so the check runs in fp32: the op is linear in x and in the
    values, so central differences are exact up to rounding, which eps 1e-2 keeps far under the tolerance."""
    _no_fallback(monkeypatch)
    _tiling(monkeypatch, 8, 4)
    mask = MASKS[case]()
    csr = csr_of(mask)
    x, _, values = _inputs(mask, 11, torch.float32, seed=4)
    x.requires_grad_(True)
    values.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Input #. requires gradient and is not a double precision")
        assert torch.autograd.gradcheck(
            lambda x, v: ops.sparse_linear(x, v, *csr.args()), (x, values), eps=1e-2, atol=2e-3, rtol=1e-3
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["spmm", "spmm_t", "sddmm", "sparse_linear"])
def test_opcheck_through_the_compiled_kernels(op, dtype, monkeypatch):
    _no_fallback(monkeypatch)
    mask = MASKS["random_37x29"]()
    csr = csr_of(mask)
    x, dy, values = _inputs(mask, 10, dtype, seed=5, layout="strided")
    args = {
        "spmm": (x, values, csr.row_offsets, csr.col_idx, mask.shape[0]),
        "spmm_t": (dy, values, csr.t_row_offsets, csr.t_col_idx, csr.t_perm, mask.shape[1]),
        "sddmm": (dy, x, csr.row_offsets, csr.col_idx),
        "sparse_linear": (
            x.detach().clone().requires_grad_(dtype == torch.float32),
            values.detach().clone().requires_grad_(dtype == torch.float32),
            *csr.args(),
        ),
    }[op]
    torch.library.opcheck(getattr(ops, op), args)


def test_a_bounds_checked_build_refuses_a_bad_index():
    """Indices are validated before any kernel sees them; the debug build checks them again, so a bad one is an
    error there rather than a read out of bounds."""
    lib = cpu_build.library(debug=True)
    assert lib is not None and lib.rosa_cpu_bounds_checked() == 1
    mask = MASKS["random_37x29"]()
    csr = csr_of(mask)
    bad = csr.col_idx.clone()
    bad[3] = 29  # one past the last column
    x = torch.randn(4, 29)
    out = torch.empty(4, 37)
    values = torch.randn(bad.numel())
    args = (x.data_ptr(), 0, 29, 1, 4, 29, values.data_ptr(), csr.row_offsets.data_ptr())
    assert lib.rosa_spmm(*args, bad.data_ptr(), 37, out.data_ptr(), 0, 8, 64, 1) == 3
    assert lib.rosa_spmm(*args, csr.col_idx.data_ptr(), 37, out.data_ptr(), 0, 8, 64, 1) == 0


def test_the_build_is_cached():
    path = cpu_build.build()
    stamp = path.stat().st_mtime_ns
    assert cpu_build.build() == path and path.stat().st_mtime_ns == stamp
    assert path.parent.parent == cpu_build.cache_root()


# --- the MKL fallback --------------------------------------------------------------------------------------


@pytest.fixture
def fresh_loader():
    """The loader forgets what it loaded (and any failure) before and after the test."""
    cpu_build.reset()
    yield
    cpu_build.reset()


def _reference_run(mask, seed):
    csr = csr_of(mask)
    x, grad_out, values = _inputs(mask, 13, torch.float32, seed=seed)
    xx, vv = x.clone().requires_grad_(True), values.clone().requires_grad_(True)
    y = ops.sparse_linear(xx, vv, *csr.args())
    y.backward(grad_out)
    return y.detach(), xx.grad, vv.grad


def test_a_failed_build_falls_back_to_mkl_once_with_the_same_numbers(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.delenv("ROSA_SPARSE_BACKEND")
    mask = MASKS["empty_rows_cols"]()
    compiled = _reference_run(mask, seed=7)
    assert ops.backend_for(torch.device("cpu")) is cpu_ops and cpu_kernels() == "cpu"

    cpu_build.reset()
    broken = tmp_path / "rosa_cpu.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_build, "SOURCE", broken)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="compiled CPU sparse kernels are unavailable .*failed") as caught:
        assert ops.backend_for(torch.device("cpu")) is torch_ops
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: no second warning
        fallback = _reference_run(mask, seed=7)
        assert cpu_kernels() == "cpu-mkl"
    assert "failed" in cpu_build.error()
    for a, b, what in zip(compiled, fallback, ("y", "grad x", "grad values")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=what)


def test_no_compiler_falls_back_and_forcing_the_compiled_path_says_why(fresh_loader, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        assert not cpu_ops.available()
    with pytest.raises(
        RuntimeError, match="ROSA_SPARSE_BACKEND=cpu but the compiled CPU kernels are unavailable"
    ):
        ops.backend_for(torch.device("cpu"))
    monkeypatch.delenv("ROSA_SPARSE_BACKEND")
    assert ops.backend_for(torch.device("cpu")) is torch_ops


def test_the_switch_turns_the_compiled_kernels_off_without_a_word(fresh_loader, monkeypatch):
    monkeypatch.delenv("ROSA_SPARSE_BACKEND")
    monkeypatch.setenv("ROSA_CPU_KERNELS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.backend_for(torch.device("cpu")) is torch_ops
    monkeypatch.setenv("ROSA_SPARSE_BACKEND", "torch")
    monkeypatch.delenv("ROSA_CPU_KERNELS")
    assert ops.backend_for(torch.device("cpu")) is torch_ops


def test_the_cost_rule_uses_the_rates_of_the_kernels_in_use(monkeypatch):
    """Fold is chosen by the rates of the kernels that would run instead: MKL's are slower, so with them the
    rule folds sooner (here: a shape and density where only the MKL rates pick fold)."""
    shape, tokens = (4096, 4096), 2048
    nnz = next(
        n
        for n in range(10**5, 4096 * 4096, 10**5)
        if COST_MODELS["cpu-mkl"].fold_cost(*shape) < COST_MODELS["cpu-mkl"].spmm_cost(*shape, n, tokens)
    )
    assert COST_MODELS["cpu"].fold_cost(*shape) > COST_MODELS["cpu"].spmm_cost(*shape, nnz, tokens)
    assert choose_strategy("cpu", *shape, nnz, tokens) == "spmm"
    monkeypatch.setenv("ROSA_SPARSE_BACKEND", "torch")
    assert choose_strategy("cpu", *shape, nnz, tokens) == "fold"
