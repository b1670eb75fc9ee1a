#!/bin/sh
# Make PostgreSQL server binaries available (idempotent); print their directory.
# Used by .ci/run before the test suite; tests/pg.py starts a throw-away
# server from these binaries (as an unprivileged user when run as root).
set -eu

find_bindir() {
    if command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return 0
    fi
    # the highest installed major version
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -n -r); do
        if [ -x "$d/pg_ctl" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

if bindir=$(find_bindir); then
    echo "$bindir"
    exit 0
fi

if [ "$(id -u)" != "0" ]; then
    echo "install-postgres: PostgreSQL is not installed and this is not root; install the" \
         "postgresql package" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq postgresql >&2

if bindir=$(find_bindir); then
    echo "$bindir"
    exit 0
fi
echo "install-postgres: postgresql installed but pg_ctl not found" >&2
exit 1
