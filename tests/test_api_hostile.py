"""The REST shim against hostile and careless clients: what a reviewer's own
probes found, each against a real switch and the API over HTTPS."""
from __future__ import annotations

import asyncio
import json

import pytest

from switch.api import ApiKeyStore
from switch.metrics import Metrics
from tests.switch_harness import run
from tests.test_api import payment, post, running_api

pytestmark = pytest.mark.timeout(120)


def test_a_listing_query_with_a_doubled_sign_is_a_400_not_a_500(tmp_path):
    """``limit=--5`` passed a strip of every '-' and then int() raised: a 500."""
    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api, api.session() as s:
            for q in ({"limit": "--5"}, {"offset": "--1"}, {"limit": "-"}, {"offset": "1-"}):
                async with s.get("/v1/transactions", params=q) as r:
                    assert r.status == 400, (q, await r.text())
                    assert (await r.json())["errors"][0]["field"] == next(iter(q))
            async with s.get("/v1/transactions", params={"limit": "5", "offset": "0"}) as r:
                assert r.status == 200
    run(main())


def test_a_post_where_no_post_route_is_gets_405_or_404_not_an_idempotency_demand(tmp_path):
    """The Idempotency-Key check ran before routing: POST to a GET-only route
    answered 400 "header is required" instead of 405 with Allow."""
    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api, api.session("both") as s:
            for path, status in (("/v1/transactions", 405), ("/v1/admin/acquirers", 405),
                                 ("/v1/admin/stats", 405), ("/v1/nothing-here", 404)):
                async with s.post(path, json={}) as r:
                    assert r.status == status, (path, await r.text())
                    assert r.headers["Content-Type"].startswith("application/problem+json")
                    if status == 405:
                        assert "GET" in r.headers["Allow"]
            # a route that takes POSTs still wants its key
            async with s.post("/v1/admin/acquirers/acq-a/drain") as r:
                assert r.status == 400 and (await r.json())["errors"][0]["field"] == "Idempotency-Key"
    run(main())


def test_a_key_revoked_or_created_with_the_cli_takes_effect_in_the_running_switch(tmp_path):
    """The key file was read once at start: a key revoked with ``python -m
    switch.api.auth revoke`` went on making payments until a restart."""
    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api:
            path = tmp_path / "state" / "api_keys.json"
            async with api.session("payments") as s:
                status, _, _ = await post(s, "/v1/payments", payment())
                assert status == 201
                # what the command line does, from its own store on the same file
                assert ApiKeyStore(path).revoke("shop")
                for _ in range(100):
                    status, raw, _ = await post(s, "/v1/payments", payment())
                    if status == 401:
                        break
                    assert status == 201
                    await asyncio.sleep(0.1)
                assert status == 401, raw
                async with s.get("/v1/transactions") as r:
                    assert r.status == 401
            new_key = ApiKeyStore(path).create_key("late", ["payments"])
            async with api.session(None, Authorization=f"Bearer {new_key}") as s:
                for _ in range(100):
                    status, raw, _ = await post(s, "/v1/payments", payment())
                    if status == 201:
                        break
                    assert status == 401
                    await asyncio.sleep(0.1)
                assert status == 201, raw
            # the other keys were never interrupted
            async with api.session("both") as s, s.get("/v1/admin/acquirers") as r:
                assert r.status == 200
            # a file that no longer reads keeps the keys in force
            path.write_text("{not json")
            await asyncio.sleep(1.5)
            async with api.session(None, Authorization=f"Bearer {new_key}") as s:
                status, _, _ = await post(s, "/v1/payments", payment())
                assert status == 201
    run(main())


def test_a_card_number_in_other_digits_is_not_echoed_in_a_problem(tmp_path):
    """An unknown field's name is quoted in the 400 through the log masking,
    which let a card number in fullwidth or Arabic-Indic digits through."""
    from switch.messages import TEST_PAN, mask_pan

    async def main():
        async with running_api(tmp_path, {"acq-a": {}}) as api, api.session() as s:
            names = ["".join(chr(zero + int(c)) for c in TEST_PAN) for zero in (0xFF10, 0x660)]
            body = payment(**{n: 1 for n in names})
            for target in ("/v1/payments", "/v1/payments?via=aiohttp"):
                status, raw, _ = await post(s, target, body)
                assert status == 400
                text = raw.decode()
                assert all(n not in text for n in names) and text.count(mask_pan(TEST_PAN)) == 4, text
    run(main())


def test_http_method_labels_are_bounded():
    """aiohttp's pure-Python parser takes any token as a method: each one made
    a new label value of isoswitch_api_requests."""
    m = Metrics()
    for i in range(300):
        m.observe_api("unmatched", f"X{i}", 400, 0.001)
    m.observe_api("/v1/payments", "POST", 201, 0.001)
    text = m.exposition().decode()
    methods = {line.split('method="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("isoswitch_api_requests_total{")}
    assert methods == {"other", "POST"}
    assert json.dumps(text).count("X1") == 0


def test_a_stalled_journal_answers_payments_pending_not_never(tmp_path):
    """The journal's writer stops (SIGSTOP: a hung disk). Terminals get 91 at
    their deadline; an API payment hung for as long as the journal did, and so
    did its retries. Now: 503 "outcome pending" (Retry-After) at the flow's
    deadline, for the retry too; once the journal is back the payment's
    outcome (91, nothing left charged) is what a retry with the same key gets,
    and there is one payment, not two."""
    import os
    import signal

    import aiohttp

    from switch import certs
    from switch.api import ApiSettings, JournalTransactionStore, bound_port, start_api
    from switch.config import ApiConfig
    from tests.switch_harness import running_switch

    async def main():
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 200.0}},
                                  acquirer_opts={"acq-a": {"timeout": 1.0}}) as sw:
            pki = await asyncio.to_thread(certs.ensure_dev_pki, tmp_path / "state")
            keys = ApiKeyStore(tmp_path / "state" / "api_keys.json")
            clear = keys.create_key("shop", ["payments"])
            server = await start_api(sw, ApiConfig(enabled=True, host="127.0.0.1", port=0, cert=pki.server_cert,
                                                   key=pki.server_key),
                                     keys=keys, store=JournalTransactionStore(sw.journal),
                                     settings=ApiSettings(timeout=1.5))
            writer = sw.journal._writer.proc.pid
            sim = sw.sims["acq-a"]
            url = f"https://127.0.0.1:{bound_port(server)}"
            try:
                async with aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {clear}"},
                                                 connector=aiohttp.TCPConnector(ssl=certs.client_context(
                                                     pki.ca_cert)),
                                                 timeout=aiohttp.ClientTimeout(total=8)) as s:
                    status, _, _ = await post(s, "/v1/payments", payment(amount=100))
                    assert status == 201
                    # one payment at the acquirer when the writer stops, one arriving after
                    at_acquirer = asyncio.ensure_future(post(s, "/v1/payments", payment(amount=4242), key="k-1"))
                    for _ in range(200):
                        if any(m.get("4") == "000000004242" for m in sim.received):
                            break
                        await asyncio.sleep(0.01)
                    os.kill(writer, signal.SIGSTOP)
                    try:
                        arriving = await post(s, "/v1/payments", payment(amount=4343), key="k-2")
                        answers = [await at_acquirer, arriving,
                                   await post(s, "/v1/payments", payment(amount=4242), key="k-1")]
                        for status, raw, headers in answers:
                            assert status == 503, raw
                            assert json.loads(raw)["type"] == "urn:isoswitch:problem:outcome-pending"
                            assert int(headers["Retry-After"]) >= 1
                    finally:
                        os.kill(writer, signal.SIGCONT)
                    for key, amount in (("k-1", 4242), ("k-2", 4343)):
                        for _ in range(100):
                            status, raw, headers = await post(s, "/v1/payments", payment(amount=amount), key=key)
                            if status == 201:
                                break
                            assert status == 503
                            await asyncio.sleep(0.1)
                        body = json.loads(raw)
                        assert status == 201 and body["approved"] is False and body["response_code"] == "91", raw
                        assert headers.get("Idempotent-Replayed") == "true"
                        async with s.get("/v1/transactions", params={"limit": "50"}) as r:
                            assert [t["id"] for t in (await r.json())["data"] if t["amount"] == amount] \
                                == [body["id"]]
                    # nothing stays charged: the approval journaled too late is reversed
                    assert await sw.reversals.wait_empty(15)
                    assert [m["4"] for m in sim.received if m.get("t") == "0400"] == ["000000004242"]
                    assert not any(m.get("4") == "000000004343" for m in sim.received)
            finally:
                await server.cleanup()

    run(main(), timeout=90)
