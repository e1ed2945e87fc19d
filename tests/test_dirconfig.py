"""The `encrypted_directories` section of the image config: what it accepts, its defaults,
and every refusal naming the file, line and field (never a value)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bootsecrets.config import Config, parse_config
from bootsecrets.dirconfig import EncryptedDirectory
from bootsecrets.errors import ConfigError


def config_with(directories: Any) -> bytes:
    doc = {
        "vault": {"address": "https://vault.example.com:8200"},
        "approle": {"role": "web"},
        "reboot_policy": "persist-token",
        "mounts": {"secret": "kv-v2"},
        "secrets": {"db": "secret/app/db"},
        "services": {
            "app.service": {"environment": {"A": "{{ secrets.db.password }}"}},
            "worker.service": {"environment": {"B": "{{ secrets.db.password }}"}},
        },
        "encrypted_directories": directories,
    }
    return yaml.safe_dump(doc, sort_keys=False).encode()


def parse(directories: Any) -> Config:
    return parse_config(config_with(directories), "config.yaml")


def test_a_directory_with_defaults_and_one_with_everything() -> None:
    config = parse(
        {
            "appdata": {"path": "/var/lib/app", "units": ["app.service"]},
            "cache_2": {
                "path": "/srv/cache/worker",
                "units": ["worker.service", "app.service"],
                "transit_mount": "transit/team",
                "transit_key": "fleet-web",
                "user": "www-data",
                "group": "33",
                "mode": "0750",
            },
        }
    )
    assert config.directories == (
        EncryptedDirectory("appdata", Path("/var/lib/app"), "transit", "web", ("app.service",)),
        EncryptedDirectory(
            "cache_2",
            Path("/srv/cache/worker"),
            "transit/team",
            "fleet-web",
            ("worker.service", "app.service"),
            "www-data",
            "33",
            0o750,
        ),
    )


def test_the_section_is_optional() -> None:
    doc = yaml.safe_load(config_with({}))
    del doc["encrypted_directories"]
    assert parse_config(yaml.safe_dump(doc).encode()).directories == ()


BAD: dict[str, tuple[Any, str]] = {
    "name-with-dot": (
        {"app.data": {"path": "/var/lib/a", "units": ["app.service"]}},
        "encrypted_directories.app.data: names are letters",
    ),
    "relative-path": (
        {"a": {"path": "var/lib/a", "units": ["app.service"]}},
        "encrypted_directories.a.path: must be an absolute, normalised path",
    ),
    "dotdot": (
        {"a": {"path": "/var/lib/../etc/x", "units": ["app.service"]}},
        "a.path: must be an absolute, normalised path",
    ),
    "trailing-slash": (
        {"a": {"path": "/var/lib/a/", "units": ["app.service"]}},
        "a.path: must be an absolute, normalised path",
    ),
    "space": (
        {"a": {"path": "/var/lib/my app", "units": ["app.service"]}},
        "a.path: must be a path of plain names",
    ),
    "under-run": (
        {"a": {"path": "/run/app", "units": ["app.service"]}},
        "a.path: must not be /run, inside it or above it",
    ),
    "under-tmp": (
        {"a": {"path": "/tmp/app", "units": ["app.service"]}},
        "a.path: must not be /tmp",
    ),
    "under-proc": (
        {"a": {"path": "/proc/app", "units": ["app.service"]}},
        "a.path: must not be /proc",
    ),
    "the-key-records": (
        {"a": {"path": "/var/lib/bootsecrets/keys", "units": ["app.service"]}},
        "a.path: must not be /var/lib/bootsecrets",
    ),
    "above-the-key-records": (
        {"a": {"path": "/var/lib", "units": ["app.service"]}},
        "a.path: must not be /var/lib/bootsecrets, inside it or above",
    ),
    "a-system-directory": (
        {"a": {"path": "/srv", "units": ["app.service"]}},
        "a.path: must not be a system directory itself",
    ),
    "nested": (
        {
            "a": {"path": "/srv/app", "units": ["app.service"]},
            "b": {"path": "/srv/app/cache", "units": ["app.service"]},
        },
        "b.path: overlaps encrypted_directories.a",
    ),
    "no-units": ({"a": {"path": "/srv/app", "units": []}}, "a.units: name at least one unit"),
    "unit-not-a-service": (
        {"a": {"path": "/srv/app", "units": ["db.service"]}},
        "a.units[0]: must be a unit declared under `services`",
    ),
    "unit-twice": (
        {"a": {"path": "/srv/app", "units": ["app.service", "app.service"]}},
        "a.units: lists a unit twice",
    ),
    "units-not-a-list": (
        {"a": {"path": "/srv/app", "units": "app.service"}},
        "a.units: expected a list, got a string",
    ),
    "mode-world-writable": (
        {"a": {"path": "/srv/app", "units": ["app.service"], "mode": "0777"}},
        "a.mode: must not let others write",
    ),
    "mode-owner-cannot-enter": (
        {"a": {"path": "/srv/app", "units": ["app.service"], "mode": "0600"}},
        "a.mode: must give the owner rwx",
    ),
    "mode-not-octal": (
        {"a": {"path": "/srv/app", "units": ["app.service"], "mode": "rwx"}},
        "a.mode: must be an octal directory mode",
    ),
    "transit-key-with-slash": (
        {"a": {"path": "/srv/app", "units": ["app.service"], "transit_key": "a/b"}},
        "a.transit_key: must be a Transit key name",
    ),
    "transit-mount-dotdot": (
        {"a": {"path": "/srv/app", "units": ["app.service"], "transit_mount": "transit/.."}},
        "a.transit_mount: must be a mount path",
    ),
    "unknown-field": (
        {"a": {"path": "/srv/app", "units": ["app.service"], "key": "x"}},
        "a.key: unknown key",
    ),
    "missing-path": ({"a": {"units": ["app.service"]}}, "a.path: missing required field"),
    "user-invalid": (
        {"a": {"path": "/srv/app", "units": ["app.service"], "user": "a b"}},
        "a.user: must be a user name or uid",
    ),
    "not-a-mapping": (["/srv/app"], "encrypted_directories: expected a mapping, got a list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_refusals_name_the_field(case: str) -> None:
    directories, message = BAD[case]
    with pytest.raises(ConfigError) as raised:
        parse(directories)
    assert message in str(raised.value)
    assert str(raised.value).startswith("config.yaml:")
