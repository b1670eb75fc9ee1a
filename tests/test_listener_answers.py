"""What the live listener answers (or does not) when a message cannot be
answered the normal way (DESIGN.md "Bad input", invariant 1):

- an undecodable message with no MTI/STAN a 30 could be matched against:
  the connection is closed gracefully (in-flight answers first), never left
  open and silent;
- a response the switch cannot encode in the listener's dialect: a minimal
  30/96 answer in the dialect's own format, else a graceful close, never a
  dead task and silence;
- a response MTI sent by a terminal: counted and dropped, never answered.

Each against a real switch and acquirer simulator, on the default listener
(mTLS, binary2, ``iso8583.specs.default``) or on plain TCP.
"""
import asyncio
import contextlib

import pytest

from core import framing, iso8583
from switch.metrics import Metrics
from switch.sim.terminal import dev_client_context, make_echo, make_purchase
from tests.switch_harness import run, running_switch
from tests.test_listener_bad_input import _closed_within, _until, _with_good_terminal

pytestmark = pytest.mark.timeout(120)

PLAIN = {"tls": False, "idle_timeout": 30.0}  # binary2 framing, default dialect


class Raw:
    """A terminal connection at the frame level: what arrives, and whether it closes."""

    def __init__(self, sw, tmp_path, reader, writer):
        lst = sw.listeners[0]
        self.lst, self.spec = lst, lst.spec
        self.reader, self.writer = reader, writer
        self.decoder = framing.FrameDecoder(header=lst.cfg.framing, max_frame=lst.cfg.max_frame)
        self.frames: list[bytes] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, sw, tmp_path, terminal_id="TERM0001"):
        lst = sw.listeners[0]
        ssl = dev_client_context(tmp_path / "state", terminal_id) if lst.ssl_context is not None else None
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", lst.port, ssl=ssl, server_hostname="localhost" if ssl else None)
        conn = cls(sw, tmp_path, reader, writer)
        try:
            yield conn
        finally:
            writer.transport.abort()

    def send(self, *payloads: bytes) -> None:
        """Every payload framed, all in one write (one segment: the listener sees them together)."""
        self.writer.write(b"".join(framing.build_frame(p, self.lst.cfg.framing, self.lst.cfg.max_frame)
                                   for p in payloads))

    def encode(self, doc: dict) -> bytes:
        return iso8583.encode(doc, self.spec)[0]

    async def answer(self, timeout=5.0) -> dict:
        """The next answer; AssertionError if the connection closes first."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), max(0.01, end - loop.time()))
            assert data, "connection closed before an answer arrived"
            self.frames.extend(self.decoder.feed(data))
        return iso8583.decode(self.frames.pop(0), self.spec)[0]

    async def closed_without_answer(self, timeout=5.0) -> bool:
        """True if the switch closes the connection within `timeout` with nothing (more) sent."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), max(0.01, end - loop.time()))
                if not data:
                    break
                self.frames.extend(self.decoder.feed(data))
        except asyncio.TimeoutError:
            return False
        except (ConnectionError, OSError):
            pass
        assert not self.frames, [iso8583.decode(f, self.spec)[0] for f in self.frames]
        return True


def _bad_frames(spec):
    """Frames whose MTI (0200) reads but that break before DE11, so no 30 can be matched."""
    raw, enc = iso8583.encode(make_purchase(1000, stan=77), spec)
    i = raw.index(enc["2"]["len"] + enc["2"]["data"])
    pan = enc["2"]["data"]
    return {
        "DE2 length -1": raw[:i] + b"-1" + raw[i + 2:],
        "DE2 length +9": raw[:i] + b"+9" + raw[i + 2:],
        "DE2 length ' 9'": raw[:i] + b" 9" + raw[i + 2:],
        "DE2 length 1_": raw[:i] + b"1_" + raw[i + 2:],
        "DE2 length 20 > max 19": raw[:i] + b"20" + pan + b"0000" + raw[i + 2 + len(pan):],
        "secondary bitmap bit, no secondary bitmap": raw[:4] + bytes([raw[4] | 0x80]) + raw[5:12],
        "MTI only": raw[:4],
        "half a bitmap": raw[:8],
        "0800, bitmap cut short": b"0800\x82\x20",
    }


@pytest.mark.parametrize("tls", [True, False], ids=["mtls", "plain"])
def test_unanswerable_undecodable_message_closes_the_connection(tmp_path, tls):
    """Old code: each was dropped with no answer and the connection left open."""
    async def go():
        listener = {} if tls else PLAIN
        async with running_switch(tmp_path, {"acq-a": {}}, listener=listener) as sw:
            lst = sw.listeners[0]
            bad = _bad_frames(lst.spec)

            async def attack():
                for name, frame in bad.items():
                    async with Raw.open(sw, tmp_path) as c:
                        c.send(frame)
                        assert await c.closed_without_answer(5.0), f"{name}: neither answered nor closed"
            await _with_good_terminal(sw, tmp_path, attack)
            assert lst.counters["decode_errors"] >= len(bad)
            assert lst.counters["unanswerable_closed"] == len(bad)
            assert lst.counters["answers_lost"] == 0

    run(go(), timeout=110)


def test_a_message_whose_mti_is_not_numeric_closes_the_connection(tmp_path):
    """``02X0`` decodes (the codec takes any 4 characters): it was answered
    0210, an MTI the switch made up. No answer can name it: closed."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            lst = sw.listeners[0]
            async with Raw.open(sw, tmp_path) as c:
                c.send(c.encode(make_purchase(1000, stan=78) | {"t": "02X0"}))
                assert await c.closed_without_answer(5.0)
            assert lst.counters["unanswerable_closed"] == 1
            assert not [d for d in sw.sims["acq-a"].received if not d["t"].startswith("08")]

    run(go())


def test_answerable_undecodable_message_still_gets_30(tmp_path):
    """Where DE11 precedes the bad field the 30 stays, and the connection lives."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, listener=PLAIN) as sw:
            async with Raw.open(sw, tmp_path) as c:
                raw, enc = iso8583.encode(make_purchase(1000, stan=31), c.spec)
                i = raw.index(enc["35"]["len"] + enc["35"]["data"])
                c.send(raw[:i] + b"9X" + raw[i + 2:], c.encode(make_purchase(1000, stan=32)))
                first, second = await c.answer(), await c.answer()
                assert (first["t"], first["39"], first["11"]) == ("0210", "30", "000031")
                assert "35" not in first and "52" not in first
                assert (second["39"], second["11"]) == ("00", "000032")
            assert sw.listeners[0].counters["unanswerable_closed"] == 0

    run(go())


@pytest.mark.parametrize("tls", [True, False], ids=["mtls", "plain"])
def test_graceful_close_writes_the_answers_in_flight_first(tmp_path, tls):
    """Good requests (the acquirer takes 300 ms), then an unanswerable frame,
    then a good request, in one segment: the first ones are answered, the one
    after the bad frame is not taken, and the connection then closes."""
    async def go():
        listener = {} if tls else PLAIN
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 300.0}}, listener=listener) as sw:
            lst = sw.listeners[0]
            async with Raw.open(sw, tmp_path) as c:
                good = [c.encode(make_purchase(1000, stan=s)) for s in (41, 42)]
                c.send(*good, b"0200", c.encode(make_purchase(1000, stan=43)))
                answers = [await c.answer(), await c.answer()]
                assert sorted((a["11"], a["39"]) for a in answers) == [("000041", "00"), ("000042", "00")]
                assert await c.closed_without_answer(5.0)
            assert lst.counters["unanswerable_closed"] == 1
            assert lst.counters["frames_discarded_closing"] == 1
            assert lst.counters["answers_lost"] == 0
            assert await _until(lambda: not lst.connections)

    run(go())


@pytest.mark.parametrize("tls", [True, False], ids=["mtls", "plain"])
@pytest.mark.parametrize("split", [False, True], ids=["one-segment", "header-later"])
def test_framing_error_still_answers_the_requests_in_flight(tmp_path, tls, split):
    """Good requests (the acquirer takes 300 ms), then a length header beyond
    ``max_frame``: the stream is desynchronised, but the requests already
    taken are answered before the close. Old code aborted the connection and
    the answers were lost (the acquirer had approved them)."""
    async def go():
        listener = {} if tls else PLAIN
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 300.0}}, listener=listener) as sw:
            lst = sw.listeners[0]
            async with Raw.open(sw, tmp_path) as c:
                good = [c.encode(make_purchase(1000, stan=s)) for s in (51, 52)]
                c.send(*good)
                if split:  # the requests are in flight by the time the bad header arrives
                    await c.writer.drain()
                    assert await _until(lambda: lst.in_flight == 2)
                c.writer.write(b"\xff\xff" + b"junk" * 10)
                answers = [await c.answer(), await c.answer()]
                assert sorted((a["11"], a["39"]) for a in answers) == [("000051", "00"), ("000052", "00")]
                assert await c.closed_without_answer(5.0)
            assert lst.counters["frame_errors"] == 1
            assert lst.counters["frame_error_closed"] == 1
            assert lst.counters["answers_lost"] == 0
            assert await _until(lambda: not lst.connections)
            text = (sw.metrics or Metrics(sw)).exposition().decode()
            assert f'isoswitch_decode_errors_total{{kind="frame",listener="{lst.cfg.name}"}} 1.0' in text

    run(go())


def _stub_flow(sw, answer):
    """The switch's flow answering every request with ``answer(req)`` (a response
    the listener's dialect may not be able to carry)."""
    flow = sw.listeners[0].flow

    async def process(req, ctx):
        return answer(req)
    flow.process = process


def test_unencodable_response_gets_a_minimal_answer_in_the_listener_dialect(tmp_path):
    """A 3-digit action code cannot go into the default dialect's 2-character
    DE39; old code: 'Task exception was never retrieved' and no answer at all."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, listener=PLAIN) as sw:
            lst = sw.listeners[0]
            _stub_flow(sw, lambda req: {"t": "1814", "11": req["11"], "39": "909", "7": req.get("7", "")})
            async with Raw.open(sw, tmp_path) as c:
                c.send(c.encode({**make_echo(stan=51), "t": "1804"}))
                a = await c.answer()
                assert (a["t"], a["11"], a["39"]) == ("1814", "000051", "96")
                # a format error stays a format error
                _stub_flow(sw, lambda req: {"t": "1210", "11": req["11"], "39": "904", "41": req["41"]})
                c.send(c.encode({**make_purchase(1000, stan=52), "t": "1200"}))
                a = await c.answer()
                assert (a["t"], a["11"], a["39"], a["41"]) == ("1210", "000052", "30", "TERM0001")
                # the connection serves on
                _stub_flow(sw, lambda req: {"t": "0210", "11": req["11"], "39": "00"})
                c.send(c.encode(make_purchase(1000, stan=53)))
                assert (await c.answer())["39"] == "00"
            assert lst.counters["minimal_answers"] == 2
            assert lst.counters["unanswerable_closed"] == 0

    run(go())


def test_1xxx_request_on_a_1987_listener_is_answered(tmp_path):
    """The real flow, no stub: 1804 and 1200 on the default (1987) listener get
    an answer whatever the flow makes of them, and the connection serves on."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            async with Raw.open(sw, tmp_path) as c:
                c.send(c.encode({"t": "1804", "7": "0101120000", "11": "000061", "24": "831"}))
                a = await c.answer()
                assert a["t"] == "1814" and a["11"] == "000061" and len(a["39"]) == 2
                c.send(c.encode({**make_purchase(1000, stan=62), "t": "1200"}))
                a = await c.answer()
                assert a["t"] == "1210" and a["11"] == "000062" and len(a["39"]) == 2
                c.send(c.encode(make_purchase(1000, stan=63)))
                assert (await c.answer())["39"] == "00"

    run(go())


def test_response_that_cannot_be_encoded_even_minimally_closes_gracefully(tmp_path):
    """Not even MTI + DE11 + DE39 encodes (a DE11 the dialect cannot carry):
    nothing the terminal could match can be sent, so the connection closes,
    after the answers in flight, instead of the task dying silently."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, listener=PLAIN) as sw:
            lst = sw.listeners[0]
            _stub_flow(sw, lambda req: {"t": "0210", "11": "12", "39": "00"} if req["11"] == "000072"
                       else {"t": "0210", "11": req["11"], "39": "00"})
            async with Raw.open(sw, tmp_path) as c:
                c.send(c.encode(make_purchase(1000, stan=71)))
                assert (await c.answer())["11"] == "000071"
                c.send(c.encode(make_purchase(1000, stan=72)))
                assert await c.closed_without_answer(5.0)
            assert lst.counters["answers_unencodable"] == 1
            assert lst.counters["unanswerable_closed"] == 1

    run(go())


@pytest.mark.parametrize("mti", ["0210", "0110", "0230", "0810", "0410", "1814"])
def test_a_response_mti_from_a_terminal_is_dropped_unanswered(tmp_path, mti):
    """ISO 8583 never answers a response. Old code answered it (same MTI, 30)."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            lst = sw.listeners[0]
            forwarded = sw.sims["acq-a"]
            async with Raw.open(sw, tmp_path) as c:
                if mti.endswith("810") or mti == "1814":
                    doc = {"t": mti, "7": "0101120000", "11": "000081", "39": "00", "70": "301"}
                    if mti == "1814":
                        doc = {"t": mti, "7": "0101120000", "11": "000081", "24": "831"}
                else:
                    doc = {**make_purchase(1000, stan=81), "t": mti, "39": "00"}
                    doc.pop("35", None)
                    doc.pop("52", None)
                doc = {k: v for k, v in doc.items() if k in c.lst.defined_fields or k == "t"}
                # the response, then a request on the same connection: the first
                # (and only) answer is the request's
                c.send(c.encode(doc), c.encode(make_purchase(1000, stan=82)))
                a = await c.answer()
                assert (a["t"], a["11"], a["39"]) == ("0210", "000082", "00")
                with pytest.raises(asyncio.TimeoutError):
                    await c.answer(timeout=0.5)
            assert lst.counters["responses_dropped"] == 1
            assert lst.counters["answered"] == 1
            seen = [d["t"] for d in forwarded.received]
            assert "0200" in seen and mti not in seen  # the request only (and the link's own sign-on)

    run(go())


def test_undecodable_response_mti_is_dropped_not_answered(tmp_path):
    """A response that does not decode is not answered 30 either; the connection lives."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, listener=PLAIN) as sw:
            lst = sw.listeners[0]
            async with Raw.open(sw, tmp_path) as c:
                raw, enc = iso8583.encode({**make_purchase(1000, stan=91), "t": "0210", "39": "00"}, c.spec)
                i = raw.index(enc["35"]["len"] + enc["35"]["data"])
                c.send(raw[:i] + b"9X" + raw[i + 2:], c.encode(make_purchase(1000, stan=92)))
                a = await c.answer()
                assert (a["t"], a["11"], a["39"]) == ("0210", "000092", "00")
            assert lst.counters["responses_dropped"] == 1
            assert lst.counters["decode_errors"] == 1
            assert lst.counters["unanswerable_closed"] == 0

    run(go())


def test_a_terminal_that_half_closes_still_gets_its_answers(tmp_path):
    """A terminal that sends its requests and then shuts down its sending side
    (a TCP half-close, still reading) is answered before the switch closes.
    Old code took asyncio's default on the FIN and closed at once: the
    acquirer approved both and the terminal heard nothing."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 300.0}}, listener=PLAIN) as sw:
            lst = sw.listeners[0]
            async with Raw.open(sw, tmp_path) as c:
                c.send(*(c.encode(make_purchase(1000, stan=s)) for s in (51, 52)))
                await c.writer.drain()
                c.writer.write_eof()
                answers = [await c.answer(), await c.answer()]
                assert sorted((a["11"], a["39"]) for a in answers) == [("000051", "00"), ("000052", "00")]
                assert await c.closed_without_answer(5.0)
            assert lst.counters["half_closed"] == 1
            assert lst.counters["answers_lost"] == 0
            assert await _until(lambda: not lst.connections)

    run(go())


def test_a_terminal_that_closes_with_nothing_owed_is_closed_at_once(tmp_path):
    """The ordinary goodbye (a FIN with every answer written) closes the
    connection straight away, without the graceful-close path."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, listener=PLAIN) as sw:
            lst = sw.listeners[0]
            async with Raw.open(sw, tmp_path) as c:
                c.send(c.encode(make_purchase(1000, stan=53)))
                assert (await c.answer())["39"] == "00"
                c.writer.write_eof()
                assert await c.closed_without_answer(1.0)
            assert lst.counters["half_closed"] == 0
            assert await _until(lambda: not lst.connections)

    run(go())


def test_a_dialect_with_a_message_header_answers_with_the_terminals_header(tmp_path):
    """A listener dialect with a message header ("h", as BASE24 terminals
    send "ISO025000070"): every answer carries the terminal's header back,
    the acquirer's approval, the switch's own 0810 and its 30. Old code
    could encode none of them (the header is required and nothing the flow
    makes has one): the approval was reversed as undeliverable and the
    connection closed without a single answer."""
    import json
    from pathlib import Path

    spec = json.loads((Path(__file__).resolve().parent.parent / "codecs" / "default.json").read_text())
    spec["h"] = dict(spec["h"], max_len=12)
    spec["_meta"]["name"] = "headered"
    path = tmp_path / "headered.json"
    path.write_text(json.dumps(spec))

    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, listener={**PLAIN, "dialect": str(path)}) as sw:
            lst = sw.listeners[0]
            async with Raw.open(sw, tmp_path) as c:
                c.spec = iso8583.load_dialect(str(path))  # the terminal's own layout, header included
                docs = [make_purchase(1000, stan=61), make_echo(62), {"t": "0200", "11": "000063"}]
                c.send(*(c.encode({**d, "h": f"ISO02500007{i}"}) for i, d in enumerate(docs)))
                answers = {a["11"]: a for a in [await c.answer() for _ in docs]}
            assert {k: (a["h"], a["t"], a["39"]) for k, a in answers.items()} == {
                "000061": ("ISO025000070", "0210", "00"),
                "000062": ("ISO025000071", "0810", "00"),
                "000063": ("ISO025000072", "0210", "30"),
            }
            assert lst.counters["answers_unencodable"] == 0 and lst.counters["minimal_answers"] == 0
            assert sw.flow.counters["answer_not_encodable"] == 0  # the approval was not reversed

    run(go())
