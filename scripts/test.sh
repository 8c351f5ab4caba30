#!/usr/bin/env bash
# Install Bastion and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/browser.sh
bash scripts/java.sh
bash scripts/postgres.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy gateway policies synth labeling_functions audit tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
