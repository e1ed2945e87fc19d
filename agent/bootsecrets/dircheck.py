"""Encrypted directories, step 1 (before Vault, nothing written): per directory, can the
filesystem encrypt it, is its owner known, and do the directory and its key record
(keyrecord) go together: first use (absent or empty, no record or a pending one), locked, or
already unlocked. Each refusal is its own exit code (16-19) and the run stops before
anything is spent. encdirs.py has the steps after the login."""

from __future__ import annotations

import dataclasses
import enum
import grp
import os
import pwd
from pathlib import Path

from bootsecrets import fscrypt, fscrypt_types, keyrecord, transit
from bootsecrets.config import Config
from bootsecrets.context import Run
from bootsecrets.dirconfig import EncryptedDirectory
from bootsecrets.errors import (
    ConfigError,
    DataNotEmpty,
    EncryptionUnsupported,
    KeyMismatch,
    KeyRecordInvalid,
)
from bootsecrets.keyrecord import KeyRecord


class DirState(enum.Enum):
    NEW = "new"  # first use: created, encrypted, keyed
    LOCKED = "locked"  # encrypted, key not in the kernel: decrypt and add it
    UNLOCKED = "unlocked"  # key already in the kernel (a second run in one boot)


@dataclasses.dataclass(frozen=True)
class Prepared:
    directory: EncryptedDirectory
    path: Path  # under the run's root
    record: KeyRecord | None
    state: DirState
    owner: tuple[int, int]

    @property
    def transit_key(self) -> transit.TransitKey:
        if self.record is not None:
            return transit.TransitKey(self.record.transit_mount, self.record.transit_key)
        return transit.TransitKey(self.directory.transit_mount, self.directory.transit_key)

    @property
    def what(self) -> str:
        return f"encrypted directory {self.directory.name} ({self.directory.path})"


def check(run: Run) -> tuple[Prepared, ...]:
    return tuple(_check(run, d) for d in run.config.directories)


def _check(run: Run, directory: EncryptedDirectory) -> Prepared:
    path = run.paths.under_root(directory.path)
    where = f"encrypted directory {directory.name}: {directory.path}"
    owner = _owner(run.config, directory)
    try:
        fscrypt.check_support(path)
    except fscrypt_types.NotADirectory:
        raise DataNotEmpty(f"{where}: it (or a parent) exists and is not a directory") from None
    except fscrypt_types.FscryptError as err:
        raise EncryptionUnsupported(f"{where}: {err.problem}") from None
    exists = os.path.lexists(path)
    if exists and (path.is_symlink() or not path.is_dir()):
        raise DataNotEmpty(f"{where}: exists and is not a directory (or is a symlink)")
    if exists and fscrypt.mount_root(path) == Path(os.path.realpath(path)):
        raise EncryptionUnsupported(
            f"{where}: is the root directory of a filesystem, which "
            "cannot be encrypted; use a directory inside it"
        )
    record = keyrecord.load(run.paths, directory.name)
    if record is not None:
        _matches_config(record, directory, where)
    try:
        policy = fscrypt.get_policy(path) if exists else None
        empty = not exists or fscrypt.directory_is_empty(path)
    except (fscrypt_types.FscryptError, OSError) as err:
        raise EncryptionUnsupported(f"{where}: {problem(err)}") from None
    record_file = keyrecord.record_path(run.paths, directory.name)
    if policy is None:
        if record is not None and not record.pending:
            raise KeyMismatch(
                f"{where}: {'is not encrypted' if exists else 'does not exist'}, "
                f"but {record_file} holds its key"
            )
        if not empty:
            raise DataNotEmpty(f"{where}: already holds data; refusing to encrypt over it")
        _check_writable(path, where)
        return Prepared(directory, path, record, DirState.NEW, owner)
    if record is None:
        raise KeyRecordInvalid(
            f"{where}: is encrypted, but its key record {record_file} is missing"
        )
    if not policy.is_ours:
        raise KeyMismatch(f"{where}: is encrypted with another policy than bootsecrets sets")
    if record.key_identifier not in (None, policy.key_identifier):
        raise KeyMismatch(f"{where}: is encrypted with another key than {record_file} names")
    try:
        present = fscrypt.key_status(path, policy.key_identifier).state
    except fscrypt_types.FscryptError as err:
        raise EncryptionUnsupported(f"{where}: {err.problem}") from None
    unlocked = present is fscrypt_types.KeyState.PRESENT and not record.pending
    return Prepared(
        directory, path, record, DirState.UNLOCKED if unlocked else DirState.LOCKED, owner
    )


def _matches_config(record: KeyRecord, directory: EncryptedDirectory, where: str) -> None:
    if record.kind != "directory" or record.path != str(directory.path):
        raise KeyMismatch(f"{where}: its key record belongs to {record.kind} {record.path}")
    if (record.transit_mount, record.transit_key) != (
        directory.transit_mount,
        directory.transit_key,
    ):
        raise KeyMismatch(
            f"{where}: its key was made with Transit key {record.transit_mount}/keys/"
            f"{record.transit_key}, the config names {directory.transit_mount}/keys/"
            f"{directory.transit_key}; a directory cannot move to another Transit key"
        )


def _check_writable(path: Path, where: str) -> None:
    """First use creates the directory and sets its policy: both need a writable mount
    (bootsecrets.service's ProtectSystem=strict makes everything read-only that is not in
    its ReadWritePaths=)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise EncryptionUnsupported(
            f"{where}: {existing} is read-only for bootsecrets (add the directory's parent to "
            "ReadWritePaths= of bootsecrets.service)"
        )


def _owner(config: Config, directory: EncryptedDirectory) -> tuple[int, int]:
    field = f"encrypted_directories.{directory.name}"
    try:
        uid = (
            int(directory.user) if directory.user.isdigit() else pwd.getpwnam(directory.user).pw_uid
        )
    except KeyError:
        raise ConfigError(
            config.source, None, f"{field}.user", "no such user on this host"
        ) from None
    try:
        gid = (
            int(directory.group)
            if directory.group.isdigit()
            else grp.getgrnam(directory.group).gr_gid
        )
    except KeyError:
        raise ConfigError(
            config.source, None, f"{field}.group", "no such group on this host"
        ) from None
    return uid, gid


def problem(err: BaseException) -> str:
    if isinstance(err, fscrypt_types.FscryptError):
        return err.problem
    if isinstance(err, OSError):
        return f"cannot be read: {err.strerror}"
    return type(err).__name__
