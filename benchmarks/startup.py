"""How long a user waits for ``rosa --help``, ``rosa train --help`` and ``import rosa``: wall-clock time of a
fresh process, best of N (the least disturbed run), with the plain interpreter start as the floor.

    python benchmarks/startup.py [--repeats 5] [--out docs/benchmarks/startup.json]

The ``rosa`` command is the console script installed next to this interpreter (not a shell shim in front of
it); where there is none, ``python -m rosa.cli`` stands in and the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import provenance  # benchmarks/provenance.py: run as a script, this folder is on sys.path

ROOT = provenance.ROOT


def rosa_command() -> list[str]:
    """The installed ``rosa`` entry point of this interpreter, or ``python -m rosa.cli``."""
    script = Path(sys.executable).parent / "rosa"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rosa.cli"]


def cases() -> dict[str, list[str]]:
    rosa = rosa_command()
    return {
        "python -c pass (interpreter floor)": [sys.executable, "-c", "pass"],
        "rosa --help": [*rosa, "--help"],
        "rosa train --help": [*rosa, "train", "--help"],
        'python -c "import rosa"': [sys.executable, "-c", "import rosa"],
    }


def time_once(argv: list[str]) -> float:
    """Seconds from spawn to exit; a failing command is an error, not a fast number."""
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{argv} exited {result.returncode}: {result.stderr[-500:]}")
    return elapsed


def measure(argv: list[str], repeats: int) -> dict:
    time_once(argv)  # warm the OS file cache and the .pyc files: every later run starts alike
    runs = [time_once(argv) for _ in range(repeats)]
    return {
        "argv": argv,
        "best_s": round(min(runs), 4),
        "median_s": round(statistics.median(runs), 4),
        "runs_s": [round(r, 4) for r in runs],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "startup.json")
    args = parser.parse_args(argv)
    info = provenance.provenance(None if argv is None else [sys.argv[0], *argv])
    results = {name: measure(command, args.repeats) for name, command in cases().items()}
    out = {"provenance": provenance.finish(info), "repeats": args.repeats, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:40s} best {r['best_s']:.3f} s  median {r['median_s']:.3f} s")


if __name__ == "__main__":
    main()
