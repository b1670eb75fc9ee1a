"""Money-safety follow-ups in the flow, the journal and the store-and-forward queue.

* A terminal's void (0420/1420) of an advice the switch stored to forward
  was answered 00 and dropped: the advice was delivered after it. Now the
  advice is ended while none of it can have reached the acquirer, and
  otherwise reversed behind it, naming it as it went out (DESIGN.md #4).
* A late answer was journaled against the newest transaction with that link
  STAN: a queued reversal's answer, another process's or one from before the
  STANs wrapped marked an unrelated transaction (DESIGN.md #5).
* An approval journaled after the terminal's deadline (the terminal got 91)
  was reversed in a second write: a crash between the two left money moved
  that no restart reversed, and an API record saying approved. The outcome
  write is now refused past the deadline, so recovery finds the row
  (DESIGN.md #2, #7).
* The parked-reversals metric counted a list that stops at 1,000.

Journal tests run on SQLite and on a real PostgreSQL (tests/pg.py); the
others run a real switch with simulated acquirers and mTLS terminals.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from types import SimpleNamespace

import pytest

from switch import journal as J
from switch import journal_writer as W
from switch.journal import JournalError, OutcomeTooLate, make_journal
from switch.keys import ensure_keys
from switch.metrics import Metrics
from switch.reversal import NAMES_ADVICE, ReversalQueue
from switch.sim.acquirer import Fault
from switch.sim.terminal import make_purchase, make_reversal
from tests.pg import pg_dsn, pg_server  # noqa: F401  (pytest fixtures)
from tests.switch_harness import run, running_switch, terminal
from tests.test_durability import wait_until
from tests.test_journal import acq_fields, backend, response_doc, txn  # noqa: F401  (backend: a fixture)
from tests.test_reversal_queue import ScriptedLink, _drain_until

pytestmark = pytest.mark.timeout(120)

PAN = "4761739001010119"
ONE_ACQUIRER = """
[routing]
default_acquirers = ["acq-a"]
[store_and_forward]
backoff_min = 0.05
backoff_max = 0.2
"""


def _v93(dialect: str) -> bool:
    return dialect == "iso93ascii"


def advices(sim):
    return [d for d in sim.received if d.get("t", "")[1:3] == "22"]


def reversals(sim):
    return [d for d in sim.received if d.get("t", "")[1] == "4"]


# --------------------------------------------------------------------------
# The void of a stored advice (DESIGN.md #4)


@pytest.mark.parametrize("dialect", ["default", "iso93ascii"])
def test_a_void_of_an_advice_none_of_which_left_the_switch_ends_it_and_sends_nothing(tmp_path, dialect):
    """The advice's acquirer is down: the 0220 (1220) is stored, 00. The
    terminal voids it: 0430. Once the acquirer is back, the advice went out
    all the same -- the customer charged after the void."""
    # (the queue's sender then waits out a long backoff after its first
    # attempt: the void comes while it is not sending the advice)
    routing = ONE_ACQUIRER.replace("backoff_min = 0.05", "backoff_min = 3.0").replace("backoff_max = 0.2",
                                                                                      "backoff_max = 3.0")

    async def go():
        async with running_switch(tmp_path, {"acq-a": {"dialect": dialect}}, listener={"dialect": dialect},
                                  routing=routing,
                                  acquirer_opts={"acq-a": {"reconnect_min": 0.05, "reconnect_max": 0.1}}) as sw:
            a = sw.sims["acq-a"]
            await a.set_fault(Fault(refuse=True))
            for conn in list(a._conns):
                conn.close()
            assert await wait_until(lambda: not sw.links["acq-a"].up, 5)
            async with terminal(sw, tmp_path) as t:
                adv = make_purchase(4200, stan=7, mti="1220" if _v93(dialect) else "0220", track2=False,
                                    dialect=dialect)
                r = await t.request(dict(adv), timeout=5)
                assert r["39"] in ("00", "000")
                assert await wait_until(lambda: sw.reversals.counters["retries"] >= 1, 5)
                void = make_reversal(adv, stan=8, dialect=dialect, mti="1420" if _v93(dialect) else "0420")
                r = await t.request(void, timeout=5)
                want = ("1430", "400") if _v93(dialect) else ("0430", "00")
                assert (r["t"], r["39"], r["11"]) == (*want, "000008")
            await a.set_fault(Fault())
            assert await sw.wait_links_up(5)
            assert await sw.reversals.wait_empty(10)
            await asyncio.sleep(0.3)  # (anything still on its way would arrive)
            assert not advices(a) and not reversals(a), a.received
            entries = await sw.journal.sf_list(acked=True)
            assert [(e.kind, e.state) for e in entries] == [("advice", "acked")]
            assert entries[0].last_error.startswith("cancelled: voided by the terminal")
            assert sw.flow.counters["advices_voided_unsent"] == 1

    run(go())


@pytest.mark.parametrize("dialect", ["default", "iso93ascii"])
def test_a_void_of_an_advice_that_may_have_arrived_reverses_it_behind_it(tmp_path, dialect):
    """The advice timed out at its acquirer (it may have been applied) and is
    stored. The terminal voids it: the flow answered 00 and sent nothing
    (the advice's own queue entry counted as "reversal already queued"),
    and the repeats delivered it. Now it is delivered and then reversed,
    the reversal naming the message the acquirer holds: the same DE11 and
    DE7 for the 0220 and its 0221s (1993: DE56 with the advice's DE12)."""
    v93 = _v93(dialect)

    async def go():
        async with running_switch(tmp_path, {"acq-a": {"dialect": dialect}}, listener={"dialect": dialect},
                                  routing=ONE_ACQUIRER, acquirer_opts={"acq-a": {"timeout": 0.3}}) as sw:
            a = sw.sims["acq-a"]
            a.fault = Fault(drop_responses=True)
            async with terminal(sw, tmp_path) as t:
                adv = make_purchase(4200, stan=7, mti="1220" if v93 else "0220", track2=False, dialect=dialect)
                assert (await t.request(dict(adv), timeout=5))["39"] in ("00", "000")
                assert sw.reversals.counters["advices_queued"] == 1
                for stan in (8, 9):  # the terminal's void, and a second one: one reversal
                    void = make_reversal(adv, stan=stan, dialect=dialect, mti="1420" if v93 else "0420")
                    r = await t.request(void, timeout=5)
                    assert (r["t"], r["39"]) == (("1430", "400") if v93 else ("0430", "00"))
                a.fault = Fault()
                assert await sw.reversals.wait_empty(10)
            got = advices(a)
            assert got and len({(d["11"], d["7"]) for d in got}) == 1, "a repeat is the same message"
            revs = reversals(a)
            assert len(revs) == 1, revs
            assert a.received.index(revs[0]) > a.received.index(got[-1]), "reversed after it (FIFO)"
            if v93:
                assert revs[0]["t"] == "1420" and revs[0]["24"] == "400"
                assert revs[0]["56"][:22] == "1220" + got[0]["11"] + adv["12"]
            else:
                assert revs[0]["t"] == "0400"
                assert revs[0]["90"][:20] == "0220" + got[0]["11"] + got[0]["7"]
            assert revs[0]["4"] == adv["4"]
            assert sw.reversals.counters["advices_acknowledged"] == 1 and sw.reversals.counters["acknowledged"] == 1

    run(go())


def test_a_void_of_an_advice_being_sent_right_then_names_it_when_the_reversal_goes(backend):
    """The queue holds the advice's entry (claimed: its attempt is under way)
    when the void comes: it cannot be ended, and the DE11 its attempt goes
    out with is not journaled yet. The reversal queued behind it names that
    attempt when it goes (acq-a). Had the attempt never left (then parked),
    there is nothing to reverse: the reversal is acknowledged unsent and the
    advice ended for good, so no requeue delivers it after the void (acq-b)."""
    async def go():
        j = backend.make()
        await j.start()
        links = {name: ScriptedLink(name, ["00"]) for name in ("acq-a", "acq-b")}
        q = ReversalQueue(j, backoff_min=0.01, backoff_max=0.02, poll_s=0.05)
        q.bind(links)
        try:
            ids = {}
            for i, name in enumerate(links):
                tid = await j.record_received(txn(stan=f"{700 + i:06d}", mti="0220"))
                adv = await j.sf_enqueue(name, "advice", tid, {"t": "0220", "2": PAN, "4": "000000004200",
                                                              "7": "1204101500", "41": "TERM0001"})
                assert (await j.sf_claim(name, "another-worker", 60)).id == adv
                assert not await j.sf_cancel_unsent(adv, "voided"), "being sent: not ended"
                rev = await q.enqueue(name, {"t": "0220", "2": PAN, "4": "000000004200", "41": "TERM0001"},
                                      "terminal reversal", tid, names_advice=adv)
                assert (await j.get(tid))["reversal_queued"]
                ids[name] = (adv, rev)
            adv, _ = ids["acq-a"]  # its attempt: DE11/DE7 journaled before the write, then acknowledged
            assert await j.sf_mark_wire(adv, "004711", "1204101500")
            assert await j.sf_ack(adv)
            adv, _ = ids["acq-b"]  # its attempt never left (link down); parked later, unsent
            assert await j.sf_retry(adv, time.time(), "link down", sent=False)
            assert (await j.sf_claim("acq-b", "another-worker", 60)).id == adv
            assert await j.sf_park(adv, "gave up", sent=False)
            await q.start()
            assert await _drain_until(lambda: q.counters["acknowledged"] == 1
                                      and q.counters["reversals_not_needed"] == 1, 10)
            wire = links["acq-a"].wire
            assert [d["t"] for d in wire] == ["0400"] and not links["acq-b"].wire
            assert wire[0]["90"][:20] == "0220" + "004711" + "1204101500"
            assert NAMES_ADVICE not in wire[0]
            for name in links:
                assert (await j.sf_get(ids[name][1])).state == "acked"
            ended = await j.sf_get(ids["acq-b"][0])
            assert ended.state == "acked" and ended.last_error.startswith("cancelled: ")
            assert not await j.sf_requeue(ids["acq-b"][0])
        finally:
            await q.stop()
            await j.close()

    run(go())


def test_a_held_void_of_a_queued_advice_is_still_queued_when_the_journal_takes_it(tmp_path):
    """The journal refused the reversal write (held in memory, offered again
    every second). The offer skipped any transaction marked reversal_queued
    -- which its queued advice had set: the void was dropped."""
    from switch.journal import SqliteJournal
    from switch.keys import KeyRing

    async def go():
        async with SqliteJournal(tmp_path / "j.db", KeyRing.generate()) as j:
            tid = await j.record_received(txn(stan="000042", mti="0220"))
            await j.sf_enqueue("acq-a", "advice", tid, {"t": "0221", "11": "000007", "4": "000000001000"})
            rq = ReversalQueue(j, poll_s=0.05)
            rq._ensure_worker = lambda acquirer: rq._wake.setdefault(acquirer, asyncio.Event()) and None
            real, calls = j.sf_enqueue_once, []

            async def refused_once(*a, **k):
                calls.append(a)
                if len(calls) == 1:
                    raise JournalError("journal writer has stopped")
                return await real(*a, **k)

            j.sf_enqueue_once = refused_once
            await rq.enqueue_or_hold("acq-a", {"t": "0220", "11": "000007", "7": "1204101500", "4": "000000001000"},
                                     "answer not delivered", tid)
            assert rq.held == 1
            assert await wait_until(lambda: rq.held == 0, 10)
            kinds = sorted(e.kind for e in await j.sf_list())
            assert kinds == ["advice", "reversal"], kinds
            await rq.stop()

    run(go())


# --------------------------------------------------------------------------
# Late answers (DESIGN.md #5)


async def _late_rows(j) -> list[tuple]:
    return [tuple(r) for r in await j._fetchall(
        "SELECT link_stan, response_code, txn_id, sf_id, mti FROM late_response ORDER BY id", ())]


def test_a_late_answer_is_journaled_against_what_went_out_under_its_stan(backend):
    """SQL_LATE_FIND took the newest transaction with that acquirer and link
    STAN: a queued reversal's late answer (the queue's own STAN), another
    process's, or one from before the STANs wrapped marked an unrelated one."""
    async def go():
        other = backend.make(node_id="other-node")
        j = backend.make(node_id="this-node")
        await other.start()
        await j.start()
        try:
            # an old sale answered in time under link STAN 000500 ...
            sale = await j.record_received_forwarded(txn(stan="000001"), "acq-a", "000500",
                                                     acq_fields(PAN, "000500"))
            await j.record_outcome(sale, "00", "A1", response_doc(PAN), 3.0)
            # ... and a reversal of another transaction the queue later sent under 000500 (after a wrap)
            voided = await j.record_received_forwarded(txn(stan="000002"), "acq-a", "000321",
                                                       acq_fields(PAN, "000321"))
            rev = await j.sf_enqueue("acq-a", "reversal", voided, acq_fields(PAN, "000321"))
            assert (await j.sf_claim("acq-a", "w", 60)).id == rev
            await j.sf_mark_wire(rev, "000500", "1204101500")
            await j.sf_retry(rev, time.time() + 60, "timeout")
            assert await j.record_late_response("acq-a", "000500", "00") is None  # (no MTI: the entry first)
            assert await j.record_late_response("acq-a", "000500", "00", "0410") is None
            assert (await j.get(sale))["late_response_code"] is None
            assert (await j.get(voided))["late_response_code"] is None, "a reversal's answer is not the original's"
            # another process's transaction under this process's STAN is not this one's
            theirs = await other.record_received_forwarded(txn(stan="000003"), "acq-a", "000600",
                                                           acq_fields(PAN, "000600"))
            await other.record_timeout(theirs)
            assert await j.record_late_response("acq-a", "000600", "00", "0210") is None
            mine = await j.record_received_forwarded(txn(stan="000004"), "acq-a", "000600",
                                                     acq_fields(PAN, "000600"))
            await j.record_timeout(mine)
            assert await j.record_late_response("acq-a", "000600", "05", "0210") == mine
            assert (await j.get(mine))["late_response_code"] == "05"
            assert (await other.get(theirs))["late_response_code"] is None
            # a forwarding long past is not what a late answer now is to
            old = await j.record_received_forwarded(txn(stan="000005"), "acq-a", "000700",
                                                    acq_fields(PAN, "000700"))
            await j._exec("UPDATE txn SET forwarded_at = ? WHERE id = ?", (time.time() - 2 * J.LATE_MATCH_WINDOW_S,
                                                                            old))
            assert await j.record_late_response("acq-a", "000700", "00", "0210") is None
            # a repeat of a transaction's own advice: its late answer is that transaction's
            adv_txn = await j.record_received_forwarded(txn(stan="000006", mti="0220"), "acq-a", "000800",
                                                        acq_fields(PAN, "000800"))
            adv = await j.sf_enqueue("acq-a", "advice", adv_txn, {"t": "0221", "11": "000800"},
                                     wire=("000800", "1204101500"))
            assert await j.record_late_response("acq-a", "000800", "00", "0230") == adv_txn
            assert (await j.get(adv_txn))["late_response_code"] == "00"
            assert await _late_rows(j) == [
                ("000500", "00", voided, rev, None), ("000500", "00", voided, rev, "0410"),
                ("000600", "00", None, None, "0210"), ("000600", "05", mine, None, "0210"),
                ("000700", "00", None, None, "0210"), ("000800", "00", adv_txn, adv, "0230")]
        finally:
            await j.close()
            await other.close()

    run(go())


def test_a_late_answer_to_a_queued_reversal_does_not_mark_the_sale_that_had_its_stan(tmp_path):
    """Through a real switch: a sale answered in time under link STAN X; later
    the queue sends another sale's reversal under X and its answer comes
    late. It was journaled as the first sale's late answer."""
    routing = ONE_ACQUIRER.replace("backoff_min = 0.05", "backoff_min = 2.0").replace("backoff_max = 0.2",
                                                                                      "backoff_max = 2.0")

    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, routing=routing,
                                  acquirer_opts={"acq-a": {"timeout": 0.3}}) as sw:
            a, link = sw.sims["acq-a"], sw.links["acq-a"]
            async with terminal(sw, tmp_path) as t:
                first = make_purchase(1000, stan=1)
                assert (await t.request(dict(first), timeout=5))["39"] == "00"
                second = make_purchase(2000, stan=2)
                assert (await t.request(dict(second), timeout=5))["39"] == "00"
                rows = {r["terminal_stan"]: r for r in await sw.journal.by_terminal("TERM0001")}
                x = rows["000001"]["link_stan"]
                link._stan = int(x) - 1  # the link's STANs have come round to X again
                a.fault = Fault(delay_ms=600)  # every answer after the link's timeout
                r = await t.request(make_reversal(second, stan=3), timeout=5)
                assert r["39"] == "00"
                assert await wait_until(lambda: sw.late_responses == 1, 10)
                a.fault = Fault()
                assert await sw.reversals.wait_empty(15)
            assert reversals(a)[0]["11"] == x
            await asyncio.sleep(0.2)
            assert (await sw.journal.get(rows["000001"]["txn_id"]))["late_response_code"] is None
            (stan, rc, txn_id, sf_id, _mti), = await _late_rows(sw.journal)
            assert (stan, rc, txn_id) == (x, "00", rows["000002"]["txn_id"]) and sf_id is not None
            assert (await sw.journal.sf_get(sf_id)).kind == "reversal"

    run(go())


# --------------------------------------------------------------------------
# An approval journaled too late (DESIGN.md #2, #7)


def test_an_outcome_past_its_deliver_by_is_not_journaled_nor_its_api_record(backend):
    async def go():
        j = backend.make()
        await j.start()
        try:
            tid = await j.record_received_forwarded(txn(stan="000001"), "acq-a", "000001", acq_fields(PAN, "000001"))
            rec = {"id": "txn_late", "status": "approved", "created_ts": time.time(), "owner": "k"}
            with pytest.raises(OutcomeTooLate):
                await j.record_outcome(tid, "00", "A1", response_doc(PAN), 3.0, deliver_by=time.time() - 0.001)
            with pytest.raises(OutcomeTooLate):
                await j.record_outcome(tid, "00", "A1", {"39": "00"}, 3.0, j.api_put_params(rec, None, ("k1", "fp")),
                                       deliver_by=time.time() - 0.001)
            row = await j.get(tid)
            assert row["response_code"] is None and row["completed_at"] is None and row["has_reversal_fields"]
            assert await j.api_get("txn_late") is None
            assert await j.api_idem_claim("k", "k1", "fp", 0.0) is None
            # not refused while there is time
            await j.record_outcome(tid, "00", "A1", {"39": "00"}, 3.0, j.api_put_params(rec, None, ("k1", "fp")),
                                   deliver_by=time.time() + 30)
            assert (await j.get(tid))["response_code"] == "00" and await j.api_get("txn_late") is not None
        finally:
            await j.close()

    run(go())


def test_the_writers_batch_refuses_an_outcome_past_its_deliver_by_alone(tmp_path):
    from switch.keys import KeyRing
    from tests.test_journal_writer import REPLAY, _fwd, _run

    core = W.WriterCore(W.open_writer_connection(str(tmp_path / "j.db"), "NORMAL"), KeyRing.generate(), "n", "b")
    _run(core, [_fwd(1), _fwd(2), _fwd(3)])
    past, future = time.time() - 1, time.time() + 60
    ops = [("outcome", (i, "00", "A1", REPLAY, 1.0, 1.0e9, by)) for i, by in ((1, future), (2, past), (3, None))]
    assert _run(core, ops, 10) == {10: (True, 1), 11: (True, -1), 12: (True, 1)}
    assert _run(core, [("outcome", (2, "00", "A1", REPLAY, 1.0, 1.0e9, past))], 20) == {20: (True, -1)}
    rows = core.conn.execute("SELECT id, response_code FROM txn ORDER BY id").fetchall()
    assert rows == [(1, "00"), (2, None), (3, "00")]


def test_an_approval_journaled_too_late_is_reversed_by_recovery_after_a_crash(tmp_path):
    """The journal stalls while the acquirer approves; the terminal gets 91 at
    its deadline. The approval was journaled when the journal woke, and the
    switch died before the reversal's own write (here: that write never
    comes): the restart's recovery found an answered row and reversed
    nothing -- money moved behind the 91."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 200.0}},
                                  acquirer_opts={"acq-a": {"timeout": 1.0}},
                                  listener={"terminal_timeout": 1.5}) as sw:
            sim = sw.sims["acq-a"]
            died_before: list = []

            async def crash(acquirer, original, reason, txn_id=None, kind="reversal", **k):
                died_before.append(txn_id)  # the process is gone before this write

            sw.reversals.enqueue_or_hold = crash
            writer = sw.journal._writer.proc.pid
            async with terminal(sw, tmp_path) as t:
                first = asyncio.create_task(t.request(make_purchase(1000, stan=1), timeout=5))
                assert await wait_until(lambda: len([d for d in sim.received if d["t"] == "0200"]) == 1, 5)
                os.kill(writer, signal.SIGSTOP)
                try:
                    assert (await first)["39"] == "91"
                finally:
                    os.kill(writer, signal.SIGCONT)
                assert await wait_until(lambda: sw.flow.counters["outcome_too_late"] == 1, 15)
            (txn_id,) = died_before
            row = await sw.journal.get(txn_id)
            assert row["response_code"] is None, "an answer the terminal never got is not journaled"
            cfg = sw.config
        keyring = ensure_keys(cfg.security.key_file)
        j = make_journal(cfg.journal, keyring)
        await j.start()
        try:
            assert await j.recover_and_enqueue() == 1
            (entry,) = await j.sf_list()
            assert (entry.kind, entry.txn_id, entry.acquirer) == ("reversal", txn_id, "acq-a")
        finally:
            await j.close()

    run(go(), timeout=90)


# --------------------------------------------------------------------------
# The parked metric


def test_the_parked_metric_counts_every_parked_entry(backend):
    async def go():
        j = backend.make()
        await j.start()
        try:
            ids = await asyncio.gather(*(j.sf_enqueue("acq-a", "reversal", None, {"11": f"{i:06d}"})
                                         for i in range(1005)))
            assert all(await asyncio.gather(*(j.sf_park(i, "gave up", sent=False) for i in ids)))
            q = ReversalQueue(j)
            await q.refresh()
            m = Metrics(SimpleNamespace(reversals=q, links={}, listeners=[]))
            assert "isoswitch_reversals_parked 1005.0" in m.exposition().decode()
            assert q.parked_count == 1005 and len(q.parked) == 1000  # (the admin API's page)
        finally:
            await j.close()

    run(go())
