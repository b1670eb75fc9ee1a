"""The switch over real sockets: mTLS terminals, acquirer simulators, routing, failover.

Each test starts real simulators and a real switch on 127.0.0.1 and checks a
DESIGN.md invariant from the terminal's side and the acquirer's side.
"""
import asyncio
import ssl

import pytest

from switch import certs
from switch.sim.acquirer import Fault
from switch.sim.terminal import make_purchase, run_terminals
from tests.switch_harness import run, running_switch, terminal

pytestmark = pytest.mark.timeout(120)

PAN_VISA_TEST = "4761739001010010"  # BIN 476173 -> route visa-test in the sample table
PAN_VISA = "4111111111111111"  # BIN 411111 -> route visa
PAN_MC = "5413330089020011"  # 54133300 (8-digit BIN) -> route mastercard-test


def financial(sim):
    return [d for d in sim.received if d.get("t") in ("0100", "0200")]


def test_longest_prefix_bin_routing_and_rules(tmp_path):
    routing = """
    [[routing.rules]]
    name = "visa-test-bin"
    route = ["visa-test"]
    acquirers = [{name = "acq-b"}]
    [[routing.rules]]
    name = "big-amounts"
    amount_min = 500000
    acquirers = [{name = "acq-b"}]
    [[routing.rules]]
    name = "rest"
    acquirers = [{name = "acq-a"}]
    """

    async def go():
        async with running_switch(tmp_path, routing=routing) as sw:
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            async with terminal(sw, tmp_path) as t:
                r1 = await t.request(make_purchase(1000, pan=PAN_VISA_TEST, stan=1))
                r2 = await t.request(make_purchase(1000, pan=PAN_VISA, stan=2))
                r3 = await t.request(make_purchase(900000, pan=PAN_VISA, stan=3))
                r4 = await t.request(make_purchase(1000, pan=PAN_MC, stan=4))
            assert [r["39"] for r in (r1, r2, r3, r4)] == ["00"] * 4
            # 476173 (6 digits) beats 400000-499999 (a wider range of the same length)
            assert [d["11"] for d in financial(b)] and len(financial(b)) == 2
            assert {d["4"] for d in financial(b)} == {"000000001000", "000000900000"}
            assert len(financial(a)) == 2
            assert sw.router.route({"t": "0200", "2": PAN_MC}).bin.prefix_len == 8

    run(go())


def test_failover_when_primary_refuses_connections(tmp_path):
    routing = """
    [routing]
    default_acquirers = ["acq-a", "acq-b"]
    """

    async def go():
        async with running_switch(tmp_path, routing=routing, wait_up=False) as sw:
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            await sw.links["acq-b"].wait_up(5)
            sw.router.rng.random = lambda: 0.0  # acq-a is first choice while healthy
            await sw.links["acq-a"].stop()  # primary link down, as if never connected
            await a.set_fault(Fault(refuse=True))
            async with terminal(sw, tmp_path) as t:
                for i in range(5):
                    r = await t.request(make_purchase(1000, stan=i + 1))
                    assert r["39"] == "00"
            assert len(financial(b)) == 5 and not financial(a)
            # tried first, certainly not sent, failed over (until its breaker opened)
            assert sw.flow.counters["failover_not_sent"] >= 1

    run(go())


def test_failover_when_link_goes_down_before_sending(tmp_path):
    routing = """
    [routing]
    default_acquirers = ["acq-a", "acq-b"]
    """

    async def go():
        async with running_switch(tmp_path, routing=routing,
                                  acquirer_opts={"acq-a": {"reconnect_min": 5.0, "reconnect_max": 5.0}}) as sw:
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            await a.set_fault(Fault(refuse=True))
            await a.stop()  # closes its connections: the link goes down
            for _ in range(100):
                if not sw.links["acq-a"].up:
                    break
                await asyncio.sleep(0.02)
            assert not sw.links["acq-a"].up
            async with terminal(sw, tmp_path) as t:
                r = await t.request(make_purchase(1000, stan=7))
            assert r["39"] == "00" and r["11"] == "000007"
            assert len(financial(b)) == 1

    run(go())


def test_no_failover_after_timeout_terminal_gets_91_and_reversal_is_queued(tmp_path):
    routing = """
    [routing]
    default_acquirers = ["acq-a", "acq-b"]
    """

    async def go():
        async with running_switch(tmp_path, routing=routing,
                                  acquirer_opts={"acq-a": {"timeout": 0.5}},
                                  listener={"terminal_timeout": 2.0}) as sw:
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            sw.router.rng.random = lambda: 0.0  # acq-a first
            a.fault = Fault(drop_responses=True)
            loop = asyncio.get_running_loop()
            async with terminal(sw, tmp_path) as t:
                t0 = loop.time()
                r = await t.request(make_purchase(1000, stan=42), timeout=5)
                elapsed = loop.time() - t0
            assert r["39"] == "91" and r["11"] == "000042"
            assert elapsed < 2.0  # within the terminal timeout
            assert not financial(b), "a timed-out request must never be re-sent elsewhere"
            assert sw.reversals.counters["queued"] == 1
            a.fault = Fault()
            assert await sw.reversals.wait_empty(10)
            revs = [d for d in a.received if d["t"] in ("0400", "0401")]
            assert revs, "reversal must reach the acquirer that may hold the original"
            orig = financial(a)[0]
            assert revs[-1]["90"][:10] == "0200" + orig["11"]

    run(go())


def test_reversal_acknowledged_with_a_retry_code_is_sent_again_until_applied(tmp_path):
    """[store_and_forward] retry_codes: an 0410 saying "not applied" (91 here)
    is no acknowledgement; the entry is repeated (0401) with backoff, and
    acknowledged once the acquirer answers anything else."""
    routing = """
    [store_and_forward]
    backoff_min = 0.05
    backoff_max = 0.1
    retry_codes = ["91"]
    """

    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, routing=routing,
                                  acquirer_opts={"acq-a": {"timeout": 0.3}}) as sw:
            a = sw.sims["acq-a"]
            a.fault = Fault(drop_responses=True)
            async with terminal(sw, tmp_path) as t:
                r = await t.request(make_purchase(1000, stan=42), timeout=5)
                assert r["39"] == "91"
                a.fault = Fault(respond_rc="91")
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                while len([d for d in a.received if d["t"] in ("0400", "0401")]) < 3 and loop.time() < deadline:
                    await asyncio.sleep(0.02)
                assert sw.reversals.counters["acknowledged"] == 0
                assert sw.reversals.counters["retry_codes"] >= 2
                [entry] = await sw.journal.sf_list()
                assert entry.attempts >= 2 and "answered 91" in (entry.last_error or "")
                a.fault = Fault(respond_rc="25")  # original not found: acknowledged all the same
                assert await sw.reversals.wait_empty(10)
                assert sw.reversals.counters["acknowledged"] == 1
                sent = [d for d in a.received if d["t"] in ("0400", "0401")]
                revs = [d["t"] for d in sent]
                assert revs[0] == "0400" and set(revs[1:]) == {"0401"} and len(revs) >= 4
                # each repeat is the first message again but for the MTI: same DE11, DE7 and DE90
                assert len({(d["11"], d["7"], d["90"]) for d in sent}) == 1, [(d["11"], d["7"]) for d in sent]

    run(go())


def test_circuit_breaker_opens_and_recovers(tmp_path):
    routing = """
    [routing]
    default_acquirers = ["acq-a", "acq-b"]
    """
    breaker = {"breaker": {"failure_threshold": 2, "open_seconds": 0.5, "half_open_max": 1}}

    async def go():
        async with running_switch(tmp_path, routing=routing,
                                  acquirer_opts={"acq-a": dict(timeout=0.3, **breaker)}) as sw:
            a = sw.sims["acq-a"]
            sw.router.rng.random = lambda: 0.0
            health = sw.links["acq-a"].health
            a.fault = Fault(drop_responses=True)
            async with terminal(sw, tmp_path) as t:
                for i in range(2):
                    assert (await t.request(make_purchase(1000, stan=i + 1), timeout=5))["39"] == "91"
                assert health.state_name == "OPEN"
                before = len(financial(a))
                r = await t.request(make_purchase(1000, stan=10), timeout=5)
                assert r["39"] == "00" and len(financial(a)) == before  # skipped while open
                a.fault = Fault()
                await asyncio.sleep(0.6)
                r = await t.request(make_purchase(1000, stan=11), timeout=5)
                assert r["39"] == "00"
                assert health.state_name == "CLOSED"
                assert financial(a)[-1]["4"] == "000000001000"

    run(go())


def test_echo_detects_silent_link_and_reconnect_restores_it(tmp_path):
    async def go():
        opts = {"acq-a": {"echo_interval": 0.2, "echo_misses": 2, "timeout": 0.2}}
        async with running_switch(tmp_path, {"acq-a": {}}, acquirer_opts=opts) as sw:
            a = sw.sims["acq-a"]
            link = sw.links["acq-a"]
            connects = link.counters["connects"]
            a.fault = Fault(drop_responses=True, drop_echo=True)  # silent, but connected
            for _ in range(200):
                if link.counters["echo_misses"] >= 2:
                    break
                await asyncio.sleep(0.02)
            assert link.counters["echo_misses"] >= 2
            a.fault = Fault()
            for _ in range(300):
                if link.counters["connects"] > connects and link.up:
                    break
                await asyncio.sleep(0.02)
            assert link.counters["connects"] > connects and link.up
            async with terminal(sw, tmp_path) as t:
                assert (await t.request(make_purchase(1000, stan=5)))["39"] == "00"

    run(go())


def test_two_terminals_same_stan_never_get_each_others_responses(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 30.0}}) as sw:
            sw.links["acq-a"].cfg  # single acquirer: both requests share one link
            async with terminal(sw, tmp_path, "TERM0001") as t1, terminal(sw, tmp_path, "TERM0002") as t2:
                for round_ in range(10):
                    stan = 77 + round_  # both terminals use the same STAN at the same time
                    r1, r2 = await asyncio.gather(
                        t1.request(make_purchase(1111, stan=stan, terminal_id="TERM0001")),
                        t2.request(make_purchase(2222, stan=stan, terminal_id="TERM0002")),
                    )
                    assert (r1["41"], r1["4"], r1["11"]) == ("TERM0001", "000000001111", f"{stan:06d}")
                    assert (r2["41"], r2["4"], r2["11"]) == ("TERM0002", "000000002222", f"{stan:06d}")
            stans = [d["11"] for d in financial(sw.sims["acq-a"])]
            assert len(stans) == 20 and len(set(stans)) == 20  # switch-assigned, unique per link

    run(go())


def test_1000_pipelined_requests_over_50_connections(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 1.0}, "acq-b": {}}) as sw:
            lst = sw.listeners[0]
            from switch.sim.terminal import dev_client_context
            s = await run_terminals("127.0.0.1", lst.port, count=1000, connections=50,
                                    concurrency_per_conn=10, ssl=dev_client_context(tmp_path / "state"),
                                    timeout=10)
            assert s.answered == 1000 and s.by_response_code == {"00": 1000}
            assert s.timeouts == 0 and s.errors == 0
            total = len(financial(sw.sims["acq-a"])) + len(financial(sw.sims["acq-b"]))
            assert total == 1000

    run(go())


def test_terminal_without_client_cert_or_from_other_ca_is_refused(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            port = sw.listeners[0].port
            pki = certs.ensure_dev_pki(tmp_path / "state")
            no_cert = certs.client_context(pki.ca_cert)
            ca2, ca2_key = certs.make_ca("foreign CA")
            c2, k2 = certs.issue_cert(ca2, ca2_key, "TERM9999", server=False, client=True)
            cp = certs.write_pem(tmp_path / "foreign.crt", c2)
            kp = certs.write_pem(tmp_path / "foreign.key", k2)
            foreign = certs.client_context(pki.ca_cert, cp, kp)
            for ctx in (no_cert, foreign):
                before = sw.listeners[0].counters["connections"]
                try:
                    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                         server_hostname="localhost")
                    w.write(b"\x00\x04abcd")
                    data = await asyncio.wait_for(r.read(100), 3)
                    assert data == b""
                    w.close()
                except (ssl.SSLError, ConnectionError, OSError):
                    pass
                assert sw.listeners[0].counters["connections"] == before

    run(go())


@pytest.mark.parametrize("term_dialect,acq_dialect", [
    ("default", "iso87binary"), ("default_ascii", "ebcdic"), ("iso87binary", "default_ascii"),
])
def test_different_dialects_round_trip(tmp_path, term_dialect, acq_dialect):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"dialect": acq_dialect}},
                                  listener={"dialect": term_dialect}) as sw:
            async with terminal(sw, tmp_path) as t:
                req = make_purchase(1234, stan=9, dialect=term_dialect)
                r = await t.request(req)
            assert r["39"] == "00" and r["11"] == "000009" and r["4"] == "000000001234"
            got = financial(sw.sims["acq-a"])[0]
            assert got["2"] == req["2"] and got["4"] == "000000001234"
            sep = "D" if acq_dialect == "iso87binary" else "="
            assert sep in got["35"]

    run(go())


def test_a_chip_terminal_gets_the_issuers_icc_response_data_which_is_never_journaled(tmp_path):
    """EMV: the issuer's DE55 (tag 91 issuer authentication data, 8A) reaches the
    terminal, which the card needs for its second GENERATE AC; the terminal's
    own ICC data, track 2 and PIN block never come back, and none of it is
    journaled."""
    icc = "9F2608C2C12B098F3DA6E39F2701809F100706011203A4A802"

    async def go():
        async with running_switch(tmp_path, sims={"acq-a": {}}) as sw:
            a = sw.sims["acq-a"]
            async with terminal(sw, tmp_path) as t:
                req = make_purchase(1000, pan=PAN_VISA, stan=7, pin_block="0123456789ABCDEF", icc=icc)
                r = await t.request(dict(req))
                again = await t.request(dict(req))  # a retransmission once it completed: replayed
            sent = financial(a)
            assert len(sent) == 1
            assert r["39"] == "00"
            issuer = a.issuer_icc(sent[0], "00")
            assert r["55"] == issuer and issuer.startswith("910A") and icc not in r["55"]
            assert "35" not in r and "52" not in r
            assert (again["39"], again["38"]) == (r["39"], r["38"])
            return issuer

    issuer = run(go())
    stored = b"".join(p.read_bytes() for p in (tmp_path / "state").glob("journal.db*"))
    assert stored, "the journal files were not found"
    for blob in (issuer, icc, "0123456789ABCDEF"):
        assert blob.encode() not in stored and bytes.fromhex(blob) not in stored
