#!/usr/bin/env python
"""GPU benchmark of rosa's Triton sparse kernels (target: one H200, under 5 minutes).

1. Checks every Triton kernel (spmm, spmm_t, sddmm, fold) against a dense float64 reference at small, odd
   shapes, and that the ops make no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``).
2. Times, for LLaMA-7B projection shapes (out x in: 4096x4096, 11008x4096, 4096x11008) at 2048 tokens and
   densities 0.15 / 0.6 / 1.8 %: each Triton kernel, the cuBLAS bf16 dense GEMMs of the same shape,
   PyTorch's cuSPARSE CSR path (``torch.sparse.mm`` / ``torch.sparse.sampled_addmm``, bf16 where supported,
   fp32 otherwise) and the fold kernel against its PyTorch equivalent. CUDA-event timing, warm-up, medians
   (L2 is warm: back-to-back calls on the same tensors, as in training).
3. HOOK: a full RoSA layer fwd+bwd against a LoRA layer of the same rank. Skipped (with a message) until
   ``rosa.layer.RosaLinear`` can be imported and ``build_rosa_layer`` below is wired to its constructor.

Prints a table and writes JSON (``--out``, default docs/benchmarks/gpu_h200.json).

    python benchmarks/gpu.py [--out PATH] [--tokens 2048] [--densities 0.0015,0.006,0.018]

``--smoke-cpu`` (developers only) runs the whole script at tiny shapes on CPU under TRITON_INTERPRET=1 to
check the script itself; its timings mean nothing and nothing is written unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "gpu_h200.json"
LLAMA7B_SHAPES = "4096x4096,11008x4096,4096x11008"  # (out, in): q/k/v/o, gate/up, down


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)})"
    )
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--shapes", default=LLAMA7B_SHAPES, help="comma-separated OUTxIN")
    p.add_argument("--densities", default="0.0015,0.006,0.018")
    p.add_argument(
        "--support",
        choices=("uniform", "skewed"),
        default="uniform",
        help="uniform random support, or top-k of row/column-scaled scores (skewed row lengths)",
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=25)
    p.add_argument(
        "--budget-s", type=float, default=270.0, help="stop timing new shapes after this many seconds"
    )
    p.add_argument("--layer-rank", type=int, default=16)
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke_cpu:
        args.tokens = min(args.tokens, 40)
        args.shapes = "48x40,24x56" if args.shapes == LLAMA7B_SHAPES else args.shapes
        args.densities = "0.05,0.3"
        args.warmup, args.reps = 1, 2
    elif args.out is None:
        args.out = DEFAULT_OUT
    return args


ARGS = parse_args()
if ARGS.smoke_cpu:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

if not ARGS.smoke_cpu and not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run.")


def _load_triton_ops():
    try:
        from rosa.sparse import triton_ops

        return triton_ops
    except Exception as e:
        print(f"note: `import rosa` failed ({type(e).__name__}: {e}); loading triton_ops.py by path")
        path = REPO / "src" / "rosa" / "sparse" / "triton_ops.py"
        spec = importlib.util.spec_from_file_location("rosa_triton_ops_standalone", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


ops = _load_triton_ops()
if not ops.HAS_TRITON:
    sys.exit("benchmarks/gpu.py needs Triton (pip install triton); nothing was run.")

DEVICE = torch.device("cpu" if ARGS.smoke_cpu else "cuda")


# --- helpers ------------------------------------------------------------------------------------------------


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, warmup: int = ARGS.warmup, reps: int = ARGS.reps) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync()
    if DEVICE.type != "cuda":
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    if hasattr(torch.cuda, "_sleep"):
        # Keep the GPU busy while the host enqueues every rep, so the events time the GPU work and not the
        # Python launch overhead of small kernels.
        torch.cuda._sleep(20_000_000)
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


class Support:
    """CSR + transposed CSR of a random support, built on the device (setup only: syncs are fine here)."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, out_f: int, in_f: int):
        order = torch.argsort(rows * in_f + cols)
        rows, cols = rows[order], cols[order]
        self.shape = (out_f, in_f)
        self.nnz = rows.numel()
        self.rows, self.cols = rows, cols
        zero = torch.zeros(1, dtype=torch.int64, device=rows.device)
        self.row_offsets = torch.cat([zero, torch.bincount(rows, minlength=out_f).cumsum(0)]).to(torch.int32)
        self.col_idx = cols.to(torch.int32)
        self.t_perm = torch.argsort(cols * out_f + rows)
        self.t_col_idx = rows[self.t_perm].to(torch.int32)
        self.t_row_offsets = torch.cat([zero, torch.bincount(cols, minlength=in_f).cumsum(0)]).to(torch.int32)
        self.row_idx = rows.to(torch.int32)
        self.row_order = ops.balanced_row_order(self.row_offsets)
        self.t_row_order = ops.balanced_row_order(self.t_row_offsets)

    @classmethod
    def random(cls, out_f: int, in_f: int, density: float, kind: str, seed: int) -> Support:
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        nnz = max(0, min(out_f * in_f, round(density * out_f * in_f)))
        scores = torch.rand(out_f, in_f, generator=gen, device=DEVICE)
        if kind == "skewed":  # like a Fisher top-k: some rows / columns matter much more than others
            row_scale = torch.exp(1.5 * torch.randn(out_f, 1, generator=gen, device=DEVICE))
            col_scale = torch.exp(0.5 * torch.randn(1, in_f, generator=gen, device=DEVICE))
            scores = scores * row_scale * col_scale
        flat = torch.topk(scores.view(-1), nnz, sorted=False).indices
        del scores
        return cls(flat // in_f, flat % in_f, out_f, in_f)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Support:
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(rows, cols, *mask.shape)

    def dense64(self, values: torch.Tensor) -> torch.Tensor:
        s = torch.zeros(self.shape, dtype=torch.float64, device=values.device)
        s[self.rows, self.cols] = values.double()
        return s

    def row_length_stats(self) -> dict:
        lengths = (self.row_offsets[1:] - self.row_offsets[:-1]).float()
        return {"mean": lengths.mean().item(), "max": lengths.max().item(), "std": lengths.std().item()}


# --- 1. correctness at small shapes -------------------------------------------------------------------------


def check_kernels() -> list[dict]:
    print("== correctness (Triton vs dense float64, small shapes) ==")
    results = []
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    cases = [
        ("odd 5x7 T3", torch.rand(5, 7, generator=gen, device=DEVICE) < 0.4, 3),
        ("empty rows/cols 97x61 T45", torch.rand(97, 61, generator=gen, device=DEVICE) < 0.05, 45),
        ("dense 33x40 T130", torch.ones(33, 40, dtype=torch.bool, device=DEVICE), 130),
        ("nnz0 8x9 T5", torch.zeros(8, 9, dtype=torch.bool, device=DEVICE), 5),
    ]
    cases[1][1][[0, 10, 96]] = False
    cases[1][1][:, [0, 7, 60]] = False
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}
    for name, mask, tokens in cases:
        sup = Support.from_mask(mask)
        out_f, in_f = mask.shape
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            values = torch.randn(sup.nnz, generator=gen, device=DEVICE)
            x = torch.randn(tokens, in_f, generator=gen, device=DEVICE).to(dtype)
            dy = torch.randn(tokens, 2 * out_f, generator=gen, device=DEVICE).to(dtype)[
                :, ::2
            ]  # non-contiguous
            w = torch.randn(out_f, in_f, generator=gen, device=DEVICE).to(dtype)
            s64 = sup.dense64(values)
            got = {
                "spmm": (ops.spmm(x, values, sup.row_offsets, sup.col_idx, out_f), x.double() @ s64.t()),
                "spmm_t": (
                    ops.spmm_t(dy, values, sup.t_row_offsets, sup.t_col_idx, sup.t_perm, in_f),
                    dy.double() @ s64,
                ),
                "sddmm": (
                    ops.sddmm(dy, x, sup.row_offsets, sup.col_idx),
                    (dy.double().t() @ x.double())[sup.rows, sup.cols],
                ),
                "fold": (ops.fold(w, values, sup.row_offsets, sup.col_idx), w.double() + s64),
            }
            for op, (a, ref) in got.items():
                scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
                err = (a.double() - ref).abs().max().item() / scale if ref.numel() else 0.0
                limit = 1e-4 if op == "sddmm" else tol[dtype]
                ok = a.shape == ref.shape and err <= limit
                results.append({"case": name, "dtype": str(dtype), "op": op, "max_rel_err": err, "ok": ok})
                if not ok:
                    print(f"  FAIL {op:7s} {name} {dtype}: rel err {err:.2e} > {limit:.0e}")
    n_ok = sum(r["ok"] for r in results)
    print(f"  {n_ok}/{len(results)} checks passed")
    return results


def check_no_host_sync() -> dict:
    """Run each op once with CUDA's sync debug mode set to error."""
    if DEVICE.type != "cuda":
        return {"checked": False, "reason": "not on CUDA"}
    sup = Support.random(256, 192, 0.05, "uniform", seed=1)
    x = torch.randn(130, 192, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn(130, 256, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(256, 192, device=DEVICE, dtype=torch.bfloat16)
    values = torch.randn(sup.nnz, device=DEVICE)
    calls = {
        "spmm": lambda: ops.spmm(x, values, sup.row_offsets, sup.col_idx, 256),
        "spmm_t": lambda: ops.spmm_t(dy, values, sup.t_row_offsets, sup.t_col_idx, sup.t_perm, 192),
        "sddmm": lambda: ops.sddmm(dy, x, sup.row_offsets, sup.col_idx),
        "fold": lambda: ops.fold(w, values, sup.row_offsets, sup.col_idx),
    }
    result = {"checked": True}
    for name, fn in calls.items():
        fn()  # compile outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            result[name] = "no sync"
        except RuntimeError as e:
            result[name] = f"SYNC: {e}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(
        "== host synchronisation ==\n  " + ", ".join(f"{k}: {v}" for k, v in result.items() if k != "checked")
    )
    return result


# --- 2. timings ---------------------------------------------------------------------------------------------


def _csr(values, row_offsets, col_idx, shape):
    return torch.sparse_csr_tensor(row_offsets, col_idx, values, shape, check_invariants=False)


def _first_working(candidates):
    """(dtype name, callable) of the first candidate that runs; candidates: [(name, make_fn)]."""
    errors = []
    for name, make in candidates:
        try:
            fn = make()
            fn()
            sync()
            return name, fn
        except (RuntimeError, NotImplementedError, TypeError) as e:
            errors.append(f"{name}: {str(e).splitlines()[0][:120]}")
    return None, "; ".join(errors)


def bench_shape(out_f: int, in_f: int, density: float, tokens: int, kind: str) -> list[dict]:
    sup = Support.random(out_f, in_f, density, kind, seed=out_f * 7 + in_f + round(density * 1e5))
    nnz = sup.nnz
    bf16 = torch.bfloat16
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    x = torch.randn(tokens, in_f, device=DEVICE, generator=gen).to(bf16)
    dy = torch.randn(tokens, out_f, device=DEVICE, generator=gen).to(bf16)
    w = torch.randn(out_f, in_f, device=DEVICE, generator=gen).to(bf16)
    values = torch.randn(nnz, device=DEVICE, generator=gen) * 1e-2
    x_tm = x.t().contiguous().t()  # token-major copies: what a layer caching x^T would pass
    dy_tm = dy.t().contiguous().t()
    flat = sup.rows * in_f + sup.cols

    rows = []

    def add(op: str, impl: str, dtype: str, ms: float, note: str = "") -> None:
        rows.append(
            {
                "shape": f"{out_f}x{in_f}",
                "out": out_f,
                "in": in_f,
                "tokens": tokens,
                "density": density,
                "nnz": nnz,
                "support": kind,
                "op": op,
                "impl": impl,
                "dtype": dtype,
                "ms": ms,
                "note": note,
            }
        )

    # dense cuBLAS bf16 GEMMs of the same shape (forward, input gradient, weight gradient)
    add("dense_fwd", "cublas x@W^T", "bf16", time_ms(lambda: x @ w.t()))
    add("dense_dx", "cublas dy@W", "bf16", time_ms(lambda: dy @ w))
    add("dense_dw", "cublas dy^T@x", "bf16", time_ms(lambda: dy.t() @ x))

    # Triton, with the support invariants precomputed (as a layer would) ...
    add(
        "spmm",
        "triton",
        "bf16",
        time_ms(lambda: ops.spmm(x, values, sup.row_offsets, sup.col_idx, out_f, row_order=sup.row_order)),
    )
    add(
        "spmm_t",
        "triton",
        "bf16",
        time_ms(
            lambda: ops.spmm_t(
                dy, values, sup.t_row_offsets, sup.t_col_idx, sup.t_perm, in_f, row_order=sup.t_row_order
            )
        ),
    )
    add(
        "sddmm",
        "triton",
        "bf16",
        time_ms(lambda: ops.sddmm(dy, x, sup.row_offsets, sup.col_idx, row_idx=sup.row_idx)),
    )
    # ... token-major inputs (no transposed copy inside the op) ...
    add(
        "spmm",
        "triton token-major x",
        "bf16",
        time_ms(lambda: ops.spmm(x_tm, values, sup.row_offsets, sup.col_idx, out_f, row_order=sup.row_order)),
    )
    add(
        "sddmm",
        "triton token-major x,dy",
        "bf16",
        time_ms(lambda: ops.sddmm(dy_tm, x_tm, sup.row_offsets, sup.col_idx, row_idx=sup.row_idx)),
    )
    # ... and with nothing precomputed (argsort / binary search inside every call)
    add(
        "spmm",
        "triton no cached order",
        "bf16",
        time_ms(lambda: ops.spmm(x, values, sup.row_offsets, sup.col_idx, out_f)),
    )
    add(
        "sddmm",
        "triton binary search",
        "bf16",
        time_ms(lambda: ops.sddmm(dy, x, sup.row_offsets, sup.col_idx)),
    )
    add("fold", "triton", "bf16", time_ms(lambda: ops.fold(w, values, sup.row_offsets, sup.col_idx)))

    def torch_fold():
        folded = w.clone()
        f = folded.view(-1)
        f[flat] = (f[flat].float() + values).to(f.dtype)
        return folded

    add("fold", "torch index_put", "bf16", time_ms(torch_fold))

    # PyTorch CSR (cuSPARSE on CUDA): bf16 where supported, else fp32 (inputs cast outside the timing)
    def csr_candidates(make):
        return [(name, lambda dt=dt: make(dt)) for name, dt in (("bf16", bf16), ("fp32", torch.float32))]

    def fwd(dt):
        s, xt = _csr(values.to(dt), sup.row_offsets, sup.col_idx, (out_f, in_f)), x.to(dt).t()
        return lambda: torch.sparse.mm(s, xt)

    def bwd_x(dt):
        s_t = _csr(values[sup.t_perm].to(dt), sup.t_row_offsets, sup.t_col_idx, (in_f, out_f))
        dyt = dy.to(dt).t()
        return lambda: torch.sparse.mm(s_t, dyt)

    def bwd_v(dt):
        pattern = _csr(torch.zeros(nnz, dtype=dt, device=DEVICE), sup.row_offsets, sup.col_idx, (out_f, in_f))
        dyt, xx = dy.to(dt).t().contiguous(), x.to(dt)
        return lambda: torch.sparse.sampled_addmm(pattern, dyt, xx, beta=0.0)

    for op, make in (("spmm", fwd), ("spmm_t", bwd_x), ("sddmm", bwd_v)):
        dtype, fn = _first_working(csr_candidates(make))
        if dtype is None:
            add(op, "torch.sparse (cuSPARSE)", "-", float("nan"), note=fn)
        else:
            add(op, "torch.sparse (cuSPARSE)", dtype, time_ms(fn))

    dense_ms = rows[0]["ms"]
    for r in rows:
        r["x_dense_fwd"] = r["ms"] / dense_ms if dense_ms > 0 else float("nan")
    rows.append(
        {"shape": f"{out_f}x{in_f}", "density": density, "op": "row_lengths", **sup.row_length_stats()}
    )
    return rows


def print_table(rows: list[dict]) -> None:
    cols = [
        ("dense_fwd", "cublas x@W^T"),
        ("spmm", "triton"),
        ("spmm", "triton token-major x"),
        ("spmm", "torch.sparse (cuSPARSE)"),
        ("spmm_t", "triton"),
        ("spmm_t", "torch.sparse (cuSPARSE)"),
        ("dense_dw", "cublas dy^T@x"),
        ("sddmm", "triton"),
        ("sddmm", "torch.sparse (cuSPARSE)"),
        ("fold", "triton"),
        ("fold", "torch index_put"),
    ]
    heads = [
        "dense",
        "spmm",
        "spmm tm",
        "cusp spmm",
        "spmm_t",
        "cusp spmm_t",
        "dense dW",
        "sddmm",
        "cusp sddmm",
        "fold",
        "torch fold",
    ]
    print("\n== median ms (bf16 activations, fp32 values; cuSPARSE dtype in JSON; tm: token-major input) ==")
    print("   last column: (triton spmm + spmm_t + sddmm) / one dense bf16 GEMM of the same shape")
    print(
        f"{'shape':>11s} {'dens%':>5s} {'nnz':>8s} "
        + " ".join(f"{h:>11s}" for h in heads)
        + f" {'3ops/gemm':>9s}"
    )
    keys = sorted({(r["shape"], r["density"]) for r in rows if "impl" in r}, key=lambda k: (k[0], k[1]))
    for shape, density in keys:
        sel = {
            (r["op"], r["impl"]): r
            for r in rows
            if r.get("shape") == shape and r.get("density") == density and "impl" in r
        }
        nnz = next(iter(sel.values()))["nnz"]
        cells = [f"{sel[c]['ms']:11.3f}" if c in sel else f"{'-':>11s}" for c in cols]
        three = sum(sel[(op, "triton")]["ms"] for op in ("spmm", "spmm_t", "sddmm")) / sel[cols[0]]["ms"]
        print(f"{shape:>11s} {100 * density:5.2f} {nnz:8d} " + " ".join(cells) + f" {three:9.2f}")


# --- 3. HOOK: full RoSA layer fwd+bwd vs LoRA layer of the same rank ----------------------------------------
# The layer is written elsewhere; its interface is `rosa.layer.RosaLinear`. Wire `build_rosa_layer` to its
# constructor once that is settled; until then this section reports itself as skipped.


def build_rosa_layer(
    rosa_linear_cls, base: torch.nn.Linear, rank: int, density: float, strategy: str = "auto"
) -> torch.nn.Module:
    """A RosaLinear around ``base`` (bf16 adapter, like the LoRA reference) with a random support at
    ``density`` already fixed, so the values train: the joint phase of RoSA."""
    from rosa.sparse import support_from_flat_index

    layer = rosa_linear_cls(
        base, "default", r=rank, lora_alpha=16.0, density=density, adapter_dtype=base.weight.dtype,
        sparse_strategy=strategy,
    )
    out_f, in_f = base.out_features, base.in_features
    gen = torch.Generator().manual_seed(0)
    nnz = layer.capacity["default"]
    flat = torch.randperm(out_f * in_f, generator=gen)[:nnz]
    layer.set_support("default", support_from_flat_index(flat, (out_f, in_f)))
    with torch.no_grad():
        layer.rosa_values["default"].normal_(std=1e-3)
    return layer.to(base.weight.device)


class LoraLinear(torch.nn.Module):
    """Reference LoRA layer: frozen base + B(A(x)) * alpha / r."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float = 16.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = torch.nn.Parameter(
            torch.randn(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype)
            / math.sqrt(base.in_features)
        )
        self.b = torch.nn.Parameter(
            torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype)
        )
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.a.t()) @ self.b.t() * self.scale


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> float:
    grad = torch.randn_like(module(x))

    def step():
        x.grad = None
        module(x).backward(grad)

    return time_ms(step)


def bench_layer(args, shapes, densities) -> dict:
    try:
        from rosa.layer import RosaLinear
    except Exception as e:
        msg = f"cannot import rosa.layer.RosaLinear ({type(e).__name__}: {e})"
        print(f"\n== layer fwd+bwd: skipped: {msg}")
        return {"skipped": msg}
    results = []
    for out_f, in_f in shapes:
        base = torch.nn.Linear(in_f, out_f, bias=False, device=DEVICE, dtype=torch.bfloat16)
        x = torch.randn(args.tokens, in_f, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        for density in densities:
            lora = LoraLinear(base, args.layer_rank)
            row = {"shape": f"{out_f}x{in_f}", "density": density, "rank": args.layer_rank,
                   "lora_ms": time_fwd_bwd(lora, x)}
            for strategy in ("spmm", "fold", "auto"):
                try:
                    rosa = build_rosa_layer(RosaLinear, base, args.layer_rank, density, strategy)
                except Exception as e:
                    msg = f"cannot build a RosaLinear ({type(e).__name__}: {e})"
                    print(f"\n== layer fwd+bwd: skipped: {msg}")
                    return {"skipped": msg}
                row[f"rosa_{strategy}_ms"] = time_fwd_bwd(rosa, x)
            row["rosa_over_lora"] = row["rosa_auto_ms"] / row["lora_ms"]
            results.append(row)
            print(
                f"  layer {row['shape']} d={density:.4f} r={args.layer_rank}: RoSA spmm {row['rosa_spmm_ms']:.3f} "
                f"fold {row['rosa_fold_ms']:.3f} auto {row['rosa_auto_ms']:.3f} ms, LoRA {row['lora_ms']:.3f} ms "
                f"(auto/LoRA {row['rosa_over_lora']:.2f}x, target <= 1.15x)"
            )
    return {"results": results}


# --- main ---------------------------------------------------------------------------------------------------


def main(args) -> int:
    t_start = time.monotonic()
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    densities = [float(d) for d in args.densities.split(",")]
    meta = {
        "device": torch.cuda.get_device_name()
        if DEVICE.type == "cuda"
        else f"cpu (TRITON_INTERPRET) {platform.processor()}",
        "torch": torch.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "cuda": torch.version.cuda,
        "tokens": args.tokens,
        "warmup": args.warmup,
        "reps": args.reps,
        "support": args.support,
        "timing": "median of CUDA-event times, warm L2" if DEVICE.type == "cuda" else "perf_counter (smoke)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}")

    checks = check_kernels()
    sync_check = check_no_host_sync()

    rows, skipped = [], []
    for out_f, in_f in shapes:
        for density in densities:
            if time.monotonic() - t_start > args.budget_s:
                skipped.append(f"{out_f}x{in_f}@{density}")
                continue
            t0 = time.monotonic()
            rows += bench_shape(out_f, in_f, density, args.tokens, args.support)
            print(f"  timed {out_f}x{in_f} density {density:.4f} in {time.monotonic() - t0:.1f} s")
            torch.cuda.empty_cache() if DEVICE.type == "cuda" else None
    if skipped:
        print(f"time budget reached; skipped {', '.join(skipped)}")
    print_table(rows)

    layer = {"skipped": "--skip-layer"} if args.skip_layer else bench_layer(args, shapes, densities)

    report = {
        "meta": meta,
        "checks": checks,
        "host_sync": sync_check,
        "results": rows,
        "skipped": skipped,
        "layer": layer,
        "elapsed_s": time.monotonic() - t_start,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"\nwrote {args.out}")
    failed = [c for c in checks if not c["ok"]]
    bad_sync = [k for k, v in sync_check.items() if isinstance(v, str) and v.startswith("SYNC")]
    print(
        f"done in {report['elapsed_s']:.0f} s; {len(failed)} failed checks; "
        f"host syncs in: {bad_sync or 'none'}"
    )
    return 1 if failed or bad_sync else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
