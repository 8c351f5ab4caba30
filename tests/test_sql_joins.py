"""Joins of the private table with a public table of its dataset (gateway/sql/joins.py): the planned table has k·m
rows per unit (m = 1 for a unique key), the public table's values are released as group keys without key selection,
the statements join the contribution-bounded rows (bounded first, then joined), one unit of many rows moves a joined
COUNT or SUM by at most the priced sensitivity, joined counts' 95% intervals cover the truth on the bounded rows at
the promised rate, and refusals come with a span before any charge."""

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
from gateway.sql.joins import DUCKDB_ONLY
from gateway.sql.plan import Plan, plan_query
from gateway.sql.price import price
from gateway.sql.release import execute
from policies.errors import QueryRejected
from policies.schema import Policy, parse_policy
from tests.conftest import Workspace

K = 3
M = 3  # the multiplicity of `synonyms.code`
POLICY_YAML = f"""
dataset: shop
privacy_unit: uid
max_rows_per_unit: {K}
budget: {{per_principal: {{epsilon: 1000, delta: 1.0e-3}}, total: {{epsilon: 1000, delta: 1.0e-3}}}}
columns:
  uid: {{type: int, usage: hidden}}
  dx: {{type: category}}
  region_code: {{type: category}}
  age: {{type: int, bounds: [0, 110]}}
  amount: {{type: decimal, bounds: [-100, 50], precision: 0.01}}
roles: {{analyst: [query]}}
public_tables:
  chapters:
    source: chapters.csv
    unique_key: code
    columns: {{code: {{type: category}}, chapter: {{type: category}}, weight: {{type: int, bounds: [0, 10]}}}}
  regions:
    source: regions.csv
    unique_key: region_code
    columns: {{region_code: {{type: category}}, country: {{type: category}}}}
  synonyms:
    source: synonyms.csv
    max_multiplicity: {{code: {M}}}
    columns: {{code: {{type: category}}, word: {{type: category}}}}
"""
POLICY = parse_policy(yaml.safe_load(POLICY_YAML))
CHAPTERS = pd.DataFrame(
    {"code": ["A1", "B2", "C3", "Q0"], "chapter": ["alpha", "beta", "beta", "empty"], "weight": [1, 2, 3, 4]}
)  # Q0: no row has it, so the chapter 'empty' is a released group with no rows
REGIONS = pd.DataFrame({"region_code": ["r1", "r2", "r3"], "country": ["x", "x", "y"]})
SYNONYMS = pd.DataFrame({"code": ["A1", "A1", "A1", "B2"], "word": ["a", "aa", "aaa", "b"]})
COUNT_BY_CHAPTER = "SELECT c.chapter, COUNT(*) FROM shop s JOIN chapters c ON s.dx = c.code GROUP BY c.chapter"


def _frame(units: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, units)
    n = int(sizes.sum())
    return pd.DataFrame(
        {
            "uid": np.repeat(np.arange(units), sizes),
            "dx": rng.choice(["A1", "B2", "C3", "Z9"], n),  # Z9 is in no public table
            "region_code": rng.choice(["r1", "r2", "r3"], n),
            "age": rng.integers(0, 111, n),
            "amount": np.round(rng.uniform(-100, 50, n), 2),
        }
    )


HEAVY = pd.DataFrame(
    {"uid": 9999, "dx": "A1", "region_code": "r1", "age": 500, "amount": -1e9}, index=range(500)
)  # one unit of 500 rows beyond every bound, on the code of largest multiplicity


def _engine(directory: Path, frame: pd.DataFrame, key: Path) -> DuckDBEngine:
    directory.mkdir(parents=True, exist_ok=True)
    frame.to_csv(directory / "shop.csv", index=False)
    for name, table in (("chapters", CHAPTERS), ("regions", REGIONS), ("synonyms", SYNONYMS)):
        table.to_csv(directory / f"{name}.csv", index=False)
    engine = DuckDBEngine(directory / "db.duckdb", key, read_only=False)
    engine.register(POLICY, directory / "shop.csv")
    return engine


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DuckDBEngine, DuckDBEngine]]:
    """D (with the heavy unit) and D′ (without it), with the same bounding key."""
    root = tmp_path_factory.mktemp("joins")
    base = _frame(400, 5)
    d = _engine(root / "d", pd.concat([base, HEAVY], ignore_index=True), root / "key")
    d_prime = _engine(root / "d_prime", base, root / "key")
    yield d, d_prime
    d.close()
    d_prime.close()


def _plan(sql: str, engine: DuckDBEngine | None = None) -> Plan:
    def public(dataset: str, table: str) -> Any:
        if engine is not None:
            return engine.public_table(dataset, table)
        import pyarrow as pa

        frames = {"chapters": CHAPTERS, "regions": REGIONS, "synonyms": SYNONYMS}
        return pa.Table.from_pandas(frames[table], preserve_index=False)

    def resolve(name: str) -> Policy:
        assert name == "shop"
        return POLICY

    return plan_query(sql, resolve, public)


def _exact(engine: DuckDBEngine, plan: Plan) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """The plan's exact measurements per group, before noise."""
    nk = len(plan.keys)
    return {tuple(r[:nk]): tuple(r[nk:]) for r in engine.rows(comp.measurement_query(plan))}


# --- planning ---------------------------------------------------------------------------------------------------


def test_a_unique_key_keeps_the_sensitivity_and_a_multiplicity_multiplies_it() -> None:
    unique = _plan(COUNT_BY_CHAPTER)
    assert unique.policy.max_rows_per_unit == K and unique.dataset_policy is POLICY
    assert price(unique, epsilon=1.0, accuracy=None, alpha=0.05, delta=None).d_in == {unique.measurements[0]: K}
    assert "sensitivities unchanged" in unique.warnings[-1]
    multiplied = _plan("SELECT n.word, COUNT(*), SUM(s.age) FROM shop s JOIN synonyms n ON s.dx = n.code GROUP BY 1")
    assert multiplied.policy.max_rows_per_unit == K * M
    d_in = price(multiplied, epsilon=1.0, accuracy=None, alpha=0.05, delta=None).d_in
    assert sorted(d_in.values()) == [K * M, K * M * 110]
    assert f"multiplied by {M}" in multiplied.warnings[-1]


def test_group_keys_from_the_public_table_are_released_without_key_selection() -> None:
    plan = _plan(COUNT_BY_CHAPTER)
    assert plan.declared_groups() == [("alpha",), ("beta",), ("empty",)] and not plan.needs_key_selection
    assert price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None).cost.delta == 0
    inner = _plan("SELECT s.dx, COUNT(*) FROM shop s JOIN chapters c ON s.dx = c.code GROUP BY s.dx")
    assert inner.declared_groups() == [("A1",), ("B2",), ("C3",), ("Q0",)]  # after an inner join: the keys
    left = _plan("SELECT s.dx, COUNT(*) FROM shop s LEFT JOIN chapters c ON s.dx = c.code GROUP BY s.dx")
    assert left.needs_key_selection  # a left join keeps dx values that no public row has


def test_using_and_unqualified_columns() -> None:
    plan = _plan("SELECT country, COUNT(*) FROM shop JOIN regions USING (region_code) GROUP BY country")
    assert plan.declared_groups() == [("x",), ("y",)]
    both = _plan("SELECT region_code, COUNT(*) FROM shop JOIN regions USING (region_code) GROUP BY region_code")
    assert both.declared_groups() == [("r1",), ("r2",), ("r3",)]
    qualified = _plan(
        "SELECT r.region_code, COUNT(*) FROM shop s JOIN regions r ON s.region_code = r.region_code GROUP BY 1"
    )
    assert qualified.output_names[0] == "region_code" and qualified.declared_groups() == [("r1",), ("r2",), ("r3",)]
    assert "regions__region_code" in qualified.policy.columns  # the public column, beside the dataset's
    with pytest.raises(QueryRejected) as info:
        _plan("SELECT region_code, COUNT(*) FROM shop s JOIN regions r ON s.region_code = r.region_code GROUP BY 1")
    assert info.value.reason == "ambiguous_column" and info.value.details["column"] == 8


@pytest.mark.parametrize(
    ("sql", "reason", "highlight"),
    [
        (
            "SELECT COUNT(*) FROM shop s FULL JOIN chapters c ON s.dx = c.code",
            "join",
            "FULL JOIN chapters c ON s.dx = c.code",
        ),
        ("SELECT COUNT(*) FROM shop s JOIN synonyms n ON s.dx = n.word", "join", "s.dx = n.word"),
        (
            "SELECT COUNT(*) FROM shop s JOIN chapters c ON s.dx = c.code OR s.age > 3",
            "join",
            "s.dx = c.code OR s.age > 3",
        ),
        ("SELECT COUNT(*) FROM shop s JOIN chapters c ON s.age = c.code", "type_error", "s.age = c.code"),
        (
            "SELECT COUNT(*) FROM shop s JOIN regions r ON s.dx = r.region_code JOIN chapters c ON s.dx = c.code",
            "join",
            "JOIN chapters c ON s.dx = c.code",
        ),
        ("SELECT COUNT(*) FROM shop s JOIN shop t ON s.dx = t.dx", "join", "JOIN shop t ON s.dx = t.dx"),
        ("SELECT COUNT(*) FROM shop s JOIN visits v ON s.dx = v.dx", "unknown_table", "visits v"),
        ("SELECT c.nope, COUNT(*) FROM shop s JOIN chapters c ON s.dx = c.code GROUP BY 1", "unknown_column", "c.nope"),
    ],
)
def test_refusals_point_at_the_join(sql: str, reason: str, highlight: str) -> None:
    with pytest.raises(QueryRejected) as info:
        _plan(sql)
    assert info.value.reason == reason, info.value.message
    assert info.value.details["highlight"] == highlight
    if reason == "join":
        assert "JOIN" in (info.value.details.get("hint") or "")


def test_an_engine_without_public_tables_refuses_joins_with_the_reason() -> None:
    with pytest.raises(QueryRejected) as info:
        plan_query(COUNT_BY_CHAPTER, lambda name: POLICY, None)
    assert info.value.reason == "join" and DUCKDB_ONLY in info.value.message


# --- execution: bounded first, then joined ----------------------------------------------------------------------


def test_the_statements_join_the_bounded_rows(engines: tuple[DuckDBEngine, DuckDBEngine]) -> None:
    d, _ = engines
    plan = _plan("SELECT c.chapter, COUNT(*), SUM(c.weight) FROM shop s JOIN chapters c ON s.dx = c.code GROUP BY 1", d)
    truth = (
        d.connect()
        .execute(
            "SELECT c.chapter, COUNT(*), SUM(c.weight) FROM bounded_shop b "
            "JOIN public_shop__chapters c ON b.dx = c.code "
            "GROUP BY 1"
        )
        .fetchall()
    )
    exact = _exact(d, plan)
    assert {(k,): (n, w) for k, n, w in truth} == {k: (v[1], v[2]) for k, v in exact.items()}  # after __n
    heavy = d.connect().execute("SELECT COUNT(*) FROM bounded_shop WHERE uid = 9999").fetchone()
    assert heavy == (K,)  # the heavy unit has k rows in the joined table, not 500


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT COUNT(*), SUM(s.amount) FROM shop s JOIN chapters c ON s.dx = c.code",
        "SELECT COUNT(*), SUM(s.amount) FROM shop s LEFT JOIN chapters c ON s.dx = c.code",
        "SELECT COUNT(*), SUM(s.amount), SUM(s.age) FROM shop s JOIN synonyms n ON s.dx = n.code",
        "SELECT n.word, COUNT(*), SUM(s.amount) FROM shop s JOIN synonyms n ON s.dx = n.code GROUP BY n.word",
    ],
)
def test_a_heavy_unit_moves_a_joined_count_or_sum_by_at_most_the_priced_sensitivity(
    sql: str, engines: tuple[DuckDBEngine, DuckDBEngine]
) -> None:
    d, d_prime = engines
    plan = _plan(sql, d)
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None)
    with_unit, without = _exact(d, plan), _exact(d_prime, plan)
    for i, m in enumerate(plan.measurements):
        moved = sum(abs(with_unit.get(g, (0,) * 9)[i + 1] - without.get(g, (0,) * 9)[i + 1]) for g in with_unit)
        assert 0 < moved <= pricing.d_in[m], (m.label, moved, pricing.d_in[m])
    if "synonyms" in sql:  # the heavy unit's k rows are all A1, which joins 3 rows: the bound is met exactly
        total = sum(abs(with_unit[g][1] - without.get(g, (0, 0))[1]) for g in with_unit)
        assert total == K * M


def test_joined_counts_intervals_cover_the_truth_on_the_bounded_rows(
    engines: tuple[DuckDBEngine, DuckDBEngine],
) -> None:
    d, _ = engines
    plan = _plan(COUNT_BY_CHAPTER, d)
    pricing = price(plan, epsilon=0.5, accuracy=None, alpha=0.05, delta=None)
    truth = {k[0]: v[1] for k, v in _exact(d, plan).items()}
    truth.setdefault("empty", 0)
    hits = trials = 0
    for _ in range(150):
        released = execute(plan, pricing, d)
        for row, cells in zip(released.rows, released.intervals, strict=True):
            low, high = cells[1]  # type: ignore[misc]
            hits += low <= truth[row[0]] <= high
            trials += 1
    assert trials == 150 * 3
    # 95% intervals: the rate is at least 0.95 less three standard errors of a binomial proportion over the trials.
    assert hits / trials >= 0.95 - 3 * np.sqrt(0.95 * 0.05 / trials), hits / trials


# --- through the gateway ----------------------------------------------------------------------------------------

DEMO_JOIN = (
    "SELECT c.chapter, COUNT(*) AS n FROM visits v JOIN diagnosis_chapters c ON v.diagnosis = c.code GROUP BY c.chapter"
)


def test_the_demo_join_is_priced_released_over_every_chapter_and_refusals_charge_nothing(workspace: Workspace) -> None:
    bastion = Bastion(workspace.settings)
    try:
        principal = bastion.authenticate(workspace.tokens["analyst"])
        ctx = Context(principal)
        dry = bastion.query(ctx, DEMO_JOIN, epsilon=1.0, dry_run=True)
        assert dry["measurements"][0]["sensitivity"] == 10 and not dry["key_selection"] and dry["delta"] == 0
        assert any("diagnosis_chapters" in w for w in dry["warnings"])
        answer = bastion.query(ctx, DEMO_JOIN, epsilon=1.0)
        from gateway.demo import CHAPTERS

        assert sorted(r[0] for r in answer["rows"]) == sorted(set(CHAPTERS.values()))
        spent = bastion.budget_status(principal.name, bastion.engine.policy("visits")[0])["spent"]["epsilon"]
        with pytest.raises(QueryRejected):
            bastion.query(
                ctx, "SELECT COUNT(*) FROM visits v FULL JOIN diagnosis_chapters c ON v.diagnosis = c.code", epsilon=1.0
            )
        after = bastion.budget_status(principal.name, bastion.engine.policy("visits")[0])["spent"]["epsilon"]
        assert spent == pytest.approx(1.0) and after == spent
    finally:
        bastion.close()
