"""Queries over a dataset of several private tables (the hospital demo): the corpus of join forms with their
verdicts (planner alone, and through the real gateway: refusals charge nothing, answers are charged their price),
and the rows per unit each accepted query is priced at."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from gateway.demo import HOSPITAL_POLICY_YAML, diagnosis_chapters, write_hospital
from gateway.service import Bastion, Context
from gateway.sql import plan as planner
from policies.errors import DatasetNotFound, GatewayError, QueryRejected
from policies.schema import Policy, parse_policy
from tests.conftest import ROLES, build_workspace

CORPUS: list[dict[str, Any]] = yaml.safe_load((Path(__file__).parent / "fixtures" / "private_joins.yaml").read_text())
POLICY = parse_policy(yaml.safe_load(HOSPITAL_POLICY_YAML))


def _public(dataset: str, table: str) -> pa.Table:
    assert (dataset, table) == ("hospital", "diagnosis_chapters")
    return diagnosis_chapters()


def _resolve(name: str) -> Policy:
    if name == "hospital":
        return POLICY
    raise DatasetNotFound(f"no dataset named {name!r}")


def test_corpus_covers_every_join_form() -> None:
    verdicts = {c["verdict"] for c in CORPUS}
    assert {"accepted", "join", "unknown_table", "privacy_unit_column", "ambiguous_column"} <= verdicts
    accepted = [c["sql"] for c in CORPUS if c["verdict"] == "accepted"]
    assert any("LEFT" in s for s in accepted) and any("USING" in s for s in accepted)
    assert any(s.count("JOIN") == 2 and "diagnosis_chapters" in s for s in accepted)


@pytest.mark.parametrize("case", CORPUS, ids=[c["sql"][:70] for c in CORPUS])
def test_verdict(case: dict[str, Any]) -> None:
    if case["verdict"] == "accepted":
        plan = planner.plan_query(case["sql"], _resolve, _public)
        assert plan.dataset == "hospital" and plan.measurements
        assert plan.policy.max_rows_per_unit == case["rows"]
        if plan.per_unit is None:  # a per-unit query's outer rows are one per unit; its note is the join's
            assert str(case["rows"]) in plan.warnings[-1]
        return
    if case["verdict"] == "dataset_not_found":
        with pytest.raises(GatewayError) as refused:
            planner.plan_query(case["sql"], _resolve, _public)
        assert refused.value.code == "dataset_not_found"
        return
    with pytest.raises(QueryRejected) as info:
        planner.plan_query(case["sql"], _resolve, _public)
    assert info.value.reason == case["verdict"], info.value.message
    # Refusals point at the text and say what to write instead.
    assert info.value.details.get("line") is not None, info.value.message
    if case["verdict"] == "join":
        assert info.value.details.get("hint"), info.value.message


def test_truncation_prices_at_the_policy_bound() -> None:
    truncating = POLICY.model_copy(update={"max_joined_rows_per_unit": 20})
    sql = "SELECT COUNT(*) FROM hospital.labs l JOIN hospital.visits v ON l.patient_id = v.patient_id"
    plan = planner.plan_query(sql, lambda _: truncating, _public)
    assert plan.policy.max_rows_per_unit == 20 and "truncated to 20" in plan.warnings[-1]
    # A join under the bound, and a private table alone, are priced as without the setting.
    small = "SELECT COUNT(*) FROM hospital p JOIN hospital.visits v ON p.patient_id = v.patient_id"
    assert planner.plan_query(small, lambda _: truncating, _public).policy.max_rows_per_unit == 8
    assert planner.plan_query("SELECT COUNT(*) FROM hospital.labs", lambda _: truncating).policy.max_rows_per_unit == 12


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bastion]:
    data, policy = write_hospital(tmp_path_factory.mktemp("hospital"), n_patients=3_000)
    ws = build_workspace(tmp_path_factory.mktemp("hospital-ws"), [(policy, data)], ROLES)
    bastion = Bastion(ws.settings)
    try:
        yield bastion
    finally:
        bastion.close()


def _spent(bastion: Bastion, ctx: Context) -> float:
    return sum(b["spent"]["epsilon"] for b in bastion.budgets(ctx) if b["dataset"] == "hospital")


@pytest.mark.parametrize("index", range(len(CORPUS)), ids=[c["sql"][:70] for c in CORPUS])
def test_corpus_through_the_gateway(gateway: Bastion, index: int) -> None:
    case = CORPUS[index]
    _, principal = gateway.tokens.create(f"joins-{index}", "analyst")
    ctx = Context(principal)
    before = _spent(gateway, ctx)
    try:
        body = gateway.query(ctx, case["sql"], epsilon=0.1)
    except GatewayError as exc:
        assert exc.status < 500, exc.message
        assert case["verdict"] != "accepted", exc.message
        assert getattr(exc, "reason", exc.code) == case["verdict"], exc.message
        assert _spent(gateway, ctx) == before
        return
    assert case["verdict"] == "accepted"
    assert body["dataset"] == "hospital"
    assert _spent(gateway, ctx) == pytest.approx(before + 0.1)
    assert body["rows"] and all(len(r) == len(body["columns"]) for r in body["rows"])
