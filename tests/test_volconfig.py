"""The `encrypted_volumes` section of the image config: what it accepts, its defaults, and
every refusal naming the file, line and field (never a value)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bootsecrets.config import Config, parse_config
from bootsecrets.errors import ConfigError
from bootsecrets.volconfig import EncryptedVolume, Filesystem, Format

DEVICE = "/dev/disk/by-id/scsi-0DO_Volume_pgdata"


def config_with(volumes: Any, directories: Any = None) -> bytes:
    doc: dict[str, Any] = {
        "vault": {"address": "https://vault.example.com:8200"},
        "approle": {"role": "web"},
        "reboot_policy": "persist-token",
        "mounts": {"secret": "kv-v2"},
        "secrets": {"db": "secret/app/db"},
        "services": {
            "app.service": {"environment": {"A": "{{ secrets.db.password }}"}},
            "worker.service": {"environment": {"B": "{{ secrets.db.password }}"}},
        },
        "encrypted_volumes": volumes,
    }
    if directories is not None:
        doc["encrypted_directories"] = directories
    return yaml.safe_dump(doc, sort_keys=False).encode()


def parse(volumes: Any, directories: Any = None) -> Config:
    return parse_config(config_with(volumes, directories), "config.yaml")


def one(**fields: Any) -> dict[str, Any]:
    return {"device": DEVICE, "mount": "/var/lib/postgresql", "units": ["app.service"], **fields}


def test_a_volume_with_defaults_and_one_with_everything() -> None:
    config = parse(
        {
            "pgdata": one(),
            "uploads": {
                "device": "/dev/vdb",
                "mount": "/srv/uploads",
                "units": ["worker.service", "app.service"],
                "format": "if-blank",
                "filesystem": "xfs",
                "mount_options": ["nodev", "noatime", "commit=30"],
                "mapper": "uploads.crypt",
                "transit_mount": "transit/team",
                "transit_key": "fleet-web",
                "user": "www-data",
                "group": "33",
                "mode": "0750",
                "attach_timeout": 120,
            },
        }
    )
    assert config.volumes == (
        EncryptedVolume(
            "pgdata", Path(DEVICE), Path("/var/lib/postgresql"), "transit", "web", ("app.service",)
        ),
        EncryptedVolume(
            "uploads",
            Path("/dev/vdb"),
            Path("/srv/uploads"),
            "transit/team",
            "fleet-web",
            ("worker.service", "app.service"),
            Format.IF_BLANK,
            Filesystem.XFS,
            ("nodev", "noatime", "commit=30"),
            "uploads.crypt",
            "www-data",
            "33",
            0o750,
            120.0,
        ),
    )
    first = config.volumes[0]
    assert (
        first.format,
        first.filesystem,
        first.mount_options,
        first.mapper,
        first.mode,
        first.attach_timeout,
    ) == (Format.NEVER, Filesystem.EXT4, ("nodev", "nosuid"), "pgdata", 0o755, 60.0)
    assert first.mapper_path == Path("/dev/mapper/pgdata")


def test_the_section_is_optional() -> None:
    doc = yaml.safe_load(config_with({}))
    del doc["encrypted_volumes"]
    assert parse_config(yaml.safe_dump(doc).encode()).volumes == ()


BAD: dict[str, tuple[Any, str]] = {
    "name-with-dot": ({"pg.data": one()}, "encrypted_volumes.pg.data: names are letters"),
    "device-relative": (
        {"a": one(device="dev/vdb")},
        "encrypted_volumes.a.device: must be an absolute, normalised path",
    ),
    "device-outside-dev": (
        {"a": one(device="/var/tmp/disk.img")},
        "a.device: must be a block device under /dev",
    ),
    "device-dev-itself": (
        {"a": one(device="/dev/vdb/..")},
        "a.device: must be an absolute, normalised path",
    ),
    "device-a-mapping": (
        {"a": one(device="/dev/mapper/x")},
        "a.device: must be the volume itself, not a device-mapper device",
    ),
    "device-dm-node": ({"a": one(device="/dev/dm-0")}, "a.device: must be the volume itself"),
    "device-space": (
        {"a": one(device="/dev/disk/by-id/my disk")},
        "a.device: must be a path of plain names",
    ),
    "mount-under-run": ({"a": one(mount="/run/data")}, "a.mount: must not be /run"),
    "mount-system-dir": ({"a": one(mount="/var/lib")}, "a.mount: must not be"),
    "mount-the-records": (
        {"a": one(mount="/var/lib/bootsecrets")},
        "a.mount: must not be /var/lib/bootsecrets",
    ),
    "same-device": (
        {"a": one(), "b": one(mount="/srv/b")},
        "b.device: is encrypted_volumes.a's device too",
    ),
    "same-mapper": (
        {"a": one(mapper="x"), "b": one(device="/dev/vdc", mount="/srv/b", mapper="x")},
        "b.mapper: is encrypted_volumes.a's mapper name too",
    ),
    "nested-mounts": (
        {"a": one(mount="/srv/a"), "b": one(device="/dev/vdc", mount="/srv/a/b")},
        "b.mount: overlaps encrypted_volumes.a",
    ),
    "mapper-bad": ({"a": one(mapper="-x")}, "a.mapper: must be a device-mapper name"),
    "mapper-slash": ({"a": one(mapper="a/b")}, "a.mapper: must be a device-mapper name"),
    "mapper-control": (
        {"a": one(mapper="control")},
        "a.mapper: 'control' is device-mapper's own control node",
    ),
    "name-control-as-mapper": (
        {"control": one()},
        "encrypted_volumes.control: 'control' is device-mapper's own control node",
    ),
    "format-bad": ({"a": one(format="always")}, "a.format: must be one of: if-blank, never"),
    "filesystem-bad": ({"a": one(filesystem="vfat")}, "a.filesystem: must be one of: ext4"),
    "option-comma": (
        {"a": one(mount_options=["nodev,exec"])},
        "a.mount_options[0]: must be one mount option",
    ),
    "option-space": (
        {"a": one(mount_options=["data=journal x"])},
        "a.mount_options[0]: must be one mount option",
    ),
    "option-percent": ({"a": one(mount_options=["x=%h"])}, "must be one mount option"),
    "option-x-systemd": (
        {"a": one(mount_options=["x-systemd.automount"])},
        "a.mount_options[0]: is not an option bootsecrets passes on",
    ),
    "option-bind": ({"a": one(mount_options=["bind"])}, "is not an option bootsecrets"),
    "option-twice": (
        {"a": one(mount_options=["nodev", "nodev"])},
        "a.mount_options: lists an option twice",
    ),
    "no-units": ({"a": one(units=[])}, "a.units: name at least one unit"),
    "unit-not-declared": (
        {"a": one(units=["db.service"])},
        "a.units[0]: must be a unit declared under `services` (the agent "
        "starts it once the volume is mounted)",
    ),
    "unit-twice": ({"a": one(units=["app.service", "app.service"])}, "a.units: lists a unit twice"),
    "attach-timeout-negative": (
        {"a": one(attach_timeout=-1)},
        "a.attach_timeout: must be between 0 and 3600",
    ),
    "attach-timeout-huge": ({"a": one(attach_timeout=7200)}, "must be between 0 and 3600"),
    "mode-world-writable": ({"a": one(mode="0777")}, "a.mode: must not let others write"),
    "transit-key-slash": (
        {"a": one(transit_key="a/b")},
        "a.transit_key: must be a Transit key name",
    ),
    "unknown-field": ({"a": one(size=10)}, "a.size: unknown key"),
    "missing-device": (
        {"a": {"mount": "/srv/a", "units": ["app.service"]}},
        "a.device: missing required field",
    ),
    "not-a-mapping": ([DEVICE], "encrypted_volumes: expected a mapping, got a list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_refusals_name_the_field(case: str) -> None:
    volumes, message = BAD[case]
    with pytest.raises(ConfigError) as raised:
        parse(volumes)
    assert message in str(raised.value)
    assert str(raised.value).startswith("config.yaml:")


def test_a_volume_and_an_encrypted_directory_cannot_contain_each_other() -> None:
    with pytest.raises(ConfigError, match=r"a\.mount: overlaps encrypted_directories\.d"):
        parse(
            {"a": one(mount="/srv/app")},
            {"d": {"path": "/srv/app/cache", "units": ["app.service"]}},
        )
    with pytest.raises(ConfigError, match=r"a\.mount: overlaps encrypted_directories\.d"):
        parse(
            {"a": one(mount="/srv/app/data")}, {"d": {"path": "/srv/app", "units": ["app.service"]}}
        )
    assert (
        len(
            parse(
                {"a": one(mount="/srv/data")}, {"d": {"path": "/srv/app", "units": ["app.service"]}}
            ).volumes
        )
        == 1
    )
