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
RC_SYSTEM_ERROR = "96"

# Request MTIs the switch forwards; network management is answered locally
FINANCIAL_REQUESTS = frozenset({"0100", "0101", "0200", "0201", "0220", "0221"})
REVERSAL_REQUESTS = frozenset({"0400", "0401", "0420", "0421"})
NETWORK_REQUESTS = frozenset({"0800"})

# Fields echoed in a switch-generated response (ISO 8583 response conventions)
ECHO_FIELDS = ("2", "3", "4", "7", "11", "12", "13", "32", "37", "41", "42", "49")
# Never sent back to a terminal, never journaled, never logged
NEVER_ECHO = frozenset({"35", "45", "52", "55"})
CARD_DATA_FIELDS = frozenset({"2", "14", "34", "35", "36", "45", "52", "55"})


def response_mti(mti: str) -> str:
    """0200 -> 0210, 0401 -> 0410 (a repeat is answered as the original)."""
    if len(mti) != 4 or not mti.isdigit():
        return "0210"
    third = mti[2]
    if third in "02468":
        return mti[:2] + str(int(third) + 1) + "0"
    return mti[:3] + "0"


def original_mti(mti: str) -> str:
    """0201 -> 0200: a repeat is the same request sent again."""
    return mti[:3] + "0" if len(mti) == 4 and mti[3] == "1" else mti


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


def luhn_ok(pan: str) -> bool:
    if not pan.isdigit() or not 12 <= len(pan) <= 19:
        return False
    total = 0
    for i, c in enumerate(reversed(pan)):
        d = ord(c) - 48
        if i & 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0
