#!/usr/bin/env bash
# Install a Java 17 runtime (Debian's openjdk-17-jre-headless) for the Spark engine and its tests, unless a Java
# 17 or newer is already on PATH.
set -euo pipefail
if command -v java >/dev/null 2>&1; then
    major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
    [ "${major:-0}" -ge 17 ] && exit 0
fi
exec bash "$(dirname "$0")/debian_package.sh" java.sh "Java 17 (e.g. OpenJDK 17) to use the Spark engine" \
    openjdk-17-jre-headless
