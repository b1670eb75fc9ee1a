# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython ISO 8583 codec: the hot path. Twin: core/_iso8583_py.py.

Design (after py-pgproto/asyncpg): a spec dict is compiled once into a C
array of FieldDesc structs; decode reads with bounds-checked pointer
arithmetic over the input buffer; encode writes into a growable C buffer
with a stack-resident first block and fills each length prefix after the
data, so no intermediate bytes objects are made per field. Spec validation,
exceptions and messages come from the twin so both behave identically.
"""
cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_SetItem, PyDict_GetItem, PyDict_Next, PyDict_DelItem, PyDict_Contains
from cpython.object cimport PyObject
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from libc.string cimport memcpy, memset
from libc.stdint cimport uint8_t, uint64_t

import sys
from collections.abc import Mapping as _Mapping

from core import _iso8583_py as _twin

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object o)
    int PyUnicode_KIND(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    bint PyUnicode_IS_ASCII(object o)
    bint PyUnicode_CheckExact(object o)
    bint PyBytes_CheckExact(object o)
    object PyUnicode_DecodeLatin1(const char* s, Py_ssize_t size, const char* errors)
    int PyUnicode_1BYTE_KIND
    # Pre-sized result dicts avoid the 8 -> 16 -> 32 slot resizes that
    # otherwise dominate a 20-field decode (measured with perf).
    dict _PyDict_NewPresized(Py_ssize_t minused)
    PyObject* PyDict_GetItemWithError(object d, object k) except? NULL

DecodeError = _twin.DecodeError
EncodeError = _twin.EncodeError
SpecError = _twin.SpecError

cdef uint64_t LOW63 = ~((<uint64_t>1) << 63)   # clears the "next bitmap follows" bit

DEF MAX_FIELDS = 193       # index 0 = primary bitmap "p", 1..192 fields
DEF STACK_BUF = 2048

cdef enum DataKind:
    DK_BIN = 0
    DK_ASCII = 1
    DK_LATIN1 = 2
    DK_TABLE = 3
    DK_CODEC = 4

cdef enum LenKind:
    LK_FIXED = 0
    LK_BIN = 1
    LK_BCD = 2
    LK_ASCII = 3
    LK_TABLE = 4
    LK_CODEC = 5

# Span codes for doc_enc keys: -2 header, -1 MTI, 0 "p", 1..192 fields
DEF CODE_H = -2
DEF CODE_T = -1

ctypedef struct FieldDesc:
    bint defined
    int data_kind
    int len_kind
    int len_type
    Py_ssize_t max_len
    bint nibbles
    unsigned char pad          # pad character as given (0: none)
    unsigned char pad_upper    # for comparing against upper-case hex
    bint pad_left
    bint numeric
    bint card_data
    const unsigned char* dec_table
    const unsigned char* enc_table
    const unsigned char* len_dec_table
    const unsigned char* len_enc_table
    PyObject* key
    PyObject* encoding
    PyObject* len_encoding
    PyObject* len_count        # "bytes" / "nibbles" for messages

cdef tuple _KEYS = tuple(sys.intern(k) for k in ["p"] + [str(i) for i in range(1, 193)])
cdef str KEY_H = sys.intern("h")
cdef str KEY_T = sys.intern("t")
cdef str KEY_P = _KEYS[0]
cdef str KEY_1 = _KEYS[1]
cdef str KEY_65 = _KEYS[65]
cdef dict _KEYMAP = {k: i for i, k in enumerate(_KEYS) if i >= 1}

cdef const char* HEXU = b"0123456789ABCDEF"
cdef signed char HEXVAL[256]
cdef int _i
for _i in range(256):
    HEXVAL[_i] = -1
for _i in range(10):
    HEXVAL[48 + _i] = _i
for _i in range(6):
    HEXVAL[65 + _i] = 10 + _i
    HEXVAL[97 + _i] = 10 + _i


@cython.final
cdef class CompiledSpec:
    """A spec compiled into a C field table. Build with compile_spec()."""
    cdef FieldDesc fields[MAX_FIELDS]
    cdef FieldDesc header
    cdef FieldDesc mti
    cdef bint has_header
    cdef readonly object spec
    cdef list _owned   # keeps the twin FieldSpecs (tables, names) alive

    def __init__(self, spec):
        if isinstance(spec, CompiledSpec):
            spec = (<CompiledSpec>spec).spec
        twin = _twin.CompiledSpec(spec)   # validates exactly as the twin does
        self.spec = twin.spec
        self._owned = [twin]
        memset(self.fields, 0, sizeof(self.fields))
        memset(&self.header, 0, sizeof(FieldDesc))
        self.has_header = twin.header is not None
        if self.has_header:
            self._fill(&self.header, twin.header)
        self._fill(&self.mti, twin.mti)
        cdef int i
        for i in range(MAX_FIELDS):
            if twin.fields[i] is not None:
                self._fill(&self.fields[i], twin.fields[i])

    cdef _fill(self, FieldDesc* d, fs):
        self._owned.append(fs)
        d.defined = True
        d.data_kind = fs.data_kind
        d.len_kind = fs.len_kind
        d.len_type = fs.len_type
        d.max_len = fs.max_len
        d.nibbles = fs.nibbles
        d.pad = ord(fs.pad) if fs.pad else 0
        d.pad_upper = ord(fs.pad.upper()) if fs.pad else 0
        d.pad_left = fs.pad_left
        d.numeric = fs.numeric
        d.card_data = fs.card_data
        key = fs.key
        if key in _KEYMAP:
            key = _KEYS[_KEYMAP[key]]
        elif key == "p":
            key = KEY_P
        elif key == "h":
            key = KEY_H
        elif key == "t":
            key = KEY_T
        self._owned.append(key)
        d.key = <PyObject*>key
        d.encoding = <PyObject*>fs.encoding
        d.len_encoding = <PyObject*>fs.len_encoding
        d.len_count = <PyObject*>fs.len_count
        d.dec_table = <const unsigned char*>fs.dec_table if fs.dec_table is not None else NULL
        d.enc_table = <const unsigned char*>fs.enc_table if fs.enc_table is not None else NULL
        d.len_dec_table = <const unsigned char*>fs.len_dec_table if fs.len_dec_table is not None else NULL
        d.len_enc_table = <const unsigned char*>fs.len_enc_table if fs.len_enc_table is not None else NULL


cdef dict _cache = {}
DEF SPEC_CACHE_MAX = 64


cdef object _last_spec = None
cdef CompiledSpec _last_compiled = None


cpdef CompiledSpec compile_spec(spec):
    """Compile (once, cached by identity) a pyiso8583-format spec dict."""
    global _last_spec, _last_compiled
    if type(spec) is CompiledSpec:
        return <CompiledSpec>spec
    if spec is _last_spec:
        return _last_compiled
    cdef object hit = _cache.get(id(spec))
    if hit is not None and (<tuple>hit)[0] is spec:
        _last_spec = spec
        _last_compiled = <CompiledSpec>(<tuple>hit)[1]
        return _last_compiled
    compiled = CompiledSpec(spec)
    if len(_cache) >= SPEC_CACHE_MAX:
        _cache.clear()
    _cache[id(spec)] = (spec, compiled)
    _last_spec = spec
    _last_compiled = compiled
    return compiled


def clear_spec_cache():
    global _last_spec, _last_compiled
    _cache.clear()
    _last_spec = None
    _last_compiled = None


# ---------------------------------------------------------------------------
# doc_enc: spans recorded during encode/decode, materialised on first access

ctypedef struct Span:
    int code
    Py_ssize_t a, b, c


@cython.final
cdef class EncodedDoc:
    """Read-only `doc_enc` mapping {key: {"len": bytes, "data": bytes}}.

    Built lazily from recorded spans: pyiso8583 builds ~20 nested dicts per
    message eagerly, which would cost more than the whole Cython encode.
    """
    cdef object _raw
    cdef Span* _spans
    cdef Py_ssize_t _n
    cdef dict _d

    def __cinit__(self):
        self._spans = NULL
        self._n = 0

    def __dealloc__(self):
        if self._spans is not NULL:
            PyMem_Free(self._spans)

    cdef dict _materialize(self):
        cdef Py_ssize_t i
        cdef Span* s
        cdef const char* p
        if self._d is None:
            d = {}
            p = PyBytes_AS_STRING(self._raw)
            for i in range(self._n):
                s = &self._spans[i]
                d[_code_key(s.code)] = {
                    "len": PyBytes_FromStringAndSize(p + s.a, s.b - s.a),
                    "data": PyBytes_FromStringAndSize(p + s.b, s.c - s.b),
                }
            self._d = d
        return self._d

    def __getitem__(self, key):
        return self._materialize()[key]

    def __iter__(self):
        cdef Py_ssize_t i
        return iter([_code_key(self._spans[i].code) for i in range(self._n)])

    def __len__(self):
        return self._n

    def __contains__(self, key):
        return key in self._materialize()

    def keys(self):
        return self._materialize().keys()

    def items(self):
        return self._materialize().items()

    def values(self):
        return self._materialize().values()

    def get(self, key, default=None):
        return self._materialize().get(key, default)

    def __eq__(self, other):
        if isinstance(other, (EncodedDoc, _twin.EncodedDoc)):
            return self.to_dict() == other.to_dict()
        if isinstance(other, dict):
            return self.to_dict() == other
        return NotImplemented

    def __repr__(self):
        return repr(self._materialize())

    def to_dict(self):
        return {k: dict(v) for k, v in self._materialize().items()}

_Mapping.register(EncodedDoc)


cdef inline object _code_key(int code):
    if code == CODE_H:
        return KEY_H
    if code == CODE_T:
        return KEY_T
    return _KEYS[code]


cdef EncodedDoc _make_encoded(object raw, Span* spans, Py_ssize_t n):
    cdef EncodedDoc e = EncodedDoc.__new__(EncodedDoc)
    e._raw = raw
    e._spans = <Span*>PyMem_Malloc(n * sizeof(Span) if n else sizeof(Span))
    if e._spans is NULL:
        raise MemoryError()
    memcpy(e._spans, spans, n * sizeof(Span))
    e._n = n
    return e


# ---------------------------------------------------------------------------
# decoding

cdef inline object _hex_upper(const unsigned char* p, Py_ssize_t n):
    s = PyUnicode_New(n * 2, 127)
    cdef unsigned char* out = <unsigned char*>PyUnicode_DATA(s)
    cdef Py_ssize_t i
    for i in range(n):
        out[2 * i] = HEXU[p[i] >> 4]
        out[2 * i + 1] = HEXU[p[i] & 15]
    return s


cdef object _decode_text(const unsigned char* p, Py_ssize_t n, FieldDesc* f, Py_ssize_t pos):
    """Decoded str of a text field, or NULL-equivalent error raised as DecodeError."""
    cdef Py_ssize_t i
    cdef unsigned char* out
    cdef unsigned char acc = 0
    cdef unsigned char stackbuf[512]
    cdef unsigned char* tmp
    if f.data_kind == DK_ASCII:
        for i in range(n):
            acc |= p[i]
        if acc & 0x80:
            raise DecodeError("Failed to decode field, invalid data", <object>f.key, pos)
        s = PyUnicode_New(n, 127)
        memcpy(PyUnicode_DATA(s), p, n)
        return s
    if f.data_kind == DK_LATIN1:
        return PyUnicode_DecodeLatin1(<const char*>p, n, NULL)
    if f.data_kind == DK_TABLE:
        if n <= 512:
            tmp = &stackbuf[0]
        else:
            tmp = <unsigned char*>PyMem_Malloc(n)
        if tmp is NULL:
            raise MemoryError()
        try:
            for i in range(n):
                tmp[i] = f.dec_table[p[i]]
            return PyUnicode_DecodeLatin1(<const char*>tmp, n, NULL)
        finally:
            if tmp != &stackbuf[0]:
                PyMem_Free(tmp)
    try:
        return PyBytes_FromStringAndSize(<const char*>p, n).decode(<object>f.encoding)
    except Exception:
        raise DecodeError("Failed to decode field, invalid data", <object>f.key, pos) from None


cdef inline bint _all_digits(object s):
    cdef Py_ssize_t i, n
    cdef const unsigned char* p
    if not PyUnicode_IS_ASCII(s):
        return False
    n = PyUnicode_GET_LENGTH(s)
    p = <const unsigned char*>PyUnicode_DATA(s)
    for i in range(n):
        if p[i] < 48 or p[i] > 57:
            return False
    return True


cdef Py_ssize_t _decode_field(const unsigned char* data, Py_ssize_t n, Py_ssize_t idx,
                              FieldDesc* f, dict doc, Span* span, int code,
                              bint strict) except -1:
    cdef int len_type = f.len_type
    cdef Py_ssize_t len_start = idx
    cdef uint64_t enc_len = 0
    cdef Py_ssize_t byte_len, have, i
    cdef unsigned char b, hi, lo
    cdef const unsigned char* lp
    if n - idx < len_type:
        raise DecodeError(f"Field length is {n - idx} bytes wide, expecting {len_type}",
                          <object>f.key, idx)
    if f.len_kind == LK_FIXED:
        enc_len = <uint64_t>f.max_len
    else:
        lp = data + idx
        if f.len_kind == LK_BIN:
            for i in range(len_type):
                enc_len = (enc_len << 8) | lp[i]
        elif f.len_kind == LK_BCD:
            for i in range(len_type):
                hi = lp[i] >> 4
                lo = lp[i] & 0x0F
                if hi > 9 or lo > 9:
                    raise DecodeError("Failed to decode field length, invalid BCD data",
                                      <object>f.key, idx)
                enc_len = enc_len * 100 + hi * 10 + lo
        elif f.len_kind == LK_ASCII or f.len_kind == LK_TABLE:
            for i in range(len_type):
                b = lp[i] if f.len_kind == LK_ASCII else f.len_dec_table[lp[i]]
                if b < 48 or b > 57:
                    raise DecodeError("Failed to decode field length, non-numeric data",
                                      <object>f.key, idx)
                enc_len = enc_len * 10 + (b - 48)
        else:
            try:
                text = PyBytes_FromStringAndSize(<const char*>lp, len_type).decode(<object>f.len_encoding)
            except Exception:
                raise DecodeError("Failed to decode field length, invalid data",
                                  <object>f.key, idx) from None
            for ch in text:
                if not ("0" <= ch <= "9"):
                    raise DecodeError("Failed to decode field length, non-numeric data",
                                      <object>f.key, idx)
                enc_len = enc_len * 10 + (ord(ch) - 48)
        if enc_len > <uint64_t>f.max_len:
            raise DecodeError(
                f"Field data is {enc_len} {<object>f.len_count}, larger than maximum {f.max_len}",
                <object>f.key, idx)
        idx += len_type
    if f.nibbles:
        byte_len = <Py_ssize_t>((enc_len + 1) // 2)
    else:
        byte_len = <Py_ssize_t>enc_len
    if n - idx < byte_len:
        have = n - idx
        if f.nibbles:
            have *= 2
        raise DecodeError(f"Field data is {have} {<object>f.len_count}, expecting {enc_len}",
                          <object>f.key, idx)
    cdef const unsigned char* p = data + idx
    cdef unsigned char* sp
    if f.data_kind == DK_BIN:
        if f.nibbles and (enc_len & 1):
            # odd nibble count: one pad nibble to strip, left or right
            if f.pad_upper and f.pad_left and HEXU[p[0] >> 4] == f.pad_upper:
                value = PyUnicode_New(byte_len * 2 - 1, 127)
                sp = <unsigned char*>PyUnicode_DATA(value)
                sp[0] = HEXU[p[0] & 15]
                for i in range(1, byte_len):
                    sp[2 * i - 1] = HEXU[p[i] >> 4]
                    sp[2 * i] = HEXU[p[i] & 15]
            elif f.pad_upper and not f.pad_left and HEXU[p[byte_len - 1] & 15] == f.pad_upper:
                value = PyUnicode_New(byte_len * 2 - 1, 127)
                sp = <unsigned char*>PyUnicode_DATA(value)
                for i in range(byte_len - 1):
                    sp[2 * i] = HEXU[p[i] >> 4]
                    sp[2 * i + 1] = HEXU[p[i] & 15]
                sp[2 * byte_len - 2] = HEXU[p[byte_len - 1] >> 4]
            else:
                raise DecodeError(f"Field data is {byte_len * 2} nibbles, expecting {enc_len}",
                                  <object>f.key, idx)
        else:
            value = _hex_upper(p, byte_len)
    elif byte_len:
        value = _decode_text(p, byte_len, f, idx)
    else:
        value = ""
    if strict and f.numeric and not _all_digits(value):
        raise DecodeError("Failed to decode field, non-numeric data", <object>f.key, idx)
    PyDict_SetItem(doc, <object>f.key, value)
    span.code = code
    span.a = len_start
    span.b = idx
    span.c = idx + byte_len
    return idx + byte_len


cdef Py_ssize_t _decode_bitmap(const unsigned char* data, Py_ssize_t n, Py_ssize_t idx,
                               FieldDesc* f, object key, dict doc, int offset,
                               uint64_t* out_bits) except -1:
    cdef bint binary = f.data_kind == DK_BIN
    cdef Py_ssize_t width = 8 if binary else 16
    cdef uint64_t bits = 0
    cdef Py_ssize_t i
    cdef const unsigned char* tp
    cdef signed char hv
    if n - idx < width:
        raise DecodeError(f"Field data is {n - idx} bytes, expecting {width}", key, idx)
    if binary:
        text = _hex_upper(data + idx, 8)
        for i in range(8):
            bits = (bits << 8) | data[idx + i]
    else:
        text = _decode_text(data + idx, 16, f, idx)
        # a codec of several bytes per character (utf-16) reads fewer digits
        if not PyUnicode_IS_ASCII(text) or PyUnicode_GET_LENGTH(text) != 16:
            raise DecodeError("Failed to decode field, non-hex data", key, idx)
        tp = <const unsigned char*>PyUnicode_DATA(text)
        for i in range(16):
            hv = HEXVAL[tp[i]]
            if hv < 0:
                raise DecodeError("Failed to decode field, non-hex data", key, idx)
            bits = (bits << 4) | <uint64_t>hv
    if offset == 128:
        PyDict_SetItem(doc, key, <object>PyDict_GetItem(doc, key) + text)
    else:
        PyDict_SetItem(doc, key, text)
    out_bits[0] = bits
    return idx + width


def decode(data, spec, bint strict=False):
    """Decode one ISO 8583 message. Returns (doc_dec, doc_enc)."""
    if not PyBytes_CheckExact(data):
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
        else:
            raise TypeError(
                f"Encoded ISO8583 data must be bytes or bytearray, not {data.__class__.__name__}")
    cdef CompiledSpec cs = compile_spec(spec)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef dict doc = _PyDict_NewPresized(24)
    cdef Span spans[MAX_FIELDS + 4]
    cdef Py_ssize_t ns = 0
    cdef Py_ssize_t idx = 0, start, width
    cdef uint64_t bm[3]
    cdef int num, last_code
    cdef FieldDesc* f
    if cs.has_header:
        idx = _decode_field(p, n, idx, &cs.header, doc, &spans[ns], CODE_H, strict)
        ns += 1
    f = &cs.mti
    width = 2 if f.data_kind == DK_BIN else 4
    if n - idx < width:
        raise DecodeError(f"Field data is {n - idx} bytes, expecting {width}", KEY_T, idx)
    if f.data_kind == DK_BIN:
        mti = _hex_upper(p + idx, 2)
    else:
        mti = _decode_text(p + idx, 4, f, idx)
    if strict and f.numeric and not _all_digits(mti):
        raise DecodeError("Failed to decode field, non-numeric data", KEY_T, idx)
    PyDict_SetItem(doc, KEY_T, mti)
    spans[ns].code = CODE_T
    spans[ns].a = idx
    spans[ns].b = idx
    spans[ns].c = idx + width
    ns += 1
    idx += width

    bm[0] = bm[1] = bm[2] = 0
    start = idx
    idx = _decode_bitmap(p, n, idx, &cs.fields[0], KEY_P, doc, 0, &bm[0])
    spans[ns].code = 0
    spans[ns].a = start
    spans[ns].b = start
    spans[ns].c = idx
    ns += 1
    last_code = 0
    if bm[0] >> 63:
        if not cs.fields[1].defined:
            raise DecodeError("Field is not defined in the specification", KEY_1, idx)
        start = idx
        idx = _decode_bitmap(p, n, idx, &cs.fields[1], KEY_1, doc, 64, &bm[1])
        if bm[1] >> 63:
            idx = _decode_bitmap(p, n, idx, &cs.fields[1], KEY_1, doc, 128, &bm[2])
        spans[ns].code = 1
        spans[ns].a = start
        spans[ns].b = start
        spans[ns].c = idx
        ns += 1
        last_code = 1
    bm[0] &= LOW63
    bm[1] &= LOW63
    cdef int word, bit
    cdef uint64_t w
    for word in range(3):
        w = bm[word]
        while w:
            bit = 63 - _clz64(w)     # highest set bit = lowest field number
            w &= ~(<uint64_t>1 << bit)
            num = word * 64 + (64 - bit)
            f = &cs.fields[num]
            if not f.defined:
                raise DecodeError("Field is not defined in the specification", _KEYS[num], idx)
            idx = _decode_field(p, n, idx, f, doc, &spans[ns], num, strict)
            ns += 1
            last_code = num
    if idx != n:
        raise DecodeError("Extra data after last field", _KEYS[last_code], idx)
    return doc, _make_encoded(data, spans, ns)


cdef extern from *:
    """
    static inline int isoswitch_clz64(unsigned long long x) { return __builtin_clzll(x); }
    """
    int _clz64 "isoswitch_clz64"(unsigned long long x) nogil


# ---------------------------------------------------------------------------
# encoding

ctypedef struct WBuf:
    unsigned char* p
    Py_ssize_t len
    Py_ssize_t cap
    bint heap


cdef inline int _wb_reserve(WBuf* w, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = w.len + extra
    cdef Py_ssize_t cap
    cdef unsigned char* np
    if need <= w.cap:
        return 0
    cap = w.cap * 2
    while cap < need:
        cap *= 2
    if w.heap:
        np = <unsigned char*>PyMem_Realloc(w.p, cap)
    else:
        np = <unsigned char*>PyMem_Malloc(cap)
        if np is not NULL:
            memcpy(np, w.p, w.len)
    if np is NULL:
        raise MemoryError()
    w.p = np
    w.cap = cap
    w.heap = True
    return 0


cdef Py_ssize_t _encode_hex(WBuf* w, object value, FieldDesc* f) except -1:
    """Append a hex/BCD value; return its length in the field's units."""
    cdef Py_ssize_t n, total, i, k
    cdef const unsigned char* s
    cdef signed char hv
    cdef unsigned char acc
    cdef bint lead_pad = False, trail_pad = False
    if not PyUnicode_CheckExact(value):
        raise EncodeError("Failed to encode field, non-hex data", <object>f.key)
    n = PyUnicode_GET_LENGTH(value)
    total = n
    if f.nibbles and (n & 1):
        if not f.pad:
            raise EncodeError("Failed to encode field, odd-length nibble data, specify pad",
                              <object>f.key)
        total = n + 1
        lead_pad = f.pad_left
        trail_pad = not f.pad_left
    if total & 1:
        raise EncodeError("Failed to encode field, odd-length hex data", <object>f.key)
    if not PyUnicode_IS_ASCII(value):
        raise EncodeError("Failed to encode field, non-hex data", <object>f.key)
    s = <const unsigned char*>PyUnicode_DATA(value)
    _wb_reserve(w, total // 2)
    cdef unsigned char* out = w.p + w.len
    # nibble stream: [pad] value [pad]
    k = 0
    acc = 0
    if lead_pad:
        acc = <unsigned char>HEXVAL[f.pad]
        k = 1
    for i in range(n):
        hv = HEXVAL[s[i]]
        if hv < 0:
            raise EncodeError("Failed to encode field, non-hex data", <object>f.key)
        if k & 1:
            out[k >> 1] = (acc << 4) | <unsigned char>hv
        else:
            acc = <unsigned char>hv
        k += 1
    if trail_pad:
        out[k >> 1] = (acc << 4) | <unsigned char>HEXVAL[f.pad]
    w.len += total // 2
    return n if f.nibbles else total // 2


cdef Py_ssize_t _encode_text(WBuf* w, object value, FieldDesc* f) except -1:
    cdef Py_ssize_t n, i
    cdef const unsigned char* s
    cdef unsigned char* out
    if not PyUnicode_CheckExact(value):
        raise EncodeError("Failed to encode field, invalid data", <object>f.key)
    n = PyUnicode_GET_LENGTH(value)
    if f.data_kind == DK_ASCII or f.data_kind == DK_LATIN1 or f.data_kind == DK_TABLE:
        if f.data_kind == DK_ASCII:
            if not PyUnicode_IS_ASCII(value):
                raise EncodeError("Failed to encode field, invalid data", <object>f.key)
        elif PyUnicode_KIND(value) != PyUnicode_1BYTE_KIND:
            raise EncodeError("Failed to encode field, invalid data", <object>f.key)
        s = <const unsigned char*>PyUnicode_DATA(value)
        _wb_reserve(w, n)
        out = w.p + w.len
        if f.data_kind == DK_TABLE:
            for i in range(n):
                out[i] = f.enc_table[s[i]]
        else:
            memcpy(out, s, n)
        w.len += n
    else:
        try:
            b = value.encode(<object>f.encoding)
        except Exception:
            raise EncodeError("Failed to encode field, invalid data", <object>f.key) from None
        n = PyBytes_GET_SIZE(b)
        _wb_reserve(w, n)
        memcpy(w.p + w.len, PyBytes_AS_STRING(b), n)
        w.len += n
    return n * 2 if f.nibbles else n


cdef inline int _ndigits(Py_ssize_t v):
    cdef int d = 1
    while v >= 10:
        v //= 10
        d += 1
    return d


cdef int _encode_field(WBuf* w, FieldDesc* f, object value, Span* span, int code,
                       bint strict) except -1:
    cdef Py_ssize_t len_start = w.len
    cdef int len_type = f.len_type
    cdef Py_ssize_t data_start, enc_len, v
    cdef int i
    cdef unsigned char* lp
    _wb_reserve(w, len_type)
    w.len += len_type
    data_start = w.len
    if f.data_kind == DK_BIN:
        enc_len = _encode_hex(w, value, f)
    else:
        enc_len = _encode_text(w, value, f)
    if strict and f.numeric and not _all_digits(value):
        raise EncodeError("Failed to encode field, non-numeric data", <object>f.key)
    if len_type == 0:
        if enc_len != f.max_len:
            raise EncodeError(
                f"Field data is {enc_len} {<object>f.len_count}, expecting {f.max_len}",
                <object>f.key)
    else:
        if enc_len > f.max_len:
            raise EncodeError(
                f"Field data is {enc_len} {<object>f.len_count}, larger than maximum {f.max_len}",
                <object>f.key)
        lp = w.p + len_start
        if f.len_kind == LK_BIN:
            if len_type < 8 and (enc_len >> (8 * len_type)):
                raise EncodeError(
                    "Failed to encode field length, field length does not fit into configured field size",
                    <object>f.key)
            v = enc_len
            for i in range(len_type - 1, -1, -1):
                lp[i] = v & 0xFF
                v >>= 8
        elif f.len_kind == LK_BCD:
            if _ndigits(enc_len) > len_type * 2:
                raise EncodeError(
                    "Failed to encode field length, field length does not fit into configured field size",
                    <object>f.key)
            v = enc_len
            for i in range(len_type - 1, -1, -1):
                lp[i] = <unsigned char>((((v // 10) % 10) << 4) | (v % 10))
                v //= 100
        elif f.len_kind == LK_ASCII or f.len_kind == LK_TABLE:
            if _ndigits(enc_len) > len_type:
                raise EncodeError(
                    "Failed to encode field length, field length does not fit into configured field size",
                    <object>f.key)
            v = enc_len
            for i in range(len_type - 1, -1, -1):
                lp[i] = <unsigned char>(48 + v % 10)
                if f.len_kind == LK_TABLE:
                    lp[i] = f.len_enc_table[lp[i]]
                v //= 10
        else:
            prefix = str(enc_len).zfill(len_type).encode(<object>f.len_encoding)
            if PyBytes_GET_SIZE(prefix) != len_type:
                raise EncodeError(
                    "Failed to encode field length, field length does not fit into configured field size",
                    <object>f.key)
            memcpy(lp, PyBytes_AS_STRING(prefix), len_type)
    span.code = code
    span.a = len_start
    span.b = data_start
    span.c = w.len
    return 0


cdef inline int _fast_field_number(object k):
    """Canonical "1".."192" parsed in C; -1 for an ASCII key that is not a
    number ("t", "h", "p": skipped, as str.isnumeric() would say); 0 for
    anything the slow path must classify (non-ASCII, leading zero, too big)."""
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(k)
    cdef const unsigned char* s
    cdef int v = 0
    cdef Py_ssize_t i
    if not PyUnicode_IS_ASCII(k):
        return 0
    s = <const unsigned char*>PyUnicode_DATA(k)
    for i in range(n):
        if s[i] < 48 or s[i] > 57:
            return -1
    if n < 1 or n > 3 or s[0] == 48:
        return 0
    for i in range(n):
        v = v * 10 + (s[i] - 48)
    return v if v <= 192 else 0


cdef int _classify_key(object k) except -2:
    """Field number of a document key: -1 to skip it, else raises (slow path)."""
    if not PyUnicode_CheckExact(k):
        raise EncodeError("Dictionary contains invalid field keys", KEY_P)
    if not k.isnumeric():
        return -1
    if not k.isdigit() or not k.isascii() or (len(k) > 1 and k[0] == "0"):
        raise EncodeError("Dictionary contains invalid field keys", KEY_P)
    num = int(k)
    if num < 1 or num > 192:
        raise EncodeError("Dictionary contains fields outside of 1-192 range", KEY_P)
    return num


cdef inline object _bitmap_hex(uint64_t v):
    s = PyUnicode_New(16, 127)
    cdef unsigned char* out = <unsigned char*>PyUnicode_DATA(s)
    cdef int i
    for i in range(16):
        out[i] = HEXU[(v >> (60 - 4 * i)) & 15]
    return s


cdef int _encode_bitmap(WBuf* w, FieldDesc* f, uint64_t* words, int nwords, object text) except -1:
    cdef int i, j
    if f.data_kind == DK_BIN:
        _wb_reserve(w, 8 * nwords)
        for j in range(nwords):
            for i in range(8):
                w.p[w.len + i] = (words[j] >> (56 - 8 * i)) & 0xFF
            w.len += 8
    else:
        _encode_text(w, text, f)
    return 0


def encode(doc, spec, bint strict=False):
    """Encode a document. Returns (bytes, doc_enc); sets doc["p"] (and "1")."""
    if not isinstance(doc, dict):
        raise TypeError(f"Decoded ISO8583 data must be dict, not {doc.__class__.__name__}")
    cdef CompiledSpec cs = compile_spec(spec)
    cdef PyObject* values[MAX_FIELDS]
    cdef uint64_t bm[3]
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    cdef PyObject* hit
    cdef int num, word, bit
    cdef uint64_t wd
    cdef unsigned char stackbuf[STACK_BUF]
    cdef WBuf w
    cdef Span spans[MAX_FIELDS + 4]
    cdef Py_ssize_t ns = 0, start, width
    cdef FieldDesc* f
    if PyDict_Contains(doc, KEY_1):
        PyDict_DelItem(doc, KEY_1)
    if PyDict_Contains(doc, KEY_65):
        PyDict_DelItem(doc, KEY_65)
    bm[0] = bm[1] = bm[2] = 0
    while PyDict_Next(doc, &pos, &k, &v):
        num = _fast_field_number(<object>k) if PyUnicode_CheckExact(<object>k) else 0
        if num < 0:
            continue
        if num == 0:
            num = _classify_key(<object>k)
            if num < 0:
                continue
        values[num] = v
        bm[(num - 1) >> 6] |= (<uint64_t>1) << (63 - ((num - 1) & 63))
    # every present field must be defined, reported in field order
    for word in range(3):
        wd = bm[word]
        while wd:
            bit = 63 - _clz64(wd)
            wd &= ~(<uint64_t>1 << bit)
            num = word * 64 + (64 - bit)
            if not cs.fields[num].defined:
                raise EncodeError("Field is not defined in the specification", _KEYS[num])
    cdef bint has_tertiary = bm[2] != 0
    cdef bint has_secondary = has_tertiary or bm[1] != 0
    if has_secondary:
        bm[0] |= (<uint64_t>1) << 63
    if has_tertiary:
        bm[1] |= (<uint64_t>1) << 63

    w.p = stackbuf
    w.len = 0
    w.cap = STACK_BUF
    w.heap = False
    try:
        if cs.has_header:
            hit = PyDict_GetItemWithError(doc, KEY_H)
            if hit is NULL:
                raise EncodeError("Field data is required according to specifications", KEY_H)
            _encode_field(&w, &cs.header, <object>hit, &spans[ns], CODE_H, strict)
            ns += 1
        hit = PyDict_GetItemWithError(doc, KEY_T)
        if hit is NULL:
            raise EncodeError("Field data is required", KEY_T)
        mti = <object>hit
        f = &cs.mti
        start = w.len
        if f.data_kind == DK_BIN:
            _encode_hex(&w, mti, f)
            width = 2
        else:
            _encode_text(&w, mti, f)
            width = 4
        if w.len - start != width:
            raise EncodeError(f"Field data is {w.len - start} bytes, expecting {width}", KEY_T)
        if strict and f.numeric and not _all_digits(mti):
            raise EncodeError("Failed to encode field, non-numeric data", KEY_T)
        spans[ns].code = CODE_T
        spans[ns].a = start
        spans[ns].b = start
        spans[ns].c = w.len
        ns += 1

        primary = _bitmap_hex(bm[0])
        PyDict_SetItem(doc, KEY_P, primary)
        start = w.len
        _encode_bitmap(&w, &cs.fields[0], &bm[0], 1, primary)
        spans[ns].code = 0
        spans[ns].a = start
        spans[ns].b = start
        spans[ns].c = w.len
        ns += 1
        if has_secondary:
            f = &cs.fields[1]
            if not f.defined:
                raise EncodeError("Field is not defined in the specification", KEY_1)
            secondary = _bitmap_hex(bm[1])
            if has_tertiary:
                secondary = secondary + _bitmap_hex(bm[2])
            PyDict_SetItem(doc, KEY_1, secondary)
            start = w.len
            _encode_bitmap(&w, f, &bm[1], 2 if has_tertiary else 1, secondary)
            spans[ns].code = 1
            spans[ns].a = start
            spans[ns].b = start
            spans[ns].c = w.len
            ns += 1
        bm[0] &= LOW63
        bm[1] &= LOW63
        for word in range(3):
            wd = bm[word]
            while wd:
                bit = 63 - _clz64(wd)
                wd &= ~(<uint64_t>1 << bit)
                num = word * 64 + (64 - bit)
                _encode_field(&w, &cs.fields[num], <object>values[num], &spans[ns], num, strict)
                ns += 1
        raw = PyBytes_FromStringAndSize(<const char*>w.p, w.len)
    finally:
        if w.heap:
            PyMem_Free(w.p)
    return raw, _make_encoded(raw, spans, ns)


cdef object _MISSING = object()
