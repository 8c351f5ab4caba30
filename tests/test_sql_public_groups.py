"""Public group lists written in the query (ZetaSQL's public-groups join): the accepted forms release exactly the
listed keys (empty ones with noise, unlisted ones not at all) with no key selection and no δ, the compiled
statement reads only the rows of listed keys, and every malformed list or other join is refused with its reason and
span before anything is charged."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from gateway.demo import POLICY_YAML, generate_visits
from gateway.engines.duckdb import DuckDBEngine
from gateway.service import Bastion, Context
from gateway.settings import Settings
from gateway.sql import compile as comp
from gateway.sql.groups import MAX_LISTED_GROUPS
from gateway.sql.plan import Plan, plan_query
from gateway.sql.release import bind_check
from policies.errors import QueryRejected
from policies.schema import parse_policy
from policies.sqltypes import canonical
from tests.conftest import ROLES, Workspace, build_workspace

POLICY = parse_policy(yaml.safe_load(POLICY_YAML))  # region: a category of 5 public values; diagnosis: no domain
LISTED = ["mars", "north", "south"]  # 'mars' is outside the policy's domain of region: released all the same

# Every accepted spelling of "count the visits of these regions", with the keys it lists.
FORMS = [
    # ZetaSQL's own form: a SELECT DISTINCT subquery, RIGHT OUTER JOIN, ON with the dataset's alias
    "SELECT g.region, COUNT(*) FROM visits v RIGHT OUTER JOIN (SELECT DISTINCT region FROM UNNEST(['north', "
    "'south', 'mars']) AS region) g ON v.region = g.region GROUP BY g.region",
    # USING, no alias on the list (ZetaSQL's `right outer join (select distinct ...) using (col)`)
    "SELECT region, COUNT(*) FROM visits RIGHT JOIN (SELECT DISTINCT region FROM UNNEST(['north', 'south', "
    "'mars'])AS region) USING (region) GROUP BY region",
    # UNION ALL of literal SELECTs, equality the other way round
    "SELECT public_groups.region, COUNT(*) FROM visits RIGHT OUTER JOIN (SELECT 'north' AS region UNION ALL "
    "SELECT 'south' UNION ALL SELECT 'mars' UNION ALL SELECT 'north') public_groups ON public_groups.region = "
    "visits.region GROUP BY public_groups.region",
    # VALUES
    "SELECT g.r, COUNT(*) FROM visits RIGHT JOIN (VALUES ('north'), ('south'), ('mars')) AS g(r) ON region = g.r "
    "GROUP BY g.r",
    # the list on the left of a LEFT OUTER JOIN
    "SELECT r, COUNT(*) FROM (SELECT DISTINCT r FROM UNNEST(['mars', 'south', 'north']) AS r) LEFT OUTER JOIN "
    "visits ON r = region GROUP BY r",
    # UNNEST joined directly, GROUP BY an ordinal
    "SELECT g.r, COUNT(*) FROM visits RIGHT JOIN UNNEST(['north', 'south', 'mars']) AS g(r) ON g.r = region GROUP BY 1",
]


def _plan(sql: str) -> Plan:
    return plan_query(sql, lambda _: POLICY)


@pytest.mark.parametrize("sql", FORMS)
def test_each_form_declares_exactly_the_listed_keys(sql: str) -> None:
    plan = _plan(sql)
    (key,) = plan.keys
    assert key.domain == LISTED and not plan.needs_key_selection
    assert plan.declared_groups() == [(r,) for r in LISTED]
    assert plan.where is not None  # the rows of unlisted keys are filtered out
    assert plan.output_names[0] in ("region", "r")


def test_a_key_without_a_public_domain_and_a_row_expression_can_be_listed() -> None:
    plan = _plan(
        "SELECT g.d, COUNT(*) FROM visits RIGHT JOIN (VALUES ('I21'), ('J45')) AS g(d) ON g.d = diagnosis GROUP BY g.d"
    )
    assert plan.keys[0].domain == ["I21", "J45"] and not plan.needs_key_selection
    # ZetaSQL's days-of-the-week example: GENERATE_ARRAY, and the dataset's side a row expression
    plan = _plan(
        "SELECT dow, COUNT(*) FROM visits RIGHT OUTER JOIN (SELECT DISTINCT dow FROM UNNEST(GENERATE_ARRAY(0, 6)) "
        "AS dow) ON dow = dayofweek(visit_day) GROUP BY dow"
    )
    assert plan.keys[0].domain == list(range(7)) and not plan.needs_key_selection
    plan = _plan(
        "SELECT g.day, COUNT(*) FROM visits RIGHT JOIN (VALUES (DATE '2020-01-01'), ('2020-01-02')) AS g(day) "
        "ON g.day = visit_day GROUP BY g.day"
    )
    assert plan.keys[0].domain == [dt.date(2020, 1, 1), dt.date(2020, 1, 2)]
    plan = _plan("SELECT g.x, COUNT(*) FROM visits RIGHT JOIN (VALUES (1.5), (2)) AS g(x) ON g.x = income GROUP BY 1")
    assert plan.keys[0].domain == [1.5, 2.0]


def test_two_lists_and_a_listed_key_with_a_selected_one() -> None:
    plan = _plan(
        "SELECT g.r, h.s, COUNT(*) FROM visits v RIGHT JOIN (VALUES ('north'), ('mars')) AS g(r) ON g.r = v.region "
        "RIGHT JOIN (VALUES ('F')) AS h(s) ON h.s = v.sex GROUP BY g.r, h.s"
    )
    assert plan.declared_groups() == [("mars", "F"), ("north", "F")]
    # With a key of no public domain, the groups are selected (δ), among the rows of listed keys only.
    plan = _plan(
        "SELECT g.r, diagnosis, COUNT(*) FROM visits RIGHT JOIN (VALUES ('north')) AS g(r) ON g.r = region "
        "GROUP BY g.r, diagnosis"
    )
    assert plan.needs_key_selection and plan.where is not None and "north" in plan.where.sql()


def test_the_lists_are_part_of_what_the_query_asks() -> None:
    """Two queries that differ only by their lists are different queries (the release cache keys on this)."""
    a = _plan("SELECT g.r, COUNT(*) FROM visits RIGHT JOIN (VALUES ('north')) AS g(r) ON g.r = region GROUP BY 1")
    b = _plan("SELECT g.r, COUNT(*) FROM visits RIGHT JOIN (VALUES ('south')) AS g(r) ON g.r = region GROUP BY 1")
    assert a.normalized_sql != b.normalized_sql


# --- on the engine -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def duck(tmp_path_factory: pytest.TempPathFactory) -> DuckDBEngine:
    root = tmp_path_factory.mktemp("public_groups")
    source = root / "visits.parquet"
    pq.write_table(generate_visits(5_000, seed=3), source)
    settings = Settings(workspace=root)
    engine = DuckDBEngine(settings.database, settings.bounding_key, read_only=False)
    engine.register(POLICY, source)
    return engine


@pytest.mark.parametrize("sql", FORMS[:1] + FORMS[4:5])
def test_the_statement_reads_the_rows_of_listed_keys_only(sql: str, duck: DuckDBEngine) -> None:
    plan = _plan(sql)
    bind_check(plan, duck)
    rows = duck.rows(comp.measurement_query(plan))
    counts = {canonical(r[0], plan.keys[0].typed.type): int(r[1]) for r in rows}
    # The filter is an aggregate FILTER, as WHERE is (every row is read whatever matches): the other regions' groups
    # count no row, and 'mars' has none at all.
    assert {k for k, n in counts.items() if n} == {"north", "south"}
    exact = _plan("SELECT region, COUNT(*) FROM visits WHERE region IN ('north', 'south') GROUP BY region")
    assert {k: n for k, n in counts.items() if n} == {
        r[0]: int(r[1]) for r in duck.rows(comp.measurement_query(exact)) if r[1]
    }


# --- through the gateway ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, demo_source: tuple[Path, Path]
) -> Iterator[tuple[Bastion, Context]]:
    root = tmp_path_factory.mktemp("public_groups_gateway")
    data, policy = demo_source
    ws: Workspace = build_workspace(root, [(policy, data)], ROLES)
    bastion = Bastion(ws.settings)
    try:
        yield bastion, Context(bastion.authenticate(ws.tokens["analyst"]))
    finally:
        bastion.close()


def _spent(bastion: Bastion, ctx: Context) -> tuple[float, float]:
    (b,) = [b for b in bastion.budgets(ctx) if b["dataset"] == "visits"]
    return b["spent"]["epsilon"], b["spent"]["delta"]


def test_the_listed_keys_are_released_exactly_with_noise_and_no_delta(gateway: tuple[Bastion, Context]) -> None:
    bastion, ctx = gateway
    before = _spent(bastion, ctx)
    body = bastion.query(ctx, FORMS[0], epsilon=1.0)
    assert [r[0] for r in body["rows"]] == LISTED  # exactly the listed keys: 'mars' present, 'east' absent
    assert body["delta_spent"] == 0.0 and not any("selected" in n for n in body["notes"])
    (m,) = body["measurements"]
    assert m["mechanism"] == "discrete_laplace" and m["sensitivity"] == POLICY.max_rows_per_unit
    # 'mars' has no row: its count is the noise alone (discrete Laplace of scale k/ε, beyond 60 scales with
    # probability e^-60); it is flagged as dominated by the noise.
    scale = POLICY.max_rows_per_unit / 1.0
    mars = body["rows"][0][1]
    assert 0.0 <= mars <= 60 * scale and "noise_dominated" in body["flags"][0][1]
    assert body["rows"][1][1] > 60 * scale  # 'north' holds thousands of rows
    after = _spent(bastion, ctx)
    assert math.isclose(after[0], before[0] + 1.0) and after[1] == before[1]


def test_the_listed_keys_with_other_aggregates(gateway: tuple[Bastion, Context]) -> None:
    bastion, ctx = gateway
    sql = (
        "SELECT g.r AS region, COUNT(*) AS n, AVG(age) AS mean_age FROM visits RIGHT JOIN (VALUES ('north'), "
        "('west')) AS g(r) ON g.r = region WHERE sex = 'F' GROUP BY g.r HAVING COUNT(*) > 0 ORDER BY region DESC"
    )
    body = bastion.query(ctx, sql, epsilon=1.0)
    assert body["columns"] == ["region", "n", "mean_age"]
    assert [r[0] for r in body["rows"]] == ["west", "north"]
    assert all(0 <= r[2] <= 110 for r in body["rows"])


# (sql, reason, the text the error highlights)
REFUSALS = [
    # ZetaSQL has no CROSS JOIN UNNEST form of public groups (and it would drop the empty groups)
    (
        "SELECT g.x, COUNT(*) FROM visits CROSS JOIN UNNEST([1, 2, 3]) AS g(x) WHERE age = g.x GROUP BY g.x",
        "join",
        "CROSS JOIN UNNEST([1, 2, 3]) AS g(x)",
    ),
    (
        "SELECT g.x, COUNT(*) FROM visits INNER JOIN (VALUES (1), (2)) AS g(x) ON g.x = age GROUP BY g.x",
        "join",
        "INNER JOIN (VALUES (1), (2)) AS g(x) ON g.x = age",
    ),
    (
        "SELECT g.x, COUNT(*) FROM visits FULL OUTER JOIN (VALUES (1)) AS g(x) ON g.x = age GROUP BY g.x",
        "join",
        "FULL OUTER JOIN (VALUES (1)) AS g(x) ON g.x = age",
    ),
    (
        "SELECT g.x, COUNT(*) FROM visits LEFT JOIN (VALUES (1)) AS g(x) ON g.x = age GROUP BY g.x",
        "join",
        "LEFT JOIN (VALUES (1)) AS g(x) ON g.x = age",
    ),
    ("SELECT COUNT(*) FROM visits a JOIN visits b ON a.age = b.age", "join", "JOIN visits b ON a.age = b.age"),
    # a list that reads a dataset, or holds something other than literals
    (
        "SELECT g.region, COUNT(*) FROM visits RIGHT JOIN (SELECT DISTINCT region FROM visits) AS g "
        "ON g.region = visits.region GROUP BY g.region",
        "public_groups",
        "visits",
    ),
    (
        "SELECT g.x, COUNT(*) FROM visits RIGHT JOIN (VALUES (NULL), ('north')) AS g(x) ON g.x = region GROUP BY 1",
        "public_groups",
        "NULL",
    ),
    (
        "SELECT g.x, COUNT(*) FROM visits RIGHT JOIN (VALUES (upper('a'))) AS g(x) ON g.x = region GROUP BY 1",
        "public_groups",
        "upper('a')",
    ),
    # the join condition
    (
        "SELECT g.x, COUNT(*) FROM visits RIGHT JOIN (VALUES ('F')) AS g(x) ON g.x = sex AND age > 3 GROUP BY 1",
        "public_groups",
        "g.x = sex AND age > 3",
    ),
    (
        "SELECT g.x, COUNT(*) FROM visits RIGHT JOIN (VALUES ('F')) AS g(x) ON g.x = patient_id GROUP BY 1",
        "privacy_unit_column",
        "patient_id",
    ),
    # not grouped by the listed column
    (
        "SELECT COUNT(*) FROM visits RIGHT JOIN (VALUES ('F')) AS g(x) ON g.x = sex",
        "public_groups",
        "(VALUES ('F')) AS g(x)",
    ),
    # a value of another type than the key's
    (
        "SELECT g.x, COUNT(*) FROM visits RIGHT JOIN (VALUES (1), ('two')) AS g(x) ON g.x = age GROUP BY 1",
        "type_error",
        "'two'",
    ),
    (
        "SELECT g.x, COUNT(*) FROM visits RIGHT JOIN (VALUES (1.5)) AS g(x) ON g.x = age GROUP BY 1",
        "type_error",
        "1.5",
    ),
    (
        "SELECT g.x, COUNT(*) FROM visits RIGHT JOIN (VALUES (3)) AS g(x) ON g.x = region GROUP BY 1",
        "type_error",
        "3",
    ),
    (
        "SELECT g.x, COUNT(*) FROM visits RIGHT JOIN (VALUES ('someday')) AS g(x) ON g.x = visit_day GROUP BY 1",
        "type_error",
        "'someday'",
    ),
    # more groups than Bastion enumerates, more values than a query lists, or none
    (
        "SELECT g.x, COUNT(*) FROM visits RIGHT JOIN UNNEST(GENERATE_ARRAY(1, 600)) AS g(x) ON g.x = age RIGHT JOIN "
        "UNNEST(GENERATE_ARRAY(0, 599)) AS h(y) ON h.y = length_of_stay GROUP BY 1, h.y",
        "public_groups",
        "GENERATE_ARRAY(1, 600)",
    ),
    (
        "SELECT g.x, COUNT(*) FROM visits RIGHT JOIN UNNEST(GENERATE_ARRAY(1, 200000)) AS g(x) ON g.x = age GROUP BY 1",
        "public_groups",
        "GENERATE_ARRAY(1, 200000)",
    ),
    (
        "SELECT g.x, COUNT(*) FROM visits RIGHT JOIN UNNEST(GENERATE_ARRAY(5, 1)) AS g(x) ON g.x = age GROUP BY 1",
        "public_groups",
        "GENERATE_ARRAY(5, 1)",
    ),
    (
        "SELECT g.x, COUNT(*) FROM visits RIGHT JOIN (SELECT DISTINCT x FROM UNNEST(GENERATE_ARRAY(0, 400)) AS x) g "
        "ON g.x = age RIGHT JOIN (SELECT DISTINCT y FROM UNNEST(GENERATE_ARRAY(1, 250)) AS y) h ON h.y = "
        "length_of_stay GROUP BY g.x, h.y",  # 401 × 250 groups: more than MAX_DECLARED_GROUPS
        "public_groups",
        "GENERATE_ARRAY(0, 400)",
    ),
]


@pytest.mark.parametrize(("sql", "reason", "highlight"), REFUSALS, ids=[r[0][:60] for r in REFUSALS])
def test_refusals_have_their_reason_and_span_and_charge_nothing(
    gateway: tuple[Bastion, Context], sql: str, reason: str, highlight: str
) -> None:
    bastion, ctx = gateway
    before = _spent(bastion, ctx)
    with pytest.raises(QueryRejected) as info:
        bastion.query(ctx, sql, epsilon=0.5)
    err = info.value
    assert (err.status, err.code, err.reason) == (400, "query_rejected", reason), err.message
    assert err.details.get("highlight") == highlight, err.message
    assert _spent(bastion, ctx) == before


def test_a_query_lists_up_to_the_limit() -> None:
    plan = _plan(
        f"SELECT g.x, COUNT(*) FROM visits RIGHT JOIN UNNEST(GENERATE_ARRAY(1, {MAX_LISTED_GROUPS})) AS g(x) "
        "ON g.x = FLOOR(income) GROUP BY 1"
    )
    assert plan.keys[0].domain == list(range(1, MAX_LISTED_GROUPS + 1))


def test_a_refused_join_names_the_public_groups_form() -> None:
    for sql in (REFUSALS[0][0], REFUSALS[1][0]):
        with pytest.raises(QueryRejected) as info:
            _plan(sql)
        assert "RIGHT OUTER JOIN (SELECT DISTINCT k FROM UNNEST(" in (info.value.details.get("hint") or "")
