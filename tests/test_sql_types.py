"""Type errors in analyst SQL are 400s before the charge: each mismatch through the real in-process gateway is a
`query_rejected` naming the problem, highlighting the expression the analyst wrote, and nothing is spent.

Besides the demo `visits` and PUMS (integer codes), PUMS is registered a second time as `pums_cat` with `sex` and
`educ` declared as categories, as SmartNoise SQL's PUMS metadata has them: there `WHERE educ < 2` and
`HAVING sex > 2` compare text with numbers."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.service import Bastion, Context
from policies.errors import QueryRejected
from tests.conftest import ROLES, Workspace, build_workspace

PUMS_CAT = {
    "dataset": "pums_cat",
    "privacy_unit": "pid",
    "max_rows_per_unit": 1,
    "budget": {"per_principal": {"epsilon": 5.0, "delta": 1.0e-6}, "total": {"epsilon": 50.0, "delta": 1.0e-5}},
    "columns": {
        "pid": {"type": "int", "usage": "hidden"},
        "age": {"type": "int", "bounds": [0, 100]},
        "sex": {"type": "category", "domain": ["0", "1"]},
        "educ": {"type": "category", "domain": [str(i) for i in range(1, 17)]},
        "race": {"type": "category"},
        "income": {"type": "decimal", "bounds": [0, 500000], "precision": 1},
        "married": {"type": "bool"},
    },
    "roles": {"analyst": ["query"]},
}

# (sql, reason, the text the error must highlight)
MISMATCHES = [
    # the issue's own forms: a category compared with a number, in WHERE and in HAVING
    ("SELECT COUNT(*) FROM pums_cat WHERE educ < 2", "type_error", "educ < 2"),
    ("SELECT sex, COUNT(*) FROM pums_cat GROUP BY sex HAVING sex > 2", "type_error", "sex > 2"),
    ("SELECT educ, COUNT(*) AS n FROM pums_cat GROUP BY educ HAVING educ >= 12 AND n > 10", "type_error", "educ >= 12"),
    ("SELECT COUNT(*) FROM pums_cat WHERE educ IN (1, 2, 3)", "type_error", "educ IN (1, 2, 3)"),
    ("SELECT COUNT(*) FROM pums_cat WHERE educ BETWEEN 9 AND 12", "type_error", "educ BETWEEN 9 AND 12"),
    ("SELECT AVG(educ) FROM pums_cat", "aggregate_argument", "AVG(educ)"),
    # text vs number
    ("SELECT COUNT(*) FROM visits WHERE region = 1", "type_error", "region = 1"),
    ("SELECT COUNT(*) FROM visits WHERE age = '30'", "type_error", "age = '30'"),
    ("SELECT COUNT(*) FROM visits WHERE sex < 2", "type_error", "sex < 2"),
    ("SELECT sex, COUNT(*) FROM visits GROUP BY sex HAVING sex > 2", "type_error", "sex > 2"),
    ("SELECT diagnosis, COUNT(*) FROM visits GROUP BY diagnosis HAVING diagnosis > 1", "type_error", "diagnosis > 1"),
    ("SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex HAVING n > 'a'", "type_error", "n > 'a'"),
    ("SELECT COUNT(*) FROM visits WHERE year(visit_day) = '2020'", "type_error", "year(visit_day) = '2020'"),
    # date vs number, date vs text
    ("SELECT COUNT(*) FROM visits WHERE visit_day > 5", "type_error", "visit_day > 5"),
    ("SELECT COUNT(*) FROM visits WHERE visit_day = age", "type_error", "visit_day = age"),
    ("SELECT COUNT(*) FROM visits WHERE visit_day = 'south'", "type_error", "'south'"),
    ("SELECT COUNT(*) FROM visits WHERE age = DATE '2020-01-01'", "type_error", "age = DATE '2020-01-01'"),
    (
        "SELECT visit_day, COUNT(*) FROM visits GROUP BY visit_day HAVING visit_day > 3",
        "type_error",
        "visit_day > 3",
    ),
    ("SELECT COUNT(*) FROM visits WHERE CAST(visit_day AS INT) > 3", "type_error", "CAST(visit_day AS INT)"),
    ("SELECT COUNT(*) FROM visits WHERE CAST(age AS DATE) > DATE '2020-01-01'", "type_error", "CAST(age AS DATE)"),
    # boolean vs text or number
    ("SELECT COUNT(*) FROM pums WHERE married = 'yes'", "type_error", "married = 'yes'"),
    ("SELECT COUNT(*) FROM pums WHERE married = 1", "type_error", "married = 1"),
    ("SELECT married, COUNT(*) FROM pums GROUP BY married HAVING married = 'true'", "type_error", "married = 'true'"),
    ("SELECT age > 50 AS old, COUNT(*) FROM visits GROUP BY old HAVING old = 1", "type_error", "old = 1"),
    ("SELECT COUNT(*) FROM visits WHERE age = TRUE", "type_error", "age = TRUE"),
    ("SELECT COUNT(*) FROM visits WHERE TRUE = age", "type_error", "TRUE = age"),
    ("SELECT COUNT(*) FROM visits WHERE age IS NOT FALSE", "type_error", "age IS NOT FALSE"),
    ("SELECT COUNT(*) FROM visits WHERE region", "type_error", "region"),
    ("SELECT COUNT(*) FROM visits WHERE age > 3 AND region", "type_error", "region"),
    ("SELECT sex, COUNT(*) FROM visits GROUP BY sex HAVING COUNT(*)", "type_error", "COUNT(*)"),
    # arithmetic on categories, dates and booleans
    ("SELECT COUNT(*) FROM visits WHERE sex + 1 > 2", "type_error", "sex"),
    ("SELECT COUNT(*) FROM visits WHERE region * 2 > 2", "type_error", "region"),
    ("SELECT COUNT(*) FROM visits WHERE age / region = 1", "type_error", "region"),
    ("SELECT sex, COUNT(*) + sex AS n FROM visits GROUP BY sex", "type_error", "sex"),
    ("SELECT sex, COUNT(*) FROM visits GROUP BY sex ORDER BY sex + 1", "type_error", "sex"),
    ("SELECT COUNT(*) / 'a' FROM visits", "type_error", "'a'"),
    # functions with arguments of the wrong type
    ("SELECT COUNT(*) FROM visits WHERE sqrt(region) > 2", "type_error", "region"),
    ("SELECT COUNT(*) FROM visits WHERE length(age) > 2", "type_error", "age"),
    ("SELECT COUNT(*) FROM visits WHERE upper(age) = 'A'", "type_error", "age"),
    ("SELECT COUNT(*) FROM visits WHERE year(region) = 2020", "type_error", "region"),
    ("SELECT COUNT(*) FROM visits WHERE date_diff('day', age, visit_day) > 3", "type_error", "age"),
    ("SELECT COUNT(*) FROM visits WHERE substring(region, 'a', 2) = 'x'", "type_error", "'a'"),
    ("SELECT COUNT(*) FROM visits WHERE abs(sex) = 1", "type_error", "sex"),
    ("SELECT sex, COUNT(*) FROM visits GROUP BY sex HAVING ABS(sex) = 1", "type_error", "sex"),
    ("SELECT COUNT(*) FROM visits WHERE if(age, 1, 2) = 1", "type_error", "age"),
    # CASE, COALESCE and GREATEST branches of different types
    (
        "SELECT COUNT(*) FROM visits WHERE CASE WHEN age > 3 THEN 'a' ELSE 1 END = 'a'",
        "type_error",
        "CASE WHEN age > 3 THEN 'a' ELSE 1",
    ),
    (
        "SELECT COUNT(*) FROM visits WHERE CASE WHEN age > 3 THEN visit_day ELSE 1 END = 1",
        "type_error",
        "CASE WHEN age > 3 THEN visit_day ELSE 1",
    ),
    ("SELECT COUNT(*) FROM visits WHERE coalesce(age, 'x') = 1", "type_error", "coalesce(age, 'x')"),
    ("SELECT COUNT(*) FROM visits WHERE greatest(age, 'x') = 1", "type_error", "greatest(age, 'x')"),
    (
        "SELECT sex, CASE WHEN COUNT(*) > 3 THEN sex ELSE 1 END FROM visits GROUP BY sex",
        "type_error",
        "CASE WHEN COUNT(*) > 3 THEN sex ELSE 1",
    ),
    # IN lists and BETWEEN of mixed types
    ("SELECT COUNT(*) FROM visits WHERE age IN (1, 'a')", "type_error", "age IN (1, 'a')"),
    ("SELECT COUNT(*) FROM visits WHERE sex IN ('F', 2)", "type_error", "sex IN ('F', 2)"),
    ("SELECT COUNT(*) FROM pums WHERE married IN (TRUE, 'x')", "type_error", "married IN (TRUE, 'x')"),
    ("SELECT sex, COUNT(*) FROM visits GROUP BY sex HAVING COUNT(*) IN (1, 'a')", "type_error", "COUNT(*) IN (1, 'a')"),
    ("SELECT COUNT(*) FROM visits WHERE age BETWEEN 1 AND 'b'", "type_error", "age BETWEEN 1 AND 'b'"),
    ("SELECT COUNT(*) FROM visits WHERE visit_day BETWEEN 1 AND 2", "type_error", "visit_day BETWEEN 1 AND 2"),
    # LIKE on numbers, dates and booleans
    ("SELECT COUNT(*) FROM visits WHERE age LIKE '3%'", "type_error", "age"),
    ("SELECT COUNT(*) FROM visits WHERE visit_day LIKE '2020%'", "type_error", "visit_day"),
    ("SELECT COUNT(*) FROM pums WHERE married LIKE 't%'", "type_error", "married"),
    # aggregates of text, categories, dates and booleans
    ("SELECT SUM(region) FROM visits", "aggregate_argument", "SUM(region)"),
    ("SELECT AVG(visit_day) FROM visits", "aggregate_argument", "AVG(visit_day)"),
    ("SELECT SUM(married) FROM pums", "aggregate_argument", "SUM(married)"),
    ("SELECT MEDIAN(region) FROM visits", "aggregate_argument", "MEDIAN(region)"),
    ("SELECT VAR(diagnosis) FROM visits", "aggregate_argument", "VAR(diagnosis)"),
    ("SELECT STDDEV_SAMP(sex) FROM visits", "aggregate_argument", "STDDEV_SAMP(sex)"),
]


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, demo_source: tuple[Path, Path], pums_source: tuple[Path, Path]
) -> Iterator[tuple[Bastion, Context]]:
    root = tmp_path_factory.mktemp("types")
    data, policy = demo_source
    pdata, ppolicy = pums_source
    cat = root / "pums_cat.yaml"
    cat.write_text(yaml.safe_dump(PUMS_CAT))
    ws: Workspace = build_workspace(root, [(policy, data), (ppolicy, pdata), (cat, pdata)], ROLES)
    bastion = Bastion(ws.settings)
    try:
        yield bastion, Context(bastion.authenticate(ws.tokens["analyst"]))
    finally:
        bastion.close()


def _spent(bastion: Bastion, ctx: Context) -> dict[str, tuple[float, float]]:
    return {b["dataset"]: (b["spent"]["epsilon"], b["spent"]["delta"]) for b in bastion.budgets(ctx)}


@pytest.mark.parametrize(("sql", "reason", "highlight"), MISMATCHES, ids=[m[0][:70] for m in MISMATCHES])
def test_a_type_error_is_refused_before_the_charge(
    gateway: tuple[Bastion, Context], sql: str, reason: str, highlight: str
) -> None:
    bastion, ctx = gateway
    before = _spent(bastion, ctx)
    with pytest.raises(QueryRejected) as info:
        bastion.query(ctx, sql, epsilon=0.5)
    err = info.value
    assert (err.status, err.code, err.reason) == (400, "query_rejected", reason), err.message
    assert err.details.get("highlight") == highlight, err.message
    # The message names the types or the kind of value involved.
    assert any(word in err.message for word in ("text", "integer", "number", "date", "bool", "category", "condition"))
    assert _spent(bastion, ctx) == before


def test_the_categorical_pums_answers_when_categories_are_compared_with_quoted_codes(
    gateway: tuple[Bastion, Context],
) -> None:
    """The allowed alternative the refusal names (a quoted code) is answered, and charged."""
    bastion, ctx = gateway
    before = _spent(bastion, ctx)["pums_cat"][0]
    body = bastion.query(
        ctx, "SELECT sex, COUNT(*) AS n FROM pums_cat WHERE educ IN ('1', '2') GROUP BY sex", epsilon=0.5
    )
    assert sorted(r[0] for r in body["rows"]) == ["0", "1"]
    assert math.isclose(_spent(bastion, ctx)["pums_cat"][0], before + 0.5)


def test_date_plus_days_runs_on_the_engine(gateway: tuple[Bastion, Context]) -> None:
    """A date plus an integer number of days is typed as a date and runs (the engine has no DATE + BIGINT: the
    days are an INTEGER), in WHERE, as a key and over a released key."""
    bastion, ctx = gateway
    for sql in (
        "SELECT COUNT(*) FROM visits WHERE visit_day + 3 > DATE '2020-01-01'",
        "SELECT COUNT(*) FROM visits WHERE visit_day - length_of_stay > DATE '2020-01-01'",
        "SELECT date_trunc('year', visit_day) AS y, COUNT(*) FROM visits GROUP BY y HAVING y + 1 > DATE '2020-01-01'",
    ):
        body = bastion.query(ctx, sql, epsilon=0.01)
        assert body["rows"] and body["epsilon_spent"] == 0.01


def test_over_http_a_type_error_is_a_400_with_its_position(workspace: Workspace) -> None:
    sql = "SELECT sex, COUNT(*) AS n\nFROM visits GROUP BY sex\nHAVING sex > 2"
    with workspace.app() as c:
        h = workspace.headers("analyst")
        r = c.post("/v1/query", json={"sql": sql, "epsilon": 1}, headers=h)
        budget = c.get("/v1/budget", headers=h).json()
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["code"], err["reason"]) == ("query_rejected", "type_error")
    assert (err["line"], err["column"], err["highlight"]) == (3, 8, "sex > 2")
    assert "cannot compare text with integer" in err["message"]
    assert all(b["spent"]["epsilon"] == 0.0 for b in budget)


def test_rounding_an_integer_stays_an_integer_on_the_engine(gateway: tuple[Bastion, Context]) -> None:
    """FLOOR and CEIL of an integer column are typed as integers, and so run as integers: DuckDB's own FLOOR of an
    integer is a DOUBLE, which a bitwise operator (integers only) failed to bind after the checker had accepted it
    (a 400 engine_rejected with no span). Each of these binds, answers and is charged."""
    bastion, ctx = gateway
    for sql in (
        "SELECT COUNT(FLOOR(age) | 3) FROM visits",
        "SELECT COUNT(CEIL(length_of_stay) & 1) FROM visits",
        "SELECT COUNT(ROUND(age, -1) | 2), COUNT(TRUNC(age) | 1) FROM visits",
        "SELECT FLOOR(age) & 64 AS old, COUNT(*) FROM visits GROUP BY old",
        "SELECT SUM(FLOOR(age)), AVG(CEIL(length_of_stay)) FROM visits",
    ):
        before = _spent(bastion, ctx)["visits"][0]
        body = bastion.query(ctx, sql, epsilon=0.01)
        assert body["rows"] and body["epsilon_spent"] == 0.01, sql
        assert math.isclose(_spent(bastion, ctx)["visits"][0], before + 0.01), sql


def test_a_bitwise_operator_on_a_double_is_a_type_error_with_its_span(gateway: tuple[Bastion, Context]) -> None:
    """FLOOR of a real number is a real number (DOUBLE on the engines): `|` takes integers, so the checker refuses
    it before the charge, pointing at the operand, and says how to make it an integer."""
    bastion, ctx = gateway
    before = _spent(bastion, ctx)
    with pytest.raises(QueryRejected) as info:
        bastion.query(ctx, "SELECT COUNT(FLOOR(age / 2) | 3) FROM visits", epsilon=0.5)
    err = info.value
    assert (err.status, err.reason) == (400, "type_error"), err.message
    assert err.details.get("highlight") == "FLOOR(age / 2)", err.message
    assert "integer" in err.message
    assert _spent(bastion, ctx) == before
