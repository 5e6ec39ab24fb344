#!/usr/bin/env bash
# Installs what the tests need beyond pip: Debian's Chromium, for the report's browser test.
# Idempotent and quiet when everything is already there.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "install-system-deps: /usr/bin/chromium is missing and this is not root (no sudo either)." >&2
    echo "Install it as root: apt-get update && apt-get install -y chromium" >&2
    exit 1
fi

echo "install-system-deps: installing chromium (Debian package) for the report's browser test"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

if [ ! -x /usr/bin/chromium ]; then
    echo "install-system-deps: apt-get finished but /usr/bin/chromium is still missing." >&2
    exit 1
fi
