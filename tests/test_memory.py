"""The allocator settings every entry point applies: freed tensor-sized blocks are reused, not re-faulted."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocate and free a 100 MB buffer five times (as a forward pass does with its activations) and count the
# page faults: glibc's default mmaps each one afresh (25,600 faults per 100 MB), the tuned heap reuses it.
# (Plain malloc through ctypes, as PyTorch's CPU allocator does; numpy would madvise huge pages itself.)
PROBE = """
import ctypes, resource, core.memory
from core.errors import run_cli
run_cli(lambda argv: 0)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def forward_pass():
    p = libc.malloc(100 * 2**20)
    ctypes.memset(p, 1, 100 * 2**20)
    libc.free(p)
forward_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    forward_pass()
print(core.memory.tune_allocator(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(tuning: str) -> tuple[str, int]:
    env = {**os.environ, "CLS_MALLOC_TUNING": tuning, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc mallopt options")
def test_entry_points_keep_large_blocks_in_the_heap():
    applied, faults = _probe("1")
    assert applied == "True" and faults < 2_000
    applied, faults = _probe("0")  # the opt-out restores glibc's behaviour
    assert applied == "False" and faults > 50_000
