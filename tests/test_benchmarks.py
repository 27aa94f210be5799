"""The pieces of the benchmark scripts whose mistakes would silently skew a published number."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark
from tiny_models import tiny_llama

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def accuracy():
    return load_benchmark("accuracy")


@pytest.fixture(scope="module")
def step():
    return load_benchmark("step")


def _tiny_llama():
    return tiny_llama(0, hidden_size=48, intermediate_size=80, vocab_size=96)


@pytest.mark.parametrize("budget", ["low", "mid"])
def test_every_method_gets_the_same_trainable_budget(accuracy, budget):
    """LoRA, SpA and RoSA must train the same number of weights, counted on the wrapped models themselves."""
    from peft import LoraConfig, get_peft_model

    from rosa.masks import collect_mask
    from rosa.model import sparse_parameter_count

    counts = {}
    for method in ("lora", "spa", "rosa"):
        spec = accuracy.Spec("viggo", method, budget)
        config, extra = accuracy.adapter_for(spec, warmup=1)(_tiny_llama(), [])
        model, split = accuracy.finetune.adapt(_tiny_llama(), config), extra["params"]
        if method == "lora":
            counts[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            reference = get_peft_model(_tiny_llama(), LoraConfig(r=split["r"], target_modules="all-linear"))
            assert counts[method] == sum(p.numel() for p in reference.parameters() if p.requires_grad)
            continue
        ids = torch.randint(0, 96, (2, 8))
        collect_mask(model, [{"input_ids": ids, "labels": ids}], method="random")
        c = sparse_parameter_count(model)
        counts[method] = c["lora"] + c["sparse_active"]
        assert (c["lora"] == 0) == (method == "spa")
    per_layer_rounding = 2 * 7  # one nonzero per adapted layer at most, either way
    assert abs(counts["spa"] - counts["lora"]) <= per_layer_rounding
    assert abs(counts["rosa"] - counts["lora"]) <= per_layer_rounding


def test_held_out_rows_never_reach_training(accuracy):
    if not accuracy.DATA.is_dir():
        pytest.skip("../shared/data is not present")
    train, val, test = accuracy.splits("sql")
    assert len(test) == accuracy.TEST_ROWS and len(val) == accuracy.VAL_ROWS
    key = lambda e: (e.prompt, e.response)  # noqa: E731
    assert not {key(e) for e in test} & {key(e) for e in train}
    assert not {key(e) for e in val} & {key(e) for e in train}
    assert accuracy.splits("sql")[2] == test  # fixed seed: the same split every call


def test_results_are_kept_and_skipped(accuracy, tmp_path, monkeypatch):
    """A finished run in the JSON is never trained again (the suite resumes across sittings)."""
    policy, by_hand = accuracy.Spec("viggo", "lora"), accuracy.Spec("viggo", "lora", fixed_lr=3e-3)
    path = tmp_path / "acc.json"
    results = accuracy.load_results(path)
    done = {"exact_match": 0.5, "rate_policy": accuracy.RATE_POLICY}
    results["runs"] = {policy.key: done, by_hand.key: {"exact_match": 0.4}}
    accuracy.save_results(results, path)
    monkeypatch.setattr(accuracy, "train_once", lambda *a, **k: pytest.fail("trained a finished run"))
    monkeypatch.setattr(accuracy, "_probe", lambda *a, **k: pytest.fail("probed a finished run"))
    assert accuracy.run_suite([policy, by_hand], path)["runs"] == results["runs"]
    assert json.loads(path.read_text())["runs"] == results["runs"]


def test_two_suites_sharing_one_file_keep_each_others_results(accuracy, tmp_path):
    """Two suites (e.g. one per task) add to the same JSON: neither drops the other's entries, and an entry
    removed from the file by hand is not written back from a suite's memory."""
    path = tmp_path / "acc.json"
    first, second = accuracy.load_results(path), accuracy.load_results(path)  # both loaded before any save
    accuracy.record_result(first, path, "runs", "a", {"exact_match": 0.1})
    accuracy.record_result(second, path, "probes", "p", {"val_loss": 1.0})
    accuracy.record_result(second, path, "runs", "b", {"exact_match": 0.2})
    on_disk = json.loads(path.read_text())
    assert on_disk["runs"] == {"a": {"exact_match": 0.1}, "b": {"exact_match": 0.2}}
    assert on_disk["probes"] == {"p": {"val_loss": 1.0}}
    assert on_disk["settings"] == json.loads(json.dumps(first["settings"]))
    del on_disk["runs"]["a"]  # found invalid and removed
    accuracy.save_results(on_disk, path)
    accuracy.record_result(first, path, "runs", "c", {"exact_match": 0.3})  # "a" is still in first's memory
    assert json.loads(path.read_text())["runs"] == {"b": {"exact_match": 0.2}, "c": {"exact_match": 0.3}}


def test_diagnostics_are_separate_runs_that_skip_the_policy(accuracy, tmp_path, monkeypatch):
    """A diagnostic never overwrites or borrows the policy's run, and a hand-set rate probes nothing."""
    plain = accuracy.Spec("viggo", "rosa")
    by_hand = accuracy.Spec("viggo", "rosa", fixed_lr=9e-3)
    at_start = accuracy.Spec("viggo", "rosa", mask_at_start=True)
    assert len({plain.key, by_hand.key, at_start.key}) == 3
    kinds = [accuracy.kind(asdict(spec)) for spec in (plain, by_hand, at_start)]
    assert kinds == ["first schedule", "diagnostic", "diagnostic"]
    monkeypatch.setattr(accuracy, "_probe", lambda *a: pytest.fail("probed a hand-set rate"))
    trained = []
    monkeypatch.setattr(
        accuracy,
        "train_once",
        lambda spec, lr, *a, **k: trained.append(lr) or {**_fake_run(accuracy, spec, 0.1), "wall_seconds": 1},
    )
    accuracy.run_suite([by_hand], tmp_path / "x.json")
    assert trained == [9e-3]
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="mask-at-start diagnostics trained in this script's own loop"):
        accuracy.train_once(at_start, 1e-3, 3, score_test=False, desc="x")  # refused before any work


def test_learning_rate_grid_extends_past_an_edge(accuracy, tmp_path, monkeypatch):
    """The chosen rate is an interior minimum of what was probed (or the last extension)."""
    calls = []

    def fake_probe(source, lr, results, path):
        calls.append(lr)
        return abs(math.log(lr / 0.02))  # best near 2e-2: above the 3e-4..3e-3 grid

    monkeypatch.setattr(accuracy, "_probe", fake_probe)
    finalists = accuracy.probe_finalists(accuracy.Spec("viggo", "lora"), {"probes": {}}, tmp_path / "x.json")
    assert finalists == pytest.approx([0.027, 9e-3])  # two extensions (9e-3, 2.7e-2), then the policy stops
    assert sorted(set(calls)) == pytest.approx([3e-4, 1e-3, 3e-3, 9e-3, 0.027])


def test_live_storage_meter_counts_what_is_alive(step):
    x = torch.randn(1000, 250)  # made outside: not counted
    with step.LiveStorageMeter() as meter:
        a = x * 2  # 1 MB
        b = a + 1  # 2 MB alive
        del a
        c = b.t()  # a view: no new storage
        d = b * 3  # 2 MB alive (a was freed)
        del c, d
    assert meter.peak == 2 * 1000 * 250 * 4
    assert meter.current == 1000 * 250 * 4  # b


@pytest.mark.parametrize("lora_warmup", [True, False])
@pytest.mark.parametrize("mask_method", ["fisher", "random"])
def test_reported_mask_step_is_where_the_scheduler_fixes_the_mask(accuracy, mask_method, lora_warmup):
    """The report's before/after-mask window must sit where the schedule really sets the mask."""
    from rosa.schedule import schedule_of

    spec = accuracy.Spec("viggo", "rosa", mask_method=mask_method, steps=30, lora_warmup=lora_warmup)
    config, _ = accuracy.adapter_for(spec, accuracy.warmup_steps(spec.steps))(_tiny_llama(), [])
    model = accuracy.finetune.adapt(_tiny_llama(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(spec.steps):  # the model drives its own schedule, as in finetune.train_once
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    (fixed,) = [e for e in schedule_of(model).events if e["event"] == "mask_fixed"]
    assert accuracy.mask_fixed_step(asdict(spec)) == fixed["optimizer_step"]


def test_schedule_kinds_and_keys(accuracy):
    """Candidates (a candidate schedule at a hand-set rate), the first runs' schedule (keys unchanged), the
    comparison (a candidate schedule at the policy's rate) and seeds are told apart."""
    first = accuracy.Spec("viggo", "rosa")
    assert first.key == "viggo/rosa/low/fisher/layer/150"  # the first runs' keys stay valid
    for schedule in accuracy.CANDIDATES:
        candidate = accuracy.Spec("viggo", "rosa", fixed_lr=9e-3, **schedule)
        policy = accuracy.Spec("viggo", "rosa", **schedule)
        seeded = accuracy.Spec("viggo", "rosa", seed=2, **schedule)
        assert accuracy.kind(asdict(candidate)) == "schedule candidate"
        assert accuracy.kind(asdict(policy)) == accuracy.kind(asdict(seeded)) == "comparison"
        assert len({first.key, candidate.key, policy.key, seeded.key}) == 4
        assert seeded.lr_source() == policy  # other seeds use seed 0's rate
    assert accuracy.kind(asdict(first)) == "first schedule"
    assert accuracy.kind(asdict(accuracy.Spec("viggo", "lora", seed=1))) == "comparison"
    # candidates choose the default at the low budget, seed 0; the same schedule at a hand-set rate elsewhere,
    # or marked as a finalist of the rate policy, is a rate run: never marked "chosen", never in the choice
    schedule = accuracy.CANDIDATES[0]
    for spec in (
        accuracy.Spec("viggo", "rosa", "mid", fixed_lr=3e-3, **schedule),
        accuracy.Spec("viggo", "rosa", fixed_lr=0.027, finalist=True, **schedule),
        accuracy.Spec("viggo", "rosa", fixed_lr=3e-3, seed=1, **schedule),
        accuracy.Spec("viggo", "lora", fixed_lr=3e-3),
        accuracy.Spec("viggo", "full", fixed_lr=1e-4),
    ):
        assert accuracy.kind(asdict(spec)) == "rate run", spec
    finalist = accuracy.Spec("viggo", "rosa", fixed_lr=0.027, finalist=True, **schedule)
    assert finalist.key == replace(finalist, finalist=False).key  # the same training, whoever asked for it


def test_a_split_study_moves_budget_between_rank_and_density(accuracy, tmp_path):
    """A split study keeps the budget, gives RoSA another rank, has its own key and kind, borrows the default
    split's rate, and cannot ask for more rank than the budget holds."""
    schedule = accuracy.CANDIDATES[0]
    default = accuracy.Spec("viggo", "rosa", **schedule)
    split = accuracy.Spec("viggo", "rosa", rank=3, **schedule)
    model = _tiny_llama()
    shapes = accuracy.finetune.linear_shapes(model)
    per_rank, weights = sum(o + i for o, i in shapes), sum(o * i for o, i in shapes)
    for spec, rank in ((default, 2), (split, 3)):
        got = accuracy.budget_split(model, spec)
        assert got["r"] == rank
        assert math.isclose(rank * per_rank + got["density"] * weights, 4 * per_rank)  # LoRA r 4's budget
    assert split.key != default.key and "/r3/" in split.key
    assert accuracy.kind(asdict(split)) == "split study"
    assert accuracy.kind(asdict(default)) == "comparison"
    assert split.lr_source() == default
    with pytest.raises(ValueError, match="rank 5 does not fit"):
        accuracy.budget_split(model, replace(split, rank=5))
    path = tmp_path / "acc.json"
    results = accuracy.load_results(path)
    _, chosen, results["runs"] = _two_candidates_beside_lora(accuracy)
    accuracy.save_results(results, path)
    specs = accuracy.specs_for(["viggo"], ["rosa"], ["low", "mid"], "splits", 150, path)
    assert [s.rank for s in specs] == [3, 12]
    assert all(accuracy.kind(asdict(s)) == "split study" for s in specs)
    assert all(accuracy.schedule_of(asdict(s)) == chosen for s in specs)  # the default schedule


def _fake_run(accuracy, spec, val_loss, lr=1e-3):
    return {"spec": asdict(spec), "val_loss": val_loss, "lr": spec.fixed_lr or lr, **_SCORED}


_SCORED = {"exact_match": 0.1, "correct": 20, "count": 200, "trainable": {"total": 10}, "params": {}}


def _two_candidates_beside_lora(accuracy):
    """Candidates a and b at a hand-set rate and LoRA's 150-step run on both tasks, with val losses that make b
    the choice: (a, b, runs by key)."""
    a, b = accuracy.CANDIDATES[0], accuracy.CANDIDATES[1]
    runs = {}
    for task, lora_loss, loss_a, loss_b in (("viggo", 0.1, 0.09, 0.095), ("sql", 0.2, 0.25, 0.19)):
        lora = accuracy.Spec(task, "lora")
        runs[lora.key] = _fake_run(accuracy, lora, lora_loss, lr=3e-3)  # the candidates ran at LoRA's rate
        for schedule, loss in ((a, loss_a), (b, loss_b)):
            spec = accuracy.Spec(task, "rosa", fixed_lr=3e-3, **schedule)
            runs[spec.key] = _fake_run(accuracy, spec, loss)
    return a, b, runs


def test_the_default_schedule_is_chosen_on_validation_loss_relative_to_lora(accuracy):
    """Lowest mean of val loss / LoRA's val loss over both tasks; test scores play no part; a schedule not yet
    run on every task cannot be chosen."""
    a, b, runs = _two_candidates_beside_lora(accuracy)
    for run in runs.values():  # test scores that would pick the other schedule
        if run["spec"]["method"] == "rosa":
            run["exact_match"] = 0.9 if accuracy.schedule_of(run["spec"]) == a else 0.1
    # a: (0.9 + 1.25) / 2 = 1.075; b: (0.95 + 0.95) / 2 = 0.95
    assert accuracy.choose_schedule({"runs": runs}) == b
    del runs[accuracy.Spec("sql", "rosa", fixed_lr=3e-3, **b).key]
    assert accuracy.choose_schedule({"runs": runs}) == a
    assert accuracy.choose_schedule({"runs": {}}) is None
    del runs[accuracy.Spec("sql", "lora").key]  # nothing to compare sql's candidates with: none is chosen
    assert accuracy.choose_schedule({"runs": runs}) is None


def _fake_training(accuracy, monkeypatch, probe_loss, run_loss):
    """Probes and runs whose validation loss is ``probe_loss(lr)`` / ``run_loss(lr)``; returns the list of the
    keys trained, in order."""
    trained = []
    monkeypatch.setattr(accuracy, "_probe", lambda source, lr, results, path: probe_loss(lr))

    def train(spec, lr, steps, score_test, desc, work=None):
        trained.append(spec.key)
        return {
            "spec": asdict(spec),
            "lr": lr,
            "val_loss": run_loss(lr),
            "wall_seconds": 1,
            **_SCORED,
        }

    monkeypatch.setattr(accuracy, "train_once", train)
    return trained


PROBES = {3e-4: 1.0, 1e-3: 0.5, 3e-3: 0.6}  # an interior best (1e-3), then 3e-3


def test_the_rate_policy_trains_two_finalists_and_keeps_the_lower_val_loss(accuracy, tmp_path, monkeypatch):
    """The probes' two best rates each train the full run; the policy key holds a copy of the one with the lower
    full-run val loss (even when the probes ranked it second); other seeds reuse that rate without probing."""
    full_run = {1e-3: 0.30, 3e-3: 0.20}
    trained = _fake_training(accuracy, monkeypatch, PROBES.get, full_run.get)
    path = tmp_path / "acc.json"
    policy = accuracy.Spec("viggo", "lora")
    results = accuracy.run_suite([policy], path)
    at = {lr: replace(policy, fixed_lr=lr).key for lr in (1e-3, 3e-3)}
    assert trained == [at[1e-3], at[3e-3]]
    kept = results["runs"][policy.key]
    assert kept["lr"] == 3e-3 and kept["same_run_as"] == at[3e-3]
    assert kept["rate_policy"] == accuracy.RATE_POLICY
    assert kept["finalists"] == {"0.001": 0.30, "0.003": 0.20}
    assert accuracy.kind(kept["spec"]) == "comparison"
    assert all(accuracy.kind(results["runs"][k]["spec"]) == "rate run" for k in at.values())
    accuracy.run_suite([policy], path)
    assert len(trained) == 2  # decided once
    monkeypatch.setattr(accuracy, "_probe", lambda *a: pytest.fail("another seed probed"))
    seed1 = replace(policy, seed=1)
    results = accuracy.run_suite([seed1], path)
    assert trained[2:] == [replace(seed1, fixed_lr=3e-3).key]
    assert results["runs"][seed1.key]["lr"] == 3e-3
    assert "finalists" not in results["runs"][seed1.key]
    # the report: the decision table, and the comparison row says how its rate was chosen
    runs = accuracy.ordered_runs(results)
    table = accuracy._finalist_table(runs)
    assert "| 0.001 (1) | 0.3000 | 10.0% (" in table and table.rstrip().endswith("| yes |")
    assert "| 0.003 (kept of 0.001 / 0.003) |" in accuracy._comparison_table(runs)
    shown = {r["key"] for r in accuracy._each_training_once(runs)}  # each training once, by its policy name
    assert shown == {policy.key, seed1.key, at[1e-3]}


def test_a_diverged_finalist_is_not_kept(accuracy, tmp_path, monkeypatch):
    _fake_training(accuracy, monkeypatch, PROBES.get, {1e-3: float("nan"), 3e-3: 0.9}.get)
    policy = accuracy.Spec("sql", "lora")
    assert accuracy.run_suite([policy], tmp_path / "a.json")["runs"][policy.key]["lr"] == 3e-3


def test_the_rate_policy_reuses_and_keeps_the_earlier_policys_runs(accuracy, tmp_path, monkeypatch):
    """A run the probe-only policy kept is the finalist at its rate (copied, not trained again); a seed's run at
    a rate the policy no longer keeps moves to its own key; a policy key that was already a copy of a candidate
    reuses the candidate, which keeps its kind."""
    schedule = accuracy.CANDIDATES[0]
    lora, lora1 = accuracy.Spec("viggo", "lora"), accuracy.Spec("viggo", "lora", seed=1)
    rosa = accuracy.Spec("viggo", "rosa", **schedule)
    candidate = replace(rosa, fixed_lr=1e-3)
    path = tmp_path / "acc.json"
    results = accuracy.load_results(path)
    results["runs"] = {
        lora.key: {**_fake_run(accuracy, lora, 0.30), "exact_match": 0.35},
        lora1.key: {**_fake_run(accuracy, lora1, 0.31), "exact_match": 0.40},
        candidate.key: {**_fake_run(accuracy, candidate, 0.25), "exact_match": 0.3},
        rosa.key: {
            **_fake_run(accuracy, candidate, 0.25),
            "spec": asdict(rosa),
            "same_run_as": candidate.key,
        },
    }
    accuracy.save_results(results, path)
    trained = _fake_training(accuracy, monkeypatch, PROBES.get, {1e-3: 0.5, 3e-3: 0.2}.get)
    results = accuracy.run_suite([lora, lora1, rosa], path)["runs"]
    assert trained == [replace(s, fixed_lr=3e-3).key for s in (lora, lora1, rosa)]
    earlier = results[replace(lora, fixed_lr=1e-3).key]
    assert earlier["exact_match"] == 0.35 and earlier["first_recorded_as"] == lora.key
    assert results[replace(lora1, fixed_lr=1e-3).key]["exact_match"] == 0.40  # seed 1's earlier run, kept
    assert results[lora.key]["lr"] == results[lora1.key]["lr"] == results[rosa.key]["lr"] == 3e-3
    assert results[candidate.key]["exact_match"] == 0.3
    assert accuracy.kind(results[candidate.key]["spec"]) == "schedule candidate"
    assert accuracy.kind(results[replace(rosa, fixed_lr=3e-3).key]["spec"]) == "rate run"  # a finalist


def test_the_candidates_stay_compared_with_lora_at_their_rate(accuracy):
    """The schedule choice compares each candidate with LoRA's run at the candidate's rate: LoRA's policy moving
    to another rate (with a much lower val loss) changes neither the choice nor the candidate table."""
    _, b, runs = _two_candidates_beside_lora(accuracy)
    before = accuracy._candidate_table({"runs": runs}, accuracy.ordered_runs({"runs": runs}))
    for task in ("viggo", "sql"):
        lora = accuracy.Spec(task, "lora")
        at_rate = replace(lora, fixed_lr=3e-3, finalist=True)
        runs[at_rate.key] = {**runs[lora.key], "spec": asdict(at_rate)}
        runs[lora.key] = {**_fake_run(accuracy, lora, 0.001, lr=9e-3), "rate_policy": accuracy.RATE_POLICY}
    assert accuracy.choose_schedule({"runs": runs}) == b
    after = accuracy._candidate_table({"runs": runs}, accuracy.ordered_runs({"runs": runs}))
    assert after == before and "| 0.950 |" in after


def test_the_verdict_pairs_seeds_and_says_what_is_not_measured(accuracy):
    """RoSA and LoRA are compared on the seeds both have run (paired differences), and the target line says
    which cells still lack the seeds the issue asks for."""
    runs = {}
    chosen = accuracy.CANDIDATES[0]
    for seed, rosa_em, lora_em in ((0, 0.40, 0.35), (1, 0.30, 0.33), (2, 0.50, 0.40)):
        for method, em in (("rosa", rosa_em), ("lora", lora_em)):
            extra = chosen if method == "rosa" else {}
            spec = accuracy.Spec("viggo", method, seed=seed, **extra)
            runs[spec.key] = {
                **_fake_run(accuracy, spec, 0.1),
                "exact_match": em,
                "rate_policy": accuracy.RATE_POLICY,
            }
    lora3 = accuracy.Spec("sql", "lora", seed=0)
    runs[lora3.key] = {**_fake_run(accuracy, lora3, 0.2), "exact_match": 0.3}
    results = {"runs": runs, "settings": {"test_rows": 200}}
    ordered = list(runs.values())
    text = accuracy._verdict(results, ordered)
    # means 40.0 vs 36.0; differences +5, -3, +10 -> sd 6.56, paired se 3.79
    assert "seeds 0, 1, 2: RoSA 40.0% vs LoRA 36.0%: RoSA >= LoRA, difference +4.0 points" in text
    assert "per-seed differences +5.0, -3.0, +10.0 (paired standard error 3.8 points, mean / se +1.1)" in text
    assert "not settled yet" in text and "not yet measured in full: sql low, viggo mid, sql mid" in text
    del runs[accuracy.Spec("viggo", "rosa", seed=2, **chosen).key]  # LoRA's seed 2 has no RoSA partner
    text = accuracy._verdict(results, list(runs.values()))
    assert "seeds 0, 1: RoSA 35.0% vs LoRA 34.0%" in text
    del runs[accuracy.Spec("viggo", "lora", seed=1).key]["rate_policy"]  # kept on the probes alone
    text = accuracy._verdict(results, list(runs.values()))
    assert "seed 0: RoSA 40.0% vs LoRA 35.0%" in text and "measured in full: viggo low," in text


def test_a_longer_run_is_its_own_kind_and_borrows_the_standard_rate(accuracy, tmp_path, monkeypatch):
    """``--epochs`` sets each task's steps from its training rows; the run keeps its own key and kind (never
    averaged into the 150-step comparison) and takes the rate the standard-length probes chose."""
    monkeypatch.setattr(accuracy, "splits", lambda task: (list(range(41 if task == "viggo" else 16)), [], []))
    chosen = accuracy.CANDIDATES[0]
    results = accuracy.load_results(tmp_path / "r.json")
    for task in ("viggo", "sql"):  # choose_schedule needs the candidate and LoRA on both tasks
        for spec in (accuracy.Spec(task, "rosa", fixed_lr=3e-3, **chosen), accuracy.Spec(task, "lora")):
            results["runs"][spec.key] = _fake_run(accuracy, spec, 0.1, lr=3e-3)
    accuracy.save_results(results, tmp_path / "r.json")
    specs = accuracy.specs_for(
        ["viggo", "sql"], ["lora", "rosa"], ["low"], "main", 150, tmp_path / "r.json", epochs=1
    )
    steps = {(s.task, s.method): s.steps for s in specs}
    batch = accuracy.BATCH
    assert steps == {
        ("viggo", "lora"): -(-41 // batch),
        ("viggo", "rosa"): -(-41 // batch),
        ("sql", "lora"): 16 // batch,
        ("sql", "rosa"): 16 // batch,
    }
    for spec in specs:
        standard = replace(spec, steps=accuracy.STEPS, epochs=None)
        assert spec.key != standard.key and spec.lr_source() == standard.lr_source()
        assert accuracy.kind(asdict(spec)) == "longer run" and accuracy.kind(asdict(standard)) != "longer run"
    with pytest.raises(SystemExit, match="--part main"):
        accuracy.specs_for(["viggo"], ["lora"], ["low"], "studies", 150, tmp_path / "r.json", epochs=1)

    runs = {}
    for spec, em in ((specs[0], 0.4), (specs[1], 0.45)):  # viggo LoRA, viggo RoSA, one epoch
        runs[spec.key] = {
            **_fake_run(accuracy, spec, 0.1),
            "exact_match": em,
            "correct": round(200 * em),
            "count": 200,
            "trainable": {"total": 10},
            "params": {},
        }
    text = accuracy._verdict({"runs": runs, "settings": {"test_rows": 200}}, list(runs.values()))
    assert f"viggo, budget low, 1 epoch = {specs[0].steps} steps, seed 0: RoSA 45.0% vs LoRA 40.0%" in text
    assert "not yet measured in full: viggo low, sql low" in text  # longer runs do not count for the target
    table = accuracy._longer_table(list(runs.values()))
    assert (
        table.count(f"| {specs[0].steps} (1 epoch) |") == 2
        and accuracy._comparison_table(list(runs.values())) == ""
    )


def test_a_longer_lora_run_does_not_move_the_schedule_choice_or_the_candidates_kind(accuracy):
    """Candidates are scored against LoRA's 150-step run beside them; a one-epoch LoRA run with a much lower val
    loss must not become that reference, and a candidate or mask study at another length keeps its own kind."""
    a, b, runs = _two_candidates_beside_lora(accuracy)
    assert accuracy.choose_schedule({"runs": runs}) == b  # as in the test above
    longer = accuracy.Spec("sql", "lora", steps=400, epochs=1.0)
    runs[longer.key] = _fake_run(accuracy, longer, 0.01)  # after sql's 150-step LoRA in the file
    assert accuracy.choose_schedule({"runs": runs}) == b
    longer_candidate = accuracy.Spec("viggo", "rosa", steps=600, fixed_lr=3e-3, **a)
    runs[longer_candidate.key] = _fake_run(accuracy, longer_candidate, 0.001)  # would make a the choice
    assert accuracy.kind(asdict(longer_candidate)) == "rate run"  # candidates compare at the standard length
    assert accuracy.choose_schedule({"runs": runs}) == b
    study = asdict(accuracy.Spec("viggo", "rosa", mask_method="random", steps=600, **a))
    assert accuracy.kind(study) == "mask study"


def test_the_loss_ratio_table_pairs_rosa_with_lora_on_the_same_seed(accuracy):
    """First and last tenth of the run, RoSA's mean training loss over LoRA's of the same seed (a dense
    reference computed here by hand); a RoSA run without its LoRA partner gives no row."""
    chosen = accuracy.CANDIDATES[0]
    lora_losses = [2.0] * 15 + [1.0] * 120 + [0.5] * 15
    rosa_losses = [3.0] * 15 + [1.0] * 120 + [0.25] * 15
    runs = []
    for method, losses, seed in (
        ("lora", lora_losses, 1),
        ("rosa", rosa_losses, 1),
        ("rosa", rosa_losses, 2),
    ):
        spec = accuracy.Spec("viggo", method, seed=seed, **(chosen if method == "rosa" else {}))
        runs.append({**_fake_run(accuracy, spec, 0.1), "losses": losses})
    table = accuracy._loss_ratio_table(runs)
    assert "| viggo | low | 150 | 1 | 1.50 | 0.50 |" in table
    assert "| viggo | low | 150 | 2 |" not in table


def test_markdown_tables_refuse_a_row_of_the_wrong_width():
    tables = load_benchmark("tables")
    lines = tables.markdown_table(["a", "b"], [[1, ""]])
    assert lines == ["| a | b |", "|---|---|", "| 1 | |"]
    with pytest.raises(ValueError, match="a table row of 3 cells in a table of 2 columns"):
        tables.markdown_table(["a", "b"], [[1, 2, 3]])
