"""The Vault/OpenBao API: wrapping lookup, unwrap, AppRole login, token lookup and renewal,
KV v2/v1 reads, over hvac on two pooled requests sessions.

How requests reach Vault (failover, retries, redirects, deadlines) is connect/failover.py; the
HTTP transport under it (origins, whole-request deadlines, the size cap, connections opened
ahead) is connect/transport.py. Nothing here puts a token, secret-id or value into a message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests

from bootsecrets.config import Engine, SecretRef
from bootsecrets.connect import EarlyConnection
from bootsecrets.connect.failover import CALLER_MAPS, Failover, vault_errors
from bootsecrets.connect.transport import Adapter, session_for
from bootsecrets.errors import (
    BootsecretsError,
    ConfigError,
    LoginDenied,
    PermissionDenied,
    SecretMissing,
    TokenInvalid,
    VaultError,
    WrappingPathMismatch,
    WrappingTokenAlreadyUsed,
    WrappingTokenInvalid,
)
from bootsecrets.fsio import read_regular_file
from bootsecrets.fsread import FileRefused
from bootsecrets.model import SecretData
from bootsecrets.vaultanswers import (
    TokenInfo,
    WrapInfo,
    data_of,
    kv_version,
    looked_up_token,
    seconds,
    token_info,
    wrap_info,
)
from bootsecrets.vaultconfig import VaultSettings

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Reads in flight at once, and keep-alive connections kept for them.
MAX_CONCURRENT_READS = 32


class Vault:
    """One agent run's view of Vault. Not thread-safe for login; reads run concurrently."""

    def __init__(
        self,
        settings: VaultSettings,
        *,
        addresses: Sequence[str] | None = None,
        deadline: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        config_root: Path = Path("/"),
        early: EarlyConnection | None = None,
    ) -> None:
        """`early`: a connection to the first address, opened before this module was
        loaded (bootsecrets.connect); the first request to that address goes out on it."""
        self.addresses = tuple(addresses or settings.addresses)
        if not self.addresses:
            raise ConfigError(
                "config",
                None,
                "vault.address",
                "no Vault address: set it in the image config or user-data",
            )
        self._failover = Failover(
            self.addresses,
            request_timeout=settings.request_timeout,
            clock=clock,
            sleep=sleep,
            deadline=settings.boot_deadline if deadline is None else deadline,
        )
        verify: bool | str = True
        if settings.ca_cert is not None:
            verify = str(_check_ca_bundle(settings.ca_cert, config_root))
        self._verify = verify
        # Two sessions, so that connections opened for the reads while the login is in flight
        # (prepare_reads) never take the one the login is about to use.
        self._session, self._clients = self._connect(settings, verify)
        self._read_session, self._read_clients = self._connect(settings, verify)
        if early is not None:
            adapter = self._session.get_adapter(self.addresses[0])
            if isinstance(adapter, Adapter):
                adapter.adopt(self.addresses[0], verify, early)
        self._workers: ThreadPoolExecutor | None = None
        self._preconnects: Future[list[Future[None]]] | None = None
        self.token: TokenInfo | None = None

    def _connect(
        self, settings: VaultSettings, verify: bool | str
    ) -> tuple[requests.Session, list[hvac.Client]]:
        session = session_for(self.addresses, verify, MAX_CONCURRENT_READS)
        clients = [
            hvac.Client(
                url=address,
                token="",
                verify=verify,
                timeout=settings.request_timeout,  # type: ignore[arg-type]
                namespace=settings.namespace,
                session=session,
                allow_redirects=False,
            )
            for address in self.addresses
        ]
        return session, clients

    @property
    def answering_address(self) -> str:
        """The address that answered last (where the next request goes first)."""
        return self.addresses[self._failover.preferred]

    def close(self) -> None:
        if self._workers is not None:
            self._workers.shutdown(wait=True, cancel_futures=True)
            self._workers = None
        self._session.close()
        self._read_session.close()

    def _pool(self) -> ThreadPoolExecutor:
        if self._workers is None:
            self._workers = ThreadPoolExecutor(
                max_workers=MAX_CONCURRENT_READS, thread_name_prefix="vault"
            )
        return self._workers

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ------------------------------------------------------------------------

    def _call(
        self,
        what: str,
        request: Callable[[hvac.Client], _T],
        *,
        idempotent: bool = True,
        clients: Sequence[hvac.Client] | None = None,
    ) -> _T:
        """`request` on one of `clients` (by default the login session's), through the
        failover (connect/failover.py)."""
        chosen = self._clients if clients is None else clients
        return self._failover.call(
            what, lambda index: request(chosen[index]), idempotent=idempotent
        )

    def _headers(self, token: str) -> dict[str, str]:
        return {"X-Vault-Token": token}

    # --- wrapped secret-id ------------------------------------------------------------------

    def lookup_wrapping(self, wrapping_token: str) -> WrapInfo:
        try:
            response = self._call(
                "sys/wrapping/lookup",
                lambda c: c.adapter.post("/v1/sys/wrapping/lookup", json={"token": wrapping_token}),
            )
        except CALLER_MAPS:
            raise WrappingTokenInvalid(
                "the wrapped secret-id is unknown to Vault: expired, already unwrapped, "
                "or never issued"
            ) from None
        return wrap_info(response)

    def unwrap_secret_id(self, wrapping_token: str) -> tuple[str, str]:
        """Unwrap once. Returns (secret_id, secret_id_accessor)."""
        try:
            response = self._call(
                "sys/wrapping/unwrap",
                lambda c: c.adapter.post(
                    "/v1/sys/wrapping/unwrap", headers=self._headers(wrapping_token)
                ),
                idempotent=False,
            )
        except CALLER_MAPS:
            raise WrappingTokenAlreadyUsed(
                "Vault refused to unwrap a wrapped secret-id it had just looked up: "
                "it was unwrapped by someone else in between"
            ) from None
        data = data_of(response, "sys/wrapping/unwrap")
        secret_id = data.get("secret_id")
        if not isinstance(secret_id, str) or not secret_id:
            raise WrappingPathMismatch("the unwrapped response holds no AppRole secret_id")
        return secret_id, str(data.get("secret_id_accessor", ""))

    def login_approle(self, mount: str, role_id: str, secret_id: str) -> TokenInfo:
        try:
            response = self._call(
                f"auth/{mount}/login",
                lambda c: c.auth.approle.login(
                    role_id=role_id, secret_id=secret_id, mount_point=mount, use_token=False
                ),
                idempotent=False,
            )
        except CALLER_MAPS as err:
            raise LoginDenied(
                f"AppRole login at auth/{mount} refused: {vault_errors(err)}"
            ) from None
        self.token = token_info(response)
        return self.token

    # --- token ----------------------------------------------------------------------------

    def use_token(self, token: str) -> TokenInfo:
        """Adopt a stored token after checking it is still valid (lookup-self)."""
        try:
            response = self._call(
                "auth/token/lookup-self",
                lambda c: c.adapter.get("/v1/auth/token/lookup-self", headers=self._headers(token)),
            )
        except CALLER_MAPS:
            raise TokenInvalid("the stored Vault token was revoked or has expired") from None
        self.token = looked_up_token(token, response)
        return self.token

    def renew_self(self) -> TokenInfo:
        token = self._require_token()
        try:
            response = self._call(
                "auth/token/renew-self",
                lambda c: c.adapter.post(
                    "/v1/auth/token/renew-self", headers=self._headers(token.token)
                ),
            )
        except CALLER_MAPS:
            raise TokenInvalid("the Vault token can no longer be renewed") from None
        self.token = token_info(response)
        return self.token

    def _require_token(self) -> TokenInfo:
        if self.token is None:
            raise RuntimeError("no Vault token: log in first")  # a bug, not an outcome
        return self.token

    # --- reads ----------------------------------------------------------------------------

    def prepare_reads(self, count: int) -> None:
        """Open the connections `count` reads will use, in the background, to the address
        that answered last; call it just before the round trips it should overlap (the
        unwrap and the login, or the token check).

        One worker starts the others: starting a thread costs ~0.2 ms of this process's
        CPU, and twenty of them, started here, would delay the next request by that much;
        started from a worker they overlap the wait for its answer.
        """
        address = self.addresses[self._failover.preferred]
        adapter = self._read_session.get_adapter(address)
        if not isinstance(adapter, Adapter):
            return
        pool = self._pool()

        def open_connections() -> list[Future[None]]:
            try:
                left = self._failover.seconds_left()
                return adapter.preconnect(
                    address, self._verify, left, min(count, MAX_CONCURRENT_READS), pool.submit
                )
            except Exception as err:  # only an optimisation: the reads connect and report
                log.debug("opening connections ahead of the reads failed: %s", type(err).__name__)
                return []

        self._preconnects = pool.submit(open_connections)

    def read(self, ref: SecretRef) -> SecretData:
        token = self._require_token().token
        try:
            response = self._call(
                f"read {ref.full_path}",
                lambda c: c.adapter.get(f"/v1/{ref.api_path}", headers=self._headers(token)),
                clients=self._read_clients,
            )
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
            raise PermissionDenied(ref.full_path) from None
        except hvac.exceptions.InvalidPath:
            raise SecretMissing(ref.full_path) from None
        except hvac.exceptions.InvalidRequest as err:
            raise VaultError(f"reading {ref.full_path}: {vault_errors(err)}") from None
        payload = response if isinstance(response, dict) else {}
        data = data_of(response, ref.full_path)
        version = None
        if ref.engine is Engine.KV2:
            inner = data.get("data")
            if not isinstance(inner, dict):
                raise SecretMissing(ref.full_path)  # deleted or destroyed version
            version = kv_version(data.get("metadata"), f"reading {ref.full_path}")
            data = inner
        if not all(isinstance(k, str) for k in data):
            raise VaultError(f"reading {ref.full_path}: keys are not strings")
        return SecretData(
            name=ref.name,
            path=ref.full_path,
            data=data,
            version=version,
            lease_id=str(payload.get("lease_id") or "") or None,
            lease_duration=seconds(
                payload.get("lease_duration"), f"reading {ref.full_path}", "lease_duration"
            )
            or None,
        )

    def read_all(self, refs: Sequence[SecretRef]) -> dict[str, SecretData | BootsecretsError]:
        """Read each distinct path once, concurrently over the pooled connections.

        Per secret name: its data, or the error reading it (callers decide whether the units
        that need it are required).
        """
        if not refs:
            return {}

        def one(ref: SecretRef) -> SecretData | BootsecretsError:
            try:
                return self.read(ref)
            except (PermissionDenied, SecretMissing) as err:
                return err

        self._connections_ready()
        # One batch: every distinct path in flight at once (20 paths read 8 at a time would
        # cost three round trips more on a distant Vault).
        results = list(self._pool().map(one, refs))
        return {ref.name: result for ref, result in zip(refs, results, strict=True)}

    def _connections_ready(self) -> None:
        """Connections being opened for the requests after the login (prepare_reads): let
        them finish rather than open more (each is bounded by the request timeout)."""
        preconnects = self._preconnects
        if preconnects is not None:
            wait_for_futures(preconnects.result())
            self._preconnects = None

    # --- other requests (Transit, leases, token revocation) ------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        idempotent: bool = True,
        body: Mapping[str, Any] | None = None,
        with_reads: bool = False,
    ) -> object:
        """`method` on `/v1/<path>` with the run's token, through the failover; Vault's
        answer as hvac gives it (its 400/401/403/404 exceptions are the caller's to map).
        `with_reads`: one of the requests sent at once with the reads, on their connections
        (opened during the login by prepare_reads)."""
        token = self._require_token().token
        if with_reads:
            self._connections_ready()
        return self._call(
            what,
            lambda c: c.adapter.request(
                method,
                f"/v1/{path}",
                headers=self._headers(token),
                json=None if body is None else dict(body),
            ),
            idempotent=idempotent,
            clients=self._read_clients if with_reads else None,
        )

    def write(
        self,
        path: str,
        body: Mapping[str, Any],
        *,
        what: str,
        idempotent: bool,
        refused: Callable[[int, str], BootsecretsError] | None = None,
        with_reads: bool = False,
    ) -> dict[str, Any]:
        """POST `body` to `path` with the run's token; Vault's `data` back ({} if none).
        401/403: PermissionDenied(path). 400/404: `refused(status, Vault's error text)`,
        a VaultError by default. The body and the answer are never part of an error.
        `with_reads`: one of the requests sent at once with the reads (a Transit request of
        the unlock), on their connections, opened during the login (prepare_reads)."""
        try:
            response = self.request(
                "POST",
                path,
                what=what,
                idempotent=idempotent,
                body=body,
                with_reads=with_reads,
            )
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
            raise PermissionDenied(path) from None
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath) as err:
            status = 404 if isinstance(err, hvac.exceptions.InvalidPath) else 400
            if refused is not None:
                raise refused(status, vault_errors(err)) from None
            raise VaultError(f"{what}: HTTP {status}: {vault_errors(err)}") from None
        data = response.get("data") if isinstance(response, dict) else None
        return data if isinstance(data, dict) else {}


MAX_CA_BUNDLE_BYTES = 1024 * 1024


def _check_ca_bundle(ca_cert: Path, root: Path) -> Path:
    path = root / ca_cert.relative_to("/") if ca_cert.is_absolute() else ca_cert
    try:  # a regular file only: a FIFO or a device there must not block or fill memory
        head = read_regular_file(path, MAX_CA_BUNDLE_BYTES)
    except FileRefused as err:
        raise ConfigError(
            str(path), None, "vault.ca_cert", f"cannot read the CA bundle: {err.reason}"
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in head:
        raise ConfigError(str(path), None, "vault.ca_cert", "is not a PEM certificate bundle")
    return path
