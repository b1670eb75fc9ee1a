"""Differential tests: Cython codec, pure-Python twin and pyiso8583 agree byte for byte.

For random valid documents over every dialect, all implementations produce
identical bytes, and decoding gives identical documents (and doc_enc).
"""
import copy

import iso8583 as pyiso
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.dialect import list_dialects, load_dialect
from tests.conftest import _impls
from tests.iso_strategies import documents, with_tertiary

IMPLS = [p.values[0] for p in _impls("iso8583")]
EXAMPLES = 2000

DIALECTS = list_dialects()


def _check_all(spec, doc, pyiso_ok=True):
    results = []
    for impl in IMPLS:
        d = copy.deepcopy(doc)
        raw, enc = impl.encode(d, spec)
        assert isinstance(raw, bytes)
        dec, dec_enc = impl.decode(raw, spec)
        results.append((impl.__name__, raw, d, enc.to_dict(), dec, dec_enc.to_dict()))
    first = results[0]
    for other in results[1:]:
        assert other[1] == first[1], f"{other[0]} bytes differ from {first[0]}"
        assert other[2:] == first[2:]
    name, raw, mutated, enc, dec, dec_enc = first
    # decoding gives back the document the encoder saw (bitmaps included)
    assert dec == mutated
    assert enc == dec_enc
    if pyiso_ok:
        d = copy.deepcopy(doc)
        ref_raw, ref_enc = pyiso.encode(d, spec)
        assert bytes(ref_raw) == raw
        assert ref_enc == enc
        assert d == mutated
        ref_dec, ref_dec_enc = pyiso.decode(bytes(ref_raw), spec)
        assert ref_dec == dec
        assert ref_dec_enc == dec_enc


@pytest.mark.parametrize("dialect", DIALECTS)
def test_dialect_round_trip_matches_pyiso8583(dialect):
    spec = load_dialect(dialect)
    compatible = spec.get("_meta", {}).get("pyiso8583_compatible", True)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(documents(spec))
    def run(doc):
        _check_all(spec, doc, pyiso_ok=compatible)

    run()


@pytest.mark.parametrize("base", ["default_ascii", "default"])
def test_tertiary_bitmap_matches_pyiso8583(base):
    """Fields 129..192 (tertiary bitmap), hex-text and binary bitmaps."""
    spec = with_tertiary(load_dialect(base))

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(documents(spec, cap=16))
    def run(doc):
        _check_all(spec, doc)

    run()


@st.composite
def _random_spec(draw):
    """Random field layouts: every encoding combination the codec supports."""
    spec = copy.deepcopy(load_dialect("default"))
    text_encs = ["ascii", "latin-1", "cp500", "cp037"]
    for k in ("2", "3", "4", "35", "43", "48", "55", "60", "70", "100", "127"):
        data_enc = draw(st.sampled_from(["b"] + text_encs))
        len_type = draw(st.integers(0, 4))
        len_enc = draw(st.sampled_from(["b", "bcd"] + text_encs))
        nibbles = data_enc == "b" and draw(st.booleans())
        digits_cap = {0: 99, 1: 9, 2: 99, 3: 999, 4: 9999}[len_type]
        if len_enc == "b":
            cap = 255 if len_type == 1 else 999
        elif len_enc == "bcd":
            cap = min(10 ** (2 * len_type) - 1, 999) if len_type else 99
        else:
            cap = digits_cap
        max_len = draw(st.integers(1, max(1, min(cap, 60))))
        fs = {"data_enc": data_enc, "len_enc": len_enc, "len_type": len_type, "max_len": max_len}
        if nibbles:
            fs["len_count"] = "nibbles"
            fs[draw(st.sampled_from(["left_pad", "right_pad"]))] = draw(st.sampled_from("0F"))
        spec[k] = fs
    spec["t"] = {"data_enc": draw(st.sampled_from(["b", "ascii", "cp500"])), "len_enc": "ascii",
                 "len_type": 0, "max_len": 4}
    bm = draw(st.sampled_from(["b", "ascii", "cp500"]))
    for k in ("p", "1"):
        spec[k] = {"data_enc": bm, "len_enc": "ascii", "len_type": 0, "max_len": 8 if bm == "b" else 16}
    hdr = draw(st.integers(0, 5))
    spec["h"] = {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": hdr}
    return spec


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_layouts_match_pyiso8583(data):
    spec = data.draw(_random_spec())
    doc = data.draw(documents({k: v for k, v in spec.items()
                               if k in ("h", "t", "p", "1", "2", "3", "4", "35", "43",
                                        "48", "55", "60", "70", "100", "127")}, cap=30))
    _check_all(spec, doc)
