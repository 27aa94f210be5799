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
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT = 120

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
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
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
    reference = launch("ddp", root / "single", 1)["ddp"]
    assert reference[0]["ok"], reference[0].get("traceback")
    ddp = launch("ddp", root / "ddp", 2)["ddp"]
    variants = launch("ddp_plain,ddp_static,ddp_bcast,fsdp", root / "variants", 2)
    return {"root": root, "reference": reference, "ddp": ddp, **variants}


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


def test_ddp_fisher_is_the_global_batch_fisher_not_a_sum_of_per_rank_squares(runs):
    """fisher = mean_b (G_b)^2 with G_b the gradient of the *global* micro-batch: masks.py all-reduces G_b
    before squaring (summing per-rank squares gave a different statistic and a different mask)."""
    ref = tensors(runs["root"] / "single", "ddp", 0)
    ranks = [tensors(runs["root"] / "ddp", "ddp", r) for r in range(2)]
    stats = [k for k in ref if k.startswith("stats.")]
    assert len(stats) == 28
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


def test_rosa_train_refuses_to_run_as_several_processes(monkeypatch, tmp_path):
    """`rosa train` has no data parallelism: under torchrun each rank would train alone and race on the files."""
    from rosa.run_config import RunConfig
    from rosa.train import RunError, train

    run = RunConfig()
    run.output_dir = str(tmp_path / "run")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunError, match="single-process"):
        train(run, show_progress=False)
    assert not (tmp_path / "run").exists()
