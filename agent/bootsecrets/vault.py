"""The Vault/OpenBao edge: hvac over one pooled requests session.

Every call goes through `Vault._call`, which fails over between the configured addresses and
retries what is safe to retry (connection errors, timeouts, 429, 500/502/503, sealed or
standby answers) with exponential backoff and full jitter until the deadline. Requests that
consume something (unwrap, AppRole login with a single-use secret-id) are retried only when
the server cannot have acted on them; a lost answer is reported, never repeated blindly.

Nothing here puts a token, secret-id or value into a message.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
import requests.adapters
import urllib3.connection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from bootsecrets import logs
from bootsecrets.config import Engine, SecretRef, VaultSettings
from bootsecrets.connect import EarlyConnection
from bootsecrets.errors import (
    BootsecretsError,
    ConfigError,
    LoginDenied,
    PermissionDenied,
    ResponseLost,
    SecretMissing,
    TLSVerifyFailed,
    TokenInvalid,
    VaultError,
    VaultUnreachable,
    WrappingPathMismatch,
    WrappingTokenAlreadyUsed,
    WrappingTokenInvalid,
)
from bootsecrets.render import SecretData

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Reads in flight at once, and keep-alive connections kept for them.
MAX_CONCURRENT_READS = 32

#: Server answers after which the request was certainly not acted on.
_NOT_PROCESSED = (hvac.exceptions.VaultDown, hvac.exceptions.RateLimitExceeded)
#: Server answers worth retrying for idempotent requests.
_RETRYABLE_STATUS = (
    *_NOT_PROCESSED, hvac.exceptions.InternalServerError, hvac.exceptions.BadGateway,
)

#: Answers that mean something specific at each call site, which maps them.
_CALLER_MAPS = (
    hvac.exceptions.InvalidRequest, hvac.exceptions.Unauthorized, hvac.exceptions.Forbidden,
    hvac.exceptions.InvalidPath,
)


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


def _reason(err: BaseException) -> str:
    """A short, value-free reason for a transport or server failure."""
    if isinstance(err, hvac.exceptions.VaultError):
        status = getattr(err, "status_code", None) or "error"
        if isinstance(err, hvac.exceptions.VaultDown):
            return f"HTTP {status} (sealed or standby)"
        return f"HTTP {status}"
    if isinstance(err, requests.exceptions.SSLError):
        return "TLS verification failed"
    if isinstance(err, requests.exceptions.ConnectTimeout):
        return "connect timeout"
    if isinstance(err, requests.exceptions.Timeout):
        return "timeout"
    if isinstance(err, requests.exceptions.ConnectionError):
        return "connection failed"
    return type(err).__name__


def _never_sent(err: BaseException) -> bool:
    """True when the request cannot have reached the server (it is safe to send again)."""
    if isinstance(err, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(err, requests.exceptions.SSLError | requests.exceptions.ProxyError):
        return True
    if isinstance(err, requests.exceptions.ConnectionError):
        text = repr(err.args[0]) if err.args else ""
        return "NewConnectionError" in text or "NameResolutionError" in text
    if isinstance(err, hvac.exceptions.InternalServerError):
        # A standby during a leader election: it had no active node to pass the request to.
        return "active cluster node not found" in _vault_errors(err)
    return isinstance(err, _NOT_PROCESSED)


def _early_socket(conn: urllib3.connection.HTTPConnection,
                  early: EarlyConnection | None) -> socket.socket | None:
    sock = early.take(conn.host, conn.port) if early is not None else None
    if sock is not None:
        for option in conn.socket_options or ():
            sock.setsockopt(*option)
    return sock


class _HTTPConnection(urllib3.connection.HTTPConnection):
    """urllib3's connection, which can start on a socket connect.EarlyConnection opened."""

    early: EarlyConnection | None = None

    def _new_conn(self) -> socket.socket:
        early, self.early = self.early, None
        return _early_socket(self, early) or super()._new_conn()


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    """The same for https: TLS is set up on the early socket as on any other."""

    early: EarlyConnection | None = None

    def _new_conn(self) -> socket.socket:
        early, self.early = self.early, None
        return _early_socket(self, early) or super()._new_conn()


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter, able to open keep-alive connections before requests need them.

    urllib3 has no public call for that; its pool's `_get_conn`/`_put_conn` pair (take a
    slot, give it back) has been stable since urllib3 1.x. tests/test_vault_connections.py
    fails if requests stop using the connections opened here.
    """

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def _pool(self, url: str, verify: bool | str) -> HTTPConnectionPool | None:
        request = requests.Request("GET", url).prepare()
        pool = self.get_connection_with_tls_context(request, verify, proxies={})
        return pool if isinstance(pool, HTTPConnectionPool) else None

    def adopt(self, url: str, verify: bool | str, early: EarlyConnection) -> None:
        """Let the next new connection to `url` start on `early`'s socket."""
        pool = self._pool(url, verify)
        if pool is None:
            early.close()
            return
        conn = pool._get_conn()
        if isinstance(conn, _HTTPConnection | _HTTPSConnection) and not conn.is_connected:
            conn.early = early
        else:
            early.close()
        pool._put_conn(conn)

    def preconnect(
        self, url: str, verify: bool | str, timeout: float, count: int,
        submit: Callable[[Callable[[], None]], Future[None]],
    ) -> list[Future[None]]:
        """Open `count` connections to `url` in this adapter's pool in the background (TCP
        and, for https, TLS handshakes), so that the requests that take them later skip the
        handshakes. A connection that fails is closed; the request that takes it connects
        again and reports the error. All slots are taken before any is given back, so no two
        handshakes land on the same slot.
        """
        pool = self._pool(url, verify)
        if pool is None:
            return []
        conns = [pool._get_conn() for _ in range(count)]

        def connect(conn: Any) -> None:
            try:
                if not conn.is_connected:
                    conn.timeout = timeout
                    conn.connect()
            except Exception as err:  # only an optimisation: the request reports
                conn.close()
                log.debug("opening a connection to %s ahead of a read failed: %s", url,
                          _reason(err))
            finally:
                pool._put_conn(conn)

        return [submit(functools.partial(connect, conn)) for conn in conns]


def _vault_errors(err: hvac.exceptions.VaultError) -> str:
    errors = [str(e) for e in (getattr(err, "errors", None) or []) if e]
    return "; ".join(errors)[:200] or "no details"


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
        loaded (connect.py); the first request to that address goes out on it."""
        self.addresses = tuple(addresses or settings.addresses)
        if not self.addresses:
            raise ConfigError("config", None, "vault.address",
                              "no Vault address: set it in the image config or user-data")
        self._sleep = sleep
        self._clock = clock
        self._deadline = clock() + (settings.boot_deadline if deadline is None else deadline)
        verify: bool | str = True
        if settings.ca_cert is not None:
            verify = str(_check_ca_bundle(settings.ca_cert, config_root))
        self._verify = verify
        self._timeout = settings.request_timeout
        # Two sessions, so that connections opened for the reads while the login is in flight
        # (prepare_reads) never take the one the login is about to use.
        self._session, self._clients = self._connect(settings, verify)
        self._read_session, self._read_clients = self._connect(settings, verify)
        if early is not None:
            adapter = self._session.get_adapter(self.addresses[0])
            if isinstance(adapter, _Adapter):
                adapter.adopt(self.addresses[0], verify, early)
        self._workers: ThreadPoolExecutor | None = None
        self._preconnects: Future[list[Future[None]]] | None = None
        self._preferred = 0
        self.token: TokenInfo | None = None

    def _connect(
        self, settings: VaultSettings, verify: bool | str
    ) -> tuple[requests.Session, list[hvac.Client]]:
        session = requests.Session()
        adapter = _Adapter(pool_connections=4, pool_maxsize=MAX_CONCURRENT_READS, max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.trust_env = False  # no proxies or netrc credentials picked up from the env
        session.verify = verify  # hvac takes `verify` from a session it is given, not its arg
        clients = [
            hvac.Client(url=address, token="", verify=verify, timeout=settings.request_timeout,  # type: ignore[arg-type]
                        namespace=settings.namespace, session=session)
            for address in self.addresses
        ]
        return session, clients

    def close(self) -> None:
        if self._workers is not None:
            self._workers.shutdown(wait=True, cancel_futures=True)
            self._workers = None
        self._session.close()
        self._read_session.close()

    def _pool(self) -> ThreadPoolExecutor:
        if self._workers is None:
            self._workers = ThreadPoolExecutor(max_workers=MAX_CONCURRENT_READS,
                                               thread_name_prefix="vault")
        return self._workers

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ------------------------------------------------------------------------

    def _call(
        self, what: str, request: Callable[[hvac.Client], _T], *, idempotent: bool = True,
        clients: Sequence[hvac.Client] | None = None,
    ) -> _T:
        """Run `request` against the preferred address, failing over and retrying.

        A non-idempotent request is retried only if the server cannot have acted on it;
        otherwise ResponseLost is raised. Other Vault answers (400/403/404) propagate as
        hvac exceptions for the caller to map.
        """
        clients = self._clients if clients is None else clients
        attempt = 0
        last = "no attempt"
        while True:
            for offset in range(len(clients)):
                index = (self._preferred + offset) % len(clients)
                try:
                    result = request(clients[index])
                except requests.exceptions.SSLError:
                    # Not transient: retrying a certificate that does not verify only hides it.
                    tls = TLSVerifyFailed(
                        f"{what}: TLS verification of {self.addresses[index]} failed; check "
                        "vault.ca_cert (or VAULT_CACERT)"
                    )
                    logs.alert(tls, VAULT_ADDR=self.addresses[index])
                    raise tls from None
                except (requests.exceptions.RequestException, *_RETRYABLE_STATUS) as err:
                    last = f"{self.addresses[index]}: {_reason(err)}"
                    if not idempotent and not _never_sent(err):
                        raise ResponseLost(what, _reason(err)) from None
                    log.debug("%s failed (%s), trying next", what, last)
                    continue
                except hvac.exceptions.VaultError as err:
                    if isinstance(err, _CALLER_MAPS):
                        raise
                    raise VaultError(f"{what}: {_reason(err)}: {_vault_errors(err)}") from None
                self._preferred = index
                return result
            attempt += 1
            remaining = self._deadline - self._clock()
            if remaining <= 0:
                raise VaultUnreachable(
                    f"Vault did not answer {what} before the deadline (last: {last})"
                )
            # Full jitter, capped so a server that comes back is used within ~4 s.
            delay = min(remaining, random.uniform(0, min(4.0, 0.25 * 2**attempt)))  # noqa: S311
            log.info("Vault not answering %s (%s); retrying in %.1fs", what, last, delay)
            self._sleep(delay)

    def _headers(self, token: str) -> dict[str, str]:
        return {"X-Vault-Token": token}

    # --- wrapped secret-id ------------------------------------------------------------------

    def lookup_wrapping(self, wrapping_token: str) -> WrapInfo:
        try:
            response = self._call("sys/wrapping/lookup", lambda c: c.adapter.post(
                "/v1/sys/wrapping/lookup", json={"token": wrapping_token}))
        except _CALLER_MAPS:
            raise WrappingTokenInvalid(
                "the wrapped secret-id is unknown to Vault: expired, already unwrapped, "
                "or never issued"
            ) from None
        data = _data(response, "sys/wrapping/lookup")
        return WrapInfo(
            creation_path=str(data.get("creation_path", "")),
            creation_ttl=int(data.get("creation_ttl") or 0),
            creation_time=str(data.get("creation_time", "")),
        )

    def unwrap_secret_id(self, wrapping_token: str) -> tuple[str, str]:
        """Unwrap once. Returns (secret_id, secret_id_accessor)."""
        try:
            response = self._call(
                "sys/wrapping/unwrap",
                lambda c: c.adapter.post("/v1/sys/wrapping/unwrap",
                                         headers=self._headers(wrapping_token)),
                idempotent=False,
            )
        except _CALLER_MAPS:
            raise WrappingTokenAlreadyUsed(
                "Vault refused to unwrap a wrapped secret-id it had just looked up: "
                "it was unwrapped by someone else in between"
            ) from None
        data = _data(response, "sys/wrapping/unwrap")
        secret_id = data.get("secret_id")
        if not isinstance(secret_id, str) or not secret_id:
            raise WrappingPathMismatch("the unwrapped response holds no AppRole secret_id")
        return secret_id, str(data.get("secret_id_accessor", ""))

    def login_approle(self, mount: str, role_id: str, secret_id: str) -> TokenInfo:
        try:
            response = self._call(
                f"auth/{mount}/login",
                lambda c: c.auth.approle.login(role_id=role_id, secret_id=secret_id,
                                               mount_point=mount, use_token=False),
                idempotent=False,
            )
        except _CALLER_MAPS as err:
            raise LoginDenied(
                f"AppRole login at auth/{mount} refused: {_vault_errors(err)}"
            ) from None
        self.token = _token_info(response.get("auth") if isinstance(response, dict) else None)
        return self.token

    # --- token ----------------------------------------------------------------------------

    def use_token(self, token: str) -> TokenInfo:
        """Adopt a stored token after checking it is still valid (lookup-self)."""
        try:
            response = self._call("auth/token/lookup-self", lambda c: c.adapter.get(
                "/v1/auth/token/lookup-self", headers=self._headers(token)))
        except _CALLER_MAPS:
            raise TokenInvalid("the stored Vault token was revoked or has expired") from None
        data = _data(response, "auth/token/lookup-self")
        self.token = TokenInfo(
            token=token,
            accessor=str(data.get("accessor", "")),
            ttl=int(data.get("ttl") or 0),
            renewable=bool(data.get("renewable")),
            policies=tuple(str(p) for p in data.get("policies") or ()),
            creation_ttl=int(data.get("creation_ttl") or 0),
        )
        return self.token

    def renew_self(self) -> TokenInfo:
        token = self._require_token()
        try:
            response = self._call("auth/token/renew-self", lambda c: c.adapter.post(
                "/v1/auth/token/renew-self", headers=self._headers(token.token)))
        except _CALLER_MAPS:
            raise TokenInvalid("the Vault token can no longer be renewed") from None
        self.token = _token_info(response.get("auth") if isinstance(response, dict) else None)
        return self.token

    def _require_token(self) -> TokenInfo:
        if self.token is None:
            raise BootsecretsError("internal: no Vault token")
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
        address = self.addresses[self._preferred]
        adapter = self._read_session.get_adapter(address)
        if not isinstance(adapter, _Adapter):
            return
        pool = self._pool()

        def open_connections() -> list[Future[None]]:
            try:
                return adapter.preconnect(address, self._verify, self._timeout,
                                          min(count, MAX_CONCURRENT_READS), pool.submit)
            except Exception as err:  # only an optimisation: the reads connect and report
                log.debug("opening connections ahead of the reads failed: %s", _reason(err))
                return []

        self._preconnects = pool.submit(open_connections)

    def read(self, ref: SecretRef) -> SecretData:
        token = self._require_token().token
        try:
            response = self._call(f"read {ref.full_path}", lambda c: c.adapter.get(
                f"/v1/{ref.api_path}", headers=self._headers(token)),
                clients=self._read_clients)
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
            raise PermissionDenied(ref.full_path) from None
        except hvac.exceptions.InvalidPath:
            raise SecretMissing(ref.full_path) from None
        except hvac.exceptions.InvalidRequest as err:
            raise VaultError(f"reading {ref.full_path}: {_vault_errors(err)}") from None
        payload = response if isinstance(response, dict) else {}
        data = _data(response, ref.full_path)
        version = None
        if ref.engine is Engine.KV2:
            metadata = data.get("metadata") or {}
            inner = data.get("data")
            if not isinstance(inner, dict):
                raise SecretMissing(ref.full_path)  # deleted or destroyed version
            data = inner
            version = int(metadata.get("version") or 0) or None
        if not all(isinstance(k, str) for k in data):
            raise VaultError(f"reading {ref.full_path}: keys are not strings")
        return SecretData(
            name=ref.name,
            path=ref.full_path,
            data=data,
            version=version,
            lease_id=str(payload.get("lease_id") or "") or None,
            lease_duration=int(payload.get("lease_duration") or 0) or None,
        )

    def read_all(
        self, refs: Sequence[SecretRef]
    ) -> dict[str, SecretData | BootsecretsError]:
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

        # Connections being opened for these reads: let them finish rather than open more
        # (each is bounded by the request timeout).
        if self._preconnects is not None:
            wait_for_futures(self._preconnects.result())
            self._preconnects = None
        # One batch: every distinct path in flight at once (20 paths read 8 at a time would
        # cost three round trips more on a distant Vault).
        results = list(self._pool().map(one, refs))
        return {ref.name: result for ref, result in zip(refs, results, strict=True)}


def _data(response: object, what: str) -> dict[str, Any]:
    data = response.get("data") if isinstance(response, dict) else None
    if not isinstance(data, dict):
        raise VaultError(f"{what}: Vault's answer has no data")
    return data


def _token_info(auth: Mapping[str, Any] | None) -> TokenInfo:
    if not auth or not isinstance(auth.get("client_token"), str):
        raise VaultError("Vault's login answer has no token")
    return TokenInfo(
        token=auth["client_token"],
        accessor=str(auth.get("accessor", "")),
        ttl=int(auth.get("lease_duration") or 0),
        renewable=bool(auth.get("renewable")),
        policies=tuple(str(p) for p in auth.get("token_policies") or auth.get("policies") or ()),
        creation_ttl=int(auth.get("lease_duration") or 0),
    )


def _check_ca_bundle(ca_cert: Path, root: Path) -> Path:
    path = root / ca_cert.relative_to("/") if ca_cert.is_absolute() else ca_cert
    try:
        head = path.read_bytes()
    except OSError as err:
        raise ConfigError(str(path), None, "vault.ca_cert",
                          f"cannot read the CA bundle: {err.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in head:
        raise ConfigError(str(path), None, "vault.ca_cert", "is not a PEM certificate bundle")
    return path
