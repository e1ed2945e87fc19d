"""A config pays only for the features it uses (features.py, docs/performance.md): the
modules of encrypted directories, encrypted volumes and leased secrets are not imported by a
run whose config has none of them, and are by a run whose config has them.

Judged on the console script's own process, as bootsecrets.service runs it:
PYTHONPROFILEIMPORTTIME makes the interpreter list every module it imports. And the one case
where a config without leased secrets still needs the lease code: a lease kept from an
earlier config, which must still be revoked once no unit holds it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootsecrets import errors, fscrypt
from support.leaseworld import LeaseSandbox, LeaseWorld
from support.loopfs import ext4_loop
from support.openbao import OpenBao
from support.pki import PkiEngine
from support.postgres import Postgres, postgres_server
from support.sandbox import Captured
from support.transit import create_key, mounted_in
from support.world import World, policy
from test_console_script import console, standin_systemctl

DIRECTORY_MODULES = frozenset(
    {"encdirs", "fscrypt", "fscrypt_uapi", "keyrecord", "transit", "dirconfig"}
)
VOLUME_MODULES = frozenset(
    {"volumes", "volopen", "volcheck", "volconfig", "volrecord", "blockdev", "luks", "luksformat"}
)
LEASE_MODULES = frozenset({"leasing", "leasestore", "leases", "leasespec", "wakeup"})
STATUS_MODULES = frozenset({"dirstatus", "volstatus"})
FEATURE_MODULES = DIRECTORY_MODULES | VOLUME_MODULES | LEASE_MODULES | STATUS_MODULES


def imported(result: subprocess.CompletedProcess[str]) -> frozenset[str]:
    """Our modules the process imported (`bootsecrets.<name>`, subpackages by name)."""
    names = {
        line.rsplit("|", 1)[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    return frozenset(n.split(".")[1] for n in names if n.startswith("bootsecrets."))


def command(world: World, systemctl: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = console(
        *args,
        "--root",
        str(world.sandbox.root),
        "--systemctl",
        str(systemctl),
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    world.sandbox.captured.add(f"console {args[0]} stderr", result.stderr)
    world.sandbox.captured.add(f"console {args[0]} stdout", result.stdout)
    return result


def test_a_config_without_them_imports_none(world: World) -> None:
    world.provision()
    systemctl, _ = standin_systemctl(world.sandbox.root)

    for args in (("bootstrap",), ("refresh",), ("status", "--json")):
        result = command(world, systemctl, *args)
        assert result.returncode == 0, result.stderr[-2000:]
        modules = imported(result)
        assert {"config", "context", "store"} <= modules  # the listing is read right
        assert modules & FEATURE_MODULES == set(), args
    assert world.sandbox.env_file("app.service").exists()


@pytest.fixture
def srv(world: World) -> Iterator[Path]:
    """An ext4 with `encrypt` at <root>/srv, for the encrypted directory."""
    with ext4_loop(encrypt=True) as fs, mounted_in(fs, world.sandbox.root / "srv") as target:
        yield target


def all_features(world: World) -> dict[str, Any]:
    """The world's config with an encrypted directory (app.service), an encrypted volume
    that is never attached (worker.service, held back after a 1 s wait) and a certificate
    (web.service)."""
    u = world.unique
    config = world.config(reboot_policy="persist-token")
    config["mounts"][f"pki-{u}"] = "pki"
    config["secrets"]["tls"] = {"path": f"pki-{u}/issue/web", "common_name": "app.example.test"}
    config["services"]["web.service"] = {
        "credentials": {"tls.crt": "{{ secrets.tls.certificate }}\n"}
    }
    config["encrypted_directories"] = {
        "appdata": {"path": "/srv/appdata", "units": ["app.service"]}
    }
    config["encrypted_volumes"] = {
        "data": {
            "device": "/dev/disk/by-id/scsi-0DO_Volume_data",
            "mount": "/mnt/data",
            "units": ["worker.service"],
            "format": "if-blank",
            "attach_timeout": 1,
        }
    }
    return config


def test_a_config_with_them_imports_each(world: World, openbao: OpenBao, srv: Path) -> None:
    u = world.unique
    create_key(openbao, world.role)
    PkiEngine(openbao, mount=f"pki-{u}").role("web", allowed_domains=["example.test"])
    transit = "\n".join(
        f'path "transit/{op}/{world.role}" {{ capabilities = ["update"] }}'
        for op in ("datakey/plaintext", "decrypt", "rewrap")
    )
    openbao.client.sys.create_or_update_policy(
        name=f"{world.role}-policy",
        policy=policy(*world.policy_paths)
        + "\n"
        + transit
        + f'\npath "pki-{u}/issue/web" {{ capabilities = ["update"] }}',
    )
    world.sandbox.write_config(all_features(world))
    world.sandbox.write_bootstrap(world.role_id, openbao.wrapped_secret_id(world.role))
    systemctl, calls = standin_systemctl(world.sandbox.root)

    result = command(world, systemctl, "bootstrap")

    # The volume is not there: worker.service is held back, the run says so; the rest ran.
    assert result.returncode == errors.VolumeMissing.exit_code, result.stderr[-2000:]
    assert fscrypt.is_unlocked(srv / "appdata")
    credentials = world.sandbox.store / "current/credentials/web.service/tls.crt"
    assert credentials.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert "start --no-block -- app.service web.service" in calls.read_text()
    modules = imported(result)
    assert modules >= DIRECTORY_MODULES | VOLUME_MODULES | LEASE_MODULES
    assert modules & STATUS_MODULES == set()

    result = command(world, systemctl, "status", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert imported(result) >= STATUS_MODULES | {"leases", "wakeup"}


# --- a lease kept from an earlier config ----------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    with postgres_server() as server:
        yield server


def test_a_lease_kept_from_an_earlier_config_is_still_revoked(
    openbao: OpenBao,
    pg: Postgres,
    sandbox_root: Path,
    captured: Captured,
    unique: str,
) -> None:
    """The database secret taken out of the config: the config has no leased secret any
    more, but its lease, kept in leases.json, is revoked by the next refresh (the agent
    loads the lease code for it) and the PostgreSQL role is gone."""
    world = LeaseWorld(openbao, pg, LeaseSandbox(sandbox_root, captured, openbao), unique)
    config = world.config()
    del config["secrets"]["tls"], config["services"]["web.service"]
    world.provision(config)
    assert world.sandbox.run("bootstrap")[0] == 0
    user, _ = world.app_creds()
    lease = world.lease_id()
    assert user in pg.roles()

    del config["secrets"]["db"], config["services"]["app.service"]
    del config["mounts"][f"db-{unique}"], config["mounts"][f"pki-{unique}"]
    world.sandbox.write_config(config)
    offset = openbao.audit_offset()
    code, _, err = world.sandbox.run("refresh")

    assert code == 0, err
    revoked = [
        r for r in openbao.audited_requests(offset) if r["path"] == f"sys/leases/revoke/{lease}"
    ]
    assert len(revoked) == 1  # (no lease ID in a failure's message)
    assert user not in pg.roles()
    assert world.kept() == {"current": {}, "older": {}, "revoke": []}
