"""Process-wide settings: made by entry points, never by library calls.

    from crosslib.runtime import configure_process
    configure_process()   # once, at the start of a program that trains on CPU

The `crosslib` command (crosslib/cli.py), `python -m crosslib.dictionaries.distributed` and the benchmarks call it;
a script or notebook that trains outside them may. Library functions (`crosslib.dictionaries.train` and the rest)
leave the process's settings as they found them: nothing here changes a result, only how fast CPU
training runs.
"""

from __future__ import annotations

import ctypes
import os
import sys

MALLOC_TUNING_ENV = "CROSSLIB_MALLOC_TUNING"  # "0": leave malloc alone
MALLOC_THRESHOLD = 1 << 30  # bytes: glibc's mmap and trim thresholds while tuned
# glibc reads these at a process's start (mallopt(3)): exported, they tune the processes this one starts
# (the notebook kernels `crosslib book` runs) the way mallopt tunes this one
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_ALLOCATOR_TUNED: list[bool] = []


def configure_process() -> bool:
    """Apply crosslib's process-wide settings to this process and the processes it starts; True if malloc
    is tuned.

    Process-wide, hence for entry points only: glibc's allocator keeps large freed blocks (see
    `tune_allocator`), in this process and, through the environment, in its child processes.
    `CROSSLIB_MALLOC_TUNING=0` turns it off. Idempotent.
    """
    tuned = tune_allocator()
    if tuned:
        for name in MALLOC_ENV:
            os.environ.setdefault(name, str(MALLOC_THRESHOLD))
    return tuned


def tune_allocator() -> bool:
    """Keep large freed blocks in glibc's heap instead of returning them to the OS (Linux, once per process).

    By default glibc serves every block above a dynamic threshold (≤ 32 MB) with a fresh mmap and
    unmaps it when freed, so each training step's big temporaries ([snapshot, feature, batch] of
    ~10^8 bytes) are page-faulted in anew: on a 2-core machine that doubled the time of the fused
    gate kernels. Raising M_MMAP_THRESHOLD and M_TRIM_THRESHOLD keeps that memory mapped for reuse
    (the process keeps its peak memory). Set CROSSLIB_MALLOC_TUNING=0 to leave malloc alone.
    Process-wide: call it through `configure_process`, from an entry point.
    """
    if _ALLOCATOR_TUNED or sys.platform != "linux" or os.environ.get(MALLOC_TUNING_ENV) == "0":
        return bool(_ALLOCATOR_TUNED and _ALLOCATOR_TUNED[0])
    ok = False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MALLOC_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                      MALLOC_THRESHOLD))
    except (OSError, AttributeError):
        pass
    _ALLOCATOR_TUNED.append(ok)
    return ok
