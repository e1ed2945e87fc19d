"""systemd's own EnvironmentFile= parser and validators, called through ctypes.

PID 1 loads a unit's `EnvironmentFile=` with `load_env_file()` and then drops every
assignment `env_assignment_is_valid()` refuses (exec_context_load_environment in
src/core/execute.c, via strv_env_clean_with_callback). Both live in libsystemd-shared, the
private library every systemd binary links, so the tests call the very code a Debian 12
host runs instead of a re-implementation. systemd need not be PID 1 for this.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import tempfile

import pytest

LIBRARY = "/usr/lib/*/systemd/libsystemd-shared-*.so"
LOG_EMERG = 0

_StrvPointer = ctypes.POINTER(ctypes.c_char_p)


class Systemd:
    """The functions of one libsystemd-shared; `version` is its number (252 on Debian 12)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.version = int(path.rsplit("-", 1)[1].split(".", maxsplit=1)[0])
        lib = ctypes.CDLL(path)
        # Refusals are logged with the offending line, value included: keep stderr clean.
        lib.log_set_max_level.argtypes = [ctypes.c_int]
        lib.log_set_max_level(LOG_EMERG)
        lib.load_env_file.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.POINTER(_StrvPointer),
        ]
        lib.load_env_file.restype = ctypes.c_int
        lib.env_assignment_is_valid.argtypes = [ctypes.c_char_p]
        lib.env_assignment_is_valid.restype = ctypes.c_bool
        lib.utf8_is_valid_n.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        lib.utf8_is_valid_n.restype = ctypes.c_void_p
        lib.unichar_is_valid.argtypes = [ctypes.c_uint32]
        lib.unichar_is_valid.restype = ctypes.c_bool
        lib.strv_free.argtypes = [_StrvPointer]
        lib.strv_free.restype = ctypes.c_void_p
        self._lib = lib

    def load_env_file(self, data: bytes) -> list[bytes] | None:
        """load_env_file() on a file holding `data`: its NAME=value strings, or None when
        systemd refuses the file (it then starts no unit that names it)."""
        with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="envfile-") as file:
            file.write(data)
            file.flush()
            strv = _StrvPointer()
            result = self._lib.load_env_file(None, os.fsencode(file.name), ctypes.byref(strv))
        if result < 0:
            return None
        out: list[bytes] = []
        if strv:
            index = 0
            while strv[index] is not None:
                out.append(strv[index])
                index += 1
            self._lib.strv_free(strv)
        return out

    def environment(self, data: bytes) -> list[bytes] | None:
        """What a unit gets from an env file: the assignments load_env_file() returns that
        env_assignment_is_valid() keeps (None when the whole file is refused)."""
        loaded = self.load_env_file(data)
        if loaded is None:
            return None
        return [a for a in loaded if self.env_assignment_is_valid(a)]

    def env_assignment_is_valid(self, assignment: bytes) -> bool:
        return bool(self._lib.env_assignment_is_valid(assignment))

    def utf8_is_valid(self, data: bytes) -> bool:
        return self._lib.utf8_is_valid_n(data, len(data)) is not None

    def unichar_is_valid(self, code_point: int) -> bool:
        return bool(self._lib.unichar_is_valid(code_point))


@functools.cache
def libsystemd() -> Systemd:
    """The host's libsystemd-shared (Debian's `systemd` package); fails the test without it."""
    found = sorted(glob.glob(LIBRARY))
    if not found:
        pytest.fail(
            "systemd's libsystemd-shared is missing: run `bash scripts/install-test-deps`"
            " (or `apt-get install systemd`)"
        )
    return Systemd(found[-1])
