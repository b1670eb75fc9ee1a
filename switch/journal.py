"""The transaction journal and the durable store-and-forward queue.

Two backends with identical behaviour behind one abstract :class:`Journal`:

* :class:`SqliteJournal` -- the embedded default for one process. WAL mode;
  every write goes through ONE writer child process (:mod:`switch.journal_writer`)
  that commits whatever is waiting as one transaction (group commit). A
  caller's ``await`` returns only after the commit holding its write is
  durable (``synchronous=FULL`` by default). Point reads on the hot path
  (``find_duplicate``, ``get``) run synchronously on the event loop thread
  on their own read connection (a few microseconds, cheaper than a thread
  hop); range queries run on a second read connection in a worker thread.
* :class:`PostgresJournal` -- several switch processes sharing one database
  (asyncpg pool). Store-and-forward entries are claimed with
  ``SELECT ... FOR UPDATE SKIP LOCKED`` so no entry is handed to two workers.

DESIGN.md invariants served here: 2 (journal before forward, outcome before
answer: every ``record_*`` returns after commit), 4 (durable FIFO queue,
retry with backoff, parking), 5 (late responses journaled), 6 (duplicate
detection and replay), 7 (crash recovery queues reversals exactly once).

Card data (DESIGN.md "Card data"):

* the clear PAN lives only in memory (``TxnRecord.pan``); rows carry the
  masked PAN (at most BIN + last 4) and an HMAC-SHA256 fingerprint keyed
  with the key file's fingerprint key -- never a plain hash;
* track data (DE35/DE45/DE36), PIN blocks (DE52) and ICC data (DE55) are
  dropped from everything the journal is given, before serialization: they
  are never stored, not even encrypted;
* the fields a reversal needs (which include DE2 and DE14) are stored only as
  AES-256-GCM ciphertext (msgpack, then :meth:`KeyRing.encrypt`, associated
  data binding the blob to its row), and deleted as soon as they are not
  needed: when the outcome is known, or when the reversal is queued (the
  queue entry holds its own ciphertext, deleted on acknowledgement);
* the response kept for replay is sanitized (DE2 masked, DE14/35/36/45/52/55
  removed) and stored as msgpack.

Crash recovery (invariant 7): every row carries the ``boot_id`` of the
journal instance that wrote it and that instance's ``node_id``; each live
instance keeps a heartbeat row in ``journal_node``. A forwarded transaction
without a known acquirer outcome and without a queued reversal belongs to a
dead instance when its boot is not this one and either the boot has no fresh
heartbeat or it has the same ``node_id`` as this instance (a restarted node
replaces its previous incarnation). :meth:`Journal.recover_and_enqueue`
queues a reversal for each such row and marks it in the same transaction,
so a second call (or a second node racing on PostgreSQL) queues nothing.
"""
from __future__ import annotations

import abc
import asyncio
import functools
import hmac
import logging
import os
import re
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from switch.keys import DecryptError, KeyRing
from switch.logs import RateLimitedLog
from switch.messages import is_advice_mti, mask_pan

log = logging.getLogger("isoswitch.journal")

__all__ = [
    "DuplicateTransaction",
    "Journal",
    "JournalError",
    "OutcomeTooLate",
    "PostgresJournal",
    "SfEntry",
    "SqliteJournal",
    "TxnRecord",
    "make_journal",
    "sanitize_fields",
    "sanitize_replay",
    "stan_block_range",
]

# Sensitive authentication data: never stored, not even encrypted (PCI DSS 3.3.1).
# 35/36/45 track 2/3/1, 52 PIN block, 55 ICC data (may hold track-2 equivalent, tag 57).
NEVER_STORED = frozenset({"35", "36", "45", "52", "55"})
# A response kept for replay also loses the expiry date; DE2 is masked.
NOT_REPLAYED = NEVER_STORED | {"14"}

TXN_STATES = ("received", "forwarded", "timeout", "done", "unknown", "abandoned")
SF_KINDS = ("reversal", "advice")
# last_error of an entry ended unsent (sf_cancel_unsent, sf_cancel_parked)
SF_CANCELLED = "cancelled: "

DEFAULT_STALE_AFTER = 30.0  # seconds without heartbeat before a node counts as dead
# While writes fail for want of storage (a full disk, a database that does not
# answer), the journal tries a write of its own this often, so it finds out
# that writes work again even with no traffic (a load balancer that believed
# /readyz sends none).
WRITE_PROBE_S = 1.0
# ... with a row this large in SQLite: it needs several new pages (overflow
# pages, with SQLite's default 4 KiB pages), which a row or two of a
# transaction needs too; written and deleted in one commit.
PROBE_BYTES = 16384


class JournalError(Exception):
    """The journal could not do what was asked (closed, storage failure, unknown row)."""


class OutcomeTooLate(JournalError):
    """``record_outcome`` with ``deliver_by``: the write would have landed after it, so
    nothing was journaled (neither the outcome nor what was attached to it)."""


class DuplicateTransaction(JournalError):
    """``record_received`` for a (terminal, STAN, transmission time, MTI) already journaled."""

    def __init__(self, terminal_id: str, terminal_stan: str, terminal_tx_time: str, mti: str):
        self.key = (terminal_id, terminal_stan, terminal_tx_time, mti)
        super().__init__(f"duplicate transaction: terminal {terminal_id} STAN {terminal_stan} "
                         f"DE7 {terminal_tx_time} MTI {mti}")


@dataclass
class TxnRecord:
    """A request as received from a terminal. ``pan`` is clear and stays in memory only."""

    listener: str
    terminal_id: str
    terminal_stan: str
    terminal_tx_time: str  # DE7
    mti: str
    rrn: str | None = None
    amount: int | None = None  # DE4, minor units
    currency: str | None = None  # DE49
    pan: str | None = field(default=None, repr=False)
    proc_code: str | None = None  # DE3
    received_at: float = field(default_factory=time.time)


@dataclass
class SfEntry:
    """A store-and-forward entry. ``payload`` is decrypted only by ``sf_claim``."""

    id: int
    acquirer: str
    kind: str
    txn_id: int | None
    state: str  # queued | parked | acked
    created_at: float
    next_at: float
    attempts: int
    claims: int
    last_error: str | None = None
    lease_owner: str | None = None
    lease_until: float | None = None
    parked_reason: str | None = None
    parked_at: float | None = None
    acked_at: float | None = None
    # claims that may have put it on the wire: attempts written to the link
    # (answered, or outcome unknown), and claims that ended without a report
    # (the worker died holding the lease). An attempt that certainly never
    # left the switch (NotSent) counts in ``attempts`` only.
    sent: int = 0
    lease_boot: str | None = None  # the journal boot (process) holding the lease
    # DE11 (link trace number) and DE7 of the first attempt about to be
    # written: every later attempt carries them again, so a repeat (0401,
    # x221) is the same message as the one the acquirer may have seen
    wire_stan: str | None = None
    wire_time: str | None = None
    # an operator's requeue (``sf_requeue``) gives a parked entry its limits
    # afresh: its age counts from ``requeued_at``, its attempts on the wire
    # from ``requeued_sent`` (``sent`` itself stays: it still goes as a repeat)
    requeued_at: float | None = None
    requeued_sent: int = 0
    payload: dict | None = field(default=None, repr=False)

    @property
    def repeat(self) -> bool:
        """True when this entry may have been sent before (a reversal goes as 0401).

        Attempts that never left the switch (link down, not connected) do not
        count: the first reversal the acquirer can have seen goes as 0400."""
        return self.sent > 0

    @property
    def parked(self) -> bool:
        return self.state == "parked"

    @property
    def limits_from(self) -> float:
        """When the age limit started counting: queued, or last requeued."""
        return self.created_at if self.requeued_at is None else float(self.requeued_at)

    @property
    def sent_since_requeue(self) -> int:
        """Claims that may have reached the link since the limits last started counting."""
        return self.sent - (self.requeued_sent or 0)


# --------------------------------------------------------------------------
# Sanitizing what the journal is given


# String keys that may be kept as they are: the MTI, the bitmap and every
# field number except the ones that are dropped. A dict whose keys all are in
# here needs no rebuilding (one C-level subset test on the hot path).
_KEEPABLE = frozenset({"t", "p", "h", *(str(i) for i in range(1, 193))})
_STORABLE_KEYS = _KEEPABLE - NEVER_STORED
_REPLAYABLE_KEYS = _KEEPABLE - NOT_REPLAYED


def sanitize_fields(fields: dict | None) -> dict:
    """Field dict with string keys and no sensitive authentication data (35/36/45/52/55).

    May return ``fields`` itself when there is nothing to change."""
    if not fields:
        return {}
    if _STORABLE_KEYS.issuperset(fields):
        return fields
    return {k: v for k, v in zip(map(str, fields), fields.values()) if k not in NEVER_STORED}


def sanitize_replay(doc: dict | None) -> dict:
    """A response safe to keep for replay: DE2 masked, DE14/35/36/45/52/55 removed."""
    if not doc:
        return {}
    if _REPLAYABLE_KEYS.issuperset(doc):
        out = dict(doc)
    else:
        out = {k: v for k, v in zip(map(str, doc), doc.values()) if k not in NOT_REPLAYED}
    pan = out.get("2")
    if pan is not None:
        out["2"] = mask_pan(pan if isinstance(pan, str) else str(pan))
    return out


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# The hot path's packer (event-loop thread only: a Packer is not shared
# across threads): packb builds a Packer per call, twice the cost.
_pack_on_loop = msgpack.Packer(use_bin_type=True).pack


def _unpack(b: bytes | None) -> Any:
    if b is None:
        return None
    return msgpack.unpackb(bytes(b), raw=False, strict_map_key=False)


def _txn_aad(txn_id: int) -> bytes:
    return b"isoswitch/txn/%d" % txn_id


def _txn_key_aad(terminal_id, terminal_stan, terminal_tx_time, mti) -> bytes:
    """Binds reversal fields written with the row's insert to its unique terminal key
    (the row id is not known before the insert, and one statement is cheaper than two)."""
    return f"isoswitch/txnkey/{terminal_id}/{terminal_stan}/{terminal_tx_time}/{mti}".encode()


def _api_card_aad(api_id: str) -> bytes:
    return b"isoswitch/api-card/" + str(api_id).encode("utf-8")


def api_merge(doc_blob: bytes, changes: dict) -> tuple[bytes, str, bool]:
    """(new doc, its status, drop the card?) for an API record update (both backends)."""
    doc = _unpack(doc_blob)
    doc.update(changes)
    status = str(doc.get("status"))
    return _pack(doc), status, status in API_CARD_DONE


def _sf_aad(acquirer: str, kind: str, txn_id: int | None) -> bytes:
    return b"isoswitch/sf/" + acquirer.encode("utf-8") + b"/" + kind.encode("ascii") + b"/" + (
        b"-" if txn_id is None else b"%d" % txn_id)


def _txn_tuple(txn: "TxnRecord") -> tuple:
    """A TxnRecord as the tuple the writer process rebuilds it from (dataclass field order)."""
    return (txn.listener, str(txn.terminal_id), str(txn.terminal_stan), str(txn.terminal_tx_time),
            str(txn.mti), txn.rrn, None if txn.amount is None else int(txn.amount), txn.currency,
            None if txn.pan is None else str(txn.pan), txn.proc_code, float(_ts(txn.received_at)))


def owner_only_file(path: Path) -> None:
    """Create the SQLite file ``path`` (empty: a valid empty database) readable
    by its owner only, unless it exists. SQLite gives its -wal and -shm files
    the database file's permissions. The journal holds no card data in clear
    (ciphertext, HMAC fingerprints, masked PANs); owner-only all the same, as
    the key file is, rather than the umask's world-readable default."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass


def _page(limit, offset) -> tuple[int, int]:
    """LIMIT and OFFSET for a query, the same on both backends: SQLite reads a
    negative LIMIT as none and a negative OFFSET as 0, PostgreSQL refuses them."""
    limit, offset = int(limit), int(offset)
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0, got {limit} and {offset}")
    return limit, offset


def _ts(v: Any) -> float | None:
    """Epoch seconds from a float/int/datetime (None stays None)."""
    if v is None:
        return None
    if hasattr(v, "timestamp"):
        return float(v.timestamp())
    return float(v)


# --------------------------------------------------------------------------
# SQL shared by both backends (written with ? placeholders; PostgreSQL gets $n)

_SCHEMA_SQLITE = """
CREATE TABLE IF NOT EXISTS journal_meta (
    k TEXT PRIMARY KEY,
    v TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS journal_node (
    boot_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    stan_block INTEGER                       -- the trace-number block this instance holds (PostgreSQL)
);
CREATE TABLE IF NOT EXISTS txn (
    id INTEGER PRIMARY KEY,
    listener TEXT,
    terminal_id TEXT NOT NULL,
    terminal_stan TEXT NOT NULL,
    terminal_tx_time TEXT NOT NULL,
    mti TEXT NOT NULL,
    rrn TEXT,
    amount BIGINT,
    currency TEXT,
    pan_masked TEXT,
    pan_fingerprint TEXT,
    proc_code TEXT,
    received_at REAL NOT NULL,
    node_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    state TEXT NOT NULL,
    acquirer TEXT,
    link_stan TEXT,
    forwarded_at REAL,
    reversal_fields BLOB,
    timed_out_at REAL,
    response_code TEXT,
    approval_code TEXT,
    response_doc BLOB,
    latency_ms REAL,
    completed_at REAL,
    late_response_code TEXT,
    late_response_at REAL,
    reversal_queued INTEGER NOT NULL DEFAULT 0,
    -- the retransmission key (DESIGN.md #6); transmission time first so new
    -- keys land at the index's right edge instead of on random pages
    UNIQUE (terminal_tx_time, terminal_id, terminal_stan, mti)
);
CREATE INDEX IF NOT EXISTS txn_rrn ON txn (rrn);
CREATE INDEX IF NOT EXISTS txn_terminal ON txn (terminal_id, received_at);
CREATE INDEX IF NOT EXISTS txn_received ON txn (received_at);
CREATE INDEX IF NOT EXISTS txn_link ON txn (acquirer, link_stan);
-- No index on pan_fingerprint: nothing queries by card yet, and a random
-- 64-character key cost about 10 us per journaled transaction (bench.journal).
DROP INDEX IF EXISTS txn_pan_fp;
CREATE INDEX IF NOT EXISTS txn_unresolved ON txn (id)
    WHERE forwarded_at IS NOT NULL AND reversal_queued = 0
      AND (response_code IS NULL OR timed_out_at IS NOT NULL);
CREATE INDEX IF NOT EXISTS txn_open ON txn (id) WHERE state = 'received';
CREATE TABLE IF NOT EXISTS sf_queue (
    id INTEGER PRIMARY KEY,
    acquirer TEXT NOT NULL,
    kind TEXT NOT NULL,
    txn_id BIGINT,
    payload BLOB,
    state TEXT NOT NULL DEFAULT 'queued',
    created_at REAL NOT NULL,
    next_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    claims INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    lease_owner TEXT,
    lease_until REAL,
    parked_reason TEXT,
    parked_at REAL,
    acked_at REAL,
    sent INTEGER NOT NULL DEFAULT 0,
    lease_boot TEXT,
    wire_stan TEXT,
    wire_time TEXT,
    requeued_at REAL,
    requeued_sent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sf_due ON sf_queue (acquirer, id) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS sf_parked ON sf_queue (id) WHERE state = 'parked';
CREATE INDEX IF NOT EXISTS sf_txn ON sf_queue (txn_id);
-- The REST API's transactions (switch.api): the record as the API shows it
-- (masked PAN, never card data) and, for a payment that may still be
-- reversed, refunded or captured, AES-GCM ciphertext of PAN|expiry bound to
-- the row id (deleted once the payment is reversed or fully refunded).
CREATE TABLE IF NOT EXISTS api_txn (
    id TEXT PRIMARY KEY,
    owner TEXT,
    status TEXT NOT NULL,
    terminal_id TEXT,
    created_ts REAL NOT NULL,
    parent_id TEXT,
    doc BLOB NOT NULL,
    card BLOB
);
CREATE INDEX IF NOT EXISTS api_txn_created ON api_txn (created_ts);
-- Idempotency keys of POST /v1/payments, written with the payment's record so
-- a client's retry after a restart (or on another switch process) is answered
-- with that payment, never charged again
CREATE TABLE IF NOT EXISTS api_idem (
    owner TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    api_id TEXT,
    created_ts REAL NOT NULL,
    PRIMARY KEY (owner, idem_key)
);
-- A payment's follow-ups (reverse, refund, capture) one at a time across the
-- switch processes sharing a PostgreSQL journal: a lease per payment, taken
-- over once its holder is stale (SQLite has one process: its own lock does)
CREATE TABLE IF NOT EXISTS api_lock (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS late_response (
    id INTEGER PRIMARY KEY,
    acquirer TEXT NOT NULL,
    link_stan TEXT NOT NULL,
    response_code TEXT,
    txn_id BIGINT,
    received_at REAL NOT NULL,
    sf_id BIGINT,
    mti TEXT
);
"""


def _pg_schema() -> str:
    s = _SCHEMA_SQLITE.replace("INTEGER PRIMARY KEY", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
    s = re.sub(r"\bREAL\b", "DOUBLE PRECISION", s)
    s = re.sub(r"\bBLOB\b", "BYTEA", s)
    # SQLite prunes api_idem in rowid (insertion) order; PostgreSQL has no rowid
    s += "CREATE INDEX IF NOT EXISTS api_idem_created ON api_idem (created_ts);\n"
    return s


SCHEMA_VERSION = "1"

# Columns added to sf_queue after its first release: (name, type, statement
# run once when the column is added to an existing database). An entry that
# was attempted or claimed more than once before the upgrade may have been
# sent: it keeps going as a repeat.
SF_ADDED_COLUMNS = (
    ("sent", "INTEGER NOT NULL DEFAULT 0", "UPDATE sf_queue SET sent = 1 WHERE attempts > 0 OR claims > 1"),
    ("lease_boot", "TEXT", None),
    ("wire_stan", "TEXT", None),
    ("wire_time", "TEXT", None),
    ("requeued_at", "REAL", None),
    ("requeued_sent", "INTEGER NOT NULL DEFAULT 0", None),
)
# late_response: the store-and-forward entry a late answer is to, and its MTI
LATE_ADDED_COLUMNS = (
    ("sf_id", "BIGINT", None),
    ("mti", "TEXT", None),
)
# journal_node: the trace-number block each instance holds (claim_stan_block)
NODE_ADDED_COLUMNS = (
    ("stan_block", "INTEGER", None),
)
ADDED_COLUMNS = (("sf_queue", SF_ADDED_COLUMNS), ("late_response", LATE_ADDED_COLUMNS),
                 ("journal_node", NODE_ADDED_COLUMNS))
# Run once the added columns exist (an older journal lacks them when the schema runs)
SCHEMA_AFTER_COLUMNS = (
    # a late answer to a queued reversal or advice is found by the trace number it went out under
    "CREATE INDEX IF NOT EXISTS sf_wire ON sf_queue (acquirer, wire_stan) WHERE wire_stan IS NOT NULL",
)

TXN_COLS = (
    "id", "listener", "terminal_id", "terminal_stan", "terminal_tx_time", "mti", "rrn", "amount",
    "currency", "pan_masked", "pan_fingerprint", "proc_code", "received_at", "node_id", "boot_id",
    "state", "acquirer", "link_stan", "forwarded_at", "timed_out_at", "response_code",
    "approval_code", "response_doc", "latency_ms", "completed_at", "late_response_code",
    "late_response_at", "reversal_queued",
)
_TXN_SELECT = ("SELECT " + ", ".join(TXN_COLS)
               + ", reversal_fields IS NOT NULL AS has_reversal_fields FROM txn")
SF_COLS = ("id", "acquirer", "kind", "txn_id", "state", "created_at", "next_at", "attempts", "claims",
           "last_error", "lease_owner", "lease_until", "parked_reason", "parked_at", "acked_at", "sent",
           "lease_boot", "wire_stan", "wire_time", "requeued_at", "requeued_sent")
_SF_SELECT = "SELECT " + ", ".join(SF_COLS) + " FROM sf_queue"

SQL_INSERT_TXN = (
    "INSERT INTO txn (listener, terminal_id, terminal_stan, terminal_tx_time, mti, rrn, amount, "
    "currency, pan_masked, pan_fingerprint, proc_code, received_at, node_id, boot_id, state) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'received') "
    "ON CONFLICT (terminal_id, terminal_stan, terminal_tx_time, mti) DO NOTHING RETURNING id"
)
# The hot path: received and forwarded in one statement (reversal fields bound
# to the terminal key, see _txn_key_aad)
SQL_INSERT_FWD = (
    "INSERT INTO txn (listener, terminal_id, terminal_stan, terminal_tx_time, mti, rrn, amount, "
    "currency, pan_masked, pan_fingerprint, proc_code, received_at, node_id, boot_id, state, "
    "acquirer, link_stan, forwarded_at, reversal_fields) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'forwarded', ?, ?, ?, ?) "
    "ON CONFLICT (terminal_id, terminal_stan, terminal_tx_time, mti) DO NOTHING RETURNING id"
)
# The SQLite writer's batched form of SQL_INSERT_FWD (journal_writer.WriterCore._run_batch):
# explicit ids, no RETURNING (executemany returns no rows)
SQL_INSERT_FWD_ID = (SQL_INSERT_FWD.replace("INSERT INTO txn (", "INSERT INTO txn (id, ", 1)
                     .replace("VALUES (", "VALUES (?, ", 1).replace(" RETURNING id", ""))
SQL_NEXT_TXN_ID = "SELECT coalesce(max(id), 0) + 1 FROM txn"
# A failover re-forwards to the next acquirer: allowed while no outcome and no timeout.
SQL_FORWARDED = (
    "UPDATE txn SET state = 'forwarded', acquirer = ?, link_stan = ?, forwarded_at = ?, "
    "reversal_fields = ? WHERE id = ? AND response_code IS NULL AND timed_out_at IS NULL "
    "AND reversal_queued = 0"
)
# Encrypted reversal fields are kept only while a reversal may still be needed
# and is not queued yet (the queue entry holds its own copy).
# Not on a row crash recovery reversed ('unknown'): a process taken for dead
# (PostgreSQL: no fresh heartbeat) whose flow then answers would tell the
# terminal what a peer's reversal is undoing; its write fails instead (the
# flow answers 96, and its own reversal is the one already queued).
SQL_OUTCOME = (
    "UPDATE txn SET state = 'done', response_code = ?, approval_code = ?, response_doc = ?, "
    "latency_ms = ?, completed_at = ?, reversal_fields = CASE WHEN timed_out_at IS NOT NULL "
    "AND reversal_queued = 0 THEN reversal_fields ELSE NULL END WHERE id = ? AND state <> 'unknown'"
)
# PostgreSQL's SQL_OUTCOME with a deadline (SQLite's writer checks its own
# clock): -1, nothing written, when it runs at or after $7 -- judged on the
# caller's clock ($5, read as the statement is sent) plus the time the
# statement spent in the server (lock waits), so the database's own clock,
# which may disagree with the switch host's, never decides.
SQL_OUTCOME_BY_PG = (
    "WITH late AS (SELECT $7::float8 <= $5::float8 + extract(epoch FROM clock_timestamp() - "
    "statement_timestamp())::float8 AS v), "
    "u AS (UPDATE txn SET state = 'done', response_code = $1, approval_code = $2, response_doc = $3, "
    "latency_ms = $4, completed_at = $5, reversal_fields = CASE WHEN timed_out_at IS NOT NULL "
    "AND reversal_queued = 0 THEN reversal_fields ELSE NULL END WHERE id = $6 AND state <> 'unknown' "
    "AND NOT (SELECT v FROM late) RETURNING 1) "
    "SELECT CASE WHEN (SELECT v FROM late) THEN -1 ELSE (SELECT count(*) FROM u)::int END"
)
SQL_TIMEOUT = (
    "UPDATE txn SET state = CASE WHEN state = 'done' THEN state ELSE 'timeout' END, "
    "timed_out_at = ? WHERE id = ? AND timed_out_at IS NULL"
)
# A late answer belongs to what this process last sent under that link STAN
# (a link's memory of timed-out STANs is its own, and each process numbers
# its links itself): a store-and-forward entry's attempt (reversal, advice
# repeat: the queue's own trace numbers) or a transaction this boot forwarded
# recently. The newest row with that STAN alone named an unrelated
# transaction -- a queued reversal's STAN, another process's, or one from
# before the STANs wrapped (every 999,999 messages).
SQL_LATE_FIND = ("SELECT id FROM txn WHERE acquirer = ? AND link_stan = ? AND boot_id = ? AND forwarded_at >= ? "
                 "ORDER BY id DESC LIMIT 1")
SQL_LATE_FIND_SF = ("SELECT id, txn_id, kind FROM sf_queue WHERE acquirer = ? AND wire_stan = ? AND kind IN (?, ?) "
                    "AND (state <> 'acked' OR acked_at >= ?) ORDER BY id DESC LIMIT 1")
SQL_LATE_TXN = "UPDATE txn SET late_response_code = ?, late_response_at = ? WHERE id = ?"
SQL_LATE_INSERT = ("INSERT INTO late_response (acquirer, link_stan, response_code, txn_id, received_at, sf_id, mti) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)")
# How long after its forwarding (or its entry's acknowledgement) a late answer
# can still be matched: hosts answer late within seconds or minutes, and a
# row older than this can only share the STAN by a wrap-around.
LATE_MATCH_WINDOW_S = 3600.0


def late_match_kinds(mti: str | None) -> tuple[tuple[str, ...], bool]:
    """(store-and-forward kinds a late answer of response MTI ``mti`` may be to,
    whether it may be to a forwarded transaction). A reversal's answer (x4xx)
    is to a queue entry only (a terminal's reversal is sent by the queue); an
    advice's (x130/x230) to a queued advice first; anything else to a
    forwarding. Without an MTI: a queue entry first (its trace number is
    newer than any forwarding's that could share it)."""
    if not mti or len(mti) != 4:
        return SF_KINDS, True
    if mti[1] == "4":
        return ("reversal",), False
    if mti[2] == "3":
        return ("advice",), True
    return (), True
SQL_FIND_DUP = ("SELECT id, state, response_code, response_doc FROM txn WHERE terminal_id = ? "
                "AND terminal_stan = ? AND terminal_tx_time = ? AND mti = ?")
# wire_stan/wire_time given when an attempt before the queue's may have
# reached the acquirer (an advice the flow sent): its repeats carry them again
SQL_SF_INSERT = ("INSERT INTO sf_queue (acquirer, kind, txn_id, payload, state, created_at, next_at, wire_stan, "
                 "wire_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id")
# An answer journaled before its reversal was queued (journaled too late to
# be delivered, or its write reported failed after all) is not what the
# terminal heard, and it is being undone: a retransmission must not get it
# replayed (94 instead). The 91 journaled after a timeout is what it heard.
SQL_SF_MARK_TXN = ("UPDATE txn SET reversal_queued = 1, reversal_fields = NULL, "
                   "state = CASE WHEN state IN ('forwarded', 'timeout') AND response_code IS NULL "
                   "THEN 'timeout' ELSE state END, "
                   "response_doc = CASE WHEN timed_out_at IS NULL THEN NULL ELSE response_doc END WHERE id = ?")
# A transaction gets one store-and-forward entry of each kind: a second
# reversal of it (a timeout after the terminal's own reversal that another
# process queued, a peer's crash recovery, a held reversal whose first write
# committed after all) is the queued one
SQL_SF_TXN_ENTRY = "SELECT max(id) FROM sf_queue WHERE txn_id = ? AND kind = ?"
SQL_SF_TXN_LOCK = "SELECT 1 FROM txn WHERE id = ? FOR UPDATE"  # PostgreSQL (SQLite has one writer)
SQL_SF_ACK = ("UPDATE sf_queue SET state = 'acked', payload = NULL, acked_at = ?, lease_owner = NULL, "
              "lease_until = NULL, lease_boot = NULL WHERE id = ? AND state <> 'acked'")
# A terminal's void of an advice still waiting in the queue (DESIGN.md #4: it
# ends with a reason, never dropped silently): only when no attempt of it can
# have reached the link (never written, not claimed right now); otherwise it
# is delivered and then reversed. A parked one is ended whatever was sent:
# the reversal queued with the void covers it, and a requeue after that
# reversal went would deliver the advice behind the void.
_SF_CANCEL = ("UPDATE sf_queue SET state = 'acked', payload = NULL, acked_at = ?, last_error = ?, lease_owner = NULL, "
              "lease_until = NULL, lease_boot = NULL WHERE id = ? AND ")
SQL_SF_CANCEL_UNSENT = _SF_CANCEL + "state IN ('queued', 'parked') AND sent = 0 AND lease_owner IS NULL"
SQL_SF_CANCEL_PARKED = _SF_CANCEL + "state = 'parked'"
SQL_SF_FOR_TXN = _SF_SELECT + " WHERE txn_id = ? AND kind = ? ORDER BY id DESC LIMIT 1"
# sent: 1 when the attempt was written to the link (it may have arrived), else 0
SQL_SF_RETRY = ("UPDATE sf_queue SET attempts = attempts + 1, sent = sent + ?, next_at = ?, last_error = ?, "
                "lease_owner = NULL, lease_until = NULL, lease_boot = NULL WHERE id = ? AND state = 'queued'")
# the first attempt's DE11/DE7 stay the entry's for good (COALESCE)
SQL_SF_WIRE = ("UPDATE sf_queue SET wire_stan = COALESCE(wire_stan, ?), wire_time = COALESCE(wire_time, ?) "
               "WHERE id = ? AND state = 'queued'")
SQL_SF_PARK = ("UPDATE sf_queue SET state = 'parked', parked_reason = ?, parked_at = ?, sent = sent + ?, "
               "lease_owner = NULL, lease_until = NULL, lease_boot = NULL WHERE id = ? AND state = 'queued'")
# A requeued entry's limits start again (a parked entry's ``sent`` is at its
# limit: kept as it is, the next claim parked it again at once, unsent)
SQL_SF_REQUEUE = ("UPDATE sf_queue SET state = 'queued', next_at = ?, attempts = 0, parked_reason = NULL, "
                  "parked_at = NULL, last_error = ?, requeued_at = ?, requeued_sent = sent "
                  "WHERE id = ? AND state = 'parked'")
# FIFO per acquirer across processes (DESIGN.md #4): only the acquirer's
# oldest queued entry is ever claimed. While it waits out its backoff, or
# another process holds it (its lease, or on PostgreSQL its row lock: SKIP
# LOCKED then finds nothing), nothing behind it goes out -- taking the next
# one instead gave the queue two heads, sent out of order.
# The outer ``state = 'queued'`` is not redundant on PostgreSQL: the head
# subquery reads the statement's snapshot, and when another process acks that
# head between the snapshot and the row lock, FOR UPDATE re-checks only the
# outer conditions against the acked row (its lease is cleared by the ack), so
# without it the acked entry -- payload NULL -- was claimed again.
SQL_SF_CLAIM_PICK = (
    "SELECT id FROM sf_queue WHERE id = (SELECT h.id FROM sf_queue h WHERE h.acquirer = ? "
    "AND h.state = 'queued' ORDER BY h.id LIMIT 1) AND state = 'queued' AND next_at <= ? "
    "AND (lease_until IS NULL OR lease_until < ?)"
)
_SF_RETURNING = " RETURNING " + ", ".join(SF_COLS) + ", payload"
# A lease still set when the entry is claimed again expired without its
# worker reporting back (it died, or hung past the lease): that claim may have
# sent it, so ``sent`` + 1 (SET expressions see the row before the update).
_SF_LEASE_SET = ("SET lease_owner = ?, lease_until = ?, lease_boot = ?, claims = claims + 1, "
                 "sent = sent + CASE WHEN lease_owner IS NULL THEN 0 ELSE 1 END ")
SQL_SF_CLAIM_SQLITE = (
    "UPDATE sf_queue " + _SF_LEASE_SET
    + "WHERE id = (" + SQL_SF_CLAIM_PICK + ")" + _SF_RETURNING
)
SQL_SF_CLAIM_PG = (
    "WITH pick AS (" + SQL_SF_CLAIM_PICK + " FOR UPDATE SKIP LOCKED) "
    "UPDATE sf_queue " + _SF_LEASE_SET
    + "WHERE id = (SELECT id FROM pick)" + _SF_RETURNING
)
SQL_API_INSERT = ("INSERT INTO api_txn (id, owner, status, terminal_id, created_ts, parent_id, doc, card) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
SQL_API_DOC = "SELECT doc FROM api_txn WHERE id = ?"
# Journal.api_scan: the page after (created_ts, id) = (?2, ?3), from ?1 = ?2 on
SQL_API_SCAN = ("SELECT id, created_ts, doc FROM api_txn WHERE created_ts >= ? AND (created_ts > ? OR id > ?) "
                "ORDER BY created_ts, id LIMIT ?")
SQL_API_IDEM_PUT = ("INSERT INTO api_idem (owner, idem_key, fingerprint, api_id, created_ts) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (owner, idem_key) DO UPDATE SET fingerprint = excluded.fingerprint, "
                    "api_id = excluded.api_id, created_ts = excluded.created_ts")
# SQLite (the writer): a key journaled again after its idempotency window is
# deleted and inserted anew, so its rowid -- the order keys are pruned in
# (SQL_PRUNE) -- follows its new time instead of holding up the pruning
SQL_API_IDEM_PUT_SQLITE = ("INSERT OR REPLACE INTO api_idem (owner, idem_key, fingerprint, api_id, created_ts) "
                           "VALUES (?, ?, ?, ?, ?)")
SQL_API_IDEM_GET = "SELECT fingerprint, api_id, created_ts FROM api_idem WHERE owner = ? AND idem_key = ?"
SQL_API_SET = ("UPDATE api_txn SET doc = ?, status = ?, "
               "card = CASE WHEN ? THEN NULL ELSE card END WHERE id = ?")
# a payment that is reversed or fully refunded needs its card no more
API_CARD_DONE = frozenset({"reversed", "refunded"})

SQL_META_PUT_ONCE = "INSERT INTO journal_meta (k, v) VALUES (?, ?) ON CONFLICT (k) DO NOTHING"
SQL_META_GET = "SELECT v FROM journal_meta WHERE k = ?"
SQL_NODE_UPSERT = ("INSERT INTO journal_node (boot_id, node_id, started_at, heartbeat_at) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (boot_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at")
SQL_NODE_DELETE = "DELETE FROM journal_node WHERE boot_id = ?"
# Rows of dead instances: not this boot, and the boot has no fresh heartbeat
# of another node (a boot of this node_id is this node's previous life).
_DEAD = ("t.boot_id <> ? AND NOT EXISTS (SELECT 1 FROM journal_node n WHERE n.boot_id = t.boot_id "
         "AND n.heartbeat_at >= ? AND n.node_id <> ?)")
_UNRESOLVED = ("t.forwarded_at IS NOT NULL AND t.reversal_queued = 0 "
               "AND (t.response_code IS NULL OR t.timed_out_at IS NOT NULL)")
SQL_RECOVER_SELECT = ("SELECT t.id, t.acquirer, t.link_stan, t.reversal_fields, t.terminal_id, "
                      "t.terminal_stan, t.terminal_tx_time, t.mti FROM txn t WHERE "
                      + _UNRESOLVED + " AND " + _DEAD + " ORDER BY t.id")
SQL_RECOVER_MARK = ("UPDATE txn SET reversal_queued = 1, reversal_fields = NULL, "
                    "state = CASE WHEN response_code IS NULL THEN 'unknown' ELSE state END WHERE id = ?")
SQL_ABANDON = ("UPDATE txn SET state = 'abandoned' WHERE id IN (SELECT t.id FROM txn t WHERE "
               "t.state = 'received' AND " + _DEAD + ")")
# Start-up: the leases of dead boots (same test as _DEAD, on the boot holding
# the lease) are released at once instead of being left to expire, so the
# head of each acquirer's queue goes first again (FIFO, DESIGN.md #4). The
# dead worker may have sent the entry: ``sent`` + 1 (it goes as a repeat).
_DEAD_LEASE = ("s.lease_boot <> ? AND NOT EXISTS (SELECT 1 FROM journal_node n WHERE n.boot_id = s.lease_boot "
               "AND n.heartbeat_at >= ? AND n.node_id <> ?)")
_SF_RELEASE = ("UPDATE sf_queue SET lease_owner = NULL, lease_until = NULL, lease_boot = NULL, sent = sent + 1 "
               "WHERE id IN (SELECT s.id FROM sf_queue s WHERE s.state = 'queued' AND s.lease_owner IS NOT NULL AND ")
SQL_SF_RELEASE_DEAD = _SF_RELEASE + "(" + _DEAD_LEASE + "))"
# SQLite: one process owns the journal, so a lease taken before the boot
# column existed (lease_boot NULL) is a previous life's too.
SQL_SF_RELEASE_DEAD_SQLITE = _SF_RELEASE + "(s.lease_boot IS NULL OR (" + _DEAD_LEASE + ")))"


# Retention (Journal.prune): finished history older than a cutoff, in batches.
# Never pruned: a request still being processed (state 'received'; a dead
# instance's are marked 'abandoned' by recovery first), a forwarded
# transaction without a known outcome whose reversal is not queued yet
# (_UNRESOLVED), one whose store-and-forward entry is not acknowledged, and a
# queued or parked entry.
SQL_PRUNE = {
    "txn": ("DELETE FROM txn WHERE id IN (SELECT t.id FROM txn t WHERE t.received_at < ? "
            "AND t.state <> 'received' AND NOT (" + _UNRESOLVED + ") AND NOT EXISTS (SELECT 1 FROM sf_queue s WHERE s.txn_id = t.id "
            "AND s.state <> 'acked') ORDER BY t.received_at LIMIT ?)"),
    "sf_queue": ("DELETE FROM sf_queue WHERE id IN (SELECT id FROM sf_queue WHERE state = 'acked' "
                 "AND acked_at < ? ORDER BY id LIMIT ?)"),
    "late_response": ("DELETE FROM late_response WHERE id IN (SELECT id FROM late_response "
                      "WHERE received_at < ? ORDER BY id LIMIT ?)"),
    "api_txn": ("DELETE FROM api_txn WHERE id IN (SELECT id FROM api_txn WHERE created_ts < ? "
                "ORDER BY created_ts LIMIT ?)"),
    # keys go in insertion (rowid) order, so the oldest come first: each batch
    # looks at the next `batch` rows only, and stops at the first young one
    # (no index on created_ts to pay for on every payment)
    "api_idem": ("DELETE FROM api_idem WHERE rowid IN (SELECT rowid FROM api_idem ORDER BY rowid LIMIT ?2) "
                 "AND created_ts < ?1"),
}
SQL_PRUNE_PG = dict(SQL_PRUNE, api_idem=(
    "DELETE FROM api_idem WHERE (owner, idem_key) IN (SELECT owner, idem_key FROM api_idem "
    "WHERE created_ts < ? ORDER BY created_ts LIMIT ?)"))
RETENTION_CHECK_S = 3600.0  # how often a journal with a retention period prunes


def _pg(sql: str) -> str:
    """? placeholders -> $1, $2, ... (none of our SQL has ? inside literals)."""
    n = 0

    def sub(_m):
        nonlocal n
        n += 1
        return f"${n}"

    return re.sub(r"\?", sub, sql)


# --------------------------------------------------------------------------
# The abstract journal


class Journal(abc.ABC):
    """Common behaviour; backends implement the ``_`` primitives."""

    backend = "abstract"
    _prune_sql = SQL_PRUNE

    def __init__(self, keyring: KeyRing, *, node_id: str | None = None,
                 stale_after: float = DEFAULT_STALE_AFTER, retention_days: float = 0.0):
        if not isinstance(keyring, KeyRing):
            raise TypeError("a journal needs a switch.keys.KeyRing")
        if retention_days < 0:
            raise ValueError("retention_days must be >= 0 (0 keeps everything)")
        self.keyring = keyring
        self.node_id = node_id or self._default_node_id()
        self.boot_id = uuid.uuid4().hex
        self.stale_after = float(stale_after)
        self.retention_s = float(retention_days) * 86_400.0
        self.pruned: dict[str, int] = dict.fromkeys(SQL_PRUNE, 0)
        self.leases_released = 0  # store-and-forward leases of dead boots released by recovery
        self._heartbeat_task: asyncio.Task | None = None
        self._retention_task: asyncio.Task | None = None
        self._started = False
        # Why writes fail now for want of storage (disk full, I/O error, the
        # database gone), None while they work: set by the backend at a failed
        # write, cleared when a write that needs space succeeds again.
        # problem() reports it, so /readyz turns traffic away meanwhile.
        self.write_failure: str | None = None
        self.write_failures = 0  # writes failed for want of storage, since start (every one)
        self._write_failing_since = 0.0
        self._probe_task: asyncio.Task | None = None
        self._log = RateLimitedLog(log)

    def _default_node_id(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    # -- lifecycle

    async def start(self) -> None:
        await self._start()
        try:
            await self._check_key_file()
        except BaseException:
            await self._close()
            raise
        await self._heartbeat()
        self._started = True
        loop = asyncio.get_running_loop()
        self._heartbeat_task = loop.create_task(self._heartbeat_loop())
        if self.retention_s > 0:
            self._retention_task = loop.create_task(self._retention_loop())

    async def close(self) -> None:
        for name in ("_heartbeat_task", "_retention_task", "_probe_task"):
            task = getattr(self, name)
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
                setattr(self, name, None)
        if self._started:
            try:
                await self._node_gone()
            except Exception:  # closing anyway
                log.warning("journal: could not remove node heartbeat row", exc_info=True)
        self._started = False
        await self._close()

    async def __aenter__(self) -> "Journal":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _heartbeat_loop(self) -> None:
        period = max(0.5, self.stale_after / 3)
        while True:
            await asyncio.sleep(period)
            try:
                await self._heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("journal: heartbeat failed", exc_info=True)

    async def _check_key_file(self) -> None:
        """Refuse a key file that is not the one this journal was written with.

        A missing key file is made anew at start (``keys.ensure_keys``): on a
        journal that exists already, every pending reversal's fields and every
        queued entry would then be undecryptable (parked, to be reversed by
        hand) and every PAN fingerprint unlike the earlier ones -- and the new
        rows unreadable once the right file is restored. The journal keeps
        the key file's check value from its first start and compares it."""
        check = self.keyring.check_value()
        await self._exec(SQL_META_PUT_ONCE, ("key_check", check))
        r = await self._fetchone(SQL_META_GET, ("key_check",))
        if r is not None and not hmac.compare_digest(str(r[0]), check):
            where = f" ({self.keyring.source})" if self.keyring.source is not None else ""
            raise JournalError(f"the key file{where} is not the one this journal was written with: its "
                               "card data cannot be decrypted with these keys; restore that key file")

    def problem(self) -> str | None:
        """Why the journal cannot take writes now (None when it can); /readyz reports it."""
        if not self._started:
            return "journal is not started"
        return self._write_problem()

    def _write_problem(self) -> str | None:
        failure = self.write_failure
        return None if failure is None else f"journal writes failing: {failure}"

    # -- write failures (both backends): not ready from a failed write until one succeeds

    def _writes_failed(self, reason: str, n: int = 1) -> None:
        """``n`` writes failed for want of storage (``reason``: one line, no card data)."""
        self.write_failures += n
        if self.write_failure is None:
            self._write_failing_since = time.monotonic()
            self._log.error("journal writes failing", "journal writes failing (%s); reported not ready "
                            "until a write succeeds again", reason)
            if self._probe_task is None or self._probe_task.done():
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no loop: the next write the switch makes tells
                    loop = None
                if loop is not None:
                    self._probe_task = loop.create_task(self._probe_loop(), name="journal-write-probe")
        self.write_failure = reason

    def _writes_ok(self) -> None:
        """A write that needed storage succeeded: the journal takes writes again."""
        if self.write_failure is None:
            return
        self.write_failure = None
        self._log.warning("journal writes succeed again", "journal writes succeed again after %.1f s "
                          "(%d failed writes so far)", time.monotonic() - self._write_failing_since,
                          self.write_failures)

    async def _probe_loop(self) -> None:
        while self.write_failure is not None:
            await asyncio.sleep(WRITE_PROBE_S)
            if self.write_failure is None or not self._started:
                return
            try:
                await self._probe_write()
            except asyncio.CancelledError:
                raise
            except Exception:  # still failing: the backend noted it (and why)
                pass

    async def _probe_write(self) -> None:
        """A write that needs storage; its success or failure is noted like any write's."""
        await self._heartbeat()

    # -- retention

    async def prune(self, older_than: float, batch: int = 5000,
                    tables: tuple[str, ...] | None = None) -> dict[str, int]:
        """Delete finished history older than ``older_than`` (epoch seconds), ``batch``
        rows per statement (each its own short write, so traffic flows between);
        ``tables``: only these (default: all).

        Kept whatever their age: a forwarded transaction whose outcome is unknown
        and whose reversal is not queued yet, a transaction with a store-and-forward
        entry not yet acknowledged, and queued or parked entries. Returns the rows
        deleted per table. SQLite overwrites what it deletes (secure_delete)."""
        counts = {}
        for table, sql in self._prune_sql.items():
            if tables is not None and table not in tables:
                continue
            total = 0
            while True:
                n = await self._exec(sql, (float(older_than), int(batch)))
                total += n
                if n < batch:
                    break
            counts[table] = total
            self.pruned[table] += total
        return counts

    async def _retention_loop(self) -> None:
        while True:
            try:
                counts = await self.prune(time.time() - self.retention_s)
                if any(counts.values()):
                    log.info("journal retention: deleted %s (older than %g days)",
                             ", ".join(f"{n} {t}" for t, n in counts.items() if n),
                             self.retention_s / 86_400)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("journal retention: pruning failed", exc_info=True)
            await asyncio.sleep(min(RETENTION_CHECK_S, max(1.0, self.retention_s / 10)))

    # -- transaction lifecycle

    def _received_params(self, txn: TxnRecord) -> tuple:
        pan = txn.pan
        return (
            txn.listener, str(txn.terminal_id), str(txn.terminal_stan), str(txn.terminal_tx_time),
            str(txn.mti), txn.rrn, None if txn.amount is None else int(txn.amount), txn.currency,
            mask_pan(pan) if pan else None, self.keyring.pan_fingerprint(pan) if pan else None,
            txn.proc_code, float(_ts(txn.received_at)), self.node_id, self.boot_id,
        )

    async def record_received(self, txn: TxnRecord) -> int:
        """Journal a request; returns its txn_id. Raises DuplicateTransaction on a repeat key."""
        txn_id = await self._insert_txn(self._received_params(txn))
        if txn_id is None:
            raise DuplicateTransaction(txn.terminal_id, txn.terminal_stan, txn.terminal_tx_time, txn.mti)
        return txn_id

    async def record_received_forwarded(self, txn: TxnRecord, acquirer: str, link_stan: str,
                                        reversal_fields: dict) -> int:
        """record_received + record_forwarded in one durable write (the hot path).

        Call before writing the request to the acquirer. Raises
        DuplicateTransaction when the terminal's key is already journaled:
        then nothing may be sent (DESIGN.md #6).
        """
        txn_id = await self._insert_forwarded(txn, acquirer, str(link_stan), time.time(), reversal_fields)
        if txn_id is None:
            raise DuplicateTransaction(txn.terminal_id, txn.terminal_stan, txn.terminal_tx_time, txn.mti)
        return txn_id

    async def record_forwarded(self, txn_id: int, acquirer: str, link_stan: str,
                               reversal_fields: dict) -> None:
        """Journal (durably) that the request is about to be sent; call BEFORE writing it."""
        blob = self.keyring.encrypt(_pack(sanitize_fields(reversal_fields)), _txn_aad(txn_id))
        n = await self._exec(SQL_FORWARDED, (acquirer, str(link_stan), time.time(), blob, txn_id))
        if n != 1:
            raise JournalError(f"txn {txn_id}: cannot record forwarding (unknown, or outcome, "
                               "timeout or reversal already journaled)")

    async def record_outcome(self, txn_id: int, response_code: str | None, approval_code: str | None,
                             response_doc_for_replay: dict | None, latency_ms: float | None,
                             attach: tuple | None = None, *, deliver_by: float | None = None) -> None:
        """Journal the answer the terminal gets (kept sanitized for replay); call BEFORE answering.
        ``attach``: an API record (``api_put_params``), optionally followed by
        the changes a follow-up makes to its payment's record (``api_parent_params``),
        journaled in the same transaction, so no crash can leave one without
        the others (a refused outcome writes none of them).

        ``deliver_by`` (epoch seconds): the latest time at which the answer
        can still reach the terminal. A write that would land later writes
        nothing and raises :class:`OutcomeTooLate`: an acquirer's approval
        journaled then, with the reversal the caller queues next, left a
        crash between the two with an approval no restart reverses behind
        the 91 the terminal got. Refused, the row has no outcome, and crash
        recovery reverses it (DESIGN.md #7)."""
        lat = None if latency_ms is None else float(latency_ms)
        if attach is None:
            n = await self._outcome(txn_id, response_code, approval_code, response_doc_for_replay or {}, lat,
                                    time.time(), deliver_by)
        else:
            n = await self._outcome_api(txn_id, response_code, approval_code, response_doc_for_replay or {}, lat,
                                        time.time(), attach, deliver_by)
        if n != 1:
            if n == -1:
                raise OutcomeTooLate(f"txn {txn_id}: outcome not journaled: its terminal's deadline had passed")
            raise JournalError(f"txn {txn_id}: unknown transaction, or reversed by crash recovery")

    async def record_timeout(self, txn_id: int) -> None:
        await self._exec(SQL_TIMEOUT, (time.time(), txn_id))

    async def record_late_response(self, acquirer: str, link_stan: str, response_code: str | None,
                                   mti: str | None = None) -> int | None:
        """Journal a response that came after its request timed out (``mti``: the
        response's, telling a reversal's answer from a forwarding's).

        It is matched to what this process last sent under that link STAN: a
        store-and-forward entry's attempt (``late_response.sf_id``; an
        advice's answer also marks its transaction, a reversal's does not:
        it is not the original's answer), else a transaction this boot
        forwarded within ``LATE_MATCH_WINDOW_S``; else it is kept unmatched.
        Returns the txn_id whose late answer it is, if any."""
        return await self._late_response(acquirer, str(link_stan), response_code, time.time(),
                                         None if mti is None else str(mti))

    async def find_duplicate(self, terminal_id: str, terminal_stan: str, terminal_tx_time: str,
                             mti: str) -> tuple[str | None, dict | None]:
        """("in_flight", None) | ("done", replay or None) | (None, None)."""
        row = await self._fetchone(SQL_FIND_DUP, (str(terminal_id), str(terminal_stan),
                                                  str(terminal_tx_time), str(mti)))
        if row is None:
            return None, None
        _id, state, rc, doc = row
        if state in ("received", "forwarded", "timeout") and rc is None:
            return "in_flight", None
        if rc is None or doc is None:
            return "done", None  # outcome unknown (recovered / abandoned): a 94 for the terminal
        return "done", _unpack(doc)

    # -- queries (rows never hold clear PAN, track data or PIN blocks)

    def _txn_row(self, r) -> dict:
        d = dict(zip(TXN_COLS + ("has_reversal_fields",), r))
        d["txn_id"] = d.pop("id")
        d["response"] = _unpack(d.pop("response_doc"))
        d["reversal_queued"] = bool(d["reversal_queued"])
        d["has_reversal_fields"] = bool(d["has_reversal_fields"])
        return d

    async def find_txn(self, terminal_id: str, terminal_stan: str, terminal_tx_time: str,
                       mti: str) -> dict | None:
        """The row for a terminal's request key (to route its reversal to the same acquirer)."""
        r = await self._fetchone(
            _TXN_SELECT + " WHERE terminal_id = ? AND terminal_stan = ? AND terminal_tx_time = ? "
            "AND mti = ?", (str(terminal_id), str(terminal_stan), str(terminal_tx_time), str(mti)))
        return None if r is None else self._txn_row(r)

    async def find_latest_txn(self, terminal_id: str, terminal_stan: str, mti: str,
                              since: float) -> dict | None:
        """The newest row for a terminal's trace number received since ``since``
        (for a reversal that does not name its original's transmission time:
        ISO 8583:1993's DE56 carries none). A range of the terminal index."""
        r = await self._fetchone(
            _TXN_SELECT + " WHERE terminal_id = ? AND received_at >= ? AND terminal_stan = ? AND mti = ? "
            "ORDER BY id DESC LIMIT 1", (str(terminal_id), float(since), str(terminal_stan), str(mti)))
        return None if r is None else self._txn_row(r)

    async def get(self, txn_id: int) -> dict | None:
        r = await self._fetchone(_TXN_SELECT + " WHERE id = ?", (txn_id,))
        return None if r is None else self._txn_row(r)

    async def by_rrn(self, rrn: str) -> list[dict]:
        rows = await self._fetchall(_TXN_SELECT + " WHERE rrn = ? ORDER BY id", (rrn,), slow=False)
        return [self._txn_row(r) for r in rows]

    async def by_terminal(self, terminal_id: str, since=None, until=None, limit: int = 100,
                          offset: int = 0) -> list[dict]:
        sql, params = _TXN_SELECT + " WHERE terminal_id = ?", [str(terminal_id)]
        sql, params = self._time_range(sql, params, since, until)
        rows = await self._fetchall(sql + " ORDER BY received_at, id LIMIT ? OFFSET ?",
                                    (*params, *_page(limit, offset)))
        return [self._txn_row(r) for r in rows]

    async def by_time(self, since=None, until=None, limit: int = 100, offset: int = 0) -> list[dict]:
        sql, params = self._time_range(_TXN_SELECT + " WHERE 1 = 1", [], since, until)
        rows = await self._fetchall(sql + " ORDER BY received_at, id LIMIT ? OFFSET ?",
                                    (*params, *_page(limit, offset)))
        return [self._txn_row(r) for r in rows]

    @staticmethod
    def _time_range(sql: str, params: list, since, until) -> tuple[str, list]:
        if since is not None:
            sql += " AND received_at >= ?"
            params.append(_ts(since))
        if until is not None:
            sql += " AND received_at < ?"
            params.append(_ts(until))
        return sql, params

    # -- store-and-forward

    async def sf_enqueue(self, acquirer: str, kind: str, txn_id: int | None, payload_fields: dict,
                         *, next_at: float | None = None, wire: tuple | None = None) -> int | None:
        """The id of the entry queued (``sf_enqueue_once``: of the one already
        queued for ``txn_id``, if any)."""
        return (await self.sf_enqueue_once(acquirer, kind, txn_id, payload_fields, next_at=next_at,
                                           wire=wire))[0]

    async def sf_enqueue_once(self, acquirer: str, kind: str, txn_id: int | None, payload_fields: dict,
                              *, next_at: float | None = None, wire: tuple | None = None) -> tuple[int | None, bool]:
        """(entry id, True) for a new entry. A transaction is reversed (or its
        advice repeated) once: when an entry of this kind is queued for
        ``txn_id`` already, nothing is queued and the result is (that entry's
        id, False). ``wire``: (DE11, DE7) an earlier attempt went out with
        (an advice the flow sent): every attempt of the entry carries them."""
        if kind not in SF_KINDS:
            raise ValueError(f"store-and-forward kind must be one of {', '.join(SF_KINDS)}")
        blob = self.keyring.encrypt(_pack(sanitize_fields(payload_fields)), _sf_aad(acquirer, kind, txn_id))
        now = time.time()
        stan, tx_time = (None, None) if wire is None else wire
        entry_id, new = await self._sf_insert(acquirer, kind, txn_id, blob, now, now if next_at is None else next_at,
                                              None if stan is None else str(stan),
                                              None if tx_time is None else str(tx_time))
        return entry_id, bool(new)

    @staticmethod
    def _sf_entry(r) -> SfEntry:
        return SfEntry(**dict(zip(SF_COLS, r[:len(SF_COLS)])))

    async def sf_claim(self, acquirer: str, worker_id: str, lease_s: float = 30.0) -> SfEntry | None:
        """The oldest due entry for ``acquirer``, leased to ``worker_id`` for ``lease_s`` seconds.

        Due: queued, ``next_at`` reached, no unexpired lease. The lease
        carries this journal's ``boot_id``: start-up recovery releases the
        leases of dead boots at once; a live worker that hangs leaves its
        lease to expire. Either way the entry is then claimed again with
        ``claims`` + 1 and ``sent`` + 1 (``repeat`` is True: a reversal goes
        as 0401). An entry whose payload cannot be decrypted is parked, never
        dropped.
        """
        while True:
            now = time.time()
            r = await self._sf_claim(acquirer, str(worker_id), now, now + float(lease_s), self.boot_id)
            if r is None:
                return None
            e = self._sf_entry(r)
            try:
                e.payload = _unpack(self.keyring.decrypt(r[len(SF_COLS)], _sf_aad(e.acquirer, e.kind, e.txn_id)))
            except DecryptError as exc:
                log.error("store-and-forward entry %d parked: %s", e.id, exc)
                await self.sf_park(e.id, f"payload cannot be decrypted: {exc}", sent=False)
                continue
            return e

    async def sf_ack(self, entry_id: int) -> bool:
        return await self._exec(SQL_SF_ACK, (time.time(), entry_id)) == 1

    async def sf_retry(self, entry_id: int, next_at: float, error: str | None, *, sent: bool = True) -> bool:
        """End a claim without acknowledgement: ``attempts`` + 1, due again at
        ``next_at``. ``sent``: the attempt was written to the link (answered
        "not applied", or outcome unknown), so the next one is a repeat;
        False when it certainly never left (the acquirer cannot have seen it)."""
        return await self._exec(SQL_SF_RETRY, (1 if sent else 0, float(_ts(next_at)),
                                               None if error is None else str(error)[:500], entry_id)) == 1

    async def sf_mark_wire(self, entry_id: int, stan: str, tx_time: str | None) -> bool:
        """Record the DE11 and DE7 an attempt is about to be written with,
        before its first byte goes out (so a crash right after the write still
        finds them). Only the first attempt's are kept: repeats reuse them."""
        return await self._exec(SQL_SF_WIRE, (str(stan), None if tx_time is None else str(tx_time),
                                              entry_id)) == 1

    async def sf_cancel_unsent(self, entry_id: int, reason: str) -> bool:
        """End a queued or parked entry no attempt of which can have reached its
        acquirer (none written, none under way): True when it was ended."""
        return await self._exec(SQL_SF_CANCEL_UNSENT, (time.time(), SF_CANCELLED + str(reason)[:480],
                                                       entry_id)) == 1

    async def sf_cancel_parked(self, entry_id: int, reason: str) -> bool:
        """End a parked entry (whatever was sent of it): True when it was ended."""
        return await self._exec(SQL_SF_CANCEL_PARKED, (time.time(), SF_CANCELLED + str(reason)[:480],
                                                       entry_id)) == 1

    async def sf_for_txn(self, txn_id: int, kind: str) -> SfEntry | None:
        """The newest entry of ``kind`` for transaction ``txn_id`` (any state)."""
        r = await self._fetchone(SQL_SF_FOR_TXN, (txn_id, kind))
        return None if r is None else self._sf_entry(r)

    async def sf_park(self, entry_id: int, reason: str, *, sent: bool = True) -> bool:
        """Park a claimed entry. ``sent``: this claim may have sent it (the
        default, the safe side); False when it was parked before any attempt."""
        return await self._exec(SQL_SF_PARK, (str(reason)[:500], time.time(), 1 if sent else 0, entry_id)) == 1

    async def sf_requeue(self, entry_id: int) -> bool:
        now = time.time()
        return await self._exec(SQL_SF_REQUEUE, (now, "requeued by operator", now, entry_id)) == 1

    async def sf_get(self, entry_id: int) -> SfEntry | None:
        r = await self._fetchone(_SF_SELECT + " WHERE id = ?", (entry_id,))
        return None if r is None else self._sf_entry(r)

    async def sf_list(self, parked: bool | None = None, acquirer: str | None = None,
                      limit: int = 1000, acked: bool = False) -> list[SfEntry]:
        """Entries not yet acknowledged (payload never included), oldest first;
        ``acked``: acknowledged ones too (with ``parked`` None)."""
        states = {None: ("queued", "parked"), True: ("parked",), False: ("queued",)}[parked]
        if acked and parked is None:
            states += ("acked",)
        sql = _SF_SELECT + " WHERE state IN (" + ", ".join("?" * len(states)) + ")"
        params: list = list(states)
        if acquirer is not None:
            sql += " AND acquirer = ?"
            params.append(acquirer)
        rows = await self._fetchall(sql + " ORDER BY id LIMIT ?", (*params, _page(limit, 0)[0]))
        return [self._sf_entry(r) for r in rows]

    async def sf_depth(self, acquirer: str | None = None) -> int:
        if acquirer is None:
            r = await self._fetchone("SELECT COUNT(*) FROM sf_queue WHERE state = 'queued'", ())
        else:
            r = await self._fetchone("SELECT COUNT(*) FROM sf_queue WHERE state = 'queued' AND acquirer = ?",
                                     (acquirer,))
        return int(r[0])

    async def sf_parked_count(self) -> int:
        r = await self._fetchone("SELECT COUNT(*) FROM sf_queue WHERE state = 'parked'", ())
        return int(r[0])

    # -- the REST API's transactions (switch.api.JournalTransactionStore)

    async def api_put(self, record: dict, card: tuple[str, str] | None = None) -> None:
        """Journal an API transaction record (no card data in it; the caller checks)
        and, optionally, its card as AES-GCM ciphertext for later follow-ups."""
        await self.api_put_soon(record, card)

    def api_put_params(self, record: dict, card: tuple[str, str] | None = None,
                       idem: tuple[str, str] | None = None) -> tuple:
        """(SQL_API_INSERT params, SQL_API_IDEM_PUT params or None) for a record:
        the card encrypted, the request's digest as its HMAC."""
        api_id = str(record["id"])
        blob = None if card is None else self.keyring.encrypt(
            f"{card[0]}|{card[1]}".encode("ascii"), _api_card_aad(api_id))
        params = (api_id, record.get("owner"), str(record["status"]), record.get("terminal_id"),
                  float(record["created_ts"]), record.get("parent_id"), _pack_on_loop(record), blob)
        if idem is None:
            return params, None
        return params, (str(record.get("owner")), str(idem[0]), self.keyring.request_digest(str(idem[1])),
                        api_id, float(record["created_ts"]))

    def api_put_soon(self, record: dict, card: tuple[str, str] | None = None,
                     idem: tuple[str, str] | None = None) -> asyncio.Future:
        """``api_put`` submitted now (SQLite: it shares the group commit of a write
        submitted right after it); await the returned future for durability.
        ``idem``: (Idempotency-Key, request fingerprint), journaled in the same
        transaction, so a retry finds this record (``api_idem_claim``)."""
        params, idem_params = self.api_put_params(record, card, idem)
        if idem_params is None:
            aw = self._exec(SQL_API_INSERT, params)
        else:
            aw = self._api_put_idem(params, idem_params)
        return aw if isinstance(aw, asyncio.Future) else asyncio.ensure_future(aw)

    def _api_put_idem(self, params: tuple, idem_params: tuple):
        """SQL_API_IDEM_PUT, then SQL_API_INSERT (SQLite: in the same group commit;
        a key without its record, should only the second fail, just lets a retry
        run the payment, which then never happened)."""
        raise NotImplementedError

    async def api_idem_claim(self, owner: str, idem_key: str, fingerprint: str,
                             stale_before: float, not_before: float = 0.0) -> tuple[bool, str | None] | None:
        """None when ``idem_key`` is new (this caller may run the payment), else
        (same request?, API transaction id or None while another switch process
        runs it). ``fingerprint``: the request's digest; the journal keeps only
        its HMAC (``KeyRing.request_digest``). One process owns a SQLite journal
        and its in-memory cache orders its own requests, so SQLite only looks;
        PostgreSQL claims the key atomically for the several processes sharing
        it, taking over a claim left by a process that died before
        ``stale_before``. A key journaled before ``not_before`` (the end of
        its idempotency window) is forgotten: new again."""
        r = await self._idem_get((str(owner), str(idem_key)))
        if r is None or r[2] < not_before:
            return None
        return hmac.compare_digest(r[0], self.keyring.request_digest(str(fingerprint))), r[1]

    async def _idem_get(self, params: tuple):
        return await self._fetchone(SQL_API_IDEM_GET, params)

    async def api_idem_release(self, owner: str, idem_key: str) -> None:
        """Forget a claim whose request ended without a payment (a 4xx/5xx answer)."""
        return None

    async def api_lock_take(self, api_id: str, owner: str, until: float) -> bool:
        """Lease API transaction ``api_id`` to ``owner`` until ``until`` (epoch
        seconds) for a follow-up: False while another owner holds an unexpired
        lease. One process owns a SQLite journal, and its in-process lock
        orders its follow-ups: always True there."""
        return True

    async def api_lock_release(self, api_id: str, owner: str) -> None:
        """End ``owner``'s lease on ``api_id`` (nothing if it is not the holder)."""
        return None

    async def api_idem_scan(self, fn, since: float = 0.0) -> int:
        """``fn(owner, idem_key)`` for every Idempotency-Key journaled at or after
        ``since`` (in a worker thread, streamed); returns how many."""
        raise NotImplementedError

    async def api_update(self, api_id: str, changes: dict) -> bool:
        """Merge ``changes`` into a record; the card is deleted once it is reversed or fully refunded."""
        return await self._api_update(str(api_id), _pack(changes)) == 1

    @staticmethod
    def api_parent_params(api_id: str, changes: dict) -> tuple:
        """``api_update`` of a follow-up's payment as the third item of an outcome's attachment."""
        return str(api_id), _pack(changes)

    async def api_get(self, api_id: str) -> dict | None:
        r = await self._fetchone(SQL_API_DOC, (str(api_id),))
        return None if r is None else _unpack(r[0])

    async def api_card(self, api_id: str) -> tuple[str, str] | None:
        """(PAN, expiry) of an API payment, or None (never kept, deleted, or undecryptable)."""
        r = await self._fetchone("SELECT card FROM api_txn WHERE id = ?", (str(api_id),))
        if r is None or r[0] is None:
            return None
        try:
            pan, _, expiry = self.keyring.decrypt(bytes(r[0]), _api_card_aad(api_id)).decode("ascii").partition("|")
        except DecryptError as exc:
            log.error("API transaction %s: card cannot be decrypted: %s", api_id, exc)
            return None
        return pan, expiry

    async def api_list(self, limit: int, offset: int, filters: dict) -> list[dict]:
        """Newest first; filters: status, terminal_id, owner, since, until (epoch seconds)."""
        sql, params = "SELECT doc FROM api_txn WHERE 1 = 1", []
        for col in ("status", "terminal_id", "owner"):
            if filters.get(col) is not None:
                sql += f" AND {col} = ?"
                params.append(str(filters[col]))
        if filters.get("since") is not None:
            sql += " AND created_ts >= ?"
            params.append(float(filters["since"]))
        if filters.get("until") is not None:
            sql += " AND created_ts < ?"
            params.append(float(filters["until"]))
        rows = await self._fetchall(sql + " ORDER BY created_ts DESC, id DESC LIMIT ? OFFSET ?",
                                    (*params, *_page(limit, offset)))
        return [_unpack(r[0]) for r in rows]

    async def api_scan(self, since: float, after: tuple[float, str] | None = None,
                       limit: int = 1000) -> list[tuple[str, float, dict]]:
        """(id, created_ts, record) of the records created at or after ``since``,
        oldest first ((created_ts, id) order), ``limit`` of them following
        ``after`` (the (created_ts, id) of the previous page's last): a
        start-up scan of a recent window (webhook recovery) on the created_ts
        index, without an OFFSET that re-reads every earlier page."""
        ts, last = (float(since), "") if after is None else (max(float(since), float(after[0])), str(after[1]))
        rows = await self._fetchall(SQL_API_SCAN, (ts, ts, last, _page(limit, 0)[0]))
        return [(r[0], r[1], _unpack(r[2])) for r in rows]

    @abc.abstractmethod
    async def _api_update(self, api_id: str, changes_packed: bytes) -> int: ...

    # -- crash recovery

    def _dead_params(self, now: float | None = None) -> tuple:
        return (self.boot_id, (time.time() if now is None else now) - self.stale_after, self.node_id)

    async def _dead_params_now(self) -> tuple:
        """``_dead_params`` on the clock the heartbeats are written with."""
        return self._dead_params()

    def _decrypt_reversal(self, txn_id: int, blob, key: tuple | None = None) -> dict | None:
        if blob is None:
            return None
        # written with the insert (bound to the terminal key) or by a failover
        # re-forward (bound to the row id); GCM authenticates exactly one of them
        aads = ([_txn_key_aad(*key)] if key else []) + [_txn_aad(txn_id)]
        for aad in aads:
            try:
                return _unpack(self.keyring.decrypt(blob, aad))
            except DecryptError as exc:
                err = exc
        log.error("txn %d: reversal fields cannot be decrypted: %s", txn_id, err)
        return None

    def _recovery_plan(self, rows) -> list[tuple]:
        """(txn_id, acquirer, sf kind, sf state, payload blob, parked reason, wire
        DE11, wire DE7) for each unresolved row: an advice (x120/x220) is
        repeated, anything else reversed."""
        plan = []
        for txn_id, acquirer, link_stan, blob, *key in rows:
            fields = self._decrypt_reversal(txn_id, blob, tuple(key))
            kind = "advice" if is_advice_mti(key[3] if len(key) > 3 else "") else "reversal"
            reason = None
            wire = (None, None)
            if fields is not None and kind == "advice" and str(fields.get("t", ""))[:3]:
                fields["t"] = str(fields["t"])[:3] + "1"  # it may have arrived: a repeat
                # ... of the message the acquirer may hold: the same DE11 and DE7
                # (a reversal of it then names one message, whichever arrived)
                wire = (link_stan, None if fields.get("7") is None else str(fields["7"]))
            if fields is None:
                fields = {"11": link_stan}
                reason = (f"{kind} fields missing or undecryptable at recovery; "
                          + ("send it again manually" if kind == "advice" else "reverse manually"))
            payload = self.keyring.encrypt(_pack(fields), _sf_aad(acquirer, kind, txn_id))
            plan.append((txn_id, acquirer, kind, "parked" if reason else "queued", payload, reason, *wire))
        return plan

    async def recover_unknown_outcomes(self) -> list[tuple[int, str, str, dict | None]]:
        """Forwarded transactions of dead instances with no known outcome and no reversal queued.

        Read only: ``[(txn_id, acquirer, link_stan, reversal_fields)]`` (fields
        None when missing or undecryptable). Prefer :meth:`recover_and_enqueue`.
        """
        rows = await self._fetchall(SQL_RECOVER_SELECT, await self._dead_params_now())
        return [(r[0], r[1], r[2], self._decrypt_reversal(r[0], r[3], tuple(r[4:8]))) for r in rows]

    async def claim_stan_block(self, blocks: int) -> int | None:
        """The trace-number block (0 .. ``blocks`` - 1) this instance takes among
        the live ones sharing the journal, or None when it needs none (one
        process owns an SQLite journal) or none is free. See
        ``stan_block_range``."""
        return None

    async def recover_and_enqueue(self) -> int:
        """Queue a reversal for every unresolved forwarded transaction of a dead instance.

        One transaction: the entries are inserted and the transactions marked
        together, so a second call queues nothing. Rows journaled as received
        but never forwarded by a dead instance are marked ``abandoned`` (a
        retransmission then gets "done" without a replay, i.e. 94). An advice
        (x120/x220) is queued to be repeated instead of reversed. Returns how
        many entries were queued (parked ones included: an entry whose fields
        cannot be decrypted is parked, visible, never dropped).

        In the same transaction, store-and-forward leases held by dead boots
        (a worker killed while sending) are released, with ``sent`` + 1: the
        entry is due again at once, ahead of those queued behind it, and goes
        as a repeat (``leases_released`` counts them).
        """
        return await self._recover()

    # -- backend primitives

    @abc.abstractmethod
    async def _start(self) -> None: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...

    @abc.abstractmethod
    async def _heartbeat(self) -> None: ...

    @abc.abstractmethod
    async def _node_gone(self) -> None: ...

    @abc.abstractmethod
    async def _insert_txn(self, params: tuple) -> int | None: ...

    async def _outcome(self, txn_id, response_code, approval_code, doc, latency_ms, now, deliver_by=None) -> int:
        """1 when written, 0 for an unknown or recovered row, -1 past ``deliver_by``."""
        raise NotImplementedError

    async def _outcome_api(self, txn_id, response_code, approval_code, doc, latency_ms, now, attach,
                           deliver_by=None) -> int:
        """The outcome, then the attached API record (``api_put_params``), in one
        transaction; nothing of the attachment when the outcome is not written."""
        raise NotImplementedError

    @abc.abstractmethod
    async def _insert_forwarded(self, txn: TxnRecord, acquirer: str, link_stan: str, now: float,
                                reversal_fields: dict) -> int | None: ...

    @abc.abstractmethod
    async def _exec(self, sql: str, params: tuple) -> int:
        """Run one write statement durably; returns the number of rows changed."""

    @abc.abstractmethod
    async def _late_response(self, acquirer: str, link_stan: str, rc: str | None, now: float,
                             mti: str | None) -> int | None: ...

    @abc.abstractmethod
    async def _sf_insert(self, acquirer, kind, txn_id, blob, now, next_at, wire_stan=None,
                         wire_time=None) -> tuple[int | None, bool]: ...

    @abc.abstractmethod
    async def _sf_claim(self, acquirer: str, worker: str, now: float, lease_until: float, boot: str): ...

    @abc.abstractmethod
    async def _recover(self) -> int: ...

    @abc.abstractmethod
    async def _fetchone(self, sql: str, params: tuple): ...

    @abc.abstractmethod
    async def _fetchall(self, sql: str, params: tuple, slow: bool = True) -> list: ...


# --------------------------------------------------------------------------
# SQLite: WAL + one writer thread with group commit

class SqliteJournal(Journal):
    """SQLite in WAL mode; every write goes through one writer child process.

    The writer (:mod:`switch.journal_writer`) commits whatever is waiting as
    one transaction (group commit) and answers each write only after that
    COMMIT returned. ``group_commit_ms``: when the previous group held more
    than one write (the switch is busy), the writer lingers up to this long
    after the first write of a group to gather more before committing; an
    idle switch never waits. ``synchronous``: "FULL" (default; a commit
    survives power loss) or "NORMAL" (survives a process crash; cheaper
    fsyncs). Reads run in this process on their own connections.
    """

    backend = "sqlite"

    def __init__(self, path: str | Path, keyring: KeyRing, *, group_commit_ms: float = 0.0,
                 synchronous: str = "FULL", node_id: str | None = None,
                 stale_after: float = DEFAULT_STALE_AFTER, retention_days: float = 0.0,
                 _temporary: bool = False):
        self.path = Path(path) if str(path) != ":memory:" else None
        self._temporary = _temporary or self.path is None
        self._tmpdir: str | None = None
        super().__init__(keyring, node_id=node_id, stale_after=stale_after, retention_days=retention_days)
        if synchronous.upper() not in ("FULL", "NORMAL", "OFF", "EXTRA"):
            raise ValueError("synchronous must be FULL, NORMAL, OFF or EXTRA")
        self.synchronous = synchronous.upper()
        self.group_commit_s = max(0.0, float(group_commit_ms) / 1000.0)
        self._writer = None  # switch.journal_writer.ProcessWriter
        self._rconn: sqlite3.Connection | None = None  # loop-thread point reads
        self._sconn: sqlite3.Connection | None = None  # worker-thread range reads
        self._slock = threading.Lock()
        self._closed = True
        self.stats = {"groups": 0, "writes": 0, "max_group": 0}

    def _default_node_id(self) -> str:
        # One process owns a SQLite journal: every other boot on this file is a
        # previous life of this node, recovered at start-up.
        return "sqlite:" + (str(self.path.resolve()) if self.path and not self._temporary else "memory")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                               timeout=30.0)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA query_only = ON")
        return conn

    async def _start(self) -> None:
        from switch.journal_writer import ProcessWriter
        if self.path is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            self._tmpdir = tempfile.mkdtemp(prefix="isoswitch-journal-", dir=base)
            os.chmod(self._tmpdir, 0o700)
            self.path = Path(self._tmpdir) / "journal.db"
            self.synchronous = "OFF"
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            owner_only_file(self.path)
        self._writer = ProcessWriter(self.path, self.synchronous, self.keyring, self.node_id, self.boot_id,
                                     self.group_commit_s, self.stats, on_health=self._write_health)
        try:
            await self._writer.start()
        except BaseException:
            self._writer = None
            self._cleanup_tmp()
            raise
        self._closed = False
        self._rconn = self._connect()
        self._sconn = self._connect()

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        for c in (self._rconn, self._sconn):
            if c is not None:
                c.close()
        self._rconn = self._sconn = None
        self._cleanup_tmp()

    def _cleanup_tmp(self) -> None:
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self.path = None

    def problem(self) -> str | None:
        if self._closed or self._writer is None:
            return "journal is closed"
        return self._writer.error or self._write_problem()

    def _write_health(self, failure: str | None, n: int = 0) -> None:
        """The writer's report on a committed group: writes failed for want of
        storage (``failure``), or one that needed space succeeded (None)."""
        if failure is None:
            self._writes_ok()
        else:
            self._writes_failed(failure, n)

    async def _probe_write(self) -> None:
        # the heartbeat updates a row in place, which a database that cannot
        # grow still takes: the probe needs new pages, as a new transaction does
        await self._submit("probe", PROBE_BYTES)

    def _submit(self, op: str, *args) -> asyncio.Future:
        """Queue the writer operation ``op``; the future resolves after its group committed."""
        if self._closed or self._writer is None:
            raise JournalError("journal is closed")
        return self._writer.submit(op, args)

    # -- primitives

    async def _heartbeat(self) -> None:
        now = time.time()
        await self._submit("exec", SQL_NODE_UPSERT, (self.boot_id, self.node_id, now, now))

    async def _node_gone(self) -> None:
        await self._submit("exec", SQL_NODE_DELETE, (self.boot_id,))

    async def record_received(self, txn: TxnRecord) -> int:
        # masking and the HMAC fingerprint run in the writer process
        txn_id = await self._submit("received", _txn_tuple(txn))
        if txn_id is None:
            raise DuplicateTransaction(txn.terminal_id, txn.terminal_stan, txn.terminal_tx_time, txn.mti)
        return txn_id

    async def _insert_txn(self, params: tuple) -> int | None:  # pragma: no cover - record_received above
        raise NotImplementedError

    def _insert_forwarded(self, txn, acquirer, link_stan, now, reversal_fields):
        # Sanitized and packed here (the IPC message needs the packing anyway,
        # and the writer is then spared unpacking and re-packing it); masking,
        # the HMAC fingerprint and AES-GCM run in the writer process.
        return self._submit("fwd", _txn_tuple(txn), acquirer, link_stan, now,
                            _pack_on_loop(sanitize_fields(reversal_fields)))

    def _exec(self, sql: str, params: tuple):
        return self._submit("exec", sql, params)

    def _api_put_idem(self, params: tuple, idem_params: tuple):
        return self._submit("api_put", params, idem_params)

    def _idem_get(self, params: tuple):
        # In the writer, whose page cache is warm: a read on this process's own
        # connection starts cold after every commit (measured: ~40 us a lookup
        # under REST load, against a few for a write's round trip).
        return self._submit("idem_get", params)

    def _outcome(self, txn_id, response_code, approval_code, doc, latency_ms, now, deliver_by=None):
        # the writer judges deliver_by on its own clock as it runs the write
        # (this host's: the same wall clock as the caller's)
        return self._submit("outcome", txn_id, response_code, approval_code, _pack_on_loop(sanitize_replay(doc)),
                            latency_ms, now, deliver_by)

    def _outcome_api(self, txn_id, response_code, approval_code, doc, latency_ms, now, attach, deliver_by=None):
        # one message, so one group and one COMMIT: a crash keeps both or neither
        return self._submit("outcome_api", txn_id, response_code, approval_code,
                            _pack_on_loop(sanitize_replay(doc)), latency_ms, now, deliver_by, *attach)

    def _late_response(self, acquirer, link_stan, rc, now, mti=None):
        return self._submit("late", acquirer, link_stan, rc, now, mti)

    def _sf_insert(self, acquirer, kind, txn_id, blob, now, next_at, wire_stan=None, wire_time=None):
        return self._submit("sf_insert", acquirer, kind, txn_id, blob, now, next_at, wire_stan, wire_time)

    def _sf_claim(self, acquirer, worker, now, lease_until, boot):
        return self._submit("sf_claim", (worker, lease_until, boot, acquirer, now, now))

    async def _recover(self) -> int:
        queued, released = await self._submit("recover", self._dead_params())
        self.leases_released += released
        if released:
            log.warning("crash recovery: released %d store-and-forward lease(s) of a previous run "
                        "(their entries go again first, as repeats)", released)
        return queued

    def _api_update(self, api_id, changes_packed):
        return self._submit("api_update", api_id, changes_packed)

    async def _fetchone(self, sql: str, params: tuple):
        if self._rconn is None:
            raise JournalError("journal is closed")
        return self._rconn.execute(sql, params).fetchone()

    async def _fetchall(self, sql: str, params: tuple, slow: bool = True) -> list:
        if not slow:
            if self._rconn is None:
                raise JournalError("journal is closed")
            return self._rconn.execute(sql, params).fetchall()
        conn = self._sconn
        if conn is None:
            raise JournalError("journal is closed")

        def run():
            with self._slock:
                return conn.execute(sql, params).fetchall()
        return await asyncio.to_thread(run)

    async def api_idem_scan(self, fn, since: float = 0.0) -> int:
        conn = self._sconn
        if conn is None:
            raise JournalError("journal is closed")

        def run():
            n = 0
            with self._slock:
                for owner, key in conn.execute("SELECT owner, idem_key FROM api_idem WHERE created_ts >= ?",
                                               (float(since),)):
                    fn(owner, key)
                    n += 1
            return n
        return await asyncio.to_thread(run)

    # -- for tests and tools

    def database_files(self) -> list[Path]:
        """The database file and its WAL / shared-memory files, if present."""
        if self.path is None:
            return []
        return [p for p in (self.path, Path(str(self.path) + "-wal"), Path(str(self.path) + "-shm"))
                if p.exists()]


# --------------------------------------------------------------------------
# PostgreSQL: asyncpg pool, FOR UPDATE SKIP LOCKED claims


# SQLSTATE classes of a database that cannot take writes: connection exception,
# insufficient resources (53100 disk full), operator intervention (shutdown),
# system error (I/O), internal error; and 25006, a read-only transaction (a
# standby, or a database set read-only). Not constraint or syntax errors.
_PG_DOWN_CLASSES = frozenset({"08", "53", "57", "58", "XX"})


def _pg_write_failure(exc: BaseException) -> str | None:
    """Why a PostgreSQL write failed when it is for want of a working
    database (one line, the error's type and SQLSTATE: never its text, which
    may quote values), else None."""
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str) and state:
        if state[:2] in _PG_DOWN_CLASSES or state == "25006":
            return f"{type(exc).__name__} (SQLSTATE {state})"
        return None
    if isinstance(exc, OSError):  # refused, reset, TimeoutError (command_timeout)
        return type(exc).__name__
    try:
        from asyncpg.exceptions import ConnectionDoesNotExistError, InternalClientError
    except ImportError:  # pragma: no cover - asyncpg comes with the PostgreSQL backend
        return None
    # a session the server ended (InternalClientError: asyncpg's word for a
    # connection terminated while it sat in the pool)
    return type(exc).__name__ if isinstance(exc, (ConnectionDoesNotExistError, InternalClientError)) else None


def _tracks_writes(fn):
    """A PostgresJournal write: one failed for want of a working database
    makes the journal not ready (``Journal.problem``); one that succeeds
    makes it ready again (every PostgreSQL write needs space: an update is a
    new row version, and WAL)."""
    @functools.wraps(fn)
    async def write(self, *args, **kwargs):
        try:
            result = await fn(self, *args, **kwargs)
        except Exception as exc:
            reason = _pg_write_failure(exc)
            if reason is not None:
                self._writes_failed(reason)
            raise
        if self.write_failure is not None:
            self._writes_ok()
        return result
    return write


class PostgresJournal(Journal):
    """Journal and store-and-forward queue in PostgreSQL, shared by several switch processes.

    Each write is one short transaction (PostgreSQL's own WAL flush does the
    group commit across connections). Give every process a distinct, stable
    ``node_id`` so a restarted process recovers its previous life's
    transactions at once; the default (host:pid) is safe but leaves a
    crashed process's transactions to be recovered by any node once its
    heartbeat is ``stale_after`` seconds old.
    """

    backend = "postgres"
    _prune_sql = SQL_PRUNE_PG

    def __init__(self, dsn: str, keyring: KeyRing, *, min_size: int = 1, max_size: int = 10,
                 node_id: str | None = None, stale_after: float = DEFAULT_STALE_AFTER,
                 retention_days: float = 0.0, **pool_kwargs):
        super().__init__(keyring, node_id=node_id, stale_after=stale_after, retention_days=retention_days)
        self._dsn = dsn
        # A database that stops answering (a network partition, a hung server)
        # must fail a write, not hold it for the kernel's TCP give-up time: the
        # flow then answers and reverses as for any journal failure.
        pool_kwargs.setdefault("command_timeout", 30.0)
        self._pool_args = dict(min_size=min_size, max_size=max_size, **pool_kwargs)
        self._pool = None
        self._sql: dict[str, str] = {}

    def __repr__(self) -> str:  # the DSN may hold a password
        return f"PostgresJournal(node_id={self.node_id!r})"

    def _q(self, sql: str) -> str:
        s = self._sql.get(sql)
        if s is None:
            s = self._sql[sql] = _pg(sql)
        return s

    async def _start(self) -> None:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(self._dsn, **self._pool_args)
        except Exception as exc:
            # never echo the DSN (it may carry a password)
            raise JournalError(f"cannot connect to the PostgreSQL journal: {type(exc).__name__}: "
                               f"{getattr(exc, 'args', [''])[0] if not isinstance(exc, OSError) else exc.strerror}") from None
        async with self._pool.acquire() as c:
            async with c.transaction():
                # one instance at a time creates the schema
                await c.execute("SELECT pg_advisory_xact_lock(8583008583)")
                await c.execute(_pg_schema())
                for table, added in ADDED_COLUMNS:
                    have = {r[0] for r in await c.fetch(
                        "SELECT column_name FROM information_schema.columns "
                        "WHERE table_schema = current_schema() AND table_name = $1", table)}
                    for col, decl, backfill in added:
                        if col not in have:
                            # (PostgreSQL's REAL is single precision: epoch seconds need double)
                            decl = re.sub(r"\bREAL\b", "DOUBLE PRECISION", decl)
                            await c.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
                            if backfill:
                                await c.execute(backfill)
                for stmt in SCHEMA_AFTER_COLUMNS:
                    await c.execute(stmt)
                await c.execute("INSERT INTO journal_meta (k, v) VALUES ('schema_version', $1) "
                                "ON CONFLICT (k) DO NOTHING", SCHEMA_VERSION)

    async def _close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _p(self):
        if self._pool is None:
            raise JournalError("journal is closed")
        return self._pool

    # Heartbeats and the test for a dead peer run on the database's clock:
    # the processes sharing it may run on hosts whose clocks disagree, and a
    # peer whose clock ran ahead by more than stale_after minus the heartbeat
    # period took a live process for dead, reversing its requests in flight.
    _DB_NOW = "extract(epoch FROM clock_timestamp())::float8"

    @_tracks_writes
    async def _heartbeat(self) -> None:
        await self._p().execute(
            "INSERT INTO journal_node (boot_id, node_id, started_at, heartbeat_at) VALUES "
            f"($1, $2, {self._DB_NOW}, {self._DB_NOW}) "
            "ON CONFLICT (boot_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at", self.boot_id, self.node_id)

    async def _dead_params_now(self, c=None) -> tuple:
        now = await (c or self._p()).fetchval("SELECT " + self._DB_NOW)
        return self._dead_params(float(now))

    async def claim_stan_block(self, blocks: int) -> int | None:
        """The lowest block no live instance holds (live as for recovery: a
        fresh heartbeat, of another node -- a previous life of this node_id
        holds nothing), recorded with this boot's heartbeat row; the row is
        deleted at close, which frees it. One claim at a time (an advisory
        lock), so two starting processes never take the same block."""
        if blocks < 2:
            return None
        async with self._p().acquire() as c:
            async with c.transaction():
                await c.execute("SELECT pg_advisory_xact_lock(8583008584)")
                boot, fresh, node = await self._dead_params_now(c)
                taken = {r[0] for r in await c.fetch(
                    "SELECT stan_block FROM journal_node WHERE stan_block IS NOT NULL AND boot_id <> $1 "
                    "AND heartbeat_at >= $2 AND node_id <> $3", boot, fresh, node)}
                block = next((b for b in range(blocks) if b not in taken), None)
                if block is not None:
                    await c.execute("UPDATE journal_node SET stan_block = $1 WHERE boot_id = $2", block, boot)
                return block

    async def _node_gone(self) -> None:
        await self._p().execute(self._q(SQL_NODE_DELETE), self.boot_id)

    @_tracks_writes
    async def _insert_txn(self, params: tuple) -> int | None:
        return await self._p().fetchval(self._q(SQL_INSERT_TXN), *params)

    @_tracks_writes
    async def _insert_forwarded(self, txn, acquirer, link_stan, now, reversal_fields):
        params = self._received_params(txn)
        blob = self.keyring.encrypt(_pack(sanitize_fields(reversal_fields)), _txn_key_aad(*params[1:5]))
        return await self._p().fetchval(self._q(SQL_INSERT_FWD), *params, acquirer, link_stan, now, blob)

    @staticmethod
    def _count(status: str) -> int:
        # "UPDATE 1" / "INSERT 0 1" / "DELETE 3"
        try:
            return int(status.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            return 0

    @_tracks_writes
    async def _exec(self, sql: str, params: tuple) -> int:
        return self._count(await self._p().execute(self._q(sql), *params))

    @_tracks_writes
    async def _api_update(self, api_id, changes_packed):
        async with self._p().acquire() as c, c.transaction():
            return await self._api_update_on(c, api_id, changes_packed)

    async def _api_update_on(self, c, api_id, changes_packed) -> int:
        """``api_update`` inside the caller's transaction on connection ``c``."""
        doc = await c.fetchval(self._q(SQL_API_DOC + " FOR UPDATE"), api_id)
        if doc is None:
            return 0
        new_doc, status, drop_card = api_merge(doc, _unpack(changes_packed))
        return self._count(await c.execute(self._q(SQL_API_SET), new_doc, status, drop_card, api_id))

    @_tracks_writes
    async def _late_response(self, acquirer, link_stan, rc, now, mti=None):
        kinds, txn_ok = late_match_kinds(mti)
        since = now - LATE_MATCH_WINDOW_S
        async with self._p().acquire() as c:
            async with c.transaction():
                txn_id = sf_id = marked = None
                if kinds:
                    r = await c.fetchrow(self._q(SQL_LATE_FIND_SF), acquirer, link_stan, kinds[0], kinds[-1], since)
                    if r is not None:
                        sf_id, txn_id = r[0], r[1]
                        if r[2] == "advice":  # a repeat of the transaction's own advice
                            marked = txn_id
                if sf_id is None and txn_ok:
                    txn_id = marked = await c.fetchval(self._q(SQL_LATE_FIND), acquirer, link_stan, self.boot_id,
                                                       since)
                if marked is not None:
                    await c.execute(self._q(SQL_LATE_TXN), rc, now, marked)
                await c.execute(self._q(SQL_LATE_INSERT), acquirer, link_stan, rc, txn_id, now, sf_id, mti)
                return marked

    @_tracks_writes
    async def _outcome(self, txn_id, response_code, approval_code, doc, latency_ms, now, deliver_by=None) -> int:
        packed = _pack(sanitize_replay(doc))
        if deliver_by is None:
            return await self._exec(SQL_OUTCOME, (response_code, approval_code, packed, latency_ms, now, txn_id))
        async with self._p().acquire() as c:
            # the time it is sent, after any wait for a pooled connection
            return await c.fetchval(SQL_OUTCOME_BY_PG, response_code, approval_code, packed, latency_ms,
                                    time.time(), txn_id, float(deliver_by))

    @_tracks_writes
    async def _outcome_api(self, txn_id, response_code, approval_code, doc, latency_ms, now, attach,
                           deliver_by=None) -> int:
        packed = _pack(sanitize_replay(doc))
        params, idem_params, *parent = attach
        async with self._p().acquire() as c:
            async with c.transaction():
                if deliver_by is None:
                    n = self._count(await c.execute(self._q(SQL_OUTCOME), response_code, approval_code, packed,
                                                    latency_ms, now, txn_id))
                else:
                    n = await c.fetchval(SQL_OUTCOME_BY_PG, response_code, approval_code, packed, latency_ms,
                                         time.time(), txn_id, float(deliver_by))
                if n != 1:  # no record of an answer that is not the one given
                    return n
                if idem_params is not None:
                    await c.execute(self._q(SQL_API_IDEM_PUT), *idem_params)
                await c.execute(self._q(SQL_API_INSERT), *params)
                if parent and parent[0] is not None:
                    await self._api_update_on(c, *parent[0])
        return n

    @_tracks_writes
    async def _api_put_idem(self, params: tuple, idem_params: tuple):
        async with self._p().acquire() as c:
            async with c.transaction():
                await c.execute(self._q(SQL_API_IDEM_PUT), *idem_params)
                await c.execute(self._q(SQL_API_INSERT), *params)
        return 1

    @_tracks_writes
    async def api_idem_claim(self, owner: str, idem_key: str, fingerprint: str,
                             stale_before: float, not_before: float = 0.0) -> tuple[bool, str | None] | None:
        owner, idem_key = str(owner), str(idem_key)
        fingerprint = self.keyring.request_digest(str(fingerprint))
        async with self._p().acquire() as c:
            claimed = await c.fetchval(
                "INSERT INTO api_idem (owner, idem_key, fingerprint, api_id, created_ts) "
                "VALUES ($1, $2, $3, NULL, $4) ON CONFLICT (owner, idem_key) DO NOTHING RETURNING 1",
                owner, idem_key, str(fingerprint), time.time())
            if claimed:
                return None
            # a claim whose process died before writing the payment (its request
            # was never forwarded or is reversed by recovery), or a key past its
            # idempotency window: this request runs, under a new claim
            took = await c.fetchval(
                "UPDATE api_idem SET fingerprint = $3, created_ts = $4, api_id = NULL WHERE owner = $1 "
                "AND idem_key = $2 AND ((api_id IS NULL AND created_ts < $5) OR created_ts < $6) RETURNING 1",
                owner, idem_key, str(fingerprint), time.time(), float(stale_before), float(not_before))
            if took:
                return None
            r = await c.fetchrow(self._q(SQL_API_IDEM_GET), owner, idem_key)
        return None if r is None else (hmac.compare_digest(r[0], fingerprint), r[1])

    @_tracks_writes
    async def api_idem_release(self, owner: str, idem_key: str) -> None:
        await self._p().execute("DELETE FROM api_idem WHERE owner = $1 AND idem_key = $2 AND api_id IS NULL",
                                str(owner), str(idem_key))

    @_tracks_writes
    async def api_lock_take(self, api_id: str, owner: str, until: float) -> bool:
        # one statement: a new lease, or the takeover of an expired one
        return bool(await self._p().fetchval(
            "INSERT INTO api_lock (id, owner, until) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE "
            "SET owner = excluded.owner, until = excluded.until WHERE api_lock.until < $4 RETURNING 1",
            str(api_id), str(owner), float(until), time.time()))

    @_tracks_writes
    async def api_lock_release(self, api_id: str, owner: str) -> None:
        await self._p().execute("DELETE FROM api_lock WHERE id = $1 AND owner = $2", str(api_id), str(owner))

    @_tracks_writes
    async def _sf_insert(self, acquirer, kind, txn_id, blob, now, next_at, wire_stan=None,
                         wire_time=None) -> tuple[int | None, bool]:
        async with self._p().acquire() as c:
            async with c.transaction():
                if txn_id is not None:
                    # the row lock orders this against another process's
                    # enqueue or crash recovery of the same transaction
                    await c.execute(self._q(SQL_SF_TXN_LOCK), txn_id)
                    queued = await c.fetchval(self._q(SQL_SF_TXN_ENTRY), txn_id, kind)
                    if queued is not None:
                        return queued, False
                entry_id = await c.fetchval(self._q(SQL_SF_INSERT), acquirer, kind, txn_id, blob,
                                            "queued", now, next_at, wire_stan, wire_time)
                if txn_id is not None:  # the transaction's unknown outcome is this entry's now
                    await c.execute(self._q(SQL_SF_MARK_TXN), txn_id)
                return entry_id, True

    @_tracks_writes
    async def _sf_claim(self, acquirer, worker, now, lease_until, boot):
        r = await self._p().fetchrow(self._q(SQL_SF_CLAIM_PG), acquirer, now, now, worker, lease_until, boot)
        return None if r is None else tuple(r.values())

    @_tracks_writes
    async def _recover(self) -> int:
        async with self._p().acquire() as c:
            dead = await self._dead_params_now(c)
            async with c.transaction():
                released = self._count(await c.execute(self._q(SQL_SF_RELEASE_DEAD), *dead))
                rows = await c.fetch(self._q(SQL_RECOVER_SELECT + " FOR UPDATE OF t SKIP LOCKED"), *dead)
                plan = self._recovery_plan([tuple(r.values()) for r in rows])
                now = time.time()
                for txn_id, acquirer, kind, state, payload, reason, wire_stan, wire_time in plan:
                    entry_id = await c.fetchval(self._q(SQL_SF_INSERT), acquirer, kind, txn_id, payload,
                                                state, now, now, wire_stan, wire_time)
                    if reason:
                        await c.execute("UPDATE sf_queue SET parked_reason = $1, parked_at = $2 WHERE id = $3",
                                        reason, now, entry_id)
                    await c.execute(self._q(SQL_RECOVER_MARK), txn_id)
                await c.execute(self._q(SQL_ABANDON), *dead)
        self.leases_released += released
        if released:
            log.warning("crash recovery: released %d store-and-forward lease(s) of dead instances "
                        "(their entries go again first, as repeats)", released)
        return len(plan)

    async def _fetchone(self, sql: str, params: tuple):
        r = await self._p().fetchrow(self._q(sql), *params)
        return None if r is None else tuple(r.values())

    async def _fetchall(self, sql: str, params: tuple, slow: bool = True) -> list:
        return [tuple(r.values()) for r in await self._p().fetch(self._q(sql), *params)]

    # -- for tests and tools

    async def table_names(self) -> list[str]:
        rows = await self._p().fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        return [r[0] for r in rows]


# --------------------------------------------------------------------------


class NullJournal:
    """No journal at all: for measuring what journaling costs (the bench), never for traffic.

    Nothing survives the process: no crash recovery, retransmissions are
    caught only while in flight. Store-and-forward entries are kept in memory
    so reversals still go out while the process lives.
    """

    durable = False

    def __init__(self):
        self._ids = 0
        self._sf: dict[int, SfEntry] = {}
        self._payloads: dict[int, dict] = {}

    async def start(self):
        return None

    async def close(self):
        return None

    async def record_received(self, txn) -> int:
        self._ids += 1
        return self._ids

    async def record_forwarded(self, *a, **k):
        return None

    async def record_received_forwarded(self, *a, **k) -> int:
        self._ids += 1
        return self._ids

    async def record_outcome(self, *a, **k):
        return None

    async def record_timeout(self, *a, **k):
        return None

    async def record_late_response(self, *a, **k):
        return None

    async def find_duplicate(self, *a, **k):
        return None, None

    async def find_txn(self, *a, **k):
        return None

    async def find_latest_txn(self, *a, **k):
        return None

    async def recover_and_enqueue(self) -> int:
        return 0

    async def sf_enqueue(self, acquirer, kind, txn_id, payload_fields, *, next_at=None, wire=None) -> int:
        return (await self.sf_enqueue_once(acquirer, kind, txn_id, payload_fields, next_at=next_at, wire=wire))[0]

    async def sf_enqueue_once(self, acquirer, kind, txn_id, payload_fields, *, next_at=None,
                              wire=None) -> tuple[int, bool]:
        self._ids += 1
        now = time.time()
        e = self._sf[self._ids] = SfEntry(self._ids, acquirer, kind, txn_id, "queued", now,
                                          now if next_at is None else next_at, 0, 0)
        if wire is not None:
            e.wire_stan, e.wire_time = wire
        self._payloads[self._ids] = dict(payload_fields)
        return self._ids, True

    async def sf_cancel_unsent(self, entry_id, reason) -> bool:
        e = self._sf.get(entry_id)
        if e is None or e.sent or e.lease_owner is not None:
            return False
        return await self.sf_ack(entry_id)  # (acknowledged entries are not kept)

    async def sf_cancel_parked(self, entry_id, reason) -> bool:
        e = self._sf.get(entry_id)
        return e is not None and e.state == "parked" and await self.sf_ack(entry_id)

    async def sf_for_txn(self, txn_id, kind):
        return next((e for e in reversed(self._sf.values()) if e.txn_id == txn_id and e.kind == kind), None)

    async def sf_claim(self, acquirer, worker_id, lease_s=30.0):
        now = time.time()
        for e in self._sf.values():
            if e.acquirer == acquirer and e.state == "queued" and e.next_at <= now:
                e.claims += 1
                e.payload = self._payloads[e.id]
                return e
        return None

    async def sf_ack(self, entry_id) -> bool:
        self._payloads.pop(entry_id, None)
        return self._sf.pop(entry_id, None) is not None

    async def sf_retry(self, entry_id, next_at, error, *, sent=True) -> bool:
        e = self._sf.get(entry_id)
        if e is not None:
            e.attempts += 1
            e.sent += 1 if sent else 0
            e.next_at = next_at
            e.last_error = error
        return e is not None

    async def sf_mark_wire(self, entry_id, stan, tx_time) -> bool:
        e = self._sf.get(entry_id)
        if e is not None and e.wire_stan is None:
            e.wire_stan, e.wire_time = stan, tx_time
        return e is not None

    async def sf_park(self, entry_id, reason, *, sent=True) -> bool:
        e = self._sf.get(entry_id)
        if e is not None:
            e.sent += 1 if sent else 0
            e.state = "parked"
            e.parked_reason = reason
        return e is not None

    async def sf_requeue(self, entry_id) -> bool:
        e = self._sf.get(entry_id)
        if e is not None and e.state == "parked":
            e.state, e.attempts, e.next_at = "queued", 0, time.time()
            e.requeued_at, e.requeued_sent = e.next_at, e.sent
            return True
        return False

    async def sf_get(self, entry_id):
        return self._sf.get(entry_id)

    async def sf_list(self, parked=None, acquirer=None, **k):  # (acknowledged entries are not kept)
        return [e for e in self._sf.values()
                if (parked is None or (e.state == "parked") == parked)
                and (acquirer is None or e.acquirer == acquirer)]

    async def sf_depth(self, acquirer=None) -> int:
        return sum(1 for e in self._sf.values() if e.state == "queued"
                   and (acquirer is None or e.acquirer == acquirer))

    async def sf_parked_count(self) -> int:
        return sum(1 for e in self._sf.values() if e.state == "parked")


def stan_block_range(block: int, blocks: int) -> tuple[int, int]:
    """The trace numbers (DE11, 1..999999) of ``block`` of ``blocks``: equal
    consecutive ranges, the remainder left unused."""
    if not 0 <= block < blocks:
        raise ValueError(f"block {block} is not one of 0..{blocks - 1}")
    size = 999_999 // blocks
    return block * size + 1, (block + 1) * size


def make_journal(config, keyring: KeyRing, **kwargs) -> Journal:
    """A journal for ``switch.config.JournalConfig`` (backend sqlite | postgres | memory | none)."""
    backend = config.backend
    if backend == "none":
        return NullJournal()
    if backend == "sqlite":
        if config.path is None:
            raise JournalError("journal.path is required for the sqlite backend")
        return SqliteJournal(config.path, keyring, group_commit_ms=config.group_commit_ms,
                             retention_days=config.retention_days, stale_after=config.stale_after_seconds,
                             **kwargs)
    if backend == "memory":
        return SqliteJournal(":memory:", keyring, group_commit_ms=config.group_commit_ms,
                             retention_days=config.retention_days, **kwargs)
    if backend == "postgres":
        if not config.dsn:
            raise JournalError("journal.dsn is required for the postgres backend")
        return PostgresJournal(config.dsn, keyring, retention_days=config.retention_days,
                               stale_after=config.stale_after_seconds, **kwargs)
    raise JournalError(f"unknown journal backend {backend!r}")
