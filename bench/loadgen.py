"""Load generator for the end-to-end bench: mTLS terminal connections, open and closed loop.

Two ways to offer load, because they answer different questions:

* open loop (:func:`open_loop`): requests are due at a fixed arrival rate
  (optionally piecewise, for bursts) whatever the switch does. Latency is
  measured from each request's *intended* send time, so a stall in the switch
  (or in this generator) shows up in the percentiles instead of silently
  delaying later requests (no coordinated omission). The gap between the
  intended and the actual write is recorded on its own (``send_lag``) so the
  generator's own timer error is visible next to the switch's latency.
* closed loop (:func:`closed_loop`): every connection keeps ``in_flight``
  requests outstanding and sends the next one as soon as one is answered;
  the answered rate is the maximum sustainable throughput. Latency there is
  measured from the actual write (there is no intended time).

Requests are built from one :func:`make_purchase` template per phase; a
purchase-only source encodes the template once and writes each request's
trace number into a copy of those bytes (checked against a full encode when
the source is made), a mixed source encodes each request with the selected
core. The (DE41, DE11, DE7) of every request is unique within a switch
process, so the switch's retransmission detection never replays an answer
and flatters the figures. Every answer is decoded in full and matched to its
request by DE11.

Percentiles come from HdrHistogram (microsecond resolution, 3 significant
digits). Answers append their latencies to lists that are folded into the
histograms when the phase ends, so the generator spends ~0.1 us per answer
on them instead of ~2 us while it shares the machine's cores with the switch
(the values, hence the percentiles, are the same).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl as _ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from hdrh.histogram import HdrHistogram

from core import iso8583
from core.framing import FrameDecoder, FrameError, build_frame
from switch.sim.terminal import make_purchase, make_reversal

__all__ = ["PhaseResult", "RequestSource", "LoadConnection", "connect_all", "open_loop", "closed_loop"]

HIST_MAX_US = 120_000_000  # 2 minutes: nothing we wait for is longer


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, 3)


class StanSpace:
    """Trace numbers 000001..999999 shared by every connection to one switch process."""

    __slots__ = ("n",)

    def __init__(self):
        self.n = 0

    def next(self) -> str:
        n = self.n + 1
        if n > 999_999:
            n = 1
        self.n = n
        return "%06d" % n


class RequestSource:
    """Encoded requests for one phase: purchases (0200), or a 0100/0200/0400 mix.

    ``mix`` is a repeating pattern of MTIs; an ``"0400"`` entry reverses a
    recently answered 0200 (a new STAN of its own; DE90 names the original).
    """

    def __init__(self, stans: StanSpace, *, mix: tuple[str, ...] = ("0200",),
                 dialect: str = "default", terminal_id: str = "TERM0001", amount: int = 1000):
        self.stans = stans
        self.spec = iso8583.load_dialect(dialect)
        self.dialect = dialect
        now = time.time()
        self.templates = {
            mti: make_purchase(amount, stan=1, mti=mti, dialect=dialect, terminal_id=terminal_id, now=now)
            for mti in set(mix) | {"0200"} if mti != "0400"
        }
        self.mix = mix
        self.reverses = "0400" in mix
        self._patch = self._frame_patcher() if mix == ("0200",) else None
        self._i = 0
        self.recent_0200: collections.deque = collections.deque(maxlen=1000)

    def _purchase_frame(self, stan: str) -> bytes:
        doc = dict(self.templates["0200"])
        doc["11"] = stan
        doc["37"] = doc["37"][:-6] + stan
        return build_frame(iso8583.encode(doc, self.spec)[0], "binary2")

    def _frame_patcher(self):
        """``stan -> frame`` writing the trace number (DE11, and the RRN's last
        six digits) into the template's encoded bytes, or None when the
        dialect does not encode them as six plain ASCII digits at fixed
        offsets (then every request is encoded in full)."""
        a, b = self._purchase_frame("000000"), self._purchase_frame("111111")
        if len(a) != len(b):
            return None
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        runs = [diff[k:k + 6] for k in range(0, len(diff), 6)]
        if len(runs) != 2 or any(r != list(range(r[0], r[0] + 6)) for r in runs) \
                or any(a[i] != 0x30 or b[i] != 0x31 for i in diff):
            return None
        p, q = runs[0][0], runs[1][0]
        template = bytearray(a)

        def patch(stan: str) -> bytes:
            buf = template[:]
            enc = stan.encode()
            buf[p:p + 6] = enc
            buf[q:q + 6] = enc
            return bytes(buf)

        for stan in ("123456", "987650", "000042"):
            if patch(stan) != self._purchase_frame(stan):
                return None
        return patch

    def next(self) -> tuple[str, str, bytes, dict | None]:
        """(stan, mti, frame, doc) of the next request; doc only for a 0200 a later 0400 may reverse."""
        if self._patch is not None:
            stan = self.stans.next()
            return stan, "0200", self._patch(stan), None
        mti = self.mix[self._i % len(self.mix)]
        self._i += 1
        stan = self.stans.next()
        if mti == "0400":
            if self.recent_0200:
                original = self.recent_0200.popleft()
            else:  # nothing answered yet: reverse a purchase the switch never saw
                original = dict(self.templates["0200"], **{"11": self.stans.next()})
            doc = make_reversal(original, stan=stan, dialect=self.dialect)
        else:
            doc = dict(self.templates[mti])
            doc["11"] = stan
            doc["37"] = doc["37"][:-6] + stan
        raw = iso8583.encode(doc, self.spec)[0]
        keep = doc if mti == "0200" and self.reverses else None
        return stan, mti, build_frame(raw, "binary2"), keep

    def answered(self, mti: str, doc: dict | None) -> None:
        if doc is not None:
            self.recent_0200.append(doc)


@dataclass
class PhaseResult:
    """Counters and histograms of one load phase (one process layout, one offered load)."""

    name: str
    mode: str  # "open" | "closed"
    offered_tps: float | None = None
    duration_s: float = 0.0
    sent: int = 0
    answered: int = 0
    answered_in_window: int = 0
    timeouts: int = 0  # sent, never answered within the drain time
    errors: int = 0  # sent on a connection that was lost before the answer
    not_sent: int = 0  # due while no connection was usable
    undecodable: int = 0
    by_response_code: collections.Counter = field(default_factory=collections.Counter)
    by_mti: collections.Counter = field(default_factory=collections.Counter)
    approved_by: collections.Counter = field(default_factory=collections.Counter)
    latency: HdrHistogram = field(default_factory=new_histogram)
    service: HdrHistogram = field(default_factory=new_histogram)  # from the actual write
    send_lag: HdrHistogram = field(default_factory=new_histogram)
    windows: dict = field(default_factory=dict)  # name -> HdrHistogram (burst scenario)
    # latencies (us) not yet in ``latency``/``service``: see fold()
    latency_us: list = field(default_factory=list)
    service_us: list = field(default_factory=list)
    first_send: float = 0.0
    settle_s: float = 0.0  # closed loop: answers in the first settle_s are not counted
    last_answer: float = 0.0
    extra: dict = field(default_factory=dict)
    window_start: float = 0.0  # perf_counter bounds of the answers TPS counts
    window_end: float = float("inf")

    def fold(self) -> None:
        """Record the collected latencies into the histograms (once the phase
        has ended: answers only append, see the module docstring)."""
        for values, hist in ((self.latency_us, self.latency), (self.service_us, self.service)):
            for v, n in collections.Counter(values).items():
                hist.record_value(v, n)
            values.clear()

    @property
    def tps(self) -> float:
        if self.mode == "closed":
            window = self.duration_s - self.settle_s
            return self.answered_in_window / window if window > 0 else 0.0
        span = self.last_answer - self.first_send
        return self.answered / span if span > 0 else 0.0


class _Conn(asyncio.Protocol):
    def __init__(self, owner: "LoadConnection"):
        self.owner = owner
        self.decoder = FrameDecoder("binary2", 8192, False)

    def connection_made(self, transport):
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            frames = exc.frames
            self.owner.transport.close()
        self.owner.on_frames(frames)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.owner.on_lost()


class LoadConnection:
    """One terminal connection: pending requests keyed by STAN, answers recorded into a phase."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.transport: asyncio.Transport | None = None
        self.pending: dict[str, tuple[float, float, str, dict | None]] = {}
        self.phase: PhaseResult | None = None
        self.source: RequestSource | None = None
        self.on_answer: Callable[["LoadConnection"], None] | None = None
        self.alive = False
        self.window_of: Callable[[float], str | None] | None = None

    async def connect(self, host: str, port: int, ssl: _ssl.SSLContext | None) -> "LoadConnection":
        loop = asyncio.get_running_loop()
        kw = {"ssl": ssl, "server_hostname": "localhost"} if ssl is not None else {}
        self.transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: _Conn(self), host, port, **kw), 15.0)
        self.alive = True
        return self

    def send(self, intended: float) -> None:
        phase, source = self.phase, self.source
        stan, mti, frame, doc = source.next()
        now = time.perf_counter()
        self.pending[stan] = (intended, now, mti, doc)
        self.transport.write(frame)
        phase.sent += 1
        phase.by_mti[mti] += 1
        lag = now - intended
        if lag > 0:
            phase.send_lag.record_value(int(lag * 1e6))

    def on_frames(self, frames) -> None:
        phase = self.phase
        now = time.perf_counter()
        spec = self.spec
        pending = self.pending
        for frame in frames:
            try:
                resp = iso8583.decode(frame, spec)[0]
            except iso8583.DecodeError:
                if phase is not None:
                    phase.undecodable += 1
                continue
            entry = pending.pop(resp.get("11", ""), None)
            if entry is None or phase is None:
                continue
            intended, sent_at, mti, doc = entry
            phase.answered += 1
            if phase.window_start <= now <= phase.window_end:
                phase.answered_in_window += 1
            phase.last_answer = now
            phase.by_response_code[resp.get("39", "??")] += 1
            if "38" in resp:
                phase.approved_by[resp["38"][:1]] += 1
            lat = int((now - intended) * 1e6)
            phase.latency_us.append(lat if lat > 0 else 1)
            svc = int((now - sent_at) * 1e6)
            phase.service_us.append(svc if svc > 0 else 1)
            if self.window_of is not None:
                w = self.window_of(intended)
                if w is not None:
                    phase.windows[w].record_value(max(lat, 1))
            if doc is not None and resp.get("39") == "00":
                self.source.answered(mti, doc)
            if self.on_answer is not None:
                self.on_answer(self)

    def on_lost(self) -> None:
        self.alive = False
        if self.phase is not None:
            self.phase.errors += len(self.pending)
        self.pending.clear()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect_all(host: str, port: int, ssl: _ssl.SSLContext | None, count: int,
                      dialect: str = "default") -> list[LoadConnection]:
    spec = iso8583.load_dialect(dialect)
    return list(await asyncio.gather(*(LoadConnection(spec).connect(host, port, ssl) for _ in range(count))))


def _bind(conns, phase, source, on_answer=None, window_of=None):
    for c in conns:
        c.phase, c.source, c.on_answer, c.window_of = phase, source, on_answer, window_of
        c.pending.clear()


async def _drain(conns, phase: PhaseResult, drain_s: float) -> None:
    deadline = time.perf_counter() + drain_s
    while any(c.pending for c in conns) and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    for c in conns:
        phase.timeouts += len(c.pending)
        c.pending.clear()
        c.phase = None
        c.on_answer = None
    phase.fold()


async def open_loop(conns: list[LoadConnection], source: RequestSource, segments: list[tuple[float, float]],
                    *, name: str, drain_s: float = 4.0, windows: list[tuple[str, float, float]] | None = None,
                    at: list[tuple[float, Callable[[], None]]] | None = None) -> PhaseResult:
    """Offer ``segments`` = [(seconds, requests per second), ...] round-robin over ``conns``.

    ``windows`` = [(name, start_s, end_s)] also keeps a latency histogram of
    the requests *intended* inside each window (the burst scenario);
    ``at`` = [(seconds, callback)] runs callbacks at those offsets (the
    failover scenario's kill -9).
    """
    total = sum(d for d, _ in segments)
    offered = sum(d * r for d, r in segments) / total
    phase = PhaseResult(name=name, mode="open", offered_tps=offered, duration_s=total)
    window_of = None
    if windows:
        for w, _, _ in windows:
            phase.windows[w] = new_histogram()
    perf = time.perf_counter
    start = perf() + 0.01
    phase.first_send = start
    if windows:
        bounds = [(w, start + a, start + b) for w, a, b in windows]

        def window_of(t):
            for w, a, b in bounds:
                if a <= t < b:
                    return w
            return None

    _bind(conns, phase, source, window_of=window_of)
    # intended send times, segment by segment
    seg_ends = []
    t = start
    for d, r in segments:
        t += d
        seg_ends.append((t, 1.0 / r))
    end = seg_ends[-1][0]
    pending_calls = sorted(((start + off, cb) for off, cb in (at or [])), key=lambda x: x[0])
    n = len(conns)
    st = {"due": start, "seg": 0, "rr": 0}
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    fired = threading.Event()

    def fire() -> None:
        """Send every request whose intended time has come (runs on the loop)."""
        now = perf()
        while pending_calls and pending_calls[0][0] <= now:
            pending_calls.pop(0)[1]()
        due, seg, rr = st["due"], st["seg"], st["rr"]
        while due <= now and due < end:
            for _ in range(n):
                c = conns[rr % n]
                rr += 1
                if c.alive:
                    c.send(due)
                    break
            else:
                phase.not_sent += 1
            while seg < len(seg_ends) - 1 and due >= seg_ends[seg][0]:
                seg += 1
            due += seg_ends[seg][1]
        st["due"], st["seg"], st["rr"] = due, seg, rr
        if due >= end:
            done.set()
        fired.set()

    def pacer() -> None:
        # The loop's timers have 1 ms granularity (libuv), which alone would
        # put up to 1 ms of generator lag into every percentile; a thread
        # sleeping with nanosleep wakes the loop within tens of microseconds.
        while not done.is_set():
            delay = min(st["due"], pending_calls[0][0] if pending_calls else end) - perf()
            if delay > 0:
                time.sleep(min(delay, 0.05))
                if st["due"] > perf() and not (pending_calls and pending_calls[0][0] <= perf()):
                    continue
            fired.clear()
            try:
                loop.call_soon_threadsafe(fire)
            except RuntimeError:  # loop closed
                return
            fired.wait(1.0)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)  # the pacer must get the GIL promptly from a busy loop
    thread = threading.Thread(target=pacer, name="open-loop pacer", daemon=True)
    thread.start()
    try:
        await done.wait()
    finally:
        done.set()
        fired.set()
        sys.setswitchinterval(old_interval)
    for _, cb in pending_calls:
        cb()
    await _drain(conns, phase, drain_s)
    return phase


async def closed_loop(conns: list[LoadConnection], source: RequestSource, *, in_flight: int,
                      duration_s: float, name: str, drain_s: float = 4.0, settle_s: float = 0.0) -> PhaseResult:
    """Keep ``in_flight`` requests outstanding per connection for ``duration_s``.

    TPS counts the answers from ``settle_s`` after the start to the end: the
    first answers only arrive one round trip after the initial burst, and a
    switch with a longer round trip (a journal) would lose more of a short
    window to that ramp than one without.
    """
    phase = PhaseResult(name=name, mode="closed", duration_s=duration_s, settle_s=min(settle_s, duration_s / 2))
    perf = time.perf_counter
    start = perf()
    end = start + duration_s
    phase.first_send = start
    phase.window_start = start + phase.settle_s
    phase.window_end = end

    def on_answer(conn: LoadConnection) -> None:
        now = perf()
        if now < end and conn.alive:
            conn.send(now)

    _bind(conns, phase, source, on_answer=on_answer)
    for c in conns:
        for _ in range(in_flight):
            c.send(perf())
    await asyncio.sleep(max(0.0, end - perf()))
    await _drain(conns, phase, drain_s)
    return phase
