"""Acquirer-link and routing behaviour: TLS links, late responses, reload, weights, shutdown."""
import asyncio
import time

import pytest

from switch import certs
from switch.acquirer import NotSent, OutcomeUnknown
from switch.sim.acquirer import Fault
from switch.sim.terminal import make_purchase
from tests.switch_harness import run, running_switch, terminal

pytestmark = pytest.mark.timeout(120)


def financial(sim):
    return [d for d in sim.received if d.get("t") in ("0100", "0200")]


def test_tls_acquirer_link_with_dev_pki(tmp_path):
    pki = certs.ensure_dev_pki(tmp_path / "state")
    sim_ctx = certs.server_context(pki.acquirer_cert, pki.acquirer_key, None, require_client_cert=False)

    async def go():
        opts = {"acq-a": {"tls": True, "ca": str(pki.ca_cert), "server_hostname": "localhost"}}
        async with running_switch(tmp_path, {"acq-a": {"ssl": sim_ctx}}, acquirer_opts=opts) as sw:
            assert sw.links["acq-a"].up
            async with terminal(sw, tmp_path) as t:
                assert (await t.request(make_purchase(1000, stan=3)))["39"] == "00"

    run(go())


def test_late_response_is_counted_never_sent_and_reversal_still_goes_out(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, acquirer_opts={"acq-a": {"timeout": 0.3}}) as sw:
            a = sw.sims["acq-a"]
            a.fault = Fault(delay_ms=600)
            async with terminal(sw, tmp_path) as t:
                r = await t.request(make_purchase(1000, stan=8), timeout=5)
                assert r["39"] == "91"
                await asyncio.sleep(0.8)
                assert sw.links["acq-a"].counters["late"] >= 1
                assert sw.late_responses >= 1
                a.fault = Fault()
                assert await sw.reversals.wait_empty(10)
                assert [d for d in a.received if d["t"] in ("0400", "0401")]
                # the terminal never saw a second answer for STAN 8
                with pytest.raises(asyncio.TimeoutError):
                    await t.receive_unsolicited(timeout=0.3)

    run(go())


def test_a_link_sends_under_the_trace_number_asked_for_unless_it_is_in_use(tmp_path):
    """``request(stan=...)`` (a repeat carries its first attempt's DE11): the
    number is used, also after it timed out (its late answer then answers the
    repeat); while another request on the link holds it, NotSent (the queue
    backs off and tries again) -- never sent under a new number the journal
    does not know, which the host could not tell a repeat by and whose late
    answer would match nothing -- so answers cannot be crossed either."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            link, a = sw.links["acq-a"], sw.sims["acq-a"]
            r = await link.request(make_purchase(1000, stan=1), 5.0, stan="004711")
            assert r.stan == "004711" and a.received[-1]["11"] == "004711" and r.doc["39"] == "00"
            # timed out, remembered as late: asked for again, it is used again
            a.fault = Fault(delay_ms=400)
            with pytest.raises(OutcomeUnknown):
                await link.request(make_purchase(1000, stan=2), 0.1, stan="004712")
            r = await link.request(make_purchase(1000, stan=3), 5.0, stan="004712")
            assert r.stan == "004712" and r.doc["39"] == "00"
            # held by a request in flight: the second is not sent, under it or another
            a.fault = Fault(delay_ms=300)
            first = asyncio.create_task(link.request(make_purchase(1000, stan=4), 5.0, stan="004713"))
            while "004713" not in link.pending:
                await asyncio.sleep(0.005)
            sent = len(a.received)
            repeat = make_purchase(2000, stan=5) | {"t": "0401"}
            with pytest.raises(NotSent, match="in use"):
                await link.request(dict(repeat), 5.0, stan="004713")
            assert link.counters["stan_busy"] == 1 and len(a.received) == sent
            assert (await first).stan == "004713" and (await first).doc["11"] == "004713"
            # free again: the repeat goes under it
            a.fault = Fault()
            r = await link.request(dict(repeat), 5.0, stan="004713")
            assert r.stan == "004713" and a.received[-1]["11"] == "004713" and a.received[-1]["t"] == "0401"
            # nonsense is never put on the wire
            r = await link.request(make_purchase(1000, stan=6), 5.0, stan="00000X")
            assert r.stan != "00000X" and r.stan.isdigit()

    run(go())


def test_bin_table_reload_is_atomic_under_traffic(tmp_path):
    csv_a = tmp_path / "bins_a.csv"
    csv_b = tmp_path / "bins_b.csv"
    header = "low,high,route,scheme,country,card_type,issuer\n"
    csv_a.write_text(header + "476173,,to-a,visa,US,debit,\n")
    csv_b.write_text(header + "476173,,to-b,visa,US,debit,\n")
    routing = f"""
    [routing]
    bin_table = "{csv_a}"
    [[routing.rules]]
    name = "a"
    route = ["to-a"]
    acquirers = [{{name = "acq-a"}}]
    [[routing.rules]]
    name = "b"
    route = ["to-b"]
    acquirers = [{{name = "acq-b"}}]
    """

    async def go():
        async with running_switch(tmp_path, routing=routing) as sw:
            a, b = sw.sims["acq-a"], sw.sims["acq-b"]
            async with terminal(sw, tmp_path) as t:
                first = await asyncio.gather(*(t.request(make_purchase(1000, stan=i)) for i in range(1, 51)))
                sw.router.reload_bins(csv_b)
                second = await asyncio.gather(*(t.request(make_purchase(1000, stan=i)) for i in range(51, 101)))
                (tmp_path / "bad.csv").write_text(header + "47x173,,oops,visa,US,debit,\n")
                with pytest.raises(Exception):
                    sw.router.reload_bins(tmp_path / "bad.csv")
                third = await t.request(make_purchase(1000, stan=200))
            assert all(r["39"] == "00" for r in first + second + [third])
            assert len(financial(a)) == 50 and len(financial(b)) == 51  # bad file kept table b

    run(go())


def test_weighted_volume_split(tmp_path):
    routing = """
    [[routing.rules]]
    name = "split"
    acquirers = [{name = "acq-a", weight = 3.0}, {name = "acq-b", weight = 1.0}]
    """

    async def go():
        async with running_switch(tmp_path, routing=routing) as sw:
            sw.router.rng.seed(8583)
            async with terminal(sw, tmp_path) as t:
                await asyncio.gather(*(t.request(make_purchase(1000, stan=i)) for i in range(1, 401)))
            na, nb = len(financial(sw.sims["acq-a"])), len(financial(sw.sims["acq-b"]))
            assert na + nb == 400
            assert 0.65 < na / 400 < 0.85, (na, nb)

    run(go())


def test_translation_rewrites_institution_ids_and_restores_terminal_fields(tmp_path):
    async def go():
        opts = {"acq-a": {"institution_id": "12345678901", "forwarding_id": "999"}}
        async with running_switch(tmp_path, {"acq-a": {}}, acquirer_opts=opts) as sw:
            async with terminal(sw, tmp_path) as t:
                req = make_purchase(1000, stan=12)
                r = await t.request(req)
            got = financial(sw.sims["acq-a"])[0]
            assert got["32"] == "12345678901" and got["33"] == "999"
            assert r["11"] == "000012" and "33" not in r and r.get("32") == req.get("32")
            assert "35" not in r and "52" not in r

    run(go())


def test_graceful_shutdown_finishes_in_flight_work(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 300.0}}) as sw:
            t = terminal(sw, tmp_path)
            await t.connect()
            pending = [asyncio.create_task(t.request(make_purchase(1000, stan=i), timeout=5))
                       for i in range(1, 21)]
            await asyncio.sleep(0.1)  # all 20 are now in flight at the acquirer
            await sw.stop(grace=3.0)
            results = await asyncio.gather(*pending, return_exceptions=True)
            assert all(isinstance(r, dict) and r["39"] == "00" for r in results), results
            # no longer accepting
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", sw.listeners[0].port)
            await t.close()

    run(go())


def test_retransmission_is_replayed_never_forwarded_twice(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 200.0}}) as sw:
            a = sw.sims["acq-a"]
            async with terminal(sw, tmp_path) as t:
                req = make_purchase(4321, stan=55)
                # the original and a retransmission while it is in flight
                r1, r2 = await asyncio.gather(t.request(dict(req), timeout=5),
                                              t.request(dict(req), timeout=5))
                # and again after it completed, once as a repeat MTI
                r3 = await t.request(dict(req), timeout=5)
                r4 = await t.request(dict(req, t="0201"), timeout=5)
            assert len(financial(a)) == 1
            assert r1 == r2 == r3 and r1["39"] == "00" and r1["38"]
            assert (r4["39"], r4["38"]) == (r1["39"], r1["38"])
            assert sw.flow.counters["retransmissions"] == 3

    run(go())


def test_overloaded_switch_sheds_stale_requests_unforwarded(tmp_path):
    from switch.flow import RequestContext

    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            mono = time.monotonic()
            # received 2 s ago with a 3 s budget: more than half spent waiting in the switch
            stale = RequestContext("terminals", None, mono - 2.0, mono + 1.0)
            fresh = RequestContext("terminals", None, mono, mono + 3.0)
            r1 = await sw.flow.process(make_purchase(1000, stan=61), stale)
            r2 = await sw.flow.process(make_purchase(1000, stan=62), fresh)
            assert r1["39"] == "91" and r1["11"] == "000061"
            assert r2["39"] == "00"
            assert len(financial(sw.sims["acq-a"])) == 1 and sw.flow.counters["shed"] == 1

    run(go())


def test_request_without_de7_is_served_and_its_retransmission_replayed(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            async with terminal(sw, tmp_path) as t:
                req = make_purchase(1500, stan=71)
                req.pop("7")  # many terminal protocols carry only DE12/DE13
                r1 = await t.request(dict(req))
                r2 = await t.request(dict(req))
                other_day = dict(req, **{"13": "0101"})  # same STAN, another local date
                r3 = await t.request(other_day)
            assert r1["39"] == r2["39"] == r3["39"] == "00" and r1["38"] == r2["38"]
            assert len(financial(sw.sims["acq-a"])) == 2

    run(go())


def test_iso8583_1993_end_to_end(tmp_path):
    """1xxx MTIs, 3-digit action codes, 1420 reversals with DE56, on a 1993 terminal and acquirer."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"dialect": "iso93ascii"}},
                                  acquirer_opts={"acq-a": {"timeout": 0.4}},
                                  listener={"dialect": "iso93ascii", "terminal_timeout": 3.0}) as sw:
            a = sw.sims["acq-a"]
            async with terminal(sw, tmp_path) as t:
                req = make_purchase(1000, stan=81, dialect="iso93ascii")
                assert req["t"] == "1200"
                r = await t.request(dict(req))
                assert (r["t"], r["39"], r["11"]) == ("1210", "000", "000081")
                from switch.sim.terminal import make_echo
                echo = await t.request(make_echo(90, dialect="iso93ascii"))
                assert (echo["t"], echo["39"]) == ("1814", "800")
                a.fault = Fault(drop_responses=True)
                r = await t.request(make_purchase(2000, stan=82, dialect="iso93ascii"), timeout=5)
                assert (r["t"], r["39"]) == ("1210", "907")  # 91 as a 1993 action code
                a.fault = Fault()
                assert await sw.reversals.wait_empty(15)
                revs = [d for d in a.received if d["t"] in ("1420", "1421")]
                assert revs and revs[-1]["24"] == "400"
                orig = [d for d in a.received if d["t"] == "1200"][-1]
                assert revs[-1]["56"][:10] == "1200" + orig["11"]

    run(go())


def test_bind_terminal_id_refuses_a_certificate_used_for_another_terminal(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, listener={"bind_terminal_id": True}) as sw:
            async with terminal(sw, tmp_path, "TERM0001") as t:
                ok = await t.request(make_purchase(1000, stan=91, terminal_id="TERM0001"))
                bad = await t.request(make_purchase(1000, stan=92, terminal_id="TERM0002"))
            assert ok["39"] == "00" and bad["39"] == "63" and bad["11"] == "000092"
            assert len(financial(sw.sims["acq-a"])) == 1
            assert sw.listeners[0].counters["identity_mismatch"] == 1

    run(go())


def test_a_link_that_connects_to_itself_drops_it_and_frees_the_port():
    """With nothing listening on a local acquirer port in the ephemeral range,
    a reconnect can draw that port as its source and connect to itself (TCP
    simultaneous open). That is no link: without sign-on it would swallow
    requests, and it holds the port the acquirer needs to listen again. Here
    every attempt is made to draw that source port, so every one connects to
    itself."""
    import socket

    from switch.acquirer import AcquirerLink
    from switch.config import AcquirerConfig

    async def go():
        probe = socket.create_server(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        loop = asyncio.get_running_loop()
        real = loop.create_connection
        made = []

        async def from_the_same_port(*a, **kw):
            transport, proto = await real(*a, local_addr=("127.0.0.1", port), **kw)
            made.append(transport.get_extra_info("peername"))
            return transport, proto

        loop.create_connection = from_the_same_port
        cfg = AcquirerConfig(name="acq-self", host="127.0.0.1", port=port, connections=1,
                             sign_on=False, echo_interval=0, reconnect_min=0.05, reconnect_max=0.1)
        link = AcquirerLink(cfg)
        await link.start()
        try:
            deadline = time.monotonic() + 10
            while len(made) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                assert not link.up
            assert made and all(p == ("127.0.0.1", port) for p in made), made
            assert link.counters["connect_failures"] >= len(made) - 1
            assert link.counters["connects"] == 0
        finally:
            await link.stop()
            loop.create_connection = real
        # nothing holds the port any more: the acquirer can listen on it
        socket.create_server(("127.0.0.1", port)).close()

    run(go())

