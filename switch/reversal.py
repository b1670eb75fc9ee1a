"""Store-and-forward of reversals: FIFO per acquirer, retried with backoff until acknowledged.

DESIGN.md #4: every request whose outcome is unknown is reversed at the
acquirer it may have reached; the first attempt goes as 0400, repeats as
0401; nothing is dropped: an entry past its attempt or age limit is parked
and stays visible (`parked`) until re-queued.

This queue keeps its entries in memory; a durable backend (the journal's
store-and-forward table) plugs in through the same `ReversalStore` methods.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from dataclasses import dataclass, field

from switch.messages import transmission_time

log = logging.getLogger("isoswitch.reversal")

# Fields a reversal carries from the original request (the rest is not needed
# to locate the original at the acquirer, and card data is kept to a minimum).
REVERSAL_FIELDS = ("2", "3", "4", "12", "13", "14", "22", "32", "33", "37", "41", "42", "49")


@dataclass
class ReversalEntry:
    id: int
    acquirer: str
    original: dict  # the acquirer-side request as sent, DE11 = link STAN
    reason: str
    created: float = field(default_factory=time.time)
    attempts: int = 0
    next_at: float = 0.0
    last_result: str = ""
    parked: bool = False


def build_reversal(original: dict, repeat: bool) -> dict:
    """0400/0401 for `original` with DE90 original data elements (ISO 8583:1987)."""
    rev = {"t": "0401" if repeat else "0400"}
    for k in REVERSAL_FIELDS:
        v = original.get(k)
        if v is not None:
            rev[k] = v
    rev["7"] = transmission_time()
    # DE90: original MTI (4) + STAN (6) + transmission time (10) + acquiring
    # and forwarding institution ids (11 each, zero-filled): n42
    de90 = (
        original.get("t", "0200")
        + original.get("11", "000000")
        + original.get("7", "0000000000")
        + original.get("32", "").zfill(11)[-11:]
        + original.get("33", "").zfill(11)[-11:]
    )
    rev["90"] = de90
    return rev


class ReversalQueue:
    """In-memory FIFO per acquirer with one sender task each."""

    def __init__(self, *, max_attempts: int = 50, max_age: float = 86_400.0,
                 backoff_min: float = 0.5, backoff_max: float = 60.0, timeout: float | None = None):
        self.max_attempts = max_attempts
        self.max_age = max_age
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._queues: dict[str, collections.deque[ReversalEntry]] = collections.defaultdict(collections.deque)
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self.parked: list[ReversalEntry] = []
        self.links: dict = {}
        self.counters = collections.Counter()
        self._stopping = False

    def bind(self, links: dict) -> None:
        self.links = links

    def depth(self, acquirer: str | None = None) -> int:
        if acquirer is not None:
            return len(self._queues.get(acquirer, ()))
        return sum(len(q) for q in self._queues.values())

    def entries(self, acquirer: str) -> list[ReversalEntry]:
        return list(self._queues.get(acquirer, ()))

    def enqueue(self, acquirer: str, original: dict, reason: str) -> ReversalEntry:
        e = ReversalEntry(next(self._ids), acquirer, dict(original), reason)
        self._queues[acquirer].append(e)
        self.counters["queued"] += 1
        self._ensure_worker(acquirer)
        self._wake[acquirer].set()
        return e

    def requeue_parked(self, entry_id: int) -> bool:
        for i, e in enumerate(self.parked):
            if e.id == entry_id:
                del self.parked[i]
                e.parked = False
                e.attempts = 0
                e.created = time.time()
                e.next_at = 0.0
                self._queues[e.acquirer].append(e)
                self._ensure_worker(e.acquirer)
                self._wake[e.acquirer].set()
                return True
        return False

    def _ensure_worker(self, acquirer: str) -> None:
        if acquirer not in self._wake:
            self._wake[acquirer] = asyncio.Event()
        t = self._tasks.get(acquirer)
        if (t is None or t.done()) and not self._stopping:
            self._tasks[acquirer] = asyncio.get_running_loop().create_task(
                self._drain(acquirer), name=f"reversals-{acquirer}")

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks.values():
            t.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def wait_empty(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.depth() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.depth() == 0

    async def _drain(self, acquirer: str) -> None:
        from switch.acquirer import NotSent, OutcomeUnknown

        q = self._queues[acquirer]
        wake = self._wake[acquirer]
        while not self._stopping:
            if not q:
                wake.clear()
                await wake.wait()
                continue
            e = q[0]  # FIFO: the head blocks the rest until acknowledged or parked
            now = time.time()
            if e.attempts >= self.max_attempts or now - e.created > self.max_age:
                q.popleft()
                e.parked = True
                self.parked.append(e)
                self.counters["parked"] += 1
                log.error("reversal %d for %s parked after %d attempts", e.id, acquirer, e.attempts)
                continue
            if e.next_at > now:
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), e.next_at - now)
                except asyncio.TimeoutError:
                    pass
                continue
            link = self.links.get(acquirer)
            rev = build_reversal(e.original, repeat=e.attempts > 0)
            e.attempts += 1
            try:
                if link is None:
                    raise NotSent(acquirer, "no such link")
                timeout = self.timeout or link.cfg.timeout
                reply = await link.request(rev, timeout)
            except (NotSent, OutcomeUnknown) as exc:
                e.last_result = str(exc)
                delay = min(self.backoff_min * (2 ** (e.attempts - 1)), self.backoff_max)
                e.next_at = time.time() + delay
                self.counters["retries"] += 1
                continue
            # Any 0410 acknowledges the reversal (00 reversed, 25 original not
            # found: either way the acquirer now knows it must not stand).
            q.popleft()
            e.last_result = reply.doc.get("39", "")
            self.counters["acknowledged"] += 1
            log.info("reversal %d acknowledged by %s (rc %s)", e.id, acquirer, e.last_result)
