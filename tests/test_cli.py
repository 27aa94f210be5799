"""The ``rosa`` command end to end on a tiny random LLaMA and the real files in ../shared/data."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import FAST, cli_process, cli_train
from safetensors.torch import load_file

from rosa.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("train", "eval", "merge", "mask"):
        assert command in text
    for command in ("train", "eval", "merge", "mask"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "override" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("task", "files"),
    [
        ("gsm8k", ["data.path={data}/gsm8k/train.jsonl"]),
        (
            "viggo",
            ["data.path={data}/viggo/train.csv", "data.eval_path={data}/viggo/valid.csv", "eval.limit=3"],
        ),
        ("sql", ["data.path={data}/sql/train.jsonl"]),
    ],
)
def test_train_each_task_format(tmp_path, tiny_model_dir, task, files):
    if not DATA.is_dir():
        pytest.skip("../shared/data is not present")
    code, out = cli_train(
        tmp_path, tiny_model_dir, f"data.task={task}", *(f.format(data=DATA) for f in files)
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and results["task"] == task
    assert results["after"]["count"] == 3 and 0.0 <= results["after"]["exact_match"] <= 1.0
    assert [e["event"] for e in results["schedule_events"]][-1] == "mask_fixed"
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("rosa_col_idx") and v.numel() > 0 for k, v in adapter.items())
    assert (out / "mask.safetensors").is_file() and (out / "log.jsonl").is_file()


def test_generic_jsonl_and_csv_with_column_mapping(tmp_path, tiny_model_dir):
    rows = [
        {"instruction": f"Say {w}", "output": w} for w in ("alpha", "beta", "gamma", "delta", "eps", "zeta")
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = tmp_path / "pairs.csv"
    csv.write_text("instruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n" for r in rows))
    for task, path in (("jsonl", jsonl), ("csv", csv)):
        run_dir = tmp_path / task
        run_dir.mkdir()
        code, out = cli_train(
            run_dir,
            tiny_model_dir,
            f"data.task={task}",
            f"data.path={path}",
            "data.prompt_column=instruction",
            "data.response_column=output",
            "data.val_size=2",
        )
        assert code == 0
        assert json.loads((out / "results.json").read_text())["after"]["count"] == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.task=sql", "data.path=/nonexistent/file.jsonl"], "not found|No such file|does not exist"),
        (["train.nonsense=1"], "unknown config key 'train.nonsense'"),
        (["rosa.density=2"], "density must be a number in \\[0, 1\\]"),
        (["train.lr=fast"], "train.lr must be a number"),
    ],
)
def test_bad_input_one_clear_message_nothing_written(tmp_path, tiny_model_dir, capsys, overrides, message):
    code, out = cli_train(tmp_path, tiny_model_dir, *overrides)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("rosa: error:") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err)
    assert not out.exists()


def test_dataset_missing_column_is_named(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "context": "c"}) + "\n")
    code, out = cli_train(tmp_path, tiny_model_dir, "data.task=sql", f"data.path={bad}")
    assert code == 2
    assert "answer" in capsys.readouterr().err
    assert not out.exists()


def test_model_that_is_not_a_causal_lm(tmp_path, tiny_model_dir, capsys):
    from transformers import T5Config

    bert = tmp_path / "t5"  # an encoder-decoder: no causal LM head
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=32).save_pretrained(bert)
    code = main(["train", "-q", f"model.name={bert}", f"output_dir={tmp_path / 'run'}", *FAST])
    assert code == 2
    assert "not a causal language model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_existing_run_needs_resume(tmp_path, tiny_model_dir, capsys):
    assert cli_train(tmp_path, tiny_model_dir)[0] == 0
    code, _ = cli_train(tmp_path, tiny_model_dir)
    assert code == 2 and "--resume" in capsys.readouterr().err


def test_eval_merge_and_mask_commands(tmp_path, tiny_model_dir):
    code, out = cli_train(tmp_path, tiny_model_dir)
    assert code == 0
    model = f"model.name={tiny_model_dir}"
    results = tmp_path / "eval.json"
    assert main(["eval", "-q", model, *FAST, "--adapter", str(out / "adapter"), "--out", str(results)]) == 0
    assert json.loads(results.read_text())["count"] == 3
    merged = tmp_path / "merged"
    assert (
        main(["merge", model, "--adapter", str(out / "adapter"), "--out", str(merged), "--dtype", "float32"])
        == 0
    )
    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()
    mask = tmp_path / "mask.safetensors"
    assert main(["mask", "-q", model, *FAST, "--out", str(mask)]) == 0
    assert mask.is_file()


def test_resume_after_sigkill_reaches_the_same_adapter(tmp_path, tiny_model_dir):
    common = [
        f"model.name={tiny_model_dir}",
        *FAST,
        "train.steps=60",
        "train.save_every=3",
        "eval.before=false",
        "rosa.warmup_steps=4",
        "rosa.mask_steps=2",
    ]
    reference = cli_process([*common, f"output_dir={tmp_path / 'ref'}"])
    interrupted = cli_process([*common, f"output_dir={tmp_path / 'run'}"])
    latest = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and interrupted.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    assert interrupted.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "run" / "adapter").exists()
    resumed = cli_process([*common, f"output_dir={tmp_path / 'run'}", "--resume"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out.decode()[-2000:]
    reference.communicate(timeout=600)
    assert reference.returncode == 0
    a = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_resume_in_the_middle_of_the_rewarmup_reaches_the_same_adapter(tmp_path, tiny_model_dir):
    """The mask is fixed after step 2 and the restarted parameters ramp over 6 steps: a run resumed from its
    step-4 checkpoint (in a copy of its folder) must continue the ramp where it was, not restart or skip it."""
    ramp = ["train.steps=10", "train.lr_warmup_steps=6", "train.keep_checkpoints=10", "eval.before=false"]
    code, out = cli_train(tmp_path, tiny_model_dir, *ramp)
    assert code == 0
    events = json.loads((out / "results.json").read_text())["schedule_events"]
    fixed = next(e for e in events if e["event"] == "mask_fixed")
    assert fixed["optimizer_step"] == 2 and fixed["rewarmup"] == 6
    state = json.loads((out / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["mask_fixed_step"] == 2
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "adapter")
    (copy / "results.json").unlink()
    (copy / "checkpoints" / "latest").write_text("step-4")
    assert main(["train", "-q", f"model.name={tiny_model_dir}", f"output_dir={copy}", "--resume"]) == 0
    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(copy / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_two_run_recipe_from_the_command_line(tmp_path, tiny_model_dir):
    """`rosa mask --out m` then `rosa train train.mask_path=m`: the second run starts from that mask at step 0
    (no warm-up, no collection) and trains the sparse values at lr / rosa.sparse_lr_ratio."""
    mask = tmp_path / "mask.safetensors"
    model = f"model.name={tiny_model_dir}"
    assert main(["mask", "-q", model, *FAST, "--out", str(mask)]) == 0
    code, out = cli_train(tmp_path, tiny_model_dir, f"train.mask_path={mask}", "rosa.sparse_lr_ratio=4")
    assert code == 0
    events = json.loads((out / "results.json").read_text())["schedule_events"]
    assert [e["event"] for e in events] == ["schedule_started", "mask_loaded"]
    saved = load_file(mask)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    col_keys = [k for k in adapter if k.endswith("rosa_col_idx")]
    assert col_keys and all(
        any(torch.equal(adapter[k], v) for n, v in saved.items() if n.endswith("col_idx")) for k in col_keys
    )
    groups = json.loads((out / "checkpoints" / "step-2" / "state.json").read_text())["optimizer"][
        "param_groups"
    ]
    rates = {g["name"]: g["initial_lr"] for g in groups}
    assert rates["rosa_sparse"] == pytest.approx(rates["rosa_lora"] / 4)


def test_a_mask_of_another_density_is_refused(tmp_path, tiny_model_dir, capsys):
    mask = tmp_path / "mask.safetensors"
    assert main(["mask", "-q", f"model.name={tiny_model_dir}", *FAST, "--out", str(mask)]) == 0
    code, _ = cli_train(tmp_path, tiny_model_dir, f"train.mask_path={mask}", "rosa.density=0.1")
    err = capsys.readouterr().err
    assert code == 2 and "set the density the mask was scored at (about 0.05" in err, err


def test_rosa_mask_refuses_a_mask_to_start_from(tmp_path, tiny_model_dir, capsys):
    """It would have started from the given mask, scored nothing, written nothing and said it had."""
    mask, again = tmp_path / "mask.safetensors", tmp_path / "again.safetensors"
    model = f"model.name={tiny_model_dir}"
    assert main(["mask", "-q", model, *FAST, "--out", str(mask)]) == 0
    assert main(["mask", "-q", model, *FAST, f"train.mask_path={mask}", "--out", str(again)]) == 2
    err = capsys.readouterr().err
    assert "leave train.mask_path out" in err and len(err.strip().splitlines()) == 1, err
    assert not again.exists()


def test_a_moved_setting_says_where_it_went(tmp_path, tiny_model_dir, capsys):
    code, _ = cli_train(tmp_path, tiny_model_dir, "train.sparse_lr_ratio=4")
    assert code == 2 and "train.sparse_lr_ratio is now rosa.sparse_lr_ratio" in capsys.readouterr().err


def test_a_missing_mask_file_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, capsys):
    code, out = cli_train(tmp_path, tiny_model_dir, f"train.mask_path={tmp_path / 'nope.safetensors'}")
    assert code == 2 and "train.mask_path" in capsys.readouterr().err
    assert not out.exists()
