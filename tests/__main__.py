"""Run the whole test suite once per core implementation.

    python -m tests [pytest args...]

First pass: the Cython extensions (required: a missing build fails the run).
Second pass: the pure-Python twins (ISOSWITCH_NO_EXTENSIONS=1). Both must pass.
"""
import os
import subprocess
import sys

PASSES = (
    ("cython", {"ISOSWITCH_REQUIRE_EXTENSIONS": "1", "ISOSWITCH_NO_EXTENSIONS": ""}),
    ("python", {"ISOSWITCH_NO_EXTENSIONS": "1", "ISOSWITCH_REQUIRE_EXTENSIONS": ""}),
)


def main(argv: list[str]) -> int:
    only = os.environ.get("ISOSWITCH_TEST_IMPL")  # run a single pass when set
    status = 0
    for name, extra in PASSES:
        if only and only != name:
            continue
        env = dict(os.environ, **extra)
        print(f"=== test pass: core implementation = {name}", flush=True)
        rc = subprocess.call(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *argv], env=env
        )
        print(f"=== test pass {name}: exit code {rc}", flush=True)
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
