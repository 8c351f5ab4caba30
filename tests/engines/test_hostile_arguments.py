"""Every row function the type checker accepts, with hostile arguments, on both engines: none may fail.

A statement that fails on the rows after the charge answers the default release, and that answer says something
about the rows that made it fail (two reviews turned Spark's split_part and out-of-range dates into such oracles).
So each function of the allowlist is run with edge values (zero, negatives, the largest numbers, NaN and
infinities, empty and long text, dates at and past the ends of years 1-9999) that reach half of the rows (through a
CASE on the row), on DuckDB and on Spark. Either the planner refuses the query before the charge, or both engines
compute it without an error and agree on which rows it is NULL for.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.sql import compile as comp
from gateway.sql.plan import plan_query
from gateway.sql.release import bind_check
from policies.errors import QueryRejected
from policies.reader import EngineError
from tests.engines.conftest import POLICY

pytestmark = pytest.mark.spark


def _half(hostile: str, benign: str) -> str:
    return f"CASE WHEN age % 2 = 0 THEN {hostile} ELSE {benign} END"


INTS = ["0", "-1", "-7", "2147483647", "-2147483648", "1000000000", "age - 60", "NULL"]
FLOATS = [
    "0.0",
    "-0.0",
    "1e308",
    "-1e308",
    "5e-324",
    "CAST('NaN' AS DOUBLE)",
    "CAST('Infinity' AS DOUBLE)",
    "CAST('-Infinity' AS DOUBLE)",
    "income - 250000",
]
TEXTS = ["''", "'é'", "'\\'", "'%_'", "repeat('ab', 150)", "'😀x'", "' , '", "'+1000000-01-01'", "NULL"]
DATES = [
    "CAST('+1000000-01-01' AS DATE)",
    "CAST('-0001-01-01' AS DATE)",
    "CAST('0000-01-01' AS DATE)",
    "CAST('0001-01-01' AS DATE)",
    "CAST('9999-12-31' AS DATE)",
    "CAST('2020-02-30' AS DATE)",
    "DATE '0001-01-01'",
    "DATE '9999-12-31'",
]

TEMPLATES: dict[str, list[str]] = {
    "int": [
        "abs({x})",
        "sign({x})",
        "{x} // {y}",
        "{x} % {y}",
        "{x} * {y}",
        "{x} + {y}",
        "greatest({x}, age)",
        "least({x}, {y})",
        "power({x}, {y})",
        "substring(region, {x}, {y})",
        "left(region, {x})",
        "right(region, {x})",
        "lpad(sex, {x}, 'xy')",
        "rpad(sex, {x}, 'z')",
        "repeat(sex, {x})",
        "split_part(region, 'o', {x})",
        "CAST({x} AS VARCHAR)",
        "CAST({x} AS DOUBLE)",
        "CAST({x} AS BOOLEAN)",
        "round(income, {x})",
        "visit_day + {x}",
        "nullif({x}, 0)",
        "coalesce({x}, 1)",
    ],
    "float": [
        "abs({x})",
        "sign({x})",
        "floor({x})",
        "ceil({x})",
        "round({x}, 2)",
        "trunc({x})",
        "sqrt({x})",
        "cbrt({x})",
        "ln({x})",
        "log({x}, {y})",
        "exp({x})",
        "power({x}, {y})",
        "{x} / {y}",
        "{x} % {y}",
        "isnan({x})",
        "isinf({x})",
        "CAST({x} AS BIGINT)",
        "CAST({x} AS VARCHAR)",
        "greatest({x}, {y})",
    ],
    "text": [
        "lower({x})",
        "upper({x})",
        "trim({x})",
        "ltrim({x})",
        "rtrim({x})",
        "reverse({x})",
        "length({x})",
        "contains({x}, 'a')",
        "starts_with({x}, '')",
        "ends_with({x}, 'b')",
        "strpos({x}, 'b')",
        "substring({x}, 2, 3)",
        "left({x}, 2)",
        "right({x}, 2)",
        "replace({x}, 'a', 'bb')",
        "concat({x}, {y})",
        "{x} || region",
        "lpad({x}, 5, 'q')",
        "repeat({x}, 3)",
        "split_part({x}, ',', 2)",
        "CAST({x} AS BIGINT)",
        "CAST({x} AS DOUBLE)",
        "CAST({x} AS DATE)",
        "CAST({x} AS BOOLEAN)",
        "{x} LIKE '%a%'",
        "{x} ILIKE 'A%'",
    ],
    "date": [
        "date_trunc('week', {x})",
        "date_trunc('month', {x})",
        "date_trunc('year', {x})",
        "date_trunc('quarter', {x})",
        "date_trunc('day', {x})",
        "extract(year FROM {x})",
        "extract(dow FROM {x})",
        "extract(doy FROM {x})",
        "extract(week FROM {x})",
        "quarter({x})",
        "dayofweek({x})",
        "date_diff('day', {x}, visit_day)",
        "date_diff('week', {x}, {y})",
        "date_diff('month', visit_day, {x})",
        "date_diff('year', {x}, {y})",
        "last_day({x})",
        "dayname({x})",
        "monthname({x})",
        "{x} + INTERVAL 1 DAY",
        "{x} - 1",
        "{x} - {y}",
        "({x} - visit_day) * 1000",
        "({y} - {x}) * ({x} - {y})",
        "-({x} - {y}) // 7",
        "CAST({x} - visit_day AS VARCHAR)",
        "date_diff('day', {x}, {y}) * 100000",
        "CAST({x} AS VARCHAR)",
    ],
}
VALUES = {"int": (INTS, "age"), "float": (FLOATS, "income"), "text": (TEXTS, "region"), "date": (DATES, "visit_day")}


def _cases() -> list[str]:
    out = []
    for kind, templates in TEMPLATES.items():
        hostile, benign = VALUES[kind]
        for template in templates:
            for i, value in enumerate(hostile):
                other = hostile[(i + 1) % len(hostile)]
                expr = template.format(x=_half(value, benign), y=_half(other, benign))
                out.append(f"SELECT COUNT(*) FROM visits WHERE CAST(({expr}) AS VARCHAR) IS NOT NULL")
    return out


CASES = _cases()


def _run(sql: str, engine: Any) -> tuple[str, list[Any]]:
    try:
        plan = plan_query(sql, lambda name: POLICY)
        bind_check(plan, engine)
    except QueryRejected as exc:
        return f"refused: {exc.reason}", []
    try:
        return "ran", [engine.rows(s) for s in comp.statements(plan)]
    except EngineError as exc:
        return f"FAILED on the rows: {exc.message}", []


def test_every_function_with_hostile_arguments_runs_or_is_refused_alike(engines: tuple[Any, Any]) -> None:
    duck, spark = engines
    ran = 0
    problems = []
    for sql in CASES:
        a, b = _run(sql, duck), _run(sql, spark)
        if a != b or a[0].startswith("FAILED"):
            problems.append((sql, a[0], b[0], a[1], b[1]))
        ran += a[0] == "ran"
    assert not problems, "\n".join(map(str, problems[:20])) + f"\n({len(problems)} in all)"
    assert ran > len(CASES) // 2  # most cases reach the engines: the test exercises them
