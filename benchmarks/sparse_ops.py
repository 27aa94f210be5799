#!/usr/bin/env python
"""CPU benchmark of RoSA's sparse operations against a dense GEMM and the dense-masked approach.

For each weight shape (out x in) and density, with 512 tokens in fp32 (and, at the LLaMA-7B shapes and 0.6% / 1%,
in bf16) and a uniform random support:

- ``gemm``: one dense GEMM of that shape in the row's dtype, ``x @ W^T`` (the unit every ratio is given in); bf16
  rows also time it in fp32 (``gemm_fp32``), for scale;
- ``spmm``, ``spmm_t``, ``sddmm``: each sparse op alone, through the ``rosa::`` custom ops a training step uses
  (on CPU: rosa's own compiled kernels, or PyTorch's MKL kernels where those cannot be built; the JSON's
  ``sparse_kernels`` says which);
- ``spmm strategy``: its extra cost over the base layer's own two matmuls (forward, input gradient) is the three
  sparse ops, timed back to back (``spmm; spmm_t; sddmm``);
- ``MKL``: the same three ops on PyTorch's MKL kernels, side by side, as the MKL path runs them in a backward (one
  feature-major copy of dY shared by its transposed SpMM and its SDDMM);
- ``fold strategy``: S is added into a dense copy of the frozen weight, once in the forward and once in the
  backward, and that copy's matmuls *replace* the base's. Its extra cost is ``fold; fold; sddmm`` timed back
  to back;
- ``dense-masked``: what PEFT's SHiRA and Super-Tuning do, in the form ``x @ (W + delta * mask)^T`` with a dense
  out x in ``delta``: the forward builds the masked dense weight (``addcmul``, its matmuls replace the base's)
  and the backward computes the dense weight gradient ``dY^T X`` and masks it. Its extra cost is
  ``addcmul; (dY^T @ X) * mask`` timed back to back. (PEFT's SHiRA keeps only the nnz values as parameters
  but still clones the dense weight and gets a dense weight gradient every step, so its time is this one.)
- totals: the base's two matmuls (``x @ W^T`` and ``dY @ W``, timed together in the same rounds) plus each
  strategy's extra.

Memory: ``extra MiB`` is the peak of bytes allocated through PyTorch's CPU allocator during one forward and
backward of the approach's autograd path, above the level at entry, measured with
``torch.profiler(profile_memory=True)`` (allocation events in time order, running sum, maximum); for fold and
dense-masked, the same peak of the plain base matmul's forward and backward is subtracted (their matmuls
replace the base's). MKL's own internal scratch space is not allocated through PyTorch and is not seen.
``state MiB`` is the analytic persistent extra: trainable values with gradient and two Adam moments (16
bytes each) plus the index arrays (int32 CSR, transposed CSR and permutation) for RoSA; the dense delta
with gradient and Adam moments plus a bool mask for dense-masked.

Timing: within a row every approach (and the GEMM) is timed in ``--repeats`` interleaved rounds after a
warm-up call each, a fast op being called repeatedly within a round to cover 20 ms; each time is the median over
the rounds (the fastest round is kept too, ``seconds_min_over_rounds``), and the per-round ratios are kept in
the JSON (``round_ratios``) to show how much load from other processes moved them. torch's thread count is
left at its default (one OpenMP thread per core), which makes small ops very sensitive to anything else
running: before each row the script waits (``--wait-quiet``, up to 60 s a row and ``--wait-budget``, 300 s a
run) for other processes to leave the CPUs, and the table's ``other`` column gives the number of cores they
kept busy while the row was timed (``foreign_load_cores`` in the JSON). Rows with ``other`` well above 0 are
not clean measurements.

The cost rule of rosa.sparse.strategy is fitted to the same measurements (non-negative least squares on
absolute time, clean rows only when there are enough) and its choice, with the current and with the fitted
constants, is compared with the measured faster strategy on every row (``rule / faster``: current constants).
Agreement with constants fitted to the same run is in-sample; the out-of-sample check applies the constants
fitted on an earlier run (``--previous``, by default the JSON this run replaces) to this run's rows and
records how often they pick the measured faster strategy (``out_of_sample`` in the JSON).

The JSON records its provenance (command, git commit, date, torch / CPU, load average: benchmarks/provenance.py);
``markdown(results)`` renders it for the README (``python benchmarks/report.py``).

    python benchmarks/sparse_ops.py [--quick] [--out PATH] [--repeats N] [--wait-quiet S] [--previous PATH]

The full run writes docs/benchmarks/sparse_ops.json; ``--quick`` (fewer shapes, densities and repeats) writes
nothing unless ``--out`` is given. ``--dtypes fp32`` leaves out the bf16 rows (by default they run at the LLaMA-7B
shapes and 0.6% / 1% only, ``--bf16-repeats`` rounds each; an explicit ``--dtypes`` runs every dtype at every
shape and density).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import provenance
import torch
from tables import markdown_row, markdown_table

from rosa.sparse import ops, support_from_flat_index, torch_ops
from rosa.sparse.strategy import COST_MODELS, CostModel, cpu_kernels

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "sparse_ops.json"

SHAPES = [  # (label, out, in)
    ("SmolLM2-135M q/o", 576, 576),
    ("SmolLM2-135M gate/up", 1536, 576),
    ("LLaMA-7B q/k/v/o", 4096, 4096),
    ("LLaMA-7B gate/up", 11008, 4096),
]
DENSITIES = [0.001, 0.003, 0.006, 0.01, 0.02, 0.05]
QUICK_SHAPES = [SHAPES[0], SHAPES[2]]
QUICK_DENSITIES = [0.001, 0.01, 0.05]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# bf16 rows: the shapes and densities of issue 29's target (fp32 rows cover every shape and density: the cost rule
# is fitted on them), fewer rounds (a bf16 GEMM is the slow part of a row on a CPU without bf16 instructions).
BF16_SHAPES = [SHAPES[2], SHAPES[3]]
BF16_DENSITIES = [0.006, 0.01]
BF16_REPEATS = 3
TARGET_SHAPE, TARGET_DENSITY = (4096, 4096), 0.01
TARGET_SHAPES = [(4096, 4096), (11008, 4096)]  # the targets' rows: 1%, every dtype

MiB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two shapes, three densities, three repeats")
    p.add_argument("--out", type=Path, default=None, help=f"JSON output (full run default: {DEFAULT_OUT})")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument(
        "--repeats", type=int, default=None, help="interleaved timing rounds per row (default 7, quick 3)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the profiler memory measurements")
    p.add_argument(
        "--shapes", default=None, help="comma-separated OUTxIN to run instead of the default shapes"
    )
    p.add_argument(
        "--densities", default=None, help="comma-separated densities (fractions) instead of the default"
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each row, wait up to this many seconds for other processes to leave the CPUs (0: never)",
    )
    p.add_argument("--wait-budget", type=float, default=300.0, help="total seconds of such waiting per run")
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated dtypes, each at every shape and density (default: fp32 everywhere, bf16 at the "
        "LLaMA-7B shapes and 0.6%% / 1%%)",
    )
    p.add_argument(
        "--bf16-repeats", type=int, default=None, help=f"rounds of a bf16 row (default {BF16_REPEATS})"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    p.add_argument(
        "--previous",
        default=None,
        help="JSON of an earlier run whose fitted constants are checked out of sample on this run "
        "(default: the output file this run replaces, if it exists; 'none': no check)",
    )
    return p.parse_args(argv)


# --- measurement helpers ------------------------------------------------------------------------------


CALL_TIME_S = 0.02  # a fast op is called repeatedly within a round until this much time is covered
MAX_INNER = 200


def interleaved_times(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Per-call wall time of each function, measured in ``rounds`` rounds that each run every function once
    (a fast one ``inner`` times in a row, its time divided by ``inner``), after one warm-up call each.

    Interleaving makes a burst of load from other processes hit every approach of a row alike, so the ratios
    between them stay meaningful on a shared machine; the inner repetition keeps a sub-millisecond op from
    being measured as one scheduler tick."""
    inner = {}
    for name, fn in fns.items():
        fn()  # warm-up
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, min(MAX_INNER, int(CALL_TIME_S / max(time.perf_counter() - t0, 1e-7))))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            # At most inner[name] calls, and no more once 3 x CALL_TIME_S is spent (a call calibrated when the
            # machine was quiet can take a scheduler tick each when it is not).
            t0 = time.perf_counter()
            calls, elapsed = 0, 0.0
            while calls < inner[name] and elapsed < 3 * CALL_TIME_S:
                fn()
                calls += 1
                elapsed = time.perf_counter() - t0
            samples[name].append(elapsed / calls)
    return samples


class ForeignLoad:
    """CPU time used by *other* processes (in cores, averaged over a window), from /proc/stat and os.times():
    on a shared machine it tells which rows were timed while something else was running. With torch's default
    of one OpenMP thread per core, a single busy core elsewhere stalls every parallel region until the
    scheduler gives the waiting thread its core back, which can multiply the time of a small op by ten."""

    available = Path("/proc/stat").exists()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait, in clock ticks
        t = os.times()
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), t.user + t.system

    def __init__(self) -> None:
        self.start = self._sample() if self.available else None

    def cores(self) -> float | None:
        """Average number of cores other processes kept busy since construction."""
        if self.start is None:
            return None
        end = self._sample()
        wall = end[0] - self.start[0]
        return max(0.0, ((end[1] - self.start[1]) - (end[2] - self.start[2])) / max(wall, 1e-9))


WAIT_BUDGET = {"left_s": 300.0}  # total waiting allowed in one run (set from --wait-budget)


def wait_for_quiet(
    max_wait_s: float, threshold: float = 0.25, window_s: float = 1.0
) -> tuple[float, float | None]:
    """Wait (at most ``max_wait_s``, and within the run's WAIT_BUDGET) for a window in which other processes
    use under ``threshold`` cores. Returns (seconds waited, foreign load of the last window)."""
    max_wait_s = min(max_wait_s, WAIT_BUDGET["left_s"])
    if not ForeignLoad.available or max_wait_s <= 0:
        return 0.0, None
    t0 = time.perf_counter()
    while True:
        probe = ForeignLoad()
        time.sleep(window_s)
        load = probe.cores()
        waited = time.perf_counter() - t0
        if load < threshold or waited >= max_wait_s:
            WAIT_BUDGET["left_s"] -= waited
            return waited, load


def peak_extra_bytes(fn) -> int:
    """Peak bytes allocated through PyTorch's CPU allocator while ``fn`` runs, above the level at entry."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:  # CPU-only run: every allocation event is the CPU allocator's
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def random_support(out_features: int, in_features: int, nnz: int, gen: torch.Generator):
    """A uniform random support of exactly ``nnz`` entries, without an out*in permutation."""
    total = out_features * in_features
    flat = torch.empty(0, dtype=torch.long)
    while flat.numel() < nnz:
        draw = torch.randint(0, total, (int((nnz - flat.numel()) * 1.1) + 16,), generator=gen)
        flat = torch.unique(torch.cat([flat, draw]))
    flat = flat[torch.randperm(flat.numel(), generator=gen)[:nnz]]
    return support_from_flat_index(flat, (out_features, in_features))


def rosa_state_bytes(out_features: int, in_features: int, nnz: int) -> int:
    # values + grad + Adam m, v (fp32) | col_idx, t_col_idx, t_perm (int32) | row offsets (int32)
    return 16 * nnz + 12 * nnz + 4 * (out_features + 1 + in_features + 1)


def masked_state_bytes(out_features: int, in_features: int) -> int:
    return 16 * out_features * in_features + out_features * in_features  # delta + grad + Adam, bool mask


# --- one shape ----------------------------------------------------------------------------------------


def _mkl_extra(x, dy, s, values, out_features, in_features):
    """The three ops through PyTorch's MKL kernels as the MKL path runs them in a training step: the backward
    transposes dy once, feature-major, for both the transposed SpMM and the SDDMM."""
    torch_ops.spmm(x, values, s.row_offsets, s.col_idx, out_features)
    dy_t = torch_ops.feature_major(dy, torch_ops.acc_dtype(dy.dtype)).t()
    torch_ops.spmm_t(dy_t, values, s.t_row_offsets, s.t_col_idx, s.t_perm, in_features)
    torch_ops.sddmm(dy_t, x, s.row_offsets, s.col_idx)


def bench_shape(
    label, out_features, in_features, densities, tokens, repeats, memory, gen, wait_quiet_s, dtype="fp32"
) -> list[dict]:
    """Rows of one shape in one dtype. A bf16 row times the GEMM in bf16 (and, for scale, in fp32), the sparse
    ops with bf16 operands on both kernel sets, and fold; it leaves out the base's two matmuls, the dense-masked
    approach and the memory probes (bf16 GEMMs are the slow part of a row, and those numbers do not change)."""
    torch_dtype = DTYPES[dtype]
    full = dtype == "fp32"
    x = torch.randn(tokens, in_features, generator=gen).to(torch_dtype)
    dy = torch.randn(tokens, out_features, generator=gen).to(torch_dtype)
    weight = (torch.randn(out_features, in_features, generator=gen) / in_features**0.5).to(torch_dtype)
    x32, weight32 = x.float(), weight.float()

    # Dense-masked: the mask's density does not change the dense work (timed in every row all the same, next to
    # the sparse ops, so that the ratios compare like with like).
    delta = torch.zeros(out_features, in_features)
    mask = torch.rand(out_features, in_features, generator=gen) < 0.01
    mask_f = mask.float()

    def masked_extra():
        w_eff = torch.addcmul(weight, delta, mask_f)
        grad_delta = (dy.t() @ x) * mask_f
        return w_eff, grad_delta

    mem_base = mem_masked = None
    if memory and full:

        def base_fwd_bwd():
            xg = x.detach().requires_grad_(True)
            (xg @ weight.t()).backward(dy)

        def masked_fwd_bwd():
            xg = x.detach().requires_grad_(True)
            d = delta.detach().requires_grad_(True)
            (xg @ torch.addcmul(weight, d, mask_f).t()).backward(dy)

        mem_base = peak_extra_bytes(base_fwd_bwd)
        mem_masked = peak_extra_bytes(masked_fwd_bwd) - mem_base

    rows = []
    for density in densities:
        nnz = round(density * out_features * in_features)
        s = random_support(out_features, in_features, nnz, gen)
        flat = s.flat_index()
        values = torch.randn(nnz, generator=gen) * 0.01

        def run_spmm(s=s, values=values):
            return ops.spmm(x, values, s.row_offsets, s.col_idx, out_features)

        def run_spmm_t(s=s, values=values):
            return ops.spmm_t(dy, values, s.t_row_offsets, s.t_col_idx, s.t_perm, in_features)

        def run_sddmm(s=s):
            return ops.sddmm(dy, x, s.row_offsets, s.col_idx)

        def run_fold(values=values, flat=flat):
            return ops.fold(weight, values, flat)

        calls = {
            "gemm": lambda: x @ weight.t(),
            "spmm": run_spmm,
            "spmm_t": run_spmm_t,
            "sddmm": run_sddmm,
            "fold": run_fold,
            "spmm_strategy_extra": lambda: (run_spmm(), run_spmm_t(), run_sddmm()),
            "fold_strategy_extra": lambda: (run_fold(), run_fold(), run_sddmm()),
            "mkl_strategy_extra": lambda s=s, values=values: _mkl_extra(
                x, dy, s, values, out_features, in_features
            ),
        }
        if full:
            # The base layer's two matmuls (forward, input gradient), for the totals.
            calls["base_two_matmuls"] = lambda: (x @ weight.t(), dy @ weight)
            calls["dense_masked_extra"] = masked_extra
        else:
            calls["gemm_fp32"] = lambda: x32 @ weight32.t()
        waited, _ = wait_for_quiet(wait_quiet_s)
        foreign = ForeignLoad()
        samples = interleaved_times(calls, repeats)
        foreign_cores = foreign.cores()
        t = {name: statistics.median(v) for name, v in samples.items()}
        t_min = {name: min(v) for name, v in samples.items()}
        # Per-round ratios: their spread shows how much the machine's load moved the ratios.
        round_ratios = {
            "spmm_strategy_extra_over_gemm": [
                a / b for a, b in zip(samples["spmm_strategy_extra"], samples["gemm"])
            ],
            "mkl_strategy_extra_over_gemm": [
                a / b for a, b in zip(samples["mkl_strategy_extra"], samples["gemm"])
            ],
            "fold_strategy_extra_over_spmm_strategy_extra": [
                a / b for a, b in zip(samples["fold_strategy_extra"], samples["spmm_strategy_extra"])
            ],
        }
        mem = {}
        if full:
            round_ratios["dense_masked_extra_over_spmm_strategy_extra"] = [
                a / b for a, b in zip(samples["dense_masked_extra"], samples["spmm_strategy_extra"])
            ]
            t_base = t["base_two_matmuls"]
            t["spmm_strategy_total"] = t_base + t["spmm_strategy_extra"]
            t["fold_strategy_total"] = t_base + t["fold_strategy_extra"]
            t["dense_masked_total"] = t_base + t["dense_masked_extra"]
            if memory:

                def spmm_fwd_bwd(s=s, values=values):
                    xg = x.detach().requires_grad_(True)
                    v = values.detach().requires_grad_(True)
                    ops.sparse_linear(
                        xg, v, s.row_offsets, s.col_idx, s.t_row_offsets, s.t_col_idx, s.t_perm
                    ).backward(dy)

                def fold_fwd_bwd(s=s, values=values, flat=flat):
                    xg = x.detach().requires_grad_(True)
                    v = values.detach().requires_grad_(True)
                    ops.folded_linear(xg, weight, v, flat, s.row_offsets, s.col_idx).backward(dy)

                mem = {
                    "spmm_strategy_peak_extra": peak_extra_bytes(spmm_fwd_bwd),
                    "fold_strategy_peak_extra": peak_extra_bytes(fold_fwd_bwd) - mem_base,
                    "dense_masked_peak_extra": mem_masked,
                    "base_fwd_bwd_peak": mem_base,
                }
            mem["dense_masked_state"] = masked_state_bytes(out_features, in_features)
        mem["rosa_state"] = rosa_state_bytes(out_features, in_features, nnz)

        rows.append(
            {
                "label": label,
                "out": out_features,
                "in": in_features,
                "tokens": tokens,
                "dtype": dtype,
                "density": density,
                "nnz": nnz,
                "rounds": repeats,
                "seconds": t,
                "seconds_min_over_rounds": t_min,
                "round_ratios": round_ratios,
                "foreign_load_cores": foreign_cores,
                "waited_for_quiet_s": waited,
                "bytes": mem,
            }
        )
        print(_format_row(rows[-1]), flush=True)
    return rows


# --- the cost rule ---------------------------------------------------------------------------------------


THREE_OPS_OVER_GEMM = (
    0.35  # issue 29: the three sparse ops at 1% cost at most 0.35 of one dense GEMM, fp32 and bf16
)
CLEAN_LOAD = 0.25  # rows timed while other processes kept fewer cores than this busy count as clean


def fit_cost_model(rows: list[dict]) -> tuple[CostModel, int]:
    """Fit the rates of rosa.sparse.strategy.CostModel by non-negative least squares on absolute time (so the
    big layers, where a wrong choice costs the most, weigh the most), on the fp32 rows (a layer runs its sparse
    ops on fp32 inputs whatever its dtype), the clean ones when there are at least four. Returns the model and
    the number of rows it was fitted on.

    spmm + spmm_t = 2 * (nnz * tokens / sparse_rate + tokens * (in + out) / stream_rate)
    fold          = out * in / fold_rate
    """
    rows = [r for r in rows if r.get("dtype", "fp32") == "fp32"]  # the dtype the layer's sparse ops run in
    clean = [r for r in rows if is_clean(r)]
    if len(clean) >= 4:
        rows = clean
    a = np.array(
        [[2 * r["nnz"] * r["tokens"], 2 * r["tokens"] * (r["in"] + r["out"])] for r in rows], dtype=float
    )
    y = np.array([r["seconds"]["spmm"] + r["seconds"]["spmm_t"] for r in rows], dtype=float)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    if coef[0] <= 0 or coef[1] <= 0:  # two unknowns: the non-negative optimum then uses one term alone
        keep = 0 if coef[0] > 0 else 1
        c, *_ = np.linalg.lstsq(a[:, [keep]], y, rcond=None)
        coef = np.array([c[0], 1e-30] if keep == 0 else [1e-30, c[0]])
    n = np.array([r["out"] * r["in"] for r in rows], dtype=float)
    tf = np.array([r["seconds"]["fold"] for r in rows], dtype=float)
    c_fold = float(np.dot(n, tf) / np.dot(n, n))
    model = CostModel(
        sparse_rate=float(1 / coef[0]), stream_rate=float(1 / coef[1]), fold_rate=float(1 / c_fold)
    )
    return model, len(rows)


def compute_targets(rows: list[dict]) -> dict:
    """Issue 29's target (three sparse ops <= 0.35 of one dense GEMM at 1%, every dtype) on the TARGET_SHAPES
    rows, with the same ratio on MKL's kernels beside it; and the dense-masked approach against the three ops at
    TARGET_SHAPE (fp32)."""
    out: dict = {"three_sparse_ops_over_gemm_target": THREE_OPS_OVER_GEMM, "rows": []}
    for r in rows:
        if (r["out"], r["in"]) not in TARGET_SHAPES or r["density"] != TARGET_DENSITY:
            continue
        t, m, rr = (
            r["seconds"],
            r["seconds_min_over_rounds"],
            r["round_ratios"]["spmm_strategy_extra_over_gemm"],
        )
        ratio = t["spmm_strategy_extra"] / t["gemm"]
        out["rows"].append(
            {
                "shape": _shape(r),
                "density": r["density"],
                "dtype": r.get("dtype", "fp32"),
                "three_sparse_ops_over_gemm": ratio,
                "met": ratio <= THREE_OPS_OVER_GEMM,
                "per_round_range": [min(rr), max(rr)],
                "from_min_over_rounds": m["spmm_strategy_extra"] / m["gemm"],
                "mkl_three_sparse_ops_over_gemm": t["mkl_strategy_extra"] / t["gemm"]
                if "mkl_strategy_extra" in t
                else None,
                "speedup_over_mkl": t["mkl_strategy_extra"] / t["spmm_strategy_extra"]
                if "mkl_strategy_extra" in t
                else None,
            }
        )
    main = [
        r
        for r in rows
        if (r["out"], r["in"]) == TARGET_SHAPE
        and r["density"] == TARGET_DENSITY
        and "dense_masked_extra" in r["seconds"]
    ]
    if main:
        t = main[0]["seconds"]
        ratio = t["dense_masked_extra"] / t["spmm_strategy_extra"]
        out.update(
            dense_masked_over_three_sparse_ops=ratio,
            dense_masked_over_three_sparse_ops_target=4.0,
            dense_masked_over_three_sparse_ops_met=ratio >= 4.0,
        )
    return out


def rule_pick(model: CostModel, r: dict) -> str:
    spmm = model.spmm_cost(r["out"], r["in"], r["nnz"], r["tokens"])
    return "fold" if model.fold_cost(r["out"], r["in"]) < spmm else "spmm"


def faster(r: dict) -> str:
    s = r["seconds"]
    return "fold" if s["fold_strategy_extra"] < s["spmm_strategy_extra"] else "spmm"


def is_clean(r: dict) -> bool:
    return (r.get("foreign_load_cores") or 0.0) < CLEAN_LOAD


def out_of_sample(earlier: dict, rows: list[dict], earlier_path: str | None = None) -> dict:
    """How often the constants fitted on an earlier run (``earlier``: that run's JSON) pick the measured faster
    strategy on this run's ``rows``: the cost rule's out-of-sample agreement (the fit on a run agrees with that
    same run by construction, so it validates nothing)."""
    fitted = (earlier.get("cost_rule") or {}).get("fitted")
    p = earlier.get("provenance") or {}
    source = {
        "path": earlier_path,
        "date": p.get("date") or (earlier.get("machine") or {}).get("date"),
        "command": p.get("command") or earlier.get("command"),
        "git_commit": p.get("git_commit"),
    }
    if not fitted:
        return {"earlier_run": source, "error": "the earlier run records no fitted constants"}
    model = CostModel(**{k: float(fitted[k]) for k in ("sparse_rate", "stream_rate", "fold_rate")})
    picks = [rule_pick(model, r) for r in rows]
    agree = [pick == faster(r) for pick, r in zip(picks, rows)]
    clean = [is_clean(r) for r in rows]
    return {
        "earlier_run": source,
        "constants": dataclasses.asdict(model),
        "rows": len(rows),
        "rows_agreeing": sum(agree),
        "clean_rows": sum(clean),
        "clean_rows_agreeing": sum(a and c for a, c in zip(agree, clean)),
        "disagreements": [
            {
                "label": r["label"],
                "out": r["out"],
                "in": r["in"],
                "density": r["density"],
                "faster": faster(r),
                "rule": pick,
            }
            for pick, r, a in zip(picks, rows, agree)
            if not a
        ],
    }


# --- output ----------------------------------------------------------------------------------------------

HEADER = (
    f"{'shape (out x in)':>24} {'dtype':>5} {'dens%':>5} {'gemm ms':>8} | {'spmm':>6} {'spmm_t':>6} {'sddmm':>6} "
    f"{'3 ops':>6} {'x gemm':>6} | {'MKL 3':>6} {'x gemm':>6} | {'fold':>6} {'2f+sdd':>6} {'x gemm':>6} | "
    f"{'masked':>7} {'x 3ops':>6} | {'MiB spmm':>8} {'fold':>6} {'masked':>7} | {'other':>5} | rule / faster"
)


def _format_row(r: dict, pick: str | None = None) -> str:
    s, b = r["seconds"], r["bytes"]

    def ms(key):
        return f"{1e3 * s[key]:.1f}" if key in s else "-"

    def over(key, unit="gemm"):
        return f"{s[key] / s[unit]:.2f}" if key in s and unit in s else "-"

    def mib(key):
        return f"{b[key] / MiB:.1f}" if b.get(key) is not None else "-"

    pick = pick or "?"
    load = r.get("foreign_load_cores")
    other = "-" if load is None else f"{load:.2f}"
    return (
        f"{r['label'] + ' ' + str(r['out']) + 'x' + str(r['in']):>24} {r.get('dtype', 'fp32'):>5} "
        f"{100 * r['density']:>5.1f} {ms('gemm'):>8} | {ms('spmm'):>6} {ms('spmm_t'):>6} {ms('sddmm'):>6} "
        f"{ms('spmm_strategy_extra'):>6} {over('spmm_strategy_extra'):>6} | {ms('mkl_strategy_extra'):>6} "
        f"{over('mkl_strategy_extra'):>6} | {ms('fold'):>6} {ms('fold_strategy_extra'):>6} "
        f"{over('fold_strategy_extra'):>6} | {ms('dense_masked_extra'):>7} "
        f"{over('dense_masked_extra', 'spmm_strategy_extra'):>6} | {mib('spmm_strategy_peak_extra'):>8} "
        f"{mib('fold_strategy_peak_extra'):>6} {mib('dense_masked_peak_extra'):>7} | {other:>5} | "
        f"{pick} / {faster(r)}"
    )


def machine_info() -> dict:
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "mkl": torch.backends.mkl.is_available(),
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# --- the README's text (python benchmarks/report.py) ----------------------------------------------------

README_DENSITIES = (0.006, 0.01)  # the table's rows; the text around it covers every row
JSON_KEYS = {
    "benchmark",
    "command",
    "provenance",
    "machine",
    "settings",
    "definitions",
    "targets",
    "cost_rule",
    "out_of_sample",
    "rows",
}


def _pct(density: float) -> str:
    return f"{100 * density:g}%"


def _range(values: list[float], digits: int = 2) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def _shape(r: dict) -> str:
    return f"{r['out']}x{r['in']}"


def _faster_by_shape(rows: list[dict]) -> str:
    parts = []
    groups = list(dict.fromkeys((r["label"], r["out"], r["in"], r.get("dtype", "fp32")) for r in rows))
    for label, out_f, in_f, dtype in groups:
        mine = [
            r
            for r in rows
            if (r["label"], r["out"], r["in"], r.get("dtype", "fp32")) == (label, out_f, in_f, dtype)
        ]
        fold = [_pct(r["density"]) for r in mine if faster(r) == "fold"]
        spmm = [_pct(r["density"]) for r in mine if faster(r) == "spmm"]
        if not spmm:
            what = "fold at every density"
        elif not fold:
            what = "spmm at every density"
        else:
            what = f"spmm at {', '.join(spmm)}, fold at {', '.join(fold)}"
        parts.append(f"{out_f}x{in_f} ({label}{'' if dtype == 'fp32' else ', ' + dtype}): {what}")
    return "; ".join(parts)


def _rows_named(rows: list[dict]) -> str:
    return ", ".join(f"{_shape(r)} at {_pct(r['density'])} ({r['faster']} faster)" for r in rows)


def _cell(t: dict, rr: dict, key: str, unit: str) -> str:
    """'0.12x (0.11-0.13)': the ratio of the medians and the range of the per-round ratios, or '-'."""
    if key not in t or unit not in t:
        return "-"
    ratios = rr.get(f"{key}_over_{unit}")
    return f"{t[key] / t[unit]:.2f}x" + (f" ({_range(ratios)})" if ratios else "")


KERNELS = {
    "cpu": "rosa's own compiled CPU kernels (`rosa.sparse.cpu_ops`), with PyTorch's MKL CSR routines (the "
    "fallback) timed beside them",
    "cpu-mkl": "PyTorch's MKL CSR routines",
}


def _bf16_gemm_sentence(speed: list[float], cpu_bf16: list[str] | None) -> str:
    """How a bf16 GEMM compares with fp32's on the machine that ran: the yardstick of every bf16 ratio."""
    cause = (
        ""
        if cpu_bf16 is None
        else f" (the CPU has {', '.join(cpu_bf16)})"
        if cpu_bf16
        else " (no bf16 instructions in the CPU)"
    )
    text = f"On this machine a bf16 GEMM takes {_range(speed)}x the time of the same GEMM in fp32{cause}"
    return text + (", which makes the bf16 ratios small." if min(speed) > 1 else ".")


def markdown(results: dict) -> str:
    """The README's sparse-operations section, from the JSON alone: every number and every claim (targets met,
    which strategy is faster, how often the cost rule agrees) is computed here."""
    settings, rows = results["settings"], results["rows"]
    rounds = settings["rounds"]
    dtypes = settings.get("dtypes", ["fp32"])
    shown = [r for r in rows if r["density"] in README_DENSITIES] or rows
    rounds_text = f"{rounds} interleaved rounds" + (
        f" ({settings['bf16_rounds']} for bf16 rows)"
        if "bf16" in dtypes and "bf16_rounds" in settings
        else ""
    )
    out = [
        f"**Sparse operations** (`{results['command']}`, {' and '.join(dtypes)}, {settings['tokens']} tokens, "
        f"{settings['support']} random support; `docs/benchmarks/sparse_ops.json`). Extra time of the three "
        "sparse ops (SpMM + transposed SpMM + SDDMM: the spmm strategy) against one dense GEMM of the same "
        "shape and dtype, on the kernels the ops run on and on PyTorch's MKL kernels; of the dense-masked "
        "approach of PEFT's SHiRA / Super-Tuning (a dense delta and a dense weight gradient) and of the fold "
        "strategy (S added into a transient dense copy of the weight) against the three ops. Every time is the "
        f"median over {rounds_text}, every ratio is the ratio of those medians, and the brackets give the range "
        "of the per-round ratios; peak extra MiB is the allocator's peak above the base layer's own (spmm / fold "
        "/ dense-masked). bf16 rows leave out the dense-masked approach and the memory probes.",
        "",
        provenance.describe(results, "benchmarks/sparse_ops.py"),
        "",
        *markdown_table(
            [
                "shape (out x in), dtype, density",
                "3 sparse ops / GEMM",
                "on MKL's kernels / GEMM",
                "dense-masked / 3 sparse ops",
                "fold / 3 sparse ops",
                "measured faster",
                "peak extra MiB (spmm / fold / dense-masked)",
            ]
        ),
    ]
    for r in shown:
        t, rr, b = r["seconds"], r["round_ratios"], r["bytes"]

        def mib(key, b=b):
            return f"{b[key] / MiB:.1f}" if b.get(key) is not None else "-"

        out.append(
            markdown_row(
                [
                    f"{r['label']} {_shape(r)}, {r.get('dtype', 'fp32')}, {_pct(r['density'])}",
                    _cell(t, rr, "spmm_strategy_extra", "gemm"),
                    _cell(t, rr, "mkl_strategy_extra", "gemm"),
                    _cell(t, rr, "dense_masked_extra", "spmm_strategy_extra"),
                    _cell(t, rr, "fold_strategy_extra", "spmm_strategy_extra"),
                    faster(r),
                    f"{mib('spmm_strategy_peak_extra')} / {mib('fold_strategy_peak_extra')} / "
                    f"{mib('dense_masked_peak_extra')}",
                ]
            )
        )
    out.append("")

    para = []
    targets = compute_targets(rows)
    goal = targets["three_sparse_ops_over_gemm_target"]
    verdicts = [
        f"{t['shape']} {t['dtype']} **{t['three_sparse_ops_over_gemm']:.2f}x, {'met' if t['met'] else 'not met'}**"
        + (
            f" (MKL's kernels: {t['mkl_three_sparse_ops_over_gemm']:.2f}x, {t['speedup_over_mkl']:.1f}x slower)"
            if t["mkl_three_sparse_ops_over_gemm"] is not None
            else ""
        )
        for t in targets["rows"]
    ]
    if verdicts:
        para.append(
            f"Target at {_pct(TARGET_DENSITY)}: three sparse ops <= {goal:g}x one dense GEMM of the same dtype: "
            + "; ".join(verdicts)
            + "."
        )
    if "dense_masked_over_three_sparse_ops" in targets:
        v2, goal2 = (
            targets["dense_masked_over_three_sparse_ops"],
            targets["dense_masked_over_three_sparse_ops_target"],
        )
        para.append(
            f"Dense-masked >= {goal2:g}x the three sparse ops at {TARGET_SHAPE[0]}x{TARGET_SHAPE[1]}, fp32: "
            f"**{v2:.2f}x, {'met' if v2 >= goal2 else 'not met'}**."
        )
    gemm32 = [r for r in rows if r.get("dtype") == "bf16" and "gemm_fp32" in r["seconds"]]
    if gemm32:
        speed = [r["seconds"]["gemm"] / r["seconds"]["gemm_fp32"] for r in gemm32]
        para.append(_bf16_gemm_sentence(speed, (results.get("provenance") or {}).get("cpu_bf16")))
    loads = [r["foreign_load_cores"] for r in rows if r.get("foreign_load_cores") is not None]
    if loads:
        para.append(
            f"Other processes kept at most {max(loads):.2f} cores busy while a row was timed "
            f"({sum(is_clean(r) for r in rows)} of {len(rows)} rows under {CLEAN_LOAD:g}: clean)."
        )
    para.append(
        f"The sparse kernels timed are {KERNELS[settings.get('sparse_kernels', 'cpu-mkl')]}. Measured faster "
        f"strategy over all {len(rows)} rows (densities "
        f"{', '.join(_pct(d) for d in dict.fromkeys(r['density'] for r in rows))}): {_faster_by_shape(rows)}."
    )
    out += [" ".join(para), ""]

    rule = results.get("cost_rule") or {}
    if rule:
        n = len(rows)
        wrong = [r for r in rows if r["rule_current"] != r["faster"]]
        current = rule["current"]
        sentence = (
            "The cost rule (`rosa.sparse.strategy`) with the constants in force during this run (sparse "
            f"{current['sparse_rate']:.3g}, stream {current['stream_rate']:.3g}, fold "
            f"{current['fold_rate']:.3g} per second) picks the measured faster strategy on "
            f"{n - len(wrong)} of {n} rows"
        )
        sentence += f" (wrong on {_rows_named(wrong)})." if wrong else "."
        fitted_ok = sum(r["rule_fitted"] == r["faster"] for r in rows)
        sentence += (
            f" Constants refitted to this same run agree on {fitted_ok} of {n} rows: an in-sample fit, which "
            "validates nothing."
        )
        oos = results.get("out_of_sample")
        if oos and "error" not in oos:
            src = oos["earlier_run"]
            sentence += (
                f" **Out of sample**, the constants fitted on an earlier run ({src.get('date')}, "
                f"`{src.get('command')}`) pick the measured faster strategy on {oos['rows_agreeing']} of "
                f"{oos['rows']} rows of this run ({oos['clean_rows_agreeing']} of {oos['clean_rows']} clean rows)"
            )
            if oos["disagreements"]:
                sentence += "; wrong on " + _rows_named(oos["disagreements"])
            sentence += "."
        else:
            why = f" ({oos['error']})" if oos else ""
            sentence += (
                f" **Out of sample: not measured yet**{why}: that takes a second run, which checks the "
                "constants fitted on the JSON it replaces against its own measurements "
                "(`python benchmarks/sparse_ops.py`, `--previous PATH` to name another earlier run)."
            )
        out.append(sentence)
    note = provenance.unknown_keys_note(results, JSON_KEYS, "python benchmarks/sparse_ops.py")
    if note:
        out += ["", note]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [("custom", *map(int, spec.split("x"))) for spec in args.shapes.split(",")]
    densities = QUICK_DENSITIES if args.quick else DENSITIES
    if args.densities:
        densities = [float(d) for d in args.densities.split(",")]
    repeats = args.repeats or (3 if args.quick else 7)
    out_path = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    gen = torch.Generator().manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    WAIT_BUDGET["left_s"] = args.wait_budget
    prov = provenance.provenance(None if argv is None else [sys.argv[0], *argv])
    # The earlier run is read now, before this run's JSON replaces it.
    previous_path = args.previous if args.previous is not None else out_path
    earlier = None
    if previous_path is not None and str(previous_path).lower() != "none" and Path(previous_path).is_file():
        earlier = json.loads(Path(previous_path).read_text())
    info = machine_info()
    kernels = cpu_kernels()
    info["sparse_kernels"] = kernels
    bf16_repeats = args.bf16_repeats or min(repeats, BF16_REPEATS)
    print(
        f"rosa sparse-op benchmark: {info['cpu_model']}, {info['cpu_count']} CPUs, {info['torch_threads']} torch "
        f"threads, torch {info['torch']}, load average {info['load_average_start']}, {args.tokens} tokens, "
        f"median of {repeats} interleaved rounds ({bf16_repeats} for bf16 rows); sparse kernels: {kernels}"
    )
    print(
        "times in ms; 'x gemm' = multiple of one dense GEMM of the shape and dtype; 'MKL 3' = the three ops on "
        "PyTorch's MKL kernels; 'x 3ops' = dense-masked / spmm strategy; 'other' = cores that other processes "
        "kept busy while the row was timed"
    )
    print(HEADER)
    t0 = time.perf_counter()
    rows = []
    dtypes = (args.dtypes or "fp32,bf16").split(",")
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {dtype!r} (fp32, bf16)")
        dtype_shapes, dtype_densities, dtype_repeats = shapes, densities, repeats
        if dtype != "fp32":
            dtype_repeats = bf16_repeats
            if args.dtypes is None:  # by default, bf16 rows at the targets' shapes only
                dtype_shapes = [sh for sh in shapes if (sh[1], sh[2]) in {(o, i) for _, o, i in BF16_SHAPES}]
                dtype_densities = [d for d in densities if d in BF16_DENSITIES] or densities
        for label, out_features, in_features in dtype_shapes:
            rows += bench_shape(
                label,
                out_features,
                in_features,
                dtype_densities,
                args.tokens,
                dtype_repeats,
                not args.no_memory,
                gen,
                args.wait_quiet,
                dtype,
            )
    elapsed = time.perf_counter() - t0

    fitted, fitted_on = fit_cost_model(rows)
    current = COST_MODELS[kernels]
    for r in rows:
        r["faster"] = faster(r)
        r["rule_current"] = rule_pick(current, r)
        r["rule_fitted"] = rule_pick(fitted, r)

    print("\nwith the rule's choice (current constants of rosa.sparse.strategy):")
    print(HEADER)
    for r in rows:
        print(_format_row(r, r["rule_current"]))
    n = len(rows)
    agree_current = sum(r["rule_current"] == r["faster"] for r in rows)
    agree_fitted = sum(r["rule_fitted"] == r["faster"] for r in rows)
    clean = [r for r in rows if is_clean(r)]
    clean_current = sum(r["rule_current"] == r["faster"] for r in clean)
    clean_fitted = sum(r["rule_fitted"] == r["faster"] for r in clean)
    print(
        f"\ncost rule, current constants {current}: picks the measured faster strategy on {agree_current}/{n} "
        f"rows ({clean_current}/{len(clean)} clean rows)"
    )
    print(
        f"cost rule, fitted constants  {fitted} (fitted on {fitted_on} rows): picks the measured faster "
        f"strategy on {agree_fitted}/{n} rows ({clean_fitted}/{len(clean)} clean rows; in sample)"
    )
    oos = None
    if earlier is not None:
        oos = out_of_sample(earlier, rows, str(previous_path))
        if "error" in oos:
            print(f"out of sample: {oos['error']} ({previous_path})")
        else:
            print(
                f"cost rule, constants fitted on the earlier run {previous_path}: picks the measured faster "
                f"strategy on {oos['rows_agreeing']}/{n} rows of this run ({oos['clean_rows_agreeing']}/"
                f"{oos['clean_rows']} clean rows; out of sample)"
            )

    targets = compute_targets(rows)
    for t in targets.get("rows", []):
        print(
            f"\ntarget ({t['shape']}, {_pct(t['density'])}, {t['dtype']}): three sparse ops = "
            f"{t['three_sparse_ops_over_gemm']:.3f} x one dense GEMM (target <= {THREE_OPS_OVER_GEMM:g}): "
            f"{'MET' if t['met'] else 'NOT MET'} [per-round {t['per_round_range'][0]:.3f} .. "
            f"{t['per_round_range'][1]:.3f}]; on MKL's kernels {t['mkl_three_sparse_ops_over_gemm']:.3f} x",
            end="",
        )
    if "dense_masked_over_three_sparse_ops" in targets:
        print(
            f"\ndense-masked extra = {targets['dense_masked_over_three_sparse_ops']:.1f} x the three sparse ops "
            f"(target >= 4): {'MET' if targets['dense_masked_over_three_sparse_ops_met'] else 'NOT MET'}"
        )
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["elapsed_s"] = elapsed
    info["waited_for_quiet_s"] = args.wait_budget - WAIT_BUDGET["left_s"]
    print(
        f"\nelapsed {elapsed:.0f} s; load average at start {info['load_average_start']}, end {info['load_average_end']}"
    )

    if out_path is not None:
        result = {
            "benchmark": "benchmarks/sparse_ops.py",
            "command": " ".join(
                ["python", "benchmarks/sparse_ops.py", *(argv if argv is not None else sys.argv[1:])]
            ),
            "provenance": provenance.finish(prov),
            "machine": info,
            "settings": {
                "call_time_s": CALL_TIME_S,
                "max_inner": MAX_INNER,
                "tokens": args.tokens,
                "dtype": "float32",
                "dtypes": dtypes,
                "rounds": repeats,
                "bf16_rounds": bf16_repeats,
                "warmup": 1,
                "support": "uniform",
                "sparse_kernels": kernels,
            },
            "definitions": __doc__,
            "targets": targets,
            "cost_rule": {
                "current": dataclasses.asdict(current),
                "fitted": {
                    "sparse_rate": fitted.sparse_rate,
                    "stream_rate": fitted.stream_rate,
                    "fold_rate": fitted.fold_rate,
                },
                "fitted_on_rows": fitted_on,
                "rows_agreeing_current": agree_current,
                "rows_agreeing_fitted": agree_fitted,
                "rows": n,
                "clean_rows": len(clean),
                "clean_rows_agreeing_current": clean_current,
                "clean_rows_agreeing_fitted": clean_fitted,
            },
            "out_of_sample": oos,
            "rows": rows,
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
