"""What the agent keeps between runs to log in again: the Vault token and the identity.

The token is kept where the reboot policy says: in the memory-only store under
`reprovision` (gone at reboot), in /var/lib/bootsecrets (root 0600) under `persist-token`.
The identity (role-id and Vault address of the last bootstrap, no credential) lets
`refresh --wrapped-secret-id -` take a bare wrapped token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from bootsecrets.bootstrapfile import TOKEN_SHAPE
from bootsecrets.config import RebootPolicy
from bootsecrets.errors import ConfigError
from bootsecrets.fsio import read_regular_file, refused, unlink_nofollow, write_private
from bootsecrets.fsread import FileMissing, FileRefused
from bootsecrets.paths import Paths
from bootsecrets.vaultconfig import address, yaml_scalar
from bootsecrets.yamldoc import Node

log = logging.getLogger(__name__)

MAX_KEPT_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class KeptToken:
    """A Vault token at rest. `repr` hides the token."""

    token: str = dataclasses.field(repr=False)
    accessor: str = ""
    vault_addr: str | None = None


@dataclasses.dataclass(frozen=True)
class Identity:
    role_id: str | None = None
    vault_addr: str | None = None


def _token_path(policy: RebootPolicy, paths: Paths) -> Path:
    if policy is RebootPolicy.PERSIST_TOKEN:
        return paths.persistent_token
    return paths.runtime_token


def _read_json(paths: Paths, path: Path) -> dict[str, Any] | None:
    """A file the agent keeps: never through a symlink, bounded; unreadable JSON is ignored
    (a symlink or a FIFO there is refused: exit 12)."""
    try:
        raw = read_regular_file(path, MAX_KEPT_BYTES, follow_symlinks=False, anchor=paths.root)
    except FileMissing:
        return None
    except FileRefused as err:
        raise refused(err.path, err.reason) from None
    try:
        data = json.loads(raw)
    except ValueError:
        log.warning("ignoring an unreadable file %s", path)
        return None
    return data if isinstance(data, dict) else None


def _text(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    return value if isinstance(value, str) and value else None


def _kept_token(record: dict[str, Any], path: Path) -> str | None:
    """The kept token if it has a token's shape (what a bootstrap accepts), else None with
    a warning: it would fail in an HTTP header, or say something a token never says."""
    token = _text(record, "token")
    if token is not None and not TOKEN_SHAPE.match(token):
        log.warning("ignoring the token kept in %s: not a token's shape", path)
        return None
    return token


def _kept_address(record: dict[str, Any], path: Path) -> str | None:
    """The kept Vault address if it is one the config would take, else None (the
    configured addresses are used) with a warning."""
    value = record.get("vault_addr")
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str):
            return address(Node(str(path), yaml_scalar(str(path)), "vault_addr"), value)
    except ConfigError:
        pass
    log.warning("ignoring the Vault address kept in %s: not an address", path)
    return None


def save_token(
    policy: RebootPolicy, paths: Paths, token: str, accessor: str, vault_addr: str | None
) -> None:
    """Keep the token where `policy` says, and only there."""
    path = _token_path(policy, paths)
    record = {"token": token, "accessor": accessor, "vault_addr": vault_addr}
    write_private(
        paths.root,
        path,
        json.dumps(record).encode(),
        0o600,
        create_dirs=0o700,
        memory_only=path == paths.runtime_token,
    )
    other = paths.runtime_token if path != paths.runtime_token else paths.persistent_token
    unlink_nofollow(paths.root, other)


def load_token(policy: RebootPolicy, paths: Paths) -> KeptToken | None:
    path = _token_path(policy, paths)
    record = _read_json(paths, path)
    token = _kept_token(record, path) if record is not None else None
    if record is None or token is None:
        return None
    return KeptToken(token, _text(record, "accessor") or "", _kept_address(record, path))


def forget_token(paths: Paths) -> None:
    unlink_nofollow(paths.root, paths.runtime_token)
    unlink_nofollow(paths.root, paths.persistent_token)


def save_identity(paths: Paths, identity: Identity) -> None:
    write_private(
        paths.root,
        paths.identity,
        json.dumps(dataclasses.asdict(identity)).encode(),
        0o600,
        create_dirs=0o700,
    )


def load_identity(paths: Paths) -> Identity:
    record = _read_json(paths, paths.identity) or {}
    return Identity(_text(record, "role_id"), _kept_address(record, paths.identity))
