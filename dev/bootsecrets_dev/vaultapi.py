"""Typed calls to OpenBao's HTTP API for set-up and checks in the tests and the benchmark
(hvac's own methods for these are untyped). Errors are hvac's
(`hvac.exceptions.InvalidRequest` for a 400, ...).

The lease calls are the ones the agent will make, in the URL form
`sys/leases/renew/<lease_id>` and `sys/leases/revoke/<lease_id>` (which a policy can scope
to one role's leases, e.g. `sys/leases/revoke/database/creds/app/*`), plus
`sys/leases/lookup` and `sys/leases/revoke-prefix/<prefix>`. `token` makes a call with
another token than the server's root token.
"""

from __future__ import annotations

from typing import Any

import hvac

from bootsecrets_dev.openbao import OpenBao


def call(
    bao: OpenBao,
    method: str,
    path: str,
    data: dict[str, Any] | None = None,
    *,
    token: str | None = None,
) -> dict[str, Any]:
    """`method` on /v1/`path`; the decoded answer, {} for 204 No Content."""
    kwargs: dict[str, Any] = {} if data is None else {"json": data}
    client = bao.client
    if token is not None:  # hvac's adapter overwrites an X-Vault-Token header
        client = hvac.Client(
            url=bao.addr, token=token, verify=str(bao.ca_cert) if bao.ca_cert else True
        )
    response = client.adapter.request(method, f"/v1/{path}", **kwargs)
    return response if isinstance(response, dict) else {}


def write(bao: OpenBao, path: str, data: dict[str, Any]) -> dict[str, Any]:
    return call(bao, "POST", path, data)


def read(bao: OpenBao, path: str) -> dict[str, Any]:
    return call(bao, "GET", path)


def mounts(bao: OpenBao) -> set[str]:
    """Secrets engine mount paths, without the trailing slash."""
    return {m.rstrip("/") for m in read(bao, "sys/mounts")["data"]}


def enable_engine(bao: OpenBao, engine: str, mount: str, **config: Any) -> None:
    if mount not in mounts(bao):
        write(bao, f"sys/mounts/{mount}", {"type": engine, "config": config})


def renew(
    bao: OpenBao, lease_id: str, increment: int | None = None, *, token: str | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {} if increment is None else {"increment": increment}
    return call(bao, "PUT", f"sys/leases/renew/{lease_id}", data, token=token)


def lookup(bao: OpenBao, lease_id: str) -> dict[str, Any]:
    """sys/leases/lookup: `data` has ttl, expire_time, issue_time, last_renewal,
    renewable."""
    return call(bao, "PUT", "sys/leases/lookup", {"lease_id": lease_id})


def revoke(bao: OpenBao, lease_id: str, *, token: str | None = None) -> None:
    """Synchronous (`sync` defaults to true): the database role is gone when it returns."""
    call(bao, "PUT", f"sys/leases/revoke/{lease_id}", {}, token=token)


def revoke_prefix(bao: OpenBao, prefix: str) -> None:
    call(bao, "PUT", f"sys/leases/revoke-prefix/{prefix}", {})
