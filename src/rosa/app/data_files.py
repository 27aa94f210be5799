"""Rows of a local data file (CSV with a header, a JSON list, JSON lines), parsed strictly: every problem is one
``DataFileError`` naming the file and, where known, the line and column."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any


class DataFileError(ValueError):
    """A local data file cannot be read as rows: empty, not UTF-8, not JSON/CSV, or a row that is not an object."""


def read_local(path: Path) -> list[dict[str, Any]]:
    """Rows of a local file; every problem is a ``DataFileError`` naming the file (and line where known)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except UnicodeDecodeError as e:
        raise DataFileError(
            f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else _json_rows(path, text)
    if not rows:
        raise DataFileError(f"{path}: the file has no rows" + (" (it is empty)" if not text.strip() else ""))
    return rows


def _csv_rows(path: Path, text: str) -> list[dict[str, Any]]:
    """The records of a CSV file with a header line, parsed strictly: a record with more or fewer fields than the
    header, or a quoted field never closed, is a ``DataFileError`` naming the line and the column (Python's csv
    module would otherwise read an unclosed quote to the end of the file as one field, or fill a short record
    with None)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows: list[dict[str, Any]] = []
    end = 0  # the last line of the previous record
    try:
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record:
                continue  # a blank line
            if header is None:
                header = record
                twice = sorted({c for c in header if header.count(c) > 1})
                if twice:
                    raise DataFileError(f"{path}:{start}: the header names column {twice[0]!r} twice")
                continue
            if len(record) != len(header):
                raise DataFileError(
                    f"{path}:{start}: {len(record)} field{'s' if len(record) != 1 else ''}, but the header has "
                    f"{len(header)} "
                    f"({', '.join(repr(c) for c in header[:8])}{', ...' if len(header) > 8 else ''})"
                )
            rows.append(dict(zip(header, record)))
    except csv.Error as e:
        raise DataFileError(_csv_error(path, text, end + 1, header, e)) from None
    return rows


def _csv_error(path: Path, text: str, line: int, header: list[str] | None, error: csv.Error) -> str:
    """Where a CSV record that cannot be parsed starts and, for a quote never closed, which field opened it."""
    lines = text.splitlines() or [""]
    start = lines[min(line, len(lines)) - 1]
    unclosed = "unexpected end of data" in str(error) or (
        "field larger than field limit" in str(error) and start.count('"') % 2 == 1
    )
    if not unclosed:
        return f"{path}:{line}: not valid CSV ({error})"
    fields = next(csv.reader([start]), [""])  # read leniently, the open field is the last one
    index = max(len(fields) - 1, 0)
    column = f"column {index + 1}" + (f" ({header[index]!r})" if header and index < len(header) else "")
    return (
        f"{path}:{line}: {column}: not valid CSV: a quoted field is never closed (its opening quote runs on to "
        "the end of the file)"
    )


def _json_rows(path: Path, text: str) -> list[dict[str, Any]]:
    """A ``.json`` list of objects (or ``{"data": [...]}``), else JSON lines (many ``.json`` files are)."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        except RecursionError:
            raise DataFileError(f"{path}: JSON nested too deeply to be a data file") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if isinstance(data, list):
            for i, row in enumerate(data):
                _check_object(row, f"{path}: item {i}")
            return data
        if data is not None:
            raise DataFileError(f"{path}: expected a JSON list of objects (or an object with a 'data' list)")
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataFileError(f"{path}:{lineno}: JSON nested too deeply to be a row") from None
            rows.append(_check_object(row, f"{path}:{lineno}"))
    return rows


def _check_object(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataFileError(
            f"{where}: expected a JSON object with the task's columns, got {type(row).__name__}"
        )
    return row
