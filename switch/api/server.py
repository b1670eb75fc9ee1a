"""The REST shim: JSON payments into the same TransactionFlow terminals use, plus admin.

The shim runs in the switch's event loop (aiohttp), turns a JSON request into
an ISO 8583 document and calls ``switch.flow.process`` - the same routing,
failover, journal and reversal path as terminal traffic. The API's own
transaction records live in the journal too (``JournalTransactionStore``).

Card data: the PAN is validated (digits, Luhn, expiry) and goes into the
ISO document only; the transaction store and every response, error, log
line and webhook carry the masked PAN. Follow-up operations that must carry
the PAN again (reverse, refund, capture) read it from the store, which keeps
it only AES-GCM encrypted (PCI DSS 3.5.1) and deletes it once the payment is
reversed or fully refunded; the CVV is used for the request only
(``ApiSettings.cvv_field``), never stored.

Errors are RFC 9457 problem details (``application/problem+json``) naming the
field and the problem; they never echo card data.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import datetime as _dt
import inspect
import io
import itertools
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web

from switch.api.auth import ApiKey, ApiKeyStore, IdempotencyCache, IdempotencyConflict, SeenKeys
from switch.logs import RateLimitedLog
from switch.messages import APPROVED_CODES, RC_SYSTEM_ERROR, luhn_ok, mask_pan, switch_response
from switch.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from switch.metrics import Metrics

log = logging.getLogger("isoswitch.api")
_L_EVENT_NOT_QUEUED = "webhook event not queued"
# One per request while a fault lasts (the journal refusing writes, a bug a
# request keeps hitting): logged a few per kind a minute, then a count
_L_HANDLER_FAILED = "API handler failed"
_L_RECORD_UNCONFIRMED = "API record not confirmed by the journal"

HERE = Path(__file__).resolve().parent
OPENAPI_PATH = HERE / "openapi.json"
DASHBOARD_PATH = HERE / "dashboard.html"

PROBLEM_CT = "application/problem+json"

# ISO 4217: alpha -> (numeric, minor-unit exponent). A small table of the
# currencies a shop is likely to send; extend as needed.
CURRENCIES: dict[str, tuple[str, int]] = {
    "USD": ("840", 2), "EUR": ("978", 2), "GBP": ("826", 2), "JPY": ("392", 0), "CAD": ("124", 2),
    "AUD": ("036", 2), "NZD": ("554", 2), "CHF": ("756", 2), "SEK": ("752", 2), "NOK": ("578", 2),
    "DKK": ("208", 2), "PLN": ("985", 2), "CZK": ("203", 2), "HUF": ("348", 2), "RON": ("946", 2),
    "TRY": ("949", 2), "ILS": ("376", 2), "AED": ("784", 2), "SAR": ("682", 2), "INR": ("356", 2),
    "CNY": ("156", 2), "HKD": ("344", 2), "SGD": ("702", 2), "KRW": ("410", 0), "MXN": ("484", 2),
    "BRL": ("986", 2), "ZAR": ("710", 2),
}
NUMERIC_TO_ALPHA = {num: alpha for alpha, (num, _) in CURRENCIES.items()}
MAX_AMOUNT = 999_999_999_999  # DE4 n12


# ---------------------------------------------------------------------------
# Transaction store


class TransactionStore(Protocol):
    """Where the API keeps its transactions and, for follow-ups, their cards.

    Records are dicts as built by the API (see ``public_view`` for the fields
    clients see) and never hold card data. The card (PAN, expiry) of a
    payment is kept separately, encrypted, so a reverse, refund or capture
    can send it again. ``JournalTransactionStore`` (the switch's default)
    keeps both in the journal, so they survive a restart;
    ``MemoryTransactionStore`` is the in-process one for tests and the
    ``none`` journal.
    """

    async def add(self, record: dict, card: tuple[str, str] | None = None) -> None: ...

    def add_soon(self, record: dict, card: tuple[str, str] | None = None,
                 idem: tuple[str, str] | None = None) -> asyncio.Future:
        """``add`` started now (raising at once on card data); await the future for durability.
        ``idem``: (Idempotency-Key, fingerprint) of the POST that made the record."""
        ...

    async def update(self, txn_id: str, changes: dict) -> bool:
        """Merge ``changes`` into a record; False when there is no such record."""
        ...

    async def get(self, txn_id: str) -> dict | None: ...

    async def card(self, txn_id: str) -> tuple[str, str] | None: ...

    async def list(self, limit: int, offset: int, filters: dict) -> list[dict]:
        """Newest first; filters: status, terminal_id, since, until (epoch s), owner."""
        ...


_FORBIDDEN_KEYS = frozenset({"pan", "cvv", "track2", "pin", "2", "35", "45", "52", "55", "expiry"})


def _check_no_card_data(keys) -> None:
    bad = _FORBIDDEN_KEYS & keys
    if bad:  # defence in depth: a coding slip must not store card data
        raise ValueError(f"transaction record must not carry {sorted(bad)}")


class MemoryTransactionStore:
    """Bounded in-memory store (oldest dropped first); cards in a ``CardVault``.

    Nothing survives the process: after a restart a transaction is unknown (404)."""

    def __init__(self, max_records: int = 100_000):
        self.max_records = max_records
        self._items: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._vault = CardVault(max_records)

    async def add(self, record: dict, card: tuple[str, str] | None = None) -> None:
        self._add(record, card)

    def add_soon(self, record: dict, card: tuple[str, str] | None = None,
                 idem: tuple[str, str] | None = None) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._add(record, card)
        fut.set_result(None)
        return fut

    def _add(self, record: dict, card: tuple[str, str] | None) -> None:
        _check_no_card_data(record.keys())
        self._items[record["id"]] = dict(record)
        if card is not None:
            self._vault.put(record["id"], *card)
        while len(self._items) > self.max_records:
            self._items.popitem(last=False)

    async def update(self, txn_id: str, changes: dict) -> bool:
        _check_no_card_data(changes.keys())
        rec = self._items.get(txn_id)
        if rec is None:
            return False
        rec.update(changes)
        if rec.get("status") in ("reversed", "refunded"):
            self._vault.drop(txn_id)
        return True

    async def get(self, txn_id: str) -> dict | None:
        rec = self._items.get(txn_id)
        return dict(rec) if rec is not None else None

    async def card(self, txn_id: str) -> tuple[str, str] | None:
        return self._vault.get(txn_id)

    async def list(self, limit: int, offset: int, filters: dict) -> list[dict]:
        out = []
        skipped = 0
        status = filters.get("status")
        terminal = filters.get("terminal_id")
        since = filters.get("since")
        until = filters.get("until")
        owner = filters.get("owner")
        for rec in reversed(self._items.values()):
            if status is not None and rec["status"] != status:
                continue
            if terminal is not None and rec["terminal_id"] != terminal:
                continue
            if since is not None and rec["created_ts"] < since:
                continue
            if until is not None and rec["created_ts"] >= until:
                continue
            if owner is not None and rec.get("owner") != owner:
                continue
            if skipped < offset:
                skipped += 1
                continue
            out.append(dict(rec))
            if len(out) >= limit:
                break
        return out

    def __len__(self) -> int:
        return len(self._items)


class JournalTransactionStore:
    """API transactions in the switch's journal (SQLite or PostgreSQL): they survive
    a restart, and several switch processes on one PostgreSQL journal share them.

    Rows hold the record as the API shows it (masked PAN) and the card as
    AES-GCM ciphertext under the journal's key file, bound to the row id and
    deleted once the payment is reversed or fully refunded.
    """

    def __init__(self, journal):
        self.journal = journal
        # SQLite (one process owns it): the keys journaled so far, so a new
        # key needs no lookup; filled by ``load_seen`` before the API serves.
        # PostgreSQL: None, every new key is claimed in the database (several
        # processes share it).
        self.seen: SeenKeys | None = None

    async def load_seen(self, since: float = 0.0) -> int:
        """Fill the filter of Idempotency-Keys journaled at or after ``since``
        (SQLite journals only)."""
        if getattr(self.journal, "backend", None) != "sqlite":
            return 0
        seen = SeenKeys()
        n = await self.journal.api_idem_scan(seen.add, since)
        self.seen = seen
        return n

    async def prune_keys(self, older_than: float) -> int:
        """Delete Idempotency-Keys journaled before ``older_than`` (past their window)."""
        return (await self.journal.prune(older_than, tables=("api_idem",))).get("api_idem", 0)

    async def add(self, record: dict, card: tuple[str, str] | None = None) -> None:
        await self.add_soon(record, card)

    def add_soon(self, record: dict, card: tuple[str, str] | None = None,
                 idem: tuple[str, str] | None = None) -> asyncio.Future:
        """``add`` submitted now; the returned future resolves once it is durable.
        ``idem``: (Idempotency-Key, request fingerprint) of the POST that made it."""
        _check_no_card_data(record.keys())
        fut = self.journal.api_put_soon(record, card, idem)
        if idem is not None and self.seen is not None:
            self.seen.add(str(record.get("owner")), idem[0])
        return fut

    def outcome_attachment(self, record: dict, card: tuple[str, str] | None = None,
                           idem: tuple[str, str] | None = None,
                           parent: tuple[str, dict] | None = None) -> tuple:
        """``add`` as an attachment to the flow's outcome write (one transaction);
        ``parent``: (id, changes), the ``update`` a follow-up makes to its
        payment's record, in that same transaction."""
        _check_no_card_data(record.keys())
        att = self.journal.api_put_params(record, card, idem)
        if idem is not None and self.seen is not None:
            self.seen.add(str(record.get("owner")), idem[0])
        if parent is not None:
            _check_no_card_data(parent[1].keys())
            att += (self.journal.api_parent_params(*parent),)
        return att

    async def idem_claim(self, owner: str, idem_key: str, fingerprint: str,
                         stale_before: float, not_before: float = 0.0) -> tuple[bool, str | None] | None:
        if self.seen is not None and (owner, idem_key) not in self.seen:
            return None  # certainly never journaled
        return await self.journal.api_idem_claim(owner, idem_key, fingerprint, stale_before, not_before)

    async def idem_release(self, owner: str, idem_key: str) -> None:
        await self.journal.api_idem_release(owner, idem_key)

    async def lock_take(self, txn_id: str, owner: str, until: float) -> bool:
        return await self.journal.api_lock_take(txn_id, owner, until)

    async def lock_release(self, txn_id: str, owner: str) -> None:
        await self.journal.api_lock_release(txn_id, owner)

    async def update(self, txn_id: str, changes: dict) -> bool:
        _check_no_card_data(changes.keys())
        return await self.journal.api_update(txn_id, changes)

    async def get(self, txn_id: str) -> dict | None:
        return await self.journal.api_get(txn_id)

    async def card(self, txn_id: str) -> tuple[str, str] | None:
        return await self.journal.api_card(txn_id)

    async def list(self, limit: int, offset: int, filters: dict) -> list[dict]:
        return await self.journal.api_list(limit, offset, filters)

    async def scan(self, since: float, after: tuple[float, str] | None = None,
                   limit: int = 1000) -> list[tuple[str, float, dict]]:
        """(id, created_ts, record) created at or after ``since``, oldest first,
        the page after ``after`` ((created_ts, id)); for start-up scans."""
        return await self.journal.api_scan(since, after, limit)


PUBLIC_FIELDS = ("id", "type", "status", "approved", "response_code", "approval_code", "masked_pan",
                 "amount", "currency", "terminal_id", "merchant_id", "created", "parent_id",
                 "captured_amount", "refunded_amount")


def public_view(rec: dict) -> dict:
    return {k: rec.get(k) for k in PUBLIC_FIELDS}


# ---------------------------------------------------------------------------
# Card vault (follow-ups need the PAN again)


class CardVault:
    """txn id -> AES-GCM(PAN, expiry) under a per-process key; bounded, memory only
    (``MemoryTransactionStore``'s cards; the key is never written anywhere)."""

    def __init__(self, max_items: int = 100_000):
        from switch.keys import KeyRing

        self._ring = KeyRing.generate()
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.max_items = max_items

    def put(self, txn_id: str, pan: str, expiry: str) -> None:
        self._items[txn_id] = self._ring.encrypt(f"{pan}|{expiry}".encode(), txn_id.encode())
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def get(self, txn_id: str) -> tuple[str, str] | None:
        blob = self._items.get(txn_id)
        if blob is None:
            return None
        pan, _, expiry = self._ring.decrypt(blob, txn_id.encode()).decode().partition("|")
        return pan, expiry

    def drop(self, txn_id: str) -> None:
        self._items.pop(txn_id, None)


# ---------------------------------------------------------------------------
# Problems (RFC 9457)


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str, *, errors: list[dict] | None = None,
                 slug: str | None = None, headers: dict | None = None, extra: dict | None = None,
                 close: bool = False):
        super().__init__(detail)
        self.close = close  # the connection is closed after the answer (what is left of it cannot be trusted)
        self.status, self.title, self.detail = status, title, detail
        self.errors = errors
        self.slug = slug or title.lower().replace(" ", "-")
        self.headers = headers or {}
        self.extra = extra or {}

    def reply(self) -> Reply:
        body = {"type": f"urn:isoswitch:problem:{self.slug}", "title": self.title,
                "status": self.status, "detail": self.detail}
        if self.errors:
            body["errors"] = self.errors
        body.update(self.extra)
        return Reply(self.status, _dumps(body), PROBLEM_CT, self.headers)

    def response(self) -> web.Response:
        resp = self.reply().response()
        if self.close:
            resp.force_close()
        return resp


def invalid(errors: list[dict], detail: str | None = None) -> Problem:
    return Problem(400, "Invalid request", detail or "; ".join(f"{e['field']}: {e['problem']}" for e in errors),
                   errors=errors, slug="invalid-request")


def _dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON. orjson, not the standard library: a payment's body
    is parsed and its answer rendered in 0.9 us instead of 6.2 (measured), on a
    path that spends ~200 us per payment in all."""
    return orjson.dumps(obj)


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=_dumps(obj), content_type="application/json", headers=headers)


class Reply:
    """A complete answer, independent of the HTTP server that sends it: the
    payment path is shared by aiohttp and the lean server (``switch.api.fasthttp``)."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes, content_type: str = "application/json",
                 headers: dict | None = None):
        self.status, self.body, self.content_type, self.headers = status, body, content_type, headers

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, content_type=self.content_type,
                            headers=self.headers)

    @classmethod
    def of(cls, resp: web.Response) -> Reply:
        return cls(resp.status, resp.body, resp.content_type,
                   {k: v for k, v in resp.headers.items() if k.lower() not in ("content-type", "content-length")}
                   or None)


# ---------------------------------------------------------------------------
# Settings and state


@dataclass
class ApiSettings:
    timeout: float = 10.0  # the deadline given to the flow for one API request
    cvv_field: str | None = None  # ISO field that carries the CVV2 to the acquirer, if any
    public_metrics: bool = True  # /metrics without an API key (Prometheus scrapers)
    max_body: int = 1 << 20  # BIN tables can be large; payments are tiny
    # a request's head and body must arrive within this many seconds of its
    # first byte (answered 408 and closed otherwise): slow senders cannot
    # hold connections and buffers without end
    request_timeout: float = 30.0
    listener_name: str = "api"
    # how long an Idempotency-Key is remembered (memory and journal): a retry
    # within it is answered as first; after it the key is new again
    idempotency_window: float = 86_400.0


API_STATE = web.AppKey("isoswitch_api", object)
API_KEY = web.RequestKey("isoswitch_api_key", ApiKey)
BODY = web.RequestKey("isoswitch_body", bytes)


class ApiState:
    def __init__(self, switch, keys: ApiKeyStore, store: TransactionStore, webhooks, metrics: Metrics,
                 settings: ApiSettings):
        self.switch = switch
        self.keys = keys
        self.store = store
        self.webhooks = webhooks
        self.metrics = metrics
        self.settings = settings
        self.idempotency = IdempotencyCache(ttl=settings.idempotency_window)
        # a random start: STAN + DE7 must not repeat a pre-restart request's key
        self._stan = itertools.count(random.randrange(999_999))
        self._locks: dict[str, asyncio.Lock] = {}
        self.running_on: set[asyncio.Task] = set()  # requests answered as pending, still running
        self.started = time.time()
        self.openapi = OPENAPI_PATH.read_bytes()
        self.dashboard = DASHBOARD_PATH.read_bytes()
        # webhook events the outbox refused while running (_emit): the time of
        # the first, a count that tells a new refusal, and the task that
        # queues them again from the journal (_requeue_lost_events)
        self.lost_events_since: float | None = None
        self.lost_events = 0
        self.requeue_task: asyncio.Task | None = None
        self.log_limiter = RateLimitedLog(log)

    def next_stan(self) -> str:
        return f"{next(self._stan) % 999_999 + 1:06d}"

    def lock_for(self, txn_id: str) -> asyncio.Lock:
        lock = self._locks.get(txn_id)
        if lock is None:
            if len(self._locks) > 10_000:
                for k in [k for k, v in self._locks.items() if not v.locked()]:
                    del self._locks[k]
            lock = self._locks[txn_id] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def follow_up_lock(self, txn_id: str):
        """A payment's follow-ups one at a time: in this process (``lock_for``)
        and, where the store is shared by several switch processes (a
        PostgreSQL journal), across them: a lease in the journal, which a
        process that died holding it gives up once it expires. Without it two
        processes could both read a payment as unrefunded and both refund it
        in full. A lease held elsewhere: 409 with Retry-After."""
        async with self.lock_for(txn_id):
            take = getattr(self.store, "lock_take", None)
            if take is None:
                yield
                return
            owner = os.urandom(12).hex()  # this follow-up's, so only it releases the lease
            # the follow-up's whole life: the flow's time, its journal writes, a margin
            if not await take(txn_id, owner, time.time() + 2 * self.settings.timeout + 5.0):
                raise Problem(409, "Conflict", "another request is changing this transaction; retry it shortly",
                              slug="conflict", headers={"Retry-After": "1"})
            try:
                yield
            finally:
                try:
                    await self.store.lock_release(txn_id, owner)
                except Exception as exc:  # it expires instead
                    log.warning("API transaction %s: follow-up lease not released: %s", txn_id, exc)


def _state(request: web.Request) -> ApiState:
    return request.app[API_STATE]


# ---------------------------------------------------------------------------
# Middlewares


def _route_name(request: web.Request) -> str:
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None or isinstance(info, web.UrlMappingMatchInfo) and info.http_exception is not None:
        return "unmatched"
    return getattr(resource, "canonical", "unmatched")


def _internal_error(st: ApiState, method: str, route: str) -> Problem:
    """Log the exception being handled (its traceback, never the request) and
    answer a plain 500 problem."""
    st.log_limiter.error(_L_HANDLER_FAILED, "API handler failed for %s %s", method, route, exc_info=True,
                         traceback_first=True)
    return Problem(500, "Internal error", "the request could not be completed", slug="internal-error")


@web.middleware
async def problem_middleware(request: web.Request, handler):
    st = _state(request)
    t0 = time.perf_counter()
    try:
        resp = await handler(request)
    except Problem as p:
        resp = p.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        title = e.reason or "Error"
        detail = {404: "no such resource", 405: f"method {request.method} not allowed here",
                  413: "request body too large"}.get(e.status, title)
        resp = Problem(e.status, title, detail, headers={k: v for k, v in e.headers.items()
                                                        if k.lower() == "allow"}).response()
    except asyncio.CancelledError:
        raise
    except Exception:
        resp = _internal_error(st, request.method, _route_name(request)).response()
    st.metrics.observe_api(_route_name(request), request.method, resp.status, time.perf_counter() - t0)
    return resp


PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/dashboard"})


def _clear_key(get) -> str | None:
    auth = get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return get("x-api-key")


def _required_scope(path: str) -> str:
    return "admin" if path.startswith("/v1/admin/") else "payments"


def authorize(st: ApiState, path: str, get) -> ApiKey:
    """The API key of a request to ``path`` (``get(lowercase_name)`` reads a
    header): 401 without a valid key, 403 without the scope, 429 over its rate."""
    key = st.keys.authenticate(_clear_key(get))
    if key is None:
        raise Problem(401, "Unauthorized", "a valid API key is required (Authorization: Bearer <key> "
                      "or X-API-Key)", headers={"WWW-Authenticate": 'Bearer realm="isoswitch"'})
    scope = "admin" if path == "/metrics" else _required_scope(path)
    # a transactions listing is readable by admin keys too
    allowed = scope in key.scopes or (path.startswith("/v1/transactions") and "admin" in key.scopes)
    if not allowed:
        raise Problem(403, "Forbidden", f"this API key lacks the '{scope}' scope", slug="forbidden")
    wait = st.keys.check_rate(key)
    if wait > 0:
        st.metrics.rate_limited(key.name)
        raise Problem(429, "Too many requests", f"rate limit of {key.rate_per_s:g}/s exceeded",
                      slug="rate-limited", headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return key


@web.middleware
async def auth_middleware(request: web.Request, handler):
    st = _state(request)
    path = request.path
    if path in PUBLIC_PATHS or (path == "/metrics" and st.settings.public_metrics) \
            or not (path.startswith("/v1/") or path == "/metrics"):
        return await handler(request)
    request[API_KEY] = authorize(st, path, request.headers.get)
    return await handler(request)


def idempotency_key(get) -> str:
    idem = get("idempotency-key")
    if idem is None or not idem.strip():
        raise invalid([{"field": "Idempotency-Key", "problem": "header is required on every POST"}])
    if len(idem) > 255 or not idem.isascii() or not idem.isprintable():
        raise invalid([{"field": "Idempotency-Key", "problem": "must be 1-255 printable ASCII characters"}])
    return idem


def _idempotency_conflict() -> Problem:
    return Problem(422, "Idempotency key reused",
                   "this Idempotency-Key was used with a different request",
                   slug="idempotency-conflict",
                   errors=[{"field": "Idempotency-Key", "problem": "already used with another request"}])


async def _journaled_reply(st: ApiState, key: ApiKey, idem: str, fp: str) -> tuple[Reply, float] | None:
    """The answer an earlier life of this switch (or another process on the
    same PostgreSQL journal) gave a payment or follow-up POST with this
    Idempotency-Key, as a replay, and when the key was first used; None when
    the key is new. A retry after a crash or a restart is never charged or
    refunded twice: the key is journaled with the transaction's record, in
    its outcome's write."""
    claim = getattr(st.store, "idem_claim", None)
    if claim is None:
        return None
    now = time.time()
    found = await claim(key.id, idem, fp, now - 2 * st.settings.timeout - 5.0, now - st.settings.idempotency_window)
    if found is None:
        return None
    same_request, api_id = found
    if not same_request:
        raise _idempotency_conflict()
    if api_id is None:
        raise Problem(409, "Request in progress", "a request with this Idempotency-Key is being processed; "
                      "retry it shortly", slug="idempotency-in-progress", headers={"Retry-After": "1"})
    rec = await st.store.get(api_id)
    if rec is None:
        return None
    # the answer as first given: later follow-ups change a payment's status and
    # amounts, never what its own POST answered
    view = public_view(rec)
    view.update(status="approved" if rec.get("approved") else "declined", captured_amount=None,
                refunded_amount=None)
    return Reply(201, _dumps(view), headers={"Idempotent-Replayed": "true"}), float(rec["created_ts"])


# How long after the flow's own deadline (ApiSettings.timeout) a POST waits for
# its answer before it is told the outcome is pending: the flow answers well
# within its deadline unless the journal stalls (a hung disk or database).
PENDING_MARGIN = 0.5


def _outcome_pending() -> Problem:
    return Problem(503, "Outcome pending", "this request's outcome is not known yet; retry it with the same "
                   "Idempotency-Key to get it", slug="outcome-pending", headers={"Retry-After": "1"})


async def idempotent(st: ApiState, key: ApiKey, idem: str, method: str, path: str, body: bytes, run,
                     fp: str | None = None, journaled=None) -> Reply:
    """``run()``'s reply, once per (API key, Idempotency-Key): a repeat with the
    same request gets the stored reply (waiting for the first if it is still
    running), one with another request 422. ``journaled()``: (the reply
    journaled for this key by an earlier life of the switch, the key's first
    use), or None.

    No answer waits longer than the flow's deadline (plus PENDING_MARGIN):
    past it the client gets 503 "outcome pending" and the request runs on to
    its outcome, which a retry with the same key then gets. (With the journal
    stalled, a payment hung for as long as the journal did, and so did every
    retry, while terminals got their 91 at their deadline.)"""
    if fp is None:
        fp = IdempotencyCache.fingerprint(method, path, body)
    limit = st.settings.timeout + PENDING_MARGIN
    while True:
        try:
            rec, new = st.idempotency.begin(key.id, idem, fp)
        except IdempotencyConflict:
            raise _idempotency_conflict() from None
        if new:
            break
        if not rec.done.done():
            try:
                await asyncio.wait_for(asyncio.shield(rec.done), limit)
            except asyncio.TimeoutError:
                return _outcome_pending().reply()
        if rec.status:
            return Reply(rec.status, rec.body, rec.content_type, {"Idempotent-Replayed": "true"})
        # the first attempt died without an answer: run this one
    loop = asyncio.get_running_loop()
    answer = loop.create_future()
    # a task of its own, as the listener serves a request: the answer can be
    # given at the limit while the request runs on to its outcome
    work = loop.create_task(_first_attempt(st, key, idem, rec, run, journaled, answer))
    guard = loop.call_later(limit, _answer_pending, st, answer, work)
    try:
        return await answer
    finally:
        guard.cancel()


def _answer_pending(st: ApiState, answer: asyncio.Future, work: asyncio.Task) -> None:
    if not answer.done():
        answer.set_result(_outcome_pending().reply())
        # nobody awaits it any more: held until it ends
        st.running_on.add(work)
        work.add_done_callback(st.running_on.discard)


async def _first_attempt(st: ApiState, key: ApiKey, idem: str, rec, run, journaled,
                         answer: asyncio.Future) -> None:
    """The first request with an Idempotency-Key: its reply is stored (or the
    key let go) whether or not its client is still waiting, and given to
    ``answer`` unless that was answered already (as pending)."""
    try:
        replay = None
        try:
            found = None if journaled is None else await journaled()
        except Problem as p:
            # decided by another request's claim (in progress elsewhere, or the
            # key used with another body): not this key's answer for good
            st.idempotency.abandon(key.id, idem, rec)
            found, reply = None, p.reply()
        else:
            if found is not None:
                replay, rec.created = found  # its window counts from the key's first use, here too
            try:
                reply = replay if replay is not None else await run()
            except Problem as p:
                reply = p.reply()
            reply = await _settle(st, key, idem, rec, reply, journaled is not None and replay is None)
    except BaseException as exc:
        st.idempotency.abandon(key.id, idem, rec)
        cancelled = isinstance(exc, asyncio.CancelledError)
        if not answer.done():
            if cancelled:
                answer.cancel()
            else:
                answer.set_exception(exc)
        elif not cancelled:
            log.error("API request failed after it was answered as pending", exc_info=exc)
        if cancelled:
            raise
        return
    if not answer.done():
        answer.set_result(reply)


async def _settle(st: ApiState, key: ApiKey, idem: str, rec, reply: Reply, claimed: bool) -> Reply:
    """Store ``reply`` for the key; ``claimed``: the key was claimed in the
    journal for this run (let go unless a payment was made)."""
    if claimed and reply.status != 201:
        release = getattr(st.store, "idem_release", None)
        if release is not None:  # no payment was made: the key's claim (PostgreSQL) is let go
            try:
                await release(key.id, idem)
            except Exception as exc:  # it goes stale instead (a retry then waits until it has)
                log.warning("Idempotency-Key claim not released: %s", exc)
        if reply.status == 409:
            # the transaction was busy or in a state that may change: a retry
            # with this key runs again instead of replaying this answer
            st.idempotency.abandon(key.id, idem, rec)
            return reply
    st.idempotency.finish(key.id, idem, rec, reply.status, reply.body, reply.content_type)
    return reply


@web.middleware
async def idempotency_middleware(request: web.Request, handler):
    if request.method != "POST" or not request.path.startswith("/v1/") \
            or getattr(request.match_info, "http_exception", None) is not None:
        # no POST route here: the answer is its 404 or 405 (with Allow), not a
        # demand for an Idempotency-Key, nor a 404 remembered under one
        return await handler(request)
    idem = idempotency_key(request.headers.get)
    st = _state(request)
    body = await _read_body(request, st.settings.max_body)

    async def run() -> Reply:
        return Reply.of(await handler(request))

    key = request[API_KEY]
    fp = IdempotencyCache.fingerprint(request.method, request.path, body)
    # payments and their follow-ups (reverse, refund, capture) are journaled with their keys
    journaled = (lambda: _journaled_reply(st, key, idem, fp)) if request.path.startswith("/v1/payments") else None
    return (await idempotent(st, key, idem, request.method, request.path, body, run, fp,
                             journaled)).response()


async def serve_payment(st: ApiState, get, body: bytes) -> Reply:
    """POST /v1/payments as one call, for the lean HTTP server: what the
    middlewares and ``create_payment`` do for aiohttp, in the same order."""
    t0 = time.perf_counter()
    try:
        try:
            key = authorize(st, "/v1/payments", get)
            idem = idempotency_key(get)
            fp = IdempotencyCache.fingerprint("POST", "/v1/payments", body)
            reply = await idempotent(st, key, idem, "POST", "/v1/payments", body,
                                     lambda: payment_reply(st, key, body, (idem, fp)), fp,
                                     lambda: _journaled_reply(st, key, idem, fp))
        except Problem as p:
            reply = p.reply()
    except asyncio.CancelledError:
        raise
    except Exception:
        reply = _internal_error(st, "POST", "/v1/payments").reply()
    st.metrics.observe_api("/v1/payments", "POST", reply.status, time.perf_counter() - t0)
    return reply


async def _read_body(request: web.Request, limit: int) -> bytes:
    if BODY in request:
        return request[BODY]
    if request.content_length is not None and request.content_length > limit:
        raise Problem(413, "Payload too large", f"the body must be at most {limit} bytes", slug="too-large")
    timeout = _state(request).settings.request_timeout
    try:
        # a client that sends a head and then trickles its body (or stops)
        # would hold the connection, its handler and a growing buffer for as
        # long as it liked: the body has request_timeout to arrive
        async with asyncio.timeout(timeout):
            body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Problem(413, "Payload too large", f"the body must be at most {limit} bytes",
                      slug="too-large") from None
    except TimeoutError:
        raise Problem(408, "Request timeout", f"the request body did not arrive within {timeout:g} s",
                      slug="request-timeout", close=True) from None
    request[BODY] = body
    return body


async def _json_object(request: web.Request, *, optional: bool = False) -> dict:
    return _json_doc(await _read_body(request, _state(request).settings.max_body), optional=optional)


def _json_doc(body: bytes, *, optional: bool = False) -> dict:
    if optional and not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        # e.msg/lineno/colno never include the input itself
        if e.msg.startswith("str is not valid UTF-8"):
            raise invalid([{"field": "body", "problem": "not UTF-8 text"}]) from None
        raise invalid([{"field": "body", "problem": f"not valid JSON ({e.msg} at line {e.lineno} "
                                                   f"column {e.colno})"}]) from None
    if not isinstance(doc, dict):
        raise invalid([{"field": "body", "problem": "must be a JSON object"}])
    return doc


# ---------------------------------------------------------------------------
# Validation


def _field_name(name: str) -> str:
    from switch.logs import mask_text

    name = mask_text(str(name))
    return name if len(name) <= 64 else name[:61] + "..."


def _check_unknown(doc: dict, allowed: set[str], errors: list[dict]) -> None:
    for k in doc:
        if k not in allowed:
            errors.append({"field": _field_name(k), "problem": "unknown field"})


def _amount(doc: dict, errors: list[dict], *, required: bool) -> int | None:
    if "amount" not in doc:
        if required:
            errors.append({"field": "amount", "problem": "is required"})
        return None
    v = doc["amount"]
    if isinstance(v, bool) or not isinstance(v, int):
        errors.append({"field": "amount", "problem": "must be a positive integer in minor units (e.g. 1000 "
                                                     "for 10.00)"})
        return None
    if v <= 0:
        errors.append({"field": "amount", "problem": "must be a positive integer"})
        return None
    if v > MAX_AMOUNT:
        errors.append({"field": "amount", "problem": f"must be at most {MAX_AMOUNT}"})
        return None
    return v


def _currency(v: Any, errors: list[dict]) -> tuple[str, str] | None:
    """(numeric, alpha) for an ISO 4217 code given either way."""
    if not isinstance(v, str):
        errors.append({"field": "currency", "problem": "must be an ISO 4217 code such as \"USD\" or \"840\""})
        return None
    code = v.strip().upper()
    if code in CURRENCIES:
        return CURRENCIES[code][0], code
    if code in NUMERIC_TO_ALPHA:
        return code, NUMERIC_TO_ALPHA[code]
    shown = code if len(code) <= 3 and code.isalnum() else "the value given"
    errors.append({"field": "currency", "problem": f"unknown currency {shown} (supported: "
                                                   f"{', '.join(sorted(CURRENCIES))} or their numeric codes)"})
    return None


def _printable_id(doc: dict, name: str, max_len: int, errors: list[dict]) -> str | None:
    if name not in doc:
        return None
    v = doc[name]
    if not isinstance(v, str) or not 1 <= len(v) <= max_len or not v.isascii() or not v.isprintable():
        errors.append({"field": name, "problem": f"must be 1-{max_len} printable ASCII characters"})
        return None
    return v


def validate_payment(doc: dict, key: ApiKey, settings: ApiSettings, now: float | None = None) -> dict:
    errors: list[dict] = []
    _check_unknown(doc, {"pan", "expiry", "amount", "currency", "type", "terminal_id", "merchant_id", "cvv"},
                   errors)
    out: dict[str, Any] = {}
    pan = doc.get("pan")
    if pan is None:
        errors.append({"field": "pan", "problem": "is required"})
    elif not isinstance(pan, str) or not pan.isdigit() or not pan.isascii() or not 12 <= len(pan) <= 19:
        errors.append({"field": "pan", "problem": "must be a string of 12-19 digits"})
    elif not luhn_ok(pan):
        errors.append({"field": "pan", "problem": "fails the Luhn check (mistyped card number)"})
    else:
        out["pan"] = pan
    exp = doc.get("expiry")
    if exp is None:
        errors.append({"field": "expiry", "problem": "is required"})
    elif not isinstance(exp, str) or len(exp) != 4 or not exp.isdigit() or not exp.isascii() \
            or not 1 <= int(exp[2:]) <= 12:
        errors.append({"field": "expiry", "problem": "must be YYMM (4 digits, month 01-12)"})
    else:
        t = time.gmtime(now if now is not None else time.time())
        if (int(exp[:2]), int(exp[2:])) < (t.tm_year % 100, t.tm_mon):
            errors.append({"field": "expiry", "problem": "card has expired"})
        else:
            out["expiry"] = exp
    out["amount"] = _amount(doc, errors, required=True)
    if "currency" not in doc:
        errors.append({"field": "currency", "problem": "is required"})
    else:
        out["currency"] = _currency(doc["currency"], errors)
    kind = doc.get("type", "purchase")
    if kind not in ("authorization", "purchase"):
        errors.append({"field": "type", "problem": "must be \"authorization\" or \"purchase\""})
    out["type"] = kind
    out["terminal_id"] = _printable_id(doc, "terminal_id", 8, errors) or key.terminal_id
    out["merchant_id"] = _printable_id(doc, "merchant_id", 15, errors) or key.merchant_id
    cvv = doc.get("cvv")
    if cvv is not None and (not isinstance(cvv, str) or not cvv.isdigit() or not cvv.isascii()
                            or len(cvv) not in (3, 4)):
        errors.append({"field": "cvv", "problem": "must be 3 or 4 digits"})
    else:
        out["cvv"] = cvv
    if errors:
        raise invalid(errors)
    return out


def validate_followup(doc: dict, *, allow_amount: bool) -> int | None:
    errors: list[dict] = []
    _check_unknown(doc, {"amount"} if allow_amount else set(), errors)
    amount = _amount(doc, errors, required=False) if allow_amount else None
    if errors:
        raise invalid(errors)
    return amount


# ---------------------------------------------------------------------------
# ISO documents


class _Second:
    """The UTC time fields of one second, formatted once per second."""

    __slots__ = ("sec", "de7", "de12", "de13", "rrn", "iso")

    def __init__(self, sec: int):
        t = time.gmtime(sec)
        self.sec = sec
        self.de7 = time.strftime("%m%d%H%M%S", t)
        self.de12 = self.de7[4:]
        self.de13 = self.de7[:4]
        # RRN: last digit of the year + Julian day + hour (+ STAN)
        self.rrn = f"{t.tm_year % 10}{t.tm_yday:03d}{t.tm_hour:02d}"
        self.iso = time.strftime("%Y-%m-%dT%H:%M:%S", t)


_second = _Second(0)


def _at(ts: float) -> _Second:
    global _second
    sec = int(ts)
    if _second.sec != sec:
        _second = _Second(sec)
    return _second


def _iso_base(st: ApiState, mti: str, now: float) -> dict:
    t = _at(now)
    stan = st.next_stan()
    return {"t": mti, "7": t.de7, "11": stan, "12": t.de12, "13": t.de13, "37": t.rrn + stan}


def _pad(v: str, n: int) -> str:
    return v.ljust(n)[:n]


def _iso_time(ts: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-11-21T19:26:33.123Z."""
    sec = int(ts)
    us = round((ts - sec) * 1e6)  # as datetime.fromtimestamp rounds
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    return f"{_at(sec).iso}.{us // 1000:03d}Z"


async def _run_flow(st: ApiState, req: dict, before_outcome=None, ctx_out: list | None = None,
                    original: tuple | None = None) -> dict:
    """The flow's answer; the API's trace numbers are its own, so a key collision
    (another process, a restart within the second) is retried with a new STAN --
    never answered with another payment's replay."""
    from switch.flow import RequestContext, TraceCollision

    now = time.monotonic()
    name = st.settings.listener_name
    ctx = RequestContext(name, None, now, now + st.settings.timeout, channel=name,
                         before_outcome=before_outcome, original=original)
    if ctx_out is not None:
        ctx_out.append(ctx)
    for _ in range(8):
        try:
            return await st.switch.flow.process(req, ctx)
        except TraceCollision:
            log.warning("API trace number %s collided with a journaled request; retrying with a new one",
                        req.get("11"))
            stan = st.next_stan()
            req["11"] = stan
            if req.get("37"):
                req["37"] = req["37"][:-6] + stan  # the RRN ends with the STAN (_iso_base)
    return switch_response(req, RC_SYSTEM_ERROR)


def _txn_id(now: float) -> str:
    """``txn_`` + 32 hex digits: milliseconds since the epoch (12) then 80 random
    bits (20), as in a UUIDv7. New ids land at the right edge of the journal's
    primary-key index instead of on random pages (measured: less writer CPU
    per API payment), and they still cannot be guessed."""
    return f"txn_{int(now * 1000) & 0xFFFF_FFFF_FFFF:012x}{os.urandom(10).hex()}"


def _new_record(kind: str, key: ApiKey, *, status: str, rc: str, approval: str | None, masked: str,
                amount: int, currency: str, terminal: str, merchant: str, iso: dict, parent: str | None,
                now: float) -> dict:
    return {
        "id": _txn_id(now),
        "type": kind,
        "status": status,
        "approved": rc in APPROVED_CODES,
        "response_code": rc,
        "approval_code": approval,
        "masked_pan": masked,
        "amount": amount,
        "currency": currency,
        "terminal_id": terminal,
        "merchant_id": merchant,
        "created": _iso_time(now),
        "created_ts": now,
        "parent_id": parent,
        "captured_amount": None,
        "refunded_amount": None,
        "owner": key.id,
        # ISO keys of the original (no card data): what a 0400/0220 must quote
        "iso_mti": iso.get("t"),
        "iso_stan": iso.get("11"),
        "iso_de7": iso.get("7"),
        "iso_rrn": iso.get("37"),
        "iso_pc": iso.get("3"),
        "iso_de22": iso.get("22"),
    }


# The key in an API record naming the webhook outbox (WebhookSender.origin)
# that must hold the record's event: what start-up recovery looks for.
WEBHOOK_ORIGIN = "webhook_origin"


def _webhook_event(rec: dict) -> tuple[str, str, dict]:
    """(transaction id, event type, data) of a record's one webhook event:
    ``<type>.approved|declined`` with the record as its POST answered it (a
    payment's later status and amounts are its follow-ups' events), under
    its payment's id, so one payment's events go in order."""
    approved = bool(rec.get("approved"))
    view = public_view(rec)
    view.update(status="approved" if approved else "declined", captured_amount=None, refunded_amount=None)
    return rec["parent_id"] or rec["id"], f"{rec['type']}.{'approved' if approved else 'declined'}", view


async def _emit(st: ApiState, rec: dict) -> None:
    if st.webhooks is None:
        return
    txn_id, event, data = _webhook_event(rec)
    try:
        await st.webhooks.enqueue(txn_id, event, data, record_id=rec["id"])
    except Exception as exc:
        # The record and its outcome are journaled; the outbox (a second
        # database) refused the event. It is queued again from the journal
        # once the outbox takes writes, not only at the next start.
        if st.lost_events_since is None:
            st.lost_events_since = time.time()
        st.lost_events += 1
        st.log_limiter.error(_L_EVENT_NOT_QUEUED, "webhook event %s for %s not queued (%s); queued from the "
                             "journal once the outbox takes writes", event, rec["id"], exc,
                             exc_info=exc, traceback_first=True)
        if st.requeue_task is None or st.requeue_task.done():
            st.requeue_task = asyncio.get_running_loop().create_task(_requeue_lost_events(st),
                                                                     name="webhooks-requeue")


async def _requeue_lost_events(st: ApiState, first_delay: float = 1.0, max_delay: float = 30.0) -> None:
    """Queue the events the outbox refused while running (``_emit``), from the
    journal's records as start-up recovery does (``recover_webhooks``), from
    a little before the first refusal: after one second, then with backoff
    while the outbox still refuses, until a run finds no refusal newer than
    its own start. (An event queued this way can arrive after a later one
    of the same payment: it was refused when its turn came.)"""
    delay = first_delay
    while st.lost_events_since is not None:
        await asyncio.sleep(delay)
        seen, since = st.lost_events, st.lost_events_since
        try:
            await recover_webhooks(st.store, st.webhooks, st.settings, since=since, cause="the outbox refused")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            st.log_limiter.error(_L_EVENT_NOT_QUEUED, "webhooks: events the outbox refused not queued yet (%s); "
                                 "trying again in %g s", exc, min(delay * 2, max_delay))
            delay = min(delay * 2, max_delay)
            continue
        if st.lost_events == seen:
            st.lost_events_since = None
        delay = first_delay


# ---------------------------------------------------------------------------
# Payments


async def create_payment(request: web.Request) -> web.Response:
    st = _state(request)
    body = await _read_body(request, st.settings.max_body)
    idem = (idempotency_key(request.headers.get), IdempotencyCache.fingerprint(request.method, request.path, body))
    return (await payment_reply(st, request[API_KEY], body, idem)).response()


async def payment_reply(st: ApiState, key: ApiKey, body: bytes, idem: tuple[str, str] | None = None) -> Reply:
    """POST /v1/payments; ``idem``: (Idempotency-Key, request fingerprint),
    journaled with the payment's record."""
    p = validate_payment(_json_doc(body), key, st.settings)
    now = time.time()
    numeric, alpha = p["currency"]
    req = _iso_base(st, "0100" if p["type"] == "authorization" else "0200", now)
    req.update({"2": p["pan"], "3": "000000", "4": f"{p['amount']:012d}", "14": p["expiry"],
                "22": "010", "25": "59", "41": _pad(p["terminal_id"], 8), "42": _pad(p["merchant_id"], 15),
                "49": numeric})
    if p.get("cvv") and st.settings.cvv_field:
        req[st.settings.cvv_field] = p["cvv"]
    masked = mask_pan(p["pan"])

    def record(resp: dict) -> tuple[dict, tuple[str, str] | None]:
        rc = resp.get("39", "96")
        approved = rc in APPROVED_CODES
        rec = _new_record(p["type"], key, status="approved" if approved else "declined", rc=rc,
                          approval=resp.get("38") if approved else None, masked=masked,
                          amount=p["amount"], currency=alpha, terminal=p["terminal_id"],
                          merchant=p["merchant_id"], iso=req, parent=None, now=now)
        return rec, ((p["pan"], p["expiry"]) if approved else None)

    resp, rec = await _flow_with_record(st, req, record, idem)
    req.clear()  # the only object holding the clear PAN in this handler (with p)
    await _emit(st, rec)
    return Reply(201, _dumps(public_view(rec)))


async def _flow_with_record(st: ApiState, req: dict, record, idem: tuple[str, str] | None,
                            parent: tuple[dict, Any] | None = None) -> tuple[dict, dict]:
    """Run ``req`` through the flow and journal its API record, ``record(resp)
    -> (record, card or None)``, with the Idempotency-Key ``idem``. Returns
    (the flow's answer, the record as the client is told it).

    ``parent``: for a follow-up, (its payment's record as read under the
    payment's lock, ``changes()`` -> what an approval changes in it).

    With the journal's store the record, and an approved follow-up's changes
    to its payment, ride in the outcome's own write, so no crash keeps one
    without the others (a refund journaled but not yet counted in its
    payment would let the payment be refunded twice); another store gets
    them submitted just before and just after. When that write fails or its
    fate is unknown the flow has answered 96 and reversed the acquirer's
    answer, and the records are written again to say so."""
    early: list = []
    ctx_out: list = []
    attachment = getattr(st.store, "outcome_attachment", None)
    origin = getattr(st.webhooks, "origin", None)
    if origin is not None:  # the outbox its event goes to, journaled with it (recover_webhooks)
        made = record

        def record(resp: dict):
            rec, card = made(resp)
            rec[WEBHOOK_ORIGIN] = origin
            return rec, card

    def parent_changes(rec: dict) -> dict | None:
        return parent[1]() if parent is not None and rec["approved"] else None

    def before_outcome(resp: dict) -> tuple | None:
        rec, card = record(resp)
        if attachment is not None:
            changes = parent_changes(rec)
            early.append((rec, None, changes))
            return attachment(rec, card, idem, None if changes is None else (rec["parent_id"], changes))
        early.append((rec, st.store.add_soon(rec, card, idem), None))
        return None

    # a follow-up goes to the acquirer that had its payment (RequestContext.original)
    original = None
    if parent is not None:
        p = parent[0]
        original = (p.get("iso_mti"), p.get("iso_stan"), p.get("iso_de7"))
    resp = await _run_flow(st, req, before_outcome, ctx_out, original)
    if not early:  # answered before reaching the acquirer (format error, shed): no outcome hook
        rec, card = record(resp)
        await st.store.add_soon(rec, card, idem)
        saved_changes = None
    else:
        rec, saved, saved_changes = early[-1]
        saved_ok = not ctx_out[-1].outcome_failed
        if saved is not None:
            try:
                await saved
            except Exception as exc:
                saved_ok = False
                st.log_limiter.error(_L_RECORD_UNCONFIRMED, "API transaction %s: record not confirmed by the "
                                     "journal (%s)", rec["id"], exc)
        if not saved_ok:
            # its fate is unknown: the writer may have died after its COMMIT
            st.log_limiter.error(_L_RECORD_UNCONFIRMED, "API transaction %s: writing its record again with the "
                                 "answer the client gets", rec["id"])
        if not saved_ok or rec["response_code"] != resp.get("39", "96"):
            final, card = record(resp)
            changes = {k: final[k] for k in ("status", "approved", "response_code", "approval_code")}
            rec = dict(rec, **changes)
            if not await st.store.update(rec["id"], changes):
                await st.store.add_soon(rec, card, idem)
    if parent is not None:
        orig = parent[0]
        if saved_changes is not None and not rec["approved"]:
            # journaled with an approval the client was not given: the payment
            # gets back what it held (under its lock, so whether or not that
            # write landed, these are the values to restore)
            restore = {k: orig.get(k) for k in saved_changes}
            try:
                await st.store.update(rec["parent_id"], restore)
            except Exception as exc:  # the client still gets its answer; an operator must mend the record
                log.critical("API transaction %s: its payment %s may still show this %s, which was not given "
                             "(%s); restore %s by hand", rec["id"], rec["parent_id"], rec["type"], exc,
                             sorted(restore))
        elif saved_changes is None and rec["approved"]:  # a store without attachments
            await st.store.update(rec["parent_id"], parent[1]())
    return resp, rec


async def _original(st: ApiState, key: ApiKey, txn_id: str) -> dict:
    rec = await st.store.get(txn_id)
    if rec is None or (rec.get("owner") != key.id and "admin" not in key.scopes):
        raise Problem(404, "Not found", "no such transaction", slug="not-found")
    return rec


def _conflict(detail: str) -> Problem:
    return Problem(409, "Conflict", detail, slug="conflict")


def _de90(orig: dict) -> str:
    return (orig["iso_mti"] or "0200") + (orig["iso_stan"] or "000000") + (orig["iso_de7"] or "0" * 10) + "0" * 22


def _amount_over(what: str, limit: int) -> Problem:
    return Problem(400, "Invalid request", f"amount exceeds the {what} amount ({limit})",
                   errors=[{"field": "amount", "problem": f"must be at most {limit}"}], slug="invalid-request")


async def _card_request(st: ApiState, orig: dict, txn_id: str, mti: str, proc: str, amount: int, now: float,
                        missing: str) -> dict:
    """A follow-up that carries the card again (refund, capture): the ISO request
    with the card from the store; 409 ``missing`` when it is no longer held."""
    card = await st.store.card(txn_id)
    if card is None:
        raise _conflict(missing)
    req = _iso_base(st, mti, now)
    req.update({"2": card[0], "14": card[1], "3": proc, "4": f"{amount:012d}", "22": "010", "25": "59",
                "41": _pad(orig["terminal_id"], 8), "42": _pad(orig["merchant_id"], 15),
                "49": CURRENCIES[orig["currency"]][0]})
    return req


async def _follow_up(st: ApiState, key: ApiKey, kind: str, orig: dict, txn_id: str, req: dict,
                     now: float, amount: int, approval, parent_update, request: web.Request) -> web.Response:
    """Send a reversal/refund/capture through the flow, record it as a child of
    `orig` (journaled with the request's Idempotency-Key, so a retry after a
    restart is answered with it), update the parent when approved, emit the
    webhook event.

    `approval(resp)` gives the child's approval code when approved;
    `parent_update()` the parent's changes when approved.
    """
    def record(resp: dict) -> tuple[dict, None]:
        rc = resp.get("39", "96")
        approved = rc in APPROVED_CODES
        return _new_record(kind, key, status="approved" if approved else "declined", rc=rc,
                           approval=approval(resp) if approved else None, masked=orig["masked_pan"],
                           amount=amount, currency=orig["currency"], terminal=orig["terminal_id"],
                           merchant=orig["merchant_id"], iso=req, parent=txn_id, now=now), None

    body = await _read_body(request, st.settings.max_body)
    idem = (idempotency_key(request.headers.get), IdempotencyCache.fingerprint(request.method, request.path, body))
    _resp, rec = await _flow_with_record(st, req, record, idem, (orig, parent_update))
    await _emit(st, rec)
    return json_response(public_view(rec), status=201)


async def reverse_payment(request: web.Request) -> web.Response:
    st = _state(request)
    key: ApiKey = request[API_KEY]
    validate_followup(await _json_object(request, optional=True), allow_amount=False)
    txn_id = request.match_info["id"]
    async with st.follow_up_lock(txn_id):
        orig = await _original(st, key, txn_id)
        if orig["type"] not in ("authorization", "purchase"):
            raise _conflict(f"a {orig['type']} cannot be reversed; reverse the payment it belongs to")
        if orig["status"] != "approved":
            raise _conflict(f"transaction is {orig['status']}; only an approved, not yet captured, "
                            "refunded or reversed payment can be reversed")
        now = time.time()
        req = _iso_base(st, "0400", now)
        req.update({"3": orig["iso_pc"] or "000000", "4": f"{orig['amount']:012d}", "22": orig["iso_de22"] or "010",
                    "25": "59", "37": orig["iso_rrn"], "41": _pad(orig["terminal_id"], 8),
                    "42": _pad(orig["merchant_id"], 15), "49": CURRENCIES[orig["currency"]][0],
                    "90": _de90(orig)})
        card = await st.store.card(txn_id)
        if card is not None:  # lets the flow route it even if it no longer remembers the original
            req["2"] = card[0]
        del card
        return await _follow_up(st, key, "reversal", orig, txn_id, req, now, orig["amount"],
                                lambda resp: None, lambda: {"status": "reversed"}, request)


async def refund_payment(request: web.Request) -> web.Response:
    st = _state(request)
    key: ApiKey = request[API_KEY]
    amount = validate_followup(await _json_object(request, optional=True), allow_amount=True)
    txn_id = request.match_info["id"]
    async with st.follow_up_lock(txn_id):
        orig = await _original(st, key, txn_id)
        refundable = (orig["type"] == "purchase" and orig["status"] in ("approved", "partially_refunded")) or \
                     (orig["type"] == "authorization" and orig["status"] in ("captured", "partially_refunded"))
        if not refundable:
            raise _conflict(f"a {orig['type']} that is {orig['status']} cannot be refunded "
                            "(refund an approved purchase or a captured authorization)")
        base = orig["captured_amount"] if orig["type"] == "authorization" else orig["amount"]
        remaining = base - (orig["refunded_amount"] or 0)
        amount = remaining if amount is None else amount
        if amount > remaining:
            raise _amount_over("refundable", remaining)
        now = time.time()
        req = await _card_request(st, orig, txn_id, "0200", "200000", amount, now,
                                  "the card data for this transaction is no longer held; refund with the card")

        def refunded():
            total = (orig["refunded_amount"] or 0) + amount
            return {"refunded_amount": total, "status": "refunded" if total >= base else "partially_refunded"}

        return await _follow_up(st, key, "refund", orig, txn_id, req, now, amount,
                                lambda resp: resp.get("38"), refunded, request)


async def capture_payment(request: web.Request) -> web.Response:
    st = _state(request)
    key: ApiKey = request[API_KEY]
    amount = validate_followup(await _json_object(request, optional=True), allow_amount=True)
    txn_id = request.match_info["id"]
    async with st.follow_up_lock(txn_id):
        orig = await _original(st, key, txn_id)
        if orig["type"] != "authorization" or orig["status"] != "approved":
            raise _conflict(f"a {orig['type']} that is {orig['status']} cannot be captured "
                            "(capture an approved authorization once)")
        amount = orig["amount"] if amount is None else amount
        if amount > orig["amount"]:
            raise _amount_over("authorized", orig["amount"])
        now = time.time()
        req = await _card_request(st, orig, txn_id, "0220", "000000", amount, now,
                                  "the card data for this authorization is no longer held; it cannot be captured")
        req.update({"37": orig["iso_rrn"], "90": _de90(orig)})
        if orig["approval_code"]:
            req["38"] = orig["approval_code"]
        return await _follow_up(st, key, "capture", orig, txn_id, req, now, amount,
                                lambda resp: orig["approval_code"],
                                lambda: {"status": "captured", "captured_amount": amount}, request)


# ---------------------------------------------------------------------------
# Transactions

STATUSES = ("approved", "declined", "reversed", "captured", "refunded", "partially_refunded")


def _query_int(q, name: str, default: int, lo: int, hi: int, errors: list[dict]) -> int:
    v = q.get(name)
    if v is None:
        return default
    # one optional sign only: "--5" passed a strip of every "-" and int() raised (a 500)
    digits = v[1:] if v[:1] == "-" else v
    if not v.isascii() or not digits.isdigit() or len(v) > 12 or not lo <= int(v) <= hi:
        errors.append({"field": name, "problem": f"must be an integer from {lo} to {hi}"})
        return default
    return int(v)


def _query_time(q, name: str, errors: list[dict]) -> float | None:
    v = q.get(name)
    if v is None:
        return None
    try:
        d = _dt.datetime.fromisoformat(v.strip().upper().replace("Z", "+00:00"))
    except ValueError:
        errors.append({"field": name, "problem": "must be an RFC 3339 date-time, e.g. 2025-01-31T12:00:00Z"})
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    try:
        return d.timestamp()
    except (OverflowError, ValueError, OSError):
        errors.append({"field": name, "problem": "date-time out of range"})
        return None


async def list_transactions(request: web.Request) -> web.Response:
    st = _state(request)
    key: ApiKey = request[API_KEY]
    q = request.query
    errors: list[dict] = []
    for name in q:
        if name not in ("limit", "offset", "status", "terminal_id", "since", "until"):
            errors.append({"field": _field_name(name), "problem": "unknown query parameter"})
    limit = _query_int(q, "limit", 50, 1, 500, errors)
    offset = _query_int(q, "offset", 0, 0, 1_000_000, errors)
    filters: dict[str, Any] = {}
    status = q.get("status")
    if status is not None:
        if status not in STATUSES:
            errors.append({"field": "status", "problem": f"must be one of {', '.join(STATUSES)}"})
        filters["status"] = status
    terminal = q.get("terminal_id")
    if terminal is not None:
        if not 1 <= len(terminal) <= 8:
            errors.append({"field": "terminal_id", "problem": "must be 1-8 characters"})
        filters["terminal_id"] = terminal
    filters["since"] = _query_time(q, "since", errors)
    filters["until"] = _query_time(q, "until", errors)
    if errors:
        raise invalid(errors)
    if "admin" not in key.scopes:
        filters["owner"] = key.id
    rows = await st.store.list(limit + 1, offset, filters)
    has_more = len(rows) > limit
    rows = rows[:limit]
    return json_response({"data": [public_view(r) for r in rows], "limit": limit, "offset": offset,
                          "has_more": has_more, "next_offset": offset + limit if has_more else None})


async def get_transaction(request: web.Request) -> web.Response:
    st = _state(request)
    rec = await _original(st, request[API_KEY], request.match_info["id"])
    return json_response(public_view(rec))


# ---------------------------------------------------------------------------
# Admin


def acquirer_view(st: ApiState, name: str, link) -> dict:
    from core.health import STATE_NAMES

    h = link.health
    state = STATE_NAMES[h.advance(time.monotonic())] if hasattr(h, "advance") else h.state_name
    return {
        "name": name,
        "up": bool(link.up),
        "draining": bool(getattr(link, "draining", False)),
        "circuit_state": state.lower(),
        "success_ewma": round(float(h.ewma_success), 4),
        "latency_ewma_ms": round(float(h.ewma_latency) * 1000, 3),
        "in_flight": int(link.in_flight),
        "queue_depth": int(st.switch.reversals.depth(name)),
    }


async def list_acquirers(request: web.Request) -> web.Response:
    st = _state(request)
    return json_response({"acquirers": [acquirer_view(st, n, l) for n, l in st.switch.links.items()]})


def _link(st: ApiState, name: str):
    link = st.switch.links.get(name)
    if link is None:
        raise Problem(404, "Not found", "no such acquirer", slug="not-found")
    return link


def _set_draining(request: web.Request, draining: bool) -> web.Response:
    st = _state(request)
    name = request.match_info["name"]
    link = _link(st, name)
    link.draining = draining
    log.warning("acquirer %s %s by API key %s", name, "drained" if draining else "enabled",
                request[API_KEY].name)
    return json_response(acquirer_view(st, name, link))


async def drain_acquirer(request: web.Request) -> web.Response:
    return _set_draining(request, True)


async def enable_acquirer(request: web.Request) -> web.Response:
    return _set_draining(request, False)


async def replace_bin_table(request: web.Request) -> web.Response:
    from core.bintable import BinTable, BinTableError

    st = _state(request)
    body = await _read_body(request, st.settings.max_body)
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise invalid([{"field": "body", "problem": "not UTF-8 text"}]) from None
    try:
        table = await asyncio.to_thread(BinTable.from_csv, io.StringIO(text, newline=""))
    except BinTableError as e:
        raise Problem(400, "Invalid BIN table", f"line {e.line}: {e.msg}", slug="invalid-bin-table",
                      errors=[{"field": f"body line {e.line}", "problem": e.msg}], extra={"line": e.line})
    except (ValueError, TypeError, csv.Error) as e:
        raise Problem(400, "Invalid BIN table", f"unreadable CSV ({type(e).__name__})",
                      slug="invalid-bin-table", errors=[{"field": "body", "problem": "unreadable CSV"}])
    st.switch.router.bins.swap(table)
    log.warning("BIN table replaced by API key %s (%d rows)", request[API_KEY].name, len(table))
    return json_response({"rows": len(table), "generation": st.switch.router.bins.generation})


def _parked_view(e) -> dict:
    # Only bookkeeping: the entry's payload (the reversal's fields, card data
    # included) is never shown. Works with the journal's SfEntry and the
    # older in-memory ReversalEntry.
    created = getattr(e, "created_at", None) or getattr(e, "created", 0.0)
    return {"id": int(e.id), "acquirer": e.acquirer,
            "reason": getattr(e, "parked_reason", None) or getattr(e, "reason", None) or "",
            "attempts": int(e.attempts), "created": _iso_time(created),
            "last_result": getattr(e, "last_error", None) or getattr(e, "last_result", None) or ""}


async def _maybe_await(v):
    return await v if inspect.isawaitable(v) else v


async def list_parked(request: web.Request) -> web.Response:
    st = _state(request)
    rev = st.switch.reversals
    if hasattr(rev, "refresh"):  # the journal-backed queue caches its parked list
        await rev.refresh()
    return json_response({"parked": [_parked_view(e) for e in list(rev.parked)]})


async def requeue_parked(request: web.Request) -> web.Response:
    st = _state(request)
    raw = request.match_info["id"]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise Problem(404, "Not found", "no such parked entry", slug="not-found")
    if not await _maybe_await(st.switch.reversals.requeue_parked(int(raw))):
        raise Problem(404, "Not found", "no such parked entry", slug="not-found")
    log.warning("parked reversal %s re-queued by API key %s", raw, request[API_KEY].name)
    return json_response({"id": int(raw), "requeued": True})


async def admin_stats(request: web.Request) -> web.Response:
    st = _state(request)
    sw = st.switch
    now = time.time()
    snap = st.metrics.live.snapshot(now)
    # one count per second for the last window, oldest first, gaps as 0
    counts = {p["t"]: p["count"] for p in snap.pop("per_second")}
    sec = int(now)
    snap["per_second"] = [counts.get(t, 0) for t in range(sec - snap["window_seconds"], sec)]
    recent = []
    for row in list(st.metrics.live.recent)[:25]:
        row = dict(row)
        row["currency"] = NUMERIC_TO_ALPHA.get(row.get("currency"), row.get("currency"))
        recent.append(row)
    flow = getattr(sw, "flow", None)
    return json_response({
        "time": _iso_time(time.time()),
        "uptime_s": round(time.time() - st.started, 1),
        **snap,
        "acquirers": [acquirer_view(st, n, l) for n, l in sw.links.items()],
        "listeners": [{"name": l.cfg.name, "in_flight": l.in_flight} for l in sw.listeners],
        "parked": sw.reversals.parked_count,
        "late_responses": getattr(sw, "late_responses", 0),
        "flow": {k: v for k, v in (flow.counters.items() if flow is not None else ())},
        "recent": recent,
    })


# ---------------------------------------------------------------------------
# Operational


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    st = _state(request)
    links = st.switch.links
    up = [n for n, l in links.items() if l.up and not getattr(l, "draining", False)]
    problem = getattr(st.switch.journal, "problem", lambda: None)()
    ready = bool(up) and problem is None
    body = {"ready": ready, "acquirers_up": len(up), "acquirers": len(links),
            "journal": "ok" if problem is None else problem}
    return json_response(body, status=200 if ready else 503)


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_state(request).openapi, content_type="application/json")


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = _state(request).metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(body=_state(request).dashboard, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store",
                                 "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                            "style-src 'unsafe-inline'; connect-src 'self'",
                                 "X-Frame-Options": "DENY"})


# ---------------------------------------------------------------------------
# Factory


def make_app(switch, *, keys: ApiKeyStore, store: TransactionStore | None = None, webhooks=None,
             metrics: Metrics | None = None, settings: ApiSettings | None = None) -> web.Application:
    settings = settings or ApiSettings()
    metrics = metrics or Metrics()
    store = store if store is not None else MemoryTransactionStore()
    app = web.Application(middlewares=[problem_middleware, auth_middleware, idempotency_middleware],
                          client_max_size=settings.max_body)
    app[API_STATE] = ApiState(switch, keys, store, webhooks, metrics, settings)
    r = app.router
    r.add_post("/v1/payments", create_payment)
    r.add_post("/v1/payments/{id}/reverse", reverse_payment)
    r.add_post("/v1/payments/{id}/refund", refund_payment)
    r.add_post("/v1/payments/{id}/capture", capture_payment)
    r.add_get("/v1/transactions", list_transactions)
    r.add_get("/v1/transactions/{id}", get_transaction)
    r.add_get("/v1/admin/acquirers", list_acquirers)
    r.add_post("/v1/admin/acquirers/{name}/drain", drain_acquirer)
    r.add_post("/v1/admin/acquirers/{name}/enable", enable_acquirer)
    r.add_put("/v1/admin/bin-table", replace_bin_table)
    r.add_get("/v1/admin/store-and-forward/parked", list_parked)
    r.add_post("/v1/admin/store-and-forward/{id}/requeue", requeue_parked)
    r.add_get("/v1/admin/stats", admin_stats)
    r.add_get("/openapi.json", openapi)
    r.add_get("/metrics", metrics_endpoint)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/dashboard", dashboard)
    return app


async def start_api(switch, api_cfg=None, *, keys: ApiKeyStore, store: TransactionStore | None = None,
                    webhooks=None, metrics: Metrics | None = None, settings: ApiSettings | None = None,
                    ssl_context=None):
    """Serve the API on ``api_cfg.host:port`` (HTTPS when ``api_cfg.tls``) in this event loop.

    Returns the started ``switch.api.fasthttp.ApiServer`` (``await
    server.cleanup()`` stops it; ``server.app`` is the aiohttp application);
    ``bound_port(server)`` is the real port when ``api_cfg.port`` is 0.
    POST /v1/payments is served by the lean HTTP path, everything else by
    aiohttp (see ``switch.api.fasthttp``).
    """
    from switch import certs
    from switch.api.fasthttp import KEEPALIVE_TIMEOUT, ApiServer

    api_cfg = api_cfg if api_cfg is not None else switch.config.api
    settings = settings or ApiSettings()
    load_seen = getattr(store, "load_seen", None)
    if load_seen is not None:
        n = await load_seen(time.time() - settings.idempotency_window)
        if n:
            log.info("REST API: %d journaled Idempotency-Keys loaded", n)
    if webhooks is not None and store is not None:
        # before the API serves: a lost payment event goes ahead of its follow-ups' events
        try:
            await recover_webhooks(store, webhooks, settings)
        except Exception as exc:  # the API still serves; the operator must know what may be missing
            log.error("webhooks: start-up recovery of events a crash may have lost failed (%s); their "
                      "transactions are in the journal (GET /v1/transactions)", exc)
    if ssl_context is None and api_cfg.tls:
        if api_cfg.dev_pki:
            await asyncio.to_thread(certs.ensure_dev_pki, switch.config.switch.state_dir)
        # a client_ca turns on mutual TLS; without one, API keys authenticate
        ssl_context = certs.server_context(api_cfg.cert, api_cfg.key, api_cfg.client_ca)
    app = make_app(switch, keys=keys, store=store, webhooks=webhooks, metrics=metrics, settings=settings)
    if hasattr(store, "prune_keys"):
        pruning = asyncio.get_running_loop().create_task(_prune_keys(store, settings.idempotency_window),
                                                         name="api-idempotency-keys-prune")

        async def stop_pruning(_app) -> None:
            pruning.cancel()
            await asyncio.gather(pruning, return_exceptions=True)
        app.on_cleanup.append(stop_pruning)
    if getattr(keys, "path", None) is not None:
        watching = asyncio.get_running_loop().create_task(_watch_keys(keys), name="api-key-file-watch")

        async def stop_watching(_app) -> None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        app.on_cleanup.append(stop_watching)
    async def stop_requeue(app_) -> None:
        task = app_[API_STATE].requeue_task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    app.on_cleanup.append(stop_requeue)
    # aiohttp 3.14 keeps an idle connection (or one still sending its head)
    # for an hour by default; the lean path's limit applies to both
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=KEEPALIVE_TIMEOUT)
    await runner.setup()
    st: ApiState = app[API_STATE]
    server = ApiServer(runner, serve_payment, st, st.settings.max_body, st.settings.request_timeout)
    try:
        await server.start(api_cfg.host, api_cfg.port, ssl_context)
    except BaseException:
        await runner.cleanup()
        raise
    log.info("REST API listening on %s:%d (%s)", api_cfg.host, bound_port(server),
             "https" if ssl_context is not None else "http")
    return server


# How far before the newest event in the outbox start-up recovery looks for
# records whose event a crash lost, beyond a request's whole life (2 x the
# API timeout + 5 s, as for a follow-up's lease): a journal stalled that much
# longer just before the crash, or the wall clock stepped back.
WEBHOOK_RECOVERY_SLACK = 60.0
WEBHOOK_RECOVERY_PAGE = 1000


async def recover_webhooks(store, webhooks, settings: ApiSettings, *, since: float | None = None,
                           cause: str = "a crash lost") -> int:
    """Queue the webhook event of every API record that has none (start-up,
    before the API serves): the record and its outcome are journaled, then
    the event is written to the outbox, a second database, and a crash
    between the two left a payment or follow-up its receiver never hears of.

    Only this outbox's records (``WEBHOOK_ORIGIN``: not those made with
    webhooks off, nor another switch process's on a shared PostgreSQL
    journal, which has its own outbox) finished since the newest event
    here, less a request's whole life and ``WEBHOOK_RECOVERY_SLACK``
    (``WebhookSender.recovery_since``): the scan is bounded by recent
    traffic, not by the journal's size. Each record's event is queued once
    (the outbox's unique record id: a second run, or a second process on
    the same outbox, adds nothing), in the records' order, so a payment's
    event goes before its follow-ups'. Returns how many were queued.

    ``since`` (epoch seconds): look from a request's whole life and
    ``WEBHOOK_RECOVERY_SLACK`` before it instead (events the outbox refused
    while running, ``_requeue_lost_events``); ``cause`` is for the log line."""
    scan = getattr(store, "scan", None)
    origin = getattr(webhooks, "origin", None)
    if scan is None or origin is None:  # an in-memory store: nothing outlives a crash
        return 0
    margin = 2 * settings.timeout + 5.0 + WEBHOOK_RECOVERY_SLACK
    since = await webhooks.recovery_since(margin) if since is None else since - margin
    lost: list[tuple[str, str, str, dict]] = []
    after, scanned = None, 0
    while True:
        page = await scan(since, after, WEBHOOK_RECOVERY_PAGE)
        if not page:
            break
        scanned += len(page)
        after = (page[-1][1], page[-1][0])
        mine = {api_id: rec for api_id, _ts, rec in page
                if rec.get(WEBHOOK_ORIGIN) == origin and rec.get("approved") is not None}
        if mine:
            absent = await webhooks.absent(list(mine))
            lost.extend((api_id, *_webhook_event(rec)) for api_id, rec in mine.items() if api_id in absent)
        if len(page) < WEBHOOK_RECOVERY_PAGE:
            break
    n = await webhooks.enqueue_recovered(lost)
    if n:
        log.warning("webhooks: %d %s whose event %s queued (records since %s looked at: %d)",
                    n, "transaction" if n == 1 else "transactions", cause, _iso_time(since), scanned)
    return n


KEY_FILE_CHECK_S = 1.0  # how soon a key created or revoked with the command line takes effect


async def _watch_keys(keys: ApiKeyStore) -> None:
    """The API key file is read again whenever it changes (one stat a second):
    ``python -m switch.api.auth revoke`` ends a key in the running switch, not
    at its next restart, and a key just created works at once."""
    while True:
        await asyncio.sleep(KEY_FILE_CHECK_S)
        try:
            if keys.refresh():
                log.warning("REST API: API key file changed; %d keys in force", len(keys.keys()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # ApiKeyError names the file and the problem, never a key
            log.error("REST API: API key file not reloaded, the keys read before stay in force: %s", exc)


async def _prune_keys(store, window: float) -> None:
    """Journaled Idempotency-Keys past their window are deleted (hourly, or at
    a tenth of a shorter window): the table, and the filter rebuilt from it at
    start, stay bounded by the window instead of growing for good."""
    while True:
        try:
            n = await store.prune_keys(time.time() - window)
            if n:
                log.info("REST API: %d Idempotency-Keys past their %g h window deleted", n, window / 3600)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("REST API: pruning Idempotency-Keys failed", exc_info=True)
        await asyncio.sleep(min(3600.0, max(1.0, window / 10)))


def bound_port(server) -> int:
    """The port an API server (or an aiohttp runner) listens on."""
    return server.addresses[0][1]
