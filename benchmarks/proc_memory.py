"""Resident-memory readings from ``/proc/self/status`` (Linux), shared by the benchmarks that report peak RSS."""

from __future__ import annotations


def status_kib(field: str) -> int:
    """One ``/proc/self/status`` field in KiB, e.g. ``VmRSS`` (now) or ``VmHWM`` (peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Restart the ``VmHWM`` peak at the current resident size (``clear_refs`` 5); returns that size in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS") * 1024
