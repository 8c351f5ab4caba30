"""The query corpus on both engines: identical verdicts, and identical exact measurements before noise.

The same generated table is registered on DuckDB and on Spark with the same bounding key; every corpus query is
planned once, bound on each engine (the verdict a caller would get before the charge), and, where both accept it,
every compiled statement's rows are compared after the canonical conversion the release applies, and so are those of
each quantile's second statement (at a grid per group over the middle of the column's bounds, every group of the
first statement joined with its own row). The rows are the exact inputs of the mechanisms: if they agree, so does
every released distribution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.demo import POLICY_YAML
from gateway.engines.base import Engine
from gateway.sql import compile as comp
from gateway.sql.plan import Kind, Plan, plan_query
from gateway.sql.release import _group, bind_check
from policies import mechanisms as mech
from policies.errors import GatewayError, QueryRejected
from policies.schema import Policy, parse_policy
from policies.sqltypes import SqlType, canonical

pytestmark = pytest.mark.spark

CORPUS = yaml.safe_load((Path(__file__).parents[1] / "fixtures" / "queries.yaml").read_text())
GOLDEN = yaml.safe_load((Path(__file__).parents[1] / "fixtures" / "compiled" / "visits.yaml").read_text())
POLICY = parse_policy(yaml.safe_load(POLICY_YAML))
QUERIES = sorted({q["sql"] for q in CORPUS if q.get("dataset", "visits") == "visits"} | {g["sql"] for g in GOLDEN})


def _resolve(name: str) -> Policy:
    if name != "visits":
        raise QueryRejected(f"no dataset named {name!r}", reason="unknown_dataset")
    return POLICY


def _verdict(sql: str, engine: Engine) -> tuple[str, Plan | None]:
    try:
        plan = plan_query(sql, _resolve)
        bind_check(plan, engine)
    except QueryRejected as exc:
        return exc.reason, None
    except GatewayError as exc:
        return exc.code, None
    return "accepted", plan


def _canonical_rows(plan: Plan, rows: list[tuple[Any, ...]], nk: int) -> list[tuple[Any, ...]]:
    out = []
    for row in rows:
        keys = tuple(canonical(v, k.typed.type) for v, k in zip(row[:nk], plan.keys, strict=False))
        rest = tuple(None if v is None else canonical(v, SqlType.INT) for v in row[nk:])
        out.append(keys + rest)
    return sorted(out, key=repr)


@pytest.mark.parametrize("sql", QUERIES)
def test_same_verdict_and_same_exact_measurements(sql: str, engines: tuple[Engine, Engine]) -> None:
    duck, spark = engines
    duck_verdict, plan = _verdict(sql, duck)
    spark_verdict, _ = _verdict(sql, spark)
    if duck_verdict == "accepted" and spark_verdict == "engine_unsupported":
        assert plan is not None  # an accepted verdict comes with its plan
        assert comp.backtracking_pattern(plan.row_trees) is not None
        return
    assert spark_verdict == duck_verdict
    if plan is None:
        return
    statements = comp.statements(plan)
    nk = len(plan.keys)  # then counts, sums, a quantile statement's position code, the padding index: integers
    for i, statement in enumerate(statements):
        assert _canonical_rows(plan, spark.rows(statement), nk) == _canonical_rows(plan, duck.rows(statement), nk), (
            i,
            statement.sql(dialect="spark"),
        )
    quantiles = [m for m in plan.measurements if m.kind == Kind.QUANTILE]
    for m, first in zip(quantiles, statements[1:], strict=True):
        grid = comp.quantile_grid(plan, m)
        width = grid.hi - grid.lo
        fine = mech.QuantileGrid(grid.lo + width / 4, width / 2 / 1023, 1024)
        groups = sorted({_group(plan, row[:nk]) for row in duck.rows(first)}, key=repr)
        second = comp.quantile_fine_query(plan, m, [(g, fine) for g in groups])
        assert _canonical_rows(plan, spark.rows(second), nk) == _canonical_rows(plan, duck.rows(second), nk), (
            m.label,
            second.sql(dialect="spark"),
        )
