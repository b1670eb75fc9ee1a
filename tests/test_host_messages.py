"""Messages the acquirer host starts: echo tests, sign-off and sign-on, and requests
the switch does not take. Real simulators, a real switch, over TCP."""
import asyncio

import pytest

from switch.sim.terminal import make_purchase
from tests.switch_harness import run, running_switch, terminal

pytestmark = pytest.mark.timeout(120)

ROUTING = """
[routing]
default_acquirers = ["acq-a", "acq-b"]
"""


def financial(sim):
    return [d for d in sim.received if d.get("t") in ("0100", "0200")]


def test_host_echo_is_answered_on_every_connection(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}},
                                  acquirer_opts={"acq-a": {"connections": 2}}) as sw:
            a = sw.sims["acq-a"]
            answers = await a.send_network("301")
            assert len(answers) == 2
            assert len({r["11"] for r in answers}) == 2
            for r in answers:
                assert (r["t"], r["39"], r["70"]) == ("0810", "00", "301")
                assert r["11"].startswith("9") and len(r["7"]) == 10
            # a code the switch takes no part in (a key exchange) is answered, refused
            for r in await a.send_network("161"):
                assert (r["t"], r["39"], r["70"]) == ("0810", "12", "161")
            assert sw.links["acq-a"].counters["host_answers"] == 4
            # the link stays up and serves traffic
            async with terminal(sw, tmp_path) as t:
                assert (await t.request(make_purchase(1000, stan=1)))["39"] == "00"

    run(go())


def test_host_sign_off_stops_new_requests_until_it_signs_on(tmp_path):
    async def go():
        opts = {"acq-a": {"connections": 2, "breaker": {"open_seconds": 0.2}}}
        async with running_switch(tmp_path, routing=ROUTING, acquirer_opts=opts) as sw:
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            await sw.links["acq-b"].wait_up(5)
            sw.router.rng.random = lambda: 0.0  # acq-a is first choice while healthy
            async with terminal(sw, tmp_path) as t:
                assert (await t.request(make_purchase(1000, stan=1)))["39"] == "00"
                assert len(financial(a)) == 1
                answers = await a.send_network("002")
                assert [r["39"] for r in answers] == ["00", "00"]
                assert not sw.links["acq-a"].up
                assert sw.links["acq-a"].counters["host_sign_offs"] == 2
                # nothing new goes to a signed-off host: failed over, never sent there
                for i in range(5):
                    r = await t.request(make_purchase(1000, stan=10 + i))
                    assert (r["39"], r["11"]) == ("00", f"{10 + i:06d}")
                assert len(financial(a)) == 1 and len(financial(b)) == 5
                # an echo is still answered while signed off
                assert [r["39"] for r in await a.send_network("301")] == ["00", "00"]
                assert [r["39"] for r in await a.send_network("001")] == ["00", "00"]
                assert sw.links["acq-a"].up
                # back to the first choice once its breaker lets a trial through
                for i in range(100):
                    r = await t.request(make_purchase(1000, stan=100 + i))
                    assert r["39"] == "00"
                    if len(financial(a)) > 1:
                        break
                    await asyncio.sleep(0.02)
                assert len(financial(a)) > 1
            assert not sw.reversals.counters.get("enqueued")

    run(go())


def test_host_sign_off_keeps_requests_already_sent(tmp_path):
    """A request in flight when the host signs off is still matched to its answer."""
    async def go():
        from switch.sim.acquirer import Fault
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            a = sw.sims["acq-a"]
            a.fault = Fault(delay_ms=300)
            async with terminal(sw, tmp_path) as t:
                pending = asyncio.ensure_future(t.request(make_purchase(1000, stan=5), timeout=5))
                await a.wait_for("0200", 1)
                a.fault = Fault()
                assert [r["39"] for r in await a.send_network("002")] == ["00"]
                r = await pending
                assert (r["39"], r["11"]) == ("00", "000005")
                # no acquirer left for new requests: 91/92 without sending
                r = await t.request(make_purchase(1000, stan=6))
                assert r["39"] in ("91", "92")
                assert len(financial(a)) == 1

    run(go())


def test_host_request_the_switch_does_not_take_is_refused_not_dropped(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            a = sw.sims["acq-a"]
            [r] = await a.send_to_switch({"t": "0200", "3": "000000", "4": "000000001000",
                                          "7": "1121120000", "41": "HOSTTERM"})
            assert (r["t"], r["39"], r["4"], r["41"]) == ("0210", "12", "000000001000", "HOSTTERM")
            [r] = await a.send_to_switch({"t": "0820", "7": "1121120000", "70": "301"})
            assert (r["t"], r["39"]) == ("0830", "00")
            # a notification wants no answer, and gets none
            with pytest.raises(asyncio.TimeoutError):
                await a.send_to_switch({"t": "0840", "7": "1121120000", "70": "301"}, timeout=0.3)
            assert sw.links["acq-a"].counters["host_messages"] == 3
            async with terminal(sw, tmp_path) as t:
                assert (await t.request(make_purchase(1000, stan=1)))["39"] == "00"

    run(go())


def test_host_echo_iso8583_1993(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"dialect": "iso93ascii"}},
                                  listener={"dialect": "iso93ascii"}) as sw:
            a = sw.sims["acq-a"]
            [r] = await a.send_network("301")
            assert (r["t"], r["39"], r["24"]) == ("1814", "800", "831")
            [r] = await a.send_network("002")
            assert (r["t"], r["39"], r["24"]) == ("1814", "800", "802")
            assert not sw.links["acq-a"].up
            [r] = await a.send_network("001")
            assert (r["t"], r["39"], r["24"]) == ("1814", "800", "801")
            assert sw.links["acq-a"].up

    run(go())
