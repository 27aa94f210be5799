"""What the benchmark scripts record about their runs and how their markdown functions turn it into claims:
provenance, the cost rule's out-of-sample agreement, target verdicts computed from the values, hand-edited
keys, and the GPU benchmark timing the layer's own op path."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = ROOT / "docs" / "benchmarks"


@pytest.fixture(scope="module")
def provenance():
    return load_benchmark("provenance")


@pytest.fixture(scope="module")
def sparse_ops():
    return load_benchmark("sparse_ops")


# --- provenance ---------------------------------------------------------------------------------------------


def test_provenance_records_command_commit_date_machine_andload_benchmark(provenance):
    p = provenance.finish(provenance.provenance([str(BENCHMARKS / "masks.py"), "--rounds", "1"]))
    assert p["command"] == "python benchmarks/masks.py --rounds 1"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", p["git_commit"]) and p["git_commit"].startswith(head)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", p["date"])
    for key in ("python", "platform", "torch", "torch_threads", "cpu_model", "cpu_count", "gpus"):
        assert key in p
    assert len(p["load_average_start"]) == 3 and len(p["load_average_end"]) == 3
    line = provenance.describe({"provenance": p}, "benchmarks/masks.py")
    assert p["git_commit"] in line and p["date"] in line and "load average" in line


def test_provenance_says_whether_the_cpu_computes_in_bf16(provenance):
    info = "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse avx512f {} avx2\n\n"
    assert provenance.cpu_bf16(info.format("avx512_bf16 amx_bf16")) == ["avx512_bf16", "amx_bf16"]
    assert provenance.cpu_bf16(info.format("avx512bw")) == []
    assert provenance.cpu_bf16("processor\t: 0\n") is None  # no flags line: unknown, not "none"
    base = {"cpu_model": "AMD EPYC", "cpu_count": 2, "command": "python benchmarks/x.py"}
    with_bf16 = provenance.describe({"provenance": {**base, "cpu_bf16": ["avx512_bf16"]}}, "benchmarks/x.py")
    without = provenance.describe({"provenance": {**base, "cpu_bf16": []}}, "benchmarks/x.py")
    unknown = provenance.describe({"provenance": {**base, "cpu_bf16": None}}, "benchmarks/x.py")
    older = provenance.describe({"provenance": base}, "benchmarks/x.py")  # written before the field existed
    assert "AMD EPYC (avx512_bf16), 2 CPUs" in with_bf16
    assert "AMD EPYC (no bf16 instructions), 2 CPUs" in without
    assert "AMD EPYC, 2 CPUs" in unknown and "AMD EPYC, 2 CPUs" in older


def test_a_rewritten_result_is_not_a_dirty_tree_but_a_code_change_is(provenance, tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "docs" / "benchmarks").mkdir(parents=True)
    (tmp_path / "docs" / "benchmarks" / "a.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "x", "--allow-empty")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "files")
    (tmp_path / "docs" / "benchmarks" / "a.json").write_text('{"rerun": 1}')
    assert not provenance.git_commit(tmp_path).endswith("+dirty")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert provenance.git_commit(tmp_path).endswith("+dirty")


def test_a_json_without_provenance_says_what_it_lacks(provenance):
    old = {"command": "python benchmarks/x.py", "machine": {"torch": "2.0", "load_avg_start": [1, 2, 3]}}
    line = provenance.describe(old, "benchmarks/x.py")
    assert "no git commit or date" in line and "torch 2.0" in line and "1.00 / 2.00 / 3.00" in line
    assert "rerun (`python benchmarks/x.py`)" in line


def test_every_benchmark_script_records_provenance():
    for script in ("sparse_ops", "masks", "adapter_size", "qrosa", "step", "layer", "gpu"):
        source = (BENCHMARKS / f"{script}.py").read_text()
        assert "provenance.provenance(" in source and '"provenance": provenance.finish(' in source, script
        assert "def markdown(" in source, script


# --- sparse_ops: the cost rule out of sample ----------------------------------------------------------------


def _row(out_f, in_f, density, spmm_s, fold_s, load=0.0):
    nnz = round(density * out_f * in_f)
    return {
        "label": "x",
        "out": out_f,
        "in": in_f,
        "tokens": 512,
        "density": density,
        "nnz": nnz,
        "foreign_load_cores": load,
        "seconds": {"spmm_strategy_extra": spmm_s, "fold_strategy_extra": fold_s},
    }


def test_out_of_sample_agreement_uses_the_earlier_runs_constants(sparse_ops):
    # Constants under which fold costs 2 * out * in / 1e9 s and spmm 2 * nnz * tokens / 1e9 s (streaming free):
    # fold is picked exactly when out * in < nnz * tokens, i.e. density > 1 / 512.
    earlier = {
        "provenance": {"date": "A-date", "command": "python benchmarks/sparse_ops.py", "git_commit": "abc"},
        "cost_rule": {"fitted": {"sparse_rate": 1e9, "stream_rate": 1e30, "fold_rate": 1e9}},
    }
    rows = [
        _row(64, 64, 0.001, spmm_s=1.0, fold_s=2.0),  # rule: spmm, faster: spmm
        _row(64, 64, 0.01, spmm_s=2.0, fold_s=1.0),  # rule: fold, faster: fold
        _row(64, 64, 0.05, spmm_s=1.0, fold_s=2.0, load=1.0),  # rule: fold, faster: spmm (a loaded row)
    ]
    oos = sparse_ops.out_of_sample(earlier, rows, "earlier.json")
    assert (oos["rows"], oos["rows_agreeing"], oos["clean_rows"], oos["clean_rows_agreeing"]) == (3, 2, 2, 2)
    assert [(d["density"], d["faster"], d["rule"]) for d in oos["disagreements"]] == [(0.05, "spmm", "fold")]
    assert oos["earlier_run"] == {
        "path": "earlier.json",
        "date": "A-date",
        "command": "python benchmarks/sparse_ops.py",
        "git_commit": "abc",
    }
    assert "error" in sparse_ops.out_of_sample({}, rows)


def test_sparse_ops_text_reports_out_of_sample_only_when_measured(sparse_ops):
    results = json.loads((RESULTS / "sparse_ops.json").read_text())
    results.pop("out_of_sample", None)
    text = sparse_ops.markdown(results)
    assert "Out of sample: not measured yet" in text
    assert "in-sample fit" in text
    n = len(results["rows"])
    agree = sum(r["rule_current"] == r["faster"] for r in results["rows"])
    assert f"picks the measured faster strategy on {agree} of {n} rows" in text

    later = copy.deepcopy(results)
    later["out_of_sample"] = sparse_ops.out_of_sample(results, later["rows"], "x.json")
    text = sparse_ops.markdown(later)
    oos = later["out_of_sample"]
    assert "**Out of sample**, the constants fitted on an earlier run" in text
    assert f"on {oos['rows_agreeing']} of {oos['rows']} rows of this run" in text


def test_sparse_ops_run_records_provenance_and_checks_the_run_it_replaces(sparse_ops, tmp_path):
    """A tiny run (one 16x16 shape: milliseconds) written over an earlier JSON: the earlier run's fitted constants
    are applied to the new rows before the file is replaced."""
    out = tmp_path / "sparse_ops.json"
    tiny = [
        "--shapes",
        "16x16",
        "--densities",
        "0.1,0.5",
        "--repeats",
        "1",
        "--no-memory",
        "--wait-quiet",
        "0",
    ]
    assert sparse_ops.main([*tiny, "--out", str(out), "--previous", "none"]) == 0
    first = json.loads(out.read_text())
    assert first["out_of_sample"] is None and first["provenance"]["command"].endswith("--previous none")
    assert sparse_ops.main([*tiny, "--out", str(out)]) == 0  # --previous defaults to the file it replaces
    second = json.loads(out.read_text())
    oos = second["out_of_sample"]
    assert oos["earlier_run"]["date"] == first["provenance"]["date"] and oos["rows"] == 2
    assert oos["constants"] == first["cost_rule"]["fitted"]
    assert "**Out of sample**" in sparse_ops.markdown(second)


def test_sparse_ops_table_uses_one_statistic_throughout(sparse_ops):
    """Every ratio in the table is the ratio of the median times (the target rows included)."""
    results = json.loads((RESULTS / "sparse_ops.json").read_text())
    text = sparse_ops.markdown(results)
    for r in results["rows"]:
        if r["density"] not in sparse_ops.README_DENSITIES:
            continue
        t = r["seconds"]
        cell = f"{t['spmm_strategy_extra'] / t['gemm']:.2f}x ({sparse_ops._range(r['round_ratios']['spmm_strategy_extra_over_gemm'])})"
        assert cell in text


@pytest.mark.parametrize(
    ("speed", "cpu_bf16", "cause", "small"),
    [
        ([6.1, 6.8], [], " (no bf16 instructions in the CPU)", True),
        ([0.4, 0.5], ["avx512_bf16"], " (the CPU has avx512_bf16)", False),
        ([2.0, 2.2], None, "", True),  # an older JSON: the CPU's instructions were not recorded
    ],
)
def test_sparse_ops_reads_the_bf16_gemm_against_the_cpu_that_ran(sparse_ops, speed, cpu_bf16, cause, small):
    text = sparse_ops._bf16_gemm_sentence(speed, cpu_bf16)
    assert text.startswith(f"On this machine a bf16 GEMM takes {sparse_ops._range(speed)}x the time")
    assert f"fp32{cause}" in text and ("makes the bf16 ratios small" in text) == small


# --- verdicts and hand-edited keys ------------------------------------------------------------------------


def test_qrosa_verdicts_come_from_the_values_and_hand_edits_are_flagged():
    qrosa = load_benchmark("qrosa")
    results = json.loads((RESULTS / "qrosa.json").read_text())
    results.pop("before_fix", None)
    results.pop("notes", None)
    results["summary"]["qrosa_joint"].update(time_ratio=1.3, cpu_time_ratio=1.1, memory_ratio=1.06)
    text = qrosa.markdown(results)
    assert "1.060 (**not met**)" in text
    assert "1.30 / 1.10 (**not met** on wall time, met on CPU time)" in text
    assert "edited by hand" not in text
    results["notes"] = ["typed by hand"]
    assert "keys the script never writes (`notes`)" in qrosa.markdown(results)


@pytest.mark.parametrize(("time_ratio", "memory_ratio"), [(1.3, 1.0), (1.0, 1.3), (1.0, 1.0), (1.3, 1.3)])
def test_qrosa_explains_only_the_targets_the_joint_phase_misses(time_ratio, memory_ratio):
    qrosa = load_benchmark("qrosa")
    results = json.loads((RESULTS / "qrosa.json").read_text())
    time_t, mem_t = results["targets"]["time_ratio"], results["targets"]["memory_ratio"]
    joint = results["summary"]["qrosa_joint"]
    joint.update(time_ratio=time_ratio * time_t, cpu_time_ratio=time_ratio * time_t)
    joint.update(memory_ratio=memory_ratio * mem_t)
    text = qrosa.markdown(results)
    assert ("misses its time target" in text) == (time_ratio > 1)
    assert ("The memory column is the process's peak RSS" in text) == (memory_ratio > 1)


def test_adapter_target_verdict_is_computed():
    adapter_size = load_benchmark("adapter_size")
    results = json.loads((RESULTS / "adapter_size.json").read_text())
    results["rows"][0]["ratio_per_param_to_lora_matched"] = 1.6
    assert "target <= 1.5x: **not met**" in adapter_size.markdown(results)


@pytest.mark.parametrize("strategy", ["spmm", "fold"])
def test_layer_benchmark_writes_rows_whose_verdicts_follow_the_values(strategy, tmp_path, monkeypatch):
    """Each row times the sparse ops its strategy really runs (auto forced either way here)."""
    import rosa.sparse.delta

    monkeypatch.setattr(rosa.sparse.delta, "choose_strategy", lambda *a: strategy)
    layer = load_benchmark("layer")
    monkeypatch.setattr(layer, "SHAPES", [(40, 24)])
    monkeypatch.setattr(layer, "TOKENS", [8])
    out = tmp_path / "layer.json"
    assert layer.main(["--quick", "--rounds", "2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["provenance"]["command"].startswith("python ")
    rows = results["rows"]
    assert [(r["out"], r["in"], r["tokens"], r["dtype"]) for r in rows] == [
        (40, 24, 8, "fp32"),
        (40, 24, 8, "bf16"),
    ]
    for r in rows:
        assert r["nnz"] == round(0.01 * 40 * 24) and r["sparse_ops"] == list(layer.OPS[r["strategy"]])
        assert len(r["rosa_over_lora_rounds"]) == 2 and r["met"] == (r["rosa_over_lora"] <= layer.TARGET)
    rows[0].update(rosa_over_lora=1.5, met=False)
    rows[1].update(rosa_over_lora=1.05, met=True)
    text = layer.markdown(results)
    assert "| 1.50x (" in text and "**not met**" in text and "Goal met on 1 of 2 rows." in text
    lora_gemms = rows[0]["seconds"]["lora"] / rows[0]["seconds"]["gemm"]  # the worst (missed) row's LoRA step
    allowed = (layer.TARGET - 1) * lora_gemms
    assert f"where the goal allows {allowed:.2f} (LoRA's step takes {lora_gemms:.2f} GEMMs)" in text
    gemm = rows[1]["seconds"]["gemm"] / rows[0]["seconds"]["gemm"]  # bf16's time over fp32's
    assert f"In bf16 the dense GEMM takes {gemm:.2f}x its fp32 time" in text
    assert ("2 x fold" in text) == (strategy == "fold") and ("spmm_t" in text) == (strategy == "spmm")


# --- gpu.py: importable without a GPU, and timing the layer's own path --------------------------------------


def test_gpu_benchmark_imports_without_side_effects():
    gpu = load_benchmark("gpu")  # no argument parsing, no CUDA check, no exit at import
    assert gpu.ARGS is None and callable(gpu.markdown)
    source = (BENCHMARKS / "gpu.py").read_text()
    assert "row_order=" not in source and "row_idx=" not in source  # nothing the layer does not pass


@pytest.mark.triton
def test_gpu_benchmark_runs_the_layer_path_under_the_interpreter(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ROSA_SPARSE_BACKEND", "triton")
    gpu = load_benchmark("gpu")
    out = tmp_path / "gpu.json"
    args = ["--smoke-cpu", "--out", str(out), "--shapes", "24x20", "--densities", "0.3", "--reps", "1"]
    assert gpu.main(args) == 0
    results = json.loads(out.read_text())
    assert all(c["ok"] for c in results["checks"])
    impls = {(r["op"], r["impl"]) for r in results["results"] if "impl" in r}
    for op in ("spmm", "spmm_t", "sddmm", "fold", "sparse_linear_fwd_bwd", "folded_linear_fwd_bwd"):
        assert (op, "layer") in impls
    layer = results["layer"]["results"][0]
    assert {"lora_ms", "rosa_spmm_ms", "rosa_fold_ms", "rosa_auto_ms"} <= set(layer)
    assert results["provenance"]["command"].endswith("--reps 1")
    text = gpu.markdown(results)
    assert "| 24x20, 30% |" in text and "checks against float64 passed" in text


# --- step: where RoSA's extra time goes ---------------------------------------------------------------------


def _step_result(
    method: str, step_s: float, sparse: float = 0.0, dense: float = 1.0, other: float = 0.5
) -> dict:
    wall = sparse + dense + other
    return {
        "setting": "block7b",
        "dtype": "fp32",
        "method": method,
        "trainable": 10,
        "step_s": step_s,
        "step_times_s": [step_s],
        "peak_rss_bytes": 2**20,
        "allocator_peak_bytes": 2**20,
        "profiled_step": {"wall_s": wall, "sparse_ops_s": sparse, "dense_matmul_s": dense, "other_s": other},
    }


def test_step_splits_rosa_excess_over_lora_into_sparse_ops_matmuls_and_the_rest():
    step = load_benchmark("step")
    rounds = [  # LoRA's profiled step: 1.5 s in every round
        [
            _step_result("lora", 2.0),
            _step_result("supra", 3.6),
            _step_result("rosa", 2.4, sparse=0.15, dense=1.15),
        ],
        [_step_result("lora", 4.0), _step_result("supra", 7.2), _step_result("rosa", 4.4, sparse=0.3)],
        [
            _step_result("lora", 1.0),
            _step_result("supra", 1.8),
            _step_result("rosa", 1.1, sparse=0.6, other=0.35),
        ],
    ]
    rows = step.summarise(rounds)
    rosa = next(r for r in rows if r["method"] == "rosa")
    x = rosa["excess_vs_lora"]
    # per round, over 1.5 s: sparse 0.1, 0.2, 0.4 -> 0.2; matmuls 0.1, 0, 0 -> 0; rest 0, 0, -0.1 -> 0;
    # whole step 0.2, 0.2, 0.3 -> 0.2
    assert (x["sparse_ops_s"], x["dense_matmul_s"], x["other_s"]) == pytest.approx((0.2, 0.0, 0.0))
    assert x["wall_s"] == pytest.approx(0.2)
    assert rosa["time_vs_lora"] == pytest.approx(1.10)  # timed steps: 1.2, 1.1, 1.1
    lora = next(r for r in rows if r["method"] == "lora")
    assert lora["excess_vs_lora"] == {k: 0 for k in step.PROFILE_PARTS}
    report = {
        "rows": rows,
        "targets": step.targets(rows),
        "settings": {"density": 0.01, "device": "cpu", "rounds": 3},
        "raw": rounds,
    }
    text = "\n".join(step._findings(report))
    assert (
        "+0.20x in all = rosa's sparse ops +0.20x + the dense matmuls +0.00x + everything else +0.00x" in text
    )
    # LoRA's dense matmuls took 1.0 s in every round: no spread between processes
    assert "took 1.00-1.00 s under the profiler (1.00x from fastest to slowest process)" in text
    # Supra at 1.8x LoRA: 1.8x faster than Supra needs RoSA at <= 1.00x LoRA, below LoRA + the sparse ops alone
    assert "needs RoSA's step at <= 1.00x LoRA's: less than LoRA's step plus RoSA's sparse ops alone" in text
    rounds[1][0] = _step_result("lora", 4.0, dense=1.3)  # the same matmuls, slower in one process
    text = "\n".join(step._findings({**report, "raw": rounds}))
    assert "took 1.00-1.30 s under the profiler (1.30x from fastest to slowest process)" in text


def test_step_puts_the_sparse_state_against_each_dtypes_lora_peak():
    """The sparse values' state (16 bytes each) and index arrays (12) as a share of LoRA's allocator peak, per
    dtype measured: a fixed cost weighs more against bf16's smaller peak."""
    step = load_benchmark("step")
    report = json.loads((RESULTS / "step.json").read_text())
    row = {(r["setting"], r["dtype"], r["method"]): r for r in report["rows"]}
    values = row["block7b", "fp32", "rosa"]["trainable"] - row["block7b", "fp32", "lora"]["trainable"]
    shares = {
        d: 100 * 28 * values / 2**20 / row["block7b", d, "lora"]["allocator_peak_mib"]
        for d in ("fp32", "bf16")
        if ("block7b", d, "lora") in row
    }
    text = "\n".join(step._findings(report))
    expected = " and ".join(f"{v:.1f}% of LoRA's {d} peak" for d, v in shares.items())
    assert f"Those two alone come to {expected}:" in text
    fp32_only = {**report, "rows": [r for r in report["rows"] if r["dtype"] == "fp32"]}
    assert f"come to {shares['fp32']:.1f}% of LoRA's fp32 peak:" in "\n".join(step._findings(fp32_only))


def test_step_profile_counts_the_forward_kernel_among_rosa_sparse_ops(monkeypatch):
    """sparse_linear's forward runs its kernel without a second dispatch, so the kernel's time shows up under
    the autograd node torch wraps the op in, not under a ``rosa::`` event: it must still count as rosa's."""
    import time

    import torch
    from torch import nn

    import rosa.sparse.ops as ops
    from rosa import RosaConfig, get_rosa_model
    from rosa.masks import collect_mask

    step = load_benchmark("step")
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    model = get_rosa_model(
        nn.Sequential(nn.Linear(16, 24)).requires_grad_(False),
        RosaConfig(r=2, lora_alpha=4, density=0.2, target_modules=["0"], sparse_strategy="spmm"),
    )
    collect_mask(model, [None], lambda m, _: m(x).pow(2).sum(), method="random")
    backend = ops.backend_for(x.device)
    slow = 0.05

    def slow_spmm(*args, **kwargs):
        time.sleep(slow)
        return original(*args, **kwargs)

    original = backend.spmm
    monkeypatch.setattr(backend, "spmm", slow_spmm)
    profile = step._profiled_step(lambda: model(x).sum().backward())
    assert profile["sparse_ops_s"] >= slow * 0.9
