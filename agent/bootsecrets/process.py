"""Process hardening for commands that hold secrets in memory.

Not dumpable (no core files, no ptrace by non-root, /proc/<pid>/mem closed to others) and
RLIMIT_CORE 0. Memory is not mlock()ed here: MCL_FUTURE under the default 8 MiB
RLIMIT_MEMLOCK would turn ordinary allocations into MemoryError; bootsecrets.service sets
MemorySwapMax=0 instead, which keeps the whole service out of swap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def harden() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def dumpable() -> bool:
    return bool(_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
