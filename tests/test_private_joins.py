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


def test_an_append_adds_to_the_dataset_table_and_joins_read_it_with_the_private_tables(tmp_path: Path) -> None:
    """Appends go to the dataset's own table; a join at the new version reads it with the private tables as
    registered (a LEFT join keeps each new patient, who has no visits, as one row)."""
    import pyarrow.parquet as pq

    from gateway.demo import generate_hospital
    from gateway.engines.duckdb import DuckDBEngine
    from gateway.sql.compile import statements

    data, policy_path = write_hospital(tmp_path / "src", n_patients=300)
    engine = DuckDBEngine(tmp_path / "p.duckdb", tmp_path / "key", read_only=False)
    try:
        first = engine.register(parse_policy(yaml.safe_load(policy_path.read_text())), data)
        batch = generate_hospital(50, seed=5)["patients"]
        batch = batch.set_column(0, "patient_id", pa.array([i + 500_000 for i in range(50)], pa.int64()))
        pq.write_table(batch, tmp_path / "batch.parquet")
        version, added = engine.append("hospital", tmp_path / "batch.parquet")
        assert added
        sql = "SELECT COUNT(*) FROM hospital p LEFT JOIN hospital.visits v ON p.patient_id = v.patient_id"
        plan = planner.plan_query(sql, lambda _: engine.policy("hospital")[0], engine.public_table)
        (statement,) = statements(plan)
        before = engine.at({"hospital": first}).rows(statement)[0][0]
        after = engine.at({"hospital": version.version}).rows(statement)[0][0]
        assert after - before == 50
    finally:
        engine.close()


def test_each_private_table_is_bounded_at_registration(tmp_path: Path) -> None:
    import sqlglot

    from gateway.engines.duckdb import DuckDBEngine

    data, policy_path = write_hospital(tmp_path / "src", n_patients=1_000)
    engine = DuckDBEngine(tmp_path / "p.duckdb", tmp_path / "key", read_only=False)
    try:
        engine.register(parse_policy(yaml.safe_load(policy_path.read_text())), data)
        for table, k in (("visits", 8), ("labs", 12)):
            most = sqlglot.parse_one(
                f'SELECT MAX(n), SUM(n) FROM (SELECT COUNT(*) AS n FROM "bounded_hospital__{table}" GROUP BY '
                "patient_id) AS t",
                dialect="duckdb",
            )
            assert isinstance(most, sqlglot.exp.Query)
            ((largest, total),) = engine.rows(most)
            assert largest == k  # the demo has patients beyond every bound: bounded to exactly k
            assert total > 1_000
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda raw: raw["private_tables"]["visits"].update(unit_column="nope"), "unit_column"),
        (
            lambda raw: raw["private_tables"]["visits"]["columns"]["patient_id"].update(type="category"),
            "unit column",
        ),
        (lambda raw: raw["private_tables"].update(diagnosis_chapters=raw["private_tables"]["visits"]), "the name of"),
        (lambda raw: raw["private_tables"].update(bad__name=raw["private_tables"]["visits"]), "without __"),
        (lambda raw: raw["private_tables"]["labs"].update(foreign_keys={"visit_id": "wards.id"}), "no other private"),
        (lambda raw: raw["private_tables"]["labs"].update(foreign_keys={"visit_id": "visits.nope"}), "no column"),
        (lambda raw: raw["private_tables"]["labs"].update(foreign_keys={"test": "visits.visit_id"}), "differ in type"),
        (lambda raw: raw.update(privacy_unit="row", max_rows_per_unit=1), "privacy unit column"),
    ],
)
def test_unsafe_private_tables_are_refused(change: Any, problem: str) -> None:
    from policies.schema import PolicyError

    raw = yaml.safe_load(HOSPITAL_POLICY_YAML)
    change(raw)
    with pytest.raises(PolicyError, match=problem):
        parse_policy(raw)


def test_a_policy_without_private_tables_keeps_its_fingerprint() -> None:
    import hashlib
    import json

    plain = POLICY.model_copy(update={"private_tables": {}})
    content = plain.model_dump(mode="json")
    for unset in (
        "accounting",
        "row_key",
        "consent",
        "private_tables",
        "max_joined_rows_per_unit",
        "monitoring",
        "period",
    ):
        del content[unset]
    expected = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert plain.fingerprint() == expected != POLICY.fingerprint()


def test_spark_refuses_private_tables_before_starting_a_session(tmp_path: Path) -> None:
    from gateway.engines.base import CatalogError
    from gateway.engines.kind import EngineKind
    from gateway.engines.spark import SparkEngine
    from gateway.settings import Settings

    data, _ = write_hospital(tmp_path / "src", n_patients=50)
    engine = SparkEngine(Settings(workspace=tmp_path / "ws", engine=EngineKind.SPARK), read_only=False)
    with pytest.raises(CatalogError, match="several private tables and their joins run on DuckDB only"):
        engine.register(POLICY, data)
    assert engine._session is None
