"""A results JSON that several benchmark processes add to at once: each finished run is written as soon as it
ends, atomically and under a lock, so a second process sharing the file (one stream per core) neither loses nor
resurrects entries, and Ctrl-C loses at most the run in progress. A process claims a run before training it, so
two streams given the same list split it between them."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
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


@contextlib.contextmanager
def claim(path: Path, key: str) -> Iterator[bool]:
    """Claim ``key`` for this process while the block runs: yields False when another live process holds it.

    The claim is a file holding the claimant's pid, created exclusively; one left by a process that died is
    taken over."""
    folder = path.with_name(f".{path.name}.claims")
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / hashlib.sha256(key.encode()).hexdigest()[:16]
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        holder = _holder(marker)
        if holder is not None and holder != os.getpid():
            yield False
            return
        marker.write_text(f"{os.getpid()}\n{key}\n")
    try:
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()


def _holder(marker: Path) -> int | None:
    """The live process holding a claim, or None (no claim, or its process is gone)."""
    try:
        pid = int(marker.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid
