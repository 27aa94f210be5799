"""What a user of ``rosa train / eval / merge`` meets after the run (issue 27's findings 2, 3, 6, 7 and 8): the
files a run leaves, the default folder taken afresh on every run, ``--overwrite`` touching only rosa's files,
``eval`` reading base and task from a run folder and scoring any PEFT adapter, a mismatched base named, a
readable merged folder, one-line refusals."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import stat

import pytest
import torch
from helpers import FAST
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import rosa
from rosa.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(model_dir, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", "-q", f"model.name={model_dir}", *FAST, *args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("user") / "run"
    code, printed = _train(tiny_model_dir, f"output_dir={folder}", "train.eval_every=2")
    assert code == 0, printed
    return folder, printed


def test_a_run_reports_its_sparse_values_and_whole_schedule(run):
    folder, _ = run
    results = json.loads((folder / "results.json").read_text())
    sparse = sum(v.numel() for v in _sparse_values(folder / "adapter"))
    assert results["trainable"]["sparse_active"] == sparse > 0
    assert [e["event"] for e in results["schedule_events"]].count("mask_fixed") == 1


def _sparse_values(adapter):
    from safetensors.torch import load_file

    return [t for k, t in load_file(adapter / "adapter_model.safetensors").items() if "rosa_values" in k]


def test_a_run_logs_validation_loss_and_draws_its_curves(run):
    folder, printed = run
    lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "val_loss" in r] == [2, 4]  # train.eval_every=2 over 4 steps
    assert all(r["grad_norm"] >= 0 for r in lines if "loss" in r)
    pytest.importorskip("matplotlib")
    assert (folder / "loss.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/grad_norm", "val/loss"} <= set(events.Tags()["scalars"])
    last = printed.strip().splitlines()
    assert "held-out loss" in last[-2] and last[-1] == f"adapter: {folder / 'adapter'}"


def test_the_adapter_and_the_mask_are_ordinary_readable_files(run):
    import os

    umask = os.umask(0)
    os.umask(umask)
    folder = run[0]
    for file in [folder / "mask.safetensors", *(folder / "adapter").iterdir()]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file  # safetensors alone writes 0600


def test_the_adapter_says_rosa_is_needed_to_load_it(run):
    card = (run[0] / "adapter" / "README.md").read_text()
    assert "import rosa" in card and "PeftModel.from_pretrained" in card


def test_rerunning_the_default_command_takes_a_fresh_folder(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert _train(tiny_model_dir)[0] == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["rosa-default", "rosa-default-2"]
    assert all((tmp_path / "runs" / name / "adapter").is_dir() for name in ("rosa-default", "rosa-default-2"))


def test_overwrite_removes_only_the_files_rosa_writes(tiny_model_dir, tmp_path):
    folder = tmp_path / "run"
    assert _train(tiny_model_dir, f"output_dir={folder}")[0] == 0
    (folder / "notes.txt").write_text("mine")
    first = (folder / "results.json").stat().st_mtime_ns
    assert _train(tiny_model_dir, f"output_dir={folder}")[0] == 2  # named and taken: refused
    assert _train(tiny_model_dir, f"output_dir={folder}", "--overwrite")[0] == 0
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "results.json").stat().st_mtime_ns != first


def test_overwrite_that_cannot_start_loses_nothing(tiny_model_dir, tmp_path, capsys):
    """--overwrite with a mistyped data file: refused in one line, and the run it would have replaced is all
    there, byte for byte; nothing is left set aside."""
    folder = tmp_path / "run"
    assert _train(tiny_model_dir, f"output_dir={folder}")[0] == 0
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    bad = ["data.task=jsonl", "data.path=nope.jsonl", "data.prompt_column=a", "data.response_column=b"]
    assert _train(tiny_model_dir, f"output_dir={folder}", "--overwrite", *bad)[0] == 2
    assert "nope.jsonl" in capsys.readouterr().err
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before and (folder / "adapter" / "adapter_model.safetensors").is_file()


def test_overwrite_stopped_by_sigterm_while_setting_up_loses_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """torchrun ends the other ranks with SIGTERM when one fails: the old run comes back as it was."""
    import os
    import signal

    from rosa.app import job

    folder = tmp_path / "run"
    assert _train(tiny_model_dir, f"output_dir={folder}")[0] == 0
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    build = job.build

    def build_then_terminated(*args, **kwargs):
        built = build(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return built

    monkeypatch.setattr(job, "build", build_then_terminated)
    assert _train(tiny_model_dir, f"output_dir={folder}", "--overwrite")[0] == 130
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before


def test_a_second_interrupt_still_names_the_folder_to_resume(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Stopped at once (no checkpoint of this step): the hint still names the folder, whose last checkpoint
    resumes; the folder's name is quoted for the shell."""
    from rosa.app import train as train_module

    folder = tmp_path / "my run"
    loop = train_module.train_loop

    def interrupted_in_step_three(job, log, saver, show_progress=True):
        step, calls = job.train_step, []

        def counted(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return step(*args, **kwargs)

        job.train_step = counted
        return loop(job, log, saver, show_progress)

    monkeypatch.setattr(train_module, "train_loop", interrupted_in_step_three)
    assert _train(tiny_model_dir, f"output_dir={folder}")[0] == 130
    assert f"rosa train --resume 'output_dir={folder}' " in capsys.readouterr().err


def test_a_stopped_run_names_its_own_folder_to_resume(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The default folder was taken, so the run went to runs/rosa-default-2: the hint names that one."""
    import signal

    from rosa.app import train as train_module

    monkeypatch.chdir(tmp_path)
    assert _train(tiny_model_dir)[0] == 0
    loop = train_module.train_loop

    def stopped_at_once(job, log, saver, show_progress=True):  # as if Ctrl-C came during step 3 (after the
        step, calls = job.train_step, []  # checkpoint of step 2: FAST saves every 2 steps)

        def step_then_stop(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                signal.raise_signal(
                    signal.SIGINT
                )  # the loop's handler: stop after this step, with a checkpoint
            return step(*args, **kwargs)

        job.train_step = step_then_stop
        return loop(job, log, saver, show_progress)

    monkeypatch.setattr(train_module, "train_loop", stopped_at_once)
    assert _train(tiny_model_dir)[0] == 130
    err = capsys.readouterr().err
    assert "rosa train --resume output_dir=runs/rosa-default-2 " in err, err


def test_a_run_stopped_before_any_checkpoint_suggests_no_resume(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """Stopped in step 1, during the mask collection (no checkpoint of it): nothing to resume, so no hint."""
    import signal

    from rosa.app import train as train_module

    loop = train_module.train_loop

    def stopped_in_step_one(job, log, saver, show_progress=True):
        step = job.train_step

        def step_then_stop(*args, **kwargs):
            signal.raise_signal(signal.SIGINT)
            return step(*args, **kwargs)

        job.train_step = step_then_stop
        return loop(job, log, saver, show_progress)

    monkeypatch.setattr(train_module, "train_loop", stopped_in_step_one)
    assert _train(tiny_model_dir, f"output_dir={tmp_path / 'run'}")[0] == 130
    err = capsys.readouterr().err
    assert "no checkpoint of this step" in err and "--resume" not in err, err


def test_eval_reads_base_and_task_from_a_run_folder(run, tmp_path):
    folder, _ = run
    scores = tmp_path / "scores.json"
    assert main(["eval", "-q", "--adapter", str(folder), "--out", str(scores)]) == 0
    assert json.loads(scores.read_text())["count"] == 3  # the run's own held-out rows (data.val_size=3)


def test_eval_scores_a_lora_adapter(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "lora")
    scores = tmp_path / "scores.json"
    args = ["eval", "-q", f"model.name={tiny_model_dir}", *FAST, "--adapter", str(tmp_path / "lora")]
    assert main([*args, "--out", str(scores)]) == 0
    assert json.loads(scores.read_text())["count"] == 3


def test_an_adapter_for_another_base_names_the_base_it_records(run, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoConfig

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    config = AutoConfig.from_pretrained(other)
    config.hidden_size *= 2  # same vocabulary and tokenizer, other shapes
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    capsys.readouterr()
    assert main(["eval", "-q", f"model.name={other}", *FAST, "--adapter", str(run[0] / "adapter")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tiny_model_dir) in err and "does not fit" in err


def test_a_merged_folder_is_readable_by_everyone(run, tmp_path):
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run[0]), "--out", str(merged)]) == 0
    assert stat.S_IMODE(merged.stat().st_mode) & 0o755 == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o444 == 0o444 for p in merged.iterdir())


def test_mixing_rosa_adapters_by_weight_is_refused_in_one_line(tiny_model_dir):
    model = rosa.get_rosa_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), rosa.RosaConfig(r=2))
    with pytest.raises(NotImplementedError, match="not supported for RoSA adapters") as err:
        model.add_weighted_adapter(["default"], [1.0], "mixed")
    assert "\n" not in str(err.value)
