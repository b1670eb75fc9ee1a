"""What the switch does with a terminal's own reversals, network management and
requests of the other ISO 8583 version, seen from both ends: the terminal's
answer, and what the acquirer simulator received.

Each case was found by an independent terminal-side tester (pyiso8583 client):
a terminal could reverse another terminal's transaction by naming its link
trace number, a 0400 after a 91 reversed the original twice, a 1xxx request
on a 1987 listener was never answered, and a 0800 with an unknown or missing
DE70 was approved.
"""
import asyncio

import pytest

from switch.sim.acquirer import Fault
from switch.sim.terminal import make_purchase
from tests.switch_harness import run, running_switch, terminal

pytestmark = pytest.mark.timeout(120)


def financial(sim):
    return [d for d in sim.received if d.get("t") in ("0100", "0200")]


def reversals(sim):
    return [d for d in sim.received if d.get("t") in ("0400", "0401", "1420", "1421")]


def reversal_of(original: dict, stan: int, *, de90: bool = True) -> dict:
    """The terminal's own 0400 for ``original``: a new STAN, DE90 naming the original."""
    rev = {k: v for k, v in original.items() if k in ("2", "3", "4", "12", "13", "14", "22", "37", "41", "42", "49")}
    rev["t"] = "0400"
    rev["11"] = f"{stan:06d}"
    rev["7"] = original.get("7", "1204000000")
    if de90:
        rev["90"] = "0200" + original["11"] + original.get("7", "0000000000") + "0" * 22
    return rev


async def _settled(sw, sim, n: int) -> None:
    """Until the queue is empty and ``sim`` holds ``n`` reversals (or 5 s)."""
    assert await sw.reversals.wait_empty(10)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while len(reversals(sim)) < n and loop.time() < deadline:
        await asyncio.sleep(0.02)


def test_a_terminal_reversal_goes_to_the_acquirer_under_the_link_trace_number(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            a = sw.sims["acq-a"]
            async with terminal(sw, tmp_path) as t:
                sale = make_purchase(1500, stan=11)
                assert (await t.request(sale))["39"] == "00"
                r = await t.request(reversal_of(sale, 12))
            assert r["t"] == "0410" and r["39"] == "00" and r["11"] == "000012"
            await _settled(sw, a, 1)
            sent = financial(a)[0]
            (rev,) = reversals(a)
            # the acquirer's own names for the original: its link STAN and DE7
            assert rev["90"][:20] == "0200" + sent["11"] + sent["7"]
            assert rev["4"] == "000000001500"

    run(go())


def test_a_terminal_cannot_reverse_a_request_it_did_not_send(tmp_path):
    """TERM0002 names TERM0001's transaction by the trace number and DE7 the
    acquirer saw: nothing is sent, the answer is 25 (original not found)."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            a = sw.sims["acq-a"]
            async with terminal(sw, tmp_path, "TERM0001") as t1:
                assert (await t1.request(make_purchase(2500, stan=21, terminal_id="TERM0001")))["39"] == "00"
            at_acquirer = financial(a)[0]
            forged = make_purchase(2500, stan=22, terminal_id="TERM0002")
            forged = reversal_of(forged, 22)
            forged["90"] = "0200" + at_acquirer["11"] + at_acquirer["7"] + "0" * 22
            async with terminal(sw, tmp_path, "TERM0002") as t2:
                r = await t2.request(forged)
                r_no90 = await t2.request(reversal_of(make_purchase(1, stan=23, terminal_id="TERM0002"), 23,
                                                      de90=False))
            assert r["t"] == "0410" and r["39"] == "25" and r["11"] == "000022"
            assert r_no90["39"] == "25"
            await asyncio.sleep(0.3)
            assert reversals(a) == [], "an unknown original must never be reversed at the acquirer"
            assert sw.flow.counters["reversal_original_unknown"] == 2

    run(go())


def test_a_terminal_reversal_after_a_91_does_not_reverse_the_original_twice(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, acquirer_opts={"acq-a": {"timeout": 0.4}},
                                  listener={"terminal_timeout": 2.0}) as sw:
            a = sw.sims["acq-a"]
            a.fault = Fault(drop_responses=True)
            async with terminal(sw, tmp_path) as t:
                sale = make_purchase(3500, stan=31)
                assert (await t.request(sale, timeout=5))["39"] == "91"
                a.fault = Fault()
                r = await t.request(reversal_of(sale, 32))
            assert r["39"] == "00"
            await _settled(sw, a, 1)
            await asyncio.sleep(0.3)
            # one queue entry (its 0400 may have been repeated as 0401 while the
            # acquirer still dropped answers), all naming the one original
            assert sw.reversals.counters["queued"] == 1, "the switch's own reversal already covers it"
            assert len({d["90"] for d in reversals(a)}) == 1
            assert sw.flow.counters["reversal_already_queued"] == 1

    run(go())


def test_a_terminal_reversal_of_a_request_never_forwarded_sends_nothing(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            a = sw.sims["acq-a"]
            sw.links["acq-a"].draining = True  # drained: the sale is answered 91 unforwarded
            async with terminal(sw, tmp_path) as t:
                sale = make_purchase(4500, stan=41)
                assert (await t.request(sale))["39"] == "91"
                r = await t.request(reversal_of(sale, 42))
            assert r["t"] == "0410" and r["39"] == "00"
            assert financial(a) == [] and reversals(a) == []
            assert sw.reversals.counters["queued"] == 0

    run(go())


def test_a_request_without_de7_gets_the_switchs_own_and_its_reversal_names_it(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            a = sw.sims["acq-a"]
            async with terminal(sw, tmp_path) as t:
                sale = make_purchase(5500, stan=51)
                del sale["7"]
                assert (await t.request(sale))["39"] == "00"
                rev = reversal_of(sale, 52, de90=False) | {"11": "000051"}
                del rev["7"]  # a terminal without DE7 sends none with its reversal either
                r = await t.request(rev)
            assert r["39"] == "00"
            sent = financial(a)[0]
            assert len(sent["7"]) == 10 and sent["7"].isdigit()
            await _settled(sw, a, 1)
            (rev,) = reversals(a)
            assert rev["90"][:20] == "0200" + sent["11"] + sent["7"]

    run(go())


@pytest.mark.parametrize("de70,rc", [("301", "00"), ("001", "00"), ("999", "12"), (None, "30")])
def test_terminal_network_management_codes(tmp_path, de70, rc):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            req = {"t": "0800", "7": "1204101010", "11": "000061", "41": "TERM0001"}
            if de70 is not None:
                req["70"] = de70
            async with terminal(sw, tmp_path) as t:
                r = await t.request(req)
            assert r["t"] == "0810" and r["39"] == rc and r["11"] == "000061"
            if de70 is not None:
                assert r["70"] == de70

    run(go())


def test_a_1993_request_on_a_1987_listener_is_a_format_error_never_forwarded(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            a = sw.sims["acq-a"]
            sale = make_purchase(6500, stan=71)
            async with terminal(sw, tmp_path) as t:
                r = await t.request(dict(sale, t="1200"))
                echo = await t.request({"t": "1804", "11": "000072", "24": "831", "41": "TERM0001"})
                rev = await t.request(dict(reversal_of(sale, 73), t="1420"))
            # answered in the listener's own (1987) codes: a 3-digit action code does not fit
            assert (r["t"], r["39"], r["11"]) == ("1210", "30", "000071")
            assert (echo["t"], echo["39"]) == ("1814", "30")
            assert (rev["t"], rev["39"]) == ("1430", "30")
            await asyncio.sleep(0.2)
            assert a.received == [] or all(d["t"].startswith("08") for d in a.received)
            assert sw.flow.counters["version_mismatch"] == 3

    run(go())


def test_a_1987_request_is_never_sent_to_a_1993_acquirer(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"dialect": "iso93ascii"}}) as sw:
            a = sw.sims["acq-a"]
            async with terminal(sw, tmp_path) as t:
                r = await t.request(make_purchase(7500, stan=81))
            assert r["39"] == "92" and r["11"] == "000081"
            assert financial(a) == [] and not [d for d in a.received if d["t"].startswith("12")]
            assert sw.flow.counters["skipped_version"] == 1

    run(go())


def test_a_1993_terminal_reversal_finds_its_original_without_a_transmission_time(tmp_path):
    """DE56 names the original's MTI, STAN and local time, not its DE7: the
    original is found by the terminal's trace number."""
    from switch.sim.terminal import make_reversal

    async def go():
        async with running_switch(tmp_path, {"acq-a": {"dialect": "iso93ascii"}},
                                  listener={"dialect": "iso93ascii"}) as sw:
            a = sw.sims["acq-a"]
            async with terminal(sw, tmp_path) as t:
                sale = make_purchase(8500, stan=91, dialect="iso93ascii")
                assert (await t.request(sale))["39"] == "000"
                await asyncio.sleep(1.1)  # the reversal's own DE7 is another second's
                rev_req = make_reversal(sale, stan=92, dialect="iso93ascii")
                rev_req["12"] = "991231235959"  # the reversal's own local time: DE56 names the sale's
                r = await t.request(rev_req)
            # ISO 8583:1993 accepts a reversal with action code 400 (4xx: reversal class)
            assert r["t"] == "1430" and r["39"] == "400" and r["11"] == "000092"
            await _settled(sw, a, 1)
            sent = [d for d in a.received if d["t"] == "1200"][0]
            (rev,) = reversals(a)
            # the original as the acquirer saw it: its MTI, STAN and local date and time
            assert rev["56"][:22] == "1200" + sent["11"] + sent["12"]

    run(go())


def test_switch_made_1993_answers_carry_the_action_code_of_their_class():
    """An accepted 1993 reversal is 400, network management 800, a financial
    approval 000; a security violation (63) is 122, not 909 system malfunction
    (which a terminal may simply retry)."""
    from switch.messages import switch_response

    req = {"t": "1420", "11": "000001", "41": "TERM0001"}
    assert switch_response(req, "00")["39"] == "400"
    assert switch_response(req, "25")["39"] == "480"
    assert switch_response(dict(req, t="1421"), "00") == {"t": "1430", "11": "000001", "41": "TERM0001", "39": "400"}
    assert switch_response(dict(req, t="1804"), "00")["39"] == "800"
    assert switch_response(dict(req, t="1200"), "00")["39"] == "000"
    assert switch_response(dict(req, t="1200"), "63")["39"] == "122"
    assert switch_response(dict(req, t="0400"), "00")["39"] == "00"


def test_a_1993_certificate_used_for_another_terminal_is_a_security_violation(tmp_path):
    """bind_terminal_id on a 1993 listener: DE41 not the certificate's CN is
    answered 122 (security violation), never forwarded."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"dialect": "iso93ascii"}},
                                  listener={"dialect": "iso93ascii", "bind_terminal_id": True}) as sw:
            a = sw.sims["acq-a"]
            async with terminal(sw, tmp_path, "TERM0001") as t:
                bad = await t.request(make_purchase(1000, stan=93, terminal_id="TERM0002", dialect="iso93ascii"))
            assert (bad["t"], bad["39"], bad["11"]) == ("1210", "122", "000093")
            assert not [d for d in a.received if d["t"].startswith("12")]

    run(go())


def test_an_approval_that_does_not_fit_the_terminals_dialect_is_96_and_reversed(tmp_path):
    """An acquirer dialect with a longer DE38 than the terminal's: the listener
    could only have sent a bare 96 while the approval stood at the acquirer."""
    import json
    from pathlib import Path

    wide = json.loads((Path(__file__).resolve().parent.parent / "codecs" / "default.json").read_text())
    wide["38"] = dict(wide["38"], len_type=2, max_len=8)
    wide.get("_meta", {})["name"] = "wide38"
    path = tmp_path / "wide38.json"
    path.write_text(json.dumps(wide))

    async def go():
        async with running_switch(tmp_path, {"acq-a": {"dialect": str(path)}}) as sw:
            a = sw.sims["acq-a"]
            a.approval_code = lambda req: "A1B2C3D4"  # fits the acquirer's DE38, not the terminal's
            async with terminal(sw, tmp_path) as t:
                r = await t.request(make_purchase(9500, stan=95))
            assert r["39"] == "96" and r["11"] == "000095"
            await _settled(sw, a, 1)
            sent = financial(a)[0]
            (rev,) = reversals(a)
            assert rev["90"][:10] == "0200" + sent["11"]
            assert sw.flow.counters["answer_not_encodable"] == 1
            row = (await sw.journal.by_rrn(sent["37"]))[0] if sent.get("37") else None
            if row is not None:
                assert row["response_code"] == "96"

    run(go())


def test_track_data_an_acquirer_echoes_never_reaches_the_terminal(tmp_path):
    """An acquirer that echoes track 2 and track 3 (DE35, DE36): neither goes
    back to the terminal, nor into a log-safe summary. DE36 (track 3, card
    data in every dialect) was passed through: only 35/45/52/55 were held back."""
    from switch.messages import safe_summary

    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            a = sw.sims["acq-a"]
            respond = a.respond
            a.respond = lambda req, fault=None: {**respond(req, fault), "35": req["35"],
                                                 "36": "01" + req["2"] + "=28122010000000"}
            async with terminal(sw, tmp_path) as t:
                r = await t.request(make_purchase(1000, stan=71))
            assert r["39"] == "00" and r["11"] == "000071"
            assert "35" not in r and "36" not in r

    run(go())
    assert "36" not in safe_summary({"2": "4761739001010010", "36": "014761739001010010=2812"})


def test_the_response_to_a_repeat_is_not_a_repeat():
    """ISO 8583 MTI position 4 (originator): 1, 3, 5 repeat 0, 2, 4, and the
    response names the originator, never a repeat (jPOS setResponseMTI).
    0203 was answered 0213 and 0205 as 0215."""
    from switch.messages import response_mti

    cases = {"0200": "0210", "0201": "0210", "0202": "0212", "0203": "0212", "0204": "0214",
             "0205": "0214", "0421": "0430", "1421": "1430", "0800": "0810", "1804": "1814",
             "0803": "0812", "0210": "0210"}
    assert {m: response_mti(m) for m in cases} == cases
