"""Codec behaviour: pyiso8583 compatibility, strictness, errors that never leak card data."""
import os
import pickle

import iso8583 as pyiso
import pytest

from core import iso8583 as public
from core.dialect import load_dialect
from tests.conftest import _impls

PAN = "4761739001010010"  # test PAN (Visa test range)


@pytest.fixture(params=_impls("iso8583"))
def impl(request):
    return request.param


def test_selected_implementation_follows_environment():
    expected = "python" if os.environ.get("ISOSWITCH_NO_EXTENSIONS") == "1" else "cython"
    assert public.IMPLEMENTATION == expected
    assert public.encode.__module__.endswith("_py") == (expected == "python")


def test_pyiso8583_docstring_example(impl):
    spec = load_dialect("default_ascii")
    raw = b"02004010100000000000161234567890123456123456111"
    doc, enc = impl.decode(raw, spec)
    assert doc == {"t": "0200", "p": "4010100000000000", "2": "1234567890123456",
                   "12": "123456", "20": "111"}
    assert list(doc) == ["t", "p", "2", "12", "20"]
    assert enc["2"] == {"len": b"16", "data": b"1234567890123456"}
    assert enc == pyiso.decode(raw, spec)[1]
    out, enc2 = impl.encode({"t": "0210", "3": "111111", "39": "05"}, spec)
    assert out == b"0210200000000200000011111105"
    assert type(out) is bytes


def test_encode_sets_bitmaps_like_pyiso8583(impl):
    spec = load_dialect("default")
    doc = {"t": "0800", "70": "301", "1": "garbage", "65": "ignored"}
    raw, enc = impl.encode(doc, spec)
    assert doc["p"] == "8000000000000000"
    assert doc["1"] == "0400000000000000"
    assert "65" not in doc
    ref = {"t": "0800", "70": "301"}
    ref_raw, ref_enc = pyiso.encode(ref, spec)
    assert raw == bytes(ref_raw) and enc == ref_enc and doc == ref


def test_accepts_bytearray_and_memoryview(impl):
    spec = load_dialect("default_ascii")
    raw = b"02004010100000000000161234567890123456123456111"
    assert impl.decode(bytearray(raw), spec)[0] == impl.decode(memoryview(raw), spec)[0]


def test_type_errors(impl):
    spec = load_dialect("default")
    with pytest.raises(TypeError):
        impl.decode("0200", spec)
    with pytest.raises(TypeError):
        impl.encode([("t", "0200")], spec)


@pytest.mark.parametrize("digits", [b"-1", b"+9", b" 9", b"9 ", b"1_", b"\x00\x31", b"\xb9\xb9"])
def test_length_digits_must_be_digits(impl, digits):
    spec = load_dialect("default_ascii")
    raw = b"0200" + b"4000000000000000" + digits + b"4" * 9
    with pytest.raises(impl.DecodeError) as e:
        impl.decode(raw, spec)
    assert e.value.field == "2" and e.value.pos == 20
    assert "length" in e.value.msg


def test_underscore_length_is_rejected_where_int_accepts_it(impl):
    spec = load_dialect("default_ascii")
    raw = b"0200" + b"0000000000010000" + b"1_0" + b"x" * 10  # field 48 is LLL
    with pytest.raises(impl.DecodeError) as e:
        impl.decode(raw, spec)
    assert e.value.field == "48"


def test_bitmap_bit_without_field_in_spec(impl):
    spec = load_dialect("default_ascii")
    del spec["20"]
    raw = b"02004010100000000000161234567890123456123456111"
    with pytest.raises(impl.DecodeError) as e:
        impl.decode(raw, spec)
    assert (e.value.field, e.value.pos) == ("20", 44)
    assert "not defined" in e.value.msg


def test_missing_secondary_bitmap(impl):
    spec = load_dialect("default")
    raw = b"0800" + bytes.fromhex("8000000000000000") + b"\x04\x00"
    with pytest.raises(impl.DecodeError) as e:
        impl.decode(raw, spec)
    assert e.value.field == "1" and e.value.pos == 12


def test_non_hex_bitmap(impl):
    spec = load_dialect("default_ascii")
    for bad in (b"40101000000000G0", b"4010 00000000000", b"\xff" * 16):
        with pytest.raises(impl.DecodeError) as e:
            impl.decode(b"0200" + bad + b"16" + PAN.encode(), spec)
        assert e.value.field == "p" and e.value.pos == 4


@pytest.mark.parametrize("codec", ["utf-16-be", "utf-32-be", "utf-8-sig"])
def test_hex_bitmap_in_a_multibyte_codec_is_a_decode_error(impl, codec):
    """16 bytes of utf-16 are 8 hex digits, not 16: a DecodeError in both
    implementations. The twin let IndexError out (a 4-byte bitmap indexed to 8)
    and ValueError from bytes.fromhex."""
    spec = load_dialect("default_ascii")
    for k in ("p", "1"):
        spec[k] = dict(spec[k], data_enc=codec)
    bitmaps = [b"\x00\x00" * 8, "40000000".encode("utf-16-be"), "7000".encode("utf-32-be"),
               b"\xef\xbb\xbf" + b"4" + b"0" * 12, b"\xfe\xff" + "4000000".encode("utf-16-be")]
    for bm in bitmaps:
        with pytest.raises(impl.DecodeError) as e:
            impl.decode(b"0200" + bm + b"16" + PAN.encode(), spec)
        assert (e.value.field, e.value.pos) == ("p", 4)


def test_odd_bcd_without_pad_is_a_decode_error(impl):
    spec = load_dialect("iso87binary")
    spec["2"].pop("right_pad")
    raw = bytes.fromhex("0200" + "4000000000000000") + bytes([0x15]) + bytes.fromhex("4761739001010010")
    with pytest.raises(impl.DecodeError) as e:
        impl.decode(raw, spec)
    assert e.value.field == "2"
    with pytest.raises(impl.EncodeError):
        impl.encode({"t": "0200", "2": PAN[:15]}, spec)


def test_odd_bcd_with_pad(impl):
    spec = load_dialect("iso87binary")
    raw, _ = impl.encode({"t": "0200", "2": PAN[:15], "3": "000000"}, spec)
    doc, _ = impl.decode(raw, spec)
    assert doc["2"] == PAN[:15] and doc["3"] == "000000"


def test_trailing_bytes(impl):
    spec = load_dialect("default_ascii")
    raw = b"02004010100000000000161234567890123456123456111" + b"\x00"
    with pytest.raises(impl.DecodeError) as e:
        impl.decode(raw, spec)
    assert (e.value.msg, e.value.field, e.value.pos) == ("Extra data after last field", "20", 47)


def test_errors_pickle_cleanly(impl):
    spec = load_dialect("default_ascii")
    try:
        impl.decode(b"0200", spec)
    except impl.DecodeError as e:
        e2 = pickle.loads(pickle.dumps(e))
        assert (e2.msg, e2.field, e2.pos, str(e2)) == (e.msg, e.field, e.pos, str(e))
    else:
        pytest.fail("no error")
    try:
        impl.encode({"t": "0200", "2": "x" * 30}, spec)
    except impl.EncodeError as e:
        e2 = pickle.loads(pickle.dumps(e))
        assert (e2.msg, e2.field, str(e2)) == (e.msg, e.field, str(e))
    else:
        pytest.fail("no error")


CARD_FIELDS = {
    "2": PAN, "14": "2812", "35": PAN + "=28122011143804400000",
    "45": "B" + PAN + "^TEST/CARD^2812", "52": "0123456789ABCDEF",
}


@pytest.mark.parametrize("dialect", ["default", "default_ascii", "iso87binary", "ebcdic", "iso93ascii"])
def test_error_text_never_contains_card_data(impl, dialect):
    spec = load_dialect(dialect)
    secrets = [PAN, PAN[:6] + "739001", "28122011143804400000", "TEST/CARD"]
    msgs = []
    # encode errors: each card field made too long, non-encodable, or wrong type
    for k, v in CARD_FIELDS.items():
        if k not in spec:
            continue
        for bad in (v * 20, v + "\u20ac", v[:-1] + "Z" if spec[k]["data_enc"] == "b" else v + "\u0100"):
            try:
                impl.encode({"t": "0200", k: bad}, spec)
            except impl.EncodeError as e:
                msgs.append(str(e) + repr(e.args))
    # decode errors: truncate / corrupt a valid message at every position
    doc = {"t": "0200", "2": PAN}
    raw, _ = impl.encode(doc, spec)
    for cut in range(len(raw)):
        for data in (raw[:cut], raw[:cut] + b"\xff" + raw[cut + 1:]):
            try:
                impl.decode(data, spec, strict=True)
            except impl.DecodeError as e:
                msgs.append(str(e) + repr(e.args))
    assert msgs
    for m in msgs:
        for s in secrets:
            assert s not in m


def test_strict_numeric(impl):
    spec = load_dialect("default_ascii")
    doc = {"t": "0200", "3": "00000A", "4": "000000001000"}
    raw, _ = impl.encode(dict(doc), spec)  # lenient by default, like pyiso8583
    with pytest.raises(impl.EncodeError) as e:
        impl.encode(dict(doc), spec, strict=True)
    assert e.value.field == "3"
    with pytest.raises(impl.DecodeError) as e:
        impl.decode(raw, spec, strict=True)
    assert e.value.field == "3"
    doc["3"] = "000000"
    raw, _ = impl.encode(dict(doc), spec, strict=True)
    assert impl.decode(raw, spec, strict=True)[0]["3"] == "000000"


@pytest.mark.parametrize("doc,field", [
    ({"2": PAN}, "t"),
    ({"t": "02000", "2": PAN}, "t"),
    ({"t": "0200", "193": "x"}, "p"),
    ({"t": "0200", "02": "x"}, "p"),
    ({"t": "0200", 2: "x"}, "p"),
    ({"t": "0200", "2": 4761}, "2"),
    ({"t": "0200", "2": b"4761"}, "2"),
    ({"t": "0200", "52": "XYZ0123456789ABC"}, "52"),
    ({"t": "0200", "52": "0123"}, "52"),
    ({"t": "0200", "3": "12345"}, "3"),
])
def test_encode_errors_are_typed(impl, doc, field):
    with pytest.raises(impl.EncodeError) as e:
        impl.encode(doc, load_dialect("default"))
    assert e.value.field == field


def test_undefined_field_in_document(impl):
    spec = load_dialect("default")
    del spec["33"]
    with pytest.raises(impl.EncodeError) as e:
        impl.encode({"t": "0200", "33": "1"}, spec)
    assert e.value.field == "33"


def test_spec_errors(impl):
    spec = load_dialect("default")
    spec["2"] = dict(spec["2"], data_enc="no-such-codec")
    with pytest.raises(impl.SpecError) as e:
        impl.compile_spec(spec)
    assert e.value.field == "2"
    with pytest.raises(impl.SpecError):
        impl.compile_spec({"t": spec["t"], "p": spec["p"]})


def test_spec_cache_and_compiled_spec(impl):
    spec = load_dialect("default_ascii")
    cs = impl.compile_spec(spec)
    assert impl.compile_spec(spec) is cs
    doc = {"t": "0200", "2": PAN}
    assert impl.encode(dict(doc), cs)[0] == impl.encode(dict(doc), spec)[0]
    impl.clear_spec_cache()
    assert impl.compile_spec(spec) is not cs


def test_encoded_doc_is_a_read_only_mapping(impl):
    from collections.abc import Mapping
    spec = load_dialect("default_ascii")
    raw, enc = impl.encode({"t": "0200", "2": PAN}, spec)
    assert isinstance(enc, Mapping)
    assert list(enc) == ["t", "p", "2"] and len(enc) == 3 and "2" in enc
    assert dict(enc) == pyiso.encode({"t": "0200", "2": PAN}, spec)[1]
    with pytest.raises(TypeError):
        enc["2"] = {}


def test_ebcdic_layout_bytes(impl):
    spec = load_dialect("ebcdic")
    raw, _ = impl.encode({"t": "0200", "2": PAN, "41": "TERM0001"}, spec)
    assert raw[:4] == "0200".encode("cp500")
    assert raw[12:14] == "16".encode("cp500")
    assert impl.decode(raw, spec)[0]["41"] == "TERM0001"


def test_header_field(impl):
    spec = load_dialect("default_ascii")
    spec["h"] = {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 5}
    raw, enc = impl.encode({"h": "ISO02", "t": "0200", "2": PAN}, spec)
    assert raw.startswith(b"ISO020200")
    assert bytes(pyiso.encode({"h": "ISO02", "t": "0200", "2": PAN}, spec)[0]) == raw
    assert impl.decode(raw, spec)[0]["h"] == "ISO02"
    with pytest.raises(impl.EncodeError) as e:
        impl.encode({"t": "0200"}, spec)
    assert e.value.field == "h"
