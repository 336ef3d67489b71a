"""Crash-safe file writes: temp file in the same folder, fsync, os.replace, fsync the folder.

A reader sees the old file or the new one, never a mix, whatever kills the writer (SIGKILL, power
loss, a full disk). A SIGKILL can still leave the temp file itself behind; `remove_stale_temps`
deletes those whose writer process is gone (run before resuming).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from core.errors import UserError
from core.faults import crash_point

_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    p = Path(path)
    tmp = temp_name(p)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            crash_point(f"write:{p.name}")
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        crash_point(f"replace:{p.name}")
        os.replace(tmp, p)
        _fsync_dir(p.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {p} ({e.strerror or e}); the previous file, if any, is intact") from None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on some platforms/filesystems; the rename is still atomic
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files left by writers that died mid-write; returns what was removed."""
    removed = []
    for p in Path(folder).glob(".*.tmp-*"):
        m = _TEMP.match(p.name)
        if m and p.is_file() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
