"""Faults a real server cannot produce on demand, injected with `responses`: what is retried,
what is never retried, and what is reported as a lost answer instead of being repeated."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest
import requests
import responses
import urllib3.exceptions

from bootsecrets.config import Engine, SecretRef
from bootsecrets.errors import (
    PermissionDenied,
    ResponseLost,
    VaultError,
    VaultUnreachable,
    WrappingTokenInvalid,
)
from bootsecrets.vault import Vault
from bootsecrets.vaultanswers import TokenInfo
from bootsecrets.vaultconfig import VaultSettings

A = "http://vault-a.invalid:8200"
B = "http://vault-b.invalid:8200"
LOOKUP_OK = {
    "data": {
        "creation_path": "auth/approle/role/r/secret-id",
        "creation_ttl": 600,
        "creation_time": "2026-11-23T00:00:00Z",
    }
}
UNWRAP_OK = {"data": {"secret_id": "sid-123456", "secret_id_accessor": "acc"}}
READ_OK = {"data": {"data": {"k": "v-123456"}, "metadata": {"version": 3}}}
REF = SecretRef("db", "secret", "app/db", Engine.KV2)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def vault(fake_time: FakeTime, *addresses: str, deadline: float = 30) -> Vault:
    settings = VaultSettings(addresses=addresses or (A,), boot_deadline=deadline)
    v = Vault(settings, sleep=fake_time.sleep, clock=fake_time.clock)
    v.token = TokenInfo("tok-123456", "acc", 3600, True)
    return v


def refused() -> requests.exceptions.ConnectionError:
    reason = urllib3.exceptions.NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
    return requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/", reason))  # type: ignore[arg-type]


def dropped() -> requests.exceptions.ConnectionError:
    """The connection died after the request was sent (server may have acted on it)."""
    return requests.exceptions.ConnectionError(
        urllib3.exceptions.ProtocolError(
            "Connection aborted.", http.client.RemoteDisconnected("closed")
        )
    )


def calls(mocked: responses.RequestsMock, path: str) -> int:
    return sum(1 for c in mocked.calls if c.request.url and c.request.url.endswith(path))


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_idempotent_requests_are_retried_on_transient_answers(
    mocked: responses.RequestsMock, fake_time: FakeTime, status: int
) -> None:
    mocked.add(
        responses.GET, f"{A}/v1/secret/data/app/db", status=status, json={"errors": ["try later"]}
    )
    mocked.add(responses.GET, f"{A}/v1/secret/data/app/db", json=READ_OK)
    data = vault(fake_time).read(REF)
    assert data.version == 3
    assert calls(mocked, "/v1/secret/data/app/db") == 2
    assert len(fake_time.sleeps) == 1


def test_dropped_connection_mid_read_is_retried(
    mocked: responses.RequestsMock, fake_time: FakeTime
) -> None:
    mocked.add(responses.GET, f"{A}/v1/secret/data/app/db", body=dropped())
    mocked.add(responses.GET, f"{A}/v1/secret/data/app/db", json=READ_OK)
    assert vault(fake_time).read(REF).data == {"k": "v-123456"}


@pytest.mark.parametrize(("status", "error"), [(400, VaultError), (403, PermissionDenied)])
def test_client_errors_are_never_retried(
    mocked: responses.RequestsMock, fake_time: FakeTime, status: int, error: type[Exception]
) -> None:
    mocked.add(responses.GET, f"{A}/v1/secret/data/app/db", status=status, json={"errors": ["no"]})
    with pytest.raises(error):
        vault(fake_time).read(REF)
    assert calls(mocked, "/v1/secret/data/app/db") == 1
    assert fake_time.sleeps == []


def test_invalid_wrapping_token_is_never_retried(
    mocked: responses.RequestsMock, fake_time: FakeTime
) -> None:
    mocked.add(
        responses.POST,
        f"{A}/v1/sys/wrapping/lookup",
        status=400,
        json={"errors": ["wrapping token is not valid or does not exist"]},
    )
    with pytest.raises(WrappingTokenInvalid):
        vault(fake_time).lookup_wrapping("wrap-123456")
    assert calls(mocked, "/v1/sys/wrapping/lookup") == 1


@pytest.mark.parametrize("fault", [dropped(), requests.exceptions.ReadTimeout("read timed out")])
def test_unwrap_answer_lost_is_reported_not_repeated(
    mocked: responses.RequestsMock, fake_time: FakeTime, fault: Exception
) -> None:
    mocked.add(responses.POST, f"{A}/v1/sys/wrapping/unwrap", body=fault)
    mocked.add(responses.POST, f"{A}/v1/sys/wrapping/unwrap", json=UNWRAP_OK)
    with pytest.raises(ResponseLost, match="sys/wrapping/unwrap was sent but its answer was lost"):
        vault(fake_time).unwrap_secret_id("wrap-123456")
    assert calls(mocked, "/v1/sys/wrapping/unwrap") == 1


@pytest.mark.parametrize("status", [500, 502])
def test_unwrap_server_error_may_have_consumed_the_token(
    mocked: responses.RequestsMock, fake_time: FakeTime, status: int
) -> None:
    mocked.add(responses.POST, f"{A}/v1/sys/wrapping/unwrap", status=status, json={"errors": []})
    with pytest.raises(ResponseLost):
        vault(fake_time).unwrap_secret_id("wrap-123456")
    assert calls(mocked, "/v1/sys/wrapping/unwrap") == 1


def test_unwrap_is_retried_when_it_never_reached_the_server(
    mocked: responses.RequestsMock, fake_time: FakeTime
) -> None:
    mocked.add(responses.POST, f"{A}/v1/sys/wrapping/unwrap", body=refused())
    mocked.add(
        responses.POST,
        f"{A}/v1/sys/wrapping/unwrap",
        status=503,
        json={"errors": ["Vault is sealed"]},
    )
    mocked.add(responses.POST, f"{A}/v1/sys/wrapping/unwrap", json=UNWRAP_OK)
    assert vault(fake_time).unwrap_secret_id("wrap-123456") == ("sid-123456", "acc")
    assert calls(mocked, "/v1/sys/wrapping/unwrap") == 3


def test_login_answer_lost_is_reported(mocked: responses.RequestsMock, fake_time: FakeTime) -> None:
    mocked.add(responses.POST, f"{A}/v1/auth/approle/login", body=dropped())
    with pytest.raises(ResponseLost, match="auth/approle/login"):
        vault(fake_time).login_approle("approle", "role-123456", "sid-123456")
    assert calls(mocked, "/v1/auth/approle/login") == 1


def test_fails_over_to_the_next_address_and_stays_there(
    mocked: responses.RequestsMock, fake_time: FakeTime
) -> None:
    mocked.add(responses.POST, f"{A}/v1/sys/wrapping/lookup", body=refused())
    mocked.add(responses.POST, f"{B}/v1/sys/wrapping/lookup", json=LOOKUP_OK)
    mocked.add(responses.GET, f"{B}/v1/secret/data/app/db", json=READ_OK)
    v = vault(fake_time, A, B)
    assert v.lookup_wrapping("wrap-123456").creation_ttl == 600
    v.read(REF)
    assert calls(mocked, f"{B}/v1/secret/data/app/db".replace(B, "")) == 1
    assert not any(c.request.url == f"{A}/v1/secret/data/app/db" for c in mocked.calls)
    assert fake_time.sleeps == []  # failing over is immediate; only a full round waits


def test_deadline_bounds_the_retries(mocked: responses.RequestsMock, fake_time: FakeTime) -> None:
    mocked.add(
        responses.POST, f"{A}/v1/sys/wrapping/lookup", status=503, json={"errors": ["sealed"]}
    )
    with pytest.raises(VaultUnreachable, match=r"before the deadline.*sealed or standby"):
        vault(fake_time, deadline=20).lookup_wrapping("wrap-123456")
    assert fake_time.now <= 20
    assert all(s <= 4.0 for s in fake_time.sleeps)  # full jitter, capped
    assert len(fake_time.sleeps) >= 4


def test_unwrap_during_a_leader_election_is_retried(
    mocked: responses.RequestsMock, fake_time: FakeTime
) -> None:
    # What an OpenBao standby answers while no node is active: the request went nowhere.
    mocked.add(
        responses.POST,
        f"{A}/v1/sys/wrapping/unwrap",
        status=500,
        json={"errors": ["local node not active but active cluster node not found"]},
    )
    mocked.add(responses.POST, f"{A}/v1/sys/wrapping/unwrap", json=UNWRAP_OK)
    assert vault(fake_time).unwrap_secret_id("wrap-123456") == ("sid-123456", "acc")
