"""What encrypted volumes hand to systemd, judged by systemd 252 itself: unit names for mount
points (`systemd-escape --path`), the runtime mount unit and the drop-in binding a unit to
it (`systemd-analyze verify`, which also shows that while a volume is locked, when its
mount unit does not exist, a start of a unit needing it fails at once), and the drop-in
widening the agent's sandbox (systemd/encrypted-volumes.conf)."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from bootsecrets import blockdev
from bootsecrets.volconfig import EncryptedVolume, Filesystem

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _systemd_tools() -> None:
    for tool in ("systemd-analyze", "systemd-escape"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: run `bash scripts/install-test-deps`")


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "units"
    directory.mkdir()
    yield directory


def verify(units: Path, unit: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"}
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )


def volume(mount: str = "/srv/pg-data", **changes: object) -> EncryptedVolume:
    fields: dict[str, object] = {
        "name": "pgdata",
        "device": Path("/dev/disk/by-id/scsi-0DO_Volume_pgdata"),
        "mount": Path(mount),
        "transit_mount": "transit",
        "transit_key": "web",
        "units": ("app.service",),
        **changes,
    }
    return EncryptedVolume(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "path",
    [
        "/srv/data",
        "/srv/pg-data",
        "/var/lib/a@b=c+d",
        "/.hidden/x",
        "/srv/x.y",
        "/srv/_a:b",
        "/srv/ünï",
        "/a/b/c/d/e/f",
    ],
)
def test_mount_unit_names_are_systemds(path: str) -> None:
    expected = subprocess.run(
        ["systemd-escape", "--path", "--suffix=mount", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert blockdev.unit_name_for(PurePosixPath(path)) == expected


def write_volume_units(units: Path, vol: EncryptedVolume, *, mount_unit: bool = True) -> Path:
    name = blockdev.unit_name_for(vol.mount)
    if mount_unit:
        (units / name).write_text(blockdev.mount_unit_text(vol))
    (units / "app.service").write_text("[Service]\nExecStart=/bin/true\n")
    (units / "app.service.d").mkdir(exist_ok=True)
    (units / "app.service.d" / blockdev.VOLUME_DROPIN).write_text(
        blockdev.dependency_dropin([name])
    )
    return units / name


def test_the_mount_unit_and_the_binding_verify_cleanly(units: Path) -> None:
    vol = volume(filesystem=Filesystem.XFS, mount_options=("nodev", "nosuid", "noatime"))
    mount_unit = write_volume_units(units, vol)
    assert mount_unit.read_text().splitlines()[-4:] == [
        "What=/dev/mapper/pgdata",
        "Where=/srv/pg-data",
        "Type=xfs",
        "Options=nodev,nosuid,noatime",
    ]
    for unit in (mount_unit, units / "app.service"):
        result = verify(units, unit)
        assert result.returncode == 0 and result.stderr == "", result.stderr


def test_while_the_volume_is_locked_a_start_fails_at_once(units: Path) -> None:
    """No mount unit (the agent writes it only once the volume is open): a unit bound to it
    cannot be started by anyone: systemd says the mount unit does not exist."""
    write_volume_units(units, volume(), mount_unit=False)
    result = verify(units, units / "app.service")
    assert result.returncode != 0
    assert (
        "Failed to create app.service/start: Unit srv-pg\\x2ddata.mount not found." in result.stderr
    )


def test_a_mount_unit_under_another_name_is_refused_by_systemd(units: Path) -> None:
    """The check is not vacuous: systemd refuses a mount unit whose name is not its Where=."""
    vol = volume()
    (units / "srv-other.mount").write_text(blockdev.mount_unit_text(vol))
    result = verify(units, units / "srv-other.mount")
    assert result.returncode != 0 and "Where= setting doesn't match unit name" in result.stderr


def test_the_sandbox_drop_in_verifies_and_only_adds(units: Path) -> None:
    dropin = REPO / "systemd/encrypted-volumes.conf"
    for name in ("bootsecrets.service", "bootsecrets-refresh.service"):
        text = (REPO / "systemd" / name).read_text()
        (units / name).write_text(
            "\n".join(
                "ExecStart=/bin/true" if line.startswith("ExecStart=") else line
                for line in text.splitlines()
            )
            + "\n"
        )
        (units / f"{name}.d").mkdir()
        shutil.copy(dropin, units / f"{name}.d" / dropin.name)
    shutil.copy(REPO / "systemd/bootsecrets-store.service", units)
    for name in ("bootsecrets.service", "bootsecrets-refresh.service"):
        result = verify(units, units / name)
        assert result.returncode == 0 and result.stderr == "", result.stderr
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(dropin)
    # Lists systemd merges (added to the unit's), and PrivateDevices= itself: nothing else.
    assert set(parser["Service"]) == {
        "PrivateDevices",
        "CapabilityBoundingSet",
        "SystemCallFilter",
        "ReadWritePaths",
        "RestrictAddressFamilies",
    }
    assert parser.sections() == ["Service"]
