"""Process-wide settings: made by entry points, never by library calls.

    from crosslib.runtime import configure_process
    configure_process()   # once, at the start of a program that trains on CPU

The `crosslib` command (crosslib/cli.py), `python -m crosslib.dictionaries.distributed` and the benchmarks call it;
a script or notebook that trains outside them may. Library functions (`crosslib.dictionaries.train` and the rest)
leave the process's settings as they found them: nothing here changes a result, only how fast CPU
training runs.

Two settings: glibc's allocator keeps large freed blocks (`tune_allocator`), and torch's thread count
follows the machine's load (`follow_load`): as many threads as there are cores that other processes
leave free. Both reach the processes an entry point starts (the notebook kernels of `crosslib book`)
through the environment.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import time

MALLOC_TUNING_ENV = "CROSSLIB_MALLOC_TUNING"  # "0": leave malloc alone
MALLOC_THRESHOLD = 1 << 30  # bytes: glibc's mmap and trim thresholds while tuned
# glibc reads these at a process's start (mallopt(3)): exported, they tune the processes this one starts
# (the notebook kernels `crosslib book` runs) the way mallopt tunes this one
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_ALLOCATOR_TUNED: list[bool] = []

THREADS_ENV = "CROSSLIB_THREADS"
THREAD_MODES = ("follow", "fixed")  # follow the load (configure_process's default), or leave torch's count alone
FOLLOW_INTERVAL = 1.0  # seconds of CPU accounting behind each thread-count decision
# Another process that used more than this share of a core over the last interval is taken to hold it
TAKEN_CORE_SHARE = 0.5


def configure_process() -> bool:
    """Apply crosslib's process-wide settings to this process and the processes it starts; True if malloc
    is tuned.

    Process-wide, hence for entry points only: glibc's allocator keeps large freed blocks (see
    `tune_allocator`), in this process and, through the environment, in its child processes.
    `CROSSLIB_MALLOC_TUNING=0` turns it off. Idempotent.
    """
    mode = os.environ.setdefault(THREADS_ENV, "follow")
    if mode not in THREAD_MODES:
        from crosslib.config import ParameterError

        raise ParameterError(f"{THREADS_ENV}={mode!r} is not allowed: use one of {', '.join(THREAD_MODES)} "
                             "('follow': torch's thread count follows the machine's load; 'fixed': it stays "
                             "as torch or OMP_NUM_THREADS set it)")
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


# ----------------------------------------------------------------------------- load-following threads
# torch's OpenMP threads spin at every barrier. When another process holds one of two cores, the
# thread that shares a core with it makes the other wait at each barrier: a stage ran 2.4-3.1x slower
# at two threads, but at one thread as fast as on a quiet machine (benchmarks/bench_busy.py). So
# under `CROSSLIB_THREADS=follow` the long loops (every `crosslib.progress` bar calls `follow_load`)
# use one thread per core that other processes leave free. That changes speed only: the suite's layer
# norms (`crosslib.models.suite.thread_invariant_layer_norms`) and the sparse products' switch-over
# (`crosslib.dictionaries.kernels.sparse_density_limit`) were made independent of the thread count, and
# the tests train the suite, a cache and a dictionary at one and two threads and compare every bit.


class LoadFollower:
    """Chooses torch's thread count from the CPU time other processes used over the last interval (Linux)."""

    def __init__(self, max_threads: int, cores: list[int] | None = None, interval: float = FOLLOW_INTERVAL) -> None:
        self.cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
        self.max_threads = max(1, min(max_threads, len(self.cores)))
        self.interval = interval
        self.ticks_per_second = os.sysconf("SC_CLK_TCK")
        self.last: tuple[float, int, int] | None = None  # (time, busy ticks on our cores, our own ticks)

    def sample(self) -> tuple[float, int, int]:
        return time.monotonic(), busy_ticks(self.cores), own_ticks()

    def others(self, before: tuple[float, int, int], after: tuple[float, int, int]) -> float:
        """Cores' worth of CPU time other processes used between two samples."""
        seconds = after[0] - before[0]
        other_ticks = (after[1] - before[1]) - (after[2] - before[2])
        return max(0.0, other_ticks / (seconds * self.ticks_per_second)) if seconds > 0 else 0.0

    def threads_for(self, others: float) -> int:
        taken = math.floor(others + 1 - TAKEN_CORE_SHARE)  # cores other processes hold
        return max(1, min(self.max_threads, len(self.cores) - taken))

    def poll(self) -> int | None:
        """The thread count to use now; None until an interval has passed since the last decision."""
        if self.last is not None and time.monotonic() - self.last[0] < self.interval:
            return None
        now = self.sample()
        before, self.last = self.last, now
        return None if before is None else self.threads_for(self.others(before, now))


def busy_ticks(cores: list[int]) -> int:
    """Clock ticks the given cores spent busy since boot (`/proc/stat`: all but idle and iowait; steal counts
    as busy, since a hypervisor's other guests hold the core then)."""
    wanted = {f"cpu{core}" for core in cores}
    total = 0
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, *fields = line.split()
            if name in wanted:
                user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
                total += user + nice + system + irq + softirq + steal
    return total


def own_ticks() -> int:
    """Clock ticks this process (all its threads) has run, user and system (`/proc/self/stat`)."""
    with open("/proc/self/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


_FOLLOWER: list[LoadFollower] = []  # the process's follower, made on first use


def follow_load() -> None:
    """Under `CROSSLIB_THREADS=follow`, set torch's thread count to the cores other processes leave free.

    Never more than torch's thread count when this was first called (one per core, or what
    OMP_NUM_THREADS or `torch.set_num_threads` gave the process): a program that asked for one thread
    keeps one, and processes sharing a machine (torchrun's ranks) each see the others' load.

    Cheap enough to call at every step of a loop (a clock read; every `FOLLOW_INTERVAL` seconds, two small
    /proc reads). Does nothing elsewhere: when the variable is unset or "fixed" (library use leaves torch
    alone), off Linux, or before torch is loaded.
    """
    if os.environ.get(THREADS_ENV) != "follow" or "torch" not in sys.modules or sys.platform != "linux":
        return
    torch = sys.modules["torch"]
    if not _FOLLOWER:
        try:
            _FOLLOWER.append(LoadFollower(torch.get_num_threads()))
        except (OSError, ValueError, AttributeError):
            os.environ[THREADS_ENV] = "fixed"  # no /proc or affinity here: stop trying
            return
    threads = _FOLLOWER[0].poll()
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
