"""benchmarks/finetune.py: the accuracy benchmarks' one training run, and its resume after a stop or a kill."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from helpers import VOCAB, load_benchmark, word_llama
from peft import LoraConfig
from tiny_models import tiny_tokenizer

from rosa import RosaConfig
from rosa.app.data import Example

STEPS = 12


@pytest.fixture(scope="module")
def finetune():
    return load_benchmark("finetune")


def _examples(n: int, seed: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    words = lambda k: " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (k,), generator=g))  # noqa: E731
    prompts = [words(int(torch.randint(3, 9, (1,), generator=g))) for _ in range(n)]
    return [Example(p, " ".join(p.split()[:3])) for p in prompts]  # learnable: repeat the first three words


DATA = (_examples(40, 0), _examples(8, 1), [])
TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTERS = {
    # dropout on: a resume must restore the RNG as well
    "lora": LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.1),
    # LoRA-only warm-up, then the mask, a restart and a re-warm-up: a resume may land in every phase
    "rosa": RosaConfig(
        r=2, lora_alpha=4, lora_dropout=0.1, density=0.05, target_modules=TARGETS, warmup_steps=4, mask_steps=2,
        restart_after_mask=True, rewarmup_steps=3, sparse_lr_ratio=2.0,
    ),
    "spa": RosaConfig(r=0, density=0.05, target_modules=TARGETS, mask_steps=2),  # mask before step 0
}  # fmt: skip


def _run(finetune, adapter, work=None, stop_at=None, error=RuntimeError, save_every=3, lr=1e-2, data=DATA):
    """Train STEPS steps; ``stop_at``: the forward of that step raises ``error`` (a process killed there) or,
    with ``error=None``, sends this process SIGINT (Ctrl-C)."""
    calls = {"n": 0}

    def load():
        model = word_llama(0)
        if stop_at is not None:

            def stop(module, args):
                if module.training:
                    calls["n"] += 1
                    if calls["n"] == stop_at + 1:
                        if error is None:
                            os.kill(os.getpid(), signal.SIGINT)
                        else:
                            raise error("killed")

            model.register_forward_pre_hook(stop)
        return model, tiny_tokenizer(VOCAB)

    recipe = finetune.Recipe(lr=lr, steps=STEPS, batch=4, max_length=24)
    return finetune.train_once(
        data, "synthetic", adapter, recipe, score_test=bool(data[2]), work=work, save_every=save_every,
        model_loader=load, desc="test",
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(finetune):
    return {name: _run(finetune, adapter) for name, adapter in ADAPTERS.items()}


@pytest.mark.parametrize("name", list(ADAPTERS))
@pytest.mark.parametrize(("stop_at", "error", "resumes_at"), [(7, RuntimeError, 6), (7, None, 8)])
def test_a_stopped_run_resumes_to_the_same_result(
    finetune, uninterrupted, tmp_path, name, stop_at, error, resumes_at
):
    """Killed (the last periodic checkpoint) or Ctrl-C during step 7 (a checkpoint once that step ends): the
    resumed run's losses and validation loss are the uninterrupted run's."""
    work = tmp_path / "work"
    with pytest.raises(error or KeyboardInterrupt):
        _run(finetune, ADAPTERS[name], work=work, stop_at=stop_at, error=error)
    resumed = _run(finetune, ADAPTERS[name], work=work)
    expected = uninterrupted[name]
    assert resumed["resumed_at"] == [resumes_at]
    assert [seg["from_step"] for seg in resumed["segments"]] == [0, resumes_at]  # each with its commit
    assert [seg["from_step"] for seg in expected["segments"]] == [0]
    assert len(resumed["losses"]) == STEPS
    torch.testing.assert_close(resumed["losses"], expected["losses"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resumed["val_loss"], expected["val_loss"], rtol=1e-5, atol=1e-6)
    assert resumed["trainable"] == expected["trainable"]
    if name != "lora":
        events = lambda r: [(e["event"], e.get("optimizer_step")) for e in r["schedule_events"]]  # noqa: E731
        starts = ("schedule_started", "mask_present")  # what a schedule records when it is created
        assert [e for e in events(resumed) if e[0] not in starts] == [
            e for e in events(expected) if e[0] not in starts
        ]
    finetune.remove_work(work)
    assert not work.exists()


@pytest.mark.parametrize(("error", "resumes_at"), [(RuntimeError, 3), (None, 6)])
def test_a_stop_during_mask_collection(finetune, uninterrupted, tmp_path, error, resumes_at):
    """Steps 4-5 collect the mask statistics (not part of a checkpoint). Killed at step 5: the run resumes
    from step 3, before the LoRA-only warm-up ended, with the restart snapshot. Ctrl-C at step 4: the run
    stops once the mask is fixed, with a checkpoint after step 5."""
    work = tmp_path / "work"
    with pytest.raises(error or KeyboardInterrupt):
        _run(finetune, ADAPTERS["rosa"], work=work, stop_at=5 if error else 4, error=error)
    resumed = _run(finetune, ADAPTERS["rosa"], work=work)
    assert resumed["resumed_at"] == [resumes_at]
    torch.testing.assert_close(resumed["losses"], uninterrupted["rosa"]["losses"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resumed["val_loss"], uninterrupted["rosa"]["val_loss"], rtol=1e-5, atol=1e-6)


def test_the_methods_train_what_they_say(uninterrupted):
    """RoSA's schedule ran (mask fixed once, restart after the warm-up); SpA's mask came before step 0; all
    three learned (the last losses below the first)."""
    rosa, spa = uninterrupted["rosa"], uninterrupted["spa"]
    fixed = [e for e in rosa["schedule_events"] if e["event"] == "mask_fixed"]
    assert len(fixed) == 1 and fixed[0]["restart"] is True
    assert next(e for e in spa["schedule_events"] if e["event"] == "mask_fixed")["restart"] is False
    for name in ("rosa", "spa"):
        counts = uninterrupted[name]["trainable"]
        assert counts["sparse_active"] > 0 and counts["total"] == counts["lora"] + counts["sparse_active"]
    targets = [m for n, m in word_llama(0).named_modules() if n.split(".")[-1] in TARGETS]
    assert uninterrupted["lora"]["trainable"]["total"] == sum(
        2 * (m.in_features + m.out_features) for m in targets
    )
    for result in uninterrupted.values():
        assert sum(result["losses"][-3:]) < sum(result["losses"][:3])


def test_a_checkpoint_of_the_first_layout_resumes(finetune, uninterrupted, tmp_path):
    """Checkpoints written at commit c3f29a5 kept this module's state in finetune.json beside state.json (a kill
    between the two writes lost the checkpoint; it now travels inside state.json): they still resume."""
    import json

    work = tmp_path / "work"
    with pytest.raises(RuntimeError):
        _run(finetune, ADAPTERS["lora"], work=work, stop_at=7, error=RuntimeError)
    (checkpoint,) = (work / "checkpoints").glob("step-*")
    state = json.loads((checkpoint / "state.json").read_text())
    (checkpoint / finetune.OLD_STATE_FILE).write_text(json.dumps(state.pop(finetune.STATE_KEY)))
    (checkpoint / "state.json").write_text(json.dumps(state))
    resumed = _run(finetune, ADAPTERS["lora"], work=work)
    assert resumed["resumed_at"] == [6]
    torch.testing.assert_close(resumed["losses"], uninterrupted["lora"]["losses"], rtol=1e-5, atol=1e-5)


def test_a_checkpoint_of_other_settings_is_refused(finetune, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(RuntimeError):
        _run(finetune, ADAPTERS["lora"], work=work, stop_at=7, error=RuntimeError)
    with pytest.raises(RuntimeError, match=r"trained with other settings \(recipe.lr\): remove .*work"):
        _run(finetune, ADAPTERS["lora"], work=work, lr=3e-3)
    with pytest.raises(RuntimeError, match=r"other settings \(adapter.r\)"):
        _run(finetune, LoraConfig(r=3, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.1), work=work)


def test_a_checkpoint_resumes_whatever_order_its_target_set_was_written_in(finetune, tmp_path):
    """PEFT keeps ``target_modules`` as a set, whose order changes with each process's hash seed: checkpoints
    written before the fix hold it as that set's string, in the order of the process that wrote it."""
    import json

    work = tmp_path / "work"
    with pytest.raises(RuntimeError):
        _run(finetune, ADAPTERS["lora"], work=work, stop_at=7, error=RuntimeError)
    (checkpoint,) = (work / "checkpoints").glob("step-*")
    state = json.loads((checkpoint / "state.json").read_text())
    written = state[finetune.STATE_KEY]["settings"]["adapter"]["target_modules"]
    assert written == sorted(TARGETS)  # written in an order no process's hash seed decides
    as_before_the_fix = "{" + ", ".join(map(repr, TARGETS[::-1])) + "}"  # not sorted: a process's own order
    state[finetune.STATE_KEY]["settings"]["adapter"]["target_modules"] = as_before_the_fix
    (checkpoint / "state.json").write_text(json.dumps(state))
    resumed = _run(finetune, ADAPTERS["lora"], work=work)
    assert resumed["resumed_at"] == [6]


def test_a_finished_run_goes_straight_to_scoring(finetune, uninterrupted, tmp_path, monkeypatch):
    """The last step is a checkpoint too: a run stopped while it scores resumes with no training step."""
    work = tmp_path / "work"
    first = _run(finetune, ADAPTERS["rosa"], work=work)
    assert (work / "checkpoints" / f"step-{STEPS}").is_dir()
    calls = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: calls.append(1))
    again = _run(finetune, ADAPTERS["rosa"], work=work)
    assert calls == [] and again["resumed_at"] == [STEPS]
    torch.testing.assert_close(again["val_loss"], first["val_loss"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(first["val_loss"], uninterrupted["rosa"]["val_loss"], rtol=1e-5, atol=1e-6)


def test_a_scored_run_records_which_test_rows_it_got_right(finetune, monkeypatch):
    """One character per test row, in order (the report pairs two runs by row): here the model's answers are
    replaced by the reference on every other row."""
    import rosa.app.evaluate as evaluate

    test = _examples(6, 2)
    answers = [e.response if i % 2 == 0 else e.response + " w0" for i, e in enumerate(test)]
    monkeypatch.setattr(evaluate, "generate_responses", lambda model, tok, prompts, *a, **k: answers)
    result = _run(finetune, ADAPTERS["lora"], data=(DATA[0], DATA[1], test))
    assert result["hits"] == "101010" and (result["correct"], result["count"]) == (3, 6)
