"""The real PostgreSQL fixture and OpenBao's database engine against it: what the leased
database credentials of issue 15 will be built and tested on.

Every claim here is judged by PostgreSQL itself (a login, pg_roles) or by OpenBao's lease
store (sys/leases/lookup), never by the helpers' own bookkeeping.
"""

from __future__ import annotations

import os
import pwd
import secrets
import time
from collections.abc import Iterator

import hvac.exceptions
import pytest

from support import vaultapi
from support.openbao import CANARIES, OpenBao
from support.postgres import DatabaseEngine, Postgres, PostgresError, postgres_server


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def engine(openbao: OpenBao, pg: Postgres, unique: str) -> DatabaseEngine:
    """A database mount of this test's own on the shared OpenBao server."""
    return DatabaseEngine(openbao, pg, mount=f"db-{unique}")


def lease_ttl(bao: OpenBao, lease_id: str) -> int:
    return int(vaultapi.lookup(bao, lease_id)["data"]["ttl"])


def test_server_runs_as_postgres_on_loopback_with_passwords(pg: Postgres) -> None:
    pid = pg.postmaster_pid()
    assert pid is not None
    owner = os.stat(f"/proc/{pid}").st_uid
    if os.geteuid() == 0:
        assert owner == pwd.getpwnam("postgres").pw_uid
    assert pg.psql("SHOW listen_addresses") == "127.0.0.1"
    assert pg.psql("SHOW port") == str(pg.port)
    assert pg.whoami("postgres", pg.password) == "postgres"
    with pytest.raises(PostgresError, match="password authentication failed"):
        pg.whoami("postgres", "wrong-" + secrets.token_hex(4))


def test_fixture_leaves_no_process_and_no_files() -> None:
    with postgres_server() as server:
        pid = server.postmaster_pid()
        workdir = server.workdir
        assert pid is not None
        assert server.psql("SELECT 1") == "1"
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")
    assert not workdir.exists()


def test_creds_log_in_and_exist_in_pg_roles(engine: DatabaseEngine, pg: Postgres) -> None:
    engine.role("app", default_ttl="2m", max_ttl="10m")
    before = time.time()
    creds = engine.creds("app")
    assert creds.lease_id.startswith(f"{engine.mount}/creds/app/")
    assert creds.renewable
    assert creds.lease_duration == 120
    assert creds.username in pg.roles()
    assert pg.whoami(creds.username, creds.password) == creds.username
    # {{expiration}} in the creation statement: PostgreSQL itself ends the role's validity.
    valid_until = int(pg.valid_until(creds.username))
    assert before + 100 <= valid_until <= time.time() + 140


def test_renew_extends_the_lease_and_the_role_validity(
    engine: DatabaseEngine, pg: Postgres, openbao: OpenBao
) -> None:
    engine.role("app", default_ttl="1m", max_ttl="10m")
    creds = engine.creds("app")
    valid_before = int(pg.valid_until(creds.username))
    assert lease_ttl(openbao, creds.lease_id) <= 60

    renewed = vaultapi.renew(openbao, creds.lease_id, increment=300)
    assert renewed["lease_id"] == creds.lease_id
    assert renewed["renewable"] is True
    assert renewed["lease_duration"] == 300
    assert 250 < lease_ttl(openbao, creds.lease_id) <= 300
    # The plugin's default renew statement moved VALID UNTIL with the lease.
    assert int(pg.valid_until(creds.username)) >= valid_before + 200
    assert pg.whoami(creds.username, creds.password) == creds.username


def test_renewal_is_capped_at_max_ttl(engine: DatabaseEngine, openbao: OpenBao) -> None:
    """What the planner infers a lease's hard end from: a renewal asking past max_ttl gets
    less than it asked for (and a warning), not an error."""
    engine.role("app", default_ttl="1m", max_ttl="3m")
    creds = engine.creds("app")
    renewed = vaultapi.renew(openbao, creds.lease_id, increment=3600)
    assert 150 < renewed["lease_duration"] <= 180
    assert renewed["renewable"] is True
    assert any("max_ttl" in w or "capped" in w for w in renewed["warnings"] or [])


def test_revoke_drops_the_role(engine: DatabaseEngine, pg: Postgres, openbao: OpenBao) -> None:
    engine.role("app")
    old, new = engine.creds("app"), engine.creds("app")
    assert old.username != new.username
    assert {old.username, new.username} <= pg.roles()

    vaultapi.revoke(openbao, old.lease_id)  # sys/leases/revoke: synchronous

    assert old.username not in pg.roles()
    # PostgreSQL does not tell a dropped role from a wrong password.
    with pytest.raises(PostgresError, match="password authentication failed"):
        pg.whoami(old.username, old.password)
    assert pg.whoami(new.username, new.password) == new.username  # the other lease lives on
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid lease"):
        vaultapi.lookup(openbao, old.lease_id)


def test_revoke_prefix_revokes_every_lease_of_a_role(
    engine: DatabaseEngine, pg: Postgres, openbao: OpenBao
) -> None:
    """What decommission can use: sys/leases/revoke-prefix/<mount>/creds/<role>."""
    engine.role("app")
    issued = [engine.creds("app") for _ in range(2)]
    vaultapi.revoke_prefix(openbao, f"{engine.mount}/creds/app")
    assert not {c.username for c in issued} & pg.roles()


def test_database_down_fails_issue_and_renewal(openbao: OpenBao, unique: str) -> None:
    """The fault the agent must survive: PostgreSQL unreachable when a lease is due. Both
    issuing and renewing go through the database (CREATE ROLE / ALTER ROLE), so both fail,
    naming neither password; the lease itself stays on record. Beware: the failed renewal is
    an HTTP 400 ("failed to renew entry"), the status a lease that is not renewable also
    gets, so the agent must not read a 400 on renew as "not renewable"."""
    with postgres_server() as down:
        engine = DatabaseEngine(openbao, down, mount=f"db-{unique}")
        engine.role("app", default_ttl="1m", max_ttl="10m")
        creds = engine.creds("app")
        down.stop()
        with pytest.raises(hvac.exceptions.InternalServerError) as issue_error:
            engine.creds("app")
        with pytest.raises(hvac.exceptions.InvalidRequest,
                           match="failed to renew entry") as renew_error:
            vaultapi.renew(openbao, creds.lease_id, increment=120)
        for err in (issue_error.value, renew_error.value):
            assert not any(c in str(err) for c in CANARIES if len(c) >= 6)
        assert lease_ttl(openbao, creds.lease_id) <= 60
