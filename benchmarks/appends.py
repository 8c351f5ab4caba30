"""Appends: what adding a batch costs against registering the dataset, and what reading an appended version (its
own file, attached read-only) costs against reading the registration (the private database).

    .venv/bin/python benchmarks/appends.py [--rows 500000] [--batch 50000] [--batches 3] [--runs 20]

The demo's visits are registered with `--rows` rows; then `--batches` batches of `--batch` rows (the demo's
generator with other seeds, so some units come back) are appended by an engine opened read-only, as
`bastion append` does while gateways serve. Query figures are medians of `--runs` runs, each with a fresh ε (no
cached answer), through the service, pinned to the registration and to the last version.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlglot import exp

from gateway.demo import write_demo
from gateway.engines.duckdb import DuckDBEngine
from gateway.service import Bastion, Context
from gateway.settings import Settings
from policies.schema import load_policy

QUERIES = [
    ("COUNT(*)", "SELECT COUNT(*) FROM visits"),
    ("by region, AVG", "SELECT region, COUNT(*), AVG(income) FROM visits GROUP BY region"),
]


def _median(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=50_000)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, policy_path = write_demo(root / "demo", n_rows=args.rows, seed=7)
        settings = Settings(workspace=root / "ws")
        settings.save()
        admin = Bastion(settings, read_only=False)
        start = time.perf_counter()
        admin.engine.register(load_policy(policy_path), data)
        registration_s = time.perf_counter() - start
        token, _ = admin.tokens.create("alice", "analyst")
        admin.close()
        print(f"registration of {args.rows:,} rows: {registration_s:.2f} s")
        writer = DuckDBEngine(settings.database, settings.bounding_key, read_only=True)
        for b in range(args.batches):
            batch, _ = write_demo(root / f"batch{b}", n_rows=args.batch, seed=100 + b)
            start = time.perf_counter()
            version, _ = writer.append("visits", batch)
            print(f"append {b + 1} ({args.batch:,} rows) → {version.version}: {time.perf_counter() - start:.2f} s")
        writer.close()
        bastion = Bastion(settings)
        ctx = Context(bastion.authenticate(token))
        first, last = (v.version for v in (bastion.engine.versions("visits")[0], bastion.engine.versions("visits")[-1]))
        epsilons = iter([0.01 + i * 1e-5 for i in range(4 * args.runs + 8)])  # a fresh ε a run: no cached answer
        count = exp.select(exp.Count(this=exp.Star())).from_(exp.table_("bounded_visits", quoted=True))
        sizes = [bastion.engine.at({"visits": v}).rows(count)[0][0] for v in (first, last)]  # synthetic rows
        print(f"bounded rows: registration {sizes[0]:,}, last version {sizes[1]:,}")
        print(f"{'query':<18} {'registration ms':>16} {'last version ms':>16}")

        def timed(sql: str, version: str) -> float:
            return _median(lambda: bastion.query(ctx, sql, epsilon=next(epsilons), version=version), args.runs)

        for label, sql in QUERIES:
            times = [timed(sql, v) for v in (first, last)]
            print(f"{label:<18} {times[0] * 1e3:>16.1f} {times[1] * 1e3:>16.1f}")
        bastion.close()


if __name__ == "__main__":
    main()
