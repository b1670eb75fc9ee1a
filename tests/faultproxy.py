"""A TCP proxy that injects network faults between the switch and an acquirer
(after asyncpg's ``_testbase/fuzzer.py``): the switch's link connects to the
proxy, the proxy to the acquirer simulator, and a test changes what happens
to the bytes in between while traffic flows.

Directions: ``"up"`` is switch -> acquirer, ``"down"`` acquirer -> switch.

* ``stall(direction)`` / ``resume(direction)``: hold the bytes (nothing is
  lost; they leave in order on resume);
* ``cut_after(direction, n)``: forward ``n`` more bytes that way, then reset
  every connection (RST, as a crashed peer or a middlebox does) -- with ``n``
  inside a frame, the receiver is left holding half a message;
* ``chunk(direction, size)``: forward in pieces of ``size`` bytes, each in its
  own write (TCP segmentation at its worst);
* ``inject(direction, data)``: send raw bytes to that side of every connection.

New connections keep being accepted and proxied, so the switch's link can
reconnect after a cut.
"""
from __future__ import annotations

import asyncio
import socket
import struct

DIRECTIONS = ("up", "down")


class FaultProxy:
    def __init__(self):
        self.port: int | None = None
        self.target_port: int | None = None
        self.bytes = dict.fromkeys(DIRECTIONS, 0)
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._open: dict[str, asyncio.Event] = {d: asyncio.Event() for d in DIRECTIONS}
        for e in self._open.values():
            e.set()
        self._cut: dict[str, int | None] = dict.fromkeys(DIRECTIONS)
        self._chunk: dict[str, int | None] = dict.fromkeys(DIRECTIONS)
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task] = set()

    async def start(self, target_port: int) -> "FaultProxy":
        self.target_port = target_port
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset_all()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- faults -----------------------------------------------------------------

    def stall(self, direction: str) -> None:
        self._open[direction].clear()

    def resume(self, direction: str) -> None:
        self._open[direction].set()

    def cut_after(self, direction: str, n: int) -> None:
        self._cut[direction] = n

    def chunk(self, direction: str, size: int | None) -> None:
        self._chunk[direction] = size

    def inject(self, direction: str, data: bytes) -> None:
        for switch_side, acquirer_side in self._pairs:
            (switch_side if direction == "down" else acquirer_side).write(data)

    def reset_all(self) -> None:
        """RST every proxied connection, both sides."""
        for pair in self._pairs:
            for w in pair:
                _reset(w)
        self._pairs.clear()

    # -- the proxy ----------------------------------------------------------------

    async def _accept(self, sr: asyncio.StreamReader, sw: asyncio.StreamWriter) -> None:
        try:
            ar, aw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _reset(sw)
            return
        self.connections += 1
        pair = (sw, aw)
        self._pairs.append(pair)
        for direction, reader, writer in (("up", sr, aw), ("down", ar, sw)):
            t = asyncio.get_running_loop().create_task(self._pump(direction, reader, writer))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pump(self, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                await self._open[direction].wait()
                cut = self._cut[direction]
                if cut is not None and len(data) >= cut:
                    if cut:
                        writer.write(data[:cut])
                        await writer.drain()
                    self.bytes[direction] += cut
                    self._cut[direction] = None
                    self.reset_all()
                    return
                if cut is not None:
                    self._cut[direction] = cut - len(data)
                size = self._chunk[direction]
                for i in range(0, len(data), size or len(data)):
                    writer.write(data[i:i + (size or len(data))])
                    await writer.drain()
                    if size:
                        await asyncio.sleep(0.001)
                self.bytes[direction] += len(data)
        except (ConnectionError, OSError):
            pass


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), not FIN."""
    if writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
