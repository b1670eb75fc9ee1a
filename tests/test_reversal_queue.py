"""The store-and-forward reversal queue: leases after a crash, repeats, retry codes, card data.

DESIGN.md invariants 3, 4 and 7 and the card-data rules:

* a lease held by a process that died (kill -9 while a reversal was being
  sent) is released at start-up: the entry goes first again (FIFO per
  acquirer), as a repeat (0401), instead of waiting out the dead lease;
* only attempts written to the link make later sends repeats: one that never
  left the switch (NotSent: link down, not connected) still backs off and
  counts toward parking, but the first reversal on the wire is an 0400;
* an 0410 answered 30 (format error; 904 in ISO 8583:1993) did not apply the
  reversal: it is repeated until its limits and then parked, never closed;
* the reversal of a track-2-only purchase carries DE2 and DE14 taken from
  DE35, and track 2 itself is never stored.

Journal tests run on SQLite and on a real PostgreSQL (tests/pg.py); crash
tests run the switch in its own process and kill -9 it.
"""
from __future__ import annotations

import asyncio
import collections
import re
import sqlite3
import time
from pathlib import Path

import pytest

from switch import config as config_mod
from switch.acquirer import NotSent, OutcomeUnknown
from switch.journal import _SCHEMA_SQLITE, SqliteJournal, _pg_schema
from switch.keys import ensure_keys
from switch.reversal import DEFAULT_RETRY_CODES, ReversalQueue, build_reversal, reversal_payload
from switch.sim.acquirer import AcquirerSimulator, Fault
from switch.sim.terminal import TEST_PAN, make_purchase
from tests.pg import pg_dsn, pg_server  # noqa: F401  (pytest fixtures)
from tests.switch_harness import run, running_switch, terminal
from tests.test_durability import SwitchProcess, kill9_with_request_at_acquirer, wait_until, write_config
from tests.test_journal import Backend, backend  # noqa: F401  (pytest fixture: sqlite, postgres)

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
PAN = "4761739001010119"


def reversals(sim):
    return [d for d in sim.received if d.get("t") in ("0400", "0401")]


def payload(i: int, **extra) -> dict:
    """What the queue keeps of an 0200 as sent (reversal_payload of it)."""
    d = {"t": "0200", "7": "0520101500", "11": f"{i:06d}", "2": PAN, "3": "000000",
         "4": f"{i:012d}", "37": f"{i:012d}", "41": "TERM0001", "49": "978"}
    d.update(extra)
    return d


# --------------------------------------------------------------------------
# The journal: leases of dead boots, the "sent" count (both backends)


def test_a_dead_boots_lease_is_released_at_start_up_and_its_entry_goes_first_as_a_repeat(backend):
    async def go():
        a = backend.make()
        await a.start()
        first = await a.sf_enqueue("acq-a", "reversal", None, payload(1))
        second = await a.sf_enqueue("acq-a", "reversal", None, payload(2))
        e = await a.sf_claim("acq-a", "worker-of-a", 60)
        assert e.id == first and not e.repeat
        # kill -9: the lease stays, the heartbeat row stays (not closed)
        a._heartbeat_task.cancel()
        b = backend.make()  # the restarted process (same node: its previous life is dead)
        await b.start()
        try:
            assert await b.recover_and_enqueue() == 0
            got = await b.sf_claim("acq-a", "worker-of-b", 60)
            assert got is not None and got.id == first, \
                "the head goes first again (FIFO), not after the dead lease expires"
            assert got.repeat and got.claims == 2, "it may have been sent: 0401"
            assert b.leases_released == 1 and got.sent == 1
            assert got.lease_owner == "worker-of-b" and got.lease_boot == b.boot_id
            # nothing overtakes the head while it is held (FIFO)
            assert await b.sf_claim("acq-a", "worker-of-b", 60) is None
            assert await b.sf_ack(first)
            nxt = await b.sf_claim("acq-a", "worker-of-b", 60)
            assert nxt.id == second and not nxt.repeat
            # a second recovery releases nothing (b's own leases are live)
            assert await b.recover_and_enqueue() == 0 and b.leases_released == 1
            assert await b.sf_claim("acq-a", "worker-of-b", 60) is None
        finally:
            await b.close()
            await a.close()

    run(go())


def test_a_stale_nodes_lease_is_released_and_a_live_nodes_is_kept(backend):
    """Several processes on one journal (PostgreSQL): only dead boots' leases are released."""
    async def go():
        live = backend.make(node_id="node-live")
        dead = backend.make(node_id="node-dead")
        await live.start()
        await dead.start()
        # one queue each: a held head holds back its own acquirer's queue (FIFO)
        e1 = await live.sf_enqueue("acq-b", "reversal", None, payload(1))
        e2 = await live.sf_enqueue("acq-a", "reversal", None, payload(2))
        e3 = await live.sf_enqueue("acq-a", "reversal", None, payload(3))
        assert (await live.sf_claim("acq-b", "live-w", 60)).id == e1
        assert (await dead.sf_claim("acq-a", "dead-w", 60)).id == e2
        dead._heartbeat_task.cancel()  # dies: its heartbeat goes stale
        await asyncio.sleep(1.2)
        new = backend.make(node_id="node-new", stale_after=1.0)
        await new.start()
        try:
            await live._heartbeat()  # the live node is fresh
            assert await new.recover_and_enqueue() == 0
            got = await new.sf_claim("acq-a", "new-w", 60)
            assert got is not None and got.id == e2 and got.repeat, "the dead node's entry, as a repeat"
            assert new.leases_released == 1
            assert await new.sf_ack(e2)
            assert (await new.sf_claim("acq-a", "new-w", 60)).id == e3
            assert await new.sf_claim("acq-b", "new-w", 60) is None, "the live node's lease is kept"
            assert (await new.sf_get(e1)).lease_owner == "live-w"
        finally:
            await new.close()
            await dead.close()
            await live.close()

    run(go())


def test_an_attempt_that_never_left_the_switch_does_not_make_a_repeat(backend):
    async def go():
        j = backend.make()
        await j.start()
        try:
            eid = await j.sf_enqueue("acq-a", "reversal", None, payload(1))
            e = await j.sf_claim("acq-a", "w", 60)
            assert await j.sf_retry(e.id, time.time(), "acq-a: not sent (link down)", sent=False)
            e = await j.sf_claim("acq-a", "w", 60)
            assert (e.id, e.attempts, e.sent, e.repeat) == (eid, 1, 0, False), "still a first 0400"
            assert await j.sf_retry(e.id, time.time(), "acq-a: outcome unknown (timeout)", sent=True)
            e = await j.sf_claim("acq-a", "w", 60)
            assert (e.attempts, e.sent, e.repeat) == (2, 1, True)
            # parked before an attempt, re-queued: still a repeat (it was sent once)
            assert await j.sf_park(e.id, "gave up", sent=False)
            assert await j.sf_requeue(eid)
            assert (await j.sf_claim("acq-a", "w", 60)).repeat
            # an entry parked before it was ever sent stays a first 0400 after re-queueing
            other = await j.sf_enqueue("acq-b", "reversal", None, payload(2))
            e = await j.sf_claim("acq-b", "w", 60)
            assert await j.sf_retry(e.id, time.time(), "not sent", sent=False)
            e = await j.sf_claim("acq-b", "w", 60)
            assert await j.sf_park(e.id, "gave up after 1 attempts", sent=False)
            assert await j.sf_requeue(other)
            e = await j.sf_claim("acq-b", "w", 60)
            assert e.id == other and not e.repeat
        finally:
            await j.close()

    run(go())


_OLD_SF_COLUMNS = ("    sent INTEGER NOT NULL DEFAULT 0,\n", "    lease_boot TEXT,\n", "    wire_stan TEXT,\n",
                   "    wire_time TEXT,\n", "    requeued_at REAL,\n", "    requeued_at DOUBLE PRECISION,\n",
                   "    requeued_sent INTEGER NOT NULL DEFAULT 0\n")


def _old_schema(schema: str) -> str:
    """The schema as released before ``sent``, ``lease_boot`` and ``wire_*`` existed
    (and late_response's ``sf_id`` and ``mti``)."""
    s = schema
    for line in _OLD_SF_COLUMNS:
        assert line in s or "requeued_at" in line  # (REAL in SQLite, DOUBLE PRECISION in PostgreSQL)
        s = s.replace(line, "")
    s = s.replace("    acked_at REAL,\n);", "    acked_at REAL\n);")
    s = s.replace("    acked_at DOUBLE PRECISION,\n);", "    acked_at DOUBLE PRECISION\n);")
    for real in ("REAL", "DOUBLE PRECISION"):
        s = s.replace(f"    received_at {real} NOT NULL,\n    sf_id BIGINT,\n    mti TEXT\n);",
                      f"    received_at {real} NOT NULL\n);")
    assert "lease_boot" not in s and " sent " not in s and "wire_" not in s and "requeued_" not in s
    assert "sf_id" not in s
    return s


def test_an_existing_journal_gets_the_new_columns(backend):
    """A journal written by the previous version: ``sent`` and ``lease_boot`` are
    added (ALTER TABLE), entries that were attempted stay repeats, and a
    lease of the old process is released at start-up (SQLite)."""
    rows = [  # id, attempts, claims, lease_owner, lease_until
        (1, 1, 1, None, None),        # attempted once: it may have been sent
        (2, 0, 1, "old:1", 1e12),     # claimed by the old process when it died
        (3, 0, 0, None, None),        # never claimed
    ]

    async def go():
        keyring = backend.keyring
        from switch.journal import _pack, _sf_aad
        blobs = {i: keyring.encrypt(_pack(payload(i)), _sf_aad("acq-a", "reversal", None)) for i, *_ in rows}
        now = time.time()
        if backend.name == "sqlite":
            conn = sqlite3.connect(str(backend.path))
            conn.executescript(_old_schema(_SCHEMA_SQLITE))
            for i, attempts, claims, owner, until in rows:
                conn.execute("INSERT INTO sf_queue (id, acquirer, kind, payload, created_at, next_at, attempts, "
                             "claims, lease_owner, lease_until) VALUES (?, 'acq-a', 'reversal', ?, ?, ?, ?, ?, ?, ?)",
                             (i, blobs[i], now, now, attempts, claims, owner, until))
            conn.commit()
            conn.close()
        else:
            import asyncpg
            conn = await asyncpg.connect(backend.dsn)
            try:
                await conn.execute(_old_schema(_pg_schema()))
                for i, attempts, claims, owner, until in rows:
                    await conn.execute(
                        "INSERT INTO sf_queue (id, acquirer, kind, payload, created_at, next_at, attempts, claims, "
                        "lease_owner, lease_until) VALUES ($1, 'acq-a', 'reversal', $2, $3, $3, $4, $5, $6, $7)",
                        i, blobs[i], now, attempts, claims, owner, until)
            finally:
                await conn.close()
        j = backend.make()
        await j.start()
        try:
            if backend.name == "postgres":  # epoch seconds need double precision (REAL is float4 there)
                import asyncpg
                conn = await asyncpg.connect(backend.dsn)
                try:
                    types = dict(await conn.fetch(
                        "SELECT column_name, data_type FROM information_schema.columns "
                        "WHERE table_name = 'sf_queue' AND column_name IN ('requeued_at', 'requeued_sent')"))
                finally:
                    await conn.close()
                assert types == {"requeued_at": "double precision", "requeued_sent": "integer"}
            await j.recover_and_enqueue()
            entries = {e.id: e for e in await j.sf_list()}
            assert entries[1].sent == 1 and entries[1].repeat
            assert entries[3].sent == 0 and not entries[3].repeat
            got = []
            while (e := await j.sf_claim("acq-a", "w", 60)) is not None:
                got.append((e.id, e.repeat))
                assert await j.sf_ack(e.id)
            if backend.name == "sqlite":  # one process owns the file: the old lease is stale
                assert got == [(1, True), (2, True), (3, False)]
            else:  # PostgreSQL cannot tell whose it was: it expires, and holds back what is behind it
                assert got == [(1, True)]
                assert (await j.sf_get(2)).lease_owner == "old:1"
        finally:
            await j.close()
        # a second start finds the columns in place; late answers are journaled
        # with the entry they answer (the columns added to late_response)
        j = backend.make()
        await j.start()
        try:
            assert await j._exec("UPDATE sf_queue SET wire_stan = '000333' WHERE id = 3", ()) == 1
            await j.record_late_response("acq-a", "000333", "00", "0410")
            late = await j._fetchall("SELECT link_stan, sf_id, mti FROM late_response", ())
            assert [tuple(r) for r in late] == [("000333", 3, "0410")]
        finally:
            await j.close()

    run(go())


# --------------------------------------------------------------------------
# The queue's sender, with a scripted link (both backends)


class _Cfg:
    timeout = 1.0


class _Reply:
    def __init__(self, doc):
        self.doc = doc


class ScriptedLink:
    """An acquirer link whose every request follows ``script``: "notsent",
    "unknown" or a response code (the last step repeats)."""

    def __init__(self, name: str, script: list[str]):
        self.name = name
        self.cfg = _Cfg()
        self.script = list(script)
        self.calls: list[tuple[str, str]] = []  # (outcome, MTI) of each call
        self.wire: list[dict] = []  # what was written to the link
        self._stan = 100

    async def request(self, doc, timeout, before_write=None, *, draining_ok=False, stan=None):
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        self.calls.append((step, doc["t"]))
        if step == "notsent":  # the link is down: no trace number is assigned
            raise NotSent(self.name, "link down")
        if stan is None:  # as the real link does: its own trace number, unless the caller's
            self._stan += 1
            stan = f"{self._stan:06d}"
        doc["11"] = stan
        if before_write is not None:
            await before_write(stan, doc)
        self.wire.append(dict(doc))
        if step == "unknown":
            raise OutcomeUnknown(self.name, "timeout", "000001", doc)
        return _Reply({"t": doc["t"][:2] + "10", "39": step})


async def _drain_until(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pred():
        await asyncio.sleep(0.01)
    return pred()


def test_not_sent_attempts_back_off_and_count_but_the_first_on_the_wire_is_0400(backend):
    async def go():
        j = backend.make()
        await j.start()
        link = ScriptedLink("acq-a", ["notsent", "notsent", "notsent", "unknown", "00"])
        q = ReversalQueue(j, backoff_min=0.01, backoff_max=0.02, poll_s=0.05)
        q.bind({"acq-a": link})
        try:
            await q.start()
            eid = await q.enqueue("acq-a", payload(1), "timeout")
            assert await _drain_until(lambda: q.counters["acknowledged"] == 1)
            assert [m for _, m in link.calls] == ["0400", "0400", "0400", "0400", "0401"]
            assert [d["t"] for d in link.wire] == ["0400", "0401"], "0401 only after one was written"
            first, repeat = link.wire
            assert (repeat["11"], repeat["7"]) == (first["11"], first["7"]), "a repeat is the same message"
            assert {k: v for k, v in repeat.items() if k != "t"} == {k: v for k, v in first.items() if k != "t"}
            assert q.counters["not_sent"] == 3 and q.counters["retries"] == 4
            e = await j.sf_get(eid)
            assert (e.state, e.attempts, e.sent) == ("acked", 4, 1)
        finally:
            await q.stop()
            await j.close()

    run(go())


def test_the_sender_outlives_a_journal_write_that_fails(backend):
    """A journal write failing under the sender (the SQLite writer restarting,
    a database blip) ended the acquirer's sender task: its queue then sat
    until the next enqueue. The sender goes on; the entry goes again once its
    lease runs out, as a repeat."""
    async def go():
        j = backend.make()
        await j.start()
        link = ScriptedLink("acq-a", ["91", "00"])
        q = ReversalQueue(j, backoff_min=0.01, backoff_max=0.02, poll_s=0.05, lease_s=0.3)
        q.bind({"acq-a": link})
        real_retry, failures = j.sf_retry, []

        async def failing_retry(*a, **k):
            if not failures:
                failures.append(1)
                raise RuntimeError("journal write failed: the writer is restarting")
            return await real_retry(*a, **k)

        j.sf_retry = failing_retry
        try:
            await q.start()
            await q.enqueue("acq-a", payload(1), "timeout")
            assert await _drain_until(lambda: q.counters["acknowledged"] == 1)
            assert q.counters["sender_errors"] == 1
            assert [d["t"] for d in link.wire] == ["0400", "0401"]
        finally:
            await q.stop()
            await j.close()

    run(go())


def test_attempts_that_never_left_do_not_park_an_entry_the_acquirer_gets_it_when_back(backend):
    """The attempt limit counts attempts written to the link: an acquirer
    unreachable for longer than max_attempts backoffs still gets the reversal
    (as an 0400) once it is back; only the age limit parks what never left."""
    async def go():
        j = backend.make()
        await j.start()
        link = ScriptedLink("acq-a", ["notsent"])
        q = ReversalQueue(j, max_attempts=3, backoff_min=0.01, backoff_max=0.02, poll_s=0.05)
        q.bind({"acq-a": link})
        try:
            await q.start()
            eid = await q.enqueue("acq-a", payload(1), "timeout")
            assert await _drain_until(lambda: len(link.calls) >= 6)
            assert q.counters["parked"] == 0 and not link.wire
            link.script = ["00"]
            assert await _drain_until(lambda: q.counters["acknowledged"] == 1)
            assert [d["t"] for d in link.wire] == ["0400"]
            e = await j.sf_get(eid)
            assert e.state == "acked" and e.attempts >= 6 and e.sent == 0
            # the age limit parks one that never left
            q.max_age = 0.0
            link.script = ["notsent"]
            eid2 = await q.enqueue("acq-a", payload(2), "timeout")
            assert await _drain_until(lambda: q.counters["parked"] == 1)
            assert (await j.sf_get(eid2)).state == "parked" and len(link.wire) == 1
        finally:
            await q.stop()
            await j.close()

    run(go())


def test_a_reversal_the_acquirers_dialect_cannot_encode_is_parked_at_once(backend):
    async def go():
        from switch.acquirer import CANNOT_ENCODE

        class Unencodable(ScriptedLink):
            async def request(self, doc, timeout, before_write=None, *, draining_ok=False, stan=None):
                self.calls.append(("encode", doc["t"]))
                raise NotSent(self.name, f"{CANNOT_ENCODE}: Field data is 20 bytes, larger than maximum 19, "
                                         "field 2")

        j = backend.make()
        await j.start()
        link = Unencodable("acq-a", ["00"])
        q = ReversalQueue(j, backoff_min=0.01, backoff_max=0.02, poll_s=0.05)
        q.bind({"acq-a": link})
        try:
            await q.start()
            eid = await q.enqueue("acq-a", payload(1), "timeout")
            assert await _drain_until(lambda: q.counters["parked"] == 1)
            assert len(link.calls) == 1
            e = await j.sf_get(eid)
            assert e.state == "parked" and CANNOT_ENCODE in e.parked_reason
        finally:
            await q.stop()
            await j.close()

    run(go())


@pytest.mark.parametrize("original_mti,rc,mtis", [
    ("0200", "30", ("0400", "0401")),
    ("1200", "904", ("1420", "1421")),
])
def test_a_format_error_answer_is_repeated_until_its_limits_then_parked(backend, original_mti, rc, mtis):
    async def go():
        j = backend.make()
        await j.start()
        link = ScriptedLink("acq-a", [rc])
        q = ReversalQueue(j, max_attempts=3, backoff_min=0.01, backoff_max=0.02, poll_s=0.05)  # default codes
        q.bind({"acq-a": link})
        try:
            await q.start()
            eid = await q.enqueue("acq-a", payload(1, t=original_mti), "timeout")
            assert await _drain_until(lambda: q.counters["parked"] == 1)
            assert q.counters["acknowledged"] == 0, f"an answer {rc} is not an acknowledgement"
            assert [d["t"] for d in link.wire] == [mtis[0], mtis[1], mtis[1]]
            e = await j.sf_get(eid)
            assert e.state == "parked" and f"answered {rc}" in (e.last_error or "")
            assert await j.sf_parked_count() == 1
        finally:
            await q.stop()
            await j.close()

    run(go())


def test_format_error_codes_are_retry_codes_by_default(tmp_path):
    example = config_mod.load_config(ROOT / "switch" / "isoswitch.example.toml", check_files=False)
    for codes in (DEFAULT_RETRY_CODES, config_mod.DEFAULT_SF_RETRY_CODES,
                  config_mod.StoreForwardConfig().retry_codes, example.store_and_forward.retry_codes,
                  ReversalQueue(None).retry_codes):
        assert {"30", "904", "91", "96", "907", "909"} <= set(codes), codes
    assert set(DEFAULT_RETRY_CODES) == set(config_mod.DEFAULT_SF_RETRY_CODES)
    text = (ROOT / "switch" / "isoswitch.example.toml").read_text()
    assert re.search(r'^retry_codes = \["30", "91", "96", "904", "907", "909"\]$', text, re.M)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[switch]\nstate_dir = "{tmp_path}"\n')
    assert set(config_mod.load_config(cfg).store_and_forward.retry_codes) == set(DEFAULT_RETRY_CODES)


# --------------------------------------------------------------------------
# Track-2-only originals: DE2 and DE14 from DE35, track 2 never stored


@pytest.mark.parametrize("t2,pan,exp", [
    (PAN + "=29121010000012345678", PAN, "2912"),
    (PAN + "D2912101000001234567", PAN, "2912"),
    (";" + PAN + "=2912101000001234567?", PAN, "2912"),
    ("4111111111111111D2503201F", "4111111111111111", "2503"),
    (PAN + "=", PAN, None),  # no expiry in it: DE2 only
])
def test_a_track2_only_original_is_reversed_with_de2_and_de14(t2, pan, exp):
    sent = {"t": "0200", "3": "000000", "4": "000000006001", "7": "0520101500", "11": "000801",
            "22": "901", "35": t2, "41": "TERM0001", "52": "0123456789ABCDEF"}
    kept = reversal_payload(sent)
    assert kept["2"] == pan and kept.get("14") == exp
    assert "35" not in kept and "52" not in kept
    rev = build_reversal(kept, repeat=False)
    assert rev["t"] == "0400" and rev["2"] == pan and rev.get("14") == exp and "35" not in rev
    # also when handed the original with its track (build_reversal on its own)
    rev = build_reversal(sent, repeat=True)
    assert rev["t"] == "0401" and rev["2"] == pan and rev.get("14") == exp and "35" not in rev


def test_track2_never_overrides_the_original_de2_and_de14():
    sent = {"t": "0200", "2": PAN, "14": "3001", "35": PAN + "=2912101", "11": "000001"}
    assert reversal_payload(sent) == {"t": "0200", "2": PAN, "14": "3001", "11": "000001"}
    # DE2 present, DE14 missing: the expiry from the same card's track
    assert reversal_payload({"2": PAN, "35": PAN + "D2912101"})["14"] == "2912"
    # another card's track gives nothing
    assert "14" not in reversal_payload({"2": PAN, "35": "4111111111111111=2912101"})
    for junk in ("", "=2912", "12345=2912", "ABCDEFGHIJKLMNOP=2912", None, 12345):
        assert "2" not in reversal_payload({"35": junk, "11": "000001"})


def test_a_track2_only_reversal_is_queued_encrypted_without_the_track(backend):
    t2 = PAN + "=29121010000012345678"
    sent = {"t": "0200", "3": "000000", "4": "000000006001", "7": "0520101500", "11": "000801",
            "22": "901", "35": t2, "41": "TERM0001"}

    async def go():
        j = backend.make()
        await j.start()
        link = ScriptedLink("acq-a", ["unknown"])
        q = ReversalQueue(j, backoff_min=5, poll_s=0.05)
        q.bind({"acq-a": link})
        try:
            await q.start()
            await q.enqueue("acq-a", sent, "timeout")
            assert await _drain_until(lambda: len(link.wire) == 1)
            assert link.wire[0]["2"] == PAN and link.wire[0]["14"] == "2912" and "35" not in link.wire[0]
            text, raw = await backend.dump()
            blob = b"".join(raw)
            for secret in (t2, PAN, "29121010000012345678"):
                assert secret not in text and secret.encode() not in blob, "card data stored in clear"
        finally:
            await q.stop()
            await j.close()

    run(go())


def test_a_track2_only_purchase_that_times_out_is_reversed_with_de2_and_de14(tmp_path):
    """End to end: the acquirer gets the reversal with the PAN and expiry of
    the card the 0200 carried only in DE35."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, acquirer_opts={"acq-a": {"timeout": 0.3}}) as sw:
            sim = sw.sims["acq-a"]
            sim.fault = Fault(drop_responses=True)
            async with terminal(sw, tmp_path) as t:
                req = make_purchase(6001, stan=801, include_pan=False, track2=True, expiry="2912")
                assert "2" not in req and "35" in req
                assert (await t.request(req, timeout=5))["39"] == "91"
            sim.fault = Fault()
            assert await sw.reversals.wait_empty(20)
            [orig] = [d for d in sim.received if d["t"] == "0200"]
            assert "2" not in orig
            rev = reversals(sim)[0]
            assert rev["2"] == TEST_PAN and rev["14"] == "2912" and "35" not in rev
            assert rev["90"][:10] == "0200" + orig["11"]

    run(go())


# --------------------------------------------------------------------------
# Real processes: kill -9 and restart


def test_kill9_while_a_reversal_is_being_sent_restart_sends_it_first_as_0401(tmp_path):
    """The head entry is claimed and on the wire when the switch is killed;
    the restarted switch releases the dead process's lease at once: that
    entry goes first (as 0401, it may have arrived), the one behind it next
    (0400), instead of the second overtaking while the dead lease runs out."""
    async def go():
        sim = await AcquirerSimulator(name="acq-a", latency_ms=0.0).start()
        try:
            sim.fault = Fault(drop_responses=True)  # the reversal is received, never answered
            (tmp_path / "state").mkdir()
            keys = ensure_keys(tmp_path / "state" / "keys.json")
            j = SqliteJournal(tmp_path / "state" / "journal.db", keys)
            await j.start()
            head = await j.sf_enqueue("acq-a", "reversal", None, payload(1))
            behind = await j.sf_enqueue("acq-a", "reversal", None, payload(2))
            await j.close()
            cfg = write_config(tmp_path, sim.port, acq_timeout=30.0)
            log = tmp_path / "switch.log"
            sw = SwitchProcess(cfg, log)
            await sw.started()
            assert await wait_until(lambda: len(reversals(sim)) == 1, 20)
            await asyncio.sleep(0.3)
            assert [r["4"] for r in reversals(sim)] == [payload(1)["4"]]  # the head only (FIFO)
            sw.kill9()  # the head's reversal is at the acquirer, unanswered, its entry leased
            before = len(sim.received)
            sim.fault = Fault()
            sw2 = SwitchProcess(cfg, log)
            try:
                await sw2.started()
                assert await wait_until(lambda: len(reversals(sim)) >= 3, 40), [(r["t"], r["4"]) for r in reversals(sim)]
                await asyncio.sleep(0.5)
                after = [(d["t"], d["4"]) for d in sim.received[before:] if d["t"] in ("0400", "0401")]
                assert after == [("0401", payload(1)["4"]), ("0400", payload(2)["4"])], after
                # the repeat after the crash carries the DE11 and DE7 the killed process sent
                first = reversals(sim)[0]
                repeat = [d for d in sim.received[before:] if d["t"] == "0401"][0]
                assert (repeat["11"], repeat["7"]) == (first["11"], first["7"])
                assert "released 1 store-and-forward lease" in log.read_text()
            finally:
                sw2.stop()
            j = SqliteJournal(tmp_path / "state" / "journal.db", keys)
            await j.start()
            try:
                assert (await j.sf_get(head)).state == "acked" and (await j.sf_get(behind)).state == "acked"
            finally:
                await j.close()
        finally:
            await sim.stop()

    run(go(), timeout=150)


def test_kill9_between_forwarding_and_answering_the_recovered_reversal_goes_as_0400(tmp_path):
    """Crash recovery queues the reversal of a request that was forwarded; it
    is the first reversal of it the acquirer sees: 0400, even though the
    restarted switch's sender may try before its link is up (NotSent)."""
    async def go():
        sim = await AcquirerSimulator(name="acq-a", latency_ms=0.0).start()
        try:
            req = make_purchase(5000, stan=314)
            cfg, log, original = await kill9_with_request_at_acquirer(
                tmp_path, sim, req, lambda: [d for d in sim.received if d["t"] == "0200"])
            assert not reversals(sim)
            # the acquirer refuses connections while the switch starts: its
            # sender's first attempts certainly find the link down (NotSent)
            sim.fault = Fault(refuse=True)
            sw2 = SwitchProcess(cfg, log)
            try:
                await sw2.started()
                await asyncio.sleep(1.5)
                assert not reversals(sim)
                sim.fault = Fault()
                assert await wait_until(lambda: len(reversals(sim)) >= 1, 30)
                await asyncio.sleep(1.0)
                revs = reversals(sim)
                assert [r["t"] for r in revs] == ["0400"], [r["t"] for r in revs]
                assert revs[0]["90"][:10] == "0200" + original["11"]
                assert revs[0]["2"] == original["2"] and revs[0]["14"] == original["14"]
            finally:
                sw2.stop()
        finally:
            await sim.stop()

    run(go(), timeout=150)


def test_a_reversal_queued_while_the_link_is_down_first_goes_out_as_0400(tmp_path):
    """In process: the acquirer refuses connections while reversals are
    attempted (NotSent); when it is back, each goes as 0400, in order."""
    routing = "[store_and_forward]\nbackoff_min = 0.05\nbackoff_max = 0.2\n"

    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, routing=routing,
                                  acquirer_opts={"acq-a": {"timeout": 0.5}}) as sw:
            sim = sw.sims["acq-a"]
            port = sim.port
            await sim.stop()  # down: the link drops, nothing can be written
            assert await wait_until(lambda: not sw.links["acq-a"].up, 5)
            for i in range(3):
                await sw.reversals.enqueue("acq-a", payload(i + 1), "test")
            assert await wait_until(lambda: sw.reversals.counters["not_sent"] >= 3, 10)
            entries = await sw.journal.sf_list()
            assert entries[0].attempts >= 1 and all(e.sent == 0 for e in entries)
            sim2 = await AcquirerSimulator(name="acq-a", port=port, latency_ms=0.0).start()
            try:
                assert await sw.reversals.wait_empty(30)
                got = [(r["t"], r["4"]) for r in reversals(sim2)]
                assert got == [("0400", payload(i + 1)["4"]) for i in range(3)], got
            finally:
                await sim2.stop()

    run(go(), timeout=120)
