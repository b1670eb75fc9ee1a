"""Persistent acquirer links: N connections, switch-assigned trace numbers, echo, reconnect.

The one rule everything here serves (DESIGN.md #3): a caller must be able to
tell "certainly not received" (NotSent: safe to fail over) from "possibly
received" (OutcomeUnknown: reverse it, never re-send elsewhere). A request is
possibly received from the moment its bytes are handed to an open transport.

Trace numbers (DE11) are assigned per link (DESIGN.md #8): requests are
matched to responses by the link's own STAN, so two terminals using the same
STAN at once never see each other's responses. Recently timed-out STANs are
held back from reuse so a late response is recognised as late, not matched
to a newer request.

Message header: a dialect whose "h" field has a length (BASE24's
"ISO025000070") puts a header in front of every message's MTI. It belongs to
the connection's envelope, as the TPDU does, and the link's is the configured
``message_header`` (never a terminal's: the link encodes with the dialect
minus its header, so a header in the document it is handed is not sent). It
goes on everything the link writes: requests, reversals and advices, its
network messages and its answers to the host's. Whatever header the host
puts on its messages is decoded and dropped before matching, so it is never
journaled, reported late or passed on to a terminal.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import socket
import ssl as _ssl
import struct
import time
from dataclasses import dataclass
from typing import Callable

from core import framing, iso8583
from core.health import AcquirerHealth
from switch.config import AcquirerConfig
from switch.logs import RateLimitedLog
from switch.messages import (
    ACTION_CODES_1993,
    is_response_to,
    mask_pan,
    spec_is_1993,
    switch_response,
    transmission_time,
)

log = logging.getLogger("isoswitch.acquirer")

# Per-message warnings a host can make arrive without bound (undecodable,
# late or unmatched responses, requests the switch does not take): counted
# in ``counters`` (and the link-event metrics) every time, logged a few per
# kind per minute per acquirer, then "suppressed K similar messages".
_L_UNDECODABLE = "undecodable response"
_L_LATE = "late response"
_L_UNMATCHED = "unmatched response"
_L_HOST_MTI = "host message not taken"

# How many timed-out STANs a link remembers, to tell late responses from strays
_LATE_MEMORY = 10_000
_DEFAULT_TPDU = b"\x60\x00\x00\x00\x00"


# NotSent.reason of a message this acquirer's dialect cannot carry (it never will)
CANNOT_ENCODE = "cannot encode for this acquirer"


class NotSent(Exception):
    """The acquirer certainly did not receive the request: failing over is safe."""

    def __init__(self, acquirer: str, reason: str):
        super().__init__(f"{acquirer}: not sent ({reason})")
        self.acquirer = acquirer
        self.reason = reason


# NotSent.reason when journaling the forwarding outlasted the request's time:
# the journal's fault, not the acquirer's (no breaker failure)
NOT_SENT_LATE = "no time left after journaling"


def _is_stan(s) -> bool:
    return isinstance(s, str) and len(s) == 6 and s.isascii() and s.isdigit() and s != "000000"


class OutcomeUnknown(Exception):
    """The request may have reached the acquirer: it must be reversed there."""

    def __init__(self, acquirer: str, reason: str, stan: str, sent_doc: dict):
        super().__init__(f"{acquirer}: outcome unknown ({reason}), link STAN {stan}")
        self.acquirer = acquirer
        self.reason = reason
        self.stan = stan
        self.sent_doc = sent_doc


@dataclass(slots=True)
class AcquirerReply:
    doc: dict
    stan: str
    sent_doc: dict
    latency: float
    acquirer: str = ""


class _Pending:
    __slots__ = ("future", "conn", "mti", "sent_at", "timer", "doc")

    def __init__(self, future, conn, mti, sent_at, doc):
        self.future = future
        self.conn = conn
        self.mti = mti
        self.sent_at = sent_at
        self.timer = None
        self.doc = doc


def _connected_to_itself(transport: asyncio.BaseTransport) -> bool:
    local = transport.get_extra_info("sockname")
    return local is not None and local == transport.get_extra_info("peername")


def _close_with_reset(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _LinkProtocol(asyncio.Protocol):
    """One TCP/TLS connection of a link: framing in, frames out."""

    def __init__(self, link: "AcquirerLink", index: int):
        self.link = link
        self.index = index
        self.transport: asyncio.Transport | None = None
        self.decoder = framing.FrameDecoder(
            header=link.cfg.framing, max_frame=link.cfg.max_frame, tpdu=link.cfg.tpdu
        )
        self.ready = False
        # the host said sign-off (x800 DE70 002 / 1804 DE24 802): no new
        # requests on this connection until it signs on again
        self.signed_off = False
        self.loop = asyncio.get_running_loop()
        self.closed = self.loop.create_future()
        self.last_rx = time.monotonic()
        self._out: list[bytes] = []

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.last_rx = time.monotonic()
        try:
            frames = self.decoder.feed(data)
        except framing.FrameError as e:
            for frame in e.frames:
                self.link._on_frame(frame, self)
            self.link.counters["frame_errors"] += 1
            log.warning("acquirer %s: framing error (%s), dropping connection", self.link.name, e.msg)
            self.transport.abort()
            return
        on_frame = self.link._on_frame
        for frame in frames:
            on_frame(frame, self)

    def connection_lost(self, exc):
        self.ready = False
        self.link._on_connection_lost(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def write(self, payload: bytes) -> bool:
        """Queue one request for this loop iteration's single write.

        True means "possibly sent" from here on: if the connection dies before
        the flush, the caller treats the outcome as unknown and reverses it,
        the safe side of DESIGN.md #3.
        """
        t = self.transport
        if t is None or t.is_closing():
            return False
        prefix = self.link.prefix
        if prefix:  # TPDU and / or message header, in that order on the wire
            payload = prefix + payload
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(framing.build_frame(payload, self.link.cfg.framing, self.link.cfg.max_frame))
        return True

    def _flush(self) -> None:
        out, self._out = self._out, []
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(out[0] if len(out) == 1 else b"".join(out))


class AcquirerLink:
    """A pool of persistent connections to one acquirer."""

    def __init__(
        self,
        cfg: AcquirerConfig,
        health: AcquirerHealth | None = None,
        *,
        ssl_context: _ssl.SSLContext | None = None,
        on_late: Callable[[str, dict], None] | None = None,
    ):
        self.cfg = cfg
        self.name = cfg.name
        self.health = health or AcquirerHealth(
            cfg.name,
            failure_threshold=cfg.breaker.failure_threshold,
            open_seconds=cfg.breaker.open_seconds,
            half_open_max=cfg.breaker.half_open_max,
        )
        # wire_spec: the dialect as it is on the wire; spec: the same without
        # its message header, which is the link's envelope (see the module
        # docstring). Equal when the dialect has none.
        self.wire_spec = iso8583.load_dialect(cfg.dialect)
        self.header = message_header_bytes(cfg.name, cfg.dialect, self.wire_spec, cfg.message_header)
        if self.header:
            self.spec = dict(self.wire_spec, h=dict(self.wire_spec["h"], max_len=0))
        else:
            self.spec = self.wire_spec
        # put before every message written: the TPDU, then the message header
        self.prefix = (_DEFAULT_TPDU if cfg.tpdu else b"") + self.header
        # ISO 8583:1993 hosts: 1804 network management with a DE24 function code
        self.v1993 = spec_is_1993(self.spec)
        # "Try elsewhere" codes are configured as ISO 8583:1987 response codes;
        # a 1993 host answers with the action codes they stand for (91 -> 907,
        # 92 -> 908, 96 -> 909), which must fail over just the same
        codes = frozenset(cfg.try_elsewhere_codes)
        if self.v1993:
            codes |= {ACTION_CODES_1993[c] for c in codes if c in ACTION_CODES_1993}
        self.try_elsewhere = codes
        self.ssl_context = ssl_context
        self.on_late = on_late
        self.pending: dict[str, _Pending] = {}
        self._slot_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._reserved: set[str] = set()  # STANs assigned, awaiting their journal write
        # timed-out or lost STAN -> the MTI of the request that went out under it
        self._late: collections.OrderedDict[str, str] = collections.OrderedDict()
        # trace numbers this link assigns: all of them, or this process's
        # block when several share a PostgreSQL journal (set_stan_range)
        self._stan_lo, self._stan_hi = 1, 999_999
        self._stan = random.randrange(1, 999_999)
        self._conns: list[_LinkProtocol | None] = [None] * max(1, cfg.connections)
        self._rr = 0
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.draining = False
        self.port = cfg.port
        self.counters = collections.Counter()
        self.log_limiter = RateLimitedLog(log)

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for i in range(len(self._conns)):
            self._tasks.append(loop.create_task(self._run_connection(i), name=f"link-{self.name}-{i}"))

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for c in self._conns:
            if c is not None and c.transport is not None:
                c.transport.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    @property
    def up(self) -> bool:
        return any(c is not None and c.ready for c in self._conns)

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def connection_states(self) -> list[bool]:
        return [c is not None and c.ready for c in self._conns]

    async def wait_up(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.up and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.up

    async def _run_connection(self, i: int) -> None:
        cfg = self.cfg
        delay = cfg.reconnect_min
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                transport, proto = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: _LinkProtocol(self, i),
                        cfg.host,
                        self.port,
                        ssl=self.ssl_context,
                        server_hostname=(cfg.server_hostname or cfg.host) if self.ssl_context else None,
                    ),
                    timeout=max(cfg.timeout, 1.0),
                )
                if _connected_to_itself(transport):
                    # TCP simultaneous open: with nothing listening on a
                    # local acquirer port that lies in the ephemeral range,
                    # a retry can draw that very port as its source and
                    # connect to itself. Such a "link" would swallow
                    # requests (and sign on to itself), and it holds the
                    # port the acquirer needs to listen again: closed with a
                    # reset, not into TIME_WAIT, which would hold it a minute.
                    _close_with_reset(transport)
                    raise ConnectionRefusedError("connected to itself: nothing listens on the acquirer port")
            except asyncio.CancelledError:
                raise
            except (OSError, asyncio.TimeoutError, _ssl.SSLError) as e:
                self.counters["connect_failures"] += 1
                self.health.record_failure("connect", time.monotonic())
                log.info("acquirer %s[%d]: connect failed (%s); retry in %.2fs",
                         self.name, i, type(e).__name__, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter
                delay = min(delay * 2, cfg.reconnect_max)
                continue
            self._conns[i] = proto
            try:
                if cfg.sign_on and not await self._network(proto, "001"):
                    log.warning("acquirer %s[%d]: sign-on not answered", self.name, i)
                    proto.transport.abort()
                else:
                    proto.ready = not proto.signed_off
                    delay = cfg.reconnect_min
                    self.counters["connects"] += 1
                    log.info("acquirer %s[%d]: link up", self.name, i)
                    await self._echo_until_closed(proto)
            except asyncio.CancelledError:
                proto.transport.close()
                raise
            finally:
                proto.ready = False
                self._conns[i] = None
            if not self._stopping:
                log.warning("acquirer %s[%d]: link down", self.name, i)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, cfg.reconnect_max)

    async def _echo_until_closed(self, proto: _LinkProtocol) -> None:
        cfg = self.cfg
        if cfg.echo_interval <= 0:
            await proto.closed
            return
        misses = 0
        while not proto.closed.done():
            idle = time.monotonic() - proto.last_rx
            wait = cfg.echo_interval - idle
            if wait > 0:
                await asyncio.wait([proto.closed], timeout=wait)
                continue
            if await self._network(proto, "301"):
                misses = 0
            else:
                misses += 1
                self.counters["echo_misses"] += 1
                if misses >= cfg.echo_misses:
                    log.warning("acquirer %s[%d]: %d echoes unanswered, marking link down",
                                self.name, proto.index, misses)
                    proto.transport.abort()
                    await proto.closed
                    return
                proto.last_rx = time.monotonic()  # next echo one interval later

    async def _network(self, proto: _LinkProtocol, code: str) -> bool:
        """Sign-on (001) or echo (301) on one connection; True if approved.

        ISO 8583:1987: 0800 with DE70 `code`, answered 0810/00. ISO 8583:1993:
        1804 with DE24 function code 801 (sign-on) or 831 (echo), answered
        1814 with action code 800.
        """
        if self.v1993:
            doc = {"t": "1804", "7": transmission_time(), "24": {"001": "801", "301": "831"}.get(code, "831")}
        else:
            doc = {"t": "0800", "7": transmission_time(), "70": code}
        try:
            reply = await self._send_on(proto, doc, min(self.cfg.timeout, 10.0))
        except (NotSent, OutcomeUnknown):
            return False
        return reply.doc.get("39", "800" if self.v1993 else "00") in ("00", "800")

    # -- requests ------------------------------------------------------------

    def set_stan_range(self, lo: int, hi: int) -> None:
        """Assign trace numbers from ``lo``..``hi`` only (from a random point in
        it): the block this process holds among those sharing a PostgreSQL
        journal, so that two processes linked to one acquirer never send the
        same DE11 at once (its duplicate check would refuse one of them).
        A repeat still goes under the number its first attempt had."""
        if not 1 <= lo <= hi <= 999_999:
            raise ValueError(f"trace number range {lo}..{hi} is not within 1..999999")
        self._stan_lo, self._stan_hi = int(lo), int(hi)
        self._stan = random.randrange(lo, hi + 1)

    def _next_stan(self) -> str:
        s = self._stan
        lo, hi = self._stan_lo, self._stan_hi
        pending, late = self.pending, self._late
        for _ in range(hi - lo + 1):
            s = s + 1 if s < hi else lo
            key = f"{s:06d}"
            if key not in pending and key not in late and key not in self._reserved:
                self._stan = s
                return key
        raise NotSent(self.name, "no free trace number")

    def _pick(self) -> _LinkProtocol | None:
        conns = self._conns
        n = len(conns)
        for k in range(n):
            c = conns[(self._rr + k) % n]
            if c is not None and c.ready:
                self._rr = (self._rr + k + 1) % n
                return c
        return None

    async def request(self, doc: dict, timeout: float, before_write=None, *,
                      draining_ok: bool = False, stan: str | None = None) -> AcquirerReply:
        """Send `doc` (acquirer-side form, owned by the link from here: DE11 is replaced).

        Raises NotSent when the request certainly did not leave, OutcomeUnknown
        when it may have (timeout, link lost after the write).
        `before_write(stan, doc)` is awaited after the link STAN is assigned and
        before any byte is written: the journal records the forwarding there
        (DESIGN.md #2), so a crash after the write always finds it. `timeout`
        counts from this call, that write included: when the journal took all
        of it, nothing is sent (NotSent, NOT_SENT_LATE) -- the terminal has
        been answered by then.
        `draining_ok`: reversals of earlier traffic still go to a drained link.
        `stan`: the trace number to send under (a repeat carries its first
        attempt's); NotSent while another message on this link holds it.
        """
        if self.draining and not draining_ok:
            raise NotSent(self.name, "draining")
        # requests whose journal write is under way (_reserved) count: they go
        # out the moment it is done, and the cap is what the host is promised
        if len(self.pending) + len(self._reserved) >= self.cfg.max_in_flight:
            # Backpressure, not rejection: wait for a slot within half the
            # budget, then give up while there is still time to fail over.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout / 2
            while len(self.pending) + len(self._reserved) >= self.cfg.max_in_flight:
                waiter = loop.create_future()
                self._slot_waiters.append(waiter)
                try:
                    await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise NotSent(self.name, "in-flight limit") from None
                finally:
                    if not waiter.done():
                        waiter.cancel()
            timeout = max(0.001, timeout - (loop.time() - (deadline - timeout / 2)))
        conn = self._pick()
        if conn is None:
            self._release_slot()  # a slot this request may have been woken for
            raise NotSent(self.name, "link down")
        return await self._send_on(conn, doc, timeout, before_write, stan)

    def _release_slot(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    async def _send_on(self, conn: _LinkProtocol, doc: dict, timeout: float,
                       before_write=None, stan: str | None = None) -> AcquirerReply:
        if stan is None or not _is_stan(stan):
            stan = self._next_stan()
        elif stan in self.pending or stan in self._reserved:
            # A repeat goes under its first attempt's number or not at all:
            # under another, the host could not tell it a repeat, and its
            # answer would match nothing journaled. Another message holds the
            # number for at most its timeout; the queue tries again after it.
            self.counters["stan_busy"] += 1
            self._release_slot()
            raise NotSent(self.name, f"trace number {stan} in use on the link")
        else:
            # a late answer to the earlier attempt under this number now
            # answers this one: both are the same reversal or advice
            self._late.pop(stan, None)
        out = doc  # callers hand over a fresh dict (flow, reversal queue, network messages)
        out["11"] = stan
        try:
            raw, _ = iso8583.encode(out, self.spec)
        except iso8583.EncodeError as e:
            self.counters["encode_errors"] += 1
            raise NotSent(self.name, f"{CANNOT_ENCODE}: {e.msg}, field {e.field}") from None
        if before_write is not None:
            t0 = time.monotonic()
            self._reserved.add(stan)
            try:
                await before_write(stan, out)
            except BaseException:
                self._reserved.discard(stan)
                self._release_slot()
                raise
            self._reserved.discard(stan)
            waited = time.monotonic() - t0
            if waited >= timeout:
                self.counters["not_sent_late"] += 1
                self._release_slot()
                raise NotSent(self.name, NOT_SENT_LATE)
            timeout -= waited
            if not conn.ready:
                # it closed or the host signed off on it while the journal
                # wrote: nothing went out, so another connection of the link
                # takes it (a signed-off connection gets no new request)
                conn = self._pick()
                if conn is None:
                    self._release_slot()
                    raise NotSent(self.name, "link down")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        now = time.monotonic()
        p = _Pending(fut, conn, out["t"], now, out)
        if not conn.write(raw):
            self._release_slot()
            raise NotSent(self.name, "connection closing")
        self.pending[stan] = p
        p.timer = loop.call_at(now + timeout, self._expire, stan)
        self.counters["sent"] += 1
        try:
            reply = await fut
        except _Expired:
            raise OutcomeUnknown(self.name, "timeout", stan, out) from None
        except _Lost:
            raise OutcomeUnknown(self.name, "link lost", stan, out) from None
        return AcquirerReply(reply, stan, out, time.monotonic() - now, self.name)

    def _expire(self, stan: str) -> None:
        p = self.pending.pop(stan, None)
        if p is None:
            return
        self._release_slot()
        self.counters["timeouts"] += 1
        self._remember_late(stan, p.mti)
        if not p.future.done():
            p.future.set_exception(_Expired())

    def _remember_late(self, stan: str, mti: str) -> None:
        late = self._late
        late[stan] = mti
        if len(late) > _LATE_MEMORY:
            late.popitem(last=False)

    def _on_connection_lost(self, conn: _LinkProtocol) -> None:
        lost = [s for s, p in self.pending.items() if p.conn is conn]
        for stan in lost:
            p = self.pending.pop(stan)
            self._release_slot()
            if p.timer is not None:
                p.timer.cancel()
            self._remember_late(stan, p.mti)
            if not p.future.done():
                p.future.set_exception(_Lost())
        if lost:
            self.counters["lost_in_flight"] += len(lost)
            # one failure for the breaker per lost connection, however many
            # requests it carried: a single reset must not hold the acquirer
            # open for open_seconds when the link is back in milliseconds
            self.health.record_failure("connect", time.monotonic())

    def _on_frame(self, frame: bytes, conn: _LinkProtocol) -> None:
        if self.cfg.tpdu:
            try:
                _, frame = framing.split_tpdu(frame)
            except framing.FrameError:
                self.counters["undecodable"] += 1
                return
        try:
            doc, _ = iso8583.decode(frame, self.wire_spec)
        except iso8583.DecodeError as e:
            self.counters["undecodable"] += 1
            self.log_limiter.warning(_L_UNDECODABLE, "acquirer %s: undecodable response (%s at field %s pos %d)",
                                     self.name, e.msg, e.field, e.pos)
            return
        if self.header:
            # the host's envelope, whatever it says: not part of the message
            doc.pop("h", None)
        mti = doc.get("t", "")
        if len(mti) == 4 and mti[2] in "0246":  # the host's own request, advice or notification
            self._on_host_message(doc, conn)
            return
        stan = doc.get("11", "")
        p = self.pending.get(stan)
        if p is None or not is_response_to(p.mti, mti):
            late_mti = self._late.get(stan)
            if late_mti is not None and not is_response_to(late_mti, mti):
                late_mti = None  # not an answer to what went out under that number
            if late_mti is not None and late_mti[1] == "8":
                # the link's own echo or sign-on answered late: no transaction
                # to journal it against, and not a late response (DESIGN.md #5)
                self.counters["late_network"] += 1
            elif late_mti is not None:
                self.counters["late"] += 1
                self.log_limiter.warning(_L_LATE, "acquirer %s: late response for link STAN %s (rc %s, pan %s)",
                                         self.name, stan, doc.get("39"), mask_pan(doc.get("2")))
                if self.on_late is not None:
                    self.on_late(self.name, doc)
            else:
                self.counters["unmatched"] += 1
                self.log_limiter.warning(_L_UNMATCHED, "acquirer %s: unmatched response MTI %s STAN %s",
                                         self.name, doc.get("t"), stan)
            return
        del self.pending[stan]
        if self._slot_waiters:
            self._release_slot()
        if p.timer is not None:
            p.timer.cancel()
        if not p.future.done():
            p.future.set_result(doc)


    def _on_host_message(self, doc: dict, conn: _LinkProtocol) -> None:
        """A message the host started on this connection: answered on it.

        Network management (x800, and x820 advices) is what hosts send
        unprompted: echo tests, sign-on, sign-off, cut-over. A host that gets
        no answer to its echo marks the link down, so the switch answers:
        00 (1993: 800) for those, 12 (902) for any other code, such as a key
        exchange the switch does not take part in. Sign-off stops new
        requests on the connection (the link fails over, as for a link that
        is down: nothing was sent) until the host signs on again; requests
        already sent stay pending and are answered or reversed as usual.
        Any other request or advice (the switch is not an issuer) is answered
        12 and counted; notifications (x4x) want no answer.
        """
        mti = doc["t"]
        fn = mti[2]
        self.counters["host_messages"] += 1
        if fn == "4" or fn == "6":
            return
        code = None
        if mti[1] == "8":
            code = doc.get("24") if self.v1993 else doc.get("70")
            if code in HOST_SIGN_OFF:
                if not conn.signed_off:
                    conn.signed_off = True
                    conn.ready = False
                    self.counters["host_sign_offs"] += 1
                    log.warning("acquirer %s[%d]: host signed off; no new requests on this connection "
                                "until it signs on", self.name, conn.index)
                rc = "00"
            elif code in HOST_SIGN_ON:
                if conn.signed_off:
                    conn.signed_off = False
                    conn.ready = not conn.closed.done()
                    log.warning("acquirer %s[%d]: host signed on again", self.name, conn.index)
                rc = "00"
            else:
                rc = "00" if code in HOST_NETWORK_OK else "12"
        else:
            rc = "12"
            self.log_limiter.warning(_L_HOST_MTI, "acquirer %s: host sent MTI %s, which the switch does not take; "
                                     "answered 12", self.name, mti)
        resp = switch_response(doc, rc)
        if code is not None:
            resp["24" if self.v1993 else "70"] = code
        try:
            raw, _ = iso8583.encode(resp, self.spec)
        except iso8583.EncodeError as e:
            self.counters["encode_errors"] += 1
            self.log_limiter.warning(_L_HOST_MTI, "acquirer %s: cannot answer the host's MTI %s (%s, field %s)",
                                     self.name, mti, e.msg, e.field)
            return
        if conn.write(raw):
            self.counters["host_answers"] += 1


def message_header_bytes(name: str, dialect: str, wire_spec: dict, header: str) -> bytes:
    """The message header (dialect field "h") ``header`` as it goes on the
    wire in front of the MTI, length prefix included; b"" for a dialect
    without one. ValueError when the configuration and the dialect disagree
    (switch.config reports the same at load; this is for links built from an
    AcquirerConfig made in code)."""
    h = wire_spec["h"]
    if h["max_len"] <= 0:
        if header:
            raise ValueError(f"acquirer {name}: message_header is set, but dialect {dialect} has no "
                             "message header")
        return b""
    if not header:
        raise ValueError(f"acquirer {name}: dialect {dialect} has a message header (h); "
                         "set message_header")
    try:
        _, enc = iso8583.encode({"h": header, "t": "0800"}, wire_spec, strict=True)
    except iso8583.EncodeError as e:
        raise ValueError(f"acquirer {name}: message_header does not fit dialect {dialect}'s "
                         f"header (field {e.field}: {e.msg})") from None
    return bytes(enc["h"]["len"]) + bytes(enc["h"]["data"])


# Network management codes the switch answers 00 when the host sends them:
# ISO 8583:1987 DE70 / ISO 8583:1993 DE24 function codes
HOST_SIGN_ON = frozenset({"001", "801"})
HOST_SIGN_OFF = frozenset({"002", "802"})
HOST_NETWORK_OK = frozenset({"301", "831", "201", "202", "821"})


class _Expired(Exception):
    pass


class _Lost(Exception):
    pass
