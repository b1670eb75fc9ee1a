"""The logging layer masks card data itself, whatever the caller logs by mistake."""
from __future__ import annotations

import io
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from switch.logs import configure_logging, mask_text
from switch.messages import TEST_PAN, luhn_check_digit, luhn_ok, mask_pan

AMEX = "37828224631000" + luhn_check_digit("37828224631000")  # 15 digits
MC = "541333000000000" + luhn_check_digit("541333000000000")
GROUPED = " ".join(TEST_PAN[i:i + 4] for i in range(0, 16, 4))
TRACK2 = f"{TEST_PAN}={'2912'}101123456789"
PIN_BLOCK = "0412AC89ABCDEF67"


@pytest.fixture
def captured():
    buf = io.StringIO()
    root = logging.getLogger()
    old_level, old_handlers = root.level, list(root.handlers)
    handler = configure_logging("debug", "json", stream=buf)
    yield buf
    root.removeHandler(handler)
    root.setLevel(old_level)
    assert root.handlers == old_handlers


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(l) for l in buf.getvalue().splitlines() if l.strip()]


def assert_clean(text: str) -> None:
    for secret in (TEST_PAN, AMEX, MC, GROUPED, PIN_BLOCK, "101123456789"):
        assert secret not in text, secret


def _luhn_reference(pan: str) -> bool:
    """The textbook algorithm, digit by digit."""
    total = 0
    for i, d in enumerate(int(c) for c in reversed(pan)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@given(st.text(alphabet="0123456789", min_size=0, max_size=22))
def test_luhn_ok_matches_the_textbook_algorithm(digits):
    # the masking layer and the REST validation both rely on it
    assert luhn_ok(digits) == (12 <= len(digits) <= 19 and _luhn_reference(digits))


def test_luhn_ok_every_check_digit_and_non_digits():
    body = TEST_PAN[:-1]
    assert [luhn_ok(body + str(d)) for d in range(10)].count(True) == 1
    assert luhn_ok(body + luhn_check_digit(body))
    for bad in ("", "4761 7390 0101 0019", "\u0664" * 16, TEST_PAN[:-1] + "x"):
        assert not luhn_ok(bad)


def test_mask_text_rules():
    assert mask_text(f"pan {TEST_PAN} ok") == f"pan {mask_pan(TEST_PAN)} ok"
    assert mask_text(GROUPED) == mask_pan(TEST_PAN)
    assert mask_text(f"amex {AMEX}") == f"amex {mask_pan(AMEX)}"
    assert "[track data removed]" in mask_text(f"t2 ;{TRACK2}?") and TEST_PAN not in mask_text(TRACK2)
    assert TEST_PAN not in mask_text(TRACK2.replace("=", "D"))
    # not card numbers: non-Luhn runs, STAN/RRN/amounts, long ids, separate numbers
    bad_luhn = TEST_PAN[:-1] + str((int(TEST_PAN[-1]) + 1) % 10)
    for keep in (bad_luhn, "stan 000123 rrn 512312000123 amount 000000001000",
                 "id 123456789012345678901234", "0200 000123 0101120000"):
        assert mask_text(keep) == keep


def test_mask_text_removes_verification_codes_pins_and_api_key_secrets():
    """What an HTTP parser error quotes from a raw request: a JSON body with a
    CVV and an Authorization header with an API key."""
    raw = ('b\'{"pan": "4111111111111111", "cvv": "987", "expiry": "2912"}\' '
           "Authorization: Bearer isk_0a1b2c3d_AbCdEfGhIjKlMnOpQrStUvWxYz012345")
    out = mask_text(raw)
    assert '"cvv": "[removed]"' in out and "987" not in out
    assert "isk_0a1b2c3d_[removed]" in out and "AbCdEfGh" not in out
    assert "4111111111111111" not in out and '"expiry": "2912"' in out
    assert mask_text("cvc=123&amount=5 pin_block: 1234ABCD") == "cvc=[removed]&amount=5 pin_block: [removed]"
    # words that merely contain the names are left alone
    assert mask_text("the pinned version 12; spin: 3") == "the pinned version 12; spin: 3"


def test_mask_text_removes_card_data_of_a_logged_iso_document():
    """``log.info("req %s", doc)``, the careless call the layer exists for: the
    PAN was masked but the PIN block, track 1 and ICC data stayed in clear."""
    track1 = f"%B{TEST_PAN}^DOE/JOHN^2912101000000123000000?"
    doc = {"t": "0200", "2": TEST_PAN, "4": "000000001000", "35": TRACK2, "45": track1[1:-1],
           "52": PIN_BLOCK, "55": "9F2608A1B2C3D4E5F60718", "11": "000123"}
    for text in (str(doc), json.dumps(doc), str({**doc, "52": bytes.fromhex(PIN_BLOCK), "55": b"\x9f'\"x"})):
        out = mask_text(text)
        assert_clean(out)
        for secret in ("DOE/JOHN", "2912101000000123", "9F2608A1B2C3D4E5F60718", "x9f"):
            assert secret not in out, (secret, out)
        assert mask_pan(TEST_PAN) in out and "000000001000" in out and "000123" in out
        assert "[pin block removed]" in out
    # track 1 on its own, with and without sentinels, and a name padded with spaces
    for t1 in (track1, track1[1:-1], f"B{TEST_PAN}^DOE/JOHN{' ' * 18}^29121010000000000123"):
        out = mask_text(f"read {t1} ok")
        assert out == "read [track data removed] ok", out
    # prose that merely mentions the fields is left alone
    assert mask_text("field 52: 3 digits; DE45 absent") == "field 52: 3 digits; DE45 absent"


def test_mask_text_masks_a_pan_written_in_other_digits():
    """Fullwidth or Arabic-Indic digits are the same card number to a reader
    (and the REST shim echoes an unknown field's name through mask_text)."""
    for zero in (0xFF10, 0x660):
        other = "".join(chr(zero + int(c)) for c in TEST_PAN)
        assert mask_text(f"field {other}") == f"field {mask_pan(TEST_PAN)}"
    # a non-Luhn run in other digits is still not a card number
    bad = "".join(chr(0xFF10 + int(c)) for c in TEST_PAN[:-1] + str((int(TEST_PAN[-1]) + 1) % 10))
    assert mask_text(bad) == bad


def test_message_args_extra_and_exceptions_masked(captured):
    log = logging.getLogger("isoswitch.test")
    log.info("oops %s", TEST_PAN)
    log.warning(f"f-string {MC} and grouped {GROUPED}")
    log.info("doc", extra={"doc": {"2": TEST_PAN, "35": TRACK2, "52": PIN_BLOCK, "4": "000000001000",
                                   "nested": [AMEX, {"pin": PIN_BLOCK}]},
                           "cvv": "123", "card": TEST_PAN})
    try:
        raise ValueError(f"bad card {TEST_PAN} track {TRACK2}")
    except ValueError:
        log.exception("failed")
    log.error("as int %d", int(TEST_PAN))
    out = captured.getvalue()
    assert_clean(out)
    recs = lines(captured)
    assert recs[0]["msg"] == f"oops {mask_pan(TEST_PAN)}" and recs[0]["level"] == "info"
    assert recs[0]["logger"] == "isoswitch.test" and recs[0]["ts"].endswith("Z")
    doc = recs[2]["doc"]
    assert doc["2"] == mask_pan(TEST_PAN) and doc["4"] == "000000001000"
    assert doc["35"] == "[removed]" and doc["52"] == "[pin block removed]"
    assert doc["nested"][0] == mask_pan(AMEX) and doc["nested"][1]["pin"] == "[pin block removed]"
    assert recs[2]["cvv"] == "[removed]" and recs[2]["card"] == mask_pan(TEST_PAN)
    assert "ValueError" in recs[3]["exc"] and mask_pan(TEST_PAN) in recs[3]["exc"]
    assert recs[4]["msg"] == f"as int {mask_pan(TEST_PAN)}"


def test_text_format_masks_too():
    buf = io.StringIO()
    level = logging.getLogger().level
    handler = configure_logging("info", "text", stream=buf)
    try:
        logging.getLogger("isoswitch.t").warning("card %s", TEST_PAN, extra={"track2": TRACK2})
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    out = buf.getvalue()
    assert_clean(out)
    assert mask_pan(TEST_PAN) in out and "WARNING isoswitch.t" in out


def test_configure_logging_replaces_its_own_handler():
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    h1 = configure_logging("info", "json", stream=io.StringIO())
    h2 = configure_logging("info", "json", stream=io.StringIO())
    try:
        assert h1 not in root.handlers and h2 in root.handlers
    finally:
        root.removeHandler(h2)
        root.setLevel(level)
    assert root.handlers == before
    with pytest.raises(ValueError):
        configure_logging("info", "xml")
