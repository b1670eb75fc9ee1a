"""Terminal listener: mTLS (or explicitly configured plain TCP), framing, decoding, answering.

Bad input (DESIGN.md): a framing error (bad or oversized length header)
desynchronises the stream, so the connection is closed gracefully: nothing
more is taken from it, the answers to its requests already in flight are
still written (each bounded by its deadline), then it closes. An undecodable
message inside a good frame is answered 30 when its MTI (a request's) and
STAN can be read; otherwise nothing the terminal could match can be sent, and
the connection is closed gracefully in the same way. The same happens when not even a minimal
answer (MTI, DE11, DE39) to a request can be encoded in the listener's
dialect. A response MTI (third digit odd: 0210, 0810, ...) from a terminal is
counted and dropped: ISO 8583 never answers a response. A frame that starts
but does not finish within `frame_timeout` (slow drip) closes the connection, as does `idle_timeout`
without any data, or with none of its answers read (a terminal that does not
read makes the switch stop reading from it first, so what is buffered for it
stays bounded). None of this touches other connections. A terminal that
half-closes (a FIN after its requests, plain TCP) is answered the same way
before the close. A dialect's message header ("h") is the terminal's own on
every answer, as the TPDU is.

The log stays bounded too: each of these events is counted (``counters``,
hence the metrics), but the warnings they log go through one
:class:`switch.logs.RateLimitedLog` per listener, a few per kind per minute
and then one "suppressed K similar messages" line, so a stream of garbage
frames or connections cannot fill the disk with log lines.
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
from switch.logs import RateLimitedLog
from switch.messages import (
    ACTION_CODES_1993,
    NETWORK_REQUESTS,
    RC_FORMAT_ERROR,
    RC_INOPERATIVE,
    RC_SECURITY,
    RC_SYSTEM_ERROR,
    response_mti,
    switch_response,
)

log = logging.getLogger("isoswitch.listener")

# After a graceful close has written its last answer and a FIN (plain TCP),
# how long the peer gets to close its side before the connection is dropped.
LINGER = 2.0
# Fields of the minimal answer when the full response cannot be encoded
_MINIMAL_FIELDS = ("t", "11", "39", "41")
# Per-event warnings: at most this many per kind per interval (RateLimitedLog)
LOG_BURST = 10
LOG_INTERVAL = 60.0
# their kinds (RateLimitedLog keys; each starts its summary line)
_L_CLOSING = "terminal connection closing"
_L_FRAMING = "terminal framing error"
_L_UNDECODABLE = "undecodable terminal message"
_L_TIMEOUT = "terminal connection timed out"
_L_RESPONSE = "terminal sent a response"
_L_IDENTITY = "terminal identity mismatch"
_L_ENCODE = "answer cannot be encoded"


def _mti_kind(mti) -> str:
    """'request', 'response' (ISO 8583 MTI position 3 odd) or 'unreadable'."""
    if not isinstance(mti, str) or len(mti) != 4 or not mti.isascii() or not mti.isdigit():
        return "unreadable"
    return "response" if mti[2] in "13579" else "request"


class TerminalListener:
    def __init__(self, cfg: ListenerConfig, flow: TransactionFlow, ssl_context: _ssl.SSLContext | None):
        self.cfg = cfg
        self.flow = flow
        self.ssl_context = ssl_context
        self.wire_spec = iso8583.load_dialect(cfg.dialect)
        # A message header ("h", e.g. BASE24's "ISO025000070") belongs to the
        # connection's envelope, as the TPDU does: each answer carries the
        # terminal's own back. The flow, which checks that answers fit the
        # terminal's dialect, sees the dialect without one (nothing it makes
        # has a header, and an acquirer's is not the terminal's).
        self.header = self.wire_spec["h"]["max_len"] > 0
        self.spec = dict(self.wire_spec, h=dict(self.wire_spec["h"], max_len=0)) if self.header else self.wire_spec
        self.defined_fields = frozenset(k for k in self.spec if not k.startswith("_"))
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[TerminalProtocol] = set()
        self.counters = collections.Counter()
        self.port = cfg.port
        self.frame_timeout = min(10.0, cfg.idle_timeout)
        self.accepting = True
        # what terminals can make happen once per frame or connection is logged at a bounded rate
        self.log_limiter = RateLimitedLog(log, LOG_BURST, LOG_INTERVAL)

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
        self._log = listener.log_limiter
        cfg = listener.cfg
        self.cfg = cfg
        self.spec = listener.wire_spec
        self._header = listener.header
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
        self.unanswered = 0  # requests handed to the flow whose answer is not yet written
        self.closing = False  # graceful close: nothing more is read; in-flight answers still go out
        self._close_scheduled = False
        self._linger = None
        self._peer_eof = False  # the terminal has finished sending (FIN)

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
        if self._linger is not None:
            self._linger.cancel()
        self.transport = None

    def eof_received(self):
        # A terminal that half-closes after its requests (FIN, still reading)
        # is owed their answers: asyncio's default would close at once and
        # lose them while the acquirer may have approved (invariant 1). TLS
        # cannot stay half-open in asyncio, and with nothing owed the close
        # is the peer's ordinary goodbye: both close now, as before.
        self._peer_eof = True
        t = self.transport
        if t is None or not t.can_write_eof() or self._linger is not None:
            return False  # TLS, or our own FIN has followed the last answer already
        if self.unanswered <= 0 and not self._out and not self._close_scheduled:
            return False
        self._close_gracefully("half_closed", "terminal finished sending")
        return True

    def _close_gracefully(self, counter: str, reason: str) -> None:
        """Take nothing more from this terminal; write the answers of its
        requests in flight (each guarded by its deadline), then close."""
        if self.closing:
            return
        self.closing = True
        self.partial_since = None
        self.listener.counters[counter] += 1
        self._log.warning(_L_CLOSING, "terminal connection closing: %s (%d answer(s) still to write)", reason,
                          self.unanswered)
        self._sync_reading()  # what still arrives is read and discarded, never left unread in the kernel
        self._maybe_finish_close()

    def _maybe_finish_close(self) -> None:
        if self.closing and self.unanswered <= 0 and not self._close_scheduled:
            self._close_scheduled = True
            # after the flush an answer just written scheduled (call_soon is FIFO)
            self.loop.call_soon(self._finish_close)

    def _finish_close(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if self._out:
            self._flush()
        if self._peer_eof:
            t.close()  # the terminal's side is closed already: nothing to linger for
        elif t.can_write_eof():
            # FIN after the answers; what the peer still sends is read and
            # discarded until it closes (closing with unread data would make
            # the kernel send a reset, which can destroy answers not yet read)
            t.write_eof()
            # everything received has been read, so this close sends no reset
            self._linger = self.loop.call_later(LINGER, t.close)
        else:  # TLS: close_notify after the buffered answers
            t.close()

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
            self._log.info(_L_TIMEOUT, "terminal connection closed: frame not completed in %.1fs",
                           self.listener.frame_timeout)
            self.transport.abort()
            return
        if self.write_paused and now - self.write_paused_since > self.cfg.idle_timeout:
            # it has read none of its answers for idle_timeout: a terminal
            # that is gone or stuck; its buffered answers are dropped with it
            self.listener.counters["write_stalled_closed"] += 1
            self._log.info(_L_TIMEOUT, "terminal connection closed: answers not read for %.1fs", self.cfg.idle_timeout)
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
        want = (self.paused or self.write_paused) and not self.closing
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
        if self.closing:
            return  # graceful close under way: nothing more is taken from this terminal
        try:
            frames = self.decoder.feed(data)
        except framing.FrameError as e:
            # the stream is desynchronised: nothing after the bad header can be
            # trusted, but the requests already taken from it (and the whole
            # frames before the header) are still answered before the close
            self.listener.counters["frame_errors"] += 1
            self._log.warning(_L_FRAMING, "terminal framing error (%s); closing connection", e.msg)
            for frame in e.frames:
                if not self.closing:
                    self._on_frame(frame, now)
            self._close_gracefully("frame_error_closed", "framing error")
            return
        if self.decoder.buffered:
            # the frame held now began in this read if one completed in it: a
            # steady stream whose reads all end mid-frame is not a slow drip
            if self.partial_since is None or frames:
                self.partial_since = now
        else:
            self.partial_since = None
        for frame in frames:
            if self.closing:
                self.listener.counters["frames_discarded_closing"] += 1
                continue
            self._on_frame(frame, now)

    def _on_frame(self, frame: bytes, now: float) -> None:
        tpdu = None
        if self.cfg.tpdu:
            try:
                tpdu, frame = framing.split_tpdu(frame)
            except framing.FrameError as e:
                self.listener.counters["decode_errors"] += 1
                self._log.warning(_L_UNDECODABLE, "undecodable terminal message: bad TPDU (%s)", e.msg)
                self._close_gracefully("unanswerable_closed", "undecodable message, no answer possible")
                return
        try:
            req, _ = iso8583.decode(frame, self.spec, strict=True)
        except iso8583.DecodeError as e:
            self.listener.counters["decode_errors"] += 1
            partial, _ = iso8583.decode_partial(frame, self.spec)
            self._log.warning(_L_UNDECODABLE, "undecodable terminal message: %s at field %s pos %d", e.msg, e.field,
                              e.pos)
            kind = _mti_kind(partial.get("t"))
            if kind == "response":
                self._drop_response(partial)
            elif kind == "request" and _usable_stan(partial.get("11")):
                self._write(switch_response(partial, RC_FORMAT_ERROR), tpdu, partial)
            else:
                # no MTI or STAN the terminal could match a 30 against: answering
                # is impossible, and silence would leave it waiting out its timeout
                self._close_gracefully("unanswerable_closed", "undecodable message, no answer possible")
            return
        kind = _mti_kind(req.get("t"))
        if kind == "response":
            self._drop_response(req)
            return
        if kind == "unreadable":
            # an MTI that is not four digits (the codec takes any 4 characters):
            # no response MTI the terminal would recognise can be made for it
            self.listener.counters["decode_errors"] += 1
            self._log.warning(_L_UNDECODABLE, "terminal message with an MTI that is not 4 digits; no answer possible")
            self._close_gracefully("unanswerable_closed", "MTI not numeric, no answer possible")
            return
        if self.cfg.bind_terminal_id and req.get("t") not in NETWORK_REQUESTS and (
                (req.get("41") or "").strip() != self.identity):
            # this certificate may only transact as its own terminal (DESIGN.md: mTLS identity)
            self.listener.counters["identity_mismatch"] += 1
            self._log.warning(_L_IDENTITY, "terminal identity mismatch: certificate CN %r, DE41 %r", self.identity,
                              (req.get("41") or "").strip())
            self._write(switch_response(req, RC_SECURITY), tpdu, req)
            return
        self.in_flight += 1
        if self.in_flight >= self.cfg.max_in_flight and not self.paused:
            self.paused = True
            self._sync_reading()
        ctx = RequestContext(self.listener.cfg.name, self.identity, now, now + self.cfg.terminal_timeout)
        answered = [False]
        self.unanswered += 1
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

    def _drop_response(self, doc: dict) -> None:
        # a terminal never gets an answer to a response (ISO 8583)
        self.listener.counters["responses_dropped"] += 1
        stan = doc.get("11")
        self._log.warning(_L_RESPONSE, "terminal sent a response (MTI %s, STAN %s): dropped, not answered",
                          doc.get("t"), stan if _usable_stan(stan) else "?")

    def _answered(self) -> None:
        self.unanswered -= 1
        if self.closing:
            self._maybe_finish_close()

    def _deadline(self, req, tpdu, answered):
        if not answered[0]:
            answered[0] = True
            self.listener.counters["deadline_answers"] += 1
            self._write(switch_response(req, RC_INOPERATIVE), tpdu, req)
            self._answered()

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
        self._write(resp, tpdu, req)
        self._answered()

    def _write(self, resp: dict, tpdu: bytes | None, req: dict) -> None:
        """Queue ``resp`` for the terminal. Never raises: runs in the serving
        task and in the deadline guard, where an exception would leave the
        terminal without any answer."""
        t = self.transport
        if t is None or t.is_closing():
            self.listener.counters["answers_lost"] += 1  # connection gone (invariant 1's exception)
            return
        try:
            out = self._encode_answer(resp, tpdu, req)
        except Exception as e:  # a bug in the encoder: still never out of the task
            # the type only: an unexpected exception's text may carry field data
            self._log.error(_L_ENCODE, "cannot encode any answer to MTI %s: %s", _mti_or_none(resp),
                            type(e).__name__)
            out = None
        if out is None:
            # not even the minimal answer fits this dialect: the terminal cannot
            # be answered on this connection, so it is closed rather than left waiting
            self.listener.counters["answers_unencodable"] += 1
            self._close_gracefully("unanswerable_closed", "response cannot be encoded in the listener dialect")
            return
        # Pipelined answers completing in one loop iteration leave in one write:
        # one TLS record batch and one syscall instead of one per response.
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(out)
        self.listener.counters["answered"] += 1

    def _encode_answer(self, resp: dict, tpdu: bytes | None, req: dict) -> bytes | None:
        """The framed answer to ``req``: ``resp``, else a minimal switch answer
        (MTI, DE11, DE39 30/96 in this dialect's DE39 format, DE41), else None."""
        if not self._defined.issuperset(resp):
            # the acquirer's dialect may carry fields this terminal's does not
            resp = {k: v for k, v in resp.items() if k in self._defined}
        if self._header:
            resp = {**resp, "h": req.get("h")}
        try:
            return self._frame(iso8583.encode(resp, self.spec)[0], tpdu)
        except (iso8583.EncodeError, framing.FrameError) as e:
            self._log.error(_L_ENCODE, "cannot encode response MTI %s: %s at field %s", _mti_or_none(resp),
                            getattr(e, "msg", e), getattr(e, "field", "-"))
        rc = resp.get("39")
        rc = RC_FORMAT_ERROR if rc in (RC_FORMAT_ERROR, ACTION_CODES_1993[RC_FORMAT_ERROR]) else RC_SYSTEM_ERROR
        mti = resp.get("t")
        minimal = {"t": mti if _mti_kind(mti) == "response" else response_mti(mti if isinstance(mti, str) else "0200"),
                   "39": self._rc_in_dialect(rc)}
        for k in ("h", "11", "41"):
            if k in resp and k in self._defined:
                minimal[k] = resp[k]
        for fields in (_MINIMAL_FIELDS, ("t", "11", "39")):
            try:
                raw, _ = iso8583.encode({k: v for k, v in minimal.items() if k in fields or k == "h"}, self.spec)
                framed = self._frame(raw, tpdu)
            except (iso8583.EncodeError, framing.FrameError) as e:
                self._log.error(_L_ENCODE, "cannot encode minimal response MTI %s: %s at field %s",
                                _mti_or_none(minimal), getattr(e, "msg", e), getattr(e, "field", "-"))
                continue
            self.listener.counters["minimal_answers"] += 1
            return framed
        return None

    def _rc_in_dialect(self, rc: str) -> str:
        """A 1987 response code (30/96) as this dialect's DE39 takes it: the
        code itself in a 2-character DE39, the ISO 8583:1993 action code in a
        3-character one."""
        f = self.spec.get("39") or {}
        if f.get("max_len") == 3 and f.get("len_type", 0) == 0:
            return ACTION_CODES_1993.get(rc, "909")
        return rc

    def _frame(self, raw: bytes, tpdu: bytes | None) -> bytes:
        if tpdu is not None:
            raw = framing.reply_tpdu(tpdu) + raw
        return framing.build_frame(raw, self.cfg.framing, self.cfg.max_frame)

    def _flush(self) -> None:
        out, self._out = self._out, []
        t = self.transport
        if t is None or t.is_closing():
            self.listener.counters["answers_lost"] += len(out)
            return
        t.write(out[0] if len(out) == 1 else b"".join(out))


def _usable_stan(stan) -> bool:
    """A DE11 a terminal can match an answer against."""
    return isinstance(stan, str) and 0 < len(stan) <= 12 and stan.isascii() and stan.isdigit()


def _mti_or_none(doc) -> str | None:
    mti = doc.get("t") if isinstance(doc, dict) else None
    return mti if _mti_kind(mti) != "unreadable" else None
