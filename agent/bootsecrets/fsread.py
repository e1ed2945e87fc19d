"""Reading a file the agent is given without being blocked or flooded: the error types, the
open (O_NONBLOCK|O_NOCTTY: a FIFO cannot block it) and the bounded read of an fstat-ed
regular file. `fsio.read_regular_file` puts them together (and walks the agent's own
directories without following a symlink). A leaf: it imports nothing from the package.
"""

from __future__ import annotations

import os
import stat
import unicodedata
from pathlib import Path

READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CHUNK = 1 << 20


def shown(path: os.PathLike[str] | str) -> str:
    """A path as an error message may show it: control characters (and undecodable bytes)
    escaped, so a name cannot forge a line of output."""
    out = []
    for char in os.fspath(path):
        code = ord(char)
        if unicodedata.category(char) in ("Cc", "Cs") or code in (0x2028, 0x2029):
            out.append(
                f"\\x{code & 0xFF:02x}"
                if code <= 0xFF or 0xDC80 <= code <= 0xDCFF
                else f"\\u{code:04x}"
            )
        else:
            out.append(char)
    return "".join(out)


def describe_mode(mode: int) -> str:
    """What kind of file a stat mode is, for messages ("a FIFO", "a character device")."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def _size(limit: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if limit >= factor and limit % factor == 0:
            return f"{limit // factor} {unit}"
    return f"{limit} bytes"


class FileRefused(Exception):
    """A file that will not be read: `.path` is the path refused (the file, or a directory
    on the way to it), `.reason` what it is ("is a FIFO, not a regular file", "is larger
    than 1 MiB", "cannot read: Permission denied", "does not exist"). `str()` is
    "<path>: <reason>", control characters escaped."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{shown(path)}: {reason}")


class FileMissing(FileRefused):
    """Nothing at the path (reason "does not exist")."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "does not exist")


def open_for_reading(path: Path, name: str | Path, flags: int, dir_fd: int | None) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise FileMissing(path) from None
    except OSError as err:
        raise FileRefused(path, _why_unreadable(name, flags, dir_fd, err)) from None


def _why_unreadable(name: str | Path, flags: int, dir_fd: int | None, err: OSError) -> str:
    nofollow = bool(flags & os.O_NOFOLLOW)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=not nofollow)
    except OSError:
        return f"cannot read: {err.strerror}"
    if stat.S_ISLNK(st.st_mode):
        try:
            target = f" to {describe_mode(os.stat(name, dir_fd=dir_fd).st_mode)}"
        except OSError:
            target = " (dangling)"
        return f"is a symlink{target}; refusing to follow it"
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):  # e.g. a socket: ENXIO
        return f"is {describe_mode(st.st_mode)}, not a regular file"
    return f"cannot read: {err.strerror}"


def read_fd(fd: int, path: Path, limit: int) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused(path, f"is {describe_mode(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise FileRefused(path, f"is larger than {_size(limit)}")
    chunks: list[bytes] = []
    remaining = limit + 1
    try:
        while remaining > 0:
            chunk = os.read(fd, min(remaining, _CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as err:
        raise FileRefused(path, f"cannot read: {err.strerror}") from None
    if remaining <= 0:
        raise FileRefused(path, f"is larger than {_size(limit)}")
    return b"".join(chunks)
