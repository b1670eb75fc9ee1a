"""Wire dialects: ISO 8583 field layouts kept as JSON data.

A dialect is a spec dict in exactly the pyiso8583 4.x format (see the
``iso8583.specs`` docstring and ``codecs/README.md``), so the same file drives
our codec and the pyiso8583 reference oracle. Two per-field keys that
pyiso8583 ignores are ours: ``type`` (the ISO data type) and ``card_data``
(true on fields PCI DSS treats as card data). A top-level ``_meta`` key
describes the dialect; pyiso8583 looks spec entries up only by field key, so
it never sees it.

Where dialects are found, first match wins:

1. ``$ISOSWITCH_DIALECTS_DIR`` if set (read on every call, so tests and
   deployments can point elsewhere without re-importing);
2. ``<this package>/dialects/`` - the build copies ``codecs/*.json`` there;
3. ``<repo root>/codecs/`` - a source checkout.

``codecs/`` is data, never a package: a top-level ``codecs`` package would
shadow the standard library module of the same name.

Loading is not on the hot path: a link compiles its dialect once at start-up.
"""
from __future__ import annotations

import codecs as _stdlib_codecs
import copy
import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = [
    "DialectError",
    "card_data_fields",
    "list_dialects",
    "load_dialect",
    "validate_spec",
]

ENV_DIALECTS_DIR = "ISOSWITCH_DIALECTS_DIR"

_PACKAGE_DIR = Path(__file__).resolve().parent
_INSTALLED_DIR = _PACKAGE_DIR / "dialects"
_SOURCE_DIR = _PACKAGE_DIR.parent / "codecs"

# Other data shipped beside the dialects (not field layouts).
_NOT_DIALECTS = frozenset({"emv_tags"})

# A dialect name is a file stem; nothing that could walk out of the directory.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")

_FIELD_KEYS = ("h", "t", "p", "1", *(str(n) for n in range(2, 129)))
_FIELD_KEY_SET = frozenset(_FIELD_KEYS)
_REQUIRED_KEYS = ("h", "t", "p")
_MANDATORY_PROPS = ("data_enc", "len_enc", "len_type", "max_len")
_KNOWN_PROPS = frozenset(
    (*_MANDATORY_PROPS, "desc", "len_count", "left_pad", "right_pad", "type", "card_data")
)
_TYPES = frozenset(("n", "an", "ans", "b", "z", "xn", "bitmap", "mti"))
# pyiso8583 compares pads with upper-case hex (``bytes.hex().upper()``), so a
# lower-case pad would never be stripped on decode.
_PAD_CHARS = frozenset("0123456789ABCDEF")

# PCI DSS cardholder and sensitive authentication data carried in ISO 8583:
# PAN (2), expiry (14), extended PAN (34), track 2/3/1 (35, 36, 45), PIN block
# (52) and ICC data (55, holds track-equivalent data). Used for plain
# pyiso8583 specs that carry no ``card_data`` markings.
DEFAULT_CARD_DATA_FIELDS = frozenset(("2", "14", "34", "35", "36", "45", "52", "55"))


class DialectError(ValueError):
    """A dialect could not be found, parsed or validated.

    ``field`` and ``key`` name the offending spec entry and property when the
    error is about one; both are ``None`` otherwise. Pickles cleanly (the
    attributes travel in ``__dict__``).
    """

    def __init__(self, message: str, *, field: str | None = None, key: str | None = None):
        super().__init__(message)
        self.field = field
        self.key = key


# path -> (mtime_ns, size, validated spec). Keyed on mtime and size so an
# edited file is re-read; callers always get a deep copy.
_cache: dict[str, tuple[int, int, dict[str, Any]]] = {}


def _search_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get(ENV_DIALECTS_DIR)
    if env:
        dirs.append(Path(env))
    dirs.append(_INSTALLED_DIR)
    dirs.append(_SOURCE_DIR)
    return dirs


def list_dialects() -> list[str]:
    """Names of every dialect found in the search directories, sorted."""
    names: set[str] = set()
    for directory in _search_dirs():
        if directory.is_dir():
            names.update(
                p.stem
                for p in directory.glob("*.json")
                if p.is_file() and _NAME_RE.match(p.stem) and p.stem not in _NOT_DIALECTS
            )
    return sorted(names)


def _resolve(name: str) -> Path:
    if not isinstance(name, str) or not name:
        raise DialectError(f"dialect name must be a non-empty string, not {name!r}")
    if name.endswith(".json") or "/" in name or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise DialectError(f"dialect file {name!r} does not exist")
        return path
    if _NAME_RE.match(name) and name not in _NOT_DIALECTS:
        for directory in _search_dirs():
            path = directory / f"{name}.json"
            if path.is_file():
                return path
    available = ", ".join(list_dialects()) or "none"
    raise DialectError(f"unknown dialect {name!r}; available: {available}")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal keys; in a hand-edited
    # layout that hides a typo such as two "35" entries.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DialectError(f"duplicate key {key!r}", field=key)
        out[key] = value
    return out


def _parse(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DialectError(f"cannot read dialect file {str(path)!r}: {exc}") from None
    try:
        spec = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise DialectError(
            f"malformed JSON in dialect file {str(path)!r}: {exc.msg} "
            f"at line {exc.lineno} column {exc.colno}"
        ) from None
    except DialectError as exc:
        raise DialectError(f"{str(path)!r}: {exc}", field=exc.field) from None
    try:
        validate_spec(spec)
    except DialectError as exc:
        raise DialectError(f"{str(path)!r}: {exc}", field=exc.field, key=exc.key) from None
    return spec


def load_dialect(name: str) -> dict[str, Any]:
    """Return a fresh, validated copy of dialect ``name``.

    ``name`` is a dialect name (see :func:`list_dialects`) or a path to a
    ``.json`` file. The parsed file is cached; the result is a deep copy the
    caller may mutate. Raises :class:`DialectError`.
    """
    path = _resolve(name)
    try:
        st = path.stat()
    except OSError as exc:
        raise DialectError(f"cannot read dialect file {str(path)!r}: {exc}") from None
    cache_key = str(path.resolve())
    hit = _cache.get(cache_key)
    if hit is None or hit[0] != st.st_mtime_ns or hit[1] != st.st_size:
        spec = _parse(path)
        _cache[cache_key] = (st.st_mtime_ns, st.st_size, spec)
    else:
        spec = hit[2]
    return copy.deepcopy(spec)


def card_data_fields(spec: dict[str, Any]) -> frozenset[str]:
    """Field keys marked ``"card_data": true``.

    A spec in which no field has a ``card_data`` key at all (a plain
    pyiso8583 spec) gets :data:`DEFAULT_CARD_DATA_FIELDS` instead, so an
    unmarked spec can never mean "nothing is card data".
    """
    marked = False
    fields = set()
    for key, field_spec in spec.items():
        if not isinstance(key, str) or key.startswith("_") or not isinstance(field_spec, dict):
            continue
        if "card_data" in field_spec:
            marked = True
            if field_spec["card_data"] is True:
                fields.add(key)
    return frozenset(fields) if marked else DEFAULT_CARD_DATA_FIELDS


def _is_text_codec(name: str) -> bool:
    try:
        _stdlib_codecs.lookup(name)
        "0123456789".encode(name)  # rejects bytes-to-bytes codecs (hex, base64)
    except (LookupError, TypeError, ValueError):
        return False
    return True


def _prefix_capacity(len_enc: str, len_type: int) -> int:
    """Largest length a prefix of ``len_type`` bytes can express."""
    if len_enc == "b":
        return 256**len_type - 1
    if len_enc == "bcd":
        return 10 ** (2 * len_type) - 1
    return 10**len_type - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_spec(spec: Any) -> None:
    """Check that ``spec`` is a usable pyiso8583 4.x spec; raise DialectError.

    Errors name the field (``exc.field``) and property (``exc.key``).
    """
    if not isinstance(spec, dict):
        raise DialectError(f"a dialect must be a JSON object, not {type(spec).__name__}")
    for key in spec:
        if not isinstance(key, str):
            raise DialectError(f"field key {key!r} is not a string")
        if key.startswith("_"):
            continue  # "_meta" and other annotations pyiso8583 never reads
        if key not in _FIELD_KEY_SET:
            raise DialectError(
                f"unknown field key {key!r} (expected h, t, p, 1..128 or _-prefixed metadata)",
                field=key,
            )
    for key in _REQUIRED_KEYS:
        if key not in spec:
            raise DialectError(f"field {key!r} is missing", field=key)
    meta = spec.get("_meta")
    if meta is not None and not isinstance(meta, dict):
        raise DialectError("'_meta' must be an object", field="_meta")
    for key in _FIELD_KEYS:
        if key in spec:
            _validate_field(key, spec[key])


def _validate_field(field: str, fs: Any) -> None:
    def fail(prop: str | None, problem: str) -> DialectError:
        where = f"field {field!r}" + (f" {prop!r}" if prop else "")
        return DialectError(f"{where}: {problem}", field=field, key=prop)

    if not isinstance(fs, dict):
        raise fail(None, f"must be an object, not {type(fs).__name__}")
    for prop in _MANDATORY_PROPS:
        if prop not in fs:
            raise fail(prop, "is missing")
    for prop in fs:
        if prop not in _KNOWN_PROPS:
            raise fail(prop, "is not a known field property")

    data_enc, len_enc = fs["data_enc"], fs["len_enc"]
    if not isinstance(data_enc, str) or not (data_enc == "b" or _is_text_codec(data_enc)):
        raise fail("data_enc", f"{data_enc!r} is neither 'b' nor a Python text codec")
    if not isinstance(len_enc, str) or not (len_enc in ("b", "bcd") or _is_text_codec(len_enc)):
        raise fail("len_enc", f"{len_enc!r} is neither 'b', 'bcd' nor a Python text codec")
    if len_enc not in ("b", "bcd") and len("0123456789".encode(len_enc)) != 10:
        raise fail("len_enc", f"{len_enc!r} does not encode a length digit in one byte")

    len_type, max_len = fs["len_type"], fs["max_len"]
    if not _is_int(len_type) or not 0 <= len_type <= 8:
        raise fail("len_type", f"{len_type!r} is not an integer from 0 to 8")
    min_len = 0 if field == "h" else 1
    if not _is_int(max_len) or max_len < min_len:
        raise fail("max_len", f"{max_len!r} is not an integer >= {min_len}")
    if len_type and max_len > _prefix_capacity(len_enc, len_type):
        raise fail(
            "max_len",
            f"{max_len} does not fit a {len_type}-byte {len_enc!r} length prefix "
            f"(at most {_prefix_capacity(len_enc, len_type)})",
        )

    len_count = fs.get("len_count", "bytes")
    if len_count not in ("bytes", "nibbles"):
        raise fail("len_count", f"{len_count!r} is not 'bytes' or 'nibbles'")
    if len_count == "nibbles" and data_enc != "b":
        raise fail("len_count", "'nibbles' needs data_enc 'b'")
    for pad_key in ("left_pad", "right_pad"):
        if pad_key in fs:
            pad = fs[pad_key]
            if not isinstance(pad, str) or len(pad) != 1 or pad not in _PAD_CHARS:
                raise fail(pad_key, f"{pad!r} is not a single upper-case hex character")
    odd_possible = len_type > 0 or max_len % 2 == 1
    if (
        field not in ("t", "p", "1")
        and len_count == "nibbles"
        and odd_possible
        and "left_pad" not in fs
        and "right_pad" not in fs
    ):
        raise fail("len_count", "a nibble-counted field that can be odd needs left_pad or right_pad")

    # pyiso8583 fixes these sizes itself; a spec that disagrees is a mistake.
    if field in ("t", "p", "1") and len_type != 0:
        raise fail("len_type", "must be 0 (fixed)")
    if field == "t":
        ok = (max_len == 2 or (max_len == 4 and len_count == "nibbles")) if data_enc == "b" else max_len == 4
        if not ok:
            raise fail("max_len", "message type is 2 bytes binary/BCD or 4 characters")
    if field in ("p", "1") and max_len != (8 if data_enc == "b" else 16):
        raise fail("max_len", "a bitmap is 8 bytes binary or 16 hex characters")

    if "type" in fs and fs["type"] not in _TYPES:
        raise fail("type", f"{fs['type']!r} is not one of {', '.join(sorted(_TYPES))}")
    if "card_data" in fs and not isinstance(fs["card_data"], bool):
        raise fail("card_data", "must be true or false")
    if "desc" in fs and not isinstance(fs["desc"], str):
        raise fail("desc", "must be a string")
