"""A request ends within `vault.request_timeout` and within what is left of
`vault.boot_deadline`, from connecting to the last byte, however slowly the server sends; an
answer over the size cap is refused before it is all read.

Fake Vaults on 127.0.0.1 (support/fakehttp.py) drip their answers one byte every
DRIP_INTERVAL (well under the request timeout, so no single socket read ever times out) for
far longer than any deadline here: in the status line, the headers, the body (with a length,
chunked), over TLS and inside the TLS handshake. Durations are asserted only as "ended long
before the drip would have" (each drip would last over a minute).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from bootsecrets import errors
from bootsecrets.connect import deadline as deadlines
from bootsecrets.connect.transport import MAX_RESPONSE_BYTES, session_for
from conftest import Sandbox
from support.fakehttp import (
    FakeServer,
    Handler,
    Reply,
    Request,
    Upstream,
    head,
    tls_server_context,
)
from support.fakevault import ANSWERS, CALL, good, unless, vault
from support.openbao import OpenBao
from support.world import World

DRIP_INTERVAL = 0.2
#: Enough bytes to drip for over a minute.
DRIP_BYTES = 400
#: Whatever a bounded run takes beyond its deadline on a busy machine, and far less than a drip.
SLACK = 10.0
JSON = "application/json"


def drip_in_status_line(request: Request, reply: Reply) -> None:
    reply.send(b"HTTP/1.1 2")
    reply.drip(b"00 OK" + b" " * DRIP_BYTES, DRIP_INTERVAL)


def drip_in_headers(request: Request, reply: Reply) -> None:
    reply.send(f"HTTP/1.1 200 OK\r\nContent-Type: {JSON}\r\n".encode())
    reply.drip(b"X-Slow: " + b"a" * DRIP_BYTES, DRIP_INTERVAL)


def drip_in_body(request: Request, reply: Reply) -> None:
    body = json.dumps(ANSWERS[request.path]).encode().ljust(DRIP_BYTES)
    reply.send(head(200, {"Content-Type": JSON, "Content-Length": str(len(body))}))
    reply.drip(body, DRIP_INTERVAL)


def drip_in_chunked_body(request: Request, reply: Reply) -> None:
    reply.send(head(200, {"Content-Type": JSON, "Transfer-Encoding": "chunked"}))
    reply.drip(b"1\r\n \r\n" * (DRIP_BYTES // 6), DRIP_INTERVAL)


DRIPS: dict[str, Handler] = {
    "status-line": drip_in_status_line,
    "headers": drip_in_headers,
    "body": drip_in_body,
    "chunked-body": drip_in_chunked_body,
}


def timed(action: Callable[[], object]) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        action()
    except Exception as err:
        return err, time.monotonic() - started
    return None, time.monotonic() - started


@pytest.mark.parametrize("where", DRIPS)
def test_a_dripping_lookup_is_retried_and_ends_at_the_deadline(where: str) -> None:
    lookup = CALL["lookup"]
    with FakeServer(unless(lookup.path, DRIPS[where])) as server:
        session = vault(server.addr, request_timeout=1, deadline=3)
        err, elapsed = timed(lambda: lookup.make(session))
        session.close()

    assert isinstance(err, errors.VaultUnreachable), err
    assert f"before the deadline (last: {server.addr}: timeout)" in str(err)
    assert elapsed < 3 + SLACK
    assert len(server.paths()) >= 2  # each request ended after ~1 s, then was retried


@pytest.mark.parametrize("where", DRIPS)
def test_a_dripping_unwrap_is_an_answer_lost_not_repeated(where: str) -> None:
    unwrap = CALL["unwrap"]
    with FakeServer(unless(unwrap.path, DRIPS[where])) as server:
        session = vault(server.addr, request_timeout=1, deadline=30)
        err, elapsed = timed(lambda: unwrap.make(session))
        session.close()

    assert isinstance(err, errors.ResponseLost), err
    assert "sys/wrapping/unwrap was sent but its answer was lost (timeout)" in str(err)
    assert elapsed < 1 + SLACK
    assert server.paths() == [unwrap.path]


def test_request_timeout_bounds_one_request_and_the_retry_succeeds() -> None:
    read = CALL["read"]
    answered: list[str] = []

    def first_drips(request: Request, reply: Reply) -> None:
        if answered:
            good(request, reply)
        else:
            answered.append(request.path)
            drip_in_body(request, reply)

    with FakeServer(first_drips) as server:
        session = vault(server.addr, request_timeout=1, deadline=60)
        err, elapsed = timed(lambda: read.make(session))
        session.close()

    assert err is None
    assert server.paths() == [read.path, read.path]
    assert elapsed < 1 + SLACK


def test_the_deadline_bounds_a_request_longer_than_what_is_left() -> None:
    """request_timeout 60 s, boot_deadline 1.5 s: the request gets only what is left."""
    read = CALL["read"]
    with FakeServer(unless(read.path, drip_in_headers)) as server:
        session = vault(server.addr, request_timeout=60, deadline=1.5)
        err, elapsed = timed(lambda: read.make(session))
        session.close()

    assert isinstance(err, errors.VaultUnreachable), err
    assert elapsed < 1.5 + SLACK


def test_a_drip_over_tls_is_bounded(tmp_path: Path) -> None:
    context, cert = tls_server_context(tmp_path)
    unwrap = CALL["unwrap"]
    with FakeServer(unless(unwrap.path, drip_in_body), tls=context) as server:
        session = vault(server.addr, request_timeout=1, deadline=30, ca_cert=cert)
        err, elapsed = timed(lambda: unwrap.make(session))
        session.close()

    assert isinstance(err, errors.ResponseLost), err
    assert elapsed < 1 + SLACK
    assert server.handshake_failures == 0


@pytest.mark.parametrize("server_sends", ["a-drip", "nothing"])
def test_a_stalled_tls_handshake_is_bounded_and_counts_as_not_sent(
    tmp_path: Path, server_sends: str
) -> None:
    """The server takes the ClientHello, then drips a TLS record (the deadline cuts it) or
    sends nothing (the socket timeout fires; urllib3 calls that a read timeout): the
    handshake never completes, no byte of the request left, so even the unwrap may be sent
    again (exit 21 at the deadline, not 32)."""
    _, cert = tls_server_context(tmp_path)
    hellos: list[int] = []

    def handshake(sock: socket.socket, stopping: threading.Event) -> None:
        hellos.append(len(sock.recv(65536)))
        record = b"\x16\x03\x03\x40\x00" + b"\x02" * DRIP_BYTES
        for i in range(len(record)):
            if stopping.wait(DRIP_INTERVAL):
                return
            if server_sends == "a-drip":
                try:
                    sock.sendall(record[i : i + 1])
                except OSError:
                    return

    with FakeServer(good, handshake=handshake) as server:
        session = vault(server.addr, request_timeout=1, deadline=3, ca_cert=cert)
        err, elapsed = timed(lambda: CALL["unwrap"].make(session))
        session.close()

    assert isinstance(err, errors.VaultUnreachable), err
    assert "(last: " + server.addr + ": connect timeout)" in str(err)
    assert elapsed < 3 + SLACK
    assert len(hellos) >= 2 and all(hellos)


def test_a_tls_handshake_that_times_out_on_its_own_is_a_connect_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A silent server during the TLS handshake. The socket timeout and the deadline are the
    same length, so which one ends the request is a race; here the deadline is moved 5 s
    later so that the socket timeout, which urllib3 reports as a *read* timeout, always
    comes first. The transport says what it is: a request never sent (failover may send it
    again, even an unwrap), as when the deadline cuts the handshake (test above)."""
    _, cert = tls_server_context(tmp_path)
    watched = deadlines.watched
    monkeypatch.setattr(deadlines, "watched", lambda seconds: watched(seconds + 5))

    def silent(sock: socket.socket, stopping: threading.Event) -> None:
        sock.recv(65536)
        stopping.wait(30)

    with FakeServer(good, handshake=silent) as server:
        session = session_for([server.addr], str(cert), 4)
        with pytest.raises(requests.exceptions.ConnectTimeout):
            session.post(f"{server.addr}/v1/sys/wrapping/unwrap", timeout=0.5)
        session.close()


def test_bootstrap_against_a_dripping_vault_ends_at_boot_deadline(
    world: World, openbao: OpenBao
) -> None:
    """The whole agent, a real OpenBao behind a proxy that drips the lookup's answer: exit
    21 at boot_deadline (not when systemd's start timeout kills it), the wrapped secret-id
    kept because nothing consumed it."""
    upstream = Upstream(openbao.addr)
    handler = unless("/v1/sys/wrapping/lookup", drip_in_headers)

    def handle(request: Request, reply: Reply) -> None:
        (upstream if request.path != "/v1/sys/wrapping/lookup" else handler)(request, reply)

    with FakeServer(handle) as proxy:
        world.provision(vault={"address": proxy.addr, "boot_deadline": 3, "request_timeout": 1})
        sandbox: Sandbox = world.sandbox
        bootstrap = sandbox.store / "bootstrap.yaml"
        kept = bootstrap.read_bytes()
        started = time.monotonic()
        code, _, err = sandbox.run("bootstrap")
        elapsed = time.monotonic() - started

    assert code == errors.VaultUnreachable.exit_code == 21, err
    assert "Vault did not answer sys/wrapping/lookup before the deadline" in err
    assert elapsed < 3 + SLACK
    assert sandbox.written_files() == []
    assert bootstrap.read_bytes() == kept


# --- the size cap ----------------------------------------------------------------------------

HUGE = 300 * 1024 * 1024
CHUNK = 64 * 1024


def huge_with_length(request: Request, reply: Reply) -> None:
    reply.send(head(200, {"Content-Type": JSON, "Content-Length": str(HUGE)}))
    reply.flood(b" " * CHUNK, HUGE)


def huge_chunked(request: Request, reply: Reply) -> None:
    reply.send(head(200, {"Content-Type": JSON, "Transfer-Encoding": "chunked"}))
    reply.flood(b"%x\r\n" % CHUNK + b" " * CHUNK + b"\r\n", HUGE)


def huge_until_close(request: Request, reply: Reply) -> None:
    reply.send(head(200, {"Content-Type": JSON, "Connection": "close"}))
    reply.flood(b" " * CHUNK, HUGE)
    reply.close()


@pytest.mark.parametrize(
    "answer",
    [huge_with_length, huge_chunked, huge_until_close],
    ids=["content-length", "chunked", "until-close"],
)
@pytest.mark.parametrize("call", ["read", "lookup"])
def test_a_huge_answer_is_refused_before_it_is_read(answer: Handler, call: str) -> None:
    """300 MiB: refused once the cap is passed (at once when Content-Length says so), never
    retried; the server could send only the cap and what the socket buffers hold."""
    made = CALL[call]
    with FakeServer(unless(made.path, answer)) as server:
        session = vault(server.addr)
        err, _ = timed(lambda: made.make(session))
        session.close()

    assert type(err) is errors.VaultError, err
    what = "read secret/app/db" if call == "read" else "sys/wrapping/lookup"
    assert f"{what}: the answer from {server.addr} is larger than 4 MiB" in str(err)
    assert server.paths() == [made.path]
    [reply] = server.replies
    assert reply.sent < MAX_RESPONSE_BYTES + 32 * 1024 * 1024, reply.sent


def padded(path: str, size: int) -> bytes:
    body = json.dumps(ANSWERS[path]).encode()
    return body + b" " * (size - len(body))  # JSON allows trailing white space


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize(
    ("size", "accepted"),
    [(MAX_RESPONSE_BYTES, True), (MAX_RESPONSE_BYTES + 1, False)],
    ids=["at-the-cap", "one-byte-over"],
)
def test_the_cap_is_exact(framing: str, size: int, accepted: bool) -> None:
    read = CALL["read"]

    def answer(request: Request, reply: Reply) -> None:
        body = padded(request.path, size)
        if framing == "chunked":
            reply.send(head(200, {"Content-Type": JSON, "Transfer-Encoding": "chunked"}))
            for at in range(0, len(body), CHUNK):
                piece = body[at : at + CHUNK]
                reply.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
            reply.send(b"0\r\n\r\n")
        else:
            reply.answer(200, body)

    with FakeServer(unless(read.path, answer)) as server:
        session = vault(server.addr)
        err, _ = timed(lambda: read.make(session))
        session.close()

    if accepted:
        assert err is None
    else:
        assert type(err) is errors.VaultError and "larger than 4 MiB" in str(err), err


# --- the deadline itself -------------------------------------------------------------------


def test_a_deadline_shuts_down_what_it_watches_and_nothing_else() -> None:
    """What it watches when it expires is shut down (a blocked recv returns); a socket it
    stopped watching (a connection back in the pool) and one watched after finish() are not;
    one watched after it expired is shut down at once."""
    watched, unwatched, late = socket.socketpair(), socket.socketpair(), socket.socketpair()
    deadline = deadlines.Deadline(60)
    deadline.watch("a", watched[0])
    deadline.watch("b", unwatched[0])
    deadline.unwatch("b")
    deadline.expire()
    deadline.watch("c", late[0])
    assert watched[0].recv(1) == b""  # shut down: EOF at once, no wait
    assert late[0].recv(1) == b""
    unwatched[1].sendall(b"x")
    assert unwatched[0].recv(1) == b"x"  # still a working connection
    assert deadline.finish()

    after = socket.socketpair()
    deadline.watch("d", after[0])
    deadline.expire()
    after[1].sendall(b"y")
    assert after[0].recv(1) == b"y"
    for pair in (watched, unwatched, late, after):
        for sock in pair:
            sock.close()


def test_requests_leave_no_descriptor_behind() -> None:
    """Each request watches its socket through a duplicate descriptor: all closed again."""

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with FakeServer(good) as server:
        session = vault(server.addr)
        CALL["read"].make(session)  # both sessions' connections (each with its socket on
        CALL["lookup"].make(session)  # the server's side too) and the watchdog thread exist
        before = open_fds()
        for _ in range(50):
            CALL["read"].make(session)
            CALL["lookup"].make(session)
        after = open_fds()
        session.close()
    assert after <= before
