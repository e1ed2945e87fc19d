"""Encrypted directories, what goes wrong: real ext4 (with and without `encrypt`) and tmpfs,
the shared OpenBao with Transit.

Checked on the host, before Vault (16-19): OpenBao's audit log shows no request from the run,
nothing is written (no key record changed, no directory created, no generation, no unit
started). Found at Vault or by the kernel after the login (51-53): the directory stays
locked, the units needing it stay down and the others start, an alert with the outcome's
MESSAGE_ID names the directory. In every case the plaintext data key (a canary) appears in
no output.
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bootsecrets import encdirs, errors, fscrypt
from conftest import Sandbox
from support.loopfs import LoopFs, ext4_loop
from support.openbao import OpenBao
from support.transit import (
    configure,
    create_key,
    decrypt_as_root,
    grant,
    mounted_in,
    record_of,
    rotate,
)
from support.world import World
from test_encdirs import directory_config, provision, simulate_reboot, transit_requests

REPO = Path(__file__).resolve().parent.parent
RECORD = "var/lib/bootsecrets/keys/appdata.json"


@pytest.fixture
def encfs() -> Iterator[LoopFs]:
    with ext4_loop(encrypt=True) as fs:
        yield fs


@pytest.fixture
def srv(encfs: LoopFs, sandbox: Sandbox) -> Iterator[Path]:
    with mounted_in(encfs, sandbox.root / "srv") as target:
        yield target


def booted(world: World, **changes: Any) -> dict[str, Any]:
    """A host that bootstrapped once under persist-token with /srv/appdata (app.service);
    the plaintext key is made a canary. Returns the config."""
    create_key(world.bao, world.role)
    grant(world, world.role)
    config = directory_config(world, reboot_policy="persist-token", **changes)
    provision(world, config)
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err
    for name in config["encrypted_directories"]:
        record = record_of(world.sandbox.root, name)
        assert (
            decrypt_as_root(world.bao, record["transit_key"], record["ciphertext"]).status_code
            == 200
        )
    world.sandbox.runner.calls.clear()
    return config


def assert_nothing_spent(world: World, openbao: OpenBao, offset: int) -> None:
    assert openbao.audited_requests(offset) == []
    assert not any(call[:1] == ("start",) for call in world.sandbox.runner.verbs())
    assert not (world.sandbox.store / "current").exists()


def alerts(
    caplog: pytest.LogCaptureFixture, error: type[errors.BootsecretsError]
) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "MESSAGE_ID", None) == error.message_id]


# --- checked before Vault --------------------------------------------------------------------


def test_a_non_empty_directory_is_never_encrypted_at_first_use(
    world: World, openbao: OpenBao, srv: Path
) -> None:
    create_key(openbao, world.role)
    grant(world, world.role)
    (srv / "appdata").mkdir()
    (srv / "appdata/existing.txt").write_text("operator data\n")
    wrapped = provision(world, directory_config(world))
    offset = openbao.audit_offset()

    code, _, err = world.sandbox.run("bootstrap")

    assert code == errors.DataNotEmpty.exit_code, err
    assert "/srv/appdata: already holds data; refusing to encrypt over it" in err
    assert_nothing_spent(world, openbao, offset)
    assert fscrypt.get_policy(srv / "appdata") is None
    assert (srv / "appdata/existing.txt").read_text() == "operator data\n"
    assert not (world.sandbox.root / RECORD).exists()
    assert "secret_id" in openbao.unwrap(wrapped)  # the wrapped secret-id is still unused


def test_a_filesystem_without_the_encrypt_feature_is_refused(
    world: World, openbao: OpenBao, sandbox: Sandbox
) -> None:
    with ext4_loop(encrypt=False) as plain, mounted_in(plain, sandbox.root / "srv"):
        provision(world, directory_config(world))
        offset = openbao.audit_offset()
        code, _, err = sandbox.run("bootstrap")
        assert code == errors.EncryptionUnsupported.exit_code, err
        assert "does not have the encrypt feature" in err and "tune2fs -O encrypt" in err
        assert_nothing_spent(world, openbao, offset)
        assert not (sandbox.root / "srv/appdata").exists()


def test_a_directory_on_tmpfs_is_refused(world: World, openbao: OpenBao) -> None:
    config = directory_config(
        world, encrypted_directories={"appdata": {"path": "/data/app", "units": ["app.service"]}}
    )
    provision(world, config)  # the sandbox root itself is on tmpfs (/dev/shm)
    offset = openbao.audit_offset()
    code, _, err = world.sandbox.run("bootstrap")
    assert code == errors.EncryptionUnsupported.exit_code, err
    assert "/data/app: is on tmpfs/ramfs" in err
    assert_nothing_spent(world, openbao, offset)
    assert not (world.sandbox.root / "data").exists()


def test_the_root_of_a_filesystem_is_refused(world: World, openbao: OpenBao, encfs: LoopFs) -> None:
    config = directory_config(
        world, encrypted_directories={"appdata": {"path": "/data", "units": ["app.service"]}}
    )
    with mounted_in(encfs, world.sandbox.root / "data"):
        provision(world, config)
        offset = openbao.audit_offset()
        code, _, err = world.sandbox.run("bootstrap")
    assert code == errors.EncryptionUnsupported.exit_code, err
    assert "is the root directory of a filesystem" in err
    assert_nothing_spent(world, openbao, offset)


def _record_missing(world: World, srv: Path) -> None:
    (world.sandbox.root / RECORD).unlink()


def _record_not_json(world: World, srv: Path) -> None:
    (world.sandbox.root / RECORD).write_text('{"version": 1, "ciphertext": ')


def _record_wrong_field(world: World, srv: Path) -> None:
    path = world.sandbox.root / RECORD
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "key_version": "1"}))


def _record_a_symlink(world: World, srv: Path) -> None:
    path = world.sandbox.root / RECORD
    target = path.with_name("elsewhere.txt")
    path.rename(target)
    path.symlink_to(target)


def _encrypted_with_another_key(world: World, srv: Path) -> None:
    """The directory swapped for one encrypted with a key bootsecrets never had."""
    (srv / "appdata").rename(srv / "appdata.old")
    (srv / "appdata").mkdir()
    key = bytearray(secrets.token_bytes(fscrypt.KEY_SIZE))
    identifier = fscrypt.provision(srv / "appdata", key)
    fscrypt.remove_key(srv, identifier)


def _replaced_by_a_plain_directory(world: World, srv: Path) -> None:
    """The directory swapped for a plain one, which would catch the data in clear."""
    (srv / "appdata").rename(srv / "appdata.old")
    (srv / "appdata").mkdir()


def _directory_gone(world: World, srv: Path) -> None:
    (srv / "appdata").rename(srv / "appdata.old")


def _config_names_another_transit_key(world: World, srv: Path) -> None:
    config = directory_config(world, reboot_policy="persist-token")
    config["encrypted_directories"]["appdata"]["transit_key"] = "another-key"
    world.sandbox.write_config(config)


LOCAL_CASES: dict[str, tuple[Callable[[World, Path], None], type[errors.BootsecretsError], str]] = {
    "record-missing": (
        _record_missing,
        errors.KeyRecordInvalid,
        "is encrypted, but its key record",
    ),
    "record-not-json": (_record_not_json, errors.KeyRecordInvalid, "is not valid JSON"),
    "record-field-wrong-type": (
        _record_wrong_field,
        errors.KeyRecordInvalid,
        "key_version does not match",
    ),
    "record-a-symlink": (_record_a_symlink, errors.KeyRecordInvalid, "is a symlink"),
    "encrypted-with-another-key": (
        _encrypted_with_another_key,
        errors.KeyMismatch,
        "is encrypted with another key than",
    ),
    "replaced-by-a-plain-directory": (
        _replaced_by_a_plain_directory,
        errors.KeyMismatch,
        "is not encrypted, but",
    ),
    "directory-gone": (_directory_gone, errors.KeyMismatch, "does not exist, but"),
    "config-names-another-transit-key": (
        _config_names_another_transit_key,
        errors.KeyMismatch,
        "cannot move to another Transit",
    ),
}


@pytest.mark.parametrize("case", sorted(LOCAL_CASES))
def test_a_key_record_and_directory_that_do_not_match_stop_before_vault(
    world: World, openbao: OpenBao, encfs: LoopFs, srv: Path, case: str
) -> None:
    change, error, text = LOCAL_CASES[case]
    booted(world)
    simulate_reboot(world.sandbox, encfs, srv)
    change(world, srv)
    record = world.sandbox.root / RECORD
    before = record.read_bytes() if record.exists() else None
    listing = sorted(os.listdir(srv))
    offset = openbao.audit_offset()

    code, _, err = world.sandbox.run("bootstrap")

    assert code == error.exit_code, err
    assert text in err
    assert_nothing_spent(world, openbao, offset)
    assert (record.read_bytes() if record.exists() else None) == before
    assert sorted(os.listdir(srv)) == listing


# --- found at Vault or by the kernel: the others start ---------------------------------------


def test_decrypt_denied_holds_back_the_units_needing_the_directory(
    world: World,
    openbao: OpenBao,
    encfs: LoopFs,
    srv: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sandbox = world.sandbox
    booted(world)
    (srv / "appdata/data.txt").write_text("kept\n")
    grant(world, world.role, operations=("datakey/plaintext", "rewrap"))  # no decrypt
    simulate_reboot(sandbox, encfs, srv)
    record_before = (sandbox.root / RECORD).read_bytes()

    code, _, err = sandbox.run("bootstrap")

    assert code == errors.DataLocked.exit_code, err
    assert f"permission denied on transit/decrypt/{world.role}" in err
    [alert] = alerts(caplog, errors.DataLocked)
    assert alert.__dict__["DIRECTORY"] == "appdata"
    assert alert.__dict__["UNIT"] == "app.service"
    assert sandbox.started_units() == ["worker.service"]
    assert not fscrypt.is_unlocked(srv / "appdata")
    assert not (sandbox.store / "unlocked/appdata").exists()
    assert (sandbox.root / RECORD).read_bytes() == record_before
    status = json.loads(sandbox.run("status", "--json")[1])
    [directory] = status["directories"]
    assert directory["state"] == "locked"
    app = next(u for u in status["units"] if u["unit"] == "app.service")
    assert app["left_out"] == "held back: encrypted directory appdata is locked"
    assert status["last_run"]["exit_code"] == errors.DataLocked.exit_code

    # The policy fixed: a refresh unlocks it and starts the unit held back.
    grant(world, world.role)
    sandbox.runner.calls.clear()
    code, _, err = sandbox.run("refresh")
    assert code == 0, err
    assert (srv / "appdata/data.txt").read_text() == "kept\n"
    assert sandbox.started_units() == ["app.service"]
    assert (sandbox.store / "unlocked/appdata").exists()


def test_a_tampered_ciphertext_is_rejected_by_transit(
    world: World,
    openbao: OpenBao,
    encfs: LoopFs,
    srv: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    booted(world)
    simulate_reboot(world.sandbox, encfs, srv)
    path = world.sandbox.root / RECORD
    record = json.loads(path.read_text())
    head, _, body = record["ciphertext"].rpartition(":")
    flipped = body[:10] + ("A" if body[10] != "A" else "B") + body[11:]
    path.write_text(json.dumps({**record, "ciphertext": f"{head}:{flipped}"}))
    tampered = path.read_bytes()

    code, _, err = world.sandbox.run("bootstrap")

    assert code == errors.DataKeyRejected.exit_code, err
    assert path.read_bytes() == tampered  # nothing rewritten
    assert "rejected the stored ciphertext" in err
    assert len(alerts(caplog, errors.DataKeyRejected)) == 1
    assert world.sandbox.started_units() == ["worker.service"]
    assert not fscrypt.is_unlocked(srv / "appdata")


def test_a_swapped_ciphertext_unlocks_nothing_and_locks_no_other_directory(
    world: World,
    openbao: OpenBao,
    encfs: LoopFs,
    srv: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """appdata's record given cache's (valid) ciphertext: Transit decrypts it, the kernel
    says it is not appdata's key; cache, unlocked with that very key, stays unlocked."""
    # cache first: its key is in the kernel when appdata's (swapped) record adds it again,
    # and taking that claim back out would lock cache as a side effect.
    booted(
        world,
        encrypted_directories={
            "cache": {"path": "/srv/cache", "units": ["worker.service"]},
            "appdata": {"path": "/srv/appdata", "units": ["app.service"]},
        },
    )
    simulate_reboot(world.sandbox, encfs, srv)
    appdata = world.sandbox.root / RECORD
    cache = record_of(world.sandbox.root, "cache")
    appdata.write_text(
        json.dumps({**json.loads(appdata.read_text()), "ciphertext": cache["ciphertext"]})
    )

    code, _, err = world.sandbox.run("bootstrap")

    assert code == errors.DataKeyRejected.exit_code, err
    assert "is not the directory's key (the record was swapped)" in err
    assert not fscrypt.is_unlocked(srv / "appdata")
    assert fscrypt.is_unlocked(srv / "cache")
    assert world.sandbox.started_units() == ["worker.service"]
    [alert] = alerts(caplog, errors.DataKeyRejected)
    assert alert.__dict__["DIRECTORY"] == "appdata"


def test_rotation_rewraps_on_refresh_so_old_versions_can_be_retired(
    world: World, openbao: OpenBao, encfs: LoopFs, srv: Path
) -> None:
    sandbox = world.sandbox
    booted(world)
    (srv / "appdata/data.txt").write_text("kept\n")
    rotate(openbao, world.role)
    offset = openbao.audit_offset()

    assert sandbox.run("refresh")[0] == 0
    assert transit_requests(openbao, offset) == [f"transit/rewrap/{world.role}"]
    record = record_of(sandbox.root, "appdata")
    assert record["key_version"] == 2 and record["ciphertext"].startswith("vault:v2:")
    assert record["rewrapped_at"]
    status = json.loads(sandbox.run("status", "--json")[1])
    assert status["directories"][0]["key_version"] == 2

    unchanged = (sandbox.root / RECORD).read_bytes()
    assert sandbox.run("refresh")[0] == 0  # the version did not move: the record stays
    assert (sandbox.root / RECORD).read_bytes() == unchanged

    # Version 1 retired: the rewrapped record still unlocks after a reboot.
    configure(openbao, world.role, min_decryption_version=2)
    simulate_reboot(sandbox, encfs, srv)
    code, _, err = sandbox.run("bootstrap")
    assert code == 0, err
    assert (srv / "appdata/data.txt").read_text() == "kept\n"


def test_a_version_retired_before_the_rewrap_stays_locked(
    world: World, openbao: OpenBao, encfs: LoopFs, srv: Path
) -> None:
    booted(world)
    rotate(openbao, world.role)
    configure(openbao, world.role, min_decryption_version=2)
    simulate_reboot(world.sandbox, encfs, srv)
    code, _, err = world.sandbox.run("bootstrap")
    assert code == errors.DataLocked.exit_code, err
    assert "min_decryption_version was raised before this host rewrapped it" in err


def test_the_agent_unit_lets_the_others_start_exactly_on_these_outcomes() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "systemd/bootsecrets.service")
    codes = {int(c) for c in unit["Service"]["SuccessExitStatus"].split()}
    # The encrypted volumes' outcomes too (tests/test_volumes_faults.py).
    assert {cls.exit_code for cls in encdirs.DIRECTORY_FAILURES} <= codes


def test_a_refused_rewrap_is_a_warning_and_a_deleted_key_an_alert(
    world: World, openbao: OpenBao, srv: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At refresh the directory is unlocked already: a rewrap the policy refuses changes
    nothing (warning, exit 0); a Transit key found deleted alerts (52) while the data stays
    readable until the key leaves the kernel."""
    sandbox = world.sandbox
    booted(world)
    rotate(openbao, world.role)
    grant(world, world.role, operations=("datakey/plaintext", "decrypt"))  # no rewrap
    before = (sandbox.root / RECORD).read_bytes()

    code, _, err = sandbox.run("refresh")

    assert code == 0, err
    assert "could not rewrap the key of encrypted directory appdata" in err
    assert (sandbox.root / RECORD).read_bytes() == before

    grant(world, world.role)
    from support.transit import delete_key

    delete_key(openbao, world.role)
    code, _, err = sandbox.run("refresh")
    assert code == errors.TransitKeyMissing.exit_code, err
    assert len(alerts(caplog, errors.TransitKeyMissing)) == 1
    assert fscrypt.is_unlocked(srv / "appdata")
