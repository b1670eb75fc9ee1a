"""Structured logging (JSON lines or text) whose formatter masks card data itself.

PCI DSS v4 3.3.1/3.4.1 (DESIGN.md "Card data"): logs never carry a full PAN,
track data or a PIN block, even when a caller logs one by mistake. The
masking is done by the formatter, not by callers, so it covers the message,
its %-args, ``extra=`` fields and exception text alike:

* a run of 13-19 digits (optionally grouped by single spaces or dashes, as
  people type card numbers) that passes the Luhn check is replaced by its
  masked form (BIN + last 4, ``switch.messages.mask_pan``);
* track 2 equivalents (``;PAN=YYMM...`` or ``PAN D YYMM...``) and track 1
  (``%BPAN^NAME^YYMM...``) are removed;
* a 16-hex-digit value in a field named like a PIN block (``pin``,
  ``pin_block``, ``52``) is removed, as are values of fields named
  ``cvv``/``cvc``/``cvv2``/``track2``/``35``/``45``/``55``, in ``extra=``
  values and in text alike (``str(doc)`` or JSON of an ISO document).

Non-Luhn digit runs (trace numbers, RRNs, amounts) pass through unchanged, so
logs stay useful.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import re
import sys
import threading
import time
import traceback
from typing import Any

from switch.messages import luhn_ok, mask_pan

__all__ = ["configure_logging", "mask_text", "mask_value", "JsonFormatter", "RateLimitedLog", "TextFormatter"]

# Track 2: PAN, separator '=' (text) or 'D' (BCD nibble), then expiry +
# service code + discretionary data. Checked before the PAN pattern so a
# whole track is removed rather than just its PAN being masked.
_TRACK2 = re.compile(r";?\b\d{12,19}[=Dd]\d{4,}[0-9A-Fa-f]*\??")
# 13-19 contiguous digits, or the groupings people type (4-4-4-x, Amex
# 4-6-5) with single spaces or dashes; never part of a longer digit run
# (lookarounds), so a 24-digit id is left alone and separate numbers on one
# line (a STAN next to a time) are not joined into a false "PAN".
_PAN = re.compile(r"(?<![0-9])(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2}[ -]\d{1,7}|\d{4}[ -]\d{6}[ -]\d{5})"
                  r"(?![0-9])")
_HEX16 = re.compile(r"\b[0-9A-Fa-f]{16}\b")
# Track 1 (DE45): [%]B PAN ^ NAME ^ YYMM + service code + discretionary data
# [?]. Masking its PAN alone left the name, expiry and discretionary data
# (CVV1/iCVV) in clear; the whole track goes.
_TRACK1 = re.compile(r"%?[Bb]\d{12,19}\^[^^\r\n]{0,26}\^[^\s\"',}?]*\??")
# A quoted key of card data with a quoted value: what str() or json.dumps()
# of an ISO document (or a dict naming track or ICC data) puts in a log line.
# ``'52': 'ABCDEF0123456789'`` or ``"55": b'\x9f...'`` kept the PIN block
# and ICC data in clear, since neither looks like a PAN.
_CARD_KEY_IN_TEXT = re.compile(r"""(["'](?:35|36|45|52|55|track[12]?|icc|emv)["']\s*:\s*)b?(["'])"""
                               r"""(?:\\.|(?!\2)[^\\])*\2""", re.IGNORECASE)
# A verification code or PIN named in text (a JSON body or a query string
# quoted in an exception): ``"cvv": "987"``, ``cvc=123``. PCI DSS 3.3.1.
_SECRET_IN_TEXT = re.compile(r"""(?i)(["']?\b(?:cvv2?|cvc2?|cid|pin(?:_?block)?)["']?\s*[:=]\s*)(["']?)[^"',&}\s]+\2""")
# An API key's secret (switch.api.auth: isk_<id>_<secret>); the id is kept to tell keys apart.
_API_KEY = re.compile(r"\b(isk_[0-9a-f]{8}_)[A-Za-z0-9_-]{8,}")

TRACK_REMOVED = "[track data removed]"
PIN_REMOVED = "[pin block removed]"
SECRET_REMOVED = "[removed]"

# Field names (lower case) whose values are never logged in any form.
_REMOVE_FIELDS = frozenset({"cvv", "cvv2", "cvc", "cvc2", "cid", "track", "track1", "track2",
                            "35", "45", "55", "icc", "emv"})
_PIN_FIELDS = frozenset({"pin", "pin_block", "pinblock", "52"})


def _mask_pan_match(m: re.Match) -> str:
    raw = m.group(0)
    digits = raw.replace(" ", "").replace("-", "")
    if not digits.isascii():
        # \d matched other scripts' digits (fullwidth, Arabic-Indic): the same
        # card number to a reader, so judged as its ASCII digits
        digits = "".join(str(int(c)) for c in digits)
    if len(digits) < 13 or not luhn_ok(digits):
        return raw
    return mask_pan(digits)


def _card_key_removed(m: re.Match) -> str:
    name = m.group(1).strip("\"' :\t").lower()
    return m.group(1) + m.group(2) + (PIN_REMOVED if name == "52" else SECRET_REMOVED) + m.group(2)


def mask_text(text: str) -> str:
    """``text`` with track data removed, Luhn-valid PANs masked, verification
    codes, PINs and API key secrets removed."""
    if not text:
        return text
    if "isk_" in text:
        text = _API_KEY.sub(r"\1" + SECRET_REMOVED, text)
    if not any(c.isdigit() for c in text):
        return text
    text = _SECRET_IN_TEXT.sub(lambda m: m.group(1) + m.group(2) + SECRET_REMOVED + m.group(2), text)
    text = _CARD_KEY_IN_TEXT.sub(_card_key_removed, text)
    text = _TRACK1.sub(TRACK_REMOVED, text)
    text = _TRACK2.sub(TRACK_REMOVED, text)
    return _PAN.sub(_mask_pan_match, text)


def mask_value(value: Any, key: str | None = None, _depth: int = 0) -> Any:
    """A JSON-safe, card-data-free copy of ``value`` (a field named ``key``)."""
    k = key.lower() if isinstance(key, str) else None
    if k in _REMOVE_FIELDS:
        return SECRET_REMOVED
    if k in _PIN_FIELDS:
        if isinstance(value, (bytes, bytearray)) or (isinstance(value, str) and _HEX16.search(value)):
            return PIN_REMOVED
        if value is not None and not isinstance(value, (int, float, bool)):
            return PIN_REMOVED
    if _depth > 6:
        return "..."
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        s = str(value)
        return mask_text(s) if len(s) >= 13 and mask_text(s) != s else value
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, (bytes, bytearray)):
        return mask_text(value.hex()) if len(value) <= 64 else f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {str(kk): mask_value(vv, str(kk), _depth + 1) for kk, vv in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [mask_value(v, None, _depth + 1) for v in value]
    return mask_text(str(value))


# Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}


def _record_message(record: logging.LogRecord) -> str:
    try:
        msg = record.getMessage()
    except Exception:  # a bad format string must not lose the line
        msg = f"{record.msg!r} (unformattable args)"
    return mask_text(msg)


def _exception_text(record: logging.LogRecord) -> str | None:
    if record.exc_info and record.exc_info[0] is not None:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
    elif record.exc_text:
        text = record.exc_text
    else:
        return None
    return mask_text(text)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: mask_value(v, k) for k, v in record.__dict__.items()
            if k not in _STANDARD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _record_message(record),
        }
        for k, v in _extras(record).items():
            out.setdefault(k, v)
        exc = _exception_text(record)
        if exc:
            out["exc"] = exc
        if record.stack_info:
            out["stack"] = mask_text(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """Human-readable lines with the same masking as JsonFormatter."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = (f"{self.formatTime(record)} {record.levelname} {record.name}: "
                f"{_record_message(record)}")
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in extras.items())
        exc = _exception_text(record)
        if exc:
            line += "\n" + exc
        return line


_HANDLER_MARK = "_isoswitch_handler"


def configure_logging(level: str | int = "info", fmt: str = "json", stream=None) -> logging.Handler:
    """Install one masking handler on the root logger (replacing an earlier one).

    Handlers installed by other code are left in place but get the masking
    formatter too only if they are ours; call this once at start-up.
    """
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', not {fmt!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # aiohttp's access log carries request lines; keep it at warning so
    # per-request lines do not flood the JSON stream at thousands per second.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler


# --------------------------------------------------------------------------
# Rate-limited logging


class _KeyState:
    __slots__ = ("start", "count", "suppressed", "level", "last", "timer")

    def __init__(self, now: float):
        self.start = now  # the current interval began
        self.count = 0  # records let through in it
        self.suppressed = 0  # records held back in it
        self.level = logging.NOTSET  # the highest level held back
        self.last = float("-inf")  # the key's latest event, let through or not
        self.timer = None  # the call that writes the summary when the interval ends


class RateLimitedLog:
    """At most ``burst`` records per key per ``interval`` seconds go to ``logger``.

    For messages one per event that a peer or a failing disk can make
    arrive without bound (undecodable terminal messages, framing errors,
    journal write failures): DESIGN.md "Bad input" asks for bounded time and
    memory, and a log that grows with what an attacker sends is neither. The
    records held back are counted, and when the interval ends one summary
    line at their highest level says how many: ``"<key>: suppressed K similar
    messages in the last N s"`` (at the key's next record instead, where no
    event loop runs to end the interval on time). Callers keep counting every
    event in their own counters and metrics; only the log is bounded.

    ``key`` names the kind of message (a short text, which starts the
    summary line); keys come from a fixed set in the code, never from input.
    ``traceback_first=True``: the exception's traceback goes only with the
    first record after the key has been quiet for an interval; the records
    that follow are one line each.
    """

    def __init__(self, logger: logging.Logger, burst: int = 10, interval: float = 60.0, *,
                 max_keys: int = 256):
        if burst < 1 or interval <= 0:
            raise ValueError("burst must be >= 1 and interval > 0")
        self.logger = logger
        self.burst = int(burst)
        self.interval = float(interval)
        self.max_keys = int(max_keys)
        self.suppressed_total = 0  # records held back since start, all keys
        self._keys: dict[str, _KeyState] = {}
        self._lock = threading.Lock()

    def log(self, key: str, level: int, msg: str, *args, exc_info=None, traceback_first: bool = False,
            extra: dict | None = None) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` is over its rate; True when logged."""
        logger = self.logger
        if not logger.isEnabledFor(level):
            return False
        now = time.monotonic()
        summary = None
        with self._lock:
            st = self._keys.get(key)
            if st is None:
                if len(self._keys) >= self.max_keys:
                    self._evict(now)
                st = self._keys[key] = _KeyState(now)
            elif now - st.start >= self.interval:
                summary = self._take_summary(st)  # its timer has not run (no event loop)
                st.start, st.count = now, 0
            quiet = now - st.last >= self.interval
            st.last = now
            if st.count < self.burst:
                st.count += 1
                allowed = True
            else:
                allowed = False
                st.suppressed += 1
                self.suppressed_total += 1
                if level > st.level:
                    st.level = level
                if st.timer is None:
                    st.timer = self._schedule(st.start + self.interval - now, key)
        if summary is not None:
            self._write_summary(key, *summary)
        if not allowed:
            return False
        if exc_info is not None and traceback_first and not quiet:
            exc_info = None
        logger.log(level, msg, *args, exc_info=exc_info, extra=extra, stacklevel=2)
        return True

    def debug(self, key: str, msg: str, *args, **kw) -> bool:
        return self.log(key, logging.DEBUG, msg, *args, **kw)

    def info(self, key: str, msg: str, *args, **kw) -> bool:
        return self.log(key, logging.INFO, msg, *args, **kw)

    def warning(self, key: str, msg: str, *args, **kw) -> bool:
        return self.log(key, logging.WARNING, msg, *args, **kw)

    def error(self, key: str, msg: str, *args, **kw) -> bool:
        return self.log(key, logging.ERROR, msg, *args, **kw)

    def critical(self, key: str, msg: str, *args, **kw) -> bool:
        return self.log(key, logging.CRITICAL, msg, *args, **kw)

    def flush(self) -> None:
        """Write the summary of every key holding suppressed records now (at shutdown)."""
        with self._lock:
            pending = [(k, self._take_summary(st)) for k, st in self._keys.items() if st.suppressed]
        for key, summary in pending:
            self._write_summary(key, *summary)

    # -- internals

    def _schedule(self, delay: float, key: str):
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None  # no loop (a thread, a script): summarized at the key's next record
        return loop.call_later(max(0.0, delay), self._interval_ended, key)

    def _interval_ended(self, key: str) -> None:
        with self._lock:
            st = self._keys.get(key)
            summary = None if st is None else self._take_summary(st)
        if summary is not None:
            self._write_summary(key, *summary)

    @staticmethod
    def _take_summary(st: _KeyState) -> tuple[int, int] | None:
        """(level, count) of the records held back, and the state reset; None when none were."""
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        if not st.suppressed:
            return None
        out = (st.level, st.suppressed)
        st.suppressed, st.level = 0, logging.NOTSET
        return out

    def _write_summary(self, key: str, level: int, n: int) -> None:
        self.logger.log(level, "%s: suppressed %d similar messages in the last %g s", key, n, self.interval,
                        extra={"suppressed": n})

    def _evict(self, now: float) -> None:
        """Forget keys quiet for an interval with nothing held back (the map stays bounded)."""
        for k in [k for k, st in self._keys.items() if not st.suppressed and now - st.last >= self.interval]:
            del self._keys[k]
        if len(self._keys) >= self.max_keys:
            # every key busy: the oldest goes (its summary is lost, its records were not)
            oldest = min(self._keys, key=lambda k: self._keys[k].last)
            st = self._keys.pop(oldest)
            if st.timer is not None:
                st.timer.cancel()
