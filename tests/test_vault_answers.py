"""Answers no real Vault gives, injected with `responses`: a duration that is not whole
seconds (a string, a float, a boolean, negative, past 100 years), a certificate validity out
of range, policies that are not a list. Each is refused at the boundary as a VaultError (or,
for a certificate, LeaseIssueFailed) naming the field, never a crash in a date or in the
schedule's arithmetic further in, and the value is never in the message."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import responses

from bootsecrets import vaultleases
from bootsecrets.config import Engine, SecretRef
from bootsecrets.errors import LeaseIssueFailed, VaultError
from bootsecrets.leasespec import CertificateSpec, DatabaseSpec
from bootsecrets.leasestore import from_grant
from bootsecrets.model import MAX_LEASE_SECONDS, LeaseGrant
from bootsecrets.vault import Vault
from bootsecrets.vaultanswers import TokenInfo, seconds
from bootsecrets.vaultconfig import VaultSettings

A = "http://vault-a.invalid:8200"
LEASE_ID = "database/creds/app/AbCdEfGh12345678"
#: Recognisable in a message if it ever were quoted.
ODD = 987654321987654321987

NOT_SECONDS: list[Any] = [
    "3600",
    "abc",
    3600.5,
    1e300,
    float("inf"),
    True,
    -1,
    MAX_LEASE_SECONDS + 1,
    ODD,
    [3600],
    {"seconds": 3600},
]


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def vault() -> Vault:
    v = Vault(VaultSettings(addresses=(A,), boot_deadline=5))
    v.token = TokenInfo("tok-123456", "acc", 3600, True)
    return v


def refused_naming(field: str, raised: pytest.ExceptionInfo[Exception], value: object) -> None:
    message = str(raised.value)
    assert isinstance(raised.value, VaultError) and raised.value.exit_code == 20
    assert f"a {field} that is not a number of seconds" in message
    assert str(ODD) not in message and repr(value) not in message.replace(field, "")


@pytest.mark.parametrize("value", [None, 0, 1, 3600, MAX_LEASE_SECONDS])
def test_whole_seconds_up_to_a_hundred_years_are_taken(value: int | None) -> None:
    assert seconds(value, "renew", "lease_duration") == (value or 0)


@pytest.mark.parametrize("value", NOT_SECONDS, ids=repr)
def test_anything_else_is_refused_naming_the_field(value: object) -> None:
    with pytest.raises(VaultError) as raised:
        seconds(value, "renew", "lease_duration")
    refused_naming("lease_duration", raised, value)


@pytest.mark.parametrize("value", NOT_SECONDS, ids=repr)
def test_a_login_answer_with_an_odd_lease_duration_is_refused(
    mocked: responses.RequestsMock, value: object
) -> None:
    mocked.add(
        responses.POST,
        f"{A}/v1/auth/approle/login",
        json={"auth": {"client_token": "s.tok-1234567890", "lease_duration": value}},
    )
    with pytest.raises(VaultError) as raised:
        vault().login_approle("approle", "role-id", "secret-id")
    refused_naming("lease_duration", raised, value)
    assert "s.tok-1234567890" not in str(raised.value)


@pytest.mark.parametrize("field", ["ttl", "creation_ttl"])
@pytest.mark.parametrize("value", ["3600", 1e300, -5], ids=repr)
def test_a_token_lookup_with_an_odd_ttl_is_refused(
    mocked: responses.RequestsMock, field: str, value: object
) -> None:
    data = {"ttl": 3600, "creation_ttl": 3600, field: value}
    mocked.add(responses.GET, f"{A}/v1/auth/token/lookup-self", json={"data": data})
    with pytest.raises(VaultError) as raised:
        vault().use_token("s.kept-1234567890")
    refused_naming(field, raised, value)


def test_a_wrapping_lookup_with_an_odd_creation_ttl_is_refused(
    mocked: responses.RequestsMock,
) -> None:
    mocked.add(
        responses.POST,
        f"{A}/v1/sys/wrapping/lookup",
        json={"data": {"creation_path": "auth/approle/role/r/secret-id", "creation_ttl": "1e9"}},
    )
    with pytest.raises(VaultError) as raised:
        vault().lookup_wrapping("s.wrap-1234567890")
    refused_naming("creation_ttl", raised, "1e9")


def test_policies_that_are_not_a_list_are_taken_as_none(mocked: responses.RequestsMock) -> None:
    data = {"ttl": 60, "creation_ttl": 60, "policies": 5}
    mocked.add(responses.GET, f"{A}/v1/auth/token/lookup-self", json={"data": data})
    assert vault().use_token("s.kept-1234567890").policies == ()


@pytest.mark.parametrize("value", ["600", 1e300, True, -1, ODD], ids=repr)
def test_a_lease_issue_or_renewal_with_an_odd_lease_duration_is_refused(
    mocked: responses.RequestsMock, value: object
) -> None:
    ref = SecretRef("db", "database", "creds/app", Engine.DATABASE, DatabaseSpec())
    answer = {
        "lease_id": LEASE_ID,
        "lease_duration": value,
        "renewable": True,
        "data": {"username": "v-app-1", "password": "pw-1234567890"},
    }
    mocked.add(responses.GET, f"{A}/v1/database/creds/app", json=answer)
    mocked.add(responses.PUT, f"{A}/v1/sys/leases/renew/{LEASE_ID}", json=answer)
    with pytest.raises(VaultError) as raised:
        vaultleases.issue(vault(), ref, None, idempotent=True)
    refused_naming("lease_duration", raised, value)
    with pytest.raises(VaultError) as raised:
        vaultleases.renew_lease(vault(), LEASE_ID, 600, what="renew the lease of db")
    refused_naming("lease_duration", raised, value)
    assert LEASE_ID not in str(raised.value) and "pw-1234567890" not in str(raised.value)


def certificate_grant(**validity: object) -> LeaseGrant:
    data = {"certificate": "CERT", "private_key": "KEY-1234567890", **validity}
    return LeaseGrant(data, "", 0, False)


TLS = SecretRef("tls", "pki", "issue/web", Engine.PKI, CertificateSpec("web.example.test"))


@pytest.mark.parametrize(
    "validity",
    [
        {"expiration": 253402300800 * 10},  # past year 9999: no date can hold it
        {"expiration": 1e300},
        {"expiration": "1767225600"},
        {"expiration": True},
        {"expiration": -1},
        {"expiration": int(time.time()) + 3600, "not_before": 2**70},
        {"expiration": int(time.time()) + 3600, "not_before": "0"},
        {},
    ],
    ids=repr,
)
def test_a_certificate_with_a_validity_out_of_range_is_refused(validity: dict[str, Any]) -> None:
    with pytest.raises(LeaseIssueFailed) as raised:
        from_grant(TLS, certificate_grant(**validity), time.time(), 1)
    assert raised.value.exit_code == 60
    assert "Vault's answer has no certificate, key or validity" in str(raised.value)
    assert "KEY-1234567890" not in str(raised.value)


def test_a_certificate_valid_for_an_hour_is_taken() -> None:
    now = time.time()
    held = from_grant(TLS, certificate_grant(expiration=int(now) + 3600), now, 1)
    assert held.expires_at == int(now) + 3600


KV = SecretRef("app", "secret", "app/config", Engine.KV2)


@pytest.mark.parametrize(
    "metadata",
    [{"version": "3"}, {"version": True}, {"version": -2}, {"version": 1.5}],
    ids=repr,
)
def test_a_kv_read_with_an_odd_version_is_refused(
    mocked: responses.RequestsMock, metadata: object
) -> None:
    answer = {"data": {"data": {"k": "v-1234567890"}, "metadata": metadata}}
    mocked.add(responses.GET, f"{A}/v1/secret/data/app/config", json=answer)
    with pytest.raises(VaultError) as raised:
        vault().read(KV)
    assert raised.value.exit_code == 20
    assert "reading secret/app/config: Vault answered a metadata.version" in str(raised.value)
    assert "v-1234567890" not in str(raised.value)


@pytest.mark.parametrize(
    ("metadata", "version"), [({"version": 7}, 7), ({}, None), ([1], None), (None, None)]
)
def test_a_kv_read_takes_its_version_when_there_is_one(
    mocked: responses.RequestsMock, metadata: object, version: int | None
) -> None:
    answer = {"data": {"data": {"k": "v"}, "metadata": metadata}}
    mocked.add(responses.GET, f"{A}/v1/secret/data/app/config", json=answer)
    assert vault().read(KV).version == version


def test_a_read_with_an_odd_lease_duration_is_refused(mocked: responses.RequestsMock) -> None:
    answer = {"data": {"data": {"k": "v"}, "metadata": {"version": 1}}, "lease_duration": "60"}
    mocked.add(responses.GET, f"{A}/v1/secret/data/app/config", json=answer)
    with pytest.raises(VaultError) as raised:
        vault().read(KV)
    refused_naming("lease_duration", raised, "60")
