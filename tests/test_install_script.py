"""scripts/torch_build.py decides whether the torch pip would install is a CPU build (install.sh keeps it) or a
CUDA build (install.sh takes the CPU index instead)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "torch_build.py"


def verdict(install: list[tuple[str, str]] | None, raw: str | None = None) -> int:
    text = (
        raw
        if raw is not None
        else json.dumps({"install": [{"metadata": {"name": n, "version": v}} for n, v in install or []]})
    )
    return subprocess.run([sys.executable, str(SCRIPT)], input=text, text=True, check=False).returncode


@pytest.mark.parametrize(
    ("install", "cpu"),
    [
        ([("torch", "2.13.0+cpu"), ("sympy", "1.14.0")], True),
        ([("torch", "2.13.0"), ("networkx", "3.6.1")], True),  # macOS/Windows wheels: no CUDA packages
        ([("torch", "2.13.0"), ("nvidia-cublas-cu12", "12.8"), ("triton", "3.5")], False),
        ([("torch", "2.13.0+cu128")], False),
        ([("sympy", "1.14.0")], False),  # no torch resolved at all: take the CPU index
    ],
)
def test_cpu_or_cuda(install: list[tuple[str, str]], cpu: bool) -> None:
    assert verdict(install) == (0 if cpu else 1)


def test_unreadable_report_is_not_trusted() -> None:
    assert verdict(None, raw="pip failed") == 1
