"""Terminal listener: mTLS (or explicitly configured plain TCP), framing, decoding, answering.

Bad input (DESIGN.md): a framing error (bad or oversized length header)
desynchronises the stream, so the connection is closed; an undecodable
message inside a good frame is answered 30 when its MTI and STAN can be read,
else counted and dropped. A frame that starts but does not finish within
`frame_timeout` (slow drip) closes the connection, as does `idle_timeout`
without any data, or with none of its answers read (a terminal that does not
read makes the switch stop reading from it first, so what is buffered for it
stays bounded). None of this touches other connections.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import ssl as _ssl
import time

from core import framing, iso8583
from switch.certs import peer_identity
from switch.config import ListenerConfig
from switch.flow import GUARD_LEAD, RequestContext, TransactionFlow
from switch.messages import (
    NETWORK_REQUESTS,
    RC_FORMAT_ERROR,
    RC_INOPERATIVE,
    RC_SECURITY,
    response_mti,
    switch_response,
)

log = logging.getLogger("isoswitch.listener")


class TerminalListener:
    def __init__(self, cfg: ListenerConfig, flow: TransactionFlow, ssl_context: _ssl.SSLContext | None):
        self.cfg = cfg
        self.flow = flow
        self.ssl_context = ssl_context
        self.spec = iso8583.load_dialect(cfg.dialect)
        self.defined_fields = frozenset(k for k in self.spec if not k.startswith("_"))
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[TerminalProtocol] = set()
        self.counters = collections.Counter()
        self.port = cfg.port
        self.frame_timeout = min(10.0, cfg.idle_timeout)
        self.accepting = True

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: TerminalProtocol(self), self.cfg.host, self.cfg.port,
            ssl=self.ssl_context, backlog=1024, reuse_address=True,
            ssl_handshake_timeout=10.0 if self.ssl_context else None,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        self.accepting = False
        if self.server is not None:
            self.server.close()

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for in-flight requests, then close every connection."""
        deadline = time.monotonic() + grace
        while any(c.in_flight for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self.connections)


class TerminalProtocol(asyncio.Protocol):
    def __init__(self, listener: TerminalListener):
        self.listener = listener
        cfg = listener.cfg
        self.cfg = cfg
        self.spec = listener.spec
        self._defined = listener.defined_fields
        self.decoder = framing.FrameDecoder(header=cfg.framing, max_frame=cfg.max_frame, tpdu=cfg.tpdu)
        self.transport = None
        self.identity: str | None = None
        self.in_flight = 0
        self.paused = False  # reading paused: max_in_flight requests in flight
        self.write_paused = False  # reading paused: the terminal is not reading its answers
        self.write_paused_since = 0.0
        self._reading_paused = False
        self.last_rx = time.monotonic()
        self.partial_since: float | None = None
        self._timer = None
        self.loop = asyncio.get_running_loop()
        self._out: list[bytes] = []  # response frames waiting for this loop iteration's flush

    # -- connection ------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        lst = self.listener
        if not lst.accepting or len(lst.connections) >= self.cfg.max_connections:
            lst.counters["refused_connections"] += 1
            transport.abort()
            return
        if lst.ssl_context is not None:
            self.identity = peer_identity(transport)
        lst.connections.add(self)
        lst.counters["connections"] += 1
        self._arm_timer()

    def connection_lost(self, exc):
        self.listener.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self.transport = None

    def _arm_timer(self):
        self._timer = self.loop.call_later(min(1.0, self.listener.frame_timeout), self._check_timers)

    def _check_timers(self):
        if self.transport is None:
            return
        now = time.monotonic()
        if self._reading_paused:
            # the switch is not reading (backpressure): a frame the terminal
            # cannot finish, or its silence, is not the terminal's doing
            self.last_rx = now
            if self.partial_since is not None:
                self.partial_since = now
        if self.partial_since is not None and now - self.partial_since > self.listener.frame_timeout:
            self.listener.counters["frame_timeouts"] += 1
            log.info("terminal connection closed: frame not completed in %.1fs", self.listener.frame_timeout)
            self.transport.abort()
            return
        if self.write_paused and now - self.write_paused_since > self.cfg.idle_timeout:
            # it has read none of its answers for idle_timeout: a terminal
            # that is gone or stuck; its buffered answers are dropped with it
            self.listener.counters["write_stalled_closed"] += 1
            log.info("terminal connection closed: answers not read for %.1fs", self.cfg.idle_timeout)
            self.transport.abort()
            return
        if self.in_flight == 0 and now - self.last_rx > self.cfg.idle_timeout:
            self.listener.counters["idle_closed"] += 1
            self.transport.close()
            return
        self._arm_timer()

    # -- flow control ------------------------------------------------------------

    def pause_writing(self):
        # A terminal that sends without reading its answers would otherwise
        # make the switch buffer them without bound: read nothing more from it
        # until its answers drain (the transport's high-water mark).
        self.write_paused = True
        self.write_paused_since = time.monotonic()
        self.listener.counters["write_backpressure"] += 1
        self._sync_reading()

    def resume_writing(self):
        self.write_paused = False
        self._sync_reading()

    def _sync_reading(self):
        want = self.paused or self.write_paused
        if want != self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = want
            if want:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # -- input -----------------------------------------------------------------

    def data_received(self, data):
        now = time.monotonic()
        self.last_rx = now
        try:
            frames = self.decoder.feed(data)
        except framing.FrameError as e:
            self.listener.counters["frame_errors"] += 1
            log.warning("terminal framing error (%s); closing connection", e.msg)
            for frame in e.frames:
                self._on_frame(frame, now)
            self.transport.abort()
            return
        if self.decoder.buffered:
            if self.partial_since is None:
                self.partial_since = now
        else:
            self.partial_since = None
        for frame in frames:
            self._on_frame(frame, now)

    def _on_frame(self, frame: bytes, now: float) -> None:
        tpdu = None
        if self.cfg.tpdu:
            try:
                tpdu, frame = framing.split_tpdu(frame)
            except framing.FrameError:
                self.listener.counters["decode_errors"] += 1
                return
        try:
            req, _ = iso8583.decode(frame, self.spec, strict=True)
        except iso8583.DecodeError as e:
            self.listener.counters["decode_errors"] += 1
            partial, _ = iso8583.decode_partial(frame, self.spec)
            log.warning("undecodable terminal message: %s at field %s pos %d", e.msg, e.field, e.pos)
            mti = partial.get("t", "")
            if len(mti) == 4 and mti.isdigit() and mti[2] in "0248" and "11" in partial:
                self._write(switch_response(partial, RC_FORMAT_ERROR), tpdu)
            return
        if self.cfg.bind_terminal_id and req.get("t") not in NETWORK_REQUESTS and (
                (req.get("41") or "").strip() != self.identity):
            # this certificate may only transact as its own terminal (DESIGN.md: mTLS identity)
            self.listener.counters["identity_mismatch"] += 1
            log.warning("terminal identity mismatch: certificate CN %r, DE41 %r", self.identity,
                        (req.get("41") or "").strip())
            self._write(switch_response(req, RC_SECURITY), tpdu)
            return
        self.in_flight += 1
        if self.in_flight >= self.cfg.max_in_flight and not self.paused:
            self.paused = True
            self._sync_reading()
        ctx = RequestContext(self.listener.cfg.name, self.identity, now, now + self.cfg.terminal_timeout)
        answered = [False]
        # Safety net for invariant 1: whatever happens below, the terminal gets
        # an answer before its timeout (the flow itself answers well before).
        guard = self.loop.call_at(ctx.deadline - GUARD_LEAD, self._deadline, req, tpdu, answered)
        self.loop.create_task(self._serve(req, ctx, tpdu, answered, guard))

    async def _serve(self, req, ctx, tpdu, answered, guard):
        # The answer is written by this task itself, not by a done-callback on
        # it: a callback runs one loop iteration later, and under load an
        # iteration is milliseconds.
        try:
            resp = await self.listener.flow.process(req, ctx)
        except asyncio.CancelledError:
            self._done(None, req, tpdu, answered, guard)
            raise
        except Exception:  # process() answers every error itself; this is the last resort
            log.exception("flow raised for MTI %s", req.get("t"))
            resp = switch_response(req, "96")
        self._done(resp, req, tpdu, answered, guard)

    def _deadline(self, req, tpdu, answered):
        if not answered[0]:
            answered[0] = True
            self.listener.counters["deadline_answers"] += 1
            self._write(switch_response(req, RC_INOPERATIVE), tpdu)

    def _done(self, resp, req, tpdu, answered, guard):
        """``resp`` None: the flow was cancelled (shutdown), answered 91."""
        guard.cancel()
        self.in_flight -= 1
        if self.paused and self.in_flight < self.cfg.max_in_flight:
            self.paused = False
            self._sync_reading()
        if answered[0]:
            return
        answered[0] = True
        if resp is None:
            resp = switch_response(req, RC_INOPERATIVE)
        self._write(resp, tpdu)

    def _write(self, resp: dict, tpdu: bytes | None) -> None:
        t = self.transport
        if t is None or t.is_closing():
            self.listener.counters["answers_lost"] += 1  # connection gone (invariant 1's exception)
            return
        if not self._defined.issuperset(resp):
            # the acquirer's dialect may carry fields this terminal's does not
            resp = {k: v for k, v in resp.items() if k in self._defined}
        try:
            raw, _ = iso8583.encode(resp, self.spec)
        except iso8583.EncodeError as e:
            log.error("cannot encode response MTI %s: %s at field %s", resp.get("t"), e.msg, e.field)
            # answer with the minimal switch response instead
            raw, _ = iso8583.encode(
                {k: v for k, v in switch_response(resp, "96").items() if k in ("t", "11", "39", "41")}
                | {"t": resp.get("t", response_mti("0200"))}, self.spec)
        if tpdu is not None:
            raw = framing.reply_tpdu(tpdu) + raw
        # Pipelined answers completing in one loop iteration leave in one write:
        # one TLS record batch and one syscall instead of one per response.
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(framing.build_frame(raw, self.cfg.framing, self.cfg.max_frame))
        self.listener.counters["answered"] += 1

    def _flush(self) -> None:
        out, self._out = self._out, []
        t = self.transport
        if t is None or t.is_closing():
            self.listener.counters["answers_lost"] += len(out)
            return
        t.write(out[0] if len(out) == 1 else b"".join(out))
