"""Choose between a Cython extension and its pure-Python twin.

Modelled on msgpack-python: an environment variable forces the pure-Python
implementation, otherwise the extension is imported and an ImportError falls
back to the twin (unless extensions are required, as in CI's Cython pass).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

NO_EXTENSIONS = os.environ.get("ISOSWITCH_NO_EXTENSIONS", "") not in ("", "0")
REQUIRE_EXTENSIONS = os.environ.get("ISOSWITCH_REQUIRE_EXTENSIONS", "") not in ("", "0")

if NO_EXTENSIONS and REQUIRE_EXTENSIONS:
    raise ImportError(
        "ISOSWITCH_NO_EXTENSIONS and ISOSWITCH_REQUIRE_EXTENSIONS are both set"
    )


def load(name: str) -> ModuleType:
    """Return ``core._<name>`` (Cython) or ``core._<name>_py`` (pure Python)."""
    if not NO_EXTENSIONS:
        try:
            return importlib.import_module(f"core._{name}")
        except ImportError:
            if REQUIRE_EXTENSIONS:
                raise
    return importlib.import_module(f"core._{name}_py")


def implementation(module: ModuleType) -> str:
    """'cython' or 'python', for logs, metrics and the bench report."""
    return "python" if module.__name__.endswith("_py") else "cython"
