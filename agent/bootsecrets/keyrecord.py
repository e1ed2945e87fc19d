"""Keys at rest: what unlocks each piece of encrypted data, as only Vault can read it.

One JSON file per name under /var/lib/bootsecrets/keys (`<name>.json`, root 0600, replaced
atomically): the Transit *ciphertext* of the data key (worthless without Vault), the Transit
mount, key and key version that made it, and the fscrypt key identifier once the key is in
use (the kernel's hash of the key: it identifies, it does not reveal). Encrypted directories
use it now; encrypted volumes can use it for the same facts (`kind`).

A record whose identifier is still null is *pending*: written right after the data key was
generated and before the key reached the kernel, so that a run stopped in between leaves a
record to finish from, never an encrypted directory without one.

Nothing here reads or holds a plaintext key. A record that cannot be read is reported by
its path and what is wrong with it, never by its content.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from bootsecrets.errors import KeyRecordInvalid
from bootsecrets.fsio import read_regular_file, unlink_nofollow, write_private
from bootsecrets.fsread import FileMissing, FileRefused, shown
from bootsecrets.paths import STATE_DIR, Paths

RECORD_VERSION = 1
KINDS = frozenset({"directory", "volume"})
MAX_RECORD_BYTES = 64 * 1024
CIPHERTEXT = re.compile(r"vault:v([1-9][0-9]{0,9}):[A-Za-z0-9+/]+={0,2}\Z")
IDENTIFIER = re.compile(r"[0-9a-f]{32}\Z")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    name: str
    kind: str
    #: The host path of the directory (or volume device) the key belongs to.
    path: str
    transit_mount: str
    transit_key: str
    ciphertext: str = dataclasses.field(repr=False)
    key_version: int = 1
    #: fscrypt's key identifier (hex); None while the record is pending.
    key_identifier: str | None = None
    created_at: str = ""
    rewrapped_at: str | None = None

    @property
    def pending(self) -> bool:
        return self.key_identifier is None

    def to_json(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, **dataclasses.asdict(self)}


def keys_dir(paths: Paths) -> Path:
    return paths.under_root(STATE_DIR) / "keys"


def record_path(paths: Paths, name: str) -> Path:
    if not NAME.match(name):
        raise ValueError("a key record name is letters, digits, `-` and `_`")
    return keys_dir(paths) / f"{name}.json"


def ciphertext_version(ciphertext: str) -> int | None:
    """The Transit key version in a `vault:v<N>:...` ciphertext; None if it is not one."""
    match = CIPHERTEXT.match(ciphertext)
    return int(match.group(1)) if match else None


def load(paths: Paths, name: str) -> KeyRecord | None:
    """The record for `name`; None when there is none. KeyRecordInvalid when it cannot be
    read or is not a well-formed record for `name`."""
    path = record_path(paths, name)
    try:  # a regular file, reached without following a symlink below the root, bounded
        data = read_regular_file(path, MAX_RECORD_BYTES, follow_symlinks=False, anchor=paths.root)
    except FileMissing:
        return None
    except FileRefused as err:
        raise KeyRecordInvalid(f"key record {shown(path)}: {err.reason}") from None
    try:
        raw = json.loads(data)
    except ValueError:
        raise KeyRecordInvalid(f"key record {path} is not valid JSON") from None
    return _parse(raw, path, name)


def _parse(raw: object, path: Path, name: str) -> KeyRecord:
    def bad(problem: str) -> KeyRecordInvalid:
        return KeyRecordInvalid(f"key record {path}: {problem}")

    if not isinstance(raw, dict):
        raise bad("is not a JSON object")
    if raw.get("version") != RECORD_VERSION:
        raise bad(f"version must be {RECORD_VERSION}")
    texts = {}
    for field in (
        "name",
        "kind",
        "path",
        "transit_mount",
        "transit_key",
        "ciphertext",
        "created_at",
    ):
        value = raw.get(field)
        if not isinstance(value, str) or not value:
            raise bad(f"{field} must be a non-empty string")
        texts[field] = value
    if texts["name"] != name:
        raise bad("is the record of another name")
    if texts["kind"] not in KINDS:
        raise bad(f"kind must be one of: {', '.join(sorted(KINDS))}")
    version = ciphertext_version(texts["ciphertext"])
    if version is None:
        raise bad("ciphertext is not a Transit ciphertext (vault:v<N>:<base64>)")
    if raw.get("key_version") != version:
        raise bad("key_version does not match the ciphertext's version")
    identifier = raw.get("key_identifier")
    if identifier is not None and not (
        isinstance(identifier, str) and IDENTIFIER.match(identifier)
    ):
        raise bad("key_identifier must be 32 lower-case hex digits or null")
    rewrapped = raw.get("rewrapped_at")
    if rewrapped is not None and not isinstance(rewrapped, str):
        raise bad("rewrapped_at must be a string or null")
    unknown = sorted(set(raw) - {"version", *(f.name for f in dataclasses.fields(KeyRecord))})
    if unknown:
        raise bad(f"unknown field {unknown[0]}")
    return KeyRecord(
        name=name,
        kind=texts["kind"],
        path=texts["path"],
        transit_mount=texts["transit_mount"],
        transit_key=texts["transit_key"],
        ciphertext=texts["ciphertext"],
        key_version=version,
        key_identifier=identifier,
        created_at=texts["created_at"],
        rewrapped_at=rewrapped,
    )


def save(paths: Paths, record: KeyRecord) -> None:
    """Write (or replace) the record atomically: temp file, fsync, rename, root 0600."""
    path = record_path(paths, record.name)
    write_private(
        paths.root,
        path,
        json.dumps(record.to_json(), indent=2, sort_keys=True).encode() + b"\n",
        0o600,
        create_dirs=0o700,
    )


def remove(paths: Paths, name: str) -> bool:
    """Remove the record; True if there was one."""
    path = record_path(paths, name)
    if not os.path.lexists(path):
        return False
    unlink_nofollow(paths.root, path)
    return True


def names(paths: Paths) -> list[str]:
    """Every record's name, sorted (files that are not records are ignored)."""
    try:
        entries = list(keys_dir(paths).iterdir())
    except FileNotFoundError:
        return []
    return sorted(
        p.stem
        for p in entries
        if p.suffix == ".json" and NAME.match(p.stem) and not p.name.startswith(".")
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
