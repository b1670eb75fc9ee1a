"""EMV BER-TLV for ISO 8583 DE55 (public selector).

See core/_tlv_py.py for the decoding rules and error positions; the Cython
extension core._tlv behaves identically. The tag dictionary is core.emv.
"""
from core import _select

_impl = _select.load("tlv")
IMPLEMENTATION = _select.implementation(_impl)

TLVError = _impl.TLVError
decode_tlv = _impl.decode_tlv
decode_tlv_tree = _impl.decode_tlv_tree
encode_tlv = _impl.encode_tlv
decode_field55 = _impl.decode_field55
encode_field55 = _impl.encode_field55
MAX_DEPTH = _impl.MAX_DEPTH
MAX_TAG_LEN = _impl.MAX_TAG_LEN

__all__ = [
    "IMPLEMENTATION",
    "TLVError",
    "decode_tlv",
    "decode_tlv_tree",
    "encode_tlv",
    "decode_field55",
    "encode_field55",
    "MAX_DEPTH",
    "MAX_TAG_LEN",
]
