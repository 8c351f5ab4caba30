"""Benchmark of proxies and LF statistics over a private table of the hospital demo, alone and joined with its
public diagnosis chapters.

Generates the hospital (100,000 patients by default), registers it on DuckDB in a temporary directory, then times
(median and minimum of `--runs`): the DP measurements of a proxy (`synth.measure`, every histogram and two-way
table) of `hospital.visits` alone and of `hospital.visits ⋈ diagnosis_chapters`, and running two declarative LFs
over the same rows (`labeling_functions.analysis.run_lfs`, the exact statistics before noise).

    .venv/bin/python benchmarks/synth_tables.py [--patients 100000] [--runs 5] [--epsilon 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.demo import write_hospital  # noqa: E402
from gateway.engines.duckdb import DuckDBEngine  # noqa: E402
from gateway.tablesources import resolve_source, with_classes  # noqa: E402
from labeling_functions.analysis import plan_lf_stats, run_lfs  # noqa: E402
from policies.schema import Labels, load_policy  # noqa: E402
from synth.measure import allocate, measure  # noqa: E402

LFS = [
    {"name": "long_stay", "label": "urgent", "when": "length_of_stay >= 3"},
    {"name": "not_urgent", "label": "routine", "when": "NOT urgent"},
]


def _time(runs: int, work: Callable[[], Any]) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, policy_path = write_hospital(root / "src", n_patients=args.patients)
        policy = load_policy(policy_path)
        policy = policy.model_copy(update={"labels": Labels(classes=["routine", "urgent"])})
        engine = DuckDBEngine(root / "h.duckdb", root / "key", read_only=False)
        try:
            engine.register(policy, data)
            choices: list[tuple[str, dict[str, Any]]] = [
                ("visits", {"table": "visits"}),
                ("visits ⋈ chapters", {"table": "visits", "join": "diagnosis_chapters", "join_on": "diagnosis"}),
            ]
            for label, choice in choices:
                source = resolve_source(policy, public=engine.public_table, what="a benchmark", **choice)
                assert source is not None
                allocation = allocate(source.policy, args.epsilon, 1e-7)
                med, low = _time(args.runs, partial(measure, engine, source.tree, source.policy, allocation))
                columns = len(allocation.schema.columns)
                print(
                    f"proxy measurements, {label}: {columns} columns, k={source.rows_per_unit}: "
                    f"median {med * 1000:.0f} ms (min {low * 1000:.0f} ms)"
                )
                plan = plan_lf_stats(
                    with_classes(source, policy), lfs=LFS, epsilon=args.epsilon, alpha=0.05, source=source.tree
                )
                med, low = _time(args.runs, partial(run_lfs, plan, engine))
                print(f"LF statistics (exact), {label}: median {med * 1000:.1f} ms (min {low * 1000:.1f} ms)")
        finally:
            engine.close()


if __name__ == "__main__":
    main()
