"""Encrypted directories end to end: a real ext4 with `encrypt` on a loop device, mounted
inside the sandbox root, against the shared OpenBao dev server with Transit, the droplet
holding exactly `update` on transit/{datakey/plaintext,decrypt,rewrap}/<key>.

The proof: bootstrap creates and unlocks the directory, a writer puts a canary file in it,
the key is removed and the raw image holds neither the canary's bytes nor its name; after a
simulated reboot (persist-token: kept token, keys gone from the kernel, store wiped) the
directory is unlocked again; decommission locks it and deletes what unlocks it; with the
Transit key deleted, a saved copy of the ciphertext decrypts no more and the directory stays
unreadable. Needs root, as CI runs.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootsecrets import errors, fscrypt
from bootsecrets.encdirs import DROPIN_NAME
from conftest import Sandbox, mode_of
from support.loopfs import LoopFs, ext4_loop
from support.openbao import OpenBao
from support.transit import (
    create_key,
    decrypt_as_root,
    delete_key,
    grant,
    mounted_in,
    record_of,
    root_call,
)
from support.world import World

CANARY_NAME = "canary-ledger-2f9c41.csv"
CANARY = b"CANARY-AT-REST-6b1f0e9a4c2d8e7f5a3b1c0d9e8f7a6b\n" * 32


@pytest.fixture
def encfs() -> Iterator[LoopFs]:
    with ext4_loop(encrypt=True) as fs:
        yield fs


@pytest.fixture
def srv(encfs: LoopFs, sandbox: Sandbox) -> Iterator[Path]:
    """The encrypted-capable ext4 at <root>/srv: the config's /srv/... paths live on it."""
    with mounted_in(encfs, sandbox.root / "srv") as target:
        yield target


def transit_world(world: World) -> str:
    """A Transit key named after the world's role (the config's default) and the grant."""
    create_key(world.bao, world.role)
    grant(world, world.role)
    return world.role


def directory_config(world: World, **changes: Any) -> dict[str, Any]:
    config = world.config(**changes)
    config.setdefault(
        "encrypted_directories",
        {"appdata": {"path": "/srv/appdata", "units": ["app.service"], "mode": "0750"}},
    )
    return config


def provision(world: World, config: dict[str, Any]) -> str:
    world.sandbox.write_config(config)
    wrapped = world.bao.wrapped_secret_id(world.role)
    world.sandbox.write_bootstrap(world.role_id, wrapped)
    return wrapped


def transit_requests(openbao: OpenBao, offset: int) -> list[str]:
    return [r["path"] for r in openbao.audited_requests(offset) if "transit/" in r["path"]]


def simulate_reboot(sandbox: Sandbox, encfs: LoopFs, srv: Path) -> None:
    """What a reboot does to the host: the store (tmpfs) and runtime drop-ins are gone, the
    kernel forgets every fscrypt key (the filesystem is unmounted and mounted again)."""
    shutil.rmtree(sandbox.store, ignore_errors=True)
    shutil.rmtree(sandbox.root / "run/systemd", ignore_errors=True)
    os.sync()
    from support.loopfs import sh

    sh(["umount", str(srv)])
    encfs.remount()
    sh(["mount", "--bind", str(encfs.mountpoint), str(srv)])


def test_bootstrap_creates_and_unlocks_then_reboot_decommission_and_shred(
    world: World, openbao: OpenBao, encfs: LoopFs, srv: Path
) -> None:
    sandbox = world.sandbox
    key = transit_world(world)
    provision(world, directory_config(world, reboot_policy="persist-token"))
    offset = openbao.audit_offset()

    code, _, err = sandbox.run("bootstrap")

    assert code == 0, err
    directory = srv / "appdata"
    policy = fscrypt.get_policy(directory)
    assert policy is not None and policy.is_ours
    assert fscrypt.is_unlocked(directory)
    assert mode_of(directory) == 0o750
    record = record_of(sandbox.root, "appdata")
    assert record["key_identifier"] == policy.key_identifier
    assert record["transit_key"] == key and record["transit_mount"] == "transit"
    assert record["key_version"] == 1 and record["ciphertext"].startswith("vault:v1:")
    assert mode_of(sandbox.root / "var/lib/bootsecrets/keys/appdata.json") == 0o600
    assert transit_requests(openbao, offset) == [f"transit/datakey/plaintext/{key}"]
    assert (sandbox.store / "unlocked/appdata").exists()
    dropin = (sandbox.root / "run/systemd/system/app.service.d" / DROPIN_NAME).read_text()
    assert "AssertPathExists=/run/bootsecrets/unlocked/appdata" in dropin
    assert not (sandbox.root / "run/systemd/system/worker.service.d" / DROPIN_NAME).exists()
    assert sorted(sandbox.started_units()) == ["app.service", "worker.service"]
    # The plaintext data key (Vault gives it to the root token too) becomes a canary: the
    # leak guard checks every output of this test for it.
    answer = decrypt_as_root(openbao, key, record["ciphertext"])
    assert answer.status_code == 200
    data_key = base64.b64decode(answer.json()["data"]["plaintext"])

    # A unit-like writer puts its data there.
    (directory / CANARY_NAME).write_bytes(CANARY)
    (directory / "nested").mkdir()
    (directory / "nested" / CANARY_NAME).write_bytes(CANARY)

    # The key removed: the raw image holds neither the content nor the name.
    assert fscrypt.lock(directory).locked
    assert CANARY_NAME not in os.listdir(directory)
    from support.loopfs import sh

    sh(["umount", str(srv)])
    encfs.unmount()
    assert encfs.count_in_image(b"CANARY-AT-REST") == 0
    assert encfs.count_in_image(CANARY_NAME.encode()) == 0
    assert encfs.count_in_image(data_key) == 0
    encfs.mount()
    sh(["mount", "--bind", str(encfs.mountpoint), str(srv)])

    # A reboot under persist-token: the kept token, the stored ciphertext, one decrypt.
    simulate_reboot(sandbox, encfs, srv)
    assert not fscrypt.is_unlocked(directory)
    offset = openbao.audit_offset()
    code, _, err = sandbox.run("bootstrap")
    assert code == 0, err
    assert transit_requests(openbao, offset) == [f"transit/decrypt/{key}"]
    assert (directory / CANARY_NAME).read_bytes() == CANARY
    assert "app.service" in sandbox.started_units()

    # Decommission: every step done, the directory locked, nothing left that unlocks it.
    saved = record_of(sandbox.root, "appdata")["ciphertext"]
    accessor = json.loads(sandbox.run("status", "--json")[1])["token"]["accessor"]
    code, out, err = sandbox.run("decommission", "--yes", "--json")
    assert code == 0, err
    steps = {s["step"]: s for s in json.loads(out)["steps"]}
    assert [s["outcome"] for s in steps.values()] == (
        ["done"] + ["nothing-to-do"] * 4 + ["done"] * 4
    ), steps  # no volumes, no leases
    assert "key removed, directory locked" in steps["lock-keys"]["detail"]
    assert not fscrypt.is_unlocked(directory)
    assert CANARY_NAME not in os.listdir(directory)
    assert not (sandbox.root / "var/lib/bootsecrets/keys/appdata.json").exists()
    assert not (sandbox.root / "var/lib/bootsecrets/token").exists()
    assert not (sandbox.store / "generations").exists()
    assert not (sandbox.root / "run/systemd/system/app.service.d" / DROPIN_NAME).exists()
    lookup = root_call(openbao, "POST", "auth/token/lookup-accessor", {"accessor": accessor})
    assert lookup.status_code == 400 and "invalid accessor" in lookup.text  # revoked
    assert (
        "stop",
        "--",
        "bootsecrets-refresh.timer",
        "bootsecrets-wakeup.timer",
        "app.service",
        "worker.service",
    ) in sandbox.runner.verbs()

    # Again: idempotent, nothing left to do, success.
    code, out, err = sandbox.run("decommission", "--yes")
    assert code == 0, err
    assert "lock-keys: done: appdata (/srv/appdata): already locked" in out

    # The operator deletes the Transit key: the saved ciphertext decrypts no more, and a
    # host given the key record back (and a fresh identity) cannot unlock the directory.
    delete_key(openbao, key)
    refused = decrypt_as_root(openbao, key, saved)
    assert refused.status_code == 400 and "encryption key not found" in refused.text
    (sandbox.root / "var/lib/bootsecrets/keys").mkdir(parents=True, exist_ok=True)
    (sandbox.root / "var/lib/bootsecrets/keys/appdata.json").write_text(
        json.dumps({**record, "ciphertext": saved})
    )
    provision(world, directory_config(world, reboot_policy="persist-token"))
    code, _, err = sandbox.run("bootstrap")
    assert code == errors.TransitKeyMissing.exit_code, err
    assert "does not exist" in err and "appdata" in err
    assert not fscrypt.is_unlocked(directory)
    assert CANARY_NAME not in os.listdir(directory)
    started = [call for call in sandbox.runner.verbs() if call[:1] == ("start",)]
    assert started[-1] == ("start", "--no-block", "--", "worker.service")


def test_status_shows_each_directory_never_a_key(
    world: World, openbao: OpenBao, encfs: LoopFs, srv: Path
) -> None:
    sandbox = world.sandbox
    key = transit_world(world)
    provision(world, directory_config(world))
    assert sandbox.run("bootstrap")[0] == 0
    record = record_of(sandbox.root, "appdata")
    assert decrypt_as_root(openbao, key, record["ciphertext"]).status_code == 200

    code, out, _ = sandbox.run("status", "--json")

    assert code == 0
    [directory] = json.loads(out)["directories"]
    assert directory == {
        "name": "appdata",
        "path": "/srv/appdata",
        "units": ["app.service"],
        "transit_key": f"transit/keys/{key}",
        "state": "unlocked",
        "key_version": 1,
        "key_identifier": record["key_identifier"],
        "created_at": record["created_at"],
        "rewrapped_at": None,
        "problem": None,
    }
    assert record["ciphertext"].split(":")[2][:40] not in out
    code, text, _ = sandbox.run("status")
    assert (
        f"encrypted directory appdata (/srv/appdata): unlocked, Transit key "
        f"transit/keys/{key} v1, units app.service"
    ) in text
    fscrypt.lock(srv / "appdata")
    assert json.loads(sandbox.run("status", "--json")[1])["directories"][0]["state"] == "locked"


def test_the_dropin_is_one_systemd_accepts(
    world: World, encfs: LoopFs, srv: Path, tmp_path: Path
) -> None:
    """systemd-analyze verify loads the unit with our drop-in and says nothing about it
    (an unknown key or a bad value would be a warning naming the drop-in)."""
    import subprocess

    transit_world(world)
    provision(world, directory_config(world))
    assert world.sandbox.run("bootstrap")[0] == 0
    unit_dir = tmp_path / "units"
    (unit_dir / "app.service.d").mkdir(parents=True)
    (unit_dir / "app.service").write_text("[Service]\nExecStart=/bin/true\n")
    dropin = world.sandbox.root / "run/systemd/system/app.service.d" / DROPIN_NAME
    (unit_dir / "app.service.d" / DROPIN_NAME).write_text(dropin.read_text())
    bad = unit_dir / "bad.service"
    (unit_dir / "bad.service.d").mkdir()
    bad.write_text("[Service]\nExecStart=/bin/true\n")
    (unit_dir / "bad.service.d" / DROPIN_NAME).write_text(
        dropin.read_text().replace("AssertPathExists=", "AssertPathExist=")
    )
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"}

    def verify(unit: Path) -> str:
        return subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(unit)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            env=env,
        ).stderr

    assert DROPIN_NAME in verify(bad)  # the check can fail
    assert DROPIN_NAME not in verify(unit_dir / "app.service")


def test_reprovision_keeps_the_directory_locked_until_a_new_wrapped_secret_id(
    world: World, openbao: OpenBao, encfs: LoopFs, srv: Path
) -> None:
    """reprovision: after a reboot nothing unlocks (no token at rest); the new wrapped
    secret-id piped into `refresh --wrapped-secret-id -` unlocks and starts everything."""
    sandbox = world.sandbox
    transit_world(world)
    provision(world, directory_config(world))
    assert sandbox.run("bootstrap")[0] == 0
    (srv / "appdata" / CANARY_NAME).write_bytes(CANARY)
    simulate_reboot(sandbox, encfs, srv)
    sandbox.runner.calls.clear()

    code, _, err = sandbox.run("bootstrap")
    assert code == errors.NotProvisioned.exit_code, err
    assert not fscrypt.is_unlocked(srv / "appdata")
    assert sandbox.started_units() == []

    offset = openbao.audit_offset()
    wrapped = openbao.wrapped_secret_id(world.role)
    code, _, err = sandbox.run("refresh", "--wrapped-secret-id", "-", stdin=wrapped)
    assert code == 0, err
    # A refresh also rewraps (every refresh does: the only way to learn the key's version).
    assert transit_requests(openbao, offset) == [
        f"transit/decrypt/{world.role}",
        f"transit/rewrap/{world.role}",
    ]
    assert (srv / "appdata" / CANARY_NAME).read_bytes() == CANARY
    assert sorted(sandbox.started_units()) == ["app.service", "worker.service"]
