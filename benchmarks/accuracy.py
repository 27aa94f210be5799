"""Accuracy at a fixed trainable-parameter budget: full fine-tuning, LoRA, sparse-only (SpA) and RoSA on real data.

SmolLM2-135M (the package's offline default: the Q4_1 GGUF release expanded to fp32, not the original bf16
weights) is fine-tuned on ViGGO (sentence -> meaning representation) and SQL (question + tables -> query) from
``../shared/data`` and scored by exact match of greedy generations on a held-out split carved from each training
file with a fixed seed (``SPLIT_SEED``): ``TEST_ROWS`` rows for the score, ``VAL_ROWS`` more for the learning-rate
search, the rest for training. ViGGO's own ``valid.csv`` is not used, so both tasks are treated alike.

Methods, all trained by the same loop (``finetune.train_once``: RoSA's schedule runs inside the optimizer step,
from the library; fisher per example, the statistic of every run here) on the same batches (seed, order, length grouping),
steps, schedule (linear LR warm-up over 10% of the steps, then cosine), AdamW without weight decay, gradient
clipping at 1.0 and fp32 weights:

- ``full``: every weight trains (the reference, no budget).
- ``lora``: PEFT's own LoRA, rank ``r`` on every linear layer of the decoder (``all-linear``: the head is left
  out), alpha = 2r.
- ``spa``: RoSA with rank 0 (sparse only) at the budget's density; its fisher mask is scored on the first
  ``MASK_STEPS`` training batches of the pretrained model before the first step (the library's rule for r = 0).
- ``rosa``: RoSA at half the budget's rank plus the density that fills the rest of the budget: LoRA-only
  warm-up for 10% of the steps, fisher statistics over the next ``MASK_STEPS`` micro-batches of ordinary
  training, then the sparse values and the low-rank factors train together, continuing from the warmed-up
  factors (``restart_after_mask=False``: with so few steps a restart would throw away a tenth of the run).
  Warm-up and collection count toward the same step total as every other method.
- Mask studies at the same budget and learning rate as ``rosa``: ``magnitude`` and ``random`` masks instead of
  fisher, and ``global`` allocation (one top-k across all layers) instead of per layer.
- Diagnostics (``--part diagnostics``, never part of ``all``): single RoSA runs outside the policy that test an
  explanation of a result: RoSA at the rate the policy chose for LoRA, and RoSA with its mask scored before
  step 0 (as SpA's), so that its sparse values start under the LR warm-up instead of at the peak rate.

Budgets count trainable weights in the adapted linear layers (q, k, v, o, gate, up, down of the 30 decoder
layers: 106.2M weights). ``low`` is LoRA r=4: 1.22M trainable weights, 1.15% of the linear weights; RoSA gets
r=2 (0.61M) + density 0.575%; SpA density 1.15%. ``mid`` is LoRA r=16 (4.6%).

Learning rate: the same policy for every method. Each method family has one 3-point grid (``LR_GRIDS``: full
fine-tuning around its usual 1e-5..1e-4, the adapters around theirs); each grid point trains ``PROBE_STEPS``
steps (the same schedule shape, compressed) and the lowest held-out loss on the ``VAL_ROWS`` validation rows
wins; while the winner is at an edge of the grid the grid grows by one x3 step past it (at most twice). The
``FINALISTS`` best probe rates then each train the full run at seed 0, and the lower validation loss is kept (a
25-step probe favours the rate that learns fastest early, which is not always the best over 150 steps: both
4.6%-budget RoSA cells showed it). Other seeds, longer runs and the mask studies reuse the kept rate. Runs kept
by the first, probe-only policy are reused as the finalist at their rate, never trained again or dropped.

Resumable: every finished probe and run is added to the JSON at once (atomically, under a lock, so two suites may
share the file, e.g. one per task with ``--threads 1`` each) and skipped on the next call; a run stopped midway
goes on from its last checkpoint (``finetune.train_once``, every 25 steps and at Ctrl-C). A run (probes excluded) took 12-14 minutes on the 2-core
CPU for SpA and RoSA on ViGGO (LoRA: 24 CPU-minutes over 2 threads); each probe about 2 minutes.

    python benchmarks/accuracy.py                            # everything: main comparison + mask studies
    python benchmarks/accuracy.py --tasks viggo --methods lora rosa
    python benchmarks/accuracy.py --part studies             # mask studies only
    python benchmarks/accuracy.py --tasks viggo --part diagnostics --only mask-at-start
    python benchmarks/accuracy.py --tasks sql --methods lora --part main --lr 1e-3   # one run at a set rate
    python benchmarks/accuracy.py --report                   # table + plot from the JSON, no training
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import finetune
import results_store
import torch
from tables import markdown_row, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "docs" / "benchmarks" / "accuracy.json"
PLOT = ROOT / "docs" / "benchmarks" / "accuracy.png"

TASK_FILES = {"viggo": "viggo/train.csv", "sql": "sql/train.jsonl", "gsm8k": "gsm8k/train.jsonl"}
SPLIT_SEED = 1234
TEST_ROWS = 200
VAL_ROWS = 64
SEED = 0
BATCH = 8
MAX_LENGTH = 256
STEPS = 150
PROBE_STEPS = 25
MASK_STEPS = 8
WARMUP_FRACTION = 0.1
BUDGETS = {"low": 4, "mid": 16}  # LoRA rank that defines the budget
LR_GRIDS = {"full": (1e-5, 3e-5, 1e-4), "adapter": (3e-4, 1e-3, 3e-3)}
MAX_EXTENSIONS = 2
FINALISTS = 2  # probe rates trained for the full length at seed 0; the lower full-run val loss is kept
RATE_POLICY = "finalists"  # recorded on every policy run; runs without it were kept on the probe alone
METHODS = ("lora", "rosa", "spa", "full")  # run order: the comparison that matters most first
STUDIES = (("rosa", "magnitude", "layer"), ("rosa", "random", "layer"), ("rosa", "fisher", "global"))
SPLIT_RANKS = {
    "low": (3,),
    "mid": (12,),
}  # split studies: RoSA at 3/4 of LoRA's rank, density filling the rest
# RoSA schedule candidates (every one restarts under a fresh LR warm-up; they differ in the LoRA-only warm-up
# before the mask statistics and in the sparse values' rate), in the order they run.
CANDIDATES = (
    {"lora_warmup": False, "restart": True, "rewarmup": True, "sparse_lr_ratio": 3.5},
    {"lora_warmup": True, "restart": True, "rewarmup": True, "sparse_lr_ratio": 3.5},
    {"lora_warmup": False, "restart": True, "rewarmup": True, "sparse_lr_ratio": 1.0},
    {"lora_warmup": True, "restart": True, "rewarmup": True, "sparse_lr_ratio": 1.0},
)


@dataclass(frozen=True)
class Spec:
    task: str
    method: str
    budget: str = "low"
    mask_method: str = "fisher"
    allocation: str = "layer"
    steps: int = STEPS
    fixed_lr: float | None = None  # a rate set by hand instead of the policy (candidates, diagnostics)
    mask_at_start: bool = False  # diagnostics only: RoSA's mask scored before step 0 (as SpA's), no warm-up
    # RoSA's schedule (the defaults are the first runs' schedule, so their keys stay as they were):
    lora_warmup: bool = True  # LoRA-only steps (10% of the run) before the mask statistics
    restart: bool = False  # A and B back to their initial values when the mask is fixed
    rewarmup: bool = False  # what starts at the mask gets a fresh LR warm-up (10% of the run)
    sparse_lr_ratio: float = 1.0  # the sparse values train at lr / sparse_lr_ratio
    seed: int = 0  # training order and adapter init
    rank: int | None = None  # RoSA's rank when not half of LoRA's (a split study); the density fills the rest
    epochs: float | None = None  # set when ``steps`` was computed as this many passes over the training rows
    finalist: bool = False  # a full-length run at one of the probes' best rates (not part of the key)

    @property
    def key(self) -> str:
        variant = "" if self.method in ("full", "lora") else f"/{self.mask_method}/{self.allocation}"
        variant += f"/r{self.rank}" if self.rank is not None else ""
        budget = "" if self.method == "full" else f"/{self.budget}"
        extra = (f"/lr{self.fixed_lr:g}" if self.fixed_lr is not None else "") + (
            "/mask-at-start" if self.mask_at_start else ""
        )
        return f"{self.task}/{self.method}{budget}{variant}/{self.steps}{self.schedule_suffix}{extra}"

    @property
    def schedule_suffix(self) -> str:
        """What differs from the first runs' schedule and seed, as a key part ('' for those runs)."""
        parts = [] if self.lora_warmup else ["wl0"]
        parts += (["restart"] if self.restart else []) + (["rewarmup"] if self.rewarmup else [])
        parts += [f"sr{self.sparse_lr_ratio:g}"] if self.sparse_lr_ratio != 1.0 else []
        parts += [f"seed{self.seed}"] if self.seed else []
        return "".join(f"/{p}" for p in parts)

    @property
    def lr_family(self) -> str:
        return "full" if self.method == "full" else "adapter"

    def lr_source(self) -> Spec:
        """The spec whose probes choose this spec's learning rate: the mask and split studies borrow the fisher RoSA's,
        other seeds borrow seed 0's, longer runs the standard length's (a probe is ``PROBE_STEPS`` steps of
        the same schedule shape whatever the run's length, so this is the same probe under its first key)."""
        return replace(
            self,
            finalist=False,
            mask_method="fisher",
            allocation="layer",
            seed=0,
            fixed_lr=None,
            steps=STEPS,
            epochs=None,
            rank=None,
        )


# ------------------------------------------------------------------------------------------------ results


def load_results(path: Path) -> dict[str, Any]:
    return results_store.load(path, empty_results())


def empty_results() -> dict[str, Any]:
    return {"settings": settings(), "probes": {}, "runs": {}}


def save_results(results: dict[str, Any], path: Path) -> None:
    """Write the whole file atomically (a fresh file, or a deliberate rewrite)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results_store.write(results, path)


def record_result(results: dict[str, Any], path: Path, part: str, key: str, value: dict[str, Any]) -> None:
    """Add one probe or run to the file as it is on disk now (``results_store.record``) and to ``results``."""
    results[part][key] = value
    results_store.record(path, part, key, value, empty_results())


def settings() -> dict[str, Any]:
    return {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF expanded to fp32)",
        "split_seed": SPLIT_SEED,
        "test_rows": TEST_ROWS,
        "val_rows": VAL_ROWS,
        "seed": SEED,
        "batch": BATCH,
        "max_length": MAX_LENGTH,
        "probe_steps": PROBE_STEPS,
        "mask_steps": MASK_STEPS,
        "warmup_fraction": WARMUP_FRACTION,
        "budgets_lora_rank": BUDGETS,
        "lr_grids": LR_GRIDS,
        "lr_grid_extensions": MAX_EXTENSIONS,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------------ data


def splits(task: str) -> tuple[list, list, list]:
    """(train, validation, test) examples: the test and validation rows are carved from the training file."""
    from rosa.app.data import load_examples, split_rows

    rows = load_examples(task, DATA / TASK_FILES[task], split="train")
    rest, test = split_rows(rows, val_size=TEST_ROWS, seed=SPLIT_SEED)
    train, val = split_rows(rest, val_size=VAL_ROWS, seed=SPLIT_SEED + 1)
    return train, val, test


# ------------------------------------------------------------------------------------------------ methods


def budget_split(model: torch.nn.Module, spec: Spec) -> dict[str, Any]:
    """Rank and density of ``spec.method`` at the budget of LoRA with rank ``BUDGETS[spec.budget]``."""
    shapes = finetune.linear_shapes(model)
    weights = sum(o * i for o, i in shapes)
    per_rank = sum(o + i for o, i in shapes)
    budget = BUDGETS[spec.budget] * per_rank
    if spec.method == "lora":
        return {"r": BUDGETS[spec.budget], "density": 0.0, "budget": budget, "linear_weights": weights}
    r = 0 if spec.method == "spa" else BUDGETS[spec.budget] // 2 if spec.rank is None else spec.rank
    density = finetune.filling_density(shapes, BUDGETS[spec.budget], r)
    return {"r": r, "density": density, "budget": budget, "linear_weights": weights}


def adapter_for(spec: Spec, warmup: int):
    """The function ``finetune.train_once`` calls to build ``spec``'s method on the pretrained model: (config,
    {"params": its budget split}); config None is full fine-tuning. RoSA's schedule options become RosaConfig
    fields: the library's schedule runs them."""

    def build(model: torch.nn.Module, first: list) -> tuple[Any, dict[str, Any]]:
        if spec.method == "full":
            return None, {"params": {"trainable": sum(p.numel() for p in model.parameters())}}
        split = budget_split(model, spec)
        if spec.method == "lora":
            from peft import LoraConfig

            config = LoraConfig(
                r=split["r"], lora_alpha=2 * split["r"], target_modules="all-linear", task_type="CAUSAL_LM"
            )
            return config, {"params": split}
        from rosa import RosaConfig

        config = RosaConfig(
            task_type="CAUSAL_LM",
            r=split["r"],
            lora_alpha=max(1, 2 * split["r"]),
            density=split["density"],
            target_modules="all-linear",
            mask_method=spec.mask_method,
            mask_allocation=spec.allocation,
            mask_seed=SEED,
            fisher_granularity="example",  # every run of this protocol used it (the default then)
            warmup_steps=warmup if spec.method == "rosa" and spec.lora_warmup else 0,
            mask_steps=MASK_STEPS,
            restart_after_mask=spec.restart,
            rewarmup_steps=warmup if spec.rewarmup else 0,
            sparse_lr_ratio=spec.sparse_lr_ratio,
        )
        return config, {"params": split}

    return build


# ------------------------------------------------------------------------------------------------ one run


def epoch_steps(task: str, epochs: float) -> int:
    """Steps of ``BATCH`` rows that pass ``epochs`` times over the task's training rows."""
    return finetune.steps_for_epochs(len(splits(task)[0]), BATCH, epochs)


def warmup_steps(steps: int) -> int:
    """LR warm-up length of a ``steps``-step run (also RoSA's LoRA-only phase)."""
    return finetune.Recipe(lr=1.0, steps=steps, warmup_fraction=WARMUP_FRACTION).warmup


def train_once(
    spec: Spec, lr: float, steps: int, score_test: bool, desc: str, work: Path | None = None
) -> dict[str, Any]:
    """Fine-tune a fresh copy of the model (``finetune.train_once``): losses, validation loss and, when asked,
    test exact match."""
    if spec.mask_at_start:
        raise SystemExit(
            "mask-at-start diagnostics trained in this script's own loop (their rows record its commit); the "
            "shared loop runs the library's schedule, which collects a rank > 0 mask during training"
        )
    recipe = finetune.Recipe(
        lr=lr,
        steps=steps,
        seed=spec.seed,
        batch=BATCH,
        max_length=MAX_LENGTH,
        warmup_fraction=WARMUP_FRACTION,
    )
    result = finetune.train_once(
        splits(spec.task), spec.task, adapter_for(spec, recipe.warmup), recipe, score_test=score_test,
        eval_batch=16, desc=desc, work=work,
    )  # fmt: skip
    return {"spec": asdict(spec), **result}


# ------------------------------------------------------------------------------------------------ suite


def probe_finalists(spec: Spec, results: dict[str, Any], path: Path) -> list[float]:
    """The ``FINALISTS`` rates with the lowest validation loss after ``PROBE_STEPS`` steps, best first (probes
    cached in the JSON).

    Starts from the method family's 3-point grid; while the best rate sits at an edge of what was probed, the
    grid is extended one step (x3 or /3) past that edge, at most ``MAX_EXTENSIONS`` times, so that the rate
    chosen is an interior minimum for every method alike. A diverged probe (nan) is never a finalist."""
    source = spec.lr_source()
    grid = list(LR_GRIDS[source.lr_family])
    for _ in range(MAX_EXTENSIONS + 1):
        losses = {lr: _probe(source, lr, results, path) for lr in grid}
        finite = {lr: loss for lr, loss in losses.items() if not math.isnan(loss)}
        best = min(finite, key=finite.get) if finite else grid[0]
        if best == grid[-1]:
            grid.append(float(f"{best * 3:.3g}"))
        elif best == grid[0]:
            grid.insert(0, float(f"{best / 3:.3g}"))
        else:
            break
    return sorted(finite, key=finite.get)[:FINALISTS] or [best]


def _probe(source: Spec, lr: float, results: dict[str, Any], path: Path) -> float:
    key = f"{source.key}/probe{PROBE_STEPS}/lr{lr:g}"
    if key not in results["probes"]:
        work = finetune.work_folder(path, key)
        probe = train_once(source, lr, PROBE_STEPS, score_test=False, desc=f"probe {key}", work=work)
        probe.pop("losses")
        record_result(results, path, "probes", key, probe)
        finetune.remove_work(work)
        print(f"  probe {key}: val loss {probe['val_loss']:.4f} ({probe['wall_seconds']:.0f} s)", flush=True)
    return results["probes"][key]["val_loss"]


def run_suite(specs: list[Spec], path: Path) -> dict[str, Any]:
    """Train what is missing. A run at a hand-set rate is stored under its own key (``.../lr<rate>``); a policy
    run's key holds a copy of the run at the rate the policy chose, marked ``same_run_as`` that run."""
    for spec in specs:
        results = load_results(path)  # another suite sharing the file may have finished this spec meanwhile
        if spec.fixed_lr is not None:
            _run_at(spec, results, path)
            continue
        done = results["runs"].get(spec.key)
        if done is not None and done.get("rate_policy") == RATE_POLICY:
            print(f"done already: {spec.key}")
            continue
        lr = policy_rate(spec, results, path)
        if spec == spec.lr_source():
            continue  # policy_rate recorded it
        _keep_earlier_run(spec, results, path)
        twin = replace(spec, fixed_lr=lr)
        _run_at(twin, results, path)
        _record_policy_run(spec, twin, results, path)
    return load_results(path)


def policy_rate(spec: Spec, results: dict[str, Any], path: Path) -> float:
    """The rate the policy keeps for ``spec``, decided once at seed 0 and the standard length (``lr_source``):
    the probes' ``FINALISTS`` best rates each train the full length, and the lower validation loss wins (the
    probes are short, and a rate that learns fastest in 25 steps is not always the best over 150)."""
    source = spec.lr_source()
    decided = results["runs"].get(source.key)
    if decided is not None and decided.get("rate_policy") == RATE_POLICY:
        return decided["lr"]
    finalists = [replace(source, fixed_lr=lr, finalist=True) for lr in probe_finalists(source, results, path)]
    for finalist in finalists:
        _run_at(finalist, results, path)
    results = load_results(path)
    val = {f: results["runs"][f.key]["val_loss"] for f in finalists}
    finite = [f for f in finalists if not math.isnan(val[f])]
    kept = min(finite, key=val.get) if finite else finalists[0]
    _keep_earlier_run(source, results, path)
    _record_policy_run(source, kept, results, path, {f"{f.fixed_lr:g}": val[f] for f in finalists})
    return kept.fixed_lr


def _run_at(spec: Spec, results: dict[str, Any], path: Path) -> None:
    """Make sure the run of ``spec`` (a hand-set rate) exists: an earlier policy's run of the same training at
    the same rate is that run (copied under this key, not trained again); otherwise train it."""
    if spec.key in results["runs"]:
        print(f"done already: {spec.key}")
        return
    policy_key = replace(spec, fixed_lr=None).key
    earlier = results["runs"].get(policy_key)
    if (
        earlier is not None
        and earlier.get("rate_policy") is None
        and math.isclose(earlier["lr"], spec.fixed_lr)
    ):
        run = {**earlier, "spec": asdict(spec), "first_recorded_as": policy_key}
        run.pop("same_run_as", None)
        record_result(results, path, "runs", spec.key, run)
        print(f"  {spec.key}: the run first recorded as {policy_key}", flush=True)
        return
    print(f"run {spec.key}", flush=True)
    work = finetune.work_folder(path, spec.key)
    run = train_once(spec, spec.fixed_lr, spec.steps, score_test=True, desc=spec.key, work=work)
    record_result(results, path, "runs", spec.key, run)
    finetune.remove_work(work)
    print(f"  {spec.key}: exact match {run['exact_match']:.1%} ({run['wall_seconds']:.0f} s)", flush=True)


def _keep_earlier_run(spec: Spec, results: dict[str, Any], path: Path) -> None:
    """Before a policy key is rewritten, the run an earlier policy kept there moves to its hand-set-rate key
    (unless it is already a copy of a run stored there): nothing measured is lost."""
    earlier = results["runs"].get(spec.key)
    if earlier is None or earlier.get("rate_policy") is not None:
        return
    if earlier.get("same_run_as") in results["runs"]:
        return
    _run_at(replace(spec, fixed_lr=earlier["lr"]), results, path)


def _record_policy_run(
    spec: Spec, chosen: Spec, results: dict[str, Any], path: Path, finalists: dict[str, float] | None = None
) -> None:
    run = {
        **results["runs"][chosen.key],
        "spec": asdict(spec),
        "same_run_as": chosen.key,
        "rate_policy": RATE_POLICY,
    }
    run.pop("first_recorded_as", None)
    if finalists is not None:
        run["finalists"] = finalists  # rate -> full-run val loss
    else:
        run.pop("finalists", None)
    record_result(results, path, "runs", spec.key, run)
    print(f"  {spec.key}: the policy keeps lr {chosen.fixed_lr:g} ({chosen.key})", flush=True)


def specs_for(
    tasks: list[str],
    methods: list[str],
    budgets: list[str],
    part: str,
    steps: int,
    path: Path = OUT,
    seeds: tuple[int, ...] = (0,),
    epochs: float | None = None,
) -> list[Spec]:
    """Main comparison first (every task), then the mask studies: the order in which results are most useful.
    RoSA runs the schedule the candidates chose (``choose_schedule``); ``seeds`` apply to LoRA and RoSA.
    ``epochs`` replaces ``steps`` by that many passes over each task's training rows (main part only)."""
    if epochs is not None:
        if part != "main":
            raise SystemExit("--epochs is for the method comparison: use it with --part main")
        steps_of = {task: epoch_steps(task, epochs) for task in tasks}  # each task's data read once
        return [
            replace(spec, steps=steps_of[spec.task], epochs=epochs)
            for spec in specs_for(tasks, methods, budgets, part, steps, path, seeds)
        ]
    specs: list[Spec] = []
    schedule: dict[str, Any] = {}
    if part in ("main", "all", "studies", "splits") and ("rosa" in methods or part != "main"):
        chosen = choose_schedule(load_results(path))
        if chosen is None:
            raise SystemExit(
                "RoSA's schedule is chosen by the candidates: run --part candidates on viggo and sql"
            )
        schedule = chosen
    if part in ("main", "all"):
        for seed in seeds:
            for task in tasks:
                for method in methods:
                    if method in ("full", "spa") and seed != 0:
                        continue
                    extra = {**schedule, "seed": seed} if method == "rosa" else {"seed": seed}
                    specs += (
                        [Spec(task, method, steps=steps)]
                        if method == "full"
                        else [Spec(task, method, b, steps=steps, **extra) for b in budgets]
                    )
    if part in ("studies", "all"):
        specs += [
            Spec(t, m, b, mm, al, steps, **schedule) for t in tasks for b in budgets for m, mm, al in STUDIES
        ]
    if part == "splits":  # RoSA's budget divided otherwise between rank and density, at the default's rate
        specs += [
            Spec(t, "rosa", b, steps=steps, rank=r, **schedule)
            for t in tasks
            for b in budgets
            for r in SPLIT_RANKS[b]
        ]
    if part == "candidates":  # RoSA schedules, all at LoRA's chosen rate; the default is picked on val loss
        for task in tasks:
            for b in budgets:
                lora_rate = _chosen_rate(Spec(task, "lora", b, steps=steps), path)
                if lora_rate is None:
                    raise SystemExit(f"candidates run at LoRA's chosen rate: run {task}/lora/{b} first")
                specs += [
                    Spec(task, "rosa", b, steps=steps, fixed_lr=lora_rate, **schedule)
                    for schedule in CANDIDATES
                ]
    if part == "diagnostics":  # why RoSA trails: its rate, and its late-starting sparse part (not in "all")
        for task in tasks:
            for b in budgets:
                lora_rate = _chosen_rate(Spec(task, "lora", b, steps=steps), path)
                if lora_rate is not None:
                    specs.append(Spec(task, "rosa", b, steps=steps, fixed_lr=lora_rate))
                specs.append(Spec(task, "rosa", b, steps=steps, mask_at_start=True))
    return specs


def _chosen_rate(spec: Spec, path: Path) -> float | None:
    run = load_results(path)["runs"].get(spec.key)
    return None if run is None else run["lr"]


# ------------------------------------------------------------------------------------------------ report


# The first runs' RoSA schedule: LoRA-only warm-up (10%), mask fixed mid-run, no restart, no re-warm-up.
FIRST_SCHEDULE = {"lora_warmup": True, "restart": False, "rewarmup": False, "sparse_lr_ratio": 1.0}


def schedule_of(spec: dict[str, Any]) -> dict[str, Any]:
    """A run's RoSA schedule (runs recorded before these fields existed ran the first schedule)."""
    return {k: spec.get(k, default) for k, default in FIRST_SCHEDULE.items()}


def schedule_label(spec: dict[str, Any]) -> str:
    """The schedule in words, as the tables show it."""
    source = (
        f"from {MASK_STEPS} batches"
        if spec.get("mask_method", "fisher") in ("fisher", "grad")
        else "data-free"
    )
    if spec["method"] == "spa" or spec.get("mask_at_start"):
        return f"mask {source} before step 0" + _ratio_label(spec)
    if spec["method"] != "rosa":
        return "-"
    s = schedule_of(spec)
    parts = [f"{round(100 * WARMUP_FRACTION)}% LoRA-only, then mask" if s["lora_warmup"] else "mask first"]
    parts.append(source)
    parts.append("restart" if s["restart"] else "no restart")
    parts.append(f"re-warm-up {round(100 * WARMUP_FRACTION)}%" if s["rewarmup"] else "no re-warm-up")
    return ", ".join(parts) + _ratio_label(spec)


def _ratio_label(spec: dict[str, Any]) -> str:
    ratio = spec.get("sparse_lr_ratio", 1.0)
    return f"; sparse lr = lr / {ratio:g}" if ratio != 1.0 else ""


def label(run: dict[str, Any]) -> str:
    spec = run["spec"]
    name = {"full": "full FT", "lora": "LoRA", "spa": "SpA", "rosa": "RoSA"}[spec["method"]]
    if _other_mask(spec):
        name += f" ({spec['mask_method']}, {spec['allocation']})"
    if spec.get("rank") is not None:
        name += f" (r {spec['rank']} + density)"
    if spec.get("fixed_lr") is not None and kind(spec) == "diagnostic":
        name += f" [diagnostic: lr {spec['fixed_lr']:g} set by hand]"
    if spec.get("mask_at_start"):
        name += " [diagnostic: mask before step 0]"
    return name


def _other_mask(spec: dict[str, Any]) -> bool:
    """A sparse method whose mask is not the comparison's (fisher, per layer)."""
    return spec["method"] in ("spa", "rosa") and (spec["mask_method"], spec["allocation"]) != (
        "fisher",
        "layer",
    )


def kind(spec: dict[str, Any]) -> str:
    """comparison (the policy's runs of each method), longer run (the same at another length), rate run (a
    rate set by hand: the policy's finalists), schedule candidate, first schedule (superseded RoSA runs), mask
    study, split study, or diagnostic."""
    if spec.get("steps", STEPS) != STEPS:  # the comparison at another length, or a one-off at another length
        standard = kind({**spec, "steps": STEPS})
        if standard == "schedule candidate":  # candidates are compared at the standard length only
            return "rate run"
        return "longer run" if standard == "comparison" else standard
    if spec.get("mask_at_start"):
        return "diagnostic"
    if spec.get("fixed_lr") is not None:
        if not spec.get("finalist") and spec["method"] == "rosa":
            if schedule_of(spec) == FIRST_SCHEDULE:
                return "diagnostic"  # the first schedule at LoRA's rate (why RoSA trailed at first)
            candidate = (  # the candidates ran at the low budget, seed 0, before the finalists existed
                schedule_of(spec) in CANDIDATES
                and spec.get("budget", "low") == "low"
                and spec.get("seed", 0) == 0
                and not _other_mask(spec)
                and spec.get("rank") is None
            )
            if candidate:
                return "schedule candidate"
        return "rate run"
    if _other_mask(spec):
        return "mask study"
    if spec.get("rank") is not None:
        return "split study"
    if spec["method"] == "rosa" and schedule_of(spec) == FIRST_SCHEDULE:
        return "first schedule"
    return "comparison"


KINDS = (
    "comparison",
    "longer run",
    "rate run",
    "schedule candidate",
    "first schedule",
    "mask study",
    "split study",
    "diagnostic",
)
METHOD_ORDER = {"full": 0, "lora": 1, "spa": 2, "rosa": 3}


def ordered_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs by task, then kind, then method, then seed; each with its ``key``."""
    return sorted(
        ({**run, "key": key} for key, run in results["runs"].items()),
        key=lambda r: (
            r["spec"]["task"],
            KINDS.index(kind(r["spec"])),
            METHOD_ORDER[r["spec"]["method"]],
            r["spec"].get("budget", ""),
            r["spec"].get("seed", 0),
        ),
    )


def choose_schedule(results: dict[str, Any], tasks: tuple[str, ...] = ("viggo", "sql")) -> dict | None:
    """The default RoSA schedule: among the candidates run on every task, the lowest validation loss relative
    to LoRA's on the same task, averaged over the tasks (validation rows only; test rows never choose)."""
    runs = [  # the candidates were run at the low budget; LoRA's val loss there is their reference
        r
        for r in results["runs"].values()
        if kind(r["spec"]) == "schedule candidate"
        and r["spec"]["steps"] == STEPS
        and r["spec"]["budget"] == "low"
        and r["spec"]["task"] in tasks
    ]
    lora = _lora_at_rate(list(results["runs"].values()))
    scores = {}
    for schedule in CANDIDATES:
        beside = [  # a candidate counts where LoRA's run at its rate exists to compare it with
            (r, lora[_rate_key(r)])
            for r in runs
            if schedule_of(r["spec"]) == schedule and _rate_key(r) in lora
        ]
        rel = [r["val_loss"] / ref["val_loss"] for r, ref in beside]
        tasks_done = {r["spec"]["task"] for r, _ in beside}
        if set(tasks) <= tasks_done:
            scores[json.dumps(schedule, sort_keys=True)] = sum(rel) / len(rel)
    if not scores:
        return None
    return json.loads(min(scores, key=scores.get))


def _rate_key(run: dict[str, Any]) -> tuple[str, str, str]:
    return run["spec"]["task"], run["spec"].get("budget", ""), f"{run['lr']:g}"


def _lora_at_rate(runs: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """LoRA's seed-0 runs of the standard length by (task, budget, rate): the reference a RoSA run at the same
    rate is compared with (the candidates ran at the rate the first policy chose for LoRA, and stay compared
    with that run whatever rate a later policy keeps)."""
    return {
        _rate_key(r): r
        for r in runs
        if r["spec"]["method"] == "lora"
        and kind(r["spec"]) in ("comparison", "rate run")
        and r["spec"].get("seed", 0) == 0
        and r["spec"]["steps"] == STEPS
    }


def report(results: dict[str, Any], plot: Path | None) -> str:
    """The README's accuracy tables (markdown) from the JSON; also prints them, and draws the plot."""
    runs = ordered_runs(results)
    lines = [
        _protocol(results, runs),
        _verdict(results, runs),
        _comparison_table(runs),
        _longer_table(runs),
        _finalist_table(runs),
        _candidate_table(results, runs),
        _runs_table(runs),
        _mask_window_table(runs),
        _loss_ratio_table(runs),
    ]
    for key, why in results.get("withdrawn", {}).items():
        lines.append(f"withdrawn: {key} ({why['exact_match']:.1%}): {why['why']}")
    text = "\n\n".join(line for line in lines if line) + "\n"
    print(text)
    if plot is not None and runs:
        _plot(_each_training_once(runs), plot)
    return text


def summary(results: dict[str, Any]) -> str:
    """The README's short evidence: the verdict lines, with the setting in one sentence."""
    st, runs = results["settings"], ordered_runs(results)
    budgets = {}  # budget name -> LoRA's params at it
    for r in runs:
        if r["spec"]["method"] == "lora":
            budgets.setdefault(r["spec"]["budget"], r["params"])
    named = "; ".join(
        f"budget {name} = {100 * b['budget'] / b['linear_weights']:.2f}% of the linear weights (LoRA r {b['r']})"
        for name, b in sorted(budgets.items(), key=lambda kv: list(BUDGETS).index(kv[0]))
    )
    return (
        f"**{STEPS} steps** (a quarter to a half of an epoch), {st['model']}, {st['test_rows']} test rows per task, "
        f"every method on the same batches at the same trainable budget ({named}; `benchmarks/accuracy.py`, "
        "tables, rates and per-run commits in [docs/benchmarks.md](docs/benchmarks.md)):\n\n"
        + _verdict(results, runs)
    )


def _each_training_once(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Without the runs a policy key holds a copy of (``same_run_as``): each training once, under its policy
    name."""
    copied = {r["same_run_as"] for r in runs if "same_run_as" in r}
    return [r for r in runs if r["key"] not in copied]


def _protocol(results: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """The setting in words, every number from the JSON."""
    st = results["settings"]
    budgets = {}  # budget name -> LoRA's params at it (the budget is defined by LoRA's rank)
    for r in runs:
        if r["spec"]["method"] == "lora":
            budgets.setdefault(r["spec"]["budget"], r["params"])
    text = (
        f"{st['model']}; {st['test_rows']} test rows and {st['val_rows']} validation rows carved from each "
        f"training file (split seed {st['split_seed']}); batches of {st['batch']} rows (length-grouped), "
        f"{STEPS} steps, linear LR warm-up over {round(100 * st['warmup_fraction'])}% then cosine, AdamW without "
        "weight decay, clipping at 1.0, the same batches for every method of a seed."
    )
    for name in sorted(budgets, key=list(BUDGETS).index):
        budget = budgets[name]
        text += (
            f' Budget "{name}": {budget["budget"]:,} trainable weights = {100 * budget["budget"] / budget["linear_weights"]:.2f}% '
            f"of the {budget['linear_weights'] / 1e6:.1f}M linear weights (LoRA r {budget['r']} on every linear layer); "
            f"RoSA spends it on r {budget['r'] // 2} + the density that fills the rest, SpA on density alone."
        )
    grids = ", ".join(f"{k} {v[0]:g}..{v[-1]:g}" for k, v in st["lr_grids"].items())
    text += (
        f" Learning rate, the same policy for every method: a 3-point grid ({grids}), {st['probe_steps']}-step "
        "probes ranked by validation loss, the grid extended by x3 past an edge while the best sits on it "
        f"(at most {st['lr_grid_extensions']} times); the {FINALISTS} best rates then train the full run at seed "
        "0 and the lower validation loss is kept; other seeds and longer runs reuse that rate. Rows marked "
        '"probe only" were kept on the probes alone (the first policy) and are not in the target.'
    )
    return text


TARGET_CELLS = [("viggo", "low"), ("sql", "low"), ("viggo", "mid"), ("sql", "mid")]
TARGET_SEEDS = {"low": 3, "mid": 1}  # seeds the issue asks for per budget


def _verdict(results: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """RoSA against LoRA per task and budget, as computed from the comparison rows: means over seeds, the
    difference in binomial standard errors of one run on the test rows, and the seed spread."""
    chosen = choose_schedule(results)
    lines = []
    if chosen is not None:
        lines.append(
            "Default RoSA schedule, chosen on validation loss among the candidates: "
            f"{schedule_label({'method': 'rosa', **chosen})}."
        )
    groups: dict[tuple, dict[int, float]] = {}
    for run in runs:  # only rows whose rate the current policy kept
        if (
            kind(run["spec"]) == "comparison"
            and run["spec"]["method"] in ("lora", "rosa")
            and run.get("rate_policy") == RATE_POLICY
        ):
            spec = run["spec"]
            key = (spec["task"], spec["budget"], spec["method"])
            groups.setdefault(key, {})[spec.get("seed", 0)] = run["exact_match"]
    status = {}
    for task, budget in TARGET_CELLS:
        rosa, lora = groups.get((task, budget, "rosa"), {}), groups.get((task, budget, "lora"), {})
        seeds = sorted(set(rosa) & set(lora))  # paired: the same seeds (batches, init) for both
        if not seeds:
            continue
        r, lo = _mean([rosa[s] for s in seeds]), _mean([lora[s] for s in seeds])
        status[(task, budget)] = (_at_least(r, lo), len(seeds))
        se_run = math.sqrt(max(lo * (1 - lo), 1e-9) / results["settings"]["test_rows"])
        text = (
            f"- {task}, budget {budget}, seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}: RoSA "
            f"{100 * r:.1f}% vs LoRA {100 * lo:.1f}%: {'RoSA >= LoRA' if _at_least(r, lo) else 'RoSA < LoRA'}, difference "
            f"{100 * (r - lo):+.1f} points = {(r - lo) / se_run:+.1f} binomial standard errors of one run"
        )
        if len(seeds) > 1:
            diffs = [rosa[s] - lora[s] for s in seeds]
            sd = _mean_sd(diffs)[1]
            se = sd / math.sqrt(len(seeds))
            text += (
                f"; per-seed differences {', '.join(f'{100 * d:+.1f}' for d in diffs)} (paired standard error "
                f"{100 * se:.1f} points" + (f", mean / se {(r - lo) / se:+.1f})" if se > 0 else ")")
            )
        lines.append(text + ".")
    lines += _longer_verdict(runs)
    missing = [
        f"{t} {b}" for t, b in TARGET_CELLS if (t, b) not in status or status[(t, b)][1] < TARGET_SEEDS[b]
    ]
    missed = [f"{t} {b}" for (t, b), (ok, _) in status.items() if not ok]
    lines.append(
        "Target (RoSA's mean >= LoRA's on both tasks at both budgets; "
        + ", ".join(f"{n} seed{'s' * (n > 1)} at budget {b}" for b, n in TARGET_SEEDS.items())
        + "): "
        + ("not settled yet" if missing else "**not met**" if missed else "**met**")
        + (f" (RoSA below LoRA{' so far' if missing else ''}: {', '.join(missed)})" if missed else "")
        + (f"; not yet measured in full: {', '.join(missing)}" if missing else "")
        + "."
    )
    return "\n".join(lines)


def _at_least(a: float, b: float) -> bool:
    """``a >= b`` for means of exact-match fractions: equal counts can differ in the last bit once averaged."""
    return a >= b - 1e-9


def _lora_rosa_pairs(runs: list[dict[str, Any]], kinds: tuple[str, ...]) -> list[tuple[tuple, dict]]:
    """LoRA and RoSA runs of ``kinds`` trained on the same batches, paired by (task, budget, steps, seed), in
    that order; only complete pairs."""
    pairs: dict[tuple, dict[str, dict[str, Any]]] = {}
    for run in runs:
        spec = run["spec"]
        if kind(spec) in kinds and spec["method"] in ("lora", "rosa"):
            key = (spec["task"], spec["budget"], spec["steps"], spec.get("seed", 0))
            if spec["method"] in pairs.get(key, {}):
                raise ValueError(
                    f"two {kind(spec)} runs of {spec['method']} share {key}: which one is compared?"
                )
            pairs.setdefault(key, {})[spec["method"]] = run
    return [(key, pair) for key, pair in sorted(pairs.items()) if len(pair) == 2]


def _longer_verdict(runs: list[dict[str, Any]]) -> list[str]:
    """RoSA against LoRA in the longer runs, paired by task, budget, length and seed (not part of the target)."""
    lines = []
    for (task, budget, steps, seed), pair in _lora_rosa_pairs(runs, ("longer run",)):
        epochs = pair["rosa"]["spec"].get("epochs")
        r, lo = pair["rosa"]["exact_match"], pair["lora"]["exact_match"]
        length = f"{epochs:g} epoch{'s' * (epochs != 1)} = {steps} steps" if epochs else f"{steps} steps"
        lines.append(
            f"- Longer run, {task}, budget {budget}, {length}, seed {seed}: RoSA {100 * r:.1f}% vs LoRA "
            f"{100 * lo:.1f}% ({'RoSA >= LoRA' if _at_least(r, lo) else 'RoSA < LoRA'}, one seed)."
        )
    return lines


def _lora_comparison(runs: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """LoRA's comparison runs by (task, budget, seed): the reference the other tables set RoSA beside."""
    return {
        (r["spec"]["task"], r["spec"]["budget"], r["spec"].get("seed", 0)): r
        for r in runs
        if r["spec"]["method"] == "lora" and kind(r["spec"]) == "comparison"
    }


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = (
        math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        if len(values) > 1
        else float("nan")
    )
    return mean, sd


def _comparison_table(runs: list[dict[str, Any]]) -> str:
    """One row per method, task and budget: the mean and standard deviation over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        if kind(run["spec"]) == "comparison":
            spec = run["spec"]
            groups.setdefault((spec["task"], spec["method"], spec.get("budget", "")), []).append(run)
    if not groups:
        return ""
    rows = markdown_table(
        [
            "task", "method", "budget", "trainable (% of linear weights)", "schedule", "lr", "seeds", "val loss",
            "exact match, mean ± sd (per seed)",
        ]
    )  # fmt: skip
    for (task, method, budget), group in groups.items():
        first = group[0]
        em = [r["exact_match"] for r in group]
        mean, sd = _mean_sd(em)
        per_seed = ", ".join(f"{100 * v:.1f}" for v in em)
        spread = f" ± {100 * sd:.1f}" if len(em) > 1 else ""
        rows.append(
            markdown_row(
                [
                    task,
                    label(first),
                    budget if method != "full" else "-",
                    _share(first),
                    schedule_label(first["spec"]),
                    f"{_rates(first)}{_how_chosen(group)}",
                    ", ".join(str(r["spec"].get("seed", 0)) for r in group),
                    f"{_mean_sd([r['val_loss'] for r in group])[0]:.3f}",
                    f"**{100 * mean:.1f}%**{spread} ({per_seed})",
                ]
            )
        )
    return "\n".join(rows)


def _how_chosen(group: list[dict[str, Any]]) -> str:
    """How the rows' rate was chosen: among the finalists (the current policy), or on the probes alone."""
    probe_only = [str(r["spec"].get("seed", 0)) for r in group if r.get("rate_policy") != RATE_POLICY]
    if not probe_only:
        finalists = next((r["finalists"] for r in group if "finalists" in r), None)
        return f" (kept of {' / '.join(finalists)})" if finalists else ""
    if len(probe_only) == len(group):
        return " (probe only)"
    return f" (probe only: seed {', '.join(probe_only)})"


def _finalist_table(runs: list[dict[str, Any]]) -> str:
    """The policy's decisions: each finalist rate's full run at seed 0 (validation loss decides)."""
    decided = [r for r in runs if "finalists" in r]
    if not decided:
        return ""
    out = markdown_table(
        ["task", "method", "budget", "finalist lr (probe rank)", "full-run val loss", "exact match", "kept"]
    )
    by_key = {r["key"]: r for r in runs}
    for run in decided:
        spec = run["spec"]
        for rank, rate in enumerate(run["finalists"], 1):
            finalist = by_key[Spec(**{**spec, "fixed_lr": float(rate), "finalist": True}).key]
            out.append(
                markdown_row(
                    [
                        spec["task"],
                        label(run),
                        spec["budget"] if spec["method"] != "full" else "-",
                        f"{_rates(finalist)} ({rank})",
                        f"{finalist['val_loss']:.4f}",
                        _em(finalist),
                        "yes" if finalist["key"] == run["same_run_as"] else "",
                    ]
                )
            )
    return "\n".join(out)


def _longer_table(runs: list[dict[str, Any]]) -> str:
    """The comparison at other run lengths (e.g. one epoch), each method at its standard-length rate."""
    rows = [r for r in runs if kind(r["spec"]) == "longer run"]
    if not rows:
        return ""
    out = markdown_table(
        [
            "task", "method", "budget", "steps", "schedule", "lr (chosen at the standard length)", "seed",
            "val loss", "exact match",
        ]
    )  # fmt: skip
    for run in sorted(
        rows, key=lambda r: (r["spec"]["task"], r["spec"]["steps"], METHOD_ORDER[r["spec"]["method"]])
    ):
        spec = run["spec"]
        epochs = spec.get("epochs")
        length = f"{spec['steps']}" + (f" ({epochs:g} epoch{'s' * (epochs != 1)})" if epochs else "")
        out.append(
            markdown_row(
                [
                    spec["task"],
                    label(run),
                    spec.get("budget", "-") if spec["method"] != "full" else "-",
                    length,
                    schedule_label(spec),
                    _rates(run),
                    spec.get("seed", 0),
                    f"{run['val_loss']:.3f}",
                    _em(run),
                ]
            )
        )
    return "\n".join(out)


def _candidate_table(results: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    rows = [r for r in runs if kind(r["spec"]) == "schedule candidate"]
    if not rows:
        return ""
    chosen = choose_schedule(results)
    out = markdown_table(
        [
            "task", "RoSA schedule (A/B at LoRA's chosen rate)", "lr", "val loss", "val loss / LoRA's",
            "exact match", "chosen",
        ]
    )  # fmt: skip
    lora = _lora_at_rate(runs)
    for run in rows:
        ref = lora.get(_rate_key(run))
        rel = f"{run['val_loss'] / ref['val_loss']:.3f}" if ref else "-"
        mark = "yes" if chosen is not None and schedule_of(run["spec"]) == chosen else ""
        out.append(
            markdown_row(
                [
                    run["spec"]["task"],
                    schedule_label(run["spec"]),
                    _rates(run),
                    f"{run['val_loss']:.4f}",
                    rel,
                    _em(run),
                    mark,
                ]
            )
        )
    return "\n".join(out)


def _runs_table(runs: list[dict[str, Any]]) -> str:
    out = markdown_table(
        [
            "task", "kind", "method", "seed", "trainable (% of linear weights)", "schedule", "lr", "val loss",
            "exact match", "wall / CPU min", "threads", "commit",
        ]
    )  # fmt: skip
    for run in _each_training_once(runs):
        spec = run["spec"]
        out.append(
            markdown_row(
                [
                    spec["task"],
                    kind(spec),
                    label(run),
                    spec.get("seed", 0),
                    _share(run),
                    schedule_label(spec),
                    _rates(run),
                    f"{run['val_loss']:.3f}",
                    _em(run),
                    f"{run['wall_seconds'] / 60:.0f} / {run['cpu_seconds'] / 60:.0f}",
                    run.get("threads") or "-",
                    run["commit"][:7] if "commit" in run else "not recorded",
                ]
            )
        )
    return "\n".join(out)


def _share(run: dict[str, Any]) -> str:
    total = run["trainable"]["total"]
    linear = run["params"].get("linear_weights")
    return f"{total:,} ({100 * total / linear:.2f}%)" if linear else f"{total:,} (all)"


def _rates(run: dict[str, Any]) -> str:
    ratio = run["spec"].get("sparse_lr_ratio", 1.0)
    if run["spec"]["method"] in ("spa", "rosa") and ratio != 1.0:
        return f"{run['lr']:g} (sparse {run['lr'] / ratio:.2g})"
    return f"{run['lr']:g}"


def _em(run: dict[str, Any]) -> str:
    return f"{run['exact_match']:.1%} ({run['correct']}/{run['count']})"


def mask_fixed_step(spec: dict[str, Any]) -> int:
    """Index of the first step whose update moves the sparse values (0 when the mask exists before step 0)."""
    from rosa.masks import default_stats

    if spec["method"] == "spa" or spec.get("mask_at_start"):
        return 0
    warmup = warmup_steps(spec["steps"]) if schedule_of(spec)["lora_warmup"] else 0
    return warmup + (MASK_STEPS if default_stats(spec["mask_method"]) else 0)


def _mask_window_table(runs: list[dict[str, Any]], width: int = 5) -> str:
    """Training loss just before and just after RoSA's mask is fixed, as a ratio to LoRA's loss on the same
    batches (every method sees the same batches in the same order, so the ratio removes the batch-to-batch
    noise): a rise after the mask means the first updates of the sparse values hurt. With a restart the loss
    returns towards the pretrained model's by design; the question is how far above that it goes."""
    # the reference at each task and budget: LoRA's seed-0 comparison run (the same batches)
    lora = {key[:2]: r for key, r in _lora_comparison(runs).items() if key[2] == 0}

    def reference(run: dict[str, Any]) -> dict[str, Any] | None:
        return lora.get((run["spec"]["task"], run["spec"]["budget"]))

    rows = [r for r in runs if r["spec"]["method"] == "rosa" and mask_fixed_step(r["spec"]) > width]
    rows = [
        r
        for r in rows
        if reference(r) is not None
        and r["spec"].get("seed", 0) == 0
        and r["spec"]["steps"] == reference(r)["spec"]["steps"]  # the same batches, step by step
    ]
    if not rows:
        return ""
    out = markdown_table(
        [
            "task", "RoSA run", "schedule", "mask fixed after step", f"RoSA / LoRA loss, {width} steps before",
            f"{width} steps after",
        ]
    )  # fmt: skip
    for run in rows:
        m, ref = mask_fixed_step(run["spec"]), reference(run)["losses"]
        before = _mean(run["losses"][m - width : m]) / _mean(ref[m - width : m])
        after = _mean(run["losses"][m + 1 : m + 1 + width]) / _mean(ref[m + 1 : m + 1 + width])
        out.append(
            markdown_row(
                [
                    run["spec"]["task"],
                    label(run),
                    schedule_label(run["spec"]),
                    m,
                    f"{before:.2f}",
                    f"{after:.2f}",
                ]
            )
        )
    return "\n".join(out)


def _loss_ratio_table(runs: list[dict[str, Any]]) -> str:
    """RoSA's training loss over LoRA's on the same batches (the same seed), in the first and the last tenth of
    the run: where in the run RoSA loses or gains ground (comparison and longer runs)."""
    rows = _lora_rosa_pairs(runs, ("comparison", "longer run"))
    if not rows:
        return ""
    out = markdown_table(
        ["task", "budget", "steps", "seed", "RoSA / LoRA training loss, first 10% of steps", "last 10%"]
    )
    for (task, budget, steps, seed), pair in rows:
        tenth = max(1, steps // 10)
        rosa, lora = pair["rosa"]["losses"], pair["lora"]["losses"]
        first = _mean(rosa[:tenth]) / _mean(lora[:tenth])
        last = _mean(rosa[-tenth:]) / _mean(lora[-tenth:])
        out.append(markdown_row([task, budget, steps, seed, f"{first:.2f}", f"{last:.2f}"]))
    return "\n".join(out)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _short(run: dict[str, Any]) -> str:
    """A bar label: the method, then what differs from the comparison run."""
    spec = run["spec"]
    name = label(
        {"spec": {**spec, "mask_method": "fisher", "allocation": "layer", "fixed_lr": None, "rank": None}}
    )
    name = name.replace(" [diagnostic: mask before step 0]", "")
    if kind(spec) == "mask study":
        name += f" {spec['mask_method']}" + (" global" if spec["allocation"] == "global" else "")
    if kind(spec) == "split study":
        name += f" r{spec['rank']}"
    if spec.get("mask_at_start"):
        name += " mask at step 0"
    if kind(spec) == "schedule candidate":
        s = schedule_of(spec)
        name += (" wl10%" if s["lora_warmup"] else " mask first") + f" sr{s['sparse_lr_ratio']:g}"
    elif spec.get("fixed_lr") is not None:
        name += f" lr {spec['fixed_lr']:g}"
    if kind(spec) == "first schedule":
        name += " (first schedule)"
    if kind(spec) == "longer run":
        name += f" {spec['steps']} steps"
    if spec.get("seed", 0):
        name += f" seed {spec['seed']}"
    return name


KIND_COLORS = {
    "comparison": "C0",
    "longer run": "C4",
    "rate run": "C9",
    "schedule candidate": "C3",
    "first schedule": "C7",
    "mask study": "C1",
    "split study": "C5",
    "diagnostic": "C2",
}


def _plot(runs: list[dict[str, Any]], plot: Path) -> None:
    """Left: exact match vs trainable parameters (the comparison, mean over seeds with the spread). Right: every
    LoRA/RoSA/SpA run, as bars coloured by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tasks = sorted({run["spec"]["task"] for run in runs})
    fig, axes = plt.subplots(len(tasks), 2, figsize=(14, 4.5 * len(tasks)), squeeze=False)
    markers = {"full": "s", "lora": "o", "spa": "^", "rosa": "*"}
    for (left, right), task in zip(axes, tasks):
        mine = [r for r in runs if r["spec"]["task"] == task]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for run in (r for r in mine if kind(r["spec"]) == "comparison"):
            groups.setdefault((run["spec"]["method"], run["spec"].get("budget")), []).append(run)
        for (method, _), group in groups.items():
            x = group[0]["trainable"]["total"]
            mean, sd = _mean_sd([100 * r["exact_match"] for r in group])
            left.errorbar(
                x, mean, yerr=sd if len(group) > 1 else None, marker=markers[method], ms=8, capsize=3
            )
            left.annotate(
                f"{label(group[0])} (n={len(group)})",
                (x, mean),
                fontsize=8,
                xytext=(4, 3),
                textcoords="offset points",
            )
        left.set_xscale("log")
        left.set_xlabel("trainable parameters")
        left.set_ylabel(f"exact match, % ({TEST_ROWS} held-out rows)")
        left.set_title(f"SmolLM2-135M on {task}: comparison (mean ± sd over seeds)")
        left.grid(alpha=0.3)
        variants = [r for r in mine if r["spec"]["method"] in ("lora", "spa", "rosa")]
        bars = right.bar(
            range(len(variants)),
            [100 * r["exact_match"] for r in variants],
            color=[KIND_COLORS[kind(r["spec"])] for r in variants],
        )
        right.bar_label(bars, fmt="%.1f", fontsize=6)
        right.set_xticks(
            range(len(variants)), [_short(r) for r in variants], fontsize=6, rotation=35, ha="right"
        )
        right.set_ylabel("exact match, %")
        right.set_title(f"{task}: every LoRA / SpA / RoSA training, coloured by kind", fontsize=8)
        right.legend(
            handles=[Patch(color=color, label=name) for name, color in KIND_COLORS.items()], fontsize=6
        )
        right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    print(f"wrote {plot}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["viggo", "sql"], choices=sorted(TASK_FILES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budgets", nargs="+", default=["low"], choices=sorted(BUDGETS))
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=STEPS)
    length.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="train this many passes over each task's training rows instead of --steps (--part main only); "
        "the learning rate is the one chosen for the standard length",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="seeds (training order, init) for LoRA and RoSA"
    )
    parser.add_argument(
        "--part",
        default="all",
        choices=("main", "studies", "all", "diagnostics", "candidates", "splits"),
        help="main: the method comparison; studies: magnitude/random masks, global allocation; "
        "splits: RoSA at 3/4 of LoRA's rank (density filling the rest); "
        "diagnostics: RoSA at LoRA's chosen rate, and RoSA with its mask scored before step 0",
    )
    parser.add_argument(
        "--report", action="store_true", help="print the table and plot from the JSON; no training"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only the specs whose key contains one of these strings"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="train the selected runs at this rate instead of the policy's (recorded under a key ending /lr<rate>)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.lr is not None and not (math.isfinite(args.lr) and 0 < args.lr < 1):
        parser.error(f"--lr must be a rate between 0 and 1, got {args.lr}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report:
        report(load_results(args.out), PLOT if args.out == OUT else args.out.with_suffix(".png"))
        return 0
    specs = specs_for(
        args.tasks,
        args.methods,
        args.budgets,
        args.part,
        args.steps,
        args.out,
        tuple(args.seeds),
        args.epochs,
    )
    if args.lr is not None:
        specs = [replace(s, fixed_lr=args.lr) for s in specs]
    if args.only:
        specs = [s for s in specs if any(part in s.key for part in args.only)]
    results = run_suite(specs, args.out)
    report(results, PLOT if args.out == OUT else args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
