"""No token, and no request, ever goes to an origin that is not a configured Vault address.

Fake Vaults on 127.0.0.1 (support/fakehttp.py) answer 3xx on every call the agent makes; the
"other origin" is a listening socket the test owns, which must never see a connection. A
redirect to a configured address is "ask that address" (a standby's 307 to the active node):
the same request, never the Location's path, goes there. The real standby 307 of an OpenBao
raft cluster is in tests/test_ha.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bootsecrets import errors
from bootsecrets.connect.transport import OriginRefused, Redirected, origin_of, session_for
from conftest import Sandbox
from support.fakehttp import (
    FakeServer,
    Handler,
    Listener,
    Reply,
    Request,
    Upstream,
    tls_server_context,
)
from support.fakevault import CALL, CALLS, CLIENT_TOKEN, WRAPPING_TOKEN, Call, good, vault
from support.openbao import OpenBao
from support.world import World

REDIRECTS = (301, 302, 303, 307, 308)


@pytest.fixture
def elsewhere() -> Iterator[Listener]:
    """The origin redirects point to: it must accept nothing."""
    listener = Listener()
    yield listener
    listener.close()
    assert listener.data == b""


def redirecting(status: int, location: str) -> FakeServer:
    def handle(request: Request, reply: Reply) -> None:
        reply.answer(status, {"errors": []}, {"Location": location})

    return FakeServer(handle)


def redirect_to(addr: str) -> Handler:
    def handle(request: Request, reply: Reply) -> None:
        reply.answer(307, {"errors": []}, {"Location": addr + request.target})

    return handle


def assert_never_contacted(listener: Listener) -> None:
    assert listener.accepted == 0
    assert listener.data == b""


@pytest.mark.parametrize("status", REDIRECTS)
@pytest.mark.parametrize("call", CALLS, ids=str)
def test_redirect_to_another_origin_is_refused_and_nothing_goes_there(
    call: Call, status: int, elsewhere: Listener
) -> None:
    target = f"http://127.0.0.1:{elsewhere.port}"
    with redirecting(status, f"{target}{call.path}?token={WRAPPING_TOKEN}") as server:
        session = vault(server.addr)
        with pytest.raises(errors.VaultError) as raised:
            call.make(session)
        session.close()

    assert raised.value.exit_code == 20  # at once: not retried until the deadline (21)
    message = str(raised.value)
    assert f"{server.addr} redirected (HTTP {status}) to {target}" in message
    assert "not a configured Vault address" in message
    assert call.path not in message and "token=" not in message
    assert server.paths() == [call.path]
    assert_never_contacted(elsewhere)


@pytest.mark.parametrize(
    "location",
    [
        "https://127.0.0.1:{port}/v1/sys/wrapping/lookup",  # same host and port, other scheme
        "http://localhost:{port}/v1/sys/wrapping/lookup",  # same address, other host name
        "//127.0.0.1:{other}/v1/sys/wrapping/lookup",  # scheme-relative, other port
    ],
)
def test_origins_are_compared_exactly(location: str, elsewhere: Listener) -> None:
    with FakeServer(good) as decoy:  # nothing may reach it either, under any name
        port = decoy.port

        def handle(request: Request, reply: Reply) -> None:
            reply.answer(
                307, {"errors": []}, {"Location": location.format(port=port, other=elsewhere.port)}
            )

        with FakeServer(handle) as server:
            session = vault(server.addr)
            with pytest.raises(errors.VaultError) as raised:
                CALL["lookup"].make(session)
            session.close()
        assert decoy.accepted == 0

    assert raised.value.exit_code == 20
    assert "not a configured Vault address" in str(raised.value)
    assert_never_contacted(elsewhere)


@pytest.mark.parametrize(
    "location", ["", "ftp://127.0.0.1/x", "http://127.0.0.1:99999/x", "http://[::1/x"]
)
def test_redirect_without_a_usable_location_is_refused(location: str) -> None:
    def handle(request: Request, reply: Reply) -> None:
        reply.answer(302, {"errors": []}, {"Location": location} if location else {})

    with FakeServer(handle) as server:
        session = vault(server.addr)
        with pytest.raises(errors.VaultError) as raised:
            CALL["unwrap"].make(session)
        session.close()

    assert raised.value.exit_code == 20
    assert "to a location that is not an http(s) URL" in str(raised.value)
    assert server.paths() == ["/v1/sys/wrapping/unwrap"]


def test_https_to_http_on_the_same_host_and_port_is_refused(tmp_path: Path) -> None:
    """The downgrade: a TLS Vault redirecting to plain http on its own port. The plain
    request would reach the same server, which counts every connection it accepts."""
    context, cert = tls_server_context(tmp_path)
    with FakeServer(good, tls=context) as server:
        plain = server.addr.replace("https://", "http://")
        server.handler = redirect_to(plain)
        session = vault(server.addr, ca_cert=cert)
        with pytest.raises(errors.VaultError) as raised:
            CALL["unwrap"].make(session)
        session.close()

    assert raised.value.exit_code == 20
    assert f"{server.addr} redirected (HTTP 307) to {plain}" in str(raised.value)
    assert server.accepted == 1  # the TLS connection, and no plain one
    assert server.handshake_failures == 0
    assert server.paths() == ["/v1/sys/wrapping/unwrap"]


@pytest.mark.parametrize("call", CALLS, ids=str)
def test_redirect_to_a_configured_address_sends_the_same_request_there(call: Call) -> None:
    """A standby's 307 to the active node: the request goes to that address (its own path,
    never the Location's), once, unwrap and login included, and the next call goes there
    directly."""
    active = FakeServer(good)
    with active, redirecting(307, f"{active.addr}/v1/sys/wrapping/unwrap?x=1") as standby:
        session = vault(standby.addr, active.addr)
        call.make(session)
        then = call if call.idempotent else CALL["read"]
        then.make(session)
        session.close()

    assert standby.paths() == [call.path]
    assert active.paths() == [call.path, then.path]


def test_same_origin_redirect_is_retried_at_that_address_until_the_deadline() -> None:
    """A relative Location (a load balancer in front of standbys, say): the same request goes
    to the same address again, with backoff, never to the Location's path; bounded by the
    deadline like a standby that answers 503."""
    with redirecting(307, "/v1/sys/wrapping/unwrap") as server:
        session = vault(server.addr, request_timeout=1, deadline=1.5)
        with pytest.raises(errors.VaultUnreachable) as raised:
            CALL["lookup"].make(session)
        session.close()

    assert f"(last: {server.addr}: HTTP 307 to {server.addr})" in str(raised.value)
    assert len(server.paths()) >= 2
    assert set(server.paths()) == {"/v1/sys/wrapping/lookup"}


def test_two_addresses_redirecting_to_each_other_end_at_the_deadline() -> None:
    # An idempotent call: had the deadline struck while a non-idempotent one was in flight
    # (a loaded machine), it would rightly end as "answer lost" (32), not at this check.
    with FakeServer(good) as a, FakeServer(good) as b:
        a.handler, b.handler = redirect_to(b.addr), redirect_to(a.addr)
        session = vault(a.addr, b.addr, request_timeout=1, deadline=1.5)
        with pytest.raises(errors.VaultUnreachable):
            CALL["lookup"].make(session)
        session.close()

    # Each round asks each address once, then backs off: no tight loop.
    assert abs(len(a.paths()) - len(b.paths())) <= 1
    assert len(a.paths()) < 20


def test_the_session_cannot_be_told_to_follow_or_to_go_elsewhere(elsewhere: Listener) -> None:
    """The transport itself refuses, whatever requests is told: a redirect is raised even
    with allow_redirects=True, and a request to an origin not configured is never sent."""
    target = f"http://127.0.0.1:{elsewhere.port}"
    with redirecting(302, f"{target}/steal") as server:
        session = session_for([server.addr], True, 4)
        with pytest.raises(Redirected) as raised:
            session.get(
                f"{server.addr}/v1/x",
                allow_redirects=True,
                headers={"X-Vault-Token": CLIENT_TOKEN},
                timeout=5,
            )
        assert raised.value.target == origin_of(target)
        with pytest.raises(OriginRefused):
            session.get(f"{target}/v1/x", headers={"X-Vault-Token": CLIENT_TOKEN}, timeout=5)
        session.close()
    assert_never_contacted(elsewhere)


def test_bootstrap_redirected_elsewhere_at_unwrap_exits_20_and_consumes_nothing(
    world: World, openbao: OpenBao, elsewhere: Listener
) -> None:
    """The whole agent against a real OpenBao behind a proxy that answers the unwrap with a
    redirect to another port: exit 20, one line naming both addresses, nothing rendered, and
    the wrapped secret-id never reached OpenBao's unwrap (it still unwraps afterwards)."""
    upstream = Upstream(openbao.addr)
    target = f"http://127.0.0.1:{elsewhere.port}"

    def handle(request: Request, reply: Reply) -> None:
        if request.path == "/v1/sys/wrapping/unwrap":
            reply.answer(307, {"errors": []}, {"Location": f"{target}{request.target}"})
        else:
            upstream(request, reply)

    with FakeServer(handle) as proxy:
        wrapped = world.provision(
            vault={"address": proxy.addr, "boot_deadline": 10, "request_timeout": 5}
        )
        sandbox: Sandbox = world.sandbox
        code, _, err = sandbox.run("bootstrap")

    assert code == errors.VaultError.exit_code == 20, err
    lines = [line for line in err.splitlines() if line.startswith("bootsecrets: error:")]
    assert len(lines) == 1, err
    assert f"{proxy.addr} redirected (HTTP 307) to {target}" in lines[0]
    assert sandbox.written_files() == []
    assert_never_contacted(elsewhere)
    assert [path for path, _ in upstream.statuses] == ["/v1/sys/wrapping/lookup"]
    assert openbao.unwrap(wrapped)["secret_id"]  # not consumed by the redirected request
