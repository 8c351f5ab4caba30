"""Golden SQL: what each engine's dialect generates from the compiled plan of representative queries.

The fixture `tests/fixtures/compiled/visits.yaml` holds, per query, the statements generated for DuckDB and for
Spark and the post-processing statement (run on the public engine), so that any change to generated SQL shows in
review. After an intended change, regenerate it with `BASTION_UPDATE_GOLDEN=1 pytest tests/test_compiled_golden.py`
and read the diff.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from gateway.demo import DEMO_POLICY_YAML, diagnosis_chapters
from gateway.engines.duckdb import DuckDBEngine
from gateway.sql import compile as comp
from gateway.sql import plan as planner
from policies.errors import DatasetNotFound
from policies.schema import Policy, parse_policy

FIXTURE = Path(__file__).parent / "fixtures" / "compiled" / "visits.yaml"
POLICY = parse_policy(yaml.safe_load(DEMO_POLICY_YAML))  # the demo's visits and its public diagnosis_chapters
DIALECTS = ("duckdb", "spark")

QUERIES = [
    "SELECT COUNT(*) FROM visits",
    "SELECT COUNT(*) AS n FROM visits WHERE age >= 65",
    "SELECT region, COUNT(*) AS visits, AVG(income) AS mean_income FROM visits WHERE age >= 65 GROUP BY region",
    "SELECT sex, region, SUM(length_of_stay) FROM visits GROUP BY sex, region",
    "SELECT COUNT(DISTINCT patient_id) FROM visits",
    "SELECT VARIANCE(income), STDDEV(age) FROM visits",
    "SELECT region, MEDIAN(length_of_stay) FROM visits GROUP BY region",
    "SELECT QUANTILE_CONT(income, 0.9) AS p90 FROM visits",
    "SELECT diagnosis, COUNT(*) FROM visits GROUP BY diagnosis",
    "SELECT date_trunc('month', visit_day) AS month, COUNT(*) FROM visits GROUP BY month",
    "SELECT CASE WHEN age < 18 THEN 'child' WHEN age < 65 THEN 'adult' ELSE 'senior' END AS band, AVG(income) "
    "FROM visits GROUP BY band",
    "SELECT FLOOR(age / 10) * 10 AS decade, COUNT(*) FROM visits GROUP BY 1",
    "SELECT region, COUNT(*) AS n FROM visits GROUP BY region HAVING COUNT(*) > 100 ORDER BY n DESC LIMIT 3",
    "SELECT COUNT(*) FROM visits WHERE diagnosis LIKE 'J%' AND (age > 30 OR sex = 'F')",
    "SELECT region, SUM(income) / COUNT(*) AS per_visit FROM visits GROUP BY region",
    "SELECT sex, SUM(CASE WHEN age >= 65 THEN income ELSE 0 END) AS senior_income, AVG(income / 1000) FROM visits "
    "GROUP BY sex",
    "SELECT region, COUNT(CASE WHEN age < 18 THEN 1 END) AS children FROM visits WHERE sex = 'F' GROUP BY region",
    "SELECT diagnosis, SUM(age + 1), STDDEV(age + 1) FROM visits GROUP BY diagnosis",
    # a public group list written in the query: the rows filtered to the listed keys, as WHERE is (a FILTER)
    "SELECT g.region, COUNT(*) AS n FROM visits v RIGHT OUTER JOIN (SELECT DISTINCT region FROM UNNEST(['north', "
    "'mars']) AS region) g ON v.region = g.region WHERE age >= 65 GROUP BY g.region",
    # per-unit subqueries: the inner query groups the bounded rows by the unit, the outer one is planned over it
    "SELECT n, COUNT(*) AS patients FROM (SELECT patient_id, COUNT(*) AS n FROM visits GROUP BY patient_id) GROUP BY n",
    "SELECT AVG(total) AS mean_total, SUM(stays) FROM (SELECT patient_id, SUM(income) AS total, MAX(length_of_stay) "
    "AS stays FROM visits WHERE age >= 18 GROUP BY patient_id) WHERE total > 1000",
    # joins with a public table: the bounded table (at most k rows per unit) joined on the public key, then measured
    "SELECT c.chapter, COUNT(*) AS n FROM visits v JOIN diagnosis_chapters c ON v.diagnosis = c.code WHERE v.age >= 65 "
    "GROUP BY c.chapter",
    "SELECT c.chapter, AVG(v.income), SUM(CASE WHEN c.chapter LIKE 'Injury%' THEN v.length_of_stay ELSE 0 END) AS "
    "injury_days FROM visits v LEFT JOIN diagnosis_chapters c ON c.code = v.diagnosis GROUP BY c.chapter",
]


def _public(dataset: str, table: str) -> pa.Table:
    assert (dataset, table) == ("visits", "diagnosis_chapters")
    return diagnosis_chapters()


def plan_query(sql: str, resolve: Callable[[str], Policy]) -> planner.Plan:
    return planner.plan_query(sql, resolve, _public)


def _resolve(name: str) -> Policy:
    if name != "visits":
        raise DatasetNotFound(f"no dataset named {name!r}")
    return POLICY


def generate(sql: str) -> dict[str, Any]:
    plan = plan_query(sql, _resolve)
    entry: dict[str, Any] = {"sql": sql}
    for dialect in DIALECTS:
        entry[dialect] = [s.sql(dialect=dialect) for s in comp.statements(plan)]
    entry["post"] = plan.post.sql(dialect="duckdb")
    return entry


def test_golden_fixture_matches_generated_sql() -> None:
    generated = [generate(q) for q in QUERIES]
    if os.environ.get("BASTION_UPDATE_GOLDEN"):
        FIXTURE.write_text(yaml.safe_dump(generated, sort_keys=False, width=1_000_000, allow_unicode=True))
    expected = yaml.safe_load(FIXTURE.read_text())
    assert [e["sql"] for e in expected] == QUERIES, "the fixture's queries differ: regenerate it"
    for want, got in zip(expected, generated, strict=True):
        for part in (*DIALECTS, "post"):
            assert got[part] == want[part], (want["sql"], part)


@pytest.mark.parametrize("sql", QUERIES)
def test_compiled_statements_read_only_the_bounded_table(sql: str) -> None:
    """Whatever the dialect, a compiled statement reads the dataset's bounded table (and a joined public table) and
    nothing else."""
    import sqlglot
    from sqlglot import exp

    for dialect in DIALECTS:
        for text in generate(sql)[dialect]:
            tables = {t.name for t in sqlglot.parse_one(text, read=dialect).find_all(exp.Table) if t.name}
            assert tables <= {"bounded_visits", "g", "public_visits__diagnosis_chapters"}, (dialect, tables)


@pytest.mark.parametrize("sql", [*QUERIES, "SELECT diagnosis, region, AVG(age) FROM visits GROUP BY 1, 2"])
def test_the_empty_result_is_what_the_engine_returns_on_no_rows(sql: str, workspace: Any) -> None:
    """The fallback release reads rows computed from the plan alone; they are the engine's own over no rows."""
    plan = plan_query(sql, _resolve)
    engine = DuckDBEngine(workspace.settings.database, workspace.settings.bounding_key)
    try:
        got = sorted(engine.rows(comp.measurement_query(plan, empty=True)), key=repr)
        assert got == sorted(comp.empty_result(plan), key=repr)
        for m in plan.measurements:
            if m.kind == "quantile":
                assert engine.rows(comp.quantile_query(plan, m, empty=True)) == []
    finally:
        engine.close()
