"""Where a benchmark result came from: one helper shared by every script that writes docs/benchmarks/*.json.

``provenance()`` is called by a benchmark's driver when it starts and stored under the JSON's ``"provenance"``
key; ``finish(p)`` adds the load average at the end. The README's generated text (``benchmarks/report.py``)
renders it with ``describe(results)``, and says so plainly when a JSON predates this helper.

    {"command": "python benchmarks/sparse_ops.py --repeats 7", "git_commit": "<sha>[+dirty]",
     "date": "2026-11-29T10:00:00+00:00", "python": ..., "platform": ..., "torch": ..., "torch_threads": ...,
     "cuda": ..., "cpu_model": ..., "cpu_bf16": [...], "cpu_count": ..., "cpu_affinity": ..., "gpus": [...],
     "load_average_start": [1, 5, 15 min], "load_average_end": [...]}
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: Path = ROOT) -> str:
    """The commit the benchmark code ran from, with '+dirty' when tracked files other than results had
    uncommitted changes (a result JSON rewritten by an earlier benchmark of the same session is not a code change)."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs/benchmarks")
    return commit + ("+dirty" if changed else "")


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (runnable processes), or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def command_line(argv: list[str] | None = None) -> str:
    """``python <script relative to the repository> <args>``: the command that reproduces the run."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        script = Path(argv[0])
        try:
            argv[0] = str(script.resolve().relative_to(ROOT))
        except ValueError:
            argv[0] = str(script)
    return " ".join(["python", *argv]).strip()


def _cpuinfo() -> str | None:
    """/proc/cpuinfo's text, or None where there is none (read once: the model and the flags come from it)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def _cpu_model(cpuinfo: str | None) -> str:
    for line in (cpuinfo or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of the x86 instructions that compute in bf16


def cpu_bf16(cpuinfo: str | None) -> list[str] | None:
    """The bf16 instruction sets ``cpuinfo`` (/proc/cpuinfo's text) reports (``[]``: none), or None where it cannot
    say. A bf16 timing means something else on each kind: without them a bf16 GEMM is slower than fp32's."""
    for line in (cpuinfo or "").splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in BF16_FLAGS if f in flags]
    return None


def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"torch": None, "torch_threads": None, "cuda": None, "gpus": []}
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpus": gpus,
    }


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line, git commit (+dirty), UTC date, Python / torch / CPU / GPU description and the load average
    at the moment of the call (call it when the benchmark starts)."""
    cpuinfo = _cpuinfo()
    return {
        "command": command_line(argv),
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **_torch_info(),
        "cpu_model": _cpu_model(cpuinfo),
        "cpu_bf16": cpu_bf16(cpuinfo),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_start": load_average(),
    }


def finish(p: dict[str, Any]) -> dict[str, Any]:
    """``p`` with the load average at the end of the run added (call it just before writing the JSON)."""
    p["load_average_end"] = load_average()
    return p


# --- rendering (used by the scripts' markdown functions) --------------------------------------------------


def _load(values) -> str:
    return " / ".join(f"{float(v):.2f}" for v in values) if values else "not recorded"


def _first(results: dict[str, Any], *paths: str) -> Any:
    for path in paths:
        value: Any = results
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def _legacy(results: dict[str, Any], script: str) -> str:
    """What a JSON written before this helper existed still tells, from the fields its script used to write."""
    known, missing = [], ["git commit"]
    date = _first(results, "machine.date", "meta.date")
    known.append(f"the date {date}") if date else missing.append("date")
    torch_version = _first(results, "machine.torch", "versions.torch", "meta.torch")
    if torch_version:
        known.append(f"torch {torch_version}")
    start = _first(results, "machine.load_average_start", "machine.load_avg_start")
    end = _first(results, "machine.load_average_end", "machine.load_avg_end", "machine.loadavg_at_end")
    if start or end:
        loads = ([f"{_load(start)} at the start"] if start else []) + (
            [f"{_load(end)} at the end"] if end else []
        )
        known.append("load average (1 / 5 / 15 min) " + " and ".join(loads))
    else:
        missing.append("machine load")
    no = " or ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
    records = f"records {', '.join(known)} but no {no}" if known else f"records no {no}"
    command = (results.get("command") or f"python {script}").strip()
    return (
        f"*Provenance*: incomplete: this JSON predates `benchmarks/provenance.py` and {records}; it must be "
        f"rerun (`{command}`) to carry them."
    )


def describe(results: dict[str, Any], script: str) -> str:
    """One markdown sentence on where ``results`` came from; plain about what the JSON does not record."""
    p = results.get("provenance")
    if not p:
        return _legacy(results, script)
    where = p.get("cpu_model") or "unknown CPU"
    if "cpu_bf16" in p and p["cpu_bf16"] is not None:
        where += f" ({', '.join(p['cpu_bf16']) or 'no bf16 instructions'})"
    if p.get("cpu_count"):
        where += f", {p['cpu_count']} CPUs"
    if p.get("gpus"):
        where += ", " + ", ".join(p["gpus"])
    return (
        f"*Provenance*: `{p.get('command')}` at commit `{p.get('git_commit')}`, {p.get('date')}; "
        f"torch {p.get('torch')}, Python {p.get('python')}, {where}; load average (1 / 5 / 15 min) "
        f"{_load(p.get('load_average_start'))} at the start, {_load(p.get('load_average_end'))} at the end."
    )


def unknown_keys_note(results: dict[str, Any], written: set[str], rerun: str) -> str:
    """A line naming top-level keys the script never writes (a hand edit): they are not rendered."""
    extra = sorted(set(results) - written)
    if not extra:
        return ""
    keys = ", ".join(f"`{k}`" for k in extra)
    return (
        f"*This JSON was partly edited by hand*: it holds keys the script never writes ({keys}); they are not "
        f"shown here, and the JSON must be rerun (`{rerun}`)."
    )
