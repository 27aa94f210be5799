"""benchmarks/accuracy_epoch.py: its rows, its rates, how it chooses RoSA's defaults and how it reports."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, replace

import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("accuracy_epoch")


@pytest.fixture(scope="module")
def first_protocol():
    return load_benchmark("accuracy")


def _rows(examples) -> set[tuple[str, str]]:
    return {(e.prompt, e.response) for e in examples}


@pytest.mark.parametrize("task", ["viggo", "sql"])
def test_test_rows_never_chose_a_setting_or_trained(bench, first_protocol, task):
    """The 500 test rows hold the first protocol's 200 and none of its validation rows; no test or validation
    row is trained on (texts shared across parts are rows the source file itself holds twice: ViGGO has some)."""
    if not bench.DATA.is_dir():
        pytest.skip("../shared/data is not here")
    from collections import Counter

    from rosa.app.data import load_examples

    parts = bench.splits(task)
    assert [len(p) for p in parts] == {"viggo": [4539, 714, 500], "sql": [2800, 200, 500]}[task]
    source = Counter((e.prompt, e.response) for e in load_examples(task, bench.DATA / bench.TASK_FILES[task]))
    twice = {row for row, n in source.items() if n > 1}
    train, val, test = map(_rows, parts)
    first_train, first_val, first_test = map(_rows, first_protocol.splits(task))
    assert first_test <= test and not (first_val & test) - twice
    assert not (train & test) - twice and not (train & val) - twice and not (val & test) - twice
    assert train <= first_train
    if task == "sql":
        assert first_val <= val
    assert [_rows(p) for p in bench.splits(task)] == [train, val, test]  # fixed seeds: the same every call


def _policy_runs(first_protocol) -> list[dict]:
    """The first protocol's comparison runs that its rate policy chose a rate for (seed 0, standard length)."""
    runs = json.loads(first_protocol.OUT.read_text())["runs"]
    return [
        run
        for run in runs.values()
        if run.get("rate_policy") == first_protocol.RATE_POLICY
        and run["spec"].get("seed", 0) == 0
        and run["spec"]["steps"] == first_protocol.STEPS
        and first_protocol.kind(run["spec"]) == "comparison"
    ]


def test_rates_are_what_the_first_protocols_policy_kept(bench, first_protocol):
    """RATES is a copy of decisions recorded in docs/benchmarks/accuracy.json: the same rate for LoRA and RoSA."""
    runs = _policy_runs(first_protocol)
    for (task, budget), rate in bench.RATES.items():
        kept = {
            run["spec"]["method"]: run["lr"]
            for run in runs
            if run["spec"]["task"] == task
            and run["spec"].get("budget") == budget
            and run["spec"]["method"] in ("lora", "rosa")
        }
        assert kept == {"lora": rate, "rosa": rate}, (task, budget, kept)


def test_other_finalists_are_the_finalists_the_policy_did_not_keep(bench, first_protocol):
    """OTHER_FINALISTS is a copy too: per policy run, its recorded finalists less the rate it kept."""
    other = {
        (run["spec"]["task"], run["spec"].get("budget"), run["spec"]["method"]): [
            float(lr) for lr in run["finalists"] if float(lr) != run["lr"]
        ]
        for run in _policy_runs(first_protocol)
        if "finalists" in run
    }
    assert other == {cell: [lr] for cell, lr in bench.OTHER_FINALISTS.items()}


@pytest.mark.parametrize("part", [[], ["candidates"], ["comparison", "candidates"]])
def test_other_finalist_outside_the_comparison_is_refused(bench, part, capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main([*(["--part", *part] if part else []), "--other-finalist"])
    assert (
        exit.value.code == 2
        and "--other-finalist applies to --part comparison alone" in capsys.readouterr().err
    )


def _result(bench, spec, val_loss):
    return {"spec": asdict(spec), "val_loss": val_loss}


def _with(bench, results, spec, val_loss):
    results["runs"][spec.key] = _result(bench, spec, val_loss)


def test_defaults_are_chosen_one_stage_at_a_time_on_validation_loss(bench):
    results = bench.empty_results()
    for spec in bench.lora_references(list(bench.TASKS)):
        _with(bench, results, spec, {"viggo": 0.10, "sql": 0.20}[spec.task])
    assert bench.chosen_defaults(results, stage=1) is None
    stage1 = bench.candidates(results, list(bench.TASKS))
    assert {(s.granularity, s.split) for s in stage1} == {("example", "r2"), ("micro_batch", "r2")}
    # relative val loss: example 0.9 / 1.1 (mean 1.0), micro_batch 0.95 / 1.0 (mean 0.975): micro_batch wins
    for spec, loss in zip(stage1, (0.09, 0.22, 0.095, 0.20)):
        _with(bench, results, spec, loss)
    assert bench.chosen_defaults(results, stage=1)["granularity"] == "micro_batch"
    stage2 = [s for s in bench.candidates(results, list(bench.TASKS)) if s.split != "r2"]
    assert {s.split for s in stage2} == set(bench.SPLITS[1:])
    assert {s.granularity for s in stage2} == {"micro_batch"} and not any(s.score_test for s in stage2)
    assert bench.chosen_defaults(results, stage=2) is None  # not every split has run yet
    for spec in stage2:
        _with(bench, results, spec, 0.05 if spec.split == "r0" else 0.5)
    assert bench.chosen_defaults(results, stage=2)["split"] == "r0"
    stage3 = bench.candidates(results, list(bench.TASKS))[len(stage1) + len(stage2) :]
    assert {(s.split, s.sparse_lr_ratio) for s in stage3} == {("r0", r) for r in bench.SPARSE_RATIOS}
    for spec in stage3:
        _with(bench, results, spec, 0.01 if spec.sparse_lr_ratio == 1.0 else 0.5)
    assert bench.chosen_defaults(results) == {
        "granularity": "micro_batch",
        "split": "r0",
        "sparse_lr_ratio": 1.0,
    }
    assert "| micro_batch | r0 | lr / 1 |" in bench._candidates(results)


def test_comparison_pairs_seeds_and_reports_the_paired_difference(bench):
    results = bench.empty_results()
    defaults = {"granularity": "example", "split": "r1", "sparse_lr_ratio": 3.5}
    specs = bench.comparison(["lora", "rosa"], ["low"], [0, 1, 2], defaults)
    assert [s.seed for s in specs] == [0] * 4 + [1] * 4 + [2] * 4  # each seed's pairs before the next seed
    scores = {("viggo", "lora"): (0.70, 0.72, 0.74), ("viggo", "rosa"): (0.73, 0.74, 0.75)}
    for spec in specs:
        if spec.task == "viggo":
            run = {**_result(bench, spec, 0.1), "exact_match": scores[(spec.task, spec.method)][spec.seed]}
            results["runs"][spec.key] = run
    text = bench._comparison(results)
    # differences +3, +2, +1 points: mean +2.0, paired SE 1 / sqrt(3) = 0.58
    assert "| +3.0, +2.0, +1.0 | +2.0 ± 0.6 |" in text
    assert "1 of 1 cells measured have RoSA >= LoRA, 1 ahead by more than one paired SE" in text
    assert "not all cells have their seeds yet" in text


def test_no_verdict_before_every_cell_has_its_seeds_and_one_seed_shows_no_se(bench):
    results = bench.empty_results()
    defaults = {"granularity": "example", "split": "r1", "sparse_lr_ratio": 3.5}
    for spec in bench.comparison(
        ["lora", "rosa"], ["low", "mid"], [0], defaults
    ):  # four cells, one seed each
        score = 0.5 if spec.method == "lora" else 0.6
        results["runs"][spec.key] = {**_result(bench, spec, 0.1), "exact_match": score}
    text = bench._comparison(results)
    assert "| +10.0 | +10.0 (one seed: no SE) |" in text and "nan" not in text
    assert "4 of 4 cells measured have RoSA >= LoRA, 0 ahead by more than one paired SE" in text
    assert "not all cells have their seeds yet" in text and "not met" not in text


def test_a_finished_run_is_not_trained_again(bench, tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    spec = bench.Spec("viggo", "lora", steps=3)
    bench.results_store.record(path, "runs", spec.key, {"val_loss": 1.0}, bench.empty_results())
    monkeypatch.setattr(bench, "train_once", lambda *a: pytest.fail("trained a finished run"))
    bench.run([spec], path)
    monkeypatch.setattr(bench, "train_once", lambda *a: {"val_loss": 2.0, "wall_seconds": 1})
    bench.run([replace(spec, seed=1)], path)
    runs = json.loads(path.read_text())["runs"]
    assert runs == {
        spec.key: {"val_loss": 1.0},
        replace(spec, seed=1).key: {"val_loss": 2.0, "wall_seconds": 1},
    }


def test_a_run_claimed_by_a_live_process_is_left_to_it(bench, tmp_path, monkeypatch):
    import subprocess
    import sys

    path = tmp_path / "results.json"
    spec = bench.Spec("viggo", "lora", steps=3)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = path.with_name(f".{path.name}.claims")
        with bench.results_store.claim(path, spec.key) as mine:
            assert mine
            marker = next(folder.iterdir())
        marker.write_text(f"{holder.pid}\n{spec.key}\n")  # as if the other process held it
        monkeypatch.setattr(bench, "train_once", lambda *a: pytest.fail("trained a claimed run"))
        bench.run([spec], path)
    finally:
        holder.kill()
        holder.wait()
    # its process gone, the claim is taken over
    monkeypatch.setattr(bench, "train_once", lambda *a: {"val_loss": 1.0, "wall_seconds": 1})
    bench.run([spec], path)
    assert json.loads(path.read_text())["runs"][spec.key]["val_loss"] == 1.0
    assert not any(folder.iterdir())


@pytest.mark.parametrize("split", ["r0", "r1", "r2", "r3", "r4"])
def test_every_split_spends_the_budget_of_lora(bench, split):
    """Rank r plus the density that fills the rest: as many trainable weights as LoRA at the budget's rank
    (counted from the tiny model's layers, not from the formula the benchmark uses)."""
    from tiny_models import tiny_llama

    from rosa import get_rosa_model
    from rosa.mask.layers import mask_layers

    for budget in ("low", "mid"):
        spec = bench.Spec("viggo", "rosa", budget=budget, split=split, sparse_lr_ratio=2.0)
        config, extra = bench.rosa_adapter(spec, warmup=5)(tiny_llama(0), [])
        assert extra == {"rank": config.r, "density": config.density}
        assert config.sparse_lr_ratio == 2.0 and config.rewarmup_steps == 5
        model = get_rosa_model(tiny_llama(0), config)
        layers = mask_layers(model).values()
        lora = sum(p.numel() for n, p in model.named_parameters() if "rosa_A" in n or "rosa_B" in n)
        sparse = sum(layer.in_features * layer.out_features * config.density for layer in layers)
        total = bench.BUDGETS[budget] * sum(layer.in_features + layer.out_features for layer in layers)
        # the split is a share of the budget, chosen at low (LoRA rank 4): r<k> spends k/4 of it on rank
        assert len(layers) == 7 * 2 and lora == int(split[1:]) / 4 * total
        assert lora + sparse == pytest.approx(total)


def test_a_split_beyond_the_budget_is_refused(bench):
    from tiny_models import tiny_llama

    for budget in ("low", "mid"):
        with pytest.raises(ValueError, match="does not fit the budget"):
            bench.rosa_adapter(bench.Spec("viggo", "rosa", budget=budget, split="r5"), warmup=5)(
                tiny_llama(0), []
            )


def test_the_split_keeps_its_share_of_the_budget_at_mid(bench):
    assert [bench.split_rank(f"r{k}", "low") for k in range(5)] == [0, 1, 2, 3, 4]
    assert [bench.split_rank(f"r{k}", "mid") for k in range(5)] == [0, 4, 8, 12, 16]


def test_progress_names_each_choice_made_and_counts_the_comparison(bench):
    results = bench.empty_results()
    assert "none chosen yet" in bench._progress(results) and "0 of the comparison's 20" in bench._progress(
        results
    )
    for spec in bench.lora_references(list(bench.TASKS)):
        _with(bench, results, spec, 0.1)
    for spec in bench.candidates(results, list(bench.TASKS)):
        _with(bench, results, spec, 0.08 if spec.granularity == "micro_batch" else 0.09)
    lora = bench.Spec("viggo", "lora")  # one epoch, scored
    results["runs"][lora.key] = {**_result(bench, lora, 0.1), "exact_match": 0.5}
    text = bench._progress(results)
    assert "4 candidate runs so far; the candidates chose fisher per micro-batch (1 of 3 stages)" in text
    assert "1 of the comparison's 20 one-epoch runs" in text


def test_runs_of_one_method_only_make_no_comparison_table(bench):
    results = bench.empty_results()
    lora = bench.Spec("viggo", "lora")
    results["runs"][lora.key] = {
        **_result(bench, lora, 0.1),
        **{"exact_match": 0.5, "correct": 250, "count": 500, "lr": 9e-3, "steps": 568},
        **{"wall_seconds": 600, "cpu_seconds": 540, "commit": "0123456789abcdef"},
    }
    assert bench._comparison(results) == ""
    assert "1 of the comparison's 20 one-epoch runs has finished" in bench.summary(results)
    assert (
        "| viggo | low | LoRA | 0 | 0.009 | 568 | 50.0% (250/500) | 0.1000 | - | 10 / 9 | 0123456 |"
        in bench.report(results)
    )


def test_a_diverged_run_is_named_and_kept(bench):
    """A run whose training loss rose and stayed up is marked in the runs table and the comparison, and still
    counts (the rate rule is one for every method); a run that trains normally is not marked."""
    results = bench.empty_results()
    defaults = {"granularity": "micro_batch", "split": "r2", "sparse_lr_ratio": 3.5}
    trained = [3.0 - 0.01 * i for i in range(200)]  # falls to 1.0
    blown = trained[:100] + [6.0] * 100  # lowest 50-step mean 2.255, last 6.0: up, but under 3x
    blown_up = trained[:100] + [20.0] * 100  # last 20.0: over 3x its lowest
    for spec in bench.comparison(["lora", "rosa"], ["low"], [0, 1], defaults):
        if spec.task != "viggo":
            continue
        losses = blown_up if (spec.method, spec.seed) == ("lora", 1) else trained
        if (spec.method, spec.seed) == ("rosa", 0):
            losses = blown
        run = {
            **_result(bench, spec, 0.1),
            "exact_match": 0.0 if losses is blown_up else 0.8,
            "correct": 0,
            "count": 500,
            "losses": losses,
            "lr": 9e-3,
            "steps": 200,
            "wall_seconds": 60,
            "cpu_seconds": 60,
            "commit": "0" * 40,
        }
        results["runs"][spec.key] = run
    assert [bench.diverged(r) for r in results["runs"].values()] == [False, False, True, False]
    text = bench._comparison(results)
    assert "| +0.0, +80.0 (LoRA diverged) |" in text
    assert "| 1.00, 1.00 (LoRA diverged) |" in text and "lower in 0 of the 1 pairs in which neither" in text
    assert (
        "Diverged at the cell's rate" in text
        and "viggo at low: LoRA seed 1 (without it: +0.0 (one seed))" in text
    )
    runs = bench._epoch_runs(results)
    assert runs.count("**diverged**") == 1 and "2.255 / 20.000 **diverged**" in runs


def test_a_seed_with_both_runs_rows_shows_their_paired_se(bench):
    """Runs that recorded which test rows they got right pair up row by row; the SE is the sd of the per-row
    differences over sqrt(rows), checked here against McNemar's counts (b rows only LoRA got, c only RoSA)."""
    results = bench.empty_results()
    defaults = {"granularity": "micro_batch", "split": "r2", "sparse_lr_ratio": 3.5}
    rng = random.Random(0)
    lora_hits = "".join(rng.choice("01") for _ in range(500))
    rosa_hits = "".join(rng.choice("01") if rng.random() < 0.2 else h for h in lora_hits)
    for spec in bench.comparison(["lora", "rosa"], ["low"], [0, 1], defaults):
        if spec.task != "viggo":
            continue
        hits = lora_hits if spec.method == "lora" else rosa_hits
        run = {**_result(bench, spec, 0.1), "exact_match": hits.count("1") / 500}
        if spec.seed == 0:  # seed 1 predates per-row scoring: no row SE for it
            run["hits"] = hits
        results["runs"][spec.key] = run
    b = sum(x == "1" and y == "0" for x, y in zip(lora_hits, rosa_hits))
    c = sum(x == "0" and y == "1" for x, y in zip(lora_hits, rosa_hits))
    n, d = 500, (c - b) / 500
    se = math.sqrt(((b + c) / n - d * d) * n / (n - 1) / n)
    assert b + c > 0
    assert bench.row_paired_se(
        results["runs"]["viggo/lora/low/epoch/seed0"],
        results["runs"]["viggo/rosa/low/epoch/micro_batch/r2/sr3.5/seed0"],
    ) == pytest.approx(se, rel=1e-12)
    text = bench._comparison(results)
    assert f"| {100 * d:+.1f} ± {100 * se:.1f} by row, {100 * d:+.1f} |" in text
    assert "one standard error of its difference from the test rows alone" in text
    lora, rosa = (
        results["runs"]["viggo/lora/low/epoch/seed0"],
        results["runs"]["viggo/rosa/low/epoch/micro_batch/r2/sr3.5/seed0"],
    )
    # rows of another length (another test set), rows that disagree with the run's own count, or not 0/1
    for bad in (
        {"hits": rosa_hits[:-1]},
        {"hits": rosa_hits, "correct": rosa_hits.count("1") + 1},
        {"hits": "2"},
    ):
        assert bench.row_paired_se(lora, {**rosa, **bad}) is None


def test_the_comparison_sets_validation_loss_beside_exact_match(bench):
    """Each seed's RoSA / LoRA validation loss, and how many pairs RoSA's is lower in, beside the verdict."""
    results = bench.empty_results()
    defaults = {"granularity": "micro_batch", "split": "r2", "sparse_lr_ratio": 3.5}
    val = {("lora", 0): 0.20, ("rosa", 0): 0.15, ("lora", 1): 0.10, ("rosa", 1): 0.12}
    for spec in bench.comparison(["lora", "rosa"], ["low"], [0, 1], defaults):
        if spec.task == "sql":
            run = {**_result(bench, spec, val[(spec.method, spec.seed)]), "exact_match": 0.4}
            results["runs"][spec.key] = run
    text = bench._comparison(results)
    assert "| +0.0 ± 0.0 | 0.75, 1.20 |" in text
    assert "RoSA's is lower in 1 of the 2 pairs in which neither run diverged." in text


@pytest.mark.parametrize("bad", [0.0, float("nan"), None])
def test_a_pair_without_a_usable_validation_loss_shows_a_dash_and_is_not_counted(bench, bad):
    results = bench.empty_results()
    defaults = {"granularity": "micro_batch", "split": "r2", "sparse_lr_ratio": 3.5}
    for spec in bench.comparison(["lora", "rosa"], ["low"], [0, 1], defaults):
        if spec.task == "sql":
            loss = bad if (spec.method, spec.seed) == ("lora", 1) else 0.2 if spec.method == "lora" else 0.1
            run = {**_result(bench, spec, loss), "exact_match": 0.4}
            if loss is None:
                del run["val_loss"]
            results["runs"][spec.key] = run
    text = bench._comparison(results)
    assert "| 0.50, - |" in text and "RoSA's is lower in 1 of the 1 pairs" in text


def test_the_plot_averages_the_seeds_the_table_pairs_and_keeps_a_lone_seed_apart(bench):
    lora = {0: {"exact_match": 0.80}, 1: {"exact_match": 0.70}, 2: {"exact_match": 0.10}}
    rosa = {1: {"exact_match": 0.75}, 0: {"exact_match": 0.90}}
    (lora_mean, lora_values, lora_alone), (rosa_mean, rosa_values, rosa_alone) = bench._seed_points(
        lora, rosa
    )
    assert lora_values == pytest.approx([80.0, 70.0]) and lora_alone == pytest.approx([10.0])
    # seed 2 (LoRA only) is left out of both means
    assert lora_mean == pytest.approx(75.0) and rosa_mean == pytest.approx(82.5)
    assert rosa_values == pytest.approx([90.0, 75.0]) and rosa_alone == []
    assert bench._seed_points({0: {"exact_match": 0.5}}, {})[0] == (None, [], [pytest.approx(50.0)])


def _epoch_run(bench, spec, exact_match, val_loss):
    return {
        **_result(bench, spec, val_loss),
        "exact_match": exact_match,
        "correct": round(500 * exact_match),
        "count": 500,
        "lr": spec.lr,
        "steps": 350,
        "wall_seconds": 60,
        "cpu_seconds": 60,
        "commit": "0" * 40,
    }


def test_a_run_at_the_other_finalist_is_set_beside_its_seeds_kept_rate_and_stays_out_of_the_comparison(bench):
    results = bench.empty_results()
    defaults = {"granularity": "example", "split": "r2", "sparse_lr_ratio": 3.5}
    kept = [s for s in bench.comparison(["lora", "rosa"], ["low"], [0], defaults) if s.task == "sql"]
    other = [replace(s, other_finalist=True) for s in kept]
    assert all(
        o.key != k.key and o.lr == bench.OTHER_FINALISTS[("sql", "low", o.method)]
        for o, k in zip(other, kept)
    )
    for spec in kept:
        results["runs"][spec.key] = _epoch_run(bench, spec, 0.40, 0.15)
    before = bench._comparison(results)
    assert bench._other_finalists(results) == ""  # nothing at the other finalist yet
    # LoRA's other rate validates better (0.14 < 0.15) and scores higher; RoSA's worse
    results["runs"][other[0].key] = _epoch_run(bench, other[0], 0.45, 0.14)
    results["runs"][other[1].key] = _epoch_run(bench, other[1], 0.30, 0.16)
    assert bench._comparison(results) == before  # the comparison is at the kept rate only
    text = bench._other_finalists(results)
    lora_lr, rosa_lr = (bench.OTHER_FINALISTS[("sql", "low", m)] for m in ("lora", "rosa"))
    kept_lr = bench.RATES[("sql", "low")]
    assert (
        f"| sql | low | LoRA | 0 | {kept_lr:g}: 40.0%, 0.1500 | {lora_lr:g}: 45.0%, 0.1400 | {lora_lr:g} (not the kept rate) |"
        in text
    )
    assert (
        f"| sql | low | RoSA | 0 | {kept_lr:g}: 40.0%, 0.1500 | {rosa_lr:g}: 30.0%, 0.1600 | {kept_lr:g} |"
        in text
    )
    assert "picks the rate kept at 150 steps in 1 of 2" in text
    assert bench._epoch_runs(results).count("at the other finalist") == 2
    assert "4 of the comparison" not in bench._progress(results) and "2 of the comparison" in bench._progress(
        results
    )


def test_an_other_finalist_without_a_finite_validation_loss_is_never_picked(bench):
    results = bench.empty_results()
    defaults = {"granularity": "example", "split": "r2", "sparse_lr_ratio": 3.5}
    kept = next(s for s in bench.comparison(["lora"], ["low"], [0], defaults) if s.task == "viggo")
    other = replace(kept, other_finalist=True)
    results["runs"][kept.key] = _epoch_run(bench, kept, 0.80, 0.03)
    results["runs"][other.key] = _epoch_run(bench, other, 0.0, float("nan"))
    text = bench._other_finalists(results)
    assert f"| {bench.RATES[('viggo', 'low')]:g} |" in text and "not the kept rate" not in text
    assert "in 1 of 1" in text


def test_the_readme_summary_names_each_rate_one_epoch_validation_would_change_and_each_not_run(bench):
    results = bench.empty_results()
    defaults = {"granularity": "example", "split": "r2", "sparse_lr_ratio": 3.5}
    for spec in bench.comparison(["lora", "rosa"], ["low"], [0], defaults):
        results["runs"][spec.key] = _epoch_run(bench, spec, 0.40, 0.15)
    assert "Rate check" not in bench.summary(results)  # no run at another rate: no sentence
    sql, viggo = (replace(bench.Spec(t, "lora"), other_finalist=True) for t in ("sql", "viggo"))
    results["runs"][sql.key] = _epoch_run(bench, sql, 0.30, 0.20)  # worse: the kept rate stays
    results["runs"][viggo.key] = _epoch_run(bench, viggo, 0.50, 0.10)  # better: validation would change it
    text = bench.summary(results)
    assert "keeps the 150-step rate for LoRA on sql at low;" in text
    assert (
        f"the other finalist for LoRA on viggo at low (50.0%, val loss 0.1000 at {viggo.lr:g} against 40.0%, "
        f"0.1500 at the kept {bench.RATES[('viggo', 'low')]:g})" in text
    )
    assert "Not run at one epoch: RoSA on viggo at low" in text and "RoSA on sql at low" in text
    assert "at mid" not in text.split("Rate check")[1]  # no run at mid: its finalists are not listed
