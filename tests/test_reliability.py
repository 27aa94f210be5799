"""What a careless or hostile user does to `rosa train`: bad values, a second run on the same folder, Ctrl-C /
SIGTERM then --resume, resuming with other settings or a finished run, plain LoRA through the schedule, and an
adapter file that smuggles in a transposed support."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from helpers import FAST, cli_process, cli_train, set_random_masks, word_llama
from safetensors.torch import load_file, save_file

import rosa
from rosa import AdapterFileError, RosaConfig
from rosa.app.run_config import RunConfigError, load_run_config
from rosa.cli import main

# --- one line and exit 2 for every bad value, before any model loads ---------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=0", "train.steps must be an integer >= 1"),
        ("train.steps=-3", "train.steps must be an integer >= 1"),
        ("train.grad_accum=0", "train.grad_accum must be an integer >= 1"),
        ("train.save_every=0", "train.save_every must be an integer >= 1"),
        ("train.log_every=0", "train.log_every must be an integer >= 1"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be an integer >= 1"),
        ("data.max_length=4", "data.max_length must be an integer >= 32"),
        ("eval.batch_size=0", "eval.batch_size must be an integer >= 1"),
        ("rosa.sparse_lr_ratio=0", "sparse_lr_ratio must be a number in (0, 1e6]"),
        ("data.task=poems", "data.task must be one of"),
        ("data.task=jsonl", "data.task=jsonl reads a file: set data.path"),
    ],
)
def test_bad_values_fail_in_one_line_before_anything_loads(override, message, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "-q", "model.name=/nonexistent-model", f"output_dir={out}", override])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()
    with pytest.raises(RunConfigError, match=message.split(" must")[0]):
        load_run_config(None, [override])


def test_output_dir_naming_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("mine")
    assert main(["train", "-q", f"output_dir={target}"]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert target.read_text() == "mine"


# --- the run folder ---------------------------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_lives(tmp_path, tiny_model_dir):
    args = [f"model.name={tiny_model_dir}", *FAST, "train.steps=400", f"output_dir={tmp_path / 'run'}"]
    first = cli_process(args)
    lock = tmp_path / "run" / ".rosa-run.lock"
    deadline = time.monotonic() + 300
    while not (tmp_path / "run" / "log.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists() and first.poll() is None
    second = cli_process(args)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 2 and "is in use by another rosa run" in out.decode(), out.decode()[-800:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    # a killed run leaves nothing stuck: --resume takes the folder
    resumed = cli_process([*args, "--resume", "train.steps=400"])
    resumed.send_signal(signal.SIGKILL)  # only checking that it starts past the lock
    resumed.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_resume_reaches_the_same_adapter(tmp_path, tiny_model_dir, sig):
    """The first signal stops at the next step boundary with a checkpoint there, so the resumed run sees exactly
    the batches, RNG and schedule of a run never stopped (Ctrl-C used to record the data position after the
    interrupted step's batch had been drawn)."""
    common = [
        f"model.name={tiny_model_dir}",
        *FAST,
        "train.steps=40",
        "train.save_every=100",
        "eval.before=false",
    ]
    reference = cli_process([*common, f"output_dir={tmp_path / 'ref'}"])
    reference.communicate(timeout=600)
    assert reference.returncode == 0
    run = tmp_path / "run"
    interrupted = cli_process([*common, f"output_dir={run}"])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and interrupted.poll() is None:
        log = run / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 6:
            break
        time.sleep(0.01)
    interrupted.send_signal(sig)
    out, _ = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 130, out.decode()[-1500:]
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert checkpoints and not (run / "adapter").exists()
    resumed = cli_process([*common, f"output_dir={run}", "--resume"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out.decode()[-2000:]
    a = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) or len(steps) >= 40  # no step logged twice before the checkpoint


def test_resume_refuses_changed_settings_and_extends_finished_runs(tmp_path, tiny_model_dir, capsys):
    code, out = cli_train(tmp_path, tiny_model_dir)
    assert code == 0
    base = ["train", "-q", f"model.name={tiny_model_dir}", f"output_dir={out}", "--resume"]
    assert main(base) == 2
    assert "has finished its 4 steps; give a larger train.steps" in capsys.readouterr().err
    assert main([*base, "train.lr=0.5"]) == 2
    assert "train.lr was" in capsys.readouterr().err
    assert main([*base, "train.steps=3"]) == 2
    assert "train.steps=3 is fewer than the run's 4" in capsys.readouterr().err
    assert main([*base, "train.steps=6"]) == 0  # a finished run extended from its last checkpoint
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 6
    steps = [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # no step logged twice


def test_a_resume_keeps_the_rosa_settings_the_run_started_with(tmp_path, tiny_model_dir, monkeypatch):
    """The run folder records every RoSA setting, defaults resolved: a rosa whose default changed since (here
    sparse_lr_ratio) resumes the run with the recorded value, and giving a setting its recorded value again is
    no change."""
    import dataclasses

    import yaml

    from rosa import RosaConfig
    from rosa.app import run_config

    code, out = cli_train(tmp_path, tiny_model_dir)
    assert code == 0
    recorded = yaml.safe_load((out / "run_config.yaml").read_text())["rosa"]
    assert sorted(recorded) == sorted(run_config.rosa_setting_names())
    assert recorded["sparse_lr_ratio"] == RosaConfig().sparse_lr_ratio and recorded["r"] == 2  # FAST's r

    @dataclasses.dataclass
    class Later(RosaConfig):  # a later release with another default
        sparse_lr_ratio: float = 1.5

    # a nested key (what a YAML file's rosa: {rank_pattern: {q_proj: ...}} gives) is compared too
    assert (
        main(
            [
                "train",
                "-q",
                f"model.name={tiny_model_dir}",
                f"output_dir={out}",
                "--resume",
                "train.steps=6",
                "rosa.rank_pattern.q_proj=1",
            ]
        )
        == 2
    )
    monkeypatch.setattr(run_config, "RosaConfig", Later)
    base = ["train", "-q", f"model.name={tiny_model_dir}", f"output_dir={out}", "--resume", "train.steps=6"]
    assert main([*base, f"rosa.sparse_lr_ratio={recorded['sparse_lr_ratio']}"]) == 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["sparse_lr_ratio"] == recorded["sparse_lr_ratio"]


# --- plain LoRA through the schedule ------------------------------------------------------------------------


def test_density_zero_trains_plain_lora_through_the_schedule(tmp_path, tiny_model_dir):
    code, out = cli_train(tmp_path, tiny_model_dir, "rosa.density=0")
    assert code == 0
    events = json.loads((out / "results.json").read_text())["schedule_events"]
    assert [e["event"] for e in events] == ["schedule_started", "no_sparse_budget"]
    assert not (out / "mask.safetensors").exists()


def test_layers_without_budget_are_skipped_by_selection(tmp_path, tiny_model_dir):
    code, out = cli_train(tmp_path, tiny_model_dir, "rosa.density_pattern={q_proj: 0.0}")
    assert code == 0
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    q = [v for k, v in adapter.items() if "q_proj" in k and k.endswith("rosa_col_idx")]
    k = [v for k, v in adapter.items() if "k_proj" in k and k.endswith("rosa_col_idx")]
    assert q and all(v.numel() == 0 for v in q) and all(v.numel() > 0 for v in k)


def test_rosa_mask_with_density_zero_says_so(tmp_path, tiny_model_dir, capsys):
    mask = tmp_path / "m.safetensors"
    assert (
        main(["mask", "-q", f"model.name={tiny_model_dir}", *FAST, "rosa.density=0", "--out", str(mask)]) == 2
    )
    assert "no sparse support to select" in capsys.readouterr().err and not mask.exists()


# --- adapter files -------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_a_file_with_a_transposed_support_but_no_csr_is_refused(tmp_path):
    """Used to skip validation and copy the transpose in unchecked: one backward then died with SIGSEGV."""
    config = RosaConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, density=0.05)
    model = rosa.get_rosa_model(word_llama(0), config)
    set_random_masks(model, seed=1)
    state = model.base_model.model.state_dict()
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    tensors = load_file(path / "adapter_model.safetensors")
    layer = next(k for k in tensors if k.endswith("q_proj.rosa_row_offsets")).rsplit(".", 1)[0]
    del tensors[f"{layer}.rosa_row_offsets"], tensors[f"{layer}.rosa_col_idx"]
    for attr in ("rosa_t_row_offsets", "rosa_t_col_idx", "rosa_t_perm"):
        evil = next(v for k, v in state.items() if k.endswith(f"q_proj.{attr}.default"))
        tensors[f"{layer}.{attr}"] = torch.full_like(evil, 10**6) if attr != "rosa_t_row_offsets" else evil
    save_file(tensors, path / "adapter_model.safetensors")
    target = rosa.get_rosa_model(word_llama(0), config)
    set_random_masks(target, seed=2)
    from peft.utils import set_peft_model_state_dict

    with pytest.raises(AdapterFileError, match="transposed support without the CSR"):
        set_peft_model_state_dict(target, load_file(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("keep", [1, 2])
def test_checkpoint_clean_up_keeps_the_one_just_written(tmp_path, keep):
    """Old checkpoints go oldest first; the one just written stays even when a folder of a later step (one that
    ``latest`` no longer reaches) is there, and that one goes."""
    from peft import LoraConfig, get_peft_model

    from rosa.app.checkpoint import latest_checkpoint, save_checkpoint

    model = get_peft_model(word_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def save(step):
        return save_checkpoint(tmp_path, step, model, optimizer, schedule, {}, {}, keep=keep)

    for step in (10, 20, 50):
        save(step)
    save(30)  # a run that went back: step-50 is stale
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == (["step-30"] if keep == 1 else ["step-20", "step-30"])
    assert latest_checkpoint(tmp_path).name == "step-30"


def test_checkpoint_clean_up_leaves_folders_it_did_not_name(tmp_path):
    """A user's ``step-best`` (or ``step-120-good``, ``step-x``) beside the checkpoints is never removed."""
    from peft import LoraConfig, get_peft_model

    from rosa.app.checkpoint import save_checkpoint

    model = get_peft_model(word_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_checkpoint(tmp_path, 1, model, optimizer, schedule, {}, {}, keep=1)
    mine = ["step-best", "step-120-good", "step-x", "step-\u0663"]  # the last: an Arabic-Indic digit
    for name in mine:
        (tmp_path / "checkpoints" / name).mkdir()
        (tmp_path / "checkpoints" / name / "notes.txt").write_text("mine")
    for step in (2, 3):
        save_checkpoint(tmp_path, step, model, optimizer, schedule, {}, {}, keep=1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == sorted(["step-3", *mine])
    assert all((tmp_path / "checkpoints" / name / "notes.txt").read_text() == "mine" for name in mine)
