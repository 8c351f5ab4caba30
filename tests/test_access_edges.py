"""Consented debug access at its edges: unit values the bounded table cannot tell apart from other units' (cut at a
text unit's max_length, clamped at an int unit's bounds) must give no rows of a unit that did not consent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from gateway import access
from gateway.service import Bastion
from gateway.settings import Settings
from policies.schema import PolicyError, load_policy, parse_policy
from tests.conftest import Workspace
from tests.test_access import _host


def _policy(unit: dict[str, Any]) -> dict[str, Any]:
    return {
        "dataset": "t",
        "privacy_unit": "u",
        "max_rows_per_unit": 5,
        "budget": {"per_principal": {"epsilon": 1.0}, "total": {"epsilon": 10.0}},
        "columns": {"u": unit, "v": {"type": "int", "bounds": [0, 100]}},
        "roles": {"analyst": ["query", "access"]},
        "consent": {"source": "consent.csv", "unit": "unit", "scope": "scope", "expires": "expires", "scopes": ["d"]},
    }


def _workspace(root: Path, unit: dict[str, Any], data_units: list[Any], consenting: list[Any]) -> Workspace:
    """A dataset `t` of one row per value of `data_units` (v: the row's position), with `consenting` consenting."""
    src = root / "src"
    src.mkdir()
    pq.write_table(pa.table({"u": data_units, "v": list(range(len(data_units)))}), src / "t.parquet")
    consent = {"unit": [str(u) for u in consenting], "scope": ["d"] * len(consenting)}
    pacsv.write_csv(pa.table({**consent, "expires": ["2099-01-01"] * len(consenting)}), src / "consent.csv")
    (src / "t.yaml").write_text(yaml.safe_dump(_policy(unit)))
    settings = Settings(workspace=root / "ws")
    settings.save()
    bastion = Bastion(settings, read_only=False)
    try:
        policy = load_policy(src / "t.yaml")
        bastion.engine.register(policy, src / "t.parquet")
        access.load_consent(bastion, policy, base=src)
        token = bastion.tokens.create("alice", "analyst")[0]
    finally:
        bastion.close()
    return Workspace(settings, {"analyst": token})


def _read(ws: Workspace, asked: list[Any]) -> tuple[int, Any]:
    """File a request for `asked`, approve it and read it: (status of the request, the released `v`s or the error)."""
    with ws.app() as c:
        body = {"dataset": "t", "units": asked, "purpose": "ticket 1"}
        filed = c.post("/v1/access/requests", json=body, headers=ws.headers("analyst"))
        if filed.status_code != 200:
            return filed.status_code, filed.json()["error"]
        rid = filed.json()["id"]
        _host(ws, "approve", rid, rows=100, hours=1, approver="root")
        read = c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst"))
    assert read.status_code == 200
    return 200, sorted(row[1] for row in read.json()["rows"])


def test_a_text_unit_cut_at_its_max_length_gives_no_rows_of_the_units_cut_with_it(tmp_path: Path) -> None:
    # The bounded table keeps 6 characters: P-0001-B and P-0001-C are held as P-0001, beside the unit P-0001.
    ws = _workspace(
        tmp_path,
        {"type": "text", "max_length": 6, "usage": "labeling"},
        ["P-0001", "P-0001-B", "P-0001-C", "Q-1"],
        ["P-0001", "P-0001-A", "Q-1"],
    )
    assert _read(ws, ["Q-1"]) == (200, [3])
    for asked in (["P-0001"], ["P-0001-A"]):  # the consent of P-0001 or of P-0001-A covers none of P-0001-B's rows
        status, error = _read(ws, asked)
        assert status == 400 and error["field"] == "units" and "max_length" in error["message"]


def test_an_int_unit_clamped_at_its_bounds_gives_no_rows_of_the_units_clamped_with_it(tmp_path: Path) -> None:
    # bounds [0, 100]: the units 150 and 200 are held as 100, beside the unit 100.
    ws = _workspace(tmp_path, {"type": "int", "bounds": [0, 100]}, [50, 100, 150, 200, 0, -5], [50, 100, 150, 0])
    assert _read(ws, [50]) == (200, [0])
    for asked in ([100], [150], [0], [-5]):
        status, error = _read(ws, asked)
        assert status == 400 and error["field"] == "units" and "bounds" in error["message"]


def test_consent_needs_an_int_category_or_text_unit() -> None:
    for kind in ({"type": "float", "bounds": [0, 10]}, {"type": "date", "usage": "hidden"}, {"type": "bool"}):
        with pytest.raises(PolicyError, match="int, category or text"):
            parse_policy(_policy(kind))
    parse_policy(_policy({"type": "category"}))


def test_a_consent_expiry_beyond_the_calendar_in_utc_is_no_consent_not_a_crash() -> None:
    policy = parse_policy(_policy({"type": "int", "usage": "hidden"}))
    source = pa.table(
        {
            "unit": ["1", "2", "3"],
            "scope": ["d", "d", "d"],
            "expires": ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00", "2099-01-01"],
        }
    )
    kept, dropped = access.convert_consent(policy, source)
    assert kept["unit"].to_pylist() == ["3"] and dropped == 2


def test_a_grant_on_a_dataset_registered_again_without_consent_gives_no_rows_and_no_5xx(tmp_path: Path) -> None:
    ws = _workspace(tmp_path, {"type": "int", "usage": "hidden"}, [1, 2, 3], [1, 2])
    with ws.app() as c:
        body = {"dataset": "t", "units": [1], "purpose": "ticket 1"}
        rid = c.post("/v1/access/requests", json=body, headers=ws.headers("analyst")).json()["id"]
    _host(ws, "approve", rid, rows=10, hours=1, approver="root")
    for changed in ({"privacy_unit": "row", "max_rows_per_unit": 1}, {}):  # no unit column, or no consent only
        raw = {k: v for k, v in _policy({"type": "int", "usage": "hidden"}).items() if k != "consent"}
        bastion = Bastion(ws.settings, read_only=False)
        try:
            policy = parse_policy({**raw, **changed})
            bastion.engine.register(policy, tmp_path / "src" / "t.parquet")
            access.store_consent(bastion, access.prepare_consent(policy))
        finally:
            bastion.close()
        with ws.app() as c:
            read = c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst"))
        assert read.status_code == 403 and read.json()["error"]["reason"] == "no_consent"
