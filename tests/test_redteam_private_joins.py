"""Findings of an adversarial review of datasets of several private tables joined on the privacy unit, each
reproduced here:

1. a private table's unit column could be declared with bounds, a domain, a precision or a max_length other than
   the dataset's unit column: its values were then converted differently (clamped, say), so one patient's rows landed
   in two joined units (their own in one table, the clamped value's in the other) while every join was priced at one
   unit. Measured on two workspaces differing in one patient (id 5000, 8 visits; visits' unit clamped to [0, 1000]):
   the noiseless per-unit histogram `SELECT n, COUNT(*) FROM (SELECT p.patient_id, COUNT(v.visit_id) AS n FROM
   hospital p LEFT JOIN hospital.visits v ... GROUP BY p.patient_id) t GROUP BY n` moved by 3 (L1), priced at 1;
2. a public table whose source is a private table's file was registered, and its rows (the visits' patient ids and
   diagnoses) served to every granted role: only the dataset's own source was refused as a public source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.demo import HOSPITAL_POLICY_YAML, write_hospital
from gateway.engines.base import CatalogError
from gateway.engines.duckdb import DuckDBEngine
from policies.schema import PolicyError, parse_policy


def _hospital(change: Any) -> dict[str, Any]:
    raw = yaml.safe_load(HOSPITAL_POLICY_YAML)
    change(raw)
    return raw


def _visits_unit(raw: dict[str, Any]) -> dict[str, Any]:
    unit: dict[str, Any] = raw["private_tables"]["visits"]["columns"]["patient_id"]
    return unit


@pytest.mark.parametrize(
    "change",
    [
        lambda raw: _visits_unit(raw).update(bounds=[0, 1000]),
        lambda raw: _visits_unit(raw).update(domain=list(range(1000, 1100))),
        lambda raw: raw["columns"]["patient_id"].update(bounds=[0, 1000]),
    ],
    ids=["clamped-in-a-private-table", "domain-in-a-private-table", "clamped-in-the-dataset"],
)
def test_a_unit_column_converted_otherwise_than_the_datasets_is_refused(change: Any) -> None:
    with pytest.raises(PolicyError, match="must convert as the dataset's"):
        parse_policy(_hospital(change))


def test_a_unit_column_of_another_usage_converts_the_same_and_is_accepted() -> None:
    def bounded_units(raw: dict[str, Any]) -> None:
        for columns in (raw["columns"], *(t["columns"] for t in raw["private_tables"].values())):
            columns["patient_id"]["bounds"] = [0, 10**7]
        _visits_unit(raw)["usage"] = "query"

    policy = parse_policy(_hospital(bounded_units))
    assert policy.private_tables["visits"].columns["patient_id"].usage.value == "query"


def test_text_units_must_keep_the_same_number_of_characters() -> None:
    def text_units(raw: dict[str, Any], cut: int) -> None:
        for columns in (raw["columns"], *(t["columns"] for t in raw["private_tables"].values())):
            columns["patient_id"] = {"type": "text", "usage": "hidden"}
        _visits_unit(raw)["max_length"] = cut

    with pytest.raises(PolicyError, match="max_length"):
        parse_policy(_hospital(lambda raw: text_units(raw, 4)))
    parse_policy(_hospital(lambda raw: text_units(raw, 2_000)))  # the default, declared: the same conversion


@pytest.mark.parametrize("table", ["visits", "labs"])
def test_a_public_table_sourced_from_a_private_tables_file_is_refused(tmp_path: Path, table: str) -> None:
    data, policy_path = write_hospital(tmp_path / "src", n_patients=50)
    raw = yaml.safe_load(policy_path.read_text())
    raw["public_tables"]["leak"] = {
        "source": raw["private_tables"][table]["source"],
        "max_multiplicity": {"visit_id": 1000},
        "columns": {
            "patient_id": {"type": "int", "bounds": [0, 10**7]},
            "visit_id": {"type": "int", "bounds": [0, 10**9]},
        },
    }
    engine = DuckDBEngine(tmp_path / "p.duckdb", tmp_path / "key", read_only=False)
    try:
        with pytest.raises(CatalogError, match=f"the source of its private table '{table}'"):
            engine.register(parse_policy(raw), data)
        with pytest.raises(Exception, match="hospital"):  # nothing was registered
            engine.policy("hospital")
    finally:
        engine.close()
