"""Engines whose pattern matcher backtracks refuse, before the charge, every pattern it would need to match
with backtracking; the linear forms stay answerable."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml

from gateway.demo import POLICY_YAML
from gateway.engines.kind import EngineKind
from gateway.sql import compile as comp
from gateway.sql.plan import plan_query
from gateway.sql.release import bind_check
from policies.errors import QueryRejected
from policies.schema import parse_policy

POLICY = parse_policy(yaml.safe_load(POLICY_YAML))


@dataclass
class BacktrackingEngine:
    """Just what bind_check asks of an engine before any statement: its kind and its matcher."""

    kind: EngineKind = EngineKind.SPARK
    regex: bool = False
    checked: int = 0

    def check(self, query: object) -> None:
        self.checked += 1


def _plan(where: str):
    return plan_query(f"SELECT COUNT(*) FROM visits WHERE {where}", lambda name: POLICY)


@pytest.mark.parametrize(
    "where",
    [
        "diagnosis LIKE '%a%a%b'",
        "diagnosis LIKE 'J_1%'",
        "diagnosis LIKE '%%'",
        "diagnosis ILIKE 'a%b%c'",
        "diagnosis NOT LIKE '%x%y%'",
        "regexp_matches(diagnosis, '(a+)+b')",
        "regexp_extract(diagnosis, 'J(..)') = '10'",
    ],
)
def test_backtracking_patterns_are_refused_before_any_statement(where: str) -> None:
    engine = BacktrackingEngine()
    with pytest.raises(QueryRejected) as info:
        bind_check(_plan(where), engine)  # type: ignore[arg-type]
    assert info.value.reason == "engine_unsupported"
    assert engine.checked == 0


@pytest.mark.parametrize(
    "where",
    ["diagnosis LIKE 'J%'", "diagnosis LIKE '%9'", "diagnosis LIKE '%10%'", "diagnosis LIKE 'J%9'", "sex = 'F'"],
)
def test_linear_patterns_pass(where: str) -> None:
    engine = BacktrackingEngine()
    bind_check(_plan(where), engine)  # type: ignore[arg-type]
    assert engine.checked == len(comp.statements(_plan(where), empty=True))


def test_a_linear_engine_takes_every_pattern() -> None:
    assert comp.backtracking_pattern(_plan("diagnosis LIKE '%a%a%b'")) is not None
    bind_check(_plan("diagnosis LIKE '%a%a%b'"), BacktrackingEngine(kind=EngineKind.DUCKDB, regex=True))  # type: ignore[arg-type]
