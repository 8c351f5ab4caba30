"""Timing side channels: can response times tell whether one unit is in the data?

Two experiments, each printing medians and two-sample tests (Mann–Whitney U and Kolmogorov–Smirnov) over
interleaved runs measured in one process, so machine noise hits both samples alike:

1. Expensive branches. Two queries that differ only in a predicate that matches one worst-case unit's k rows
   (`age > 109`) or none (`age > 110`), guarding the most expensive expression the validator accepts (a text
   expression at the per-row work cap). Each run uses a distinct ε so that no answer comes from the cache.
2. Key selection. The same private-key query on two datasets whose key column has 10 and 10,000 distinct values
   (a policy declaring `key_candidates: 10000`), every key too rare to be released.

    .venv/bin/python benchmarks/timing.py [--rows 20000] [--key-rows 100000] [--runs 100]

A p-value well above 0.01 means the test cannot tell the two distributions apart at this sample size.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.stats import ks_2samp, mannwhitneyu

from gateway.demo import POLICY_YAML, generate_visits
from gateway.service import Bastion, Context
from gateway.settings import Settings
from policies.schema import load_policy

# The most expensive expressions the validator accepts, in the two shapes that used to leak: a costly branch taken
# only by matching rows, and a costly function whose input is constant for every batch of rows without a match.
EXPENSIVE = {
    "costly branch": "SELECT COUNT(*) FROM visits WHERE CASE WHEN {pred} THEN "
    "regexp_matches(lpad(diagnosis, 1500, 'ab'), '(a|b)*c') OR regexp_matches(lpad(region, 1500, 'ba'), '(b|a)*d') "
    "ELSE false END",
    "constant batches": "SELECT COUNT(*) FROM visits WHERE length(lpad(CASE WHEN {pred} THEN sex ELSE '' END, 8900, "
    "'ä')) >= 0",
}
KEYS = "SELECT diagnosis, COUNT(*) FROM visits GROUP BY diagnosis"


def _workspace(root: Path, name: str, table: pa.Table, policy_yaml: str) -> tuple[Bastion, Context]:
    """A gateway core over `table` registered under `policy_yaml`, and an analyst's request context."""
    data = root / f"{name}.parquet"
    pq.write_table(table, data)
    policy = root / f"{name}.yaml"
    policy.write_text(policy_yaml)
    settings = Settings(workspace=root / name)
    settings.save()
    admin = Bastion(settings, read_only=False)
    admin.engine.register(load_policy(policy), data)
    token, _ = admin.tokens.create("timing", "analyst")
    admin.close()
    bastion = Bastion(settings)
    return bastion, Context(bastion.authenticate(token))


def _compare(label: str, a: list[float], b: list[float]) -> None:
    u = mannwhitneyu(a, b).pvalue
    ks = ks_2samp(a, b).pvalue
    print(
        f"{label}: median {statistics.median(a) * 1e3:.2f} ms vs {statistics.median(b) * 1e3:.2f} ms "
        f"(ratio {statistics.median(a) / statistics.median(b):.3f}); Mann-Whitney p = {u:.3f}, KS p = {ks:.3f}"
    )


def expensive_branch(root: Path, rows: int, runs: int) -> None:
    base = generate_visits(rows, seed=5)
    row = {c: base.column(c)[0].as_py() for c in base.column_names}
    row.update(patient_id=9_999_999, age=110, diagnosis="Z99.7")
    unit = pa.Table.from_pylist([row] * 5, schema=base.schema)
    bastion, ctx = _workspace(root, "branch", pa.concat_tables([base, unit]), POLICY_YAML)
    for name, sql in EXPENSIVE.items():
        bastion.query(ctx, sql.format(pred="age > 110"), epsilon=0.5)  # warm up
        times: dict[str, list[float]] = {"one unit": [], "none": []}
        order = random.Random(1)
        for i in range(runs):
            for label, pred in order.sample([("one unit", "age > 109"), ("none", "age > 110")], 2):
                t0 = time.perf_counter()
                bastion.query(ctx, sql.format(pred=pred), epsilon=1e-3 + i * 1e-9)
                times[label].append(time.perf_counter() - t0)
        _compare(f"{name} ({rows:,} rows, {runs} runs each)", times["one unit"], times["none"])
    bastion.close()


def key_selection(root: Path, rows: int, runs: int) -> None:
    base = generate_visits(rows, seed=6)
    policy = POLICY_YAML.replace("synthesis:", "key_candidates: 10000\nsynthesis:")
    rng = np.random.default_rng(1)
    few = pa.array([f"K{int(v)}" for v in rng.integers(0, 10, len(base))])
    many = pa.array([f"K{int(v)}" for v in np.arange(len(base)) % 10_000])
    out = {}
    for label, keys in (("10 keys", few), ("10,000 keys", many)):
        table = base.set_column(base.column_names.index("diagnosis"), "diagnosis", keys)
        out[label] = _workspace(root, label.replace(",", "").replace(" ", "_"), table, policy)
    times: dict[str, list[float]] = {label: [] for label in out}
    order = random.Random(2)
    for i in range(runs):
        # A random order per round: whichever query runs first after the other is measurably slower (caches).
        for label, (bastion, ctx) in order.sample(list(out.items()), len(out)):
            t0 = time.perf_counter()
            bastion.query(ctx, KEYS, epsilon=1e-3 + i * 1e-9, delta=1e-10)
            times[label].append(time.perf_counter() - t0)
    _compare(f"key selection ({len(base):,} rows, {runs} runs each)", times["10 keys"], times["10,000 keys"])
    for bastion, _ in out.values():
        bastion.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the expensive-branch table")
    parser.add_argument("--key-rows", type=int, default=100_000, help="rows of the key-selection tables")
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        expensive_branch(Path(tmp), args.rows, args.runs)
        key_selection(Path(tmp), args.key_rows, args.runs)


if __name__ == "__main__":
    main()
