"""Build script: compiles every core/*.pyx and ships codecs/ as data.

Environment switches (read at build time):
  ISOSWITCH_CYTHON_DEBUG=1     build with bounds checks and CYTHON_TRACE for profiling
  ISOSWITCH_CYTHON_ANNOTATE=1  write core/*.html annotation next to the sources
"""
import os
import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEBUG = os.environ.get("ISOSWITCH_CYTHON_DEBUG") == "1"


def core_extensions():
    # An explicit list keeps the build reproducible: one Extension per .pyx.
    exts = []
    for pyx in sorted((ROOT / "core").glob("*.pyx")):
        name = f"core.{pyx.stem}"
        exts.append(
            Extension(
                name,
                [str(pyx.relative_to(ROOT))],
                extra_compile_args=["-O2"] if not DEBUG else ["-O0", "-g"],
                define_macros=[("CYTHON_TRACE", "1")] if DEBUG else [],
            )
        )
    from Cython.Build import cythonize

    return cythonize(
        exts,
        language_level=3,
        annotate=os.environ.get("ISOSWITCH_CYTHON_ANNOTATE") == "1",
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": DEBUG,
            "embedsignature": True,
            "profile": DEBUG,
        },
    )


class build_py_with_dialects(build_py):
    """Copy codecs/ (dialect data) into the installed tree as core/dialects.

    codecs/ must not become an importable top-level package: it would shadow
    the standard library's `codecs` module. Installed, the dialects live
    beside the core package; in a source checkout the loader reads codecs/.
    """

    def run(self):
        super().run()
        target = Path(self.build_lib) / "core" / "dialects"
        target.mkdir(parents=True, exist_ok=True)
        for item in (ROOT / "codecs").iterdir():
            if item.suffix in (".json", ".csv"):
                shutil.copy2(item, target / item.name)


setup(
    ext_modules=core_extensions(),
    cmdclass={"build_py": build_py_with_dialects},
    zip_safe=False,
)
