"""Encrypted volumes end to end on this host: real LUKS2 headers on volume images (linked at
/dev/disk/by-id/scsi-0DO_Volume_<name> in the sandbox root), real cryptsetup for everything
but the mapping itself, real mkfs and mounts, the shared OpenBao with Transit and the
droplet's exact grant. device-mapper and PID 1's mounting are stand-ins
(support.devmapper): `cryptsetup open` checks the key with the real cryptsetup
(--test-passphrase) and maps a loop device; `systemctl start <x>.mount` mounts what the
agent's mount unit says. That the bytes on the volume are ciphertext is the VM test's
(tests/e2e/test_e2e.py with tests/e2e/e2e_atrest.py). Needs root, as CI runs.

The proof here: first boot formats (one datakey, the key only ever on cryptsetup's stdin,
the ciphertext in the header's token, PBKDF2 at the minimum), makes the filesystem, mounts
it through a mount unit, binds the units needing it to it and starts them; a reboot opens
it with one decrypt and the data is there; `status --json` per volume; a refresh after a
rotation rewraps the token in the header; decommission unmounts, closes and erases (no
keyslot, no token), and with the Transit key deleted the saved token decrypts no more.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootsecrets import blockdev, errors, luks
from bootsecrets.volumes import DROPIN_NAME
from conftest import Captured, mode_of
from support.openbao import OpenBao
from support.transit import decrypt_as_root, delete_key, rotate
from support.volumes import Volumes, volume_world
from test_encdirs import transit_requests

DATA = b"LEDGER-ON-THE-VOLUME-3c9e1f0b7a5d\n" * 64


@pytest.fixture
def vols(
    openbao: OpenBao, sandbox_root: Path, captured: Captured, unique: str
) -> Iterator[Volumes]:
    with volume_world(openbao, sandbox_root, captured, unique) as volumes:
        yield volumes


def booted(vols: Volumes, **volume: object) -> tuple[str, Path]:
    """A host that bootstrapped once with volume `data` (app.service needs it)."""
    key = vols.transit()
    image = vols.image("data")
    vols.provision(vols.config(volumes=vols.section(data=dict(volume))))
    code, _, err = vols.sandbox.run("bootstrap")
    assert code == 0, err
    return key, image


def data_key(openbao: OpenBao, key: str, image: Path) -> bytes:
    """The volume's data key, as the root token decrypts it (a canary from now on)."""
    token = luks.read_token(image)
    answer = decrypt_as_root(openbao, key, token.ciphertext)
    assert answer.status_code == 200, answer.text
    return base64.b64decode(answer.json()["data"]["plaintext"])


def test_first_boot_formats_reboot_opens_decommission_erases(
    vols: Volumes, openbao: OpenBao
) -> None:
    sandbox, dm = vols.sandbox, vols.dm
    key = vols.transit()
    image = vols.image("data")
    vols.provision(vols.config())
    offset = openbao.audit_offset()

    code, _, err = sandbox.run("bootstrap")

    assert code == 0, err
    assert transit_requests(openbao, offset) == [f"transit/datakey/plaintext/{key}"]
    # The header: LUKS2, keyslot 0 with PBKDF2 at the minimum, the token with the ciphertext.
    header = luks.read_header(image)
    assert header.keyslots == (0,) and header.token is not None
    token = header.token
    assert (token.mount, token.key_name, token.key_version) == ("transit", key, 1)
    dump = json.loads(
        subprocess.run(
            ["cryptsetup", "luksDump", "--dump-json-metadata", str(image)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert dump["keyslots"]["0"]["kdf"]["type"] == "pbkdf2"
    assert dump["keyslots"]["0"]["kdf"]["iterations"] == 1000
    uuid = blockdev.luks_uuid(image)
    record = vols.record("data")
    assert record == {
        "version": 1,
        "name": "data",
        "device": vols.device("data"),
        "mapper": "data",
        "mount": "/srv/data",
        "luks_uuid": uuid,
        "state": "ready",
        "transit_mount": "transit",
        "transit_key": key,
        "created_at": record["created_at"],
    }
    assert mode_of(sandbox.root / "var/lib/bootsecrets/volumes/data.json") == 0o600
    # The key reached cryptsetup on stdin only, 64 bytes, for luksFormat and open.
    device = str(sandbox.root / vols.device("data").lstrip("/"))
    keyed = [(argv[:2], size) for argv, size in dm.calls if size is not None and argv[1] != "token"]
    assert keyed == [(("cryptsetup", "luksFormat"), 64), (("cryptsetup", "open"), 64)]
    assert luks.format_argv(Path(device), uuid) in dm.argvs()
    assert luks.open_argv(Path(device), "data") in dm.argvs()
    mapper = sandbox.root / "dev/mapper/data"
    assert ("mkfs.ext4", "-q", "-E", "nodiscard", str(mapper)) in dm.argvs()
    # PID 1 mounted it through the agent's mount unit; the units needing it are bound to it.
    unit = (sandbox.root / "run/systemd/system/srv-data.mount").read_text()
    assert "What=/dev/mapper/data\nWhere=/srv/data\nType=ext4\nOptions=nodev,nosuid\n" in unit
    assert ("start", "--", "srv-data.mount") in sandbox.runner.verbs()
    mount = vols.mount_point("data")
    assert blockdev.mounted_from(mount, mapper)
    assert mode_of(mount) == 0o755 and os.stat(mount).st_uid == 0
    dropin = sandbox.root / "run/systemd/system/app.service.d" / DROPIN_NAME
    assert dropin.read_text().endswith("[Unit]\nBindsTo=srv-data.mount\nAfter=srv-data.mount\n")
    assert not (sandbox.root / "run/systemd/system/worker.service.d" / DROPIN_NAME).exists()
    assert sorted(sandbox.started_units()) == ["app.service", "worker.service"]
    verbs = sandbox.runner.verbs()
    assert verbs.index(("start", "--", "srv-data.mount")) < verbs.index(
        ("start", "--no-block", "--", "app.service", "worker.service")
    )
    raw_key = data_key(openbao, key, image)
    assert image.read_bytes().count(raw_key) == 0
    # The token is in both copies of the LUKS2 metadata (primary and secondary header).
    assert image.read_bytes().count(token.ciphertext.encode()) == 2

    (mount / "ledger.csv").write_bytes(DATA)

    # A reboot under persist-token: the token in the header, one decrypt, the same data.
    vols.reboot()
    assert not blockdev.mounted_from(mount, mapper)
    dm.calls.clear()
    offset = openbao.audit_offset()
    code, _, err = sandbox.run("bootstrap")
    assert code == 0, err
    assert transit_requests(openbao, offset) == [f"transit/decrypt/{key}"]
    assert not any(
        argv[1] in ("luksFormat", "erase") or argv[0].startswith("mkfs") for argv in dm.argvs()
    )
    assert (mount / "ledger.csv").read_bytes() == DATA
    assert "app.service" in sandbox.started_units()

    # status: per volume, never a key or the ciphertext.
    code, out, _ = sandbox.run("status", "--json")
    assert code == 0
    [volume] = json.loads(out)["volumes"]
    assert volume == {
        "name": "data",
        "device": vols.device("data"),
        "mapper": "data",
        "mount": "/srv/data",
        "mount_unit": "srv-data.mount",
        "units": ["app.service"],
        "transit_key": f"transit/keys/{key}",
        "state": "mounted",
        "open": True,
        "mounted": True,
        "key_version": 1,
        "luks_uuid": uuid,
        "formatted_at": record["created_at"],
        "problem": None,
    }
    assert token.ciphertext.split(":")[2][:40] not in out
    code, text, _ = sandbox.run("status")
    assert (
        f"encrypted volume data ({vols.device('data')} at /srv/data): mounted, Transit "
        f"key transit/keys/{key} v1, units app.service"
    ) in text

    # Rotation: a refresh rewraps; the header's token moves to v2 and still opens it.
    rotate(openbao, key)
    offset = openbao.audit_offset()
    code, _, err = sandbox.run("refresh")
    assert code == 0, err
    assert transit_requests(openbao, offset) == [f"transit/rewrap/{key}"]
    rewrapped = luks.read_token(image)
    assert rewrapped.key_version == 2 and rewrapped.ciphertext.startswith("vault:v2:")
    assert data_key(openbao, key, image) == raw_key
    assert json.loads(sandbox.run("status", "--json")[1])["volumes"][0]["key_version"] == 2

    # Decommission: unmounted, closed, erased; idempotent.
    saved = rewrapped.ciphertext
    dm.calls.clear()
    sandbox.runner.calls.clear()
    code, out, err = sandbox.run("decommission", "--yes", "--json")
    assert code == 0, err
    verbs = sandbox.runner.verbs()
    assert verbs[:3] == [
        (
            "stop",
            "--",
            "bootsecrets-refresh.timer",
            "bootsecrets-wakeup.timer",
            "app.service",
            "worker.service",
        ),
        ("stop", "--", "srv-data.mount"),
        ("daemon-reload",),
    ]
    commands = [argv for argv in dm.argvs() if argv[1] in ("close", "token", "erase")]
    assert commands == [
        luks.close_argv("data"),
        luks.token_remove_argv(Path(device), 0),
        luks.erase_argv(Path(device)),
    ]
    steps = {s["step"]: s for s in json.loads(out)["steps"]}
    assert list(steps) == [
        "stop-units",
        "revoke-leases",
        "unmount-volumes",
        "close-volumes",
        "erase-volumes",
        "lock-keys",
        "remove-key-records",
        "remove-store",
        "revoke-token",
    ]
    assert steps["unmount-volumes"] == {
        "step": "unmount-volumes",
        "outcome": "done",
        "detail": f"data ({vols.device('data')}): unmounted from /srv/data; srv-data.mount removed",
    }
    assert steps["close-volumes"]["detail"].endswith(
        "/dev/mapper/data closed: its key left the kernel"
    )
    assert steps["erase-volumes"]["detail"].endswith(
        "erased: keyslot(s) 0 destroyed, token(s) 0 removed"
    )
    assert steps["lock-keys"]["outcome"] == "nothing-to-do"
    erased = luks.read_header(image)
    assert erased.keyslots == () and erased.tokens == {}
    assert image.read_bytes().count(saved.encode()) == 0
    assert not blockdev.mounted_from(mount, mapper) and "data" not in dm.active
    assert not (sandbox.root / "var/lib/bootsecrets/volumes/data.json").exists()
    assert not (sandbox.root / "run/systemd/system/srv-data.mount").exists()
    assert not (sandbox.root / "run/systemd/system/app.service.d" / DROPIN_NAME).exists()
    code, out, err = sandbox.run("decommission", "--yes")
    assert code == 0, err
    assert f"erase-volumes: nothing-to-do: data ({vols.device('data')}): already erased" in out

    # The operator deletes the Transit key: the token saved before erasing decrypts no more.
    delete_key(openbao, key)
    refused = decrypt_as_root(openbao, key, saved)
    assert refused.status_code == 400 and "encryption key not found" in refused.text


def test_a_second_run_in_one_boot_changes_nothing(vols: Volumes, openbao: OpenBao) -> None:
    key, image = booted(vols)
    before = image.read_bytes()
    vols.dm.calls.clear()
    vols.sandbox.runner.calls.clear()
    offset = openbao.audit_offset()

    code, _, err = vols.sandbox.run("refresh")

    assert code == 0, err
    assert transit_requests(openbao, offset) == [f"transit/rewrap/{key}"]  # version: same
    assert image.read_bytes() == before
    assert [argv[1] for argv in vols.dm.argvs() if argv[0] == "cryptsetup"] == [
        "status",
        "luksDump",
        "luksUUID",
    ]
    assert not any(
        call[:1] == ("daemon-reload",) or call[-1].endswith(".mount")
        for call in vols.sandbox.runner.verbs()
    )


def test_owner_mode_options_and_a_mapper_name_of_its_own(vols: Volumes) -> None:
    booted(
        vols,
        user="nobody",
        group="nogroup",
        mode="0750",
        mapper="pg-main",
        filesystem="ext4",
        mount_options=["nodev", "nosuid", "noexec", "noatime"],
    )
    mount = vols.mount_point("data")
    st = os.stat(mount)
    assert (st.st_uid, st.st_gid) == (65534, 65534) and mode_of(mount) == 0o750
    entry = blockdev.mounted_at(mount)
    assert entry is not None and entry.fstype == "ext4"
    options = subprocess.run(
        ["findmnt", "-no", "OPTIONS", str(mount)], capture_output=True, text=True, check=True
    ).stdout
    assert {"nodev", "nosuid", "noexec", "noatime"} <= set(options.strip().split(","))
    assert blockdev.mounted_from(mount, vols.sandbox.root / "dev/mapper/pg-main")
    assert vols.record("data")["mapper"] == "pg-main"


def test_a_volume_formatted_elsewhere_is_adopted_never_formatted(
    vols: Volumes, openbao: OpenBao
) -> None:
    """The volume moves to a new droplet (or /var/lib/bootsecrets was lost): no record, a
    bootsecrets header: opened with its token and adopted."""
    _, image = booted(vols)
    (vols.mount_point("data") / "ledger.csv").write_bytes(DATA)
    uuid = blockdev.luks_uuid(image)
    vols.reboot()
    (vols.sandbox.root / "var/lib/bootsecrets/volumes/data.json").unlink()
    vols.dm.calls.clear()

    code, _, err = vols.sandbox.run("bootstrap")

    assert code == 0, err
    assert "formatted elsewhere; adopted" in err
    assert not any(
        argv[1] == "luksFormat" or argv[0].startswith("mkfs") for argv in vols.dm.argvs()
    )
    assert (vols.mount_point("data") / "ledger.csv").read_bytes() == DATA
    assert vols.record("data")["luks_uuid"] == uuid
    assert blockdev.luks_uuid(image) == uuid


def test_a_first_use_cut_short_after_luksformat_is_finished(vols: Volumes) -> None:
    """mkfs fails once (say the run was killed there): the header exists, the record says
    `formatting`; the next run opens it and makes the filesystem, without a new header."""
    vols.transit()
    image = vols.image("data")
    vols.provision(vols.config())
    real = vols.dm.__call__

    def no_mkfs(
        argv: tuple[str, ...], *, stdin: luks.Stdin | None = None, check: bool = True
    ) -> luks.Completed:
        if argv[0].startswith("mkfs"):
            return luks.Completed(tuple(argv), 1, "", "mkfs.ext4: killed\n")
        return real(argv, stdin=stdin, check=check)

    vols.sandbox.dm = no_mkfs  # type: ignore[assignment]
    code, _, err = vols.sandbox.run("bootstrap")
    assert code == errors.VolumeFailed.exit_code, err
    assert "mkfs.ext4 -q -E nodiscard" in err and "killed" in err
    assert vols.record("data")["state"] == "formatting"
    uuid = blockdev.luks_uuid(image)
    assert vols.record("data")["luks_uuid"] == uuid
    assert vols.sandbox.started_units() == ["worker.service"]

    vols.sandbox.dm = vols.dm
    vols.reboot()
    code, _, err = vols.sandbox.run("bootstrap")
    assert code == 0, err
    assert "finishing a first use cut short" in err
    assert blockdev.luks_uuid(image) == uuid
    assert vols.record("data")["state"] == "ready"
    assert blockdev.mounted_from(vols.mount_point("data"), vols.sandbox.root / "dev/mapper/data")


def test_decommission_with_a_file_open_on_the_volume(vols: Volumes) -> None:
    """Unmount fails naming the process and the mapping stays open, but the header is
    erased all the same; a rerun once the file is closed finishes."""
    _, image = booted(vols)
    sandbox = vols.sandbox
    handle = (vols.mount_point("data") / "open.log").open("w")
    try:
        code, out, err = sandbox.run("decommission", "--yes", "--json")
        assert code == errors.DecommissionIncomplete.exit_code, err
        steps = {s["step"]: s for s in json.loads(out)["steps"]}
        unmount = steps["unmount-volumes"]
        assert unmount["outcome"] == "failed"
        assert (
            f"still mounted at /srv/data: in use (processes: {os.getpid()} (" in unmount["detail"]
        )
        assert steps["close-volumes"]["outcome"] == "failed"
        assert "Device data is still in use." in steps["close-volumes"]["detail"]
        assert steps["erase-volumes"]["outcome"] == "done"
        assert (
            "/dev/mapper/data is still open, so its data stays readable on this host"
            in steps["erase-volumes"]["detail"]
        )
        assert luks.read_header(image).keyslots == ()
    finally:
        handle.close()
    code, out, err = sandbox.run("decommission", "--yes")
    assert code == 0, err
    assert "unmount-volumes: done: data (" in out and "close-volumes: done: data (" in out
    assert "erase-volumes: nothing-to-do: data (" in out and "already erased" in out
    assert "data" not in vols.dm.active


def test_decommission_without_the_image_config_finds_volumes_by_their_records(
    vols: Volumes, openbao: OpenBao
) -> None:
    _, image = booted(vols)
    sandbox = vols.sandbox
    sandbox.write_config("vault: [not, a, mapping\n")
    sandbox.env["VAULT_ADDR"] = openbao.addr
    code, out, err = sandbox.run("decommission", "--yes")
    assert code == 0, err
    assert f"unmount-volumes: done: data ({vols.device('data')}): unmounted from /srv/data" in out
    assert "erase-volumes: done" in out
    assert luks.read_header(image).keyslots == () and "data" not in vols.dm.active
    code, out, err = sandbox.run("decommission", "--yes")
    assert code == 0, err
    assert "erase-volumes: nothing-to-do: no encrypted volume" in out  # the record is gone


def test_decommission_leaves_a_foreign_luks_header_alone(vols: Volumes) -> None:
    """The config points at a LUKS volume bootsecrets did not make (refused at boot, 57):
    decommission does not erase what it never owned."""
    vols.transit()
    image = vols.image("data")
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
            str(image),
        ],
        input=b"y" * 64,
        check=True,
    )
    vols.provision(vols.config())
    assert vols.sandbox.run("bootstrap")[0] == errors.VolumeTokenInvalid.exit_code
    code, out, _ = vols.sandbox.run("decommission", "--yes")
    assert code == errors.DecommissionIncomplete.exit_code
    assert "erase-volumes: failed: data (" in out and "left untouched" in out
    assert luks.read_header(image).keyslots == (0,)
