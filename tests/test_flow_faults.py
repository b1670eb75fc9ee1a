"""The transaction flow and acquirer links under faults: half-open breaker
trials that never went out, the link's in-flight cap while journal writes are
under way, "try elsewhere" from an ISO 8583:1993 host, a host sign-off during
the journal write, and late answers to the link's own echo. DESIGN.md
invariants 1, 3, 5 and 6, against real switch processes and simulators.
"""
import asyncio
import time

import pytest

from switch.acquirer import NotSent
from switch.flow import RequestContext
from switch.sim.acquirer import Fault
from switch.sim.terminal import make_purchase
from tests.switch_harness import run, running_switch, terminal

pytestmark = pytest.mark.timeout(120)

TWO = """
[routing]
default_acquirers = ["acq-a", "acq-b"]
"""
ONE = """
[routing]
default_acquirers = ["acq-a"]
[store_and_forward]
backoff_min = 0.05
backoff_max = 0.2
"""
BREAKER = {"breaker": {"failure_threshold": 1, "open_seconds": 0.3, "half_open_max": 1}}


def financial(sim):
    return [d for d in sim.received if d.get("t") in ("0200", "1200")]


async def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return pred()


def test_a_retransmission_taking_the_half_open_trial_gives_it_back(tmp_path):
    """A retransmission of a finished request goes as far as the journal
    write before it is known for one (DESIGN.md #6): when it took the trial
    slot of a half-open breaker, that slot must come back, or the acquirer,
    healthy again, would never be tried again."""
    async def go():
        async with running_switch(tmp_path, routing=TWO, acquirer_opts={"acq-a": dict(timeout=0.3, **BREAKER)}) as sw:
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            sw.router.rng.random = lambda: 0.0  # acq-a first
            health = sw.links["acq-a"].health
            a.fault = Fault(drop_responses=True)
            async with terminal(sw, tmp_path) as t:
                req = make_purchase(1000, stan=1)
                first = await t.request(dict(req), timeout=5)
                assert first["39"] == "91" and health.state_name == "OPEN"
                a.fault = Fault()
                await asyncio.sleep(0.4)  # due for a trial
                again = await t.request(dict(req), timeout=5)
                assert again == first  # replayed, not forwarded
                assert len(financial(a)) == 1 and not financial(b)
                assert health.half_open_trials == 0
                for i in range(3):
                    assert (await t.request(make_purchase(2000 + i, stan=10 + i), timeout=5))["39"] == "00"
            assert health.state_name == "CLOSED"
            assert [d["4"] for d in financial(a)[1:]] == ["000000002000", "000000002001", "000000002002"]

    run(go())


def test_an_advice_acknowledged_with_a_retry_code_ends_the_half_open_trial(tmp_path):
    """The advice's trial had an answer: the breaker must hear it (here a
    "try elsewhere" 96 opens it again), never keep the slot taken forever."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, routing=ONE,
                                  acquirer_opts={"acq-a": dict(timeout=0.3, **BREAKER)}) as sw:
            a = sw.sims["acq-a"]
            health = sw.links["acq-a"].health
            a.fault = Fault(drop_responses=True)
            async with terminal(sw, tmp_path) as t:
                assert (await t.request(make_purchase(1000, stan=1), timeout=5))["39"] == "91"
                assert health.state_name == "OPEN"
                a.fault = Fault(respond_rc="96")
                await asyncio.sleep(0.4)
                r = await t.request(make_purchase(4200, stan=2, mti="0220", track2=False), timeout=5)
                assert (r["t"], r["39"]) == ("0230", "00")  # stored and forwarded
                assert health.half_open_trials == 0 and health.state_name == "OPEN"
                a.fault = Fault()
                assert await sw.reversals.wait_empty(10)
                await asyncio.sleep(0.4)
                r = await t.request(make_purchase(3000, stan=3), timeout=5)
                assert r["39"] == "00" and financial(a)[-1]["4"] == "000000003000"
            assert health.state_name == "CLOSED"

    run(go())


def test_an_advice_with_no_time_left_takes_no_half_open_trial(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, routing=ONE,
                                  acquirer_opts={"acq-a": BREAKER}) as sw:
            health = sw.links["acq-a"].health
            health.record_failure("connect", time.monotonic())
            await asyncio.sleep(0.35)
            assert health.can_request(time.monotonic())  # due: a trial may go
            now = time.monotonic()
            # less than the flow's answer margin left: the advice cannot be sent now
            ctx = RequestContext("terminals", None, now, now + sw.flow.answer_margin * 0.9)
            r = await sw.flow.process(make_purchase(4200, stan=5, mti="0220", track2=False), ctx)
            assert (r["t"], r["39"]) == ("0230", "00")
            assert health.state_name == "HALF_OPEN" and health.half_open_trials == 0
            assert health.allow_request(time.monotonic())

    run(go())


def test_the_links_in_flight_cap_counts_requests_awaiting_their_journal_write(tmp_path):
    """``max_in_flight`` is what the host is promised: a burst whose journal
    writes are all under way at once must not all go out together."""
    class Peak(dict):
        peak = 0

        def __setitem__(self, k, v):
            super().__setitem__(k, v)
            Peak.peak = max(Peak.peak, len(self))

    async def go():
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 100.0}},
                                  acquirer_opts={"acq-a": {"max_in_flight": 5, "timeout": 3.0}},
                                  listener={"terminal_timeout": 8.0}) as sw:
            link = sw.links["acq-a"]
            link.pending = Peak()
            async with terminal(sw, tmp_path) as t:
                answers = await asyncio.gather(*[t.request(make_purchase(1000 + i, stan=i + 1), timeout=10)
                                                 for i in range(30)])
            assert [r["39"] for r in answers] == ["00"] * 30
            assert len(financial(sw.sims["acq-a"])) == 30
            assert Peak.peak == 5, Peak.peak

    run(go())


def test_a_1993_host_answering_the_action_code_of_a_try_elsewhere_code_is_failed_over(tmp_path):
    """try_elsewhere_codes are 1987 codes (91, 92, 96); a 1993 host says 907,
    908, 909 for them. Either way nothing was done there: the next acquirer
    takes it (DESIGN.md #3)."""
    async def go():
        sims = {"acq-a": {"dialect": "iso93ascii"}, "acq-b": {"dialect": "iso93ascii"}}
        async with running_switch(tmp_path, sims, listener={"dialect": "iso93ascii"}, routing=TWO) as sw:
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            sw.router.rng.random = lambda: 0.0
            a.fault = Fault(respond_rc="91")  # answered 907
            async with terminal(sw, tmp_path) as t:
                r = await t.request(make_purchase(1000, stan=3, dialect="iso93ascii"), timeout=5)
            assert r["39"] == "000" and r["11"] == "000003"
            assert len(financial(a)) == 1 and len(financial(b)) == 1
            assert sw.links["acq-a"].health.failure_counts["try_elsewhere"] == 1
            assert sw.flow.counters["failover_try_elsewhere"] == 1

    run(go())


def test_a_connection_the_host_signs_off_during_the_journal_write_gets_no_request(tmp_path):
    """README: after a host sign-off no new request goes on that connection.
    The connection is chosen before the forwarding is journaled; a sign-off
    arriving meanwhile must still keep the request off it."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            a, link = sw.sims["acq-a"], sw.links["acq-a"]

            async def sign_off_meanwhile(stan, out):
                await a.send_network("002")

            with pytest.raises(NotSent) as e:
                await link.request(make_purchase(1000, stan=1), 2.0, sign_off_meanwhile)
            assert e.value.reason == "link down"
            await asyncio.sleep(0.1)
            assert not financial(a)
            assert not link.pending and not link._reserved

    run(go())


def test_a_late_answer_to_the_links_own_echo_is_not_a_late_response(tmp_path):
    """Late responses (DESIGN.md #5) are transactions' answers, journaled
    against their transaction; an echo answered late has none."""
    async def go():
        opts = {"acq-a": {"echo_interval": 0.2, "echo_misses": 100, "timeout": 0.1}}
        async with running_switch(tmp_path, {"acq-a": {}}, acquirer_opts=opts) as sw:
            link = sw.links["acq-a"]
            sw.sims["acq-a"].fault = Fault(delay_ms=250)
            assert await wait_until(lambda: link.counters["late_network"] >= 2)
            assert link.counters["late"] == 0 and sw.late_responses == 0

    run(go())


@pytest.mark.parametrize("dialect", ["default", "iso93ascii"])
def test_a_terminal_reversal_of_a_request_in_flight_goes_out_after_its_answer(tmp_path, dialect):
    """The terminal gave up on its purchase and reverses it while the switch
    still waits for the acquirer. Sent at once, the reversal would overtake
    the purchase there: a host answers 25 (original not found), which
    acknowledges it, then approves the purchase -- charged, yet reversed for
    the terminal. It goes out once the purchase's outcome is known."""
    from core import iso8583
    from core.framing import build_frame
    from switch.sim.terminal import make_reversal

    async def go():
        sims = {"acq-a": {"dialect": dialect}}
        async with running_switch(tmp_path, sims, listener={"dialect": dialect},
                                  acquirer_opts={"acq-a": {"timeout": 2.0}}) as sw:
            a = sw.sims["acq-a"]
            loop = asyncio.get_running_loop()
            answered, reversal_codes = set(), []

            def handle(conn, frame, out, later):
                req, _ = iso8583.decode(frame, a.spec)
                a._log(req)
                resp = a.respond(req)
                if req["t"][1:3] == "20":  # the purchase: the host takes its time
                    def answer(resp=resp, conn=conn):
                        answered.add(req["11"])
                        conn.transport.write(build_frame(iso8583.encode(resp, a.spec)[0], a.framing))
                    loop.call_later(0.4, answer)
                    return
                if req["t"][1] == "4":  # a reversal: found only once the original is done
                    original = (req.get("90") or req.get("56"))[4:10]
                    resp["39"] = a._rc("00" if original in answered else "25")
                    reversal_codes.append(resp["39"])
                out.append(build_frame(iso8583.encode(resp, a.spec)[0], a.framing))

            a._handle = handle
            async with terminal(sw, tmp_path) as t:
                purchase = make_purchase(1000, stan=5, dialect=dialect)
                pending = asyncio.create_task(t.request(dict(purchase), timeout=5))
                await wait_until(lambda: financial(a))
                r = await t.request(make_reversal(purchase, stan=6, dialect=dialect), timeout=5)
                assert r["39"] in ("00", "000", "400") and r["11"] == "000006"  # (1993: reversal accepted)
                assert (await pending)["39"] in ("00", "000")
                assert await sw.reversals.wait_empty(10)
            assert reversal_codes == [a._rc("00")]
            assert sw.flow.counters["reversal_waited_for_original"] == 1

    run(go())


def test_a_repeat_is_routed_by_its_originals_rule(tmp_path):
    """A terminal's repeat (0201, 0221) whose original never reached the
    switch is that request again: a rule naming the original's MTI takes it,
    so a completion's repeat goes to the acquirer its rule names, not to the
    defaults."""
    routing = """
    [routing]
    default_acquirers = ["acq-a"]
    [[routing.rules]]
    name = "purchases-and-completions-to-b"
    mti = ["0200", "0220"]
    acquirers = ["acq-b"]
    """

    async def go():
        async with running_switch(tmp_path, routing=routing) as sw:
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            async with terminal(sw, tmp_path) as t:
                r = await t.request(make_purchase(1000, stan=1, mti="0201"), timeout=5)
                assert (r["t"], r["39"]) == ("0210", "00")
                r = await t.request(make_purchase(4200, stan=2, mti="0221", track2=False), timeout=5)
                assert (r["t"], r["39"]) == ("0230", "00")
            assert [d["t"] for d in b.received if d["t"][1] != "8"] == ["0201", "0221"]
            assert not [d for d in a.received if d["t"][1] != "8"]

    run(go())


def test_requests_no_acquirer_dialect_can_carry_are_format_errors_not_acquirer_failures(tmp_path):
    """ICC data that is not hex passes an ASCII listener but no binary
    acquirer dialect can carry it. That says nothing about the acquirers:
    counted as their failures, a handful of such requests from one terminal
    opened every breaker and everyone else got 91. It is answered 30 (DESIGN.md
    #9), for an advice too (stored, it could never be delivered)."""
    async def go():
        async with running_switch(tmp_path, routing=TWO, listener={"dialect": "default_ascii"}) as sw:
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            async with terminal(sw, tmp_path) as t:
                for i in range(6):
                    bad = dict(make_purchase(1000 + i, stan=i + 1, dialect="default_ascii"), **{"55": "ZZZZ"})
                    r = await t.request(bad, timeout=5)
                    assert (r["39"], r["11"]) == ("30", f"{i + 1:06d}")
                advice = dict(make_purchase(4200, stan=20, mti="0220", track2=False, dialect="default_ascii"),
                              **{"55": "ZZZZ"})
                assert (await t.request(advice, timeout=5))["39"] == "30"
                assert [ln.health.state_name for ln in sw.links.values()] == ["CLOSED", "CLOSED"]
                assert all(ln.health.failure_counts["write"] == 0 for ln in sw.links.values())
                good = await t.request(make_purchase(5000, stan=50, dialect="default_ascii"), timeout=5)
                assert good["39"] == "00"
            assert len(financial(a)) + len(financial(b)) == 1
            assert await sw.journal.sf_depth() == 0

    run(go())


def test_a_late_answer_must_answer_what_went_out_under_its_number(tmp_path):
    """After a timeout, a message of another class with the timed-out STAN
    (0110 for an 0200) is no late response to it: counted unmatched, never
    journaled as the transaction's late answer; the real 0210 is."""
    from core import iso8583
    from core.framing import build_frame

    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, acquirer_opts={"acq-a": {"timeout": 0.2}}) as sw:
            a, link = sw.sims["acq-a"], sw.links["acq-a"]
            loop = asyncio.get_running_loop()
            orig_handle = a._handle

            def handle(conn, frame, out, later):
                req, _ = iso8583.decode(frame, a.spec)
                if req["t"] != "0200":
                    return orig_handle(conn, frame, out, later)
                a._log(req)
                wrong = dict(a.respond(req), t="0110", **{"39": "05"})
                for delay, resp in ((0.3, wrong), (0.4, a.respond(req))):
                    data = build_frame(iso8583.encode(resp, a.spec)[0], a.framing)
                    loop.call_later(delay, conn.transport.write, data)

            a._handle = handle
            async with terminal(sw, tmp_path) as t:
                purchase = make_purchase(1000, stan=4)
                assert (await t.request(dict(purchase), timeout=5))["39"] == "91"
                assert await wait_until(lambda: link.counters["late"] >= 1)
            assert link.counters["unmatched"] == 1 and link.counters["late"] == 1
            assert await wait_until(lambda: sw.late_responses == 1)
            await asyncio.sleep(0.1)
            row = await sw.journal.find_txn("TERM0001", "000004", purchase["7"], "0200")
            assert row["late_response_code"] == "00"

    run(go())


def test_a_late_answer_the_journal_refuses_is_counted_and_the_switch_goes_on(tmp_path):
    """The journal write of a late response fails (disk full, writer down):
    counted in the flow's counters and logged, never an unretrieved task
    exception; the timed-out request's reversal still goes out."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, acquirer_opts={"acq-a": {"timeout": 0.2}}) as sw:
            a = sw.sims["acq-a"]

            async def refuse(*args, **kw):
                raise OSError(28, "No space left on device")
            sw.journal.record_late_response = refuse
            a.fault = Fault(delay_ms=500)
            async with terminal(sw, tmp_path) as t:
                assert (await t.request(make_purchase(1000, stan=7), timeout=5))["39"] == "91"
                assert await wait_until(lambda: sw.flow.counters["late_journal_errors"] >= 1)
            # every late response's write failed and was counted (a reversal's late answer too)
            assert await wait_until(lambda: sw.flow.counters["late_journal_errors"] == sw.late_responses)
            a.fault = Fault()
            assert await wait_until(lambda: any(m["t"] in ("0400", "0401") for m in a.received), 10)

    run(go())


def test_empty_default_acquirers_means_no_route(tmp_path):
    """switch/isoswitch.example.toml: ``default_acquirers = []`` means "no
    route" (92) for a request no rule matches -- not "every acquirer"."""
    routing = """
    [routing]
    default_acquirers = []
    [[routing.rules]]
    name = "mastercard-only"
    scheme = ["mastercard"]
    acquirers = ["acq-b"]
    """

    async def go():
        async with running_switch(tmp_path, routing=routing) as sw:
            async with terminal(sw, tmp_path) as t:
                r = await t.request(make_purchase(1000, stan=1), timeout=5)  # a Visa test card
            assert (r["39"], r["11"]) == ("92", "000001")
            assert not financial(sw.sims["acq-a"]) and not financial(sw.sims["acq-b"])

    run(go())
