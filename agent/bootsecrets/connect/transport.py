"""HTTP to Vault: requests' adapter on urllib3 pools, with the guarantees failover.py needs.

**Only to the configured origins, never a redirect.** `Adapter.send` refuses a request whose
origin (scheme, host, port) is not one of the Vault addresses the adapter was made for
(`OriginRefused`), and never follows a redirect: every 3xx answer is raised as `Redirected`,
which carries only the origin of its Location (never its path or query, which could carry
data), for failover.py to judge. Raised from the adapter, it comes before requests' own
redirect handling (which would resend a 307's body, and X-Vault-Token, to any host) and before
hvac's (hvac passes `allow_redirects` to requests; hvac 0.x followed 307s in its own loop), so
neither can follow a redirect whatever it is told.

**A deadline for the whole request**, from connecting to the last byte of the answer
(connect/deadline.py says how): the current `time_limit()`, or the `timeout` requests passes.
Connecting is bounded by the connect timeout, set to what is left. Not bounded: name
resolution (getaddrinfo cannot be interrupted; the resolver's own timeouts apply, by default
5 s x 2 attempts).

**A cap on the answer.** The body is read here, not by requests: refused above
`MAX_RESPONSE_BYTES` before any of it is read when Content-Length says so, and counted while
it streams otherwise (chunked, or read to the end of the connection). The count is of decoded
bytes; the agent asks for no content coding anyway.

**Connections opened ahead.** `Adapter.adopt` starts the next new connection on a socket
`EarlyConnection` opened before this module was loaded; `Adapter.preconnect` opens the read
connections while the login is in flight. tests/test_vault_connections.py fails if requests
stop using them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Any

import requests
import requests.adapters
import urllib3.connection
import urllib3.exceptions
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from bootsecrets.connect import EarlyConnection
from bootsecrets.connect import deadline as deadlines

log = logging.getLogger(__name__)

#: The largest answer read from Vault, in bytes. Vault's integrated storage keeps an entry to
#: 1 MiB (raft `max_entry_size`), so no secret is bigger; the rest is room for JSON escaping
#: and metadata. 32 reads at once stay within ~130 MiB even if every answer is hostile.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: The end of a request nothing else bounds (failover.py always sets one).
DEFAULT_TIMEOUT = 30.0
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK = 64 * 1024


# --- origins -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a request goes: scheme, host and port, compared exactly (https and http on the
    same host are two origins)."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = "".join(
            c if " " < c <= "~" else c.encode("unicode_escape").decode("ascii")
            for c in f"{self.scheme}://{host}:{self.port}"
        )
        return text if len(text) <= 200 else text[:200] + "..."


def origin_of(url: str) -> Origin | None:
    """The origin of an absolute http(s) URL, default port filled in; None if it has none."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return Origin(scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme])


def _location_origin(url: str, location: str | None) -> Origin | None:
    """The origin a Location sends to from `url` (relative ones resolved), if it has one."""
    if not location:
        return None
    try:
        return origin_of(urllib.parse.urljoin(url, location))
    except ValueError:
        return None


class Refused(Exception):
    """An answer (or a request) the transport does not pass on; failover.py maps each kind."""


class Redirected(Refused):
    """Vault answered 3xx. `target`: the origin its Location points to (relative Locations
    resolved), None if it gave none that parses."""

    def __init__(self, status: int, target: Origin | None) -> None:
        self.status = status
        self.target = target
        super().__init__(f"HTTP {status} redirect to {target or 'no usable location'}")


class OriginRefused(Refused):
    """A request to an origin that is not one of the configured Vault addresses."""

    def __init__(self, origin: Origin | None) -> None:
        self.origin = origin
        super().__init__(f"{origin or 'an unusable URL'} is not a configured Vault address")


class ResponseTooLarge(Refused):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"the answer is larger than {limit // 1024 // 1024} MiB")


# --- urllib3 connections and pools ---------------------------------------------------------


def _early_socket(
    conn: urllib3.connection.HTTPConnection, early: EarlyConnection | None
) -> socket.socket | None:
    if early is None:
        return None
    wait = conn.timeout if isinstance(conn.timeout, int | float) else None
    sock = early.take(conn.host, conn.port, wait)
    if sock is not None:
        for option in conn.socket_options or ():
            sock.setsockopt(*option)
    return sock


class _HTTPConnection(urllib3.connection.HTTPConnection):
    """urllib3's connection, which can start on a socket EarlyConnection opened and whose
    socket the current request's deadline watches."""

    early: EarlyConnection | None = None

    def _new_conn(self) -> socket.socket:
        deadline = deadlines.current()
        if deadline is not None:
            deadline.connecting = True
        early, self.early = self.early, None
        sock = _early_socket(self, early) or super()._new_conn()
        if deadline is not None:
            deadline.watch(self, sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        deadline = deadlines.current()
        if deadline is not None:
            deadline.started = True
            if self.sock is not None:
                deadline.watch(self, self.sock)  # kept alive from an earlier request, or TLS
        super().request(*args, **kwargs)


class _HTTPSConnection(_HTTPConnection, urllib3.connection.HTTPSConnection):
    """The same for https: TLS is set up on the early socket as on any other, and the
    deadline watches the handshake too (the socket is watched before it is wrapped)."""


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection

    def _put_conn(self, conn: Any) -> None:
        deadline = deadlines.current()
        if deadline is not None and conn is not None:
            deadline.unwatch(conn)  # before another request can take it
        super()._put_conn(conn)


class _HTTPSPool(_HTTPPool, HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _timed_out(
    deadline: deadlines.Deadline, err: BaseException | None = None
) -> requests.exceptions.Timeout:
    """The timeout a request that ran out of time ends with: ConnectTimeout (never sent, may
    be sent again) if it timed out connecting, as urllib3 says, or before it was started on a
    connection it opened (TCP connect or TLS handshake, which urllib3 reports as a read
    timeout); ReadTimeout (may have been acted on) otherwise."""
    reason = f"no complete answer within {deadline.seconds:.1f}s"
    if isinstance(err, requests.exceptions.ConnectTimeout) or (
        deadline.connecting and not deadline.started
    ):
        return requests.exceptions.ConnectTimeout(reason)
    return requests.exceptions.ReadTimeout(reason)


# --- the adapter ---------------------------------------------------------------------------


class Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter for the Vault addresses `allowed`, and nothing else (module doc)."""

    def __init__(
        self, allowed: Iterable[str], *, max_response_bytes: int = MAX_RESPONSE_BYTES, **kwargs: Any
    ) -> None:
        self.allowed = frozenset(o for o in map(origin_of, allowed) if o is not None)
        self.max_response_bytes = max_response_bytes
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float, float] | tuple[float, None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """Send, read the whole answer within the request's deadline, and return it with its
        body loaded (`stream` is ignored: nothing is left to stream)."""
        origin = origin_of(request.url or "")
        if origin not in self.allowed:
            raise OriginRefused(origin)
        if isinstance(timeout, tuple):
            timeout = sum(t for t in timeout if t is not None)
        seconds = deadlines.seconds_left(timeout)
        seconds = DEFAULT_TIMEOUT if seconds is None else seconds
        if seconds <= 0:
            raise requests.exceptions.ConnectTimeout("no time left for the request")
        with deadlines.watched(seconds) as deadline:
            try:
                response = super().send(
                    request, stream=True, timeout=seconds, verify=verify, cert=cert, proxies=proxies
                )
                try:
                    if deadline.expired:  # the status line or headers may be cut short
                        raise _timed_out(deadline)
                    if 300 <= response.status_code < 400:
                        raise Redirected(
                            response.status_code,
                            _location_origin(request.url or "", response.headers.get("Location")),
                        )
                    body = self._read(response)
                except BaseException:
                    response.close()
                    raise
            except Refused:
                raise
            except Exception as err:
                # Cut short by the deadline, or timed out on its own: either way, what it may
                # have done decides (_timed_out), not the error it happened to end with.
                if deadline.finish() or isinstance(err, requests.exceptions.Timeout):
                    raise _timed_out(deadline, err) from None
                raise
            if deadline.finish():
                raise _timed_out(deadline)
        # What requests' `content` would have read; set, so that it reads nothing more.
        response._content = body
        return response

    def _read(self, response: requests.Response) -> bytes:
        limit = self.max_response_bytes
        declared = response.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            raise ResponseTooLarge(limit)
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.raw.stream(_CHUNK, decode_content=True):
                size += len(chunk)
                if size > limit:
                    raise ResponseTooLarge(limit)
                chunks.append(chunk)
        except urllib3.exceptions.ReadTimeoutError:
            raise requests.exceptions.ReadTimeout("read timed out") from None
        except urllib3.exceptions.DecodeError:
            raise requests.exceptions.ContentDecodingError("undecodable answer") from None
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise requests.exceptions.ConnectionError(
                f"connection broken while reading the answer ({type(err).__name__})"
            ) from None
        return b"".join(chunks)

    # --- connections opened ahead --------------------------------------------------------

    def _pool(self, url: str, verify: bool | str) -> HTTPConnectionPool | None:
        request = requests.Request("GET", url).prepare()
        pool = self.get_connection_with_tls_context(request, verify, proxies={})
        return pool if isinstance(pool, HTTPConnectionPool) else None

    def adopt(self, url: str, verify: bool | str, early: EarlyConnection) -> None:
        """Let the next new connection to `url` start on `early`'s socket.

        urllib3 has no public call for that; its pool's `_get_conn`/`_put_conn` pair (take a
        slot, give it back) has been stable since urllib3 1.x.
        """
        pool = self._pool(url, verify)
        if pool is None:
            early.close()
            return
        conn = pool._get_conn()
        if isinstance(conn, _HTTPConnection) and not conn.is_connected:
            conn.early = early
        else:
            early.close()
        pool._put_conn(conn)

    def preconnect(
        self,
        url: str,
        verify: bool | str,
        timeout: float,
        count: int,
        submit: Callable[[Callable[[], None]], Future[None]],
    ) -> list[Future[None]]:
        """Open `count` connections to `url` in this adapter's pool in the background (TCP
        and, for https, TLS handshakes, each within `timeout`), so that the requests that
        take them later skip the handshakes. A connection that fails is closed; the request
        that takes it connects again and reports the error. All slots are taken before any
        is given back, so no two handshakes land on the same slot.
        """
        pool = self._pool(url, verify)
        if pool is None or timeout <= 0:
            return []
        conns = [pool._get_conn() for _ in range(count)]

        def connect(conn: Any) -> None:
            try:
                with deadlines.watched(timeout):
                    if not conn.is_connected:
                        conn.timeout = timeout
                        conn.connect()
            except Exception as err:  # only an optimisation: the request reports
                conn.close()
                log.debug(
                    "opening a connection to %s ahead of a read failed: %s", url, type(err).__name__
                )
            finally:
                pool._put_conn(conn)

        return [submit(functools.partial(connect, conn)) for conn in conns]


def session_for(addresses: Iterable[str], verify: bool | str, pool_size: int) -> requests.Session:
    """A requests session that reaches `addresses` through `Adapter`, and nothing else."""
    session = requests.Session()
    adapter = Adapter(addresses, pool_connections=4, pool_maxsize=pool_size, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.trust_env = False  # no proxies or netrc credentials picked up from the env
    session.verify = verify  # hvac takes `verify` from a session it is given, not its arg
    session.max_redirects = 0  # the adapter raises on any 3xx first; a second lock
    session.headers["Accept-Encoding"] = "identity"  # the size cap counts what is read
    return session
