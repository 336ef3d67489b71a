"""Process-wide allocator settings for tensor workloads (applied by every entry point through run_cli).

glibc hands every allocation above its mmap threshold (at most 32 MB, adapting upwards from 128 KB) straight to
the kernel and returns it on free. CNN activations are such allocations, so each forward pass page-faults its
activations in again, zero-filled by the kernel: on the 2-core CI machine PyTorch eager spent more time in the
kernel than in convolutions (EfficientNet-Lite0, 300 px, batch 32: 11 img/s, 13 s system vs 8 s user time;
with the settings below 30 img/s, peak RSS unchanged). Keeping freed blocks in the heap trades that for memory
held at its high-water mark, which training, export and a long-running demo reach anyway.

Set CLS_MALLOC_TUNING=0 to keep the C library's defaults. A no-op outside glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from pathlib import Path

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>
_KEEP = 2**31 - 1  # largest value mallopt accepts: never mmap or trim a block on its own
_TOP_PAD = 64 * 2**20  # grow the heap in 64 MB steps instead of one brk per allocation

_applied: bool | None = None


def _glibc():
    """The C library when it is glibc (whose mallopt/mallinfo2 this module speaks), else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _glibc()


def tune_allocator() -> bool:
    """Apply the settings once per process; True if they are in effect."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("CLS_MALLOC_TUNING", "1") == "0" or _LIBC is None:
        return False
    try:
        return all(
            _LIBC.mallopt(option, value) == 1
            for option, value in ((M_MMAP_THRESHOLD, _KEEP), (M_TRIM_THRESHOLD, _KEEP), (M_TOP_PAD, _TOP_PAD))
        )
    except AttributeError:
        return False


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]  # fmt: skip


def _mallinfo2():
    try:
        fn = _LIBC.mallinfo2
    except AttributeError:  # not glibc, or glibc < 2.33
        return None
    fn.restype = _Mallinfo2
    return fn


_MALLINFO2 = _mallinfo2() if _LIBC is not None else None


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process in MB (Linux /proc); OSError if it cannot be read."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_use_mb() -> float:
    """Memory this process holds for live objects, in MB: bytes the C allocator has handed out and not got back
    (heap + mmapped blocks) where glibc can tell, else the resident set size. With the settings above freed
    memory stays resident, so RSS only shows the high-water mark; this still shows what a step needs."""
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return (info.uordblks + info.hblkhd) / 2**20
    try:
        return rss_mb()
    except OSError:
        return float("nan")
