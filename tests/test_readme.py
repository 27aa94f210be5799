"""The generated sections of README.md (the evidence) and docs/benchmarks.md (every table) are exactly what
benchmarks/report.py renders from docs/benchmarks/*.json.

When this fails after a benchmark rewrote its JSON, run ``python benchmarks/report.py`` and commit the documents
with the JSON; never edit a generated section by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def report():
    return load_benchmark("report")


@pytest.fixture(params=["README.md", "docs/benchmarks.md"])
def document(request):
    return request.param


def test_every_marker_pair_is_present_and_well_formed(report, document):
    found = report.sections_in((ROOT / document).read_text(), document)
    assert sorted(name for name, _, _ in found) == sorted(
        s.name for s in report.SECTIONS if s.document == document
    )
    for _, start, end in found:
        assert start <= end


def test_every_table_row_has_its_headers_width(report, document):
    """A row whose cells slid by one still renders; here it fails (generated and hand-written tables alike)."""
    table: list[str] = []
    lines = [*(ROOT / document).read_text().splitlines(), ""]
    for number, line in enumerate(lines, 1):
        if line.startswith("|"):
            table.append(line)
            width = table[0].count("|")
            assert line.count("|") == width, (
                f"{document}:{number}: {line.count('|') - 1} cells under {width - 1} headers"
            )
        else:
            table = []
    if document == "docs/benchmarks.md":  # (the README's evidence is prose)
        assert any(line.startswith("|---") for line in lines), (
            "no table found: the check above checked nothing"
        )


def test_the_documents_are_what_the_jsons_give(report, document):
    current = (ROOT / document).read_text()
    expected = report.regenerate(current, document)
    assert current == expected, (
        f"{document} differs from what docs/benchmarks/*.json give: run `python benchmarks/report.py`.\n"
        + report.diff(current, expected, document)
    )


def _doc(
    report, document: str = "docs/benchmarks.md", body: dict[str, str] | None = None, skip: str = ""
) -> str:
    body = body or {}
    return "intro\n" + "".join(
        f"<!-- generated: {s.name} -->\n{body.get(s.name, 'old')}\n<!-- /generated: {s.name} -->\nprose\n"
        for s in report.SECTIONS
        if s.name != skip and s.document == document
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.replace("<!-- /generated: masks -->", ""), "inside 'masks'"),
        (lambda t: t.replace("<!-- generated: masks -->", ""), "without its opening"),
        (lambda t: t + "<!-- generated: masks -->\n<!-- /generated: masks -->\n", "appears twice"),
        (lambda t: t + "<!-- generated: nonsense -->\n<!-- /generated: nonsense -->\n", "unknown"),
        (lambda t: t + "<!-- generated: masks -->", "appears twice"),
    ],
)
def test_malformed_markers_are_refused(report, mutate, message):
    with pytest.raises(report.MarkerError, match=message):
        report.sections_in(mutate(_doc(report)))


def test_a_missing_section_is_refused(report):
    with pytest.raises(report.MarkerError, match="lacks the generated sections gpu"):
        report.sections_in(_doc(report, skip="gpu"))


def test_a_missing_json_renders_a_not_run_line_and_nothing_else(report, tmp_path, document):
    """With no JSON at all, every section says its benchmark has not been run, and only the generated text
    changes: the prose around the markers is kept byte for byte."""
    text = report.regenerate(_doc(report, document), document, results_dir=tmp_path)
    by_name = {s.name: report.wrap(s.not_run) for s in report.SECTIONS}
    assert text == _doc(report, document, by_name)
    assert report.regenerate(text, document, results_dir=tmp_path) == text  # idempotent


def test_a_section_is_refused_in_the_other_document(report):
    with pytest.raises(report.MarkerError, match=r"unknown generated section '\w+' in README\.md"):
        report.sections_in(_doc(report, "README.md") + _doc(report, skip="evidence"), "README.md")


def test_check_exits_1_with_a_diff_and_rewriting_fixes_it(report, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(ROOT / "docs" / "benchmarks" / "adapter_size.json", results)
    (tmp_path / "docs").mkdir()
    for document in report.DOCUMENTS:
        (tmp_path / document).write_text(_doc(report, document))
    args = ["--root", str(tmp_path), "--results", str(results)]
    assert report.main(["--check", *args]) == 1
    out = capsys.readouterr().out
    assert "-old" in out and "+**Adapter files**" in out
    assert (tmp_path / "docs/benchmarks.md").read_text() == _doc(report)  # --check changes nothing
    assert report.main(args) == 0
    assert report.main(["--check", *args]) == 0
    assert (
        "| PEFT LoRA r 18 (matched count) | 5,495,040 | 22.0 MB |"
        in (tmp_path / "docs/benchmarks.md").read_text()
    )


def test_no_machine_path_reaches_a_document(report, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    data = json.loads((ROOT / "docs" / "benchmarks" / "adapter_size.json").read_text())
    data["provenance"]["command"] = (
        "python benchmarks/adapter_size.py --out /home/someone/rosa/docs/benchmarks/a.json"
    )
    (results / "adapter_size.json").write_text(json.dumps(data))
    text = report.render(next(s for s in report.SECTIONS if s.name == "adapter_size"), results)
    assert "/home/someone" not in text and "--out docs/benchmarks/a.json" in text


def test_wrapping_keeps_tables_and_code_spans_whole(report):
    table = "| " + " | ".join(["a long cell"] * 20) + " |"
    para = (
        "word " * 30
        + "`python benchmarks/sparse_ops.py --previous some/earlier/run.json` and more words " * 2
    )
    out = report.wrap(f"{table}\n{para.strip()}\n- " + "item " * 40)
    lines = out.split("\n")
    assert lines[0] == table
    assert all(len(line) <= report.WIDTH for line in lines[1:])
    assert "`python benchmarks/sparse_ops.py --previous some/earlier/run.json`" in out
    assert lines[-1].startswith("  item")
