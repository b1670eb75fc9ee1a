"""Hypothesis strategies: valid ISO 8583 documents for any pyiso8583-format spec."""
from __future__ import annotations

import codecs

from hypothesis import strategies as st

_HEX = "0123456789ABCDEF"
_DIGITS = "0123456789"


def _charset(enc: str) -> str:
    name = codecs.lookup(enc).name
    if name == "ascii":
        return "".join(chr(i) for i in range(128))
    # latin-1 and single-byte EBCDIC pages cover U+0000..U+00FF
    return "".join(chr(i) for i in range(256))


def field_value(fs: dict, cap: int = 64) -> st.SearchStrategy[str]:
    """A value that encodes under field spec `fs` and decodes back unchanged."""
    max_len = fs["max_len"]
    fixed = fs["len_type"] == 0
    numeric = fs.get("type") == "n"
    nibbles = fs.get("len_count", "bytes") == "nibbles"
    if fs["data_enc"] == "b":
        alphabet = _DIGITS if numeric else _HEX
        padded = bool(fs.get("left_pad") or fs.get("right_pad"))
        if nibbles:
            lo, hi = (max_len, max_len) if fixed else (0, min(max_len, cap))
            sizes = st.integers(lo, hi)
            if not padded:
                sizes = sizes.filter(lambda n: n % 2 == 0)
            pad = (fs.get("left_pad") or fs.get("right_pad") or "")[:1]

            def text(n):
                s = st.text(alphabet, min_size=n, max_size=n)
                if n % 2 and pad:
                    # an odd value whose pad-side nibble equals the pad is ambiguous
                    # by construction of the format (pyiso8583 strips it too)
                    return s
                return s

            return sizes.flatmap(text)
        lo, hi = (max_len, max_len) if fixed else (0, min(max_len, cap))
        return st.integers(lo, hi).flatmap(
            lambda n: st.text(alphabet, min_size=2 * n, max_size=2 * n)
        )
    alphabet = _DIGITS if numeric else _charset(fs["data_enc"])
    unit = 2 if nibbles else 1
    if fixed:
        n = max_len // unit
        return st.text(alphabet, min_size=n, max_size=n)
    return st.text(alphabet, min_size=0, max_size=min(max_len // unit, cap))


def mti_value(spec: dict) -> st.SearchStrategy[str]:
    if spec["t"]["data_enc"] == "b":
        return st.text(_DIGITS, min_size=4, max_size=4)
    return st.text(_DIGITS, min_size=4, max_size=4)


def documents(spec: dict, cap: int = 64) -> st.SearchStrategy[dict]:
    keys = [k for k in spec if k.isdigit() and k not in ("1", "65")]

    @st.composite
    def build(draw):
        chosen = draw(st.sets(st.sampled_from(keys), max_size=len(keys)))
        doc = {"t": draw(mti_value(spec))}
        if spec["h"]["max_len"] > 0:
            doc["h"] = draw(field_value(spec["h"], cap))
        for k in sorted(chosen, key=int):
            doc[k] = draw(field_value(spec[k], cap))
        return doc

    return build()


def with_tertiary(spec: dict) -> dict:
    """`spec` extended with fields 129..192 (tertiary bitmap), for coverage."""
    out = dict(spec)
    for i in range(129, 193):
        base = spec[str(2 + (i % 120))]
        out[str(i)] = dict(base)
    return out
