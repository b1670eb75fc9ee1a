"""Network faults on the acquirer link, injected by a TCP proxy (tests/faultproxy.py)
between the switch and a real acquirer simulator: a connection reset in the
middle of a response, half a request delivered before a reset, every byte in
its own segment, a stalled stream whose answers arrive late, and garbage
where a frame header should be. DESIGN.md invariants 1, 3, 4 and 5: every
terminal gets one answer in time, a request that may have reached the
acquirer is reversed there (once) and never re-sent elsewhere, and a late
answer never reaches the terminal.
"""
import asyncio
import collections

import pytest

from switch.sim.terminal import make_purchase
from tests.faultproxy import FaultProxy
from tests.switch_harness import run, running_switch, terminal

pytestmark = pytest.mark.timeout(120)


def financial(sim):
    return [d for d in sim.received if d.get("t") in ("0100", "0200")]


def reversals(sim):
    return [d for d in sim.received if d.get("t") in ("0400", "0401")]


async def wait_until(pred, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return pred()


async def _at_the_acquirer(t, sim, n: int, first_amount: int) -> list:
    """``n`` purchases sent; returns their tasks once the acquirer holds them all."""
    tasks = [asyncio.create_task(t.request(make_purchase(first_amount + i, stan=i + 1), timeout=5))
             for i in range(n)]
    assert await wait_until(lambda: len(financial(sim)) == n)
    return tasks


def _reversed_once(sw, sim, originals: dict) -> None:
    """Each original (by link STAN) has exactly one store-and-forward entry,
    acknowledged, and every reversal message the acquirer saw is for one of them."""
    queued, acked = sw.reversals.counters["queued"], sw.reversals.counters["acknowledged"]
    assert queued == acked == len(originals), (queued, acked, len(originals))
    seen = collections.Counter(r["90"][4:10] for r in reversals(sim))
    assert set(seen) == set(originals)
    for stan, orig in originals.items():
        first = next(r for r in reversals(sim) if r["90"][4:10] == stan)
        assert first["4"] == orig["4"] and first["90"][:4] == orig["t"]


def test_reset_in_the_middle_of_a_response_reverses_every_request_in_flight(tmp_path):
    proxy = FaultProxy()

    async def go():
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 150.0}},
                                  acquirer_opts={"acq-a": {"timeout": 5.0}}, proxies={"acq-a": proxy}) as sw:
            sim = sw.sims["acq-a"]
            async with terminal(sw, tmp_path) as t:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                tasks = await _at_the_acquirer(t, sim, 20, 3000)
                proxy.cut_after("down", 7)  # a length header and 5 bytes of the first answer, then RST
                answers = await asyncio.gather(*tasks)
                assert loop.time() - t0 < 3.0  # each within the terminal timeout
                assert [a["39"] for a in answers] == ["91"] * 20
                assert sorted(a["11"] for a in answers) == [f"{i:06d}" for i in range(1, 21)]
                # the link comes back through the proxy; each unknown outcome is reversed once
                assert await sw.reversals.wait_empty(30)
                _reversed_once(sw, sim, {d["11"]: d for d in financial(sim)})
                assert proxy.connections >= 2
                assert (await t.request(make_purchase(4000, stan=99), timeout=5))["39"] == "00"

    run(go(), timeout=90)


def test_half_a_request_then_a_reset_is_reversed_and_never_sent_elsewhere(tmp_path):
    """The switch wrote the whole request; the acquirer got 10 bytes of it. The
    switch cannot know that: possibly received, so reversed at that acquirer and
    not failed over (DESIGN.md #3)."""
    proxy = FaultProxy()
    routing = """
    [routing]
    default_acquirers = ["acq-a", "acq-b"]
    """

    async def go():
        async with running_switch(tmp_path, routing=routing, proxies={"acq-a": proxy},
                                  acquirer_opts={"acq-a": {"timeout": 5.0}}) as sw:
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            sw.router.rng.random = lambda: 0.0  # acq-a first
            proxy.cut_after("up", 10)
            async with terminal(sw, tmp_path) as t:
                r = await t.request(make_purchase(5000, stan=7), timeout=5)
            assert r["39"] == "91" and r["11"] == "000007"
            assert not financial(a) and not financial(b)  # a got half a frame; b must get nothing
            assert await sw.reversals.wait_empty(30)
            assert sw.reversals.counters["queued"] == sw.reversals.counters["acknowledged"] == 1
            revs = reversals(a)
            assert revs and {rv["4"] for rv in revs} == {"000000005000"} and not reversals(b)

    run(go(), timeout=90)


def test_every_byte_in_its_own_segment_both_ways(tmp_path):
    proxy = FaultProxy()
    proxy.chunk("up", 1)
    proxy.chunk("down", 1)

    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, acquirer_opts={"acq-a": {"timeout": 5.0}},
                                  proxies={"acq-a": proxy}) as sw:
            async with terminal(sw, tmp_path) as t:
                answers = await asyncio.gather(*[t.request(make_purchase(6000 + i, stan=i + 1), timeout=8)
                                                 for i in range(8)])
            assert [a["39"] for a in answers] == ["00"] * 8
            assert len(financial(sw.sims["acq-a"])) == 8
            link = sw.links["acq-a"]
            assert link.counters["frame_errors"] == 0 and link.counters["undecodable"] == 0

    run(go(), timeout=90)


def test_a_stalled_link_times_out_and_its_answers_arrive_late(tmp_path):
    """Responses held in the network past the timeout: 91 for the terminals,
    reversals queued; when the stream moves again the approvals are late --
    journaled and counted, never sent to a terminal -- and the reversals go out."""
    proxy = FaultProxy()

    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, acquirer_opts={"acq-a": {"timeout": 0.4}},
                                  proxies={"acq-a": proxy}) as sw:
            sim = sw.sims["acq-a"]
            proxy.stall("down")
            async with terminal(sw, tmp_path) as t:
                answers = await asyncio.gather(*[t.request(make_purchase(7000 + i, stan=i + 1), timeout=5)
                                                 for i in range(5)])
                assert [a["39"] for a in answers] == ["91"] * 5
                originals = {d["11"]: d for d in financial(sim)}
                assert len(originals) == 5
                proxy.resume("down")
                assert await wait_until(lambda: sw.links["acq-a"].counters["late"] >= 5)
                assert await sw.reversals.wait_empty(30)
                _reversed_once(sw, sim, originals)
                late = [await sw.journal.find_txn("TERM0001", f"{i + 1:06d}", answers[i]["7"], "0200")
                        for i in range(5)]
                assert all(row["late_response_code"] == "00" for row in late), late
                with pytest.raises(asyncio.TimeoutError):  # no terminal hears a second answer
                    await t.receive_unsolicited(timeout=0.3)

    run(go(), timeout=90)


def test_garbage_where_a_frame_header_should_be_drops_the_link_and_reverses(tmp_path):
    proxy = FaultProxy()

    async def go():
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 300.0}},
                                  acquirer_opts={"acq-a": {"timeout": 5.0}}, proxies={"acq-a": proxy}) as sw:
            sim = sw.sims["acq-a"]
            async with terminal(sw, tmp_path) as t:
                tasks = await _at_the_acquirer(t, sim, 5, 8000)
                proxy.inject("down", b"\xff\xff" + b"\x00garbage" * 4)  # a 65,535-byte frame: over max_frame
                answers = await asyncio.gather(*tasks)
                assert [a["39"] for a in answers] == ["91"] * 5
                assert sw.links["acq-a"].counters["frame_errors"] == 1
                assert await sw.reversals.wait_empty(30)
                _reversed_once(sw, sim, {d["11"]: d for d in financial(sim)})
                assert (await t.request(make_purchase(9000, stan=50), timeout=5))["39"] == "00"

    run(go(), timeout=90)


def test_answer_without_a_response_code_is_reversed_never_passed_on(tmp_path):
    """An answer that says nothing about the outcome is an unknown outcome: the
    terminal gets 96 and the request is reversed at that acquirer, never sent
    elsewhere (and no answer without DE39 reaches the terminal)."""
    from switch.sim.acquirer import Fault

    routing = """
    [routing]
    default_acquirers = ["acq-a", "acq-b"]
    """

    async def go():
        async with running_switch(tmp_path, routing=routing) as sw:
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            sw.router.rng.random = lambda: 0.0  # acq-a first
            a.fault = Fault(omit_fields=("39",))
            async with terminal(sw, tmp_path) as t:
                answers = [await t.request(make_purchase(5000 + i, stan=i + 1)) for i in range(3)]
                assert [(r["t"], r["39"]) for r in answers] == [("0210", "96")] * 3
                assert [r["11"] for r in answers] == ["000001", "000002", "000003"]
                assert not financial(b)
                a.fault = Fault()
                assert await sw.reversals.wait_empty(15)
                _reversed_once(sw, a, {d["11"]: d for d in financial(a)})
                assert sw.flow.counters["answer_without_rc"] == 3
                assert (await t.request(make_purchase(6000, stan=9)))["39"] == "00"

    run(go())
