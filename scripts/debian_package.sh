#!/usr/bin/env bash
# Install Debian packages with apt-get, as root or through sudo: `debian_package.sh NAME WHAT PACKAGE...`, where
# NAME is the calling script (for messages) and WHAT says what to install by hand where this cannot.
# Exits 3 (having said why) when there is no apt-get, or no root and no sudo; the caller decides whether that fails.
set -euo pipefail
name=$1 what=$2
shift 2
if ! command -v apt-get >/dev/null 2>&1; then
    echo "$name: no apt-get here; install $what" >&2
    exit 3
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "$name: not root and no sudo; install $what" >&2
        exit 3
    fi
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q "$@"
