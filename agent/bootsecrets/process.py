"""Process hardening for commands that hold secrets in memory.

Not dumpable (no core files, no ptrace by non-root, /proc/<pid>/mem closed to others) and
RLIMIT_CORE 0. Memory is not mlock()ed here: MCL_FUTURE under the default 8 MiB
RLIMIT_MEMLOCK would turn ordinary allocations into MemoryError; bootsecrets.service sets
MemorySwapMax=0 instead, which keeps the whole service out of swap.
"""

from __future__ import annotations

import ctypes
import functools
import resource

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


@functools.cache
def libc() -> ctypes.CDLL:
    """glibc, loaded by its soname: find_library() would run ldconfig (~20 ms) each time."""
    return ctypes.CDLL("libc.so.6", use_errno=True)


def harden() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def dumpable() -> bool:
    return bool(libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
