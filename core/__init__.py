"""isoswitch hot path: ISO 8583 codec, framing, EMV TLV, BIN table, acquirer health.

Every module here exists twice: a Cython extension (``core/_name.pyx``) and a
pure-Python twin (``core/_name_py.py``) with the same behaviour, byte for
byte. The public module (``core/name.py``) picks one with
:func:`core._select.load`:

* ``ISOSWITCH_NO_EXTENSIONS=1`` forces the pure-Python twins everywhere;
* otherwise the extension is used, falling back to the twin when it was not
  built, unless ``ISOSWITCH_REQUIRE_EXTENSIONS=1`` (CI sets it) makes a
  missing extension an ImportError.
"""
