"""Malformed data and mask files (issue 30): a record that cannot be read as text is refused naming the file, the
line or row, and the column; a mask file with nothing in it, or one that is not a regular file, is refused.
``HOSTILE`` at the end counts the cases."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import rosa_llama
from safetensors.torch import save_file

from rosa.app.data import DataFileError, load_examples, load_rows
from rosa.mask import MaskError, load_mask, mask_layers

GENERIC = {"prompt": "prompt", "response": "response"}

# file name -> (content, what the message must say after the file's name)
DATA_CASES = {
    "unclosed_quote.csv": (
        'prompt,response\na,b\n"c,d\ne,f\n',
        r":3: column 1 \('prompt'\): not valid CSV: a quoted field is never closed",
    ),
    "unclosed_quote_second_column.csv": (
        'prompt,response\na,"b\nc,d\n',
        r":2: column 2 \('response'\): not valid CSV: a quoted field is never closed",
    ),
    "unclosed_quote_in_a_big_file.csv": (
        'prompt,response\n"a,b\n' + "c,d\n" * 40_000,
        r":2: column 1 \('prompt'\): not valid CSV: a quoted field is never closed",
    ),
    "text_after_a_closing_quote.csv": (
        'prompt,response\n"a"x,b\n',
        r":2: not valid CSV \(',' expected after '\"'\)",
    ),
    "ragged_long_row.csv": ("prompt,response\na,b\nc,d,e\n", r":3: 3 fields, but the header has 2"),
    "ragged_short_row.csv": ("prompt,response\na,b\n\nc\n", r":4: 1 field, but the header has 2"),
    "header_names_a_column_twice.csv": (
        "prompt,prompt,response\na,b,c\n",
        r":1: the header names column 'prompt' twice",
    ),
    "null_value.jsonl": (
        '{"prompt": "a", "response": "b"}\n{"prompt": null, "response": "b"}\n',
        r": row 2, column 'prompt': null, not text \(it would be trained as 'None'\)",
    ),
    "object_value.jsonl": (
        '{"prompt": "a", "response": {"text": "b"}}\n',
        r": row 1, column 'response': an object, not text",
    ),
    "list_value.jsonl": (
        '{"prompt": ["a", "b"], "response": "c"}\n',
        r": row 1, column 'prompt': a list, not text",
    ),
    "nan_value.jsonl": ('{"prompt": "a", "response": NaN}\n', r": row 1, column 'response': nan, not text"),
    "infinity_value.json": (
        '[{"prompt": "a", "response": Infinity}]',
        r": row 1, column 'response': inf, not text",
    ),
    "null_in_a_json_list.json": (
        '{"data": [{"prompt": "a", "response": null}]}',
        r": row 1, column 'response': null",
    ),
    "nested_too_deeply.jsonl": (
        "[" * 100_000 + "]" * 100_000 + "\n",
        r":1: JSON nested too deeply to be a row",
    ),
    "nested_too_deeply.json": ("[" * 100_000 + "]" * 100_000, r": JSON nested too deeply to be a data file"),
}


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_malformed_records_are_refused_naming_where(tmp_path, name):
    content, message = DATA_CASES[name]
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataFileError) as err:
        load_examples("generic", path, column_map=GENERIC)
    assert "\n" not in str(err.value), str(err.value)
    assert re.match(rf"{re.escape(str(path))}{message}", str(err.value)), str(err.value)


def test_well_formed_files_still_load(tmp_path):
    """The controls: a quoted field over several lines, blank lines, numbers (a count is text once written)."""
    csv_file = tmp_path / "ok.csv"
    csv_file.write_text('prompt,response\n"two\nlines",b\n\nc,"d, e"\n')
    assert [(e.prompt, e.response) for e in load_examples("generic", csv_file, column_map=GENERIC)] == [
        ("two\nlines\n", "b"),
        ("c\n", "d, e"),
    ]
    jsonl = tmp_path / "ok.jsonl"
    jsonl.write_text(json.dumps({"prompt": "2 + 2 =", "response": 4}) + "\n")
    assert load_examples("generic", jsonl, column_map=GENERIC)[0].response == "4"


def test_the_csv_reader_reads_what_it_read_before(tmp_path):
    """Strict parsing must not change what a well-formed file gives: the same rows as csv.DictReader."""
    import csv
    import io

    text = 'a,b,c\n1,"x, y",3\n"multi\nline","q ""quoted""",\n,,\n'
    path = tmp_path / "same.csv"
    path.write_text(text)
    assert load_rows(path) == list(csv.DictReader(io.StringIO(text, newline="")))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("unclosed.csv", 'instruction,output\n"a,b\n', r":2: column 1 \('instruction'\): not valid CSV"),
        ("ragged.csv", "instruction,output\na,b,c\n", r":2: 3 fields, but the header has 2"),
        ("null.jsonl", '{"instruction": null, "output": "b"}\n', r": row 1, column 'instruction': null"),
    ],
)
def test_rosa_train_names_the_record_in_one_line(tiny_model_dir, tmp_path, capsys, name, content, message):
    from rosa.cli import main

    data = tmp_path / name
    data.write_text(content)
    task = "csv" if name.endswith(".csv") else "jsonl"
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "-q",
            f"model.name={tiny_model_dir}",
            f"output_dir={out}",
            f"data.task={task}",
            f"data.path={data}",
            "data.prompt_column=instruction",
            "data.response_column=output",
        ]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rosa: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert re.search(rf"{re.escape(str(data))}{message}", lines[0]), lines[0]
    assert not out.exists()


# --- mask files ---------------------------------------------------------------------------------------------------


def _empty_mask_file(model, path: Path) -> Path:
    """Every layer present, every support empty: what save_mask refuses to write."""
    layers = mask_layers(model, "default")
    tensors, shapes = {}, {}
    for name, layer in layers.items():
        tensors[f"{name}.row_offsets"] = torch.zeros(layer.out_features + 1, dtype=torch.int32)
        tensors[f"{name}.col_idx"] = torch.zeros(0, dtype=torch.int32)
        shapes[name] = [layer.out_features, layer.in_features]
    metadata = {
        "format": "rosa-mask",
        "format_version": "1",
        "method": "fisher",
        "layers": json.dumps(list(layers)),
        "shapes": json.dumps(shapes),
    }
    save_file(tensors, path, metadata=metadata)
    return path


def test_a_mask_file_with_every_support_empty_is_refused(tmp_path):
    model = rosa_llama()
    path = _empty_mask_file(model, tmp_path / "empty.safetensors")
    with pytest.raises(MaskError, match=r"empty\.safetensors: every layer's support is empty: not a mask"):
        load_mask(model, path)


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_a_mask_path_that_is_not_a_regular_file_is_never_opened(tmp_path, kind):
    model = rosa_llama()
    path = tmp_path / "mask.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    # a regression fails (reading nothing) instead of hanging: a child opens the FIFO for writing after 30 s (a
    # child, not a thread: the blocked open may hold the GIL)
    child = subprocess.Popen(["sh", "-c", 'sleep 30; : > "$1"', "sh", str(path)]) if kind == "fifo" else None
    try:
        with pytest.raises(MaskError, match=r"mask\.safetensors: .*not a regular file"):
            load_mask(model, path)
    finally:
        if child is not None:
            child.kill()
            child.wait()


# --- the count ------------------------------------------------------------------------------------------------

HOSTILE = {  # distinct hostile inputs this module tries, by class
    "data records": len(DATA_CASES),
    "data files through rosa train": 3,
    "mask files": 1 + 3,
}
