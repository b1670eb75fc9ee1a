"""Length-prefix framing: both implementations, round trips, chunking, bad headers."""
import importlib
import pickle
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import framing
from tests.conftest import _impls

IMPLS = _impls("framing")
PY = importlib.import_module("core._framing_py")
KINDS = ("binary2", "ascii4", "bcd2", "binary4")
HSETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_public_module_uses_selected_impl(selected_impl_name):
    assert framing.IMPLEMENTATION == selected_impl_name
    assert framing.HEADER_KINDS == KINDS
    assert issubclass(framing.FrameError, ValueError)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("header", KINDS)
def test_round_trip_every_header_kind(impl, header):
    payloads = [b"\x02\x00" + bytes(range(40)), b"x", b"\x00" * 9999, bytes(range(256)) * 3]
    stream = b"".join(impl.build_frame(p, header, max_frame=9999) for p in payloads)
    dec = impl.FrameDecoder(header, max_frame=9999)
    assert dec.header == header and dec.max_frame == 9999 and dec.tpdu is False
    assert dec.feed(stream) == payloads
    assert dec.buffered == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_headers_on_the_wire(impl):
    assert impl.build_frame(b"abc") == b"\x00\x03abc"
    assert impl.build_frame(b"a" * 1234, "ascii4")[:4] == b"1234"
    assert impl.build_frame(b"a" * 1234, "bcd2")[:2] == b"\x12\x34"
    assert impl.build_frame(b"a" * 300, "binary4")[:4] == b"\x00\x00\x01\x2c"
    assert impl.build_frame(bytearray(b"ab"), "ascii4") == b"0002ab"
    assert impl.build_frame(memoryview(b"ab"), "bcd2") == b"\x00\x02ab"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("header", KINDS)
def test_byte_by_byte_equals_whole(impl, header):
    payloads = [b"0200" + bytes(range(i, i + 20)) for i in range(5)] + [b"", b"z"]
    stream = b"".join(impl.build_frame(p, header) for p in payloads)
    dec = impl.FrameDecoder(header)
    got = []
    for i in range(len(stream)):
        got += dec.feed(stream[i:i + 1])
        assert dec.buffered <= 4 + 24
    # A zero-length frame is a keep-alive: skipped, not returned.
    assert got == [p for p in payloads if p]
    assert dec.buffered == 0


@pytest.mark.parametrize("impl", IMPLS)
@HSETTINGS
@given(
    header=st.sampled_from(KINDS),
    payloads=st.lists(st.binary(min_size=0, max_size=300), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=20),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_random_chunking_gives_same_frames(impl, header, payloads, cuts, kind):
    stream = b"".join(impl.build_frame(p, header) for p in payloads)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    dec = impl.FrameDecoder(header)
    got = []
    for a, b in zip(bounds, bounds[1:]):
        got += dec.feed(kind(stream[a:b]))
    assert got == [p for p in payloads if p]
    assert dec.buffered == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_frame_is_kept(impl):
    dec = impl.FrameDecoder()
    assert dec.feed(b"\x00\x05ab") == []
    assert dec.buffered == 4
    assert dec.feed(b"cde\x00") == [b"abcde"]
    assert dec.buffered == 1
    assert dec.feed(b"\x01q") == [b"q"]


@pytest.mark.parametrize("impl", IMPLS)
def test_many_frames_in_one_feed(impl):
    payload = b"0800" + b"\x82\x20" + b"\x00" * 14
    dec = impl.FrameDecoder()
    frames = dec.feed(impl.build_frame(payload) * 20000)
    assert len(frames) == 20000 and frames[-1] == payload


# ---------------------------------------------------------------- bad headers

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "header,max_frame,wire",
    [
        ("binary4", 8192, b"\xff\xff\xff\xff"),
        ("binary4", 2**31 - 1, b"\xff\xff\xff\xff"),
        ("ascii4", 100, b"9999"),
        ("binary2", 8192, b"\xff\xff"),
        ("bcd2", 100, b"\x99\x99"),
    ],
)
def test_oversized_header_raises_before_payload(impl, header, max_frame, wire):
    dec = impl.FrameDecoder(header, max_frame=max_frame)
    # Header split over two feeds: nothing is decided on half a header.
    assert dec.feed(wire[:1]) == []
    with pytest.raises(impl.FrameError) as ei:
        dec.feed(wire[1:])
    assert ei.value.pos == 0
    assert "exceeds max_frame" in ei.value.msg
    assert dec.buffered == 0
    # Same when the first payload bytes come in the same chunk: none is kept.
    dec = impl.FrameDecoder(header, max_frame=max_frame)
    ok = impl.build_frame(b"ok", header)
    with pytest.raises(impl.FrameError) as ei:
        dec.feed(ok + wire + b"\x00" * 1000)
    assert (ei.value.pos, ei.value.frames) == (len(ok), (b"ok",))
    assert dec.buffered == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "wire,bad", [(b"-001", 0), (b"+009", 0), (b" 009", 0), (b"1_00", 1), (b"00a0", 2), (b"000\xb9", 3), (b"\x00\x009", 0)]
)
def test_non_digit_ascii_header(impl, wire, bad):
    dec = impl.FrameDecoder("ascii4")
    dec.feed(b"0002ok")
    with pytest.raises(impl.FrameError) as ei:
        dec.feed(wire + b"payload")
    assert ei.value.pos == 6 + bad
    assert "not a digit" in ei.value.msg
    assert ei.value.frames == ()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("wire,bad", [(b"\x0a\x00", 0), (b"\x00\xa0", 1), (b"\x12\x3f", 1), (b"\xf0\x00", 0)])
def test_non_bcd_header(impl, wire, bad):
    with pytest.raises(impl.FrameError) as ei:
        impl.FrameDecoder("bcd2").feed(wire)
    assert ei.value.pos == bad


@pytest.mark.parametrize("impl", IMPLS)
def test_error_poisons_decoder_and_keeps_earlier_frames(impl):
    dec = impl.FrameDecoder("ascii4")
    with pytest.raises(impl.FrameError) as ei:
        dec.feed(b"0002ab0001c-001xyz")
    assert ei.value.frames == (b"ab", b"c")
    assert (ei.value.msg, ei.value.pos) == ("ascii4 length header has a byte that is not a digit 0-9", 11)
    for data in (b"", b"0001a"):
        with pytest.raises(impl.FrameError) as again:
            dec.feed(data)
        assert (again.value.msg, again.value.pos) == (ei.value.msg, ei.value.pos)


@pytest.mark.parametrize("impl", IMPLS)
def test_error_text_has_no_payload_or_header_value(impl):
    dec = impl.FrameDecoder("ascii4", max_frame=100)
    with pytest.raises(impl.FrameError) as ei:
        dec.feed(b"4111111111111111")
    assert "4111" not in str(ei.value)


@pytest.mark.parametrize("impl", IMPLS)
def test_frame_error_pickles(impl):
    err = impl.FrameError("bad header", 42)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is impl.FrameError
    assert (back.msg, back.pos, str(back)) == ("bad header", 42, str(err))
    assert isinstance(back, ValueError)


@pytest.mark.parametrize("impl", IMPLS)
def test_constructor_and_build_frame_checks(impl):
    with pytest.raises(ValueError):
        impl.FrameDecoder("ascii5")
    with pytest.raises(TypeError):
        impl.FrameDecoder(max_frame="8192")
    with pytest.raises(ValueError):
        impl.FrameDecoder(max_frame=0)
    with pytest.raises(TypeError):
        impl.FrameDecoder().feed("0002ab")
    with pytest.raises(BufferError):
        impl.FrameDecoder().feed(memoryview(b"\x00\x02abab")[::2])
    with pytest.raises(impl.FrameError, match="does not fit a ascii4"):
        impl.build_frame(b"x" * 10000, "ascii4", max_frame=20000)
    with pytest.raises(impl.FrameError, match="does not fit a binary2"):
        impl.build_frame(b"x" * 65536, "binary2", max_frame=70000)
    with pytest.raises(impl.FrameError, match="exceeds max_frame"):
        impl.build_frame(b"x" * 8193)
    assert impl.build_frame(b"", "bcd2") == b"\x00\x00"


# ---------------------------------------------------------------- TPDU

@pytest.mark.parametrize("impl", IMPLS)
def test_tpdu(impl):
    msg = b"\x60\x00\x03\x00\x07" + b"0200rest"
    dec = impl.FrameDecoder("binary2", tpdu=True)
    assert dec.feed(impl.build_frame(msg) + b"\x00\x00") == [msg]
    tpdu, body = impl.split_tpdu(msg)
    assert (tpdu, body) == (b"\x60\x00\x03\x00\x07", b"0200rest")
    assert impl.reply_tpdu(tpdu) == b"\x60\x00\x07\x00\x03"
    assert impl.split_tpdu(b"\x68\x00\x01\x00\x02") == (b"\x68\x00\x01\x00\x02", b"")
    with pytest.raises(impl.FrameError):
        impl.split_tpdu(b"\x60\x00\x01\x00")
    with pytest.raises(impl.FrameError, match="0x60 or 0x68"):
        impl.split_tpdu(b"\x61\x00\x01\x00\x02xx")
    with pytest.raises(impl.FrameError):
        impl.reply_tpdu(b"\x60\x00\x01\x00\x02\x00")
    with pytest.raises(impl.FrameError) as ei:
        impl.FrameDecoder(tpdu=True).feed(b"\x00\x04abcd")
    assert ei.value.pos == 0


# ---------------------------------------------------------------- differential

def _run(mod, header, max_frame, tpdu, chunks):
    """What a decoder makes of a chunked stream: outputs, then the error if any."""
    dec = mod.FrameDecoder(header, max_frame=max_frame, tpdu=tpdu)
    log = []
    for chunk in chunks:
        try:
            log.append(("frames", dec.feed(chunk), dec.buffered))
        except mod.FrameError as e:
            log.append(("error", e.msg, e.pos, e.frames, str(e), dec.buffered))
            break
    return log


@pytest.mark.parametrize("impl", IMPLS)
@HSETTINGS
@given(
    header=st.sampled_from(KINDS),
    max_frame=st.sampled_from([1, 5, 40, 8192]),
    tpdu=st.booleans(),
    chunks=st.lists(st.binary(max_size=60), max_size=12),
)
def test_random_streams_match_python_twin(impl, header, max_frame, tpdu, chunks):
    assert _run(impl, header, max_frame, tpdu, chunks) == _run(PY, header, max_frame, tpdu, chunks)


@pytest.mark.parametrize("impl", IMPLS)
@HSETTINGS
@given(
    header=st.sampled_from(KINDS),
    payloads=st.lists(st.binary(max_size=30), max_size=8),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
    cuts=st.lists(st.integers(0, 10**6), max_size=6),
)
def test_mutated_streams_match_python_twin(impl, header, payloads, flips, cuts):
    stream = bytearray(b"".join(PY.build_frame(p, header) for p in payloads))
    for at, val in flips:
        if stream:
            stream[at % len(stream)] = val
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    chunks = [bytes(stream[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert _run(impl, header, 64, False, chunks) == _run(PY, header, 64, False, chunks)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_100k_random_chunks_raise_only_frame_error(impl):
    rng = random.Random(8583)
    dec = impl.FrameDecoder()
    errors = frames = 0
    for i in range(100_000):
        if i % 1000 == 0:
            dec = impl.FrameDecoder(rng.choice(KINDS), max_frame=rng.choice([5, 100, 8192]), tpdu=rng.random() < 0.3)
        if rng.random() < 0.5:
            # Mostly-valid traffic with a corrupted byte now and then.
            chunk = bytearray(PY.build_frame(rng.randbytes(rng.randrange(0, 20)), dec.header))
            if rng.random() < 0.1:
                chunk[rng.randrange(len(chunk))] = rng.randrange(256)
        else:
            chunk = rng.randbytes(rng.randrange(0, 12))
        try:
            frames += len(dec.feed(bytes(chunk)))
        except impl.FrameError:
            errors += 1
            dec = impl.FrameDecoder(dec.header, max_frame=dec.max_frame, tpdu=dec.tpdu)
        assert dec.buffered <= 4 + dec.max_frame
    assert errors > 100 and frames > 100
