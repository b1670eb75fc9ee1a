"""Transaction-outcome webhooks: a durable SQLite outbox, signed deliveries, retries.

Each event is written to the outbox (``<state_dir>/webhooks.sqlite``, WAL)
before the API answers; a sender task delivers it with aiohttp and marks it
delivered on any 2xx. Failures (non-2xx, timeouts, refused connections) are
retried with exponential backoff and jitter; an event past ``max_attempts``
is parked ("dead") and stays in the table for an operator. Delivered events
are deleted once ``retention_s`` old (default 7 days; hourly, in batches), so
the outbox stays bounded by recent traffic. Delivery is at
least once: a receiver dedupes by the event id (``X-Isoswitch-Event-Id`` and
the body's ``id``).

Only a 2xx acknowledges an event; anything else, a redirect included (it is
never followed), is a failed attempt.

Order per transaction: an event is not sent while an earlier event of the
same transaction is undelivered, so a receiver sees "approved" before
"reversed" for one payment. Events of different transactions go in parallel.

Signature (like Stripe's)::

    X-Isoswitch-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>

``verify_signature`` is the receiver's check: it recomputes the HMAC over
the raw body bytes, compares in constant time and refuses timestamps more
than ``tolerance_s`` away (replay protection).

SQLite runs on one dedicated thread (the stdlib driver is blocking); writes
from concurrent API requests are grouped into one transaction (group commit).

Crash recovery: the API journals a transaction's record (with its outcome)
before it writes the record's event here, in two databases, so a crash
between the two would lose the event. Each event of an API record carries
the record's id (``record_id``, unique: one event per record) and each
outbox has an ``origin`` id that the API writes into every record it makes
while this outbox is its sender. At start-up, before the API serves,
``recovery_since`` / ``absent`` / ``enqueue_recovered`` let it queue the
event of every record of this origin that has none, exactly once (see
``switch.api.server.recover_webhooks``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import json
import logging
import os
import random
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp

__all__ = ["WebhookSender", "verify_signature", "sign", "SIGNATURE_HEADER", "EVENT_ID_HEADER"]

log = logging.getLogger("isoswitch.webhooks")

SIGNATURE_HEADER = "X-Isoswitch-Signature"
EVENT_ID_HEADER = "X-Isoswitch-Event-Id"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    txn_id TEXT NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',   -- pending | delivered | dead
    delivered_at REAL,
    last_error TEXT,
    record_id TEXT                           -- the API record it is of (NULL: none, or queued before this column)
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (state, txn_id, seq);
-- origin: this outbox's id, written into the API records made while it is
-- their sender; created: when the outbox (or its origin) was made
CREATE TABLE IF NOT EXISTS outbox_meta (
    k TEXT PRIMARY KEY,
    v TEXT NOT NULL
);
"""
# after the migration that adds record_id to an outbox made before it: one
# event per API record, so recovery can never queue a record's event twice
_RECORD_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS outbox_record ON outbox (record_id) WHERE record_id IS NOT NULL"
_INSERT = ("INSERT OR IGNORE INTO outbox (event_id, txn_id, type, body, created, record_id) "
           "VALUES (?, ?, ?, ?, ?, ?)")


# Delivered events are kept this long (their bodies are what was sent, for an
# operator to check), then deleted in batches hourly, so the outbox does not
# grow with every transaction ever made. At least a day: far beyond start-up
# recovery's window and any receiver's retry horizon.
DEFAULT_RETENTION_S = 7 * 86400.0
MIN_RETENTION_S = 86400.0
PRUNE_EVERY_S = 3600.0
PRUNE_BATCH = 5000


def sign(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The signature header value for ``body`` at ``timestamp``."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, str(ts).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def verify_signature(secret: str | bytes, header: str | None, body: bytes | str,
                     tolerance_s: float = 300, *, now: float | None = None) -> bool:
    """True when ``header`` signs ``body`` (the raw request bytes) with ``secret``.

    Accepts several ``v1=`` entries (a sender rotating secrets signs with
    both). False for a missing/malformed header, a bad MAC, or a timestamp
    further than ``tolerance_s`` seconds from now.
    """
    if not header:
        return False
    if isinstance(body, str):
        body = body.encode("utf-8")
    ts = None
    sigs = []
    for part in header.split(","):
        k, _, v = part.strip().partition("=")
        # ASCII only: compare_digest raises TypeError on other text, which
        # made a forged header a crash (a 500) in the receiver instead of False
        if k == "t" and v.isascii() and v.isdigit():
            ts = int(v)
        elif k == "v1" and v and v.isascii():
            sigs.append(v)
    if ts is None or not sigs:
        return False
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance_s:
        return False
    key = secret.encode() if isinstance(secret, str) else secret
    expected = hmac.new(key, str(ts).encode() + b"." + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, s) for s in sigs)


@dataclass(frozen=True)
class Endpoint:
    url: str
    secret: str


class WebhookSender:
    """Durable outbox + delivery task. ``await start()``, ``await enqueue(...)``, ``await stop()``."""

    def __init__(self, db_path: Path | str, url: str, secret: str, *, timeout: float = 5.0,
                 backoff_min: float = 1.0, backoff_max: float = 300.0, max_attempts: int = 25,
                 concurrency: int = 16, poll_interval: float = 1.0, ssl=None, metrics=None,
                 retention_s: float = DEFAULT_RETENTION_S):
        if not url.startswith(("http://", "https://")):
            raise ValueError("webhook url must be http:// or https://")
        if len(secret) < 16:
            raise ValueError("webhook secret must be at least 16 characters")
        if not retention_s >= MIN_RETENTION_S:
            raise ValueError(f"webhook retention must be at least {MIN_RETENTION_S:g} s")
        # delivered events older than this (before the newest event) are deleted
        self.retention_s = float(retention_s)
        self._next_prune = 0.0  # monotonic time of the next pruning pass
        self.db_path = Path(db_path)
        self.endpoint = Endpoint(url, secret)
        self.timeout = timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.max_attempts = max_attempts
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.ssl = ssl
        self.metrics = metrics
        self._db: sqlite3.Connection | None = None
        self._exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="webhooks-db")
        self._pending: list[tuple] = []
        self._pending_futs: list[asyncio.Future] = []
        self._flush_task: asyncio.Task | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._inflight: set[str] = set()  # txn ids with a delivery under way
        self._stopping = False
        self.origin: str | None = None  # this outbox's id (outbox_meta), known once started
        self.created_at: float | None = None  # when this outbox (its origin) was made
        self.counters: dict[str, int] = {"queued": 0, "delivered": 0, "failed_attempts": 0, "dead": 0,
                                         "recovered": 0, "pruned": 0}

    # -- database (runs on the single db thread) ---------------------------

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    def _open(self) -> None:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self.db_path), check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        db.execute("BEGIN IMMEDIATE")
        try:
            # an outbox made before events carried their record: the column is
            # added (NULL in the old rows, whose records carry no origin either)
            if "record_id" not in {r[1] for r in db.execute("PRAGMA table_info(outbox)")}:
                db.execute("ALTER TABLE outbox ADD COLUMN record_id TEXT")
            db.execute(_RECORD_INDEX)
            db.execute("INSERT OR IGNORE INTO outbox_meta (k, v) VALUES ('origin', ?)", (os.urandom(8).hex(),))
            db.execute("INSERT OR IGNORE INTO outbox_meta (k, v) VALUES ('created', ?)", (repr(time.time()),))
            meta = dict(db.execute("SELECT k, v FROM outbox_meta"))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            db.close()
            raise
        self.origin, self.created_at = meta["origin"], float(meta["created"])
        self._db = db
        try:
            self.db_path.chmod(0o600)
        except OSError:
            pass

    def _insert_many(self, rows: list[tuple]) -> int:
        """Rows in one transaction; how many were new (a record's second event is ignored)."""
        db = self._db
        db.execute("BEGIN")
        try:
            before = db.total_changes
            db.executemany(_INSERT, rows)
            n = db.total_changes - before
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return n

    def _since(self, margin: float) -> float:
        # the newest event by seq (the primary key, no scan; pruning never
        # deletes it): a crash that lost events came after it was written
        row = self._db.execute("SELECT created FROM outbox ORDER BY seq DESC LIMIT 1").fetchone()
        newest = None if row is None else row[0]
        return self.created_at if newest is None else max(newest - margin, self.created_at)

    def _absent(self, record_ids: list[str]) -> set[str]:
        out = set(record_ids)
        for i in range(0, len(record_ids), 500):  # under SQLite's bound-parameter limit
            part = record_ids[i:i + 500]
            out.difference_update(r[0] for r in self._db.execute(
                f"SELECT record_id FROM outbox WHERE record_id IN ({','.join('?' * len(part))})", part))
        return out

    def _due(self, now: float, limit: int, busy: tuple[str, ...]) -> list[tuple]:
        # the head (lowest seq) pending event of each transaction, if due
        rows = self._db.execute(
            "SELECT o.seq, o.event_id, o.txn_id, o.body, o.attempts FROM outbox o "
            "WHERE o.state = 'pending' AND o.next_at <= ? AND o.seq = ("
            "  SELECT MIN(p.seq) FROM outbox p WHERE p.txn_id = o.txn_id AND p.state = 'pending') "
            "ORDER BY o.seq LIMIT ?", (now, limit + len(busy))).fetchall()
        return [r for r in rows if r[2] not in busy][:limit]

    def _next_due(self) -> float | None:
        row = self._db.execute("SELECT MIN(next_at) FROM outbox WHERE state = 'pending'").fetchone()
        return row[0] if row else None

    def _mark(self, seq: int, state: str, attempts: int, next_at: float, error: str | None) -> None:
        self._db.execute("UPDATE outbox SET state = ?, attempts = ?, next_at = ?, last_error = ?, "
                         "delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END "
                         "WHERE seq = ?", (state, attempts, next_at, error, state, time.time(), seq))

    def _prune(self, now: float) -> int:
        """Delete delivered events created ``retention_s`` before both now and the
        newest event, a batch per transaction (the writer is never held long);
        how many. Pending and dead events stay whatever their age (they are
        still owed, or an operator's to look at), and so does the newest
        event: start-up recovery measures its window from it, and everything
        in that window is far younger than the retention."""
        db = self._db
        row = db.execute("SELECT seq, created FROM outbox ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None:
            return 0
        newest_seq, newest = row
        cutoff = min(now, newest) - self.retention_s
        total = 0
        while True:
            # oldest first by seq (the primary key): the rows to go are at its start
            n = db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE seq < ? AND "
                           "state = 'delivered' AND created < ? ORDER BY seq LIMIT ?)",
                           (newest_seq, cutoff, PRUNE_BATCH)).rowcount
            total += n
            if n < PRUNE_BATCH:
                return total

    async def prune(self) -> int:
        """Delete delivered events past the retention now (also done hourly by the sender)."""
        n = await self._run(self._prune, time.time())
        self.counters["pruned"] += n
        if n:
            log.info("webhooks: %d delivered events older than %g days deleted from the outbox", n,
                     self.retention_s / 86400)
        return n

    def _count(self, state: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox WHERE state = ?", (state,)).fetchone()[0]

    # -- public ------------------------------------------------------------

    async def start(self) -> "WebhookSender":
        await self._run(self._open)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._task = asyncio.get_running_loop().create_task(self._deliver_loop(), name="webhooks")
        return self

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._flush_task is not None:
            await asyncio.gather(self._flush_task, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._db is not None:
            await self._run(self._db.close)
        self._exec.shutdown(wait=True)

    @staticmethod
    def _row(txn_id: str, event_type: str, data: dict, record_id: str | None) -> tuple:
        event_id = "evt_" + uuid.uuid4().hex
        created = time.time()
        body = json.dumps({"id": event_id, "type": event_type, "created": round(created, 3),
                           "data": data}, separators=(",", ":"), sort_keys=True)
        return event_id, txn_id, event_type, body, created, record_id

    async def enqueue(self, txn_id: str, event_type: str, data: dict, *, record_id: str | None = None) -> str:
        """Write one event durably (group commit) and wake the sender; its id.
        ``record_id``: the API record it is of (one event per record; what
        start-up recovery looks for)."""
        row = self._row(txn_id, event_type, data, record_id)
        event_id = row[0]
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(row)
        self._pending_futs.append(fut)
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())
        await fut
        self.counters["queued"] += 1
        return event_id

    async def _flush(self) -> None:
        while self._pending:
            rows, futs = self._pending, self._pending_futs
            self._pending, self._pending_futs = [], []
            try:
                await self._run(self._insert_many, rows)
            except Exception as e:  # the API answers 5xx-free but must know the event is not durable
                for f in futs:
                    if not f.done():
                        f.set_exception(e)
                continue
            for f in futs:
                if not f.done():
                    f.set_result(None)
            self._wake.set()

    # -- crash recovery (switch.api.server.recover_webhooks) ------------------

    async def recovery_since(self, margin: float) -> float:
        """Where a start-up scan for records whose event a crash lost begins
        (epoch seconds, the records' ``created_ts``): ``margin`` before the
        newest event written here, never before this outbox was made (no
        record of this origin is older). A lost event's record was still
        being served when the process died, after that newest event was
        written, so it started at most a request's whole life (``margin``)
        before it; older history is not scanned, so start-up stays quick and
        nothing from before webhooks were enabled is sent."""
        return await self._run(self._since, margin)

    async def absent(self, record_ids: list[str]) -> set[str]:
        """Those of ``record_ids`` with no event in the outbox."""
        return await self._run(self._absent, list(record_ids)) if record_ids else set()

    async def enqueue_recovered(self, events: list[tuple[str, str, str, dict]]) -> int:
        """Queue (record_id, txn_id, event_type, data) events in this order, in one
        transaction; a record that has an event already is skipped (the unique
        record_id), so running this twice queues nothing twice. How many were
        queued."""
        if not events:
            return 0
        rows = [self._row(txn_id, event_type, data, record_id) for record_id, txn_id, event_type, data in events]
        n = await self._run(self._insert_many, rows)
        self.counters["queued"] += n
        self.counters["recovered"] += n
        self._wake.set()
        return n

    async def stats(self) -> dict:
        pending = await self._run(self._count, "pending")
        dead = await self._run(self._count, "dead")
        return {"pending": pending, "dead": dead, **self.counters}

    async def wait_idle(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._pending and await self._run(self._count, "pending") == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    # -- delivery ----------------------------------------------------------

    async def _deliver_loop(self) -> None:
        sem = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task] = set()
        while not self._stopping:
            self._wake.clear()
            if time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + PRUNE_EVERY_S
                try:
                    await self.prune()
                except Exception as exc:  # the outbox grows a while longer; delivery goes on
                    log.error("webhooks: pruning the outbox failed (%s)", exc)
            try:
                rows = await self._run(self._due, time.time(), self.concurrency,
                                       tuple(self._inflight))
            except Exception:
                log.exception("webhook outbox read failed")
                rows = []
            for seq, event_id, txn_id, body, attempts in rows:
                await sem.acquire()
                self._inflight.add(txn_id)
                t = asyncio.get_running_loop().create_task(
                    self._deliver_one(seq, event_id, txn_id, body, attempts))
                tasks.add(t)

                def _done(t, txn_id=txn_id):
                    tasks.discard(t)
                    self._inflight.discard(txn_id)
                    sem.release()
                    self._wake.set()
                t.add_done_callback(_done)
            if rows:
                continue
            # sleep until woken by a new event / finished delivery, or the next retry is due
            try:
                nxt = await self._run(self._next_due)
            except Exception:
                nxt = None
            delay = self.poll_interval if nxt is None else max(0.0, min(self.poll_interval, nxt - time.time()))
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _deliver_one(self, seq: int, event_id: str, txn_id: str, body: str, attempts: int) -> None:
        raw = body.encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.endpoint.secret, raw),
            EVENT_ID_HEADER: event_id,
            "User-Agent": "isoswitch-webhooks/1",
        }
        error = None
        try:
            # a redirect is not an acknowledgement: followed, a 302/303 became a
            # GET without the event whose 2xx marked it delivered, and a 307
            # re-posted the signed event to wherever the Location named
            async with self._session.post(self.endpoint.url, data=raw, headers=headers, allow_redirects=False,
                                          ssl=self.ssl if self.ssl is not None else True) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    await self._run(self._mark, seq, "delivered", attempts + 1, 0.0, None)
                    self.counters["delivered"] += 1
                    if self.metrics is not None:
                        self.metrics.webhook_delivery("delivered")
                    return
                error = f"HTTP {resp.status}"
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            error = "timeout"
        except aiohttp.ClientError as e:
            error = type(e).__name__
        except OSError as e:
            error = type(e).__name__
        attempts += 1
        self.counters["failed_attempts"] += 1
        if self.metrics is not None:
            self.metrics.webhook_delivery("failed")
        if attempts >= self.max_attempts:
            await self._run(self._mark, seq, "dead", attempts, 0.0, error)
            self.counters["dead"] += 1
            log.error("webhook event %s dead after %d attempts (%s)", event_id, attempts, error)
            return
        delay = min(self.backoff_min * 2 ** (attempts - 1), self.backoff_max)
        delay *= 0.5 + random.random() / 2  # jitter: receivers coming back are not stampeded
        await self._run(self._mark, seq, "pending", attempts, time.time() + delay, error)
        log.info("webhook event %s attempt %d failed (%s); retry in %.1fs", event_id, attempts, error, delay)
