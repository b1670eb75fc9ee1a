
import pytest

from core import _select


def pytest_report_header(config):
    impl = "python" if _select.NO_EXTENSIONS else "cython (required)" if _select.REQUIRE_EXTENSIONS else "cython if built"
    return f"isoswitch core implementation: {impl}"


def _impls(name):
    """The Cython extension and pure-Python twin of core module `name`.

    Differential tests compare both in every pass; the Cython one is skipped
    when the pass forbids extensions (ISOSWITCH_NO_EXTENSIONS=1).
    """
    import importlib

    out = []
    if not _select.NO_EXTENSIONS:
        try:
            out.append(pytest.param(importlib.import_module(f"core._{name}"), id="c"))
        except ImportError:
            if _select.REQUIRE_EXTENSIONS:
                raise
    out.append(pytest.param(importlib.import_module(f"core._{name}_py"), id="py"))
    return out


@pytest.fixture
def selected_impl_name():
    return "python" if _select.NO_EXTENSIONS else "cython"
