"""Bad input against the live listener: the switch keeps serving everyone else.

Garbage, a 4 GB length header, truncated frames, a slow drip and a valid frame
with undecodable fields, each while a well-behaved terminal keeps transacting.
"""
import asyncio
import os
import struct

import pytest

from core import iso8583
from switch.sim.terminal import make_purchase
from tests.switch_harness import run, running_switch, terminal

pytestmark = pytest.mark.timeout(120)

LISTENER = {"tls": False, "framing": "binary4", "idle_timeout": 1.0, "max_frame": 8192}


async def _closed_within(reader, seconds):
    """True if the server closes the connection within `seconds` (EOF or reset)."""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), seconds)
            if not data:
                return True
    except asyncio.TimeoutError:
        return False
    except (ConnectionError, OSError):
        return True


async def _with_good_terminal(sw, tmp_path, attack):
    """Run `attack` while a good terminal transacts; all good requests must be approved."""
    stop = asyncio.Event()
    results = []

    async def good():
        async with terminal(sw, tmp_path) as t:
            stan = 1
            while not stop.is_set():
                r = await t.request(make_purchase(1000, stan=stan), timeout=5)
                results.append(r["39"])
                stan += 1
                await asyncio.sleep(0.01)

    task = asyncio.create_task(good())
    try:
        await attack()
    finally:
        stop.set()
        await task
    assert results and set(results) == {"00"}, results


def test_garbage_and_huge_length_header(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, listener=LISTENER) as sw:
            port = sw.listeners[0].port

            async def attack():
                # a 4 GB length header: refused on the header alone, nothing buffered
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"\xff\xff\xff\xff" + b"x" * 100)
                assert await _closed_within(r, 3)
                w.close()
                # random garbage
                for seed in range(5):
                    r, w = await asyncio.open_connection("127.0.0.1", port)
                    w.write(os.urandom(64 + seed * 100))
                    await w.drain()
                    await _closed_within(r, 1.5)
                    w.close()
            await _with_good_terminal(sw, tmp_path, attack)
            assert sw.listeners[0].counters["frame_errors"] >= 1

    run(go())


def test_truncated_frames_and_slow_drip(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, listener=LISTENER) as sw:
            port = sw.listeners[0].port
            spec = iso8583.load_dialect("default")
            raw, _ = iso8583.encode(make_purchase(1000, stan=900), spec)
            frame = struct.pack(">I", len(raw)) + raw

            async def attack():
                # truncated: the header promises more than ever arrives, then the peer goes
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(frame[: len(frame) // 2])
                await w.drain()
                w.close()
                # slow drip: one byte at a time, far slower than the frame timeout allows
                r, w = await asyncio.open_connection("127.0.0.1", port)
                closed = False
                for b in frame:
                    try:
                        w.write(bytes([b]))
                        await w.drain()
                    except (ConnectionError, OSError):
                        closed = True
                        break
                    if r.at_eof():
                        closed = True
                        break
                    try:
                        data = await asyncio.wait_for(r.read(100), 0.25)
                        if not data:
                            closed = True
                            break
                    except asyncio.TimeoutError:
                        pass
                    except (ConnectionError, OSError):
                        closed = True
                        break
                assert closed, "a slow-drip connection must be closed before it completes a frame"
                w.close()
            await _with_good_terminal(sw, tmp_path, attack)
            assert sw.listeners[0].counters["frame_timeouts"] >= 1

    run(go())


def test_valid_frame_with_undecodable_fields_is_answered_30(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, listener=LISTENER) as sw:
            port = sw.listeners[0].port
            spec = iso8583.load_dialect("default")
            doc = make_purchase(1000, stan=31)
            raw, enc = iso8583.encode(doc, spec)
            # break DE35's LLVAR length: MTI, DE11 and DE41... DE11 precede it, so the
            # request is answerable with 30 even though it cannot be decoded whole
            i = raw.index(enc["35"]["len"] + enc["35"]["data"])
            bad = raw[:i] + b"9X" + raw[i + 2:]

            async def attack():
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(struct.pack(">I", len(bad)) + bad)
                hdr = await asyncio.wait_for(r.readexactly(4), 5)
                body = await asyncio.wait_for(r.readexactly(struct.unpack(">I", hdr)[0]), 5)
                resp, _ = iso8583.decode(body, spec)
                assert resp["t"] == "0210" and resp["39"] == "30" and resp["11"] == "000031"
                assert "35" not in resp and "52" not in resp
                # a frame of pure junk inside valid framing: no answer possible, so the
                # connection is closed (DESIGN.md: a 30 where answerable, else closed)
                junk = b"\x00" * 20
                w.write(struct.pack(">I", len(junk)) + junk)
                assert await _closed_within(r, 5)
                w.close()
                # a good request on a new connection is served as ever
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(struct.pack(">I", len(raw)) + raw)
                hdr = await asyncio.wait_for(r.readexactly(4), 5)
                body = await asyncio.wait_for(r.readexactly(struct.unpack(">I", hdr)[0]), 5)
                assert iso8583.decode(body, spec)[0]["39"] == "00"
                w.close()
            await _with_good_terminal(sw, tmp_path, attack)
            assert sw.listeners[0].counters["decode_errors"] >= 2

    run(go())


def test_a_terminal_that_never_reads_its_answers_is_not_buffered_without_bound(tmp_path):
    """A terminal (mTLS, the default listener) keeps sending and reads nothing:
    once its answers pass the transport's high-water marks the switch stops
    reading from it, so the backpressure reaches the terminal instead of the
    switch's memory. When it reads again, every request is answered."""
    import socket as _socket

    from core.framing import FrameDecoder
    from switch.sim.terminal import TerminalClient, dev_client_context

    def small_buffers(sock):  # a slow path (small kernel buffers): the switch's own buffers are what fills
        for opt in (_socket.SO_RCVBUF, _socket.SO_SNDBUF):
            sock.setsockopt(_socket.SOL_SOCKET, opt, 16384)

    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, listener={"terminal_timeout": 60.0}) as sw:
            lst = sw.listeners[0]
            enc = TerminalClient("127.0.0.1", lst.port, framing=lst.cfg.framing, dialect=lst.cfg.dialect)
            sock = _socket.socket()
            small_buffers(sock)
            sock.connect(("127.0.0.1", lst.port))
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=dev_client_context(tmp_path / "state", "TERM0001"), server_hostname="localhost",
                limit=1024)  # the client's own buffering stays small too
            assert await _until(lambda: lst.connections)
            conn = next(iter(lst.connections))
            small_buffers(conn.transport.get_extra_info("socket"))
            blocked, most_buffered, stan = False, 0, 0
            while stan < 30_000:  # ~4 MB of answers if nothing stopped it
                writer.write(b"".join(enc._encode(make_purchase(100, stan=(stan := stan + 1))) for _ in range(200)))
                try:
                    # a switch that reads on takes 200 requests well within this
                    await asyncio.wait_for(writer.drain(), 5.0)
                except asyncio.TimeoutError:
                    blocked = True  # the switch stopped reading: backpressure reached the terminal
                    break
                most_buffered = max(most_buffered, conn.transport.get_write_buffer_size())
            assert blocked and lst.counters["write_backpressure"] >= 1, (stan, dict(lst.counters))
            assert most_buffered < 2 << 20, most_buffered
            # the terminal reads again: everything it sent is answered
            dec = FrameDecoder(header=lst.cfg.framing, max_frame=lst.cfg.max_frame)
            answered, codes = 0, set()
            drained = asyncio.ensure_future(writer.drain())
            while answered < stan:
                data = await asyncio.wait_for(reader.read(1 << 16), 30)
                assert data, f"closed after {answered} of {stan} answers"
                for frame in dec.feed(data):
                    codes.add(iso8583.decode(frame, lst.spec)[0]["39"])
                    answered += 1
            await drained
            assert codes == {"00"} and lst.counters["answered"] == stan
            writer.close()

    run(go(), timeout=110)


def test_a_terminal_that_stops_reading_for_idle_timeout_is_closed(tmp_path):
    """Backpressure bounds what the switch buffers for a terminal that reads
    nothing; one that has read none of its answers for idle_timeout is gone or
    stuck, and its connection is closed. Other terminals are unaffected."""
    import socket as _socket

    from switch.sim.terminal import TerminalClient, dev_client_context
    from tests.switch_harness import terminal

    async def go():
        async with running_switch(tmp_path, {"acq-a": {}},
                                  listener={"terminal_timeout": 5.0, "idle_timeout": 3.0}) as sw:
            lst = sw.listeners[0]
            enc = TerminalClient("127.0.0.1", lst.port, framing=lst.cfg.framing, dialect=lst.cfg.dialect)
            sock = _socket.socket()
            for opt in (_socket.SO_RCVBUF, _socket.SO_SNDBUF):
                sock.setsockopt(_socket.SOL_SOCKET, opt, 16384)
            sock.connect(("127.0.0.1", lst.port))
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=dev_client_context(tmp_path / "state", "TERM0001"), server_hostname="localhost",
                limit=1024)
            assert await _until(lambda: lst.connections)
            conn = next(iter(lst.connections))
            ssock = conn.transport.get_extra_info("socket")
            for opt in (_socket.SO_RCVBUF, _socket.SO_SNDBUF):
                ssock.setsockopt(_socket.SOL_SOCKET, opt, 16384)
            stan = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            drained = None
            while stan < 30_000 and not lst.counters["write_backpressure"] and loop.time() < deadline:
                if drained is None:
                    writer.write(b"".join(enc._encode(make_purchase(100, stan=(stan := stan + 1)))
                                          for _ in range(200)))
                    drained = asyncio.ensure_future(writer.drain())
                done, _ = await asyncio.wait([drained], timeout=0.5)
                if done:
                    if drained.exception() is not None:
                        break  # already closed by the switch
                    drained = None
            if drained is not None and not drained.done():
                drained.cancel()
            assert lst.counters["write_backpressure"] >= 1, (stan, dict(lst.counters))
            assert await _until(lambda: conn not in lst.connections, 8.0)
            assert lst.counters["write_stalled_closed"] == 1
            async with terminal(sw, tmp_path, "TERM0002") as t:
                assert (await t.request(make_purchase(100, stan=1, terminal_id="TERM0002")))["39"] == "00"
            writer.transport.abort()

    run(go(), timeout=60)


async def _until(pred, timeout=5.0):
    for _ in range(int(timeout / 0.02)):
        if pred():
            return True
        await asyncio.sleep(0.02)
    return pred()


def test_a_steady_stream_whose_reads_end_mid_frame_is_not_a_slow_drip(tmp_path):
    """A terminal sending a request every 0.25 s where every write finishes
    one frame and starts the next (a concentrator cutting its writes at a
    buffer size): each frame arrives well within frame_timeout (1 s here),
    so nothing is cut off. Old code timed the partial frame from the first
    read that left one and never restarted the clock while frames kept
    completing: the connection was aborted after 1 s as a slow drip."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, listener=LISTENER) as sw:
            lst = sw.listeners[0]
            spec = iso8583.load_dialect("default")
            frames = []
            for stan in range(1, 15):
                raw, _ = iso8583.encode(make_purchase(1000, stan=stan), spec)
                frames.append(struct.pack(">I", len(raw)) + raw)
            stream = b"".join(frames)
            # cut half-way through each frame: every write but the last ends mid-frame
            cuts = [0] + [sum(map(len, frames[:k])) + len(frames[k]) // 2 for k in range(14)] + [len(stream)]
            r, w = await asyncio.open_connection("127.0.0.1", lst.port)
            for a, b in zip(cuts, cuts[1:]):
                w.write(stream[a:b])
                await asyncio.sleep(0.25)
            answers, buf = [], b""
            while len(answers) < 14:
                data = await asyncio.wait_for(r.read(65536), 5)
                assert data, f"closed after {len(answers)} answers; {dict(lst.counters)}"
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                    n = struct.unpack(">I", buf[:4])[0]
                    answers.append(iso8583.decode(buf[4:4 + n], spec)[0])
                    buf = buf[4 + n:]
            w.close()
            assert sorted(int(a["11"]) for a in answers) == list(range(1, 15))
            assert {a["39"] for a in answers} == {"00"}
            assert lst.counters["frame_timeouts"] == 0

    run(go())
