"""An acquirer whose dialect has a message header ("h", as BASE24's
"ISO025000070") gets the link's own configured header on everything the
link sends, never a terminal's; the host's header on what it sends is
dropped before matching. Real simulators on 127.0.0.1, a real switch, a
real SQLite journal; the dialect files with a header are made from the
shipped ones.
"""
import asyncio
import json
import textwrap
from pathlib import Path

import pytest

from core import iso8583
from switch.acquirer import AcquirerLink
from switch.config import AcquirerConfig, ConfigError, load_config
from switch.sim.acquirer import AcquirerSimulator, Fault
from switch.sim.terminal import make_purchase
from tests.switch_harness import run, running_switch, terminal

pytestmark = pytest.mark.timeout(120)

CODECS = Path(__file__).resolve().parent.parent / "codecs"
LINK_HEADER = "ISO025000070"  # the switch's, configured on the acquirer
HOST_HEADER = "ISO025000077"  # what the host puts on its answers and its own messages
TERMINAL_HEADER = "ISO026000050"  # a terminal's, on its own connection only


def header_dialect(tmp_path: Path, base: str = "default", *, name: str | None = None, **h) -> str:
    """A copy of shipped dialect ``base`` with a message header (12 bytes unless ``h`` says)."""
    spec = json.loads((CODECS / f"{base}.json").read_text())
    spec["h"] = {**spec["h"], "max_len": 12, **h}
    spec["_meta"]["name"] = name or f"{base}_header"
    path = tmp_path / f"{spec['_meta']['name']}.json"
    path.write_text(json.dumps(spec))
    return str(path)


async def until(cond, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# -- configuration ------------------------------------------------------------

def load_acquirer(tmp_path: Path, dialect: str, header: str | None):
    text = textwrap.dedent(f"""
        [switch]
        state_dir = "{tmp_path / 'state'}"
        [[acquirers]]
        name = "acq-h"
        host = "127.0.0.1"
        port = 7001
        dialect = "{dialect}"
    """)
    if header is not None:
        text += f"message_header = {json.dumps(header)}\n"
    path = tmp_path / "isoswitch.toml"
    path.write_text(text)
    return load_config(path).acquirers[0]


def config_problem(tmp_path: Path, dialect: str, header: str | None) -> str:
    with pytest.raises(ConfigError) as e:
        load_acquirer(tmp_path, dialect, header)
    lines = [line for line in str(e.value).splitlines() if "message_header" in line]
    assert len(lines) == 1, str(e.value)
    return lines[0]


def test_config_takes_a_header_that_fits_the_dialect(tmp_path):
    assert load_acquirer(tmp_path, header_dialect(tmp_path), LINK_HEADER).message_header == LINK_HEADER
    ebcdic = header_dialect(tmp_path, "ebcdic")
    assert load_acquirer(tmp_path, ebcdic, LINK_HEADER).message_header == LINK_HEADER
    binary = header_dialect(tmp_path, "default", name="binary_header", data_enc="b", max_len=4, type="b")
    assert load_acquirer(tmp_path, binary, "0A0B0C0D").message_header == "0A0B0C0D"
    # a dialect without a header: none given, none kept
    assert load_acquirer(tmp_path, "default", None).message_header == ""
    assert load_acquirer(tmp_path, "default", "").message_header == ""


def test_config_requires_a_header_for_a_header_dialect(tmp_path):
    path = header_dialect(tmp_path)
    for header in (None, ""):
        problem = config_problem(tmp_path, path, header)
        assert problem.startswith("acquirers[0].message_header: required: dialect ")
        assert "exactly 12 bytes, encoding ascii" in problem


def test_config_refuses_a_header_the_dialect_cannot_carry(tmp_path):
    text = header_dialect(tmp_path)
    problem = config_problem(tmp_path, text, "ISO02500007")
    assert "does not fit" in problem and "11 bytes, expecting 12" in problem
    assert "does not fit" in config_problem(tmp_path, text, "ISO0250000700")
    assert "does not fit" in config_problem(tmp_path, text, "ISO02500007\u00e9")  # not ASCII
    assert "does not fit" in config_problem(tmp_path, header_dialect(tmp_path, "ebcdic"), "ISO02500007\u20ac")
    binary = header_dialect(tmp_path, "default", name="binary_header", data_enc="b", max_len=4, type="b")
    assert "does not fit" in config_problem(tmp_path, binary, "0A0B0C")
    assert "does not fit" in config_problem(tmp_path, binary, "ZZ0B0C0D")
    numeric = header_dialect(tmp_path, "default", name="numeric_header", max_len=6, type="n")
    assert "does not fit" in config_problem(tmp_path, numeric, "12345X")


def test_config_refuses_a_header_for_a_dialect_without_one(tmp_path):
    for dialect in ("default", "iso93ascii"):
        problem = config_problem(tmp_path, dialect, LINK_HEADER)
        assert problem == (f'acquirers[0].message_header: dialect "{dialect}" has no message header '
                           '(its "h" max_len is 0); remove message_header')


def test_a_link_made_in_code_refuses_a_header_the_dialect_disagrees_with(tmp_path):
    path = header_dialect(tmp_path)
    with pytest.raises(ValueError, match="set message_header"):
        AcquirerLink(AcquirerConfig(name="x", host="127.0.0.1", port=1, dialect=path))
    with pytest.raises(ValueError, match="does not fit"):
        AcquirerLink(AcquirerConfig(name="x", host="127.0.0.1", port=1, dialect=path, message_header="ISO"))
    with pytest.raises(ValueError, match="has no message header"):
        AcquirerLink(AcquirerConfig(name="x", host="127.0.0.1", port=1, message_header=LINK_HEADER))
    link = AcquirerLink(AcquirerConfig(name="x", host="127.0.0.1", port=1, dialect=path,
                                       message_header=LINK_HEADER, tpdu=True))
    assert link.header == LINK_HEADER.encode() and link.prefix == b"\x60\x00\x00\x00\x00" + link.header
    # what the flow compares with a listener's dialect: the layout without the envelope
    assert link.spec["h"]["max_len"] == 0 and link.wire_spec["h"]["max_len"] == 12


# -- end to end ----------------------------------------------------------------

DIALECTS = {
    "default": ("0800", "0200", ("0400", "0401"), "00", "91"),
    "iso93ascii": ("1804", "1200", ("1420", "1421"), "000", "907"),
}


@pytest.mark.parametrize("base", sorted(DIALECTS))
def test_purchase_and_reversal_through_a_header_acquirer(tmp_path, base):
    """A terminal with a header of its own (TERMINAL_HEADER) buys through an
    acquirer whose dialect has one: the sign-on, the request and the
    reversal of a timed-out request all reach the host with the link's
    header, the host's answers (under its own header) are matched, and the
    terminal gets its own header back, never the host's. Old code sent the
    terminal's header to the acquirer, and with a headerless terminal could
    not encode anything: no sign-on, the link never came up."""
    network, purchase, reversals, approved, timeout_rc = DIALECTS[base]
    acq = header_dialect(tmp_path, base)
    term = header_dialect(tmp_path, base, name=f"{base}_terminal")

    async def go():
        async with running_switch(
                tmp_path, {"acq-a": {"dialect": acq, "message_header": HOST_HEADER}},
                acquirer_opts={"acq-a": {"message_header": LINK_HEADER, "timeout": 0.4}},
                listener={"dialect": term, "terminal_timeout": 3.0}) as sw:
            a, link = sw.sims["acq-a"], sw.links["acq-a"]
            assert link.up
            signon = a.received_by(network)
            assert signon and all(d["h"] == LINK_HEADER for d in signon)
            late_docs = []
            on_late = link.on_late
            link.on_late = lambda name, doc: (late_docs.append(doc), on_late(name, doc))
            async with terminal(sw, tmp_path) as t:
                req = make_purchase(1000, stan=81, dialect=base)
                req["h"] = TERMINAL_HEADER
                r = await t.request(req)
                assert (r["39"], r["11"], r["h"]) == (approved, "000081", TERMINAL_HEADER)
                (sent,) = a.received_by(purchase)
                assert sent["h"] == LINK_HEADER and sent["4"] == "000000001000"

                # a timeout: 91 (907) for the terminal, reversed at the acquirer
                a.fault = Fault(delay_ms=800)
                req = make_purchase(2000, stan=82, dialect=base)
                req["h"] = TERMINAL_HEADER
                r = await t.request(req, timeout=5)
                assert (r["39"], r["h"]) == (timeout_rc, TERMINAL_HEADER)
                assert await until(lambda: link.counters["late"] >= 1)  # the late answer, matched as late
                a.fault = Fault()
                assert await sw.reversals.wait_empty(15)
                revs = [d for d in a.received if d["t"] in reversals]
                assert revs and all(d["h"] == LINK_HEADER for d in revs)
                with pytest.raises(asyncio.TimeoutError):
                    await t.receive_unsolicited(timeout=0.3)
            # the host's header is never part of what the link hands on
            assert late_docs and all("h" not in d for d in late_docs)
            reply = await link.request(make_purchase(3000, stan=83, dialect=base), 2.0)
            assert reply.doc["39"] == approved and "h" not in reply.doc
            assert a.received[-1]["h"] == LINK_HEADER
            assert all(d["h"] == LINK_HEADER for d in a.received)
            assert a.undecodable == 0 and a.encode_errors == 0
            assert (link.counters["undecodable"], link.counters["unmatched"],
                    link.counters["encode_errors"]) == (0, 0, 0)
            assert sw.flow.counters["answer_not_encodable"] == 0

    run(go())


def test_a_headerless_terminal_buys_through_a_header_acquirer(tmp_path):
    """The common case: terminals without a header, a BASE24-style host with
    one. Old code could encode nothing for the host (its header is required
    and no document had one): no sign-on, so the link never came up and
    every purchase was declined."""
    acq = header_dialect(tmp_path)

    async def go():
        async with running_switch(
                tmp_path, {"acq-a": {"dialect": acq}},
                acquirer_opts={"acq-a": {"message_header": LINK_HEADER}}) as sw:
            a = sw.sims["acq-a"]
            async with terminal(sw, tmp_path) as t:
                r = await t.request(make_purchase(1000, stan=5))
                assert (r["39"], r["11"]) == ("00", "000005") and "h" not in r
            assert a.received_by("0200")[0]["h"] == LINK_HEADER  # the simulator echoed it back
            assert sw.links["acq-a"].counters["undecodable"] == 0

    run(go())


def test_echo_sign_on_and_host_messages_carry_the_link_header(tmp_path):
    """The link's echo tests and sign-on, and its answers to the host's own
    echo, sign-off and sign-on, all carry the link's header; the host's
    messages (under its header) are understood."""
    acq = header_dialect(tmp_path)

    async def go():
        async with running_switch(
                tmp_path, {"acq-a": {"dialect": acq, "message_header": HOST_HEADER}},
                acquirer_opts={"acq-a": {"message_header": LINK_HEADER, "echo_interval": 0.1}}) as sw:
            a, link = sw.sims["acq-a"], sw.links["acq-a"]
            assert await until(lambda: len([d for d in a.received_by("0800") if d.get("70") == "301"]) >= 2)
            net = a.received_by("0800")
            assert {d["70"] for d in net} == {"001", "301"}
            assert all(d["h"] == LINK_HEADER for d in net)
            assert link.counters["echo_misses"] == 0 and link.up
            # the host's own network management, answered on the connection
            (echo,) = await a.send_network("301")
            assert (echo["t"], echo["39"], echo["70"], echo["h"]) == ("0810", "00", "301", LINK_HEADER)
            (off,) = await a.send_network("002")
            assert (off["39"], off["h"]) == ("00", LINK_HEADER)
            assert await until(lambda: not link.up)
            (on,) = await a.send_network("001")
            assert (on["39"], on["h"]) == ("00", LINK_HEADER)
            assert await until(lambda: link.up)
            (other,) = await a.send_to_switch({"t": "0100", "7": "0101000000", "3": "000000"})
            assert (other["t"], other["39"], other["h"]) == ("0110", "12", LINK_HEADER)
            assert link.counters["host_answers"] == 4 and link.counters["undecodable"] == 0
            assert link.counters["echo_misses"] == 0

    run(go())


def test_a_host_message_without_its_header_is_undecodable(tmp_path):
    """What the host sends must carry the dialect's header: a frame too
    short for it, or with bytes the header's encoding cannot hold, is
    counted undecodable and dropped; the link stays up."""
    acq = header_dialect(tmp_path)

    async def go():
        async with running_switch(
                tmp_path, {"acq-a": {"dialect": acq}},
                acquirer_opts={"acq-a": {"message_header": LINK_HEADER}}) as sw:
            a, link = sw.sims["acq-a"], sw.links["acq-a"]
            from core.framing import build_frame
            (conn,) = a._conns
            headerless = iso8583.encode({"t": "0800", "11": "900001", "70": "301"}, link.spec)[0]
            conn.transport.write(build_frame(headerless[:8], "binary2", 8192))
            conn.transport.write(build_frame(b"\xff" * 12 + headerless, "binary2", 8192))
            assert await until(lambda: link.counters["undecodable"] == 2)
            assert link.up and link.counters["host_messages"] == 0
            r = await link.request(make_purchase(1000, stan=7), 2.0)
            assert r.doc["39"] == "00"

    run(go())


def test_the_simulator_answers_with_its_configured_or_the_requests_header(tmp_path):
    """The simulator itself: a header dialect's answers carry message_header,
    else the request's own header."""
    acq = header_dialect(tmp_path)
    spec = iso8583.load_dialect(acq)

    async def go():
        for header, expect in ((None, "ISO025000071"), (HOST_HEADER, HOST_HEADER)):
            async with AcquirerSimulator(dialect=acq, message_header=header) as sim:
                from core.framing import FrameDecoder, build_frame
                reader, writer = await asyncio.open_connection(*sim.address)
                doc = {"h": "ISO025000071", "t": "0800", "7": "0101000000", "11": "000001", "70": "301"}
                writer.write(build_frame(iso8583.encode(doc, spec)[0], "binary2", 8192))
                dec = FrameDecoder("binary2", 8192, False)
                frames = []
                while not frames:
                    frames = dec.feed(await asyncio.wait_for(reader.read(4096), 5))
                answer, _ = iso8583.decode(frames[0], spec)
                assert (answer["h"], answer["t"], answer["39"]) == (expect, "0810", "00")
                writer.close()

    run(go())
