"""Leased secrets at Vault: issue (database credentials, PKI certificates), renew and revoke
a lease (docs/leases.md; the decisions are leases.py's, the flow leasing.py's). No value and
no lease ID reaches an error: Vault's own text is scrubbed of the ID."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hvac.exceptions

from bootsecrets.config import SecretRef
from bootsecrets.connect.failover import vault_errors
from bootsecrets.errors import CertificateRefused, PermissionDenied, VaultError, VaultUnreachable
from bootsecrets.model import LeaseGrant
from bootsecrets.vault import Vault
from bootsecrets.vaultanswers import data_of, seconds


def issue(
    vault: Vault, ref: SecretRef, body: Mapping[str, Any] | None, *, idempotent: bool
) -> LeaseGrant:
    """New credentials (`GET <mount>/creds/<role>`, body None) or a certificate (`POST
    <mount>/issue/<role>` with body). 401/403: PermissionDenied; a pki 400:
    CertificateRefused; other 400/404: VaultError. No value or lease ID in an error."""
    what = f"issue {ref.full_path}"
    try:
        response = vault.request(
            "GET" if body is None else "POST",
            ref.full_path,
            what=what,
            idempotent=idempotent,
            body=body,
        )
    except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
        raise PermissionDenied(ref.full_path) from None
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath) as err:
        if body is not None and isinstance(err, hvac.exceptions.InvalidRequest):
            raise CertificateRefused(
                ref.name, ref.full_path, f"refused by the role: {vault_errors(err)}"
            ) from None
        raise VaultError(f"{what}: {_status(err)}: {vault_errors(err)}") from None
    payload = response if isinstance(response, dict) else {}
    lease_id = str(payload.get("lease_id") or "")
    if lease_id and not _lease_id_ok(lease_id):
        raise VaultError(f"{what}: Vault answered a lease ID of an unexpected shape")
    return LeaseGrant(
        data_of(response, what),
        lease_id,
        seconds(payload.get("lease_duration"), what, "lease_duration"),
        bool(payload.get("renewable")),
    )


def renew_lease(vault: Vault, lease_id: str, increment: int, *, what: str) -> tuple[int, bool]:
    """`PUT sys/leases/renew/<lease_id>`: (lease_duration, renewable) as answered."""
    response = _lease_call(vault, "renew", lease_id, {"increment": increment}, what)
    payload = response if isinstance(response, dict) else {}
    return seconds(payload.get("lease_duration"), what, "lease_duration"), bool(
        payload.get("renewable")
    )


def revoke_lease(vault: Vault, lease_id: str, *, what: str) -> None:
    """`PUT sys/leases/revoke/<lease_id>`: synchronous; an unknown lease is no error."""
    _lease_call(vault, "revoke", lease_id, {}, what)


def _lease_call(
    vault: Vault, verb: str, lease_id: str, body: Mapping[str, Any], what: str
) -> object:
    """The URL form, which a policy can scope to one role's leases. Every error is a
    VaultError without the lease ID (Vault's text is scrubbed of it too)."""
    if not _lease_id_ok(lease_id):
        raise VaultError(f"{what}: the kept lease ID has an unexpected shape")
    try:
        return vault.request("PUT", f"sys/leases/{verb}/{lease_id}", what=what, body=body)
    except (hvac.exceptions.VaultError, VaultError) as err:
        if isinstance(err, hvac.exceptions.VaultError):
            text = f"{what}: {_status(err)}: {vault_errors(err)}"
        else:
            text = str(err)
        for part in (lease_id, lease_id.rsplit("/", 1)[-1]):
            text = text.replace(part, "<lease>")
        raise (VaultUnreachable if isinstance(err, VaultUnreachable) else VaultError)(
            text
        ) from None


def _status(err: hvac.exceptions.VaultError) -> str:
    """The HTTP status of the answers a caller maps (hvac's exceptions may not say)."""
    codes = {
        hvac.exceptions.InvalidRequest: 400,
        hvac.exceptions.Unauthorized: 401,
        hvac.exceptions.Forbidden: 403,
        hvac.exceptions.InvalidPath: 404,
    }
    code = getattr(err, "status_code", None) or codes.get(type(err))
    return f"HTTP {code}" if code else type(err).__name__


def _lease_id_ok(lease_id: str) -> bool:
    """`database/creds/app/AbC123`: it goes into a URL path, so nothing else."""
    return all(
        part not in ("", ".", "..")
        and all(ch.isascii() and (ch.isalnum() or ch in "_.-") for ch in part)
        for part in lease_id.split("/")
    )
