"""Public group lists written in the query: how long planning, compiling (the DuckDB statement text) and the
whole query through the service take as the list grows, against the same query grouped by the policy's domain.

    .venv/bin/python benchmarks/public_groups.py [--rows 20000] [--runs 5] [--sizes 10,100,1000]

The listed key is `FLOOR(income)` (an integer the policy gives no domain of its own), listed as
`UNNEST(GENERATE_ARRAY(1, n))`; each figure is the median of `--runs` runs. The size of the statements grows with
the list (its filter is in every measurement's FILTER), which is why a query lists at most
`gateway.sql.groups.MAX_LISTED_GROUPS` values.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from gateway.demo import POLICY_YAML, write_demo
from gateway.service import Bastion, Context
from gateway.settings import Settings
from gateway.sql import compile as comp
from gateway.sql.plan import Plan, plan_query
from policies.schema import load_policy, parse_policy


def _median(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _generate(plan: Plan) -> list[str]:
    return [s.sql(dialect="duckdb") for s in comp.statements(plan)]


def listed_sql(n: int) -> str:
    return (
        "SELECT g.k, COUNT(*), AVG(age) FROM visits RIGHT OUTER JOIN "
        f"(SELECT DISTINCT k FROM UNNEST(GENERATE_ARRAY(1, {n})) AS k) g ON g.k = FLOOR(income) GROUP BY g.k"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="10,100,1000")
    args = parser.parse_args()
    import yaml

    policy = parse_policy(yaml.safe_load(POLICY_YAML))
    queries = [("policy domain (5 regions)", "SELECT region, COUNT(*), AVG(age) FROM visits GROUP BY region")]
    queries += [(f"listed, {n:,} keys", listed_sql(n)) for n in (int(s) for s in args.sizes.split(","))]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, policy_path = write_demo(root / "demo", n_rows=args.rows, seed=11)
        settings = Settings(workspace=root / "ws")
        settings.save()
        admin = Bastion(settings, read_only=False)
        admin.engine.register(load_policy(policy_path), data)
        token, _ = admin.tokens.create("alice", "analyst")
        admin.close()
        bastion = Bastion(settings)
        ctx = Context(bastion.authenticate(token))
        print(f"{'query':<28} {'plan ms':>9} {'compile ms':>11} {'statement KiB':>14} {'query ms':>9}")
        for label, sql in queries:
            plan = plan_query(sql, lambda _: policy)
            epsilons = iter([0.01 + i * 1e-4 for i in range(args.runs)])
            plan_s = _median(partial(plan_query, sql, lambda _: policy), args.runs)
            compile_s = _median(partial(_generate, plan), args.runs)
            size = sum(len(s) for s in _generate(plan)) / 1024
            # A fresh ε each run, so that no answer comes from the release cache (ε is part of its key); all of them
            # together stay far inside the demo's per-principal budget of 10.
            query_s = _median(lambda: bastion.query(ctx, sql, epsilon=next(epsilons)), args.runs)  # noqa: B023
            print(f"{label:<28} {plan_s * 1e3:>9.1f} {compile_s * 1e3:>11.1f} {size:>14.1f} {query_s * 1e3:>9.1f}")
        bastion.close()


if __name__ == "__main__":
    main()
