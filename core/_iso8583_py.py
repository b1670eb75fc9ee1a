"""Pure-Python twin of core/_iso8583.pyx: the ISO 8583 codec.

Same document shapes and spec format as pyiso8583 4.x (see core/iso8583.py
for the public contract). Behaviour, results and error messages are
identical to the Cython extension byte for byte; tests/test_iso8583_*.py
holds both to that.

Where this codec is stricter than pyiso8583 (on purpose, see DESIGN.md "Bad
input"): length digits must be digits, hex must be hex, bitmap bits with no
field in the spec are a DecodeError, and nothing but DecodeError/EncodeError
ever escapes for bad data. Error text never contains field data.
"""
from __future__ import annotations

import codecs as _stdlib_codecs
from collections.abc import Mapping

__all__ = [
    "encode",
    "decode",
    "decode_partial",
    "compile_spec",
    "clear_spec_cache",
    "CompiledSpec",
    "EncodedDoc",
    "DecodeError",
    "EncodeError",
    "SpecError",
]

# data kinds
DK_BIN = 0  # binary/BCD: hex string in the document
DK_ASCII = 1
DK_LATIN1 = 2
DK_TABLE = 3  # single-byte codec (EBCDIC) translated through a 256-entry table
DK_CODEC = 4  # any other Python codec, called per field

# length kinds
LK_FIXED = 0
LK_BIN = 1
LK_BCD = 2
LK_ASCII = 3  # ASCII or latin-1 digits
LK_TABLE = 4  # single-byte codec digits (EBCDIC F0..F9)
LK_CODEC = 5

MAX_LEN_TYPE = 8
_SPEC_CACHE_MAX = 64

# Keys "2".."192" in field-number order; 0 = "p", 1 = "1" (bitmaps)
_FIELD_KEYS = ["p"] + [str(i) for i in range(1, 193)]
_HEX_UPPER = "0123456789ABCDEF"
_HEXCHARS = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")


class SpecError(ValueError):
    """The spec itself is unusable (unknown encoding, missing key, bad value)."""

    def __init__(self, msg: str, field: str):
        ValueError.__init__(self, f"{msg}: field {field}")
        self.msg = msg
        self.field = field

    def __reduce__(self):
        return self.__class__, (self.msg, self.field)


class DecodeError(ValueError):
    """Malformed ISO 8583 data. `.field` and `.pos` say where; `.msg` says what.

    The text never contains field data (it may be card data).
    """

    def __init__(self, msg: str, field: str, pos: int):
        ValueError.__init__(self, f"{msg}: field {field} pos {pos}")
        self.msg = msg
        self.field = field
        self.pos = pos

    def __reduce__(self):
        return self.__class__, (self.msg, self.field, self.pos)


class EncodeError(ValueError):
    """A document that cannot be encoded under the spec. Never echoes data."""

    def __init__(self, msg: str, field: str):
        ValueError.__init__(self, f"{msg}: field {field}")
        self.msg = msg
        self.field = field

    def __reduce__(self):
        return self.__class__, (self.msg, self.field)


def _single_byte_tables(encoding: str):
    """(decode, encode) 256-byte tables when `encoding` is a bijection onto latin-1.

    EBCDIC code pages (cp500, cp037, ...) are: every byte maps to one
    character below U+0100 and back. Such codecs are translated with tables
    instead of calling the codec per field.
    """
    try:
        chars = bytes(range(256)).decode(encoding)
    except (UnicodeDecodeError, LookupError):
        return None
    if len(chars) != 256 or any(ord(c) > 255 for c in chars):
        return None
    if len(set(chars)) != 256:
        return None
    dec = bytes(ord(c) for c in chars)  # wire byte -> latin-1 byte
    enc = bytearray(256)
    for wire, c in enumerate(chars):
        enc[ord(c)] = wire
    try:
        if chars.encode(encoding) != bytes(range(256)):
            return None
    except UnicodeEncodeError:
        return None
    return dec, bytes(enc)


class FieldSpec:
    __slots__ = (
        "key", "data_kind", "encoding", "dec_table", "enc_table", "len_kind",
        "len_encoding", "len_dec_table", "len_enc_table", "len_type", "max_len",
        "nibbles", "pad", "pad_left", "numeric", "card_data", "len_count",
    )


def _field_spec(key: str, fs) -> FieldSpec:
    if not isinstance(fs, Mapping):
        raise SpecError("Field specification must be a mapping", key)
    f = FieldSpec()
    f.key = key
    try:
        data_enc = fs["data_enc"]
        len_enc = fs["len_enc"]
        len_type = fs["len_type"]
        max_len = fs["max_len"]
    except KeyError as e:
        raise SpecError(f"Field specification lacks {e.args[0]!r}", key) from None
    if type(len_type) is not int or not 0 <= len_type <= MAX_LEN_TYPE:
        raise SpecError(f"len_type must be an integer 0..{MAX_LEN_TYPE}", key)
    if type(max_len) is not int or max_len < 0 or max_len > 0x7FFFFFFF:
        raise SpecError("max_len must be a non-negative integer", key)
    f.len_type = len_type
    f.max_len = max_len
    len_count = fs.get("len_count", "bytes")
    if len_count not in ("bytes", "nibbles"):
        raise SpecError("len_count must be 'bytes' or 'nibbles'", key)
    f.len_count = len_count
    f.nibbles = len_count == "nibbles"
    pad = fs.get("left_pad", "")
    f.pad_left = True
    if not pad:
        pad = fs.get("right_pad", "")
        f.pad_left = False
    if not isinstance(pad, str):
        raise SpecError("pad must be a string", key)
    pad = pad[:1]
    if pad and pad not in _HEXCHARS:
        raise SpecError("pad must be a hex character", key)
    f.pad = pad
    f.numeric = fs.get("type") == "n"
    f.card_data = bool(fs.get("card_data", False))
    f.encoding = None
    f.dec_table = f.enc_table = None
    if data_enc == "b":
        f.data_kind = DK_BIN
    else:
        f.data_kind, f.encoding, f.dec_table, f.enc_table = _text_kind(data_enc, key)
    f.len_encoding = None
    f.len_dec_table = f.len_enc_table = None
    if len_type == 0:
        f.len_kind = LK_FIXED
    elif len_enc == "b":
        f.len_kind = LK_BIN
    elif len_enc == "bcd":
        f.len_kind = LK_BCD
    else:
        kind, f.len_encoding, f.len_dec_table, f.len_enc_table = _text_kind(len_enc, key)
        f.len_kind = {DK_ASCII: LK_ASCII, DK_LATIN1: LK_ASCII, DK_TABLE: LK_TABLE}.get(kind, LK_CODEC)
    return f


def _text_kind(enc, key):
    if not isinstance(enc, str):
        raise SpecError("encoding must be a string", key)
    try:
        name = _stdlib_codecs.lookup(enc).name
    except LookupError:
        raise SpecError(f"unknown encoding {enc!r}", key) from None
    if name == "ascii":
        return DK_ASCII, name, None, None
    if name == "iso8859-1":
        return DK_LATIN1, name, None, None
    tables = _single_byte_tables(name)
    if tables is not None:
        return DK_TABLE, name, tables[0], tables[1]
    return DK_CODEC, name, None, None


class CompiledSpec:
    """A spec dict compiled once into a per-field table (index 0 = "p", 1..192)."""

    __slots__ = ("spec", "header", "mti", "fields", "mti_binary", "bitmap_binary")

    def __init__(self, spec):
        if isinstance(spec, CompiledSpec):
            spec = spec.spec
        if not isinstance(spec, Mapping):
            raise TypeError(f"spec must be a mapping, not {spec.__class__.__name__}")
        self.spec = spec
        for required in ("h", "t", "p"):
            if required not in spec:
                raise SpecError("Specification lacks the field", required)
        self.header = _field_spec("h", spec["h"])
        if self.header.max_len <= 0:
            self.header = None
        self.mti = _field_spec("t", spec["t"])
        self.mti_binary = self.mti.data_kind == DK_BIN
        fields = [None] * 193
        fields[0] = _field_spec("p", spec["p"])
        for i in range(1, 193):
            k = _FIELD_KEYS[i]
            if k in spec:
                fields[i] = _field_spec(k, spec[k])
        self.fields = fields
        self.bitmap_binary = fields[0].data_kind == DK_BIN


_cache: dict = {}


def compile_spec(spec) -> CompiledSpec:
    """Compile (once, cached by identity) a pyiso8583-format spec dict.

    A spec mutated after first use must be recompiled: call
    clear_spec_cache() or pass a fresh CompiledSpec.
    """
    if type(spec) is CompiledSpec:
        return spec
    hit = _cache.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    compiled = CompiledSpec(spec)
    if len(_cache) >= _SPEC_CACHE_MAX:
        _cache.clear()
    _cache[id(spec)] = (spec, compiled)  # holding spec keeps its id unique
    return compiled


def clear_spec_cache() -> None:
    _cache.clear()


class EncodedDoc(Mapping):
    """Read-only `doc_enc`: {key: {"len": bytes, "data": bytes}}, built on first access.

    pyiso8583 returns this as a dict it builds eagerly; building 20 nested
    dicts costs more than the whole encode, and the switch rarely reads it,
    so the codec records spans and materialises them only when asked.
    """

    __slots__ = ("_raw", "_keys", "_spans", "_d")

    def __init__(self, raw, keys, spans):
        self._raw = raw
        self._keys = keys
        self._spans = spans
        self._d = None

    def _materialize(self):
        d = self._d
        if d is None:
            raw = self._raw
            d = {}
            for k, (a, b, c) in zip(self._keys, self._spans):
                d[k] = {"len": raw[a:b], "data": raw[b:c]}
            self._d = d
        return d

    def __getitem__(self, key):
        return self._materialize()[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._keys

    def __repr__(self):
        return repr(self._materialize())

    def to_dict(self) -> dict:
        return {k: dict(v) for k, v in self._materialize().items()}


# --------------------------------------------------------------------------
# decoding


def decode(data, spec, strict: bool = False):
    """Decode one ISO 8583 message. Returns (doc_dec, doc_enc)."""
    return _decode_into(data, spec, strict, {})


def decode_partial(data, spec, strict: bool = False):
    """(fields decoded before the first error, the DecodeError or None).

    For answering a malformed request with a format error (30): the MTI,
    STAN and terminal id usually precede the bad field. Error path only, so
    both implementations share this one.
    """
    doc: dict = {}
    try:
        _decode_into(data, spec, strict, doc)
        return doc, None
    except DecodeError as e:
        return doc, e


def _decode_into(data, spec, strict, doc):
    if isinstance(data, memoryview):
        data = data.tobytes()
    elif isinstance(data, bytearray):
        data = bytes(data)
    elif not isinstance(data, bytes):
        raise TypeError(
            f"Encoded ISO8583 data must be bytes or bytearray, not {data.__class__.__name__}"
        )
    cs = compile_spec(spec)
    n = len(data)
    keys = []
    spans = []
    idx = 0
    if cs.header is not None:
        idx = _decode_field(data, n, idx, cs.header, doc, keys, spans, strict)

    # message type: 2 bytes BCD or 4 characters
    f = cs.mti
    width = 2 if cs.mti_binary else 4
    if n - idx < width:
        raise DecodeError(f"Field data is {n - idx} bytes, expecting {width}", "t", idx)
    raw = data[idx: idx + width]
    doc["t"] = raw.hex().upper() if cs.mti_binary else _decode_text(raw, f, idx)
    if strict and f.numeric:
        _check_numeric(doc["t"], "t", idx)
    keys.append("t")
    spans.append((idx, idx, idx + width))
    idx += width

    # bitmaps
    start = idx
    idx, present = _decode_bitmap(data, n, idx, cs.fields[0], "p", doc, 0)
    keys.append("p")
    spans.append((start, start, idx))
    if present and present[0] == 1:
        present.pop(0)
        fs1 = cs.fields[1]
        if fs1 is None:
            raise DecodeError("Field is not defined in the specification", "1", idx)
        start = idx
        idx, bits = _decode_bitmap(data, n, idx, fs1, "1", doc, 64)
        if bits and bits[0] == 65:
            bits.pop(0)
            idx, bits3 = _decode_bitmap(data, n, idx, fs1, "1", doc, 128)
            bits.extend(bits3)
        keys.append("1")
        spans.append((start, start, idx))
        present.extend(bits)

    fields = cs.fields
    last = keys[-1]
    for num in present:
        fs = fields[num]
        key = _FIELD_KEYS[num]
        if fs is None:
            raise DecodeError("Field is not defined in the specification", key, idx)
        idx = _decode_field(data, n, idx, fs, doc, keys, spans, strict)
        last = key
    if idx != n:
        raise DecodeError("Extra data after last field", last, idx)
    return doc, EncodedDoc(data, keys, spans)


def _decode_bitmap(data, n, idx, fs, key, doc, offset):
    binary = fs.data_kind == DK_BIN
    width = 8 if binary else 16
    if n - idx < width:
        raise DecodeError(f"Field data is {n - idx} bytes, expecting {width}", key, idx)
    raw = data[idx: idx + width]
    if binary:
        text = raw.hex().upper()
        bm = raw
    else:
        text = _decode_text(raw, fs, idx)
        # a codec of several bytes per character (utf-16) reads fewer digits
        if len(text) != 16:
            raise DecodeError("Failed to decode field, non-hex data", key, idx)
        for c in text:
            if c not in _HEXCHARS:
                raise DecodeError("Failed to decode field, non-hex data", key, idx)
        bm = bytes.fromhex(text)
    doc[key] = doc[key] + text if offset == 128 else text
    bits = []
    for byte_idx in range(8):
        b = bm[byte_idx]
        if b:
            for bit in range(8):
                if b & (0x80 >> bit):
                    bits.append(offset + byte_idx * 8 + bit + 1)
    return idx + width, bits


def _decode_field(data, n, idx, fs, doc, keys, spans, strict):
    key = fs.key
    len_type = fs.len_type
    if n - idx < len_type:
        raise DecodeError(
            f"Field length is {n - idx} bytes wide, expecting {len_type}", key, idx
        )
    len_start = idx
    kind = fs.len_kind
    if kind == LK_FIXED:
        enc_len = fs.max_len
    else:
        raw = data[idx: idx + len_type]
        if kind == LK_BIN:
            enc_len = int.from_bytes(raw, "big")
        elif kind == LK_BCD:
            enc_len = 0
            for b in raw:
                hi, lo = b >> 4, b & 0x0F
                if hi > 9 or lo > 9:
                    raise DecodeError("Failed to decode field length, invalid BCD data", key, idx)
                enc_len = enc_len * 100 + hi * 10 + lo
        else:
            if kind == LK_ASCII:
                digits = raw
            elif kind == LK_TABLE:
                digits = raw.translate(fs.len_dec_table)
            else:
                try:
                    text = raw.decode(fs.len_encoding)
                except Exception:
                    raise DecodeError("Failed to decode field length, invalid data", key, idx) from None
                digits = text.encode("ascii", "replace")
            enc_len = 0
            for b in digits:
                if not 0x30 <= b <= 0x39:
                    raise DecodeError(
                        "Failed to decode field length, non-numeric data", key, idx
                    )
                enc_len = enc_len * 10 + (b - 0x30)
        if enc_len > fs.max_len:
            raise DecodeError(
                f"Field data is {enc_len} {fs.len_count}, larger than maximum {fs.max_len}",
                key,
                idx,
            )
        idx += len_type
    if fs.nibbles:
        byte_len = (enc_len + 1) // 2
    else:
        byte_len = enc_len
    if n - idx < byte_len:
        have = n - idx
        if fs.nibbles:
            have *= 2
        raise DecodeError(f"Field data is {have} {fs.len_count}, expecting {enc_len}", key, idx)
    raw = data[idx: idx + byte_len]
    if fs.data_kind == DK_BIN:
        value = raw.hex().upper()
        if fs.nibbles and enc_len & 1:
            pad = fs.pad.upper()
            if pad and fs.pad_left and value[0] == pad:
                value = value[1:]
            elif pad and not fs.pad_left and value[-1] == pad:
                value = value[:-1]
            else:
                raise DecodeError(
                    f"Field data is {len(value)} nibbles, expecting {enc_len}", key, idx
                )
    else:
        value = _decode_text(raw, fs, idx) if byte_len else ""
    if strict and fs.numeric:
        _check_numeric(value, key, idx)
    doc[key] = value
    keys.append(key)
    spans.append((len_start, idx, idx + byte_len))
    return idx + byte_len


def _decode_text(raw: bytes, fs, idx) -> str:
    kind = fs.data_kind
    try:
        if kind == DK_ASCII:
            return raw.decode("ascii")
        if kind == DK_LATIN1:
            return raw.decode("latin-1")
        if kind == DK_TABLE:
            return raw.translate(fs.dec_table).decode("latin-1")
        return raw.decode(fs.encoding)
    except Exception:
        raise DecodeError("Failed to decode field, invalid data", fs.key, idx) from None


def _check_numeric(value: str, key: str, pos: int) -> None:
    for c in value:
        if c not in _DIGITS:
            raise DecodeError("Failed to decode field, non-numeric data", key, pos)


# --------------------------------------------------------------------------
# encoding


def encode(doc, spec, strict: bool = False):
    """Encode a document. Returns (bytes, doc_enc); sets doc["p"] (and "1")."""
    if not isinstance(doc, dict):
        raise TypeError(f"Decoded ISO8583 data must be dict, not {doc.__class__.__name__}")
    cs = compile_spec(spec)
    # Secondary/tertiary bitmaps are computed, never taken from the document.
    doc.pop("1", None)
    doc.pop("65", None)

    present = []
    for k in doc:
        if type(k) is not str:
            raise EncodeError("Dictionary contains invalid field keys", "p")
        if not k.isnumeric():
            continue
        if not k.isdigit() or not k.isascii() or (len(k) > 1 and k[0] == "0"):
            raise EncodeError("Dictionary contains invalid field keys", "p")
        num = int(k)
        if num < 1 or num > 192:
            raise EncodeError("Dictionary contains fields outside of 1-192 range", "p")
        present.append(num)
    present.sort()
    fields = cs.fields
    for num in present:
        if fields[num] is None:
            raise EncodeError("Field is not defined in the specification", _FIELD_KEYS[num])

    out = bytearray()
    keys = []
    spans = []
    if cs.header is not None:
        if "h" not in doc:
            raise EncodeError("Field data is required according to specifications", "h")
        _encode_field(out, cs.header, doc["h"], keys, spans, strict)

    if "t" not in doc:
        raise EncodeError("Field data is required", "t")
    f = cs.mti
    mti = doc["t"]
    start = len(out)
    if cs.mti_binary:
        _encode_hex(out, mti, f)
        width = 2
    else:
        _encode_text(out, mti, f)
        width = 4
    if len(out) - start != width:
        raise EncodeError(f"Field data is {len(out) - start} bytes, expecting {width}", "t")
    if strict and f.numeric:
        _check_numeric_enc(mti, "t")
    keys.append("t")
    spans.append((start, start, len(out)))

    has_tertiary = bool(present) and present[-1] > 128
    has_secondary = has_tertiary or (bool(present) and present[-1] > 64)
    bm = bytearray(24)
    if has_secondary:
        bm[0] |= 0x80
    if has_tertiary:
        bm[8] |= 0x80
    for num in present:
        b = num - 1
        bm[b >> 3] |= 0x80 >> (b & 7)

    primary = bytes(bm[0:8]).hex().upper()
    doc["p"] = primary
    start = len(out)
    _encode_bitmap(out, cs.fields[0], primary)
    keys.append("p")
    spans.append((start, start, len(out)))
    if has_secondary:
        fs1 = cs.fields[1]
        if fs1 is None:
            raise EncodeError("Field is not defined in the specification", "1")
        secondary = bytes(bm[8:16]).hex().upper()
        if has_tertiary:
            secondary += bytes(bm[16:24]).hex().upper()
        doc["1"] = secondary
        start = len(out)
        _encode_bitmap(out, fs1, secondary)
        keys.append("1")
        spans.append((start, start, len(out)))

    for num in present:
        fs = fields[num]
        _encode_field(out, fs, doc[fs.key], keys, spans, strict)
    raw = bytes(out)
    return raw, EncodedDoc(raw, keys, spans)


def _encode_bitmap(out, fs, hextext):
    if fs.data_kind == DK_BIN:
        out += bytes.fromhex(hextext)
    else:
        _encode_text(out, hextext, fs)


def _encode_hex(out, value, fs) -> int:
    """Append hex `value` as bytes; returns its length in the field's units."""
    if type(value) is not str:
        raise EncodeError("Failed to encode field, non-hex data", fs.key)
    n = len(value)
    if fs.nibbles and n & 1:
        if not fs.pad:
            raise EncodeError("Failed to encode field, odd-length nibble data, specify pad", fs.key)
        value = fs.pad + value if fs.pad_left else value + fs.pad
    if len(value) & 1:
        raise EncodeError("Failed to encode field, odd-length hex data", fs.key)
    for c in value:
        if c not in _HEXCHARS:
            raise EncodeError("Failed to encode field, non-hex data", fs.key)
    out += bytes.fromhex(value)
    return n if fs.nibbles else len(value) // 2


def _encode_text(out, value, fs) -> int:
    if type(value) is not str:
        raise EncodeError("Failed to encode field, invalid data", fs.key)
    kind = fs.data_kind
    try:
        if kind == DK_ASCII:
            b = value.encode("ascii")
        elif kind == DK_LATIN1:
            b = value.encode("latin-1")
        elif kind == DK_TABLE:
            b = value.encode("latin-1").translate(fs.enc_table)
        else:
            b = value.encode(fs.encoding)
    except Exception:
        raise EncodeError("Failed to encode field, invalid data", fs.key) from None
    out += b
    return len(b) * 2 if fs.nibbles else len(b)


def _check_numeric_enc(value: str, key: str) -> None:
    for c in value:
        if c not in _DIGITS:
            raise EncodeError("Failed to encode field, non-numeric data", key)


def _encode_field(out, fs, value, keys, spans, strict):
    key = fs.key
    len_start = len(out)
    len_type = fs.len_type
    out += b"\x00" * len_type  # length prefix is written once the data is known
    data_start = len(out)
    if fs.data_kind == DK_BIN:
        enc_len = _encode_hex(out, value, fs)
    else:
        enc_len = _encode_text(out, value, fs)
    if strict and fs.numeric:
        _check_numeric_enc(value, key)
    if len_type == 0:
        if enc_len != fs.max_len:
            raise EncodeError(
                f"Field data is {enc_len} {fs.len_count}, expecting {fs.max_len}", key
            )
    else:
        if enc_len > fs.max_len:
            raise EncodeError(
                f"Field data is {enc_len} {fs.len_count}, larger than maximum {fs.max_len}",
                key,
            )
        kind = fs.len_kind
        if kind == LK_BIN:
            if enc_len >> (8 * len_type):
                raise EncodeError(
                    "Failed to encode field length, field length does not fit into configured field size",
                    key,
                )
            prefix = enc_len.to_bytes(len_type, "big")
        elif kind == LK_BCD:
            digits = str(enc_len).zfill(len_type * 2)
            if len(digits) > len_type * 2:
                raise EncodeError(
                    "Failed to encode field length, field length does not fit into configured field size",
                    key,
                )
            prefix = bytes.fromhex(digits)
        else:
            digits = str(enc_len).zfill(len_type)
            if kind == LK_ASCII:
                prefix = digits.encode("ascii")
            elif kind == LK_TABLE:
                prefix = digits.encode("ascii").translate(fs.len_enc_table)
            else:
                prefix = digits.encode(fs.len_encoding)
            if len(prefix) != len_type:
                raise EncodeError(
                    "Failed to encode field length, field length does not fit into configured field size",
                    key,
                )
        out[len_start:data_start] = prefix
    keys.append(key)
    spans.append((len_start, data_start, len(out)))
