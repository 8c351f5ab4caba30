"""Accuracy of Bastion's quantiles on the benchmark table: error, interval coverage and width over many releases.

    .venv/bin/python -m benchmarks.quantile_accuracy --rows 200000 --releases 100

Generates the benchmark table (`benchmarks.data`, same seed), registers it, reads each quantile's exact position
counts once through the executor's own first statement, and draws `--releases` releases of the three-stage
mechanism at each ε (`policies.mechanisms.release_quantile`; each release runs the executor's second pass over its
own interval), against the true PERCENTILE_CONT of the bounded rows. For comparison it also draws the single
selection of before: report-noisy-max over the 1,024-point grid at the whole ε. Prints median and 95th-percentile
absolute error, the coverage of the (1 - alpha) interval and its median width.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import data
from gateway.engines.duckdb import DuckDBEngine
from gateway.sql import compile as comp
from gateway.sql import release
from gateway.sql.plan import plan_query
from gateway.sql.price import price
from policies import mechanisms as mech
from policies import sensitivity as sens
from policies.schema import load_policy

QUERIES = {"median": 0.5, "p90": 0.9}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--releases", type=int, default=100)
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 0.1])
    p.add_argument("--alpha", type=float, default=0.05)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source, policy_file = data.write(work, args.rows)
        policy = load_policy(policy_file)
        cat = DuckDBEngine(work / "db.duckdb", work / "key", read_only=False)
        cat.register(policy, source)
        con = cat.connect()
        print(f"{args.rows:,} rows, k = {policy.max_rows_per_unit}, amount in {policy.columns['amount'].bounds}")
        print("| quantile | ε | truth | median error | p95 error | coverage | median width | before: median / p95 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, q in QUERIES.items():
            sql = f"SELECT QUANTILE_CONT(amount, {q}) AS {name} FROM {data.DATASET}"
            plan = plan_query(sql, lambda _: policy)
            (m,) = plan.measurements
            grid = comp.quantile_grid(plan, m)
            counts = release._quantile_counts(plan, m, cat, [()])[()]
            row = con.execute(f"SELECT quantile_cont(amount, {q}) FROM {policy.bounded_table}").fetchone()
            assert row is not None
            truth = float(row[0])
            coarse = grid.coarse()
            for eps in args.epsilons:
                pricing = price(plan, epsilon=eps, accuracy=None, alpha=args.alpha, delta=None)
                d_in, k = pricing.d_in[m], sens.count_sensitivity(policy.max_rows_per_unit)
                errors, covered, widths, before = [], 0, [], []
                for _ in range(args.releases):
                    r = mech.release_quantile(
                        counts,
                        grid,
                        q,
                        d_in,
                        k,
                        pricing.epsilon(m),
                        args.alpha,
                        lambda fine: release._fine_counts(plan, m, cat, [((), fine)])[()],  # noqa: B023
                    )
                    lo, hi = r.value_interval(args.alpha)
                    errors.append(abs(r.value - truth))
                    covered += lo <= truth <= hi
                    widths.append(hi - lo)
                    scores = mech.position_scores(counts, coarse, q)
                    idx, _ = mech.release_quantile_index(scores, d_in, pricing.epsilon(m))
                    before.append(abs(float(grid.value(coarse[idx])) - truth))
                print(
                    f"| {name} | {eps:g} | {truth:.3f} | {np.median(errors):.4f} | {np.quantile(errors, 0.95):.4f} "
                    f"| {covered / args.releases:.0%} | {np.median(widths):.3f} "
                    f"| {np.median(before):.4f} / {np.quantile(before, 0.95):.4f} |"
                )
        print(
            f"first-pass grid step {grid.step:.5f}; "
            f"the value's grid: up to {mech.QUANTILE_POINT_CANDIDATES:,} positions over the interval"
        )
        cat.close()


if __name__ == "__main__":
    main()
