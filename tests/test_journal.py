"""The transaction journal and store-and-forward queue, on SQLite and on a real PostgreSQL.

One suite, parametrized over both backends (DESIGN.md invariants 2, 4-7 and
the card-data rules). PostgreSQL tests use a throw-away server started by
tests/pg.py and are skipped (with the reason) when PostgreSQL is missing
outside CI.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from switch.config import JournalConfig
from switch.journal import (
    DuplicateTransaction,
    JournalError,
    PostgresJournal,
    SqliteJournal,
    TxnRecord,
    make_journal,
    sanitize_replay,
    stan_block_range,
)
from switch.keys import DecryptError, KeyFileError, KeyRing, init_keys, rotate_keys
from tests.pg import pg_dsn, pg_server  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.timeout(60)


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------
# Test data


def luhn_complete(prefix: str) -> str:
    """Append the Luhn check digit to ``prefix``."""
    total = 0
    for i, ch in enumerate(reversed(prefix)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return prefix + str((10 - total % 10) % 10)


def luhn_ok(pan: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(pan)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def test_pans(n: int, seed: int = 8583) -> list[str]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        bin_ = ("4", "51", "37", "6011")[i % 4]
        length = 15 if bin_ == "37" else 16
        body = bin_ + "".join(str(rnd.randrange(10)) for _ in range(length - len(bin_) - 1))
        out.append(luhn_complete(body))
    assert all(luhn_ok(p) for p in out)
    return out


test_pans.__test__ = False  # a helper, not a test


def track2(pan: str) -> str:
    return f"{pan}=2512101123456789"


def pin_block(i: int) -> str:
    return hashlib.sha256(b"pin%d" % i).hexdigest()[:16].upper()


_seq = iter(range(1, 10**9))


def txn(terminal="TERM0001", stan=None, tx_time="0520101500", mti="0200", pan="4111111111111111",
        rrn=None, amount=1000, received_at=None) -> TxnRecord:
    stan = stan or f"{next(_seq) % 1000000:06d}"
    return TxnRecord(listener="terminals", terminal_id=terminal, terminal_stan=stan,
                     terminal_tx_time=tx_time, mti=mti, rrn=rrn or f"R{stan}", amount=amount,
                     currency="978", pan=pan, proc_code="000000",
                     received_at=time.time() if received_at is None else received_at)


def acq_fields(pan: str, link_stan: str, i: int = 0) -> dict:
    """What a flow would hand the journal: includes card data that must never be stored."""
    return {"t": "0200", "2": pan, "3": "000000", "4": "000000001000", "7": "0520101500",
            "11": link_stan, "12": "101500", "13": "0520", "14": "2512", "22": "051",
            "32": "123456", "37": f"RRN{link_stan}", "41": "TERM0001", "42": "MERCHANT0000001",
            "49": "978", "35": track2(pan), "52": pin_block(i), "55": "9F2608" + "AB" * 8}


def response_doc(pan: str, rc: str = "00", i: int = 0) -> dict:
    return {"t": "0210", "2": pan, "3": "000000", "4": "000000001000", "11": "000001",
            "37": "RRN000001", "38": "A1B2C3", "39": rc, "41": "TERM0001",
            "35": track2(pan), "52": pin_block(i), "14": "2512"}


# --------------------------------------------------------------------------
# Backends


@dataclass
class Backend:
    name: str
    keyring: KeyRing
    make: Callable[..., object]  # make(keyring=None, **kw) -> unstarted Journal
    path: Path | None = None
    dsn: str | None = None

    async def dump(self) -> tuple[str, list[bytes]]:
        """Every row of every table as text, and the raw storage bytes (SQLite only)."""
        parts: list[str] = []
        raw: list[bytes] = []
        if self.name == "sqlite":
            conn = sqlite3.connect(str(self.path))
            try:
                tables = [r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'")]
                assert {"txn", "sf_queue"} <= set(tables)
                for t in tables:
                    for row in conn.execute(f'SELECT * FROM "{t}"'):
                        parts.append(f"{t}: {row!r}")
                        for v in row:
                            if isinstance(v, bytes):
                                raw.append(v)
            finally:
                conn.close()
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(self.path) + suffix)
                if p.exists():
                    raw.append(p.read_bytes())
        else:
            import asyncpg

            conn = await asyncpg.connect(self.dsn)
            try:
                tables = [r[0] for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
                assert {"txn", "sf_queue"} <= set(tables)
                for t in tables:
                    for row in await conn.fetch(f'SELECT t::text FROM "{t}" t'):
                        parts.append(f"{t}: {row[0]}")
                    for row in await conn.fetch(f'SELECT * FROM "{t}"'):
                        for v in row.values():
                            if isinstance(v, bytes):
                                raw.append(v)
            finally:
                await conn.close()
        return "\n".join(parts), raw

    async def raw_blob(self, table: str, column: str, row_id: int) -> bytes | None:
        sql = f"SELECT {column} FROM {table} WHERE id = "
        if self.name == "sqlite":
            conn = sqlite3.connect(str(self.path))
            try:
                r = conn.execute(sql + "?", (row_id,)).fetchone()
            finally:
                conn.close()
        else:
            import asyncpg

            conn = await asyncpg.connect(self.dsn)
            try:
                r = await conn.fetchrow(sql + "$1", row_id)
            finally:
                await conn.close()
        return None if r is None or r[0] is None else bytes(r[0])


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path) -> Backend:
    keyring = KeyRing.generate()
    if request.param == "sqlite":
        path = tmp_path / "journal.db"

        def make(keyring_=None, **kw):
            kw.setdefault("group_commit_ms", 1.0)
            return SqliteJournal(path, keyring_ or keyring, **kw)

        return Backend("sqlite", keyring, make, path=path)
    dsn = request.getfixturevalue("pg_dsn")

    def make(keyring_=None, **kw):
        return PostgresJournal(dsn, keyring_ or keyring, min_size=1, max_size=8, **kw)

    return Backend("postgres", keyring, make, dsn=dsn)


# --------------------------------------------------------------------------
# Transaction lifecycle


def test_lifecycle_rows(backend):
    async def go():
        j = backend.make()
        await j.start()
        try:
            t0 = time.time()
            rec = txn(terminal="TERMA", stan="000101", rrn="RRN101", received_at=t0)
            tid = await j.record_received(rec)
            row = await j.get(tid)
            assert row["state"] == "received" and row["terminal_id"] == "TERMA"
            assert row["pan_masked"] == "411111******1111"
            assert row["pan_fingerprint"] == backend.keyring.pan_fingerprint("4111111111111111")
            assert row["pan_fingerprint"] != hashlib.sha256(b"4111111111111111").hexdigest()
            assert row["amount"] == 1000 and row["currency"] == "978" and row["mti"] == "0200"

            await j.record_forwarded(tid, "acq-a", "000042", acq_fields("4111111111111111", "000042"))
            row = await j.get(tid)
            assert (row["state"], row["acquirer"], row["link_stan"]) == ("forwarded", "acq-a", "000042")
            assert row["has_reversal_fields"] and row["forwarded_at"] >= row["received_at"]

            await j.record_outcome(tid, "00", "A1B2C3", response_doc("4111111111111111"), 12.5)
            row = await j.get(tid)
            assert (row["state"], row["response_code"], row["approval_code"]) == ("done", "00", "A1B2C3")
            assert row["latency_ms"] == 12.5
            assert not row["has_reversal_fields"], "reversal fields kept after a known outcome"
            assert row["response"] == sanitize_replay(response_doc("4111111111111111"))
            assert row["response"]["2"] == "411111******1111"
            assert not {"14", "35", "52"} & set(row["response"])

            # a second transaction that times out, then gets a late response
            rec2 = txn(terminal="TERMA", stan="000102", rrn="RRN102", received_at=t0 + 1)
            tid2 = await j.record_received(rec2)
            await j.record_forwarded(tid2, "acq-a", "000043", acq_fields("4111111111111111", "000043"))
            await j.record_timeout(tid2)
            assert (await j.get(tid2))["state"] == "timeout"
            await j.record_outcome(tid2, "91", None, {"t": "0210", "39": "91"}, 30000.0)
            row2 = await j.get(tid2)
            assert row2["timed_out_at"] is not None and row2["response_code"] == "91"
            assert row2["has_reversal_fields"], "reversal still pending: fields must stay"
            assert await j.record_late_response("acq-a", "000043", "00") == tid2
            assert (await j.get(tid2))["late_response_code"] == "00"
            assert await j.record_late_response("acq-a", "999999", "00") is None

            # failover: re-forwarding to another acquirer before any outcome
            tid3 = await j.record_received(txn(terminal="TERMB", stan="000103", received_at=t0 + 2))
            await j.record_forwarded(tid3, "acq-a", "000044", {"11": "000044"})
            await j.record_forwarded(tid3, "acq-b", "000001", {"11": "000001"})
            assert (await j.get(tid3))["acquirer"] == "acq-b"
            with pytest.raises(JournalError):
                await j.record_forwarded(tid, "acq-b", "000002", {})  # outcome already known
            with pytest.raises(JournalError):
                await j.record_outcome(10**9, "00", None, {}, 1.0)

            # queries
            assert [r["txn_id"] for r in await j.by_rrn("RRN101")] == [tid]
            assert [r["txn_id"] for r in await j.by_terminal("TERMA")] == [tid, tid2]
            assert [r["txn_id"] for r in await j.by_terminal("TERMA", since=t0 + 0.5)] == [tid2]
            assert [r["txn_id"] for r in await j.by_terminal("TERMA", until=t0 + 0.5)] == [tid]
            assert [r["txn_id"] for r in await j.by_terminal("TERMA", limit=1, offset=1)] == [tid2]
            assert [r["txn_id"] for r in await j.by_time(t0 - 1, t0 + 10)] == [tid, tid2, tid3]
            assert [r["txn_id"] for r in await j.by_time(t0 + 0.5, None, limit=5)] == [tid2, tid3]
            assert await j.get(10**9) is None
            for r in await j.by_time():
                assert "pan" not in r and "reversal_fields" not in r
        finally:
            await j.close()
        with pytest.raises(JournalError):
            await j.record_received(txn())

    run(go())


# --------------------------------------------------------------------------
# Duplicates and replay (invariant 6)


def test_duplicate_detection_and_replay(backend):
    async def go():
        key = ("TERMD", "000777", "0520101500", "0200")
        j = backend.make()
        await j.start()
        try:
            assert await j.find_duplicate(*key) == (None, None)
            tid = await j.record_received(txn(terminal=key[0], stan=key[1], tx_time=key[2], mti=key[3]))
            assert await j.find_duplicate(*key) == ("in_flight", None)
            with pytest.raises(DuplicateTransaction):
                await j.record_received(txn(terminal=key[0], stan=key[1], tx_time=key[2], mti=key[3]))
            # same STAN, different transmission time or MTI: not a duplicate
            assert await j.find_duplicate(key[0], key[1], "0520101501", key[3]) == (None, None)
            assert await j.find_duplicate(key[0], key[1], key[2], "0100") == (None, None)
            await j.record_forwarded(tid, "acq-a", "000001", {"11": "000001"})
            assert await j.find_duplicate(*key) == ("in_flight", None)
            await j.record_outcome(tid, "05", None, response_doc("4111111111111111", "05"), 5.0)
            state, replay = await j.find_duplicate(*key)
            assert state == "done"
            assert replay["39"] == "05" and replay["2"] == "411111******1111"
            assert "35" not in replay and "52" not in replay
        finally:
            await j.close()
        # across a restart
        j2 = backend.make()
        await j2.start()
        try:
            state, replay = await j2.find_duplicate(*key)
            assert state == "done" and replay["39"] == "05"
            with pytest.raises(DuplicateTransaction):
                await j2.record_received(txn(terminal=key[0], stan=key[1], tx_time=key[2], mti=key[3]))
            # concurrent retransmissions: exactly one insert wins
            key2 = ("TERMD", "000778", "0520101500", "0200")
            results = await asyncio.gather(*[
                j2.record_received(txn(terminal=key2[0], stan=key2[1], tx_time=key2[2]))
                for _ in range(5)], return_exceptions=True)
            assert sum(isinstance(r, int) for r in results) == 1
            assert sum(isinstance(r, DuplicateTransaction) for r in results) == 4
        finally:
            await j2.close()

    run(go())


# --------------------------------------------------------------------------
# Encryption of reversal fields, key rotation


def test_switch_processes_creating_the_key_file_at_once_all_get_the_same_keys(tmp_path):
    """Two switch processes started together on a fresh state directory each
    wrote a key file (the second replacing the first) and went on with its own
    keys: what one encrypted, the other could not read (a recovered reversal
    was parked "undecryptable"). Exactly one creation wins; all read its keys."""
    import subprocess
    import sys

    path = tmp_path / "state" / "keys.json"
    code = ("import hashlib, json, sys; from switch.keys import ensure_keys; "
            "m = ensure_keys(sys.argv[1])._material(); "
            "print(hashlib.sha256(json.dumps(m, sort_keys=True, default=str).encode()).hexdigest())")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    digests = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(digests) == 1 and "" not in digests
    from switch.keys import ensure_keys
    on_disk = ensure_keys(path)._material()
    assert hashlib.sha256(json.dumps(on_disk, sort_keys=True, default=str).encode()).hexdigest() in digests
    assert [p.name for p in path.parent.iterdir()] == ["keys.json"], "no temporary file left behind"


def test_reversal_fields_encrypted_and_rotation(backend, tmp_path):
    keyfile = tmp_path / "keys.json"
    init_keys(keyfile)
    pan = test_pans(1)[0]

    async def go():
        kr1 = KeyRing.load(keyfile)
        j = backend.make(kr1, node_id="node-1")
        await j.start()
        try:
            tid = await j.record_received(txn(pan=pan))
            fields = acq_fields(pan, "000501")
            await j.record_forwarded(tid, "acq-a", "000501", fields)
        finally:
            await j.close()
        blob = await backend.raw_blob("txn", "reversal_fields", tid)
        assert blob is not None and pan.encode() not in blob
        assert KeyRing.key_id_of(blob) == "k1"
        with pytest.raises(DecryptError) as ei:
            KeyRing.generate().decrypt(blob, b"isoswitch/txn/%d" % tid)
        assert pan not in str(ei.value)
        with pytest.raises(DecryptError):  # bound to its row
            kr1.decrypt(blob, b"isoswitch/txn/%d" % (tid + 1))

        assert rotate_keys(keyfile) == "k2"
        kr2 = KeyRing.load(keyfile)
        assert kr2.current_key_id == "k2" and kr2.key_ids == ("k1", "k2")
        assert kr2.pan_fingerprint(pan) == kr1.pan_fingerprint(pan)
        j2 = backend.make(kr2, node_id="node-1")
        await j2.start()
        try:
            tid2 = await j2.record_received(txn(pan=pan))
            await j2.record_forwarded(tid2, "acq-a", "000502", acq_fields(pan, "000502"))
            assert KeyRing.key_id_of(await backend.raw_blob("txn", "reversal_fields", tid2)) == "k2"
            # the old row (k1) is still readable after rotation: recovery decrypts it
            found = {r[0]: r for r in await j2.recover_unknown_outcomes()}
            assert set(found) == {tid}  # tid2 belongs to this (live) boot
            _, acquirer, link_stan, got = found[tid]
            assert (acquirer, link_stan) == ("acq-a", "000501")
            expected = {k: v for k, v in fields.items() if k not in ("35", "52", "55")}
            assert got == expected, "reversal fields must round-trip minus track/PIN/ICC data"
        finally:
            await j2.close()

    run(go())


# --------------------------------------------------------------------------
# Store-and-forward (invariant 4)


def test_sf_fifo_per_acquirer_and_retry(backend):
    async def go():
        j = backend.make()
        await j.start()
        try:
            a1 = await j.sf_enqueue("acq-a", "reversal", None, {"11": "1"})
            b1 = await j.sf_enqueue("acq-b", "reversal", None, {"11": "2"})
            a2 = await j.sf_enqueue("acq-a", "advice", None, {"11": "3"})
            a3 = await j.sf_enqueue("acq-a", "reversal", None, {"11": "4"})
            assert await j.sf_depth() == 4 and await j.sf_depth("acq-a") == 3
            e = await j.sf_claim("acq-a", "w1", 30)
            assert (e.id, e.kind, e.payload, e.repeat) == (a1, "reversal", {"11": "1"}, False)
            assert e.lease_owner == "w1" and e.lease_until > time.time()
            # a1 is leased: nothing behind it is claimed, by any claimer (FIFO
            # per acquirer); another acquirer's queue is its own
            assert await j.sf_claim("acq-a", "w2", 30) is None
            assert (await j.sf_claim("acq-b", "w3", 30)).id == b1
            # a1 retried later with backoff: its queue waits for it
            assert await j.sf_retry(a1, time.time() + 0.4, "timeout")
            assert await j.sf_claim("acq-a", "w1", 30) is None
            await asyncio.sleep(0.5)
            e = await j.sf_claim("acq-a", "w1", 30)
            assert e.id == a1 and e.attempts == 1 and e.repeat and e.last_error == "timeout"
            assert await j.sf_ack(a1)
            for x in (a2, a3):
                assert (await j.sf_claim("acq-a", "w2", 30)).id == x
                assert await j.sf_ack(x)
            assert await j.sf_ack(b1)
            assert not await j.sf_ack(a1)  # already acknowledged
            assert await j.sf_depth() == 0
            assert await j.sf_claim("acq-a", "w1", 30) is None
            assert await backend.raw_blob("sf_queue", "payload", a1) is None, "ciphertext kept after ack"
            with pytest.raises(ValueError):
                await j.sf_enqueue("acq-a", "bogus", None, {})
        finally:
            await j.close()

    run(go())


def test_sf_lease_expiry(backend):
    async def go():
        j = backend.make()
        await j.start()
        try:
            eid = await j.sf_enqueue("acq-a", "reversal", None, {"11": "000001"})
            e = await j.sf_claim("acq-a", "dead-worker", 0.3)
            assert e.id == eid and not e.repeat
            assert await j.sf_claim("acq-a", "w2", 30) is None
            await asyncio.sleep(0.4)
            e2 = await j.sf_claim("acq-a", "w2", 30)
            assert e2.id == eid and e2.claims == 2 and e2.repeat, "a re-claimed reversal goes as 0401"
            assert e2.lease_owner == "w2"
        finally:
            await j.close()

    run(go())


def test_sf_concurrent_claimers_each_entry_once(backend):
    """Two journal instances on the same database, two workers each: 200 entries, each claimed once."""
    n = 200

    async def go():
        j1, j2 = backend.make(), backend.make()
        await j1.start()
        await j2.start()
        try:
            ids = [await j1.sf_enqueue("acq-a", "reversal", None, {"11": f"{i:06d}"}) for i in range(n)]
            claimed: list[tuple[str, int]] = []

            async def worker(j, name):
                while True:
                    e = await j.sf_claim("acq-a", name, 60)
                    if e is None:  # the head is another worker's now (FIFO), or all are done
                        if await j.sf_depth("acq-a") == 0:
                            return
                        await asyncio.sleep(0.001)
                        continue
                    claimed.append((name, e.id))
                    assert e.payload == {"11": f"{ids.index(e.id):06d}"}
                    await asyncio.sleep(0)
                    assert await j.sf_ack(e.id)

            await asyncio.gather(worker(j1, "j1w1"), worker(j1, "j1w2"),
                                 worker(j2, "j2w1"), worker(j2, "j2w2"))
            got = [eid for _, eid in claimed]
            assert sorted(got) == sorted(ids), "every entry claimed exactly once"
            assert len(set(got)) == n
            assert len({w for w, _ in claimed}) >= 2, "claims were not concurrent"
            assert await j1.sf_depth() == 0
        finally:
            await j1.close()
            await j2.close()

    run(go())


def test_sf_claim_never_returns_an_entry_acked_meanwhile(backend):
    """Claims racing the head's ack from another process never hand out the acked entry.

    On PostgreSQL the head subquery reads the statement's snapshot; an ack
    committed between that snapshot and the row lock used to slip through
    (the ack clears the lease), so the acked entry came back with no payload.
    """
    n = 600

    async def go():
        j1, j2 = backend.make(), backend.make()
        await j1.start()
        await j2.start()
        try:
            ids = [await j1.sf_enqueue("acq-a", "reversal", None, {"11": f"{i:06d}"}) for i in range(n)]
            acked: set[int] = set()
            handed: list[int] = []
            done = asyncio.Event()

            async def owner():  # claims and acks the head as fast as it can
                while len(acked) < n:
                    e = await j1.sf_claim("acq-a", "owner", 60)
                    if e is None:
                        await asyncio.sleep(0)
                        continue
                    handed.append(e.id)
                    assert e.id not in acked
                    assert await j1.sf_ack(e.id)
                    acked.add(e.id)
                done.set()

            async def racer(name):  # claims without pause; whatever it gets it acks too
                while not done.is_set():
                    e = await j2.sf_claim("acq-a", name, 60)
                    if e is None:
                        await asyncio.sleep(0)
                        continue
                    handed.append(e.id)
                    assert e.id not in acked, f"entry {e.id} claimed after its ack"
                    assert e.payload == {"11": f"{ids.index(e.id):06d}"}
                    assert await j2.sf_ack(e.id)
                    acked.add(e.id)

            await asyncio.wait_for(asyncio.gather(owner(), *(racer(f"r{i}") for i in range(6))), 50)
            assert sorted(handed) == sorted(ids), "every entry handed out exactly once"
            assert await j1.sf_depth() == 0
        finally:
            await j1.close()
            await j2.close()

    run(go())


def test_sf_park_list_requeue(backend):
    async def go():
        j = backend.make()
        await j.start()
        try:
            e1 = await j.sf_enqueue("acq-a", "reversal", None, {"11": "1"})
            e2 = await j.sf_enqueue("acq-b", "advice", None, {"11": "2"})
            c = await j.sf_claim("acq-a", "w", 30)
            assert await j.sf_park(c.id, "50 attempts")
            assert await j.sf_parked_count() == 1 and await j.sf_depth() == 1
            parked = await j.sf_list(parked=True)
            assert [(p.id, p.parked, p.parked_reason) for p in parked] == [(e1, True, "50 attempts")]
            assert parked[0].payload is None, "listing never decrypts payloads"
            assert [p.id for p in await j.sf_list(parked=False)] == [e2]
            assert [p.id for p in await j.sf_list()] == [e1, e2]
            assert [p.id for p in await j.sf_list(acquirer="acq-b")] == [e2]
            assert await j.sf_claim("acq-a", "w", 30) is None, "a parked entry is not sent"
            assert await j.sf_requeue(e1)
            assert not await j.sf_requeue(e1)  # no longer parked
            assert await j.sf_parked_count() == 0
            c = await j.sf_claim("acq-a", "w", 30)
            assert c.id == e1 and c.payload == {"11": "1"} and c.repeat
            assert (await j.sf_get(e1)).state == "queued"
        finally:
            await j.close()

    run(go())


# --------------------------------------------------------------------------
# Crash recovery (invariant 7)


def test_crash_recovery_queues_each_reversal_once(backend):
    pan = test_pans(1)[0]

    async def go():
        a = backend.make(node_id="node-a")
        await a.start()
        t_unknown = await a.record_received(txn(pan=pan))
        await a.record_forwarded(t_unknown, "acq-a", "000011", acq_fields(pan, "000011"))
        t_done = await a.record_received(txn(pan=pan))
        await a.record_forwarded(t_done, "acq-a", "000012", acq_fields(pan, "000012"))
        await a.record_outcome(t_done, "00", "X", response_doc(pan), 3.0)
        # timed out, terminal answered 91, crashed before queueing the reversal
        t_answered = await a.record_received(txn(pan=pan))
        await a.record_forwarded(t_answered, "acq-b", "000013", acq_fields(pan, "000013"))
        await a.record_timeout(t_answered)
        await a.record_outcome(t_answered, "91", None, {"t": "0210", "39": "91"}, 30000.0)
        # timed out, reversal already queued by the flow
        t_queued = await a.record_received(txn(pan=pan))
        await a.record_forwarded(t_queued, "acq-a", "000014", acq_fields(pan, "000014"))
        await a.record_timeout(t_queued)
        flow_entry = await a.sf_enqueue("acq-a", "reversal", t_queued, acq_fields(pan, "000014"))
        assert not (await a.get(t_queued))["has_reversal_fields"], "queue entry holds the copy"
        # received, never forwarded
        key_open = ("TERMO", "000015", "0520101500", "0200")
        await a.record_received(txn(terminal=key_open[0], stan=key_open[1], tx_time=key_open[2]))

        b = backend.make(node_id="node-b")
        await b.start()
        try:
            # node-a is alive (fresh heartbeat): its in-flight requests are not touched
            assert await b.recover_unknown_outcomes() == []
            assert await b.recover_and_enqueue() == 0
            await a.close()  # node-a goes away
            pending = {r[0]: r for r in await b.recover_unknown_outcomes()}
            assert set(pending) == {t_unknown, t_answered}
            assert pending[t_unknown][3]["2"] == pan and "35" not in pending[t_unknown][3]
            assert await b.recover_and_enqueue() == 2
            assert await b.recover_and_enqueue() == 0, "second call must queue nothing"
            assert await b.recover_unknown_outcomes() == []
            entries = await b.sf_list()
            assert sorted(e.txn_id for e in entries) == sorted([t_queued, t_unknown, t_answered])
            assert flow_entry in [e.id for e in entries]
            assert (await b.get(t_unknown))["state"] == "unknown"
            assert not (await b.get(t_unknown))["has_reversal_fields"]
            # the queued reversals carry the original acquirer-side fields
            got = {}
            for acq in ("acq-a", "acq-b"):
                while (e := await b.sf_claim(acq, "w", 30)) is not None:
                    got[e.txn_id] = (e.acquirer, e.kind, e.payload)
                    assert await b.sf_ack(e.id)  # the head first: the next is claimed once it is done
            assert got[t_unknown][:2] == ("acq-a", "reversal") and got[t_unknown][2]["11"] == "000011"
            assert got[t_answered][:2] == ("acq-b", "reversal") and got[t_answered][2]["11"] == "000013"
            assert got[t_queued][2]["11"] == "000014"
            # a retransmission of the never-forwarded request gets no replay (94)
            assert await b.find_duplicate(*key_open) == ("done", None)
            assert await b.find_duplicate(*(await _key_of(b, t_unknown))) == ("done", None)
        finally:
            await b.close()
        # another restart of node-b: still nothing to queue
        c = backend.make(node_id="node-b")
        await c.start()
        try:
            assert await c.recover_and_enqueue() == 0
            assert await c.sf_depth() == 0  # the three were acknowledged above; none queued again
        finally:
            await c.close()

    run(go())


async def _key_of(j, txn_id):
    r = await j.get(txn_id)
    return r["terminal_id"], r["terminal_stan"], r["terminal_tx_time"], r["mti"]


def test_recovery_same_node_restart(backend):
    """A restarted node (same node_id) recovers its previous life's transactions at once."""
    async def go():
        a = backend.make(node_id="node-x")
        await a.start()
        tid = await a.record_received(txn())
        await a.record_forwarded(tid, "acq-a", "000021", {"11": "000021"})
        # crash: no close, the heartbeat row stays fresh
        a._heartbeat_task.cancel()
        b = backend.make(node_id="node-x")
        await b.start()
        try:
            assert await b.recover_and_enqueue() == 1
            assert await b.recover_and_enqueue() == 0
        finally:
            await b.close()
            await a.close()

    run(go())


def test_recovery_parks_undecryptable(backend):
    async def go():
        a = backend.make(node_id="n1")
        await a.start()
        tid = await a.record_received(txn())
        await a.record_forwarded(tid, "acq-a", "000031", {"11": "000031"})
        await a.close()
        # the data key its fields were written with is gone (the key file was
        # edited, a backup without the latest rotation): same fingerprint key
        lost = KeyRing({"k9": os.urandom(32)}, "k9", backend.keyring._fp_key)
        b = backend.make(lost, node_id="n2")
        await b.start()
        try:
            assert await b.recover_and_enqueue() == 1
            parked = await b.sf_list(parked=True)
            assert [p.txn_id for p in parked] == [tid]
            assert "undecryptable" in parked[0].parked_reason
            assert await b.sf_parked_count() == 1
        finally:
            await b.close()

    run(go())


# --------------------------------------------------------------------------
# Card data never stored (PCI DSS 3.3.1, 3.4.1, 3.5.1)

TRACK2_PATTERN = re.compile(r"[0-9]{12,19}[=D][0-9]{4}")


def test_no_card_data_at_rest(backend):
    pans = test_pans(24)
    pins = [pin_block(i) for i in range(len(pans))]

    async def go():
        j = backend.make(node_id="scan-1")
        await j.start()
        try:
            for i, pan in enumerate(pans):
                link = f"{i + 1:06d}"
                tid = await j.record_received(txn(pan=pan, stan=f"{9000 + i:06d}"))
                await j.record_forwarded(tid, "acq-a", link, acq_fields(pan, link, i))
                if i % 4 == 0:
                    await j.record_outcome(tid, "00", "OK", response_doc(pan, "00", i), 5.0)
                elif i % 4 == 1:
                    await j.record_timeout(tid)
                    await j.sf_enqueue("acq-a", "reversal", tid, acq_fields(pan, link, i))
                    await j.record_outcome(tid, "91", None, response_doc(pan, "91", i), 30000.0)
                    await j.record_late_response("acq-a", link, "00")
                elif i % 4 == 2:
                    await j.sf_enqueue("acq-b", "advice", tid, acq_fields(pan, link, i))
                # i % 4 == 3: left without outcome, recovered below
            e = await j.sf_claim("acq-b", "w", 30)
            await j.sf_park(e.id, "test")
            e = await j.sf_claim("acq-a", "w", 30)
            await j.sf_ack(e.id)
        finally:
            await j.close()
        j2 = backend.make(node_id="scan-2")
        await j2.start()
        try:
            # i % 4 == 3: forwarded, no outcome, nothing queued (a queued advice,
            # i % 4 == 2, is its transaction's delivery: nothing to reverse)
            assert await j2.recover_and_enqueue() == len(pans) // 4
        finally:
            await j2.close()

        text, raw = await backend.dump()
        assert "41" in text or "51" in text  # masked PANs are there
        for pan, pin in zip(pans, pins):
            masked_shown = pan[:6] + "*" * (len(pan) - 10) + pan[-4:]  # BIN 6 + last 4
            assert masked_shown in text, "masked PAN expected"
            assert pan not in text, "clear PAN stored"
            assert pin not in text.upper(), "PIN block stored"
            for blob in raw:
                assert pan.encode() not in blob, "clear PAN in database bytes"
                assert bytes.fromhex(pan + "0" * (len(pan) % 2)) not in blob, "BCD PAN in database bytes"
                assert pin.encode() not in blob.upper(), "PIN block in database bytes"
                assert bytes.fromhex(pin) not in blob, "binary PIN block in database bytes"
                assert track2(pan).encode() not in blob
        assert not TRACK2_PATTERN.search(text), "track-2 pattern in journal rows"
        for blob in raw:
            assert not re.search(rb"[0-9]{12,19}[=D][0-9]{4}", blob), "track-2 pattern in database bytes"

    run(go())


# --------------------------------------------------------------------------
# Keys


def test_key_file(tmp_path):
    path = tmp_path / "state" / "keys.json"
    init_keys(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(KeyFileError):
        init_keys(path)  # never overwrite keys
    kr = KeyRing.load(path)
    assert kr.current_key_id == "k1"
    secret = path.read_text()
    assert "k1" in repr(kr)
    for v in (repr(kr), str(kr)):
        assert not any(tok in v for tok in re.findall(r'"([A-Za-z0-9+/=]{40,})"', secret))
    blob = kr.encrypt(b"fields", b"aad")
    assert kr.decrypt(blob, b"aad") == b"fields"
    with pytest.raises(DecryptError) as ei:
        kr.decrypt(blob, b"other")
    assert "fields" not in str(ei.value)
    with pytest.raises(DecryptError):
        kr.decrypt(blob[:-1] + bytes([blob[-1] ^ 1]), b"aad")
    with pytest.raises(DecryptError):
        kr.decrypt(b"\x01\x02k9" + b"\0" * 40, b"aad")
    with pytest.raises(DecryptError):
        kr.decrypt(b"garbage", b"aad")
    fp = kr.pan_fingerprint("4111 1111 1111 1111")
    assert fp == kr.pan_fingerprint("4111111111111111") and len(fp) == 64
    assert fp != hashlib.sha256(b"4111111111111111").hexdigest()
    assert KeyRing.generate().pan_fingerprint("4111111111111111") != fp
    assert rotate_keys(path) == "k2"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    kr2 = KeyRing.load(path)
    assert kr2.decrypt(blob, b"aad") == b"fields"
    assert KeyRing.key_id_of(kr2.encrypt(b"x")) == "k2"
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(kr2)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        KeyRing.load(path)
    os.chmod(path, 0o600)
    path.write_text('{"version": 1, "current": "k1", "data_keys": {"k1": "c2VjcmV0"}}')
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError) as ei:
        KeyRing.load(path)
    assert "c2VjcmV0" not in str(ei.value)
    with pytest.raises(KeyFileError):
        KeyRing.load(tmp_path / "missing.json")


# --------------------------------------------------------------------------
# Factory and the memory backend


def test_make_journal_backends(tmp_path):
    kr = KeyRing.generate()

    async def go():
        for cfg in (JournalConfig(backend="memory", path=None),
                    JournalConfig(backend="sqlite", path=tmp_path / "j.db", group_commit_ms=0.5)):
            j = make_journal(cfg, kr)
            assert isinstance(j, SqliteJournal)
            await j.start()
            try:
                tid = await j.record_received(txn())
                await j.record_forwarded(tid, "a", "000001", {"11": "000001"})
                await j.record_outcome(tid, "00", None, {"39": "00"}, 1.0)
                assert (await j.get(tid))["state"] == "done"
            finally:
                await j.close()
        pg = make_journal(JournalConfig(backend="postgres", path=None, dsn="postgresql://u:secret@h/db"), kr)
        assert isinstance(pg, PostgresJournal) and "secret" not in repr(pg)
        with pytest.raises(JournalError):
            make_journal(JournalConfig(backend="postgres", path=None), kr)

    run(go())


def test_sqlite_group_commit_batches(tmp_path):
    """Concurrent writes share commits: far fewer groups than writes."""
    async def go():
        j = SqliteJournal(tmp_path / "gc.db", KeyRing.generate(), group_commit_ms=2.0)
        await j.start()
        try:
            async def one(i):
                tid = await j.record_received(txn(stan=f"{i:06d}", terminal="GC"))
                await j.record_forwarded(tid, "a", f"{i:06d}", {"11": f"{i:06d}"})
                await j.record_outcome(tid, "00", None, {"39": "00"}, 1.0)

            before = dict(j.stats)
            await asyncio.gather(*(one(i) for i in range(300)))
            writes = j.stats["writes"] - before["writes"]
            groups = j.stats["groups"] - before["groups"]
            assert writes == 900
            assert groups < writes / 5, (groups, writes)
        finally:
            await j.close()

    run(go())


# --------------------------------------------------------------------------
# The SQLite writer process (switch/journal_writer.py)


def _proc_text(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def test_sqlite_writer_process_lifecycle_and_no_key_material_in_argv_or_env(tmp_path):
    """The writer is a child process; keys reach it over its socket only; close() reaps it."""
    import base64
    kr = KeyRing.generate()
    material = kr._material()
    secrets_ = [material["fp_key"], *material["data_keys"].values()]
    async def go():
        j = SqliteJournal(tmp_path / "w.db", kr)
        await j.start()
        pid = j._writer.proc.pid
        assert pid != os.getpid() and os.path.exists(f"/proc/{pid}")
        seen = _proc_text(pid, "cmdline") + _proc_text(pid, "environ")
        for k in secrets_:
            for form in (k, k.hex().encode(), base64.b64encode(k), base64.urlsafe_b64encode(k)):
                assert form not in seen
        tid = await j.record_received(txn(stan="000001"))
        assert (await j.get(tid))["state"] == "received"
        proc = j._writer.proc
        await j.close()
        assert proc.poll() is not None  # exited and reaped
        assert j.problem() == "journal is closed"
        with pytest.raises(JournalError):
            await j.record_received(txn(stan="000002"))

    run(go())


def test_sqlite_writer_death_fails_writes_and_is_reported(tmp_path):
    """A writer killed under the switch: pending and later writes raise JournalError
    (the flow answers 96), problem() says why (/readyz turns 503); nothing hangs;
    a new writer process is started and writes work again."""
    import signal as _signal
    keys = KeyRing.generate()

    async def go():
        j = SqliteJournal(tmp_path / "d.db", keys)
        await j.start()
        try:
            assert j.problem() is None
            tid = await j.record_received(txn(stan="000001"))
            os.kill(j._writer.proc.pid, _signal.SIGKILL)
            with pytest.raises(JournalError):
                await asyncio.wait_for(j.record_received(txn(stan="000002")), 10)
            assert j.problem() == "journal writer has stopped"
            with pytest.raises(JournalError):
                await j.record_outcome(tid, "00", None, {"39": "00"}, 1.0)
            # what was committed before stays readable
            assert (await j.get(tid))["state"] == "received"
            # a new writer process takes over by itself
            for _ in range(300):
                if j.problem() is None:
                    break
                await asyncio.sleep(0.05)
            assert j.problem() is None and j.stats["restarts"] == 1
            await j.record_outcome(tid, "00", None, {"39": "00"}, 1.0)
            assert (await j.get(tid))["response_code"] == "00"
        finally:
            await j.close()
        # the next start on the same file works (a restarted switch)
        j2 = SqliteJournal(tmp_path / "d.db", keys)
        await j2.start()
        try:
            assert (await j2.get(tid)) is not None
        finally:
            await j2.close()

    run(go())


def test_sqlite_writer_ignores_sigint_and_sigterm_until_the_parent_closes(tmp_path):
    """A Ctrl-C or a TERM to the process group must not take the writer down before
    the switch has journaled its last outcomes."""
    import signal as _signal
    async def go():
        j = SqliteJournal(tmp_path / "s.db", KeyRing.generate())
        await j.start()
        try:
            pid = j._writer.proc.pid
            os.kill(pid, _signal.SIGINT)
            os.kill(pid, _signal.SIGTERM)
            await asyncio.sleep(0.2)
            tid = await j.record_received(txn(stan="000003"))
            assert (await j.get(tid)) is not None and j.problem() is None
        finally:
            await j.close()

    run(go())


# --------------------------------------------------------------------------
# The REST API's transactions (switch.api.JournalTransactionStore)


def test_api_idempotency_keys_are_journaled_with_their_payment(backend):
    """Both backends: a key written with its record is found again (fingerprint,
    record id) by a later process; PostgreSQL also claims a new key atomically,
    so a second process with the same key waits (record id None) until the
    claim is stale or released."""
    async def go():
        j = backend.make(node_id="idem-1")
        await j.start()
        try:
            old = time.time() - 10 * 86_400
            for i in range(3):
                await j.api_put_soon({"id": f"txn_old{i}", "status": "approved", "created_ts": old + i,
                                      "owner": "k1"}, None, (f"old-{i}", "fp"))
            assert await j.api_idem_claim("k1", "key-a", "fp-a", 0.0) is None
            await j.api_put_soon({"id": "txn_a", "status": "approved", "created_ts": time.time(), "owner": "k1"},
                                 None, ("key-a", "fp-a"))
            assert await j.api_idem_claim("k1", "key-a", "fp-a", 0.0) == (True, "txn_a")
            assert await j.api_idem_claim("k2", "key-a", "fp-a", 0.0) is None  # per API key
            # retention forgets old keys with their records (written in time
            # order, as payments are), and nothing younger
            await j.api_put_soon({"id": "txn_b", "status": "approved", "created_ts": time.time(), "owner": "k1"},
                                 None, ("key-b", "fp-b"))
            counts = await j.prune(time.time() - 86_400, batch=2)
            assert counts["api_idem"] == 3 and counts["api_txn"] == 3
            assert await j.api_idem_claim("k1", "old-0", "fp", 0.0) is None
            assert await j.api_idem_claim("k1", "key-a", "fp-a", 0.0) == (True, "txn_a")
            assert await j.api_idem_claim("k1", "key-b", "fp-b", 0.0) == (True, "txn_b")
        finally:
            await j.close()
        j2 = backend.make(node_id="idem-2")
        await j2.start()
        try:
            assert await j2.api_idem_claim("k1", "key-a", "other", 0.0) == (False, "txn_a")
            assert (await j2.api_get("txn_a"))["status"] == "approved"
            # kept as an HMAC only: the request's own digest hashes a body with a PAN in it
            assert await j2._fetchone("SELECT fingerprint FROM api_idem WHERE idem_key = ? AND owner = ?",
                                      ("key-a", "k1")) == (backend.keyring.request_digest("fp-a"),)
            if backend.name == "postgres":
                # "k2"/"key-a" was claimed above and never paid: another process waits...
                assert await j2.api_idem_claim("k2", "key-a", "fp-b", 0.0) == (False, None)
                # ...until the claim is older than its processes' time (the claimant died)
                assert await j2.api_idem_claim("k2", "key-a", "fp-b", time.time() + 1) is None
                await j2.api_idem_release("k2", "key-a")
                assert await j2.api_idem_claim("k2", "key-a", "fp-c", 0.0) is None
        finally:
            await j2.close()

    run(go())


def test_an_api_record_attached_to_an_outcome_is_written_with_it(backend):
    """Both backends: record_outcome(..., attach=api_put_params(...)) journals the
    outcome and the API record (and its Idempotency-Key, and a follow-up's change
    to its payment's record) together."""
    async def go():
        j = backend.make(node_id="attach-1")
        await j.start()
        try:
            tid = await j.record_received_forwarded(txn(stan="000777"), "acq-a", "000001", {"4": "000000001000"})
            rec = {"id": "txn_att", "status": "approved", "created_ts": time.time(), "owner": "k1"}
            await j.record_outcome(tid, "00", "A1", {"39": "00"}, 3.0, j.api_put_params(rec, None, ("key-z", "fp")))
            assert (await j.get(tid))["response_code"] == "00"
            assert (await j.api_get("txn_att"))["status"] == "approved"
            assert await j.api_idem_claim("k1", "key-z", "fp", 0.0) == (True, "txn_att")
            with pytest.raises(JournalError):  # an unknown transaction: no outcome written
                await j.record_outcome(tid + 1000, "00", None, {}, 1.0,
                                       j.api_put_params(dict(rec, id="txn_att2"), None, None))
            # a follow-up's record, and its change to the payment, in the same write
            tid2 = await j.record_received_forwarded(txn(stan="000778"), "acq-a", "000002", {"4": "000000000400"})
            child = {"id": "txn_att3", "status": "approved", "created_ts": time.time(), "owner": "k1",
                     "parent_id": "txn_att"}
            await j.record_outcome(tid2, "00", "A2", {"39": "00"}, 2.0,
                                   j.api_put_params(child, None, ("key-y", "fp2"))
                                   + (j.api_parent_params("txn_att", {"status": "partially_refunded",
                                                                      "refunded_amount": 400}),))
            assert (await j.api_get("txn_att3"))["parent_id"] == "txn_att"
            parent = await j.api_get("txn_att")
            assert parent["status"] == "partially_refunded" and parent["refunded_amount"] == 400, parent
            assert [r["id"] for r in await j.api_list(10, 0, {"status": "partially_refunded"})] == ["txn_att"]
        finally:
            await j.close()

    run(go())


def test_api_records_and_cards(backend):
    """Both backends: records round-trip, update merges, list filters and pages
    newest first, the card is ciphertext bound to its row and is deleted once
    the payment is reversed or fully refunded."""
    from switch.api.server import JournalTransactionStore

    pan = "4111111111111111"

    def rec(i, **kw):
        d = {"id": f"txn_{i:04d}", "type": "purchase", "status": "approved", "owner": "k1" if i % 2 else "k2",
             "terminal_id": f"T{i % 3}", "created_ts": 1_000_000.0 + i, "masked_pan": "411111******1111",
             "amount": 100 + i, "parent_id": None}
        d.update(kw)
        return d

    async def go():
        j = backend.make()
        await j.start()
        try:
            store = JournalTransactionStore(j)
            for i in range(10):
                await store.add(rec(i), (pan, "2912") if i < 3 else None)
            with pytest.raises(ValueError):
                await store.add(rec(99, pan=pan))  # card data never goes into a record
            with pytest.raises(ValueError):
                await store.update("txn_0001", {"expiry": "2912"})
            assert await store.get("txn_0004") == rec(4)
            assert await store.get("nope") is None
            assert await store.card("txn_0001") == (pan, "2912")
            assert await store.card("txn_0005") is None
            page = await store.list(3, 0, {})
            assert [r["id"] for r in page] == ["txn_0009", "txn_0008", "txn_0007"]
            page = await store.list(3, 3, {})
            assert [r["id"] for r in page] == ["txn_0006", "txn_0005", "txn_0004"]
            got = await store.list(100, 0, {"owner": "k1", "terminal_id": "T0"})
            assert [r["id"] for r in got] == ["txn_0009", "txn_0003"]
            got = await store.list(100, 0, {"since": 1_000_002.0, "until": 1_000_004.0})
            assert [r["id"] for r in got] == ["txn_0003", "txn_0002"]
            await store.update("txn_0001", {"status": "partially_refunded", "refunded_amount": 50})
            assert (await store.get("txn_0001"))["refunded_amount"] == 50
            assert await store.card("txn_0001") == (pan, "2912")
            assert [r["id"] for r in await store.list(10, 0, {"status": "partially_refunded"})] == ["txn_0001"]
            await store.update("txn_0001", {"status": "refunded", "refunded_amount": 101})
            assert await store.card("txn_0001") is None
            await store.update("txn_0002", {"status": "reversed"})
            assert await store.card("txn_0002") is None
            assert await store.card("txn_0000") == (pan, "2912")
            # ciphertext is bound to its row: moved to another row it does not decrypt
            if backend.name == "sqlite":
                db = sqlite3.connect(backend.path)
                try:
                    blob = db.execute("SELECT card FROM api_txn WHERE id = 'txn_0000'").fetchone()[0]
                    assert pan.encode() not in bytes(blob)
                finally:
                    db.close()
                # the writer copies nothing between rows, so test the binding with the journal's own keys
                from switch.journal import _api_card_aad
                with pytest.raises(DecryptError):
                    j.keyring.decrypt(bytes(blob), _api_card_aad("txn_0004"))
        finally:
            await j.close()

    run(go())


# --------------------------------------------------------------------------
# Retention


def test_prune_deletes_finished_history_and_keeps_what_is_owed(backend):
    """Both backends: old done transactions, acknowledged entries, late responses and
    API records go; an unresolved transaction, one whose reversal is still queued,
    queued/parked entries and anything newer than the cutoff stay."""
    async def go():
        j = backend.make()
        await j.start()
        try:
            old = time.time() - 10 * 86_400
            fields = acq_fields("4111111111111111", "000001")
            done = await j.record_received(txn(stan="000001", received_at=old))
            await j.record_forwarded(done, "acq-a", "000001", fields)
            await j.record_outcome(done, "00", "A1", response_doc("4111111111111111"), 1.0)
            unresolved = await j.record_received(txn(stan="000002", received_at=old))
            await j.record_forwarded(unresolved, "acq-a", "000002", fields)  # no outcome, nothing queued
            queued = await j.record_received(txn(stan="000003", received_at=old))
            await j.record_forwarded(queued, "acq-a", "000003", fields)
            await j.record_timeout(queued)
            q_entry = await j.sf_enqueue("acq-a", "reversal", queued, fields)
            acked = await j.record_received(txn(stan="000004", received_at=old))
            await j.record_forwarded(acked, "acq-a", "000004", fields)
            await j.record_timeout(acked)
            a_entry = await j.sf_enqueue("acq-a", "reversal", acked, fields)
            assert await j.sf_ack(a_entry)
            p_entry = await j.sf_enqueue("acq-b", "advice", None, {"11": "000009"})
            assert await j.sf_park(p_entry, "gave up")
            new = await j.record_received(txn(stan="000005"))
            await j.record_outcome(new, "00", "A5", {"39": "00"}, 1.0)
            await j.record_late_response("acq-a", "000004", "00")
            await j.api_put({"id": "txn_old", "status": "approved", "created_ts": old, "owner": "k"})
            await j.api_put({"id": "txn_new", "status": "approved", "created_ts": time.time(), "owner": "k"})

            # a cutoff before everything: nothing goes
            assert sum((await j.prune(old - 60)).values()) == 0
            got = await j.prune(time.time() - 86_400, batch=1)  # batch 1: the loop pages through
            assert got["txn"] == 2 and got["api_txn"] == 1, got  # done + acked
            for tid in (done, acked):
                assert await j.get(tid) is None
            for tid in (unresolved, queued, new):
                assert await j.get(tid) is not None
            assert await j.api_get("txn_old") is None and await j.api_get("txn_new") is not None
            # acknowledged entries and late responses go once older than the cutoff
            got = await j.prune(time.time() + 60)
            assert got["sf_queue"] == 1 and got["late_response"] == 1, got
            assert await j.sf_get(a_entry) is None
            assert (await j.sf_get(q_entry)).state == "queued"
            assert (await j.sf_get(p_entry)).state == "parked"
            for tid in (unresolved, queued):
                assert await j.get(tid) is not None  # still owed a reversal
            # the unresolved one is still found by crash recovery
            assert j.pruned["txn"] >= 3
        finally:
            await j.close()

    run(go())


def test_retention_days_config_and_background_pruning(tmp_path):
    from switch.config import ConfigError, load_config

    base = f'[switch]\nstate_dir = "{tmp_path / "s"}"\n[[listeners]]\nname = "t"\nport = 0\n'
    (tmp_path / "a.toml").write_text(base + "[journal]\nretention_days = 30\n")
    assert load_config(tmp_path / "a.toml").journal.retention_days == 30.0
    (tmp_path / "b.toml").write_text(base + "[journal]\nretention_days = -1\n")
    with pytest.raises(ConfigError, match="retention_days"):
        load_config(tmp_path / "b.toml")

    async def go():
        kr = KeyRing.generate()
        j = SqliteJournal(tmp_path / "r.db", kr)
        await j.start()
        try:
            tid = await j.record_received(txn(stan="000001", received_at=time.time() - 3 * 86_400))
            await j.record_outcome(tid, "00", None, {"39": "00"}, 1.0)
        finally:
            await j.close()
        j = SqliteJournal(tmp_path / "r.db", kr, retention_days=1.0)
        await j.start()  # the retention task prunes right after start
        try:
            for _ in range(100):
                if j.pruned["txn"]:
                    break
                await asyncio.sleep(0.02)
            assert j.pruned["txn"] == 1 and await j.get(tid) is None
        finally:
            await j.close()

    run(go())


@pytest.mark.parametrize("committed", [False, True], ids=["refused", "committed-but-refused"])
def test_a_reversal_the_journal_refuses_is_held_and_queued_exactly_once(tmp_path, committed):
    """ReversalQueue.enqueue_or_hold: while the journal refuses the write the
    reversal waits in memory and is offered again every second. When a refused
    write had in fact committed (the writer died after COMMIT, before replying),
    the transaction is already marked reversed and nothing is queued twice."""
    from switch.reversal import ReversalQueue

    async def go():
        async with SqliteJournal(tmp_path / "j.db", KeyRing.generate()) as j:
            tid = await j.record_received_forwarded(txn(stan="000042"), "acq-a", "000007",
                                                    {"t": "0200", "11": "000007", "4": "000000001000"})
            rq = ReversalQueue(j, poll_s=0.05)
            rq._ensure_worker = lambda acquirer: None  # no sender: the queue itself is what is checked
            real, calls = j.sf_enqueue_once, []

            async def flaky(*a, **k):
                calls.append(a)
                if len(calls) <= 2:
                    if committed and len(calls) == 1:
                        await real(*a, **k)
                    raise JournalError("journal writer has stopped")
                return await real(*a, **k)

            j.sf_enqueue_once = flaky
            await rq.enqueue_or_hold("acq-a", {"t": "0200", "11": "000007", "4": "000000001000", "2": "4111111111111111"},
                                     "test", tid)
            assert rq.held == 1 and rq.counters["held"] == 1
            for _ in range(100):
                if rq.held == 0:
                    break
                await asyncio.sleep(0.1)
            assert rq.held == 0 and rq.counters["held_journaled"] == 1
            entries = await j.sf_list()
            assert [(e.acquirer, e.txn_id) for e in entries] == [("acq-a", tid)]
            assert (await j.get(tid))["reversal_queued"]
            # a committed first attempt is found on the next offer: no second write
            assert len(calls) == (1 if committed else 3)
            await rq.stop()

    run(go())


def test_a_postgres_journal_that_stops_answering_fails_writes_then_recovers(tmp_path, pg_dsn):
    """Replies from PostgreSQL held in the network (tests/faultproxy.py): a write
    fails after the command timeout instead of waiting for TCP to give up, and
    once replies flow again the journal works without a restart."""
    from urllib.parse import urlsplit

    from tests.faultproxy import FaultProxy

    async def go():
        url = urlsplit(pg_dsn)
        proxy = await FaultProxy().start(url.port)
        dsn = pg_dsn.replace(f":{url.port}/", f":{proxy.port}/")
        j = PostgresJournal(dsn, KeyRing.generate(), command_timeout=1.0)
        await j.start()
        try:
            tid = await j.record_received(txn(stan="000001"))
            proxy.stall("down")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(Exception) as e:
                await j.record_outcome(tid, "00", "A1", {"39": "00"}, 1.0)
            assert loop.time() - t0 < 5.0
            assert "4111111111111111" not in str(e.value)
            proxy.resume("down")
            for _ in range(50):  # the pool replaces what the timeout broke
                try:
                    await j.record_outcome(tid, "00", "A1", {"39": "00"}, 1.0)
                    break
                except Exception:
                    await asyncio.sleep(0.2)
            assert (await j.get(tid))["response_code"] == "00"
        finally:
            await j.close()
            await proxy.stop()

    run(go())


def test_hmac_sha256_with_prepared_key_states_is_rfc_2104():
    """switch.keys.HmacSha256 (PAN fingerprints, request digests, API key
    hashes) gives hmac.digest's answer for every key and message length, and
    RFC 4231's test case 2."""
    import hmac as _hmac

    from switch.keys import HmacSha256

    for klen in (0, 1, 31, 32, 64, 65, 131):
        for mlen in (0, 1, 55, 64, 200):
            k, m = os.urandom(klen), os.urandom(mlen)
            assert HmacSha256(k).digest(m) == _hmac.digest(k, m, "sha256")
    assert HmacSha256(b"Jefe").digest(b"what do ya want for nothing?").hex() == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    assert "Jefe" not in repr(HmacSha256(b"Jefe"))
    ring = KeyRing.generate()
    assert ring.pan_fingerprint("4111111111111111") == _hmac.digest(
        ring._fp_key, b"4111111111111111", "sha256").hex()


def test_follow_up_leases(backend):
    """A payment's follow-up lease (api_lock_take/release): on PostgreSQL one
    holder at a time, released only by its holder, taken over once expired;
    on SQLite (one process, ordered by its own lock) always granted."""
    async def go():
        j = backend.make(node_id="lease-1")
        await j.start()
        try:
            now = time.time()
            assert await j.api_lock_take("txn_l", "a", now + 30)
            if backend.name == "sqlite":
                assert await j.api_lock_take("txn_l", "b", now + 30)
                return
            assert not await j.api_lock_take("txn_l", "b", now + 30)
            await j.api_lock_release("txn_l", "b")  # not the holder: nothing changes
            assert not await j.api_lock_take("txn_l", "b", now + 30)
            assert await j.api_lock_take("txn_m", "b", now + 30)  # another payment
            await j.api_lock_release("txn_l", "a")
            assert await j.api_lock_take("txn_l", "b", now - 1)  # expired at once
            assert await j.api_lock_take("txn_l", "c", now + 30)  # taken over
            assert not await j.api_lock_take("txn_l", "a", now + 30)
        finally:
            await j.close()

    run(go())


def test_idempotency_keys_past_their_window_are_new_again_and_pruned(backend):
    """Both backends: a key journaled before the window's start (``not_before``)
    is forgotten -- a request with it runs anew, and its new record replaces
    the old key; the start-up scan skips such keys; pruning only the keys
    (``tables``) deletes them and nothing else, also when a reused key sits
    before them in insertion order."""
    async def go():
        j = backend.make(node_id="window-1")
        await j.start()
        try:
            now = time.time()
            old = now - 3 * 86_400
            for i in range(4):
                await j.api_put_soon({"id": f"txn_w{i}", "status": "approved", "created_ts": old + i,
                                      "owner": "k1"}, None, (f"w-{i}", "fp"))
            window_start = now - 86_400
            assert await j.api_idem_claim("k1", "w-0", "fp", 0.0) == (True, "txn_w0")  # no window: kept
            assert await j.api_idem_claim("k1", "w-0", "fp", 0.0, window_start) is None  # new again
            # the retry runs and is journaled with its key: the key stands for it now
            await j.api_put_soon({"id": "txn_w0b", "status": "approved", "created_ts": now, "owner": "k1"},
                                 None, ("w-0", "fp"))
            assert await j.api_idem_claim("k1", "w-0", "other", 0.0, window_start) == (False, "txn_w0b")
            if backend.name == "sqlite":
                seen: list = []
                assert await j.api_idem_scan(lambda o, k: seen.append(k), window_start) == 1
                assert seen == ["w-0"]
            counts = await j.prune(window_start, batch=2, tables=("api_idem",))
            assert counts == {"api_idem": 3}
            for i in (1, 2, 3):
                assert await j.api_idem_claim("k1", f"w-{i}", "fp", 0.0) is None
                assert (await j.api_get(f"txn_w{i}"))["status"] == "approved"  # records are retention's
            assert await j.api_idem_claim("k1", "w-0", "fp", 0.0, window_start) == (True, "txn_w0b")
        finally:
            await j.close()

    run(go())


def test_a_new_sqlite_journal_and_its_wal_are_owner_only(tmp_path):
    """No card data is in the journal in clear; its files are owner-only all
    the same (a umask's 0644 made them world-readable)."""
    modes = {}

    async def go():
        j = make_journal(JournalConfig(backend="sqlite", path=tmp_path / "j" / "journal.db"), KeyRing.generate())
        await j.start()
        try:
            await j.record_received_forwarded(txn(), "acq-a", "000001", acq_fields("4111111111111111", "000001"))
            for f in (tmp_path / "j").glob("journal.db*"):  # while open: the WAL and its index exist
                modes[f.name] = stat.S_IMODE(f.stat().st_mode)
        finally:
            await j.close()

    old = os.umask(0o022)
    try:
        asyncio.run(go())
    finally:
        os.umask(old)
    assert {"journal.db", "journal.db-wal"} <= set(modes)
    assert set(modes.values()) == {0o600}, modes


def test_processes_sharing_a_journal_take_distinct_trace_number_blocks(backend):
    """Several switch processes on one PostgreSQL journal, linked to the same
    acquirer, must not send the same DE11 at once: each takes a block of its
    own (the lowest no live instance holds). A closed instance's block, and a
    dead one's (stale heartbeat), are free again; a previous life of the same
    node holds none. One process owns an SQLite journal: no block."""
    async def go():
        assert stan_block_range(0, 16) == (1, 62_499) and stan_block_range(15, 16) == (937_486, 999_984)
        assert stan_block_range(0, 1) == (1, 999_999)
        with pytest.raises(ValueError):
            stan_block_range(16, 16)
        a = backend.make(node_id="node-a")
        await a.start()
        journals = [a]
        try:
            if backend.name == "sqlite":
                assert await a.claim_stan_block(16) is None
                return
            assert await a.claim_stan_block(1) is None  # one block: no split
            assert await a.claim_stan_block(3) == 0
            assert await a.claim_stan_block(3) == 0  # claimed again: its own block is not "taken"
            b = backend.make(node_id="node-b")
            await b.start()
            journals.append(b)
            # two at once: distinct blocks, never the same
            c = backend.make(node_id="node-c")
            await c.start()
            journals.append(c)
            got = await asyncio.gather(b.claim_stan_block(3), c.claim_stan_block(3))
            assert sorted(got) == [1, 2]
            d = backend.make(node_id="node-d")
            await d.start()
            journals.append(d)
            assert await d.claim_stan_block(3) is None  # all held by live instances
            await b.close()
            journals.remove(b)
            assert await d.claim_stan_block(3) == got[0]  # b's, freed at its close
            # a dead instance's block (no heartbeat for stale_after) is free
            import asyncpg
            conn = await asyncpg.connect(backend.dsn)
            try:
                await conn.execute("UPDATE journal_node SET heartbeat_at = heartbeat_at - 3600 "
                                   "WHERE node_id = 'node-a'")
            finally:
                await conn.close()
            e = backend.make(node_id="node-e")
            await e.start()
            journals.append(e)
            assert await e.claim_stan_block(3) == 0
            # a restarted node-c (a new boot of the same node id) may take its previous life's block
            c2 = backend.make(node_id="node-c")
            await c2.start()
            journals.append(c2)
            assert await c2.claim_stan_block(3) == got[1]
        finally:
            for j in journals:
                await j.close()

    run(go())
