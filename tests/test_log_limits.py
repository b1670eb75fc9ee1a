"""Logging stays bounded under bad input: a few lines per kind, then a count.

A terminal (or an attacker) that sends a stream of garbage frames made the
listener log one warning per frame without limit, so the log, and the disk
under it, grew with what the peer sent (DESIGN.md "Bad input": bounded time
and memory). Every event is still counted (listener counters, metrics); the
log carries at most ``burst`` lines per kind per interval and then one
"suppressed K similar messages" line when the interval ends.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import time

import pytest

from core import framing, iso8583
from switch.logs import RateLimitedLog
from switch.messages import TEST_PAN
from switch.sim.terminal import make_purchase
from tests.log_records import Records
from tests.switch_harness import run, running_switch

pytestmark = pytest.mark.timeout(120)

LISTENER = {"tls": False, "framing": "binary4", "idle_timeout": 5.0, "max_frame": 8192}


def _capture(name: str, level=logging.DEBUG):
    logger = logging.getLogger(name)
    handler = Records()
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)

    def undo():
        logger.removeHandler(handler)
        logger.setLevel(old)
    return logger, handler, undo


# --------------------------------------------------------------------------
# The helper itself


def test_burst_then_one_summary_when_the_interval_ends():
    async def go():
        logger, h, undo = _capture("test.limits.burst")
        try:
            lim = RateLimitedLog(logger, burst=3, interval=0.3)
            logged = [lim.warning("bad frame", "bad frame %d", i) for i in range(50)]
            assert logged == [True] * 3 + [False] * 47
            assert h.messages() == ["bad frame 0", "bad frame 1", "bad frame 2"]
            assert lim.suppressed_total == 47
            await asyncio.sleep(0.5)  # the interval ends with nothing more logged: its summary comes anyway
            assert h.messages()[3:] == ["bad frame: suppressed 47 similar messages in the last 0.3 s"]
            assert h.records[3].levelno == logging.WARNING and h.records[3].suppressed == 47
            # a new interval lets a burst through again
            assert lim.warning("bad frame", "bad frame %d", 50)
            # keys are limited apart
            assert [lim.error("other", "other %d", i) for i in range(4)] == [True, True, True, False]
            await asyncio.sleep(0.5)
            assert h.messages()[4:] == ["bad frame 50", "other 0", "other 1", "other 2",
                                        "other: suppressed 1 similar messages in the last 0.3 s"]
            assert h.records[-1].levelno == logging.ERROR
        finally:
            undo()
    run(go())


def test_without_an_event_loop_the_summary_comes_with_the_next_record():
    logger, h, undo = _capture("test.limits.noloop")
    try:
        lim = RateLimitedLog(logger, burst=2, interval=0.2)
        for i in range(10):
            lim.info("k", "m%d", i)
        time.sleep(0.3)
        lim.info("k", "m%d", 10)
        assert h.messages() == ["m0", "m1", "k: suppressed 8 similar messages in the last 0.2 s", "m10"]
        lim.info("k", "m%d", 11)
        lim.info("k", "m%d", 12)
        lim.flush()  # at shutdown: what is held back is still told
        assert h.messages()[-2:] == ["m11", "k: suppressed 1 similar messages in the last 0.2 s"]
    finally:
        undo()


def test_traceback_only_with_the_first_record_after_a_quiet_interval():
    logger, h, undo = _capture("test.limits.tb")
    try:
        lim = RateLimitedLog(logger, burst=5, interval=0.2)
        for i in range(3):
            try:
                raise OSError(28, "No space left on device")
            except OSError as exc:
                lim.error("journal write failed", "write %d failed: %s", i, exc, exc_info=exc, traceback_first=True)
        assert [r.exc_info is not None for r in h.records] == [True, False, False]
        assert "Traceback" in h.lines[0] and all("Traceback" not in line for line in h.lines[1:])
        time.sleep(0.3)  # quiet for an interval: the next failure is a new episode
        lim.error("journal write failed", "again", exc_info=OSError(28, "full"), traceback_first=True)
        assert h.records[-1].exc_info is not None
    finally:
        undo()


def test_disabled_level_costs_nothing_and_keys_stay_bounded():
    logger, h, undo = _capture("test.limits.bounded", level=logging.WARNING)
    try:
        lim = RateLimitedLog(logger, burst=1, interval=60.0, max_keys=8)
        for i in range(100):
            assert not lim.debug("k", "x")  # below the logger's level: no state, no record
        assert lim._keys == {} and h.records == []
        for i in range(100):
            lim.warning(f"kind {i}", "x")
        assert len(lim._keys) <= 8
    finally:
        undo()


# --------------------------------------------------------------------------
# A real listener fed thousands of garbage frames


def _undecodable_request(stan: int) -> bytes:
    """A valid frame holding a 0200 whose DE35 length is not digits: undecodable,
    but its MTI and DE11 come first, so it is answered 30 and the connection
    stays open. It carries a PAN and track data, which no log line may show."""
    spec = iso8583.load_dialect("default")
    raw, enc = iso8583.encode(make_purchase(1000, stan=stan), spec)
    i = raw.index(enc["35"]["len"] + enc["35"]["data"])
    bad = raw[:i] + b"9X" + raw[i + 2:]
    return struct.pack(">I", len(bad)) + bad


def _response_frame(stan: int) -> bytes:
    """A well-formed 0210 from a terminal: counted and dropped, never answered."""
    spec = iso8583.load_dialect("default")
    raw, _ = iso8583.encode({"t": "0210", "2": TEST_PAN, "3": "000000", "4": "000000001000",
                             "11": "%06d" % stan, "39": "00", "41": "TERM0001"}, spec)
    return struct.pack(">I", len(raw)) + raw


N_UNDECODABLE = 3000
N_RESPONSES = 1000
N_BAD_HEADERS = 100
INTERVAL = 4.0


def test_listener_logs_a_bounded_number_of_lines_for_thousands_of_garbage_frames(tmp_path):
    async def go():
        _, h, undo = _capture("isoswitch.listener", logging.INFO)
        try:
            async with running_switch(tmp_path, {"acq-a": {}}, listener=LISTENER) as sw:
                lst = sw.listeners[0]
                lim = lst.log_limiter
                assert (lim.burst, lim.interval) == (10, 60.0)
                lim.interval = INTERVAL  # the interval's end within the test
                t0 = time.monotonic()

                # one connection: thousands of undecodable requests (each answered 30) and responses
                r, w = await asyncio.open_connection("127.0.0.1", lst.port)
                answers = []

                async def read_answers():
                    dec = framing.FrameDecoder(header="binary4", max_frame=8192)
                    spec = iso8583.load_dialect("default")
                    while len(answers) < N_UNDECODABLE:
                        data = await r.read(65536)
                        if not data:
                            return
                        for frame in dec.feed(data):
                            answers.append(iso8583.decode(frame, spec)[0])
                reader = asyncio.create_task(read_answers())
                for i in range(N_UNDECODABLE):
                    w.write(_undecodable_request(i % 999_999 + 1))
                    if i % 3 == 0:
                        w.write(_response_frame(i % 999_999 + 1))
                    if i % 200 == 0:
                        await w.drain()
                await w.drain()
                await asyncio.wait_for(reader, 30)
                w.close()

                # many connections, each closed for a bad length header
                for _ in range(N_BAD_HEADERS):
                    r2, w2 = await asyncio.open_connection("127.0.0.1", lst.port)
                    w2.write(b"\xff\xff\xff\xff" + b"x" * 16)
                    await w2.drain()
                    while await r2.read(65536):
                        pass
                    w2.close()
                busy = time.monotonic() - t0

                # every event counted, every answerable request answered
                assert len(answers) == N_UNDECODABLE and {a["39"] for a in answers} == {"30"}
                assert lst.counters["decode_errors"] == N_UNDECODABLE
                assert lst.counters["responses_dropped"] == N_RESPONSES
                assert lst.counters["frame_errors"] == N_BAD_HEADERS
                assert lst.counters["frame_error_closed"] == N_BAD_HEADERS
                metrics = sw.metrics.exposition().decode() if sw.metrics is not None else ""
                if metrics:
                    assert (f'isoswitch_decode_errors_total{{kind="message",listener="terminals"}} '
                            f'{float(N_UNDECODABLE)}') in metrics

                # the intervals end: one summary per kind tells the rest
                kinds = {"undecodable terminal message": N_UNDECODABLE,
                         "terminal sent a response": N_RESPONSES,
                         "terminal framing error": N_BAD_HEADERS,
                         "terminal connection closing": N_BAD_HEADERS}
                deadline = time.monotonic() + INTERVAL + 5
                while any(st.suppressed for st in lim._keys.values()) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                elapsed = time.monotonic() - t0
        finally:
            undo()

        msgs = h.messages()
        windows = math.ceil(elapsed / INTERVAL) + 1
        assert len(msgs) <= len(kinds) * (lim.burst + 1) * windows, (len(msgs), busy)
        assert len(msgs) < N_UNDECODABLE // 10  # against 4,200 events
        for kind, events in kinds.items():
            logged = [m for m in msgs if m.startswith(kind) and ": suppressed " not in m]
            summaries = [r for r in h.records if r.getMessage().startswith(f"{kind}: suppressed ")]
            assert 1 <= len(logged) <= lim.burst * windows, (kind, len(logged))
            assert summaries, kind
            # what was let through and what the summaries count add up to every event
            assert len(logged) + sum(r.suppressed for r in summaries) == events, kind
        # no card data in any line: the frames carried a PAN and track 2
        text = "\n".join(h.lines)
        assert TEST_PAN not in text and TEST_PAN[6:] not in text
        assert "=2812" not in text and "D2812" not in text
        for line in h.lines:
            json.loads(line)

    run(go())


def test_a_host_flooding_unmatched_and_undecodable_responses_is_counted_and_logged_boundedly():
    """An acquirer that answers what nobody asked (or sends garbage) at line
    rate: every frame counted in the link's counters, a few lines per kind."""
    from switch.acquirer import AcquirerLink
    from switch.config import AcquirerConfig

    async def go():
        _, h, undo = _capture("isoswitch.acquirer", logging.INFO)
        try:
            link = AcquirerLink(AcquirerConfig(name="acq-flood", host="127.0.0.1", port=1))
            spec = iso8583.load_dialect("default")
            for i in range(1, 501):
                doc = {"t": "0210", "3": "000000", "4": "000000001000", "11": f"{i:06d}",
                       "39": "00", "41": "TERM0001"}
                link._on_frame(iso8583.encode(doc, spec)[0], None)
                link._on_frame(b"\x02\x10garbage" + bytes([i % 256]), None)
            assert link.counters["unmatched"] == 500
            assert link.counters["undecodable"] == 500
            lim = link.log_limiter
            assert lim.suppressed_total == 2 * (500 - lim.burst)
            lim.flush()
        finally:
            undo()
        msgs = h.messages("isoswitch.acquirer")
        for kind in ("unmatched response", "undecodable response"):
            logged = [m for m in msgs if kind in m and ": suppressed " not in m]
            summaries = [r for r in h.records if r.getMessage().startswith(f"{kind}: suppressed ")]
            assert len(logged) == lim.burst, kind
            assert sum(r.suppressed for r in summaries) == 500 - lim.burst, kind

    run(go())
