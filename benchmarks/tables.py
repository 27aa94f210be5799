"""Markdown tables as every benchmark prints them and the docs show them: a header row, a rule, the rows.

A table whose columns slid by one would still render: ``markdown_table`` refuses a row of the wrong width, as
``markdown_row`` does when given the width, and tests/test_readme.py checks every table the docs publish."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]] = ()) -> list[str]:
    """The table's lines; add more with :func:`markdown_row` (same width)."""
    return [markdown_row(header), "|" + "---|" * len(header)] + [markdown_row(r, len(header)) for r in rows]


def markdown_row(cells: Sequence[object], width: int | None = None) -> str:
    """``| a | b |`` (an empty cell is ``| |``)."""
    if width is not None and len(cells) != width:
        raise ValueError(f"a table row of {len(cells)} cells in a table of {width} columns: {list(cells)!r}")
    return "|" + "".join(f" {c} |" if str(c) else " |" for c in cells)
