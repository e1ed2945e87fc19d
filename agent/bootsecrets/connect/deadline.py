"""An absolute end for each HTTP request, enforced on its sockets (standard library only).

A per-operation socket timeout does not bound a request: a server that sends one byte per
second never lets a single recv() wait long, and http.client reads the status line and the
headers a line at a time, so a dripping answer can last forever. Adjusting the socket timeout
to what is left before every recv would mean wrapping every socket object, TLS ones included,
whose reads happen in C. Instead each request runs `watched()`: its sockets are registered
with one watchdog thread (shared by all requests), which shuts them down (shutdown(2)) when
the request's end comes. That wakes whatever recv or send is blocked on the connection, plain
or TLS, handshake included, and the transport turns the failure into a timeout.

Two races are closed by construction:

- A socket is watched through a duplicate of its descriptor (`os.dup`), closed only when the
  request is over. The connection may close its own descriptor before the end (and the kernel
  may hand the number to another socket): the duplicate still refers to the old connection,
  so the watchdog never shuts down a stranger's socket.
- The transport unwatches a connection before it goes back to the pool, and `expire` and
  `unwatch` hold the same lock, so the watchdog never shuts down a connection another request
  has taken since.
"""

from __future__ import annotations

import contextlib
import contextvars
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator

_REQUEST_ENDS: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "bootsecrets_request_ends", default=None
)
_CURRENT: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "bootsecrets_deadline", default=None
)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Requests made in this block, in this thread, end within `seconds` from now, answer
    read or not (a shorter timeout given to the request still applies)."""
    token = _REQUEST_ENDS.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _REQUEST_ENDS.reset(token)


def seconds_left(timeout: float | None) -> float | None:
    """What a request started now may take: `timeout`, shortened by the `time_limit` in force
    (None if neither is set)."""
    ends = _REQUEST_ENDS.get()
    left = None if ends is None else ends - time.monotonic()
    candidates = [t for t in (timeout, left) if t is not None]
    return min(candidates) if candidates else None


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class Deadline:
    """One request's end: when it comes, every socket the request uses is shut down."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.seconds = seconds
        #: The request opened a connection (TCP connect, TLS handshake), and it started
        #: sending on one (the transport sets both; nothing can have left before `started`).
        self.connecting = False
        self.started = False
        #: The end came before finish(): what was read may be cut short.
        self.expired = False
        self._done = False
        self._lock = threading.Lock()
        self._socks: dict[int, socket.socket] = {}

    def watch(self, owner: object, sock: socket.socket) -> None:
        """Watch `sock`, the socket `owner` (a connection) uses now, instead of any earlier
        one of the same owner."""
        try:
            dup: socket.socket | None = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return  # already closed: the request using it fails on its own
        with self._lock:
            old = self._socks.pop(id(owner), None)
            if self._done:
                old, dup = dup, None
            elif dup is not None:
                self._socks[id(owner)] = dup
                if self.expired:
                    _shutdown(dup)
        if old is not None:
            old.close()

    def unwatch(self, owner: object) -> None:
        with self._lock:
            dup = self._socks.pop(id(owner), None)
        if dup is not None:
            dup.close()

    def expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for dup in self._socks.values():
                _shutdown(dup)

    def finish(self) -> bool:
        """Stop watching (idempotent). True if the end came first."""
        with self._lock:
            self._done = True
            socks = list(self._socks.values())
            self._socks.clear()
        for dup in socks:
            dup.close()
        return self.expired


class _Watchdog:
    """One daemon thread expiring deadlines in order (a timer thread per request would cost
    a thread start, ~0.1-0.2 ms of CPU, on every request)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, deadline: Deadline) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="vault-deadlines", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is deadline:
                # Sooner than what the thread waits for. Usually not (every request gets the
                # same timeout): waking a thread on every request costs a context switch.
                self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)[2].expire()  # a no-op if it finished in time


_WATCHDOG = _Watchdog()


@contextlib.contextmanager
def watched(seconds: float) -> Iterator[Deadline]:
    """A deadline `seconds` from now for what runs in this block, in this thread: the
    connections it uses register their sockets with `current()`."""
    deadline = Deadline(seconds)
    _WATCHDOG.add(deadline)
    token = _CURRENT.set(deadline)
    try:
        yield deadline
    finally:
        _CURRENT.reset(token)
        deadline.finish()


def current() -> Deadline | None:
    """The deadline of the request running in this thread, if any."""
    return _CURRENT.get()
