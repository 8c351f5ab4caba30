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
exec bash "$(dirname "$0")/debian_package.sh" postgres.sh \
    "the PostgreSQL server (initdb, pg_ctl) to test the PostgreSQL store" postgresql
