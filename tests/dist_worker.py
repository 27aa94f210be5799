"""One rank of a distributed RoSA run on CPU/gloo, launched by tests/test_distributed.py (not a test itself).

    python tests/dist_worker.py SCENARIO OUT_DIR      (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)

SCENARIO may be a comma-separated list, run one after another in the same process group. WORLD_SIZE=1 runs
the single-process reference without initialising torch.distributed. Each rank gets a contiguous
``1/world`` share of every global micro-batch, so DDP's average of the per-rank mean losses' gradients is the
single-process gradient. Results go to ``OUT_DIR/<scenario>/rank<r>.safetensors`` and
``OUT_DIR/<scenario>/rank<r>.json`` (``{"ok": ..., "error": ...}``).

Scenarios:

- ``ddp``: DDP(find_unused_parameters=True), support buffers excluded from DDP's buffer sync; warm-up 2
  steps, mask from 2 micro-batches, joint training; rank 0 checkpoints after step 4; the run is then resumed
  from that checkpoint in fresh model/optimizer objects and finished again. Saves the masks, the final
  adapter of the uninterrupted run and of the resumed run.
- ``ddp_plain``: the same loop with DDP's defaults (find_unused_parameters=False, broadcast_buffers=True).
- ``ddp_static``: static_graph=True.
- ``ddp_bcast``: find_unused_parameters=True, broadcast_buffers=True, support buffers NOT excluded.
- ``fsdp``: FSDP2 ``fully_shard`` per decoder layer and at the root.
- ``trainer``: ``transformers.Trainer`` with ``RosaTrainerCallback`` (Trainer does the DDP wrap and the data
  sharding: ``GLOBAL_BATCH / world`` rows per rank); saves the masks and the final adapter.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from safetensors.torch import save_file
from torch import nn

from rosa.distributed import support_buffer_names

STEPS = 6
SAVE_AT = 4
GLOBAL_BATCH = 4
SEQ = 12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model() -> nn.Module:
    from tiny_models import tiny_llama

    from rosa.config import RosaConfig
    from rosa.model import get_rosa_model

    base = tiny_llama(seed=0)
    rosa_config = RosaConfig(
        r=4, lora_alpha=8, density=0.05, target_modules=TARGETS, warmup_steps=2, mask_steps=2,
        fisher_granularity="example",  # the schedule's statistic; the worker scores the other one beside it
    )  # fmt: skip
    return get_rosa_model(base, rosa_config), rosa_config


def global_batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(n)]


def shard(ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = ids.shape[0] // world
    return ids[rank * per : (rank + 1) * per]


def adapter_tensors(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    from rosa.masks import mask_layers

    out = {}
    for name, layer in mask_layers(model, "default").items():
        out[f"{prefix}{name}.A"] = layer.rosa_A["default"].weight.detach().clone()
        out[f"{prefix}{name}.B"] = layer.rosa_B["default"].weight.detach().clone()
        out[f"{prefix}{name}.values"] = layer.rosa_values["default"].detach().clone()
        out[f"{prefix}{name}.flat"] = layer.support("default").flat_index().clone()
    return out


def wrap(model: nn.Module, scenario: str, world: int) -> nn.Module:
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if scenario == "ddp":
        DDP._set_params_and_buffers_to_ignore_for_model(model, support_buffer_names(model))
        return DDP(model, find_unused_parameters=True)
    if scenario == "ddp_plain":
        return DDP(model)
    if scenario == "ddp_static":
        return DDP(model, static_graph=True)
    if scenario == "ddp_bcast":
        return DDP(model, find_unused_parameters=True, broadcast_buffers=True)
    raise ValueError(scenario)


def run_steps(ddp, sched, optimizer, batches, start, stop, rank, world, results, out, config) -> None:
    from rosa.masks import mask_layers

    layers = mask_layers(ddp, "default")
    for step in range(start, stop):
        ids = shard(batches[step], rank, world)
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        if step < config.warmup_steps:  # warm-up: the values take no part, get no gradient
            results["warmup_values_grad_none"] &= all(
                layer.rosa_values["default"].grad is None for layer in layers.values()
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sched.step(optimizer)
        if sched.mask_ready and "mask_step" not in results:
            results["mask_step"] = step + 1
        if step + 1 == SAVE_AT and out is not None:
            from rosa.app.checkpoint import save_checkpoint

            inner = ddp.module if hasattr(ddp, "module") else ddp
            if rank == 0:  # only rank 0 writes files
                lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
                schedule = {"mask_fixed_step": sched.state_dict()["mask_fixed_step"]}
                save_checkpoint(out / "run", step + 1, inner, optimizer, lr, {}, schedule)
            if world > 1:
                torch.distributed.barrier()


def scenario_ddp(scenario: str, rank: int, world: int, out: Path) -> dict:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from rosa.app.checkpoint import latest_checkpoint, load_checkpoint, restore_optimizer
    from rosa.masks import collect_mask
    from rosa.scheduler import RosaScheduler

    results: dict = {"warmup_values_grad_none": True}
    model, config = tiny_model()
    ddp = wrap(model, scenario, world)
    params = [p for p in ddp.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    recorded: dict[str, torch.Tensor] = {}

    def fisher_recording(name, layer, stats):  # the fisher method, keeping the statistics for the test
        recorded[f"stats.{name}.fisher"] = stats["fisher"].clone()
        recorded[f"stats.{name}.grad"] = stats["grad"].clone()
        results["micro_batches"] = stats["micro_batches"]
        return stats["fisher"]

    def micro_batch_recording(name, layer, stats):  # the other granularity, from the same first batches
        recorded[f"stats_micro_batch.{name}.fisher"] = stats["fisher"].clone()
        return stats["fisher"]

    first = [shard(ids, rank, world) for ids in global_batches(2)]
    collect_mask(
        model,
        [{"input_ids": ids, "labels": ids} for ids in first],
        method=micro_batch_recording,
        fisher_granularity="micro_batch",
        apply=False,
    )
    mask_path = out / f"mask.rank{rank}.safetensors"  # per-rank name: shows which ranks write
    sched = RosaScheduler(
        ddp, config, method=fisher_recording, stats=("fisher", "grad"), save_mask_path=mask_path
    )
    batches = global_batches(STEPS)
    run_steps(ddp, sched, optimizer, batches, 0, STEPS, rank, world, results, out, config)
    tensors = {**adapter_tensors(ddp, "full."), **recorded}
    if world > 1:  # which of the (replaced) support buffers DDP's buffer broadcast still holds
        synced = {id(b) for b in getattr(ddp, "modules_buffers", [])}
        current = dict(ddp.module.named_buffers())
        results["support_buffers_synced_by_ddp"] = sum(
            id(current[n]) in synced for n in support_buffer_names(ddp.module)
        )
    results["events"] = [e["event"] for e in sched.events]

    if scenario == "ddp":  # resume from rank 0's checkpoint in fresh objects on every rank
        checkpoint = latest_checkpoint(out / "run")
        results["checkpoint_files"] = sorted(p.name for p in checkpoint.iterdir())
        model2, config2 = tiny_model()
        set_peft_model_state_dict(model2, load_file(checkpoint / "adapter_model.safetensors"))
        ddp2 = wrap(model2, scenario, world)
        optimizer2 = torch.optim.AdamW(
            [p for p in ddp2.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
        )
        ckpt_tensors, state = load_checkpoint(checkpoint)
        restore_optimizer(optimizer2, ckpt_tensors, state)
        sched2 = RosaScheduler(ddp2, config2, start_step=SAVE_AT, optimizer=optimizer2)
        sched2.load_state_dict({"mask_fixed_step": state["mask_fixed_step"]})  # the re-warm-up goes on
        results["resumed_phase"] = sched2.phase
        run_steps(
            ddp2,
            sched2,
            optimizer2,
            batches,
            SAVE_AT,
            STEPS,
            rank,
            world,
            {"warmup_values_grad_none": True},
            None,
            config2,
        )
        tensors.update(adapter_tensors(ddp2, "resumed."))
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / f"rank{rank}.safetensors")
    return results


def scenario_fsdp(rank: int, world: int, out: Path) -> dict:
    from torch.distributed.fsdp import fully_shard

    from rosa.masks import mask_layers
    from rosa.scheduler import RosaScheduler

    results: dict = {"warmup_values_grad_none": True}
    model, config = tiny_model()
    decoder = model.base_model.model.model
    for layer in decoder.layers:
        fully_shard(layer)
    fully_shard(model)
    results["param_types"] = sorted({type(p).__name__ for p in model.parameters()})
    results["support_buffer_types"] = sorted(
        {type(b).__name__ for n, b in model.named_buffers() if n in set(support_buffer_names(model))}
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    sched = RosaScheduler(model, config)
    batches = global_batches(STEPS)
    run_steps(model, sched, optimizer, batches, 0, STEPS, rank, world, results, None, config)
    tensors = {}
    for name, layer in mask_layers(model, "default").items():
        tensors[f"full.{name}.flat"] = layer.support("default").flat_index().clone()
        for key, p in (
            ("A", layer.rosa_A["default"].weight),
            ("B", layer.rosa_B["default"].weight),
            ("values", layer.rosa_values["default"]),
        ):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            tensors[f"full.{name}.{key}"] = full.detach().clone()
    values = mask_layers(model, "default")["model.layers.0.self_attn.q_proj"].rosa_values["default"]
    results["values_placements"] = [str(p) for p in values.placements]
    results["values_local_numel"] = values.to_local().numel()

    # A full adapter from the sharded state: a collective on every rank, written by rank 0 only.
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out / "adapter", state_dict=full)
    torch.distributed.barrier()
    results["adapter_files"] = sorted(p.name for p in (out / "adapter").iterdir())
    fresh, _ = tiny_model()  # an unsharded model, loading the file the way any user would
    set_peft_model_state_dict(fresh, load_file(out / "adapter" / "adapter_model.safetensors"))
    tensors.update(adapter_tensors(fresh, "loaded."))
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / f"rank{rank}.safetensors")
    return results


def scenario_trainer(rank: int, world: int, out: Path) -> dict:
    from transformers import Trainer, TrainingArguments

    from rosa.scheduler import RosaTrainerCallback

    model, config = tiny_model()
    rows = [{"input_ids": ids, "labels": ids} for batch in global_batches(STEPS) for ids in batch]
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS,
        learning_rate=1e-2,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
        ddp_find_unused_parameters=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    callback = RosaTrainerCallback(config)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    results: dict = {"wrapped": None}
    trainer.train()
    results["wrapped"] = type(trainer.model_wrapped).__name__
    results["events"] = [e["event"] for e in callback.scheduler.events]
    results["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    save_file(
        {k: v.contiguous() for k, v in adapter_tensors(model, "full.").items()},
        out / f"rank{rank}.safetensors",
    )
    return results


def main() -> None:
    scenarios, root = sys.argv[1].split(","), Path(sys.argv[2])
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from datetime import timedelta

        torch.distributed.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
    healthy = True
    for scenario in scenarios:  # one process group for all: imports dominate the cost of a launch
        out = root / scenario
        out.mkdir(parents=True, exist_ok=True)
        report: dict = {"ok": False, "error": None}
        try:
            if scenario == "fsdp":
                report.update(scenario_fsdp(rank, world, out))
            elif scenario == "trainer":
                report.update(scenario_trainer(rank, world, out))
            else:
                report.update(scenario_ddp(scenario, rank, world, out))
            report["ok"] = True
        except Exception as e:  # reported to the test, which decides what is expected
            report["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            report["traceback"] = traceback.format_exc()[-3000:]
        if world > 1:  # is the process group still usable after this scenario?
            try:
                torch.distributed.barrier()
            except Exception as e:
                report["barrier_error"] = f"{type(e).__name__}: {e}"[:300]
                healthy = False
        (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
        if not healthy:
            break
    if world > 1 and healthy:
        torch.distributed.destroy_process_group()
    # A failed collective can leave gloo threads waiting: leave without running their teardown.
    os._exit(0)


if __name__ == "__main__":
    main()
