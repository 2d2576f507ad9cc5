"""Pinning benchmark processes to CPUs, shared by the benchmarks that compare servers."""

from __future__ import annotations

import contextlib
import os


def set_cpus(pid: int, cpus: set[int]) -> None:
    """Move every thread of `pid` onto `cpus` (on Linux affinity is per thread)."""
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        threads = [pid]
    for thread in threads:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(thread, cpus)
