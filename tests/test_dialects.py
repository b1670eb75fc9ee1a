"""Wire dialects (codecs/*.json) and their loader (core/dialect.py).

Every dialect is a plain pyiso8583 4.x spec, so pyiso8583 itself is the
oracle here: it must encode and decode a realistic 0200 under each one.
"""
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import iso8583
import iso8583.specs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import dialect
from core.dialect import DialectError, card_data_fields, list_dialects, load_dialect, validate_spec

REPO = Path(__file__).resolve().parent.parent
CODECS = REPO / "codecs"
SHIPPED = ("default", "default_ascii", "ebcdic", "iso87binary", "iso93ascii")
PYISO_PROPS = ("data_enc", "len_enc", "len_type", "max_len", "desc", "len_count", "left_pad", "right_pad")
CARD_FIELDS = frozenset(("2", "14", "34", "35", "36", "45", "52", "55"))

# Test card only (a published test PAN); never a real one in the repository.
TEST_PAN = "4761739001010010"


def _compatible_dialects():
    return [n for n in list_dialects() if load_dialect(n)["_meta"]["pyiso8583_compatible"]]


def make_0200(spec):
    """A purchase request whose values fit the field lengths of `spec`.

    1987 and 1993 disagree on some fixed lengths (DE12 n6 vs n12, DE22 n3 vs
    an12, DE25 n2 vs n4) and on DE43 (ans40 fixed vs LL ans..99).
    """
    by_length = {
        "12": {6: "153012", 12: "251121153012"},
        "22": {3: "051", 12: "51010151134C"},
        "25": {2: "00", 4: "1510"},
    }
    doc = {
        "t": "0200",
        "2": TEST_PAN,
        "3": "000000",
        "4": "000000012345",
        "7": "1121153012",
        "11": "000123",
        "13": "1121",
        "14": "2512",
        "18": "5411",
        # Odd length on purpose: exercises the pad nibble of BCD layouts.
        "35": TEST_PAN + "=25122011000012345",
        "37": "532112345678",
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "43": "ISOSWITCH TEST SHOP>LONDON GB",
        "49": "840",
        "52": "0123456789ABCDEF",
        "55": "9F02060000000123459F2608A1B2C3D4E5F6A7B89F360200019F3704DEADBEEF",
    }
    for key, choices in by_length.items():
        doc[key] = choices[spec[key]["max_len"]]
    if spec["43"]["len_type"] == 0:
        doc["43"] = doc["43"].ljust(spec["43"]["max_len"])
    if spec["35"]["data_enc"] == "b":
        # BCD track 2 carries the '=' separator as the nibble D.
        doc["35"] = doc["35"].replace("=", "D")
    return doc


def roundtrip(doc, spec):
    sent = dict(doc)
    raw, _ = iso8583.encode(sent, spec)  # adds "p" (and "1") to `sent`
    decoded, _ = iso8583.decode(raw, spec)
    again, _ = iso8583.encode(dict(decoded), spec)
    return raw, sent, decoded, again


# --- every dialect -----------------------------------------------------------


def test_shipped_dialects_are_listed():
    assert set(SHIPPED) <= set(list_dialects())


@pytest.mark.parametrize("name", SHIPPED)
def test_dialect_loads_and_validates(name):
    spec = load_dialect(name)
    validate_spec(spec)
    meta = spec["_meta"]
    assert meta["name"] == name
    assert meta["standard"] in ("ISO 8583:1987", "ISO 8583:1993")
    assert isinstance(meta["description"], str) and meta["description"]
    assert meta["pyiso8583_compatible"] is True
    assert set(spec) - {"_meta"} == {"h", "t", "p", "1", *map(str, range(2, 129))}
    for key, fs in spec.items():
        if key != "_meta":
            assert fs["type"] in ("n", "an", "ans", "b", "z", "xn", "bitmap", "mti"), key
            assert fs.get("desc"), key


@pytest.mark.parametrize("name", SHIPPED)
def test_card_data_fields_are_marked(name):
    spec = load_dialect(name)
    assert card_data_fields(spec) == CARD_FIELDS
    for key in CARD_FIELDS:
        assert spec[key]["card_data"] is True


@pytest.mark.parametrize("name", ["default", "default_ascii"])
def test_default_dialects_equal_pyiso8583_specs(name):
    ours = load_dialect(name)
    theirs = getattr(iso8583.specs, name)
    assert set(ours) - {"_meta"} == set(theirs)
    for key, fs in theirs.items():
        assert {p: ours[key][p] for p in PYISO_PROPS if p in ours[key]} == fs, key


@pytest.mark.parametrize("name", _compatible_dialects())
def test_pyiso8583_roundtrips_a_0200(name):
    spec = load_dialect(name)
    doc = make_0200(spec)
    raw, sent, decoded, again = roundtrip(doc, spec)
    assert decoded == sent
    assert {k: v for k, v in decoded.items() if k not in ("p", "1")} == doc
    assert again == raw
    # "_meta" must not disturb pyiso8583's pretty printer either.
    iso8583.pp(decoded, spec, stream=io.StringIO())


@settings(max_examples=60, deadline=None)
@given(pan=st.text("0123456789", min_size=12, max_size=19), stan=st.integers(0, 999999))
def test_pyiso8583_roundtrips_any_pan_length(pan, stan):
    # Odd and even PAN lengths under every dialect: the BCD pad nibble must
    # come off again on decode.
    for name in _compatible_dialects():
        spec = load_dialect(name)
        doc = dict(make_0200(spec), **{"2": pan, "11": f"{stan:06d}", "32": pan[:11]})
        raw, sent, decoded, again = roundtrip(doc, spec)
        assert decoded == sent, name
        assert again == raw, name


# --- wire shape of the non-default layouts -------------------------------------


def test_iso87binary_wire_is_jpos_style():
    spec = load_dialect("iso87binary")
    doc = {"t": "0200", "2": "476173900101001", "3": "000000", "22": "051", "35": "4761739001010010D2512"}
    raw, _ = iso8583.encode(doc, spec)
    assert raw[:2] == b"\x02\x00"  # MTI: 2 bytes BCD
    body = raw[2 + 8 :]
    # DE2: BCD length counting digits, odd length right-padded with 0 (IFB_LLNUM).
    assert body.startswith(bytes.fromhex("15" "4761739001010010"))
    body = body[9:]
    assert body.startswith(bytes.fromhex("000000"))  # DE3 n6: 3 bytes BCD
    body = body[3:]
    assert body.startswith(bytes.fromhex("0051"))  # DE22 n3: left-padded with 0
    body = body[2:]
    assert body == bytes.fromhex("21" "4761739001010010D25120")  # DE35: 21 nibbles + pad


def test_iso87binary_text_field_has_bcd_length():
    spec = load_dialect("iso87binary")
    raw, _ = iso8583.encode({"t": "0110", "44": "ADDITIONAL"}, spec)
    assert raw.endswith(b"\x10ADDITIONAL")
    raw, _ = iso8583.encode({"t": "0110", "55": "AB" * 120}, spec)
    assert raw.endswith(b"\x01\x20" + b"\xab" * 120)  # LLL as 2 BCD bytes


def test_ebcdic_wire():
    spec = load_dialect("ebcdic")
    raw, _ = iso8583.encode({"t": "0800", "11": "000001", "70": "301", "55": "9F3704DEADBEEF"}, spec)
    assert raw[:4] == "0800".encode("cp500") == b"\xf0\xf8\xf0\xf0"
    assert raw[4:6] == b"\x80\x20"  # binary bitmap: bit 1 (DE70 needs the secondary), bit 11
    assert "000001".encode("cp500") in raw
    assert raw.endswith("301".encode("cp500"))
    assert "007".encode("cp500") + bytes.fromhex("9F3704DEADBEEF") in raw


def test_iso93ascii_wire():
    spec = load_dialect("iso93ascii")
    doc = {"t": "1200", "12": "251121153012", "24": "200", "52": "0123456789ABCDEF", "55": "9F3704DEADBEEF"}
    raw, _ = iso8583.encode(doc, spec)
    assert raw[:4] == b"1200"
    assert raw[4:20] == b"0010010000001200"  # hex-text bitmap: 12, 24, 52, 55
    assert b"251121153012200" in raw
    assert b"0123456789ABCDEF" in raw  # fixed binary as hex text
    assert raw.endswith(b"007" + bytes.fromhex("9F3704DEADBEEF"))  # LLL counts bytes


# --- loader ------------------------------------------------------------------


def test_load_returns_a_fresh_copy():
    first = load_dialect("default")
    first["2"]["max_len"] = 1
    first["_meta"]["name"] = "mutated"
    del first["35"]
    second = load_dialect("default")
    assert second["2"]["max_len"] == 19
    assert second["_meta"]["name"] == "default"
    assert "35" in second


def test_load_caches_the_parsed_file(monkeypatch):
    calls = []
    real = dialect._parse
    monkeypatch.setattr(dialect, "_parse", lambda path: calls.append(path) or real(path))
    dialect._cache.clear()
    load_dialect("iso93ascii")
    load_dialect("iso93ascii")
    assert len(calls) == 1


def test_unknown_name_lists_available():
    with pytest.raises(DialectError) as exc:
        load_dialect("visa-base1")
    message = str(exc.value)
    assert "visa-base1" in message
    for name in SHIPPED:
        assert name in message


@pytest.mark.parametrize("name", ["", "../codecs/default", "default.JSON", "no/such.json"])
def test_bad_names_raise(name):
    with pytest.raises(DialectError):
        load_dialect(name)


def test_load_by_path(tmp_path):
    path = tmp_path / "acq.json"
    path.write_text((CODECS / "ebcdic.json").read_text())
    assert load_dialect(str(path)) == load_dialect("ebcdic")


def test_env_dir_comes_first(tmp_path, monkeypatch):
    spec = load_dialect("default")
    spec["_meta"]["name"] = "overridden"
    (tmp_path / "default.json").write_text(json.dumps(spec))
    (tmp_path / "acquirer_x.json").write_text(json.dumps(spec))
    monkeypatch.setenv("ISOSWITCH_DIALECTS_DIR", str(tmp_path))
    assert load_dialect("default")["_meta"]["name"] == "overridden"
    assert "acquirer_x" in list_dialects()
    assert set(SHIPPED) <= set(list_dialects())  # the fallbacks still count


def test_malformed_json(tmp_path, monkeypatch):
    (tmp_path / "broken.json").write_text('{"h": {"data_enc": "ascii",')
    monkeypatch.setenv("ISOSWITCH_DIALECTS_DIR", str(tmp_path))
    with pytest.raises(DialectError, match=r"malformed JSON .*broken\.json.*line 1"):
        load_dialect("broken")


def test_duplicate_field_is_rejected(tmp_path):
    text = (CODECS / "default.json").read_text()
    line = next(l for l in text.splitlines() if l.startswith('  "35"'))
    path = tmp_path / "dup.json"
    path.write_text(text.replace(line, line + "\n" + line))
    with pytest.raises(DialectError, match="duplicate key '35'") as exc:
        load_dialect(str(path))
    assert exc.value.field == "35"


def test_invalid_spec_in_file_names_the_field(tmp_path):
    spec = load_dialect("default")
    spec["48"]["len_type"] = 12
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(DialectError, match=r"bad\.json.*field '48' 'len_type'") as exc:
        load_dialect(str(path))
    assert (exc.value.field, exc.value.key) == ("48", "len_type")


def _set(field, prop, value):
    def mutate(spec):
        spec[field][prop] = value

    return mutate


def _delete(field, prop):
    def mutate(spec):
        del spec[field][prop]

    return mutate


INVALID = [
    (_delete("4", "max_len"), "4", "max_len"),
    (_delete("2", "len_enc"), "2", "len_enc"),
    (_set("2", "len_type", 9), "2", "len_type"),
    (_set("2", "len_type", -1), "2", "len_type"),
    (_set("2", "len_type", True), "2", "len_type"),
    (_set("3", "max_len", 0), "3", "max_len"),
    (_set("3", "max_len", "6"), "3", "max_len"),
    (_set("2", "max_len", 100), "2", "max_len"),  # LL (2 ASCII digits) cannot say 100
    (_set("3", "data_enc", "no-such-codec"), "3", "data_enc"),
    (_set("3", "data_enc", "bcd"), "3", "data_enc"),
    (_set("3", "data_enc", "hex"), "3", "data_enc"),  # bytes-to-bytes, not a text codec
    (_set("2", "len_enc", "utf-16"), "2", "len_enc"),  # a digit is not one byte
    (_set("2", "len_count", "bits"), "2", "len_count"),
    (_set("2", "len_count", "nibbles"), "2", "len_count"),  # nibbles with text data
    (_set("52", "left_pad", "FF"), "52", "left_pad"),
    (_set("52", "right_pad", "f"), "52", "right_pad"),
    (_set("52", "right_pad", "G"), "52", "right_pad"),
    (_set("11", "type", "numeric"), "11", "type"),
    (_set("2", "card_data", "yes"), "2", "card_data"),
    (_set("2", "lenght", 19), "2", "lenght"),
    (_set("p", "max_len", 12), "p", "max_len"),
    (_set("t", "len_type", 2), "t", "len_type"),
    (lambda spec: spec.update({"129": dict(spec["2"])}), "129", None),
    (lambda spec: spec.update({"35": "z..37"}), "35", None),
    (lambda spec: spec.pop("t"), "t", None),
]


@pytest.mark.parametrize("mutate, field, key", INVALID)
def test_validate_spec_names_field_and_key(mutate, field, key):
    spec = load_dialect("default")
    mutate(spec)
    with pytest.raises(DialectError) as exc:
        validate_spec(spec)
    assert exc.value.field == field
    assert exc.value.key == key
    assert repr(field) in str(exc.value)
    if key:
        assert repr(key) in str(exc.value)


def test_validate_nibble_field_needs_a_pad():
    spec = load_dialect("iso87binary")
    del spec["22"]["left_pad"]  # n3: 3 nibbles cannot fill whole bytes
    with pytest.raises(DialectError, match="left_pad or right_pad"):
        validate_spec(spec)


def test_validate_rejects_non_object():
    with pytest.raises(DialectError):
        validate_spec([])


def test_validate_accepts_plain_pyiso8583_specs():
    validate_spec(iso8583.specs.default)
    validate_spec(iso8583.specs.default_ascii)


def test_card_data_fallback_for_unmarked_spec():
    assert card_data_fields(iso8583.specs.default) == CARD_FIELDS
    spec = load_dialect("default")
    del spec["55"]["card_data"]
    assert "55" not in card_data_fields(spec)  # marked specs are taken at their word


def test_dialect_error_pickles():
    err = DialectError("field '2' 'max_len': bad", field="2", key="max_len")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ValueError)
    assert (str(back), back.field, back.key) == (str(err), "2", "max_len")


# --- codecs/ must stay data ----------------------------------------------------


def test_codecs_dir_is_not_a_package():
    assert not (CODECS / "__init__.py").exists()


def test_stdlib_codecs_is_not_shadowed():
    code = "import codecs, sys; codecs.lookup('ascii'); print(codecs.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Path(out).parent != CODECS
    assert Path(out).name == "codecs.py"
