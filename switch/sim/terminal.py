"""Simulated PoS terminals: a pipelining ISO 8583 client, message builders, a load driver.

* :class:`TerminalClient` - one TCP/TLS connection; :meth:`TerminalClient.request`
  sends a message and waits for the response matched by (DE41, DE11), so any
  number of requests may be in flight on one connection (pipelining).
* :func:`make_purchase`, :func:`make_echo`, :func:`make_reversal` - realistic
  requests that encode in any shipped dialect (ISO 8583:1987 or :1993).
* :func:`run_terminals` - ``count`` purchases over ``connections`` connections
  with up to ``concurrency_per_conn`` in flight on each; returns a
  :class:`Summary`. The bench builds on it; ``isoswitch sim terminal`` runs it.

The default PAN is the well-known Visa test card 4761 7390 0101 0010.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import socket
import ssl as _ssl
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core import iso8583
from core.framing import FrameDecoder, FrameError, build_frame, split_tpdu
from switch.sim.acquirer import dialect_is_1993

__all__ = [
    "DEFAULT_TPDU",
    "NotConnectedError",
    "TEST_PAN",
    "StanCounter",
    "Summary",
    "TerminalClient",
    "add_terminal_parser",
    "dev_client_context",
    "make_echo",
    "make_purchase",
    "make_reversal",
    "run_terminal_cli",
    "run_terminals",
]

from switch.messages import TEST_PAN  # noqa: E402  (test card, public test range)
DEFAULT_TPDU = b"\x60\x00\x01\x00\x00"  # id 60, destination NII 001, origin 000

_SPECS: dict[str, tuple[dict, bool]] = {}


def _dialect(dialect: str | dict) -> tuple[dict, bool]:
    """(spec, is_1993) with the spec loaded once per dialect name."""
    if isinstance(dialect, dict):
        return dialect, dialect_is_1993(dialect)
    got = _SPECS.get(dialect)
    if got is None:
        spec = iso8583.load_dialect(dialect)
        got = _SPECS[dialect] = (spec, dialect_is_1993(spec))
    return got


class StanCounter:
    """System trace audit numbers 000001..999999, then 000001 again.

    Share one between clients that use the same terminal id so no two of
    their requests in flight carry the same (DE41, DE11).
    """

    __slots__ = ("_n",)

    def __init__(self, start: int = 1):
        if not 1 <= start <= 999_999:
            raise ValueError("STAN start must be 1..999999")
        self._n = start - 1

    def next(self) -> str:
        n = self._n + 1
        if n > 999_999:
            n = 1
        self._n = n
        return "%06d" % n

    __next__ = next

    def __iter__(self):
        return self


# --------------------------------------------------------------------------
# Message builders


def _stan(stan: int | str) -> str:
    s = "%06d" % stan if isinstance(stan, int) else str(stan).zfill(6)
    if len(s) != 6 or not s.isdigit():
        raise ValueError("STAN must be 1-6 digits")
    return s


def _pad(value: str, n: int) -> str:
    return value[:n].ljust(n)


def sample_icc(amount_minor: int, currency: str, stan: str, when: time.struct_time) -> str:
    """A plausible EMV DE55 (hex): ARQC, amount, TVR, date, UN, ATC..."""
    crc = zlib.crc32(f"{amount_minor}{stan}".encode())
    tags = [
        ("9F26", "%016X" % (crc * 2654435761 & 0xFFFFFFFFFFFFFFFF)),  # application cryptogram
        ("9F27", "80"),  # ARQC
        ("9F10", "06010A03A00000"),  # issuer application data
        ("9F37", "%08X" % crc),  # unpredictable number
        ("9F36", "%04X" % (int(stan) % 0xFFFF)),  # ATC
        ("95", "0000000000"),  # TVR
        ("9A", time.strftime("%y%m%d", when)),
        ("9C", "00"),
        ("9F02", "%012d" % amount_minor),
        ("5F2A", currency.zfill(4)),
        ("82", "5C00"),
        ("9F1A", "0840"),
        ("9F33", "E0F8C8"),
        ("9F34", "1E0300"),
    ]
    return "".join(t + "%02X" % (len(v) // 2) + v for t, v in tags)


def make_purchase(
    amount_minor: int,
    *,
    pan: str = TEST_PAN,
    stan: int | str,
    mti: str | None = None,
    dialect: str | dict = "default",
    terminal_id: str = "TERM0001",
    merchant_id: str = "MERCHANT0000001",
    processing_code: str = "000000",
    currency: str = "840",
    expiry: str = "2812",
    service_code: str = "201",
    mcc: str = "5999",
    track2: bool = True,
    include_pan: bool = True,
    pin_block: str | None = None,
    icc: bool | str | None = None,
    rrn: str | None = None,
    merchant_name: str = "ISOSWITCH TEST SHOP",
    city: str = "SPRINGFIELD",
    region: str = "IL",
    country: str = "US",
    now: float | None = None,
) -> dict:
    """A purchase request (0200; ``mti="0100"`` for an authorisation).

    Fields 2, 3, 4, 7, 11, 12, 13, 14, 18, 22, 25, 35, 37, 41, 42, 43, 49 and,
    when asked for, 52 (``pin_block``: 16 hex digits) and 55 (``icc``: hex
    TLV, or True for a sample ARQC set). Values fit ``dialect`` exactly: DE35
    separates PAN and expiry with ``D`` in BCD dialects (iso87binary) and
    ``=`` elsewhere; an ISO 8583:1993 dialect gets a 1200 MTI, a 12-digit
    DE12, a 12-character DE22 POS data code and no DE25. ``mti`` defaults to
    0200 (1200 under 1993).
    """
    spec, is93 = _dialect(dialect)
    if mti is None:
        mti = "1200" if is93 else "0200"
    if not isinstance(amount_minor, int) or amount_minor < 0 or amount_minor > 999_999_999_999:
        raise ValueError("amount_minor must be an int 0..999999999999")
    stan = _stan(stan)
    t = time.time() if now is None else now
    utc = time.gmtime(t)
    local = time.localtime(t)
    chip = bool(icc)
    doc = {"t": mti}
    if include_pan:
        doc["2"] = pan
    doc["3"] = processing_code
    doc["4"] = "%012d" % amount_minor
    doc["7"] = time.strftime("%m%d%H%M%S", utc)
    doc["11"] = stan
    if is93:
        doc["12"] = time.strftime("%y%m%d%H%M%S", local)
        doc["22"] = ("5" if chip else "2") + "10101" + ("5" if chip else "2") + "13344"
    else:
        doc["12"] = time.strftime("%H%M%S", local)
        doc["22"] = "051" if chip else "901"
        doc["25"] = "00"
    doc["13"] = time.strftime("%m%d", local)
    doc["14"] = expiry
    doc["18"] = mcc
    if track2:
        f35 = spec.get("35") or {}
        sep = "D" if f35.get("data_enc") == "b" else "="
        doc["35"] = f"{pan}{sep}{expiry}{service_code}" + "1234567890"[: max(0, 37 - len(pan) - 8)][:10]
    doc["37"] = rrn if rrn is not None else (
        f"{utc.tm_year % 10}{utc.tm_yday:03d}{utc.tm_hour:02d}{stan}"
    )
    doc["41"] = _pad(terminal_id, 8)
    doc["42"] = _pad(merchant_id, 15)
    doc["43"] = _pad(merchant_name, 23) + _pad(city, 13) + _pad(region, 2) + _pad(country, 2)
    doc["49"] = currency
    if pin_block is not None:
        doc["52"] = pin_block
    if icc:
        doc["55"] = icc if isinstance(icc, str) else sample_icc(amount_minor, currency, stan, local)
    return doc


def make_echo(
    stan: int | str,
    *,
    code: str = "301",
    dialect: str | dict = "default",
    now: float | None = None,
) -> dict:
    """A network management request: 0800 with DE70 (001 sign-on, 002 sign-off,
    301 echo); under ISO 8583:1993 a 1804 with DE24 function code 831 (echo),
    801 (sign-on) or 802 (sign-off)."""
    _, is93 = _dialect(dialect)
    t = time.time() if now is None else now
    doc = {"t": "1804" if is93 else "0800", "7": time.strftime("%m%d%H%M%S", time.gmtime(t)),
           "11": _stan(stan)}
    if is93:
        doc["24"] = {"001": "801", "002": "802", "301": "831"}.get(code, code)
    else:
        doc["70"] = code
    return doc


def make_reversal(original: dict, *, stan: int | str | None = None, mti: str | None = None,
                  dialect: str | dict = "default", now: float | None = None) -> dict:
    """A reversal (0400; 1420 under 1993) of ``original``.

    Carries the original's identifying fields (2, 3, 4, 12, 13, 32, 37, 41,
    42, 49) and DE90 original data elements (DE56 under 1993); never track
    data, PIN block or ICC data. ``stan`` defaults to the original's DE11.
    """
    _, is93 = _dialect(dialect)
    if mti is None:
        mti = "1420" if is93 else "0400"
    t = time.time() if now is None else now
    doc = {"t": mti}
    for f in ("2", "3", "4", "12", "13", "14", "18", "22", "25", "32", "37", "41", "42", "49"):
        if f in original:
            doc[f] = original[f]
    doc["7"] = time.strftime("%m%d%H%M%S", time.gmtime(t))
    doc["11"] = _stan(stan) if stan is not None else original["11"]
    omti = original.get("t", "0200")
    if is93:
        doc["56"] = omti + original.get("11", "000000") + original.get("12", "0" * 12)[:12].zfill(12)
    else:
        doc["90"] = (omti + original.get("11", "000000") + original.get("7", "0" * 10)
                     + "0" * 22)
    return doc


# --------------------------------------------------------------------------
# The client


class NotConnectedError(ConnectionError):
    """The request was not sent: the client is not connected."""


class _ClientProto(asyncio.Protocol):
    def __init__(self, client: "TerminalClient"):
        self.client = client
        self.decoder = FrameDecoder(client.framing, client.max_frame, client.tpdu)

    def connection_made(self, transport):
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        client = self.client
        try:
            frames = self.decoder.feed(data)
            error = None
        except FrameError as exc:
            frames, error = exc.frames, exc
        for frame in frames:
            client._on_frame(frame)
        if error is not None:
            client.frame_errors += 1
            if client._transport is not None:
                client._transport.close()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.client._on_lost(exc)


class TerminalClient:
    """One terminal connection with pipelined requests.

    Responses are matched to requests by (DE41, DE11) - trailing spaces of
    DE41 ignored; a response without a matching DE41 still matches when one
    request in flight has its STAN. Responses that match nothing (late
    answers after a timeout, answers to :meth:`send`) go to an unsolicited
    queue read with :meth:`receive_unsolicited`; ``unmatched`` counts them.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = "localhost",
        dialect: str | dict = "default",
        framing: str = "binary2",
        tpdu: bool = False,
        tpdu_header: bytes = DEFAULT_TPDU,
        max_frame: int = 8192,
        terminal_id: str = "TERM0001",
        merchant_id: str = "MERCHANT0000001",
        stan_counter: StanCounter | None = None,
        max_unsolicited: int = 1000,
    ):
        self.host = host
        self.port = port
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.spec, self.is_1993 = _dialect(dialect)
        self.dialect = dialect
        self.framing = framing
        self.tpdu = bool(tpdu)
        self.tpdu_header = bytes(tpdu_header)
        if self.tpdu:
            split_tpdu(self.tpdu_header)  # validate
        self.max_frame = max_frame
        FrameDecoder(framing, max_frame, tpdu)  # validate
        self.terminal_id = terminal_id
        self.merchant_id = merchant_id
        self.stans = stan_counter or StanCounter()
        self._transport: asyncio.Transport | None = None
        self._pending: dict[tuple[str, str], list[asyncio.Future]] = {}
        self._lost: asyncio.Event | None = None
        self._unsolicited: collections.deque = collections.deque(maxlen=max_unsolicited)
        self._unsolicited_event: asyncio.Event | None = None
        self.unmatched = 0
        self.undecodable = 0
        self.frame_errors = 0
        self.close_reason: BaseException | None = None

    # ------------------------------------------------------------ lifecycle
    async def connect(self, timeout: float = 10.0) -> "TerminalClient":
        loop = asyncio.get_running_loop()
        kw: dict[str, Any] = {}
        if self.ssl is not None:
            kw["ssl"] = self.ssl
            kw["server_hostname"] = self.server_hostname or self.host
            kw["ssl_handshake_timeout"] = timeout
        self._lost = asyncio.Event()
        self._unsolicited_event = asyncio.Event()
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: _ClientProto(self), self.host, self.port, **kw), timeout
        )
        self._transport = transport
        self.close_reason = None
        return self

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    @property
    def in_flight(self) -> int:
        return sum(len(v) for v in self._pending.values())

    async def close(self) -> None:
        t = self._transport
        if t is not None:
            t.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._lost.wait(), 2.0)
        self._fail_pending(ConnectionError("connection closed by the client"))

    async def wait_closed(self, timeout: float | None = None) -> None:
        """Wait until the connection is gone (closed by either side)."""
        if self._lost is None:
            return
        await asyncio.wait_for(self._lost.wait(), timeout)

    async def __aenter__(self) -> "TerminalClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def next_stan(self) -> str:
        return self.stans.next()

    # ------------------------------------------------------------ sending
    def _encode(self, doc: dict) -> bytes:
        payload = iso8583.encode(doc, self.spec)[0]
        if self.tpdu:
            payload = self.tpdu_header + payload
        return build_frame(payload, self.framing, self.max_frame)

    def _write(self, data: bytes) -> None:
        if not self.connected:
            raise NotConnectedError("not connected")
        self._transport.write(data)

    async def request(self, doc: dict, timeout: float = 30.0) -> dict:
        """Send ``doc`` and return its response (matched by DE41 + DE11).

        Fills DE11 from :meth:`next_stan` when absent. Raises
        ``asyncio.TimeoutError`` when no response comes within ``timeout``
        seconds and ``ConnectionError`` when the connection is or goes away.
        """
        if "11" not in doc:
            doc["11"] = self.next_stan()
        key = (doc.get("41", "").rstrip(), doc["11"])
        data = self._encode(doc)
        self._write(data)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        waiters = self._pending.get(key)
        if waiters is None:
            self._pending[key] = [fut]
        else:
            waiters.append(fut)
        timer = loop.call_later(timeout, self._expire, key, fut, timeout)
        try:
            return await fut
        finally:
            timer.cancel()
            if not fut.done() or fut.cancelled():
                self._forget(key, fut)

    async def send(self, doc: dict) -> None:
        """Send ``doc`` without waiting; its response lands in the unsolicited queue."""
        self._write(self._encode(doc))

    async def send_frame(self, payload: bytes) -> None:
        """Send arbitrary payload bytes with a correct length header (and TPDU)."""
        if self.tpdu:
            payload = self.tpdu_header + payload
        self._write(build_frame(payload, self.framing, 0x7FFFFFFF))

    async def send_raw(self, data: bytes) -> None:
        """Write ``data`` as is: no length header, no TPDU (bad-input tests)."""
        self._write(bytes(data))

    async def receive_unsolicited(self, timeout: float = 5.0) -> dict:
        """The next response that matched no request in flight."""
        if self._unsolicited_event is None:
            raise ConnectionError("never connected")
        deadline = time.monotonic() + timeout
        while not self._unsolicited:
            if self._lost.is_set():
                raise ConnectionError("connection closed")
            self._unsolicited_event.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise asyncio.TimeoutError("no unsolicited message")
            waits = [asyncio.ensure_future(self._unsolicited_event.wait()),
                     asyncio.ensure_future(self._lost.wait())]
            try:
                await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        return self._unsolicited.popleft()

    # ------------------------------------------------------------ receiving
    def _forget(self, key, fut) -> None:
        waiters = self._pending.get(key)
        if waiters is not None:
            with contextlib.suppress(ValueError):
                waiters.remove(fut)
            if not waiters:
                del self._pending[key]

    def _expire(self, key, fut, timeout) -> None:
        if not fut.done():
            self._forget(key, fut)
            fut.set_exception(asyncio.TimeoutError(f"no response within {timeout:g} s (STAN {key[1]})"))

    def _on_frame(self, frame: bytes) -> None:
        try:
            if self.tpdu:
                frame = split_tpdu(frame)[1]
            resp, _ = iso8583.decode(frame, self.spec)
        except (iso8583.DecodeError, FrameError):
            self.undecodable += 1
            return
        stan = resp.get("11", "")
        key = (resp.get("41", "").rstrip(), stan)
        pending = self._pending
        waiters = pending.get(key)
        if waiters is None:
            cands = [k for k in pending if k[1] == stan]
            if len(cands) == 1:
                key = cands[0]
                waiters = pending[key]
        if waiters is None:
            self.unmatched += 1
            self._unsolicited.append(resp)
            if self._unsolicited_event is not None:
                self._unsolicited_event.set()
            return
        fut = waiters.pop(0)
        if not waiters:
            del pending[key]
        if not fut.done():
            fut.set_result(resp)

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for waiters in pending.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(exc)

    def _on_lost(self, exc) -> None:
        self.close_reason = exc
        self._fail_pending(ConnectionError(f"connection lost{f': {exc}' if exc else ''}"))
        if self._lost is not None:
            self._lost.set()
        if self._unsolicited_event is not None:
            self._unsolicited_event.set()


# --------------------------------------------------------------------------
# Load driver


@dataclass
class Summary:
    """Outcome of :func:`run_terminals`.

    ``sent == answered + timeouts + errors`` and ``requested == sent + not_sent``.
    ``errors`` are requests whose connection was lost while they were in
    flight, or that could not be encoded (a bad ``make_doc``); ``not_sent``
    are those no live connection was left to carry.
    """

    requested: int = 0
    sent: int = 0
    answered: int = 0
    by_response_code: dict = field(default_factory=dict)
    timeouts: int = 0
    errors: int = 0
    connect_errors: int = 0
    latencies_ms: list = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def not_sent(self) -> int:
        return self.requested - self.sent

    @property
    def ok(self) -> bool:
        return self.answered == self.requested

    @property
    def tps(self) -> float:
        return self.answered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of the latencies (ms); nan when there are none."""
        data = sorted(self.latencies_ms)
        if not data:
            return math.nan
        rank = max(1, math.ceil(p / 100.0 * len(data)))
        return data[min(rank, len(data)) - 1]

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def max(self) -> float:
        return max(self.latencies_ms) if self.latencies_ms else math.nan

    @property
    def mean(self) -> float:
        return sum(self.latencies_ms) / len(self.latencies_ms) if self.latencies_ms else math.nan

    def as_dict(self) -> dict:
        data = sorted(self.latencies_ms)

        def pct(p):
            return data[min(max(1, math.ceil(p / 100 * len(data))), len(data)) - 1] if data else None

        return {
            "requested": self.requested, "sent": self.sent, "answered": self.answered,
            "timeouts": self.timeouts, "errors": self.errors,
            "connect_errors": self.connect_errors, "not_sent": self.not_sent,
            "by_response_code": dict(sorted(self.by_response_code.items())),
            "elapsed_s": round(self.elapsed_s, 6), "tps": round(self.tps, 1),
            "latency_ms": {
                "mean": (sum(data) / len(data)) if data else None,
                "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": data[-1] if data else None,
            },
        }

    def format(self) -> str:
        d = self.as_dict()
        lines = [
            f"sent {self.sent} of {self.requested}, answered {self.answered}, "
            f"timeouts {self.timeouts}, errors {self.errors}"
            + (f", connections failed {self.connect_errors}" if self.connect_errors else "")
            + f" in {self.elapsed_s:.2f} s ({self.tps:.0f} TPS)",
            "response codes: " + (" ".join(f"{k}={v}" for k, v in d["by_response_code"].items()) or "-"),
        ]
        lat = d["latency_ms"]
        if lat["p50"] is not None:
            lines.append(
                f"latency ms: mean {lat['mean']:.2f}  p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  "
                f"p99 {lat['p99']:.2f}  max {lat['max']:.2f}"
            )
        return "\n".join(lines)


async def run_terminals(
    host: str,
    port: int,
    *,
    count: int,
    connections: int = 1,
    concurrency_per_conn: int = 1,
    ssl: _ssl.SSLContext | None = None,
    server_hostname: str | None = "localhost",
    dialect: str | dict = "default",
    framing: str = "binary2",
    tpdu: bool = False,
    amount: int = 1000,
    pan: str = TEST_PAN,
    mti: str | None = None,
    terminal_id: str = "TERM0001",
    merchant_id: str = "MERCHANT0000001",
    timeout: float = 30.0,
    connect_timeout: float = 10.0,
    rate: float | None = None,
    make_doc: Callable[[int, str], dict] | None = None,
) -> Summary:
    """Send ``count`` requests over ``connections`` connections, pipelined.

    Every connection uses ``terminal_id`` (what a terminal's client
    certificate names) with one shared STAN counter, so requests in flight
    never share a (DE41, DE11). ``make_doc(i, stan)`` replaces the default
    :func:`make_purchase` of ``amount``. ``rate`` (requests per second, all
    connections together) paces the sends; None sends as fast as the
    in-flight limit allows. A failed connection's share goes to the others;
    requests that no connection could take are ``not_sent``.
    """
    if count < 0 or connections < 1 or concurrency_per_conn < 1:
        raise ValueError("count >= 0, connections >= 1 and concurrency_per_conn >= 1 required")
    summary = Summary(requested=count)
    stans = StanCounter()
    clients = [
        TerminalClient(host, port, ssl=ssl, server_hostname=server_hostname, dialect=dialect,
                       framing=framing, tpdu=tpdu, terminal_id=terminal_id,
                       merchant_id=merchant_id, stan_counter=stans)
        for _ in range(connections)
    ]
    results = await asyncio.gather(*(c.connect(connect_timeout) for c in clients),
                                   return_exceptions=True)
    live = []
    for c, r in zip(clients, results):
        if isinstance(r, BaseException):
            if not isinstance(r, Exception):
                raise r
            summary.connect_errors += 1
        else:
            live.append(c)
    latencies = summary.latencies_ms
    codes: collections.Counter = collections.Counter()
    next_index = 0
    perf = time.perf_counter
    start = perf()
    interval = 1.0 / rate if rate else 0.0

    async def worker(client: TerminalClient) -> None:
        nonlocal next_index
        while next_index < count and client.connected:
            i = next_index
            next_index += 1
            if interval:
                due = start + i * interval
                delay = due - perf()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not client.connected:
                    return  # the index is lost: counted as not sent
            stan = stans.next()
            if make_doc is not None:
                doc = make_doc(i, stan)
                doc.setdefault("11", stan)
            else:
                doc = make_purchase(amount, pan=pan, stan=stan, mti=mti, dialect=dialect,
                                    terminal_id=terminal_id, merchant_id=merchant_id)
            t0 = perf()
            try:
                resp = await client.request(doc, timeout)
            except asyncio.TimeoutError:
                summary.sent += 1
                summary.timeouts += 1
                continue
            except NotConnectedError:
                return  # never written: counted as not sent
            except ConnectionError:  # lost while in flight
                summary.sent += 1
                summary.errors += 1
                continue
            except (iso8583.EncodeError, FrameError, ValueError):  # a bad make_doc
                summary.errors += 1
                summary.sent += 1
                continue
            latencies.append((perf() - t0) * 1000.0)
            summary.sent += 1
            summary.answered += 1
            codes[resp.get("39", "??")] += 1

    try:
        await asyncio.gather(*(worker(c) for c in live for _ in range(concurrency_per_conn)))
    finally:
        summary.elapsed_s = perf() - start
        summary.by_response_code = dict(codes)
        await asyncio.gather(*(c.close() for c in live), return_exceptions=True)
    return summary


# --------------------------------------------------------------------------
# TLS and CLI


def dev_client_context(state_dir: str | Path, terminal_id: str = "TERM0001") -> _ssl.SSLContext:
    """mTLS client context from the development PKI (the terminal's certificate
    has CN ``terminal_id``; the sample terminal's for TERM0001)."""
    from switch.certs import SAMPLE_TERMINAL_CN, client_context, ensure_dev_pki

    pki = ensure_dev_pki(Path(state_dir))
    if terminal_id == SAMPLE_TERMINAL_CN:
        cert, key = pki.client_cert, pki.client_key
    else:
        cert, key = pki.issue_client_cert(terminal_id)
    return client_context(pki.ca_cert, cert, key)


def add_terminal_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``terminal`` to an argparse subparsers object (``isoswitch sim terminal``)."""
    p = subparsers.add_parser(
        "terminal",
        help="send purchases as simulated PoS terminals",
        description="Send purchases to a switch (or simulator) and print outcomes and latencies.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8583)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight per connection")
    p.add_argument("--amount", type=int, default=1000, help="DE4 in minor units")
    p.add_argument("--pan", default=TEST_PAN)
    p.add_argument("--mti", default=None, help="0200 (default) or 0100")
    p.add_argument("--rate", type=float, default=None, help="requests per second (default: unpaced)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--dialect", default="default")
    p.add_argument("--framing", default="binary2", choices=("binary2", "ascii4", "bcd2", "binary4"))
    p.add_argument("--tpdu", action="store_true")
    p.add_argument("--terminal-id", default="TERM0001")
    p.add_argument("--merchant-id", default="MERCHANT0000001")
    p.add_argument("--state-dir", default="state", help="development PKI location")
    p.add_argument("--no-tls", action="store_true", help="plain TCP instead of mutual TLS")
    p.add_argument("--ca", default=None, help="CA file (default: the development CA)")
    p.add_argument("--cert", default=None, help="client certificate (default: development PKI)")
    p.add_argument("--key", default=None)
    p.add_argument("--server-hostname", default="localhost")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_terminal_cli)
    return p


async def run_terminal_cli(args) -> int:
    """Run the terminals; print outcomes; 0 when every request was answered."""
    ctx = None
    if not args.no_tls:
        if args.ca:
            from switch.certs import client_context

            ctx = client_context(Path(args.ca), args.cert and Path(args.cert), args.key and Path(args.key))
        else:
            ctx = dev_client_context(args.state_dir, args.terminal_id)
            if args.cert:
                ctx.load_cert_chain(args.cert, args.key)
    try:
        summary = await run_terminals(
            args.host, args.port, count=args.count, connections=args.connections,
            concurrency_per_conn=args.concurrency, ssl=ctx, server_hostname=args.server_hostname,
            dialect=args.dialect, framing=args.framing, tpdu=args.tpdu, amount=args.amount,
            pan=args.pan, mti=args.mti, terminal_id=args.terminal_id,
            merchant_id=args.merchant_id, timeout=args.timeout, rate=args.rate,
        )
    except (ValueError, OSError) as exc:
        print(f"isoswitch sim terminal: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary.as_dict()), flush=True)
    else:
        print(f"terminals -> {args.host}:{args.port} ({'plain TCP' if ctx is None else 'mTLS'}, "
              f"{args.connections} connections x {args.concurrency} in flight)")
        print(summary.format(), flush=True)
    if summary.connect_errors == args.connections and args.count:
        print("isoswitch sim terminal: no connection could be opened", file=sys.stderr)
    return 0 if summary.ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m switch.sim.terminal ...`` (same options as ``isoswitch sim terminal``)."""
    parser = argparse.ArgumentParser(prog="python -m switch.sim.terminal")
    sub = parser.add_subparsers(dest="cmd")
    add_terminal_parser(sub)
    args = parser.parse_args(["terminal", *(sys.argv[1:] if argv is None else argv)])
    return asyncio.run(run_terminal_cli(args))


if __name__ == "__main__":
    sys.exit(main())
