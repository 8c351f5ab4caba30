#!/usr/bin/env bash
# Create .venv and install Bastion with its pinned dependencies (CPU torch first, so nothing pulls a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true

# torch: sdv and snorkel need it, Bastion needs only its CPU build. Ask pip what `torch==<pin>` would install from the
# configured indexes (a dry run, nothing downloaded but metadata). A CPU build (a local +cpu wheel, or macOS/Windows
# wheels, which have no CUDA) is installed as resolved; a resolution that pulls NVIDIA packages (the Linux wheel on
# the public PyPI index) is replaced by the same version from PyTorch's CPU index. BASTION_TORCH_INDEX overrides the
# CPU index (a mirror); BASTION_TORCH_INDEX=default keeps whatever the configured indexes resolve (e.g. for a GPU).
TORCH=$(grep -E '^torch==' constraints.txt)
CPU_INDEX=${BASTION_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
if [ "$CPU_INDEX" = default ] || [ -n "$(.venv/bin/python -m pip list -q 2>/dev/null | grep -E '^torch ')" ]; then
  torch_from=configured
elif .venv/bin/python -m pip install --dry-run --ignore-installed -q --report - -c constraints.txt "$TORCH" \
  2>/dev/null | .venv/bin/python scripts/torch_build.py; then
  torch_from=configured
else
  torch_from=cpu-index
fi
if [ "$torch_from" = cpu-index ]; then
  echo "installing the CPU build of $TORCH from $CPU_INDEX (the configured index offers a CUDA build)"
  .venv/bin/python -m pip install -q --index-url "$CPU_INDEX" "$TORCH"
else
  .venv/bin/python -m pip install -q -c constraints.txt "$TORCH"
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,plot]"
