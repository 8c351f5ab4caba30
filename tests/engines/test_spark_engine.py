"""The Spark engine against its promises: the same bounded rows as DuckDB, a key Spark never sees, statements
bound before any row is read, exact sums, versions that survive a crash, a catalog another process can open."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from sqlglot import exp

from gateway.engines import recipe
from gateway.engines.base import ROW_ID, EngineError, bounded
from gateway.engines.duckdb import DuckDBEngine
from gateway.engines.kind import EngineKind
from gateway.settings import Settings
from policies.schema import parse_policy

pytestmark = pytest.mark.spark

HOSTILE = parse_policy(
    yaml.safe_load("""
dataset: hostile
privacy_unit: uid
max_rows_per_unit: 2
budget:
  per_principal: {epsilon: 10.0, delta: 1.0e-6}
  total: {epsilon: 100.0, delta: 1.0e-5}
columns:
  uid:   {type: int, usage: hidden}
  x:     {type: float, bounds: [-1000, 1000]}
  n:     {type: int, bounds: [0, 100]}
  day:   {type: date, bounds: [2020-01-01, 2020-12-31]}
  when:  {type: date}
  kind:  {type: category, max_length: 3}
  flag:  {type: bool}
roles:
  analyst: [query]
""")
)


def _all_rows(engine: Any, dataset: str) -> list[tuple[Any, ...]]:
    """Every bounded row but its row id (each engine numbers its rows its own way)."""
    table = engine.arrow(exp.select(exp.Star()).from_(bounded(dataset))).drop_columns([ROW_ID])
    ids = engine.rows(exp.select(exp.column(ROW_ID, quoted=True)).from_(bounded(dataset)))
    assert len({i for (i,) in ids}) == len(ids)  # unique
    return sorted(
        engine.rows(exp.select(*[exp.column(c, quoted=True) for c in table.column_names]).from_(bounded(dataset))),
        key=repr,
    )


def test_both_engines_keep_the_same_rows_of_the_demo_table(pair: Any) -> None:
    assert _all_rows(pair.spark, "visits") == _all_rows(pair.duck, "visits")


def test_both_engines_convert_and_bound_hostile_values_alike(pair: Any, tmp_path: Path) -> None:
    """Ties, NULLs, NaN, infinities, out-of-bound values, long text and units with more than k rows."""
    n = 60
    table = pa.table(
        {
            "uid": [i % 7 for i in range(n)],
            "x": [float("nan"), float("inf"), -float("inf"), None, 1e300, -5.5, 2.5, 0.0, -0.0, 999.99] * 6,
            "n": [None, -3, 250, 7, 7, 7, 50, 100, 0, 1] * 6,
            "day": ["2019-05-01", "2021-03-03", None, "2020-06-06", "junk", "2020-01-01", "", "2020-12-31", "x", "1"]
            * 6,
            # An unbounded date: text outside years 1-9999 (which both engines can read as a date) is missing.
            "when": ["+10000-01-01", "10000-01-01", "-0001-01-01", "0001-01-01", "9999-12-31", None, "2020-02-30"]
            + ["+1000000-01-01", "2024-02-29", "2020-1-5"] * 1
            + ["2020-01-01"] * 50,
            "kind": ["abcdef", "ab", None, "ééééé", "", "x", "yy", "zzz", "abcdef", "ab"] * 6,
            "flag": [True, False, None, True, True, False, False, None, True, False] * 6,
        }
    )
    source = tmp_path / "hostile.parquet"
    pq.write_table(table, source)
    pair.duck.register(HOSTILE, source)
    pair.spark.register(HOSTILE, source)
    duck, spark = _all_rows(pair.duck, "hostile"), _all_rows(pair.spark, "hostile")
    assert spark == duck
    days = pair.duck.rows(exp.select(exp.column("when", quoted=True)).from_(bounded("hostile")))
    assert all(d is None or dt.date(1, 1, 1) <= d <= dt.date(9999, 12, 31) for (d,) in days)
    per_unit: dict[int, int] = {}
    for row in spark:
        per_unit[row[0]] = per_unit.get(row[0], 0) + 1
    assert max(per_unit.values()) == 2


def test_the_key_is_in_no_plan_and_no_log(pair: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key_hex = pair.settings.bounding_key.read_text().strip()
    caplog.set_level(logging.DEBUG)
    source = tmp_path / "again.parquet"
    pq.write_table(pq.read_table(pair.source).slice(0, 2_000), source)
    policy = parse_policy({**yaml.safe_load(_policy_yaml()), "dataset": "again"})
    pair.spark.register(policy, source)
    pair.spark.check(exp.select(exp.Count(this=exp.Star())).from_(bounded("again")))
    spark = pair.spark.session()
    plans = [spark.sql(f"SELECT * FROM {name}")._jdf.queryExecution().toString() for name in ("bounded_again",)]
    text = "\n".join(plans) + caplog.text
    assert key_hex not in text and key_hex.upper() not in text
    for entry in pair.settings.warehouse.rglob("*.json"):
        assert key_hex not in entry.read_text()


def _policy_yaml() -> str:
    from gateway.demo import POLICY_YAML

    return POLICY_YAML


def test_check_binds_without_reading_and_names_the_problem(pair: Any) -> None:
    bad = exp.select(exp.column("no_such_column", quoted=True)).from_(bounded("visits")).where(exp.false())
    with pytest.raises(EngineError) as info:
        pair.spark.check(bad)
    assert "no_such_column" in info.value.message
    pair.spark.check(exp.select(exp.Count(this=exp.Star())).from_(bounded("visits")).where(exp.false()))


def test_failures_after_binding_carry_the_class_only(pair: Any) -> None:
    """A statement that fails while running says which kind of error, never a value of a row."""
    boom = exp.select(exp.Anonymous(this="raise_error", expressions=[exp.column("diagnosis", quoted=True)])).from_(
        bounded("visits")
    )
    with pytest.raises(EngineError) as info:
        pair.spark.rows(boom)
    assert info.value.message.isidentifier()


def test_decimal_sums_are_exact_beyond_bigint(pair: Any) -> None:
    big = 2**62
    values = exp.values([exp.Tuple(expressions=[exp.Literal.number(big)]) for _ in range(8)], alias="v", columns=["x"])
    total = exp.select(exp.Sum(this=exp.Cast(this=exp.column("x"), to=exp.DataType.build("DECIMAL(38, 0)")))).from_(
        values
    )
    assert pair.spark.rows(total) == [(8 * big,)] == pair.duck.rows(total)


def test_a_crash_while_writing_keeps_the_previous_version(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    before = pair.spark.policy("visits")[1]
    rows = _all_rows(pair.spark, "visits")

    def crash(src: Any, dst: Any) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr("gateway.engines.spark.os.replace", crash)
    with pytest.raises(Exception, match="disk gone"):
        pair.spark.register(recipe_policy(), pair.source)
    monkeypatch.undo()
    assert pair.spark.policy("visits")[1] == before
    assert _all_rows(pair.spark, "visits") == rows
    assert not [p for p in (pair.settings.warehouse / "visits").iterdir() if p.name.startswith(".partial")]


def recipe_policy() -> Any:
    return parse_policy(yaml.safe_load(_policy_yaml()))


def test_another_engine_on_the_warehouse_sees_the_datasets(pair: Any) -> None:
    from gateway.engines.spark import SparkEngine

    reader = SparkEngine(Settings(workspace=pair.settings.workspace, engine=EngineKind.SPARK))
    assert reader.policy("visits")[1] == pair.spark.policy("visits")[1]
    assert reader.rows(exp.select(exp.Count(this=exp.Star())).from_(bounded("visits"))) == pair.spark.rows(
        exp.select(exp.Count(this=exp.Star())).from_(bounded("visits"))
    )
    assert reader.regex is False and DuckDBEngine.regex is True
    assert recipe.DIGEST not in {f.name for f in pair.spark.session().table("bounded_visits").schema.fields}


def test_an_analysed_statement_serves_one_run_only(pair: Any) -> None:
    """The bind check's analysis is reused by the run that follows, and by no later run: a DataFrame that ran keeps
    Spark's finished stages, and a second run of it would answer faster than a new statement."""
    query = exp.select(exp.Count(this=exp.Star())).from_(bounded("visits")).where(exp.column("age").neq(-12345))
    text = query.sql(dialect="spark")
    pair.spark.check(query)
    analysed = pair.spark._analysed[text]
    assert pair.spark.rows(query) == pair.duck.rows(query)
    assert text not in pair.spark._analysed
    pair.spark.check(query)
    assert pair.spark._analysed[text] is not analysed  # analysed anew
