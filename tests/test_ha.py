"""Vault HA and availability at boot, against real OpenBao servers.

- A 3-node OpenBao raft cluster on loopback: the active node is killed (SIGKILL) between the
  AppRole login and the reads, or is dead before the agent starts and listed first; the
  bootstrap completes from the surviving nodes with the token issued before the failover.
- Vault not there yet: a single-node raft server (its data survives a restart) is stopped
  before the agent starts and comes back after an outage (`--vault-outage SECONDS`, 10 s by
  default: long enough for the backoff to reach its 4 s cap); the agent is done within 5 s
  of it answering.
- Vault never comes: the agent stops at its boot deadline with exit 21 and one clear line;
  nothing is rendered, no unit started, the wrapped secret-id kept.
- A standby's own 307 to the active node: followed (the same request sent to that address)
  when the active node is a configured address, refused with exit 20 when it is not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from bootsecrets import errors
from conftest import Sandbox, assert_nothing_rendered, read_env_file
from support.fakehttp import FakeServer, Upstream
from support.openbao import CANARIES, free_port
from support.raft import Node, RaftCluster, raft_cluster
from support.world import World

SERVICES = ("app.service", "worker.service")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RaftCluster]:
    with raft_cluster(3) as started:
        admin = started.admin()
        admin.enable_kv("secret", 2)
        admin.enable_kv("kv1", 1)
        admin.client.sys.enable_auth_method("approle", path="approle")
        # A fresh KV v2 mount answers 400 until its upgrade ran (on standbys: replicated).
        started.wait_readable("secret/config")
        yield started


@pytest.fixture
def ha(cluster: RaftCluster, sandbox: Sandbox, unique: str) -> World:
    """A role and secrets on the cluster (written on the active node and replicated to
    every node), and a sandbox to bootstrap from them."""
    cluster.heal()  # a previous test may have left a node dead
    world = World(cluster.admin(), sandbox, unique)
    sandbox.openbao = world.bao
    cluster.wait_replicated()
    cluster.wait_readable(*world.policy_paths)
    return world


def vault_settings(addresses: list[str], deadline: float = 60) -> dict[str, Any]:
    return {"addresses": addresses, "boot_deadline": deadline, "request_timeout": 5}


def assert_rendered(world: World) -> None:
    sandbox = world.sandbox
    assert read_env_file(sandbox.env_file("app.service")) == {
        "DATABASE_URL": f"postgresql://app:{world.password}@db/app",
        "DB_PASSWORD": world.password,
        "API_KEY": world.api_key,
    }
    assert read_env_file(sandbox.env_file("worker.service")) == {
        "DB_PASSWORD": world.password,
        "LEGACY_TOKEN": world.legacy,
        "LEGACY_PORT": "5432",
    }
    assert sandbox.started_units() == list(SERVICES)
    assert not (sandbox.store / "bootstrap.yaml").exists()


def failed_over_from(caplog: pytest.LogCaptureFixture, addr: str) -> list[str]:
    """The requests the agent logged as failed at `addr` before trying the next address."""
    suffix = f" failed ({addr}: connection failed), trying next"
    return [
        r.getMessage().removesuffix(suffix)
        for r in caplog.records
        if r.name.startswith("bootsecrets") and r.getMessage().endswith(suffix)
    ]


def token_accessor(sandbox: Sandbox) -> str:
    state = json.loads((sandbox.store / "state.json").read_text())
    return str(state["token"]["accessor"])


def audit_offsets(cluster: RaftCluster) -> dict[str, int]:
    return {n.name: n.audit_path.stat().st_size for n in cluster.nodes}


def audited_paths(node: Node, since: int) -> list[str]:
    """Request paths `node`'s own file audit device logged after byte offset `since`."""
    with node.audit_path.open("rb") as f:
        f.seek(since)
        lines = f.read().splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]
    return [e["request"]["path"] for e in entries if e.get("type") == "request"]


# --- several addresses, a real raft cluster ------------------------------------------------


def test_active_node_killed_between_login_and_reads(
    ha: World, cluster: RaftCluster, caplog: pytest.LogCaptureFixture
) -> None:
    world, sandbox = ha, ha.sandbox
    active = cluster.active()
    # The agent talks to the active node first (it answers the lookup, unwrap and login).
    addresses = [active.addr, *(n.addr for n in cluster.nodes if n is not active)]
    world.provision(vault=vault_settings(addresses))
    offsets = audit_offsets(cluster)
    killed: list[Node] = []

    def kill_the_active_node() -> None:
        node = cluster.active(timeout=5)
        cluster.kill(node)
        killed.append(node)

    sandbox.after_login = kill_the_active_node

    code, _, err = sandbox.run("bootstrap", "--debug")

    assert code == 0, err
    assert killed == [active]
    assert_rendered(world)
    # Every read first hit the dead node, then went on to a surviving one.
    failed = failed_over_from(caplog, active.addr)
    assert failed, "the agent never noticed the dead node"
    assert all(what.startswith("read ") for what in failed), failed
    # What each server saw: the login on the killed node, the reads only on the survivors.
    on_killed = audited_paths(active, offsets[active.name])
    assert "auth/approle/login" in on_killed
    assert not set(world.policy_paths) & set(on_killed)
    on_survivors = [
        p for n in cluster.nodes if n is not active for p in audited_paths(n, offsets[n.name])
    ]
    assert set(world.policy_paths) <= set(on_survivors)
    # The token issued by the dead node lives on: raft replicated it to the new active node.
    new_active = cluster.active()
    assert new_active is not active
    lookup = requests.post(
        f"{new_active.addr}/v1/auth/token/lookup-accessor",
        headers=cluster.client_headers(),
        json={"accessor": token_accessor(sandbox)},
        timeout=5,
    )
    assert lookup.status_code == 200, lookup.text
    assert f"{world.role}-policy" in lookup.json()["data"]["policies"]
    assert lookup.json()["data"]["ttl"] > 3000


def test_first_address_is_a_dead_node(
    ha: World, cluster: RaftCluster, caplog: pytest.LogCaptureFixture
) -> None:
    world, sandbox = ha, ha.sandbox
    dead = cluster.active()
    cluster.kill(dead)
    survivor = cluster.wait_settled()  # the two others elected a leader and follow it
    addresses = [dead.addr, *(n.addr for n in cluster.nodes if n is not dead)]
    sandbox.write_config(world.config(vault=vault_settings(addresses)))
    sandbox.write_bootstrap(world.role_id, cluster.admin().wrapped_secret_id(world.role))

    code, _, err = sandbox.run("bootstrap", "--debug")

    assert code == 0, err
    assert_rendered(world)
    # The dead node was tried for the lookup; everything after stuck to a live node.
    assert failed_over_from(caplog, dead.addr) == ["sys/wrapping/lookup"]
    assert survivor.alive and not dead.alive


# --- Vault not there yet / never -------------------------------------------------------------


def test_vault_comes_up_after_an_outage(
    sandbox: Sandbox, unique: str, caplog: pytest.LogCaptureFixture, vault_outage: float
) -> None:
    with raft_cluster(1) as server:
        node = server.nodes[0]
        server.admin().enable_kv("secret", 2)
        server.wait_readable("secret/config")
        world = World(server.admin(), sandbox, unique)
        sandbox.openbao = world.bao
        # Minted before the outage: raft storage keeps role, secrets and wrapping token.
        world.provision(
            vault={"address": node.addr, "boot_deadline": vault_outage + 60, "request_timeout": 5}
        )
        node.stop()
        assert node.health() is None
        timeline: dict[str, float] = {}
        failures: list[BaseException] = []
        cancel = threading.Event()

        def bring_vault_back() -> None:
            try:
                if cancel.wait(vault_outage):
                    return  # the agent gave up early: the test fails on its exit code
                timeline["started"] = time.monotonic()
                node.start()
                node.unseal(server.unseal_key)
                timeline["unsealed"] = time.monotonic()
                give_up = time.monotonic() + 30
                while node.health() != 200 and time.monotonic() < give_up:
                    time.sleep(0.02)
                timeline["healthy"] = time.monotonic()
            except BaseException as err:  # reported by the test, not lost in the thread
                failures.append(err)

        # The agent runs in this (the main) thread: it installs a SIGTERM handler.
        thread = threading.Thread(target=bring_vault_back, name="vault-comes-back", daemon=True)
        started = time.monotonic()
        thread.start()
        try:
            code, _, err = sandbox.run("bootstrap")
            exited = time.monotonic()
        finally:
            cancel.set()
            thread.join(timeout=60)  # before raft_cluster() tears the server down

        assert not failures, failures
        assert not thread.is_alive()
        assert code == 0, err
        assert_rendered(world)
        assert exited - started >= vault_outage
        waited = exited - timeline["healthy"]
        logging.getLogger("test").info(
            "bootstrap done %.2fs after Vault was healthy (%.2fs after it was started)",
            waited,
            exited - timeline["started"],
        )
        assert waited < 5, f"done {waited:.1f}s after Vault was healthy"
        # The agent said what it was waiting for while Vault was away.
        assert any(
            "Vault not answering sys/wrapping/lookup" in r.getMessage() for r in caplog.records
        )


def test_vault_never_comes(sandbox: Sandbox) -> None:
    deadline = 3.0
    addresses = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
    sandbox.write_config(
        {
            "vault": {"addresses": addresses, "boot_deadline": deadline, "request_timeout": 1},
            "approle": {"role": "app"},
            "reboot_policy": "reprovision",
            "mounts": {"secret": "kv-v2"},
            "secrets": {"db": "secret/app/db"},
            "services": {
                "app.service": {"environment": {"DB_PASSWORD": "{{ secrets.db.password }}"}}
            },
        }
    )
    wrapped = "s." + secrets.token_urlsafe(24)
    CANARIES.add(wrapped)
    bootstrap = sandbox.write_bootstrap("role-" + secrets.token_hex(8), wrapped)
    kept = bootstrap.read_bytes()

    started = time.monotonic()
    code, _, err = sandbox.run("bootstrap")
    elapsed = time.monotonic() - started

    assert code == errors.VaultUnreachable.exit_code == 21
    assert deadline - 0.1 <= elapsed < deadline + 1.5, f"gave up after {elapsed:.1f}s"
    # One line says what happened (and which address answered last), one what to do.
    lines = [line for line in err.splitlines() if line.startswith("bootsecrets: error:")]
    assert len(lines) == 1, err
    assert "Vault did not answer sys/wrapping/lookup before the deadline" in lines[0]
    assert "connection failed" in lines[0]
    assert any(
        line.startswith("bootsecrets: what to do:") and "units stay down" in line
        for line in err.splitlines()
    ), err
    assert_nothing_rendered(sandbox)
    # Never sent, so kept as it was for the next boot attempt.
    assert bootstrap.read_bytes() == kept


# --- a standby's redirect (real OpenBao 307) --------------------------------------------------

NO_FORWARDING = {"X-Vault-No-Request-Forwarding": "true"}


@contextlib.contextmanager
def redirecting_standby(cluster: RaftCluster) -> Iterator[tuple[FakeServer, Upstream, Node]]:
    """A standby behind a proxy that asks it not to forward requests (the header Vault's own
    clients send for that): what it cannot serve itself it answers with OpenBao's own 307 to
    the active node's api_addr. Yields the proxy, its recording, and the active node."""
    active = cluster.wait_settled()
    standby = next(n for n in cluster.live() if n is not active)
    upstream = Upstream(standby.addr, NO_FORWARDING)
    with FakeServer(upstream) as proxy:
        yield proxy, upstream, active


def test_standby_redirect_to_a_configured_active_node_is_followed(
    ha: World, cluster: RaftCluster
) -> None:
    """The 307 points at an address of the config: the request is sent there instead (the
    standby did not act on it), unwrap and login included, and the bootstrap completes."""
    world, sandbox = ha, ha.sandbox
    with redirecting_standby(cluster) as (proxy, upstream, active):
        world.provision(vault=vault_settings([proxy.addr, active.addr]))
        cluster.wait_replicated()  # the standby knows the new wrapping token: it answers the lookup
        offsets = audit_offsets(cluster)
        code, _, err = sandbox.run("bootstrap")

    assert code == 0, err
    assert_rendered(world)
    # The standby answers the lookup itself and redirects the unwrap, which it cannot do.
    assert upstream.statuses == [("/v1/sys/wrapping/lookup", 200), ("/v1/sys/wrapping/unwrap", 307)]
    on_active = audited_paths(active, offsets[active.name])
    assert on_active.count("sys/wrapping/unwrap") == 1
    assert on_active.count("auth/approle/login") == 1


def test_standby_redirect_to_an_unlisted_active_node_is_refused(
    ha: World, cluster: RaftCluster
) -> None:
    """Only the standby is configured: its 307 points at an address the config does not
    list. Exit 20 naming both, nothing sent to the active node, and the wrapped secret-id
    was not consumed (the redirect came before any node acted on it)."""
    world, sandbox = ha, ha.sandbox
    with redirecting_standby(cluster) as (proxy, upstream, active):
        wrapped = world.provision(vault=vault_settings([proxy.addr], deadline=10))
        cluster.wait_replicated()
        offsets = audit_offsets(cluster)
        code, _, err = sandbox.run("bootstrap")

    assert code == errors.VaultError.exit_code == 20, err
    lines = [line for line in err.splitlines() if line.startswith("bootsecrets: error:")]
    assert len(lines) == 1, err
    assert f"{proxy.addr} redirected (HTTP 307) to {active.addr}" in lines[0]
    assert upstream.statuses == [("/v1/sys/wrapping/lookup", 200), ("/v1/sys/wrapping/unwrap", 307)]
    assert audited_paths(active, offsets[active.name]) == []
    assert_nothing_rendered(sandbox)
    assert cluster.admin().unwrap(wrapped)["secret_id"]
