"""Which address a request goes to, how often, and for how long: failover between the
configured Vault addresses, retries with backoff, redirects, and the run's deadline.

Retries: what is safe to retry (connection errors, timeouts, 429, 500/502/503, sealed or
standby answers) is retried with exponential backoff and full jitter until the deadline.
Requests that consume something (unwrap, AppRole login with a single-use secret-id) are
retried only when the server cannot have acted on them; a lost answer is reported
(ResponseLost), never repeated blindly.

Time: each request, from connecting to the last byte of its answer, ends within
`vault.request_timeout` and within what is left of `vault.boot_deadline` (the run's deadline,
counted from the start of the Vault session); no request starts after that deadline
(VaultUnreachable). Size: an answer over `transport.MAX_RESPONSE_BYTES` is a VaultError
naming the request's path, never retried.

Redirects are never followed as such, and a token goes only to a configured address. A 3xx
whose Location's origin (scheme, host, port; its path and query are ignored) is a configured
address means "ask that address": the same request goes there, at once, as a failover would
send it (and with the backoff of the round if that address was already tried in it). That is
what a Vault standby's 307 to the active node is; a standby answers it before acting on the
request, so it is safe for the unwrap and the login too: the request was not processed, and it
is sent again only to an address the image config trusts. A redirect to any other origin
(another host or port, http instead of https) is a VaultError naming both addresses, at once:
nothing is sent there.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import hvac.exceptions
import requests

from bootsecrets import logs
from bootsecrets.connect.deadline import time_limit
from bootsecrets.connect.transport import (
    OriginRefused,
    Redirected,
    ResponseTooLarge,
    origin_of,
)
from bootsecrets.errors import ResponseLost, TLSVerifyFailed, VaultError, VaultUnreachable

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Server answers after which the request was certainly not acted on.
_NOT_PROCESSED = (hvac.exceptions.VaultDown, hvac.exceptions.RateLimitExceeded)
#: Server answers worth retrying for idempotent requests.
_RETRYABLE_STATUS = (
    *_NOT_PROCESSED,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
)
#: Answers that mean something specific at each call site, which maps them.
CALLER_MAPS = (
    hvac.exceptions.InvalidRequest,
    hvac.exceptions.Unauthorized,
    hvac.exceptions.Forbidden,
    hvac.exceptions.InvalidPath,
)


def vault_errors(err: hvac.exceptions.VaultError) -> str:
    """The `errors` Vault gave with an answer, shortened."""
    errors = [str(e) for e in (getattr(err, "errors", None) or []) if e]
    return "; ".join(errors)[:200] or "no details"


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
        return "active cluster node not found" in vault_errors(err)
    return isinstance(err, _NOT_PROCESSED)


class Failover:
    """The configured addresses, the one that answered last, and the run's deadline."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        request_timeout: float,
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.addresses = tuple(addresses)
        self.preferred = 0
        self._timeout = request_timeout
        self._clock = clock
        self._sleep = sleep
        self._deadline = clock() + deadline

    def seconds_left(self) -> float:
        """What a request started now may take."""
        return min(self._timeout, self._deadline - self._clock())

    def call(self, what: str, request: Callable[[int], _T], *, idempotent: bool = True) -> _T:
        """Run `request(index of an address)`, the preferred address first, failing over and
        retrying (module docstring). Other Vault answers (400/403/404) propagate as hvac
        exceptions for the caller to map. Each round tries every address once (a redirect to
        a configured address moves it to the front), then backs off.
        """
        attempt = 0
        last = "no attempt"
        count = len(self.addresses)
        while True:
            queue = [(self.preferred + offset) % count for offset in range(count)]
            while queue:
                index = queue.pop(0)
                address = self.addresses[index]
                seconds = self.seconds_left()
                if seconds <= 0:
                    raise VaultUnreachable(
                        f"Vault did not answer {what} before the deadline (last: {last})"
                    )
                try:
                    with time_limit(seconds):
                        result = request(index)
                except Redirected as err:
                    target = self._redirect_target(what, index, err)
                    last = f"{address}: HTTP {err.status} to {self.addresses[target]}"
                    log.debug("%s redirected (%s)", what, last)
                    if target in queue:
                        queue.remove(target)
                        queue.insert(0, target)
                    continue
                except ResponseTooLarge as err:
                    raise VaultError(
                        f"{what}: the answer from {address} is larger than "
                        f"{err.limit // 1024 // 1024} MiB, the most the agent reads; refused"
                    ) from None
                except OriginRefused as err:  # the clients only know configured addresses
                    raise VaultError(f"{what}: refused to send to {err.origin}") from None
                except requests.exceptions.SSLError:
                    # Not transient: retrying a certificate that does not verify only hides it.
                    tls = TLSVerifyFailed(
                        f"{what}: TLS verification of {address} failed; check "
                        "vault.ca_cert (or VAULT_CACERT)"
                    )
                    logs.alert(tls, VAULT_ADDR=address)
                    raise tls from None
                except (requests.exceptions.RequestException, *_RETRYABLE_STATUS) as err:
                    last = f"{address}: {_reason(err)}"
                    if not idempotent and not _never_sent(err):
                        raise ResponseLost(what, _reason(err)) from None
                    log.debug("%s failed (%s), trying next", what, last)
                    continue
                except hvac.exceptions.VaultError as err:
                    if isinstance(err, CALLER_MAPS):
                        raise
                    raise VaultError(f"{what}: {_reason(err)}: {vault_errors(err)}") from None
                self.preferred = index
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

    def _redirect_target(self, what: str, index: int, err: Redirected) -> int:
        """The configured address a redirect points to, or VaultError naming both."""
        for target, address in enumerate(self.addresses):
            if err.target is not None and origin_of(address) == err.target:
                return target
        where = err.target or "a location that is not an http(s) URL"
        raise VaultError(
            f"{what}: {self.addresses[index]} redirected (HTTP {err.status}) to {where}, which "
            "is not a configured Vault address; not followed, no token sent there (list the "
            "active node's address in vault.addresses if it is one)"
        )
