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
                # a frame of pure junk inside valid framing: no answer possible, connection lives
                junk = b"\x00" * 20
                w.write(struct.pack(">I", len(junk)) + junk)
                w.write(struct.pack(">I", len(raw)) + raw)  # then a good request on the same connection
                hdr = await asyncio.wait_for(r.readexactly(4), 5)
                body = await asyncio.wait_for(r.readexactly(struct.unpack(">I", hdr)[0]), 5)
                assert iso8583.decode(body, spec)[0]["39"] == "00"
                w.close()
            await _with_good_terminal(sw, tmp_path, attack)
            assert sw.listeners[0].counters["decode_errors"] >= 2

    run(go())
