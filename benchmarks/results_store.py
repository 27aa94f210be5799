"""A results JSON that several benchmark processes add to at once: each finished run is written as soon as it
ends, atomically and under a lock, so a second process sharing the file (one stream per core) neither loses nor
resurrects entries, and Ctrl-C loses at most the run in progress."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any


def load(path: Path, empty: dict[str, Any]) -> dict[str, Any]:
    """The file's contents, or ``empty`` when it does not exist yet."""
    return json.loads(path.read_text()) if path.exists() else empty


def record(path: Path, part: str, key: str, value: dict[str, Any], empty: dict[str, Any]) -> dict[str, Any]:
    """Add one entry under ``part`` to the file as it is on disk now (under a lock); return the new contents.

    Only the new entry is written: an entry another process added meanwhile stays, and one removed from the
    file by hand is not brought back from this process's memory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = load(path, empty)
        on_disk.setdefault(part, {})[key] = value
        write(on_disk, path)
    return on_disk


def write(results: dict[str, Any], path: Path) -> None:
    """Replace the file atomically (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
