"""Length-prefix framing for ISO 8583 over TCP: pure-Python twin of core._framing.

Behaviour (results, exception types, messages and positions) is identical to
the Cython extension; tests/test_framing.py checks both on random streams.

Header kinds (jPOS channel names in brackets):

* ``binary2``: 2-byte big-endian unsigned length (NACChannel; the default);
* ``ascii4``: 4 ASCII digits ``0000``-``9999`` (ASCIIChannel); anything but
  ``0``-``9`` (sign, space, underscore, hex letter) is a FrameError;
* ``bcd2``: 2 bytes of packed BCD, ``0000``-``9999`` (BCDChannel);
* ``binary4``: 4-byte big-endian unsigned length.

Rules shared by both implementations:

* A zero-length frame (a header declaring 0) is a keep-alive, as jPOS
  treats it: it is skipped, never returned and never an error.
* The declared length is checked against ``max_frame`` as soon as the header
  is complete, before any payload byte is buffered, so a 4 GB header costs
  nothing. With ``tpdu=True`` a non-empty frame shorter than the 5-byte TPDU
  is rejected on its header too.
* ``FrameError.pos`` is an offset in the stream (bytes fed since the decoder
  was made): the offending byte for a non-digit header, else the first byte
  of the offending header. Messages never contain payload bytes nor values
  decoded from a header, because a desynchronised stream may put card data
  where a header should be.
* After a FrameError the decoder is poisoned: the stream is desynchronised,
  so every later feed() raises the same error again. The frames completed
  earlier in the failing feed() call are on the exception as ``.frames``
  (not pickled: they may carry card data) so none is lost.
"""
from __future__ import annotations

HEADER_KINDS = ("binary2", "ascii4", "bcd2", "binary4")
DEFAULT_MAX_FRAME = 8192
# A frame is buffered whole before it is returned, so max_frame bounds the
# memory one connection can hold; 2 GiB - 1 keeps lengths in a C Py_ssize_t.
MAX_FRAME_LIMIT = 0x7FFFFFFF
TPDU_LEN = 5
TPDU_IDS = (0x60, 0x68)

_HEADER_LEN = {"binary2": 2, "ascii4": 4, "bcd2": 2, "binary4": 4}
_HEADER_CAPACITY = {"binary2": 0xFFFF, "ascii4": 9999, "bcd2": 9999, "binary4": 0xFFFFFFFF}


class FrameError(ValueError):
    """A framing violation; ``msg`` says what, ``pos`` says where (stream offset)."""

    def __init__(self, msg, pos):
        super().__init__(f"{msg} (at byte {pos})")
        self.msg = msg
        self.pos = pos
        self.frames = ()

    def __reduce__(self):
        return (type(self), (self.msg, self.pos))


def _check_header(header):
    if header not in HEADER_KINDS:
        raise ValueError("unknown header kind; expected one of binary2, ascii4, bcd2, binary4")
    return HEADER_KINDS[HEADER_KINDS.index(header)]


def _check_max_frame(max_frame):
    if type(max_frame) is bool or not isinstance(max_frame, int):
        raise TypeError(f"max_frame must be an int, not {type(max_frame).__name__}")
    if max_frame < 1 or max_frame > MAX_FRAME_LIMIT:
        raise ValueError(f"max_frame must be between 1 and {MAX_FRAME_LIMIT}")
    return max_frame


def _check_bytes(name, data):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes, bytearray or memoryview, not {type(data).__name__}")
    if isinstance(data, memoryview) and not data.c_contiguous:
        raise BufferError(f"{name} must be a C-contiguous buffer")


class FrameDecoder:
    """Split a TCP byte stream into ISO 8583 payloads (length header removed)."""

    __slots__ = ("_header", "_max_frame", "_tpdu", "_hlen", "_buf", "_need", "_pos", "_error")

    def __init__(self, header="binary2", max_frame=DEFAULT_MAX_FRAME, tpdu=False):
        self._header = _check_header(header)
        self._max_frame = _check_max_frame(max_frame)
        self._tpdu = bool(tpdu)
        self._hlen = _HEADER_LEN[self._header]
        self._buf = bytearray()
        self._need = -1  # header + payload size once the header is read
        self._pos = 0  # stream offset of the first byte not yet returned
        self._error = None  # (msg, pos) once poisoned

    @property
    def header(self):
        return self._header

    @property
    def max_frame(self):
        return self._max_frame

    @property
    def tpdu(self):
        return self._tpdu

    @property
    def buffered(self):
        """Bytes held for a frame not yet complete (header bytes included)."""
        return len(self._buf)

    def _read_length(self, buf, off):
        """Declared payload length of the header at buf[off:], or (msg, pos)."""
        kind = self._header
        pos = self._pos
        if kind == "binary2":
            n = (buf[off] << 8) | buf[off + 1]
        elif kind == "binary4":
            n = (buf[off] << 24) | (buf[off + 1] << 16) | (buf[off + 2] << 8) | buf[off + 3]
        elif kind == "ascii4":
            n = 0
            for k in range(4):
                c = buf[off + k]
                if c < 0x30 or c > 0x39:
                    return ("ascii4 length header has a byte that is not a digit 0-9", pos + k)
                n = n * 10 + (c - 0x30)
        else:  # bcd2
            n = 0
            for k in range(2):
                c = buf[off + k]
                if (c >> 4) > 9 or (c & 0x0F) > 9:
                    return ("bcd2 length header has a nibble that is not a digit 0-9", pos + k)
                n = n * 100 + (c >> 4) * 10 + (c & 0x0F)
        if n > self._max_frame:
            return (f"declared frame length exceeds max_frame ({self._max_frame})", pos)
        if self._tpdu and 0 < n < TPDU_LEN:
            return ("frame shorter than the 5-byte TPDU", pos)
        return n

    def _fail(self, error, frames):
        self._error = error
        self._buf = bytearray()
        self._need = -1
        exc = FrameError(*error)
        exc.frames = tuple(frames)
        return exc

    def feed(self, data):
        """Add bytes from the wire; return the payloads completed, in order."""
        if self._error is not None:
            raise FrameError(*self._error)
        _check_bytes("data", data)
        out = []
        buf = self._buf
        buf += data
        hlen = self._hlen
        off = 0
        end = len(buf)
        with memoryview(buf) as view:
            while True:
                if self._need < 0:
                    if end - off < hlen:
                        break
                    n = self._read_length(buf, off)
                    if type(n) is tuple:
                        raise self._fail(n, out)
                    if n == 0:  # keep-alive
                        off += hlen
                        self._pos += hlen
                        continue
                    self._need = hlen + n
                need = self._need
                if end - off < need:
                    break
                out.append(bytes(view[off + hlen:off + need]))
                off += need
                self._pos += need
                self._need = -1
        del buf[:off]
        return out


def build_frame(payload, header="binary2", max_frame=DEFAULT_MAX_FRAME):
    """Length header + payload. An empty payload makes a keep-alive frame."""
    header = _check_header(header)
    _check_max_frame(max_frame)
    _check_bytes("payload", payload)
    n = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    if n > _HEADER_CAPACITY[header]:
        raise FrameError(
            f"payload length {n} does not fit a {header} length header (max {_HEADER_CAPACITY[header]})", 0
        )
    if n > max_frame:
        raise FrameError(f"payload length {n} exceeds max_frame ({max_frame})", 0)
    if header == "binary2":
        head = n.to_bytes(2, "big")
    elif header == "binary4":
        head = n.to_bytes(4, "big")
    elif header == "ascii4":
        head = b"%04d" % n
    else:
        head = bytes.fromhex("%04d" % n)
    return head + bytes(payload)


def _tpdu_bytes(name, data):
    _check_bytes(name, data)
    data = bytes(data)
    if len(data) < TPDU_LEN:
        raise FrameError(f"{name} shorter than the 5-byte TPDU", 0)
    if data[0] not in TPDU_IDS:
        raise FrameError("TPDU id is not 0x60 or 0x68", 0)
    return data


def split_tpdu(payload):
    """(tpdu, message): the 5-byte TPDU (id, destination, origin) and the rest."""
    data = _tpdu_bytes("payload", payload)
    return data[:TPDU_LEN], data[TPDU_LEN:]


def reply_tpdu(tpdu):
    """The TPDU for the answer: destination and origin swapped."""
    data = _tpdu_bytes("tpdu", tpdu)
    if len(data) != TPDU_LEN:
        raise FrameError("tpdu longer than 5 bytes", TPDU_LEN)
    return data[0:1] + data[3:5] + data[1:3]
