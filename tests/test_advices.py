"""Advices (0220 completions, 0120 stand-in authorizations): delivered, never reversed.

An advice reports what has already happened. When its acquirer cannot take it
now (down, silent, timed out, acknowledging with a retry code) the switch
stores and forwards it: the terminal gets 0230/00 once the entry is durable,
and the queue repeats it (0221) until the acquirer acknowledges it. It is
never sent to another acquirer than its own, and never reversed, also after
kill -9 between forwarding and answering.
"""
import asyncio

import pytest

from switch.sim.acquirer import AcquirerSimulator, Fault
from switch.sim.terminal import make_purchase
from tests.switch_harness import run, running_switch, terminal
from tests.test_durability import SwitchProcess, kill9_with_request_at_acquirer, wait_until

pytestmark = pytest.mark.timeout(150)

ROUTING = """
[routing]
default_acquirers = ["acq-a", "acq-b"]
[store_and_forward]
backoff_min = 0.05
backoff_max = 0.2
"""


def advices(sim):
    return [d for d in sim.received if d.get("t") in ("0220", "0221")]


def reversals(sim):
    return [d for d in sim.received if d.get("t") in ("0400", "0401")]


def completion(stan: int, amount: int = 4200) -> dict:
    return make_purchase(amount, stan=stan, mti="0220", track2=False)


def test_advice_is_passed_through_when_its_acquirer_takes_it(tmp_path):
    async def go():
        async with running_switch(tmp_path, routing=ROUTING) as sw:
            a = sw.sims["acq-a"]
            async with terminal(sw, tmp_path) as t:
                r = await t.request(completion(1))
                assert (r["t"], r["39"], r["11"]) == ("0230", "00", "000001")
                # 0120, a stand-in authorization advice, likewise
                r = await t.request(make_purchase(1000, stan=2, mti="0120", track2=False))
                assert (r["t"], r["39"]) == ("0130", "00")
            assert [d["t"] for d in advices(a)] == ["0220"]
            assert [d["t"] for d in a.received if d["t"].startswith("01")] == ["0120"]
            assert await sw.journal.sf_depth() == 0
            assert not sw.reversals.counters["advices_queued"]

    run(go())


def test_timed_out_advice_is_repeated_until_acknowledged_never_reversed(tmp_path):
    async def go():
        async with running_switch(tmp_path, routing=ROUTING,
                                  acquirer_opts={"acq-a": {"timeout": 0.3}}) as sw:
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            sw.router.rng.random = lambda: 0.0  # acq-b healthy too: must still not get it
            a.fault = Fault(drop_responses=True)
            async with terminal(sw, tmp_path) as t:
                r = await t.request(completion(7), timeout=5)
                assert (r["t"], r["39"], r["11"]) == ("0230", "00", "000007")
                assert sw.reversals.counters["advices_queued"] == 1
                a.fault = Fault()
                assert await sw.reversals.wait_empty(10)
                # the terminal's own repeat is answered from the journal, not sent again
                r2 = await t.request(dict(completion(7), t="0221"), timeout=5)
                assert (r2["t"], r2["39"]) == ("0230", "00")
            got = [d["t"] for d in advices(a)]
            assert got[0] == "0220" and got[1:] and set(got[1:]) == {"0221"}
            assert all(d["4"] == "000000004200" and d["37"] == advices(a)[0]["37"] for d in advices(a))
            assert not reversals(a) and not advices(b)
            assert sw.reversals.counters["advices_acknowledged"] == 1
            assert not sw.reversals.counters["queued"]
            assert sw.flow.counters["advices_stored"] == 1

    run(go())


def test_advice_for_a_down_acquirer_is_stored_not_sent_elsewhere(tmp_path):
    async def go():
        async with running_switch(tmp_path, routing=ROUTING,
                                  acquirer_opts={"acq-a": {"reconnect_min": 0.05, "reconnect_max": 0.1}}) as sw:
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            await a.set_fault(Fault(refuse=True))  # no new connections
            for conn in list(a._conns):  # and the link's one is gone
                conn.close()
            assert await wait_until(lambda: not sw.links["acq-a"].up, 5)
            async with terminal(sw, tmp_path) as t:
                for i in range(3):
                    r = await t.request(completion(20 + i, 100 + i), timeout=5)
                    assert (r["t"], r["39"]) == ("0230", "00")
                # a purchase fails over as ever; the advices wait for their acquirer
                assert (await t.request(make_purchase(500, stan=30)))["39"] == "00"
            assert not advices(a) and not advices(b)
            assert await sw.journal.sf_depth("acq-a") == 3
            await a.set_fault(Fault())  # listening again: the link reconnects
            assert await sw.reversals.wait_empty(15)
            # FIFO, each delivered once (as 0221 when an attempt failed while
            # the link was down: a repeat of what the host has not seen is an advice)
            assert [d["4"] for d in advices(a)] == ["000000000100", "000000000101", "000000000102"]
            assert sw.reversals.counters["advices_acknowledged"] == 3
            assert not reversals(a) and not advices(b)

    run(go())


def test_advice_acknowledged_with_a_retry_code_is_sent_again(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, routing=ROUTING.replace(
                'default_acquirers = ["acq-a", "acq-b"]', 'default_acquirers = ["acq-a"]')) as sw:
            a = sw.sims["acq-a"]
            a.fault = Fault(respond_rc="96")
            async with terminal(sw, tmp_path) as t:
                r = await t.request(completion(9), timeout=5)
                assert (r["t"], r["39"]) == ("0230", "00")
                assert await wait_until(lambda: len(advices(a)) >= 3, 10)
                assert sw.reversals.counters["advices_acknowledged"] == 0
                a.fault = Fault()
                assert await sw.reversals.wait_empty(10)
            assert sw.reversals.counters["advices_acknowledged"] == 1
            assert advices(a)[0]["t"] == "0220" and {d["t"] for d in advices(a)[1:]} == {"0221"}
            assert not reversals(a)

    run(go())


def test_kill9_between_forwarding_an_advice_and_answering_repeats_it_once(tmp_path):
    async def go():
        sim = await AcquirerSimulator(name="acq-a", latency_ms=0.0).start()
        try:
            cfg, log, original = await kill9_with_request_at_acquirer(tmp_path, sim, completion(314, 5000),
                                                                      lambda: advices(sim))
            sim.fault = Fault()
            sw2 = SwitchProcess(cfg, log)
            await sw2.started()
            assert await wait_until(lambda: len(advices(sim)) >= 2, 20)
            await asyncio.sleep(1.0)
            sw2.stop()
            got = advices(sim)
            assert [d["t"] for d in got] == ["0220", "0221"], got
            assert got[1]["4"] == original["4"] and got[1]["37"] == original["37"]
            assert not reversals(sim)
            assert "crash recovery: 1 store-and-forward entry queued" in log.read_text()
        finally:
            await sim.stop()

    run(go(), timeout=120)


def test_a_completion_goes_to_the_acquirer_that_had_its_authorization(tmp_path):
    """A 0220 naming its 0100 in DE90 went to the first acquirer the rule
    names, which never saw the authorization; it goes where the 0100 went."""
    from switch.sim.terminal import make_purchase
    from tests.switch_harness import running_switch, terminal

    routing = """
    [routing]
    default_acquirers = ["acq-a", "acq-b"]
    """

    async def go():
        async with running_switch(tmp_path, routing=routing) as sw:
            sw.router.rng.random = lambda: 0.0
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            sw.links["acq-a"].draining = True
            async with terminal(sw, tmp_path) as t:
                auth = make_purchase(2000, stan=101, mti="0100")
                assert (await t.request(auth))["39"] == "00"
                sw.links["acq-a"].draining = False
                completion = make_purchase(2000, stan=102, mti="0220")
                completion["90"] = "0100" + auth["11"] + auth["7"] + "0" * 22
                r = await t.request(completion)
            assert r["t"] == "0230" and r["39"] == "00"
            assert [d["t"] for d in a.received if not d["t"].startswith("08")] == []
            assert [d["t"] for d in b.received if not d["t"].startswith("08")] == ["0100", "0220"]

    asyncio.run(asyncio.wait_for(go(), 60))
