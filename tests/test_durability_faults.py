"""Durability faults found by probing: requeue, backoff, replays and reversals after the fact, keys.

DESIGN.md invariants 4, 6 and 7 and the card-data rules:

* an operator's requeue of a parked entry (``isoswitch queue requeue``, the
  admin API) makes it go again, with its limits counted afresh -- not parked
  again at once, unsent -- and it leaves the switch's parked list;
* the backoff of an entry whose acquirer was unreachable for a thousand
  attempts and more still works (2 ** 1024 overflowed a float);
* an approval journaled and then reversed (journaled too late to be
  delivered, or committed by a writer after the restart's recovery) is not
  replayed to a retransmission: the terminal never got it;
* a transaction is reversed once, whoever asks (the terminal's own reversal
  on another process, the switch's timeout, a peer's crash recovery); a
  process taken for dead does not journal an answer its peer's recovery is
  reversing, and a peer's clock running ahead does not make it one;
* a journal refuses a key file other than the one it was written with (a
  missing key file is made anew at start); a process still on the old key
  file reads ciphertext of a key a rotation added;
* paged queries answer the same on both backends.

Journal tests run on SQLite and on a real PostgreSQL (tests/pg.py); the
others run a real switch (in this process or its own) with simulated
acquirers and mTLS terminals.
"""
from __future__ import annotations

import asyncio
import collections
import os
import signal
import time

import pytest

from switch.config import load_config
from switch.journal import JournalError
from switch.keys import DecryptError, KeyRing, init_keys, rotate_keys
from switch.reversal import ReversalQueue
from switch.sim.acquirer import AcquirerSimulator, Fault
from switch.sim.terminal import TerminalClient, dev_client_context, make_purchase, make_reversal
from tests.pg import pg_dsn, pg_server  # noqa: F401  (pytest fixtures)
from tests.switch_harness import run, running_switch, terminal
from tests.test_durability import SwitchProcess, _alive, _children, wait_until, write_config
from tests.test_journal import acq_fields, backend, response_doc, txn  # noqa: F401  (backend: a fixture)
from tests.test_reversal_queue import ScriptedLink, _drain_until, payload

pytestmark = pytest.mark.timeout(120)

PAN = "4761739001010119"


def financial(sim):
    return [d for d in sim.received if d.get("t") in ("0100", "0200")]


def reversals(sim):
    return [d for d in sim.received if d.get("t") in ("0400", "0401")]


# --------------------------------------------------------------------------
# Store-and-forward: requeue and backoff (invariant 4)


def test_a_requeued_entry_goes_again_with_its_limits_counted_afresh(backend):
    """Parked after max_attempts sent (or past max_age), then requeued by the
    operator: it was claimed and parked again at once, never sent, because
    ``sent`` and the age still were past the limits."""
    async def go():
        j = backend.make()
        await j.start()
        link = ScriptedLink("acq-a", ["unknown", "unknown", "00"])
        q = ReversalQueue(j, max_attempts=2, backoff_min=0.01, backoff_max=0.02, poll_s=0.05)
        q.bind({"acq-a": link})
        try:
            await q.start()
            eid = await q.enqueue("acq-a", payload(1), "timeout")
            assert await _drain_until(lambda: q.counters["parked"] == 1)
            assert [d["t"] for d in link.wire] == ["0400", "0401"]
            assert await q.requeue_parked(eid)
            assert await _drain_until(lambda: q.counters["acknowledged"] == 1 or q.counters["parked"] > 1, 10)
            assert q.counters["parked"] == 1 and q.counters["acknowledged"] == 1
            assert [d["t"] for d in link.wire] == ["0400", "0401", "0401"], "a repeat still, same DE11/DE7"
            assert len({(d["11"], d["7"]) for d in link.wire}) == 1
            e = await j.sf_get(eid)
            assert e.state == "acked" and e.requeued_sent == 2
            assert abs(e.requeued_at - time.time()) < 30  # (a float4 column would be minutes off)

            # the age limit: parked past max_age while the acquirer was away, then requeued
            q.max_age = 0.3
            link.script = ["notsent"]
            eid2 = await q.enqueue("acq-a", payload(2), "timeout")
            assert await _drain_until(lambda: q.counters["parked"] == 2)
            q.max_age = 5.0
            await asyncio.sleep(0.5)  # older than max_age was when it parked: its age counts anew
            link.script = ["00"]
            assert await q.requeue_parked(eid2)
            assert await _drain_until(lambda: q.counters["acknowledged"] == 2 or q.counters["parked"] > 2, 10)
            assert (await j.sf_get(eid2)).state == "acked" and q.counters["parked"] == 2
        finally:
            await q.stop()
            await j.close()

    run(go())


def test_an_entry_requeued_from_another_process_leaves_the_parked_list(backend):
    """`isoswitch queue requeue ID` runs in its own process: the switch's parked
    list (the isoswitch_reversals_parked metric, the admin API's list) went on
    showing the entry after it was sent and acknowledged."""
    async def go():
        j = backend.make()
        await j.start()
        link = ScriptedLink("acq-a", ["unknown", "00"])
        q = ReversalQueue(j, max_attempts=1, backoff_min=0.01, backoff_max=0.02, poll_s=0.05)
        q.bind({"acq-a": link})
        try:
            await q.start()
            eid = await q.enqueue("acq-a", payload(1), "timeout")
            assert await _drain_until(lambda: q.counters["parked"] == 1 and q.parked)
            assert [e.id for e in q.parked] == [eid]
            assert await j.sf_requeue(eid)  # as the CLI does, on the journal
            assert await _drain_until(lambda: q.counters["acknowledged"] == 1, 10)
            assert await _drain_until(lambda: not q.parked, 5), q.parked
        finally:
            await q.stop()
            await j.close()

    run(go())


def test_the_backoff_holds_after_a_thousand_attempts(backend):
    """An acquirer unreachable for hours runs an entry's attempts past 1024
    (at backoff_max = 60 s, in 17 hours; 17 minutes at 1 s): the backoff
    2 ** attempts overflowed a float, the sender failed on every claim, and
    the head of the queue -- with everything behind it -- never went out."""
    async def go():
        j = backend.make()
        await j.start()
        link = ScriptedLink("acq-a", ["notsent", "00"])
        q = ReversalQueue(j, backoff_min=0.01, backoff_max=0.02, poll_s=0.05)
        q.bind({"acq-a": link})
        try:
            eid = await j.sf_enqueue("acq-a", "reversal", None, payload(1))
            assert await j._exec("UPDATE sf_queue SET attempts = 1100 WHERE id = ?", (eid,)) == 1
            await q.start()
            assert await _drain_until(lambda: q.counters["acknowledged"] == 1, 10)
            assert q.counters["sender_errors"] == 0
            assert [d["t"] for d in link.wire] == ["0400"]
        finally:
            await q.stop()
            await j.close()

    run(go())


# --------------------------------------------------------------------------
# Replays of answers the terminal never got (invariants 2 and 6)


def test_an_answer_reversed_after_it_was_journaled_is_not_replayed(backend):
    async def go():
        j = backend.make()
        await j.start()
        try:
            # approved and journaled, then reversed (too late to deliver, or its
            # write reported failed after it committed)
            rec = txn(pan=PAN)
            key = (rec.terminal_id, rec.terminal_stan, rec.terminal_tx_time, rec.mti)
            tid = await j.record_received_forwarded(rec, "acq-a", "000101", acq_fields(PAN, "000101"))
            await j.record_outcome(tid, "00", "A1B2C3", response_doc(PAN), 5.0)
            assert (await j.find_duplicate(*key))[1]["39"] == "00"
            await j.sf_enqueue("acq-a", "reversal", tid, acq_fields(PAN, "000101"))
            assert await j.find_duplicate(*key) == ("done", None), "a replay of an approval being reversed"
            row = await j.get(tid)
            assert row["response_code"] == "00" and row["reversal_queued"]  # the history stays

            # timed out: the reversal is queued, then the 91 the terminal got is journaled
            rec2 = txn(pan=PAN)
            key2 = (rec2.terminal_id, rec2.terminal_stan, rec2.terminal_tx_time, rec2.mti)
            tid2 = await j.record_received_forwarded(rec2, "acq-a", "000102", acq_fields(PAN, "000102"))
            await j.record_timeout(tid2)
            await j.sf_enqueue("acq-a", "reversal", tid2, acq_fields(PAN, "000102"))
            await j.record_outcome(tid2, "91", None, {"t": "0210", "39": "91"}, 2000.0)
            assert (await j.find_duplicate(*key2))[1]["39"] == "91"
            # ... or in the other order (a held reversal journaled later): still the 91
            rec3 = txn(pan=PAN)
            key3 = (rec3.terminal_id, rec3.terminal_stan, rec3.terminal_tx_time, rec3.mti)
            tid3 = await j.record_received_forwarded(rec3, "acq-a", "000103", acq_fields(PAN, "000103"))
            await j.record_timeout(tid3)
            await j.record_outcome(tid3, "91", None, {"t": "0210", "39": "91"}, 2000.0)
            await j.sf_enqueue("acq-a", "reversal", tid3, acq_fields(PAN, "000103"))
            assert (await j.find_duplicate(*key3))[1]["39"] == "91"
        finally:
            await j.close()

    run(go())


def test_a_retransmission_after_an_approval_journaled_too_late_is_not_told_approved(tmp_path):
    """The journal stalls while the acquirer approves: the terminal gets 91 at
    its deadline and the approval, journaled late, is reversed. The terminal
    retransmits: it was replayed the 00 the acquirer had given -- approved at
    the terminal, reversed at the acquirer."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 200.0}},
                                  acquirer_opts={"acq-a": {"timeout": 1.0}},
                                  listener={"terminal_timeout": 1.5}) as sw:
            sim = sw.sims["acq-a"]
            writer = sw.journal._writer.proc.pid
            async with terminal(sw, tmp_path) as t:
                req = make_purchase(1000, stan=1)
                first = asyncio.create_task(t.request(dict(req), timeout=5))
                assert await wait_until(lambda: len(financial(sim)) == 1, 5)
                os.kill(writer, signal.SIGSTOP)
                try:
                    assert (await first)["39"] == "91"
                finally:
                    os.kill(writer, signal.SIGCONT)
                assert await wait_until(lambda: sw.flow.counters["outcome_too_late"] == 1, 15)
                assert await sw.reversals.wait_empty(15)
                assert len(reversals(sim)) == 1
                again = await t.request(dict(req), timeout=5)
            assert again["39"] == "94" and "38" not in again, again
            assert len(financial(sim)) == 1  # and it is not sent again

    run(go(), timeout=90)


# --------------------------------------------------------------------------
# One reversal per transaction (invariants 4 and 7)


def test_a_transaction_gets_one_store_and_forward_entry(backend):
    async def go():
        j = backend.make()
        await j.start()
        try:
            tid = await j.record_received_forwarded(txn(pan=PAN), "acq-a", "000201", acq_fields(PAN, "000201"))
            first, new = await j.sf_enqueue_once("acq-a", "reversal", tid, acq_fields(PAN, "000201"))
            assert new
            assert await j.sf_enqueue_once("acq-a", "reversal", tid, acq_fields(PAN, "000201")) == (first, False)
            assert await j.sf_enqueue("acq-a", "reversal", tid, acq_fields(PAN, "000201")) == first
            assert [e.id for e in await j.sf_list()] == [first]
            # one of each kind: an advice stored and forwarded can still be reversed
            tid2 = await j.record_received_forwarded(txn(pan=PAN, mti="0220"), "acq-a", "000202",
                                                     acq_fields(PAN, "000202"))
            advice, new = await j.sf_enqueue_once("acq-a", "advice", tid2, acq_fields(PAN, "000202"))
            assert new and (await j.sf_enqueue_once("acq-a", "advice", tid2, {}))[1] is False
            rev, new = await j.sf_enqueue_once("acq-a", "reversal", tid2, acq_fields(PAN, "000202"))
            assert new and rev not in (first, advice)
            # entries not tied to a journaled transaction are queued as asked
            a = await j.sf_enqueue("acq-a", "reversal", None, payload(1))
            b = await j.sf_enqueue("acq-a", "reversal", None, payload(1))
            assert a != b and len(await j.sf_list()) == 5
            if backend.name == "postgres":  # two processes at once: the row lock orders them
                other = backend.make(node_id="other")
                await other.start()
                try:
                    tids = [await j.record_received_forwarded(txn(pan=PAN), "acq-a", f"{300 + i:06d}",
                                                              acq_fields(PAN, f"{300 + i:06d}")) for i in range(20)]
                    got = await asyncio.gather(*(jj.sf_enqueue_once("acq-a", "reversal", t, payload(1))
                                                 for t in tids for jj in (j, other)))
                    assert sum(new for _, new in got) == len(tids)
                    per_txn = collections.Counter(e.txn_id for e in await j.sf_list() if e.txn_id in tids)
                    assert set(per_txn.values()) == {1} and len(per_txn) == len(tids)
                finally:
                    await other.close()
        finally:
            await j.close()

    run(go())


def test_a_process_taken_for_dead_cannot_journal_an_answer_its_peer_is_reversing(backend):
    """Process A's heartbeat went stale (a stall, a clock step) while a request
    was at the acquirer; B's recovery queued its reversal. A's flow then gets
    the approval: its outcome write must fail (the flow answers 96 instead of
    an approval being reversed), and its own reversal is the one queued."""
    async def go():
        a = backend.make(node_id="node-a", stale_after=0.5)
        await a.start()
        b = backend.make(node_id="node-b", stale_after=0.5)
        await b.start()
        try:
            rec = txn(pan=PAN)
            key = (rec.terminal_id, rec.terminal_stan, rec.terminal_tx_time, rec.mti)
            tid = await a.record_received_forwarded(rec, "acq-a", "000401", acq_fields(PAN, "000401"))
            a._heartbeat_task.cancel()
            await asyncio.sleep(0.7)
            assert await b.recover_and_enqueue() == 1
            with pytest.raises(JournalError):
                await a.record_outcome(tid, "00", "A1B2C3", response_doc(PAN), 5.0)
            assert await a.sf_enqueue_once("acq-a", "reversal", tid, acq_fields(PAN, "000401")) \
                == ((await b.sf_list())[0].id, False)
            assert len(await b.sf_list()) == 1
            row = await b.get(tid)
            assert row["state"] == "unknown" and row["response_code"] is None
            assert await b.find_duplicate(*key) == ("done", None)
        finally:
            await b.close()
            await a.close()

    run(go())


def test_an_old_writers_late_commit_does_not_undo_the_restarts_recovery(tmp_path):
    """kill -9 of the switch while its journal writer hangs (a stalled disk)
    with the acquirer's approval queued to it; the switch is restarted at once
    and its recovery reverses the request. Then the old writer wakes up and
    commits what it held: the approval. A retransmission was then replayed
    that 00 -- approved at the terminal, reversed at the acquirer."""
    async def go():
        sim = await AcquirerSimulator(name="acq-a", latency_ms=300.0).start()
        writer = None
        try:
            cfg = write_config(tmp_path, sim.port)
            log = tmp_path / "switch.log"
            sw = SwitchProcess(cfg, log)
            port = await sw.started()
            (writer,) = _children(sw.proc.pid)
            ssl = dev_client_context(tmp_path / "state")
            client = TerminalClient("127.0.0.1", port, ssl=ssl)
            await client.connect()
            req = make_purchase(5000, stan=314)
            pending = asyncio.create_task(client.request(dict(req), timeout=30))
            assert await wait_until(lambda: len(financial(sim)) == 1)
            os.kill(writer, signal.SIGSTOP)  # the disk hangs before the approval arrives
            await asyncio.sleep(0.8)  # it has arrived: its outcome write waits for the writer
            sw.kill9()
            with pytest.raises((ConnectionError, asyncio.TimeoutError, OSError, EOFError)):
                await asyncio.wait_for(pending, 5)
            await client.close()
            sw2 = SwitchProcess(cfg, log)
            await sw2.started()
            try:
                assert await wait_until(lambda: len(reversals(sim)) == 1, 15)
                os.kill(writer, signal.SIGCONT)  # the old writer commits what it held, then exits
                assert await wait_until(lambda: not _alive(writer), 15)
                async with TerminalClient("127.0.0.1", sw2.port, ssl=ssl) as c:
                    again = await c.request(dict(req), timeout=10)
            finally:
                sw2.stop()
            assert again["39"] == "94" and "38" not in again, again
            assert len(financial(sim)) == 1 and len(reversals(sim)) == 1
        finally:
            if writer is not None and _alive(writer):
                os.kill(writer, signal.SIGCONT)
                os.kill(writer, signal.SIGKILL)
            await sim.stop()

    run(go(), timeout=100)


def test_a_terminal_reversal_on_another_process_and_the_timeout_reverse_the_original_once(tmp_path, pg_dsn):
    """Two switch processes behind a load balancer share a PostgreSQL journal.
    A terminal's purchase is at the acquirer through process A; the terminal
    gives up first and its reversal lands on process B, which queues it; then
    A times out and queues its own. The acquirer got two 0400 for the one
    original (each a first attempt, so not even recognisable as a repeat)."""
    async def go():
        sim = await AcquirerSimulator(name="acq-a", latency_ms=0.0).start()
        procs = []
        try:
            journal_cfg = f'[journal]\nbackend = "postgres"\ndsn = "{pg_dsn}"\n'
            a = SwitchProcess(write_config(tmp_path, sim.port, journal=journal_cfg, name="a.toml", acq_timeout=2.0,
                                           terminal_timeout=3.0), tmp_path / "a.log")
            procs.append(a)
            port_a = await a.started()
            b = SwitchProcess(write_config(tmp_path, sim.port, journal=journal_cfg, name="b.toml"),
                              tmp_path / "b.log")
            procs.append(b)
            port_b = await b.started()
            ssl = dev_client_context(tmp_path / "state")
            sim.fault = Fault(drop_responses=True)
            async with TerminalClient("127.0.0.1", port_a, ssl=ssl) as ta, \
                    TerminalClient("127.0.0.1", port_b, ssl=ssl) as tb:
                req = make_purchase(1234, stan=7)
                original = asyncio.create_task(ta.request(dict(req), timeout=10))
                assert await wait_until(lambda: len(financial(sim)) == 1, 10)
                sim.fault = Fault()
                assert (await tb.request(make_reversal(req, stan=8), timeout=10))["39"] == "00"
                assert (await original)["39"] == "91"
            assert await wait_until(lambda: len(reversals(sim)) >= 1, 20)
            await asyncio.sleep(2.0)  # both processes drain the queue: a second entry would be out by now
            revs = reversals(sim)
            assert len(revs) == 1, [(r["t"], r["11"], r["90"]) for r in revs]
            assert revs[0]["90"][:10] == "0200" + financial(sim)[0]["11"]
        finally:
            for p in procs:
                p.stop()
            await sim.stop()

    run(go(), timeout=100)


# --------------------------------------------------------------------------
# Keys (card-data rules: the key id kept with the ciphertext, keys rotate)


def test_a_journal_refuses_a_key_file_it_was_not_written_with(backend):
    async def go():
        j = backend.make()
        await j.start()
        tid = await j.record_received_forwarded(txn(pan=PAN), "acq-a", "000501", acq_fields(PAN, "000501"))
        await j.close()
        other = backend.make(KeyRing.generate(), node_id="n2")  # a key file made anew
        with pytest.raises(JournalError) as ei:
            await other.start()
        assert "not the one this journal was written with" in str(ei.value)
        # nothing was recovered with the wrong keys; the right ones still work
        j = backend.make(node_id="n3")
        await j.start()
        try:
            assert (await j.get(tid))["has_reversal_fields"]
            assert await j.recover_and_enqueue() == 1
            e = await j.sf_claim("acq-a", "w", 30)
            assert e.payload["2"] == PAN and not (await j.sf_list(parked=True))
        finally:
            await j.close()

    run(go())


def test_a_switch_whose_key_file_went_missing_does_not_start(tmp_path):
    """The state directory's keys.json is gone (a restore without it, a wrong
    mount): the switch made a new key file and parked every pending reversal
    as undecryptable. It refuses to start instead, saying why."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            async with terminal(sw, tmp_path) as t:
                assert (await t.request(make_purchase(100, stan=1), timeout=5))["39"] == "00"
            key_file = sw.config.security.key_file
        key_file.unlink()
        from switch.app import Switch
        sw2 = Switch(load_config(tmp_path / "isoswitch.toml"))
        try:
            with pytest.raises(JournalError) as ei:
                await sw2.start()
        finally:
            await sw2.stop(grace=0)
        assert "not the one this journal was written with" in str(ei.value)
        assert str(key_file) in str(ei.value)

    run(go(), timeout=90)


def test_a_process_on_the_old_key_file_reads_ciphertext_of_a_rotated_key(backend, tmp_path):
    """Processes sharing a journal are restarted one by one after ``isoswitch
    keys rotate``: the one still running on the old keys claimed the restarted
    one's reversal, could not decrypt it and parked it."""
    keyfile = tmp_path / "keys.json"
    init_keys(keyfile)

    async def go():
        old = KeyRing.load(keyfile)
        a = backend.make(old, node_id="old")
        await a.start()
        try:
            assert rotate_keys(keyfile) == "k2"
            b = backend.make(KeyRing.load(keyfile), node_id="restarted")
            await b.start()
            try:
                eid = await b.sf_enqueue("acq-a", "reversal", None, payload(1))
            finally:
                await b.close()
            e = await a.sf_claim("acq-a", "w", 30)
            assert e is not None and e.id == eid and e.payload == payload(1)
            assert old.key_ids == ("k1", "k2") and old.current_key_id == "k1"
            assert not await a.sf_list(parked=True)
        finally:
            await a.close()
        # a key file of another lineage lends no keys
        stranger = tmp_path / "other.json"
        init_keys(stranger)
        ring = KeyRing.load(stranger)
        blob = KeyRing.load(keyfile).encrypt(b"x", b"aad")
        with pytest.raises(DecryptError):
            ring.decrypt(blob, b"aad")
        assert ring.key_ids == ("k1",)

    run(go())


def test_a_peer_whose_clock_runs_ahead_does_not_take_a_live_process_for_dead(pg_dsn, monkeypatch):
    """Switch processes on several hosts share one PostgreSQL journal. Heartbeats
    were written, and judged stale, on each process's own clock: a peer whose
    clock ran 60 s ahead found every live process dead (its last heartbeat
    older than stale_after) and reversed its requests in flight. Both sides
    now use the database's clock."""
    from switch.journal import PostgresJournal
    import switch.journal as journal_mod

    keys = KeyRing.generate()

    async def go():
        a = PostgresJournal(pg_dsn, keys, node_id="host-a", stale_after=30.0)
        await a.start()
        b = PostgresJournal(pg_dsn, keys, node_id="host-b", stale_after=30.0)
        await b.start()
        try:
            tid = await a.record_received_forwarded(txn(pan=PAN), "acq-a", "000601", acq_fields(PAN, "000601"))
            real = time.time
            monkeypatch.setattr(journal_mod.time, "time", lambda: real() + 60.0)  # host-b's clock
            try:
                await b._heartbeat()
                assert await b.recover_and_enqueue() == 0
                assert await b.recover_unknown_outcomes() == []
            finally:
                monkeypatch.setattr(journal_mod.time, "time", real)
            assert not (await a.get(tid))["reversal_queued"]
            await a.record_outcome(tid, "00", "A1B2C3", response_doc(PAN), 5.0)
        finally:
            await b.close()
            await a.close()

    run(go())


def test_paged_queries_agree_on_both_backends(backend):
    """by_terminal / by_time / sf_list: the same rows, in the same order, page by
    page, on SQLite and PostgreSQL -- and the same answer to a negative limit or
    offset (SQLite returned everything, PostgreSQL raised its own error)."""
    base = 1_700_000_000.0

    async def go():
        j = backend.make()
        await j.start()
        try:
            ids = [await j.record_received(txn(terminal="T1" if i % 3 else "T2", stan=f"{i + 1:06d}",
                                               rrn=f"RRN{i % 4}", received_at=base + i // 2)) for i in range(12)]
            t1 = [ids[i] for i in range(12) if i % 3]
            assert [r["txn_id"] for r in await j.by_rrn("RRN1")] == [ids[1], ids[5], ids[9]]
            pages = [[r["txn_id"] for r in await j.by_terminal("T1", limit=3, offset=o)] for o in (0, 3, 6)]
            assert pages == [t1[0:3], t1[3:6], t1[6:8]]
            assert [r["txn_id"] for r in await j.by_terminal("T1", since=base + 1, until=base + 4)] == \
                [ids[i] for i in range(2, 8) if i % 3]
            assert [r["txn_id"] for r in await j.by_time(since=base + 2, limit=4, offset=1)] == ids[5:9]
            for limit, offset in ((-1, 0), (3, -2)):
                with pytest.raises(ValueError):
                    await j.by_time(limit=limit, offset=offset)
                with pytest.raises(ValueError):
                    await j.by_terminal("T1", limit=limit, offset=offset)
            with pytest.raises(ValueError):
                await j.sf_list(limit=-1)
        finally:
            await j.close()

    run(go())
