"""Faults of leased secrets, each with its exit code (README) and alert, against the real
PostgreSQL and OpenBao: the database down when a re-issue is due, a lease Vault will not
renew, a revocation refused, a PKI role refusing the name, a bootstrap failing after it
issued, a unit failing on new credentials, credentials that expired. Nothing leaks: the
passwords, keys and lease IDs are leak-guard canaries (LeaseWorld.kept)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootsecrets import errors
from conftest import assert_nothing_rendered, read_env_file
from support import vaultapi
from support.leaseworld import Holders, LeaseSandbox, LeaseWorld
from support.openbao import OpenBao
from support.postgres import Postgres, postgres_server
from support.sandbox import Captured


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def world(
    openbao: OpenBao, pg: Postgres, sandbox_root: Path, captured: Captured, unique: str
) -> LeaseWorld:
    sandbox = LeaseSandbox(sandbox_root, captured, openbao)
    return LeaseWorld(openbao, pg, sandbox, unique, default_ttl="5m", max_ttl="20m")


@pytest.fixture
def own_world(
    openbao: OpenBao, sandbox_root: Path, captured: Captured, unique: str
) -> Iterator[LeaseWorld]:
    """With a PostgreSQL of the test's own, which it may stop."""
    with postgres_server() as server:
        sandbox = LeaseSandbox(sandbox_root, captured, openbao)
        yield LeaseWorld(openbao, server, sandbox, unique, default_ttl="5m", max_ttl="20m")


def config(world: LeaseWorld, **db_options: Any) -> dict[str, Any]:
    conf = world.config()
    conf["secrets"]["db"].update({"max_ttl": "6m", **db_options})
    return conf


def boot(world: LeaseWorld, conf: dict[str, Any] | None = None) -> None:
    world.provision(conf or config(world))
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err
    world.kept()  # its passwords, keys and lease IDs become canaries
    world.sandbox.runner.calls.clear()


def alerts(caplog: pytest.LogCaptureFixture, err: type[errors.BootsecretsError]) -> int:
    return sum(1 for r in caplog.records if getattr(r, "MESSAGE_ID", None) == err.message_id)


def restarted(world: LeaseWorld) -> list[str]:
    return [
        c[-1]
        for c in world.sandbox.runner.verbs()
        if c and c[0] in ("try-restart", "try-reload-or-restart", "restart")
    ]


def on_active(world: LeaseWorld) -> str:
    (armed,) = [c for c in world.sandbox.runner.calls if c[0] == "systemd-run"]
    return armed[3]


def test_database_unreachable_when_due_keeps_the_old_lease_and_retries(
    own_world: LeaseWorld, caplog: pytest.LogCaptureFixture
) -> None:
    world, pg = own_world, own_world.pg
    boot(world)
    user, password = world.app_creds()
    lease_id = world.lease_id()
    world.sandbox.offset = 245  # the re-issue is due (2/3 of 6 min)
    pg.stop()

    code, _, err = world.sandbox.run("refresh")

    assert code == errors.LeaseIssueFailed.exit_code == 60
    assert f"leased secret db (db-{world.unique}/creds/app): could not be issued" in err
    assert alerts(caplog, errors.LeaseIssueFailed) == 1
    assert restarted(world) == []
    assert world.app_creds() == (user, password) and world.lease_id() == lease_id
    assert on_active(world) == "--on-active=60s"  # retried at the floor
    db = world.lease_status("db")
    assert db["action"] == "reissue" and db["version"] == 1
    assert world.status()["last_run"]["exit_code"] == 60

    pg.start()  # the outage ends: the old credentials were never revoked
    assert pg.whoami(user, password) == user
    world.sandbox.runner.calls.clear()
    code, _, err = world.sandbox.run("refresh")
    assert code == 0, err
    assert restarted(world) == ["app.service"]
    new_user, new_password = world.app_creds()
    assert pg.whoami(new_user, new_password) == new_user
    assert user not in pg.roles()


def test_a_lease_vault_will_not_renew_is_reissued(
    world: LeaseWorld, openbao: OpenBao, pg: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    """Revoked outside the agent (an operator answering a leak): the renewal is refused
    (400 "lease not found"), new credentials are issued and the unit restarted."""
    boot(world, config(world, max_ttl="20m"))
    user, _ = world.app_creds()
    vaultapi.revoke(openbao, world.lease_id())
    world.sandbox.offset = 210  # renewal due

    code, _, err = world.sandbox.run("refresh")

    assert code == errors.LeaseRenewalRefused.exit_code == 64
    assert "renewal refused" in err and "HTTP 400" in err and "lease not found" in err
    assert alerts(caplog, errors.LeaseRenewalRefused) == 1
    assert restarted(world) == ["app.service"]
    new_user, new_password = world.app_creds()
    assert new_user != user and pg.whoami(new_user, new_password) == new_user
    assert world.lease_status("db")["version"] == 2


def test_a_refused_revocation_is_kept_and_retried(
    world: LeaseWorld, openbao: OpenBao, pg: Postgres
) -> None:
    boot(world)
    old_user, _ = world.app_creds()
    world.set_policy(revoke=False)
    world.sandbox.offset = 245

    code, _, err = world.sandbox.run("refresh")

    assert code == errors.LeaseRevokeFailed.exit_code == 62
    assert "an old lease was not revoked" in err and "HTTP 403" in err
    assert restarted(world) == ["app.service"]
    assert old_user in pg.roles()  # still valid; nobody uses it
    new_user, new_password = world.app_creds()
    assert pg.whoami(new_user, new_password) == new_user
    (pending,) = world.kept()["revoke"]
    db = world.lease_status("db")
    assert db["revoke_pending"] == 1 and db["version"] == 2
    assert on_active(world) == "--on-active=60s"

    world.set_policy()
    world.sandbox.runner.calls.clear()
    offset = openbao.audit_offset()
    code, _, err = world.sandbox.run("refresh")
    assert code == 0, err
    assert [
        r["path"] for r in openbao.audited_requests(offset) if r["path"].startswith("sys/leases/")
    ] == [f"sys/leases/revoke/{pending['lease_id']}"]
    assert old_user not in pg.roles()
    assert world.kept()["revoke"] == [] and world.lease_status("db")["revoke_pending"] == 0
    assert restarted(world) == []


def test_a_pki_role_refusing_the_name_fails_the_bootstrap_and_revokes_what_it_issued(
    world: LeaseWorld, openbao: OpenBao, pg: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    conf = config(world)
    conf["secrets"]["tls"]["common_name"] = "app.elsewhere.test"
    world.provision(conf)
    roles = pg.roles()
    offset = openbao.audit_offset()

    code, _, err = world.sandbox.run("bootstrap")

    assert code == errors.CertificateRefused.exit_code == 61
    assert f"leased secret tls (pki-{world.unique}/issue/web): refused by the role" in err
    assert "app.elsewhere.test" in err
    assert alerts(caplog, errors.CertificateRefused) == 1
    assert_nothing_rendered(world.sandbox)
    paths = [r["path"] for r in openbao.audited_requests(offset)]
    assert f"db-{world.unique}/creds/app" in paths  # issued (before the certificate)...
    assert any(p.startswith(f"sys/leases/revoke/db-{world.unique}/creds/app/") for p in paths)
    assert pg.roles() == roles  # ...and revoked: no role left behind
    assert world.kept()["current"] == {} and world.kept()["revoke"] == []


def test_a_bootstrap_failing_after_issuing_revokes_what_it_issued(
    world: LeaseWorld, openbao: OpenBao, pg: Postgres
) -> None:
    conf = config(world)
    conf["services"]["api.service"]["environment"]["API_KEY"] = "{{ secrets.api.nokey }}"
    world.provision(conf)
    roles = pg.roles()
    code, _, err = world.sandbox.run("bootstrap")
    assert code == errors.SecretMissing.exit_code == 27, err
    assert_nothing_rendered(world.sandbox)
    assert pg.roles() == roles
    assert world.kept()["current"] == {}


def test_a_unit_failing_on_new_credentials_is_rolled_back_with_every_user(
    openbao: OpenBao,
    pg: Postgres,
    sandbox_root: Path,
    captured: Captured,
    unique: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A 30 min term: the re-issue is due at 2/3 of it (1200 s), long before it ends.
    world = LeaseWorld(
        openbao,
        pg,
        LeaseSandbox(sandbox_root, captured, openbao),
        unique,
        default_ttl="30m",
        max_ttl="1h",
    )
    conf = world.config()
    conf["secrets"]["db"]["max_ttl"] = "30m"
    conf["services"]["worker.service"] = {"environment": {"DB_USER": "{{ secrets.db.username }}"}}
    boot(world, conf)
    old = world.app_creds()
    holders = Holders(world)
    holders.held = old
    world.sandbox.runner.unit_states["app.service"] = "failed"
    world.sandbox.offset = 1205

    code, _, err = world.sandbox.run("refresh")

    assert code == errors.UnitFailed.exit_code == 31
    assert "also for worker.service" in err
    assert alerts(caplog, errors.UnitFailed) == 1
    # Both users back on the old credentials (still valid); the new lease revoked.
    assert world.app_creds() == old and pg.whoami(*old) == old[0]
    worker = read_env_file(world.sandbox.env_file("worker.service"))
    assert worker["DB_USER"] == old[0]
    assert restarted(world) == ["app.service", "worker.service", "app.service", "worker.service"]
    kept = world.kept()
    assert kept["current"]["db"]["version"] == 1
    assert kept["older"] == {} and kept["revoke"] == []
    (new_user, _), back = holders.history  # restarted on the new ones, then rolled back
    assert new_user != old[0] and back == old
    assert new_user not in pg.roles()  # the new lease was revoked
    holders.check()
    assert holders.violations == []
    report = world.status()
    assert report["last_run"]["outcome"] == "rolled-back"
    db = world.lease_status("db")
    assert db["version"] == 1 and db["action"] == "reissue"  # tried again on schedule...
    # ...halfway to the old lease's end less the margin, not every `floor` seconds (each try
    # restarts the unit): (1800 - 60 - 1205) / 2 s from now.
    assert 262 <= int(on_active(world).removeprefix("--on-active=").removesuffix("s")) <= 270


def test_no_wakeup_after_an_outcome_that_needs_an_operator(
    world: LeaseWorld, openbao: OpenBao
) -> None:
    boot(world)
    accessor = world.state()["token"]["accessor"]
    openbao.client.auth.token.revoke_accessor(accessor)
    world.sandbox.offset = 245
    code, _, _ = world.sandbox.run("refresh")
    assert code == errors.TokenInvalid.exit_code
    assert [c for c in world.sandbox.runner.calls if c[0] == "systemd-run"] == []


def test_credentials_that_expired_are_reissued_and_alerted(
    world: LeaseWorld, pg: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    boot(world)
    world.sandbox.offset = 400  # the 5 min term ended; nobody renewed it

    code, _, err = world.sandbox.run("refresh")

    assert code == errors.LeaseExpired.exit_code == 63
    assert "had expired before it was replaced; re-issued" in err
    assert alerts(caplog, errors.LeaseExpired) == 1
    user, password = world.app_creds()
    assert pg.whoami(user, password) == user
    assert restarted(world) == ["app.service"]


def test_revoke_leases_revokes_every_lease_and_stops_the_wakeup(
    world: LeaseWorld, openbao: OpenBao, pg: Postgres
) -> None:
    boot(world)
    user, _ = world.app_creds()
    code, _, err = world.sandbox.run("revoke-leases")
    assert code == 0, err
    assert user not in pg.roles()
    kept = world.kept()
    assert "db" not in kept["current"] and "tls" in kept["current"]  # a certificate stays
    assert ("stop", "--", "bootsecrets-wakeup.timer") in world.sandbox.runner.verbs()
    assert [e["name"] for e in world.status()["leases"]] == ["tls"]
