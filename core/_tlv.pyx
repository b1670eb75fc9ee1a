# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""EMV BER-TLV (ISO 8583 DE55), Cython.

Same behaviour as core._tlv_py, whose docstring is the reference. Decoding
reads the caller's buffer through a bounds-checked ``const unsigned char*``;
the only objects made are the tag strings and the value bytes returned.
"""
cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport int64_t

MAX_DEPTH = 8
MAX_TAG_LEN = 4
MAX_LENGTH = 0xFFFFFFFF

cdef enum:
    _MAX_DEPTH = 8
    _MAX_TAG_LEN = 4

cdef const char* _HEXDIGITS = b"0123456789ABCDEF"
cdef object _memoryview = memoryview


class TLVError(ValueError):
    """A BER-TLV violation; ``msg`` says what, ``pos`` says where."""

    def __init__(self, msg, pos):
        super().__init__(f"{msg} (at position {pos})")
        self.msg = msg
        self.pos = pos

    def __reduce__(self):
        return (type(self), (self.msg, self.pos))


cdef object _TLVError = TLVError


cdef int _get_buffer(object data, Py_buffer* view) except -1:
    if not isinstance(data, (bytes, bytearray, _memoryview)):
        raise TypeError(f"data must be bytes, bytearray or memoryview, not {type(data).__name__}")
    if isinstance(data, _memoryview) and not data.c_contiguous:
        raise BufferError("data must be a C-contiguous buffer")
    PyObject_GetBuffer(data, view, PyBUF_SIMPLE)
    return 0


cdef inline str _tag_text(const unsigned char* t, Py_ssize_t n):
    cdef char[2 * _MAX_TAG_LEN] buf
    cdef Py_ssize_t k
    for k in range(n):
        buf[2 * k] = _HEXDIGITS[t[k] >> 4]
        buf[2 * k + 1] = _HEXDIGITS[t[k] & 0x0F]
    return PyUnicode_DecodeASCII(buf, 2 * n, NULL)


cdef list _decode(const unsigned char* p, Py_ssize_t i, Py_ssize_t end, int depth, bint tree):
    cdef list out = []
    cdef unsigned char b, c
    cdef Py_ssize_t tstart, lpos, nb, k
    cdef int64_t length
    cdef str tag
    cdef object value
    while i < end:
        b = p[i]
        if b == 0x00 or b == 0xFF:  # padding between data objects
            i += 1
            continue
        tstart = i
        i += 1
        if (b & 0x1F) == 0x1F:
            while True:
                if i - tstart >= _MAX_TAG_LEN:
                    raise _TLVError(f"tag longer than {_MAX_TAG_LEN} bytes", tstart)
                if i >= end:
                    raise _TLVError("truncated tag", tstart)
                c = p[i]
                i += 1
                if not (c & 0x80):
                    break
        tag = _tag_text(p + tstart, i - tstart)
        lpos = i
        if i >= end:
            raise _TLVError(f"tag {tag}: truncated length", lpos)
        b = p[i]
        i += 1
        if b < 0x80:
            length = b
        elif b == 0x80:
            raise _TLVError(f"tag {tag}: indefinite length (0x80) not allowed", lpos)
        elif b <= 0x84:
            nb = b & 0x7F
            if end - i < nb:
                raise _TLVError(f"tag {tag}: truncated length", lpos)
            length = 0
            for k in range(nb):
                length = (length << 8) | p[i + k]
            i += nb
        else:
            raise _TLVError(f"tag {tag}: length form 0x{b:02X} not supported", lpos)
        if length > end - i:
            raise _TLVError(f"tag {tag}: length {length} exceeds the {end - i} bytes left", lpos)
        if tree and (p[tstart] & 0x20):
            if depth >= _MAX_DEPTH:
                raise _TLVError(f"tag {tag}: nested deeper than {_MAX_DEPTH} levels", tstart)
            value = _decode(p, i, i + <Py_ssize_t>length, depth + 1, True)
        else:
            value = PyBytes_FromStringAndSize(<const char*>p + i, <Py_ssize_t>length)
        out.append((tag, value))
        i += <Py_ssize_t>length
    return out


def decode_tlv(data):
    """[(tag, value)] of the top level; constructed values stay raw bytes."""
    cdef Py_buffer view
    _get_buffer(data, &view)
    try:
        return _decode(<const unsigned char*>view.buf, 0, view.len, 1, False)
    finally:
        PyBuffer_Release(&view)


def decode_tlv_tree(data):
    """[(tag, value)] where a constructed tag's value is its decoded list."""
    cdef Py_buffer view
    _get_buffer(data, &view)
    try:
        return _decode(<const unsigned char*>view.buf, 0, view.len, 1, True)
    finally:
        PyBuffer_Release(&view)


cdef inline int _hex_value(Py_UCS4 ch) noexcept:
    cdef unsigned int v = <unsigned int>ch
    if 0x30 <= v <= 0x39:
        return <int>(v - 0x30)
    if 0x41 <= v <= 0x46:
        return <int>(v - 0x37)
    if 0x61 <= v <= 0x66:
        return <int>(v - 0x57)
    return -1


# Tags already checked, so a response built per transaction does not re-parse
# the same dozen tags; bounded because tags may come from outside.
cdef dict _TAG_CACHE = {}
cdef Py_ssize_t _TAG_CACHE_MAX = 1024


cdef bytes _tag_bytes(object tag, Py_ssize_t index):
    cdef bytes cached
    cdef Py_ssize_t n, k
    cdef int hi, lo
    cdef bint ok
    cdef unsigned char* t
    cdef str s, name
    cdef bytes out
    if not isinstance(tag, str):
        raise TypeError(f"item {index}: tag must be str, not {type(tag).__name__}")
    cached = _TAG_CACHE.get(tag)
    if cached is not None:
        return cached
    s = <str>tag
    n = len(s)
    # The tag text is not echoed until it is known to be short hex: a caller
    # who swapped tag and value would otherwise put card data in the message.
    if n == 0 or n > 2 * _MAX_TAG_LEN or n % 2:
        raise _TLVError(f"item {index}: tag is not 1 to {_MAX_TAG_LEN} bytes of hex", index)
    for k in range(n):
        if _hex_value(s[k]) < 0:
            raise _TLVError(f"item {index}: tag is not 1 to {_MAX_TAG_LEN} bytes of hex", index)
    out = PyBytes_FromStringAndSize(NULL, n // 2)
    t = <unsigned char*>PyBytes_AS_STRING(out)
    for k in range(n // 2):
        t[k] = (_hex_value(s[2 * k]) << 4) | _hex_value(s[2 * k + 1])
    name = s.upper()
    if t[0] == 0x00 or t[0] == 0xFF:
        raise _TLVError(f"item {index}: tag {name} starts with a padding byte", index)
    if (t[0] & 0x1F) != 0x1F:
        ok = n == 2
    else:
        ok = n >= 4 and not (t[n // 2 - 1] & 0x80)
        for k in range(1, n // 2 - 1):
            if not (t[k] & 0x80):
                ok = False
    if not ok:
        raise _TLVError(f"item {index}: tag {name} is not a well-formed BER-TLV tag", index)
    if len(_TAG_CACHE) < _TAG_CACHE_MAX:
        _TAG_CACHE[tag] = out
    return out


cdef int _encode_length(bytearray out, int64_t n) except -1:
    cdef unsigned char[5] h
    cdef int k, nb
    if n < 0x80:
        h[0] = <unsigned char>n
        nb = 0
    else:
        nb = 1 if n <= 0xFF else 2 if n <= 0xFFFF else 3 if n <= 0xFFFFFF else 4
        h[0] = 0x80 | nb
        for k in range(nb):
            h[nb - k] = (n >> (8 * k)) & 0xFF
    out += PyBytes_FromStringAndSize(<char*>h, nb + 1)
    return 0


cdef int _encode(object items, bytearray out, int depth) except -1:
    cdef Py_ssize_t index = 0
    cdef int64_t n
    cdef bytes t
    cdef bytearray inner
    for item in items:
        try:
            tag, value = item
        except (TypeError, ValueError):
            raise TypeError(f"item {index} is not a (tag, value) pair") from None
        t = _tag_bytes(tag, index)
        if isinstance(value, list):
            if not ((<unsigned char>t[0]) & 0x20):
                raise _TLVError(f"item {index}: tag {tag.upper()} is primitive; its value cannot be a list", index)
            if depth >= _MAX_DEPTH:
                raise _TLVError(f"item {index}: tag {tag.upper()} nested deeper than {_MAX_DEPTH} levels", index)
            inner = bytearray()
            _encode(value, inner, depth + 1)
            value = inner
            n = len(inner)
        elif isinstance(value, (bytes, bytearray)):
            n = len(value)
        elif isinstance(value, _memoryview):
            if not value.c_contiguous:
                raise BufferError(f"item {index}: value must be a C-contiguous buffer")
            n = value.nbytes
        else:
            raise TypeError(
                f"item {index}: value must be bytes, bytearray, memoryview or list, not {type(value).__name__}"
            )
        if n > 0xFFFFFFFF:
            raise _TLVError(f"item {index}: tag {tag.upper()}: value longer than {MAX_LENGTH} bytes", index)
        out += t
        _encode_length(out, n)
        out += value
        index += 1
    return 0


def encode_tlv(items):
    """BER-TLV bytes for [(tag, value)], with minimal lengths.

    A value may be a list of (tag, value) for a constructed tag, as
    decode_tlv_tree returns it.
    """
    cdef bytearray out = bytearray()
    _encode(items, out, 1)
    return bytes(out)


def decode_field55(hex_str):
    """decode_tlv for DE55 as the ISO 8583 codec carries it (hex text)."""
    cdef str s
    cdef Py_ssize_t n, k
    cdef int hi, lo
    cdef bytes raw
    cdef unsigned char* o
    if not isinstance(hex_str, str):
        raise TypeError(f"field 55 must be str, not {type(hex_str).__name__}")
    s = <str>hex_str
    n = len(s)
    for k in range(n):
        if _hex_value(s[k]) < 0:
            raise _TLVError("field 55 has a character that is not hex", k)
    if n % 2:
        raise _TLVError("field 55 has an odd number of hex digits", n)
    raw = PyBytes_FromStringAndSize(NULL, n // 2)
    o = <unsigned char*>PyBytes_AS_STRING(raw)
    for k in range(n // 2):
        o[k] = (_hex_value(s[2 * k]) << 4) | _hex_value(s[2 * k + 1])
    return _decode(o, 0, n // 2, 1, False)


def encode_field55(items):
    """encode_tlv as upper-case hex, the ISO 8583 codec's form of DE55."""
    return encode_tlv(items).hex().upper()
