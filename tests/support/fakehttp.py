"""Tiny HTTP servers on 127.0.0.1 whose every byte the test controls, for what a real Vault
cannot be made to do on demand: redirect elsewhere, drip an answer, answer hugely.

`FakeServer(handler)` accepts connections in a thread and parses each request itself (raw
sockets, no http.server), records it, and lets `handler(request, reply)` answer on the socket:
`reply.answer(...)` for a whole answer, `reply.send()`/`reply.drip()` for byte-level control.
`Upstream` turns a FakeServer into a recording proxy in front of a real OpenBao. `Listener`
is a port that accepts and records, and never answers: the "other origin" of redirect tests,
to prove that nothing (no connection, no byte) ever reached it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STATUS_TEXT = {
    200: "OK",
    204: "No Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclasses.dataclass
class Request:
    method: str
    target: str  # path and query, as sent
    headers: dict[str, str]  # names lower-cased
    body: bytes
    raw: bytes  # every byte received for this request

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class Reply:
    """The connection a handler answers on. Sends report False once the client is gone."""

    def __init__(self, sock: socket.socket, stopping: threading.Event) -> None:
        self.sock = sock
        self.stopping = stopping
        self.sent = 0  # bytes accepted by the kernel on this connection
        self.closed = False

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True
            return False
        self.sent += len(data)
        return True

    def answer(
        self, status: int, body: bytes | dict[str, Any] = b"", headers: dict[str, str] | None = None
    ) -> bool:
        """A whole answer with Content-Length; a dict body is sent as JSON."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        fields = {"Content-Type": "application/json", "Content-Length": str(len(data))}
        fields.update(headers or {})
        return self.send(head(status, fields) + data)

    def drip(self, data: bytes, interval: float) -> bool:
        """`data` one byte at a time, `interval` apart; False if cut short."""
        for i in range(len(data)):
            if self.stopping.wait(interval) or not self.send(data[i : i + 1]):
                return False
        return True

    def flood(self, chunk: bytes, limit: int) -> int:
        """`chunk` again and again until the client goes away or `limit` bytes went out;
        returns what was sent."""
        start = self.sent
        while self.sent - start < limit and not self.stopping.is_set():
            if not self.send(chunk):
                break
        return self.sent - start

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


def head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


Handler = Callable[[Request, Reply], None]


class FakeServer:
    """127.0.0.1 on a free port; `handler` answers each request (module docstring). With
    `tls`, every accepted connection is wrapped in it first (a failed handshake is counted
    in `handshake_failures`); `handshake` replaces the TLS handshake with a function of the
    raw socket (to misbehave in it)."""

    def __init__(
        self,
        handler: Handler,
        *,
        tls: ssl.SSLContext | None = None,
        handshake: Callable[[socket.socket, threading.Event], None] | None = None,
    ) -> None:
        self.handler = handler
        self.tls = tls
        self.handshake = handshake
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        scheme = "https" if tls or handshake else "http"
        self.addr = f"{scheme}://127.0.0.1:{self.port}"
        self.requests: list[Request] = []
        self.replies: list[Reply] = []
        self.accepted = 0
        self.handshake_failures = 0
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = [self.listener]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def paths(self) -> list[str]:
        with self.lock:
            return [r.path for r in self.requests]

    def received(self) -> bytes:
        with self.lock:
            return b"".join(r.raw for r in self.requests)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.sockets.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            with self.lock:
                self.threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            if self.handshake is not None:
                self.handshake(sock, self.stopping)
                return
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True)
                except (OSError, ssl.SSLError):
                    with self.lock:
                        self.handshake_failures += 1
                    return
                with self.lock:
                    self.sockets.append(sock)
            reply = Reply(sock, self.stopping)
            with self.lock:
                self.replies.append(reply)
            buffer = b""
            while not reply.closed and not self.stopping.is_set():
                request, buffer = _read_request(sock, buffer)
                if request is None:
                    return
                with self.lock:
                    self.requests.append(request)
                self.handler(request, reply)
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self.stopping.set()
        with self.lock:
            sockets, threads = list(self.sockets), list(self.threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept/recv
            with contextlib.suppress(OSError):
                sock.close()
        for thread in threads:
            thread.join(timeout=10)


def _read_request(sock: socket.socket, buffer: bytes) -> tuple[Request | None, bytes]:
    """One request off `sock` (None when the client closed first), and what follows it."""
    while b"\r\n\r\n" not in buffer:
        data = _recv(sock)
        if not data:
            return None, b""
        buffer += data
    header_block, rest = buffer.split(b"\r\n\r\n", 1)
    lines = header_block.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        data = _recv(sock)
        if not data:
            return None, b""
        rest += data
    body, rest = rest[:length], rest[length:]
    raw = header_block + b"\r\n\r\n" + body
    return Request(method, target, headers, body, raw), rest


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


class Upstream:
    """A handler that passes each request on to a real server and its answer back, adding
    `extra_headers` to the request; `statuses` records what the server answered."""

    def __init__(self, addr: str, extra_headers: dict[str, str] | None = None) -> None:
        host, port = addr.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.extra_headers = extra_headers or {}
        self.statuses: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def __call__(self, request: Request, reply: Reply) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            headers = {
                k: v
                for k, v in request.headers.items()
                if k not in ("host", "connection", "accept-encoding")
            }
            headers.update(self.extra_headers)
            conn.request(request.method, request.target, body=request.body or None, headers=headers)
            answer = conn.getresponse()
            body = answer.read()
        finally:
            conn.close()
        with self.lock:
            self.statuses.append((request.path, answer.status))
        fields = {
            k: v
            for k, v in answer.getheaders()
            if k.lower() not in ("content-length", "transfer-encoding", "connection")
        }
        fields["Content-Length"] = str(len(body))
        reply.send(head(answer.status, fields) + body)


class Listener:
    """A port that accepts connections and records every byte, and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.accepted = 0
        self.data = b""
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.sockets.append(sock)
            threading.Thread(target=self._record, args=(sock,), daemon=True).start()

    def _record(self, sock: socket.socket) -> None:
        while data := _recv(sock):
            with self.lock:
                self.data += data

    def close(self) -> None:
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@contextlib.contextmanager
def serving(handler: Handler, **kwargs: Any) -> Iterator[FakeServer]:
    server = FakeServer(handler, **kwargs)
    try:
        yield server
    finally:
        server.close()


def wait_until(check: Callable[[], bool], timeout: float = 10) -> bool:
    give_up = time.monotonic() + timeout
    while not check():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.01)
    return True


def tls_server_context(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context with a fresh self-signed certificate for 127.0.0.1 (made with
    openssl), and the certificate's path (the client's CA bundle)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl is missing: run `apt-get install openssl`")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert
