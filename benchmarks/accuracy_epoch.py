"""RoSA against LoRA where the paper makes its claim: one epoch, 500 test rows per task, several seeds.

SmolLM2-135M (the package's offline default: the Q4_1 GGUF release expanded to fp32, not the original bf16
weights) is fine-tuned on ViGGO (sentence -> meaning representation) and SQL (question + tables -> query) from
``../shared/data`` and scored by exact match of greedy generations.

Rows (``splits``). This protocol extends the first one (``benchmarks/accuracy.py``, 150 steps, 200 test rows)
so that no row that ever chose a setting is a test row: its 200 test rows stay test rows and 300 more are carved
from its training rows (500 in all: one run's binomial standard error is about 2 points); its 64 validation rows
stay validation rows on SQL (with 136 more carved from training, 200 in all) and are left out on ViGGO, whose own
``valid.csv`` (714 rows) validates. Training uses every other row: 4,539 (ViGGO) and 2,800 (SQL).

Budgets count trainable weights in the adapted linear layers (q, k, v, o, gate, up, down of the 30 decoder
layers): ``low`` is LoRA rank 4's worth (1.15% of the linear weights), ``mid`` rank 16's (4.6%). LoRA is PEFT's
own (``all-linear``, alpha = 2r); RoSA spends the same budget on a rank and the density that fills the rest. The
split is chosen at ``low`` and keeps its share of the budget at ``mid`` (``r2``: rank 2 of 4 at low, 8 of 16 at mid).

Every run trains through ``finetune.train_once`` (the loop a PEFT user writes; RoSA's schedule runs inside the
optimizer step, from the library).

Learning rates: one rule for every method. Each (task, budget) trains at the rate the first protocol's policy
kept at 150 steps (``RATES``: probes, then two finalists trained in full, lower validation loss; recorded in
docs/benchmarks/accuracy.json, a test checks the table against it). At every cell the policy kept the same rate
for LoRA and for RoSA. ``--other-finalist`` trains a comparison run at the finalist the policy did not keep
(``OTHER_FINALISTS``), reported beside its seed's run at the kept rate and never in the comparison: whether
validation at one epoch would have kept the same rate. Every run: batches of 8 (length-grouped, seeded), linear
warm-up over 10% of the steps then cosine, AdamW without weight decay, clipping at 1.0, fp32 weights; the same batches for both methods of a seed.

RoSA's schedule is the library's (``rosa.schedule.RosaSchedule``, from the RosaConfig): the mask from the first 8
micro-batches of training, then A and B restart and everything that starts re-warms up over 10% of the steps;
sparse values at ``lr / sparse_lr_ratio``. A rank-0 split (sparse only) scores its mask on the same 8 batches
before step 0. (Runs recorded at commit 1e61711 trained in this script's own loop with the same rules and a
grouped optimizer: ``rosa.optim.create_rosa_optimizer``.)

Parts:

- ``candidates``: RoSA's defaults, chosen on validation loss only (no test rows): 150 steps, seed 0, budget
  ``low``, both tasks, one coordinate at a time (each stage at the best value of the stages before): the fisher
  granularity (per example / per micro-batch) at the first protocol's split (rank 2), then the split (rank 0,
  1, 2, 3 with the density filling the budget, or ``auto``: ``rosa.split.plan_split``), then the sparse
  rate (lr / 3.5, lr, 2 lr). (The full granularity x split grid would cost four more runs per task, about
  two CPU-hours: the CPU time went to seeds.) ``lora-reference`` trains LoRA at 150 steps (validation only),
  the yardstick: a candidate's score is its validation loss over LoRA's on the same task, averaged over the
  two tasks.
- ``comparison``: one epoch, LoRA and RoSA (with the chosen defaults) at each budget and seed, test rows scored.

Resumable: each finished run is added to the JSON at once (``results_store``), so two processes (one per core,
``--threads 1``) can share it; a run already in the file is skipped, and a run stopped midway (Ctrl-C, SIGTERM,
a killed process) goes on from its last checkpoint (every 25 steps, in ``.accuracy_epoch.json.work/``).

    python benchmarks/accuracy_epoch.py --part lora-reference candidates --threads 1
    python benchmarks/accuracy_epoch.py --part comparison --methods lora --budgets low --seeds 0 1 2 --threads 1
    python benchmarks/accuracy_epoch.py --part comparison --other-finalist --tasks sql --seeds 0 --threads 1
    python benchmarks/accuracy_epoch.py --report
"""

from __future__ import annotations

import argparse
import math
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
OUT = ROOT / "docs" / "benchmarks" / "accuracy_epoch.json"
PLOT = OUT.with_suffix(".png")

TASKS = ("viggo", "sql")
TASK_FILES = {"viggo": "viggo/train.csv", "sql": "sql/train.jsonl"}
FIRST_SPLIT_SEED, FIRST_TEST_ROWS, FIRST_VAL_ROWS = 1234, 200, 64  # the first protocol's carving
MORE_TEST_ROWS, MORE_VAL_ROWS = 300, 136
BATCH, MAX_LENGTH, MASK_STEPS, WARMUP_FRACTION = 8, 256, 8, 0.1
CANDIDATE_STEPS = 150
EVAL_BATCH = 64  # rows per generation batch when scoring the test rows
BUDGETS = {"low": 4, "mid": 16}  # the LoRA rank whose trainable count is the budget
CANDIDATE_BUDGET = "low"  # the budget the candidates choose RoSA's split at (see split_rank)
# The rate the first protocol's policy kept at 150 steps, the same for LoRA and RoSA at every cell.
RATES = {("viggo", "low"): 9e-3, ("sql", "low"): 3e-3, ("viggo", "mid"): 3e-3, ("sql", "mid"): 3e-3}
# The finalist the policy did not keep, per (task, budget, method) (also a copy, checked against accuracy.json):
# ``--other-finalist`` trains it for one epoch, so one-epoch validation can say whether it would have kept the same.
OTHER_FINALISTS = {
    ("viggo", "low", "lora"): 3e-3, ("viggo", "low", "rosa"): 2.7e-2,
    ("sql", "low", "lora"): 9e-3, ("sql", "low", "rosa"): 9e-3,
    ("viggo", "mid", "lora"): 9e-3, ("viggo", "mid", "rosa"): 9e-3,
    ("sql", "mid", "lora"): 1e-3, ("sql", "mid", "rosa"): 1e-3,
}  # fmt: skip
GRANULARITIES = ("example", "micro_batch")
SPLITS = ("r2", "r1", "r3", "r0", "auto")  # the first protocol's split first: the granularity is chosen there
SPARSE_RATIOS = (1.0, 0.5)  # the third stage, beside the first protocol's lr / 3.5
DEFAULTS = {"granularity": "example", "split": "r2", "sparse_lr_ratio": 3.5}  # the library's, before any ran


@dataclass(frozen=True)
class Spec:
    task: str
    method: str  # "lora" or "rosa"
    budget: str = "low"
    steps: int | None = None  # None: one epoch
    seed: int = 0
    granularity: str = "example"
    # "r<k>": k/4 of the budget on rank, the density filling the rest (split_rank); or "auto"
    split: str = "r2"
    sparse_lr_ratio: float = 3.5
    score_test: bool = True
    other_finalist: bool = False  # at the policy's other finalist rate (OTHER_FINALISTS), not the kept one

    @property
    def key(self) -> str:
        length = "epoch" if self.steps is None else f"{self.steps}"
        variant = (
            f"/{self.granularity}/{self.split}/sr{self.sparse_lr_ratio:g}" if self.method == "rosa" else ""
        )
        rate = f"/lr{self.lr:g}" if self.other_finalist else ""
        return f"{self.task}/{self.method}/{self.budget}/{length}{variant}{rate}/seed{self.seed}"

    @property
    def lr(self) -> float:
        if self.other_finalist:
            return OTHER_FINALISTS[(self.task, self.budget, self.method)]
        return RATES[(self.task, self.budget)]


def empty_results() -> dict[str, Any]:
    return {"settings": settings(), "runs": {}}


def settings() -> dict[str, Any]:
    return {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF expanded to fp32)",
        "test_rows": FIRST_TEST_ROWS + MORE_TEST_ROWS,
        "batch": BATCH,
        "max_length": MAX_LENGTH,
        "mask_steps": MASK_STEPS,
        "warmup_fraction": WARMUP_FRACTION,
        "candidate_steps": CANDIDATE_STEPS,
        "budgets_lora_rank": BUDGETS,
        "rates": {f"{t}/{b}": lr for (t, b), lr in RATES.items()},
    }


# ------------------------------------------------------------------------------------------------ data


def splits(task: str) -> tuple[list, list, list]:
    """(train, validation, test) examples; see the module docstring."""
    from rosa.app.data import load_examples, split_rows

    rows = load_examples(task, DATA / TASK_FILES[task], split="train")
    rest, first_test = split_rows(rows, val_size=FIRST_TEST_ROWS, seed=FIRST_SPLIT_SEED)
    first_train, first_val = split_rows(rest, val_size=FIRST_VAL_ROWS, seed=FIRST_SPLIT_SEED + 1)
    train, more_test = split_rows(first_train, val_size=MORE_TEST_ROWS, seed=FIRST_SPLIT_SEED + 2)
    if task == "viggo":
        val = load_examples(task, DATA / "viggo" / "valid.csv", split="validation")
    else:
        train, more_val = split_rows(train, val_size=MORE_VAL_ROWS, seed=FIRST_SPLIT_SEED + 3)
        val = first_val + more_val
    return train, val, first_test + more_test


# ------------------------------------------------------------------------------------------------ one run


def split_rank(split: str, budget: str) -> int:
    """RoSA's rank for a fixed split at ``budget``. The candidates choose the split at the budget ``low`` (LoRA
    rank 4's worth), so ``r<k>`` names the share of the budget spent on rank: k/4 of it. At another budget the
    share is kept (``r2`` is rank 8 of mid's 16), as the first protocol did (half the budget's rank)."""
    k = int(split.removeprefix("r"))
    candidates = BUDGETS[CANDIDATE_BUDGET]
    if not 0 <= k <= candidates:
        raise ValueError(f"split {split} does not fit the budget of LoRA rank {candidates}")
    r, rest = divmod(k * BUDGETS[budget], candidates)
    if rest:
        raise ValueError(f"split {split} keeps no whole rank at budget {budget}")
    return r


def rosa_adapter(spec: Spec, warmup: int):
    """The function ``finetune.train_once`` calls to build RoSA at ``spec``'s split of the budget: rank ``r``
    with the density filling the rest (alpha = 2r as LoRA's), or ``auto``: ``rosa.split.plan_split`` chooses
    from the pretrained model's gradients on the run's first batches."""
    from rosa import RosaConfig
    from rosa.split import plan_split

    def build(model: torch.nn.Module, first: list) -> tuple[Any, dict[str, Any]]:
        shapes = finetune.linear_shapes(model)
        budget_rank = BUDGETS[spec.budget]
        r = budget_rank // 2 if spec.split == "auto" else split_rank(spec.split, spec.budget)
        density = finetune.filling_density(shapes, budget_rank, r)
        config = RosaConfig(
            task_type="CAUSAL_LM",
            r=r,
            lora_alpha=max(1, 2 * r),
            density=density,
            target_modules="all-linear",
            fisher_granularity=spec.granularity,
            warmup_steps=0,
            mask_steps=MASK_STEPS,
            restart_after_mask=True,
            rewarmup_steps=warmup,
            sparse_lr_ratio=spec.sparse_lr_ratio,
        )
        if spec.split != "auto":
            return config, {"rank": r, "density": density}
        plan = plan_split(model, config, first[:MASK_STEPS], budget_rank=budget_rank)
        return plan.config, {"split_plan": plan.summary()}

    return build


def train_once(spec: Spec, work: Path | None = None) -> dict[str, Any]:
    """Fine-tune a fresh model as ``spec`` says (``finetune.train_once``, checkpoints in ``work``)."""
    from peft import LoraConfig

    examples = splits(spec.task)
    steps = spec.steps or finetune.steps_for_epochs(len(examples[0]), BATCH)
    recipe = finetune.Recipe(
        lr=spec.lr,
        steps=steps,
        seed=spec.seed,
        batch=BATCH,
        max_length=MAX_LENGTH,
        warmup_fraction=WARMUP_FRACTION,
    )
    if spec.method == "lora":
        rank = BUDGETS[spec.budget]
        adapter = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM")
    else:
        adapter = rosa_adapter(spec, recipe.warmup)
    result = finetune.train_once(
        examples, spec.task, adapter, recipe, score_test=spec.score_test, eval_batch=EVAL_BATCH, work=work,
        desc=spec.key,
    )  # fmt: skip
    return {"spec": asdict(spec), **result}


# ------------------------------------------------------------------------------------------------ the suite


def lora_references(tasks: list[str]) -> list[Spec]:
    return [Spec(t, "lora", steps=CANDIDATE_STEPS, score_test=False) for t in tasks]


def candidates(results: dict[str, Any], tasks: list[str]) -> list[Spec]:
    """The candidates of the next stage whose predecessors have all run (one coordinate at a time, each at the
    best value of the ones before): the granularity at the first protocol's split, then the split at the
    better granularity, then the sparse rate at the best split."""
    base = Spec(TASKS[0], "rosa", steps=CANDIDATE_STEPS, score_test=False)
    specs = [replace(base, task=t, granularity=g, split=SPLITS[0]) for g in GRANULARITIES for t in tasks]
    best = chosen_defaults(results, stage=1)
    if best is not None:
        specs += [
            replace(base, task=t, granularity=best["granularity"], split=s) for s in SPLITS[1:] for t in tasks
        ]
    best = chosen_defaults(results, stage=2)
    if best is not None:
        specs += [
            replace(base, task=t, **{**best, "sparse_lr_ratio": r}) for r in SPARSE_RATIOS for t in tasks
        ]
    return specs


def comparison(methods: list[str], budgets: list[str], seeds: list[int], defaults: dict) -> list[Spec]:
    """One epoch; RoSA with the chosen defaults. Seeds outermost: each seed's pairs complete before the next."""
    return [
        Spec(task, method, budget, seed=seed, **(defaults if method == "rosa" else {}))
        for seed in seeds
        for budget in budgets
        for task in TASKS
        for method in methods
    ]


def run(specs: list[Spec], path: Path) -> None:
    """Train what the file lacks; a spec another live process is training (its claim) is left to it."""
    for spec in specs:
        if spec.key in results_store.load(path, empty_results())["runs"]:
            print(f"done already: {spec.key}", flush=True)
            continue
        with results_store.claim(path, spec.key) as mine:
            if not mine:
                print(f"another process is training {spec.key}", flush=True)
                continue
            if spec.key in results_store.load(path, empty_results())["runs"]:  # finished while we looked
                continue
            print(f"run {spec.key} at lr {spec.lr:g}", flush=True)
            work = finetune.work_folder(path, spec.key)
            result = train_once(spec, work)
            results_store.record(path, "runs", spec.key, result, empty_results())
            finetune.remove_work(work)
        score = f"exact match {result['exact_match']:.1%}, " if "exact_match" in result else ""
        print(
            f"  {spec.key}: {score}val loss {result['val_loss']:.4f} ({result['wall_seconds']:.0f} s)",
            flush=True,
        )


# ------------------------------------------------------------------------------------------------ choosing


def candidate_scores(results: dict[str, Any]) -> dict[tuple, float]:
    """Mean over the tasks of a candidate's validation loss over LoRA's (150 steps, seed 0), for the candidates
    run on every task."""
    runs = results["runs"]
    lora = {t: runs.get(s.key) for t, s in zip(TASKS, lora_references(list(TASKS)))}
    scores: dict[tuple, list[float]] = {}
    for run in runs.values():
        s = run["spec"]
        if s["method"] != "rosa" or s["steps"] != CANDIDATE_STEPS or lora.get(s["task"]) is None:
            continue
        variant = (s["granularity"], s["split"], s["sparse_lr_ratio"])
        scores.setdefault(variant, []).append(run["val_loss"] / lora[s["task"]]["val_loss"])
    return {v: sum(r) / len(r) for v, r in scores.items() if len(r) == len(TASKS)}


def chosen_defaults(results: dict[str, Any], stage: int = 3) -> dict[str, Any] | None:
    """The lowest mean relative validation loss after ``stage`` stages (1: the granularity, at the first
    protocol's split; 2: the split, at that granularity; 3: the sparse rate, at that split), or None while a
    candidate of those stages has not run on every task."""
    scores = candidate_scores(results)
    ratio = DEFAULTS["sparse_lr_ratio"]
    stages = [
        lambda best: [(g, SPLITS[0], ratio) for g in GRANULARITIES],
        lambda best: [(best[0], s, ratio) for s in SPLITS],
        lambda best: [(best[0], best[1], r) for r in (ratio, *SPARSE_RATIOS)],
    ]
    best = None
    for choices in stages[:stage]:
        grid = choices(best)
        if any(v not in scores for v in grid):
            return None
        best = min(grid, key=scores.get)
    return {"granularity": best[0], "split": best[1], "sparse_lr_ratio": best[2]}


# ------------------------------------------------------------------------------------------------ report


def summary(results: dict[str, Any]) -> str:
    """The README's short evidence: the comparison and its verdict, or how far the protocol has got."""
    st = results["settings"]
    head = (
        f"**One epoch** (the paper's length), {st['model']}, {st['test_rows']} test rows per task, LoRA and RoSA "
        "on the same batches at the same rate (`benchmarks/accuracy_epoch.py`; details in "
        "[docs/benchmarks.md](docs/benchmarks.md)):"
    )
    comparison = _comparison(results)
    if not comparison:
        return head + "\n\n" + _progress(results)
    check = _rate_check(results)
    return head + "\n\n" + comparison + ("\n\n" + check if check else "")


COMPARISON_SEEDS = {"low": 3, "mid": 2}  # seeds per budget the comparison asks for (both methods, both tasks)


def _progress(results: dict[str, Any]) -> str:
    """How far the protocol has got, in one paragraph: the candidates' choices so far, the comparison's runs."""
    runs = [r for r in results["runs"].values() if "val_loss" in r]
    candidates_run = sum(
        r["spec"]["method"] == "rosa" and r["spec"]["steps"] == CANDIDATE_STEPS for r in runs
    )
    compared = sum(len(seeds) for methods in _cells(results).values() for seeds in methods.values())
    planned = sum(2 * len(TASKS) * n for n in COMPARISON_SEEDS.values())
    chosen = []
    for stage, describe in enumerate(
        (
            lambda d: f"fisher per {d['granularity'].replace('_', '-')}",
            lambda d: f"split {d['split']}",
            lambda d: f"sparse lr / {d['sparse_lr_ratio']:g}",
        ),
        1,
    ):
        decided = chosen_defaults(results, stage=stage)
        if decided is None:
            break
        chosen.append(describe(decided))
    so_far = (
        f"the candidates chose {', '.join(chosen)} ({len(chosen)} of 3 stages)"
        if chosen
        else "none chosen yet"
    )
    return (
        f"Not measured yet. RoSA's defaults are chosen on validation loss by 150-step candidates, one coordinate "
        f"at a time ({candidates_run} candidate runs so far; {so_far}); {compared} of the comparison's {planned} "
        f"one-epoch runs {'has' if compared == 1 else 'have'} finished."
    )


def report(results: dict[str, Any], plot: Path | None = None) -> str:
    """The markdown the docs show: the comparison with its verdict, every one-epoch run, then the candidates
    (all from the JSON)."""
    parts = (_comparison(results), _other_finalists(results), _epoch_runs(results), _candidates(results))
    text = "\n\n".join(p for p in parts if p) if any(parts) else _progress(results)
    text += "\n"
    print(text)
    if plot is not None:
        _plot(results, plot)
    return text


def _epoch_runs(results: dict[str, Any]) -> str:
    """Each one-epoch run as it finished (paired or not yet), with what ran and where."""
    runs = sorted(
        (r for r in results["runs"].values() if r["spec"]["steps"] is None and "exact_match" in r),
        key=lambda r: (list(BUDGETS).index(r["spec"]["budget"]), r["spec"]["task"], r["spec"]["seed"]),
    )
    if not runs:
        return ""
    lines = markdown_table(
        [
            "task",
            "budget",
            "method",
            "seed",
            "lr",
            "steps",
            "exact match",
            "val loss",
            "training loss: lowest / last (50-step means)",
            "wall / CPU min",
            "commit",
        ]
    )
    for r in runs:
        s = r["spec"]
        method = (
            "LoRA"
            if s["method"] == "lora"
            else f"RoSA ({s['split']}, fisher per {s['granularity']}, sparse lr / {s['sparse_lr_ratio']:g})"
        ) + (" at the other finalist" if s.get("other_finalist") else "")
        lines.append(
            markdown_row(
                [
                    s["task"],
                    s["budget"],
                    method,
                    s["seed"],
                    f"{r['lr']:g}",
                    r["steps"],
                    f"{100 * r['exact_match']:.1f}% ({r['correct']}/{r['count']})",
                    f"{r['val_loss']:.4f}",
                    _trend_text(r),
                    f"{r['wall_seconds'] / 60:.0f} / {r['cpu_seconds'] / 60:.0f}",
                    r["commit"][:7],
                ],
                width=11,
            )
        )
    return "One-epoch runs so far:\n\n" + "\n".join(lines)


def _trend_text(run: dict[str, Any]) -> str:
    trend = loss_trend(run)
    if trend is None:
        return "-"
    return f"{trend[0]:.3f} / {trend[1]:.3f}" + (" **diverged**" if diverged(run) else "")


# A run diverged when its last DIVERGED_WINDOW steps average over DIVERGED_RISE times its lowest such mean. Runs
# that train end within 1.2x of their lowest at this window (every run in accuracy_epoch.json so far); shorter
# windows are noisy (length-grouped batches differ in difficulty: 10-step means ended up to 4x their lowest).
DIVERGED_WINDOW, DIVERGED_RISE = 50, 3.0


def loss_trend(run: dict[str, Any]) -> tuple[float, float] | None:
    """(lowest, last) mean training loss over DIVERGED_WINDOW steps; None for a run shorter than two windows."""
    losses, w = run.get("losses") or [], DIVERGED_WINDOW
    if len(losses) < 2 * w:
        return None
    means = [sum(losses[i : i + w]) / w for i in range(len(losses) - w + 1)]
    return min(means), means[-1]


def diverged(run: dict[str, Any]) -> bool:
    """Training went up and stayed up (the learning rate was too high for this seed): see DIVERGED_RISE."""
    trend = loss_trend(run)
    return trend is not None and trend[1] > DIVERGED_RISE * trend[0]


def _cells(results: dict[str, Any]) -> dict[tuple, dict[str, dict[int, dict]]]:
    cells: dict[tuple, dict[str, dict[int, dict]]] = {}
    for run in results["runs"].values():
        s = run["spec"]
        if s["steps"] is None and "exact_match" in run and not s.get("other_finalist"):
            cells.setdefault((s["task"], s["budget"]), {}).setdefault(s["method"], {})[s["seed"]] = run
    return cells


def _comparison(results: dict[str, Any]) -> str:
    cells = _cells(results)
    if not cells:
        return ""
    rows = markdown_table(
        [
            "task", "budget", "lr", "RoSA (defaults)", "seeds", "LoRA exact match", "RoSA exact match",
            "RoSA - LoRA, per seed (± row SE)", "mean difference ± paired SE", "val loss RoSA / LoRA, per seed",
        ]
    )  # fmt: skip
    verdicts, failed, lower_loss, row_se_shown = [], [], [], False
    for (task, budget), methods in sorted(
        cells.items(), key=lambda c: (list(BUDGETS).index(c[0][1]), c[0][0])
    ):
        lora, rosa = methods.get("lora", {}), methods.get("rosa", {})
        seeds = sorted(set(lora) & set(rosa))
        if not seeds:
            continue
        spec = rosa[seeds[0]]["spec"]
        diffs = [rosa[s]["exact_match"] - lora[s]["exact_match"] for s in seeds]
        mean = sum(diffs) / len(diffs)
        se = _sd(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        # per seed, once: the diverged marks, the row SE and the validation-loss ratio
        marks = {s: _diverged_marks(lora[s], rosa[s]) for s in seeds}
        row_se = {s: row_paired_se(lora[s], rosa[s]) for s in seeds}
        ratio = {s: _loss_ratio(lora[s], rosa[s]) for s in seeds}
        row_se_shown |= any(v is not None for v in row_se.values())
        rows.append(
            markdown_row(
                [
                    task,
                    budget,
                    f"{RATES[(task, budget)]:g}",
                    f"{spec['split']}, fisher per {spec['granularity']}, sparse lr / {spec['sparse_lr_ratio']:g}",
                    ", ".join(map(str, seeds)),
                    _pct([lora[s] for s in seeds]),
                    _pct([rosa[s] for s in seeds]),
                    ", ".join(
                        f"{100 * d:+.1f}"
                        + ("" if row_se[s] is None else f" ± {100 * row_se[s]:.1f} by row")
                        + marks[s]
                        for s, d in zip(seeds, diffs, strict=True)
                    ),
                    f"{100 * mean:+.1f} ± {100 * se:.1f}"
                    if len(diffs) > 1
                    else f"{100 * mean:+.1f} (one seed: no SE)",
                    ", ".join(("-" if ratio[s] is None else f"{ratio[s]:.2f}") + marks[s] for s in seeds),
                ]
            )
        )
        # pairs that both trained, with a loss to compare
        lower_loss += [ratio[s] < 1 for s in seeds if ratio[s] is not None and not marks[s]]
        verdicts.append((task, budget, mean, se, len(seeds)))
        bad = [s for s in seeds if marks[s]]
        if bad:  # named, with the cell as it stands without those seeds beside it
            who = [
                f"{m} seed {s}"
                for m, runs in (("LoRA", lora), ("RoSA", rosa))
                for s in bad
                if diverged(runs[s])
            ]
            kept = [d for s, d in zip(seeds, diffs, strict=True) if s not in bad]
            rest = (
                f"without it: {100 * sum(kept) / len(kept):+.1f}"
                + (f" ± {100 * _sd(kept) / math.sqrt(len(kept)):.1f}" if len(kept) > 1 else " (one seed)")
                if kept
                else "no seed left without it"
            )
            failed.append(f"{task} at {budget}: {', '.join(who)} ({rest})")
    if not verdicts:  # runs of one method only: nothing to compare yet (the progress paragraph says so)
        return ""
    # a verdict only once every cell has the seeds the protocol asks for (3 at the low budget, 2 at mid)
    complete = len(verdicts) == 4 and all(v[4] >= COMPARISON_SEEDS[v[1]] for v in verdicts)
    at_least = [v for v in verdicts if v[2] >= -1e-9]
    ahead = [v for v in verdicts if v[4] > 1 and v[2] > v[3]]
    target = (
        f"Target (one epoch: RoSA's mean >= LoRA's in all four cells, ahead by at least one paired SE in two): "
        f"{len(at_least)} of {len(verdicts)} cells measured have RoSA >= LoRA, {len(ahead)} ahead by more than "
        f"one paired SE; "
        + (
            "**met**."
            if complete and len(at_least) == 4 and len(ahead) >= 2
            else "**not met**."
            if complete
            else "not all cells have their seeds yet."
        )
    )
    if lower_loss:
        target += (
            f" Validation loss (what chose the defaults; the test rows' exact match is the verdict): RoSA's is "
            f"lower in {sum(lower_loss)} of the {len(lower_loss)} pairs in which neither run diverged."
        )
    if failed:  # the rate rule is one for every method: a run it was too high for stays in, and is named
        target += (
            f" Diverged at the cell's rate (training loss ended over {DIVERGED_RISE:g}x its lowest; see the runs "
            f"table): {'; '.join(failed)}. Such a seed's difference measures the rate's stability, not the adapter "
            "at a rate that suits it; the verdict counts it."
        )
    if row_se_shown:
        target = (
            'A seed\'s "± by row" is one standard error of its difference from the test rows alone (paired: both '
            "methods scored on the same rows). Every seed uses the same rows, so it does not shrink with seeds; "
            "the paired SE over seeds is the verdict's. " + target
        )
    return "\n".join(rows) + "\n\n" + target


def _finalist_pairs(results: dict[str, Any]) -> list[tuple[dict, dict, dict, bool]]:
    """(spec, run at the kept rate, run at the other finalist, whether one-epoch validation keeps the kept rate)
    for each run at the other finalist whose seed has its run at the kept rate."""
    cells, pairs = _cells(results), []
    for run in results["runs"].values():
        s = run["spec"]
        if not (s.get("other_finalist") and s["steps"] is None and "exact_match" in run):
            continue
        kept = cells.get((s["task"], s["budget"]), {}).get(s["method"], {}).get(s["seed"])
        if kept is None or any(kept["spec"].get(k) != v for k, v in s.items() if k != "other_finalist"):
            continue
        picks_kept = math.isnan(run["val_loss"]) or kept["val_loss"] <= run["val_loss"]  # nan never wins
        pairs.append((s, kept, run, picks_kept))
    return sorted(pairs, key=lambda p: (list(BUDGETS).index(p[0]["budget"]), p[0]["task"], p[0]["method"]))


def _method_name(method: str) -> str:
    return "LoRA" if method == "lora" else "RoSA"


def _other_finalists(results: dict[str, Any]) -> str:
    """Each run at the policy's other finalist beside its seed's run at the kept rate: would validation at one
    epoch have kept the same rate?"""
    pairs = _finalist_pairs(results)
    if not pairs:
        return ""
    rows = [
        [s["task"], s["budget"], _method_name(s["method"]), s["seed"]]
        + [f"{r['lr']:g}: {100 * r['exact_match']:.1f}%, {r['val_loss']:.4f}" + (" **diverged**" if diverged(r) else "")
           for r in (kept, run)]
        + [f"{(kept if picks_kept else run)['lr']:g}" + ("" if picks_kept else " (not the kept rate)")]
        for s, kept, run, picks_kept in pairs
    ]  # fmt: skip
    table = markdown_table(
        ["task", "budget", "method", "seed", "kept rate: exact match, val loss", "other finalist: the same",
         "one-epoch validation picks"],
        rows,
    )  # fmt: skip
    agree = sum(p[3] for p in pairs)
    return (
        "The rate policy's two finalists at one epoch (the comparison runs at the rate kept at 150 steps; the "
        "other finalist trained for one epoch at the same seed):\n\n" + "\n".join(table) + "\n\n"
        f"One-epoch validation loss picks the rate kept at 150 steps in {agree} of {len(pairs)}."
    )


def _rate_check(results: dict[str, Any]) -> str:
    """The README's sentence on the finalists at one epoch: which kept rates one-epoch validation confirms, and
    each one it would change, with both runs' scores."""
    pairs = _finalist_pairs(results)
    if not pairs:
        return ""
    confirmed = [
        f"{_method_name(s['method'])} on {s['task']} at {s['budget']}" for s, *_, keeps in pairs if keeps
    ]
    changed = [
        f"{_method_name(s['method'])} on {s['task']} at {s['budget']} ({100 * run['exact_match']:.1f}%, val loss "
        f"{run['val_loss']:.4f} at {run['lr']:g} against {100 * kept['exact_match']:.1f}%, {kept['val_loss']:.4f} "
        f"at the kept {kept['lr']:g})"
        for s, kept, run, keeps in pairs
        if not keeps
    ]
    seeds = sorted({s["seed"] for s, *_ in pairs})
    ran = {(s["task"], s["budget"], s["method"]) for s, *_ in pairs}
    budgets = {budget for _, budget, _ in ran}
    missing = [
        f"{_method_name(m)} on {t} at {b} ({lr:g})"
        for (t, b, m), lr in OTHER_FINALISTS.items()
        if b in budgets and (t, b, m) not in ran
    ]
    text = (
        f"Rate check (the 150-step policy's other finalist trained for one epoch, seed {', '.join(map(str, seeds))}"
        f"; table in docs/benchmarks.md): one-epoch validation keeps the 150-step rate for "
        f"{', '.join(confirmed) or 'none'}"
    )
    if changed:
        text += (
            f"; it would pick the other finalist for {'; '.join(changed)}. The comparison above stays at the "
            "150-step rate (its protocol); a cell whose rate one-epoch validation would change is measured at a "
            "rate that does not suit that method"
        )
    if missing:
        text += f". Not run at one epoch: {', '.join(missing)}"
    return text + "."


def _diverged_marks(lora: dict[str, Any], rosa: dict[str, Any]) -> str:
    return (" (LoRA diverged)" if diverged(lora) else "") + (" (RoSA diverged)" if diverged(rosa) else "")


def _loss_ratio(lora: dict[str, Any], rosa: dict[str, Any]) -> float | None:
    """RoSA's validation loss over LoRA's; None where either is missing, not finite or not positive."""
    a, b = lora.get("val_loss"), rosa.get("val_loss")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (a, b)):
        return None
    return b / a


def _scored_rows(run: dict[str, Any]) -> str | None:
    """The run's per-row hits, if it recorded them and they agree with its count of correct rows."""
    hits = run.get("hits")
    if not isinstance(hits, str) or not hits or set(hits) - {"0", "1"}:
        return None
    if hits.count("1") != run.get("correct", hits.count("1")) or len(hits) != run.get("count", len(hits)):
        return None
    return hits


def row_paired_se(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """SE of b's exact match minus a's from their per-row differences on the same test rows: one standard
    error from the choice of rows alone (training noise is what the seeds measure). None unless both runs
    recorded rows, as many of them."""
    rows_a, rows_b = _scored_rows(a), _scored_rows(b)
    if rows_a is None or rows_b is None or len(rows_a) != len(rows_b):
        return None
    diffs = [int(y) - int(x) for x, y in zip(rows_a, rows_b, strict=True)]
    return _sd(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None


def _pct(runs: list[dict]) -> str:
    values = [100 * r["exact_match"] for r in runs]
    mean = sum(values) / len(values)
    return (
        f"{mean:.1f}%"
        + (f" ± {_sd(values):.1f}" if len(values) > 1 else "")
        + f" ({', '.join(f'{v:.1f}' for v in values)})"
    )


def _sd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _candidates(results: dict[str, Any]) -> str:
    scores = candidate_scores(results)
    if not scores:
        return ""
    chosen = chosen_defaults(results)
    runs = results["runs"]
    lora = [f"{runs[s.key]['val_loss']:.4f}" for s in lora_references(list(TASKS))]
    lines = markdown_table(
        [
            "fisher per",
            "split",
            "sparse lr",
            *(f"{t} val loss" for t in TASKS),
            "mean val loss / LoRA's",
            "chosen",
        ],
        [["LoRA (reference)", f"r {BUDGETS['low']}", "-", *lora, 1, ""]],
    )
    for (g, s, r), score in sorted(scores.items(), key=lambda kv: kv[1]):
        spec = Spec(TASKS[0], "rosa", steps=CANDIDATE_STEPS, granularity=g, split=s, sparse_lr_ratio=r)
        losses = [f"{runs[replace(spec, task=t).key]['val_loss']:.4f}" for t in TASKS]
        mark = "yes" if chosen == {"granularity": g, "split": s, "sparse_lr_ratio": r} else ""
        lines.append(markdown_row([g, s, f"lr / {r:g}", *losses, f"{score:.4f}", mark]))
    return "\n".join(lines)


def _seed_points(lora: dict, rosa: dict) -> list[tuple[float | None, list[float], list[float]]]:
    """For LoRA then RoSA: (mean exact match over the seeds both have or None, those seeds' values, the values
    of seeds the other method lacks), in percent."""
    paired = set(lora) & set(rosa)
    points = []
    for runs in (lora, rosa):
        values = [100 * r["exact_match"] for seed, r in sorted(runs.items()) if seed in paired]
        alone = [100 * r["exact_match"] for seed, r in sorted(runs.items()) if seed not in paired]
        points.append((sum(values) / len(values) if values else None, values, alone))
    return points


def _plot(results: dict[str, Any], plot: Path) -> None:
    """Per cell: each seed's exact match for LoRA and RoSA (lines pair a seed); bars are the means over the seeds
    both methods have, as in the table, and a seed only one method has yet is drawn hollow."""
    cells = _cells(results)
    if not cells:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(cells, key=lambda c: (list(BUDGETS).index(c[1]), c[0]))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6), squeeze=False)
    for ax, cell in zip(axes[0], names):
        lora, rosa = cells[cell].get("lora", {}), cells[cell].get("rosa", {})
        for x, (mean, values, alone) in enumerate(_seed_points(lora, rosa)):
            color = ("C0", "C3")[x]
            if values:
                ax.bar(x, mean, color=color, alpha=0.5)
                ax.scatter([x] * len(values), values, color=color, zorder=3)
            if alone:
                ax.scatter([x] * len(alone), alone, facecolors="none", edgecolors=color, zorder=3)
        for seed in set(lora) & set(rosa):
            ax.plot(
                [0, 1], [100 * lora[seed]["exact_match"], 100 * rosa[seed]["exact_match"]], "k-", alpha=0.3
            )
        ax.set_xticks([0, 1], ["LoRA", "RoSA"])
        ax.set_title(f"{cell[0]}, budget {cell[1]}", fontsize=9)
        ax.set_ylabel("exact match, % (500 test rows)")
    fig.suptitle(
        "SmolLM2-135M, one epoch: each dot a seed, lines pair a seed's runs, bars the paired seeds' mean "
        "(hollow: a seed not yet run by the other method)",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    print(f"wrote {plot}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--part", nargs="+", default=[], choices=("lora-reference", "candidates", "comparison")
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=["lora", "rosa"], choices=("lora", "rosa"))
    parser.add_argument("--budgets", nargs="+", default=["low"], choices=sorted(BUDGETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only specs whose key contains one of these"
    )
    parser.add_argument(
        "--other-finalist",
        action="store_true",
        help="comparison at the rate policy's other finalist (OTHER_FINALISTS), not the kept rate",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--report", action="store_true", help="print the tables and draw the plot; no training"
    )
    args = parser.parse_args(argv)
    if args.other_finalist and args.part != ["comparison"]:
        parser.error("--other-finalist applies to --part comparison alone")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report or not args.part:
        report(
            results_store.load(args.out, empty_results()),
            PLOT if args.out == OUT else args.out.with_suffix(".png"),
        )
        return 0
    for part in args.part:
        results = results_store.load(args.out, empty_results())
        if part == "lora-reference":
            specs = lora_references(args.tasks)
        elif part == "candidates":
            specs = candidates(results, args.tasks)
        else:
            defaults = chosen_defaults(results) if "rosa" in args.methods else {}
            if defaults is None:
                raise SystemExit("RoSA's defaults come from the candidates: run --part candidates first")
            specs = comparison(args.methods, args.budgets, args.seeds, defaults)
            specs = [replace(s, other_finalist=args.other_finalist) for s in specs if s.task in args.tasks]
        if args.only:
            specs = [s for s in specs if any(part in s.key for part in args.only)]
        run(specs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
