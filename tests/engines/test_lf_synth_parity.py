"""Labeling-function statistics and synthesis measurements read the rows through the engine: on DuckDB and on
Spark, over the same bounded rows, they compute the same exact values before any noise."""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlglot import exp

from gateway.engines.base import bounded
from labeling_functions.analysis import plan_lf_stats, run_lfs
from labeling_functions.sandbox import SandboxLimits
from synth.columns import BinKind, ColumnBins, proxy_schema
from synth.copula import coarse_groups
from synth.disclosure import exact_matches
from synth.measure import key_counts, marginal_counts, pair_counts
from tests.engines.conftest import POLICY

pytestmark = pytest.mark.spark

LFS: list[dict[str, Any]] = [
    {"name": "red_flags", "label": "urgent", "keywords": {"column": "triage_note", "any": ["chest pain", "stroke"]}},
    {"name": "cardiac", "label": "urgent", "when": "diagnosis IN ('I21', 'I63') OR diagnosis LIKE 'I2%'"},
    {"name": "old_long", "label": "urgent", "when": "age >= 70 AND length_of_stay >= 6"},
    {"name": "same_day", "label": "routine", "when": "length_of_stay = 0 AND sex <> 'X'"},
    {"name": "winter", "label": "urgent", "when": "month(visit_day) IN (12, 1, 2) AND contains(triage_note, 'fever')"},
    {"name": "rich", "label": "routine", "when": "income > 90000 AND NOT starts_with(diagnosis, 'I')"},
    {"name": "recent", "label": "routine", "when": "visit_day >= DATE '2024-06-01' AND coalesce(income, 0) < 4e4"},
]


def _same_statistics(a: Any, b: Any) -> None:
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, other), name
        else:
            assert value == other, name


@pytest.mark.parametrize("label_model", [False, True])
def test_lf_statistics_are_the_same_on_both_engines(engines: tuple[Any, Any], label_model: bool) -> None:
    duck, spark = engines
    plan = plan_lf_stats(POLICY, lfs=LFS, epsilon=1.0, alpha=0.05, label_model=label_model)
    a, b = run_lfs(plan, duck), run_lfs(plan, spark)
    (rows,) = duck.rows(exp.select(exp.Count(this=exp.Star())).from_(bounded(POLICY.dataset)))[0]
    assert a.exact.rows == rows
    assert a.exact.coverage.min() > 0  # every LF fires somewhere: a real comparison
    _same_statistics(a.exact, b.exact)
    if label_model:
        assert a.row_patterns is not None and b.row_patterns is not None
        assert sorted(a.row_patterns.tolist()) == sorted(b.row_patterns.tolist())


def test_python_lfs_see_the_same_rows_on_both_engines(engines: tuple[Any, Any]) -> None:
    duck, spark = engines
    plan = plan_lf_stats(
        POLICY,
        lfs=LFS[:2],
        python_lfs=["urgent_diagnosis", "red_flag_words", "routine_words", "stay_and_age"],
        epsilon=1.0,
        alpha=0.05,
    )
    limits = SandboxLimits(seconds=120)
    a, b = run_lfs(plan, duck, limits=limits), run_lfs(plan, spark, limits=limits)
    assert a.exact.coverage[2:].min() > 0
    _same_statistics(a.exact, b.exact)


def _columns() -> list[ColumnBins]:
    return list(proxy_schema(POLICY).columns)


def test_synth_histograms_are_the_same_on_both_engines(engines: tuple[Any, Any]) -> None:
    duck, spark = engines
    table = bounded(POLICY.dataset)
    kinds = set()
    for col in _columns():
        kinds.add(col.kind)
        if col.kind == BinKind.KEYS:
            a, b = key_counts(duck, table, col), key_counts(spark, table, col)
            assert a and a == b, col.name
            continue
        a_counts, b_counts = marginal_counts(duck, table, col), marginal_counts(spark, table, col)
        (rows,) = duck.rows(exp.select(exp.Count(this=exp.Star())).from_(table.copy()))[0]
        assert sum(a_counts) == rows  # every row in one bin (the NULL bin included)
        assert a_counts == b_counts, col.name
    assert {"int", "float", "date", "domain", "keys"} <= kinds  # every bin layout is compared


def test_synth_two_way_tables_are_the_same_on_both_engines(engines: tuple[Any, Any]) -> None:
    duck, spark = engines
    table = bounded(POLICY.dataset)
    columns = []
    for col in _columns():
        if col.kind == BinKind.KEYS:
            keys = sorted(key_counts(duck, table, col))[:7]
            col = col.with_keys([*keys, "no such key"])
        columns.append(col)
    rng = np.random.default_rng(5)
    for a, b in combinations(columns, 2):
        ga = coarse_groups(rng.random(a.n_bins) + 0.1)
        gb = coarse_groups(rng.random(b.n_bins) + 0.1)
        x, y = pair_counts(duck, table, a, b, ga, gb), pair_counts(spark, table, a, b, ga, gb)
        assert x.sum() > 0 and np.array_equal(x, y), (a.name, b.name)


def test_the_disclosure_check_counts_the_same_matches_on_both_engines(engines: tuple[Any, Any]) -> None:
    duck, spark = engines
    columns = [c for c in _columns() if c.kind != BinKind.KEYS]
    names = [c.name for c in columns]
    real = duck.arrow(exp.select(*[exp.column(n, quoted=True) for n in names]).from_(bounded("visits")).limit(50))
    copied = real.to_pandas()
    fresh = copied.copy()
    fresh["age"] = -5  # outside the bounds: never a private value
    proxy = pd.concat([copied.iloc[:30], fresh.iloc[:20]], ignore_index=True)
    a = exact_matches(duck, POLICY.bounded_table, proxy, columns)
    b = exact_matches(spark, POLICY.bounded_table, proxy, columns)
    assert a == b == 30  # every copied row, no row outside the bounds
