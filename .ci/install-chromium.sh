#!/bin/sh
# Make headless Chromium available for tests/test_dashboard.py (idempotent);
# print its path. Used by .ci/run before the test suite.
set -eu

find_chromium() {
    for name in chromium chromium-browser; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

if path=$(find_chromium); then
    echo "$path"
    exit 0
fi

if [ "$(id -u)" != "0" ]; then
    echo "install-chromium: chromium is not installed and this is not root; install the" \
         "chromium package" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2

if path=$(find_chromium); then
    echo "$path"
    exit 0
fi
echo "install-chromium: apt-get finished but no chromium binary was found" >&2
exit 1
