"""Webhooks: signed, durable, retried; every event arrives despite failures, in order per transaction."""
from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid

import pytest
from aiohttp import web

from switch.api.webhooks import SIGNATURE_HEADER, WebhookSender, sign, verify_signature
from tests.switch_harness import run

pytestmark = pytest.mark.timeout(60)

SECRET = "whsec_" + "k" * 26


def test_verify_signature_rules():
    body = b'{"id":"evt_1"}'
    now = time.time()
    header = sign(SECRET, body, int(now))
    assert verify_signature(SECRET, header, body, now=now)
    assert verify_signature(SECRET, header, body.decode(), now=now)
    assert not verify_signature(SECRET, header, body + b" ", now=now)  # body changed
    assert not verify_signature("other-secret-xxxxxxxx", header, body, now=now)
    assert not verify_signature(SECRET, header, body, now=now + 301)  # too old: replay
    assert verify_signature(SECRET, header, body, tolerance_s=400, now=now + 301)
    assert not verify_signature(SECRET, None, body)
    assert not verify_signature(SECRET, "garbage", body)
    assert not verify_signature(SECRET, f"t={int(now)}", body, now=now)
    # rotation: two v1 entries, either secret verifies
    other = sign("old-secret-xxxxxxxxxxx", body, int(now)).split(",")[1]
    assert verify_signature("old-secret-xxxxxxxxxxx", header + "," + other, body, now=now)


def test_verify_signature_refuses_non_ascii_instead_of_raising():
    """hmac.compare_digest raises TypeError on non-ASCII text: a forged header
    crashed the receiver's handler (a 500) instead of being refused."""
    body = b'{"id":"evt_1"}'
    now = time.time()
    good = sign(SECRET, body, int(now))
    for header in (f"t={int(now)},v1=\u00e9", f"t={int(now)},v1=\udcff", good + ",v1=\u00e9",
                   "t=" + "".join(chr(0x660 + int(c)) for c in str(int(now))) + "," + good.split(",")[1]):
        assert verify_signature(SECRET, header, body, now=now) is (header.startswith(good))


def test_a_redirect_is_not_an_acknowledgement(tmp_path):
    """The sender followed redirects: a 302 became a GET without the event,
    whose 200 marked the event delivered (lost), and the signed event went to
    wherever the Location pointed. A 3xx is a failed attempt, retried."""
    async def main():
        hits = {"hook": 0, "elsewhere": 0}

        async def hook(request):
            await request.read()
            hits["hook"] += 1
            if hits["hook"] <= 2:
                raise web.HTTPFound("/elsewhere") if hits["hook"] == 1 else web.HTTPTemporaryRedirect("/elsewhere")
            return web.Response(status=204)

        async def elsewhere(request):
            hits["elsewhere"] += 1
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/hook", hook)
        app.router.add_route("*", "/elsewhere", elsewhere)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        sender = await WebhookSender(tmp_path / "wh.sqlite", f"http://127.0.0.1:{port}/hook", SECRET,
                                     backoff_min=0.02, backoff_max=0.05, poll_interval=0.05).start()
        try:
            await sender.enqueue("txn_r", "purchase.approved", {"n": 1})
            assert await sender.wait_idle(10)
            stats = await sender.stats()
        finally:
            await sender.stop()
            await runner.cleanup()
        assert hits == {"hook": 3, "elsewhere": 0}
        assert stats["delivered"] == 1 and stats["failed_attempts"] == 2

    run(main(), timeout=30)


class FlakyReceiver:
    """Fails the first attempts of each event (500s and stalls past the sender's timeout)."""

    def __init__(self, fail_first: int, stall_every: int = 3):
        self.fail_first = fail_first
        self.stall_every = stall_every
        self.attempts: collections.Counter = collections.Counter()
        self.first_seen: list[dict] = []  # unique events in arrival order
        self.ids: set[str] = set()
        self.bad_signatures = 0
        self.deliveries = 0

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if not verify_signature(SECRET, request.headers.get(SIGNATURE_HEADER), raw):
            self.bad_signatures += 1
            return web.Response(status=400)
        event = json.loads(raw)
        assert request.headers["X-Isoswitch-Event-Id"] == event["id"]
        self.attempts[event["id"]] += 1
        n = self.attempts[event["id"]]
        if n <= self.fail_first:
            if n % self.stall_every == 0:
                await asyncio.sleep(1.0)  # longer than the sender's timeout
            return web.Response(status=500 if n % 2 else 503)
        self.deliveries += 1
        if event["id"] not in self.ids:  # at-least-once delivery: dedupe by event id
            self.ids.add(event["id"])
            self.first_seen.append(event)
        if n == self.fail_first + 1 and len(self.ids) % 4 == 0:
            # processed, but the answer comes too late: the sender must retry
            # and the receiver sees a duplicate
            await asyncio.sleep(1.0)
        return web.Response(status=204)


def test_every_event_arrives_once_in_order_per_transaction(tmp_path):
    async def main():
        recv = FlakyReceiver(fail_first=3)
        app = web.Application()
        app.router.add_post("/hook", recv.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        db = tmp_path / "webhooks.sqlite"
        sender = await WebhookSender(db, f"http://127.0.0.1:{port}/hook", SECRET, timeout=0.3,
                                     backoff_min=0.02, backoff_max=0.2, poll_interval=0.1).start()
        expected: dict[str, list[str]] = {}
        try:
            steps = ["purchase.approved", "refund.approved", "refund.approved", "reversal.declined"]
            for i in range(12):
                txn = f"txn_{uuid.uuid4().hex}"
                expected[txn] = []
                for step in steps[: 1 + i % len(steps)]:
                    expected[txn].append(await sender.enqueue(txn, step, {"id": txn, "step": step}))
            assert await sender.wait_idle(40), await sender.stats()
        finally:
            await sender.stop()
            await runner.cleanup()
        assert recv.bad_signatures == 0
        all_ids = [e for ids in expected.values() for e in ids]
        assert recv.ids == set(all_ids) and len(recv.first_seen) == len(all_ids)
        assert recv.deliveries > len(all_ids)  # some were delivered twice and deduplicated
        for ids in expected.values():
            assert all(recv.attempts[e] > recv.fail_first for e in ids)  # every one failed first
        per_txn = collections.defaultdict(list)
        for ev in recv.first_seen:
            per_txn[ev["data"]["id"]].append(ev["id"])
        assert dict(per_txn) == expected  # in order per transaction

    run(main(), timeout=60)


def test_outbox_survives_restart(tmp_path):
    """Events written while the receiver is down go out after a sender restart."""
    async def main():
        db = tmp_path / "webhooks.sqlite"
        sender = await WebhookSender(db, "http://127.0.0.1:9/unreachable", SECRET, timeout=0.2,
                                     backoff_min=5.0, poll_interval=0.05).start()
        ids = [await sender.enqueue("txn_a", "purchase.approved", {"n": i}) for i in range(3)]
        await asyncio.sleep(0.2)
        await sender.stop()

        got = []

        async def handle(request):
            raw = await request.read()
            assert verify_signature(SECRET, request.headers[SIGNATURE_HEADER], raw)
            got.append(json.loads(raw)["id"])
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/hook", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        # the same outbox file, a new URL (an operator fixed the endpoint); retries are due now
        import sqlite3
        con = sqlite3.connect(db)
        con.execute("UPDATE outbox SET next_at = 0")
        con.commit()
        con.close()
        sender = await WebhookSender(db, f"http://127.0.0.1:{port}/hook", SECRET, poll_interval=0.05).start()
        try:
            assert await sender.wait_idle(10)
        finally:
            await sender.stop()
            await runner.cleanup()
        assert got == ids

    run(main(), timeout=30)


def test_api_payment_emits_signed_webhook(tmp_path):
    from tests.test_api import payment, post, running_api

    async def main():
        events = []

        async def handle(request):
            raw = await request.read()
            assert verify_signature(SECRET, request.headers[SIGNATURE_HEADER], raw)
            events.append(json.loads(raw))
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/hook", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        sender = await WebhookSender(tmp_path / "wh.sqlite", f"http://127.0.0.1:{port}/hook", SECRET,
                                     poll_interval=0.05).start()
        try:
            async with running_api(tmp_path, webhooks=sender) as api, api.session() as s:
                _, raw, _ = await post(s, "/v1/payments", payment())
                txn = json.loads(raw)
                await post(s, f"/v1/payments/{txn['id']}/reverse")
                assert await sender.wait_idle(10)
        finally:
            await sender.stop()
            await runner.cleanup()
        assert [e["type"] for e in events] == ["purchase.approved", "reversal.approved"]
        assert events[0]["data"]["id"] == txn["id"] and events[1]["data"]["parent_id"] == txn["id"]
        from switch.messages import TEST_PAN
        assert TEST_PAN not in json.dumps(events)

    run(main(), timeout=60)


def test_delivered_events_past_the_retention_are_pruned_and_nothing_owed_is(tmp_path):
    """The outbox does not grow with every transaction ever made: delivered
    events older than the retention (before both now and the newest event)
    are deleted when the sender starts and hourly. Pending and dead events
    stay whatever their age, and so does the newest event, from which
    start-up recovery measures its window: after an idle spell longer than
    the retention, the events in that window are all still there, so
    recovery finds none missing and sends nothing twice."""
    import sqlite3

    day = 86400.0

    async def main():
        db = tmp_path / "webhooks.sqlite"
        with pytest.raises(ValueError):
            WebhookSender(db, "http://127.0.0.1:9/x", SECRET, retention_s=3600)
        sender = await WebhookSender(db, "http://127.0.0.1:9/unreachable", SECRET, timeout=0.2,
                                     backoff_min=600.0, poll_interval=0.05).start()
        for i in range(12):
            await sender.enqueue(f"txn_{i}", "purchase.approved", {"n": i}, record_id=f"rec_{i}")
        await sender.stop()

        now = time.time()
        con = sqlite3.connect(db)
        # seq order = age order: 0-7 delivered, 10 and 20 days old; 8 pending and
        # 9 dead, 30 days old; 10-11 delivered, the newest ones, 9 days old (an
        # outbox idle since then)
        ages = {1: 20, 2: 20, 3: 20, 4: 20, 5: 10, 6: 10, 7: 10, 8: 10, 9: 30, 10: 30, 11: 9.0001, 12: 9}
        states = {9: "pending", 10: "dead"}
        for seq, age in ages.items():
            con.execute("UPDATE outbox SET created = ?, state = ? WHERE seq = ?",
                        (now - age * day, states.get(seq, "delivered"), seq))
        con.execute("UPDATE outbox_meta SET v = ? WHERE k = 'created'", (repr(now - 31 * day),))
        con.commit()
        con.close()

        sender = await WebhookSender(db, "http://127.0.0.1:9/unreachable", SECRET, timeout=0.2,
                                     backoff_min=600.0, poll_interval=0.05, retention_s=7 * day).start()
        try:
            for _ in range(100):  # the sender prunes as it starts
                if sender.counters["pruned"]:
                    break
                await asyncio.sleep(0.02)
            assert await sender.prune() == 0  # nothing more to go
            # cutoff = newest (9 days ago) - 7 days: 16 days ago. Delivered
            # and older than that: seqs 1-4; 5-8 are 10 days old, within 7
            # days of the newest
            assert sender.counters["pruned"] == 4
            left = sqlite3.connect(db)
            rows = dict(left.execute("SELECT seq, state FROM outbox"))
            left.close()
            assert sorted(rows) == [5, 6, 7, 8, 9, 10, 11, 12]
            assert rows[9] == "pending" and rows[10] == "dead" and rows[12] == "delivered"
            # recovery's window still starts from the newest event, and every
            # record in it has its event
            since = await sender.recovery_since(185.0)
            assert abs(since - (now - 9 * day - 185.0)) < 1.0
            assert await sender.absent(["rec_10", "rec_11", "rec_3"]) == {"rec_3"}  # rec_3: seq 4, pruned
        finally:
            await sender.stop()

    run(main(), timeout=30)
