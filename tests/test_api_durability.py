"""The REST shim across kill -9, with a real switch process and a real acquirer
simulator: every card charge at the acquirer is either the one approved
payment its Idempotency-Key stands for, or reversed; a client retrying after
the restart is answered with the payment it made, or (when that payment's
outcome died with the process and recovery reversed it) charged once anew.
"""
import asyncio
import collections
import json
import re
import ssl
import time

import pytest
from aiohttp import ClientSession, TCPConnector

from switch import certs
from switch.messages import TEST_PAN
from switch.sim.acquirer import AcquirerSimulator, Fault
from tests.switch_harness import run
from tests.test_api_wiring import _payments_auth, _purchase
from tests.test_durability import SwitchProcess, wait_until, write_config

pytestmark = pytest.mark.timeout(180)

API = """
[api]
enabled = true
port = 0
"""


async def _api_port(sw: SwitchProcess, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ports = re.findall(r"REST API listening on 127\.0\.0\.1:(\d+)", sw.log.read_text()[sw.offset:])
        if ports:
            return int(ports[-1])
        await asyncio.sleep(0.05)
    raise AssertionError("the API did not start:\n" + sw.log.read_text())


def test_kill9_under_rest_payments_charges_each_key_once(tmp_path):
    async def go():
        sim = await AcquirerSimulator(name="acq-a", latency_ms=0.0).start()
        try:
            cfg = write_config(tmp_path, sim.port, journal=API)
            auth = _payments_auth(tmp_path)
            log = tmp_path / "switch.log"
            sw = SwitchProcess(cfg, log)
            await sw.started()
            ctx = ssl.create_default_context(cafile=str(certs.dev_pki_paths(tmp_path / "state").ca_cert))

            async def pay(s, base, i):
                async with s.post(f"{base}/v1/payments", json=_purchase(1000 + i),
                                  headers={**auth, "Idempotency-Key": f"order-{i}"}) as r:
                    return r.status, await r.json(), r.headers.get("Idempotent-Replayed")

            base = f"https://localhost:{await _api_port(sw)}"
            async with ClientSession(connector=TCPConnector(ssl=ctx)) as s:
                # 10 payments answered before the crash
                first = await asyncio.gather(*[pay(s, base, i) for i in range(10)])
                assert all(st == 201 and b["approved"] for st, b, _ in first)
                # 20 more held at the acquirer when the switch is killed
                sim.fault = Fault(delay_ms=5000)
                pending = [asyncio.ensure_future(pay(s, base, i)) for i in range(10, 30)]
                assert await wait_until(lambda: len(sim.received_by("0200")) == 30, 20)
                sw.kill9()
                done = await asyncio.gather(*pending, return_exceptions=True)
                assert all(isinstance(d, Exception) for d in done), done  # no answers: the process is gone
            sim.fault = Fault()
            sw2 = SwitchProcess(cfg, log)
            await sw2.started()
            base = f"https://localhost:{await _api_port(sw2)}"
            async with ClientSession(connector=TCPConnector(ssl=ctx)) as s:
                retried = await asyncio.gather(*[pay(s, base, i) for i in range(30)])
                for i, (st, b, replayed) in enumerate(retried):
                    assert st == 201 and b["approved"], (i, st, b)
                    if i < 10:  # answered before: the same payment, never a second charge
                        assert replayed == "true" and b == first[i][1], (i, b)
                    else:  # its outcome died with the process: charged anew, once
                        assert replayed is None, (i, b)
                records = {}
                for st, b, _ in retried:
                    async with s.get(f"{base}/v1/transactions/{b['id']}", headers=auth) as r:
                        records[b["id"]] = await r.json()
            assert await wait_until(lambda: len(sim.received_by("0400")) + len(sim.received_by("0401")) >= 20, 30)
            await asyncio.sleep(0.5)
            sw2.stop()
            # every charge at the acquirer is the approved payment of one key, or reversed
            charges = collections.Counter(d["37"] for d in sim.received_by("0200"))
            assert all(n == 1 for n in charges.values())
            reversed_rrns = collections.Counter(d["37"] for d in sim.received if d["t"] in ("0400", "0401"))
            approved = collections.Counter(int(b["amount"]) for _, b, _ in retried)
            assert sorted(approved) == [1000 + i for i in range(30)] and set(approved.values()) == {1}
            standing = [d for d in sim.received_by("0200") if d["37"] not in reversed_rrns]
            assert sorted(int(d["4"]) for d in standing) == [1000 + i for i in range(30)], standing
            assert len(set(reversed_rrns)) == 20  # the 20 whose outcome was lost, each reversed
            assert all(r["status"] == "approved" for r in records.values())
            assert "crash recovery: 20 store-and-forward entries queued" in log.read_text()
            assert TEST_PAN not in json.dumps(records)
        finally:
            await sim.stop()

    run(go(), timeout=170)
