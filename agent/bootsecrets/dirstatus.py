"""Each encrypted directory's state for `bootsecrets status`, from its key record and the
kernel (FS_IOC_GET_ENCRYPTION_POLICY_EX, FS_IOC_GET_ENCRYPTION_KEY_STATUS): locked or not,
the Transit key and version that wrap its key, the key identifier. Never a key, never the
ciphertext; Vault is not contacted."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bootsecrets import fscrypt, fscrypt_types, keyrecord
from bootsecrets.config import Config
from bootsecrets.errors import KeyRecordInvalid
from bootsecrets.paths import Paths

#: `state` values (docs/status.md).
STATES = ("unlocked", "locked", "locking", "absent", "not-encrypted", "mismatch", "unknown")


def collect(config: Config, paths: Paths) -> list[dict[str, Any]]:
    return [
        _one(
            directory.name,
            str(directory.path),
            paths,
            directory.units,
            f"{directory.transit_mount}/keys/{directory.transit_key}",
        )
        for directory in config.directories
    ]


def _one(
    name: str, host_path: str, paths: Paths, units: tuple[str, ...], transit_key: str
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "name": name,
        "path": host_path,
        "units": list(units),
        "transit_key": transit_key,
        "state": "unknown",
        "key_version": None,
        "key_identifier": None,
        "created_at": None,
        "rewrapped_at": None,
        "problem": None,
    }
    try:
        record = keyrecord.load(paths, name)
    except KeyRecordInvalid as err:
        record = None
        report["problem"] = str(err)
    if record is not None:
        report.update(
            key_version=record.key_version,
            key_identifier=record.key_identifier,
            created_at=record.created_at,
            rewrapped_at=record.rewrapped_at,
            transit_key=f"{record.transit_mount}/keys/{record.transit_key}",
        )
    path = paths.under_root(Path(host_path))
    if not os.path.lexists(path):
        report["state"] = "absent"
        return report
    try:
        policy = fscrypt.get_policy(path)
        if policy is None:
            report["state"] = "not-encrypted"
            return report
        if record is not None and record.key_identifier not in (None, policy.key_identifier):
            report["state"] = "mismatch"
            report["problem"] = "encrypted with another key than its key record names"
            return report
        report["key_identifier"] = policy.key_identifier
        status = fscrypt.key_status(path, policy.key_identifier).state
    except fscrypt_types.FscryptError as err:
        report["problem"] = err.problem
        return report
    report["state"] = {
        fscrypt_types.KeyState.PRESENT: "unlocked",
        fscrypt_types.KeyState.ABSENT: "locked",
        fscrypt_types.KeyState.INCOMPLETELY_REMOVED: "locking",
    }[status]
    return report


def format_line(directory: dict[str, Any]) -> str:
    version = directory["key_version"]
    text = (
        f"encrypted directory {directory['name']} ({directory['path']}): "
        f"{directory['state']}, Transit key {directory['transit_key']}"
        + (f" v{version}" if version else "")
        + f", units {', '.join(directory['units'])}"
    )
    if directory["state"] == "locking":
        text += " (key removed; files still open keep it alive)"
    if directory["problem"]:
        text += f"\n  problem: {directory['problem']}"
    return text
