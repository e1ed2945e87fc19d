"""What Vault answers, read strictly: the `data` of an answer, durations, tokens, the
wrapping lookup. A field of the wrong type or out of range is a VaultError naming the
field, never a crash deeper in (a date, the schedule's arithmetic), and never carries the
value."""

from __future__ import annotations

import dataclasses
from typing import Any

from bootsecrets.errors import VaultError
from bootsecrets.model import MAX_LEASE_SECONDS


@dataclasses.dataclass(frozen=True)
class WrapInfo:
    creation_path: str
    creation_ttl: int
    creation_time: str


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """A Vault token and what is known about it. `repr` hides the token."""

    token: str = dataclasses.field(repr=False)
    accessor: str
    ttl: int
    renewable: bool
    policies: tuple[str, ...] = ()
    #: The TTL the token was created (or last renewed) with; renewal is due at half of it.
    creation_ttl: int = 0


def data_of(response: object, what: str) -> dict[str, Any]:
    data = response.get("data") if isinstance(response, dict) else None
    if not isinstance(data, dict):
        raise VaultError(f"{what}: Vault's answer has no data")
    return data


def seconds(value: object, what: str, field: str) -> int:
    """A duration in Vault's answer (`ttl`, `lease_duration`, ...): whole seconds up to
    MAX_LEASE_SECONDS, 0 when absent."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LEASE_SECONDS:
        raise VaultError(f"{what}: Vault answered a {field} that is not a number of seconds")
    return value


def kv_version(metadata: object, what: str) -> int | None:
    """The version in a KV v2 read's `metadata` (None when absent or 0)."""
    version = metadata.get("version") if isinstance(metadata, dict) else None
    if version is None or version == 0:
        return None
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise VaultError(f"{what}: Vault answered a metadata.version that is not a version")
    return version


def wrap_info(response: object) -> WrapInfo:
    """`sys/wrapping/lookup`'s answer."""
    what = "sys/wrapping/lookup"
    data = data_of(response, what)
    return WrapInfo(
        creation_path=str(data.get("creation_path", "")),
        creation_ttl=seconds(data.get("creation_ttl"), what, "creation_ttl"),
        creation_time=str(data.get("creation_time", "")),
    )


def token_info(response: object) -> TokenInfo:
    """The `auth` of a login's or a renewal's answer."""
    auth = response.get("auth") if isinstance(response, dict) else None
    if not isinstance(auth, dict) or not isinstance(auth.get("client_token"), str):
        raise VaultError("Vault's login answer has no token")
    ttl = seconds(auth.get("lease_duration"), "auth", "lease_duration")
    return TokenInfo(
        token=auth["client_token"],
        accessor=str(auth.get("accessor", "")),
        ttl=ttl,
        renewable=bool(auth.get("renewable")),
        policies=_policies(auth.get("token_policies") or auth.get("policies")),
        creation_ttl=ttl,
    )


def looked_up_token(token: str, response: object) -> TokenInfo:
    """`auth/token/lookup-self`'s answer about `token`."""
    what = "auth/token/lookup-self"
    data = data_of(response, what)
    return TokenInfo(
        token=token,
        accessor=str(data.get("accessor", "")),
        ttl=seconds(data.get("ttl"), what, "ttl"),
        renewable=bool(data.get("renewable")),
        policies=_policies(data.get("policies")),
        creation_ttl=seconds(data.get("creation_ttl"), what, "creation_ttl"),
    )


def _policies(value: object) -> tuple[str, ...]:
    return tuple(str(p) for p in value) if isinstance(value, list) else ()
