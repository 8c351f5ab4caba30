"""The fixture corpus: every query with its verdict (accepted, or the stable reason of the rejection)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from gateway.demo import DEMO_POLICY_YAML, diagnosis_chapters
from gateway.sql import plan as planner
from policies.errors import DatasetNotFound, GatewayError, QueryRejected
from policies.schema import Policy, load_policy, parse_policy

CORPUS = yaml.safe_load((Path(__file__).parent / "fixtures" / "queries.yaml").read_text())
POLICY = parse_policy(yaml.safe_load(DEMO_POLICY_YAML))  # the demo's visits and its public diagnosis_chapters
PUMS = load_policy(Path(__file__).parent / "data" / "pums.yaml")  # SmartNoise SQL's PUMS test table, unit `pid`


def public(dataset: str, table: str) -> pa.Table:
    """The demo's public table, as the engine returns it."""
    assert (dataset, table) == ("visits", "diagnosis_chapters")
    return diagnosis_chapters()


def plan_query(sql: str, resolve: Callable[[str], Policy]) -> planner.Plan:
    return planner.plan_query(sql, resolve, public)


def resolve(name: str) -> Policy:
    if name == "visits":
        return POLICY
    if name == "pums":
        return PUMS
    raise DatasetNotFound(f"no dataset named {name!r}")


def test_corpus_covers_every_rejection_class() -> None:
    reasons = {q["verdict"] for q in CORPUS}
    required = {
        "accepted",
        "raw_rows",
        "non_aggregated_column",
        "privacy_unit_column",
        "labeling_only_column",
        "min_max",
        "join",
        "subquery",
        "cte",
        "set_operation",
        "window_function",
        "table_function",
        "volatile_function",
        "multiple_statements",
        "ddl",
        "dml",
        "pragma",
        "attach",
        "copy",
        "install_load",
        "set",
        "system_catalog",
        "unbounded_expression",
        "aggregate_argument",
        "sampling",
        "alias_columns",
    }
    assert required <= reasons
    assert len(CORPUS) >= 280
    styles = {q.get("style") for q in CORPUS}
    assert {"smartnoise", "zetasql"} <= styles


@pytest.mark.parametrize("case", CORPUS, ids=[q["sql"][:60] or "<empty>" for q in CORPUS])
def test_verdict(case: dict[str, str]) -> None:
    if case["verdict"] == "accepted":
        plan = plan_query(case["sql"], resolve)
        # Something is released: aggregates (measurements), or group keys alone (public, or privately selected).
        assert (plan.aggregates and plan.measurements) or (plan.keys and not plan.aggregates)
        return
    if case["verdict"] == "dataset_not_found":
        with pytest.raises(GatewayError) as refused:
            plan_query(case["sql"], resolve)
        assert refused.value.code == "dataset_not_found"
        return
    with pytest.raises(QueryRejected) as info:
        plan_query(case["sql"], resolve)
    assert info.value.reason == case["verdict"], info.value.message
    if case["verdict"] not in {"empty_query", "no_dataset"}:
        # Rejections point at the query text where sqlglot knows the position.
        assert info.value.details.get("line") is not None or case["verdict"] in {"syntax"}, info.value.message
