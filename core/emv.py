"""EMV tag dictionary for DE55: names, formats, lengths and which tags are card data.

The data is codecs/emv_tags.json. Installed, the build copies it to
core/dialects/emv_tags.json (codecs/ must not become an importable package:
it would shadow the standard library's ``codecs``); in a source checkout it
is read from codecs/. The installed copy is tried first.

``SENSITIVE_TAGS`` names the tags whose values are cardholder data or
sensitive authentication data (track data, PAN, name, expiry, service code,
CVC3, PIN data): journals, logs and error messages must not show them.
Proprietary tags (DFxx, 9F7x...) are not listed and may carry anything, so
code that shows DE55 should show only tags it knows are safe, not hide only
the tags listed here.
"""
from __future__ import annotations

import json
from pathlib import Path

_HERE = Path(__file__).resolve().parent
SEARCH_PATHS = (
    _HERE / "dialects" / "emv_tags.json",  # installed
    _HERE.parent / "codecs" / "emv_tags.json",  # source checkout
)


def _load() -> dict[str, dict]:
    for path in SEARCH_PATHS:
        if path.is_file():
            with path.open("r", encoding="utf-8") as f:
                return {tag.upper(): info for tag, info in json.load(f)["tags"].items()}
    raise FileNotFoundError(
        "EMV tag dictionary not found; looked in " + ", ".join(str(p) for p in SEARCH_PATHS)
    )


_TAGS = _load()
TAGS = frozenset(_TAGS)
SENSITIVE_TAGS: frozenset[str] = frozenset(tag for tag, info in _TAGS.items() if info.get("sensitive"))


def tag_info(tag: str) -> dict | None:
    """A copy of the dictionary entry for ``tag`` (hex, any case), or None."""
    info = _TAGS.get(tag.upper()) if isinstance(tag, str) else None
    return dict(info) if info is not None else None

