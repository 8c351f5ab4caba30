#!/usr/bin/env bash
# Install Bastion and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/browser.sh
exec .venv/bin/python -m pytest -q "$@"
