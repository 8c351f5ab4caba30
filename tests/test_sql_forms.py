"""Spellings and forms of the common DP SQL dialects, read into the plans Bastion already makes, and refusals that
point at the real problem (the whole join or subquery, the function that is not an aggregate, the DP clause)."""

from __future__ import annotations

import pytest
import yaml

from gateway.demo import POLICY_YAML
from gateway.sql.plan import Kind, Measurement, Plan, plan_query
from gateway.sql.price import price
from policies.errors import QueryRejected
from policies.schema import parse_policy
from tests.conftest import Workspace
from tests.test_planner_corpus import resolve


def _plan(sql: str) -> Plan:
    return plan_query(sql, resolve)


def _refusal(sql: str) -> QueryRejected:
    with pytest.raises(QueryRejected) as info:
        plan_query(sql, resolve)
    return info.value


def _aggregates(plan: Plan) -> list[tuple[Kind, str, float]]:
    return [(a.kind, a.column, a.q) for a in plan.aggregates]


@pytest.mark.parametrize(
    ("spelled", "plain"),
    [
        ("SELECT VAR(age), STD(age) FROM visits", "SELECT VARIANCE(age), STDDEV(age) FROM visits"),
        ("SELECT VAR_SAMP(age), STDDEV_SAMP(age) FROM visits", "SELECT VARIANCE(age), STDDEV(age) FROM visits"),
        ("SELECT VARP(income), STDEVP(income) FROM visits", "SELECT VAR_POP(income), STDDEV_POP(income) FROM visits"),
        ("SELECT STDEV(age) FROM visits", "SELECT STDDEV(age) FROM visits"),
        ("SELECT COUNT_BIG(*) FROM visits", "SELECT COUNT(*) FROM visits"),
        (
            "SELECT ANON_COUNT(*), ANON_SUM(income), ANON_AVG(age) FROM visits",
            "SELECT COUNT(*), SUM(income), AVG(age) FROM visits",
        ),
        (
            "SELECT ANON_VAR_POP(age), ANON_STDDEV_POP(age) FROM visits",
            "SELECT VAR_POP(age), STDDEV_POP(age) FROM visits",
        ),
        ("SELECT ANON_PERCENTILE_CONT(age, 0.5) FROM visits", "SELECT MEDIAN(age) FROM visits"),
    ],
)
def test_a_spelling_plans_as_the_aggregate_it_names(spelled: str, plain: str) -> None:
    a, b = _plan(spelled), _plan(plain)
    assert _aggregates(a) == _aggregates(b)
    assert a.measurements == b.measurements


def test_var_of_a_column_is_no_longer_an_unaggregated_column_and_an_unknown_function_names_itself() -> None:
    assert _aggregates(_plan("SELECT VAR(age) FROM visits")) == [(Kind.VAR, "age", 0.0)]
    err = _refusal("SELECT region, FOO(age) FROM visits GROUP BY region")
    assert err.reason == "unsupported_aggregate" and err.details["highlight"] == "FOO(age)"
    assert "FOO()" in err.message and "'age'" not in err.message and "VAR" in err.message


def test_count_of_the_privacy_unit_is_a_count_of_rows_priced_like_count_star() -> None:
    plan = _plan("SELECT COUNT(patient_id), COUNT(*) FROM visits")
    assert set(plan.measurements) == {Measurement(Kind.COUNT_STAR), Measurement(Kind.COUNT, "patient_id")}
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None)
    assert pricing.d_in[Measurement(Kind.COUNT, "patient_id")] == pricing.d_in[Measurement(Kind.COUNT_STAR)]
    # Anything else with the unit is still refused.
    assert _refusal("SELECT SUM(patient_id) FROM visits").reason == "privacy_unit_column"
    assert _refusal("SELECT COUNT(*) FROM visits WHERE patient_id > 3").reason == "privacy_unit_column"


def test_top_is_a_limit_and_without_order_by_says_so() -> None:
    top = _plan("SELECT TOP 2 region, COUNT(*) AS n FROM visits GROUP BY region ORDER BY n DESC")
    limit = _plan("SELECT region, COUNT(*) AS n FROM visits GROUP BY region ORDER BY n DESC LIMIT 2")
    assert top.normalized_sql == limit.normalized_sql  # the same request, cached as one
    assert top.post.args["limit"].expression.this == "2" and top.warnings == []
    loose = _plan("SELECT TOP (3) region, COUNT(*) FROM visits GROUP BY region")
    assert len(loose.warnings) == 1 and "TOP 3 without ORDER BY" in loose.warnings[0]
    both = _refusal("SELECT TOP 2 region, COUNT(*) FROM visits GROUP BY region LIMIT 2")
    assert both.reason == "bad_limit" and both.details["highlight"] == "TOP 2"
    percent = _refusal("SELECT TOP 10 PERCENT region, COUNT(*) FROM visits GROUP BY region")
    assert percent.reason == "bad_limit" and "PERCENT" in percent.message


def test_table_aliases_and_the_dataset_name_qualify_columns() -> None:
    plain = _plan("SELECT region, AVG(income) FROM visits WHERE age > 30 GROUP BY region")
    for sql in (
        "SELECT v.region, AVG(v.income) FROM visits v WHERE v.age > 30 GROUP BY v.region",
        "SELECT v.region, AVG(income) FROM visits AS v WHERE age > 30 GROUP BY region",
        "SELECT visits.region, AVG(visits.income) FROM visits WHERE visits.age > 30 GROUP BY region",
        "SELECT region, AVG(income) FROM visits.visits WHERE visits.age > 30 GROUP BY visits.region",
    ):
        plan = _plan(sql)
        assert plan.where is not None and plain.where is not None
        assert plan.where.sql() == plain.where.sql()
        assert [k.tree.sql() for k in plan.keys] == [k.tree.sql() for k in plain.keys]
        assert _aggregates(plan) == _aggregates(plain)
    err = _refusal("SELECT COUNT(*) FROM visits v WHERE w.age > 3")
    assert err.reason == "unknown_table" and err.details["highlight"] == "w.age"


def test_a_schema_qualifier_is_the_dataset_itself() -> None:
    assert _plan("SELECT COUNT(*) FROM PUMS.PUMS").dataset == "pums"
    err = _refusal("SELECT COUNT(*) FROM public.visits")
    assert err.reason == "unknown_schema" and err.details["highlight"] == "public.visits"
    assert "FROM visits" in err.message
    assert _refusal("SELECT COUNT(*) FROM main.bounded_visits").reason == "system_catalog"
    assert _refusal("SELECT COUNT(*) FROM information_schema.tables").reason == "system_catalog"


@pytest.mark.parametrize(
    ("sql", "reason", "highlight"),
    [
        ("SELECT COUNT(*) FROM visits a JOIN visits b ON a.age = b.age", "join", "JOIN visits b ON a.age = b.age"),
        ("SELECT COUNT(*) FROM visits CROSS JOIN UNNEST([1,2,3]) as x", "join", "CROSS JOIN UNNEST([1,2,3]) as x"),
        ("SELECT COUNT(*) FROM visits v CROSS JOIN UNNEST([1, 2])", "join", "CROSS JOIN UNNEST([1, 2])"),
        (  # a public-groups list is joined by a RIGHT OUTER JOIN (gateway/sql/groups.py); a FULL one is a join
            "SELECT COUNT(*) FROM visits v FULL OUTER JOIN (SELECT 'north' AS region) g ON v.region = g.region",
            "join",
            "FULL OUTER JOIN (SELECT 'north' AS region) g ON v.region = g.region",
        ),
        ("SELECT COUNT(*) FROM (SELECT * FROM visits) AS t", "subquery", "(SELECT * FROM visits) AS t"),
        (
            "SELECT n, COUNT(*) FROM (SELECT region, COUNT(*) AS n FROM visits GROUP BY region) GROUP BY n",
            "subquery",
            "(SELECT region, COUNT(*) AS n FROM visits GROUP BY region)",
        ),
        (
            "SELECT COUNT(*) FROM visits WHERE age > (SELECT AVG(age) FROM visits)",
            "subquery",
            "(SELECT AVG(age) FROM visits)",
        ),
        (
            "SELECT COUNT(*) FROM visits WHERE region IN (SELECT region FROM visits)",
            "subquery",
            "(SELECT region FROM visits)",
        ),
        ("SELECT (SELECT COUNT(*) FROM visits) FROM visits", "subquery", "(SELECT COUNT(*) FROM visits)"),
        ("SELECT COUNT(*) FROM visits WHERE age IN (1, 'a')", "type_error", "age IN (1, 'a')"),
    ],
)
def test_a_refusal_highlights_the_whole_join_or_subquery(sql: str, reason: str, highlight: str) -> None:
    err = _refusal(sql)
    assert (err.reason, err.details["highlight"]) == (reason, highlight)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT region AS r, age AS a, COUNT(*) AS n FROM visits GROUP BY r",
        "SELECT region AS r, age, COUNT(*) AS n FROM visits GROUP BY r ORDER BY n",
        "SELECT age AS a, COUNT(*) FROM visits",
        "SELECT region, COUNT(*) AS n FROM visits GROUP BY region HAVING n > 3 AND age > 3",
    ],
)
def test_a_column_neither_grouped_nor_aggregated_is_named_with_aliases_around(sql: str) -> None:
    err = _refusal(sql)
    assert err.reason == "non_aggregated_column" and err.details["highlight"] == "age"
    assert "'age' must be aggregated or be a GROUP BY key" in err.message


def test_zetasql_privacy_parameters_are_refused_with_what_to_do_instead() -> None:
    err = _refusal("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS(epsilon=1, delta=1e-5) COUNT(*) FROM visits")
    assert err.reason == "dp_clause"
    assert err.details["highlight"] == "WITH DIFFERENTIAL_PRIVACY OPTIONS(epsilon=1, delta=1e-5)"
    assert "epsilon" in (err.details.get("hint") or "")
    err = _refusal("SELECT region, ANON_SUM(income CLAMPED BETWEEN 0 AND 1000) FROM visits GROUP BY region")
    assert (err.reason, err.details["highlight"]) == ("query_bounds", "CLAMPED BETWEEN 0 AND 1000")
    assert "policy" in err.message


def test_an_output_name_wins_over_a_column_in_having_and_order_by(workspace: Workspace) -> None:
    """`age` is the count here, not the column (which is neither grouped nor aggregated): the filter keeps every
    group for a bound no count can reach, and none for one every count exceeds."""
    sql = "SELECT sex, COUNT(*) AS age FROM visits GROUP BY sex HAVING age {} ORDER BY age DESC"
    with workspace.app() as c:
        h = workspace.headers("analyst")
        kept = c.post("/v1/query", json={"sql": sql.format("> -1000000000"), "epsilon": 1}, headers=h).json()
        none = c.post("/v1/query", json={"sql": sql.format("> 1000000000"), "epsilon": 1}, headers=h).json()
    assert sorted(r[0] for r in kept["rows"]) == ["F", "M", "X"] and none["rows"] == []
    counts = [r[1] for r in kept["rows"]]
    assert counts == sorted(counts, reverse=True)


def test_a_column_named_like_a_dialect_keyword_is_still_a_column() -> None:
    """`CLAMPED BETWEEN` and `contribution_bounds_per_group` are ZetaSQL's bounds only where ZetaSQL puts them."""
    spec = yaml.safe_load(POLICY_YAML)
    spec["columns"]["clamped"] = {"type": "int", "bounds": [0, 10]}
    spec["columns"]["contribution_bounds_per_group"] = {"type": "int", "bounds": [0, 10]}
    policy = parse_policy(spec)
    for sql in (
        "SELECT COUNT(*) FROM visits WHERE clamped BETWEEN 1 AND 2",
        "SELECT COUNT(*) FROM visits WHERE age > 3 AND (clamped BETWEEN 1 AND 2)",
        "SELECT SUM(contribution_bounds_per_group) FROM visits WHERE contribution_bounds_per_group > 1",
    ):
        assert plan_query(sql, lambda name: policy).aggregates


def test_output_names_of_earlier_items_are_usable_later_in_the_select_list() -> None:
    plan = _plan("SELECT COUNT(*) AS n, n * 2 AS twice, SUM(income) / n AS mean FROM visits")
    assert _aggregates(plan) == [(Kind.COUNT_STAR, "", 0.0), (Kind.SUM, "income", 0.0)]
    assert [o.sql() for o in plan.output_exprs] == ['"a0"', '"a0" * 2', '"a1" / "a0"']
    early = _refusal("SELECT n * 2, COUNT(*) AS n FROM visits")
    assert early.reason == "unknown_column" and "before the item that defines it" in early.message
    assert early.details["highlight"] == "n"
    # A column of the same name keeps its meaning.
    assert _refusal("SELECT COUNT(*) AS age, age FROM visits").reason == "non_aggregated_column"
