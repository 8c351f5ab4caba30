"""Wall time of the `bastion` command as a person feels it: `--help`, `--version` and one query against a running
gateway, each started as a fresh process, median of `--runs`.

    .venv/bin/bastion demo &                                    # a demo gateway on http://127.0.0.1:8000
    .venv/bin/python benchmarks/cli_bench.py --url http://127.0.0.1:8000 --token bst_... [--runs 10] \\
        [--baseline /path/to/an/older/checkout]

The query is the demo's grouped COUNT/AVG with `--epsilon 1`: after its first run the gateway answers it from its
release cache (no ε spent), so the figure is the command's own cost plus one HTTP round trip. With `--baseline`,
the same commands run from that source tree (imported first on `sys.path`, with this interpreter and its installed
dependencies), interleaved with the current code's runs so that machine noise hits both alike; a command the
baseline does not have (`--version`) is reported as n/a. `--json` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SQL = "SELECT region, COUNT(*) AS visits, AVG(income) AS mean_income FROM visits WHERE age >= 65 GROUP BY region"

# Runs `bastion` from a given source tree: the tree first on sys.path, then the command's entry point.
LAUNCHER = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'bastion'; "
    "from gateway.cli.main import main; main()"
)


def command(tree: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-c", LAUNCHER, str(tree), *args]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start, done.returncode


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of each command (median reported)")
    parser.add_argument("--url", default=os.environ.get("BASTION_URL", "http://127.0.0.1:8000"), help="gateway URL")
    parser.add_argument("--token", default=os.environ.get("BASTION_TOKEN"), help="an analyst's bearer token")
    parser.add_argument("--baseline", type=Path, help="another checkout of Bastion to compare in the same run")
    parser.add_argument("--sql", default=SQL, help="the query to time")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    opts = parser.parse_args(argv)
    if not opts.token:
        parser.error("--token (or BASTION_TOKEN) is required: an analyst token of the running gateway")

    env = {**os.environ, "BASTION_URL": opts.url, "BASTION_TOKEN": opts.token, "COLUMNS": "120"}
    commands = {
        "--help": ["--help"],
        "--version": ["--version"],
        "query": ["query", opts.sql, "--epsilon", "1"],
    }
    trees = {"current": ROOT} | ({"baseline": opts.baseline.resolve()} if opts.baseline else {})
    # One warm-up each (fills the OS file cache; the query's first run may spend ε, later ones are cached).
    for tree in trees.values():
        for args in commands.values():
            timed(command(tree, args), env)
    times: dict[tuple[str, str], list[float]] = {(t, c): [] for t in trees for c in commands}
    failed: set[tuple[str, str]] = set()
    for _ in range(opts.runs):
        for name, args in commands.items():
            for label, tree in trees.items():
                seconds, rc = timed(command(tree, args), env)
                if rc != 0:
                    failed.add((label, name))
                times[(label, name)].append(seconds)

    figures: dict[str, dict[str, float | None]] = {}
    for label in trees:
        figures[label] = {
            name: None if (label, name) in failed else statistics.median(times[(label, name)]) for name in commands
        }
    if opts.json:
        print(json.dumps({"runs": opts.runs, "url": opts.url, "median_s": figures}, indent=2))
        return figures
    print(f"bastion command wall time, median of {opts.runs} runs (seconds); gateway {opts.url}")
    header = f"{'command':<12}" + "".join(f"{label:>12}" for label in trees)
    if "baseline" in trees:
        header += f"{'speed-up':>12}"
    print(header)
    for name in commands:
        line = f"{name:<12}"
        for label in trees:
            v = figures[label][name]
            line += f"{'n/a' if v is None else f'{v:.3f}':>12}"
        if "baseline" in trees:
            cur, base = figures["current"][name], figures["baseline"][name]
            line += f"{'n/a' if cur is None or base is None else f'{base / cur:.1f}x':>12}"
        print(line)
    if any(label == "current" for label, _ in failed):
        print("a command of the current code failed: run it by hand to see why", file=sys.stderr)
        sys.exit(1)
    return figures


if __name__ == "__main__":
    main()
