"""The DP SQL path end to end through the real app: answers, cache, dry run, accuracy targets, errors."""

from __future__ import annotations

import math

import pytest

from gateway.http.query import QueryResponse
from tests.conftest import Workspace

SQL = "SELECT region, COUNT(*) AS visits, AVG(income) AS mean_income FROM visits WHERE age >= 65 GROUP BY region"


def test_grouped_query_returns_every_declared_key_with_intervals(workspace: Workspace) -> None:
    with workspace.app() as c:
        r = c.post("/v1/query", json={"sql": SQL, "epsilon": 1.0}, headers=workspace.headers("analyst"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["columns"] == ["region", "visits", "mean_income"]
    assert sorted(row[0] for row in body["rows"]) == sorted(["north", "south", "east", "west", "central"])
    for row, cells in zip(body["rows"], body["intervals"], strict=True):
        assert cells[0] is None  # keys are public
        lo, hi = cells[1]
        assert lo <= row[1] <= hi
        lo, hi = cells[2]
        assert 0 <= lo <= row[2] <= hi <= 500_000
    assert body["epsilon_spent"] == 1.0 and not body["cached"]
    assert math.isclose(body["budget"]["remaining"]["epsilon"], 9.0)


def test_repeat_is_cached_identical_and_free(workspace: Workspace) -> None:
    with workspace.app() as c:
        h = workspace.headers("analyst")
        first = c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=h).json()
        again = c.post(
            "/v1/query", json={"sql": SQL.lower().replace("select", "SELECT"), "epsilon": 0.5}, headers=h
        ).json()
        budget = c.get("/v1/budget", headers=h).json()
    assert again["cached"] and again["epsilon_spent"] == 0.0
    assert again["rows"] == first["rows"] and again["intervals"] == first["intervals"]
    visits = next(b for b in budget if b["dataset"] == "visits")
    assert math.isclose(visits["spent"]["epsilon"], 0.5)


def test_answers_match_the_documented_schema(workspace: Workspace) -> None:
    with workspace.app() as c:
        h = workspace.headers("analyst")
        bodies = [
            c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=h).json(),
            c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=h).json(),
            c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5, "dry_run": True}, headers=h).json(),
        ]
        schema = c.get("/openapi.json").json()
    for body in bodies:
        QueryResponse.model_validate(body)
    assert "QueryResponse" in str(schema["paths"]["/v1/query"]["post"]["responses"]["200"])


def test_dry_run_reports_cost_and_accuracy_without_spending(workspace: Workspace) -> None:
    with workspace.app() as c:
        h = workspace.headers("analyst")
        dry = c.post("/v1/query", json={"sql": SQL, "accuracy": 50, "dry_run": True}, headers=h).json()
        budget = c.get("/v1/budget", headers=h).json()
    assert dry["dry_run"] and dry["rows"] is None and dry["epsilon_spent"] == 0.0
    assert math.isclose(dry["accuracy"]["visits"], 50.0, rel_tol=1e-6)
    assert dry["epsilon"] > 0
    assert all(b["spent"]["epsilon"] == 0.0 for b in budget)


def test_accuracy_target_derives_epsilon_and_meets_it(workspace: Workspace) -> None:
    sql = "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex"
    with workspace.app() as c:
        body = c.post("/v1/query", json={"sql": sql, "accuracy": 50}, headers=workspace.headers("analyst")).json()
    for cells in body["intervals"]:
        lo, hi = cells[1]
        assert math.isclose((hi - lo) / 2, 50.0, rel_tol=1e-6) or lo == 0.0
    assert body["epsilon_spent"] == body["epsilon"] > 0


def test_accuracy_on_a_query_without_count_or_sum_says_to_give_epsilon(workspace: Workspace) -> None:
    """A number as accuracy targets the first COUNT or SUM output column; group keys alone (SELECT DISTINCT, GROUP BY
    without an aggregate), other aggregates and values computed from aggregates have none: the refusal says so and
    what to give instead (it named an output column '' before), for a dry run too, and nothing is charged."""
    with workspace.app() as c:
        h = workspace.headers("analyst")
        for sql in (
            "SELECT DISTINCT diagnosis FROM visits",
            "SELECT region FROM visits GROUP BY region",
            "SELECT SUM(income) / COUNT(*) AS mean FROM visits",
            "SELECT region, AVG(age) AS mean_age FROM visits GROUP BY region",
        ):
            for dry_run in (False, True):
                r = c.post("/v1/query", json={"sql": sql, "accuracy": 50, "dry_run": dry_run}, headers=h)
                assert r.status_code == 400, (sql, r.text)
                err = r.json()["error"]
                assert err["code"] == "invalid_request", err
                assert "COUNT or SUM" in err["message"] and "Give epsilon instead" in err["message"], err
                assert "''" not in err["message"], err
        budget = c.get("/v1/budget", headers=h).json()
        # the alternative it names answers
        answered = c.post("/v1/query", json={"sql": "SELECT DISTINCT diagnosis FROM visits", "epsilon": 1}, headers=h)
    assert all(b["spent"]["epsilon"] == 0.0 and b["spent"]["delta"] == 0.0 for b in budget)
    assert answered.status_code == 200 and answered.json()["epsilon_spent"] == 1.0


def test_accuracy_as_a_number_targets_the_first_count_or_sum_column(workspace: Workspace) -> None:
    """An AVG before the COUNT is not the target (it was, and was refused as not a COUNT or SUM)."""
    sql = "SELECT sex, AVG(age) AS mean_age, COUNT(*) AS n FROM visits GROUP BY sex"
    with workspace.app() as c:
        r = c.post("/v1/query", json={"sql": sql, "accuracy": 50}, headers=workspace.headers("analyst"))
    assert r.status_code == 200, r.text
    for cells in r.json()["intervals"]:
        lo, hi = cells[2]
        assert math.isclose((hi - lo) / 2, 50.0, rel_tol=1e-6) or lo == 0.0


def test_rejected_sql_points_at_the_span(workspace: Workspace) -> None:
    with workspace.app() as c:
        r = c.post(
            "/v1/query",
            json={"sql": "SELECT region,\n  MAX(income) FROM visits GROUP BY region", "epsilon": 1},
            headers=workspace.headers("analyst"),
        )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "query_rejected" and err["reason"] == "min_max"
    assert (err["line"], err["column"]) == (2, 3)
    assert err["highlight"].lower() == "max(income)"
    assert "quantile" in err["message"].lower()


def test_auth_and_roles(workspace: Workspace) -> None:
    with workspace.app() as c:
        assert c.post("/v1/query", json={"sql": SQL, "epsilon": 1}).status_code == 401
        bad = {"Authorization": "Bearer bst_00000000_nope"}
        assert c.post("/v1/query", json={"sql": SQL, "epsilon": 1}, headers=bad).status_code == 401
        r = c.post("/v1/query", json={"sql": SQL, "epsilon": 1}, headers=workspace.headers("lf_author"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        ds = c.get("/v1/datasets", headers=workspace.headers("analyst")).json()
    visits = next(d for d in ds if d["dataset"] == "visits")
    assert "ssn" not in visits["columns"] and "count" not in str(visits).lower().replace("count(", "").replace(
        "accounting", ""
    )
    assert visits["privacy_unit"] == "patient_id" and visits["max_rows_per_unit"] == 10


def test_budget_exhausted_is_refused_before_running(workspace: Workspace) -> None:
    with workspace.app() as c:
        h = workspace.headers("analyst")
        ok = c.post("/v1/query", json={"sql": "SELECT COUNT(*) FROM visits", "epsilon": 9.5}, headers=h)
        assert ok.status_code == 200
        r = c.post("/v1/query", json={"sql": "SELECT COUNT(*) FROM visits WHERE age > 3", "epsilon": 1}, headers=h)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "budget_exhausted"


def test_pums_is_a_second_dataset_with_pid_as_unit(workspace: Workspace) -> None:
    with workspace.app() as c:
        h = workspace.headers("analyst")
        names = {d["dataset"] for d in c.get("/v1/datasets", headers=h).json()}
        body = c.post(
            "/v1/query",
            json={"sql": "SELECT sex, COUNT(*) AS n, AVG(age) AS age FROM pums GROUP BY sex", "epsilon": 1.0},
            headers=h,
        ).json()
        unit = c.post("/v1/query", json={"sql": "SELECT pid FROM pums GROUP BY pid", "epsilon": 1.0}, headers=h)
        budget = {b["dataset"]: b for b in c.get("/v1/budget", headers=h).json()}
    assert names == {"visits", "pums"}
    assert [row[0] for row in body["rows"]] == [0, 1]
    assert sum(row[1] for row in body["rows"]) == pytest.approx(1000, abs=60)
    assert unit.status_code == 400 and unit.json()["error"]["reason"] == "privacy_unit_column"
    assert budget["pums"]["spent"]["epsilon"] == 1.0 and budget["visits"]["spent"]["epsilon"] == 0.0


def test_a_value_that_cannot_be_cast_does_not_make_the_query_fail(workspace: Workspace) -> None:
    # A failing CAST on some row would be an error that depends on the rows (and DuckDB would quote the value).
    sql = "SELECT COUNT(*) AS n FROM visits WHERE CAST(diagnosis AS INTEGER) > 3"
    with workspace.app() as c:
        r = c.post("/v1/query", json={"sql": sql, "epsilon": 1.0}, headers=workspace.headers("analyst"))
    assert r.status_code == 200, r.text
    # No diagnosis code converts to an integer: the true count is 0, the noise scale k/ε = 10.
    assert r.json()["rows"][0][0] < 500


def test_bad_bodies_get_the_error_shape_before_any_charge(workspace: Workspace) -> None:
    bodies = [
        '{"sql": "SELECT COUNT(*) FROM visits", "epsilon": NaN}',
        '{"sql": "SELECT COUNT(*) FROM visits", "epsilon": true}',
        '{"sql": "SELECT COUNT(*) FROM visits", "epsilon": "0.1"}',
        '{"sql": "SELECT COUNT(*) FROM visits", "epsilon": 1e-7}',
        '{"sql": "SELECT COUNT(*) FROM visits", "epsilon": 1, "alpha": Infinity}',
        '{"sql": "SELECT COUNT(*) FROM visits", "accuracy": 1e-300}',
        '{"sql": "SELECT COUNT(*) FROM visits WHERE region = \'\\ud800\'", "epsilon": 1}',
        '{"sql": "SELECT COUNT(*) FROM visits WHERE ' + "abs(" * 2000 + "age" + ")" * 2000 + ' > 1", "epsilon": 1}',
        '{"sql": "SELECT COUNT(*) FROM visits", "epsilon": 1, "extra": 1}',
    ]
    with workspace.app() as c:
        h = {**workspace.headers("analyst"), "content-type": "application/json"}
        for body in bodies:
            r = c.post("/v1/query", content=body, headers=h)
            assert r.status_code == 400, (body[:80], r.text)
            assert r.json()["error"]["code"] in {"invalid_request", "query_rejected", "sql_syntax_error"}
        spent = c.get("/v1/budget", headers=workspace.headers("analyst")).json()[0]["spent"]["epsilon"]
    assert spent == 0.0


def test_a_cache_that_cannot_be_written_does_not_turn_a_release_into_an_error(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    with workspace.app() as c:
        core = c.app.state.bastion

        def full(*_: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(core.cache, "put", full)
        r = c.post(
            "/v1/query",
            json={"sql": "SELECT COUNT(*) FROM visits", "epsilon": 0.5},
            headers=workspace.headers("analyst"),
        )
    assert r.status_code == 200 and r.json()["epsilon_spent"] == 0.5


def test_private_key_queries_are_not_rationed_by_delta(workspace: Workspace) -> None:
    """Twelve private-key queries at ε = 0.2 (ε cap 10) all run: each spends the δ cap's share its ε is of the ε
    cap, where a fixed tenth of the δ cap refused the eleventh whatever ε was left."""
    with workspace.app() as c:
        h = workspace.headers("analyst")
        before = next(b for b in c.get("/v1/budget", headers=h).json() if b["dataset"] == "visits")
        cap_eps = before["spent"]["epsilon"] + before["remaining"]["epsilon"]
        cap_delta = before["spent"]["delta"] + before["remaining"]["delta"]
        for i in range(12):
            sql = f"SELECT diagnosis, COUNT(*) FROM visits WHERE age > {i} GROUP BY diagnosis"
            dry = c.post("/v1/query", json={"sql": sql, "epsilon": 0.2, "dry_run": True}, headers=h).json()
            assert dry["delta"] == pytest.approx(cap_delta * 0.2 / cap_eps)  # the dry run shows the δ
            r = c.post("/v1/query", json={"sql": sql, "epsilon": 0.2}, headers=h)
            assert r.status_code == 200, (i, r.text)
        after = next(b for b in c.get("/v1/budget", headers=h).json() if b["dataset"] == "visits")
    assert after["spent"]["delta"] == pytest.approx(12 * cap_delta * 0.2 / cap_eps, rel=1e-6)
