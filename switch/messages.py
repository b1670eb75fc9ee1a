"""Message helpers shared by the flow, links and simulators: MTIs, masking, switch responses.

Card data never leaves this process in clear through these helpers: `mask_pan`
keeps at most the BIN and last four (PCI DSS 3.4.1), and `safe_summary` is the
only form of a document that logs may carry.
"""
from __future__ import annotations

import time

# Switch-generated response codes (ISO 8583:1987), DESIGN.md invariant 9
RC_APPROVED = "00"
RC_FORMAT_ERROR = "30"
RC_INOPERATIVE = "91"  # issuer/switch inoperative, or timeout
RC_NO_ROUTE = "92"
RC_DUPLICATE = "94"
RC_SECURITY = "63"  # security violation (mTLS identity does not match DE41)
RC_SYSTEM_ERROR = "96"

# Response codes that approve (the whole amount or part of it): ISO 8583:1987
# 00 approved, 08 honour with identification, 10 approved for a partial
# amount, 11 approved (VIP), 16 approved, update track 3; ISO 8583:1993
# action codes 000-007 (the "approved" class). One set for the REST API's
# "approved", the metrics' approval rate and the dashboard.
APPROVED_CODES = frozenset({"00", "08", "10", "11", "16",
                            "000", "001", "002", "003", "004", "005", "006", "007"})

# Request MTIs the switch forwards (ISO 8583:1987 0xxx and :1993 1xxx);
# network management is answered locally
FINANCIAL_REQUESTS = frozenset({"0100", "0101", "0120", "0121", "0200", "0201", "0220", "0221",
                                "1100", "1101", "1120", "1121", "1200", "1201", "1220", "1221"})
REVERSAL_REQUESTS = frozenset({"0400", "0401", "0420", "0421", "1420", "1421"})
NETWORK_REQUESTS = frozenset({"0800", "1804"})

# ISO 8583:1987 response code -> ISO 8583:1993 action code (DE39 n3), for
# answers the switch makes itself to 1xxx requests.
ACTION_CODES_1993 = {
    "00": "000", "01": "107", "03": "109", "04": "200", "05": "100", "08": "001",
    "12": "902", "13": "110", "14": "111", "30": "904", "41": "208", "43": "209",
    "51": "116", "54": "101", "55": "117", "57": "119", "58": "120", "61": "121",
    "62": "104", "63": "122", "65": "123", "91": "907", "92": "908", "94": "913", "96": "909",
    # 25 "unable to locate original" answers a reversal whose original is unknown
    "25": "480",
}

# Fields echoed in a switch-generated response (ISO 8583 response conventions)
ECHO_FIELDS = ("2", "3", "4", "7", "11", "12", "13", "32", "37", "41", "42", "49")
# Never sent back to a terminal, never journaled, never logged: track 2, 3
# and 1 data, PIN block, ICC data (the journal's NEVER_STORED)
NEVER_ECHO = frozenset({"35", "36", "45", "52", "55"})
CARD_DATA_FIELDS = frozenset({"2", "14", "34", "35", "36", "45", "52", "55"})


def spec_is_1993(spec: dict) -> bool:
    """An ISO 8583:1993 dialect (3-digit action codes in DE39), by its
    ``_meta.standard`` or, failing that, by DE39's length."""
    return "1993" in str((spec.get("_meta") or {}).get("standard", "")) or (
        (spec.get("39") or {}).get("max_len") == 3)


def response_mti(mti: str) -> str:
    """0200 -> 0210, 0401 -> 0410, 0203 -> 0212 (a repeat is answered as the
    original), 1804 -> 1814."""
    if len(mti) != 4 or not mti.isdigit():
        return "0210"
    third, last = mti[2], mti[3]
    if third in "02468":
        # position 4, the originator: 1, 3 and 5 are the repeats of 0, 2 and 4
        return mti[:2] + str(int(third) + 1) + (str(int(last) - 1) if last in "135" else last)
    return mti[:3] + "0"


def original_mti(mti: str) -> str:
    """0201 -> 0200: a repeat is the same request sent again."""
    return mti[:3] + "0" if len(mti) == 4 and mti[3] == "1" else mti


def is_advice_mti(mti: str | None) -> bool:
    """x120/x121, x220/x221: an advice reports what has happened (a completion,
    a stand-in authorization); it is delivered, repeated until acknowledged,
    never reversed."""
    return bool(mti) and len(mti) == 4 and mti[1] in "12" and mti[2] == "2"


def is_response_to(request_mti: str, response: str) -> bool:
    return len(response) == 4 and response[:2] == request_mti[:2] and response[2] == str(
        (int(request_mti[2]) + 1) % 10
    )


def mask_pan(pan: str | None) -> str:
    """First 6 + last 4, never more (PCI DSS 3.4.1).

    DESIGN.md allows 8 leading digits only for 8-digit BINs; where a PAN is
    masked the BIN length is not known, so 6 it is.
    """
    if not pan:
        return ""
    digits = pan if isinstance(pan, str) and pan.isascii() and pan.isdigit() else "".join(c for c in str(pan) if c.isdigit())
    n = len(digits)
    if n < 13:
        return "*" * n
    return digits[:6] + "*" * (n - 10) + digits[-4:]


def pan_of(doc: dict) -> str | None:
    """The PAN from DE2, else from track 2 (DE35, '=' or 'D' separated)."""
    pan = doc.get("2")
    if pan:
        return pan
    t2 = doc.get("35")
    if t2:
        for sep in ("=", "D", "d"):
            i = t2.find(sep)
            if i > 0:
                return t2[:i].lstrip(";")
    return None


def safe_summary(doc: dict) -> dict:
    """A log-safe view: no track, PIN or ICC data; PAN masked; amounts kept."""
    out = {}
    for k, v in doc.items():
        if k in NEVER_ECHO or k == "14":
            continue
        if k in ("2", "34"):
            out[k] = mask_pan(v)
        else:
            out[k] = v
    return out


def switch_response(request: dict, rc: str) -> dict:
    """A response the switch makes itself (30/91/92/94/96) to `request`."""
    resp = {"t": response_mti(request.get("t", "0200"))}
    for k in ECHO_FIELDS:
        v = request.get(k)
        if v is not None:
            resp[k] = v
    if resp["t"].startswith("1") and len(rc) == 2:  # ISO 8583:1993: 3-digit action codes
        # 1993 accepts each class outside authorization and financial with its
        # own code: 400 a reversal (1430), 800 network management (1814), ...
        if rc == "00" and resp["t"][1] in "345678":
            rc = resp["t"][1] + "00"
        else:
            rc = ACTION_CODES_1993.get(rc, "909")
    resp["39"] = rc
    return resp


def transmission_time(now: float | None = None) -> str:
    """DE7 MMDDhhmmss in UTC."""
    return time.strftime("%m%d%H%M%S", time.gmtime(now if now is not None else time.time()))


def luhn_check_digit(partial: str) -> str:
    """The digit that makes `partial` + digit pass the Luhn check."""
    total = 0
    for i, c in enumerate(reversed(partial)):
        d = ord(c) - 48
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


# The card number simulators and benches use: EMVCo/Visa test BIN 476173,
# a test card that no issuer honours. Kept as prefix + computed check digit so
# no Luhn-valid card number literal sits in shipped code.
TEST_PAN = "476173900101001" + luhn_check_digit("476173900101001")


# a digit doubled as Luhn does (the digits of 2d summed), as ASCII
_LUHN_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")


def luhn_ok(pan: str) -> bool:
    if not pan.isdigit() or not pan.isascii() or not 12 <= len(pan) <= 19:
        return False
    # from the right: every second digit doubled; sums of ASCII codes less
    # 48 per digit (0.6 us against 1.5 for a loop over the digits, measured)
    b = pan.encode("ascii")
    return (sum(b[-1::-2]) + sum(b[-2::-2].translate(_LUHN_DOUBLED)) - 48 * len(b)) % 10 == 0
