"""Connections to Vault: the first TCP connection, opened while the HTTP client is still being
loaded, and (in `bootsecrets.connect.transport`) the HTTP transport every request goes over.

The package is split on import cost. Loading hvac, requests and urllib3 costs a Python process
about 90 ms of CPU (urllib3 alone ~55 ms), and a Vault a region away charges a round trip for
the TCP handshake before the first request can leave. `EarlyConnection`, here, imports only the
standard library: agent.py starts it first, in a thread, so the handshake is done by the time
the client is loaded; `transport.Adapter.adopt` hands the socket to the connection that sends
the first request (the wrapping lookup, or the token check). `transport` needs urllib3 and
requests, and is imported only with `bootsecrets.vault`.
"""

from __future__ import annotations

import logging
import socket
import threading
import urllib.parse

log = logging.getLogger(__name__)


class EarlyConnection:
    """One TCP connection to `address`, opened in the background; `take()` it once."""

    def __init__(self, address: str, timeout: float) -> None:
        parsed = urllib.parse.urlsplit(address)
        self.host = parsed.hostname or ""
        try:
            self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        except ValueError:  # not a port: the config's validation reports it, not this
            self.port = 0
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._connect, name="vault-connect", daemon=True)
        if self.host and self.port:
            self._thread.start()

    def _connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as err:
            # Nothing to report yet: the request that needed it connects again and does.
            log.debug(
                "early connection to %s:%s failed: %s",
                self.host,
                self.port,
                err.strerror or type(err).__name__,
            )
            return
        with self._lock:
            if self._abandoned:
                sock.close()
            else:
                self._sock = sock

    def take(self, host: str, port: int, wait: float | None = None) -> socket.socket | None:
        """The connected socket, if it is for host:port and has connected by now (waiting
        for the handshake at most `wait`, by default the connect timeout). Only the first
        call gets it."""
        if (host, port) != (self.host, self.port) or not self._thread.ident:
            self.close()
            return None
        self._thread.join(self.timeout if wait is None else min(wait, self.timeout))
        with self._lock:
            sock, self._sock = self._sock, None
            self._abandoned = True
        return sock

    def close(self) -> None:
        """Give it up (a socket not taken is closed)."""
        with self._lock:
            self._abandoned = True
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
