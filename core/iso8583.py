"""ISO 8583 codec: the public module.

A drop-in for pyiso8583 4.x (``import iso8583`` → ``from core import iso8583``):
the same ``encode(doc, spec) -> (bytes, doc_enc)`` and
``decode(data, spec) -> (doc_dec, doc_enc)``, the same document shapes and the
same spec-dict format (see ``iso8583.specs``), so a dialect is plain data.

Differences, all deliberate:

* ``encode`` returns ``bytes`` (pyiso8583: ``bytearray``) and ``doc_enc`` is a
  read-only Mapping built on first access (:class:`EncodedDoc`), which
  compares equal to pyiso8583's dict.
* Stricter decoding (DESIGN.md "Bad input"): length digits must be digits;
  hex must be hex; a bitmap bit with no field in the spec, a missing secondary
  bitmap, odd BCD without the configured pad and trailing bytes are all
  :class:`DecodeError` with ``.field``, ``.pos`` and ``.msg``. Nothing else
  escapes for bad data, and no message ever contains field data.
* ``strict=True`` also requires digits in fields whose dialect type is ``n``.
* Specs are compiled once into a C field table and cached by identity; call
  :func:`clear_spec_cache` after mutating a spec in place.

The implementation is the Cython extension ``core._iso8583`` unless
``ISOSWITCH_NO_EXTENSIONS=1`` selects the pure-Python twin.
"""
from core import _select
from core.dialect import DialectError, card_data_fields, list_dialects, load_dialect

_impl = _select.load("iso8583")
IMPLEMENTATION = _select.implementation(_impl)

encode = _impl.encode
decode = _impl.decode
# error path only: the twin's, whichever core is selected
from core._iso8583_py import decode_partial  # noqa: E402
compile_spec = _impl.compile_spec
clear_spec_cache = _impl.clear_spec_cache
CompiledSpec = _impl.CompiledSpec
EncodedDoc = _impl.EncodedDoc
DecodeError = _impl.DecodeError
EncodeError = _impl.EncodeError
SpecError = _impl.SpecError

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
    "DialectError",
    "load_dialect",
    "list_dialects",
    "card_data_fields",
    "IMPLEMENTATION",
]
