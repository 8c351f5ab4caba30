#!/usr/bin/env bash
# Install Debian's PostgreSQL server package for the tests of the PostgreSQL store, unless its binaries (initdb,
# pg_ctl) are already there. The tests run their own server in a temporary directory (tests/stores/conftest.py);
# nothing is started here.
set -euo pipefail
for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && exit 0
done
if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "postgres.sh: no apt-get here; install the PostgreSQL server (initdb, pg_ctl) to test the PostgreSQL store" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q postgresql
