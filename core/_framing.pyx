# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Length-prefix framing for ISO 8583 over TCP (Cython).

Same behaviour as core._framing_py, whose docstring is the reference for the
header kinds, keep-alives, error positions and poisoning. This module scans
with pointers: while no partial frame is held, frames are cut straight out
of the caller's buffer; only the tail of a frame that is still incomplete is
copied into the decoder's own buffer, whose size is bounded by the header
plus max_frame (checked on the header before any payload is kept).
"""
cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport int64_t
from libc.string cimport memcpy

HEADER_KINDS = ("binary2", "ascii4", "bcd2", "binary4")
DEFAULT_MAX_FRAME = 8192
MAX_FRAME_LIMIT = 0x7FFFFFFF
TPDU_LEN = 5
TPDU_IDS = (0x60, 0x68)

cdef enum:
    _TPDU_LEN = 5

cdef enum HeaderKind:
    H_BINARY2 = 0
    H_ASCII4 = 1
    H_BCD2 = 2
    H_BINARY4 = 3

cdef Py_ssize_t[4] _HLEN = [2, 4, 2, 4]
cdef int64_t[4] _CAPACITY = [0xFFFF, 9999, 9999, 0xFFFFFFFF]
# A buffer grown for a big frame is given back once that frame is out, so an
# idle connection holds at most this much.
cdef Py_ssize_t _KEEP_CAPACITY = 65536

# Module attributes cached as C globals (the hot path never looks them up).
cdef tuple _HEADER_KINDS = HEADER_KINDS
cdef object _memoryview = memoryview


class FrameError(ValueError):
    """A framing violation; ``msg`` says what, ``pos`` says where (stream offset)."""

    def __init__(self, msg, pos):
        super().__init__(f"{msg} (at byte {pos})")
        self.msg = msg
        self.pos = pos
        self.frames = ()

    def __reduce__(self):
        return (type(self), (self.msg, self.pos))


cdef object _FrameError = FrameError


cdef HeaderKind _check_header(object header) except *:
    if header not in _HEADER_KINDS:
        raise ValueError("unknown header kind; expected one of binary2, ascii4, bcd2, binary4")
    return <HeaderKind>_HEADER_KINDS.index(header)


cdef Py_ssize_t _check_max_frame(object max_frame) except -1:
    if type(max_frame) is bool or not isinstance(max_frame, int):
        raise TypeError(f"max_frame must be an int, not {type(max_frame).__name__}")
    if max_frame < 1 or max_frame > MAX_FRAME_LIMIT:
        raise ValueError(f"max_frame must be between 1 and {MAX_FRAME_LIMIT}")
    return <Py_ssize_t>max_frame


cdef int _check_bytes(str name, object data) except -1:
    if not isinstance(data, (bytes, bytearray, _memoryview)):
        raise TypeError(f"{name} must be bytes, bytearray or memoryview, not {type(data).__name__}")
    if isinstance(data, _memoryview) and not data.c_contiguous:
        raise BufferError(f"{name} must be a C-contiguous buffer")
    return 0


@cython.final
cdef class FrameDecoder:
    """Split a TCP byte stream into ISO 8583 payloads (length header removed)."""

    cdef readonly str header
    cdef readonly Py_ssize_t max_frame
    cdef readonly bint tpdu
    cdef HeaderKind _kind
    cdef Py_ssize_t _hlen
    cdef unsigned char* _buf  # the incomplete frame, header first
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _len
    cdef Py_ssize_t _need  # header + payload size once the header is read, else -1
    cdef int64_t _pos  # stream offset of the first byte not yet returned
    cdef object _error  # (msg, pos) once poisoned
    # set by _read_length on failure
    cdef str _err_msg
    cdef int64_t _err_pos

    def __cinit__(self):
        self._buf = NULL
        self._cap = 0
        self._len = 0
        self._need = -1
        self._pos = 0
        self._error = None

    def __init__(self, header="binary2", max_frame=DEFAULT_MAX_FRAME, tpdu=False):
        self._kind = _check_header(header)
        self.header = _HEADER_KINDS[<int>self._kind]
        self.max_frame = _check_max_frame(max_frame)
        self.tpdu = bool(tpdu)
        self._hlen = _HLEN[<int>self._kind]
        # __init__ may run again on a live object: start a fresh stream, as the twin does.
        PyMem_Free(self._buf)
        self._buf = NULL
        self._cap = 0
        self._len = 0
        self._need = -1
        self._pos = 0
        self._error = None

    def __dealloc__(self):
        PyMem_Free(self._buf)

    @property
    def buffered(self):
        """Bytes held for a frame not yet complete (header bytes included)."""
        return self._len

    cdef int _reserve(self, Py_ssize_t size) except -1:
        cdef unsigned char* grown
        if size > self._cap:
            grown = <unsigned char*>PyMem_Realloc(self._buf, <size_t>size)
            if grown == NULL:
                raise MemoryError()
            self._buf = grown
            self._cap = size
        return 0

    cdef void _release_if_big(self):
        if self._cap > _KEEP_CAPACITY:
            PyMem_Free(self._buf)
            self._buf = NULL
            self._cap = 0

    cdef int64_t _read_length(self, const unsigned char* h):
        """Declared payload length of the header at h, or -1 with _err_* set."""
        cdef int64_t n = 0
        cdef unsigned char c
        cdef int k
        if self._kind == H_BINARY2:
            n = (<int64_t>h[0] << 8) | h[1]
        elif self._kind == H_BINARY4:
            n = (<int64_t>h[0] << 24) | (<int64_t>h[1] << 16) | (<int64_t>h[2] << 8) | h[3]
        elif self._kind == H_ASCII4:
            for k in range(4):
                c = h[k]
                if c < 0x30 or c > 0x39:
                    self._err_msg = "ascii4 length header has a byte that is not a digit 0-9"
                    self._err_pos = self._pos + k
                    return -1
                n = n * 10 + (c - 0x30)
        else:
            for k in range(2):
                c = h[k]
                if (c >> 4) > 9 or (c & 0x0F) > 9:
                    self._err_msg = "bcd2 length header has a nibble that is not a digit 0-9"
                    self._err_pos = self._pos + k
                    return -1
                n = n * 100 + (c >> 4) * 10 + (c & 0x0F)
        if n > self.max_frame:
            self._err_msg = f"declared frame length exceeds max_frame ({self.max_frame})"
            self._err_pos = self._pos
            return -1
        if self.tpdu and 0 < n < _TPDU_LEN:
            self._err_msg = "frame shorter than the 5-byte TPDU"
            self._err_pos = self._pos
            return -1
        return n

    cdef object _fail(self, list frames):
        self._error = (self._err_msg, self._err_pos)
        PyMem_Free(self._buf)
        self._buf = NULL
        self._cap = 0
        self._len = 0
        self._need = -1
        exc = _FrameError(self._err_msg, self._err_pos)
        exc.frames = tuple(frames)
        return exc

    def feed(self, data):
        """Add bytes from the wire; return the payloads completed, in order."""
        cdef Py_buffer view
        cdef const unsigned char* p
        cdef Py_ssize_t n, i = 0, take
        cdef Py_ssize_t hlen = self._hlen
        cdef int64_t length
        cdef list out = []
        if self._error is not None:
            raise _FrameError(*self._error)
        _check_bytes("data", data)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            p = <const unsigned char*>view.buf
            n = view.len
            # Finish the frame an earlier call left incomplete.
            while self._len > 0 and i < n:
                if self._need < 0:
                    take = hlen - self._len
                    if take > n - i:
                        take = n - i
                    memcpy(self._buf + self._len, p + i, <size_t>take)
                    self._len += take
                    i += take
                    if self._len < hlen:
                        break
                    length = self._read_length(self._buf)
                    if length < 0:
                        raise self._fail(out)
                    if length == 0:  # keep-alive
                        self._pos += hlen
                        self._len = 0
                        continue
                    self._need = hlen + <Py_ssize_t>length
                    self._reserve(self._need)
                take = self._need - self._len
                if take > n - i:
                    take = n - i
                memcpy(self._buf + self._len, p + i, <size_t>take)
                self._len += take
                i += take
                if self._len == self._need:
                    out.append(PyBytes_FromStringAndSize(<char*>self._buf + hlen, self._need - hlen))
                    self._pos += self._need
                    self._len = 0
                    self._need = -1
                    self._release_if_big()
            # Nothing held: cut frames straight out of the caller's buffer.
            while n - i >= hlen:
                length = self._read_length(p + i)
                if length < 0:
                    raise self._fail(out)
                if length == 0:
                    i += hlen
                    self._pos += hlen
                    continue
                if n - i - hlen < length:
                    self._need = hlen + <Py_ssize_t>length
                    break
                out.append(PyBytes_FromStringAndSize(<const char*>p + i + hlen, <Py_ssize_t>length))
                i += hlen + <Py_ssize_t>length
                self._pos += hlen + length
            if i < n:
                # The tail: a partial header, or a frame whose header passed the checks.
                self._reserve(self._need if self._need > 0 else hlen)
                memcpy(self._buf, p + i, <size_t>(n - i))
                self._len = n - i
        finally:
            PyBuffer_Release(&view)
        return out


def build_frame(payload, header="binary2", max_frame=DEFAULT_MAX_FRAME):
    """Length header + payload. An empty payload makes a keep-alive frame."""
    cdef HeaderKind kind = _check_header(header)
    cdef Py_ssize_t maxf = _check_max_frame(max_frame)
    cdef Py_buffer view
    cdef Py_ssize_t n, hlen = _HLEN[<int>kind]
    cdef unsigned char* o
    cdef bytes out
    _check_bytes("payload", payload)
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        n = view.len
        if n > _CAPACITY[<int>kind]:
            raise _FrameError(
                f"payload length {n} does not fit a {HEADER_KINDS[<int>kind]} length header "
                f"(max {_CAPACITY[<int>kind]})", 0
            )
        if n > maxf:
            raise _FrameError(f"payload length {n} exceeds max_frame ({maxf})", 0)
        out = PyBytes_FromStringAndSize(NULL, hlen + n)
        o = <unsigned char*>PyBytes_AS_STRING(out)
        if kind == H_BINARY2:
            o[0] = (n >> 8) & 0xFF
            o[1] = n & 0xFF
        elif kind == H_BINARY4:
            o[0] = (n >> 24) & 0xFF
            o[1] = (n >> 16) & 0xFF
            o[2] = (n >> 8) & 0xFF
            o[3] = n & 0xFF
        elif kind == H_ASCII4:
            o[0] = 0x30 + (n // 1000)
            o[1] = 0x30 + (n // 100) % 10
            o[2] = 0x30 + (n // 10) % 10
            o[3] = 0x30 + n % 10
        else:
            o[0] = ((n // 1000) << 4) | ((n // 100) % 10)
            o[1] = (((n // 10) % 10) << 4) | (n % 10)
        memcpy(o + hlen, view.buf, <size_t>n)
    finally:
        PyBuffer_Release(&view)
    return out


cdef Py_ssize_t _tpdu_view(str name, object data, Py_buffer* view) except -1:
    _check_bytes(name, data)
    PyObject_GetBuffer(data, view, PyBUF_SIMPLE)
    cdef const unsigned char* p = <const unsigned char*>view.buf
    if view.len < _TPDU_LEN:
        PyBuffer_Release(view)
        raise _FrameError(f"{name} shorter than the 5-byte TPDU", 0)
    if p[0] != 0x60 and p[0] != 0x68:
        PyBuffer_Release(view)
        raise _FrameError("TPDU id is not 0x60 or 0x68", 0)
    return view.len


def split_tpdu(payload):
    """(tpdu, message): the 5-byte TPDU (id, destination, origin) and the rest."""
    cdef Py_buffer view
    cdef Py_ssize_t n = _tpdu_view("payload", payload, &view)
    cdef const char* p = <const char*>view.buf
    try:
        return (
            PyBytes_FromStringAndSize(p, _TPDU_LEN),
            PyBytes_FromStringAndSize(p + _TPDU_LEN, n - _TPDU_LEN),
        )
    finally:
        PyBuffer_Release(&view)


def reply_tpdu(tpdu):
    """The TPDU for the answer: destination and origin swapped."""
    cdef Py_buffer view
    cdef Py_ssize_t n = _tpdu_view("tpdu", tpdu, &view)
    cdef const unsigned char* p = <const unsigned char*>view.buf
    cdef bytes out
    cdef unsigned char* o
    try:
        if n != _TPDU_LEN:
            raise _FrameError("tpdu longer than 5 bytes", _TPDU_LEN)
        out = PyBytes_FromStringAndSize(NULL, _TPDU_LEN)
        o = <unsigned char*>PyBytes_AS_STRING(out)
        o[0] = p[0]
        o[1] = p[3]
        o[2] = p[4]
        o[3] = p[1]
        o[4] = p[2]
    finally:
        PyBuffer_Release(&view)
    return out
