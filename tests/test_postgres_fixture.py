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
    """The fault the agent must survive: PostgreSQL unreachable when a lease is due.
    Issuing, renewing and revoking all go through the database (CREATE ROLE / ALTER ROLE /
    DROP ROLE), so all fail, naming neither password; the lease stays on record. Beware:
    the failed renewal and revocation are HTTP 400s ("failed to renew entry", "failed to
    revoke entry"), the status a lease that is not renewable also gets, so the agent must
    not read a 400 on renew as "not renewable"."""
    with postgres_server() as down:
        engine = DatabaseEngine(openbao, down, mount=f"db-{unique}")
        engine.role("app", default_ttl="1m", max_ttl="10m")
        creds = engine.creds("app")
        down.stop()
        with pytest.raises(hvac.exceptions.InternalServerError) as issue_error:
            engine.creds("app")
        with pytest.raises(
            hvac.exceptions.InvalidRequest, match="failed to renew entry"
        ) as renew_error:
            vaultapi.renew(openbao, creds.lease_id, increment=120)
        for err in (issue_error.value, renew_error.value):
            assert not any(c in str(err) for c in CANARIES if len(c) >= 6)
        assert lease_ttl(openbao, creds.lease_id) <= 60
        with pytest.raises(hvac.exceptions.InvalidRequest, match="failed to revoke"):
            vaultapi.revoke(openbao, creds.lease_id)
        # An operator's way out when the database is gone for good (needs sudo): Vault
        # forgets the leases without reaching the database.
        vaultapi.call(openbao, "PUT", f"sys/leases/revoke-force/{engine.mount}/creds/app", {})
        with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid lease"):
            vaultapi.lookup(openbao, creds.lease_id)


AGENT_POLICY = """
path "{mount}/creds/app" {{ capabilities = ["read"] }}
path "sys/leases/renew/{mount}/creds/app/*" {{ capabilities = ["update"] }}
path "sys/leases/revoke/{mount}/creds/app/*" {{ capabilities = ["update"] }}
path "auth/token/revoke-self" {{ capabilities = ["update"] }}
"""


def agent_token(bao: OpenBao, mount: str, ttl: str = "1h") -> str:
    """A token with only the policy docs/leases.md proposes for one database role."""
    vaultapi.write(
        bao, f"sys/policies/acl/agent-{mount}", {"policy": AGENT_POLICY.format(mount=mount)}
    )
    answer = vaultapi.write(
        bao,
        "auth/token/create",
        {"policies": [f"agent-{mount}"], "ttl": ttl, "no_default_policy": True},
    )
    token = str(answer["auth"]["client_token"])
    CANARIES.add(token)
    return token


def test_a_policy_scoped_to_one_role_renews_and_revokes_only_its_leases(
    engine: DatabaseEngine, pg: Postgres, openbao: OpenBao
) -> None:
    """The URL forms sys/leases/{renew,revoke}/<lease_id> let a policy name one role's
    leases; the body form (lease_id in JSON) is then refused, and so is another role's."""
    engine.role("app")
    engine.role("other")
    token = agent_token(openbao, engine.mount)
    answer = vaultapi.call(openbao, "GET", f"{engine.mount}/creds/app", token=token)
    CANARIES.add(str(answer["data"]["password"]))
    lease_id, username = str(answer["lease_id"]), str(answer["data"]["username"])
    other = engine.creds("other")

    assert vaultapi.renew(openbao, lease_id, 300, token=token)["lease_duration"] == 300
    with pytest.raises(hvac.exceptions.Forbidden):
        vaultapi.call(openbao, "PUT", "sys/leases/renew", {"lease_id": lease_id}, token=token)
    with pytest.raises(hvac.exceptions.Forbidden):
        vaultapi.revoke(openbao, other.lease_id, token=token)
    with pytest.raises(hvac.exceptions.Forbidden):
        vaultapi.call(openbao, "GET", f"{engine.mount}/creds/other", token=token)
    assert other.username in pg.roles()

    vaultapi.revoke(openbao, lease_id, token=token)
    assert username not in pg.roles()


def test_leases_outlive_a_short_token_but_die_with_it(
    engine: DatabaseEngine, pg: Postgres, openbao: OpenBao
) -> None:
    """A lease's TTL is not cut to its token's: a 1-minute token gets a 10-minute lease.
    But revoking (or letting expire) the token revokes every lease it made: the agent's
    token must outlive its leases, and revoking it is how decommission drops them all.
    That revocation happens in the background, after revoke-self has answered."""
    engine.role("app", default_ttl="10m", max_ttl="1h")
    token = agent_token(openbao, engine.mount, ttl="1m")
    answers = [
        vaultapi.call(openbao, "GET", f"{engine.mount}/creds/app", token=token) for _ in range(2)
    ]
    for answer in answers:
        CANARIES.add(str(answer["data"]["password"]))
        assert answer["lease_duration"] == 600
    usernames = {str(a["data"]["username"]) for a in answers}
    assert usernames <= pg.roles()

    vaultapi.call(openbao, "POST", "auth/token/revoke-self", {}, token=token)

    give_up = time.monotonic() + 60
    while usernames & pg.roles() and time.monotonic() < give_up:
        time.sleep(0.1)
    assert not usernames & pg.roles()


def test_an_outage_and_its_end(openbao: OpenBao, unique: str) -> None:
    """`stop()` then `start()`: what a fault test needs. Credentials issued before the
    outage still log in after it (nothing was revoked), and issuing works again."""
    with postgres_server() as pg:
        engine = DatabaseEngine(openbao, pg, mount=f"db-{unique}")
        engine.role("app", default_ttl="5m", max_ttl="10m")
        before = engine.creds("app")
        pg.stop()
        with pytest.raises(PostgresError, match=r"Connection refused|could not connect"):
            pg.whoami(before.username, before.password)
        pg.start()
        assert pg.whoami(before.username, before.password) == before.username
        after = engine.creds("app")
        assert pg.whoami(after.username, after.password) == after.username
        vaultapi.revoke_prefix(openbao, f"{engine.mount}/creds/app")
