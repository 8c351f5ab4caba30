"""Rough edges of the query path a new user meets first: dry runs of answered queries, nearest-name hints."""

from __future__ import annotations

import math

from gateway.http.query import QueryResponse
from tests.conftest import Workspace

SQL = "SELECT region, COUNT(*) AS visits FROM visits GROUP BY region"


def test_dry_run_of_an_answered_query_is_a_free_dry_run(workspace: Workspace) -> None:
    with workspace.app() as c:
        h = workspace.headers("analyst")
        first = c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=h).json()
        dry = c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5, "dry_run": True}, headers=h).json()
        budget = next(b for b in c.get("/v1/budget", headers=h).json() if b["dataset"] == "visits")
    QueryResponse.model_validate(dry)
    assert first["epsilon_spent"] == 0.5 and not first["cached"]
    assert dry["dry_run"] is True and dry["cached"] is True
    assert dry["rows"] is None and dry["intervals"] is None  # a dry run, not the cached answer
    assert dry["epsilon"] == dry["epsilon_spent"] == dry["delta_spent"] == 0.0
    assert any("already answered" in n for n in dry["notes"])
    assert math.isclose(budget["spent"]["epsilon"], 0.5)


def test_dry_run_of_a_new_query_is_not_marked_cached(workspace: Workspace) -> None:
    with workspace.app() as c:
        dry = c.post(
            "/v1/query", json={"sql": SQL, "epsilon": 0.5, "dry_run": True}, headers=workspace.headers("analyst")
        ).json()
    assert dry["dry_run"] is True and dry["cached"] is False and dry["epsilon"] == 0.5


def test_wrong_dataset_name_suggests_the_nearest_granted_one(workspace: Workspace) -> None:
    with workspace.app() as c:
        r = c.post(
            "/v1/query", json={"sql": "SELECT COUNT(*) FROM visit", "epsilon": 1}, headers=workspace.headers("analyst")
        )
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "dataset_not_found"
    assert error["suggestion"] == "visits" and "did you mean 'visits'?" in error["message"]


def test_dataset_hint_never_names_a_dataset_the_caller_is_not_granted(workspace: Workspace) -> None:
    # The auditor has no grant on any dataset: a near miss of a real name gets no suggestion.
    bastion_sql = "SELECT COUNT(*) FROM visit"
    with workspace.app() as c:
        datasets = c.get("/v1/datasets", headers=workspace.headers("auditor")).json()
        r = c.post("/v1/query", json={"sql": bastion_sql, "epsilon": 1}, headers=workspace.headers("auditor"))
    assert datasets == []
    error = r.json()["error"]
    assert error["code"] == "dataset_not_found"
    assert "suggestion" not in error and "visits" not in error["message"]


def test_wrong_column_suggests_the_nearest_and_points_at_its_first_use(workspace: Workspace) -> None:
    sql = "SELECT regoin, COUNT(*) AS n FROM visits GROUP BY regoin"
    with workspace.app() as c:
        r = c.post("/v1/query", json={"sql": sql, "epsilon": 1}, headers=workspace.headers("analyst"))
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["reason"] == "unknown_column"
    assert (error["line"], error["column"], error["highlight"]) == (1, sql.index("regoin") + 1, "regoin")
    assert error["hint"].startswith("did you mean 'region'?")


def test_unknown_column_without_a_near_name_lists_the_usable_ones(workspace: Workspace) -> None:
    sql = "SELECT COUNT(*) AS n FROM visits WHERE zzz > 1"
    with workspace.app() as c:
        error = c.post("/v1/query", json={"sql": sql, "epsilon": 1}, headers=workspace.headers("analyst")).json()[
            "error"
        ]
    assert error["reason"] == "unknown_column" and "did you mean" not in error["hint"]
    assert "age" in error["hint"] and "ssn" not in error["hint"]


def test_output_aliases_are_not_unknown_columns(workspace: Workspace) -> None:
    sql = "SELECT region, COUNT(*) AS n FROM visits GROUP BY region HAVING n > 0 ORDER BY n DESC"
    with workspace.app() as c:
        r = c.post("/v1/query", json={"sql": sql, "epsilon": 1, "dry_run": True}, headers=workspace.headers("analyst"))
    assert r.status_code == 200, r.text
