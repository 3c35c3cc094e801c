"""A TCP proxy the test controls, between services and a dependency they reach only through it
(MySQL, Redis), without touching the machine's shared services:

- `cut()`: the dependency is down: open connections are reset, new ones reset at once;
- `blackhole()`: a network partition: connections stay open (new ones are accepted) but nothing
  is forwarded either way, so callers see silence until their own timeouts (no reset);
- `latency`: seconds added to every chunk forwarded, each way (a slow network path);
- `restore()`: forwarding again (what a blackhole held back is forwarded then, as TCP would).

It keeps its port while cut, so no other process can take it meanwhile."""

from __future__ import annotations

import asyncio
import contextlib

from tools.localstack import LOCALHOST, free_port


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, host: str = LOCALHOST) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = free_port(host)
        self.latency = 0.0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self._cut = False
        self._forwarding = asyncio.Event()
        self._forwarding.set()
        self.held: list[bytes] = []  # what a blackhole holds back (a chunk per connection and way, at most)

    async def start(self) -> TcpProxy:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, self.host, self.port)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pipes |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer),
                             return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self._forwarding.is_set():
                    self.held.append(data)
                    await self._forwarding.wait()
                if self.latency:
                    await asyncio.sleep(self.latency)
                writer.write(data)
                await writer.drain()
        finally:
            self._pipes.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def cut(self) -> None:
        """Reset the open connections, and every new one until `restore()`."""
        self._cut = True
        self._forwarding.set()  # (what a blackhole held goes nowhere: its connections are reset)
        self.held.clear()
        for w in list(self._pipes):
            w.transport.abort()
        self._pipes.clear()

    def blackhole(self) -> None:
        """Forward nothing, close nothing, until `restore()`."""
        self._forwarding.clear()

    async def restore(self) -> None:
        self._cut = False
        self._forwarding.set()
        self.held.clear()
        await self.start()

    async def close(self) -> None:
        await self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
