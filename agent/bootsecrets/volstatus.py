"""Each encrypted volume's state for `bootsecrets status`, from its LUKS2 header (the token:
Transit key and version), device-mapper (`cryptsetup status`), the mount table and the
host's record. Never a key, never the token's ciphertext; Vault is not contacted."""

from __future__ import annotations

import os
from typing import Any

from bootsecrets import blockdev, luks, volrecord
from bootsecrets.config import Config
from bootsecrets.paths import Paths
from bootsecrets.volconfig import EncryptedVolume

#: `state` values (docs/status.md).
STATES = ("mounted", "open", "closed", "absent", "blank", "not-bootsecrets", "unknown")


def collect(config: Config, paths: Paths, runner: luks.Runner = luks.run) -> list[dict[str, Any]]:
    return [_one(volume, paths, runner) for volume in config.volumes]


def _one(volume: EncryptedVolume, paths: Paths, runner: luks.Runner) -> dict[str, Any]:
    report: dict[str, Any] = {
        "name": volume.name,
        "device": str(volume.device),
        "mapper": volume.mapper,
        "mount": str(volume.mount),
        "mount_unit": blockdev.unit_name_for(volume.mount),
        "units": list(volume.units),
        "transit_key": f"{volume.transit_mount}/keys/{volume.transit_key}",
        "state": "unknown",
        "open": False,
        "mounted": False,
        "key_version": None,
        "luks_uuid": None,
        "formatted_at": None,
        "problem": None,
    }
    try:
        record = volrecord.load(paths, volume.name)
    except volrecord.RecordInvalid as err:
        record = None
        report["problem"] = str(err)
    if record is not None:
        report.update(luks_uuid=record.luks_uuid, formatted_at=record.created_at)
    device = paths.under_root(volume.device)
    mapper = paths.under_root(volume.mapper_path)
    try:
        report["open"] = blockdev.mapped_device(volume.mapper, runner) is not None
        report["mounted"] = report["open"] and blockdev.mounted_from(
            paths.under_root(volume.mount), mapper
        )
        if not os.path.lexists(device):
            report["state"] = "absent"
            return report
        found = luks.probe(device, runner)
        if "crypto_LUKS" not in found.signatures:
            report["state"] = "blank" if found.blank else "not-bootsecrets"
            return report
        header = luks.read_header(device, runner)
        report["luks_uuid"] = blockdev.luks_uuid(device, runner)
    except luks.LuksError as err:
        report["problem"] = err.problem
        return report
    if header.token is None:
        report["state"] = "not-bootsecrets"
        report["problem"] = f"no {luks.TOKEN_TYPE} token in its LUKS2 header"
        return report
    token = header.token
    report["key_version"] = token.key_version
    report["transit_key"] = f"{token.mount}/keys/{token.key_name}"
    report["state"] = "mounted" if report["mounted"] else "open" if report["open"] else "closed"
    return report


def format_line(volume: dict[str, Any]) -> str:
    version = volume["key_version"]
    text = (
        f"encrypted volume {volume['name']} ({volume['device']} at {volume['mount']}): "
        f"{volume['state']}, Transit key {volume['transit_key']}"
        + (f" v{version}" if version else "")
        + f", units {', '.join(volume['units'])}"
    )
    if volume["problem"]:
        text += f"\n  problem: {volume['problem']}"
    return text
