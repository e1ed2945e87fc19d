"""Encrypted volumes, what goes wrong: real LUKS2 headers and filesystems on volume images,
the shared OpenBao with Transit, the device-mapper and PID 1 stand-ins (support.devmapper).

Every case ends the same way for the units: the ones needing the volume are held back (not
started, `left_out` in the state), the others start, the run exits with the volume's code
and alerts with its MESSAGE_ID naming the volume; a refused device is left byte for byte
as it was; no plaintext data key (a canary once a test decrypts one) appears anywhere.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootsecrets import blockdev, errors, luks
from conftest import Captured
from support.openbao import OpenBao
from support.transit import create_key, decrypt_as_root, delete_key, grant
from support.volumes import Volumes, digest, volume_world
from test_encdirs import transit_requests
from test_volumes import booted


@pytest.fixture
def vols(
    openbao: OpenBao, sandbox_root: Path, captured: Captured, unique: str
) -> Iterator[Volumes]:
    with volume_world(openbao, sandbox_root, captured, unique) as volumes:
        yield volumes


def alerts(
    caplog: pytest.LogCaptureFixture, error: type[errors.BootsecretsError]
) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "MESSAGE_ID", None) == error.message_id]


def assert_held_back(
    vols: Volumes,
    caplog: pytest.LogCaptureFixture,
    error: type[errors.BootsecretsError],
    volume: str = "data",
    *,
    started: tuple[str, ...] = ("worker.service",),
) -> None:
    """app.service (needing the volume) held back, worker.service started (at a boot; a
    refresh leaves it running as it is), one alert."""
    assert vols.sandbox.started_units() == list(started)
    state = json.loads((vols.sandbox.store / "state.json").read_text())
    assert state["skipped"] == {
        "app.service": f"held back: encrypted volume {volume} is not mounted"
    }
    [alert] = alerts(caplog, error)
    assert alert.__dict__["VOLUME"] == volume and alert.__dict__["UNIT"] == "app.service"
    assert not blockdev.mounted_from(
        vols.mount_point(volume), vols.sandbox.root / "dev/mapper" / volume
    )


def first_boot(vols: Volumes, **volume: object) -> tuple[int, str]:
    vols.provision(vols.config(volumes=vols.section(data=dict(volume))))
    code, _, err = vols.sandbox.run("bootstrap")
    return code, err


# --- refused before any Transit call for the volume ------------------------------------------


@pytest.mark.parametrize(
    ("make", "found"),
    [
        (["mkfs.ext4", "-q", "-F"], "signature ext4"),
        (["mkfs.xfs", "-q", "-f"], "signature xfs"),
    ],
)
def test_a_device_with_a_filesystem_is_never_formatted(
    vols: Volumes,
    openbao: OpenBao,
    caplog: pytest.LogCaptureFixture,
    make: list[str],
    found: str,
) -> None:
    vols.transit()
    image = vols.image("data", size_mib=320)  # XFS needs 300 MiB
    subprocess.run([*make, str(image)], check=True, capture_output=True)
    before = digest(image)
    offset = openbao.audit_offset()

    code, err = first_boot(vols)

    assert code == errors.VolumeNotBlank.exit_code, err
    assert (
        f"encrypted volume data ({vols.device('data')}): is not blank ({found}; non-zero "
        "bytes in the first MiB); refusing to format it"
    ) in err
    assert digest(image) == before
    assert transit_requests(openbao, offset) == []
    assert not any(argv[1] in ("luksFormat", "open") for argv in vols.dm.argvs())
    assert not (vols.sandbox.root / "var/lib/bootsecrets/volumes/data.json").exists()
    assert_held_back(vols, caplog, errors.VolumeNotBlank)
    [volume] = json.loads(vols.sandbox.run("status", "--json")[1])["volumes"]
    assert volume["state"] == "not-bootsecrets" and not volume["open"]


def test_data_without_a_signature_and_a_foreign_luks_header(
    vols: Volumes, caplog: pytest.LogCaptureFixture
) -> None:
    vols.transit()
    image = vols.image("data")
    with image.open("r+b") as handle:
        handle.seek(300 << 10)
        handle.write(b"rows a database wrote straight to the device")
    before = digest(image)
    code, err = first_boot(vols)
    assert code == errors.VolumeNotBlank.exit_code, err
    assert "non-zero bytes in the first MiB" in err and digest(image) == before

    other = vols.image("data")  # a LUKS2 volume someone made by hand: no bootsecrets token
    subprocess.run(
        [
            "cryptsetup",
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file=-",
            str(other),
        ],
        input=b"x" * 64,
        check=True,
    )
    before = digest(other)
    caplog.clear()
    vols.sandbox.runner.calls.clear()
    code, _, err = vols.sandbox.run("refresh")
    assert code == errors.VolumeTokenInvalid.exit_code, err
    assert "has no bootsecrets-transit token (not a bootsecrets volume" in err
    assert digest(other) == before
    assert_held_back(vols, caplog, errors.VolumeTokenInvalid, started=())


def test_a_blank_device_with_format_never(
    vols: Volumes, openbao: OpenBao, caplog: pytest.LogCaptureFixture
) -> None:
    vols.transit()
    image = vols.image("data")
    offset = openbao.audit_offset()
    code, err = first_boot(vols, format="never")
    assert code == errors.VolumeBlank.exit_code, err
    assert "is blank and `format: never`; nothing was written to it" in err
    assert not any(image.read_bytes())
    assert transit_requests(openbao, offset) == []
    assert_held_back(vols, caplog, errors.VolumeBlank)


def test_a_blank_device_where_this_host_formatted_one(
    vols: Volumes, openbao: OpenBao, caplog: pytest.LogCaptureFixture
) -> None:
    """The volume was swapped for a new, blank one at the same path: not formatted (the
    units would start on an empty filesystem)."""
    booted(vols)
    uuid = vols.record("data")["luks_uuid"]
    vols.reboot()
    fresh = vols.image("data")
    caplog.clear()
    vols.sandbox.runner.calls.clear()
    offset = openbao.audit_offset()

    code, _, err = vols.sandbox.run("bootstrap")

    assert code == errors.VolumeMismatch.exit_code, err
    assert f"is blank, but this host formatted LUKS volume {uuid} there" in err
    assert not any(fresh.read_bytes()) and transit_requests(openbao, offset) == []
    assert_held_back(vols, caplog, errors.VolumeMismatch)


def test_another_luks_volume_than_the_recorded_one(
    vols: Volumes, openbao: OpenBao, caplog: pytest.LogCaptureFixture
) -> None:
    booted(vols)
    record = vols.sandbox.root / "var/lib/bootsecrets/volumes/data.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "luks_uuid": "0" * 8 + "-0000-4000-8000-" + "0" * 12}))
    vols.reboot()
    caplog.clear()
    vols.sandbox.runner.calls.clear()
    offset = openbao.audit_offset()
    code, _, err = vols.sandbox.run("bootstrap")
    assert code == errors.VolumeMismatch.exit_code, err
    assert f"holds LUKS volume {data['luks_uuid']}, but this host's volume there is" in err
    assert transit_requests(openbao, offset) == []
    assert_held_back(vols, caplog, errors.VolumeMismatch)


def test_a_token_naming_another_transit_key_than_the_config(
    vols: Volumes, caplog: pytest.LogCaptureFixture
) -> None:
    key, _ = booted(vols)
    vols.reboot()
    create_key(vols.world.bao, "other-key")
    vols.sandbox.write_config(vols.config(volumes=vols.section(data={"transit_key": "other-key"})))
    caplog.clear()
    vols.sandbox.runner.calls.clear()
    code, _, err = vols.sandbox.run("bootstrap")
    assert code == errors.VolumeMismatch.exit_code, err
    assert (
        f"its token names Transit key transit/keys/{key}, the config transit/keys/other-key"
    ) in err
    assert_held_back(vols, caplog, errors.VolumeMismatch)


def test_device_mapper_out_of_reach(
    vols: Volumes, openbao: OpenBao, caplog: pytest.LogCaptureFixture
) -> None:
    """As in a bootsecrets.service without the encrypted-volumes drop-in (PrivateDevices=)."""
    vols.transit()
    image = vols.image("data")
    vols.dm.fail["status"] = (
        1,
        "Cannot initialize device-mapper. Is dm_mod kernel module loaded?\n",
    )
    offset = openbao.audit_offset()
    code, err = first_boot(vols)
    assert code == errors.VolumeFailed.exit_code, err
    assert "`cryptsetup status data` exited with 1: Cannot initialize device-mapper" in err
    assert "systemd/encrypted-volumes.conf" in err  # the hint
    assert not any(image.read_bytes()) and transit_requests(openbao, offset) == []
    assert_held_back(vols, caplog, errors.VolumeFailed)


# --- the device is not there -------------------------------------------------------------


def test_a_wrong_device_path_fails_closed_after_the_wait(
    vols: Volumes, caplog: pytest.LogCaptureFixture
) -> None:
    vols.transit()
    code, err = first_boot(vols, attach_timeout=1)
    assert code == errors.VolumeMissing.exit_code, err
    assert (
        f"encrypted volume data ({vols.device('data')}): not there after 1 s (the volume "
        "is not attached, or the device path is wrong)"
    ) in err
    assert_held_back(vols, caplog, errors.VolumeMissing)
    [volume] = json.loads(vols.sandbox.run("status", "--json")[1])["volumes"]
    assert volume["state"] == "absent"

    # Attached later: a refresh formats it, mounts it and starts the unit held back.
    vols.image("data")
    vols.sandbox.runner.calls.clear()
    code, _, err = vols.sandbox.run("refresh")
    assert code == 0, err
    assert "app.service" in vols.sandbox.started_units()
    assert blockdev.mounted_from(vols.mount_point("data"), vols.sandbox.root / "dev/mapper/data")


def test_a_volume_attached_during_the_wait(vols: Volumes) -> None:
    vols.transit()
    image = vols.workdir / "late.img"
    with image.open("wb") as handle:
        handle.truncate(64 << 20)
    timer = threading.Timer(1.0, vols.attach, ("data", image))
    vols.sandbox.after_lookup = timer.start  # the check before Vault found nothing
    try:
        code, err = first_boot(vols, attach_timeout=60)
    finally:
        timer.cancel()
    assert code == 0, err
    assert "waiting up to 5 s for encrypted volume data" in err  # the boot deadline: 5 s
    assert luks.read_token(image).key_version == 1
    assert sorted(vols.sandbox.started_units()) == ["app.service", "worker.service"]


# --- refused at Vault or by cryptsetup -----------------------------------------------------


def test_decrypt_denied_then_granted(
    vols: Volumes, openbao: OpenBao, caplog: pytest.LogCaptureFixture
) -> None:
    key, image = booted(vols)
    vols.reboot()
    grant(vols.world, key, operations=("datakey/plaintext", "rewrap"))  # no decrypt
    caplog.clear()
    vols.sandbox.runner.calls.clear()
    before = digest(image)

    code, _, err = vols.sandbox.run("bootstrap")

    assert code == errors.DataLocked.exit_code, err
    assert (
        f"encrypted volume data ({vols.device('data')}): permission denied on "
        f"transit/decrypt/{key}" in err
    )
    assert "data" not in vols.dm.active and digest(image) == before
    assert_held_back(vols, caplog, errors.DataLocked)

    grant(vols.world, key)
    vols.sandbox.runner.calls.clear()
    code, _, err = vols.sandbox.run("refresh")
    assert code == 0, err
    assert vols.sandbox.started_units() == ["app.service"]


def test_a_tampered_ciphertext_is_rejected_by_transit(
    vols: Volumes, caplog: pytest.LogCaptureFixture
) -> None:
    key, image = booted(vols)
    vols.reboot()
    token = luks.read_token(image)
    raw = bytearray(base64.b64decode(token.ciphertext.split(":")[2]))
    raw[20] ^= 0x55
    altered = token.ciphertext.rsplit(":", 1)[0] + ":" + base64.b64encode(raw).decode()
    luks.update_token(image, luks.TransitToken(token.mount, token.key_name, 1, altered))
    caplog.clear()
    vols.sandbox.runner.calls.clear()
    code, _, err = vols.sandbox.run("bootstrap")
    assert code == errors.DataKeyRejected.exit_code, err
    assert f"Transit key transit/keys/{key} rejected the stored ciphertext" in err
    assert_held_back(vols, caplog, errors.DataKeyRejected)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"key_version": 9}, "key_version"),
        ({"key_name": "../x"}, "key_name"),
        ({"ciphertext": "plaintext?"}, "ciphertext"),
    ],
)
def test_a_tampered_token_field(
    vols: Volumes, caplog: pytest.LogCaptureFixture, change: dict[str, object], field: str
) -> None:
    _, image = booted(vols)
    vols.reboot()
    data = {**json.loads(luks.read_token(image).to_json()), **change}
    subprocess.run(
        [
            "cryptsetup",
            "token",
            "import",
            "--json-file=-",
            "--token-id",
            "0",
            "--token-replace",
            str(image),
        ],
        input=json.dumps(data).encode(),
        check=True,
    )
    caplog.clear()
    vols.sandbox.runner.calls.clear()
    code, _, err = vols.sandbox.run("bootstrap")
    assert code == errors.VolumeTokenInvalid.exit_code, err
    assert f"LUKS2 token field {field}:" in err
    assert_held_back(vols, caplog, errors.VolumeTokenInvalid)


def test_a_token_swapped_in_from_another_volume(
    vols: Volumes, openbao: OpenBao, caplog: pytest.LogCaptureFixture
) -> None:
    """Both tokens decrypt at Transit, but each key opens only its own volume's keyslot."""
    key = vols.transit()
    first, second = vols.image("data"), vols.image("logs")
    section = vols.section(data={}, logs={"units": ["worker.service"]})
    vols.provision(vols.config(volumes=section))
    code, _, err = vols.sandbox.run("bootstrap")
    assert code == 0, err
    for image in (first, second):  # both plaintext keys become canaries
        assert decrypt_as_root(openbao, key, luks.read_token(image).ciphertext).ok
    vols.reboot()
    luks.update_token(first, luks.read_token(second))
    caplog.clear()
    vols.sandbox.runner.calls.clear()

    code, _, err = vols.sandbox.run("bootstrap")

    assert code == errors.DataKeyRejected.exit_code, err
    assert "the key its LUKS2 token decrypts to opens no keyslot" in err
    assert vols.sandbox.started_units() == ["worker.service"]  # needs only `logs`
    assert blockdev.mounted_from(vols.mount_point("logs"), vols.sandbox.root / "dev/mapper/logs")
    assert len(alerts(caplog, errors.DataKeyRejected)) == 1


def test_a_deleted_transit_key(vols: Volumes, caplog: pytest.LogCaptureFixture) -> None:
    key, _ = booted(vols)
    vols.reboot()
    delete_key(vols.world.bao, key)
    caplog.clear()
    vols.sandbox.runner.calls.clear()
    code, _, err = vols.sandbox.run("bootstrap")
    assert code == errors.TransitKeyMissing.exit_code, err
    assert f"Transit key transit/keys/{key} does not exist" in err
    assert_held_back(vols, caplog, errors.TransitKeyMissing)


def test_a_mount_pid1_refuses(vols: Volumes, caplog: pytest.LogCaptureFixture) -> None:
    vols.transit()
    vols.image("data")
    vols.sandbox.pid1.failing.add("srv-data.mount")
    code, err = first_boot(vols)
    assert code == errors.VolumeFailed.exit_code, err
    assert (
        "PID 1 did not mount /dev/mapper/data at /srv/data (`systemctl start "
        "srv-data.mount` exited with 5); see `systemctl status srv-data.mount`"
    ) in err
    assert_held_back(vols, caplog, errors.VolumeFailed)


def test_the_agent_units_let_the_others_start_exactly_on_the_per_data_outcomes() -> None:
    import configparser

    from bootsecrets import encdirs, volumes

    repo = Path(__file__).resolve().parent.parent
    expected = {cls.exit_code for cls in (*encdirs.DIRECTORY_FAILURES, *volumes.VOLUME_FAILURES)}
    for name in ("bootsecrets.service", "bootsecrets-refresh.service"):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.read(repo / "systemd" / name)
        assert {int(c) for c in unit["Service"]["SuccessExitStatus"].split()} == expected


def test_a_mount_only_pid1_sees(vols: Volumes, caplog: pytest.LogCaptureFixture) -> None:
    """`systemctl start` succeeds but the agent's namespace shows no mount: PID 1's word
    (`is-active`) decides. Active: the units start; inactive: held back (59)."""
    vols.transit()
    vols.image("data")
    vols.sandbox.pid1.unseen.add("srv-data.mount")
    code, err = first_boot(vols)
    assert code == 0, err
    assert ("is-active", "--", "srv-data.mount") in vols.sandbox.runner.verbs()
    assert sorted(vols.sandbox.started_units()) == ["app.service", "worker.service"]

    vols.reboot()
    vols.sandbox.pid1.unit_states["srv-data.mount"] = "inactive"
    vols.sandbox.runner.calls.clear()
    code, _, err = vols.sandbox.run("bootstrap")
    assert code == errors.VolumeFailed.exit_code, err
    assert "PID 1 did not mount /dev/mapper/data at /srv/data" in err
    assert_held_back(vols, caplog, errors.VolumeFailed)


def test_a_unit_held_back_after_running_is_started_once_its_volume_is_back(
    vols: Volumes, caplog: pytest.LogCaptureFixture
) -> None:
    """The volume went away under a running unit (its BindsTo= stopped it) and a refresh
    held the unit back; the refresh that mounts the volume again starts it, although its
    values did not change. (Found by the VM test: it stayed down, "nothing changed".)"""
    key, _ = booted(vols)
    vols.sandbox.pid1.reboot()  # the mount gone (and with it the unit, by BindsTo=)
    vols.dm.reboot()  # the mapping closed; the store and the running generation stay
    grant(vols.world, key, operations=("datakey/plaintext", "rewrap"))
    caplog.clear()
    vols.sandbox.runner.calls.clear()
    code, _, err = vols.sandbox.run("refresh")
    assert code == errors.DataLocked.exit_code, err
    assert_held_back(vols, caplog, errors.DataLocked, started=())

    grant(vols.world, key)
    vols.sandbox.runner.calls.clear()
    code, _, err = vols.sandbox.run("refresh")
    assert code == 0, err
    assert vols.sandbox.started_units() == ["app.service"]
    state = json.loads((vols.sandbox.store / "state.json").read_text())
    assert state["skipped"] == {}
    # Started once: the next refresh has nothing to do.
    vols.sandbox.runner.calls.clear()
    code, _, err = vols.sandbox.run("refresh")
    assert (code, vols.sandbox.started_units()) == (0, []), err
