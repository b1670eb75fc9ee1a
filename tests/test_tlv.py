"""EMV BER-TLV (DE55): both implementations, known data, bad input, tag dictionary."""
import importlib
import json
import pickle
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import emv, tlv
from tests.conftest import _impls

IMPLS = _impls("tlv")
PY = importlib.import_module("core._tlv_py")
HSETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A contact EMV purchase as a terminal sends it in DE55 (ARQC request).
ARQC_ITEMS = [
    ("9F26", bytes.fromhex("7B1A2C3D4E5F6071")),  # application cryptogram
    ("9F27", b"\x80"),  # ARQC
    ("9F10", bytes.fromhex("0110A00003220000000000000000000000FF")),
    ("9F37", bytes.fromhex("1A2B3C4D")),
    ("9F36", b"\x00\x2A"),
    ("95", bytes.fromhex("0000008000")),
    ("9A", bytes.fromhex("250314")),
    ("9C", b"\x00"),
    ("9F02", bytes.fromhex("000000012345")),
    ("5F2A", b"\x09\x78"),
    ("82", b"\x19\x80"),
    ("9F1A", b"\x02\x50"),
    ("9F03", bytes.fromhex("000000000000")),
    ("9F33", bytes.fromhex("E0F8C8")),
    ("9F34", bytes.fromhex("420300")),
    ("9F35", b"\x22"),
    ("84", bytes.fromhex("A0000000031010")),
    ("9F09", b"\x00\x8C"),
]
ARQC_HEX = (
    "9F26087B1A2C3D4E5F6071" "9F270180" "9F101201" "10A00003220000000000000000000000FF"
    "9F37041A2B3C4D" "9F3602002A" "95050000008000" "9A03250314" "9C0100"
    "9F0206000000012345" "5F2A020978" "82021980" "9F1A020250" "9F0306000000000000"
    "9F3303E0F8C8" "9F3403420300" "9F350122" "8407A0000000031010" "9F0902008C"
)
PAN = bytes.fromhex("4761739001010119")


def test_public_module_uses_selected_impl(selected_impl_name):
    assert tlv.IMPLEMENTATION == selected_impl_name
    assert issubclass(tlv.TLVError, ValueError)


@pytest.mark.parametrize("impl", IMPLS)
def test_known_de55_round_trip(impl):
    assert impl.encode_field55(ARQC_ITEMS) == ARQC_HEX
    assert impl.decode_field55(ARQC_HEX) == ARQC_ITEMS
    assert impl.decode_field55(ARQC_HEX.lower()) == ARQC_ITEMS
    assert impl.decode_tlv(bytes.fromhex(ARQC_HEX)) == ARQC_ITEMS
    assert impl.decode_tlv(bytearray.fromhex(ARQC_HEX)) == ARQC_ITEMS
    assert impl.decode_tlv(memoryview(bytes.fromhex(ARQC_HEX))) == ARQC_ITEMS
    assert impl.encode_tlv(iter(ARQC_ITEMS)) == bytes.fromhex(ARQC_HEX)


@pytest.mark.parametrize("impl", IMPLS)
def test_long_form_lengths(impl):
    for n, head in [(0, "00"), (127, "7F"), (128, "8180"), (255, "81FF"), (256, "820100"), (70000, "83011170")]:
        enc = impl.encode_tlv([("9F10", b"\xab" * n)])
        assert enc.hex().upper().startswith("9F10" + head)
        assert impl.decode_tlv(enc) == [("9F10", b"\xab" * n)]
    # Non-minimal long forms, as some cards send them, are accepted.
    assert impl.decode_tlv(bytes.fromhex("5F2A81020978")) == [("5F2A", b"\x09\x78")]
    assert impl.decode_tlv(bytes.fromhex("5F2A8200020978")) == [("5F2A", b"\x09\x78")]
    assert impl.decode_tlv(bytes.fromhex("5F2A84000000020978")) == [("5F2A", b"\x09\x78")]


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_and_constructed(impl):
    data = bytes.fromhex("00 FF 70 08 5A 02 4761 9F34 01 00 00 FF E1 04 E2 02 82 00 00")
    assert impl.decode_tlv(data) == [("70", bytes.fromhex("5A0247619F340100")), ("E1", bytes.fromhex("E2028200"))]
    tree = impl.decode_tlv_tree(data)
    assert tree == [("70", [("5A", b"\x47\x61"), ("9F34", b"\x00")]), ("E1", [("E2", [("82", b"")])])]
    assert impl.decode_tlv(impl.encode_tlv(tree)) == impl.decode_tlv(bytes.fromhex("70085A0247619F340100E104E2028200"))
    assert impl.decode_tlv(b"") == [] and impl.decode_tlv(b"\x00\xff") == []


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "hexdata,pos,fragment",
    [
        ("9F", 0, "truncated tag"),
        ("9F81", 0, "truncated tag"),
        ("9F2608", 2, "length 8 exceeds the 0 bytes left"),
        ("9F26", 2, "truncated length"),
        ("9F2681", 2, "truncated length"),
        ("9F268200", 2, "truncated length"),
        ("9F2680" + "00" * 8, 2, "indefinite length"),
        ("9F2685" + "00" * 8, 2, "length form 0x85"),
        ("9F26FF", 2, "length form 0xFF"),
        ("9F8181817F0100", 0, "tag longer than 4 bytes"),
        ("5A08" + PAN.hex()[:-2], 1, "length 8 exceeds the 7 bytes left"),
        ("82021980" "5A8110" + PAN.hex(), 5, "tag 5A: length 16 exceeds the 8 bytes left"),
        ("5A83FFFFFF" + PAN.hex(), 1, "length 16777215 exceeds"),
        ("5A84FFFFFFFF" + PAN.hex(), 1, "length 4294967295 exceeds"),
    ],
)
def test_malformed_input(impl, hexdata, pos, fragment):
    with pytest.raises(impl.TLVError) as ei:
        impl.decode_tlv(bytes.fromhex(hexdata))
    assert ei.value.pos == pos
    assert fragment in ei.value.msg
    # Values are card data: no message may echo them, in any spelling.
    text = str(ei.value)
    for secret in (PAN.hex(), PAN.hex().upper(), "47617390", "7390010"):
        assert secret not in text


@pytest.mark.parametrize("impl", IMPLS)
def test_tree_depth_limit(impl):
    def nest(levels):
        data = bytes.fromhex("8200")
        for _ in range(levels):
            data = bytes([0x70, len(data)]) + data
        return data

    assert impl.decode_tlv_tree(nest(impl.MAX_DEPTH - 1))
    with pytest.raises(impl.TLVError, match="nested deeper than 8") as ei:
        impl.decode_tlv_tree(nest(impl.MAX_DEPTH))
    assert ei.value.pos == 2 * (impl.MAX_DEPTH - 1)
    assert impl.decode_tlv(nest(50))[0][0] == "70"  # flat decode does not recurse


@pytest.mark.parametrize("impl", IMPLS)
def test_encode_checks(impl):
    for tag in ("9F", "1F80", "9F8181", "DF81", "9F268F", "00", "FF01", "", "9F2", "9G26", "9F 26", "9F26272829", PAN.hex()):
        with pytest.raises(impl.TLVError) as ei:
            impl.encode_tlv([("82", b"\x19\x80"), (tag, PAN)])
        assert ei.value.pos == 1
        assert PAN.hex() not in str(ei.value)
    assert impl.encode_tlv([("9f26", b"")]) == b"\x9f\x26\x00"
    assert impl.encode_tlv([("DF8101", b"\x01")]) == b"\xdf\x81\x01\x01\x01"
    with pytest.raises(TypeError):
        impl.encode_tlv([(0x82, b"")])
    with pytest.raises(TypeError):
        impl.encode_tlv([("82", "1980")])
    with pytest.raises(TypeError):
        impl.encode_tlv([("82",)])
    with pytest.raises(impl.TLVError, match="primitive"):
        impl.encode_tlv([("82", [])])
    with pytest.raises(impl.TLVError) as ei:
        impl.decode_field55("9F26 01")
    assert ei.value.pos == 4
    with pytest.raises(impl.TLVError, match="odd"):
        impl.decode_field55("9F2601A")
    with pytest.raises(TypeError):
        impl.decode_field55(b"9F2600")
    with pytest.raises(TypeError):
        impl.decode_tlv("9F2600")


@pytest.mark.parametrize("impl", IMPLS)
def test_tlv_error_pickles(impl):
    err = impl.TLVError("tag 9F26: truncated length", 2)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is impl.TLVError
    assert (back.msg, back.pos, str(back)) == (err.msg, 2, str(err))


# ---------------------------------------------------------------- properties

def _tag():
    first_short = st.integers(0x01, 0xFE).filter(lambda b: b & 0x1F != 0x1F)
    first_long = st.integers(0, 6).map(lambda k: (k << 5) | 0x1F)
    middle = st.lists(st.integers(0x80, 0xFF), max_size=2)
    last = st.integers(0x00, 0x7F)
    short = first_short.map(lambda b: bytes([b]))
    long = st.tuples(first_long, middle, last).map(lambda t: bytes([t[0], *t[1], t[2]]))
    return st.one_of(short, long).map(lambda b: b.hex().upper())


@pytest.mark.parametrize("impl", IMPLS)
@HSETTINGS
@given(items=st.lists(st.tuples(_tag(), st.binary(max_size=300)), max_size=10))
def test_encode_decode_round_trip(impl, items):
    enc = impl.encode_tlv(items)
    assert impl.decode_tlv(enc) == items
    assert impl.decode_field55(impl.encode_field55(items)) == items
    assert enc == PY.encode_tlv(items)


def _outcome(fn, data):
    try:
        return ("ok", fn(data))
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return (type(e).__name__, getattr(e, "msg", None), getattr(e, "pos", None), str(e))


@pytest.mark.parametrize("impl", IMPLS)
@HSETTINGS
@given(data=st.binary(max_size=80))
def test_random_bytes_match_python_twin(impl, data):
    for name in ("decode_tlv", "decode_tlv_tree"):
        got = _outcome(getattr(impl, name), data)
        assert got == _outcome(getattr(PY, name), data)
        assert got[0] in ("ok", "TLVError")
    assert _outcome(impl.decode_field55, data.hex()) == _outcome(PY.decode_field55, data.hex())


@pytest.mark.parametrize("impl", IMPLS)
@HSETTINGS
@given(flips=st.lists(st.tuples(st.integers(0, 10**4), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.integers(0, 200))
def test_mutated_de55_matches_python_twin(impl, flips, cut):
    data = bytearray.fromhex(ARQC_HEX)
    for at, val in flips:
        data[at % len(data)] = val
    data = bytes(data[: len(data) - cut % 10])
    for name in ("decode_tlv", "decode_tlv_tree"):
        assert _outcome(getattr(impl, name), data) == _outcome(getattr(PY, name), data)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_100k_random_and_mutated_inputs_raise_only_tlv_error(impl):
    rng = random.Random(55)
    seed = bytes.fromhex(ARQC_HEX) + bytes.fromhex("7008" "5A08") + PAN
    ok = bad = 0
    for i in range(100_000):
        if i % 2:
            data = bytearray(seed)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data[: rng.randrange(len(data) + 1)])
        else:
            data = rng.randbytes(rng.randrange(0, 24))
        try:
            (impl.decode_tlv_tree if i % 3 == 0 else impl.decode_tlv)(data)
            ok += 1
        except impl.TLVError:
            bad += 1
    assert ok > 1000 and bad > 1000


# ---------------------------------------------------------------- tag dictionary

REQUIRED_TAGS = (
    "4F 50 57 5A 5F20 5F24 5F25 5F28 5F2A 5F34 82 84 8A 8E 95 9A 9B 9C 9F02 9F03 9F06 9F07 9F09 "
    "9F0D 9F0E 9F0F 9F10 9F1A 9F1E 9F21 9F26 9F27 9F33 9F34 9F35 9F36 9F37 9F41 9F53 9F6E"
).split()


def test_emv_dictionary():
    assert len(emv.TAGS) >= 40
    for tag in REQUIRED_TAGS:
        info = emv.tag_info(tag)
        assert info is not None, tag
        assert info["format"] in ("b", "n", "cn", "a", "an", "ans")
        assert 0 <= info["min_len"] <= info["max_len"]
        assert isinstance(info["sensitive"], bool) and info["name"]
    assert {"56", "57", "5A", "5F20", "5F24", "9F1F", "9F6B"} <= emv.SENSITIVE_TAGS
    assert not {"9F26", "9F27", "95", "9F02", "82"} & emv.SENSITIVE_TAGS
    assert emv.tag_info("9f26")["name"] == "Application Cryptogram"
    assert emv.tag_info("DFFF01") is None
    emv.tag_info("5A")["sensitive"] = False  # a copy: the dictionary is unchanged
    assert "5A" in emv.SENSITIVE_TAGS and emv.tag_info("5A")["sensitive"] is True


def test_emv_dictionary_locations():
    core_dir = Path(emv.__file__).resolve().parent
    assert emv.SEARCH_PATHS == (core_dir / "dialects" / "emv_tags.json", core_dir.parent / "codecs" / "emv_tags.json")
    raw = json.loads(emv.SEARCH_PATHS[1].read_text())
    assert all(tag == tag.upper() for tag in raw["tags"])
    # Every tag in the dictionary is one encode_tlv accepts.
    tlv.encode_tlv([(tag, b"") for tag in raw["tags"]])
