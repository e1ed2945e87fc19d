"""Typed calls to OpenBao's HTTP API for test set-up and checks (hvac's own methods for
these are untyped). Errors are hvac's (`hvac.exceptions.InvalidRequest` for a 400, ...).

The lease calls are the ones the agent will make: `sys/leases/renew`, `sys/leases/revoke`,
`sys/leases/lookup`, `sys/leases/revoke-prefix/<prefix>` (all PUT/POST with a JSON body).
"""

from __future__ import annotations

from typing import Any

from support.openbao import OpenBao


def call(bao: OpenBao, method: str, path: str, data: dict[str, Any] | None = None,
         ) -> dict[str, Any]:
    """`method` on /v1/`path`; the decoded answer, {} for 204 No Content."""
    kwargs: dict[str, Any] = {} if data is None else {"json": data}
    response = bao.client.adapter.request(method, f"/v1/{path}", **kwargs)
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


def renew(bao: OpenBao, lease_id: str, increment: int | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"lease_id": lease_id}
    if increment is not None:
        data["increment"] = increment
    return call(bao, "PUT", "sys/leases/renew", data)


def lookup(bao: OpenBao, lease_id: str) -> dict[str, Any]:
    """sys/leases/lookup: `data` has ttl, expire_time, issue_time, last_renewal,
    renewable."""
    return call(bao, "PUT", "sys/leases/lookup", {"lease_id": lease_id})


def revoke(bao: OpenBao, lease_id: str) -> None:
    """Synchronous (`sync` defaults to true): the database role is gone when it returns."""
    call(bao, "PUT", "sys/leases/revoke", {"lease_id": lease_id})


def revoke_prefix(bao: OpenBao, prefix: str) -> None:
    call(bao, "PUT", f"sys/leases/revoke-prefix/{prefix}", {})
