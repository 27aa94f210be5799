"""Data-parallel RoSA on CPU with gloo, 2 processes (tests/dist_worker.py is the per-rank script).

Every launch is bounded (subprocess timeout), uses one thread per process, and runs a tiny random LLaMA."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import child_env
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT = int(os.environ.get("ROSA_TEST_TIMEOUT", "120"))  # seconds per launch; raise on a shared machine

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenarios: str, out: Path, world: int) -> dict[str, list[dict]]:
    """Run the worker's comma-separated `scenarios` on `world` ranks (one launch, one process group); return
    each scenario's per-rank JSON reports (its tensors are in out/<scenario>/rank<r>.safetensors)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **child_env(PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenarios, str(out)],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT)[0].decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    reports = {}
    for scenario in scenarios.split(","):
        reports[scenario] = []
        for rank in range(world):
            path = out / scenario / f"rank{rank}.json"
            assert path.is_file(), f"{scenario}: rank {rank} wrote no report:\n" + "\n".join(logs)[-4000:]
            reports[scenario].append(json.loads(path.read_text()))
    return reports


def tensors(out: Path, scenario: str, rank: int) -> dict[str, torch.Tensor]:
    return load_file(out / scenario / f"rank{rank}.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three launches shared by the tests: the single-process reference, the 2-rank DDP run (with save and
    resume), and the 2-rank variants (DDP settings that fail or that we rely on, and FSDP2)."""
    root = tmp_path_factory.mktemp("dist")
    single = launch("ddp,trainer", root / "single", 1)
    reference = single["ddp"]
    assert reference[0]["ok"], reference[0].get("traceback")
    ddp = launch("ddp", root / "ddp", 2)["ddp"]
    variants = launch("ddp_plain,ddp_static,ddp_bcast,fsdp,trainer", root / "variants", 2)
    return {
        "root": root,
        "reference": reference,
        "trainer_reference": single["trainer"],
        "ddp": ddp,
        **variants,
    }


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    scale = b.abs().max().clamp_min(1e-30)
    return bool(((a - b).abs().max() <= rtol * scale).item())


def _assert_adapters_match(got: dict, ref: dict, prefix: str, ref_prefix: str = "full.") -> None:
    keys = [k for k in ref if k.startswith(ref_prefix)]
    assert keys
    for key in keys:
        other = prefix + key[len(ref_prefix) :]
        if key.endswith(".flat"):
            assert torch.equal(got[other], ref[key]), other
        else:
            assert torch.allclose(got[other], ref[key], rtol=1e-4, atol=1e-5), other


def test_ddp_masks_are_identical_and_equal_the_single_process_mask(runs):
    root = runs["root"]
    for report in runs["ddp"]:
        assert report["ok"], report.get("traceback")
        assert report["micro_batches"] == runs["reference"][0]["micro_batches"] == 2  # global micro-batches
        assert report["mask_step"] == 4  # 2 warm-up steps + 2 collection micro-batches
    ref = tensors(root / "single", "ddp", 0)
    ranks = [tensors(root / "ddp", "ddp", r) for r in range(2)]
    flat = [k for k in ref if k.startswith("full.") and k.endswith(".flat")]
    assert len(flat) == 14 and all(ref[k].numel() > 0 for k in flat)
    for key in flat:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.equal(ranks[0][key], ref[key]), key


@pytest.mark.parametrize("granularity", ["example", "micro_batch"])
def test_ddp_fisher_is_the_single_process_fisher(runs, granularity):
    """Per example (the default): each rank squares its own examples' share of the DDP gradient and the sums
    are added over ranks. Per micro-batch: G_b of the *global* micro-batch is all-reduced before squaring
    (summing per-rank squares gave a different statistic and a different mask). Either way every rank holds
    what one process computes over the global batches."""
    prefix = "stats." if granularity == "example" else "stats_micro_batch."
    ref = tensors(runs["root"] / "single", "ddp", 0)
    ranks = [tensors(runs["root"] / "ddp", "ddp", r) for r in range(2)]
    stats = [k for k in ref if k.startswith(prefix)]
    assert len(stats) == (28 if granularity == "example" else 14)
    for key in stats:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert _close(ranks[0][key], ref[key]), key


def test_ddp_training_matches_single_process_and_rank0_alone_writes(runs):
    root = runs["root"]
    for report in runs["ddp"]:
        assert report["warmup_values_grad_none"]  # find_unused_parameters=True leaves unused values at None
        assert report["support_buffers_synced_by_ddp"] == 0  # excluded from DDP's buffer broadcast
    ref = tensors(root / "single", "ddp", 0)
    ranks = [tensors(root / "ddp", "ddp", r) for r in range(2)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    _assert_adapters_match(ranks[0], ref, "full.")
    assert (root / "ddp" / "ddp" / "mask.rank0.safetensors").is_file()
    assert not (root / "ddp" / "ddp" / "mask.rank1.safetensors").exists()


def test_ddp_resume_from_rank0_checkpoint_reaches_the_same_adapter(runs):
    root = runs["root"]
    for report in runs["ddp"]:
        assert report["resumed_phase"] == "joint"
        assert "adapter_model.safetensors" in report["checkpoint_files"]
    ranks = [tensors(root / "ddp", "ddp", r) for r in range(2)]
    ref = tensors(root / "single", "ddp", 0)
    for r in range(2):
        _assert_adapters_match(ranks[r], ranks[r], "resumed.")
    _assert_adapters_match(ranks[0], ref, "resumed.")
    assert len(list((root / "ddp" / "ddp" / "run" / "checkpoints").glob("step-*"))) == 1


def test_ddp_needs_find_unused_parameters_and_no_static_graph(runs):
    """Before the mask the sparse values take no part in the forward: DDP's defaults fail on the second
    step, and static_graph=True fails once the mask makes them used."""
    for report in runs["ddp_plain"]:
        assert not report["ok"] and "Expected to have finished reduction" in report["error"]
    for report in runs["ddp_static"]:
        assert not report["ok"] and "graph has changed" in report["error"]


def test_ddp_buffer_broadcast_of_resized_supports_is_harmless_when_masks_agree(runs):
    """With broadcast_buffers=True and the mask set after wrapping, DDP (which re-reads the module's buffers
    before each broadcast) broadcasts rank 0's resized support every forward: it works because every rank
    picked the same mask (shapes agree), and the result is the single-process one."""
    ref = tensors(runs["root"] / "single", "ddp", 0)
    for r, report in enumerate(runs["ddp_bcast"]):
        assert report["ok"], report.get("traceback")
        assert report["support_buffers_synced_by_ddp"] == 70  # 14 layers x 5 support buffers
        _assert_adapters_match(tensors(runs["root"] / "variants", "ddp_bcast", r), ref, "full.")


def test_fsdp2_shards_adapter_keeps_supports_plain_and_saves_a_full_adapter(runs):
    ref = tensors(runs["root"] / "single", "ddp", 0)
    reports = runs["fsdp"]
    for report in reports:
        assert report["ok"], report.get("traceback")
        assert report["param_types"] == ["DTensor"]  # A, B, values (and the frozen base) are sharded
        assert report["values_placements"] == ["S(0)"]
        assert report["support_buffer_types"] == ["Tensor"]  # integer buffers are never sharded or flattened
        assert report["warmup_values_grad_none"] and report["mask_step"] == 4
    assert (
        sum(r["values_local_numel"] for r in reports)
        == ref["full.model.layers.0.self_attn.q_proj.values"].numel()
    )
    for r in range(2):
        got = tensors(runs["root"] / "variants", "fsdp", r)
        _assert_adapters_match(got, ref, "full.")  # same mask and training as one process
        _assert_adapters_match(got, ref, "loaded.")  # the adapter saved from sharded state, reloaded


def test_trainer_with_callback_under_ddp_matches_one_process(runs):
    """transformers.Trainer does the DDP wrap and the data sharding; RosaTrainerCallback needs nothing else."""
    reference = runs["trainer_reference"][0]
    assert reference["ok"], reference.get("traceback")
    ref = tensors(runs["root"] / "single", "trainer", 0)
    for rank, report in enumerate(runs["trainer"]):
        assert report["ok"], report.get("traceback")
        assert report["wrapped"] == "DistributedDataParallel"
        assert report["events"] == reference["events"] and "mask_fixed" in report["events"]
        assert report["losses"] == pytest.approx(reference["losses"], rel=1e-5)
        _assert_adapters_match(tensors(runs["root"] / "variants", "trainer", rank), ref, "full.")


# --- `rosa train` under torchrun ------------------------------------------------------------------------

RUN_ARGS = [
    "data.train_size=24",
    "data.val_size=5",
    "data.max_length=64",
    "train.steps=8",
    "train.save_every=2",
    "train.keep_checkpoints=5",  # step-4 stays for the resume test (the last step is a checkpoint too)
    "train.log_every=1",
    "eval.limit=5",
    "eval.max_new_tokens=4",
    "eval.batch_size=2",
    "rosa.r=2",
    "rosa.lora_alpha=4",
    "rosa.density=0.05",
    "rosa.warmup_steps=2",
    "rosa.mask_steps=2",
]


def _rosa(args: list[str], nproc: int | None, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """`rosa` as one plain process (nproc None), or under `torchrun --nproc_per_node nproc` or
    `accelerate launch --multi_gpu --num_processes nproc` (which launches CPU processes when there is no GPU)."""
    env = child_env(PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    launcher = (
        [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    cmd = [sys.executable, *launcher, "-m", "rosa.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def cli_runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The same global batches (4 rows) trained by one process and by two (2 rows each) under torchrun and
    under accelerate launch; the torchrun run is then resumed from its step-4 checkpoint in a copy of its folder."""
    import shutil

    root = tmp_path_factory.mktemp("cli-ddp")
    model = f"model.name={tiny_model_dir}"
    runs = {name: root / name for name in ("single", "ddp", "accelerate", "resumed")}
    for name, nproc, batch in (("single", None, 4), ("ddp", 2, 2), ("accelerate", 2, 2)):
        args = ["train", "-q", model, f"output_dir={runs[name]}", f"train.batch_size={batch}", *RUN_ARGS]
        done = _rosa(args, nproc, launcher="accelerate" if name == "accelerate" else "torchrun")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shutil.copytree(runs["ddp"], runs["resumed"])
    for leftover in ("adapter", "results.json"):
        target = runs["resumed"] / leftover
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    (runs["resumed"] / "checkpoints" / "latest").write_text("step-4")  # the first step after the mask
    done = _rosa(["train", "-q", "--resume", f"output_dir={runs['resumed']}"], 2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return runs


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("launched", ["ddp", "accelerate"])
def test_rosa_train_under_torchrun_or_accelerate_matches_one_process(cli_runs, launched):
    single, ddp = _adapter(cli_runs["single"]), _adapter(cli_runs[launched])
    assert single.keys() == ddp.keys() and any("rosa_values" in k for k in single)
    for key in single:
        if single[key].is_floating_point():
            torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
        else:  # the support: the same mask on both ranks and in the single process
            assert torch.equal(ddp[key], single[key]), key
    single_mask, ddp_mask = (load_file(cli_runs[n] / "mask.safetensors") for n in ("single", launched))
    assert single_mask.keys() == ddp_mask.keys() and single_mask
    assert all(torch.equal(ddp_mask[k], single_mask[k]) for k in single_mask)


def test_rosa_train_under_torchrun_writes_once_and_merges_the_evaluation(cli_runs):
    log, single = (
        [json.loads(line) for line in (cli_runs[name] / "log.jsonl").read_text().splitlines()]
        for name in ("ddp", "single")
    )
    assert [r for r in log if "event" in r] == [r for r in single if "event" in r]  # the schedule's events
    log, single = ([r for r in lines if "loss" in r] for lines in (log, single))
    assert [r["step"] for r in log] == list(range(1, 9))  # one line per step: rank 0 alone writes
    for mine, ref in zip(log, single):  # the loss is the global token mean, as in one process
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    results = json.loads((cli_runs["ddp"] / "results.json").read_text())
    reference = json.loads((cli_runs["single"] / "results.json").read_text())
    assert results["processes"] == 2
    assert results["after"]["count"] == 5  # both ranks' shares of the held-out rows, merged
    assert results["after"]["heldout_loss"] == pytest.approx(reference["after"]["heldout_loss"], rel=1e-4)
    assert [s["prediction"] for s in results["after"]["samples"]] == [
        s["prediction"] for s in reference["after"]["samples"]
    ]
    assert results["schedule_events"] == reference["schedule_events"]


def test_rosa_train_under_torchrun_resumes_to_the_same_adapter(cli_runs):
    resumed, ddp = _adapter(cli_runs["resumed"]), _adapter(cli_runs["ddp"])
    assert resumed.keys() == ddp.keys()
    for key in ddp:
        torch.testing.assert_close(resumed[key], ddp[key], rtol=0, atol=1e-7, msg=key)


def test_resume_with_another_process_count_is_refused(cli_runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cli_runs["ddp"], run)
    done = _rosa(["train", "-q", "--resume", f"output_dir={run}", "train.steps=10"], None)  # extended
    assert done.returncode == 2
    assert "written by a run of 2 process(es)" in done.stderr, done.stderr[-2000:]
    assert (run / "adapter").exists() and (run / "checkpoints").exists()  # nothing lost
