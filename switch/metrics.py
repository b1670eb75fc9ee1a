"""Prometheus metrics for the switch and the REST shim, on a registry of their own.

Two kinds of series:

* event metrics the hot path feeds (``observe_transaction``,
  ``observe_acquirer``, ``rate_limited``, ``observe_api``):
  counters and histograms updated as things happen;
* state metrics read from a live :class:`switch.app.Switch` at scrape time by
  :class:`SwitchCollector` (in-flight, link and circuit states, queue depth,
  parked reversals, late responses, decode errors and the flow/listener/link
  counters), so the hot path pays nothing for them.

Label values are bounded: acquirer and listener names come from the
configuration (anything else is "other"), MTIs from a fixed allowlist,
response codes from the two-character ISO 8583:1987 set (plus the
three-digit 1993 action codes), API routes are route templates, never raw
paths, and HTTP methods the standard ones (else "other"). No label or sample
ever carries card data.

``LiveStats`` keeps the last minute of per-second counts and latency
buckets for the dashboard's TPS and percentiles; it reuses the histogram's
bucket edges instead of sorting samples.
"""
from __future__ import annotations

import bisect
import contextvars
import re
import threading
import time
from collections import deque
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from switch.messages import APPROVED_CODES

__all__ = ["Metrics", "SwitchCollector", "LiveStats", "CONTENT_TYPE", "MTI_ALLOWLIST"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MTI_ALLOWLIST = frozenset({
    "0100", "0101", "0110", "0120", "0130", "0200", "0201", "0210", "0220", "0221", "0230",
    "0400", "0401", "0410", "0420", "0421", "0430", "0800", "0810",
    "1100", "1110", "1200", "1210", "1220", "1230", "1420", "1421", "1430", "1804", "1814",
})
_RC = re.compile(r"^(?:[0-9A-Z]{2}|[0-9]{3})$")
OTHER = "other"
# HTTP methods as labels: any token is a method to aiohttp's pure-Python parser
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"})

# The acquirer a request went to, handed from the link wrapper to the flow
# wrapper (see Metrics.instrument): a per-task holder list.
_acquirer_used: contextvars.ContextVar[list | None] = contextvars.ContextVar("isoswitch_acquirer_used",
                                                                            default=None)

# Terminal round trip: from a few hundred microseconds (in-process simulator)
# to the longest terminal timeout anyone configures.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
                   0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)


def _bounded(value: str | None, allowed: frozenset[str] | None, cap: set[str], limit: int = 64) -> str:
    """``value`` if it is allowed (or, with no allowlist, one of the first ``limit`` seen)."""
    if not value:
        return "none"
    if allowed is not None:
        return value if value in allowed else OTHER
    if value in cap:
        return value
    if len(cap) < limit and len(value) <= 64 and value.isprintable():
        cap.add(value)
        return value
    return OTHER


def mti_label(mti: str | None) -> str:
    return mti if mti in MTI_ALLOWLIST else OTHER


def rc_label(rc: str | None) -> str:
    if rc is None or rc == "":
        return "none"
    return rc if _RC.match(rc) else OTHER


# Dashboard rows built per second at most: every transaction below this rate,
# a sample above it (building a masked row for each of 20,000 TPS cost ~3% of
# the switch's CPU, for a table of 25 rows).
RECENT_ROWS_PER_S = 200


class LiveStats:
    """The last ``window`` seconds of counts and latency buckets, for the dashboard."""

    def __init__(self, window: int = 60, buckets: tuple[float, ...] = LATENCY_BUCKETS, recent: int = 50):
        self.window = window
        self.edges = buckets
        self._slots: deque[list] = deque()  # [second, count, approved, bucket_counts]
        self._lock = threading.Lock()
        self.recent: deque[dict] = deque(maxlen=recent)

    def _slot(self, sec: int) -> list:
        slots = self._slots
        if slots and slots[-1][0] == sec:
            return slots[-1]
        slot = [sec, 0, 0, [0] * (len(self.edges) + 1)]
        slots.append(slot)
        while slots and slots[0][0] <= sec - self.window:
            slots.popleft()
        return slot

    def observe(self, seconds: float, approved: bool, now: float | None = None) -> None:
        sec = int(now if now is not None else time.time())
        with self._lock:
            slot = self._slot(sec)
            slot[1] += 1
            slot[2] += approved
            slot[3][bisect.bisect_left(self.edges, seconds)] += 1

    def add_recent(self, item: dict) -> None:
        """A dashboard row; callers pass masked data only."""
        self.recent.appendleft(item)

    def snapshot(self, now: float | None = None) -> dict:
        now = now if now is not None else time.time()
        sec = int(now)
        with self._lock:
            slots = [s for s in self._slots if sec - self.window < s[0] <= sec]
        last = [s for s in slots if s[0] == sec - 1]  # the last complete second
        tps_1s = last[0][1] if last else 0
        ten = [s for s in slots if sec - 10 <= s[0] < sec]
        tps_10s = sum(s[1] for s in ten) / 10.0
        total = sum(s[1] for s in slots)
        approved = sum(s[2] for s in slots)
        merged = [0] * (len(self.edges) + 1)
        for s in slots:
            for i, c in enumerate(s[3]):
                merged[i] += c
        return {
            "tps_1s": tps_1s,
            "tps_10s": round(tps_10s, 2),
            "window_seconds": self.window,
            "window_count": total,
            "approval_rate": round(approved / total, 4) if total else None,
            "latency_ms": {q: self._quantile(merged, total, p) for q, p in
                           (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))},
            "per_second": [{"t": s[0], "count": s[1]} for s in slots[-self.window:]],
        }

    def _quantile(self, counts: list[int], total: int, q: float) -> float | None:
        """Linear interpolation inside the bucket holding the q-th sample (ms)."""
        if not total:
            return None
        rank = q * total
        seen = 0
        for i, c in enumerate(counts):
            if c and seen + c >= rank:
                lo = self.edges[i - 1] if i > 0 else 0.0
                hi = self.edges[i] if i < len(self.edges) else self.edges[-1] * 2
                frac = (rank - seen) / c
                return round((lo + (hi - lo) * frac) * 1000, 3)
            seen += c
        return round(self.edges[-1] * 1000, 3)


class Metrics:
    """Event metrics plus (when ``switch`` is given) the live-state collector."""

    def __init__(self, switch=None, *, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.switch = None
        self._acquirers: frozenset[str] | None = None
        self._seen_acq: set[str] = set()
        self._seen_keys: set[str] = set()
        self._tx_children: dict = {}
        self._acq_children: dict = {}
        self._api_children: dict = {}
        r = self.registry
        self.transactions = Counter(
            "isoswitch_transactions", "Transactions answered, by request MTI, acquirer and response code",
            ["mti", "acquirer", "response_code"], registry=r)
        self.round_trip = Histogram(
            "isoswitch_terminal_round_trip_seconds",
            "Request received to response ready, as the terminal (or API client) sees it",
            ["mti"], buckets=LATENCY_BUCKETS, registry=r)
        self.acquirer_round_trip = Histogram(
            "isoswitch_acquirer_round_trip_seconds", "Request written to response matched, per acquirer",
            ["acquirer"], buckets=LATENCY_BUCKETS, registry=r)
        self.rate_limited_total = Counter(
            "isoswitch_api_rate_limited", "API requests refused with 429, per API key name",
            ["key"], registry=r)
        self.api_requests = Counter(
            "isoswitch_api_requests", "REST API requests by route template, method and status",
            ["route", "method", "status"], registry=r)
        self.api_latency = Histogram(
            "isoswitch_api_request_seconds", "REST API request handling time by route template",
            ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.webhook_deliveries = Counter(
            "isoswitch_webhook_deliveries", "Webhook delivery attempts by result",
            ["result"], registry=r)
        self.live = LiveStats()
        if switch is not None:
            self.bind(switch)

    def bind(self, switch) -> None:
        """Read live state from ``switch`` at scrape time; bound label sets from its config."""
        self.switch = switch
        cfg = getattr(switch, "config", None)
        if cfg is not None:
            self._acquirers = frozenset(a.name for a in cfg.acquirers)
        self.registry.register(SwitchCollector(switch))

    # -- hot path ----------------------------------------------------------

    def acquirer_label(self, name: str | None) -> str:
        return _bounded(name, self._acquirers, self._seen_acq)

    def observe_transaction(self, mti: str | None, acquirer: str | None, rc: str | None,
                            seconds: float) -> None:
        # labels() takes a lock and builds a key on every call (~7 us each,
        # measured); the children for a label set are resolved once and kept.
        key = (mti, acquirer, rc)
        children = self._tx_children.get(key)
        if children is None:
            m = mti_label(mti)
            children = (self.transactions.labels(m, self.acquirer_label(acquirer), rc_label(rc)),
                        self.round_trip.labels(m))
            if len(self._tx_children) < 4096:  # label values are bounded; the raw keys may not be
                self._tx_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        self.live.observe(seconds, rc in APPROVED_CODES)

    def observe_acquirer(self, acquirer: str | None, seconds: float) -> None:
        child = self._acq_children.get(acquirer)
        if child is None:
            child = self.acquirer_round_trip.labels(self.acquirer_label(acquirer))
            if len(self._acq_children) < 256:
                self._acq_children[acquirer] = child
        child.observe(seconds)

    def rate_limited(self, key_name: str) -> None:
        self.rate_limited_total.labels(_bounded(key_name, None, self._seen_keys, 256)).inc()

    def observe_api(self, route: str, method: str, status: int, seconds: float) -> None:
        children = self._api_children.get((route, method, status))
        if children is None:
            children = (self.api_requests.labels(route, method if method in HTTP_METHODS else OTHER, str(status)),
                        self.api_latency.labels(route))
            if len(self._api_children) < 1024:  # label values are bounded; the cache is too
                self._api_children[(route, method, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def webhook_delivery(self, result: str) -> None:
        self.webhook_deliveries.labels(result).inc()

    def instrument(self, switch) -> None:
        """Feed these metrics from a running switch's flow and links.

        The flow's observer hook (``flow.on_transaction(mti, acquirer, rc,
        seconds)``) gives the terminal round trip and transaction counts; a
        thin wrapper around ``flow.process`` adds the dashboard's recent rows
        (masked PAN only), and one around each ``link.request`` the acquirer
        round trip (``reply.latency``, which excludes the journal write made
        before sending). Instance attributes shadow the methods, so the
        listener and the API call the wrappers without knowing.
        """
        from switch.messages import mask_pan, pan_of

        flow = switch.flow
        if getattr(flow, "_isoswitch_instrumented", False):
            return
        flow._isoswitch_instrumented = True
        has_hook = hasattr(flow, "on_transaction")
        previous = getattr(flow, "on_transaction", None)

        def on_transaction(mti, acquirer, rc, seconds):
            self.observe_transaction(mti, acquirer, rc, seconds)
            holder = _acquirer_used.get()
            if holder is not None:
                holder.append((acquirer, rc, seconds))
            if previous is not None:
                previous(mti, acquirer, rc, seconds)

        rate = [0, 0]  # [second, rows in it]

        def recent(req, ctx, acquirer, rc, seconds):
            now = time.time()
            sec = int(now)
            if rate[0] != sec:
                rate[0], rate[1] = sec, 0
            elif rate[1] >= RECENT_ROWS_PER_S:
                return  # the dashboard shows a sample at high rates (its table has 25 rows)
            rate[1] += 1
            self.live.add_recent({
                "time": round(now, 3), "mti": mti_label(req.get("t")),
                "masked_pan": mask_pan(pan_of(req)), "amount": req.get("4"), "currency": req.get("49"),
                "response_code": rc_label(rc), "approved": rc in APPROVED_CODES, "acquirer": self.acquirer_label(acquirer) if acquirer else None,
                "channel": ctx.listener, "latency_ms": round(seconds * 1000, 3)})

        if has_hook and hasattr(flow, "on_recent") and hasattr(flow, "on_acquirer"):
            # plain callbacks from the flow: no wrapper coroutine per request
            flow.on_transaction = on_transaction
            flow.on_recent = recent
            flow.on_acquirer = self.observe_acquirer
            return
        if has_hook:
            flow.on_transaction = on_transaction
        inner_process = flow.process

        async def process(req, ctx):
            holder: list = []
            token = _acquirer_used.set(holder)
            try:
                resp = await inner_process(req, ctx)
            finally:
                _acquirer_used.reset(token)
            if not has_hook:  # an older flow without the observer hook
                on_transaction(req.get("t"), None, resp.get("39"), time.monotonic() - ctx.received)
            if holder:
                acquirer, rc, seconds = holder[-1]
                recent(req, ctx, acquirer, rc, seconds)
            return resp

        flow.process = process
        for name, link in switch.links.items():
            inner_request = link.request

            async def request(*args, _inner=inner_request, _name=name, **kwargs):
                t0 = time.monotonic()
                reply = await _inner(*args, **kwargs)
                latency = getattr(reply, "latency", None)
                self.observe_acquirer(_name, latency if latency is not None else time.monotonic() - t0)
                return reply

            link.request = request

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


_COUNTER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _counter_items(counters) -> Iterable[tuple[str, float]]:
    """Counter keys are code-defined event names; anything else is skipped."""
    for k, v in list(counters.items()):
        if isinstance(k, str) and _COUNTER_NAME.match(k):
            yield k, v


class SwitchCollector:
    """Reads a running Switch at scrape time (no cost on the hot path)."""

    def __init__(self, switch):
        self.switch = switch

    def describe(self):
        return []  # state families appear and disappear with the switch's links

    def collect(self):
        from core.health import STATE_NAMES

        sw = self.switch
        now = time.monotonic()
        in_flight = GaugeMetricFamily("isoswitch_listener_in_flight",
                                      "Terminal requests being processed, per listener", labels=["listener"])
        lst_events = CounterMetricFamily("isoswitch_listener_events",
                                         "Listener event counters (connections, answered, decode_errors, ...)",
                                         labels=["listener", "event"])
        # read from the listeners' own counters, so it cannot drift from them:
        # kind "message" (a frame whose TPDU or message did not decode),
        # "frame" (a length header that desynchronised the stream)
        decode = CounterMetricFamily("isoswitch_decode_errors",
                                     "Terminal input that did not decode, per listener and kind",
                                     labels=["listener", "kind"])
        for lst in getattr(sw, "listeners", ()):
            name = lst.cfg.name
            in_flight.add_metric([name], lst.in_flight)
            for k, v in _counter_items(lst.counters):
                lst_events.add_metric([name, k], v)
            decode.add_metric([name, "message"], lst.counters.get("decode_errors", 0))
            decode.add_metric([name, "frame"], lst.counters.get("frame_errors", 0))
        yield in_flight
        yield lst_events
        yield decode

        up = GaugeMetricFamily("isoswitch_acquirer_up", "1 when at least one connection to the acquirer is up",
                               labels=["acquirer"])
        draining = GaugeMetricFamily("isoswitch_acquirer_draining", "1 when the acquirer is drained by an operator",
                                     labels=["acquirer"])
        circuit = GaugeMetricFamily("isoswitch_acquirer_circuit_state",
                                    "Circuit breaker state (1 for the current state)",
                                    labels=["acquirer", "state"])
        acq_in_flight = GaugeMetricFamily("isoswitch_acquirer_in_flight", "Requests awaiting the acquirer's answer",
                                          labels=["acquirer"])
        success = GaugeMetricFamily("isoswitch_acquirer_success_ewma", "Smoothed success ratio",
                                    labels=["acquirer"])
        latency = GaugeMetricFamily("isoswitch_acquirer_latency_ewma_seconds", "Smoothed acquirer latency",
                                    labels=["acquirer"])
        depth = GaugeMetricFamily("isoswitch_reversal_queue_depth", "Reversals waiting to be sent, per acquirer",
                                  labels=["acquirer"])
        link_events = CounterMetricFamily("isoswitch_acquirer_link_events",
                                          "Acquirer link event counters (sent, timeouts, late, ...)",
                                          labels=["acquirer", "event"])
        reversals = getattr(sw, "reversals", None)
        for name, link in getattr(sw, "links", {}).items():
            up.add_metric([name], 1 if link.up else 0)
            draining.add_metric([name], 1 if getattr(link, "draining", False) else 0)
            h = link.health
            state = STATE_NAMES[h.advance(now)] if hasattr(h, "advance") else h.state_name
            for s in STATE_NAMES:
                circuit.add_metric([name, s.lower()], 1 if s == state else 0)
            acq_in_flight.add_metric([name], link.in_flight)
            success.add_metric([name], h.ewma_success)
            latency.add_metric([name], h.ewma_latency)
            if reversals is not None:
                depth.add_metric([name], reversals.depth(name))
            for k, v in _counter_items(link.counters):
                link_events.add_metric([name, k], v)
        yield from (up, draining, circuit, acq_in_flight, success, latency, depth, link_events)

        parked = GaugeMetricFamily("isoswitch_reversals_parked", "Reversals parked past their limits")
        # counted by the journal (the parked list is one page of them)
        parked.add_metric([], reversals.parked_count if reversals is not None else 0)
        yield parked
        held = GaugeMetricFamily("isoswitch_reversals_held",
                                 "Reversals held in memory because the journal refused them (retried every second)")
        held.add_metric([], reversals.held if reversals is not None else 0)
        yield held
        journal = getattr(sw, "journal", None)
        restarts = CounterMetricFamily("isoswitch_journal_writer_restarts",
                                       "Times the SQLite journal's writer process was restarted after dying")
        restarts.add_metric([], (getattr(journal, "stats", None) or {}).get("restarts", 0))
        yield restarts
        failures = CounterMetricFamily("isoswitch_journal_write_failures",
                                       "Journal writes failed for want of storage (disk full, I/O error, "
                                       "database down or read-only)")
        failures.add_metric([], getattr(journal, "write_failures", 0))
        yield failures
        failing = GaugeMetricFamily("isoswitch_journal_writes_failing",
                                    "1 while journal writes fail for want of storage (/readyz is 503), else 0")
        failing.add_metric([], 0 if getattr(journal, "write_failure", None) is None else 1)
        yield failing
        rev_events = CounterMetricFamily("isoswitch_reversal_events", "Store-and-forward counters",
                                         labels=["event"])
        if reversals is not None:
            for k, v in _counter_items(reversals.counters):
                rev_events.add_metric([k], v)
        yield rev_events
        late = CounterMetricFamily("isoswitch_late_responses", "Acquirer responses after the timeout")
        late.add_metric([], getattr(sw, "late_responses", 0))
        yield late
        flow_events = CounterMetricFamily("isoswitch_flow_events",
                                          "Transaction flow counters (answered, no_route, unknown_outcome, ...)",
                                          labels=["event"])
        flow = getattr(sw, "flow", None)
        if flow is not None:
            for k, v in _counter_items(flow.counters):
                flow_events.add_metric([k], v)
        yield flow_events
        router = getattr(sw, "router", None)
        if router is not None:
            gen = GaugeMetricFamily("isoswitch_bin_table_generation", "BIN table swaps since start")
            gen.add_metric([], router.bins.generation)
            yield gen

