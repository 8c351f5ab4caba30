"""Engines whose pattern matcher backtracks refuse, before the charge, every pattern it would need to match
with backtracking; the linear forms stay answerable."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from sqlglot import exp

from gateway.demo import POLICY_YAML
from gateway.engines.base import Engine
from gateway.engines.kind import EngineKind
from gateway.engines.versions import Version
from gateway.sql import compile as comp
from gateway.sql.plan import plan_query
from gateway.sql.release import bind_check
from policies.errors import QueryRejected
from policies.schema import Policy, parse_policy

POLICY = parse_policy(yaml.safe_load(POLICY_YAML))


@dataclass
class BacktrackingEngine:
    """Just what bind_check asks of an engine before any statement: its kind and its matcher. The rest of the
    Engine protocol is there to be one; bind_check reads no rows and registers nothing, so none of it is called."""

    kind: EngineKind = EngineKind.SPARK
    regex: bool = False
    checked: int = 0
    dialect: str = "spark"

    def check(self, query: exp.Query) -> None:
        self.checked += 1

    def rows(self, query: exp.Query) -> list[tuple[Any, ...]]:
        raise AssertionError("bind_check reads no rows")

    def arrow(self, query: exp.Query) -> pa.Table:
        raise AssertionError("bind_check reads no rows")

    def frame(self, name: str, table: pa.Table) -> contextlib.AbstractContextManager[exp.Table]:
        raise AssertionError("bind_check reads no rows")

    def register(self, policy: Policy, source: Path, *, base: Path | None = None) -> str:
        raise AssertionError("bind_check registers nothing")

    def public_table(self, dataset: str, table: str) -> pa.Table:
        raise AssertionError("bind_check reads no public table")

    def datasets(self) -> dict[str, tuple[Policy, str]]:
        raise AssertionError("bind_check needs no catalog")

    def policy(self, dataset: str) -> tuple[Policy, str]:
        raise AssertionError("bind_check needs no catalog")

    def append(self, dataset: str, source: Path) -> tuple[Version, bool]:
        raise AssertionError("bind_check appends nothing")

    def retire(self, dataset: str, version: str) -> Version:
        raise AssertionError("bind_check retires nothing")

    def versions(self, dataset: str) -> list[Version]:
        raise AssertionError("bind_check needs no versions")

    def version(self, dataset: str, version: str | None) -> Version:
        raise AssertionError("bind_check needs no versions")

    def at(self, pins: dict[str, str], *, retired: bool = False) -> Engine:
        raise AssertionError("bind_check needs no versions")

    def close(self) -> None:
        pass


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
        bind_check(_plan(where), engine)
    assert info.value.reason == "engine_unsupported"
    assert engine.checked == 0


@pytest.mark.parametrize(
    "where",
    ["diagnosis LIKE 'J%'", "diagnosis LIKE '%9'", "diagnosis LIKE '%10%'", "diagnosis LIKE 'J%9'", "sex = 'F'"],
)
def test_linear_patterns_pass(where: str) -> None:
    engine = BacktrackingEngine()
    bind_check(_plan(where), engine)
    assert engine.checked == len(comp.statements(_plan(where), empty=True))


def test_a_linear_engine_takes_every_pattern() -> None:
    assert comp.backtracking_pattern(_plan("diagnosis LIKE '%a%a%b'").row_trees) is not None
    bind_check(_plan("diagnosis LIKE '%a%a%b'"), BacktrackingEngine(kind=EngineKind.DUCKDB, regex=True))
