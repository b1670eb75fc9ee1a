"""Length-prefix framing for ISO 8583 over TCP (public selector).

See core/_framing_py.py for the header kinds and error rules; the Cython
extension core._framing behaves identically.
"""
from core import _select

_impl = _select.load("framing")
IMPLEMENTATION = _select.implementation(_impl)

FrameError = _impl.FrameError
FrameDecoder = _impl.FrameDecoder
build_frame = _impl.build_frame
split_tpdu = _impl.split_tpdu
reply_tpdu = _impl.reply_tpdu
HEADER_KINDS = _impl.HEADER_KINDS
DEFAULT_MAX_FRAME = _impl.DEFAULT_MAX_FRAME
MAX_FRAME_LIMIT = _impl.MAX_FRAME_LIMIT
TPDU_LEN = _impl.TPDU_LEN

__all__ = [
    "IMPLEMENTATION",
    "FrameError",
    "FrameDecoder",
    "build_frame",
    "split_tpdu",
    "reply_tpdu",
    "HEADER_KINDS",
    "DEFAULT_MAX_FRAME",
    "MAX_FRAME_LIMIT",
    "TPDU_LEN",
]
