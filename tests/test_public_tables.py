"""Public tables of a dataset: the policy's declaration and its validation, their loading (converted values, the
declared unique key and multiplicities checked), and `GET /v1/datasets/{dataset}/public/{table}`: rows to any
principal granted on the dataset, paged, audited as `public_read`, never charged; unknown tables 404 in the error
shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from gateway.client import Client
from gateway.demo import DEMO_POLICY_YAML, POLICY_YAML, diagnosis_chapters
from gateway.engines.base import CatalogError
from gateway.engines.duckdb import DuckDBEngine
from policies.errors import PublicTableNotFound
from policies.schema import PolicyError, parse_policy
from tests.conftest import Workspace

BASE = """
dataset: shop
privacy_unit: uid
max_rows_per_unit: 2
budget: {per_principal: {epsilon: 10}, total: {epsilon: 10}}
columns: {uid: {type: int, usage: hidden}, dx: {type: category}, x: {type: int, bounds: [0, 5]}}
roles: {analyst: [query]}
"""


def _policy(public: dict[str, Any]) -> dict[str, Any]:
    raw = yaml.safe_load(BASE)
    raw["public_tables"] = public
    return raw


TABLE = {
    "source": "c.csv",
    "unique_key": "code",
    "columns": {
        "code": {"type": "category"},
        "chapter": {"type": "category"},
        "w": {"type": "float", "bounds": [0, 10]},
    },
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"unique_key": None}, "needs a unique_key (a column whose values are unique) or a max_multiplicity"),
        ({"unique_key": "nope"}, "unique_key 'nope' is not a column of the table"),
        ({"max_multiplicity": {"nope": 2}}, "max_multiplicity names 'nope', not a column of the table"),
        ({"max_multiplicity": {"code": 2}}, "'code' is the unique key: its multiplicity is 1"),
        ({"unique_key": None, "max_multiplicity": {"chapter": 0}}, "max_multiplicity of 'chapter' must be between"),
        ({"columns": {"code": {"type": "category", "usage": "hidden"}}}, "every column of a public table is public"),
        ({"columns": {"Code": {"type": "category"}}}, "must be a lower-case identifier"),
        ({"columns": {"code": {"type": "category"}, "w": {"type": "float"}}}, "a float column needs bounds"),
        ({"source": None}, "public_tables.t.source"),
    ],
)
def test_unsafe_public_tables_are_refused_with_the_reason(change: dict[str, Any], message: str) -> None:
    table = {**TABLE, **change}
    with pytest.raises(PolicyError) as info:
        parse_policy(_policy({"t": table}), origin="p.yaml")
    assert message in str(info.value)


def test_public_table_names_are_identifiers_other_than_the_dataset() -> None:
    with pytest.raises(PolicyError, match="public table name 'Bad-name'"):
        parse_policy(_policy({"Bad-name": TABLE}))
    with pytest.raises(PolicyError, match="has the dataset's own name"):
        parse_policy(_policy({"shop": TABLE}))


def test_declared_tables_read_back_and_the_fingerprint_of_a_policy_without_them_is_unchanged() -> None:
    policy = parse_policy(_policy({"chapters": TABLE}))
    assert policy.public_tables["chapters"].multiplicity("code") == 1
    assert policy.public_tables["chapters"].multiplicity("chapter") is None
    assert parse_policy(policy.model_dump(mode="json")) == policy  # stored policies read back the same
    plain = parse_policy(yaml.safe_load(BASE))
    assert plain.fingerprint() != policy.fingerprint()
    # The content hashed is what it was before public tables existed: no key for them at all.
    assert plain.model_dump(mode="json")["public_tables"] == {}
    import hashlib
    import json

    content = plain.model_dump(mode="json")
    del content["accounting"], content["public_tables"], content["row_key"], content["consent"]  # likewise, unset
    del content["private_tables"], content["max_joined_rows_per_unit"], content["monitoring"], content["period"]
    expected = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert plain.fingerprint() == expected
    schema = policy.public_schema()["public_tables"]["chapters"]
    assert (
        schema["unique_key"] == "code" and "source" not in schema and set(schema["columns"]) == {"code", "chapter", "w"}
    )


def _register(tmp: Path, table: dict[str, Any], rows: pd.DataFrame) -> DuckDBEngine:
    pd.DataFrame({"uid": [1, 1, 2], "dx": ["A1", "B2", "A1"], "x": [1, 2, 3]}).to_csv(tmp / "s.csv", index=False)
    rows.to_csv(tmp / "c.csv", index=False)
    engine = DuckDBEngine(tmp / "db.duckdb", tmp / "key", read_only=False)
    try:
        engine.register(parse_policy(_policy({"chapters": table})), tmp / "s.csv")
    except BaseException:
        assert engine.datasets() == {}  # a refused registration is rolled back whole
        engine.close()
        raise
    return engine


def test_a_public_table_is_loaded_converted_and_clamped(tmp_path: Path) -> None:
    rows = pd.DataFrame({"code": ["B2", "A1"], "chapter": ["b", "a"], "w": [99.0, 1.5], "extra": [1, 2]})
    engine = _register(tmp_path, TABLE, rows)
    try:
        table = engine.public_table("shop", "chapters")
        assert table.column_names == ["code", "chapter", "w"]  # declared columns only, sorted rows
        assert table.to_pylist() == [
            {"code": "A1", "chapter": "a", "w": 1.5},
            {"code": "B2", "chapter": "b", "w": 10.0},  # clamped to the declared bounds
        ]
        with pytest.raises(PublicTableNotFound):
            engine.public_table("shop", "nope")
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("table", "rows", "message"),
    [
        (
            TABLE,
            pd.DataFrame({"code": ["A1", "A1"], "chapter": ["a", "b"], "w": [1, 2]}),
            "'code' is declared its unique_key, but a value of it has 2 rows",
        ),
        (
            {**TABLE, "max_multiplicity": {"chapter": 2}},
            pd.DataFrame({"code": ["A1", "B2", "C3"], "chapter": ["a", "a", "a"], "w": [1, 2, 3]}),
            "'chapter' is declared max_multiplicity 2, but a value of it has 3 rows",
        ),
        (TABLE, pd.DataFrame({"code": ["A1"], "w": [1]}), "the source has no column(s) ['chapter']"),
        ({**TABLE, "source": "missing.csv"}, pd.DataFrame({"code": ["A1"]}), "source file not found"),
        (
            {**TABLE, "source": "./s.csv"},
            pd.DataFrame({"code": ["A1"]}),
            "its source is the dataset's own private source 's.csv'",
        ),
    ],
)
def test_a_public_table_that_breaks_its_declaration_is_refused_and_nothing_registered(
    tmp_path: Path, table: dict[str, Any], rows: pd.DataFrame, message: str
) -> None:
    with pytest.raises(CatalogError) as info:
        _register(tmp_path, table, rows)
    assert message in str(info.value) and "public table 'chapters'" in str(info.value)


def test_nulls_do_not_count_against_a_unique_key(tmp_path: Path) -> None:
    rows = pd.DataFrame({"code": ["A1", None, None], "chapter": ["a", "b", "c"], "w": [1, 2, 3]})
    engine = _register(tmp_path, TABLE, rows)
    engine.close()


# --- the endpoint -----------------------------------------------------------------------------------------------

PATH = "/v1/datasets/visits/public/diagnosis_chapters"


def _spent(c: Any, headers: dict[str, str]) -> float:
    return next(b["spent"]["epsilon"] for b in c.get("/v1/budget", headers=headers).json() if b["dataset"] == "visits")


def test_any_granted_principal_reads_the_rows_paged_audited_and_uncharged(workspace: Workspace) -> None:
    expected = [[r["code"], r["chapter"]] for r in diagnosis_chapters().to_pylist()]
    with workspace.app() as c:
        analyst = workspace.headers("analyst")
        body = c.get(PATH, headers=analyst).json()
        assert body["columns"] == ["code", "chapter"] and body["rows"] == expected
        assert body["total"] == len(expected) and body["next_offset"] is None and body["offset"] == 0
        page = c.get(PATH, params={"offset": 5, "limit": 5}, headers=analyst).json()
        assert page["rows"] == expected[5:10] and page["next_offset"] == 10
        with Client("http://testserver", workspace.tokens["lf_author"], transport=c._transport) as lena:
            assert lena.public_table("visits", "diagnosis_chapters", limit=3)["rows"] == expected[:3]
        assert _spent(c, analyst) == 0.0  # public rows: nothing charged
        listed = next(d for d in c.get("/v1/datasets", headers=analyst).json() if d["dataset"] == "visits")
        assert listed["public_tables"]["diagnosis_chapters"]["unique_key"] == "code"
        too_many = c.get(PATH, params={"limit": 10_001}, headers=analyst)
        assert too_many.status_code == 400 and too_many.json()["error"]["field"] == "limit"
        records = [r for r in c.app.state.bastion.audit_log.records() if r.get("event") == "public_read"]
    assert [(r["actor"]["principal"], r["decision"], r["request"]) for r in records] == [
        ("alice", "allowed", {"table": "diagnosis_chapters", "offset": 0, "limit": 1000}),
        ("alice", "allowed", {"table": "diagnosis_chapters", "offset": 5, "limit": 5}),
        ("lena", "allowed", {"table": "diagnosis_chapters", "offset": 0, "limit": 3}),
    ]
    assert all("cost" not in r for r in records)


def test_refusals_are_404_or_403_in_the_error_shape_and_audited(workspace: Workspace) -> None:
    with workspace.app() as c:
        analyst = workspace.headers("analyst")
        missing = c.get("/v1/datasets/visits/public/chapters", headers=analyst)
        assert missing.status_code == 404
        error = missing.json()["error"]
        assert error["code"] == "public_table_not_found" and "diagnosis_chapters" in error["hint"]
        assert c.get("/v1/datasets/nope/public/x", headers=analyst).json()["error"]["code"] == "dataset_not_found"
        forbidden = c.get(PATH, headers=workspace.headers("auditor"))  # the auditor has no grant on visits
        assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
        assert c.get(PATH).status_code == 401
        records = [r for r in c.app.state.bastion.audit_log.records() if r.get("event") == "public_read"]
        with Client("http://testserver", workspace.tokens["auditor"], transport=c._transport) as otto:
            found = otto.audit_events(event="public_read", decision="denied")
    assert [(r["decision"], r["reason"]) for r in records] == [
        ("denied", "public_table_not_found"),
        ("denied", "dataset_not_found"),
        ("denied", "forbidden"),
    ]
    assert [r["reason"] for r in found] == ["public_table_not_found", "dataset_not_found", "forbidden"]


def test_the_demo_policy_declares_the_public_table_and_the_plain_one_does_not() -> None:
    demo = parse_policy(yaml.safe_load(DEMO_POLICY_YAML))
    assert demo.public_tables["diagnosis_chapters"].unique_key == "code"
    assert parse_policy(yaml.safe_load(POLICY_YAML)).public_tables == {}
    codes = diagnosis_chapters().column("code").to_pylist()
    assert len(set(codes)) == len(codes)


def test_spark_refuses_public_tables_before_starting_a_session(tmp_path: Path) -> None:
    from gateway.engines.kind import EngineKind
    from gateway.engines.spark import SparkEngine
    from gateway.settings import Settings

    (tmp_path / "s.csv").write_text("uid,dx,x\n1,A1,1\n")
    engine = SparkEngine(Settings(workspace=tmp_path / "ws", engine=EngineKind.SPARK), read_only=False)
    with pytest.raises(CatalogError, match="public tables and joins with them run on DuckDB only for now"):
        engine.register(parse_policy(_policy({"chapters": TABLE})), tmp_path / "s.csv")
    assert engine._session is None


def test_the_cli_lists_public_tables_and_shows_their_rows(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import gateway.cli.terminal as terminal
    from gateway.cli.main import app

    token = workspace.tokens["analyst"]
    with workspace.app() as c:
        monkeypatch.setattr(
            terminal, "make_client", lambda url, tok: Client("http://testserver", tok, transport=c._transport)
        )
        runner = CliRunner()
        listed = runner.invoke(app, ["datasets", "--token", token])
        assert listed.exit_code == 0, listed.output
        assert "public table diagnosis_chapters" in listed.output and "unique" in listed.output
        shown = runner.invoke(
            app, ["public-table", "visits", "diagnosis_chapters", "--limit", "2", "--json", "--token", token]
        )
        assert shown.exit_code == 0, shown.output
    import json

    page = json.loads(shown.output)
    first = diagnosis_chapters().to_pylist()[:2]
    assert page["rows"] == [[r["code"], r["chapter"]] for r in first] and page["next_offset"] == 2
