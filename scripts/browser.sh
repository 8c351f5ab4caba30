#!/usr/bin/env bash
# Install headless Chromium (Debian's package) for the end-to-end browser test, unless it is already there.
# The test drives it with Playwright's Python package (from the dev extra), never with a downloaded browser build.
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser.sh: no apt-get here; install Chromium as /usr/bin/chromium to run the browser test" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "browser.sh: not root and no sudo; install Chromium as /usr/bin/chromium to run the browser test" >&2
        exit 0
    fi
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q chromium
