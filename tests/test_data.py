"""Tests for rosa.app.data and rosa.app.batches: task formats on the real data files, tokenization, splits,
collator, sampler."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from rosa.app.batches import (
    IGNORE_INDEX,
    CausalLMCollator,
    LengthGroupedBatchSampler,
    pad_token_id,
    tokenize_example,
    tokenize_examples,
)
from rosa.app.data import (
    TASKS,
    Example,
    format_rows,
    get_task,
    load_examples,
    load_rows,
    split_rows,
    synthetic_rows,
    synthetic_splits,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


@pytest.fixture(scope="session")
def tokenizer():
    """The converted default model's tokenizer (converted once, then read from the cache)."""
    from transformers import AutoTokenizer

    from rosa.app.default_model import DefaultModelUnavailable, default_model_path

    try:
        path = default_model_path()
    except DefaultModelUnavailable as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(path)


def _first_jsonl(path: Path, n: int) -> list[dict]:
    with path.open() as f:
        return [json.loads(next(f)) for _ in range(n)]


# ------------------------------------------------------------------------------------------- task formats


@needs_data
def test_gsm8k_format_on_real_rows():
    raw = _first_jsonl(DATA / "gsm8k" / "train.jsonl", 3)
    examples = load_examples("gsm8k", DATA / "gsm8k" / "train.jsonl", limit=3)
    assert len(examples) == 3
    for row, ex in zip(raw, examples):
        assert ex.prompt == f"Question: {row['question']}\nAnswer:\n"
        assert ex.response == row["answer"].strip()
    assert examples[0].response.endswith("#### 72")


@needs_data
def test_viggo_format_is_sentence_to_meaning_representation():
    with (DATA / "viggo" / "valid.csv").open(newline="") as f:
        raw = list(csv.DictReader(f))
    # a directory plus split name finds valid.csv through the 'validation' alias
    examples = load_examples("viggo", DATA / "viggo", split="validation")
    assert len(examples) == len(raw) == 714
    for row, ex in zip(raw[:3], examples[:3]):
        assert ex.response == row["mr"]
        assert ex.prompt == (
            "Convert the sentence into a meaning representation.\n"
            f"Sentence: {row['ref']}\nMeaning representation:\n"
        )
    assert examples[0].response.startswith(
        ("inform(", "request(", "give_opinion(", "confirm(", "verify_attribute(")
    )


@needs_data
def test_sql_format_strips_wrapper():
    raw = _first_jsonl(DATA / "sql" / "train.jsonl", 3)
    examples = load_examples("sql", str(DATA / "sql" / "train.jsonl"), limit=3)
    assert examples[0].response == "SELECT COUNT(*) FROM head WHERE age > 56"
    for row, ex in zip(raw, examples):
        assert "[SQL]" not in ex.response and "[/SQL]" not in ex.response
        assert row["answer"] == f"[SQL] {ex.response} [/SQL]"
        assert ex.prompt == (
            "Write a SQL query that answers the question, using the tables below.\n"
            f"Tables: {row['context']}\nQuestion: {row['question']}\nSQL:\n"
        )


def test_sql_answer_without_wrapper_is_kept():
    [ex] = format_rows(
        [{"question": "q", "context": "CREATE TABLE t (a INT)", "answer": " SELECT a FROM t "}], "sql"
    )
    assert ex.response == "SELECT a FROM t"


def test_generic_jsonl_and_csv_with_column_map(tmp_path):
    rows = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Count:\n", "output": "1 2 3"}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv_path = tmp_path / "d.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "output"])
        w.writeheader()
        w.writerows(rows)
    json_list = tmp_path / "d.json"
    json_list.write_text(json.dumps(rows))
    cmap = {"prompt": "instruction", "response": "output"}
    expected = [Example("Say hi\n", "hi"), Example("Count:\n", "1 2 3")]  # newline added only when missing
    for path in (jsonl, csv_path, json_list):
        assert load_examples("generic", path, column_map=cmap) == expected


def test_missing_column_names_column_and_present_columns(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "solution": "s"}) + "\n")
    with pytest.raises(KeyError) as err:
        load_examples("gsm8k", path)
    msg = str(err.value)
    assert "'answer'" in msg and "question" in msg and "solution" in msg
    with pytest.raises(KeyError, match="instruction"):
        format_rows([{"prompt": "p", "response": "r"}], "generic", {"prompt": "instruction"})


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_rows("data/nope.csv")
    with pytest.raises(FileNotFoundError, match="split"):
        load_rows(tmp_path, split="train")
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k'.*gsm8k"):
        get_task("gsm9k")
    with pytest.raises(ValueError, match="unknown task"):
        load_examples("nope", tmp_path / "x.jsonl")


def test_registry_has_all_tasks():
    assert set(TASKS) == {"gsm8k", "viggo", "sql", "generic", "synthetic"}


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_task_is_deterministic_and_correct():
    train, val = synthetic_splits(n_train=300, n_eval=50, seed=3)
    assert (train, val) == synthetic_splits(n_train=300, n_eval=50, seed=3)
    assert train != synthetic_splits(n_train=300, n_eval=50, seed=4)[0]
    assert len(train) == 300 and len(val) == 50
    words = lambda exs: {e.prompt.split("Letters: ")[1].split("\n")[0].replace("-", "") for e in exs}  # noqa: E731
    assert not words(train) & words(val) and len(words(train)) == 300
    for ex in train + val:
        letters = ex.prompt.split("Letters: ")[1].split("\n")[0].split("-")
        assert 3 <= len(letters) <= 5 and all(len(c) == 1 and c.islower() for c in letters)
        assert ex.response == "-".join(letters[::-1])
        assert ex.prompt == f"Reverse the letters.\nLetters: {'-'.join(letters)}\nReversed:\n"
    assert synthetic_rows(2, seed=0) == synthetic_rows(2, seed=0)
    assert (
        len(load_examples("synthetic")) == 2000 and len(load_examples("synthetic", split="validation")) == 200
    )


# ------------------------------------------------------------------------------------------- tokenization


@needs_data
def test_tokenize_real_examples_masks_prompt_and_appends_eos(tokenizer):
    examples = (
        load_examples("gsm8k", DATA / "gsm8k" / "train.jsonl", limit=2)
        + load_examples("viggo", DATA / "viggo" / "train.csv", limit=2)
        + load_examples("sql", DATA / "sql" / "train.jsonl", limit=2)
        + synthetic_splits(2, 1)[0]
    )
    for ex in examples:
        feat = tokenize_example(ex, tokenizer, max_length=1024)
        prompt_ids = tokenizer(ex.prompt)["input_ids"]
        response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert feat["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
        assert feat["labels"][:n] == [IGNORE_INDEX] * n
        assert feat["labels"][n:] == feat["input_ids"][n:]
        assert IGNORE_INDEX not in feat["labels"][n:]
        assert feat["labels"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(feat["input_ids"][n:-1]) == ex.response


@needs_data
def test_truncation_keeps_prompt_end_then_cuts_response(tokenizer):
    ex = load_examples("gsm8k", DATA / "gsm8k" / "train.jsonl", limit=1)[0]
    p = tokenizer(ex.prompt)["input_ids"]
    r = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(p) > 30 and len(r) > 20  # the cases below rely on these sizes

    # 1. short response, window 10 tokens too small: the prompt loses its first 10 tokens, response whole
    short_answer = Example(ex.prompt, "#### 72")
    rs = tokenizer(short_answer.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    feat = tokenize_example(short_answer, tokenizer, max_length=len(p) + len(rs) - 10)
    assert feat["input_ids"] == p[10:] + rs
    assert feat["labels"] == [IGNORE_INDEX] * (len(p) - 10) + rs

    # 2. tight: the prompt keeps half the window (its end), the response is cut and has no EOS
    feat = tokenize_example(ex, tokenizer, max_length=40)
    assert feat["input_ids"] == p[-20:] + r[:20]
    assert feat["labels"] == [IGNORE_INDEX] * 20 + r[:20]
    assert feat["input_ids"][-1] != tokenizer.eos_token_id

    # 3. short prompt: it is kept whole, only the response is cut
    short = Example("Q:\n", ex.response)
    ps = tokenizer(short.prompt)["input_ids"]
    feat = tokenize_example(short, tokenizer, max_length=30)
    assert feat["input_ids"] == ps + r[: 30 - len(ps)]
    assert len(feat["input_ids"]) == 30


def test_truncation_keeps_leading_bos():
    class CharTok:  # a deterministic toy tokenizer with BOS=1, EOS=2: one id per character
        bos_token_id, eos_token_id, pad_token_id = 1, 2, None

        def __call__(self, text, add_special_tokens=True):
            ids = [ord(c) for c in text]
            return {"input_ids": [1, *ids] if add_special_tokens else ids}

    feat = tokenize_example(Example("abcdefghij\n", "xyz"), CharTok(), max_length=10)
    # prompt has 12 ids (BOS + 11), response 4 (xyz + EOS): the prompt keeps 6 = BOS + its last 5
    assert feat["input_ids"] == [1, *map(ord, "ghij\n"), *map(ord, "xyz"), 2]
    assert feat["labels"] == [IGNORE_INDEX] * 6 + [*map(ord, "xyz"), 2]


# ---------------------------------------------------------------------------------------------- splitting


def test_split_rows_is_deterministic_and_partitions():
    rows = list(range(100))
    train, val = split_rows(rows, val_fraction=0.1, seed=0)
    assert (train, val) == split_rows(rows, val_fraction=0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == rows and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)  # original order kept
    assert val != split_rows(rows, val_fraction=0.1, seed=1)[1]
    assert len(split_rows(rows, val_size=7)[1]) == 7
    for bad in ({}, {"val_fraction": 0.1, "val_size": 3}, {"val_size": 0}, {"val_size": 100}):
        with pytest.raises(ValueError):
            split_rows(rows, **bad)


# ----------------------------------------------------------------------------------------------- collator


def test_collator_right_pads_with_eos_when_no_pad_token():
    tok = SimpleNamespace(pad_token_id=None, eos_token_id=2)
    assert pad_token_id(tok) == 2
    batch = CausalLMCollator(tok)(
        [
            {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
            {"input_ids": [8], "labels": [8]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())

    padded = CausalLMCollator(0, pad_to_multiple_of=4)([{"input_ids": [5, 6, 7, 8, 9]}])
    assert padded["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert padded["labels"].tolist() == [[5, 6, 7, 8, 9] + [IGNORE_INDEX] * 3]
    with pytest.raises(ValueError, match="pad token"):
        pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))


# ------------------------------------------------------------------------------------------------ sampler


def _lengths(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 200, (n,), generator=g).tolist()


def test_sampler_covers_every_index_once_per_epoch_and_is_deterministic():
    lengths = _lengths(103)
    s = LengthGroupedBatchSampler(lengths, batch_size=8, seed=0, mega_batch_mult=4)
    epoch0, epoch1 = list(s), list(s)  # iterating twice advances the epoch
    assert len(epoch0) == len(s) == 13
    for order in (epoch0, epoch1):
        flat = [i for b in order for i in b]
        assert sorted(flat) == list(range(103))
    assert epoch0 != epoch1
    assert epoch0 == list(LengthGroupedBatchSampler(lengths, batch_size=8, seed=0, mega_batch_mult=4))
    assert epoch0 != list(LengthGroupedBatchSampler(lengths, batch_size=8, seed=1, mega_batch_mult=4))
    assert sum(len(b) < 8 for b in epoch0) == 1  # only the last mega-batch leaves a short batch
    dropped = list(LengthGroupedBatchSampler(lengths, batch_size=8, drop_last=True))
    assert len(dropped) == 12 and all(len(b) == 8 for b in dropped)


def test_sampler_groups_by_length():
    lengths = _lengths(64)
    # one mega-batch spans everything: each batch is a run of 8 consecutive lengths in sorted order
    batches = list(LengthGroupedBatchSampler(lengths, batch_size=8, mega_batch_mult=8))
    ranked = sorted(range(64), key=lambda i: (-lengths[i], i))
    runs = sorted(ranked[k : k + 8] for k in range(0, 64, 8))
    assert sorted(batches) == runs


def test_sampler_resume_yields_remaining_order():
    lengths = _lengths(50)
    full = list(LengthGroupedBatchSampler(lengths, batch_size=4, seed=7))
    s = LengthGroupedBatchSampler(lengths, batch_size=4, seed=7)
    it = iter(s)
    seen = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON round trip
    assert state["epoch"] == 0 and state["batch_index"] == 5
    resumed = LengthGroupedBatchSampler(lengths, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert seen + rest == full
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["batch_index"] == 0
    with pytest.raises(ValueError, match="different"):
        LengthGroupedBatchSampler(lengths, batch_size=4, seed=8).load_state_dict(state)
    # an explicit position from the training loop works without a fingerprint
    explicit = LengthGroupedBatchSampler(lengths, batch_size=4, seed=7)
    explicit.load_state_dict({"epoch": 0, "batch_index": 5})
    assert list(explicit) == rest


def test_sampler_in_dataloader_with_collator():
    feats = [
        {"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (3, 9, 4, 8, 2, 7)
    ]
    sampler = LengthGroupedBatchSampler([len(f["input_ids"]) for f in feats], batch_size=2, mega_batch_mult=3)
    loader = DataLoader(feats, batch_sampler=sampler, collate_fn=CausalLMCollator(0))
    shapes = sorted(tuple(b["input_ids"].shape) for b in loader)
    # mega-batches of 6 = all rows, sorted by length: (9, 8), (7, 4), (3, 2)
    assert shapes == [(2, 3), (2, 7), (2, 9)]


def test_tokenize_examples_feeds_sampler(tokenizer):
    examples = synthetic_splits(n_train=20, n_eval=1)[0]
    feats = tokenize_examples(examples, tokenizer, max_length=64)
    assert len(feats) == 20
    sampler = LengthGroupedBatchSampler([len(f["input_ids"]) for f in feats], batch_size=4)
    batch = CausalLMCollator(tokenizer)([feats[i] for i in next(iter(sampler))])
    assert batch["input_ids"].shape[0] == 4
    assert (batch["labels"] == tokenizer.eos_token_id).sum() == 4  # one EOS label per row


# --------------------------------------------------------------------------------------- unusable files


UNUSABLE = [
    ("empty.jsonl", b"", "the file has no rows \\(it is empty\\)"),
    ("blank.jsonl", b"\n  \n", "the file has no rows"),
    ("empty.json", b"[]", "the file has no rows"),
    ("header.csv", b"prompt,response\n", "the file has no rows"),
    (
        "latin1.jsonl",
        '{"prompt": "caf\u00e9"}\n'.encode("latin-1"),
        "not UTF-8 text \\(byte 0xe9 at offset 15\\)",
    ),
    (
        "latin1.csv",
        "prompt\ncaf\u00e9\n".encode("latin-1"),
        "not UTF-8 text \\(byte 0xe9 at offset 10\\)",
    ),
    ("list.jsonl", b'{"prompt": "p"}\n["p", "r"]\n', "expected a JSON object .* got list"),
    ("strings.json", b'["prompt", "response"]', "item 0: expected a JSON object"),
    ("huge.csv", b"prompt\n" + b"x" * 200_000 + b"\n", "not valid CSV \\(field larger"),
]


@pytest.mark.parametrize(("name", "content", "message"), UNUSABLE, ids=[case[0] for case in UNUSABLE])
def test_unusable_file_is_one_error_naming_it(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}(:2)?: {message}") as err:
        load_rows(path)
    assert type(err.value).__name__ == "DataFileError"


def test_a_spreadsheet_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffprompt,response\nhi,there\n".encode())
    assert load_examples("generic", path) == [Example("hi\n", "there")]


def test_missing_column_names_the_setting_the_file_and_the_columns(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"a": "x", "b": "y"}) + "\n" + json.dumps({"b": "z"}) + "\n"
    )
    cmap = {"prompt": "instruction", "response": "b"}
    with pytest.raises(KeyError) as err:  # a directory source: the message names the file read from it
        load_examples("generic", tmp_path, column_map=cmap, column_settings={"prompt": "data.prompt_column"})
    path = tmp_path / "train.jsonl"
    assert str(err.value) == f"data.prompt_column='instruction' not found in {path}; columns: a, b"
    with pytest.raises(KeyError) as err:
        load_examples("generic", tmp_path, column_map={"prompt": "a", "response": "b"})
    assert str(err.value) == f"column_map['prompt']='a' not found in {path} (row 2 of 2); columns: b"
    with pytest.raises(KeyError) as err:
        format_rows([{"question": "q"}], "gsm8k")
    assert str(err.value) == (
        "task 'gsm8k' expects columns 'question', 'answer'; 'answer' not found in the rows; columns: question"
    )
