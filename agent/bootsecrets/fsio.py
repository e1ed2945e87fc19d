"""Safe file primitives: no path the agent creates, writes or removes follows a symlink, and
nothing it reads can block it or exhaust its memory.

Writing. Every path is walked from a trusted *anchor* (`Paths.root`: "/" on a host, the
sandbox root in tests; what is above it is trusted): each directory component below the anchor
is opened with O_DIRECTORY|O_NOFOLLOW relative to the previous one, and files are created,
replaced, linked and removed relative to the final directory's fd. A symlink anywhere below
the anchor is refused with `StoreError` (exit 12) naming it, never followed; the memory-only
check is `fstatfs` on the directory fd the bytes are written into. A file is created with
O_CREAT|O_EXCL|O_NOFOLLOW, owner and mode set before its first byte, fsync'd, and replaced by
renaming a temporary file within the same directory fd; a temporary left by an error (SIGTERM
included: the CLI raises it as an exception) is removed.

Reading. `read_regular_file` opens O_NONBLOCK|O_NOCTTY (a FIFO cannot block the open), fstat's
the fd and accepts only a regular file whose size is within the limit, and reads at most
limit + 1 bytes (a file that grows is refused too). It raises `FileRefused` (`FileMissing` when
nothing is there) with a short `.reason` that callers turn into their own error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets as _random
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from types import TracebackType

from bootsecrets.errors import StoreError
from bootsecrets.fsread import (
    READ_FLAGS,
    FileMissing,
    FileRefused,
    describe_mode,
    open_for_reading,
    read_fd,
    shown,
)
from bootsecrets.process import libc

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def read_regular_file(
    path: Path,
    limit: int,
    *,
    follow_symlinks: bool = True,
    anchor: Path | None = None,
) -> bytes:
    """The bytes of the regular file at `path`, at most `limit` of them.

    `follow_symlinks=False` refuses a symlink as the last component. With `anchor`, no
    component below the anchor may be a symlink (the last one included): for files in the
    agent's own directories. Raises `FileMissing` or `FileRefused`, never blocks on a FIFO or
    a device, never reads more than limit + 1 bytes.
    """
    if anchor is not None:
        try:
            parent = open_dir(anchor, path.parent)
        except _PathRefused as err:
            raise (
                FileMissing(path) if err.missing else FileRefused(err.path, err.reason)
            ) from None
        with parent:
            return parent.read_file(path.name, limit)
    flags = READ_FLAGS | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = open_for_reading(path, path, flags, None)
    try:
        return read_fd(fd, path, limit)
    finally:
        os.close(fd)


# --- directories reached without following a symlink --------------------------------------------


class _PathRefused(StoreError):
    """A path the agent will not create, write or walk through: the store (or the drop-in or
    state directory) is not usable as laid out, exit 12 like any StoreError. `.path` names
    it, `.reason` says why ("is a symlink; refusing to follow it"), `.missing` whether it is
    simply not there. (Underscored: an outcome of StoreError's, not one of its own.)"""

    hint = (
        "the agent never follows a symlink (or uses a FIFO or device) in its own directories "
        "(the store, /run/systemd/system, /var/lib/bootsecrets): remove the entry named "
        "above and rerun, or reboot for a clean /run"
    )

    def __init__(self, path: Path, reason: str, *, missing: bool = False) -> None:
        self.path = path
        self.reason = reason
        self.missing = missing
        super().__init__(f"{shown(path)} {reason}")


def refused(path: Path, reason: str) -> StoreError:
    """The StoreError (exit 12) for a path the agent will not use: "<path> <reason>"."""
    return _PathRefused(path, reason)


def _why_not(dir_fd: int, name: str, err: OSError, expected: str) -> str:
    """Why opening `name` (expected to be `expected`, "a directory") failed."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return f"cannot be opened: {err.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink; refusing to follow it"
    if describe_mode(st.st_mode) != expected:
        return f"is {describe_mode(st.st_mode)}, not {expected}"
    return f"cannot be opened: {err.strerror}"


def _check_name(directory: Path, name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        raise StoreError(f"{shown(directory / name)}: not a single path component")


class Dir:
    """An open directory, reached without following a symlink; every method works relative to
    its fd with single names, and none follows a symlink. Errors are `StoreError` (exit 12)
    naming the path, except `read_file` (`FileRefused`)."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Dir:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- what is there -------------------------------------------------------------------

    def lstat(self, name: str) -> os.stat_result | None:
        _check_name(self.path, name)
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise _PathRefused(self.path / name, f"cannot be examined: {err.strerror}") from None

    def names(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def require(self, name: str, kind: str) -> None:
        """`name` is absent or of `kind` ("file": a regular file, "dir": a directory);
        anything else (a symlink above all) is refused."""
        st = self.lstat(name)
        if st is None:
            return
        ok = stat.S_ISREG(st.st_mode) if kind == "file" else stat.S_ISDIR(st.st_mode)
        if not ok:
            what = "a regular file" if kind == "file" else "a directory"
            raise _PathRefused(
                self.path / name,
                "is a symlink; refusing to follow it"
                if stat.S_ISLNK(st.st_mode)
                else f"is {describe_mode(st.st_mode)}, not {what}",
            )

    def require_memory_backed(self) -> None:
        """Refuse unless what is written here lands on tmpfs or ramfs (fstatfs of this fd)."""
        fstype = fstatfs_type(self.fd, self.path)
        if fstype not in (TMPFS_MAGIC, RAMFS_MAGIC):
            raise StoreError(
                f"{shown(self.path)} is on a disk-backed filesystem (statfs type {fstype:#x}); "
                "refusing to write secrets there"
            )

    # --- directories -----------------------------------------------------------------------

    def child(self, name: str, *, create: int | None = None, exclusive: bool = False) -> Dir:
        """Open the subdirectory `name`; with `create`, make it first if missing, with exactly
        that mode (umask not applied). `exclusive`: it must not exist yet."""
        _check_name(self.path, name)
        path = self.path / name
        created = False
        if create is not None:
            try:
                os.mkdir(name, 0o700, dir_fd=self.fd)
                created = True
            except FileExistsError:
                if exclusive:
                    raise _PathRefused(path, "already exists") from None
            except OSError as err:
                raise _PathRefused(path, f"cannot be created: {err.strerror}") from None
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            raise _PathRefused(path, "does not exist", missing=True) from None
        except OSError as err:
            raise _PathRefused(path, _why_not(self.fd, name, err, "a directory")) from None
        if created and create is not None:
            try:
                os.fchmod(fd, create)
            except BaseException:
                os.close(fd)
                raise
        return Dir(fd, path)

    def remove_tree(self, name: str) -> None:
        """Remove `name` (a file, symlink or directory tree) without following any symlink."""
        st = self.lstat(name)
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=self.fd)
            return
        with self.child(name) as sub:
            for entry in sub.names():
                sub.remove_tree(entry)
        os.rmdir(name, dir_fd=self.fd)

    def fsync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as err:  # some filesystems refuse fsync on directories
            if err.errno not in (errno.EINVAL, errno.EROFS):
                raise

    # --- files -------------------------------------------------------------------------------

    def create_file(
        self, name: str, data: bytes, *, mode: int, uid: int = -1, gid: int = -1
    ) -> None:
        """Create `name` exclusively (never through a symlink), owner and mode set before its
        first byte, then write and fsync it."""
        _check_name(self.path, name)
        try:
            fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=self.fd)
        except FileExistsError:
            raise _PathRefused(self.path / name, "already exists") from None
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace_file(
        self, name: str, data: bytes, *, mode: int, uid: int = -1, gid: int = -1
    ) -> None:
        """Atomically replace `name` with `data`: a temporary file in this directory, then
        rename(2) within the same directory fd. An existing `name` that is not a regular file
        (a symlink above all) is refused, not replaced."""
        self.require(name, "file")
        tmp = f".{name}.{_random.token_hex(4)}.tmp"
        try:
            self.create_file(tmp, data, mode=mode, uid=uid, gid=gid)
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise
        self.fsync()

    def unlink(self, name: str, *, missing_ok: bool = True) -> None:
        """Remove the entry `name` itself (a symlink is removed, never its target)."""
        _check_name(self.path, name)
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except IsADirectoryError:
            raise _PathRefused(self.path / name, "is a directory, not a file") from None

    def link_from(self, source: Dir, name: str, *, target: str | None = None) -> None:
        """Hard-link `source/name` here (as `target`). The source must be a regular file; the
        link itself (linkat without AT_SYMLINK_FOLLOW) is checked to be one too."""
        source.require(name, "file")
        new = target or name
        _check_name(self.path, new)
        os.link(name, new, src_dir_fd=source.fd, dst_dir_fd=self.fd, follow_symlinks=False)
        st = self.lstat(new)
        if st is None or not stat.S_ISREG(st.st_mode):
            self.unlink(new)
            raise _PathRefused(source.path / name, "is not a regular file; refusing to link it")

    def read_file(self, name: str, limit: int) -> bytes:
        """A regular file's bytes (at most `limit`); a symlink is refused. `FileRefused`."""
        _check_name(self.path, name)
        path = self.path / name
        fd = open_for_reading(path, name, READ_FLAGS | os.O_NOFOLLOW, self.fd)
        try:
            return read_fd(fd, path, limit)
        finally:
            os.close(fd)

    def read_optional(self, name: str, limit: int) -> bytes | None:
        """`read_file`, None if absent; any other refusal is a `StoreError`."""
        try:
            return self.read_file(name, limit)
        except FileMissing:
            return None
        except FileRefused as err:
            raise _PathRefused(err.path, err.reason) from None

    def open_lock(self, name: str) -> int:
        """An fd on the regular file `name` (created 0600 if missing) for flock(2)."""
        _check_name(self.path, name)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, 0o600, dir_fd=self.fd)
        except OSError as err:
            raise _PathRefused(
                self.path / name, _why_not(self.fd, name, err, "a regular file")
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _PathRefused(
                self.path / name, f"is {describe_mode(st.st_mode)}, not a regular file"
            )
        return fd

    # --- symlinks ----------------------------------------------------------------------------

    def readlink(self, name: str) -> str | None:
        """The target of the symlink `name`, None if absent; anything else is refused."""
        st = self.lstat(name)
        if st is None:
            return None
        if not stat.S_ISLNK(st.st_mode):
            raise _PathRefused(
                self.path / name,
                f"is {describe_mode(st.st_mode)}, not the symlink the agent maintains",
            )
        return os.readlink(name, dir_fd=self.fd)

    def replace_symlink(self, name: str, target: str) -> None:
        """Point the symlink `name` at `target` with one rename(2); never follows `name`."""
        _check_name(self.path, name)
        tmp = f".{name}-{_random.token_hex(4)}"
        os.symlink(target, tmp, dir_fd=self.fd)
        try:
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            if isinstance(err, OSError):
                raise _PathRefused(
                    self.path / name, f"cannot be replaced: {err.strerror}"
                ) from None
            raise
        self.fsync()

    def rename(self, old: str, new: str) -> None:
        _check_name(self.path, old)
        _check_name(self.path, new)
        try:
            os.rename(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as err:
            raise _PathRefused(
                self.path / new, f"cannot be renamed into place: {err.strerror}"
            ) from None


def _components(anchor: Path, path: Path) -> list[str]:
    relative = PurePosixPath(path).relative_to(PurePosixPath(anchor))
    parts = list(relative.parts)
    if ".." in parts:
        raise StoreError(f"{shown(path)}: `..` is not allowed in the agent's paths")
    return parts


def open_dir(
    anchor: Path, path: Path, *, create: int | None = None, parents_mode: int = 0o755
) -> Dir:
    """Open `path` (at or below `anchor`) without following a symlink below the anchor.

    With `create`, missing directories are made: the last with mode `create`, the ones above
    it with `parents_mode`. A component that is a symlink or not a directory raises
    `StoreError` (exit 12) naming it; so does a missing one when nothing is created.
    """
    return _walk(anchor, path, create, parents_mode)


def _walk(anchor: Path, path: Path, create: int | None, parents_mode: int) -> Dir:
    parts = _components(anchor, path)
    try:
        fd = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise _PathRefused(
            anchor, f"cannot be opened: {err.strerror}", missing=err.errno == errno.ENOENT
        ) from None
    current = Dir(fd, anchor)
    try:
        for index, name in enumerate(parts):
            mode = None if create is None else create if index == len(parts) - 1 else parents_mode
            sub = current.child(name, create=mode)
            current.close()
            current = sub
    except BaseException:
        current.close()
        raise
    return current


def check_tree(
    anchor: Path, path: Path, *, files: Iterable[str] = (), dirs: Iterable[str] = ()
) -> None:
    """Refuse (StoreError) if any existing component of `path` below `anchor` is a symlink or
    not a directory, or an existing entry named in `files`/`dirs` is not a regular file / a
    directory. Nothing missing is an error and nothing is created: a check before any work."""
    try:
        directory = _walk(anchor, path, None, 0)
    except _PathRefused as err:
        if err.missing:
            return
        raise
    with directory:
        for name in files:
            directory.require(name, "file")
        for name in dirs:
            directory.require(name, "dir")


def write_private(
    anchor: Path,
    path: Path,
    data: bytes,
    mode: int = 0o600,
    *,
    create_dirs: int | None = None,
    memory_only: bool = False,
) -> None:
    """Atomically replace the file `path` with `data`, owned by the effective user, `mode`.

    No component below `anchor` may be a symlink (StoreError, exit 12); `create_dirs` makes
    missing directories (the file's own with that mode); `memory_only` refuses unless the
    directory the bytes land in is tmpfs/ramfs (fstatfs).
    """
    with open_dir(anchor, path.parent, create=create_dirs) as directory:
        if memory_only:
            directory.require_memory_backed()
        directory.replace_file(path.name, data, mode=mode)


def unlink_nofollow(anchor: Path, path: Path, *, missing_ok: bool = True) -> None:
    """Remove the entry `path` (a symlink itself, never its target), reached without following
    a symlink below `anchor`. A missing directory on the way counts as missing."""
    try:
        directory = _walk(anchor, path.parent, None, 0)
    except _PathRefused as err:
        if err.missing and missing_ok:
            return
        raise
    with directory:
        directory.unlink(path.name, missing_ok=missing_ok)


def fstatfs_type(fd: int, path: Path) -> int:
    """fstatfs(2) f_type of the filesystem an open fd is on."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64
    if libc().fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise StoreError(f"cannot statfs {shown(path)}: {os.strerror(err)}")
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF
