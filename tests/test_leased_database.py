"""Leased database credentials end to end: a real PostgreSQL, OpenBao's database engine, the
real CLI in a tmpfs sandbox with a recording systemctl. PostgreSQL judges every login and
every revocation (pg_roles); OpenBao's audit log counts the lease calls. The agent's clock
is moved forward (`LeaseSandbox.offset`) to reach renewal and re-issue points; Vault keeps
real time."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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


def booted(world: LeaseWorld, **secret_options: Any) -> LeaseWorld:
    config = world.config()
    config["secrets"]["db"].update(secret_options)
    world.provision(config)
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err
    world.sandbox.runner.calls.clear()
    return world


def lease_calls(bao: OpenBao, offset: int, unique: str) -> list[str]:
    """Paths of the requests after `offset` that touch a lease or issue one."""
    return [
        r["path"]
        for r in bao.audited_requests(offset)
        if r["path"].startswith(("sys/leases/", f"db-{unique}/creds", f"pki-{unique}/issue"))
    ]


def restarts(world: LeaseWorld) -> list[tuple[str, ...]]:
    return [
        c
        for c in world.sandbox.runner.verbs()
        if c and c[0] in ("restart", "try-restart", "try-reload-or-restart", "start")
    ]


def wakeups(world: LeaseWorld) -> list[tuple[str, ...]]:
    return [c for c in world.sandbox.runner.calls if c[0] == "systemd-run"]


def test_bootstrap_renders_credentials_that_log_in(world: LeaseWorld, pg: Postgres) -> None:
    booted(world)
    user, password = world.app_creds()
    assert pg.whoami(user, password) == user
    assert user in pg.roles()
    kept_file = world.sandbox.store / "leases.json"
    assert stat.S_IMODE(os.lstat(kept_file).st_mode) == 0o600
    lease_id = world.lease_id()
    assert lease_id.startswith(f"db-{world.unique}/creds/app/")
    # Neither the password nor the lease ID reach state.json or status (the leak guard
    # checks everything outside the store; these two are inside it).
    report = world.status()
    for text in ((world.sandbox.store / "state.json").read_text(), json.dumps(report)):
        assert password not in text and lease_id not in text
    db = next(e for e in report["leases"] if e["name"] == "db")
    assert db["kind"] == "lease" and db["lease"] is True and db["version"] == 1
    assert db["path"] == f"db-{world.unique}/creds/app"
    assert db["action"] == "none" and db["next_action"] == "renew"
    # Renewal at 2/3 of the 300 s term.
    assert db["next_action_at"] == pytest.approx(db["issued_at"] + 200, abs=1)
    assert db["expires_at"] == pytest.approx(db["issued_at"] + 300, abs=1)


def test_the_wakeup_is_armed_for_the_earliest_deadline(world: LeaseWorld) -> None:
    world.provision()
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err
    calls = world.sandbox.runner.calls
    stop = calls.index(("systemctl", "stop", "--", "bootsecrets-wakeup.timer"))
    (armed,) = wakeups(world)
    assert calls.index(armed) == stop + 1
    assert armed[1:] == (
        "--unit=bootsecrets-wakeup",
        "--description=bootsecrets: next lease deadline",
        armed[3],
        "--timer-property=AccuracySec=1s",
        "--timer-property=RemainAfterElapse=no",
        "--property=Type=oneshot",
        "--collect",
        "--quiet",
        "/usr/bin/systemctl",
        "start",
        "--no-block",
        "bootsecrets-refresh.service",
    )
    assert 195 <= int(armed[3].removeprefix("--on-active=").removesuffix("s")) <= 200
    report = world.status()
    assert report["wakeup_at"] == pytest.approx(world.lease_status("db")["next_action_at"], abs=2)


def test_a_refresh_with_nothing_due_makes_no_lease_call(
    world: LeaseWorld, openbao: OpenBao
) -> None:
    booted(world)
    before = world.kept()
    offset = openbao.audit_offset()
    world.sandbox.offset = 170
    code, _, err = world.sandbox.run("refresh")
    assert code == 0, err
    assert lease_calls(openbao, offset, world.unique) == []
    assert restarts(world) == []
    assert world.kept() == before
    # The floor: a renewal due in ~30 s (at T+200) wakes the agent no sooner than 60 s on.
    assert wakeups(world)[0][3] == "--on-active=60s"


def test_renewal_moves_the_lease_and_restarts_nothing(
    world: LeaseWorld, openbao: OpenBao, pg: Postgres
) -> None:
    booted(world)
    user, password = world.app_creds()
    valid_before = int(pg.valid_until(user))
    offset = openbao.audit_offset()
    time.sleep(2)  # Vault renews from its own (real) clock: let it move past a second
    world.sandbox.offset = 210

    code, _, err = world.sandbox.run("refresh")

    assert code == 0, err
    assert lease_calls(openbao, offset, world.unique) == [f"sys/leases/renew/{world.lease_id()}"]
    assert restarts(world) == []
    assert world.app_creds() == (user, password)
    assert int(pg.valid_until(user)) > valid_before  # PostgreSQL's VALID UNTIL moved
    db = world.lease_status("db")
    assert db["renewed_at"] == pytest.approx(world.sandbox.now(), abs=5)
    assert db["version"] == 1


def test_reissue_restarts_only_its_units_and_revokes_the_old_lease_after(
    world: LeaseWorld, openbao: OpenBao, pg: Postgres
) -> None:
    # The config tells the agent max_ttl is 6 min: re-issue at 2/3 of it (240 s), before
    # the 300 s term ends (the role's max_ttl is longer: the agent acts on what it knows).
    booted(world, max_ttl="6m")
    old_user, _ = world.app_creds()
    old_lease = world.lease_id()
    holders = Holders(world)
    holders.held = world.app_creds()  # what bootstrap started app.service with
    world.sandbox.offset = 170
    offset = openbao.audit_offset()
    assert world.sandbox.run("refresh")[0] == 0  # neither renewal (200) nor re-issue due
    assert lease_calls(openbao, offset, world.unique) == [] and restarts(world) == []
    world.sandbox.offset = 245
    offset = openbao.audit_offset()

    code, _, err = world.sandbox.run("refresh")

    assert code == 0, err
    assert restarts(world) == [("try-restart", "--", "app.service")]
    new_user, new_password = world.app_creds()
    assert new_user != old_user
    assert pg.whoami(new_user, new_password) == new_user
    assert old_user not in pg.roles()
    holders.check()
    assert holders.violations == []
    paths = lease_calls(openbao, offset, world.unique)
    assert paths == [f"db-{world.unique}/creds/app", f"sys/leases/revoke/{old_lease}"]
    # The revocation reached Vault only after app.service was seen active again.
    seen_active = holders.offset_at("is-active", "app.service")
    assert f"sys/leases/revoke/{old_lease}" in [
        r["path"] for r in openbao.audited_requests(seen_active)
    ]
    kept = world.kept()
    assert kept["older"] == {} and kept["revoke"] == []
    db = world.lease_status("db")
    assert db["version"] == 2 and db["older"] == 0 and db["revoke_pending"] == 0
    app = next(u for u in world.status()["units"] if u["unit"] == "app.service")
    assert [s["version"] for s in app["secrets"] if s["name"] == "db"] == [2]


def test_status_text_shows_leases_without_values(world: LeaseWorld) -> None:
    booted(world)
    code, out, err = world.sandbox.run("status")
    assert code == 0, err
    assert f"lease db (db-{world.unique}/creds/app) v1: expires " in out
    assert "next renew at" in out
    assert f"certificate tls (pki-{world.unique}/issue/web) v1" in out
    assert "next reissue at" in out
    assert "wake-up:" in out
    assert world.lease_id() not in out


def test_a_renewal_cut_at_max_ttl_is_followed_by_a_reissue_in_the_same_run(
    openbao: OpenBao, pg: Postgres, sandbox_root: Path, captured: Captured, unique: str
) -> None:
    """The max_ttl unknown to the agent: it renews until Vault cuts a renewal short, which
    reveals the hard end; planned again at once, the lease is re-issued in the same run.
    Real time here (Vault cuts by its own clock): a 20 s term, a 30 s max_ttl."""
    world = LeaseWorld(
        openbao,
        pg,
        LeaseSandbox(sandbox_root, captured, openbao),
        unique,
        default_ttl="20s",
        max_ttl="30s",
    )
    config = world.config(leases={"floor": 1, "margin": 2})
    del config["secrets"]["tls"]
    del config["services"]["web.service"]
    world.provision(config)
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err
    first, _ = world.app_creds()
    lease_id = world.lease_id()
    world.sandbox.runner.calls.clear()
    issued_at = world.lease_status("db")["issued_at"]
    time.sleep(max(0.0, issued_at + 16 - time.time()))  # renewal due; Vault caps at +30 s
    offset = openbao.audit_offset()

    code, _, err = world.sandbox.run("refresh")

    assert code == 0, err
    assert lease_calls(openbao, offset, world.unique) == [
        f"sys/leases/renew/{lease_id}",
        f"db-{world.unique}/creds/app",
        f"sys/leases/revoke/{lease_id}",
    ]
    assert restarts(world) == [("try-restart", "--", "app.service")]
    user, password = world.app_creds()
    assert user != first and pg.whoami(user, password) == user
    assert first not in pg.roles()


def test_decommission_revokes_the_leases_before_the_token(world: LeaseWorld, pg: Postgres) -> None:
    """Decommission drops the database role synchronously (its own step), then revokes the
    token; the timers are stopped with the units so nothing re-issues behind it."""
    booted(world)
    user, _ = world.app_creds()
    assert user in pg.roles()
    code, out, err = world.sandbox.run("decommission", "--yes", "--json")
    assert code == 0, err
    steps = {s["step"]: s for s in json.loads(out)["steps"]}
    assert steps["revoke-leases"]["outcome"] == "done", steps
    assert "revoked 1 lease(s)" in steps["revoke-leases"]["detail"]
    assert list(steps)[:2] == ["stop-units", "revoke-leases"]
    assert user not in pg.roles()
    stops = [c for c in world.sandbox.runner.verbs() if c[:1] == ("stop",)]
    assert stops and {"bootsecrets-refresh.timer", "bootsecrets-wakeup.timer"} <= set(stops[0])
    assert not (world.sandbox.store / "leases.json").exists()
