"""Per-unit aggregation in a subquery (`SELECT n, COUNT(*) FROM (SELECT uid, COUNT(*) AS n FROM shop GROUP BY uid)
GROUP BY n`): the public bounds the planner derives for the per-unit columns from k and the policy, the outer
query priced at one row per unit, the derived table computed exactly over the bounded table, intervals that cover
the truth over repeated releases, what one unit of many rows can move, refusals (with their spans) before any
charge, and releases of different inner queries kept apart in the cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from gateway.engines.duckdb import DuckDBEngine
from gateway.service import Bastion, Context
from gateway.sql import compile as comp
from gateway.sql.plan import Kind, Measurement, Plan, plan_query
from gateway.sql.price import price
from gateway.sql.release import execute
from policies import sensitivity as sens
from policies.errors import GatewayError, QueryRejected
from policies.schema import ColumnType, Policy, parse_policy
from tests.conftest import ROLES, build_workspace

K = 3
POLICY_YAML = f"""
dataset: shop
privacy_unit: uid
max_rows_per_unit: {K}
budget: {{per_principal: {{epsilon: 1000, delta: 1.0e-3}}, total: {{epsilon: 1000, delta: 1.0e-3}}}}
columns:
  uid: {{type: int, usage: hidden}}
  kind: {{type: category, domain: [a, b, c]}}
  age: {{type: int, bounds: [0, 110]}}
  amount: {{type: decimal, bounds: [-100, 50], precision: 0.01}}
  score: {{type: float, bounds: [0.5, 2.5]}}
roles: {{analyst: [query]}}
"""
POLICY = parse_policy(yaml.safe_load(POLICY_YAML))
PER_UNIT_COUNT = "(SELECT uid, COUNT(*) AS n FROM shop GROUP BY uid)"
HISTOGRAM = f"SELECT n, COUNT(*) FROM {PER_UNIT_COUNT} GROUP BY n"


def _resolve(name: str) -> Policy:
    assert name == "shop"
    return POLICY


def _plan(sql: str) -> Plan:
    return plan_query(sql, _resolve)


def _frame(units: int, seed: int) -> pd.DataFrame:
    """`units` units of 1 to 5 rows each (beyond k = 3 for some)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, units)
    n = int(sizes.sum())
    return pd.DataFrame(
        {
            "uid": np.repeat(np.arange(units), sizes),
            "kind": rng.choice(["a", "b", "c"], n),
            "age": rng.integers(0, 111, n),
            "amount": np.round(rng.uniform(-100, 50, n), 2),
            "score": rng.uniform(0.5, 2.5, n),
        }
    )


HEAVY = pd.DataFrame(
    {"uid": 9999, "kind": "a", "age": 500, "amount": -1e9, "score": 99.0}, index=range(500)
)  # one unit of 500 rows beyond every bound


def _engine(directory: Path, frame: pd.DataFrame, key: Path) -> DuckDBEngine:
    """The frame registered on DuckDB with the bounding key `key` (the same key keeps the same rows of a unit)."""
    directory.mkdir(parents=True, exist_ok=True)
    frame.to_csv(directory / "shop.csv", index=False)
    cat = DuckDBEngine(directory / "db.duckdb", key, read_only=False)
    cat.register(POLICY, directory / "shop.csv")
    return cat


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("key") / "key"


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, key: Path) -> DuckDBEngine:
    return _engine(tmp_path_factory.mktemp("shop"), pd.concat([_frame(400, 3), HEAVY], ignore_index=True), key)


def _truth(cat: DuckDBEngine, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a query over the bounded table, straight from DuckDB (the per-unit truth)."""
    return [tuple(r) for r in cat.connect().execute(sql).fetchall()]


# --- planning: derived bounds, pricing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aggregate", "kind", "lo", "hi"),
    [
        ("COUNT(*)", ColumnType.INT, 1, K),
        ("COUNT(age)", ColumnType.INT, 0, K),
        ("SUM(age)", ColumnType.INT, 0, K * 110),
        ("SUM(amount)", ColumnType.FLOAT, -100 * K, 50 * K),
        ("SUM(score)", ColumnType.FLOAT, 0, 2.5 * K),  # a positive value: the sum is at least k·min(lo, 0) = 0
        ("SUM(age - 200)", ColumnType.INT, -200 * K, 0),
        ("MIN(amount)", ColumnType.FLOAT, -100, 50),
        ("MAX(age)", ColumnType.INT, 0, 110),
        ("AVG(age)", ColumnType.FLOAT, 0, 110),
        ("AVG(CASE WHEN kind = 'a' THEN score ELSE 0 END)", ColumnType.FLOAT, 0, 2.5),
        ("COUNT(CASE WHEN age > 60 THEN 1 END)", ColumnType.INT, 0, K),
    ],
)
def test_per_unit_columns_get_public_bounds_from_k_and_the_policy(
    aggregate: str, kind: ColumnType, lo: float, hi: float
) -> None:
    plan = _plan(f"SELECT SUM(v) FROM (SELECT uid, {aggregate} AS v FROM shop GROUP BY uid)")
    column = plan.policy.columns["v"]
    assert column.type is kind
    assert column.bounds == (lo, hi)
    assert plan.policy.max_rows_per_unit == 1
    assert plan.dataset_policy is POLICY
    if kind is ColumnType.FLOAT:  # the fixed-point unit of a row expression of that range: one value in 31 bits
        assert column.fx_unit == sens.fixed_point_unit(max(abs(lo), abs(hi)), integral=False)


def test_the_histogram_of_per_unit_counts_has_public_keys_and_is_priced_at_one_row_per_unit() -> None:
    plan = _plan(HISTOGRAM)
    (key,) = plan.keys
    assert key.domain == list(range(1, K + 1))  # every n in 1..k is released, no key selection, no δ
    assert not plan.needs_key_selection
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None)
    assert pricing.cost.delta == 0
    assert pricing.d_in[Measurement(Kind.COUNT_STAR)] == sens.count_sensitivity(1)


def test_a_per_unit_sum_is_priced_against_its_derived_bounds() -> None:
    plan = _plan("SELECT AVG(s) FROM (SELECT uid, SUM(age) AS s FROM shop GROUP BY uid)")
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None)
    d_in = {m.kind: v for m, v in pricing.d_in.items()}
    assert d_in[Kind.SUM] == sens.sum_sensitivity(1, plan.policy.columns["s"]) == K * 110
    assert d_in[Kind.COUNT] == sens.count_sensitivity(1)


def test_accepted_forms() -> None:
    for sql in (
        HISTOGRAM,
        f"SELECT n, COUNT(*) FROM {PER_UNIT_COUNT} AS t GROUP BY t.n ORDER BY n",
        f"SELECT COUNT(*) AS heavy FROM {PER_UNIT_COUNT} WHERE n >= 2",
        f"SELECT n, COUNT(*) FROM {PER_UNIT_COUNT} GROUP BY n HAVING COUNT(*) > 5",
        "SELECT COUNT(DISTINCT uid) FROM (SELECT uid, MAX(age) AS m FROM shop WHERE kind = 'a' GROUP BY uid)",
        "SELECT AVG(s), SUM(s) FROM (SELECT shop.uid, SUM(amount) AS s FROM shop AS shop GROUP BY shop.uid)",
        "SELECT MEDIAN(a) FROM (SELECT uid, AVG(age) AS a FROM shop GROUP BY uid)",
        "SELECT n, AVG(a) FROM (SELECT uid, COUNT(*) AS n, AVG(score) AS a FROM shop GROUP BY uid) GROUP BY n",
        "SELECT ANON_COUNT(*) FROM (SELECT uid, ANON_SUM(age) AS s FROM shop GROUP BY uid) WHERE s > 100",
    ):
        assert _plan(sql).per_unit is not None, sql


def test_the_identity_of_a_release_includes_the_inner_query() -> None:
    a = _plan(HISTOGRAM)
    b = _plan("SELECT n, COUNT(*) FROM (SELECT uid, COUNT(*) AS n FROM shop WHERE age > 30 GROUP BY uid) GROUP BY n")
    c = _plan("SELECT n, COUNT(*) FROM (SELECT uid, COUNT(age) AS n FROM shop GROUP BY uid) GROUP BY n")
    assert len({a.normalized_sql, b.normalized_sql, c.normalized_sql}) == 3


# --- refusals -----------------------------------------------------------------------------------------------------

REFUSALS = [
    # (query, reason, the text the error points at)
    ("SELECT COUNT(*) FROM (SELECT * FROM shop)", "subquery", "(SELECT * FROM shop)"),
    ("SELECT COUNT(*) FROM (SELECT kind, COUNT(*) AS n FROM shop GROUP BY kind)", "subquery", None),
    ("SELECT COUNT(*) FROM (SELECT uid, kind, COUNT(*) AS n FROM shop GROUP BY uid, kind)", "subquery", None),
    ("SELECT COUNT(*) FROM (SELECT uid, COUNT(*) AS n FROM shop)", "subquery", None),
    (
        "SELECT COUNT(*) FROM (SELECT uid, COUNT(*) AS n FROM (SELECT uid FROM shop) GROUP BY uid)",
        "subquery",
        "(SELECT uid FROM shop)",
    ),
    ("SELECT COUNT(*) FROM (SELECT uid, COUNT(*) FROM shop GROUP BY uid)", "subquery", "COUNT(*)"),
    ("SELECT COUNT(*) FROM (SELECT uid, age AS a FROM shop GROUP BY uid)", "subquery", "age AS a"),
    ("SELECT COUNT(*) FROM (SELECT uid, COUNT(*) AS n FROM shop GROUP BY uid HAVING COUNT(*) > 1)", "subquery", None),
    ("SELECT COUNT(*) FROM (SELECT uid, COUNT(*) AS n FROM shop GROUP BY uid UNION ALL SELECT 1, 2)", "subquery", None),
    (
        "SELECT COUNT(*) FROM (SELECT uid, COUNT(*) AS n FROM shop GROUP BY uid) AS t JOIN shop ON t.uid = shop.uid",
        "join",
        None,
    ),
    (
        "SELECT COUNT(*) FROM (SELECT uid, COUNT(*) AS n FROM shop JOIN shop AS s2 USING (uid) GROUP BY uid)",
        "join",
        None,
    ),
    ("SELECT uid, n FROM (SELECT uid, COUNT(*) AS n FROM shop GROUP BY uid)", "privacy_unit_column", "uid"),
    (
        "SELECT uid, COUNT(*) FROM (SELECT uid, COUNT(*) AS n FROM shop GROUP BY uid) GROUP BY uid",
        "privacy_unit_column",
        "uid",
    ),
    (
        "SELECT COUNT(*) FROM (SELECT uid, COUNT(*) AS n FROM shop GROUP BY uid) WHERE uid = 7",
        "privacy_unit_column",
        "uid",
    ),
    ("SELECT COUNT(*) FROM (SELECT uid, SUM(kind) AS s FROM shop GROUP BY uid)", "aggregate_argument", "SUM(kind)"),
    ("SELECT COUNT(*) FROM (SELECT uid, SUM(LN(age)) AS s FROM shop GROUP BY uid)", "unbounded_expression", "LN(age)"),
    (
        "SELECT AVG(s) FROM (SELECT uid, SUM(amount * 9e147) AS s FROM shop GROUP BY uid)",  # k times 9e149
        "unbounded_expression",
        "SUM(amount * 9e147)",
    ),
    ("SELECT COUNT(*) FROM (SELECT uid, COUNT(DISTINCT kind) AS s FROM shop GROUP BY uid)", "subquery", None),
    ("SELECT COUNT(*) FROM (SELECT uid, SUM(uid) AS s FROM shop GROUP BY uid)", "privacy_unit_column", "uid"),
    (
        "SELECT age, COUNT(*) FROM (SELECT uid, COUNT(*) AS n FROM shop GROUP BY uid) GROUP BY age",
        "unknown_column",
        "age",
    ),
    ("SELECT MAX(n) FROM (SELECT uid, COUNT(*) AS n FROM shop GROUP BY uid)", "min_max", "MAX(n)"),
]


@pytest.mark.parametrize(("sql", "reason", "pointed"), REFUSALS, ids=[r[0][:70] for r in REFUSALS])
def test_refusals_name_the_reason_and_the_text(sql: str, reason: str, pointed: str | None) -> None:
    with pytest.raises(QueryRejected) as info:
        _plan(sql)
    err = info.value
    assert err.reason == reason, err.message
    assert err.details.get("highlight"), err.message  # the error points into the text
    if pointed is not None:
        assert err.details["highlight"] == pointed, err.message
    if reason == "subquery":
        assert err.details.get("hint"), err.message


# --- the derived table and releases -------------------------------------------------------------------------------

PER_UNIT_TRUTH = "SELECT uid, COUNT(*) AS n, SUM(age) AS s, AVG(score) AS a FROM bounded_shop GROUP BY uid"


def test_the_measured_histogram_is_the_exact_histogram_of_per_unit_counts(shop: DuckDBEngine) -> None:
    plan = _plan(HISTOGRAM)
    got = {int(r[0]): int(r[1]) for r in shop.rows(comp.measurement_query(plan))}
    truth = dict(_truth(shop, f"SELECT n, COUNT(*) FROM ({PER_UNIT_TRUTH}) GROUP BY n"))
    assert got == truth
    assert set(got) <= set(range(1, K + 1))  # the 500-row unit counts k


def test_the_measured_sums_of_per_unit_values_are_exact(shop: DuckDBEngine) -> None:
    plan = _plan("SELECT AVG(s), AVG(a) FROM (SELECT uid, SUM(age) AS s, AVG(score) AS a FROM shop GROUP BY uid)")
    (row,) = shop.rows(comp.measurement_query(plan))
    by = {(m.kind, m.column): int(v) for m, v in zip(comp.plain_measurements(plan), row[1:], strict=True)}
    ((s, a, units),) = _truth(shop, f"SELECT SUM(s), SUM(a), COUNT(*) FROM ({PER_UNIT_TRUTH})")
    assert by[(Kind.SUM, "s")] == s  # integers: exact
    assert by[(Kind.COUNT, "s")] == units
    unit = plan.policy.columns["a"].fx_unit
    assert abs(by[(Kind.SUM, "a")] * unit - float(a)) <= units * unit / 2 + 1e-9


def test_an_inner_where_keeps_the_units_with_a_matching_row(shop: DuckDBEngine) -> None:
    plan = _plan(
        "SELECT n, COUNT(*) FROM (SELECT uid, COUNT(*) AS n FROM shop WHERE kind = 'a' GROUP BY uid) GROUP BY n"
    )
    got = {int(r[0]): int(r[1]) for r in shop.rows(comp.measurement_query(plan))}
    truth = dict(
        _truth(
            shop,
            "SELECT n, COUNT(*) FROM (SELECT uid, COUNT(*) AS n FROM bounded_shop WHERE kind = 'a' GROUP BY uid) "
            "GROUP BY n",
        )
    )
    assert got == truth


def test_intervals_of_the_histogram_cover_the_truth(shop: DuckDBEngine) -> None:
    """3 groups × 300 releases of 95% intervals: binomial(900, 0.95) is below 0.93 with probability < 1e-3."""
    plan = _plan(HISTOGRAM)
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None)
    truth = dict(_truth(shop, f"SELECT n, COUNT(*) FROM ({PER_UNIT_TRUTH}) GROUP BY n"))
    covered, n = 0, 0
    for _ in range(300):
        release = execute(plan, pricing, shop)
        assert [r[0] for r in release.rows] == list(range(1, K + 1))
        for (key, _), cells in zip(release.rows, release.intervals, strict=True):
            assert cells[1] is not None
            covered += cells[1][0] <= truth.get(key, 0) <= cells[1][1]
            n += 1
    assert covered / n >= 0.93, covered / n


def test_intervals_of_the_mean_of_per_unit_sums_cover_the_truth(shop: DuckDBEngine) -> None:
    plan = _plan("SELECT AVG(s) FROM (SELECT uid, SUM(age) AS s FROM shop GROUP BY uid)")
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None)
    ((truth,),) = _truth(shop, f"SELECT AVG(s) FROM ({PER_UNIT_TRUTH})")
    covered = 0
    for _ in range(200):
        release = execute(plan, pricing, shop)
        ((value,),), ((interval,),) = release.rows, release.intervals
        assert interval is not None and 0 <= interval[0] <= value <= interval[1] <= K * 110
        covered += interval[0] <= truth <= interval[1]
    assert covered / 200 >= 0.9, covered  # binomial(200, 0.95) is below 0.9 with probability < 1e-3


def test_a_unit_of_many_rows_moves_each_measurement_by_at_most_its_sensitivity(
    shop: DuckDBEngine, key: Path, tmp_path: Path
) -> None:
    """The same data without the 500-row unit: every exact measurement of a per-unit query moves by at most its
    sensitivity at one row per unit (the README's promise: one unit is one row of the derived table, its values
    within their derived bounds)."""
    without = _engine(tmp_path / "without", _frame(400, 3), key)
    for sql in (
        HISTOGRAM,
        "SELECT COUNT(*), AVG(s), SUM(s) FROM (SELECT uid, SUM(amount) AS s FROM shop GROUP BY uid)",
        "SELECT n, SUM(m) FROM (SELECT uid, COUNT(*) AS n, MIN(age) AS m FROM shop GROUP BY uid) GROUP BY n",
    ):
        plan = _plan(sql)
        pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None)
        statement = comp.measurement_query(plan)
        width = len(plan.keys)
        rows = [{r[:width]: r[width + 1 :] for r in cat.rows(statement)} for cat in (shop, without)]
        measures = comp.plain_measurements(plan)
        for group in set(rows[0]) | set(rows[1]):
            zeros = (0,) * len(measures)
            for m, x, y in zip(measures, rows[0].get(group, zeros), rows[1].get(group, zeros), strict=True):
                assert abs(int(x) - int(y)) <= pricing.d_in[m], (sql, group, m)


# --- through the gateway: refusals charge nothing, releases are cached per inner query ----------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bastion]:
    d = tmp_path_factory.mktemp("shop_gateway")
    (d / "shop.yaml").write_text(POLICY_YAML)
    _frame(300, 5).to_csv(d / "shop.csv", index=False)
    ws = build_workspace(d, [(d / "shop.yaml", d / "shop.csv")], ROLES)
    bastion = Bastion(ws.settings)
    try:
        yield bastion
    finally:
        bastion.close()


def _spent(bastion: Bastion, ctx: Context) -> float:
    return sum(b["spent"]["epsilon"] for b in bastion.budgets(ctx))


def test_refusals_charge_nothing(gateway: Bastion) -> None:
    _, principal = gateway.tokens.create("refused", "analyst")
    ctx = Context(principal)
    for sql, reason, _ in REFUSALS:
        with pytest.raises(GatewayError) as info:
            gateway.query(ctx, sql, epsilon=1.0)
        assert getattr(info.value, "reason", info.value.code) == reason
    assert _spent(gateway, ctx) == 0


def test_answers_are_charged_and_cached_per_inner_query(gateway: Bastion) -> None:
    _, principal = gateway.tokens.create("cached", "analyst")
    ctx = Context(principal)
    first = gateway.query(ctx, HISTOGRAM, epsilon=0.5)
    assert not first["cached"] and first["epsilon_spent"] == pytest.approx(0.5)
    assert [r[0] for r in first["rows"]] == list(range(1, K + 1))
    again = gateway.query(ctx, HISTOGRAM, epsilon=0.5)
    assert again["cached"] and again["rows"] == first["rows"]
    other = gateway.query(
        ctx, "SELECT n, COUNT(*) FROM (SELECT uid, COUNT(age) AS n FROM shop GROUP BY uid) GROUP BY n", epsilon=0.5
    )
    assert not other["cached"] and other["epsilon_spent"] == pytest.approx(0.5)
    assert _spent(gateway, ctx) == pytest.approx(1.0)


def test_a_dataset_whose_unit_is_the_row_has_no_per_unit_form() -> None:
    rows = POLICY.model_copy(update={"privacy_unit": "row", "max_rows_per_unit": 1})
    with pytest.raises(QueryRejected) as info:
        plan_query(f"SELECT n, COUNT(*) FROM {PER_UNIT_COUNT} GROUP BY n", lambda _: rows)
    assert info.value.reason == "subquery"
    assert "is the row" in info.value.message
