"""Simulated acquirer host: an asyncio ISO 8583 server for tests, the bench and dev runs.

:class:`AcquirerSimulator` listens on TCP (optionally TLS) and answers what an
acquirer host answers::

    x100/x101 -> x110   authorisation        (response code from the rules)
    x200/x201 -> x210   financial request    (response code from the rules)
    x120, x220 (+rep.)  -> x130, x230  advices, acknowledged with 00
    x400/x401 -> x410   reversal             (00)
    x420/x421 -> x430   reversal advice      (00)
    x800/x801 -> x810   network management   (DE70 001 sign-on, 002 sign-off,
                                              301 echo, 201/202 cut-over: 00;
                                              any other code: 12)

any other request class (third MTI digit even) is answered with the MTI's
response class and 39 = "12" (invalid transaction); a message whose function
digit is odd (a response or an acknowledgement sent to the host) is logged
and not answered. The last MTI digit of a repeat (1, 3, 5) becomes the
original's (0, 2, 4) in the answer: 0401 -> 0410.

The response echoes the fields an acquirer echoes (DE2, 3, 4, 7, 11, 12, 13,
32, 33, 37, 41, 42, 49, and 90/95 on reversals, 70 on network management),
adds DE39 and, when approved, a 6-character DE38 approval code derived from
the request (``approve_code_prefix`` + digits of a CRC of DE11/DE41/DE7), and
a DE37 retrieval reference number when the request had none. It never sends
DE35, DE52 or DE55 back.

In an ISO 8583:1993 dialect (``iso93ascii``, DE39 n3) two-character codes are
translated to three-digit action codes (00 -> 000, 51 -> 116, ...) and
network management is answered with 800.

Frames that do not decode are counted (``undecodable``) and dropped, as real
hosts do; a framing error (a length header that cannot be right) means the
stream is desynchronised, so it is counted (``frame_errors``) and that
connection is closed. Other connections are never affected.

Latency (:class:`LatencyModel`) is applied per message with a loop timer;
zero latency answers inside the same ``data_received`` call with one write
per batch, which is what makes tens of thousands of messages per second
possible. With a variable latency responses leave out of order, as they do
from a real host; the switch matches them by STAN.

A dialect with a message header ("h" with a length, as BASE24's
``ISO025000070``) gets one on every answer: ``message_header`` when given,
else the request's own header echoed. Messages the host starts carry
``message_header``, else the last header it received. ``received`` keeps
each request's header under "h", as it arrived.

The host can start messages too: :meth:`AcquirerSimulator.send_network`
(echo, sign-on, sign-off on every connection) and
:meth:`AcquirerSimulator.send_to_switch` (any message) return the switch's
answers.

Faults (:class:`Fault`) may be replaced at any time (``sim.fault = Fault(...)``)
and apply to messages received from then on.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import math
import random
import signal
import socket
import ssl as _ssl
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from core import iso8583
from core.framing import FrameDecoder, FrameError, build_frame, reply_tpdu, split_tpdu

__all__ = [
    "AcquirerSimulator",
    "Fault",
    "LatencyModel",
    "Rule",
    "ACTION_CODES_1993",
    "add_acquirer_parser",
    "dev_server_context",
    "dialect_is_1993",
    "response_mti",
    "run_acquirer_cli",
]

# Fields an acquirer echoes in every answer (when present in the request).
ECHO_FIELDS = ("2", "3", "4", "7", "11", "12", "13", "32", "33", "37", "41", "42", "49")
ECHO_REVERSAL = ECHO_FIELDS + ("90", "95")
ECHO_NETWORK = ("7", "11", "24", "32", "33", "70")
# Track data, PIN blocks and the terminal's ICC data are never echoed: an
# approved chip request gets the issuer's own DE55 instead (issuer_icc).

APPROVED_CODES = frozenset(("00", "08", "10", "11", "000", "001", "003", "800"))
NETWORK_CODES_OK = frozenset(("001", "002", "201", "202", "301"))

from switch.messages import ACTION_CODES_1993  # noqa: E402  (one table for switch and simulator)


def dialect_is_1993(spec: dict) -> bool:
    """True for an ISO 8583:1993 dialect (1xxx MTIs, 3-digit action codes)."""
    meta = spec.get("_meta") or {}
    if "1993" in str(meta.get("standard", "")):
        return True
    f39 = spec.get("39")
    return bool(f39) and f39.get("max_len") == 3


def response_mti(mti: str) -> str | None:
    """The answer's MTI (0200 -> 0210, 0401 -> 0410), or None for a non-request."""
    if len(mti) != 4 or not mti.isdigit():
        return None
    func = ord(mti[2]) - 48
    if func % 2:  # a response / acknowledgement: never answered
        return None
    origin = ord(mti[3]) - 48
    return mti[:2] + chr(49 + func) + chr(48 + origin - origin % 2)


# --------------------------------------------------------------------------
# Latency


class LatencyModel:
    """Per-message answer delay.

    ``kind``:

    * ``"fixed"``: always ``mean_ms`` (``latency_ms`` is an alias);
    * ``"uniform"``: between ``low_ms`` and ``high_ms`` (default 0 .. 2*mean);
    * ``"exponential"``: mean ``mean_ms`` (its p99 is 4.6 x mean; if only
      ``p99_ms`` is given the mean is derived from it);
    * ``"lognormal"``: mean ``mean_ms`` and 99th percentile ``p99_ms``
      (default 3 x mean); a p99 more than ~15 x the mean is capped there.

    ``low``/``high`` are accepted for ``low_ms``/``high_ms``. ``max_ms`` caps
    every sample; ``seed`` makes the sequence reproducible.
    A model whose every sample is 0 (:attr:`is_zero`) lets the simulator
    answer inline without any timer.
    """

    KINDS = ("fixed", "uniform", "exponential", "lognormal")

    def __init__(
        self,
        kind: str = "fixed",
        mean_ms: float | None = None,
        *,
        latency_ms: float | None = None,
        p99_ms: float | None = None,
        low_ms: float | None = None,
        high_ms: float | None = None,
        max_ms: float | None = None,
        seed: int | None = None,
        low: float | None = None,
        high: float | None = None,
    ):
        if low is not None:
            low_ms = low if low_ms is None else low_ms
        if high is not None:
            high_ms = high if high_ms is None else high_ms
        if kind not in self.KINDS:
            raise ValueError(f"unknown latency kind {kind!r} (expected one of {', '.join(self.KINDS)})")
        if mean_ms is None:
            mean_ms = latency_ms
        if mean_ms is None and kind == "exponential" and p99_ms is not None:
            mean_ms = p99_ms / -math.log(0.01)
        if mean_ms is None and kind == "uniform" and low_ms is not None and high_ms is not None:
            mean_ms = (low_ms + high_ms) / 2
        mean_ms = float(mean_ms or 0.0)
        for name, v in (("mean_ms", mean_ms), ("p99_ms", p99_ms), ("low_ms", low_ms),
                        ("high_ms", high_ms), ("max_ms", max_ms)):
            if v is not None and (v < 0 or v != v or v == math.inf):
                raise ValueError(f"latency {name} must be a finite number >= 0")
        self.kind = kind
        self.mean_ms = mean_ms
        self.p99_ms = p99_ms
        self.max_ms = max_ms
        self.seed = seed
        self._rng = random.Random(seed)
        if kind == "uniform":
            self.low_ms = 0.0 if low_ms is None else float(low_ms)
            self.high_ms = 2 * mean_ms if high_ms is None else float(high_ms)
            if self.high_ms < self.low_ms:
                raise ValueError("latency high_ms must be >= low_ms")
        else:
            self.low_ms = low_ms
            self.high_ms = high_ms
        if kind == "lognormal" and mean_ms > 0:
            p99 = 3 * mean_ms if p99_ms is None else float(p99_ms)
            z = 2.3263478740408408  # standard normal 99th percentile
            ratio = math.log(max(p99, mean_ms * 1.000001) / mean_ms)
            disc = z * z - 2 * ratio
            self._sigma = z - math.sqrt(disc) if disc > 0 else z
            self._mu = math.log(mean_ms) - self._sigma ** 2 / 2
        if kind == "fixed":
            self.is_zero = mean_ms == 0
        elif kind == "uniform":
            self.is_zero = self.high_ms == 0
        else:
            self.is_zero = mean_ms == 0
        if max_ms == 0:
            self.is_zero = True

    @classmethod
    def fixed(cls, ms: float) -> "LatencyModel":
        return cls("fixed", ms)

    def sample_ms(self) -> float:
        """One delay in milliseconds."""
        if self.is_zero:
            return 0.0
        kind = self.kind
        if kind == "fixed":
            v = self.mean_ms
        elif kind == "uniform":
            v = self._rng.uniform(self.low_ms, self.high_ms)
        elif kind == "exponential":
            v = self._rng.expovariate(1.0 / self.mean_ms)
        else:
            v = self._rng.lognormvariate(self._mu, self._sigma)
        if self.max_ms is not None and v > self.max_ms:
            v = self.max_ms
        return v

    def sample(self) -> float:
        """One delay in seconds."""
        return self.sample_ms() / 1000.0

    def __repr__(self) -> str:
        parts = [repr(self.kind), f"mean_ms={self.mean_ms:g}"]
        for name in ("p99_ms", "low_ms", "high_ms", "max_ms", "seed"):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name}={v!r}")
        return f"LatencyModel({', '.join(parts)})"


# --------------------------------------------------------------------------
# Rules and faults


def _as_tuple(v) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    return tuple(v)


@dataclass(frozen=True)
class Rule:
    """A response-code rule for authorisations and financial requests.

    Every given condition must hold (None = any): DE4 amount in minor units
    within ``amount_min``..``amount_max`` (both inclusive), PAN (DE2, else
    the PAN part of DE35) starting with ``pan_prefix``, MTI equal to ``mti``,
    DE3 starting with ``processing_code``, DE41 equal to ``terminal``.
    ``pan_prefix``, ``mti``, ``processing_code`` and ``terminal`` also accept
    a tuple of alternatives. The first matching rule's ``rc`` is the answer.
    """

    rc: str = "51"
    amount_min: int | None = None
    amount_max: int | None = None
    pan_prefix: str | tuple[str, ...] | None = None
    mti: str | tuple[str, ...] | None = None
    processing_code: str | tuple[str, ...] | None = None
    terminal: str | tuple[str, ...] | None = None

    def matches(self, doc: dict, amount: int | None, pan: str) -> bool:
        if self.mti is not None and doc.get("t") not in _as_tuple(self.mti):
            return False
        if self.amount_min is not None and (amount is None or amount < self.amount_min):
            return False
        if self.amount_max is not None and (amount is None or amount > self.amount_max):
            return False
        if self.pan_prefix is not None and not pan.startswith(_as_tuple(self.pan_prefix)):
            return False
        if self.processing_code is not None and not doc.get("3", "").startswith(
            _as_tuple(self.processing_code)
        ):
            return False
        if self.terminal is not None and doc.get("41", "").rstrip() not in tuple(
            t.rstrip() for t in _as_tuple(self.terminal)
        ):
            return False
        return True

    @classmethod
    def parse(cls, text: str) -> "Rule":
        """``RC[,key=value...]``, e.g. ``05,pan_prefix=4000`` or ``51,amount_min=100000``."""
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise ValueError("empty rule")
        kw: dict[str, Any] = {"rc": parts[0]}
        for p in parts[1:]:
            key, sep, value = p.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in ("amount_min", "amount_max", "pan_prefix", "mti",
                                      "processing_code", "terminal"):
                raise ValueError(f"bad rule condition {p!r}")
            kw[key] = int(value) if key.startswith("amount") else value.strip()
        return cls(**kw)


@dataclass(frozen=True)
class Fault:
    """Injected misbehaviour; replace ``sim.fault`` at any time.

    * ``drop_responses``: receive (and log) but never answer anything but
      network management; with ``drop_echo`` too, 0800s go unanswered as well
      (``drop_echo`` alone drops only network management);
    * ``delay_ms``: answer every message after this delay instead of the
      latency model's (use it to exceed the switch's timeout);
    * ``close_after``: close each connection once it has received this many
      messages; the last one is left unanswered (the outcome is unknown to
      the sender) unless ``answer_before_close``;
    * ``refuse``: close the listening socket (new connections are refused;
      established ones stay); setting it back to False listens again on the
      same port;
    * ``respond_rc``: answer every request (not network management) with this
      response code, overriding the rules;
    * ``omit_fields``: leave these fields out of every answer to a request
      that is not network management (``("39",)``: answers without a
      response code).
    """

    drop_responses: bool = False
    drop_echo: bool = False
    delay_ms: float | None = None
    close_after: int | None = None
    answer_before_close: bool = False
    refuse: bool = False
    respond_rc: str | None = None
    omit_fields: tuple[str, ...] = ()


NO_FAULT = Fault()


# --------------------------------------------------------------------------
# The per-connection protocol


class _Conn(asyncio.Protocol):
    __slots__ = ("sim", "transport", "decoder", "received", "closing", "pending", "paused")

    def __init__(self, sim: "AcquirerSimulator"):
        self.sim = sim
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder(sim.framing, sim.max_frame, sim.tpdu)
        self.received = 0
        self.closing = False
        self.pending = 0  # delayed answers not yet written
        self.paused = False

    # asyncio callbacks
    def connection_made(self, transport):
        self.transport = transport
        sim = self.sim
        sim.connections += 1
        sim._conns.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc):
        self.closing = True
        self.sim._conns.discard(self)

    def pause_writing(self):
        # The peer does not read its answers: stop reading its requests so
        # the write buffer (our memory) stays bounded.
        if not self.paused and self.transport is not None:
            self.paused = True
            with contextlib.suppress(Exception):
                self.transport.pause_reading()

    def resume_writing(self):
        if self.paused and self.transport is not None:
            self.paused = False
            with contextlib.suppress(Exception):
                self.transport.resume_reading()

    def eof_received(self):
        return False  # close our side too

    def data_received(self, data):
        if self.closing:
            return
        sim = self.sim
        try:
            frames = self.decoder.feed(data)
            error = None
        except FrameError as exc:
            frames = exc.frames
            error = exc
        out: list[bytes] = []
        later: list[tuple[float, bytes]] = []
        for frame in frames:
            if self.closing:
                break
            sim._handle(self, frame, out, later)
        transport = self.transport
        if out and not transport.is_closing():
            transport.write(b"".join(out) if len(out) > 1 else out[0])
        if later:
            sim._schedule(self, later)
        if error is not None:
            sim.frame_errors += 1
            self.close()
        elif self.closing and self.pending == 0:
            transport.close()

    # helpers
    def close(self):
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def write_later(self, data: bytes):
        """Timer callback for delayed answers."""
        self.pending -= 1
        t = self.transport
        if t is None or t.is_closing():
            self.sim.lost += 1
            return
        t.write(data)
        if self.closing and self.pending == 0:
            t.close()


# --------------------------------------------------------------------------
# The simulator


class AcquirerSimulator:
    """A simulated acquirer host (see the module docstring).

    Bookkeeping for tests: ``received`` (decoded requests in arrival order,
    0800s included; at most ``max_log`` plus an eighth, trimmed in chunks),
    ``counts`` (MTI -> messages received), ``answered``, ``dropped`` (not
    answered on purpose), ``lost`` (answer due on a connection that had gone),
    ``connections`` (accepted so far), ``undecodable`` (frames that did not
    decode; alias ``unmatched``), ``frame_errors`` (desynchronised streams,
    each closed), ``encode_errors`` (decoded requests whose answer would not
    encode, left unanswered). :meth:`reset` clears all of it.
    """

    def __init__(
        self,
        *,
        name: str = "sim",
        host: str = "127.0.0.1",
        port: int = 0,
        dialect: str | dict = "default",
        framing: str = "binary2",
        tpdu: bool = False,
        max_frame: int = 8192,
        ssl: _ssl.SSLContext | None = None,
        latency: LatencyModel | float | None = None,
        latency_ms: float | None = None,
        rules: Iterable[Rule] | None = None,
        approve_below: int | None = None,
        fault: Fault | None = None,
        approve_code_prefix: str = "",
        max_log: int = 100_000,
        message_header: str | None = None,
    ):
        self.name = name
        self.host = host
        self.port = port
        self.spec = iso8583.load_dialect(dialect) if isinstance(dialect, str) else dialect
        self.dialect = dialect if isinstance(dialect, str) else (self.spec.get("_meta") or {}).get("name", "custom")
        self.is_1993 = dialect_is_1993(self.spec)
        # a message header ("h") in this dialect: on every answer, message_header
        # or else the request's own; on messages the host starts, message_header
        # or else the last one received
        self.has_header = (self.spec.get("h") or {}).get("max_len", 0) > 0
        self.message_header = message_header
        self._last_header: str | None = None
        self.framing = framing
        self.tpdu = bool(tpdu)
        self.max_frame = max_frame
        FrameDecoder(framing, max_frame, tpdu)  # validate now, not per connection
        self.ssl = ssl
        if latency is not None and latency_ms is not None:
            raise ValueError("give latency or latency_ms, not both")
        if isinstance(latency, (int, float)):
            latency = LatencyModel("fixed", float(latency))
        self.latency = latency if latency is not None else LatencyModel("fixed", latency_ms or 0.0)
        self.rules: list[Rule] = list(rules or ())
        if approve_below is not None:
            self.rules.append(Rule(rc="51", amount_min=int(approve_below)))
        if len(approve_code_prefix) > 5:
            raise ValueError("approve_code_prefix must leave at least one digit of the 6-char code")
        self.approve_code_prefix = approve_code_prefix
        self.max_log = max(0, int(max_log))
        self._fault = fault or NO_FAULT
        self._server: asyncio.base_events.Server | None = None
        self._listening = False
        self._reopen_task: asyncio.Task | None = None
        self._conns: set[_Conn] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._started = False
        self._host_waiters: dict[str, asyncio.Future] = {}
        self._host_stan = 0
        self.reset()

    # ------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        """Forget every request and counter (faults and rules stay)."""
        self.received: list[dict] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.answered = 0
        self.dropped = 0
        self.lost = 0
        self.undecodable = 0
        self.frame_errors = 0
        self.encode_errors = 0
        self.connections = 0

    @property
    def unmatched(self) -> int:
        return self.undecodable

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    def received_by(self, mti: str) -> list[dict]:
        return [d for d in self.received if d.get("t") == mti]

    async def wait_for(self, mti: str | None = None, count: int = 1, timeout: float = 5.0) -> list[dict]:
        """Wait until ``count`` requests (of ``mti`` if given) have been received."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.received_by(mti) if mti else list(self.received)
            if len(got) >= count:
                return got
            if time.monotonic() >= deadline:
                raise asyncio.TimeoutError(
                    f"{self.name}: {len(got)} of {count} {mti or 'messages'} received"
                )
            await asyncio.sleep(0.005)

    # ------------------------------------------------------------ host-initiated messages
    async def send_to_switch(self, doc: dict, *, timeout: float = 2.0) -> list[dict]:
        """Send ``doc`` as this host's own request on every open connection (DE11
        set per connection) and return the switch's answers, one per connection.
        Raises asyncio.TimeoutError when an answer does not come in time."""
        loop = asyncio.get_running_loop()
        waits = []
        for conn in list(self._conns):
            t = conn.transport
            if t is None or t.is_closing():
                continue
            self._host_stan = self._host_stan % 99_999 + 1
            stan = f"{900_000 + self._host_stan:06d}"
            msg = dict(doc)
            msg["11"] = stan
            if self.has_header and "h" not in msg:
                header = self.message_header if self.message_header is not None else self._last_header
                if header is None:
                    raise ValueError(f"{self.name}: dialect {self.dialect} has a message header: "
                                     "give message_header (nothing received yet to copy it from)")
                msg["h"] = header
            payload = iso8583.encode(msg, self.spec)[0]
            if self.tpdu:
                payload = b"\x60\x00\x00\x00\x00" + payload
            fut = self._host_waiters[stan] = loop.create_future()
            waits.append(fut)
            t.write(build_frame(payload, self.framing, self.max_frame))
        try:
            return list(await asyncio.wait_for(asyncio.gather(*waits), timeout))
        finally:
            for stan in [k for k, f in self._host_waiters.items() if f in waits]:
                del self._host_waiters[stan]

    async def send_network(self, code: str = "301", *, timeout: float = 2.0) -> list[dict]:
        """Network management from the host on every connection: ISO 8583:1987
        0800 with DE70 ``code`` (001 sign-on, 002 sign-off, 301 echo), 1993
        1804 with DE24 (801, 802, 831; the 1987 codes are translated)."""
        now = time.strftime("%m%d%H%M%S", time.gmtime())
        if self.is_1993:
            fn = {"001": "801", "002": "802", "301": "831"}.get(code, code)
            doc = {"t": "1804", "7": now, "24": fn}
        else:
            doc = {"t": "0800", "7": now, "70": code}
        return await self.send_to_switch(doc, timeout=timeout)

    # ------------------------------------------------------------ faults
    @property
    def fault(self) -> Fault:
        return self._fault

    @fault.setter
    def fault(self, value: Fault | None) -> None:
        value = value or NO_FAULT
        self._fault = value
        if not self._started:
            return
        if value.refuse and self._listening:
            self._stop_listening()
        elif not value.refuse and not self._listening:
            self._start_listening_soon()

    async def set_fault(self, value: Fault | None) -> None:
        """Like assigning ``fault``, and wait until listening again if it reopens."""
        self.fault = value
        if self._reopen_task is not None:
            await asyncio.shield(self._reopen_task)

    # ------------------------------------------------------------ lifecycle
    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, backlog=1024)
        sock.setblocking(False)
        return sock

    async def _bind_when_free(self, within: float = 10.0) -> socket.socket:
        deadline = time.monotonic() + within
        while True:
            try:
                return self._bind()
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.05)

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self), sock=sock, ssl=self.ssl, backlog=1024,
            **({"ssl_handshake_timeout": 10.0} if self.ssl is not None else {}),
        )

    def _stop_listening(self) -> None:
        self._listening = False
        if self._reopen_task is not None:
            self._reopen_task.cancel()
            self._reopen_task = None
        if self._server is not None:
            self._server.close()
            self._server = None

    def _start_listening_soon(self) -> None:
        # Bind and listen now, synchronously: from this moment the kernel
        # accepts connections into the backlog, so a client dialling right
        # after the assignment is not refused; the loop starts serving them
        # as soon as the task below runs. If the port is still held (a
        # client's socket that drew it as its own source port, until it
        # notices), the task keeps trying to bind for a while.
        try:
            held = [self._bind()]
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            held = [None]
        self._listening = True

        async def serve() -> None:
            if held[0] is None:
                held[0] = await self._bind_when_free()
            await self._serve(held[0])

        task = asyncio.get_running_loop().create_task(serve())
        self._reopen_task = task

        def done(t: asyncio.Task) -> None:
            if self._reopen_task is t:
                self._reopen_task = None
            if t.cancelled() or t.exception() is not None:
                if self._reopen_task is None and not t.cancelled():
                    self._listening = False
                if held[0] is not None:
                    held[0].close()

        task.add_done_callback(done)

    async def start(self) -> "AcquirerSimulator":
        if self._started:
            return self
        # a restart on the port of an earlier run may find it briefly held
        sock = await self._bind_when_free() if self.port else self._bind()
        self.port = sock.getsockname()[1]
        self._started = True
        if self._fault.refuse:
            sock.close()
            return self
        try:
            await self._serve(sock)
        except BaseException:
            sock.close()
            self._started = False
            raise
        self._listening = True
        return self

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._stop_listening()
        for h in list(self._timers):
            h.cancel()
        self._timers.clear()
        for conn in list(self._conns):
            conn.closing = True
            if conn.transport is not None:
                conn.transport.abort()
        self._conns.clear()
        await asyncio.sleep(0)

    async def __aenter__(self) -> "AcquirerSimulator":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def listening(self) -> bool:
        return self._listening

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def __repr__(self) -> str:
        return (f"AcquirerSimulator(name={self.name!r}, {self.host}:{self.port}, "
                f"dialect={self.dialect!r}, framing={self.framing!r}, tls={self.ssl is not None})")

    # ------------------------------------------------------------ the host logic
    def _log(self, doc: dict) -> None:
        if self.max_log == 0:
            return
        rec = self.received
        rec.append(doc)
        if len(rec) > self.max_log + max(1, self.max_log // 8):
            del rec[: len(rec) - self.max_log]

    def _handle(self, conn: _Conn, frame: bytes, out: list, later: list) -> None:
        """Decode one request and queue (or schedule) its answer."""
        tpdu = b""
        try:
            if self.tpdu:
                tpdu, frame = split_tpdu(frame)
                tpdu = reply_tpdu(tpdu)
            req, _ = iso8583.decode(frame, self.spec)
        except (iso8583.DecodeError, FrameError):
            self.undecodable += 1
            return
        mti = req.get("t", "")
        if self.has_header:
            self._last_header = req.get("h")
        if self._host_waiters and mti[2:3] in ("1", "3") and mti.isdigit():
            waiter = self._host_waiters.pop(req.get("11", ""), None)
            if waiter is not None:  # the switch's answer to a message this host sent
                if not waiter.done():
                    waiter.set_result(req)
                return
        self.counts[mti] += 1
        self._log(req)
        conn.received += 1
        fault = self._fault
        last = fault.close_after is not None and conn.received >= fault.close_after
        if last:
            conn.closing = True  # stop handling further frames from this connection
            if not fault.answer_before_close:
                self.dropped += 1
                return
        resp = self.respond(req, fault)
        if resp is None:
            self.dropped += 1
            return
        if self.has_header:
            resp["h"] = self.message_header if self.message_header is not None else req.get("h")
        try:
            payload = tpdu + iso8583.encode(resp, self.spec)[0]
            data = build_frame(payload, self.framing, self.max_frame)
        except (iso8583.EncodeError, FrameError, ValueError, TypeError):
            # e.g. an echoed field the request carried in a form this
            # dialect cannot encode back; a real host would not answer
            self.encode_errors += 1
            return
        self.answered += 1
        if fault.delay_ms is not None:
            delay = fault.delay_ms / 1000.0
        elif self.latency.is_zero:
            delay = 0.0
        else:
            delay = self.latency.sample()
        if delay <= 0:
            out.append(data)
        else:
            later.append((delay, data))

    def _schedule(self, conn: _Conn, later: list[tuple[float, bytes]]) -> None:
        """Timers for delayed answers: one per batch when every delay is equal."""
        loop = asyncio.get_running_loop()
        first = later[0][0]
        if all(d == first for d, _ in later):
            groups = [(first, b"".join(data for _, data in later))]
        else:
            groups = later
        timers = self._timers
        for delay, data in groups:
            conn.pending += 1
            box: list = []

            def fire(box=box, data=data) -> None:
                timers.discard(box[0])
                conn.write_later(data)

            handle = loop.call_later(delay, fire)
            box.append(handle)
            timers.add(handle)

    def response_code(self, req: dict) -> str:
        """DE39 for an authorisation / financial request by the rules (default 00)."""
        if not self.rules:
            return "00"
        amount_s = req.get("4")
        try:
            amount = int(amount_s) if amount_s is not None else None
        except ValueError:
            amount = None
        pan = req.get("2")
        if pan is None:
            t2 = req.get("35", "")
            for sep in ("=", "D", "d"):
                i = t2.find(sep)
                if i >= 0:
                    t2 = t2[:i]
                    break
            pan = t2
        for rule in self.rules:
            if rule.matches(req, amount, pan):
                return rule.rc
        return "00"

    def _rc(self, rc: str) -> str:
        if self.is_1993 and len(rc) == 2:
            return ACTION_CODES_1993.get(rc, "100")
        return rc

    def approval_code(self, req: dict) -> str:
        """Deterministic 6-character DE38 derived from the request."""
        key = f"{req.get('11', '')}|{req.get('41', '')}|{req.get('7', '')}".encode()
        n = 6 - len(self.approve_code_prefix)
        return self.approve_code_prefix + str(zlib.crc32(key) % (10 ** n)).zfill(n)

    def issuer_icc(self, req: dict, rc: str) -> str:
        """The issuer's EMV response data (DE55, hex) for a chip request: tag 91
        issuer authentication data (an 8-byte ARPC, deterministic from the
        request's ICC data, and the 2-byte ARC) and tag 8A, the ARC alone, as
        an issuer host answers so the card can check the issuer (EMV Book 3,
        6.5.10: the terminal's second GENERATE AC carries them)."""
        arc = (rc if len(rc) == 2 else ("00" if rc in APPROVED_CODES else "05")).encode().hex().upper()
        icc = str(req.get("55", "")).encode()
        arpc = f"{zlib.crc32(icc):08X}{zlib.crc32(icc[::-1]):08X}"
        return f"910A{arpc}{arc}8A02{arc}"

    @staticmethod
    def make_rrn(req: dict) -> str:
        """YDDDhh + STAN, the usual 12-character RRN layout."""
        now = time.gmtime()
        stan = (req.get("11", "") or "0").zfill(6)[-6:]
        return f"{now.tm_year % 10}{now.tm_yday:03d}{now.tm_hour:02d}{stan}"

    def respond(self, req: dict, fault: Fault | None = None) -> dict | None:
        """The answer to a decoded request, or None when it is not answered."""
        fault = self._fault if fault is None else fault
        mti = req.get("t", "")
        rmti = response_mti(mti)
        if rmti is None:
            return None
        cls = mti[1]
        func = mti[2]
        spec = self.spec
        if cls == "8":
            if fault.drop_echo:
                return None
            resp = {"t": rmti}
            for f in ECHO_NETWORK:
                v = req.get(f)
                if v is not None:
                    resp[f] = v
            if self.is_1993:
                rc = "800"
            else:
                code = req.get("70")
                rc = "00" if code is None or code in NETWORK_CODES_OK else "12"
            if "39" in spec:
                resp["39"] = rc
            return resp
        if fault.drop_responses:
            return None
        echo = ECHO_REVERSAL if cls == "4" else ECHO_FIELDS
        resp = {"t": rmti}
        for f in echo:
            v = req.get(f)
            if v is not None:
                resp[f] = v
        if fault.respond_rc is not None:
            rc = fault.respond_rc
        elif cls in "12" and func == "0":
            rc = self.response_code(req)
        elif cls in "124" and func in "02":
            rc = "00"  # advices, reversals, reversal advices: acknowledged
        else:
            rc = "12"
        rc = self._rc(rc)
        resp["39"] = rc
        if rc in APPROVED_CODES and cls in "12" and func == "0" and "38" in spec:
            resp["38"] = self.approval_code(req)
        if req.get("55") and cls in "12" and func == "0" and "55" in spec:
            resp["55"] = self.issuer_icc(req, rc)
        if "37" not in resp and "37" in spec:
            resp["37"] = self.make_rrn(req)
        for f in fault.omit_fields:
            resp.pop(f, None)
        return resp


# --------------------------------------------------------------------------
# TLS and CLI


def dev_server_context(state_dir: str | Path, *, require_client_cert: bool = False) -> _ssl.SSLContext:
    """Server context for a simulator using the development PKI under ``state_dir``.

    Presents ``acquirer.crt``; client certificates issued by the development
    CA are verified when offered and required with ``require_client_cert``.
    """
    from switch.certs import ensure_dev_pki, server_context

    pki = ensure_dev_pki(Path(state_dir))
    return server_context(pki.acquirer_cert, pki.acquirer_key, pki.ca_cert,
                          require_client_cert=require_client_cert)


def add_acquirer_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``acquirer`` to an argparse subparsers object (``isoswitch sim acquirer``)."""
    p = subparsers.add_parser(
        "acquirer",
        help="run a simulated acquirer host",
        description="Run a simulated ISO 8583 acquirer host until interrupted.",
    )
    p.add_argument("--name", default="sim")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--dialect", default="default")
    p.add_argument("--framing", default="binary2", choices=("binary2", "ascii4", "bcd2", "binary4"))
    p.add_argument("--tpdu", action="store_true", help="frames carry a 5-byte TPDU")
    p.add_argument("--max-frame", type=int, default=8192)
    p.add_argument("--latency-ms", type=float, default=1.0, help="mean answer delay (default 1)")
    p.add_argument("--latency-kind", default="fixed", choices=LatencyModel.KINDS)
    p.add_argument("--latency-p99-ms", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--approve-below", type=int, default=None,
                   help="decline with 51 when DE4 (minor units) is at least this")
    p.add_argument("--rule", action="append", default=[], metavar="RC[,key=value...]",
                   help="response-code rule, first match wins, e.g. 05,pan_prefix=4000 "
                        "(keys: amount_min, amount_max, pan_prefix, mti, processing_code, terminal)")
    p.add_argument("--approve-code-prefix", default="")
    p.add_argument("--message-header", default=None,
                   help="message header on every answer, for a dialect with one (default: the request's)")
    p.add_argument("--tls", action="store_true", help="TLS with the development PKI in --state-dir")
    p.add_argument("--require-client-cert", action="store_true")
    p.add_argument("--state-dir", default="state")
    p.set_defaults(func=run_acquirer_cli)
    return p


async def run_acquirer_cli(args) -> int:
    """Run the simulator described by ``args`` until cancelled or SIGTERM; returns 0.

    Prints one line saying where it listens (the real port when ``--port 0``)
    and, when stopping, what it received.
    """
    try:
        rules = [Rule.parse(r) for r in args.rule]
    except (ValueError, TypeError) as exc:
        print(f"isoswitch sim acquirer: {exc}", file=sys.stderr)
        return 2
    latency = LatencyModel(args.latency_kind, args.latency_ms, p99_ms=args.latency_p99_ms, seed=args.seed)
    ctx = dev_server_context(args.state_dir, require_client_cert=args.require_client_cert) if args.tls else None
    sim = AcquirerSimulator(
        name=args.name, host=args.host, port=args.port, dialect=args.dialect,
        framing=args.framing, tpdu=args.tpdu, max_frame=args.max_frame, ssl=ctx,
        latency=latency, rules=rules, approve_below=args.approve_below,
        approve_code_prefix=args.approve_code_prefix,
        max_log=1000, message_header=args.message_header,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    sigterm = False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)  # container / systemd stop
        sigterm = True
    try:
        async with sim:
            print(
                f"acquirer simulator {sim.name!r} listening on {sim.host}:{sim.port} "
                f"(dialect {sim.dialect}, framing {sim.framing}{', tpdu' if sim.tpdu else ''}, "
                f"{'TLS' if ctx else 'plain TCP'}, latency {latency!r}"
                f"{f', approve below {args.approve_below}' if args.approve_below is not None else ''})",
                flush=True,
            )
            try:
                await stop.wait()
            except asyncio.CancelledError:
                pass  # Ctrl-C under asyncio.run: a normal way to stop
            finally:
                print(f"acquirer simulator {sim.name!r} stopping: received {dict(sim.counts)}, "
                      f"answered {sim.answered}, undecodable {sim.undecodable}", flush=True)
    finally:
        if sigterm:
            loop.remove_signal_handler(signal.SIGTERM)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m switch.sim.acquirer ...`` (same options as ``isoswitch sim acquirer``)."""
    parser = argparse.ArgumentParser(prog="python -m switch.sim.acquirer")
    sub = parser.add_subparsers(dest="cmd")
    add_acquirer_parser(sub)
    args = parser.parse_args(["acquirer", *(sys.argv[1:] if argv is None else argv)])
    try:
        return asyncio.run(run_acquirer_cli(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
