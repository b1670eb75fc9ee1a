"""An honest /readyz while the journal cannot write, and bounded logs meanwhile.

With the disk full, every request failed its journal write (answered 96)
while /readyz still said ready, so a load balancer kept sending traffic that
could only get 96; and each failed request logged a full traceback. Now the
journal reports itself not ready from a write that fails for want of storage
until a write that needs space succeeds again (it tries one itself every
second, so it recovers with no traffic), /readyz turns 503 with the reason,
and the flow logs the first failure with its traceback and then a few lines
a minute, while its counters count every one.

The SQLite database is made full for real with ``PRAGMA max_page_count`` on
the writer's own connection (a per-connection limit, so it is set through
the journal's writer): SQLite then fails writes that need a new page with
SQLITE_FULL, "database or disk is full", as on a full disk.
"""
from __future__ import annotations

import asyncio
import logging
import time

import pytest

from switch.journal import JournalError, PostgresJournal, SqliteJournal, TxnRecord
from switch.keys import KeyRing
from switch.messages import TEST_PAN
from switch.sim.terminal import make_purchase
from tests.log_records import Records
from tests.pg import pg_dsn, pg_server  # noqa: F401  (pytest fixtures)
from tests.switch_harness import run, terminal
from tests.test_api import running_api

pytestmark = pytest.mark.timeout(120)

FULL = "journal writes failing: database or disk is full"
NO_LIMIT = 1073741823  # SQLite's default max_page_count


def txn(stan: str) -> TxnRecord:
    return TxnRecord(listener="terminals", terminal_id="TERM0001", terminal_stan=stan,
                     terminal_tx_time="0101120000", mti="0200", pan=TEST_PAN, amount=1000)


async def fill_up(journal: SqliteJournal) -> None:
    """The database may not grow past its current size: the next writes that
    need a new page fail with SQLITE_FULL."""
    pages = (await journal._fetchone("PRAGMA page_count", ()))[0]
    await journal._exec(f"PRAGMA max_page_count = {pages}", ())


async def make_room(journal: SqliteJournal) -> None:
    await journal._exec(f"PRAGMA max_page_count = {NO_LIMIT}", ())


async def readyz(s) -> tuple[int, dict]:
    async with s.get("/readyz") as r:
        return r.status, await r.json()


async def journal_metrics(s) -> tuple[float, float]:
    """(isoswitch_journal_write_failures_total, isoswitch_journal_writes_failing) from /metrics."""
    async with s.get("/metrics") as r:
        assert r.status == 200
        text = await r.text()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("isoswitch_journal_write_failures_total", "isoswitch_journal_writes_failing"):
            values[name] = float(value)
    return values["isoswitch_journal_write_failures_total"], values["isoswitch_journal_writes_failing"]


def test_full_disk_answers_96_logs_bounded_readyz_503_and_recovers(tmp_path):
    async def main():
        captured = Records()
        root = logging.getLogger("isoswitch")
        old_level = root.level
        async with running_api(tmp_path, {"acq-a": {}}, listener={"tls": False}) as api:
            sw = api.sw
            journal = sw.journal
            assert isinstance(journal, SqliteJournal)
            async with api.session(None) as s, terminal(sw, tmp_path) as t:
                st, body = await readyz(s)
                assert st == 200 and body["journal"] == "ok"
                assert await journal_metrics(s) == (0, 0)
                for _ in range(3):
                    assert (await t.request(make_purchase(1000, stan=t.next_stan()), timeout=5))["39"] == "00"

                root.addHandler(captured)
                root.setLevel(logging.WARNING)
                try:
                    await fill_up(journal)
                    codes = []
                    for _ in range(300):
                        codes.append((await t.request(make_purchase(1000, stan=t.next_stan()), timeout=5))["39"])
                    failed = codes.count("96")
                    # a few may fit in the pages there were; then every request is refused
                    assert set(codes) <= {"00", "96"} and failed >= 250, codes
                    assert codes[-50:] == ["96"] * 50
                    assert sw.flow.counters["journal_errors"] == failed  # every failure counted
                    assert journal.write_failures >= failed

                    # not ready, saying why; and it stays so (the heartbeat, an
                    # update in place that a full database still takes, is no proof)
                    for _ in range(3):
                        st, body = await readyz(s)
                        assert st == 503 and body["ready"] is False and body["journal"] == FULL, body
                        await asyncio.sleep(0.6)
                    failures_metric, failing = await journal_metrics(s)
                    assert failing == 1 and failures_metric == journal.write_failures >= failed

                    flow_lines = captured.messages("isoswitch.flow")
                    flow_failures = [r for r in captured.records if r.name == "isoswitch.flow"
                                     and "answered 96" in r.getMessage()]
                    limiter = sw.flow.log_limiter
                    # bounded: a burst within the interval, against hundreds of failures
                    assert 1 <= len(flow_failures) <= limiter.burst, flow_lines
                    # the first with its traceback, the rest one line each
                    assert [r.exc_info is not None for r in flow_failures] == \
                        [True] + [False] * (len(flow_failures) - 1)
                    assert "database or disk is full" in flow_failures[0].getMessage()
                    journal_lines = captured.messages("isoswitch.journal")
                    assert sum("journal writes failing" in m for m in journal_lines) == 1, journal_lines
                    assert len(captured.records) <= 3 * limiter.burst, captured.messages()

                    # space returns: the journal's own probe finds it, with no traffic at all
                    await make_room(journal)
                    for _ in range(100):
                        st, body = await readyz(s)
                        if st == 200:
                            break
                        await asyncio.sleep(0.05)
                    assert st == 200 and body["journal"] == "ok", body
                    failures_metric, failing = await journal_metrics(s)
                    assert failing == 0 and failures_metric >= failed  # a counter: it never goes back
                    assert any("journal writes succeed again" in m for m in captured.messages("isoswitch.journal"))
                    assert (await t.request(make_purchase(1000, stan=t.next_stan()), timeout=5))["39"] == "00"
                finally:
                    root.removeHandler(captured)
                    root.setLevel(old_level)
        # no card data in any of those lines (the requests carried a PAN and track 2)
        text = "\n".join(captured.lines)
        assert TEST_PAN not in text and TEST_PAN[6:] not in text and "=2812" not in text

    run(main())


def test_sqlite_journal_not_ready_until_a_write_needing_space_succeeds(tmp_path):
    """The journal alone, with a fast heartbeat: writes in place (the
    heartbeat) keep succeeding while the database is full, and do not make it
    ready; the probe does once it can grow; a write made after that works."""
    async def go():
        j = SqliteJournal(tmp_path / "j.db", KeyRing.generate(), stale_after=0.6)  # heartbeat every 0.5 s
        await j.start()
        try:
            await j.record_received(txn("000001"))
            await fill_up(j)
            with pytest.raises(JournalError, match="database or disk is full"):
                for i in range(2, 500):
                    await j.record_received_forwarded(txn("%06d" % i), "acq-a", "%06d" % i, {"2": TEST_PAN})
            assert j.problem() == FULL
            failures = j.write_failures
            assert failures >= 1
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.0:  # several heartbeats and probes
                assert j.problem() == FULL
                await asyncio.sleep(0.1)
            assert j.write_failures > failures  # the probes failed too, and count
            await make_room(j)
            for _ in range(60):
                if j.problem() is None:
                    break
                await asyncio.sleep(0.05)
            assert j.problem() is None
            await j.record_received_forwarded(txn("999999"), "acq-a", "999999", {"2": TEST_PAN})
            # the probe row leaves nothing behind
            assert await j._fetchone("SELECT v FROM journal_meta WHERE k = 'write_probe'", ()) is None
        finally:
            await j.close()

    run(go())


def test_postgres_journal_not_ready_while_writes_fail_and_ready_after(pg_dsn):  # noqa: F811
    """The same on PostgreSQL: the database made read-only (a standby, or an
    operator's doing) fails every write with SQLSTATE 25006; the journal
    reports it until a write succeeds, which its probe finds by itself."""
    import asyncpg

    async def set_read_only(on: bool) -> None:
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute("SET default_transaction_read_only = off")  # this session's own
            db = await admin.fetchval("SELECT current_database()")
            await admin.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = {"on" if on else "off"}')
            # the pool's sessions take the setting when they reconnect
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = $1 AND pid <> pg_backend_pid()", db)
        finally:
            await admin.close()

    async def go():
        j = PostgresJournal(pg_dsn, KeyRing.generate(), min_size=1, max_size=2)
        await j.start()
        try:
            await j.record_received(txn("000001"))
            assert j.problem() is None
            await set_read_only(True)
            reasons = set()
            for i in range(2, 8):  # a dropped session first, then read-only sessions
                with pytest.raises(Exception):
                    await j.record_received(txn("%06d" % i))
                reasons.add(j.problem())
            # every failed write made it not ready, a dropped session's too
            assert None not in reasons and \
                "journal writes failing: ReadOnlySQLTransactionError (SQLSTATE 25006)" in reasons, reasons
            assert j.problem() == "journal writes failing: ReadOnlySQLTransactionError (SQLSTATE 25006)"
            await asyncio.sleep(1.5)  # the probe fails as well
            assert j.problem() is not None
            await set_read_only(False)
            for _ in range(100):
                if j.problem() is None:
                    break
                await asyncio.sleep(0.05)
            assert j.problem() is None
            await j.record_received(txn("000099"))
        finally:
            await j.close()

    run(go())
