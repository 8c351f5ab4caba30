"""Read a `pip install --dry-run --report -` JSON report on stdin; exit 0 if the torch it would install is a CPU
build (no NVIDIA/CUDA packages pulled in), 1 otherwise. Used by scripts/install.sh."""

import json
import sys


def main() -> int:
    try:
        report = json.load(sys.stdin)
    except ValueError:
        return 1
    names = [str(item.get("metadata", {}).get("name", "")).lower() for item in report.get("install", [])]
    versions = [str(item.get("metadata", {}).get("version", "")) for item in report.get("install", [])]
    if "torch" not in names:
        return 1
    cuda = any(name.startswith(("nvidia-", "triton", "cuda-")) for name in names)
    torch_version = versions[names.index("torch")]
    return 1 if cuda or "+cu" in torch_version else 0


if __name__ == "__main__":
    sys.exit(main())
