"""A real OpenBao cluster with integrated storage (raft) on loopback, for failover tests.

Each node is `bao server -config=nodeN.hcl` with its own data directory, API and cluster
port on 127.0.0.1 and TLS off on the API listener (the cluster port always speaks mTLS
between nodes). Node 1 is initialised with one key share (`bao operator init`) and unsealed;
the others join it (`sys/storage/raft/join`, what `bao operator raft join` calls; a config
`retry_join` only retries every 2 s) and are unsealed. `start()` returns once there is an
active node and every node is a raft voter (autopilot promotes joined nodes after its
stabilization time, set to 1 s). `kill()` (SIGKILL) and `restart()` (start + unseal)
produce failovers on demand; `heal()` brings the cluster back to full strength.

Set-up (AppRole, KV, wrapped secret-ids) goes through `admin()`, an `openbao.OpenBao` bound
to the current active node, so secret values and wrapped tokens become leak-guard
`CANARIES` exactly as with the dev server.

What OpenBao 2.x does, as seen from a client (observed with this helper):

- Standbys serve reads from their own replica ("read-enabled standby", eventually
  consistent: a read right after a write may return the previous version) and forward
  writes to the active node. A fresh KV v2 mount answers 400 ("Waiting for the primary to
  upgrade ...") on standbys for a moment. `wait_replicated()`/`wait_readable()` close
  these windows after a test's set-up.
- After the active node is SIGKILLed: a standby answers reads it can serve locally with 200
  throughout; what it must forward (or a token it has not applied yet) gets a 307 redirect
  to the dead leader's api_addr (a client following it sees "connection refused"), later a
  500 "local node not active but active cluster node not found"; the node taking over may
  hold a request for a couple of seconds. A new leader answers after ~1.5-5 s
  (`performance_multiplier = 1`). No 503 from unsealed nodes; 503 means sealed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hvac
import requests

from support.openbao import OpenBao, bao_binary, free_port

#: Upper bound for any single wait on the cluster (start, election, catch-up).
WAIT = 60.0


class ClusterError(RuntimeError):
    """The cluster did not reach the state a test needs; the message holds the node logs."""


def _wait(
    what: str, check: Callable[[], bool], timeout: float, on_timeout: Callable[[], str] = lambda: ""
) -> None:
    give_up = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > give_up:
            raise ClusterError(f"{what}: not reached in {timeout:.0f}s\n{on_timeout()}")
        time.sleep(0.05)


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class Node:
    """One `bao server` of the cluster. `index` is 1-based; the name is `node<index>`."""

    def __init__(self, index: int, api_port: int, cluster_port: int, workdir: Path) -> None:
        self.index = index
        self.api_port = api_port
        self.cluster_port = cluster_port
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.hcl"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "bao.log"

    @property
    def audit_path(self) -> Path:
        return self.workdir / "audit.log"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __repr__(self) -> str:
        return f"<{self.name} {self.addr} {'up' if self.alive else 'down'}>"

    def write_config(self, cluster_name: str) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f'cluster_name = "{cluster_name}"\n'
            "disable_mlock = true\n"
            "ui = false\n"
            'log_level = "info"\n'
            f'api_addr = "{self.addr}"\n'
            f'cluster_addr = "https://127.0.0.1:{self.cluster_port}"\n'
            'listener "tcp" {\n'
            f'  address = "127.0.0.1:{self.api_port}"\n'
            f'  cluster_address = "127.0.0.1:{self.cluster_port}"\n'
            "  tls_disable = true\n"
            "}\n"
            'storage "raft" {\n'
            f'  path = "{self.data_dir}"\n'
            f'  node_id = "{self.name}"\n'
            # Production timing (the default is the slower 5): an election takes ~2 s.
            "  performance_multiplier = 1\n"
            # Autopilot promotes joined non-voters once stable; check often (default 10 s).
            '  autopilot_reconcile_interval = "1s"\n'
            '  autopilot_update_interval = "500ms"\n'
            "}\n"
            # The server's own record of every request it handled (OpenBao only takes audit
            # devices from its config file). The audit table is replicated and must match on
            # every node, so the path is relative: each node's working directory.
            'audit "file" "file" {\n'
            f'  options {{\n    file_path = "{self.audit_path.name}"\n  }}\n'
            "}\n"
        )

    def start(self) -> None:
        if self.alive:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [bao_binary(), "server", f"-config={self.config_path}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL: no graceful step-down, no leadership transfer."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def health(self) -> int | None:
        """`sys/health` status: 200 active, 429 standby, 503 sealed, 501 not initialised;
        None when nothing answers."""
        if not self.alive:
            return None
        try:
            return requests.get(f"{self.addr}/v1/sys/health", timeout=2).status_code
        except requests.RequestException:
            return None

    def leader(self) -> dict[str, Any] | None:
        """This node's `sys/leader` answer (is_self, leader_address, raft indexes)."""
        if not self.alive:
            return None
        try:
            response = requests.get(f"{self.addr}/v1/sys/leader", timeout=2)
        except requests.RequestException:
            return None
        if response.status_code != 200:
            return None
        data: dict[str, Any] = response.json()
        return data

    def _check_alive(self) -> None:
        if not self.alive:
            raise ClusterError(f"{self.name} exited:\n{self.log_tail()}")

    def try_unseal(self, key: str) -> bool:
        """Submit the unseal key once; True when the node is unsealed."""
        self._check_alive()
        with contextlib.suppress(requests.RequestException):
            response = requests.post(f"{self.addr}/v1/sys/unseal", json={"key": key}, timeout=5)
            return response.status_code == 200 and not response.json()["sealed"]
        return False

    def unseal(self, key: str) -> None:
        _wait(f"unseal {self.name}", lambda: self.try_unseal(key), WAIT, self.log_tail)

    def join(self, leader: Node) -> None:
        """Join the raft cluster led by `leader` (this node is new: sealed, no data)."""

        def joined() -> bool:
            self._check_alive()
            with contextlib.suppress(requests.RequestException):
                response = requests.post(
                    f"{self.addr}/v1/sys/storage/raft/join",
                    json={"leader_api_addr": leader.addr},
                    timeout=10,
                )
                return response.status_code == 200 and bool(response.json().get("joined"))
            return False

        _wait(f"{self.name} joining {leader.name}", joined, WAIT, self.log_tail)

    def log_tail(self, size: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- {self.name} log ---\n{text[-size:]}"


class RaftCluster:
    """`size` OpenBao nodes on loopback sharing integrated storage."""

    def __init__(self, size: int = 3, cluster_name: str = "bootsecrets-test") -> None:
        # Raft fsyncs every commit: on tmpfs a slow CI disk cannot stall heartbeats into a
        # spurious election.
        shm = Path("/dev/shm")
        self.workdir = Path(
            tempfile.mkdtemp(prefix="openbao-raft-", dir=shm if shm.is_dir() else None)
        )
        self.cluster_name = cluster_name
        ports = _free_ports(2 * size)
        self.nodes = [
            Node(i + 1, ports[2 * i], ports[2 * i + 1], self.workdir / f"node{i + 1}")
            for i in range(size)
        ]
        for node in self.nodes:
            node.workdir.mkdir(parents=True)
            node.write_config(cluster_name)
        self.root_token = ""
        self.unseal_key = ""

    # --- addresses and state -------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        return [node.addr for node in self.nodes]

    def node(self, addr: str) -> Node:
        return next(n for n in self.nodes if n.addr == addr.rstrip("/"))

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def dead(self) -> list[Node]:
        return [n for n in self.nodes if not n.alive]

    def logs(self) -> str:
        return "\n".join(n.log_tail() for n in self.nodes)

    def find_active(self) -> Node | None:
        """The node that says it is active (sys/health 200 and sys/leader is_self), if any."""
        for node in self.live():
            if node.health() == 200:
                leader = node.leader()
                if leader and leader.get("is_self"):
                    return node
        return None

    def active(self, timeout: float = WAIT) -> Node:
        """The active node, waiting (bounded) for an election to finish."""
        found: list[Node] = []

        def elected() -> bool:
            node = self.find_active()
            if node is not None:
                found.append(node)
            return node is not None

        _wait("an active node", elected, timeout, self.logs)
        return found[-1]

    def wait_settled(self, timeout: float = WAIT) -> Node:
        """An active node that every live node knows as the leader: requests a standby
        forwards (unwrap, login) reach it. Right after an election a standby may still
        answer 500 "active cluster node not found" or redirect to the old leader."""
        active = self.active(timeout)

        def known() -> bool:
            return all((n.leader() or {}).get("leader_address") == active.addr for n in self.live())

        _wait(f"every node following {active.name}", known, timeout, self.logs)
        return active

    def standbys(self) -> list[Node]:
        active = self.active()
        return [n for n in self.live() if n is not active]

    def client_headers(self) -> dict[str, str]:
        return {"X-Vault-Token": self.root_token}

    def raft_servers(self) -> list[dict[str, Any]]:
        """The raft configuration as the active node sees it (node_id, voter, leader)."""
        active = self.find_active()
        if active is None:
            raise ClusterError("no active node")
        response = requests.get(
            f"{active.addr}/v1/sys/storage/raft/configuration",
            headers=self.client_headers(),
            timeout=5,
        )
        response.raise_for_status()
        servers: list[dict[str, Any]] = response.json()["data"]["config"]["servers"]
        return servers

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> RaftCluster:
        for node in self.nodes:
            node.start()
        first = self.nodes[0]
        _wait(f"{first.name} listening", lambda: first.health() is not None, WAIT, self.logs)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env.update(BAO_ADDR=first.addr, HOME=str(first.workdir))
        result = subprocess.run(
            [bao_binary(), "operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(f"bao operator init failed: {result.stderr}\n{self.logs()}")
        init = json.loads(result.stdout)
        self.root_token = init["root_token"]
        self.unseal_key = init["unseal_keys_b64"][0]
        first.unseal(self.unseal_key)
        self.active()
        if len(self.nodes) > 1:
            # Joining nodes start as non-voters and are promoted after the autopilot's
            # stabilization time (10 s by default): make that 1 s.
            response = requests.post(
                f"{first.addr}/v1/sys/storage/raft/autopilot/configuration",
                headers=self.client_headers(),
                json={"server_stabilization_time": "1s", "last_contact_threshold": "2s"},
                timeout=5,
            )
            response.raise_for_status()
        others = self.nodes[1:]
        for node in others:
            node.join(first)
        _wait(
            "every node unsealed",
            lambda: all([node.try_unseal(self.unseal_key) for node in others]),
            WAIT,
            self.logs,
        )
        self.wait_voters()
        return self

    def wait_voters(self, timeout: float = WAIT) -> None:
        """Every node (dead or alive) is a raft voter and every live node knows the leader."""
        names = {n.name for n in self.nodes}

        def all_voters() -> bool:
            try:
                servers = self.raft_servers()
            except (requests.RequestException, ClusterError):
                return False
            voters = {s["node_id"] for s in servers if s.get("voter")}
            if voters != names:
                return False
            return all((n.leader() or {}).get("leader_address") for n in self.live())

        _wait("all nodes raft voters", all_voters, timeout, self.logs)

    def wait_replicated(self, timeout: float = WAIT) -> None:
        """Every live node has applied everything the active node committed so far, so a
        standby's local reads see all the set-up done before this call."""
        leader = self.active().leader() or {}
        committed = int(leader.get("raft_committed_index") or 0)

        def caught_up() -> bool:
            return all(
                int((n.leader() or {}).get("raft_applied_index") or 0) >= committed
                for n in self.live()
            )

        _wait(f"raft index {committed} applied on every node", caught_up, timeout, self.logs)

    def wait_readable(self, *api_paths: str, timeout: float = WAIT) -> None:
        """Every live node answers 200 to a root read of each path (`secret/data/x`): the
        mount is set up on the standbys too (KV v2 answers 400 there until its upgrade ran
        on the active node) and the data has replicated."""

        def readable() -> bool:
            for node in self.live():
                for path in api_paths:
                    try:
                        response = requests.get(
                            f"{node.addr}/v1/{path}", headers=self.client_headers(), timeout=2
                        )
                    except requests.RequestException:
                        return False
                    if response.status_code != 200:
                        return False
            return True

        _wait(f"{', '.join(api_paths)} readable on every node", readable, timeout, self.logs)

    def kill(self, node: Node) -> None:
        node.kill()

    def restart(self, node: Node) -> None:
        """Start a stopped or killed node again and unseal it; it rejoins from its data."""
        node.start()
        node.unseal(self.unseal_key)
        _wait(f"{node.name} serving", lambda: node.health() in (200, 429), WAIT, self.logs)

    def heal(self) -> None:
        """Restart every dead node and wait for a full, caught-up cluster."""
        for node in self.dead():
            self.restart(node)
        self.wait_settled()
        if len(self.nodes) > 1:
            self.wait_voters()
        self.wait_replicated()

    def client(self) -> hvac.Client:
        """A root hvac client bound to the current active node (set-up only)."""
        return hvac.Client(url=self.active().addr, token=self.root_token)

    def admin(self) -> OpenBao:
        """A root `OpenBao` (the dev-server helper class) bound to the current active node,
        for set-up: KV mounts, AppRoles, secrets, wrapped secret-ids. Do not `stop()` it."""
        node = self.active()
        assert node.process is not None
        bao = OpenBao(node.addr, self.root_token, node.process, node.log_path)
        bao.audit_path = node.audit_path
        return bao

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def raft_cluster(size: int = 3) -> Iterator[RaftCluster]:
    """A started cluster; every node is killed and its data removed on exit, even when
    starting failed half-way."""
    cluster = RaftCluster(size)
    try:
        yield cluster.start()
    finally:
        cluster.close()
