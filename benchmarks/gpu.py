#!/usr/bin/env python
"""GPU benchmark of rosa's sparse operations as RosaLinear runs them (target: one H200, under 5 minutes).

1. Checks every op of the layer's path (``rosa::spmm``, ``rosa::spmm_t``, ``rosa::sddmm``, ``rosa::fold``:
   the ``torch.library`` custom ops, which dispatch to the Triton kernels on CUDA) against a dense float64
   reference at small, odd shapes, and that they make no host synchronisation
   (``torch.cuda.set_sync_debug_mode("error")``).
2. Times, for LLaMA-7B projection shapes (out x in: 4096x4096, 11008x4096, 4096x11008) at 2048 tokens and
   densities 0.15 / 0.6 / 1.8 %, exactly what a ``RosaLinear`` (bf16 base weight, adapter dtype
   ``--adapter-dtype``, RosaConfig's default float32) runs: the support buffers come from the layer
   (``layer.support()``), the sparse input is the one the layer passes (its fp32 LoRA-input copy when the
   adapter is fp32), the forward is ``SparseDelta.forward`` (``rosa::sparse_linear``), the backward pieces are
   the custom ops with the arguments ``sparse_linear``'s backward passes, the fold is ``rosa::fold`` with the
   flat index the layer passes, and whole fwd+bwd of ``sparse_linear`` / ``folded_linear`` as the layer calls
   them. Nothing is precomputed that the layer does not precompute (no cached row order, no COO row index).
   Next to them: the cuBLAS bf16 dense GEMMs of the same shape, PyTorch's cuSPARSE CSR path
   (``torch.sparse.mm`` / ``torch.sparse.sampled_addmm``, in the layer's sparse dtype where supported, fp32
   otherwise) and a plain PyTorch fold. CUDA-event timing, warm-up, medians (L2 is warm: back-to-back calls on
   the same tensors, as in training).
3. A whole ``RosaLinear`` fwd+bwd (strategies spmm, fold and auto) against a LoRA layer of the same rank and
   adapter dtype (``--skip-layer`` skips it).

Prints a table and writes JSON (``--out``, default docs/benchmarks/gpu_h200.json) with its provenance
(benchmarks/provenance.py); ``markdown(results)`` renders it for the README (``python benchmarks/report.py``).

    python benchmarks/gpu.py [--out PATH] [--tokens 2048] [--densities 0.0015,0.006,0.018]

``--smoke-cpu`` (developers only) runs the whole script at tiny shapes on CPU with the Triton kernels under
TRITON_INTERPRET=1 (``ROSA_SPARSE_BACKEND=triton``) to check the script itself; its timings mean nothing and
nothing is written unless ``--out`` is given. Importing this module has no side effects (report.py loads it
for ``markdown``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import provenance
import torch
from tables import markdown_row, markdown_table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "gpu_h200.json"
LLAMA7B_SHAPES = "4096x4096,11008x4096,4096x11008"  # (out, in): q/k/v/o, gate/up, down
DEFAULT_DENSITIES = "0.0015,0.006,0.018"
LAYER_TARGET = 1.15  # RoSA layer fwd+bwd <= 1.15x a LoRA layer's (the target)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)})"
    )
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--shapes", default=LLAMA7B_SHAPES, help="comma-separated OUTxIN")
    p.add_argument("--densities", default=DEFAULT_DENSITIES)
    p.add_argument(
        "--support",
        choices=("uniform", "skewed"),
        default="uniform",
        help="uniform random support, or top-k of row/column-scaled scores (skewed row lengths)",
    )
    p.add_argument(
        "--adapter-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="RosaLinear's adapter dtype (RosaConfig's default: float32, which makes the layer pass its fp32 "
        "copy of a bf16 input to the sparse ops)",
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
        args.densities = "0.05,0.3" if args.densities == DEFAULT_DENSITIES else args.densities
        args.warmup, args.reps = 1, 2
    elif args.out is None:
        args.out = DEFAULT_OUT
    return args


# Set by main(): the options, the device, and the op modules (imported only once the environment is set).
ARGS: argparse.Namespace | None = None
DEVICE = torch.device("cpu")
rosa_ops = None  # rosa.sparse.ops: the custom ops RosaLinear calls


def setup(args: argparse.Namespace) -> None:
    """Environment, device and imports for a run (nothing of this happens at import time)."""
    global ARGS, DEVICE, rosa_ops
    ARGS = args
    if args.smoke_cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first used
        os.environ["ROSA_SPARSE_BACKEND"] = "triton"  # the custom ops dispatch to Triton on CPU tensors too
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run.")
    from rosa.sparse import ops, triton_ops

    if not triton_ops.HAS_TRITON:
        sys.exit("benchmarks/gpu.py needs Triton (pip install triton); nothing was run.")
    DEVICE = torch.device("cpu" if args.smoke_cpu else "cuda")
    rosa_ops = ops
    if ops.backend_for(DEVICE) is not triton_ops:
        sys.exit(f"rosa.sparse.ops does not dispatch to Triton on {DEVICE}; nothing was run.")


# --- helpers ------------------------------------------------------------------------------------------------


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, warmup: int | None = None, reps: int | None = None) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on GPU)."""
    warmup = ARGS.warmup if warmup is None else warmup
    reps = ARGS.reps if reps is None else reps
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


def random_flat_index(out_f: int, in_f: int, density: float, kind: str, seed: int) -> torch.Tensor:
    """Row-major flat indices of a random support (setup only: syncs are fine here)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    nnz = max(0, min(out_f * in_f, round(density * out_f * in_f)))
    scores = torch.rand(out_f, in_f, generator=gen, device=DEVICE)
    if kind == "skewed":  # like a Fisher top-k: some rows / columns matter much more than others
        row_scale = torch.exp(1.5 * torch.randn(out_f, 1, generator=gen, device=DEVICE))
        col_scale = torch.exp(0.5 * torch.randn(1, in_f, generator=gen, device=DEVICE))
        scores = scores * row_scale * col_scale
    return torch.topk(scores.view(-1), nnz, sorted=False).indices


def dense64(support, values: torch.Tensor) -> torch.Tensor:
    """The dense float64 ``S`` of a rosa.sparse.Support and its CSR-ordered values (reference only)."""
    s = torch.zeros(support.shape, dtype=torch.float64, device=values.device)
    s[support.row_idx(), support.col_idx.long()] = values.double()
    return s


def row_length_stats(support) -> dict:
    lengths = (support.row_offsets[1:] - support.row_offsets[:-1]).float()
    return {"mean": lengths.mean().item(), "max": lengths.max().item(), "std": lengths.std().item()}


# --- 1. correctness at small shapes -------------------------------------------------------------------------


def check_kernels() -> list[dict]:
    """The custom ops of the layer's path (Triton underneath) against dense float64, at odd small shapes."""
    from rosa.sparse import support_from_mask

    print("== correctness (rosa:: ops on Triton vs dense float64, small shapes) ==")
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
        sup = support_from_mask(mask)
        out_f, in_f = mask.shape
        rows, cols = sup.row_idx(), sup.col_idx.long()
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            values = torch.randn(sup.nnz, generator=gen, device=DEVICE)
            x = torch.randn(tokens, in_f, generator=gen, device=DEVICE).to(dtype)
            dy = torch.randn(tokens, 2 * out_f, generator=gen, device=DEVICE).to(dtype)[
                :, ::2
            ]  # non-contiguous
            w = torch.randn(out_f, in_f, generator=gen, device=DEVICE).to(dtype)
            s64 = dense64(sup, values)
            got = {
                "spmm": (
                    rosa_ops.spmm(x, values, sup.row_offsets, sup.col_idx, out_f),
                    x.double() @ s64.t(),
                ),
                "spmm_t": (
                    rosa_ops.spmm_t(dy, values, sup.t_row_offsets, sup.t_col_idx, sup.t_perm, in_f),
                    dy.double() @ s64,
                ),
                "sddmm": (
                    rosa_ops.sddmm(dy, x, sup.row_offsets, sup.col_idx),
                    (dy.double().t() @ x.double())[rows, cols],
                ),
                "fold": (rosa_ops.fold(w, values, sup.flat_index()), w.double() + s64),
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
    """Run each op of the layer's path once with CUDA's sync debug mode set to error."""
    if DEVICE.type != "cuda":
        return {"checked": False, "reason": "not on CUDA"}
    from rosa.sparse import support_from_flat_index

    sup = support_from_flat_index(random_flat_index(256, 192, 0.05, "uniform", seed=1), (256, 192))
    x = torch.randn(130, 192, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn(130, 256, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(256, 192, device=DEVICE, dtype=torch.bfloat16)
    values = torch.randn(sup.nnz, device=DEVICE)
    flat = sup.flat_index()
    calls = {
        "spmm": lambda: rosa_ops.spmm(x, values, sup.row_offsets, sup.col_idx, 256),
        "spmm_t": lambda: rosa_ops.spmm_t(dy, values, sup.t_row_offsets, sup.t_col_idx, sup.t_perm, 192),
        "sddmm": lambda: rosa_ops.sddmm(dy, x, sup.row_offsets, sup.col_idx),
        "fold": lambda: rosa_ops.fold(w, values, flat),
        "flat_index": sup.flat_index,
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


def build_rosa_layer(
    base: torch.nn.Linear, rank: int, density: float, strategy: str, flat: torch.Tensor | None = None
) -> torch.nn.Module:
    """A RosaLinear around ``base`` (adapter dtype ``--adapter-dtype``) with a support of ``density`` already
    fixed (``flat``, or a uniform random one), so the values train: the joint phase of RoSA."""
    from rosa.layer import RosaLinear
    from rosa.sparse import support_from_flat_index

    layer = RosaLinear(
        base,
        "default",
        r=rank,
        lora_alpha=16.0,
        density=density,
        adapter_dtype=getattr(torch, ARGS.adapter_dtype),
        sparse_strategy=strategy,
    ).to(base.weight.device)
    out_f, in_f = base.out_features, base.in_features
    nnz = layer.capacity["default"]
    if flat is None:
        flat = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(0))[:nnz]
    layer.set_support("default", support_from_flat_index(flat[:nnz].to(DEVICE), (out_f, in_f)))
    with torch.no_grad():
        layer.rosa_values["default"].normal_(std=1e-3)
    return layer


def bench_shape(out_f: int, in_f: int, density: float, tokens: int, kind: str) -> list[dict]:
    """Median times of what RosaLinear runs for this shape, next to the dense and cuSPARSE equivalents."""
    bf16 = torch.bfloat16
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    base = torch.nn.Linear(in_f, out_f, bias=False, device=DEVICE, dtype=bf16).requires_grad_(False)
    flat = random_flat_index(out_f, in_f, density, kind, seed=out_f * 7 + in_f + round(density * 1e5))
    layer = build_rosa_layer(base, ARGS.layer_rank, density, "spmm", flat=flat)
    sup = layer.support("default")  # the layer's own buffers
    nnz = layer.nnz("default")
    values = layer.sparse("default").active_values().detach()
    w = layer.base_weight()
    x = torch.randn(tokens, in_f, device=DEVICE, generator=gen).to(bf16)
    dy = torch.randn(tokens, out_f, device=DEVICE, generator=gen).to(bf16)
    # The sparse ops' input as the layer makes it: its fp32 LoRA-input copy when the adapter is fp32.
    lora_input = layer._lora_input(x)
    sx = lora_input if lora_input is not None else x
    sdy = dy.to(sx.dtype)  # sparse_linear's output, hence its gradient, has the dtype of its input
    sx_dtype = str(sx.dtype).replace("torch.", "")
    flat_index = sup.flat_index()  # what folded_linear saves for its backward's fold

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

    # the layer's path, with the layer's arguments (rosa:: custom ops -> Triton)
    def forward():
        with torch.no_grad():
            return layer.sparse("default").forward(sx)

    add("spmm", "layer", sx_dtype, time_ms(forward), "SparseDelta.forward (rosa::sparse_linear forward)")
    add(
        "spmm_t",
        "layer",
        sx_dtype,
        time_ms(lambda: rosa_ops.spmm_t(sdy, values, sup.t_row_offsets, sup.t_col_idx, sup.t_perm, in_f)),
        "rosa::spmm_t as sparse_linear's backward calls it",
    )
    add(
        "sddmm",
        "layer",
        sx_dtype,
        time_ms(lambda: rosa_ops.sddmm(sdy, sx, sup.row_offsets, sup.col_idx)),
        "rosa::sddmm as sparse_linear's backward calls it",
    )
    sxg = sx.detach().requires_grad_(True)
    param = layer.rosa_values["default"]

    def sparse_fwd_bwd():
        sxg.grad = None
        param.grad = None
        layer.sparse("default").forward(sxg).backward(sdy)

    add("sparse_linear_fwd_bwd", "layer", sx_dtype, time_ms(sparse_fwd_bwd), "all three ops through autograd")
    add(
        "flat_index",
        "layer",
        "int64",
        time_ms(sup.flat_index),
        "Support.flat_index(), which the layer computes every fold forward",
    )
    add("fold", "layer", "bf16", time_ms(lambda: rosa_ops.fold(w, values, flat_index)), "rosa::fold")

    def folded_fwd_bwd():
        sxg.grad = None
        param.grad = None
        layer._folded_base(sxg, "default").backward(dy)

    add("folded_linear_fwd_bwd", "layer", "bf16", time_ms(folded_fwd_bwd), "fold strategy, through autograd")

    def torch_fold():
        folded = w.clone()
        f = folded.view(-1)
        f[flat_index] = (f[flat_index].float() + values).to(f.dtype)
        return folded

    add("fold", "torch index_put", "bf16", time_ms(torch_fold))

    # PyTorch CSR (cuSPARSE on CUDA): the layer's sparse dtype where supported, else fp32 (cast outside timing)
    def csr_candidates(make):
        dtypes = dict.fromkeys([sx.dtype, torch.float32])
        return [(str(dt).replace("torch.", ""), lambda dt=dt: make(dt)) for dt in dtypes]

    def fwd(dt):
        s, xt = _csr(values.to(dt), sup.row_offsets, sup.col_idx, (out_f, in_f)), sx.to(dt).t()
        return lambda: torch.sparse.mm(s, xt)

    def bwd_x(dt):
        s_t = _csr(values.index_select(0, sup.t_perm).to(dt), sup.t_row_offsets, sup.t_col_idx, (in_f, out_f))
        dyt = sdy.to(dt).t()
        return lambda: torch.sparse.mm(s_t, dyt)

    def bwd_v(dt):
        pattern = _csr(torch.zeros(nnz, dtype=dt, device=DEVICE), sup.row_offsets, sup.col_idx, (out_f, in_f))
        dyt, xx = sdy.to(dt).t().contiguous(), sx.to(dt)
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
        {"shape": f"{out_f}x{in_f}", "density": density, "op": "row_lengths", **row_length_stats(sup)}
    )
    return rows


TABLE = [  # (op, impl, heading)
    ("dense_fwd", "cublas x@W^T", "dense"),
    ("spmm", "layer", "spmm"),
    ("spmm", "torch.sparse (cuSPARSE)", "cusp spmm"),
    ("spmm_t", "layer", "spmm_t"),
    ("spmm_t", "torch.sparse (cuSPARSE)", "cusp spmm_t"),
    ("dense_dw", "cublas dy^T@x", "dense dW"),
    ("sddmm", "layer", "sddmm"),
    ("sddmm", "torch.sparse (cuSPARSE)", "cusp sddmm"),
    ("sparse_linear_fwd_bwd", "layer", "spmm f+b"),
    ("fold", "layer", "fold"),
    ("fold", "torch index_put", "torch fold"),
    ("folded_linear_fwd_bwd", "layer", "fold f+b"),
]


def _cells(rows: list[dict]) -> dict[tuple[str, float], dict[tuple[str, str], dict]]:
    out: dict = {}
    for r in rows:
        if "impl" in r:
            out.setdefault((r["shape"], r["density"]), {})[(r["op"], r["impl"])] = r
    return out


def three_ops_over_gemm(sel: dict) -> float:
    return (
        sum(sel[(op, "layer")]["ms"] for op in ("spmm", "spmm_t", "sddmm"))
        / sel[("dense_fwd", "cublas x@W^T")]["ms"]
    )


def print_table(rows: list[dict]) -> None:
    print(
        "\n== median ms (the layer's ops with its own arguments; cuBLAS in bf16; cuSPARSE dtype in JSON) =="
    )
    print(
        "   last column: (spmm + spmm_t + sddmm as the layer runs them) / one dense bf16 GEMM of the same shape"
    )
    print(
        f"{'shape':>11s} {'dens%':>5s} {'nnz':>8s} "
        + " ".join(f"{h:>11s}" for _, _, h in TABLE)
        + f" {'3ops/gemm':>9s}"
    )
    for (shape, density), sel in sorted(_cells(rows).items()):
        nnz = next(iter(sel.values()))["nnz"]
        cells = [
            f"{sel[(op, impl)]['ms']:11.3f}" if (op, impl) in sel else f"{'-':>11s}" for op, impl, _ in TABLE
        ]
        print(
            f"{shape:>11s} {100 * density:5.2f} {nnz:8d} "
            + " ".join(cells)
            + f" {three_ops_over_gemm(sel):9.2f}"
        )


# --- 3. a whole RoSA layer fwd+bwd vs a LoRA layer of the same rank -------------------------------------------


class LoraLinear(torch.nn.Module):
    """Reference LoRA layer: frozen base + B(A(x)) * alpha / r, the adapter in ``dtype`` (x cast to it, as
    PEFT's LoRA does)."""

    def __init__(self, base: torch.nn.Linear, rank: int, dtype: torch.dtype, alpha: float = 16.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        device = base.weight.device
        self.a = torch.nn.Parameter(
            torch.randn(rank, base.in_features, device=device, dtype=dtype) / math.sqrt(base.in_features)
        )
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        self.scale = alpha / rank

    def forward(self, x):
        h = x.to(self.a.dtype)
        return self.base(x) + ((h @ self.a.t()) @ self.b.t() * self.scale).to(x.dtype)


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> float:
    grad = torch.randn_like(module(x))

    def step():
        x.grad = None
        module(x).backward(grad)

    return time_ms(step)


def bench_layer(args, shapes, densities) -> dict:
    results = []
    for out_f, in_f in shapes:
        base = torch.nn.Linear(in_f, out_f, bias=False, device=DEVICE, dtype=torch.bfloat16)
        base.requires_grad_(False)
        x = torch.randn(args.tokens, in_f, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        for density in densities:
            lora = LoraLinear(base, args.layer_rank, getattr(torch, args.adapter_dtype))
            row = {
                "shape": f"{out_f}x{in_f}",
                "density": density,
                "rank": args.layer_rank,
                "adapter_dtype": args.adapter_dtype,
                "tokens": args.tokens,
                "lora_ms": time_fwd_bwd(lora, x),
            }
            for strategy in ("spmm", "fold", "auto"):
                rosa = build_rosa_layer(base, args.layer_rank, density, strategy)
                row[f"rosa_{strategy}_ms"] = time_fwd_bwd(rosa, x)
                if strategy == "auto":
                    from rosa.sparse.strategy import choose_strategy

                    row["auto_picks"] = choose_strategy(
                        DEVICE.type, out_f, in_f, rosa.nnz("default"), args.tokens
                    )
            row["rosa_over_lora"] = row["rosa_auto_ms"] / row["lora_ms"]
            results.append(row)
            print(
                f"  layer {row['shape']} d={density:.4f} r={args.layer_rank}: RoSA spmm {row['rosa_spmm_ms']:.3f} "
                f"fold {row['rosa_fold_ms']:.3f} auto ({row['auto_picks']}) {row['rosa_auto_ms']:.3f} ms, LoRA "
                f"{row['lora_ms']:.3f} ms (auto/LoRA {row['rosa_over_lora']:.2f}x, target <= {LAYER_TARGET}x)"
            )
    return {"results": results, "target": LAYER_TARGET}


# --- the README's text (python benchmarks/report.py) --------------------------------------------------------

JSON_KEYS = {"provenance", "meta", "checks", "host_sync", "results", "skipped", "layer", "elapsed_s"}


def markdown(results: dict) -> str:
    """The README's GPU section from the JSON alone (verdicts computed here)."""
    meta = results["meta"]
    checks = results["checks"]
    failed = [c for c in checks if not c["ok"]]
    syncs = [k for k, v in results["host_sync"].items() if isinstance(v, str) and v.startswith("SYNC")]
    out = [
        f"**GPU** (`{(results.get('provenance') or {}).get('command', 'python benchmarks/gpu.py')}`, "
        f"{meta['device']}, torch {meta['torch']}, Triton {meta['triton']}, {meta['tokens']} tokens, "
        f"{meta['support']} support, adapter dtype {meta.get('adapter_dtype', 'bfloat16')}; "
        f"{meta['timing']}, {meta['reps']} timed calls after {meta['warmup']} warm-up calls; "
        "`docs/benchmarks/gpu_h200.json`). The sparse ops are timed as `RosaLinear` runs them (its buffers, its "
        "inputs, the `rosa::` custom ops).",
        "",
        provenance.describe(results, "benchmarks/gpu.py"),
        "",
        f"Correctness: {len(checks) - len(failed)} of {len(checks)} checks against float64 passed"
        + (f" (failed: {', '.join(sorted({c['op'] for c in failed}))})" if failed else "")
        + "; host synchronisation: "
        + (
            "not checked"
            if not results["host_sync"].get("checked")
            else ("none" if not syncs else "in " + ", ".join(syncs))
        )
        + ".",
        "",
        *markdown_table(
            [
                "shape, density",
                "dense GEMM ms",
                "spmm",
                "spmm_t",
                "sddmm",
                "3 ops / GEMM",
                "cuSPARSE 3 ops / GEMM",
                "fold",
                "spmm fwd+bwd",
                "fold fwd+bwd",
            ]
        ),
    ]
    for (shape, density), sel in sorted(_cells(results["results"]).items()):
        gemm = sel[("dense_fwd", "cublas x@W^T")]["ms"]

        def ms(op, impl="layer", sel=sel):
            return sel[(op, impl)]["ms"] if (op, impl) in sel else float("nan")

        cusp = sum(ms(op, "torch.sparse (cuSPARSE)") for op in ("spmm", "spmm_t", "sddmm")) / gemm
        out.append(
            markdown_row(
                [
                    f"{shape}, {100 * density:g}%",
                    f"{gemm:.3f}",
                    *(f"{ms(op):.3f}" for op in ("spmm", "spmm_t", "sddmm")),
                    f"{three_ops_over_gemm(sel):.2f}x",
                    f"{cusp:.2f}x",
                    *(f"{ms(op):.3f}" for op in ("fold", "sparse_linear_fwd_bwd", "folded_linear_fwd_bwd")),
                ]
            )
        )
    if results.get("skipped"):
        out += ["", f"Not timed (time budget): {', '.join(results['skipped'])}."]
    layer = results.get("layer") or {}
    if layer.get("results"):
        target = layer.get("target", LAYER_TARGET)
        out += [
            "",
            f"Whole layer, forward + backward, against a LoRA layer of the same rank (target <= {target:g}x):",
            "",
            *markdown_table(
                [
                    "shape, density",
                    "LoRA ms",
                    "RoSA spmm ms",
                    "RoSA fold ms",
                    "RoSA auto ms (picks)",
                    "auto / LoRA",
                ]
            ),
        ]
        for r in layer["results"]:
            ratio = r["rosa_auto_ms"] / r["lora_ms"]
            out.append(
                markdown_row(
                    [
                        f"{r['shape']}, {100 * r['density']:g}%",
                        f"{r['lora_ms']:.3f}",
                        f"{r['rosa_spmm_ms']:.3f}",
                        f"{r['rosa_fold_ms']:.3f}",
                        f"{r['rosa_auto_ms']:.3f} ({r.get('auto_picks', '?')})",
                        f"{ratio:.2f}x ({'met' if ratio <= target else '**not met**'})",
                    ]
                )
            )
    elif layer.get("skipped"):
        out += ["", f"Whole layer: skipped ({layer['skipped']})."]
    note = provenance.unknown_keys_note(results, JSON_KEYS, "python benchmarks/gpu.py")
    if note:
        out += ["", note]
    return "\n".join(out) + "\n"


# --- main ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    setup(args)
    prov = provenance.provenance(None if argv is None else [sys.argv[0], *argv])
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
        "adapter_dtype": args.adapter_dtype,
        "layer_rank": args.layer_rank,
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
        "provenance": provenance.finish(prov),
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
    sys.exit(main())
