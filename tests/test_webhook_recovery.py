"""Webhook events a crash lost between a REST transaction's journaled outcome and
its outbox write are queued at start-up: once each, in order per payment, only
this outbox's, and only from a bounded recent window.

The record (with its outcome) is committed to the journal, then the event is
written to a second database, ``<state_dir>/webhooks.sqlite``. Before, a kill -9
between the two lost the event for good: the receiver never heard of an
approved payment, or of a refund that the journal shows.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import sqlite3
import ssl
import time

import pytest
from aiohttp import ClientSession, TCPConnector, web

from switch import certs
from switch.api import server as api_server
from switch.api.server import ApiSettings, JournalTransactionStore, WEBHOOK_ORIGIN, recover_webhooks
from switch.api.webhooks import SIGNATURE_HEADER, WebhookSender, verify_signature
from switch.journal import SqliteJournal
from switch.keys import KeyRing
from switch.messages import TEST_PAN
from switch.sim.acquirer import AcquirerSimulator
from tests.pg import pg_dsn, pg_server  # noqa: F401  (pytest fixtures)
from tests.switch_harness import run, running_switch
from tests.test_api_durability import _api_port
from tests.test_api_wiring import API_ON, _payments_auth, _purchase, _session
from tests.test_durability import SwitchProcess, wait_until, write_config

pytestmark = pytest.mark.timeout(180)

SECRET = "whsec_recovery_0123456789"


class Receiver:
    """A real webhook receiver on 127.0.0.1: verifies each signature, keeps the
    events per path in arrival order (``/a``, ``/b``, ...)."""

    def __init__(self):
        self.events: dict[str, list[dict]] = collections.defaultdict(list)
        self.bad = 0

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if not verify_signature(SECRET, request.headers.get(SIGNATURE_HEADER), raw):
            self.bad += 1
            return web.Response(status=400)
        self.events[request.match_info["name"]].append(json.loads(raw))
        return web.Response(status=204)

    @contextlib.asynccontextmanager
    async def running(self):
        app = web.Application()
        app.router.add_post("/{name}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.port = runner.addresses[0][1]
        try:
            yield self
        finally:
            await runner.cleanup()

    def api_block(self, tmp_path, name: str = "a", extra: str = "") -> str:
        (tmp_path / "hook.secret").write_text(SECRET)
        return (f'[api]\nenabled = true\nport = 0\nwebhook_url = "http://127.0.0.1:{self.port}/{name}"\n'
                f'webhook_secret_file = "{tmp_path / "hook.secret"}"\n' + extra)

    def by_record(self, name: str = "a") -> dict[str, list[dict]]:
        """record id -> its events (distinct event ids; at-least-once delivery)."""
        out: dict[str, dict[str, dict]] = collections.defaultdict(dict)
        for ev in self.events[name]:
            out[ev["data"]["id"]][ev["id"]] = ev
        return {rid: list(evs.values()) for rid, evs in out.items()}


def _outbox(state_dir) -> list[tuple]:
    db = sqlite3.connect(state_dir / "webhooks.sqlite")
    try:
        return db.execute("SELECT record_id, type, state FROM outbox ORDER BY seq").fetchall()
    finally:
        db.close()


def _journal_records(state_dir) -> list[tuple]:
    db = sqlite3.connect(state_dir / "journal.db")
    try:
        return db.execute("SELECT id, parent_id, status FROM api_txn ORDER BY created_ts, id").fetchall()
    finally:
        db.close()


def test_kill9_between_the_journaled_outcome_and_the_outbox_write_loses_no_event(tmp_path):
    """A real switch process: the outbox is held locked by another connection (a
    real SQLite write lock), so a payment's and a refund's events stall after
    their records and outcomes are journaled; the process is killed with
    SIGKILL right then. After the restart the receiver gets both events, once
    each, the refund's after its payment's; a second restart sends nothing."""
    async def go():
        sim = await AcquirerSimulator(name="acq-a", latency_ms=0.0).start()
        recv = Receiver()
        state = tmp_path / "state"
        try:
            async with recv.running():
                cfg = write_config(tmp_path, sim.port, journal=recv.api_block(tmp_path))
                auth = _payments_auth(tmp_path)
                log = tmp_path / "switch.log"
                sw = SwitchProcess(cfg, log)
                await sw.started()
                ctx = ssl.create_default_context(cafile=str(certs.dev_pki_paths(state).ca_cert))
                base = f"https://localhost:{await _api_port(sw)}"
                async with ClientSession(connector=TCPConnector(ssl=ctx)) as s:
                    r = await s.post(f"{base}/v1/payments", json=_purchase(5000),
                                     headers={**auth, "Idempotency-Key": "p1"})
                    p1 = await r.json()
                    assert r.status == 201 and p1["approved"], p1
                    assert await wait_until(lambda: _outbox(state) == [(p1["id"], "purchase.approved",
                                                                        "delivered")], 15)
                    # another writer holds the outbox: the switch's next event write waits for it
                    lock = sqlite3.connect(state / "webhooks.sqlite", isolation_level=None)
                    lock.execute("BEGIN IMMEDIATE")
                    try:
                        pay2 = asyncio.ensure_future(s.post(f"{base}/v1/payments", json=_purchase(7000),
                                                            headers={**auth, "Idempotency-Key": "p2"}))
                        refund = asyncio.ensure_future(s.post(f"{base}/v1/payments/{p1['id']}/refund",
                                                              json={"amount": 1200},
                                                              headers={**auth, "Idempotency-Key": "r1"}))
                        # both records (and outcomes) committed to the journal ...
                        assert await wait_until(lambda: len(_journal_records(state)) == 3, 4, 0.01)
                        await asyncio.sleep(0.2)
                        # ... and neither answered: their events are stuck before the outbox
                        assert not pay2.done() and not refund.done()
                        sw.kill9()
                        done = await asyncio.gather(pay2, refund, return_exceptions=True)
                        assert all(isinstance(d, Exception) for d in done), done
                        assert [r[0] for r in lock.execute("SELECT record_id FROM outbox")] == [p1["id"]]
                    finally:
                        lock.execute("ROLLBACK")
                        lock.close()
                records = _journal_records(state)
                (p2_id,) = [r[0] for r in records if r[0] != p1["id"] and r[1] is None]
                (refund_id,) = [r[0] for r in records if r[1] == p1["id"]]

                sw2 = SwitchProcess(cfg, log)
                await sw2.started()
                await _api_port(sw2)
                assert await wait_until(lambda: len(recv.by_record()) == 3, 20), recv.events
                await asyncio.sleep(1.0)  # anything doubled would arrive meanwhile
                got = recv.by_record()
                assert {rid: [e["type"] for e in evs] for rid, evs in got.items()} == {
                    p1["id"]: ["purchase.approved"], p2_id: ["purchase.approved"], refund_id: ["refund.approved"]}
                assert got[p2_id][0]["data"]["amount"] == 7000 and got[p2_id][0]["data"]["status"] == "approved"
                ref = got[refund_id][0]["data"]
                assert ref["parent_id"] == p1["id"] and ref["amount"] == 1200
                # in order for the payment: its approval, then its refund
                assert [e["type"] for e in recv.events["a"] if p1["id"] in (e["data"]["id"], e["data"]["parent_id"])] \
                    == ["purchase.approved", "refund.approved"]
                assert "webhooks: 2 transactions whose event a crash lost queued" in log.read_text()[sw2.offset:]
                sw2.stop()

                sw3 = SwitchProcess(cfg, log)  # a second restart: nothing is queued again
                await sw3.started()
                await _api_port(sw3)
                await asyncio.sleep(1.5)
                sw3.stop()
                assert "whose event a crash lost" not in log.read_text()[sw3.offset:]
                assert recv.by_record() == got and recv.bad == 0
                assert sorted(r[0] for r in _outbox(state)) == sorted([p1["id"], p2_id, refund_id])
                assert TEST_PAN not in json.dumps(recv.events)
        finally:
            await sim.stop()

    run(go(), timeout=170)


async def _post(s, base, auth, path, body, idem):
    r = await s.post(f"{base}{path}", json=body, headers={**auth, "Idempotency-Key": idem})
    out = await r.json()
    assert r.status == 201, out
    return out


def test_restart_queues_each_lost_event_once_in_order_and_nothing_else(tmp_path, monkeypatch):
    """A real switch and journal, restarted on the outbox a crash leaves: records
    whose events were never written get them, once each, in the records' order
    (two refunds of one payment are two events, after the payment's); the
    payment's event says what its POST answered, not its later refunds. Records
    made before webhooks were enabled are not sent; a further restart queues
    nothing. The scan is paged (a page of 2 here)."""
    monkeypatch.setattr(api_server, "WEBHOOK_RECOVERY_PAGE", 2)
    state = tmp_path / "state"
    sims = {"acq-a": {"approve_below": 100_000}}

    async def go():
        auth = _payments_auth(tmp_path)
        async with running_switch(tmp_path, sims, routing=API_ON) as sw:  # webhooks off
            s, base = _session(sw, tmp_path)
            async with s:
                before = await _post(s, base, auth, "/v1/payments", _purchase(100), "h1")
        recv = Receiver()
        async with recv.running():
            api = recv.api_block(tmp_path)
            async with running_switch(tmp_path, sims, routing=api) as sw:
                s, base = _session(sw, tmp_path)
                async with s:
                    kept = await _post(s, base, auth, "/v1/payments", _purchase(200), "k1")
                    p = await _post(s, base, auth, "/v1/payments", _purchase(5000), "p1")
                    r1 = await _post(s, base, auth, f"/v1/payments/{p['id']}/refund", {"amount": 1000}, "r1")
                    r2 = await _post(s, base, auth, f"/v1/payments/{p['id']}/refund", {"amount": 2000}, "r2")
                    d = await _post(s, base, auth, "/v1/payments", _purchase(200_000), "d1")
                    assert not d["approved"]
                    assert await sw.webhooks.wait_idle(10)
            lost = {p["id"], r1["id"], r2["id"], d["id"]}
            assert len(recv.by_record()) == 5
            # the state a crash between journal and outbox leaves: records without events
            db = sqlite3.connect(state / "webhooks.sqlite")
            db.executemany("DELETE FROM outbox WHERE record_id = ?", [(i,) for i in lost])
            db.commit()
            db.close()
            recv.events.clear()

            async with running_switch(tmp_path, sims, routing=api) as sw:
                assert sw.webhooks.counters["recovered"] == 4
                assert await sw.webhooks.wait_idle(10)
                first = recv.by_record()
            assert set(first) == lost and all(len(evs) == 1 for evs in first.values())
            arrived = [(e["data"]["id"], e["type"]) for e in recv.events["a"]]
            assert [x for x in arrived if x[0] != d["id"]] == [
                (p["id"], "purchase.approved"), (r1["id"], "refund.approved"), (r2["id"], "refund.approved")]
            assert first[d["id"]][0]["type"] == "purchase.declined"
            assert first[p["id"]][0]["data"] == dict(p)  # as answered, though it is partially refunded now
            assert first[r2["id"]][0]["data"] == dict(r2) and first[r2["id"]][0]["data"]["parent_id"] == p["id"]
            assert before["id"] not in first and kept["id"] not in first

            recv.events.clear()
            async with running_switch(tmp_path, sims, routing=api) as sw:
                assert sw.webhooks.counters["recovered"] == 0
                await asyncio.sleep(0.5)
            assert not recv.events
            assert recv.bad == 0

    run(go(), timeout=120)


def test_recovery_scans_only_a_recent_window_of_this_outbox_records(tmp_path):
    """A real journal store and outbox: the scan starts at the newest event less
    the margin (never before the outbox was made), so a record older than that
    (a large history) is not read, and a record tagged with another outbox is
    never this outbox's to send."""
    async def go():
        journal = SqliteJournal(tmp_path / "journal.db", KeyRing.generate())
        await journal.start()
        store = JournalTransactionStore(journal)
        sender = await WebhookSender(tmp_path / "webhooks.sqlite", "http://127.0.0.1:9/none", SECRET,
                                     backoff_min=60.0, poll_interval=0.05).start()
        try:
            settings = ApiSettings(timeout=10.0)
            margin = 2 * settings.timeout + 5.0 + api_server.WEBHOOK_RECOVERY_SLACK
            assert await sender.recovery_since(margin) == sender.created_at  # no event yet
            now = time.time()

            def rec(i, ts, origin=sender.origin):
                return {"id": f"txn_{i:032x}", "type": "purchase", "status": "approved", "approved": True,
                        "response_code": "00", "approval_code": "A1", "masked_pan": "476173******0010",
                        "amount": i, "currency": "USD", "terminal_id": "T1", "merchant_id": "M1",
                        "created": "x", "created_ts": ts, "parent_id": None, "captured_amount": None,
                        "refunded_amount": None, "owner": "k", WEBHOOK_ORIGIN: origin}

            await sender.enqueue("txn_x", "purchase.approved", {"id": "txn_x"}, record_id="txn_x")
            (newest,) = await sender._run(lambda: sender._db.execute("SELECT created FROM outbox").fetchone())
            since = await sender.recovery_since(margin)
            assert since == max(newest - margin, sender.created_at)
            # an outbox made long ago, as after months of traffic
            sender.created_at = now - 86_400
            since = await sender.recovery_since(margin)
            assert since == pytest.approx(newest - margin)
            await store.add(rec(1, since - 1.0))       # before the window: not read
            await store.add(rec(2, since + 1.0))       # in it: lost, queued
            await store.add(rec(3, now, origin="0123456789abcdef"))  # another outbox's
            await store.add(rec(4, now))               # in it: lost, queued
            assert await recover_webhooks(store, sender, settings) == 2
            assert await recover_webhooks(store, sender, settings) == 0  # twice: nothing doubles
            rows = await sender._run(lambda: sender._db.execute(
                "SELECT record_id, txn_id, type FROM outbox ORDER BY seq").fetchall())
            assert rows == [("txn_x", "txn_x", "purchase.approved"),
                            (f"txn_{2:032x}", f"txn_{2:032x}", "purchase.approved"),
                            (f"txn_{4:032x}", f"txn_{4:032x}", "purchase.approved")]
        finally:
            await sender.stop()
            await journal.close()

    run(go(), timeout=60)


OLD_SCHEMA = """
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    txn_id TEXT NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    delivered_at REAL,
    last_error TEXT
);
CREATE INDEX outbox_pending ON outbox (state, txn_id, seq);
"""


def test_an_outbox_from_before_recovery_keeps_working(tmp_path):
    """An outbox file written by the previous version (no record_id, no meta):
    opened, migrated in place, its pending event delivered; its origin is kept
    across restarts, and a record's event is held once."""
    db_path = tmp_path / "webhooks.sqlite"
    db = sqlite3.connect(db_path)
    db.executescript(OLD_SCHEMA)
    body = json.dumps({"id": "evt_old", "type": "purchase.approved", "created": 1.0, "data": {"id": "txn_old"}})
    db.execute("INSERT INTO outbox (event_id, txn_id, type, body, created) VALUES (?, ?, ?, ?, ?)",
               ("evt_old", "txn_old", "purchase.approved", body, time.time()))
    db.commit()
    db.close()

    async def go():
        recv = Receiver()
        async with recv.running():
            url = f"http://127.0.0.1:{recv.port}/a"
            sender = await WebhookSender(db_path, url, SECRET, poll_interval=0.05).start()
            try:
                origin = sender.origin
                assert origin and len(origin) == 16
                assert await sender.wait_idle(10)
                assert await sender.enqueue_recovered([("txn_new", "txn_new", "purchase.approved",
                                                        {"id": "txn_new"})]) == 1
                assert await sender.enqueue_recovered([("txn_new", "txn_new", "purchase.approved",
                                                        {"id": "txn_new"})]) == 0
                assert await sender.absent(["txn_new", "txn_other"]) == {"txn_other"}
                assert await sender.wait_idle(10)
            finally:
                await sender.stop()
            sender = await WebhookSender(db_path, url, SECRET, poll_interval=0.05).start()
            try:
                assert sender.origin == origin
            finally:
                await sender.stop()
        assert [e["id"] for e in recv.events["a"]][:1] == ["evt_old"]
        assert [e["data"]["id"] for e in recv.events["a"]] == ["txn_old", "txn_new"]

    run(go(), timeout=60)


def test_two_switches_on_one_postgres_journal_each_recover_only_their_own(tmp_path, pg_dsn, monkeypatch):
    """Two switches share a PostgreSQL journal (so each sees the other's API
    records), each with its own outbox and receiver path. A lost event of
    switch A's is queued by A's restart, once; B's records, which B's outbox
    already holds, are never sent by A (before: A would send every recent
    record of B's again, under new event ids no receiver dedupes). The scan
    is paged (a page of 2: keyset pages on PostgreSQL)."""
    monkeypatch.setattr(api_server, "WEBHOOK_RECOVERY_PAGE", 2)
    key_file = tmp_path / "keys.json"
    extra = f'[journal]\nbackend = "postgres"\ndsn = "{pg_dsn}"\n[security]\nkey_file = "{key_file}"\n'

    async def go():
        recv = Receiver()
        async with recv.running():
            dirs = {n: tmp_path / n for n in "ab"}
            for d in dirs.values():
                d.mkdir()
            auths = {n: _payments_auth(d) for n, d in dirs.items()}
            cfg = {n: recv.api_block(d, n, extra) for n, d in dirs.items()}
            async with running_switch(dirs["a"], {"acq-a": {}}, routing=cfg["a"]) as a, \
                    running_switch(dirs["b"], {"acq-a": {}}, routing=cfg["b"]) as b:
                (sa, base_a), (sb, base_b) = _session(a, dirs["a"]), _session(b, dirs["b"])
                async with sa, sb:
                    pa = await _post(sa, base_a, auths["a"], "/v1/payments", _purchase(100), "a1")
                    pb = await _post(sb, base_b, auths["b"], "/v1/payments", _purchase(200), "b1")
                    ra = await _post(sa, base_a, auths["a"], f"/v1/payments/{pa['id']}/refund", {}, "a2")
                    assert await a.webhooks.wait_idle(10) and await b.webhooks.wait_idle(10)
            assert set(recv.by_record("a")) == {pa["id"], ra["id"]} and set(recv.by_record("b")) == {pb["id"]}
            db = sqlite3.connect(dirs["a"] / "state" / "webhooks.sqlite")
            db.executemany("DELETE FROM outbox WHERE record_id = ?", [(pa["id"],), (ra["id"],)])
            db.commit()
            db.close()
            recv.events.clear()
            async with running_switch(dirs["a"], {"acq-a": {}}, routing=cfg["a"]) as a, \
                    running_switch(dirs["b"], {"acq-a": {}}, routing=cfg["b"]) as b:
                assert a.webhooks.counters["recovered"] == 2 and b.webhooks.counters["recovered"] == 0
                assert await a.webhooks.wait_idle(10)
            assert [(e["data"]["id"], e["type"]) for e in recv.events["a"]] == [
                (pa["id"], "purchase.approved"), (ra["id"], "refund.approved")]
            assert not recv.events["b"] and recv.bad == 0

    run(go(), timeout=150)


def test_events_the_outbox_refuses_while_running_are_queued_from_the_journal_without_a_restart(tmp_path):
    """The outbox (its own database) refuses writes for a while -- a full disk,
    a lock -- while payments are approved and journaled: their clients get
    201, and each event is queued from the journal once the outbox takes
    writes again, by the running switch, exactly once each; the receiver
    verifies every signature."""
    sims = {"acq-a": {"approve_below": 100_000}}

    async def go():
        auth = _payments_auth(tmp_path)
        recv = Receiver()
        async with recv.running():
            async with running_switch(tmp_path, sims, routing=recv.api_block(tmp_path)) as sw:
                hooks = sw.webhooks
                down = {"on": True, "refused": 0}
                enqueue, enqueue_recovered = hooks.enqueue, hooks.enqueue_recovered

                async def refusing(real, *a, **k):
                    if down["on"]:
                        down["refused"] += 1
                        raise sqlite3.OperationalError("database or disk is full")
                    return await real(*a, **k)
                hooks.enqueue = lambda *a, **k: refusing(enqueue, *a, **k)
                hooks.enqueue_recovered = lambda *a, **k: refusing(enqueue_recovered, *a, **k)
                s, base = _session(sw, tmp_path)
                async with s:
                    refused = [await _post(s, base, auth, "/v1/payments", _purchase(100 + i), f"down{i}")
                               for i in range(3)]
                    assert all(p["approved"] for p in refused)
                    await asyncio.sleep(1.5)  # the first requeue run is refused too: it backs off
                    assert down["refused"] >= 4 and not recv.events
                    down["on"] = False
                    after = await _post(s, base, auth, "/v1/payments", _purchase(500), "up")
                    assert await wait_until(lambda: len(recv.by_record()) == 4, 15)
                    assert await hooks.wait_idle(10)
                    await asyncio.sleep(0.3)
                got = recv.by_record()
        assert set(got) == {p["id"] for p in refused} | {after["id"]}
        assert all(len(evs) == 1 for evs in got.values())
        assert {e["type"] for evs in got.values() for e in evs} == {"purchase.approved"}
        assert recv.bad == 0

    run(go(), timeout=90)
