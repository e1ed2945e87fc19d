"""The memory-only store: generations of rendered files on tmpfs/ramfs, switched atomically.

Layout under the store (default /run/bootsecrets, a dedicated tmpfs):

    generations/<n>/env/<unit>.env                 one env file per unit
    generations/<n>/credentials/<unit>/<name>      LoadCredential= sources
    current -> generations/<n>                     the live generation (a symlink)
    state.json, token, lock, bootstrap.yaml

A generation is written in full into a hidden temporary directory and renamed into place,
so a failed render leaves nothing behind; units only ever read through `current`, which is
switched with one rename. Files of units whose bytes did not change are hard links to the
previous generation's files: same inode, same mtime, never rewritten.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import grp
import json
import logging
import os
import pwd
import secrets as _random
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bootsecrets.errors import LockBusy, StoreError
from bootsecrets.model import RenderedUnit
from bootsecrets.paths import Paths
from bootsecrets.process import libc

log = logging.getLogger(__name__)

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def filesystem_type(path: Path) -> int:
    """statfs(2) f_type of the filesystem holding `path`."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64
    if libc().statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise StoreError(f"cannot statfs {path}: {os.strerror(err)}")
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


def check_memory_backed(path: Path) -> None:
    """Refuse any store that is not tmpfs or ramfs; warn when tmpfs could be swapped out."""
    if path.is_symlink():
        raise StoreError(f"store {path} is a symlink; refusing to follow it")
    fstype = filesystem_type(path)
    if fstype not in (TMPFS_MAGIC, RAMFS_MAGIC):
        raise StoreError(
            f"store {path} is on a disk-backed filesystem (statfs type {fstype:#x}); "
            "refusing to write secrets there"
        )
    if fstype == TMPFS_MAGIC and _swap_active() and not _mounted_noswap(path):
        log.warning(
            "store %s is tmpfs without noswap and swap is active: secrets may be paged to "
            "disk; mount it with noswap (Linux >= 6.4) or as ramfs, or disable swap", path,
        )


def _swap_active() -> bool:
    try:
        lines = Path("/proc/swaps").read_text().splitlines()
    except OSError:
        return False
    return len(lines) > 1


def _mounted_noswap(path: Path) -> bool:
    """Whether the mount holding `path` has the noswap option (from /proc/self/mountinfo)."""
    best: tuple[int, bool] = (-1, False)
    target = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(" ")
        mount_point = fields[4].encode().decode("unicode_escape")
        if target == mount_point or target.startswith(mount_point.rstrip("/") + "/"):
            super_options = fields[-1].split(",")
            if len(mount_point) > best[0]:
                best = (len(mount_point), "noswap" in super_options)
    return best[1]


def resolve_owner(user: str, group: str) -> tuple[int, int]:
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError as err:
        raise StoreError(f"unknown user or group {err.args[0]!s} in the config") from None
    return uid, gid


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """Where and how one unit's files are written."""

    uid: int
    gid: int
    mode: int


def write_file(path: Path, data: bytes, spec: FileSpec) -> None:
    """Create `path` exclusively with its final owner and mode before any byte is written."""
    fd = os.open(path, _FILE_FLAGS, 0o600)
    try:
        os.fchown(fd, spec.uid, spec.gid)
        os.fchmod(fd, spec.mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically replace a root-owned file: temp file in the same directory, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{_random.token_hex(4)}.tmp")
    try:
        write_file(tmp, data, FileSpec(os.geteuid(), os.getegid(), mode))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


class Store:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths

    # --- the store directory -----------------------------------------------------------------

    def prepare(self, *, shared: bool) -> None:
        """Create/check the store: memory-backed, root-owned, 0700 (0751 if `shared`)."""
        store = self.paths.store
        try:
            store.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create store {store}: {err.strerror}") from None
        check_memory_backed(store)
        mode = 0o751 if shared else 0o700
        for directory in (store, self.paths.generations):
            directory.mkdir(mode=mode, exist_ok=True)
            os.chown(directory, os.geteuid(), os.getegid())
            os.chmod(directory, mode)

    @contextlib.contextmanager
    def lock(self, wait: float = 60.0) -> Iterator[None]:
        """Exclusive lock for commands that must not overlap (bootstrap, refresh)."""
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            give_up = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= give_up:
                        raise LockBusy(
                            f"another bootsecrets run holds {self.paths.lock} "
                            f"(waited {wait:.0f}s)"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    # --- generations ---------------------------------------------------------------------

    def current_generation(self) -> int | None:
        try:
            target = os.readlink(self.paths.current)
        except FileNotFoundError:
            return None
        name = Path(target).name
        return int(name) if name.isdigit() else None

    def generation_dir(self, number: int) -> Path:
        return self.paths.generations / str(number)

    def read_unit(self, generation: int, unit: str) -> tuple[bytes | None, dict[str, bytes]]:
        """A unit's bytes in a generation (env file, credentials), for comparison."""
        base = self.generation_dir(generation)
        env_path = base / "env" / f"{unit}.env"
        env = env_path.read_bytes() if env_path.exists() else None
        creds: dict[str, bytes] = {}
        cred_dir = base / "credentials" / unit
        if cred_dir.is_dir():
            creds = {p.name: p.read_bytes() for p in sorted(cred_dir.iterdir())}
        return env, creds

    def write_generation(
        self,
        rendered: Mapping[str, RenderedUnit],
        specs: Mapping[str, FileSpec],
        *,
        linked: Mapping[str, int] | None = None,
        shared: bool = False,
    ) -> int:
        """Write a complete new generation; return its number.

        Units in `rendered` are written; units in `linked` are hard-linked from the given
        generation (unchanged or rolled-back units). Nothing is visible until the finished
        directory is renamed into place; on any error the temporary directory is removed.
        """
        existing = [int(p.name) for p in self.paths.generations.iterdir() if p.name.isdigit()]
        number = max(existing, default=0) + 1
        tmp = self.paths.generations / f".tmp-{number}-{_random.token_hex(4)}"
        dir_mode = 0o751 if shared else 0o700
        try:
            tmp.mkdir(mode=dir_mode)
            (tmp / "env").mkdir(mode=dir_mode)
            (tmp / "credentials").mkdir(mode=dir_mode)
            for unit, source in (linked or {}).items():
                self._link_unit(self.generation_dir(source), tmp, unit, dir_mode)
            for unit, out in rendered.items():
                spec = specs[unit]
                if out.env_file is not None:
                    write_file(tmp / "env" / f"{unit}.env", out.env_file, spec)
                if out.credentials:
                    cred_dir = tmp / "credentials" / unit
                    cred_dir.mkdir(mode=dir_mode)
                    for name, data in out.credentials.items():
                        write_file(cred_dir / name, data, spec)
            _fsync_dir(tmp)
            os.rename(tmp, self.generation_dir(number))
            _fsync_dir(self.paths.generations)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return number

    @staticmethod
    def _link_unit(source: Path, target: Path, unit: str, dir_mode: int) -> None:
        env = source / "env" / f"{unit}.env"
        if env.exists():
            os.link(env, target / "env" / f"{unit}.env")
        cred_dir = source / "credentials" / unit
        if cred_dir.is_dir():
            (target / "credentials" / unit).mkdir(mode=dir_mode)
            for item in cred_dir.iterdir():
                os.link(item, target / "credentials" / unit / item.name)

    def switch(self, number: int) -> None:
        """Point `current` at generation `number` with one atomic rename."""
        tmp = self.paths.store / f".current-{_random.token_hex(4)}"
        os.symlink(f"generations/{number}", tmp)
        try:
            os.replace(tmp, self.paths.current)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        _fsync_dir(self.paths.store)

    def remove_generations(self, keep: frozenset[int]) -> None:
        for entry in self.paths.generations.iterdir():
            if entry.name.isdigit() and int(entry.name) in keep:
                continue
            shutil.rmtree(entry, ignore_errors=True)

    # --- small files -----------------------------------------------------------------------

    def load_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.paths.state_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable state file %s: %s", self.paths.state_file,
                        type(err).__name__)
            return {}
        return data if isinstance(data, dict) else {}

    def save_state(self, state: Mapping[str, Any]) -> None:
        write_private(self.paths.state_file,
                      json.dumps(state, indent=2, sort_keys=True).encode() + b"\n", 0o600)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems refuse fsync on directories
        if err.errno not in (errno.EINVAL, errno.EROFS):
            raise
    finally:
        os.close(fd)
