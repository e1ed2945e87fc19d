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

Nothing here is reached through a symlink: every operation walks from the root to the store
with `fsio` (O_NOFOLLOW, relative to directory fds) and refuses, exit 12, what it would have
to follow; the memory-only check is fstatfs on the directory the bytes are written into.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import grp
import json
import logging
import os
import pwd
import re
import secrets as _random
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bootsecrets import fsio
from bootsecrets.errors import LockBusy, StoreError
from bootsecrets.fsio import TMPFS_MAGIC, Dir, open_dir
from bootsecrets.fsread import shown
from bootsecrets.model import RenderedUnit
from bootsecrets.paths import STATE_DIR, Paths
from bootsecrets.systemd import unit_file_path

log = logging.getLogger(__name__)

#: What `current` may point at: one of the store's own generations, relative.
CURRENT_TARGET = re.compile(r"generations/([0-9]+)\Z")
#: Bounds on what the agent reads back from its own store.
MAX_UNIT_FILE = 64 << 20
MAX_STATE = 16 << 20


def check_memory_backed(directory: Dir) -> None:
    """Refuse a store that is not tmpfs or ramfs (fstatfs of the open directory, so what is
    checked is where the bytes go); warn when tmpfs could be swapped out."""
    directory.require_memory_backed()
    if (
        fsio.fstatfs_type(directory.fd, directory.path) == TMPFS_MAGIC
        and _swap_active()
        and not _mounted_noswap(directory.fd)
    ):
        log.warning(
            "store %s is tmpfs without noswap and swap is active: secrets may be paged to "
            "disk; mount it with noswap (Linux >= 6.4) or as ramfs, or disable swap",
            shown(directory.path),
        )


def _swap_active() -> bool:
    try:
        lines = Path("/proc/swaps").read_text().splitlines()
    except OSError:
        return False
    return len(lines) > 1


def _mounted_noswap(fd: int) -> bool:
    """Whether the mount holding the open directory `fd` has the noswap option."""
    best: tuple[int, bool] = (-1, False)
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
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


def _own(directory: Dir, mode: int) -> None:
    try:
        os.fchown(directory.fd, os.geteuid(), os.getegid())
        os.fchmod(directory.fd, mode)
    except OSError as err:
        raise StoreError(
            f"cannot set owner and mode of {shown(directory.path)}: {err.strerror}"
        ) from None


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


class Store:
    """The store's operations. Every one walks from `paths.root` to the store without
    following a symlink (`fsio`), so a symlink planted anywhere below the root is refused
    (StoreError, exit 12), never followed."""

    #: Fixed entries of the store and what each must be when present.
    FILES = ("lock", "state.json", "token")
    STATE_FILES = ("token", "identity.json")

    def __init__(self, paths: Paths) -> None:
        self.paths = paths

    def _open(self) -> Dir:
        return open_dir(self.paths.root, self.paths.store)

    # --- the store directory -----------------------------------------------------------------

    def prepare(self, *, shared: bool) -> None:
        """Create/check the store before any secret is touched: memory-backed (where the
        bytes really go), root-owned, 0700 (0751 if `shared`); no symlink on the way to it or
        in it except `current` -> generations/<n>; the persistent state directory likewise."""
        unit_file_path(self.paths.current_host)  # a drop-in must be able to name it
        mode = 0o751 if shared else 0o700
        with open_dir(self.paths.root, self.paths.store, create=0o700) as store:
            check_memory_backed(store)
            _own(store, mode)
            for name in self.FILES:
                store.require(name, "file")
            self._current_target(store)
            with store.child("generations", create=mode) as generations:
                generations.require_memory_backed()
                _own(generations, mode)
        fsio.check_tree(self.paths.root, self.paths.under_root(STATE_DIR), files=self.STATE_FILES)

    @contextlib.contextmanager
    def lock(self, wait: float = 60.0) -> Iterator[None]:
        """Exclusive lock for commands that must not overlap (bootstrap, refresh)."""
        with self._open() as store:
            fd = store.open_lock("lock")
        try:
            give_up = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= give_up:
                        raise LockBusy(
                            f"another bootsecrets run holds {shown(self.paths.lock)} "
                            f"(waited {wait:.0f}s)"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    # --- generations ---------------------------------------------------------------------

    def _current_target(self, store: Dir) -> int | None:
        target = store.readlink("current")
        if target is None:
            return None
        match = CURRENT_TARGET.match(target)
        if match is None:
            raise fsio.refused(
                self.paths.current,
                f"points at {shown(target)}, not at one of the store's "
                "own generations (generations/<n>); refusing to follow it",
            )
        return int(match.group(1))

    def current_generation(self) -> int | None:
        with self._open() as store:
            return self._current_target(store)

    def generation_dir(self, number: int) -> Path:
        return self.paths.generations / str(number)

    def read_unit(self, generation: int, unit: str) -> tuple[bytes | None, dict[str, bytes]]:
        """A unit's bytes in a generation (env file, credentials), for comparison."""
        env: bytes | None = None
        creds: dict[str, bytes] = {}
        with self._open() as store, store.child("generations") as generations:
            if generations.lstat(str(generation)) is None:
                return env, creds
            with generations.child(str(generation)) as base:
                if base.lstat("env") is not None:
                    with base.child("env") as env_dir:
                        env = env_dir.read_optional(f"{unit}.env", MAX_UNIT_FILE)
                if base.lstat("credentials") is not None:
                    with base.child("credentials") as cred_root:
                        if cred_root.lstat(unit) is not None:
                            with cred_root.child(unit) as cred_dir:
                                creds = {
                                    name: cred_dir.read_optional(name, MAX_UNIT_FILE) or b""
                                    for name in cred_dir.names()
                                }
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
        dir_mode = 0o751 if shared else 0o700
        with self._open() as store, store.child("generations") as generations:
            existing = [int(n) for n in generations.names() if n.isdigit()]
            number = max(existing, default=0) + 1
            tmp_name = f".tmp-{number}-{_random.token_hex(4)}"
            try:
                with generations.child(tmp_name, create=dir_mode, exclusive=True) as tmp:
                    tmp.require_memory_backed()  # where these bytes really go
                    with (
                        tmp.child("env", create=dir_mode, exclusive=True) as env,
                        tmp.child("credentials", create=dir_mode, exclusive=True) as creds,
                    ):
                        for unit, source in (linked or {}).items():
                            with generations.child(str(source)) as previous:
                                self._link_unit(previous, env, creds, unit, dir_mode)
                        for unit, out in rendered.items():
                            spec = specs[unit]
                            if out.env_file is not None:
                                env.create_file(
                                    f"{unit}.env",
                                    out.env_file,
                                    mode=spec.mode,
                                    uid=spec.uid,
                                    gid=spec.gid,
                                )
                            if out.credentials:
                                with creds.child(unit, create=dir_mode, exclusive=True) as cred_dir:
                                    for name, data in out.credentials.items():
                                        cred_dir.create_file(
                                            name, data, mode=spec.mode, uid=spec.uid, gid=spec.gid
                                        )
                                    cred_dir.fsync()
                        env.fsync()
                        creds.fsync()
                    tmp.fsync()
                generations.rename(tmp_name, str(number))
                generations.fsync()
            except BaseException:
                with contextlib.suppress(OSError, StoreError):  # the first error matters
                    generations.remove_tree(tmp_name)
                raise
        return number

    @staticmethod
    def _link_unit(previous: Dir, env: Dir, creds: Dir, unit: str, dir_mode: int) -> None:
        if previous.lstat("env") is not None:
            with previous.child("env") as source_env:
                if source_env.lstat(f"{unit}.env") is not None:
                    env.link_from(source_env, f"{unit}.env")
        if previous.lstat("credentials") is None:
            return
        with previous.child("credentials") as source_creds:
            if source_creds.lstat(unit) is None:
                return
            with (
                source_creds.child(unit) as source,
                creds.child(unit, create=dir_mode, exclusive=True) as target,
            ):
                for name in source.names():
                    target.link_from(source, name)

    def switch(self, number: int) -> None:
        """Point `current` at generation `number` with one atomic rename."""
        with self._open() as store:
            store.replace_symlink("current", f"generations/{number}")

    def remove_generations(self, keep: frozenset[int]) -> None:
        with self._open() as store, store.child("generations") as generations:
            for name in generations.names():
                if name.isdigit() and int(name) in keep:
                    continue
                with contextlib.suppress(OSError, StoreError):
                    generations.remove_tree(name)

    # --- small files -----------------------------------------------------------------------

    def load_state(self) -> dict[str, Any]:
        with self._open() as store:
            raw = store.read_optional("state.json", MAX_STATE)
        if raw is None:
            return {}
        try:
            data = json.loads(raw)
        except ValueError as err:
            log.warning(
                "ignoring unreadable state file %s: %s",
                shown(self.paths.state_file),
                type(err).__name__,
            )
            return {}
        return data if isinstance(data, dict) else {}

    def save_state(self, state: Mapping[str, Any]) -> None:
        with self._open() as store:
            store.replace_file(
                "state.json",
                json.dumps(state, indent=2, sort_keys=True).encode() + b"\n",
                mode=0o600,
            )

    def remove_bootstrap(self) -> None:
        """Delete the bootstrap file (the entry itself, even a symlink) once it is spent."""
        with self._open() as store:
            store.unlink("bootstrap.yaml")
