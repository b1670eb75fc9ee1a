"""REST shim end to end: a real switch with acquirer simulators, the API over HTTPS (dev PKI)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from switch import certs
from switch.api import ApiKeyStore, ApiSettings, MemoryTransactionStore, bound_port, start_api
from switch.config import ApiConfig
from switch.messages import TEST_PAN, luhn_check_digit, mask_pan
from switch.metrics import Metrics
from switch.sim.acquirer import Fault
from tests.switch_harness import run, running_switch

pytestmark = pytest.mark.timeout(120)

# Other Luhn-valid test cards, built from prefixes so no card number literal
# sits in the repository (see switch.messages.TEST_PAN).
MC_TEST_PAN = "541333000000000" + luhn_check_digit("541333000000000")
BAD_LUHN_PAN = TEST_PAN[:-1] + str((int(TEST_PAN[-1]) + 1) % 10)
FUTURE = time.strftime("%y%m", time.gmtime(time.time() + 3 * 365 * 86400))


@dataclass
class Api:
    sw: object
    url: str
    ssl: object
    keys: dict[str, str]
    key_store: ApiKeyStore
    store: MemoryTransactionStore
    metrics: Metrics
    runner: object

    def session(self, key: str | None = "payments", **headers) -> aiohttp.ClientSession:
        h = dict(headers)
        if key is not None:
            h["Authorization"] = f"Bearer {self.keys[key]}"
        return aiohttp.ClientSession(self.url, headers=h, connector=aiohttp.TCPConnector(ssl=self.ssl))


@contextlib.asynccontextmanager
async def running_api(tmp_path: Path, sims: dict | None = None, *, webhooks=None, rate: float = 1000.0,
                      tls: bool = True, settings: ApiSettings | None = None, **switch_kw):
    """A switch routed to simulators plus the API on 127.0.0.1:0; yields an ``Api``."""
    async with running_switch(tmp_path, sims, **switch_kw) as sw:
        pki = await asyncio.to_thread(certs.ensure_dev_pki, tmp_path / "state")
        key_store = ApiKeyStore(tmp_path / "state" / "api_keys.json")
        keys = {
            "payments": key_store.create_key("shop", ["payments"], rate, int(rate)),
            "admin": key_store.create_key("ops", ["admin"], rate, int(rate)),
            "both": key_store.create_key("all", ["payments", "admin"], rate, int(rate)),
            "slow": key_store.create_key("slow", ["payments"], 0.5, 2),
        }
        metrics = sw.metrics  # the switch instruments itself when metrics are enabled (default)
        if metrics is None:
            metrics = Metrics(sw)
            metrics.instrument(sw)
        store = MemoryTransactionStore()
        cfg = ApiConfig(enabled=True, host="127.0.0.1", port=0, tls=tls,
                        cert=pki.server_cert if tls else None, key=pki.server_key if tls else None)
        runner = await start_api(sw, cfg, keys=key_store, store=store, webhooks=webhooks, metrics=metrics,
                                 settings=settings)
        scheme = "https" if tls else "http"
        ssl = certs.client_context(pki.ca_cert) if tls else False
        try:
            yield Api(sw, f"{scheme}://127.0.0.1:{bound_port(runner)}", ssl, keys, key_store, store, metrics,
                      runner)
        finally:
            await runner.cleanup()

class ApiThread:
    """running_api() on its own event loop in a daemon thread."""

    def __init__(self, tmp_path, **kw):
        self.tmp_path = tmp_path
        self.kw = kw
        self.ready = threading.Event()
        self.stop = None
        self.api = None
        self.error = None
        self.loop = None
        self.thread = threading.Thread(target=self._run, name="api-under-test", daemon=True)

    def _run(self):
        async def main():
            self.loop = asyncio.get_running_loop()
            self.stop = asyncio.Event()
            try:
                async with running_api(self.tmp_path, **{"rate": 100_000.0, **self.kw}) as api:
                    self.api = api
                    self.ready.set()
                    await self.stop.wait()
            except BaseException as e:  # surface start-up failures to the test
                self.error = e
                self.ready.set()

        asyncio.run(main())

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(30), "API did not start"
        if self.error is not None:
            raise self.error
        return self.api

    def call(self, coro, timeout: float = 30.0):
        """Run ``coro`` on the API's loop from this thread; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(15)


def payment(**over) -> dict:
    body = {"pan": TEST_PAN, "expiry": FUTURE, "amount": 1234, "currency": "USD", "type": "purchase"}
    body.update(over)
    return body


def idem() -> dict:
    return {"Idempotency-Key": uuid.uuid4().hex}


async def post(s: aiohttp.ClientSession, path: str, body=None, *, key: str | None = None, raw: bytes | None = None):
    headers = {"Idempotency-Key": key or uuid.uuid4().hex}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        async with s.post(path, data=raw, headers=headers) as r:
            return r.status, await r.read(), r.headers
    async with s.post(path, json=body if body is not None else {}, headers=headers) as r:
        return r.status, await r.read(), r.headers


def no_card_data(raw: bytes | str) -> None:
    text = raw.decode() if isinstance(raw, bytes) else raw
    for pan in (TEST_PAN, MC_TEST_PAN, BAD_LUHN_PAN):
        assert pan not in text, "card number echoed"


# ---------------------------------------------------------------------------


def test_payment_approved_and_transaction_views(tmp_path):
    async def main():
        async with running_api(tmp_path) as api, api.session() as s:
            status, raw, _ = await post(s, "/v1/payments", payment())
            assert status == 201, raw
            body = json.loads(raw)
            no_card_data(raw)
            assert body["approved"] is True and body["response_code"] == "00"
            assert body["approval_code"] and body["masked_pan"] == mask_pan(TEST_PAN)
            assert body["amount"] == 1234 and body["currency"] == "USD" and body["status"] == "approved"
            assert body["id"].startswith("txn_")
            async with s.get(f"/v1/transactions/{body['id']}") as r:
                assert r.status == 200
                assert (await r.json())["id"] == body["id"]
            # numeric currency, authorization
            status, raw, _ = await post(s, "/v1/payments", payment(currency="978", type="authorization"))
            assert status == 201 and json.loads(raw)["currency"] == "EUR"
            # declined by the simulator's rule (approve_below)
            assert all(str(v) != TEST_PAN for v in (await api.store.get(body["id"])).values())
    run(main())


def test_decline_from_acquirer_rule(tmp_path):
    async def main():
        sims = {"acq-a": {"approve_below": 5000}, "acq-b": {"approve_below": 5000}}
        async with running_api(tmp_path, sims) as api, api.session() as s:
            status, raw, _ = await post(s, "/v1/payments", payment(amount=9000))
            body = json.loads(raw)
            assert status == 201 and body["approved"] is False and body["response_code"] == "51"
            assert body["status"] == "declined" and body["approval_code"] is None
    run(main())


def test_auth_failures_scope_and_rate_limit(tmp_path):
    async def main():
        async with running_api(tmp_path) as api:
            async with api.session(None) as s:
                async with s.get("/v1/transactions") as r:
                    assert r.status == 401
                    assert r.headers["Content-Type"].startswith("application/problem+json")
                    assert "WWW-Authenticate" in r.headers
                    p = await r.json()
                    assert p["status"] == 401 and p["title"] and p["detail"]
                async with s.get("/v1/transactions", headers={"Authorization": "Bearer isk_0000_nope"}) as r:
                    assert r.status == 401
                async with s.get("/v1/transactions", headers={"X-API-Key": api.keys["payments"][:-2] + "xx"}) as r:
                    assert r.status == 401
                async with s.get("/v1/admin/acquirers", headers={"X-API-Key": api.keys["admin"]}) as r:
                    assert r.status == 200  # X-API-Key works too
            async with api.session("payments") as s:
                async with s.get("/v1/admin/acquirers") as r:
                    assert r.status == 403
                    assert "admin" in (await r.json())["detail"]
            async with api.session("admin") as s:
                status, raw, _ = await post(s, "/v1/payments", payment())
                assert status == 403
            async with api.session("slow") as s:
                statuses = []
                for _ in range(4):
                    async with s.get("/v1/transactions") as r:
                        statuses.append(r.status)
                        if r.status == 429:
                            retry = r.headers["Retry-After"]
                            assert retry.isdigit() and int(retry) >= 1
                            assert (await r.json())["status"] == 429
                assert statuses[:2] == [200, 200] and 429 in statuses
            async with api.session(None) as s:
                async with s.get("/metrics") as r:
                    text = await r.text()
                    assert 'isoswitch_api_rate_limited_total{key="slow"}' in text
    run(main())


def test_idempotency_replay_conflict_missing_and_concurrent(tmp_path):
    async def main():
        async with running_api(tmp_path) as api, api.session() as s:
            k = uuid.uuid4().hex
            s1, raw1, _ = await post(s, "/v1/payments", payment(), key=k)
            s2, raw2, h2 = await post(s, "/v1/payments", payment(), key=k)
            assert (s1, raw1) == (s2, raw2) and h2.get("Idempotent-Replayed") == "true"
            assert len(api.store) == 1  # processed once
            s3, raw3, _ = await post(s, "/v1/payments", payment(amount=999), key=k)
            assert s3 == 422 and json.loads(raw3)["errors"][0]["field"] == "Idempotency-Key"
            # missing header
            async with s.post("/v1/payments", json=payment()) as r:
                assert r.status == 400
                p = await r.json()
                assert p["errors"][0]["field"] == "Idempotency-Key"
                no_card_data(json.dumps(p))
            # the same key in flight: the second waits and replays the first's response
            k2 = uuid.uuid4().hex
            for sim in api.sw.sims.values():
                sim.fault = Fault(delay_ms=300)
            results = await asyncio.gather(post(s, "/v1/payments", payment(amount=77), key=k2),
                                           post(s, "/v1/payments", payment(amount=77), key=k2))
            for sim in api.sw.sims.values():
                sim.fault = Fault()
            assert results[0][:2] == results[1][:2] and results[0][0] == 201
            assert len(api.store) == 2
            # keys are per API key: another key may reuse the same Idempotency-Key
            async with api.session("both") as s_other:
                s4, raw4, _ = await post(s_other, "/v1/payments", payment(amount=555), key=k)
                assert s4 == 201 and json.loads(raw4)["amount"] == 555
    run(main())


def test_bad_json_and_bad_card_data(tmp_path):
    async def main():
        async with running_api(tmp_path) as api, api.session() as s:
            cases = [
                (b'{"pan": "' + TEST_PAN.encode() + b'", ', "body", "not valid JSON"),
                (b"[1, 2]", "body", "JSON object"),
                (b'{"pan": "' + TEST_PAN.encode() + b'\xff"}', "body", "not UTF-8"),
                # nesting deeper than any parser's stack: still a 400 that names the body
                (b'{"pan": ' + b"[" * 3000 + b"]" * 3000 + b"}", "body", "not valid JSON"),
                (b'{"amount": NaN}', "body", "not valid JSON"),
            ]
            for raw, field, words in cases:
                status, out, h = await post(s, "/v1/payments", raw=raw)
                assert status == 400 and h["Content-Type"].startswith("application/problem+json")
                p = json.loads(out)
                assert p["errors"][0]["field"] == field and words in p["errors"][0]["problem"]
                no_card_data(out)
            checks = [
                (payment(pan=BAD_LUHN_PAN), "pan", "Luhn"),
                (payment(pan="4111-1111"), "pan", "12-19 digits"),
                (payment(expiry="0101"), "expiry", "expired"),
                (payment(expiry="2913"), "expiry", "YYMM"),
                (payment(currency="XYZ"), "currency", "unknown currency"),
                (payment(currency="999"), "currency", "unknown currency"),
                (payment(amount=0), "amount", "positive"),
                (payment(amount=-5), "amount", "positive"),
                (payment(amount=12.5), "amount", "positive integer"),
                (payment(amount="100"), "amount", "positive integer"),
                (payment(cvv="12"), "cvv", "3 or 4"),
                (payment(type="credit"), "type", "authorization"),
                ({k: v for k, v in payment().items() if k != "pan"}, "pan", "required"),
                (payment(**{TEST_PAN: 1}), mask_pan(TEST_PAN), "unknown field"),
            ]
            for body, field, words in checks:
                status, out, _ = await post(s, "/v1/payments", body)
                assert status == 400, (field, out)
                p = json.loads(out)
                assert p["type"].startswith("urn:isoswitch:problem:") and p["status"] == 400
                assert any(e["field"] == field and words in e["problem"] for e in p["errors"]), (field, p)
                no_card_data(out)
            # several problems at once are all named
            status, out, _ = await post(s, "/v1/payments", payment(pan=BAD_LUHN_PAN, currency="XXX", amount=0))
            fields = {e["field"] for e in json.loads(out)["errors"]}
            assert fields == {"pan", "currency", "amount"}
            assert len(api.store) == 0
    run(main())


def test_reverse_refund_capture(tmp_path):
    async def main():
        async with running_api(tmp_path) as api, api.session() as s:
            _, raw, _ = await post(s, "/v1/payments", payment(amount=5000))
            purchase = json.loads(raw)
            # refund part, then the rest; more than remains is refused
            st, raw, _ = await post(s, f"/v1/payments/{purchase['id']}/refund", {"amount": 2000})
            refund = json.loads(raw)
            assert st == 201 and refund["type"] == "refund" and refund["approved"], raw
            assert refund["parent_id"] == purchase["id"] and refund["amount"] == 2000
            st, raw, _ = await post(s, f"/v1/payments/{purchase['id']}/refund", {"amount": 3001})
            assert st == 400 and json.loads(raw)["errors"][0]["field"] == "amount"
            async with s.get(f"/v1/transactions/{purchase['id']}") as r:
                p = await r.json()
                assert p["status"] == "partially_refunded" and p["refunded_amount"] == 2000
            st, raw, _ = await post(s, f"/v1/payments/{purchase['id']}/refund")
            assert st == 201 and json.loads(raw)["amount"] == 3000
            async with s.get(f"/v1/transactions/{purchase['id']}") as r:
                assert (await r.json())["status"] == "refunded"

            # authorization -> capture (<= authorized) -> no second capture, no reversal
            _, raw, _ = await post(s, "/v1/payments", payment(amount=8000, type="authorization"))
            auth = json.loads(raw)
            st, raw, _ = await post(s, f"/v1/payments/{auth['id']}/capture", {"amount": 9000})
            assert st == 400
            st, raw, _ = await post(s, f"/v1/payments/{auth['id']}/capture", {"amount": 7500})
            cap = json.loads(raw)
            assert st == 201 and cap["type"] == "capture" and cap["approved"] and cap["amount"] == 7500, raw
            st, raw, _ = await post(s, f"/v1/payments/{auth['id']}/capture", {})
            assert st == 409
            async with s.get(f"/v1/transactions/{auth['id']}") as r:
                a = await r.json()
                assert a["status"] == "captured" and a["captured_amount"] == 7500

            # reversal of an approved purchase, once
            _, raw, _ = await post(s, "/v1/payments", payment(amount=4321))
            p2 = json.loads(raw)
            before = api.sw.reversals.counters["queued"]
            st, raw, _ = await post(s, f"/v1/payments/{p2['id']}/reverse")
            rev = json.loads(raw)
            assert st == 201 and rev["type"] == "reversal" and rev["approved"], raw
            assert api.sw.reversals.counters["queued"] == before + 1
            assert await api.sw.reversals.wait_empty(5)
            st, raw, _ = await post(s, f"/v1/payments/{p2['id']}/reverse")
            assert st == 409
            st, raw, _ = await post(s, f"/v1/payments/{p2['id']}/refund")
            assert st == 409
            st, raw, _ = await post(s, f"/v1/payments/txn_{'0' * 32}/reverse")
            assert st == 404
            st, raw, _ = await post(s, f"/v1/payments/{p2['id']}/reverse", {"amount": 1})
            assert st == 400
            # another payments key cannot see or touch it
            async with api.session("slow") as other:
                async with other.get(f"/v1/transactions/{p2['id']}") as r:
                    assert r.status == 404
            # the acquirer saw a 0400, a 0220 and refunds with processing code 20
            seen = [(m.get("t"), m.get("3")) for sim in api.sw.sims.values() for m in sim.received]
            assert ("0400", "000000") in seen and ("0220", "000000") in seen and ("0200", "200000") in seen
            for m in (m for sim in api.sw.sims.values() for m in sim.received if m.get("t") == "0400"):
                assert m["90"][:4] == "0200"  # DE90 quotes the original
    run(main())


def test_listing_pagination_and_filters(tmp_path):
    async def main():
        sims = {"acq-a": {"approve_below": 5000}, "acq-b": {"approve_below": 5000}}
        async with running_api(tmp_path, sims) as api, api.session() as s:
            t0 = time.time()
            ids = []
            for i in range(7):
                _, raw, _ = await post(s, "/v1/payments", payment(amount=100 + i, terminal_id="TERMA001"))
                ids.append(json.loads(raw)["id"])
            _, raw, _ = await post(s, "/v1/payments", payment(amount=9999, terminal_id="TERMB001"))
            declined = json.loads(raw)["id"]
            async with s.get("/v1/transactions", params={"limit": "3"}) as r:
                page = await r.json()
            assert [t["id"] for t in page["data"]] == [declined, ids[6], ids[5]]
            assert page["has_more"] and page["next_offset"] == 3
            seen = []
            offset = 0
            while True:
                async with s.get("/v1/transactions", params={"limit": "3", "offset": str(offset)}) as r:
                    page = await r.json()
                seen += [t["id"] for t in page["data"]]
                if not page["has_more"]:
                    break
                offset = page["next_offset"]
            assert seen == [declined] + ids[::-1]
            async with s.get("/v1/transactions", params={"status": "declined"}) as r:
                assert [t["id"] for t in (await r.json())["data"]] == [declined]
            async with s.get("/v1/transactions", params={"terminal_id": "TERMA001", "limit": "100"}) as r:
                assert len((await r.json())["data"]) == 7
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 - 60))
            async with s.get("/v1/transactions", params={"since": since, "until": "2999-01-01T00:00:00Z"}) as r:
                assert len((await r.json())["data"]) == 8
            async with s.get("/v1/transactions", params={"until": since}) as r:
                assert (await r.json())["data"] == []
            for q, field in (({"limit": "0"}, "limit"), ({"limit": "x"}, "limit"), ({"status": "nope"}, "status"),
                             ({"since": "yesterday"}, "since"), ({"colour": "red"}, "colour")):
                async with s.get("/v1/transactions", params=q) as r:
                    assert r.status == 400
                    assert (await r.json())["errors"][0]["field"] == field
            async with s.get("/v1/transactions/txn_nope") as r:
                assert r.status == 404
            # an admin key lists everyone's
            async with api.session("admin") as a, a.get("/v1/transactions", params={"limit": "100"}) as r:
                assert len((await r.json())["data"]) == 8
    run(main())


def test_admin_acquirers_drain_enable(tmp_path):
    async def main():
        async with running_api(tmp_path) as api, api.session("admin") as s:
            async with s.get("/v1/admin/acquirers") as r:
                acqs = {a["name"]: a for a in (await r.json())["acquirers"]}
            assert set(acqs) == {"acq-a", "acq-b"}
            for a in acqs.values():
                assert a["up"] and a["circuit_state"] == "closed" and a["in_flight"] == 0 and a["queue_depth"] == 0
            st, raw, _ = await post(s, "/v1/admin/acquirers/acq-a/drain")
            assert st == 200 and json.loads(raw)["draining"] is True
            assert api.sw.links["acq-a"].draining
            st, _, _ = await post(s, "/v1/admin/acquirers/nope/drain")
            assert st == 404
            sent_before = api.sw.links["acq-a"].counters["sent"]
            async with api.session("payments") as p:
                for i in range(6):
                    _, raw, _ = await post(p, "/v1/payments", payment(amount=10 + i))
                    assert json.loads(raw)["approved"]
            assert api.sw.links["acq-a"].counters["sent"] == sent_before  # drained: skipped
            st, raw, _ = await post(s, "/v1/admin/acquirers/acq-a/enable")
            assert st == 200 and json.loads(raw)["draining"] is False
            assert not api.sw.links["acq-a"].draining
            # readiness follows drains: both drained -> not ready
            for name in ("acq-a", "acq-b"):
                await post(s, f"/v1/admin/acquirers/{name}/drain")
            async with s.get("/readyz") as r:
                assert r.status == 503 and (await r.json())["ready"] is False
            for name in ("acq-a", "acq-b"):
                await post(s, f"/v1/admin/acquirers/{name}/enable")
            async with s.get("/readyz") as r:
                assert r.status == 200
    run(main())


def test_admin_bin_table_replace(tmp_path):
    async def main():
        routing = """
        [routing]
        default_acquirers = ["acq-a", "acq-b"]
        [[routing.rules]]
        name = "test-bin"
        route = ["only-b"]
        acquirers = [{name = "acq-b"}]
        """
        async with running_api(tmp_path, routing=routing) as api, api.session("admin") as s:
            gen = api.sw.router.bins.generation
            bad = "low,high,route,scheme,country,card_type,issuer\n476173,,x,visa,US,debit,\nnot-a-bin,,x,visa,US,debit,\n"
            async with s.put("/v1/admin/bin-table", data=bad, headers={"Content-Type": "text/csv"}) as r:
                assert r.status == 400
                p = await r.json()
                assert p["line"] == 3 and "line 3" in p["detail"]
            assert api.sw.router.bins.generation == gen  # old table kept
            good = "low,high,route,scheme,country,card_type,issuer\n476173,,only-b,visa,US,debit,Test\n"
            async with s.put("/v1/admin/bin-table", data=good, headers={"Content-Type": "text/csv"}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json()) == {"rows": 1, "generation": gen + 1}
            assert api.sw.router.bins.lookup(TEST_PAN).route == "only-b"
            a_before = api.sw.links["acq-a"].counters["sent"]
            async with api.session("payments") as p:
                for _ in range(4):
                    _, raw, _ = await post(p, "/v1/payments", payment())
                    assert json.loads(raw)["approved"]
            assert api.sw.links["acq-a"].counters["sent"] == a_before  # the new rule sends to acq-b
            async with api.session("payments") as p, p.put("/v1/admin/bin-table", data=good) as r:
                assert r.status == 403
    run(main())


def test_admin_parked_list_and_requeue(tmp_path):
    async def main():
        async with running_api(tmp_path) as api, api.session("admin") as s:
            q = api.sw.reversals
            # an entry for an acquirer with no link never gets through; park it
            # as the queue does past its limits
            entry_id = await q.enqueue("acq-gone", {"t": "0200", "2": TEST_PAN, "3": "000000",
                                                    "4": "000000000100", "11": "000777", "41": "TERMID01",
                                                    "7": "0101000000"}, "test")
            assert await q.journal.sf_park(entry_id, "gave up after 50 attempts")
            async with s.get("/v1/admin/store-and-forward/parked") as r:
                raw = await r.read()
                parked = json.loads(raw)["parked"]
            no_card_data(raw)
            assert [(p["id"], p["acquirer"]) for p in parked] == [(entry_id, "acq-gone")]
            assert "gave up" in parked[0]["reason"]
            st, raw, _ = await post(s, f"/v1/admin/store-and-forward/{entry_id}/requeue")
            assert st == 200 and json.loads(raw) == {"id": entry_id, "requeued": True}
            async with s.get("/v1/admin/store-and-forward/parked") as r:
                assert (await r.json())["parked"] == []
            st, _, _ = await post(s, f"/v1/admin/store-and-forward/{entry_id}/requeue")
            assert st == 404
            st, _, _ = await post(s, "/v1/admin/store-and-forward/abc/requeue")
            assert st == 404
    run(main())


def test_metrics_health_ready_openapi(tmp_path):
    async def main():
        async with running_api(tmp_path) as api:
            async with api.session() as s:
                for _ in range(3):
                    await post(s, "/v1/payments", payment())
                await post(s, "/v1/payments", payment(pan=BAD_LUHN_PAN))
            async with api.session(None) as s:
                async with s.get("/metrics") as r:
                    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                    text = await r.text()
                async with s.get("/healthz") as r:
                    assert r.status == 200 and (await r.json()) == {"status": "ok"}
                async with s.get("/readyz") as r:
                    body = await r.json()
                    assert r.status == 200 and body["acquirers_up"] == 2 and body["journal"] == "ok"
                async with s.get("/openapi.json") as r:
                    doc = await r.json()
                    assert doc["openapi"].startswith("3.") and "/v1/payments" in doc["paths"]
                async with s.get("/nope") as r:
                    assert r.status == 404 and r.headers["Content-Type"].startswith("application/problem+json")
                async with s.delete("/v1/payments") as r:
                    assert r.status in (401, 405)
            no_card_data(text)
            for family in ("isoswitch_transactions_total", "isoswitch_terminal_round_trip_seconds_bucket",
                           "isoswitch_acquirer_round_trip_seconds_bucket", "isoswitch_listener_in_flight",
                           "isoswitch_acquirer_up", "isoswitch_acquirer_circuit_state",
                           "isoswitch_reversal_queue_depth", "isoswitch_reversals_parked",
                           "isoswitch_late_responses_total", "isoswitch_api_requests_total",
                           "isoswitch_decode_errors_total", "isoswitch_api_rate_limited_total",
                           "isoswitch_flow_events_total", "isoswitch_acquirer_in_flight"):
                assert f"\n# TYPE {family.removesuffix('_bucket')} " in text, family
            assert 'isoswitch_transactions_total{acquirer="acq-' in text
            assert 'mti="0200"' in text and 'response_code="00"' in text
            assert 'route="/v1/payments"' in text and 'status="400"' in text
            assert 'isoswitch_acquirer_up{acquirer="acq-a"} 1.0' in text
            # stats for the dashboard
            async with api.session("admin") as s, s.get("/v1/admin/stats") as r:
                raw = await r.read()
                stats = json.loads(raw)
            no_card_data(raw)
            assert stats["window_count"] >= 3 and stats["latency_ms"]["p50"] is not None
            assert stats["recent"][0]["masked_pan"] == mask_pan(TEST_PAN)
            assert {a["name"] for a in stats["acquirers"]} == {"acq-a", "acq-b"}
    run(main())


def test_api_keys_persisted_hashed(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.json")
    clear = store.create_key("k1", ["payments"], 5, 10)
    raw = (tmp_path / "keys.json").read_text()
    assert clear not in raw and clear.split("_", 2)[2] not in raw  # the secret may contain "_"
    assert (tmp_path / "keys.json").stat().st_mode & 0o777 == 0o600
    again = ApiKeyStore(tmp_path / "keys.json")
    assert again.authenticate(clear).name == "k1"
    assert again.authenticate(clear + "x") is None
    assert again.authenticate("garbage") is None
    assert again.revoke("k1") and ApiKeyStore(tmp_path / "keys.json").authenticate(clear) is None


def test_readyz_reports_a_dead_journal_writer(tmp_path, monkeypatch):
    """The SQLite writer process killed under a running switch, and its restarts
    failing for a while: /readyz turns 503 and names the journal, a payment gets
    96 (nothing forwarded without a journal row). Once a restart succeeds,
    /readyz is 200 again and payments are approved."""
    import signal

    from switch.journal import JournalError
    from switch.journal_writer import ProcessWriter

    async def cannot_start(self):
        raise JournalError("journal writer cannot start (test)")

    async def main():
        async with running_api(tmp_path) as api:
            monkeypatch.setattr(ProcessWriter, "_spawn", cannot_start)
            os.kill(api.sw.journal._writer.proc.pid, signal.SIGKILL)
            async with api.session(None) as s:
                for _ in range(100):
                    async with s.get("/readyz") as r:
                        body = await r.json()
                    if r.status == 503:
                        break
                    await asyncio.sleep(0.05)
                assert r.status == 503 and body["journal"] == "journal writer has stopped"
            sent = api.sw.links["acq-a"].counters["sent"]
            async with api.session() as p:
                st, raw, _ = await post(p, "/v1/payments", payment())
            assert json.loads(raw)["response_code"] == "96", (st, raw)
            assert api.sw.links["acq-a"].counters["sent"] == sent
            monkeypatch.undo()  # the next restart attempt succeeds
            async with api.session(None) as s:
                for _ in range(400):
                    async with s.get("/readyz") as r:
                        if r.status == 200:
                            break
                    await asyncio.sleep(0.05)
                assert r.status == 200
            async with api.session() as p:
                st, raw, _ = await post(p, "/v1/payments", payment())
            assert json.loads(raw)["response_code"] == "00", (st, raw)
            assert api.sw.journal.stats["restarts"] == 1
    run(main())


def test_api_trace_numbers_never_replay_another_request(tmp_path, monkeypatch):
    """The API assigns its own STAN and DE7. A collision -- with a terminal using the
    same terminal id, STAN and DE7, or with its own earlier payment (another process,
    a restart within the second) -- must never answer a payment with someone
    else's replay: each payment is forwarded and gets its own answer."""
    import itertools

    from switch.api.server import API_STATE
    from switch.sim.terminal import make_purchase
    from tests.switch_harness import terminal

    import calendar

    from switch.api import server

    fixed = server._Second(calendar.timegm((2026, 11, 21, 12, 0, 0)))  # DE7 1121120000
    monkeypatch.setattr(server, "_at", lambda ts: fixed)

    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api:
            st = api.runner.app[API_STATE]
            # a terminal's own purchase with TERM0001 / 000042 / 1121120000 first
            async with terminal(api.sw, tmp_path) as t:
                req = make_purchase(777, stan=42)
                req["7"] = "1121120000"
                term = await t.request(req)
            assert term["39"] == "00"
            sim = api.sw.sims["acq-a"]
            before = len([d for d in sim.received if d.get("t") == "0200"])
            st._stan = itertools.chain([41, 41], itertools.count(100))  # STANs 000042, 000042, then 000101...
            answers = []
            async with api.session() as s:
                for amount in (111, 222):
                    status, raw, _ = await post(s, "/v1/payments", payment(amount=amount, terminal_id="TERM0001"))
                    assert status == 201, raw
                    answers.append(json.loads(raw))
            sent = [d for d in sim.received if d.get("t") == "0200"][before:]
            assert [d["4"] for d in sent] == ["000000000111", "000000000222"]  # both forwarded, once each
            assert all(a["approved"] for a in answers)
            codes = {a["approval_code"] for a in answers} | {term["38"]}
            assert len(codes) == 3, codes  # three authorizations, no replay
            assert api.sw.flow.counters["trace_collisions"] == 1
            assert api.sw.flow.counters["retransmissions"] == 0

    run(main())


async def _paid_96_and_recorded_so(api) -> None:
    """A payment answered 96 (its outcome not journaled) whose record says 96 too."""
    async with api.session() as s:
        status, raw, _ = await post(s, "/v1/payments", payment())
        body = json.loads(raw)
        assert status == 201 and body["response_code"] == "96" and not body["approved"], body
        async with s.get(f"/v1/transactions/{body['id']}") as r:
            got = await r.json()
        assert got["response_code"] == "96" and got["status"] == "declined", got


def test_payment_record_follows_the_answer_when_the_outcome_cannot_be_journaled(tmp_path):
    """The API record is submitted together with the flow's outcome write. If that
    outcome cannot be journaled the flow answers 96, and the record (and the
    client) must say 96 too, not the acquirer's approval."""
    from switch.journal import JournalError

    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api:
            async def broken(*a, **k):
                raise JournalError("disk full")
            api.sw.journal.record_outcome = broken
            await _paid_96_and_recorded_so(api)
            del api.sw.journal.record_outcome
            async with api.session() as s:
                status, raw, _ = await post(s, "/v1/payments", payment())
                assert json.loads(raw)["approved"]

    run(main())


def test_payment_record_committed_but_reported_lost_says_what_the_client_was_told(tmp_path):
    """The writer dies between COMMIT and its reply: the outcome and the API
    record are in the journal, but both writes are reported failed. The flow
    answers 96 and reverses the approval; the record must say 96 (not the
    approval it was first written with) and the client gets that answer."""
    from switch.journal import JournalError

    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api:
            real_outcome = api.sw.journal.record_outcome
            real_add_soon = api.store.add_soon

            async def committed_then_lost(*a, **k):
                await real_outcome(*a, **k)
                raise JournalError("journal writer has stopped")

            def add_soon_lost(rec, card=None, idem=None):
                committed = real_add_soon(rec, card, idem)

                async def lost():
                    await committed
                    raise JournalError("journal writer has stopped")
                return asyncio.ensure_future(lost())

            api.sw.journal.record_outcome = committed_then_lost
            api.store.add_soon = add_soon_lost
            await _paid_96_and_recorded_so(api)
            assert api.sw.reversals.counters["queued"] == 1
            assert await api.sw.reversals.wait_empty(10)
            assert [d["t"] for d in api.sw.sims["acq-a"].received if d["t"].startswith("04")] == ["0400"]

    run(main())


def test_idempotency_cache_is_bounded_and_forgets_expired_records(monkeypatch):
    """Per API key at most ``per_key`` finished records, least recently used
    forgotten first; a record older than ``ttl`` is forgotten; one still in
    flight is never dropped (its waiters need it)."""
    from switch.api import auth

    async def main():
        clock = [1000.0]
        monkeypatch.setattr(auth.time, "time", lambda: clock[0])
        cache = auth.IdempotencyCache(per_key=3, ttl=60.0)
        recs = {}
        for k in "abcd":
            rec, new = cache.begin("key1", k, "fp-" + k)
            assert new
            recs[k] = rec
            if k != "a":
                cache.finish("key1", k, rec, 201, b"{}", "application/json")
        # "a" is in flight: it stops the sweep although there are four
        assert list(cache._by_key["key1"]) == ["a", "b", "c", "d"]
        cache.finish("key1", "a", recs["a"], 201, b"{}", "application/json")
        cache.begin("key1", "e", "fp-e")  # in flight from here on
        assert list(cache._by_key["key1"]) == ["c", "d", "e"]
        # the same key and request replays; another request with it is a conflict
        rec, new = cache.begin("key1", "d", "fp-d")
        assert not new and rec.status == 201
        with pytest.raises(auth.IdempotencyConflict):
            cache.begin("key1", "d", "fp-other")
        # past the TTL a key is new again, and expired finished records go;
        # "e", still in flight, stays
        clock[0] += 61.0
        rec, new = cache.begin("key1", "d", "fp-other")
        assert new
        assert list(cache._by_key["key1"]) == ["e", "d"]

    run(main())


def test_seen_keys_filter_has_no_false_negatives_and_few_false_positives():
    """The filter that spares a new Idempotency-Key its journal lookup (SQLite):
    every key added is reported seen; of keys never added, about 2-3% at
    capacity are (a journal lookup then answers for them)."""
    from switch.api.auth import SeenKeys

    seen = SeenKeys(capacity=20_000)
    added = [(f"k{i % 3}", uuid.uuid4().hex) for i in range(20_000)]
    for owner, key in added:
        seen.add(owner, key)
    assert all(pair in seen for pair in added)
    assert seen.count == 20_000
    false = sum((f"k{i % 3}", uuid.uuid4().hex) in seen for i in range(20_000))
    assert false < 20_000 * 0.03, false
    assert sum((f"x{owner}", key) in seen for owner, key in added[:2000]) < 100  # the owner is part of the key
