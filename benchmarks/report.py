#!/usr/bin/env python
"""Regenerate every benchmark section of README.md and docs/benchmarks.md from docs/benchmarks/*.json.

Each document marks its generated sections:

    <!-- generated: sparse_ops -->
    ...text written by this script, never by hand...
    <!-- /generated: sparse_ops -->

and each section is rendered by the pure function of the benchmark script that writes its JSON
(``markdown(results) -> str``; for accuracy, ``report(results, plot=None)``, whose printing is captured). A
missing JSON renders one line saying the benchmark has not been run, so the result depends only on the files
in the repository.

    python benchmarks/report.py           # rewrite the generated sections of both documents
    python benchmarks/report.py --check   # exit 1 and print a diff when a document is not what the JSONs give

tests/test_readme.py runs the check. README.md holds the short evidence (the accuracy verdicts); every table
is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import io
import json
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
RESULTS = ROOT / "docs" / "benchmarks"
README, BENCHMARKS_DOC = "README.md", "docs/benchmarks.md"
DOCUMENTS = (README, BENCHMARKS_DOC)  # relative to the repository root


def load_module(name: str) -> ModuleType:
    """A benchmark script as a module, loaded by path (benchmarks/ is not a package), with its siblings
    (provenance, proc_memory) importable as when it runs as a script."""
    key = f"bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(key, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


def _markdown(module: ModuleType, results: dict) -> str:
    return module.markdown(results)


def _accuracy(module: ModuleType, results: dict) -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # report() prints the text it returns
        return module.report(results, plot=None)


def startup_markdown(results: dict) -> str:
    """The start-up section, used while benchmarks/startup.py has no ``markdown`` of its own."""
    import provenance
    from tables import markdown_row, markdown_table

    runs = results["results"]
    floor = next((r for name, r in runs.items() if "floor" in name), None)
    out = [
        f"**Start-up** (`{results['provenance']['command']}`; `docs/benchmarks/startup.json`): wall time of a "
        f"fresh process from spawn to exit, best and median of {results['repeats']} runs after one untimed run.",
        "",
        provenance.describe(results, "benchmarks/startup.py"),
        "",
        *markdown_table(["command", "best s", "median s", "best, over the interpreter's own start"]),
    ]
    for name, r in runs.items():
        extra = "-" if r is floor or floor is None else f"{r['best_s'] - floor['best_s']:+.3f} s"
        out.append(markdown_row([name, f"{r['best_s']:.3f}", f"{r['median_s']:.3f}", extra]))
    if any("rosa.cli" in r["argv"] for r in runs.values()):
        out += ["", "No installed `rosa` console script was found: `python -m rosa.cli` stood in for it."]
    return "\n".join(out) + "\n"


def _accuracy_summary(module: ModuleType, results: dict) -> str:
    return module.summary(results)


def _startup(module: ModuleType, results: dict) -> str:
    render = getattr(module, "markdown", None)
    return render(results) if render is not None else startup_markdown(results)


@dataclass(frozen=True)
class Section:
    name: str  # the marker's name
    json: str  # file under docs/benchmarks
    script: str  # module under benchmarks/ that renders it
    not_run: str  # the text when the JSON does not exist
    render: Callable[[ModuleType, dict], str] = _markdown
    document: str = BENCHMARKS_DOC  # which document holds it


SECTIONS = [
    Section(
        "evidence",
        "accuracy.json",
        "accuracy",
        "*Accuracy*: not run yet (`python benchmarks/accuracy.py` writes `docs/benchmarks/accuracy.json`).",
        _accuracy_summary,
        README,
    ),
    Section(
        "evidence_epoch",
        "accuracy_epoch.json",
        "accuracy_epoch",
        "*One epoch, 500 test rows*: not run yet (`python benchmarks/accuracy_epoch.py` writes "
        "`docs/benchmarks/accuracy_epoch.json`).",
        _accuracy_summary,
        README,
    ),
    Section(
        "startup",
        "startup.json",
        "startup",
        "**Start-up**: not run yet (`python benchmarks/startup.py` writes `docs/benchmarks/startup.json`).",
        _startup,
    ),
    Section(
        "sparse_ops",
        "sparse_ops.json",
        "sparse_ops",
        "**Sparse operations**: not run yet (`python benchmarks/sparse_ops.py` writes "
        "`docs/benchmarks/sparse_ops.json`).",
    ),
    Section(
        "masks",
        "masks.json",
        "masks",
        "**Mask collection**: not run yet (`python benchmarks/masks.py` writes `docs/benchmarks/masks.json`).",
    ),
    Section(
        "adapter_size",
        "adapter_size.json",
        "adapter_size",
        "**Adapter files**: not run yet (`python benchmarks/adapter_size.py` writes "
        "`docs/benchmarks/adapter_size.json`).",
    ),
    Section(
        "qrosa",
        "qrosa.json",
        "qrosa",
        "**QRoSA vs QLoRA**: not run yet (`python benchmarks/qrosa.py` writes `docs/benchmarks/qrosa.json`).",
    ),
    Section(
        "step",
        "step.json",
        "step",
        "**One training step against the alternatives**: not run yet (`python benchmarks/step.py` writes "
        "`docs/benchmarks/step.json`).",
    ),
    Section(
        "layer",
        "layer.json",
        "layer",
        "**One layer, forward + backward**: not run yet (`python benchmarks/layer.py` writes "
        "`docs/benchmarks/layer.json`).",
    ),
    Section(
        "accuracy",
        "accuracy.json",
        "accuracy",
        "*Accuracy*: not run yet (`python benchmarks/accuracy.py` writes `docs/benchmarks/accuracy.json`).",
        _accuracy,
    ),
    Section(
        "accuracy_epoch",
        "accuracy_epoch.json",
        "accuracy_epoch",
        "*One epoch, 500 test rows*: not run yet (`python benchmarks/accuracy_epoch.py` writes "
        "`docs/benchmarks/accuracy_epoch.json`).",
        _accuracy,
    ),
    Section(
        "gpu",
        "gpu_h200.json",
        "gpu",
        "**GPU: not measured yet.** `python benchmarks/gpu.py` checks every sparse op of the layer's path "
        "(the `rosa::` custom ops on the Triton kernels) against a float64 reference and times them exactly as "
        "`RosaLinear` calls them, next to cuBLAS bf16 GEMMs and cuSPARSE, plus a whole RoSA layer against a "
        "LoRA layer at LLaMA-7B shapes; it writes `docs/benchmarks/gpu_h200.json`. It has not been run on a "
        'GPU, so nothing about GPU speed is claimed, and `sparse_strategy="auto"` uses the spmm strategy on '
        "CUDA.",
    ),
]

_MARKER = re.compile(r"<!-- (/?)generated: ([A-Za-z0-9_]+) -->")


class MarkerError(ValueError):
    """A document's generated-section markers are missing, unknown, repeated, nested or unbalanced."""


def sections_in(text: str, document: str = BENCHMARKS_DOC) -> list[tuple[str, int, int]]:
    """(name, start, end) of every generated section: the content lies in text[start:end], between the end
    of its opening marker and the beginning of its closing one. Raises MarkerError unless every marker pair is
    well formed (each opening closed by its own name before the next opening, no name twice, only known
    names, every known name of ``document`` present)."""
    known = {s.name for s in SECTIONS if s.document == document}
    found: list[tuple[str, int, int]] = []
    open_name, open_end = None, 0
    for m in _MARKER.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if name not in known:
            raise MarkerError(
                f"unknown generated section {name!r} in {document} (known: {', '.join(sorted(known))})"
            )
        if not closing:
            if open_name is not None:
                raise MarkerError(f"section {name!r} opens inside {open_name!r}, which is not closed")
            if any(f[0] == name for f in found):
                raise MarkerError(f"section {name!r} appears twice")
            open_name, open_end = name, m.end()
        else:
            if open_name != name:
                raise MarkerError(f"closing marker of {name!r} without its opening marker")
            found.append((name, open_end, m.start()))
            open_name = None
    if open_name is not None:
        raise MarkerError(f"section {open_name!r} is never closed")
    missing = known - {f[0] for f in found}
    if missing:
        raise MarkerError(f"{document} lacks the generated sections {', '.join(sorted(missing))}")
    return found


WIDTH = 115  # the README's own line length


def wrap(text: str, width: int = WIDTH) -> str:
    """Paragraphs and list items re-flowed to the README's width; tables, code, images and headings as they are."""
    out = []
    for line in text.split("\n"):
        if len(line) <= width or line.startswith(("|", "    ", "![", "#", "<!--")):
            out.append(line)
            continue
        bullet = line.startswith("- ")
        # A space inside a `code span` is no place for a line break: hold it as NUL while filling.
        held = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\0"), line)
        filled = textwrap.fill(
            held,
            width,
            subsequent_indent="  " if bullet else "",
            break_long_words=False,
            break_on_hyphens=False,
        )
        out.append(filled.replace("\0", " "))
    return "\n".join(out)


def render(section: Section, results_dir: Path = RESULTS) -> str:
    """The generated text of one section (ends with a newline)."""
    path = results_dir / section.json
    if not path.exists():
        return wrap(section.not_run) + "\n"
    results = json.loads(path.read_text())
    if not (BENCHMARKS / f"{section.script}.py").exists():
        raise FileNotFoundError(
            f"{path} exists but benchmarks/{section.script}.py, which renders it, does not"
        )
    text = section.render(load_module(section.script), results)
    # a command recorded with an absolute --out names the folder of one machine: show it from the repository
    text = re.sub(r"(?<![\w.~])/(?:[\w.-]+/)+?(?=docs/benchmarks/)", "", text)
    return wrap(text.strip("\n")) + "\n"


def regenerate(text: str, document: str = BENCHMARKS_DOC, results_dir: Path = RESULTS) -> str:
    """``text`` (``document``'s) with every generated section replaced by what the JSONs give."""
    by_name = {s.name: s for s in SECTIONS}
    out, pos = [], 0
    for name, start, end in sections_in(text, document):
        out += [text[pos:start], "\n", render(by_name[name], results_dir)]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def diff(current: str, expected: str, document: str = BENCHMARKS_DOC) -> str:
    return "".join(
        difflib.unified_diff(
            current.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            f"{document} (as is)",
            f"{document} (from docs/benchmarks/*.json)",
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff if stale")
    parser.add_argument("--root", type=Path, default=ROOT, help="folder holding README.md and docs/")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the benchmark JSONs")
    args = parser.parse_args(argv)
    stale = 0
    for document in DOCUMENTS:
        path = args.root / document
        current = path.read_text()
        try:
            expected = regenerate(current, document, args.results)
        except MarkerError as e:
            print(f"{path}: {e}", file=sys.stderr)
            return 1
        if expected == current:
            print(f"{document}: up to date")
        elif args.check:
            print(diff(current, expected, document))
            print(f"{document} is stale: run python benchmarks/report.py", file=sys.stderr)
            stale = 1
        else:
            path.write_text(expected)
            print(f"rewrote the generated sections of {document}")
    return stale


if __name__ == "__main__":
    sys.exit(main())
