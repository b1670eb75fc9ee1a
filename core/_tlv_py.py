"""EMV BER-TLV (ISO 8583 DE55): pure-Python twin of core._tlv.

Behaviour (results, exception types, messages and positions) is identical to
the Cython extension; tests/test_tlv.py checks both on random input.

Decoding (EMV Book 3 Annex B):

* tag: 1 to 4 bytes; when the low 5 bits of the first byte are all set
  (0x1F), more bytes follow while bit 8 (0x80) of the last one is set.
  Returned as upper-case hex, e.g. ``"9F26"``;
* length: short form (< 0x80) or long form 0x81-0x84 (1 to 4 length bytes;
  non-minimal long forms are accepted, as some cards send them). 0x80
  (indefinite) and 0x85 and above are rejected;
* the value must fit in the bytes left (of the enclosing constructed value);
* 0x00 and 0xFF between data objects are padding and skipped;
* ``decode_tlv`` returns constructed values (bit 6 of the first tag byte) as
  raw bytes; ``decode_tlv_tree`` decodes them into nested lists, at most
  ``MAX_DEPTH`` levels deep.

``TLVError.pos`` is a byte offset in the decoded data: the first tag byte for
tag and nesting errors, the first length byte for length errors. For
``encode_tlv`` it is the index of the offending item; for the hex checks of
``decode_field55`` the index of the offending character. Messages may name
tags, lengths and positions, never a value byte (values are card data).
"""
from __future__ import annotations

MAX_DEPTH = 8
MAX_TAG_LEN = 4
MAX_LENGTH = 0xFFFFFFFF

_HEX = frozenset("0123456789abcdefABCDEF")


class TLVError(ValueError):
    """A BER-TLV violation; ``msg`` says what, ``pos`` says where."""

    def __init__(self, msg, pos):
        super().__init__(f"{msg} (at position {pos})")
        self.msg = msg
        self.pos = pos

    def __reduce__(self):
        return (type(self), (self.msg, self.pos))


def _as_bytes(data):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, bytearray or memoryview, not {type(data).__name__}")
    if isinstance(data, memoryview) and not data.c_contiguous:
        raise BufferError("data must be a C-contiguous buffer")
    return bytes(data)


def _decode(p, i, end, depth, tree):
    out = []
    while i < end:
        b = p[i]
        if b == 0x00 or b == 0xFF:  # padding between data objects
            i += 1
            continue
        tstart = i
        i += 1
        if (b & 0x1F) == 0x1F:
            while True:
                if i - tstart >= MAX_TAG_LEN:
                    raise TLVError(f"tag longer than {MAX_TAG_LEN} bytes", tstart)
                if i >= end:
                    raise TLVError("truncated tag", tstart)
                c = p[i]
                i += 1
                if not (c & 0x80):
                    break
        tag = p[tstart:i].hex().upper()
        lpos = i
        if i >= end:
            raise TLVError(f"tag {tag}: truncated length", lpos)
        b = p[i]
        i += 1
        if b < 0x80:
            length = b
        elif b == 0x80:
            raise TLVError(f"tag {tag}: indefinite length (0x80) not allowed", lpos)
        elif b <= 0x84:
            nb = b & 0x7F
            if end - i < nb:
                raise TLVError(f"tag {tag}: truncated length", lpos)
            length = 0
            for k in range(nb):
                length = (length << 8) | p[i + k]
            i += nb
        else:
            raise TLVError(f"tag {tag}: length form 0x{b:02X} not supported", lpos)
        if length > end - i:
            raise TLVError(f"tag {tag}: length {length} exceeds the {end - i} bytes left", lpos)
        if tree and (p[tstart] & 0x20):
            if depth >= MAX_DEPTH:
                raise TLVError(f"tag {tag}: nested deeper than {MAX_DEPTH} levels", tstart)
            value = _decode(p, i, i + length, depth + 1, True)
        else:
            value = p[i:i + length]
        out.append((tag, value))
        i += length
    return out


def decode_tlv(data):
    """[(tag, value)] of the top level; constructed values stay raw bytes."""
    p = _as_bytes(data)
    return _decode(p, 0, len(p), 1, False)


def decode_tlv_tree(data):
    """[(tag, value)] where a constructed tag's value is its decoded list."""
    p = _as_bytes(data)
    return _decode(p, 0, len(p), 1, True)


def _tag_bytes(tag, index):
    if not isinstance(tag, str):
        raise TypeError(f"item {index}: tag must be str, not {type(tag).__name__}")
    n = len(tag)
    # The tag text is not echoed until it is known to be short hex: a caller
    # who swapped tag and value would otherwise put card data in the message.
    if n == 0 or n > 2 * MAX_TAG_LEN or n % 2 or not all(ch in _HEX for ch in tag):
        raise TLVError(f"item {index}: tag is not 1 to {MAX_TAG_LEN} bytes of hex", index)
    t = bytes.fromhex(tag)
    name = tag.upper()
    if t[0] == 0x00 or t[0] == 0xFF:
        raise TLVError(f"item {index}: tag {name} starts with a padding byte", index)
    if (t[0] & 0x1F) != 0x1F:
        ok = len(t) == 1
    else:
        ok = len(t) >= 2 and all(c & 0x80 for c in t[1:-1]) and not (t[-1] & 0x80)
    if not ok:
        raise TLVError(f"item {index}: tag {name} is not a well-formed BER-TLV tag", index)
    return t


def _encode_length(out, n):
    if n < 0x80:
        out.append(n)
    elif n <= 0xFF:
        out += b"\x81" + n.to_bytes(1, "big")
    elif n <= 0xFFFF:
        out += b"\x82" + n.to_bytes(2, "big")
    elif n <= 0xFFFFFF:
        out += b"\x83" + n.to_bytes(3, "big")
    else:
        out += b"\x84" + n.to_bytes(4, "big")


def _encode(items, out, depth):
    for index, item in enumerate(items):
        try:
            tag, value = item
        except (TypeError, ValueError):
            raise TypeError(f"item {index} is not a (tag, value) pair") from None
        t = _tag_bytes(tag, index)
        if isinstance(value, list):
            if not (t[0] & 0x20):
                raise TLVError(f"item {index}: tag {tag.upper()} is primitive; its value cannot be a list", index)
            if depth >= MAX_DEPTH:
                raise TLVError(f"item {index}: tag {tag.upper()} nested deeper than {MAX_DEPTH} levels", index)
            inner = bytearray()
            _encode(value, inner, depth + 1)
            value = inner
            n = len(inner)
        elif isinstance(value, (bytes, bytearray)):
            n = len(value)
        elif isinstance(value, memoryview):
            if not value.c_contiguous:
                raise BufferError(f"item {index}: value must be a C-contiguous buffer")
            n = value.nbytes
        else:
            raise TypeError(
                f"item {index}: value must be bytes, bytearray, memoryview or list, not {type(value).__name__}"
            )
        if n > MAX_LENGTH:
            raise TLVError(f"item {index}: tag {tag.upper()}: value longer than {MAX_LENGTH} bytes", index)
        out += t
        _encode_length(out, n)
        out += value


def encode_tlv(items):
    """BER-TLV bytes for [(tag, value)], with minimal lengths.

    A value may be a list of (tag, value) for a constructed tag, as
    decode_tlv_tree returns it.
    """
    out = bytearray()
    _encode(items, out, 1)
    return bytes(out)


def decode_field55(hex_str):
    """decode_tlv for DE55 as the ISO 8583 codec carries it (hex text)."""
    if not isinstance(hex_str, str):
        raise TypeError(f"field 55 must be str, not {type(hex_str).__name__}")
    for index, ch in enumerate(hex_str):
        if ch not in _HEX:
            raise TLVError("field 55 has a character that is not hex", index)
    if len(hex_str) % 2:
        raise TLVError("field 55 has an odd number of hex digits", len(hex_str))
    return decode_tlv(bytes.fromhex(hex_str))


def encode_field55(items):
    """encode_tlv as upper-case hex, the ISO 8583 codec's form of DE55."""
    return encode_tlv(items).hex().upper()
