"""Join forms whose meaning is not the plain equality join Bastion compiles are refused before the charge, with the
join's span, rather than run as something else: NATURAL (the columns sharing a name, not the ON), ASOF (nearest
match), POSITIONAL (row order), and a column list in a table's alias (`diagnosis_chapters AS c (chapter, code)`
renames the table's columns by position, so `c.code` would be the chapter)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import yaml

from gateway.demo import DEMO_POLICY_YAML
from gateway.sql.plan import plan_query
from policies.errors import QueryRejected
from policies.schema import Policy, parse_policy

POLICY = parse_policy(yaml.safe_load(DEMO_POLICY_YAML))
TABLE = pa.table({"code": ["A41", "Z09"], "chapter": ["a", "z"]})


def _resolve(name: str) -> Policy:
    assert name == "visits"
    return POLICY


def _public(dataset: str, table: str) -> pa.Table:
    return TABLE


@pytest.mark.parametrize(
    ("join", "highlight"),
    [
        (
            "NATURAL JOIN diagnosis_chapters c ON v.diagnosis = c.code",
            "NATURAL JOIN diagnosis_chapters c ON v.diagnosis = c.code",
        ),
        (
            "NATURAL LEFT JOIN diagnosis_chapters c ON v.diagnosis = c.code",
            "NATURAL LEFT JOIN diagnosis_chapters c ON v.diagnosis = c.code",
        ),
        (
            "ASOF JOIN diagnosis_chapters c ON v.diagnosis = c.code",
            "ASOF JOIN diagnosis_chapters c ON v.diagnosis = c.code",
        ),
    ],
)
def test_join_forms_of_another_meaning_are_refused(join: str, highlight: str) -> None:
    sql = f"SELECT COUNT(*) AS n FROM visits v {join}"
    with pytest.raises(QueryRejected) as info:
        plan_query(sql, _resolve, _public)
    assert info.value.reason == "join"
    assert info.value.details["highlight"] == highlight


@pytest.mark.parametrize(
    ("source", "highlight"),
    [
        ("visits AS v (a, b) JOIN diagnosis_chapters c", "AS v (a, b)"),
        ("visits v JOIN diagnosis_chapters AS c (chapter, code)", "AS c (chapter, code)"),
    ],
)
def test_a_column_list_in_either_tables_alias_is_refused_in_a_join(source: str, highlight: str) -> None:
    """The same refusal as outside a join (`alias_columns`): `c (chapter, code)` would make `c.code` the chapter."""
    sql = f"SELECT COUNT(*) AS n FROM {source} ON v.diagnosis = c.code"
    with pytest.raises(QueryRejected) as info:
        plan_query(sql, _resolve, _public)
    assert info.value.reason == "alias_columns" and info.value.details["highlight"] == highlight


def test_the_plain_forms_still_plan() -> None:
    for join in ("JOIN", "INNER JOIN", "LEFT JOIN", "LEFT OUTER JOIN", "RIGHT JOIN"):
        plan = plan_query(
            f"SELECT COUNT(*) AS n FROM visits v {join} diagnosis_chapters c ON v.diagnosis = c.code", _resolve, _public
        )
        assert plan.join is not None
