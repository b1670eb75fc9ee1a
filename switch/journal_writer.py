"""The SQLite journal's writer: a child process that owns every write.

Why a process and not a thread: the writer's work (masking, the HMAC
fingerprint, msgpack, AES-GCM, binding parameters, index maintenance) is a
large share of a transaction's cost, and in a thread it competes with the
event loop for the GIL -- every ``sqlite3_step`` releases and re-takes it, so
the two threads ping-pong instead of running in parallel. Measured on the
bench (2 cores, closed loop): with a writer thread the switch process spent
about 180 us of CPU per transaction against 63 us without a journal. A child
process runs the same work on the other core; the event loop only packs a
small msgpack tuple per write and reads one reply per group.

Protocol over a private ``socketpair`` (msgpack stream, both directions):

* parent -> child, first message: the init map (database path, pragmas, key
  material, node and boot ids); then ``(seq, op, args)`` per write, or
  ``(0, "stop", ())``.
* child -> parent: ``("ready", None)`` or ``("error", message)`` after init;
  then per committed group ``("g", n, [(seq, ok, value), ...], health)``. A
  write's reply is sent only after the COMMIT holding it returned, so a
  caller's ``await`` still means "durable" (DESIGN.md invariant 2).
  ``health``: ``[reason, n]`` when n writes of the group failed for want of
  storage (disk full, I/O error, ...: the journal is not ready), ``True``
  when none did and one that needs new space (an insert) committed (ready
  again), else None.

The child ignores SIGINT/SIGTERM (a Ctrl-C or a service manager's TERM to the
process group must not kill it before the parent has journaled its last
outcomes) and exits when the parent closes the socket -- including when the
parent is killed, because the kernel closes the parent's end.
"""
from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import msgpack

from switch.messages import mask_pan

log = logging.getLogger("isoswitch.journal")

MAX_GROUP = 1024
# writes that need new space (rows inserted): one committed proves the
# database can grow again after a failure for want of storage
_ALLOCATING = frozenset(("fwd", "received", "sf_insert", "late", "api_put", "outcome_api", "probe"))
# SQLite primary result codes of storage failures (not of a bad statement or a
# constraint): BUSY, LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN,
# PROTOCOL, NOTADB
_STORAGE_CODES = frozenset((5, 6, 7, 8, 10, 11, 13, 14, 15, 26))
# the hot path's writes, run in batches when consecutive in a group (WriterCore._run_batch)
_BATCHED = frozenset(("fwd", "outcome"))
FLUSH_AT = 32  # writes buffered in one loop iteration before they are sent early (bench: ~+7% journal-on TPS)
_RECV = 1 << 20


def _packb(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True)


def _unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, strict_map_key=False, use_list=False,
                            max_buffer_size=256 * 1024 * 1024)


def storage_failure(exc: BaseException) -> str | None:
    """SQLite's own message (e.g. "database or disk is full") when ``exc`` is a
    failure of the storage rather than of the statement, else None."""
    if not isinstance(exc, sqlite3.Error) or isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError,
                                                              sqlite3.InterfaceError)):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return str(exc) if isinstance(exc, sqlite3.OperationalError) else None
    return str(exc) if (code & 0xFF) in _STORAGE_CODES else None


# --------------------------------------------------------------------------
# The writer core: runs named operations on the writer connection


class WriterCore:
    """Every journal write, by name, on one SQLite connection (the child's)."""

    def __init__(self, conn: sqlite3.Connection, keyring, node_id: str, boot_id: str):
        from switch import journal as J
        self.J = J
        self.conn = conn
        self.keyring = keyring
        self.node_id = node_id
        self.boot_id = boot_id
        # multi-statement operations pay for a savepoint; single statements are
        # undone by SQLite itself on failure
        self.ops = {
            "fwd": (self.op_fwd, False),
            "received": (self.op_received, False),
            "outcome": (self.op_outcome, False),
            "exec": (self.op_exec, False),
            "late": (self.op_late, True),
            "sf_insert": (self.op_sf_insert, None),
            "sf_claim": (self.op_sf_claim, False),
            "recover": (self.op_recover, True),
            "api_update": (self.op_api_update, False),
            # the key first: a key without its record is harmless (a retry runs
            # the payment), a record without its key is not, so no savepoint
            "api_put": (self.op_api_put, False),
            "idem_get": (self.op_idem_get, False),
            "outcome_api": (self.op_outcome_api, False),
            "probe": (self.op_probe, True),
        }
        # this group's storage failures (reason, count) and whether a write
        # that needs new space succeeded in it (run_group's health report)
        self._storage_error: str | None = None
        self._storage_failed = 0
        self._allocated = False
        self.health = None

    # the journal's card-data helpers, shared with the other backends
    from switch.journal import Journal as _J  # noqa: E402  (class body import: no cycle at module load)
    _decrypt_reversal = _J._decrypt_reversal
    _recovery_plan = _J._recovery_plan
    del _J

    def _params(self, t) -> tuple:
        """``Journal._received_params`` for a TxnRecord sent as ``journal._txn_tuple``."""
        pan = t[8]
        return (t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7],
                mask_pan(pan) if pan else None, self.keyring.pan_fingerprint(pan) if pan else None,
                t[9], t[10], self.node_id, self.boot_id)

    def _fwd_row(self, txn, acquirer, link_stan, now, fields_packed) -> tuple:
        """``fields_packed``: msgpack of the sanitized reversal fields (journal.sanitize_fields)."""
        params = self._params(txn)
        blob = self.keyring.encrypt(fields_packed, self.J._txn_key_aad(*params[1:5]))
        return params + (acquirer, link_stan, now, blob)

    def op_fwd(self, *args):
        r = self.conn.execute(self.J.SQL_INSERT_FWD, self._fwd_row(*args)).fetchone()
        return None if r is None else r[0]

    def op_received(self, txn):
        r = self.conn.execute(self.J.SQL_INSERT_TXN, self._params(txn)).fetchone()
        return None if r is None else r[0]

    @staticmethod
    def _outcome_row(txn_id, response_code, approval_code, packed, latency_ms, now, deliver_by=None) -> tuple:
        """``packed``: msgpack of the response as kept for replay (journal.sanitize_replay)."""
        return (response_code, approval_code, packed, latency_ms, now, txn_id)

    def op_outcome(self, *args):
        if len(args) > 6 and args[6] is not None and time.time() >= args[6]:
            return -1  # past its deliver_by (Journal.record_outcome): nothing written
        return self.conn.execute(self.J.SQL_OUTCOME, self._outcome_row(*args)).rowcount

    def op_exec(self, sql, params):
        return self.conn.execute(sql, params).rowcount

    def op_late(self, acquirer, link_stan, rc, now, mti=None):
        """``Journal.record_late_response``: the txn_id whose late answer it is, or None."""
        J, c = self.J, self.conn
        kinds, txn_ok = J.late_match_kinds(mti)
        since = now - J.LATE_MATCH_WINDOW_S
        txn_id = sf_id = marked = None
        if kinds:
            r = c.execute(J.SQL_LATE_FIND_SF, (acquirer, link_stan, kinds[0], kinds[-1], since)).fetchone()
            if r is not None:
                sf_id, txn_id = r[0], r[1]
                if r[2] == "advice":  # a repeat of the transaction's own advice
                    marked = txn_id
        if sf_id is None and txn_ok:
            r = c.execute(J.SQL_LATE_FIND, (acquirer, link_stan, self.boot_id, since)).fetchone()
            if r is not None:
                txn_id = marked = r[0]
        if marked is not None:
            c.execute(J.SQL_LATE_TXN, (rc, now, marked))
        c.execute(J.SQL_LATE_INSERT, (acquirer, link_stan, rc, txn_id, now, sf_id, mti))
        return marked

    def op_sf_insert(self, acquirer, kind, txn_id, blob, now, next_at, wire_stan=None, wire_time=None):
        """[entry id, True], or [the transaction's queued entry's id, False] (``Journal.sf_enqueue_once``)."""
        J, c = self.J, self.conn
        if txn_id is not None:
            queued = c.execute(J.SQL_SF_TXN_ENTRY, (txn_id, kind)).fetchone()[0]
            if queued is not None:
                return [queued, False]
        entry_id = c.execute(J.SQL_SF_INSERT, (acquirer, kind, txn_id, blob, "queued", now, next_at, wire_stan,
                                               wire_time)).fetchone()[0]
        if txn_id is not None:  # the transaction's unknown outcome is this entry's now
            c.execute(J.SQL_SF_MARK_TXN, (txn_id,))
        return [entry_id, True]

    def op_api_put(self, params, idem_params):
        c, J = self.conn, self.J
        c.execute(J.SQL_API_IDEM_PUT_SQLITE, idem_params)
        c.execute(J.SQL_API_INSERT, params)
        return 1

    def op_outcome_api(self, txn_id, response_code, approval_code, packed, latency_ms, now, deliver_by, params,
                       idem_params, parent=None):
        """The outcome, then the API record it answers, then (a follow-up's)
        the changes to its payment's record, ``(api id, packed changes)`` (one
        message: one group). Nothing of the API's when the outcome is not
        written (a record saying approved behind an outcome refused as too
        late would outlive a crash). No savepoint: whichever fails, the flow
        answers 96 (91) and reverses, and the API rewrites its records to say so."""
        c, J = self.conn, self.J
        n = self.op_outcome(txn_id, response_code, approval_code, packed, latency_ms, now, deliver_by)
        if n != 1:
            return n
        if idem_params is not None:
            c.execute(J.SQL_API_IDEM_PUT_SQLITE, idem_params)
        c.execute(J.SQL_API_INSERT, params)
        if parent is not None:
            self.op_api_update(*parent)
        return n

    def op_idem_get(self, params):
        return self.conn.execute(self.J.SQL_API_IDEM_GET, params).fetchone()

    def op_probe(self, nbytes):
        """A row of ``nbytes`` written and deleted (``Journal._probe_write``): it
        needs new pages as a transaction's rows do, so it fails while the
        database cannot grow; nothing of it remains (secure_delete zeroes it)."""
        c = self.conn
        c.execute("INSERT INTO journal_meta (k, v) VALUES ('write_probe', zeroblob(?)) "
                  "ON CONFLICT (k) DO UPDATE SET v = excluded.v", (int(nbytes),))
        c.execute("DELETE FROM journal_meta WHERE k = 'write_probe'")
        return 1

    def op_api_update(self, api_id, changes_packed):
        J, c = self.J, self.conn
        r = c.execute(J.SQL_API_DOC, (api_id,)).fetchone()
        if r is None:
            return 0
        doc, status, drop_card = J.api_merge(r[0], J._unpack(changes_packed))
        return c.execute(J.SQL_API_SET, (doc, status, drop_card, api_id)).rowcount

    def op_sf_claim(self, params):
        return self.conn.execute(self.J.SQL_SF_CLAIM_SQLITE, params).fetchone()

    def op_recover(self, dead):
        """Crash recovery (``Journal.recover_and_enqueue``): [entries queued, leases released]."""
        J, c = self.J, self.conn
        released = c.execute(J.SQL_SF_RELEASE_DEAD_SQLITE, dead).rowcount
        rows = c.execute(J.SQL_RECOVER_SELECT, dead).fetchall()
        plan = self._recovery_plan(rows)
        now = time.time()
        for txn_id, acquirer, kind, state, payload, reason, wire_stan, wire_time in plan:
            entry_id = c.execute(J.SQL_SF_INSERT, (acquirer, kind, txn_id, payload, state, now,
                                                   now, wire_stan, wire_time)).fetchone()[0]
            if reason:
                c.execute("UPDATE sf_queue SET parked_reason = ?, parked_at = ? WHERE id = ?",
                          (reason, now, entry_id))
            c.execute(J.SQL_RECOVER_MARK, (txn_id,))
        c.execute(J.SQL_ABANDON, dead)
        return [len(plan), released]

    def _run_batch(self, segment, results: list) -> None:
        """A run of consecutive "fwd" and "outcome" writes as two ``executemany``
        calls -- the inserts first, then the updates -- instead of one
        ``execute`` each (measured: ~7 us less writer CPU per transaction).

        Reordering them is exact: an outcome updates one existing row by id and
        reads no other row, and a new row's id is unknown to the parent until
        this group commits, so no outcome in the segment can target it. The
        inserts get explicit ids, ``max(id) + 1`` onwards, which is the id
        SQLite itself would give each in turn (the table has no AUTOINCREMENT).
        When a batch does not apply in full (a retransmission's key is already
        journaled, an outcome names an unknown id, any error), it is undone and
        its writes run one by one, so each gets its own result as before.
        """
        conn, J = self.conn, self.J
        fwd_seqs, fwd_rows, out_seqs, out_rows = [], [], [], []
        now = None
        for seq, name, args in segment:
            fwd = name == "fwd"
            if not fwd and len(args) > 6 and args[6] is not None:
                if now is None:
                    now = time.time()
                if now >= args[6]:  # past its deliver_by: refused, as op_outcome
                    results.append((seq, True, -1))
                    continue
            try:
                row = self._fwd_row(*args) if fwd else self._outcome_row(*args)
            except Exception as exc:
                results.append((seq, False, self._failed(exc)))
                continue
            (fwd_seqs if fwd else out_seqs).append(seq)
            (fwd_rows if fwd else out_rows).append(row)
        if fwd_rows:
            first = conn.execute(J.SQL_NEXT_TXN_ID).fetchone()[0]
            ids = range(first, first + len(fwd_rows))
            if self._apply(J.SQL_INSERT_FWD_ID, [(i,) + r for i, r in zip(ids, fwd_rows)]):
                results.extend((seq, True, i) for seq, i in zip(fwd_seqs, ids))
                self._allocated = True
            else:
                self._one_by_one(J.SQL_INSERT_FWD, fwd_seqs, fwd_rows, results, returning=True)
        if out_rows:
            if self._apply(J.SQL_OUTCOME, out_rows):
                results.extend((seq, True, 1) for seq in out_seqs)
            else:
                self._one_by_one(J.SQL_OUTCOME, out_seqs, out_rows, results, returning=False)

    def _apply(self, sql: str, rows: list) -> bool:
        """``executemany`` inside a savepoint: True when every row changed one
        row; otherwise nothing of it remains and the result is False."""
        conn = self.conn
        conn.execute("SAVEPOINT batch")
        try:
            complete = conn.executemany(sql, rows).rowcount == len(rows)
        except sqlite3.Error:
            if not conn.in_transaction:
                raise
            complete = False
        if not complete:
            conn.execute("ROLLBACK TO batch")
        conn.execute("RELEASE batch")
        return complete

    def _one_by_one(self, sql: str, seqs: list, rows: list, results: list, *, returning: bool) -> None:
        conn = self.conn
        for seq, row in zip(seqs, rows):
            try:
                if returning:
                    r = conn.execute(sql, row).fetchone()
                    results.append((seq, True, None if r is None else r[0]))
                    self._allocated = True
                else:
                    results.append((seq, True, conn.execute(sql, row).rowcount))
            except Exception as exc:
                results.append((seq, False, self._failed(exc)))

    def _failed(self, exc: Exception) -> str:
        """The message for one write that failed; raises when SQLite rolled back
        the whole group (then every write in it fails)."""
        storage = storage_failure(exc)
        if storage is not None:
            self._storage_error = storage
            self._storage_failed += 1
        if not self.conn.in_transaction:
            raise sqlite3.OperationalError(f"transaction rolled back: {exc}") from None
        if isinstance(exc, self.J.JournalError):
            return str(exc)
        return f"journal write failed: {type(exc).__name__}: {exc}"

    def _run_one(self, seq, name, args, results: list) -> None:
        conn = self.conn
        spec = self.ops.get(name)
        if spec is None:
            results.append((seq, False, f"journal write failed: unknown operation {name!r}"))
            return
        fn, atomic = spec
        if atomic is None:  # sf_insert: atomic when it also marks the transaction
            atomic = args[2] is not None
        if atomic:
            conn.execute("SAVEPOINT op")
        try:
            results.append((seq, True, fn(*args)))
            if name in _ALLOCATING:
                self._allocated = True
        except Exception as exc:
            results.append((seq, False, self._failed(exc)))
            if atomic:
                conn.execute("ROLLBACK TO op")
        if atomic:
            conn.execute("RELEASE op")

    def _abandon(self, group, message: str, exc: BaseException) -> list:
        """Every write of ``group`` failed: nothing of it was committed."""
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        # a group that cannot begin or commit (or was rolled back whole) is
        # the storage failing, whatever the code: nothing could be written
        if self._storage_error is None:
            self._storage_error = storage_failure(exc) or str(exc)
        self._storage_failed = len(group)
        self._allocated = False
        return [(s, False, message) for s, _op, _a in group]

    def run_group(self, group) -> list:
        """Run ``[(seq, op, args), ...]`` in one transaction; ``[(seq, ok, value), ...]`` after COMMIT.
        ``health`` then holds the group's health report (module docstring)."""
        self._storage_error = None
        self._storage_failed = 0
        self._allocated = False
        results = self._run_group(group)
        if self._storage_error is not None:
            self.health = [self._storage_error, self._storage_failed]
        else:
            self.health = True if self._allocated else None
        return results

    def _run_group(self, group) -> list:
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            return self._abandon(group, f"journal write failed: {exc}", exc)
        results: list = []
        try:
            i, n = 0, len(group)
            while i < n:
                seq, name, args = group[i]
                j = i + 1
                if name in _BATCHED:
                    while j < n and group[j][1] in _BATCHED:
                        j += 1
                if j - i > 1:
                    self._run_batch(group[i:j], results)
                else:
                    self._run_one(seq, name, args, results)
                i = j
        except sqlite3.Error as exc:  # the transaction itself is broken
            return self._abandon(group, f"journal write failed: {exc}", exc)
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            return self._abandon(group, f"journal commit failed: {exc}", exc)
        return results


def open_writer_connection(path: str, synchronous: str) -> sqlite3.Connection:
    from switch import journal as J
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA busy_timeout = 30000")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise J.JournalError(f"{path}: cannot switch the database to WAL mode")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    # deleted ciphertext is overwritten, not left in free pages
    conn.execute("PRAGMA secure_delete = ON")
    # the hot indexes stay in memory (64 MiB page cache, the writer's own)
    conn.execute("PRAGMA cache_size = -65536")
    # savepoint (statement) journals in memory: each group's two batch
    # savepoints otherwise spill the original of every page they touch to a
    # temporary file once past 64 KiB (~23% of the writer's pwrite calls in
    # the bench, measured with strace)
    conn.execute("PRAGMA temp_store = MEMORY")
    conn.executescript(J._SCHEMA_SQLITE)
    _add_missing_columns(conn)
    conn.execute("INSERT OR IGNORE INTO journal_meta (k, v) VALUES ('schema_version', ?)",
                 (J.SCHEMA_VERSION,))
    return conn


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Bring a journal written by an earlier version up to date (``journal.ADDED_COLUMNS``)."""
    from switch import journal as J
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, added in J.ADDED_COLUMNS:
            have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            for col, decl, backfill in added:
                if col not in have:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
                    if backfill:
                        conn.execute(backfill)
        for stmt in J.SCHEMA_AFTER_COLUMNS:
            conn.execute(stmt)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


# --------------------------------------------------------------------------
# The child process


class _Channel:
    """Blocking msgpack framing over the child's end of the socketpair."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.pack = _packer().pack
        self.unpacker = _unpacker()
        self.eof = False

    def _recv(self) -> None:
        data = self.sock.recv(_RECV)
        if not data:
            self.eof = True
        else:
            self.unpacker.feed(data)

    def read_one(self):
        while True:
            for msg in self.unpacker:
                return msg
            if self.eof:
                return None
            self._recv()

    def read_group(self, linger_s: float, out: list) -> None:
        """Append at least one message (unless EOF), then whatever else arrives within ``linger_s``."""
        for msg in self.unpacker:
            out.append(msg)
        while not out and not self.eof:
            self._recv()
            out.extend(self.unpacker)
        deadline = time.monotonic() + linger_s
        while len(out) < MAX_GROUP and not self.eof:
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.sock], [], [], max(0.0, left))
            if not r:
                break
            self._recv()
            out.extend(self.unpacker)

    def send(self, obj) -> None:
        self.sock.sendall(self.pack(obj))


def child_main(fd: int) -> int:
    prof_path = os.environ.get("ISOSWITCH_JOURNAL_WRITER_PROFILE")
    if prof_path:  # a development aid: cProfile stats of the writer, written at exit
        import cProfile
        prof = cProfile.Profile()
        try:
            return prof.runcall(_child_main, fd)
        finally:
            prof.dump_stats(prof_path)
    return _child_main(fd)


def _child_main(fd: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    ch = _Channel(sock)
    init = ch.read_one()
    if init is None:
        return 0
    try:
        from switch.keys import KeyRing
        keyring = KeyRing._from_material(init["keys"])
        conn = open_writer_connection(init["path"], init["synchronous"])
        core = WriterCore(conn, keyring, init["node_id"], init["boot_id"])
    except BaseException as exc:
        ch.send(("error", f"{init.get('path')}: cannot open the journal: {exc}"))
        return 1
    group_commit_s = max(0.0, float(init.get("group_commit_s") or 0.0))
    del init
    from switch.runtime import tune_gc

    tune_gc()
    ch.send(("ready", None))
    last_group = 1
    stopping = False
    while not stopping:
        batch: list = []
        ch.read_group(group_commit_s if last_group > 1 else 0.0, batch)
        if not batch:
            break  # EOF: the parent is gone
        for i, msg in enumerate(batch):
            if msg[1] == "stop":
                stopping = True
                del batch[i:]
                break
        last_group = len(batch)
        for k in range(0, len(batch), MAX_GROUP):
            group = batch[k:k + MAX_GROUP]
            results = core.run_group(group)
            ch.send(("g", len(group), results, core.health))
    try:
        conn.close()
    finally:
        sock.close()
    return 0


# --------------------------------------------------------------------------
# The parent's side


class ProcessWriter(asyncio.Protocol):
    """The event loop's handle on the writer child: ``submit(op, args)`` -> future of the value."""

    def __init__(self, path: Path, synchronous: str, keyring, node_id: str, boot_id: str,
                 group_commit_s: float, stats: dict, on_health=None):
        self.path = str(path)
        self.synchronous = synchronous
        self._keyring = keyring
        self.node_id = node_id
        self.boot_id = boot_id
        self.group_commit_s = group_commit_s
        self.stats = stats
        self.loop: asyncio.AbstractEventLoop | None = None
        self.transport: asyncio.Transport | None = None
        self.proc: subprocess.Popen | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._seq = 0
        self._buf: list[bytes] = []
        self._pack = _packer().pack
        self._flush_scheduled = False
        self._unpacker = _unpacker()
        self._ready: asyncio.Future | None = None
        self._lost: asyncio.Future | None = None
        self.error: str | None = None
        self._stopping = False
        self._respawn: asyncio.Task | None = None
        # on_health(reason, n) when n writes failed for want of storage,
        # on_health(None) when a write that needs space succeeds after that
        self._on_health = on_health
        self._storage_failing = False

    # -- lifecycle

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self._spawn()

    async def _spawn(self) -> None:
        from switch.journal import JournalError
        loop = self.loop
        self._unpacker = _unpacker()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = dict(os.environ)
            # the child imports this package from wherever the parent did
            root = str(Path(__file__).resolve().parent.parent)
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            cmd = [sys.executable, "-c",
                   "import sys; from switch.journal_writer import child_main; "
                   "sys.exit(child_main(int(sys.argv[1])))", str(child.fileno())]
            self.proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), env=env, close_fds=True,
                                         stdin=subprocess.DEVNULL)
        except OSError as exc:
            parent.close()
            raise JournalError(f"{self.path}: cannot start the journal writer: {exc}") from None
        finally:
            child.close()
        self._ready = loop.create_future()
        self._lost = loop.create_future()
        parent.setblocking(False)
        await loop.create_unix_connection(lambda: self, sock=parent)
        self.transport.write(_packb({
            "path": self.path, "synchronous": self.synchronous, "keys": self._keyring._material(),
            "node_id": self.node_id, "boot_id": self.boot_id, "group_commit_s": self.group_commit_s,
        }))
        try:
            await self._ready
        except BaseException:
            await self._reap(kill=True)
            raise

    async def _restart(self) -> None:
        """A new writer child after the last one died, with backoff: journal
        writes fail (and the flow answers 96) only while it is down."""
        delay = 0.2
        while not self._stopping:
            await self._reap(kill=True)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._spawn()
            except Exception as exc:  # any failure: try again later, never give up silently
                delay = min(delay * 2, 10.0)
                log.error("journal writer restart failed (%s); next attempt in %.1f s", exc, delay)
                continue
            self.stats["restarts"] = self.stats.get("restarts", 0) + 1
            self.error = None
            log.warning("journal writer restarted; journal writes resume")
            return

    async def stop(self) -> None:
        self._stopping = True
        if self._respawn is not None and not self._respawn.done():
            self._respawn.cancel()
            try:
                await self._respawn
            except asyncio.CancelledError:
                pass
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.write(_packb((0, "stop", ())))
        if self._lost is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._lost), 30.0)
            except asyncio.TimeoutError:
                log.error("journal writer did not stop within 30 s; killing it")
        if self.transport is not None:
            self.transport.close()
        await self._reap(kill=False)

    async def _reap(self, kill: bool) -> None:
        proc = self.proc
        if proc is None:
            return
        if kill:
            proc.kill()
        try:
            await asyncio.to_thread(proc.wait, 10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        self.proc = None

    # -- writes

    def submit(self, op: str, args: tuple) -> asyncio.Future:
        if self.error is not None:
            from switch.journal import JournalError
            raise JournalError(self.error)
        self._seq += 1
        seq = self._seq
        fut = self.loop.create_future()
        self._pending[seq] = fut
        buf = self._buf
        buf.append(self._pack((seq, op, args)))
        if len(buf) >= FLUSH_AT:
            # a busy iteration hands the writer work as it goes, so it commits
            # while the loop is still producing instead of after it
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)
        return fut

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        if self._buf and self.transport is not None and not self.transport.is_closing():
            data = b"".join(self._buf) if len(self._buf) > 1 else self._buf[0]
            self._buf.clear()
            self.transport.write(data)

    # -- asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._unpacker.feed(data)
        for msg in self._unpacker:
            kind = msg[0]
            if kind == "g":
                st = self.stats
                n = msg[1]
                st["groups"] += 1
                st["writes"] += n
                if n > st["max_group"]:
                    st["max_group"] = n
                pending = self._pending
                JournalError = None
                for seq, ok, val in msg[2]:
                    if not ok:
                        st["write_failures"] = st.get("write_failures", 0) + 1
                    fut = pending.pop(seq, None)
                    if fut is None or fut.done():
                        continue
                    if ok:
                        fut.set_result(val)
                    else:
                        if JournalError is None:
                            from switch.journal import JournalError
                        fut.set_exception(JournalError(val))
                health = msg[3] if len(msg) > 3 else None
                if health is not None:
                    self._health(health)
            elif kind == "ready":
                if not self._ready.done():
                    self._ready.set_result(None)
            elif kind == "error":
                from switch.journal import JournalError
                self.error = str(msg[1])
                if not self._ready.done():
                    self._ready.set_exception(JournalError(self.error))

    def _health(self, health) -> None:
        # reported before the futures' callbacks run (they are scheduled), so
        # a caller that sees its write fail finds problem() saying why
        if health is True:
            if not self._storage_failing:
                return
            self._storage_failing = False
            reason, n = None, 0
        else:
            self._storage_failing = True
            reason, n = str(health[0]), int(health[1])
        if self._on_health is not None:
            self._on_health(reason, n)

    def connection_lost(self, exc) -> None:
        from switch.journal import JournalError
        self._buf.clear()  # their futures fail below: never sent to a later writer
        # restart a writer that was serving, not one that failed to start
        ready = self._ready is not None and self._ready.done() and not self._ready.cancelled() \
            and self._ready.exception() is None
        if self.error is None:
            self.error = "journal writer has stopped"
            if not self._stopping:
                # writes fail (the flow answers 96, and reverses what an acquirer
                # answered) until a new writer runs; /readyz reports it meanwhile
                code = self.proc.poll() if self.proc is not None else None
                log.critical("journal writer process exited unexpectedly (exit status %s); "
                             "journal writes fail until it is restarted", code)
        if not self._stopping and ready and (self._respawn is None or self._respawn.done()):
            self._respawn = self.loop.create_task(self._restart(), name="journal-writer-restart")
        err = JournalError(self.error)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(err)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(JournalError(self.error))
        self._pending.clear()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
