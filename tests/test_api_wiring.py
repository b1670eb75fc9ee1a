"""`[api]` in the config starts the REST shim, metrics and signed webhooks with the switch."""
import asyncio
import contextlib
import json
import ssl
import subprocess
import sys
import time

from aiohttp import ClientSession, TCPConnector, web

from switch import certs
from switch.api.server import API_STATE, bound_port
from switch.api.webhooks import verify_signature
from switch.messages import TEST_PAN
from tests.pg import pg_dsn, pg_server  # noqa: F401  (pytest fixtures)
from tests.switch_harness import run, running_switch



def _payments_key(tmp_path) -> str:
    """A payments-scoped API key, made with the CLI in the switch's state directory."""
    (tmp_path / "state").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "switch.api.auth", "create", "--file",
                           str(tmp_path / "state" / "api_keys.json"), "--name", "t", "--scopes", "payments"],
                          capture_output=True, text=True, check=True).stdout.split()[-1]


# the REST shim on a random port, for `running_switch(..., routing=API_ON)`
API_ON = """
[api]
enabled = true
port = 0
"""


def _payments_auth(tmp_path) -> dict:
    """The Authorization header of a new payments-scoped API key (``_payments_key``)."""
    return {"Authorization": f"Bearer {_payments_key(tmp_path)}"}


def _purchase(amount: int) -> dict:
    """A POST /v1/payments body: a purchase of ``amount`` cents in USD with the test card."""
    return {"pan": TEST_PAN, "expiry": "2912", "amount": amount, "currency": "USD", "type": "purchase"}


def _session(sw, tmp_path) -> tuple[ClientSession, str]:
    """An HTTPS client trusting the dev CA, and the API's base URL."""
    ctx = ssl.create_default_context(cafile=str(certs.dev_pki_paths(tmp_path / "state").ca_cert))
    return ClientSession(connector=TCPConnector(ssl=ctx)), f"https://localhost:{bound_port(sw.api_runner)}"


WEBHOOK_SECRET = "s3cret-s3cret-s3cret"


@contextlib.asynccontextmanager
async def _webhook_receiver(tmp_path, ssl_context=None, host="127.0.0.1"):
    """A receiver that verifies every signature; yields (the ``[api]`` block
    that sends webhooks to it, the events it received)."""
    (tmp_path / "hook.secret").write_text(WEBHOOK_SECRET)
    events = []

    async def hook(request):
        raw = await request.read()
        assert verify_signature(WEBHOOK_SECRET, request.headers.get("X-Isoswitch-Signature"), raw,
                                tolerance_s=300)
        events.append(json.loads(raw))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    scheme = "http" if ssl_context is None else "https"
    api = f"""
    [api]
    enabled = true
    port = 0
    webhook_url = "{scheme}://{host}:{port}/hook"
    webhook_secret_file = "{tmp_path / 'hook.secret'}"
    """
    try:
        yield api, events
    finally:
        await runner.cleanup()


async def _first_event(events: list) -> dict:
    for _ in range(100):
        if events:
            break
        await asyncio.sleep(0.05)
    assert events, "no webhook event arrived"
    return events[0]


def test_config_starts_api_and_signed_webhooks(tmp_path):
    async def go():
        async with _webhook_receiver(tmp_path) as (api, events):
            key = _payments_key(tmp_path)
            async with running_switch(tmp_path, {"acq-a": {}}, routing=api) as sw:
                session, base = _session(sw, tmp_path)
                async with session as s:
                    r = await s.post(f"{base}/v1/payments",
                                     json={"pan": TEST_PAN, "expiry": "2912", "amount": 1234,
                                           "currency": "USD", "type": "purchase"},
                                     headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "o-1"})
                    body = await r.json()
                    assert r.status == 201 and body["approved"] and body["masked_pan"] == "476173******0010"
                    m = await (await s.get(f"{base}/metrics")).text()
                    assert "isoswitch_transactions_total" in m and TEST_PAN not in m
                assert (await _first_event(events))["data"]["amount"] == 1234
                assert TEST_PAN not in json.dumps(events)

    run(go())


def test_webhooks_to_an_https_receiver_on_a_private_ca_are_delivered_and_counted(tmp_path):
    """[api] webhook_ca: the receiver's certificate is checked against that CA;
    each delivery is counted in isoswitch_webhook_deliveries at /metrics."""
    pki = certs.ensure_dev_pki(tmp_path / "state")  # the receiver's certificate and its CA

    async def go():
        tls = certs.server_context(pki.server_cert, pki.server_key, None)
        async with _webhook_receiver(tmp_path, tls, host="localhost") as (api, events):
            api += f'webhook_ca = "{pki.ca_cert}"\n'
            auth = _payments_auth(tmp_path)
            async with running_switch(tmp_path, {"acq-a": {}}, routing=api) as sw:
                session, base = _session(sw, tmp_path)
                async with session as s:
                    r = await s.post(f"{base}/v1/payments", json=_purchase(4321),
                                     headers={**auth, "Idempotency-Key": "o-tls"})
                    assert r.status == 201
                    assert (await _first_event(events))["data"]["amount"] == 4321
                    m = await (await s.get(f"{base}/metrics")).text()
                assert 'isoswitch_webhook_deliveries_total{result="delivered"} 1.0' in m

    run(go())


def test_api_transactions_and_cards_survive_a_restart_in_the_journal(tmp_path):
    """The config-started API keeps its records in the journal: after a restart a
    payment is still listed and readable, and it can still be refunded (its card
    comes back from AES-GCM ciphertext in the journal). The card is deleted once
    the payment is fully refunded; no clear PAN is ever written."""
    import sqlite3


    async def go():
        auth = _payments_auth(tmp_path)
        async with running_switch(tmp_path, {"acq-a": {}}, routing=API_ON) as sw:
            s, base = _session(sw, tmp_path)
            async with s:
                r = await s.post(f"{base}/v1/payments", json={"pan": TEST_PAN, "expiry": "2912", "amount": 5000,
                                                              "currency": "USD", "type": "purchase"},
                                 headers={**auth, "Idempotency-Key": "p-1"})
                paid = await r.json()
                assert r.status == 201 and paid["approved"]
        # a new switch process on the same state directory
        async with running_switch(tmp_path, {"acq-a": {}}, routing=API_ON) as sw:
            s, base = _session(sw, tmp_path)
            async with s:
                r = await s.get(f"{base}/v1/transactions/{paid['id']}", headers=auth)
                assert r.status == 200 and await r.json() == paid
                r = await s.get(f"{base}/v1/transactions?limit=10", headers=auth)
                assert [t["id"] for t in (await r.json())["data"]] == [paid["id"]]
                r = await s.post(f"{base}/v1/payments/{paid['id']}/refund", json={"amount": 2000},
                                 headers={**auth, "Idempotency-Key": "r-1"})
                part = await r.json()
                assert r.status == 201 and part["approved"] and part["parent_id"] == paid["id"], part
                sent = [d for d in sw.sims["acq-a"].received if d.get("3") == "200000"]
                assert len(sent) == 1 and sent[0]["2"] == TEST_PAN  # the card came back from the journal
                r = await s.get(f"{base}/v1/transactions/{paid['id']}", headers=auth)
                assert (await r.json())["status"] == "partially_refunded"
                db = sqlite3.connect(tmp_path / "state" / "journal.db")
                try:
                    assert db.execute("SELECT card IS NOT NULL FROM api_txn WHERE id = ?",
                                      (paid["id"],)).fetchone() == (1,)
                finally:
                    db.close()
                r = await s.post(f"{base}/v1/payments/{paid['id']}/refund", json={"amount": 3000},
                                 headers={**auth, "Idempotency-Key": "r-2"})
                assert r.status == 201 and (await r.json())["approved"]
                r = await s.get(f"{base}/v1/transactions/{paid['id']}", headers=auth)
                assert (await r.json())["status"] == "refunded"
                db = sqlite3.connect(tmp_path / "state" / "journal.db")
                try:  # fully refunded: the card is gone
                    assert db.execute("SELECT card IS NULL FROM api_txn WHERE id = ?",
                                      (paid["id"],)).fetchone() == (1,)
                    assert db.execute("SELECT COUNT(*) FROM api_txn").fetchone() == (3,)
                finally:
                    db.close()
                r = await s.post(f"{base}/v1/payments/{paid['id']}/refund", json={"amount": 1},
                                 headers={**auth, "Idempotency-Key": "r-3"})
                assert r.status == 409
        for f in (tmp_path / "state").glob("journal.db*"):
            data = f.read_bytes()
            assert TEST_PAN.encode() not in data and TEST_PAN.encode("utf-16-le") not in data

    run(go(), timeout=120)


def test_a_retried_payment_is_never_charged_twice_across_a_restart(tmp_path):
    """The Idempotency-Key of POST /v1/payments is journaled with the payment's
    record: a client retrying after the switch restarted (its answer lost in
    a crash, say) gets that payment back, the acquirer sees one request; the
    same key with another body is 422, a new key is a new payment."""
    body = _purchase(7100)

    def purchases(sw):
        return [d for d in sw.sims["acq-a"].received if d.get("t") == "0200"]

    async def go():
        auth = _payments_auth(tmp_path)
        async with running_switch(tmp_path, {"acq-a": {}}, routing=API_ON) as sw:
            s, base = _session(sw, tmp_path)
            async with s:
                r = await s.post(f"{base}/v1/payments", json=body, headers={**auth, "Idempotency-Key": "k-1"})
                paid = await r.json()
                assert r.status == 201 and paid["approved"]
                r = await s.post(f"{base}/v1/payments", json=dict(body, expiry="0101"),
                                 headers={**auth, "Idempotency-Key": "bad-1"})
                assert r.status == 400  # no payment made: the key does not stand for one
                r = await s.post(f"{base}/v1/payments/{paid['id']}/refund", json={"amount": 100},
                                 headers={**auth, "Idempotency-Key": "rf-1"})
                refund = await r.json()
                assert r.status == 201 and refund["approved"] and refund["parent_id"] == paid["id"]
        async with running_switch(tmp_path, {"acq-a": {}}, routing=API_ON) as sw:
            s, base = _session(sw, tmp_path)
            async with s:
                for _ in range(2):  # from the journal, then from the new process's cache
                    r = await s.post(f"{base}/v1/payments", json=body, headers={**auth, "Idempotency-Key": "k-1"})
                    assert r.status == 201 and await r.json() == paid
                    assert r.headers.get("Idempotent-Replayed") == "true"
                r = await s.post(f"{base}/v1/payments", json=dict(body, amount=7200),
                                 headers={**auth, "Idempotency-Key": "k-1"})
                assert r.status == 422
                assert not purchases(sw)
                # a follow-up too: the refund retried after the restart is not refunded again
                r = await s.post(f"{base}/v1/payments/{paid['id']}/refund", json={"amount": 100},
                                 headers={**auth, "Idempotency-Key": "rf-1"})
                assert r.status == 201 and await r.json() == refund
                assert r.headers.get("Idempotent-Replayed") == "true"
                assert not [d for d in sw.sims["acq-a"].received if d.get("3") == "200000"]
                r = await s.get(f"{base}/v1/transactions/{paid['id']}", headers=auth)
                assert (await r.json())["refunded_amount"] == 100
                r = await s.post(f"{base}/v1/payments", json=dict(body, expiry="0101"),
                                 headers={**auth, "Idempotency-Key": "bad-1"})
                assert r.status == 400
                r = await s.post(f"{base}/v1/payments", json=body, headers={**auth, "Idempotency-Key": "k-2"})
                other = await r.json()
                assert r.status == 201 and other["id"] != paid["id"] and len(purchases(sw)) == 1

    run(go())


def test_payment_record_is_journaled_with_its_outcome_or_rewritten_with_the_answer(tmp_path):
    """With the journal's store the API record rides in the flow's outcome
    transaction. When that write fails -- committed but reported lost (the
    writer died after COMMIT), or not committed at all -- the flow answers 96
    and reverses; the record then says 96 too, whichever it was."""
    from switch.journal import JournalError

    body = _purchase(4100)

    async def go():
        auth = _payments_auth(tmp_path)
        async with running_switch(tmp_path, {"acq-a": {}}, routing=API_ON) as sw:
            session, base = _session(sw, tmp_path)
            real = sw.journal.record_outcome
            calls = []

            async def committed_then_lost(*a, **k):
                calls.append(len(a) > 5)  # the record came attached
                await real(*a, **k)
                raise JournalError("journal writer has stopped")

            async def lost(*a, **k):
                calls.append(len(a) > 5)
                raise JournalError("journal writer has stopped")

            async with session as s:
                for i, broken in enumerate((committed_then_lost, lost)):
                    sw.journal.record_outcome = broken
                    r = await s.post(f"{base}/v1/payments", json=body, headers={**auth, "Idempotency-Key": f"x{i}"})
                    paid = await r.json()
                    assert r.status == 201 and paid["response_code"] == "96" and not paid["approved"], paid
                    del sw.journal.record_outcome
                    r = await s.get(f"{base}/v1/transactions/{paid['id']}", headers=auth)
                    got = await r.json()
                    assert r.status == 200 and got["response_code"] == "96" and got["status"] == "declined", got
                    # and a retry is answered with that record, not charged again
                    r = await s.post(f"{base}/v1/payments", json=body, headers={**auth, "Idempotency-Key": f"x{i}"})
                    assert (await r.json())["id"] == paid["id"]
            assert calls == [True, True]
            assert await sw.reversals.wait_empty(10)
            assert sw.reversals.counters["queued"] == 2
            assert len([d for d in sw.sims["acq-a"].received if d["t"] == "0400"]) == 2

    run(go())


def test_a_refund_counts_in_its_payment_in_the_same_write(tmp_path):
    """A follow-up's change to its payment (the refunded amount, the status)
    is journaled in the refund's own outcome write. Before, it was a separate
    write after the answer: a crash between the two left a journaled refund
    that its payment did not count, so the payment could be refunded again.
    When that one write is reported lost (committed or not), the client gets
    96, the refund is reversed at the acquirer, and the payment says what it
    said before."""
    from switch.journal import JournalError

    body = _purchase(5000)

    async def go():
        auth = _payments_auth(tmp_path)
        async with running_switch(tmp_path, {"acq-a": {}}, routing=API_ON) as sw:
            session, base = _session(sw, tmp_path)
            store = sw.api_runner.app[API_STATE].store

            async def refund(s, pid, amount, idem):
                r = await s.post(f"{base}/v1/payments/{pid}/refund", json={"amount": amount},
                                 headers={**auth, "Idempotency-Key": idem})
                return r.status, await r.json()

            async def payment(s, pid):
                r = await s.get(f"{base}/v1/transactions/{pid}", headers=auth)
                return await r.json()

            async with session as s:
                r = await s.post(f"{base}/v1/payments", json=body, headers={**auth, "Idempotency-Key": "p1"})
                paid = await r.json()
                assert paid["approved"], paid

                # every separate record update fails from here on (as if the
                # switch died right after answering): the refund still counts
                async def no_update(*a, **k):
                    raise JournalError("journal writer has stopped")
                store.update = no_update
                status, ref = await refund(s, paid["id"], 5000, "r1")
                assert status == 201 and ref["approved"], ref
                got = await payment(s, paid["id"])
                assert got["status"] == "refunded" and got["refunded_amount"] == 5000, got
                del store.update
                status, again = await refund(s, paid["id"], 5000, "r2")
                assert status == 409, again  # nothing left to refund

                # a refund whose outcome write is lost: 96, reversed, payment unchanged
                r = await s.post(f"{base}/v1/payments", json=body, headers={**auth, "Idempotency-Key": "p2"})
                paid2 = await r.json()
                real = sw.journal.record_outcome

                async def committed_then_lost(*a, **k):
                    await real(*a, **k)
                    raise JournalError("journal writer has stopped")
                sw.journal.record_outcome = committed_then_lost
                status, ref2 = await refund(s, paid2["id"], 2000, "r3")
                del sw.journal.record_outcome
                assert status == 201 and ref2["response_code"] == "96" and not ref2["approved"], ref2
                got = await payment(s, paid2["id"])
                assert got["status"] == "approved" and not got["refunded_amount"], got
                assert (await payment(s, ref2["id"]))["response_code"] == "96"
                status, ref3 = await refund(s, paid2["id"], 5000, "r4")
                assert status == 201 and ref3["approved"], ref3
            assert await sw.reversals.wait_empty(10)
            reversed_stans = [d.get("90", "")[4:10] for d in sw.sims["acq-a"].received if d["t"] == "0400"]
            assert len(reversed_stans) == 1

    run(go())


def test_captures_and_refunds_go_to_the_acquirer_that_had_the_payment(tmp_path):
    """With two acquirers in the rule, a follow-up went to the first the rule
    names: a capture completed an authorization the other acquirer held, and
    refunds spread over both."""
    routing = """
    [routing]
    default_acquirers = ["acq-a", "acq-b"]
    """ + API_ON

    async def go():
        auth = _payments_auth(tmp_path)
        async with running_switch(tmp_path, routing=routing) as sw:
            sw.router.rng.random = lambda: 0.0  # acq-a first whenever it can take it
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            session, base = _session(sw, tmp_path)
            async with session as s:
                sw.links["acq-a"].draining = True  # the payments go to acq-b
                auth_body = dict(_purchase(3000), type="authorization")
                r = await s.post(f"{base}/v1/payments", json=auth_body, headers={**auth, "Idempotency-Key": "a1"})
                authz = await r.json()
                r = await s.post(f"{base}/v1/payments", json=_purchase(4000), headers={**auth, "Idempotency-Key": "p1"})
                paid = await r.json()
                assert authz["approved"] and paid["approved"]
                sw.links["acq-a"].draining = False  # acq-a would come first now
                r = await s.post(f"{base}/v1/payments/{authz['id']}/capture", json={},
                                 headers={**auth, "Idempotency-Key": "c1"})
                assert (await r.json())["approved"]
                for i in range(2):
                    r = await s.post(f"{base}/v1/payments/{paid['id']}/refund", json={"amount": 1000},
                                     headers={**auth, "Idempotency-Key": f"r{i}"})
                    assert (await r.json())["approved"]
            assert [d["t"] for d in a.received if not d["t"].startswith("08")] == []
            assert sorted(d["t"] for d in b.received if not d["t"].startswith("08")) == \
                ["0100", "0200", "0200", "0200", "0220"]
            assert sw.flow.counters["no_acquirer"] == 0

    run(go())


def test_two_switches_on_one_postgres_journal_never_refund_a_payment_twice(tmp_path, pg_dsn):
    """Two switch processes share a PostgreSQL journal: a refund of a payment's
    full amount posted to each at once (two Idempotency-Keys, as from a
    double click) refunds it once. Before, each process read the payment as
    unrefunded under its own in-process lock and both refunds went to the
    acquirer. Now a lease in the journal orders a payment's follow-ups across
    processes: the second waits for nothing, it gets 409 (lease held, retry)
    or, once the first is done, 409 for an amount no longer refundable."""
    api_cfg = API_ON + f"""
    [journal]
    backend = "postgres"
    dsn = "{pg_dsn}"
    """
    body = _purchase(5000)

    async def go():
        auth = _payments_auth(tmp_path)
        # one state directory: the same API keys and journal key file for both
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 300.0}}, routing=api_cfg) as a, \
                running_switch(tmp_path, {"acq-a": {"latency_ms": 300.0}}, routing=api_cfg) as b:
            (sa, base_a), (sb, base_b) = _session(a, tmp_path), _session(b, tmp_path)
            async with sa, sb:
                r = await sa.post(f"{base_a}/v1/payments", json=body, headers={**auth, "Idempotency-Key": "p"})
                paid = await r.json()
                assert r.status == 201 and paid["approved"], paid

                async def refund(s, base, idem):
                    r = await s.post(f"{base}/v1/payments/{paid['id']}/refund", json={"amount": 5000},
                                     headers={**auth, "Idempotency-Key": idem})
                    return r.status, await r.json(), r.headers.get("Retry-After")

                results = await asyncio.gather(refund(sa, base_a, "r-a"), refund(sb, base_b, "r-b"))
                approved = [res for res in results if res[0] == 201 and res[1]["approved"]]
                assert len(approved) == 1, results
                other = next(res for res in results if res not in approved)
                assert other[0] == 409, results
                r = await sb.get(f"{base_b}/v1/transactions/{paid['id']}", headers=auth)
                got = await r.json()
                assert got["status"] == "refunded" and got["refunded_amount"] == 5000, got
                # the lease is gone with the refund: a later follow-up is judged on the amounts
                status, out, _ = await refund(sb, base_b, "r-c")
                assert status == 409 and "refund" in out["detail"], out
                # the one turned away retries with its key: run again (its key's claim
                # was released), not "in progress" and not a replay of that 409
                loser = ("r-a", sa, base_a) if results[1] is approved[0] else ("r-b", sb, base_b)
                status, out, _ = await refund(loser[1], loser[2], loser[0])
                assert status == 409 and out["type"].endswith(":conflict") and "refund" in out["detail"], out
            refunds = [d for sw in (a, b) for d in sw.sims["acq-a"].received if d.get("3", "").startswith("20")]
            assert len(refunds) == 1, refunds

    run(go())


def test_an_idempotency_key_is_remembered_for_its_window(tmp_path):
    """``[api] idempotency_hours``: within the window a retry is answered with
    the payment it made, also after a restart; past it the key is new again
    (a retry is a new payment), and the pruning deletes keys past their
    window from the journal."""
    window = 5.4
    api_cfg = API_ON + f"idempotency_hours = {window / 3600}\n"
    body = _purchase(1234)

    async def go():
        auth = _payments_auth(tmp_path)

        async def pay(s, base, idem):
            r = await s.post(f"{base}/v1/payments", json=body, headers={**auth, "Idempotency-Key": idem})
            return await r.json(), r.headers.get("Idempotent-Replayed")

        t0 = time.monotonic()
        async with running_switch(tmp_path, {"acq-a": {}}, routing=api_cfg) as sw:
            session, base = _session(sw, tmp_path)
            async with session as s:
                first, _ = await pay(s, base, "w-1")
                await pay(s, base, "w-2")
                again, replayed = await pay(s, base, "w-1")
                assert replayed == "true" and again["id"] == first["id"]
        async with running_switch(tmp_path, {"acq-a": {}}, routing=api_cfg) as sw:
            session, base = _session(sw, tmp_path)
            async with session as s:
                again, replayed = await pay(s, base, "w-1")
                assert time.monotonic() - t0 < window, "the restarts took the whole window"
                assert replayed == "true" and again["id"] == first["id"]
                await asyncio.sleep(window + 0.3 - (time.monotonic() - t0))
                second, replayed = await pay(s, base, "w-1")
                assert second["approved"] and second["id"] != first["id"] and replayed is None, second
            # pruned every tenth of the window (at least every second): w-2 goes, w-1's new use stays
            for _ in range(40):
                rows = await sw.journal._fetchall("SELECT idem_key, api_id FROM api_idem", (), slow=False)
                if len(rows) == 1:
                    break
                await asyncio.sleep(0.1)
            assert [tuple(r) for r in rows] == [("w-1", second["id"])], rows

    run(go())
