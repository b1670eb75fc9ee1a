"""Simulated acquirer and terminals over real sockets on 127.0.0.1.

A TerminalClient talks to the AcquirerSimulator directly: in the default
dialect the simulator speaks what the switch's terminal side speaks.
"""
import argparse
import asyncio
import re

import pytest

from core import iso8583
from switch.sim import (
    AcquirerSimulator,
    Fault,
    LatencyModel,
    Rule,
    StanCounter,
    TerminalClient,
    add_acquirer_parser,
    add_terminal_parser,
    make_echo,
    make_purchase,
    make_reversal,
    run_acquirer_cli,
    run_terminal_cli,
    run_terminals,
)
from switch.sim.acquirer import dev_server_context, response_mti
from switch.sim.terminal import TEST_PAN, dev_client_context

pytestmark = pytest.mark.timeout(30)

DIALECTS = ("default", "default_ascii", "iso87binary", "ebcdic", "iso93ascii")


def run(coro, loop="asyncio"):
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(asyncio.wait_for(coro, 20))
    return asyncio.run(asyncio.wait_for(coro, 20))


async def _pair(**sim_kw):
    sim = await AcquirerSimulator(**sim_kw).start()
    client = await TerminalClient("127.0.0.1", sim.port).connect()
    return sim, client


# ------------------------------------------------------------------ answers


def test_purchase_approved_with_auth_code_and_echoes():
    async def main():
        sim, c = await _pair(approve_code_prefix="A")
        try:
            req = make_purchase(1234, stan=42, icc=True, pin_block="0123456789ABCDEF")
            resp = await c.request(req)
            assert resp["t"] == "0210"
            assert resp["39"] == "00"
            assert re.fullmatch(r"A\d{5}", resp["38"])
            for f in ("2", "3", "4", "7", "11", "12", "13", "37", "41", "42", "49"):
                assert resp[f] == req[f], f
            for f in ("35", "52", "14", "43"):
                assert f not in resp, f
            # the issuer's EMV response data, never the card's own ICC data echoed
            assert resp["55"] == sim.issuer_icc(req, "00") != req["55"]
            assert resp["55"].startswith("910A") and resp["55"].endswith("8A023030")
            # deterministic approval code for the same request
            again = await c.request(dict(req))
            assert again["38"] == resp["38"]
            assert sim.counts["0200"] == 2 and sim.answered == 2
            logged = sim.received[0]
            assert logged["35"] == req["35"] and logged["55"] == req["55"]
            assert sim.received_by("0200") == sim.received
            sim.reset()
            assert sim.received == [] and not sim.counts and sim.answered == 0
        finally:
            await c.close()
            await sim.stop()

    run(main())


def test_authorisation_and_missing_rrn_gets_one():
    async def main():
        sim, c = await _pair()
        try:
            req = make_purchase(500, stan=7, mti="0100")
            del req["37"]
            resp = await c.request(req)
            assert resp["t"] == "0110" and resp["39"] == "00"
            assert re.fullmatch(r"\d{6}000007", resp["37"])
        finally:
            await c.close()
            await sim.stop()

    run(main())


def test_approve_below_declines_with_51():
    async def main():
        sim, c = await _pair(approve_below=100_000)
        try:
            ok = await c.request(make_purchase(99_999, stan=1))
            no = await c.request(make_purchase(100_000, stan=2))
            assert ok["39"] == "00" and "38" in ok
            assert no["39"] == "51" and "38" not in no
        finally:
            await c.close()
            await sim.stop()

    run(main())


def test_rules_first_match_wins_pan_prefix_amount_mti():
    rules = [
        Rule(rc="05", pan_prefix="5"),
        Rule(rc="61", amount_min=500, amount_max=600),
        Rule(rc="57", mti="0100", pan_prefix=("47", "48")),
    ]

    async def main():
        sim, c = await _pair(rules=rules)
        try:
            mc = "5413330089600010"
            assert (await c.request(make_purchase(550, pan=mc, stan=1)))["39"] == "05"
            assert (await c.request(make_purchase(550, stan=2)))["39"] == "61"
            assert (await c.request(make_purchase(601, stan=3)))["39"] == "00"
            assert (await c.request(make_purchase(10, stan=4, mti="0100")))["39"] == "57"
            # PAN taken from track 2 when DE2 is absent
            assert (await c.request(make_purchase(10, pan=mc, stan=5, include_pan=False)))["39"] == "05"
        finally:
            await c.close()
            await sim.stop()

    run(main())
    assert Rule.parse("05, pan_prefix=4000,amount_min=10") == Rule(rc="05", pan_prefix="4000", amount_min=10)
    with pytest.raises(ValueError):
        Rule.parse("05,colour=red")


def test_network_management_and_forced_code():
    async def main():
        sim, c = await _pair(fault=Fault(respond_rc="96"))
        try:
            for code in ("001", "301", "002"):
                resp = await c.request(make_echo(c.next_stan(), code=code))
                assert resp["t"] == "0810" and resp["39"] == "00" and resp["70"] == code
            assert (await c.request(make_echo(c.next_stan(), code="999")))["39"] == "12"
            # respond_rc forces financial answers, not network management
            assert (await c.request(make_purchase(1, stan=c.next_stan())))["39"] == "96"
            assert sim.counts["0800"] == 4
        finally:
            await c.close()
            await sim.stop()

    run(main())


def test_reversals_advices_and_unknown_mti():
    async def main():
        sim, c = await _pair(approve_below=1)  # decline every purchase; reversals still 00
        try:
            orig = make_purchase(100, stan=10)
            rev = make_reversal(orig, stan=11)
            assert "35" not in rev and rev["90"].startswith("0200000010")
            r = await c.request(rev)
            assert (r["t"], r["39"], r["90"]) == ("0410", "00", rev["90"])
            rev["t"] = "0401"
            assert (await c.request(rev))["t"] == "0410"
            rev["t"] = "0420"
            assert (await c.request(rev))["t"] == "0430"
            rev["t"] = "0421"
            assert (await c.request(rev))["t"] == "0430"
            odd = make_purchase(100, stan=12)
            odd["t"] = "0600"
            r = await c.request(odd)
            assert (r["t"], r["39"]) == ("0610", "12") and "38" not in r
            # a response sent to the host is logged but never answered
            stray = dict(make_purchase(100, stan=13), t="0210")
            with pytest.raises(asyncio.TimeoutError):
                await c.request(stray, timeout=0.2)
            assert sim.counts["0210"] == 1
        finally:
            await c.close()
            await sim.stop()

    run(main())
    assert [response_mti(m) for m in ("0100", "0200", "0401", "0421", "1804", "0210", "x")] == [
        "0110", "0210", "0410", "0430", "1814", None, None]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_dialect_round_trip(dialect):
    async def main():
        sim = await AcquirerSimulator(dialect=dialect, approve_below=5000, tpdu=dialect == "iso87binary").start()
        c = await TerminalClient("127.0.0.1", sim.port, dialect=dialect,
                                 tpdu=dialect == "iso87binary").connect()
        try:
            req = make_purchase(1000, stan=1, dialect=dialect, icc=True)
            if dialect == "iso87binary":
                assert "D" in req["35"] and "=" not in req["35"]
            ok = await c.request(req)
            no = await c.request(make_purchase(5000, stan=2, dialect=dialect))
            echo = await c.request(make_echo(3, dialect=dialect))
            if dialect == "iso93ascii":
                assert (ok["t"], ok["39"], no["39"], echo["t"], echo["39"]) == ("1210", "000", "116", "1814", "800")
            else:
                assert (ok["t"], ok["39"], no["39"], echo["t"], echo["39"]) == ("0210", "00", "51", "0810", "00")
            assert sim.received[0]["35"] == req["35"]
        finally:
            await c.close()
            await sim.stop()

    run(main())


# ------------------------------------------------------------------ throughput and matching


def test_pipelining_500_over_5_connections_out_of_order():
    async def main():
        lat = LatencyModel("uniform", low_ms=0, high_ms=5, seed=7)
        sim = await AcquirerSimulator(latency=lat).start()
        stans = StanCounter()
        clients = [await TerminalClient("127.0.0.1", sim.port, stan_counter=stans).connect() for _ in range(5)]
        try:
            async def one(c, i):
                req = make_purchase(1000 + i, stan=stans.next())
                resp = await c.request(req, timeout=10)
                assert (resp["11"], resp["4"]) == (req["11"], req["4"])
                return resp

            resps = await asyncio.gather(*(one(clients[i % 5], i) for i in range(500)))
            assert len(resps) == 500 and all(r["39"] == "00" for r in resps)
            assert sim.counts["0200"] == 500 and sim.connections == 5
            assert all(c.unmatched == 0 and c.in_flight == 0 for c in clients)
        finally:
            for c in clients:
                await c.close()
            await sim.stop()

    run(main())


@pytest.mark.parametrize("kind", ["fixed", "uniform", "exponential", "lognormal"])
def test_latency_models_answer(kind):
    model = LatencyModel(kind, 2.0, p99_ms=6.0 if kind == "lognormal" else None, max_ms=20, seed=1)
    samples = [model.sample_ms() for _ in range(2000)]
    assert all(0 <= s <= 20 for s in samples)
    assert 1.0 < sum(samples) / len(samples) < 3.0
    assert [LatencyModel(kind, 2.0, seed=5).sample_ms() for _ in range(3)] == [
        LatencyModel(kind, 2.0, seed=5).sample_ms() for _ in range(3)]
    assert LatencyModel().is_zero and not model.is_zero

    async def main():
        sim, c = await _pair(latency=model)
        try:
            resps = await asyncio.gather(*(c.request(make_purchase(1, stan=i + 1)) for i in range(20)))
            assert all(r["39"] == "00" for r in resps)
        finally:
            await c.close()
            await sim.stop()

    run(main())
    with pytest.raises(ValueError):
        LatencyModel("gaussian", 1)


def test_run_terminals_summary_adds_up():
    async def main():
        sim = await AcquirerSimulator(approve_below=1500, latency_ms=1).start()
        try:
            amounts = [1000, 2000]
            s = await run_terminals("127.0.0.1", sim.port, count=300, connections=3, concurrency_per_conn=10,
                                    make_doc=lambda i, stan: make_purchase(amounts[i % 2], stan=stan))
            assert (s.requested, s.sent, s.answered, s.timeouts, s.errors, s.not_sent) == (300, 300, 300, 0, 0, 0)
            assert s.by_response_code == {"00": 150, "51": 150}
            assert len(s.latencies_ms) == 300 and s.ok
            assert 0 < s.p50 <= s.p90 <= s.p99 <= s.max and s.mean > 0 and s.tps > 0
            assert sim.counts["0200"] == 300
            assert "answered 300" in s.format() and s.as_dict()["by_response_code"] == {"00": 150, "51": 150}

            sim.fault = Fault(drop_responses=True)
            s = await run_terminals("127.0.0.1", sim.port, count=20, connections=2, concurrency_per_conn=10,
                                    timeout=0.3)
            assert (s.sent, s.answered, s.timeouts, s.errors) == (20, 0, 20, 0) and not s.ok

            # connections closed by the host mid-run: in-flight requests are errors
            sim.fault = Fault(close_after=5)
            s = await run_terminals("127.0.0.1", sim.port, count=50, connections=2, concurrency_per_conn=3,
                                    timeout=5)
            assert s.errors >= 2 and s.answered <= 8 and s.timeouts == 0
            assert s.sent == s.answered + s.timeouts + s.errors
            assert s.requested == s.sent + s.not_sent and s.not_sent > 0

            # nothing listening: every connection fails, nothing is sent
            port = sim.port
            await sim.stop()
            s = await run_terminals("127.0.0.1", port, count=5, connections=2)
            assert (s.connect_errors, s.sent, s.not_sent) == (2, 0, 5)
        finally:
            await sim.stop()

    run(main())


# ------------------------------------------------------------------ faults


def test_drop_responses_times_out_but_echo_still_answered():
    async def main():
        sim, c = await _pair(fault=Fault(drop_responses=True))
        try:
            with pytest.raises(asyncio.TimeoutError):
                await c.request(make_purchase(1, stan=1), timeout=0.2)
            assert c.in_flight == 0
            assert (await c.request(make_echo(2), timeout=2))["39"] == "00"
            sim.fault = Fault(drop_responses=True, drop_echo=True)
            with pytest.raises(asyncio.TimeoutError):
                await c.request(make_echo(3), timeout=0.2)
            sim.fault = None  # healthy again, same connection
            assert (await c.request(make_purchase(1, stan=4), timeout=2))["39"] == "00"
            assert sim.dropped == 2 and sim.counts["0200"] == 2
        finally:
            await c.close()
            await sim.stop()

    run(main())


def test_delay_beyond_timeout_then_late_answer_is_unsolicited():
    async def main():
        sim, c = await _pair(fault=Fault(delay_ms=300))
        try:
            with pytest.raises(asyncio.TimeoutError):
                await c.request(make_purchase(1, stan=1), timeout=0.1)
            late = await c.receive_unsolicited(timeout=3)
            assert late["11"] == "000001" and c.unmatched == 1
        finally:
            await c.close()
            await sim.stop()

    run(main())


def test_close_after_closes_each_connection():
    async def main():
        sim, c = await _pair(fault=Fault(close_after=2))
        try:
            assert (await c.request(make_purchase(1, stan=1)))["39"] == "00"
            with pytest.raises(ConnectionError):
                await c.request(make_purchase(1, stan=2), timeout=5)  # received, never answered
            await c.wait_closed(timeout=2)
            assert not c.connected and sim.counts["0200"] == 2
            with pytest.raises(ConnectionError):
                await c.request(make_purchase(1, stan=3))
            # answer_before_close: the last message is answered, then the close
            sim.fault = Fault(close_after=1, answer_before_close=True)
            c2 = await TerminalClient("127.0.0.1", sim.port).connect()
            assert (await c2.request(make_purchase(1, stan=4)))["39"] == "00"
            await c2.wait_closed(timeout=2)
        finally:
            await c.close()
            await sim.stop()

    run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_refuse_and_reopen_on_same_port(loop):
    async def main():
        sim, c = await _pair()
        port = sim.port
        try:
            sim.fault = Fault(refuse=True)
            assert not sim.listening
            with pytest.raises(OSError):
                await TerminalClient("127.0.0.1", port).connect(timeout=2)
            # established connections keep working
            assert (await c.request(make_purchase(1, stan=1)))["39"] == "00"
            sim.fault = Fault(refuse=False)  # listening again at once
            c2 = await TerminalClient("127.0.0.1", port).connect(timeout=2)
            assert sim.port == port and sim.listening
            assert (await c2.request(make_purchase(1, stan=2)))["39"] == "00"
            await c2.close()
            await sim.set_fault(Fault(refuse=True))
            await sim.set_fault(Fault())
            c3 = await TerminalClient("127.0.0.1", port).connect(timeout=2)
            assert (await c3.request(make_echo(3)))["39"] == "00"
            await c3.close()
        finally:
            await c.close()
            await sim.stop()

    run(main(), loop)


def test_reopen_waits_for_a_port_still_held_then_listens():
    """Reopening finds the port held for a moment (a client socket that drew
    it as its own source port, until it lets go): the simulator keeps trying
    to bind instead of failing the fault assignment, and listens once free."""
    import socket

    async def main():
        sim, c = await _pair()
        port = sim.port
        try:
            await c.close()
            sim.fault = Fault(refuse=True)
            holder = socket.socket()
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("127.0.0.1", port))
            holder.listen()
            sim.fault = Fault()  # no OSError: the bind is retried
            await asyncio.sleep(0.3)
            holder.close()
            await sim.set_fault(sim.fault)
            assert sim.listening and sim.port == port
            c2 = await TerminalClient("127.0.0.1", port).connect(timeout=2)
            assert (await c2.request(make_purchase(1, stan=5)))["39"] == "00"
            await c2.close()
        finally:
            await sim.stop()

    run(main())


def test_garbage_does_not_hurt_other_clients():
    async def main():
        sim = await AcquirerSimulator().start()
        good = await TerminalClient("127.0.0.1", sim.port).connect()
        bad = await TerminalClient("127.0.0.1", sim.port).connect()
        try:
            # well-framed garbage: counted and dropped, connection kept
            await bad.send_frame(b"\x00\xff garbage \x01\x02")
            await bad.send_frame(b"0200")  # bitmap missing
            await asyncio.sleep(0.05)
            assert sim.undecodable == 2 == sim.unmatched
            assert (await bad.request(make_purchase(1, stan=1)))["39"] == "00"
            # a length header beyond max_frame desynchronises: connection closed
            await bad.send_raw(b"\xff\xff" + b"x" * 100)
            await bad.wait_closed(timeout=2)
            assert sim.frame_errors == 1
            # a raw socket dribbling nonsense and vanishing
            r, w = await asyncio.open_connection("127.0.0.1", sim.port)
            w.write(b"\x00")
            await w.drain()
            w.close()
            assert (await good.request(make_purchase(1, stan=2)))["39"] == "00"
            assert sim.active_connections >= 1
        finally:
            await good.close()
            await bad.close()
            await sim.stop()

    run(main())


def test_tls_with_dev_pki(tmp_path):
    async def main():
        sctx = dev_server_context(tmp_path, require_client_cert=True)
        async with AcquirerSimulator(ssl=sctx, approve_below=10_000) as sim:
            cctx = dev_client_context(tmp_path)
            async with TerminalClient("127.0.0.1", sim.port, ssl=cctx) as c:
                assert (await c.request(make_purchase(1, stan=1)))["39"] == "00"
                assert (await c.request(make_purchase(10_000, stan=2)))["39"] == "51"
            s = await run_terminals("127.0.0.1", sim.port, count=40, connections=2, concurrency_per_conn=5,
                                    ssl=cctx)
            assert s.answered == 40
            # no client certificate: the handshake is refused
            from switch.certs import client_context, ensure_dev_pki

            naked = client_context(ensure_dev_pki(tmp_path).ca_cert)
            with pytest.raises((OSError, ConnectionError, asyncio.TimeoutError)):
                c = await TerminalClient("127.0.0.1", sim.port, ssl=naked).connect(timeout=2)
                await c.request(make_echo(9), timeout=2)

    run(main())


def test_max_log_bounds_memory():
    async def main():
        sim, c = await _pair(max_log=40)
        try:
            await asyncio.gather(*(c.request(make_purchase(1, stan=i + 1)) for i in range(200)))
            assert 40 <= len(sim.received) <= 45
            assert sim.received[-1]["11"] == "000200"
            assert sim.counts["0200"] == 200
        finally:
            await c.close()
            await sim.stop()

    run(main())


def test_make_purchase_fields():
    doc = make_purchase(1234, stan=5)
    assert set(doc) == {"t", "2", "3", "4", "7", "11", "12", "13", "14", "18", "22", "25", "35", "37",
                        "41", "42", "43", "49"}
    assert doc["2"] == TEST_PAN and doc["4"] == "000000001234" and doc["11"] == "000005"
    assert doc["35"].startswith(TEST_PAN + "=") and len(doc["43"]) == 40
    for d in DIALECTS:
        spec = iso8583.load_dialect(d)
        req = make_purchase(1, stan=999999, dialect=d, icc=True, pin_block="00112233445566FF")
        raw, _ = iso8583.encode(dict(req), spec)
        back, _ = iso8583.decode(raw, spec)
        assert {k: v for k, v in back.items() if k not in ("p", "1")} == req
    with pytest.raises(ValueError):
        make_purchase(-1, stan=1)
    s = StanCounter(999_999)
    assert [s.next(), s.next()] == ["999999", "000001"]


# ------------------------------------------------------------------ CLI


def test_cli_entry_points(tmp_path, capsys):
    async def main():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="cmd")
        add_acquirer_parser(sub)
        add_terminal_parser(sub)
        a = parser.parse_args(["acquirer", "--port", "0", "--latency-ms", "0", "--approve-below", "1500",
                               "--rule", "05,pan_prefix=5", "--state-dir", str(tmp_path)])
        task = asyncio.create_task(run_acquirer_cli(a))
        for _ in range(200):
            await asyncio.sleep(0.01)
            out = capsys.readouterr().out
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", out)
            if m:
                break
        port = m.group(1)
        t = parser.parse_args(["terminal", "--port", port, "--count", "30", "--connections", "3",
                               "--no-tls", "--amount", "2000"])
        assert await run_terminal_cli(t) == 0
        out = capsys.readouterr().out
        assert "answered 30" in out and "51=30" in out and "p99" in out
        t = parser.parse_args(["terminal", "--port", port, "--count", "2", "--no-tls", "--json"])
        assert await run_terminal_cli(t) == 0
        task.cancel()
        assert await task == 0

    run(main())
