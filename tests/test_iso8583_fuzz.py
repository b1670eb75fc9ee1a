"""Random and mutated inputs: nothing but DecodeError, no hang, flat memory.

Over 100,000 inputs per implementation (random bytes and mutations of valid
messages across every dialect). Where both implementations are present they
must agree exactly: same document, or the same error (msg, field, pos).
"""
import random
import tracemalloc

import pytest

from core.dialect import list_dialects, load_dialect
from tests.conftest import _impls

IMPLS = [p.values[0] for p in _impls("iso8583")]
TOTAL = 100_000

SAMPLE_0200 = {
    "t": "0200", "2": "4761739001010010", "3": "000000", "4": "000000001000",
    "7": "1121153000", "11": "123456", "12": "153000", "13": "1121", "14": "2812",
    "18": "5999", "22": "051", "25": "00", "35": "4761739001010010D28122011143804400000",
    "37": "632115123456", "41": "TERM0001", "42": "MERCHANT0000001",
    "49": "840", "52": "0123456789ABCDEF",
    "55": "9F2608C2C12B098F3DA6E39F2701809F100706011203A4A8029F37045D4A2C8E",
    "70": "301",
}


def _encodes(impl, spec, k, v):
    try:
        impl.encode({"t": "0200", k: v}, spec)
        return True
    except impl.EncodeError:
        return False


def _seed_messages():
    out = []
    ref = IMPLS[-1]
    for name in list_dialects():
        spec = load_dialect(name)
        doc = {}
        for k, v in SAMPLE_0200.items():
            fs = spec.get(k)
            if k == "t":
                doc[k] = v
                continue
            if fs is None:
                continue
            if fs.get("type") in ("z",) and fs["data_enc"] != "b":
                v = v.replace("D", "=")
            doc[k] = v
        # keep the sample fields whose size fits this dialect
        doc = {k: v for k, v in doc.items() if k == "t" or _encodes(ref, spec, k, v)}
        raw, _ = ref.encode(dict(doc), spec)
        out.append((spec, raw))
    return out


def _mutate(rng, raw: bytes) -> bytes:
    b = bytearray(raw)
    op = rng.randrange(8)
    if op == 0 and b:  # flip a bit
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncate
        del b[rng.randrange(len(b) + 1):]
    elif op == 2:  # trailing garbage
        b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    elif op == 3 and b:  # overwrite with a length-like token
        i = rng.randrange(len(b))
        tok = rng.choice([b"-1", b"+9", b" 9", b"1_0", b"99", b"\xff\xff", b"\x99\x99", b"000", b"ZZ"])
        b[i:i + len(tok)] = tok
    elif op == 4 and b:  # delete a span
        i = rng.randrange(len(b))
        del b[i:i + rng.randrange(1, 6)]
    elif op == 5 and b:  # duplicate a span
        i = rng.randrange(len(b))
        b[i:i] = b[i:i + rng.randrange(1, 12)]
    elif op == 6 and len(b) > 4:  # set random bitmap bits
        i = rng.randrange(4, min(len(b), 40))
        b[i] |= 1 << rng.randrange(8)
    else:  # random byte
        if b:
            b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def _outcome(impl, data, spec):
    try:
        doc, enc = impl.decode(data, spec)
        return ("ok", doc, enc.to_dict())
    except impl.DecodeError as e:
        assert isinstance(e.pos, int) and 0 <= e.pos <= len(data)
        assert isinstance(e.field, str)
        return ("err", e.msg, e.field, e.pos)


def test_random_and_mutated_inputs_raise_only_decode_error():
    rng = random.Random(8583)
    seeds = _seed_messages()
    assert len(seeds) >= 5
    tracemalloc.start()
    baseline = None
    accepted = rejected = 0
    for i in range(TOTAL):
        spec, raw = seeds[i % len(seeds)]
        if i % 5 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        else:
            data = raw
            for _ in range(rng.randrange(1, 4)):
                data = _mutate(rng, data)
        outcomes = [_outcome(impl, data, spec) for impl in IMPLS]
        for o in outcomes[1:]:
            assert o == outcomes[0], f"implementations disagree on input #{i}"
        if outcomes[0][0] == "ok":
            accepted += 1
        else:
            rejected += 1
        if i == 20_000:
            baseline = tracemalloc.get_traced_memory()[0]
    current = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    # flat memory: 80,000 further inputs leave no more than a small constant behind
    assert current - baseline < 512 * 1024, (baseline, current)
    assert accepted > 100 and rejected > 10_000, (accepted, rejected)


@pytest.mark.parametrize("impl", _impls("iso8583"))
def test_huge_declared_lengths_fail_fast(impl):
    spec = load_dialect("default_ascii")
    # LLL field 48 claims 999 bytes with only a few present, and a 4 GB-ish binary length
    raw = b"0200" + b"0000000000010000" + b"999abc"
    with pytest.raises(impl.DecodeError) as e:
        impl.decode(raw, spec)
    assert e.value.field == "48"
    spec_b = load_dialect("default")
    spec_b["48"] = {"data_enc": "ascii", "len_enc": "b", "len_type": 4, "max_len": 999}
    raw = b"0200" + bytes.fromhex("0000000000010000") + b"\xff\xff\xff\xff" + b"x" * 10
    with pytest.raises(impl.DecodeError) as e:
        impl.decode(raw, spec_b)
    assert "larger than maximum" in e.value.msg
