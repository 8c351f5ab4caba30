"""Joins with a public table: what planning (the public table's values read for its keys), the measurement
statement on the engine and the whole query through the service cost, against the same query without the join.

    .venv/bin/python benchmarks/joins.py [--rows 500000] [--runs 30]

The demo's visits joined with its public `diagnosis_chapters` (28 codes, 13 chapters) on the unique key `code`;
each figure is the median of `--runs` runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gateway.demo import write_demo
from gateway.service import Bastion, Context
from gateway.settings import Settings
from gateway.sql import compile as comp
from gateway.sql.plan import plan_query
from policies.schema import load_policy

QUERIES = [
    ("COUNT(*)", "SELECT COUNT(*) FROM visits"),
    ("joined COUNT(*)", "SELECT COUNT(*) FROM visits v JOIN diagnosis_chapters c ON v.diagnosis = c.code"),
    ("by region, AVG", "SELECT region, COUNT(*), AVG(income) FROM visits GROUP BY region"),
    (
        "joined by chapter, AVG",
        "SELECT c.chapter, COUNT(*), AVG(v.income) FROM visits v JOIN diagnosis_chapters c ON v.diagnosis = c.code "
        "GROUP BY c.chapter",
    ),
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
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, policy_path = write_demo(root / "demo", n_rows=args.rows, seed=7)
        settings = Settings(workspace=root / "ws")
        settings.save()
        admin = Bastion(settings, read_only=False)
        admin.engine.register(load_policy(policy_path), data)
        token, _ = admin.tokens.create("alice", "analyst")
        admin.close()
        bastion = Bastion(settings)
        ctx = Context(bastion.authenticate(token))
        engine = bastion.engine
        policy, _ = engine.policy("visits")
        print(f"{'query':<24} {'plan ms':>8} {'statement ms':>13} {'query ms':>9}")
        for label, sql in QUERIES:

            def planned(sql: str = sql) -> object:
                return plan_query(sql, lambda _: policy, engine.public_table)

            statement = comp.measurement_query(plan_query(sql, lambda _: policy, engine.public_table))
            epsilons = iter([0.01 + i * 1e-4 for i in range(args.runs)])  # a fresh ε a run: no cached answer
            plan_s = _median(planned, args.runs)
            statement_s = _median(lambda: engine.rows(statement), args.runs)  # noqa: B023
            query_s = _median(lambda: bastion.query(ctx, sql, epsilon=next(epsilons)), args.runs)  # noqa: B023
            print(f"{label:<24} {plan_s * 1e3:>8.2f} {statement_s * 1e3:>13.2f} {query_s * 1e3:>9.1f}")
        bastion.close()


if __name__ == "__main__":
    main()
