"""What this host knows about each encrypted volume it has used: one JSON file per volume
under /var/lib/bootsecrets/volumes (`<name>.json`, root 0600, replaced atomically).

The key is not here: a volume carries the Transit ciphertext of its key in a LUKS2 token of
its own header, so it can move to another droplet. The record holds what the header cannot
say about *this* host:

* the LUKS UUID of the volume it formatted or adopted: a blank device, or another LUKS
  volume, where that volume was is refused (VolumeMismatch, exit 58), never formatted;
* `state`: `formatting` is written with the UUID chosen for luksFormat, before anything is
  written to the device, so that a first use cut short is finished (mkfs on the volume it
  formatted) rather than mistaken for a volume to adopt; `ready` once the filesystem is
  made, or when a volume formatted elsewhere is adopted;
* device, mapper and mount point, so that `decommission` without the image config still
  knows which devices to close and erase.

Nothing secret: a record is reported by its path and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from bootsecrets.fsio import read_regular_file, unlink_nofollow, write_private
from bootsecrets.fsread import FileMissing, FileRefused, shown
from bootsecrets.paths import STATE_DIR, Paths

RECORD_VERSION = 1
MAX_RECORD_BYTES = 16 * 1024
STATES = frozenset({"formatting", "ready"})
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


class RecordInvalid(Exception):
    """The record cannot be read or is not one; `reason` names what is wrong."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"volume record {shown(path)}: {reason}")


@dataclasses.dataclass(frozen=True)
class VolumeRecord:
    name: str
    device: str
    mapper: str
    mount: str
    luks_uuid: str
    state: str
    transit_mount: str
    transit_key: str
    created_at: str

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def to_json(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, **dataclasses.asdict(self)}


def records_dir(paths: Paths) -> Path:
    return paths.under_root(STATE_DIR) / "volumes"


def record_path(paths: Paths, name: str) -> Path:
    if not NAME.match(name):
        raise ValueError("a volume record name is letters, digits, `-` and `_`")
    return records_dir(paths) / f"{name}.json"


def load(paths: Paths, name: str) -> VolumeRecord | None:
    """The record of `name`, None when there is none; RecordInvalid otherwise."""
    path = record_path(paths, name)
    try:
        data = read_regular_file(path, MAX_RECORD_BYTES, follow_symlinks=False, anchor=paths.root)
    except FileMissing:
        return None
    except FileRefused as err:
        raise RecordInvalid(path, err.reason) from None
    try:
        raw = json.loads(data)
    except ValueError:
        raise RecordInvalid(path, "is not valid JSON") from None
    return _parse(raw, path, name)


def _parse(raw: object, path: Path, name: str) -> VolumeRecord:
    if not isinstance(raw, dict):
        raise RecordInvalid(path, "is not a JSON object")
    if raw.get("version") != RECORD_VERSION:
        raise RecordInvalid(path, f"version must be {RECORD_VERSION}")
    fields = [f.name for f in dataclasses.fields(VolumeRecord)]
    unknown = sorted(set(raw) - {"version", *fields})
    if unknown:
        raise RecordInvalid(path, f"unknown field {unknown[0]}")
    texts = {}
    for field in fields:
        value = raw.get(field)
        if not isinstance(value, str) or not value:
            raise RecordInvalid(path, f"{field} must be a non-empty string")
        texts[field] = value
    if texts["name"] != name:
        raise RecordInvalid(path, "is the record of another name")
    if texts["state"] not in STATES:
        raise RecordInvalid(path, f"state must be one of: {', '.join(sorted(STATES))}")
    if not UUID.match(texts["luks_uuid"]):
        raise RecordInvalid(path, "luks_uuid is not a UUID")
    return VolumeRecord(**texts)


def save(paths: Paths, record: VolumeRecord) -> None:
    write_private(
        paths.root,
        record_path(paths, record.name),
        json.dumps(record.to_json(), indent=2, sort_keys=True).encode() + b"\n",
        0o600,
        create_dirs=0o700,
    )


def remove(paths: Paths, name: str) -> bool:
    path = record_path(paths, name)
    if not os.path.lexists(path):
        return False
    unlink_nofollow(paths.root, path)
    return True


def names(paths: Paths) -> list[str]:
    try:
        entries = list(records_dir(paths).iterdir())
    except FileNotFoundError:
        return []
    return sorted(
        p.stem
        for p in entries
        if p.suffix == ".json" and NAME.match(p.stem) and not p.name.startswith(".")
    )
