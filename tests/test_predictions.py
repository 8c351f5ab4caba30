"""Attaching model predictions (`bastion predictions add`): the row key checked at registration, every refusal of
a bad file, the durable store and its audit record."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.log import AuditLog
from gateway.demo import EVALUATION_POLICY_YAML, write_evaluation_demo
from gateway.engines.base import CatalogError
from gateway.predictions import PredictionsError, PredictionsStore, attach
from gateway.service import Bastion
from gateway.settings import Settings
from policies.schema import PolicyError, load_policy, parse_policy
from tests.conftest import BIN, ROLES, Workspace, build_workspace

N_ROWS = 6_000


@pytest.fixture(scope="module")
def evaluation_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return write_evaluation_demo(tmp_path_factory.mktemp("evaluation"), n_rows=N_ROWS, seed=5)


@pytest.fixture
def ws(tmp_path: Path, evaluation_source: tuple[Path, Path, Path]) -> Workspace:
    data, policy, _ = evaluation_source
    return build_workspace(tmp_path, [(policy, data)], ROLES)


def _env(ws: Workspace) -> dict[str, str]:
    return {**os.environ, "BASTION_WORKSPACE": str(ws.settings.workspace)}


def _attach(ws: Workspace, table: pa.Table, tmp_path: Path, name: str = "p.parquet", **kw: bool) -> object:
    path = tmp_path / name
    if name.endswith(".csv"):
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    bastion = Bastion(ws.settings)
    try:
        return attach(bastion, "visits", "m1", path, **kw)
    finally:
        bastion.close()


def test_row_key_must_be_a_column_and_not_the_gold_label() -> None:
    raw = load_policy_dict()
    with pytest.raises(PolicyError, match="row_key 'nope' is not a column"):
        parse_policy({**raw, "row_key": "nope"})
    with pytest.raises(PolicyError, match="cannot be the gold-label column"):
        parse_policy({**raw, "row_key": "triage_label"})
    with pytest.raises(PolicyError, match="must be an int, category or text"):
        parse_policy({**raw, "row_key": "visit_day"})


def load_policy_dict() -> dict[str, object]:
    import yaml

    raw = yaml.safe_load(EVALUATION_POLICY_YAML)
    assert isinstance(raw, dict)
    return raw


def test_registration_refuses_a_repeated_row_key(tmp_path: Path, evaluation_source: tuple[Path, Path, Path]) -> None:
    data, policy, _ = evaluation_source
    table = pq.read_table(data)
    ids = table["visit_id"].to_pylist()
    ids[10] = ids[3]
    bad = tmp_path / "dup.parquet"
    pq.write_table(table.set_column(table.column_names.index("visit_id"), "visit_id", pa.array(ids)), bad)
    settings = Settings(workspace=tmp_path / "ws")
    settings.save()
    bastion = Bastion(settings, read_only=False)
    try:
        with pytest.raises(CatalogError, match="row_key 'visit_id' is not a row identity: 1 key"):
            bastion.engine.register(load_policy(policy), bad)
        assert "visits" not in bastion.engine.datasets()
    finally:
        bastion.close()


def test_attach_stores_audits_and_lists(ws: Workspace, evaluation_source: tuple[Path, Path, Path]) -> None:
    _, _, predictions = evaluation_source
    out = subprocess.run(
        [str(BIN), "predictions", "add", "visits", str(predictions), "--model", "triage-v3"],
        env=_env(ws),
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert f"{N_ROWS:,} predictions" in out.stdout
    stored = PredictionsStore(ws.settings.predictions_dir)
    (meta,) = stored.attachments()
    assert (meta.dataset, meta.model, meta.rows) == ("visits", "triage-v3", N_ROWS)
    assert stored.load("visits", "triage-v3", meta.attachment).num_rows == N_ROWS
    assert not [p for p in stored.root.rglob("*") if p.name.endswith(".tmp")]
    (record,) = [r for r in AuditLog(ws.settings.audit_dir).records() if r["event"] == "predictions_added"]
    assert record["dataset"] == "visits" and record["actor"]["role"] == "admin"
    assert record["request"]["model"] == "triage-v3" and record["request"]["attachment"] == meta.attachment
    listed = subprocess.run(
        [str(BIN), "predictions", "list", "--json"],
        env=_env(ws),
        capture_output=True,
        text=True,
        check=True,
    )
    assert [(r["model"], r["rows"]) for r in json.loads(listed.stdout)] == [("triage-v3", N_ROWS)]
    again = subprocess.run(
        [str(BIN), "predictions", "add", "visits", str(predictions), "--model", "triage-v3"],
        env=_env(ws),
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 1 and "--replace" in again.stderr


def _good(evaluation_source: tuple[Path, Path, Path]) -> pa.Table:
    return pq.read_table(evaluation_source[2])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop_columns(["visit_id"]), "no 'visit_id' column"),
        (lambda t: t.drop_columns(["label"]), "no 'label' column"),
        (lambda t: t.set_column(0, "visit_id", pa.array([3] * t.num_rows, pa.int64())), "repeat the 'visit_id'"),
        (lambda t: t.set_column(0, "visit_id", pa.array(range(t.num_rows), pa.int64())), "not keys of dataset"),
        (lambda t: t.set_column(1, "label", pa.array(["maybe"] * t.num_rows)), "not one of the classes"),
        (lambda t: t.set_column(2, "score", pa.array([1.5] * t.num_rows)), r"number in \[0, 1\]"),
        (lambda t: t.slice(0, 0), "no rows"),
    ],
)
def test_bad_files_are_refused_and_nothing_is_stored(
    ws: Workspace, tmp_path: Path, evaluation_source: tuple[Path, Path, Path], change: object, message: str
) -> None:
    assert callable(change)
    with pytest.raises(PredictionsError, match=message):
        _attach(ws, change(_good(evaluation_source)), tmp_path)
    assert PredictionsStore(ws.settings.predictions_dir).attachments() == []
    assert not [r for r in AuditLog(ws.settings.audit_dir).records() if r["event"] == "predictions_added"]


def test_csv_predictions_and_replace(ws: Workspace, tmp_path: Path, evaluation_source: tuple[Path, Path, Path]) -> None:
    first = _attach(ws, _good(evaluation_source).slice(0, 100), tmp_path, "p.csv")
    second = _attach(ws, _good(evaluation_source), tmp_path, replace=True)
    assert getattr(first, "rows", None) == 100 and getattr(second, "rows", None) == N_ROWS
    (meta,) = PredictionsStore(ws.settings.predictions_dir).attachments()
    assert meta.attachment == getattr(second, "attachment", None)


def test_a_dataset_without_row_key_takes_no_predictions(workspace: Workspace, tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"visit_id": [1], "label": ["urgent"]}), path)
    bastion = Bastion(workspace.settings)
    try:
        with pytest.raises(PredictionsError, match="has no row_key"):
            attach(bastion, "visits", "m1", path)
    finally:
        bastion.close()
