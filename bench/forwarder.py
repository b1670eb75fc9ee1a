"""Bare length-prefix frame forwarder: the ceiling for Python + asyncio on this machine.

    python -m bench.forwarder --upstream 127.0.0.1:9001 --state-dir DIR [--port 0]

Terminals connect with mutual TLS (the development PKI in ``--state-dir``,
the same certificates the switch uses); for each terminal connection the
forwarder opens one plain-TCP connection to the upstream acquirer simulator
and pipes whole frames both ways: split on the binary2 length header, never
decoded, re-framed and written in one batch per read. Answers therefore
return in the order the upstream sends them on that connection pairing,
which is what a switch would do with no work in between.

What the switch adds on top of this (ISO 8583 decode/encode twice, routing,
STAN mapping, health, timers, futures) is the difference between the two
bench figures. It runs on uvloop when installed, as the switch does.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from pathlib import Path

from core.framing import FrameDecoder, FrameError, build_frame

MAX_FRAME = 8192


def _nodelay(transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Pipe(asyncio.Protocol):
    """One side of a pairing: frames read here are written to ``peer``."""

    def __init__(self):
        self.decoder = FrameDecoder("binary2", MAX_FRAME, False)
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.backlog: list[bytes] = []  # frames read before the peer connected

    def connection_made(self, transport):
        self.transport = transport
        _nodelay(transport)

    def data_received(self, data):
        try:
            frames = self.decoder.feed(data)
            error = False
        except FrameError as exc:
            frames, error = exc.frames, True
        if frames:
            out = b"".join([build_frame(f, "binary2", MAX_FRAME) for f in frames])
            peer = self.peer
            if peer is not None and peer.transport is not None:
                peer.transport.write(out)
            else:
                self.backlog.append(out)
        if error:
            self.close()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.transport = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def close(self):
        if self.transport is not None:
            self.transport.close()


class _Downstream(_Pipe):
    def __init__(self, upstream: tuple[str, int]):
        super().__init__()
        self.upstream = upstream

    def connection_made(self, transport):
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect_upstream())

    async def _connect_upstream(self):
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(_Pipe, *self.upstream)
        except OSError:
            self.close()
            return
        up.peer, self.peer = self, up
        if self.transport is None:
            up.close()
            return
        if self.backlog:
            up.transport.write(b"".join(self.backlog))
            self.backlog.clear()


async def serve(host: str, port: int, upstream: tuple[str, int], state_dir: Path) -> None:
    from switch.certs import ensure_dev_pki, server_context

    pki = ensure_dev_pki(state_dir)
    ctx = server_context(pki.server_cert, pki.server_key, pki.ca_cert)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Downstream(upstream), host, port, ssl=ctx, backlog=1024)
    print(f"forwarder listening on {host}:{server.sockets[0].getsockname()[1]} "
          f"-> {upstream[0]}:{upstream[1]}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.forwarder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the acquirer (simulator)")
    ap.add_argument("--state-dir", type=Path, required=True, help="development PKI location")
    args = ap.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port, (host or "127.0.0.1", int(port)), args.state_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
