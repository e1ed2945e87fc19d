"""What the agent asks Vault, and a good answer to each, for fake servers (support/fakehttp.py)
that misbehave on some of them: every call `bootsecrets.vault.Vault` makes, with its method,
path, whether it may be repeated, and how to make it.

The tokens sent are leak-guard canaries: no message or log line may carry them.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bootsecrets.config import Engine, SecretRef
from bootsecrets.vault import Vault
from bootsecrets.vaultanswers import TokenInfo
from bootsecrets.vaultconfig import VaultSettings
from support.fakehttp import Handler, Reply, Request
from support.openbao import CANARIES

WRAPPING_TOKEN = "s.wrap-" + secrets.token_hex(12)
SECRET_ID = "sid-" + secrets.token_hex(12)
CLIENT_TOKEN = "s.client-" + secrets.token_hex(12)
ROLE_ID = "role-" + secrets.token_hex(8)
VALUE = "value-" + secrets.token_hex(12)
CANARIES.update({WRAPPING_TOKEN, SECRET_ID, CLIENT_TOKEN, VALUE})
TOKENS = (WRAPPING_TOKEN, SECRET_ID, CLIENT_TOKEN)
REF = SecretRef("db", "secret", "app/db", Engine.KV2)

AUTH = {
    "auth": {
        "client_token": CLIENT_TOKEN,
        "accessor": "acc",
        "lease_duration": 3600,
        "renewable": True,
        "token_policies": ["p"],
    }
}
ANSWERS: dict[str, dict[str, Any]] = {
    "/v1/sys/wrapping/lookup": {
        "data": {
            "creation_path": "auth/approle/role/r/secret-id",
            "creation_ttl": 600,
            "creation_time": "2026-11-23T00:00:00Z",
        }
    },
    "/v1/sys/wrapping/unwrap": {"data": {"secret_id": SECRET_ID, "secret_id_accessor": "a"}},
    "/v1/auth/approle/login": AUTH,
    "/v1/secret/data/app/db": {"data": {"data": {"password": VALUE}, "metadata": {"version": 3}}},
    "/v1/auth/token/lookup-self": {
        "data": {"accessor": "acc", "ttl": 3000, "renewable": True, "policies": ["p"]}
    },
    "/v1/auth/token/renew-self": AUTH,
}


@dataclasses.dataclass(frozen=True)
class Call:
    name: str
    path: str
    idempotent: bool
    make: Callable[[Vault], object]

    def __str__(self) -> str:
        return self.name


CALLS = (
    Call("lookup", "/v1/sys/wrapping/lookup", True, lambda v: v.lookup_wrapping(WRAPPING_TOKEN)),
    Call("unwrap", "/v1/sys/wrapping/unwrap", False, lambda v: v.unwrap_secret_id(WRAPPING_TOKEN)),
    Call(
        "login",
        "/v1/auth/approle/login",
        False,
        lambda v: v.login_approle("approle", ROLE_ID, SECRET_ID),
    ),
    Call("read", "/v1/secret/data/app/db", True, lambda v: v.read(REF)),
    Call("lookup-self", "/v1/auth/token/lookup-self", True, lambda v: v.use_token(CLIENT_TOKEN)),
    Call("renew-self", "/v1/auth/token/renew-self", True, lambda v: v.renew_self()),
)
CALL = {call.name: call for call in CALLS}


def good(request: Request, reply: Reply) -> None:
    """A Vault that answers every call of CALLS well."""
    answer = ANSWERS.get(request.path)
    if answer is None:
        reply.answer(404, {"errors": []})
    else:
        reply.answer(200, answer)


def unless(path: str, handler: Handler) -> Handler:
    """`handler` for requests to `path`, a good answer to the others."""

    def handle(request: Request, reply: Reply) -> None:
        (handler if request.path == path else good)(request, reply)

    return handle


def vault(
    *addresses: str, request_timeout: float = 5, deadline: float = 10, ca_cert: Path | None = None
) -> Vault:
    """A Vault session on `addresses`, holding a client token (for reads and renewals)."""
    settings = VaultSettings(
        addresses=addresses,
        request_timeout=request_timeout,
        boot_deadline=deadline,
        ca_cert=ca_cert,
    )
    session = Vault(settings)
    session.token = TokenInfo(CLIENT_TOKEN, "acc", 3600, True)
    return session
