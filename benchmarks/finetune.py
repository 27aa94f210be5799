"""One fine-tuning run as the accuracy benchmarks train it: every method of every table ran this loop.

The loop is the one a PEFT user writes: forward, backward, clip at 1.0, ``optimizer.step()``, LR schedule
(linear warm-up, then cosine), one AdamW without weight decay over the trainable parameters, fp32 weights,
length-grouped seeded batches. RoSA's recipe (mask collection, restart, re-warm-up, the sparse rate) runs inside
``optimizer.step()``, driven by the library's own :class:`rosa.schedule.RosaSchedule` from the RosaConfig; a
sparse-only adapter has its mask scored on the run's first batches before step 0, as ``rosa train`` does
(``RosaSchedule.score_before_training``). No rule of the schedule is re-derived here.

Resumable: with ``work`` set, a checkpoint (``rosa.app.checkpoint``: adapter, optimizer, LR schedule, RNG, data
position, the schedule's state, the losses so far) is written every ``save_every`` steps outside mask collection
and at the step boundary after a Ctrl-C or SIGTERM (after the collection, if it is under way); a later call with the same ``work`` goes on from it. A resumed run ends on the same adapter as an
uninterrupted one (tests/test_finetune.py). The benchmark deletes ``work`` once the result is recorded.
"""

from __future__ import annotations

import ast
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import provenance
import torch
from tqdm.auto import tqdm

STATE_KEY = "finetune"  # what this module adds to a checkpoint's state.json (written with it, atomically)
OLD_STATE_FILE = "finetune.json"  # where checkpoints of commit c3f29a5 kept it (read, never written)
MASK_BATCHES = 8  # the first batches an adapter function sees (RoSA's mask_steps in both protocols)


@dataclass(frozen=True)
class Recipe:
    """How one run trains (the same for every method it is compared with)."""

    lr: float
    steps: int
    seed: int = 0
    batch: int = 8
    max_length: int = 256
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0

    @property
    def warmup(self) -> int:
        """LR warm-up steps (RoSA's re-warm-up after the mask is the same length unless its config says)."""
        return max(1, round(self.warmup_fraction * self.steps))


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(out, in) of every linear layer LoRA's ``all-linear`` adapts (the output head excluded): the weights a
    budget is a share of."""
    head = model.get_output_embeddings()
    return [
        (m.out_features, m.in_features)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    ]


def filling_density(shapes: list[tuple[int, int]], budget_rank: int, r: int) -> float:
    """The density that, beside rank ``r``, spends the trainable weights of LoRA at rank ``budget_rank`` on
    layers of these (out, in) shapes."""
    if not 0 <= r <= budget_rank:
        raise ValueError(f"rank {r} does not fit the budget of LoRA rank {budget_rank}")
    return (budget_rank - r) * sum(o + i for o, i in shapes) / sum(o * i for o, i in shapes)


def adapt(model: torch.nn.Module, adapter: Any) -> torch.nn.Module:
    """``adapter``: None (full fine-tuning), a ``peft.LoraConfig`` or a ``rosa.RosaConfig``."""
    if adapter is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from rosa import RosaConfig, get_rosa_model

    if isinstance(adapter, RosaConfig):
        return get_rosa_model(model, adapter)
    from peft import get_peft_model

    return get_peft_model(model, adapter)


def train_once(
    examples: tuple[list, list, list],
    task: str,
    adapter: Any,
    recipe: Recipe,
    *,
    score_test: bool,
    eval_batch: int = 64,
    work: Path | None = None,
    save_every: int = 25,
    desc: str = "train",
    model_loader: Any = None,
) -> dict[str, Any]:
    """Fine-tune a fresh model on ``examples`` = (train, validation, test): validation loss always, test exact
    match when ``score_test``. ``adapter``: see :func:`adapt`, or a function ``(model, first_batches) ->
    (config, extra)`` that chooses it from the pretrained model and the run's first ``MASK_BATCHES`` batches
    (``extra`` joins the result). ``model_loader()`` returns (model, tokenizer): the package's offline SmolLM2 by
    default."""
    from rosa.app.batches import CausalLMCollator, LengthGroupedBatchSampler, tokenize_examples
    from rosa.app.evaluate import evaluate_task, heldout_loss
    from rosa.app.loading import load_model_and_tokenizer, warmup_cosine
    from rosa.app.run_config import ModelSection
    from rosa.app.run_folder import GracefulStop

    started, cpu_started, load_before = time.perf_counter(), time.process_time(), provenance.load_average()
    train, val, test = examples
    torch.manual_seed(recipe.seed)
    model, tokenizer = (
        model_loader() if model_loader is not None else load_model_and_tokenizer(ModelSection())
    )
    linear_weights = sum(o * i for o, i in linear_shapes(model))
    features = tokenize_examples(train, tokenizer, recipe.max_length)
    sampler = LengthGroupedBatchSampler(
        [len(f["input_ids"]) for f in features], recipe.batch, seed=recipe.seed
    )
    collate = CausalLMCollator(tokenizer)
    first = lambda n: [collate([features[i] for i in b]) for b in sampler.batches(0)[:n]]  # noqa: E731
    extra: dict[str, Any] = {}
    if callable(adapter):
        adapter, extra = adapter(model, first(MASK_BATCHES))
    model = adapt(model, adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(recipe.warmup, recipe.steps))
    settings = _settings(recipe, model)
    checkpoint = _latest(work)
    state = (
        _restore(checkpoint, model, optimizer, lr_schedule, sampler, settings)
        if checkpoint
        else _fresh_state()
    )
    state["settings"] = settings
    schedule = _rosa_schedule(model, optimizer, recipe, state)
    if schedule is not None and checkpoint is None:
        schedule.score_before_training(first(schedule.mask_steps))
    step, losses = state["step"], state["losses"]
    batches = iter(sampler)
    model.train()
    bar = tqdm(
        range(step, recipe.steps), desc=desc, unit="step", leave=False, initial=step, total=recipe.steps
    )
    with GracefulStop() as stop:
        for step in bar:
            batch = next(batches, None)
            if batch is None:  # a fixed step count longer than an epoch
                batches = iter(sampler)
                batch = next(batches)
            loss = model(**collate([features[i] for i in batch])).loss
            loss.backward()
            if schedule is not None:
                schedule.micro_batch_end()
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            optimizer.step()  # RoSA's schedule advances inside (rosa.schedule.hooks)
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 5))
            done = step + 1
            # the last step too: a stop during the test scoring goes straight back to it
            due = done % save_every == 0 or done == recipe.steps or stop.requested
            if work is not None and due and _can_save(schedule):
                _save(
                    work, done, model, optimizer, lr_schedule, sampler, schedule, state, started, cpu_started
                )
                if stop.requested:
                    print(f"\nstopped: checkpoint at step {done} in {work}", flush=True)
                    raise KeyboardInterrupt
            elif stop.requested and work is None:
                raise KeyboardInterrupt
    if schedule is not None:
        schedule.close()
    train_seconds = state["train_seconds"] + time.perf_counter() - started
    # the validation loss is a token-weighted sum: length-sorted batches give it exactly, with little padding
    val_features = sorted(
        tokenize_examples(val, tokenizer, recipe.max_length), key=lambda f: len(f["input_ids"])
    )
    val_batches = [collate(val_features[i : i + 16]) for i in range(0, len(val_features), 16)]
    result: dict[str, Any] = {
        "lr": recipe.lr,
        "steps": recipe.steps,
        "train_rows": len(train),
        "val_rows": len(val),
        "val_loss": heldout_loss(model, val_batches),
        "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "losses": losses,
        "trainable": trainable_counts(model, params, adapter),
        "linear_weights": linear_weights,
        "resumed_at": state["resumed_at"],
        # which code trained which steps: a run resumed in a later checkout names every commit it ran under
        "segments": [*state["segments"], {"from_step": state["step"], "commit": provenance.git_commit()}],
        **extra,
    }
    if schedule is not None:
        result["schedule_events"] = state["schedule_events"] + schedule.events
    if score_test:
        # greedy generation is bound by reading the weights once per token: many rows share each read
        scored = evaluate_task(model, tokenizer, test, task, batch_size=eval_batch, show_progress=True)
        result.update(
            exact_match=scored["exact_match"],
            correct=scored["correct"],
            count=scored["count"],
            hits=scored["hits"],  # which test rows were right: runs on the same rows pair up row by row
            samples=scored["samples"][:5],
        )
    result.update(
        threads=torch.get_num_threads(),
        train_seconds=round(train_seconds, 1),
        wall_seconds=round(state["wall_seconds"] + time.perf_counter() - started, 1),
        cpu_seconds=round(state["cpu_seconds"] + time.process_time() - cpu_started, 1),
        load_before=load_before,
        commit=provenance.git_commit(),
        command=provenance.command_line(),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    return result


def trainable_counts(
    model: torch.nn.Module, params: list[torch.nn.Parameter], adapter: Any
) -> dict[str, int]:
    """Trainable weights: for RoSA the LoRA factors plus the active sparse values (not the capacity)."""
    from rosa import RosaConfig, sparse_parameter_count

    if isinstance(adapter, RosaConfig):
        counts = sparse_parameter_count(model)
        return {**counts, "total": counts["lora"] + counts["sparse_active"]}
    return {"total": sum(p.numel() for p in params)}


# ------------------------------------------------------------------------------------------------ RoSA


def _rosa_schedule(model, optimizer, recipe: Recipe, state: dict[str, Any]):
    """The library's schedule for a RoSA model (None for LoRA and full fine-tuning), at the resumed step."""
    from rosa import RosaConfig
    from rosa.schedule import RosaSchedule

    config = getattr(model, "peft_config", {}).get("default")
    if not isinstance(config, RosaConfig):
        return None
    schedule = RosaSchedule(
        model,
        config,
        start_step=state["step"],
        optimizer=optimizer,
        lr_warmup_steps=recipe.warmup,
        started_by="benchmarks/finetune.py",
    )
    if state["step"]:
        schedule.load_state_dict({"mask_fixed_step": state["mask_fixed_step"], "snapshot": state["snapshot"]})
    return schedule


def _can_save(schedule) -> bool:
    """Not while the mask statistics are accumulating (they are not part of a checkpoint)."""
    from rosa.schedule import COLLECT

    return schedule is None or schedule.phase != COLLECT


# ------------------------------------------------------------------------------------------------ checkpoints


def _fresh_state() -> dict[str, Any]:
    return {
        "step": 0,
        "losses": [],
        "resumed_at": [],
        "segments": [],
        "schedule_events": [],
        "mask_fixed_step": None,
        "snapshot": {},
        "train_seconds": 0.0,
        "wall_seconds": 0.0,
        "cpu_seconds": 0.0,
    }


def _latest(work: Path | None) -> Path | None:
    from rosa.app.checkpoint import latest_checkpoint

    if work is None:
        return None
    found = latest_checkpoint(work)
    if found is not None and _module_state(found) is None:
        raise RuntimeError(
            f"{found} holds no state of benchmarks/finetune.py: remove {work} to train this run over"
        )
    return found


def _settings(recipe: Recipe, model: torch.nn.Module) -> dict[str, Any]:
    """What a checkpoint must have been trained with to be resumed: the recipe and the adapter's config."""
    from dataclasses import asdict

    config = getattr(model, "peft_config", {}).get("default")
    adapter = config.to_dict() if config is not None else None
    return json.loads(json.dumps({"recipe": asdict(recipe), "adapter": adapter}, default=_jsonable))


def _jsonable(value: Any) -> Any:
    """Sets (PEFT keeps ``target_modules`` as one) as sorted lists: their order changes with each process's hash
    seed, so a set written as it iterates made every resume see "other settings"."""
    return sorted(value, key=str) if isinstance(value, (set, frozenset)) else str(value)


def _canonical(value: Any) -> Any:
    """``value`` with every set written as a string (checkpoints before this fix: ``"{'q_proj', 'v_proj'}"``)
    read back as a sorted list, so an old checkpoint compares equal to the same settings today."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, str) and value.startswith("{'") and value.endswith("'}"):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
        return sorted(parsed, key=str) if isinstance(parsed, set) else value
    return value


def _module_state(checkpoint: Path) -> dict[str, Any] | None:
    """This module's part of ``checkpoint``, or None if it has none (not one of ours)."""
    state = json.loads((checkpoint / "state.json").read_text()).get(STATE_KEY)
    if state is None and (checkpoint / OLD_STATE_FILE).is_file():
        state = json.loads((checkpoint / OLD_STATE_FILE).read_text())
    return state


def _save(work, step, model, optimizer, lr_schedule, sampler, schedule, state, started, cpu_started) -> None:
    from rosa.app.checkpoint import save_checkpoint
    from rosa.schedule.state import snapshot_tensors

    rosa_state = schedule.state_dict() if schedule is not None else {"mask_fixed_step": None, "snapshot": {}}
    elapsed = time.perf_counter() - started
    mine = {
        "step": step,
        "losses": state["losses"],
        "resumed_at": state["resumed_at"],
        "segments": [*state["segments"], {"from_step": state["step"], "commit": provenance.git_commit()}],
        "settings": state["settings"],
        "schedule_events": state["schedule_events"] + (schedule.events if schedule is not None else []),
        "mask_fixed_step": rosa_state["mask_fixed_step"],
        "train_seconds": state["train_seconds"] + elapsed,
        "wall_seconds": state["wall_seconds"] + elapsed,
        "cpu_seconds": state["cpu_seconds"] + time.process_time() - cpu_started,
    }
    save_checkpoint(
        work,
        step,
        model,
        optimizer,
        lr_schedule,
        snapshot_tensors(rosa_state),
        {"sampler": sampler.state_dict(), STATE_KEY: mine},
        keep=1,
    )


def _restore(checkpoint: Path, model, optimizer, lr_schedule, sampler, settings: dict) -> dict[str, Any]:
    """Load ``checkpoint`` into the freshly built run; return this module's state (with the snapshot). A
    checkpoint trained with other settings is refused (checkpoints of commit c3f29a5 recorded none)."""
    mine = _module_state(checkpoint)  # (_latest has made sure it exists)
    saved_settings = _canonical(mine.get("settings"))  # (None: a checkpoint of c3f29a5)
    if saved_settings is not None and saved_settings != settings:
        changed = sorted(
            f"{part}.{k}"
            for part in ("recipe", "adapter")
            for k in set(saved_settings[part] or {}) | set(settings[part] or {})
            if (saved_settings[part] or {}).get(k) != (settings[part] or {}).get(k)
        )
        raise RuntimeError(
            f"{checkpoint} was trained with other settings ({', '.join(changed)}): remove {checkpoint.parent.parent} "
            "to train this run over"
        )
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from rosa.app.checkpoint import load_checkpoint, restore_optimizer
    from rosa.schedule.state import snapshot_from
    from rosa.serialization import check_adapter_folder

    tensors, saved = load_checkpoint(checkpoint)
    if (checkpoint / "adapter_config.json").read_text().find('"ROSA"') >= 0:
        check_adapter_folder(checkpoint)  # the checks any RoSA adapter folder a user gives goes through
    set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
    restore_optimizer(optimizer, tensors, saved)
    lr_schedule.load_state_dict(saved["lr_scheduler"])
    sampler.load_state_dict(saved["sampler"])
    torch.set_rng_state(tensors["rng.torch"])
    state = {**_fresh_state(), **mine}
    if state["step"] != saved["step"] or len(state["losses"]) != state["step"]:
        raise RuntimeError(
            f"{checkpoint}: inconsistent checkpoint (step {saved['step']}); delete it to restart"
        )
    state["snapshot"] = snapshot_from(tensors)
    state["resumed_at"] = [*state["resumed_at"], state["step"]]
    if not state["segments"]:  # a checkpoint written before segments were recorded
        state["segments"] = [{"from_step": 0, "commit": "not recorded"}]
    print(f"resumed at step {state['step']} from {checkpoint}", flush=True)
    return state


def work_folder(results: Path, key: str) -> Path:
    """Where the run ``key`` of the results file ``results`` keeps its checkpoints while it trains (beside the
    file, ignored by git; :func:`remove_work` once the run is recorded)."""
    return results.with_name(f".{results.name}.work") / key.replace("/", "-")


def remove_work(work: Path) -> None:
    """Delete a finished run's checkpoints (only what ``train_once`` wrote there)."""
    import shutil

    if (work / "checkpoints").is_dir():
        shutil.rmtree(work / "checkpoints")
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()


def steps_for_epochs(rows: int, batch: int, epochs: float = 1.0) -> int:
    return math.ceil(epochs * rows / batch)
