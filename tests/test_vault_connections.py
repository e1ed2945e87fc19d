"""Requests go out on connections opened ahead: the first one on the connection opened
while hvac was being loaded, the reads on connections opened while the login (or token
check) was in flight.

Over a link to a distant Vault every new connection costs a round trip (two or three with
TLS) before its request can leave; the agent opens the read connections during the login
round trip so that the reads do not pay it (issue 6, docs/performance.md). A recording proxy
between the agent and a real OpenBao shows which connection carried which request and when
each was opened. Answers are held 100 ms by the proxy, so "opened during the login" is not a
race on loopback, and the answer to a read is held until the three reads of these tests have
all arrived (2 s at most), so that "one connection per read" does not depend on how fast
the threads of a loaded machine get going: a read that went out late would otherwise find
another read's connection free again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from bootsecrets.connect import EarlyConnection
from bootsecrets.vault import Vault
from bootsecrets.vaultconfig import VaultSettings
from conftest import Sandbox
from support.openbao import OpenBao
from support.world import World

ANSWER_DELAY = 0.1
#: The reads of the tests below (three paths), and how long a read's answer waits for them.
READS_TOGETHER = 3
READS_WAIT = 2.0
READS = ("/v1/secret/data/", "/v1/kv1/")


@dataclasses.dataclass
class Connection:
    accepted: float
    requests: list[str] = dataclasses.field(default_factory=list)
    answered: list[float] = dataclasses.field(default_factory=list)


class RecordingProxy:
    """127.0.0.1:port -> OpenBao: records, per connection, when it was accepted, the request
    line of each request and when each answer was passed back (held ANSWER_DELAY first)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[Connection] = []
        self.lock = threading.Lock()
        self.reads_arrived = threading.Condition(self.lock)
        self.reads = 0
        self.stopping = False
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.stopping:
                client.close()
                return
            conn = Connection(time.monotonic())
            server = socket.create_connection(self.upstream, timeout=10)
            with self.lock:
                self.connections.append(conn)
                self.sockets += [client, server]
            threading.Thread(
                target=self._pump, args=(client, server, conn, False), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, client, conn, True), daemon=True
            ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, conn: Connection, answers: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if answers:
                    with self.lock:
                        if conn.requests and any(m in conn.requests[-1] for m in READS):
                            self.reads_arrived.wait_for(
                                lambda: self.reads >= READS_TOGETHER, READS_WAIT
                            )
                    time.sleep(ANSWER_DELAY)
                    with self.lock:
                        conn.answered.append(time.monotonic())
                else:
                    line = data.split(b"\r\n", 1)[0].decode("latin-1")
                    if line.split(" ")[0] in ("GET", "POST", "PUT", "LIST"):
                        with self.lock:
                            conn.requests.append(line)
                            if any(m in line for m in READS):
                                self.reads += 1
                                self.reads_arrived.notify_all()
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.stopping = True
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept/recv
                sock.close()

    def carrying(self, marker: str) -> list[Connection]:
        with self.lock:
            return [c for c in self.connections if any(marker in r for r in c.requests)]


@pytest.fixture
def proxy(openbao: OpenBao) -> Iterator[RecordingProxy]:
    host, port = openbao.addr.removeprefix("http://").split(":")
    recording = RecordingProxy((host, int(port)))
    yield recording
    recording.close()


def assert_reads_on_connections_opened_before(proxy: RecordingProxy, moment: float) -> None:
    """Three distinct paths: three connections, each opened before `moment`, each carrying
    exactly one read; and besides them only the one that carried the login or token check."""
    reads = [c for c in proxy.connections if any(m in r for r in c.requests for m in READS)]
    assert len(reads) == 3
    assert all(len(c.requests) == 1 for c in reads)
    assert all(c.accepted < moment for c in reads), "a read opened its own connection"
    assert len(proxy.connections) == 1 + 3


def bootstrap_through(world: World, proxy: RecordingProxy) -> None:
    world.provision(vault={"address": proxy.addr, "boot_deadline": 10, "request_timeout": 5})
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err


def test_bootstrap_reads_on_connections_opened_during_the_login(
    world: World, proxy: RecordingProxy
) -> None:
    bootstrap_through(world, proxy)

    [auth] = proxy.carrying("/v1/auth/approle/login")
    assert [r.split()[1] for r in auth.requests] == [
        "/v1/sys/wrapping/lookup",
        "/v1/sys/wrapping/unwrap",
        "/v1/auth/approle/login",
    ]
    assert_reads_on_connections_opened_before(proxy, auth.answered[2])  # login answered


def test_refresh_reads_on_connections_opened_during_the_token_check(
    world: World, proxy: RecordingProxy
) -> None:
    sandbox: Sandbox = world.sandbox
    bootstrap_through(world, proxy)
    with proxy.lock:
        proxy.connections.clear()

    code, _, err = sandbox.run("refresh")

    assert code == 0, err
    [check] = proxy.carrying("/v1/auth/token/lookup-self")
    assert len(check.requests) == 1
    assert_reads_on_connections_opened_before(proxy, check.answered[0])


def test_connections_that_cannot_be_opened_leave_the_error_to_the_reads(
    world: World, proxy: RecordingProxy
) -> None:
    """Vault goes away between the login and the reads: the connections opened ahead are
    dead, and the reads report Vault unreachable (exit 21) at the deadline, not a hang."""
    sandbox: Sandbox = world.sandbox
    world.provision(vault={"address": proxy.addr, "boot_deadline": 2, "request_timeout": 1})
    sandbox.after_login = proxy.close

    started = time.monotonic()
    code, _, err = sandbox.run("bootstrap")

    assert code == 21, err
    assert "did not answer read " in err
    assert time.monotonic() - started < 10


def wait_for_connections(proxy: RecordingProxy, count: int) -> list[Connection]:
    give_up = time.monotonic() + 10
    while len(proxy.connections) < count and time.monotonic() < give_up:
        time.sleep(0.01)
    with proxy.lock:
        assert len(proxy.connections) == count
        return list(proxy.connections)


def test_the_first_request_goes_out_on_the_early_connection(
    world: World, proxy: RecordingProxy
) -> None:
    """connect.EarlyConnection is opened before hvac is loaded; the wrapping lookup, the
    first request, must use it rather than open a connection of its own."""
    early = EarlyConnection(proxy.addr, timeout=5)
    [opened] = wait_for_connections(proxy, 1)

    with Vault(VaultSettings(addresses=(proxy.addr,), request_timeout=5), early=early) as vault:
        info = vault.lookup_wrapping(world.bao.wrapped_secret_id(world.role))

    assert info.creation_path == f"auth/approle/role/{world.role}/secret-id"
    assert proxy.connections == [opened]
    assert opened.requests == ["POST /v1/sys/wrapping/lookup HTTP/1.1"]


def test_an_early_connection_to_another_address_is_closed_unused(
    world: World, proxy: RecordingProxy, openbao: OpenBao
) -> None:
    early = EarlyConnection(proxy.addr, timeout=5)
    [opened] = wait_for_connections(proxy, 1)

    with Vault(VaultSettings(addresses=(openbao.addr,), request_timeout=5), early=early) as vault:
        vault.lookup_wrapping(world.bao.wrapped_secret_id(world.role))

    assert proxy.connections == [opened]
    assert opened.requests == []
    assert early.take(early.host, early.port) is None


def test_the_early_connection_is_started_before_the_http_client_is_loaded() -> None:
    """What agent.py imports before it starts EarlyConnection (bootsecrets.connect with it)
    loads none of urllib3, requests, hvac or ssl: ~90 ms of imports the handshake overlaps.
    The transport (bootsecrets.connect.transport) loads them, with bootsecrets.vault."""
    probe = (
        "import sys, bootsecrets.agent, bootsecrets.connect, bootsecrets.connect.deadline\n"
        "print(sorted(m for m in ('urllib3', 'requests', 'hvac', 'ssl') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    ).stdout
    assert out.strip() == "[]"
