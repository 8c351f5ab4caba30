"""The `bastion` command starts fast because it imports nothing heavy up front: the import graph is guarded here
(in fresh interpreters, since this test process has everything loaded). Wall-time figures are in
benchmarks/cli_bench.py, not in a timed test."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import gateways

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["pandas", "numpy", "pyarrow", "duckdb", "opendp", "sdv", "snorkel", "torch", "sqlglot", "fastapi", "scipy"]
# What `--help` must not need either: the workspace settings, YAML, the audit package, the HTTP client. (pydantic is
# not listed: typer itself imports it to convert a command's arguments.)
STARTUP_ONLY_LIGHT = [*HEAVY, "yaml", "httpx", "gateway.service", "gateway.settings", "audit.log"]

REPORT = "import json, sys; print(json.dumps(sorted(m for m in {mods!r} if m in sys.modules)))"


def _loaded(code: str, mods: list[str], *args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\n{REPORT.format(mods=mods)}", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_cli_loads_nothing_heavy() -> None:
    assert _loaded("import gateway.cli.main", STARTUP_ONLY_LIGHT) == []


def test_help_and_version_load_nothing_heavy() -> None:
    code = (
        "import sys\nfrom gateway.cli.main import app\n"
        "for args in (['--help'], ['--version'], ['query', '--help'], ['synth', '--help']):\n"
        "    try:\n        app(args, prog_name='bastion')\n    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), (args, exc.code)\n"
    )
    assert _loaded(code, STARTUP_ONLY_LIGHT) == []


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    from tests.test_cli import _run, _token

    made = _run("demo", "--no-serve", "--rows", "5000", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    with gateways(1, cwd=tmp_path) as (url,):
        yield url, _token(tmp_path, "analyst", "bob")


def test_a_query_with_text_output_loads_nothing_heavy(served: tuple[str, str]) -> None:
    url, token = served
    sql = "SELECT region, COUNT(*) AS n FROM visits GROUP BY region"
    code = (
        "import sys\nfrom gateway.cli.main import app\n"
        "try:\n    app(sys.argv[1:], prog_name='bastion')\n"
        "except SystemExit as exc:\n    assert exc.code in (0, None)\n"
    )
    args = ["query", sql, "--epsilon", "0.5", "--url", url, "--token", token]
    assert _loaded(code, HEAVY, *args) == []
    # ... and it did answer: the same command prints the table.
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=120, check=True
    )
    assert "north" in out.stdout and "n 95% CI" in out.stdout
