"""A latency-injecting TCP proxy on 127.0.0.1, standing in for a link with a round-trip time
between the agents and OpenBao."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from harness import BenchError


class LatencyProxy:
    """127.0.0.1:port -> upstream, delaying every chunk by `one_way` in each direction.

    A real link also charges one round trip for each new TCP connection (the handshake);
    loopback's handshake is instant, so nothing the client sends on a connection leaves before
    one round trip after the connection was accepted (a request sent at once waits the whole
    round trip; one sent on a connection opened earlier waits only what is left of it).
    Chunks keep their order and overlap in flight (a pipe, not a stop-and-wait). Connections
    idle for 30 s are dropped; the whole proxy stops itself after `lifetime` seconds at the
    latest.
    """

    IDLE = 30.0

    def __init__(self, upstream_port: int, one_way: float, lifetime: float = 600.0) -> None:
        self.upstream_port = upstream_port
        self.one_way = one_way
        self.lifetime = lifetime
        self.port = 0
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> LatencyProxy:
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise BenchError(f"latency proxy did not start: {self._error}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:
            self._error = err
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await asyncio.wait_for(self._stop.wait(), self.lifetime)
        except TimeoutError:
            pass
        finally:
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # The client's connect() returned at once on loopback; over the link it would have
        # taken a round trip, so nothing it sends leaves before then.
        connected = asyncio.get_running_loop().time() + 2 * self.one_way
        self.connections += 1
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port), 5
            )
        except (OSError, TimeoutError):
            client_w.close()
            return
        try:
            await asyncio.gather(
                self._pipe(client_r, up_w, sendable=connected),
                self._pipe(up_r, client_w, sendable=0.0),
            )
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # The proxy is stopping. Return rather than re-raise: Python 3.11's start_server
            # callback would report a cancelled handler as an unhandled error.
            pass
        finally:
            for writer in (client_w, up_w):
                with contextlib.suppress(Exception):
                    writer.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sendable: float
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def pump() -> None:
            try:
                while True:
                    data = await asyncio.wait_for(reader.read(65536), self.IDLE)
                    queue.put_nowait((max(loop.time(), sendable) + self.one_way, data))
                    if not data:
                        return
            except (OSError, TimeoutError):
                queue.put_nowait((loop.time(), b""))

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not data:
                    with contextlib.suppress(OSError, RuntimeError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        await asyncio.gather(pump(), deliver())
