"""DP model evaluation (`POST /v1/evaluate`, `GET /v1/models`, `Client.evaluate`, `bastion evaluate`): refusals
before the charge, the grant, the charge → audit → cache path, the exact counts against an independent
computation, and the counts' and metrics' intervals against the truth at their promised rate."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from audit.log import AuditLog
from gateway.client import Client
from gateway.demo import write_evaluation_demo
from gateway.evaluation import exact_counts, matrix_metrics, plan_evaluation, release
from gateway.predictions import PredictionsStore, attach
from gateway.service import Bastion
from policies.schema import load_policy
from tests.conftest import BIN, ROLES, AppClient, Workspace, build_workspace

N_ROWS = 6_000
SENIOR = "CASE WHEN age >= 65 THEN 'senior' ELSE 'adult' END"


@pytest.fixture(scope="module")
def evaluation_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return write_evaluation_demo(tmp_path_factory.mktemp("evaluation"), n_rows=N_ROWS, seed=5)


@pytest.fixture
def ws(tmp_path: Path, evaluation_source: tuple[Path, Path, Path]) -> Workspace:
    data, policy, predictions = evaluation_source
    workspace = build_workspace(tmp_path, [(policy, data)], ROLES)
    bastion = Bastion(workspace.settings)
    try:
        attach(bastion, "visits", "triage-v3", predictions)
        attach(bastion, "visits", "copy", predictions)
    finally:
        bastion.close()
    return workspace


def _spent(c: AppClient, ws: Workspace, role: str = "analyst") -> float:
    budget = c.get("/v1/budget", headers=ws.headers(role)).json()
    return sum(b["spent"]["epsilon"] for b in budget)


def _records(ws: Workspace, event: str = "evaluate") -> list[dict[str, Any]]:
    return [r for r in AuditLog(ws.settings.audit_dir).records() if r["event"] == event]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "nope", "epsilon": 1.0}, 400, "no predictions attached"),
        ({"epsilon": 1.0}, 400, "give model"),
        ({"model": "triage-v3", "models": ["copy"], "epsilon": 1.0}, 400, "not both"),
        ({"models": ["copy", "copy"], "epsilon": 1.0}, 400, "named twice"),
        ({"model": "triage-v3"}, 400, "give epsilon or accuracy"),
        ({"model": "triage-v3", "epsilon": 1.0, "accuracy": 5.0}, 400, "give epsilon or accuracy"),
        ({"model": "triage-v3", "epsilon": 0.0}, 400, "epsilon must be"),
        ({"model": "triage-v3", "epsilon": 1.0, "metrics": ["auc"]}, 400, "metrics must be"),
        ({"model": "triage-v3", "epsilon": 1.0, "slices": ["triage_label"]}, 400, "labeling functions only"),
        ({"model": "triage-v3", "epsilon": 1.0, "slices": ["ssn"]}, 400, "unknown column"),
        ({"model": "triage-v3", "epsilon": 1.0, "slices": ["patient_id"]}, 400, "privacy-unit"),
        ({"model": "triage-v3", "epsilon": 1.0, "slices": ["income"]}, 400, "public set of values"),
        ({"model": "triage-v3", "epsilon": 1.0, "slices": ["COUNT(*)"]}, 400, "aggregate"),
        ({"model": "triage-v3", "epsilon": 1.0, "slices": ["age +"]}, 400, "syntax"),
        ({"model": "triage-v3", "epsilon": 1.0, "slices": ["age / 'x'"]}, 400, ""),
        ({"model": "triage-v3", "epsilon": 1.0, "slices": ["sex; SELECT 1"]}, 400, "one expression"),
        ({"model": "triage-v3", "epsilon": 1.0, "slices": ["sex", "sex"]}, 400, "given twice"),
        ({"model": "triage-v3", "epsilon": 1.0, "slices": ["'constant'"]}, 400, "of a column"),
    ],
)
def test_refusals_come_before_any_charge_and_are_audited(
    ws: Workspace, body: dict[str, Any], status: int, needle: str
) -> None:
    with ws.app() as c:
        r = c.post("/v1/evaluate", json={"dataset": "visits", **body}, headers=ws.headers("analyst"))
        assert r.status_code == status, r.text
        assert needle in r.json()["error"]["message"]
        assert _spent(c, ws) == 0.0
    (record,) = _records(ws)
    assert record["decision"] == "denied" and "cost" not in record


def test_a_slice_refusal_points_at_its_span(ws: Workspace) -> None:
    with ws.app() as c:
        r = c.post(
            "/v1/evaluate",
            json={
                "dataset": "visits",
                "model": "triage-v3",
                "epsilon": 1.0,
                "slices": ["CASE WHEN triage_note = 'x' THEN 1 ELSE 0 END"],
            },
            headers=ws.headers("analyst"),
        )
    error = r.json()["error"]
    assert r.status_code == 400 and error["highlight"] == "triage_note" and error["column"] == 11


def test_the_grant_is_enforced(ws: Workspace) -> None:
    with ws.app() as c:
        for role in ("lf_author", "auditor"):
            r = c.post(
                "/v1/evaluate",
                json={"dataset": "visits", "model": "triage-v3", "epsilon": 1.0},
                headers=ws.headers(role),
            )
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert c.get("/v1/models", headers=ws.headers("lf_author")).json() == []
    assert [r["reason"] for r in _records(ws)] == ["forbidden", "forbidden"]


def test_stale_predictions_are_refused_after_a_new_registration(
    ws: Workspace, evaluation_source: tuple[Path, Path, Path]
) -> None:
    data, policy, _ = evaluation_source
    bastion = Bastion(ws.settings, read_only=False)
    try:
        bastion.engine.register(load_policy(policy), data)
    finally:
        bastion.close()
    with ws.app() as c:
        r = c.post(
            "/v1/evaluate",
            json={"dataset": "visits", "model": "triage-v3", "epsilon": 1.0},
            headers=ws.headers("analyst"),
        )
        assert r.status_code == 400 and "attached again" in r.json()["error"]["message"]
        (listed,) = c.get("/v1/models", headers=ws.headers("analyst")).json()
        assert {m["model"]: m["current"] for m in listed["models"]} == {"copy": False, "triage-v3": False}
        assert _spent(c, ws) == 0.0


def test_the_gold_label_stays_unusable_in_queries(ws: Workspace) -> None:
    with ws.app() as c:
        for sql in (
            "SELECT triage_label, COUNT(*) FROM visits GROUP BY triage_label",
            "SELECT COUNT(*) FROM visits WHERE triage_label = 'urgent'",
            "SELECT SUM(CASE WHEN triage_label = 'urgent' THEN 1 ELSE 0 END) FROM visits",
        ):
            r = c.post("/v1/query", json={"sql": sql, "epsilon": 1.0}, headers=ws.headers("analyst"))
            assert r.status_code == 400, sql
            assert r.json()["error"]["reason"] == "labeling_only_column"
        assert _spent(c, ws) == 0.0


def test_an_evaluation_is_charged_audited_and_cached(ws: Workspace) -> None:
    body = {"dataset": "visits", "models": ["triage-v3", "copy"], "slices": ["sex", SENIOR], "epsilon": 0.5}
    with ws.app() as c:
        dry = c.post("/v1/evaluate", json={**body, "dry_run": True}, headers=ws.headers("analyst")).json()
        assert dry["dry_run"] and dry["metrics"] is None and _spent(c, ws) == 0.0
        first = c.post("/v1/evaluate", json=body, headers=ws.headers("analyst")).json()
        again = c.post("/v1/evaluate", json=body, headers=ws.headers("analyst")).json()
        assert math.isclose(_spent(c, ws), 0.5)
        models = c.get("/v1/models", headers=ws.headers("analyst")).json()
    assert first["epsilon_spent"] == 0.5 and not first["cached"]
    assert again["cached"] and again["epsilon_spent"] == 0.0 and again["metrics"] == first["metrics"]
    # k = 10 rows per unit, 2 models, 2 slice dimensions
    assert first["sensitivity"] == 10 * 2 * 2 and math.isclose(first["scale"], 40 / 0.5)
    assert dry["cells"] == first["cells"] == 2 * (3 + 2) * 4 == len(first["confusion"]) * 4
    assert {(m["model"], m["slice"], m["value"]) for m in first["confusion"]} == {
        (model, s, v)
        for model in ("triage-v3", "copy")
        for s, values in (("sex", ["F", "M", "X"]), (SENIOR, ["adult", "senior"]))
        for v in values
    }
    kinds = {(m["metric"], m["class"]) for m in first["metrics"]}
    assert kinds == {("accuracy", None)} | {
        (k, cls) for k in ("precision", "recall", "f1") for cls in ("macro", "urgent", "routine")
    }
    assert all(0.0 <= m["low"] <= m["high"] <= 1.0 for m in first["metrics"])
    assert [m["model"] for m in models[0]["models"]] == ["copy", "triage-v3"]
    assert "rows" not in models[0]["models"][0] and "digest" not in models[0]["models"][0]
    phases = [(r["phase"], r["reason"], r["cost"]["epsilon"]) for r in _records(ws)]
    assert phases == [
        ("released", "dry_run", 0.0),
        ("admitted", "ok", 0.5),
        ("released", "ok", 0.5),
        ("released", "cached", 0.0),
    ]


def test_accuracy_sets_the_half_width_of_each_count(ws: Workspace) -> None:
    with ws.app() as c:
        r = c.post(
            "/v1/evaluate",
            json={"dataset": "visits", "model": "triage-v3", "accuracy": 100.0, "dry_run": True},
            headers=ws.headers("analyst"),
        ).json()
    assert math.isclose(r["count_half_width"], 100.0, rel_tol=1e-6)
    assert r["epsilon"] < 1.0


def _independent_truth(ws: Workspace, predictions: Path) -> dict[tuple[str, str], np.ndarray]:
    """Confusion matrices by sex computed outside Bastion's code: the bounded rows read with DuckDB, joined with
    the predictions file in pandas."""
    with duckdb.connect(str(ws.settings.database), read_only=True) as con:
        rows = con.execute('SELECT visit_id, sex, triage_label FROM "bounded_visits"').df()
    preds = pq.read_table(predictions).to_pandas()
    joined = rows.merge(preds, on="visit_id")
    out = {}
    for sex in ("F", "M", "X"):
        part = joined[joined["sex"] == sex]
        m = np.zeros((2, 2), dtype=np.int64)
        for gi, g in enumerate(("urgent", "routine")):
            for pi, p in enumerate(("urgent", "routine")):
                m[gi, pi] = int(((part["triage_label"] == g) & (part["label"] == p)).sum())
        out[("triage-v3", sex)] = m
    return out


def test_counts_and_metrics_hold_their_intervals_at_the_promised_rate(
    ws: Workspace, evaluation_source: tuple[Path, Path, Path]
) -> None:
    bastion = Bastion(ws.settings)
    try:
        policy, version = bastion.engine.policy("visits")
        plan = plan_evaluation(
            bastion, policy, version, {"model": "triage-v3", "slices": ["sex"], "epsilon": 0.5, "alpha": 0.05}
        )
        exact = exact_counts(plan, bastion.engine, PredictionsStore(ws.settings.predictions_dir))
    finally:
        bastion.close()
    truth = _independent_truth(ws, evaluation_source[2])
    assert exact == [int(x) for sex in ("F", "M", "X") for x in truth[("triage-v3", sex)].ravel()]
    assert sum(exact) > N_ROWS * 0.9  # nearly every row is kept (k = 10) and predicted
    true_metrics = {
        sex: {
            (m.name, m.cls): m.value
            for m in matrix_metrics(truth[("triage-v3", sex)], 0.0, plan.classes, plan.metrics, True)
        }
        for sex in ("F", "M", "X")
    }
    draws = 400
    count_hits = count_total = metric_misses = metric_total = 0
    for _ in range(draws):
        answer = release(plan, exact)
        for matrix in answer["confusion"]:
            true = truth[("triage-v3", matrix["value"])].ravel()
            lows = np.array([iv[0] for row in matrix["intervals"] for iv in row])
            highs = np.array([iv[1] for row in matrix["intervals"] for iv in row])
            count_hits += int(((lows <= true) & (true <= highs)).sum())
            count_total += len(true)
        by_matrix: dict[str, bool] = {}
        for m in answer["metrics"]:
            value = true_metrics[m["value"]][(m["metric"], m["class"])]
            if value is not None:
                inside = m["low"] - 1e-12 <= value <= m["high"] + 1e-12
                by_matrix[m["value"]] = by_matrix.get(m["value"], True) and inside
        metric_misses += sum(not ok for ok in by_matrix.values())
        metric_total += len(by_matrix)
    # Each count's interval holds with probability at least 0.95: the observed rate may fall below 0.95 by at
    # most 4 binomial standard deviations (the counts of one draw are independent).
    rate = count_hits / count_total
    assert rate >= 0.95 - 4 * math.sqrt(0.95 * 0.05 / count_total), rate
    # All metrics of one matrix hold together with probability at least 0.95 (Bonferroni over its cells).
    assert metric_misses / metric_total <= 0.05 + 4 * math.sqrt(0.95 * 0.05 / metric_total)


def test_metric_intervals_are_the_range_over_the_box() -> None:
    counts = np.array([[50.0, 10.0], [5.0, 35.0]])
    (acc, *_) = matrix_metrics(counts, 5.0, ["a", "b"], ("accuracy",), False)
    assert math.isclose(acc.value or 0.0, 85 / 100)
    assert math.isclose(acc.low, (45 + 30) / (75 + 15 + 10)) and math.isclose(acc.high, (55 + 40) / (95 + 5 + 0))
    precision = [m for m in matrix_metrics(counts, 5.0, ["a", "b"], ("precision",), True) if m.cls == "a"][0]
    assert math.isclose(precision.value or 0.0, 50 / 55)
    assert math.isclose(precision.low, 45 / (45 + 10)) and math.isclose(precision.high, 55 / (55 + 0))
    empty = matrix_metrics(np.zeros((2, 2)), 3.0, ["a", "b"], ("recall",), False)
    assert empty[0].value is None and (empty[0].low, empty[0].high) == (0.0, 1.0)


def test_client_and_cli(ws: Workspace) -> None:
    with ws.app() as c:
        client = Client("http://testserver", ws.tokens["analyst"], transport=c._transport)
        frame = client.evaluate("visits", ["triage-v3", "copy"], slices=[SENIOR], epsilon=1.0, per_class=False)
        assert client.models()[0]["dataset"] == "visits"
    assert list(frame.columns) == [
        "model",
        "slice",
        "slice_value",
        "metric",
        "class",
        "value",
        "low",
        "high",
        "noise_dominated",
    ]
    assert len(frame) == 2 * 2 * 4  # models × slice values × (accuracy + three macro metrics)
    assert frame.attrs["epsilon_spent"] == 1.0
    assert ((frame["low"] <= frame["high"]) & frame["value"].between(0, 1)).all()
    out = subprocess.run(
        [str(BIN), "evaluate", "--help"], capture_output=True, text=True, check=True, env={**os.environ}
    ).stdout
    assert "--slice" in out and "--model" in out


def test_the_model_card_of_an_evaluation(ws: Workspace) -> None:
    hostile = "CASE WHEN sex = 'F' THEN '<script>x</script>' ELSE 'b' END"
    body = {"dataset": "visits", "models": ["triage-v3", "copy"], "slices": ["sex", hostile], "epsilon": 0.2}
    with ws.app() as c:
        answer = c.post("/v1/evaluate", json=body, headers=ws.headers("analyst")).json()
        dry = c.post("/v1/evaluate", json={**body, "dry_run": True}, headers=ws.headers("analyst")).json()
        spent = _spent(c, ws)
        html = c.get(f"/v1/evaluate/{answer['query_id']}/card", headers=ws.headers("analyst"))
        md = c.get(f"/v1/evaluate/{answer['query_id']}/card?format=markdown", headers=ws.headers("analyst"))
        other = c.get(f"/v1/evaluate/{answer['query_id']}/card", headers=ws.headers("admin"))
        unknown = c.get("/v1/evaluate/0123abcd/card", headers=ws.headers("analyst"))
        of_dry_run = c.get(f"/v1/evaluate/{dry['query_id']}/card", headers=ws.headers("analyst"))
        assert _spent(c, ws) == spent == 0.2  # a card costs nothing
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    csp = html.headers["content-security-policy"]
    assert csp.startswith("default-src 'none'; style-src 'nonce-") and "script-src" not in csp
    page = html.text
    assert "<script>" not in page and "&lt;script&gt;" in page and "src=" not in page and "href=" not in page
    assert page.count("<svg") == 2 and page.count("<circle") <= 2 * (3 + 2)
    assert "triage-v3" in page and answer["dataset_version"] in page and "Privacy cost" in page
    noisy = [m for m in answer["metrics"] if m["noise_dominated"]]
    assert noisy and page.count("noise-dominated") >= len(noisy)  # ε = 0.2 leaves sex = X noise-dominated
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    text = md.text
    assert text.startswith("# Model card: triage-v3, copy on visits")
    for heading in ("## Metrics (95% intervals)", "## Privacy cost", "## Caveats"):
        assert heading in text
    assert f"ε = {answer['epsilon']:g}" in text and "Small slices" in text
    assert len([line for line in text.splitlines() if line.startswith("| triage-v3 |")]) == len(
        [m for m in answer["metrics"] if m["model"] == "triage-v3"]
    )
    for refused in (other, unknown, of_dry_run):
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    cards = [r for r in _records(ws) if isinstance(r.get("request"), dict) and "card" in r["request"]]
    assert [(r["decision"], r["reason"]) for r in cards] == [
        ("allowed", "card"),
        ("allowed", "card"),
        ("denied", "not_found"),
        ("denied", "not_found"),
        ("denied", "not_found"),
    ]


def test_attach_while_serving_then_evaluate_and_list_from_the_cli(
    ws: Workspace, evaluation_source: tuple[Path, Path, Path]
) -> None:
    from tests.conftest import gateways

    workspace = str(ws.settings.workspace)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN), *args],
            env={**os.environ, "BASTION_WORKSPACE": workspace, **env},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    with gateways(1, "--workspace", workspace) as (url,):
        added = run("predictions", "add", "visits", str(evaluation_source[2]), "--model", "late")
        assert added.returncode == 0, added.stderr  # the serving gateway holds the database read-only: no conflict
        client = {"BASTION_URL": url, "BASTION_TOKEN": ws.tokens["analyst"]}
        out = run(
            "evaluate",
            "visits",
            "--model",
            "late",
            "--model",
            "triage-v3",
            "--slice",
            "sex",
            "--epsilon",
            "0.5",
            "--json",
            **client,
        )
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        table = run("evaluate", "visits", "--model", "late", "--slice", SENIOR, "--epsilon", "0.5", **client)
        models = run("models", "--json", **client)
        refused = run("evaluate", "visits", "--model", "late", "--slice", "triage_label", "--epsilon", "1", **client)
    assert [m["model"] for m in answer["models"]] == ["late", "triage-v3"] and answer["epsilon_spent"] == 0.5
    assert table.returncode == 0 and "senior" in table.stdout and "remaining on visits" in table.stdout
    assert [m["model"] for m in json.loads(models.stdout)[0]["models"]] == ["copy", "late", "triage-v3"]
    assert refused.returncode == 1 and "labeling functions only" in refused.stderr


def test_a_failure_after_the_charge_releases_the_default_input(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.evaluation as evaluation

    body = {"dataset": "visits", "model": "triage-v3", "slices": ["sex"], "epsilon": 0.5}
    with ws.app() as c:
        good = c.post("/v1/evaluate", json=body, headers=ws.headers("analyst")).json()

        def broken(*args: object) -> list[int]:
            raise OSError("the predictions file went away")

        monkeypatch.setattr(evaluation, "exact_counts", broken)
        r = c.post("/v1/evaluate", json={**body, "epsilon": 0.6}, headers=ws.headers("analyst"))
    assert r.status_code == 200
    failed = r.json()
    assert [(m["model"], m["value"]) for m in failed["confusion"]] == [
        (m["model"], m["value"]) for m in good["confusion"]
    ]
    assert len(failed["metrics"]) == len(good["metrics"]) and failed["epsilon_spent"] == 0.6
    released = [r for r in _records(ws) if r.get("phase") == "released"]
    assert [(r["reason"], r.get("error")) for r in released] == [("ok", None), ("fallback", "OSError")]


def test_the_cli_table_shows_slice_values_as_text(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli.evaluate import print_evaluation

    metric = {"model": "m[/x]", "slice": "CASE WHEN sex = 'F' THEN '[red]f' END", "value": "[/x]", "metric": "accuracy"}
    raw = {
        "dataset": "visits",
        "dataset_version": "1-ab",
        "alpha": 0.05,
        "metrics": [{**metric, "class": None, "estimate": 0.5, "low": 0.25, "high": 0.75, "noise_dominated": False}],
    }
    print_evaluation(raw)
    out = capsys.readouterr().out
    assert "[/x]" in out and "[red]f" in out


def test_after_an_append_stale_predictions_are_refused_before_the_charge_and_attached_again_read_the_new_version(
    ws: Workspace, evaluation_source: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    import pyarrow as pa

    data, _, predictions = evaluation_source
    table = pq.read_table(data).slice(0, 50)
    keys = pa.array(range(10**9, 10**9 + 50), type=table.schema.field("visit_id").type)
    batch = tmp_path / "batch.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("visit_id"), "visit_id", keys), batch)
    body = {"dataset": "visits", "model": "triage-v3", "epsilon": 1.0}
    with ws.app() as c:
        bastion: Bastion = c.app.state.bastion
        appended, _ = bastion.engine.append("visits", batch)
        refused = c.post("/v1/evaluate", json=body, headers=ws.headers("analyst"))
        assert refused.status_code == 400 and refused.json()["error"]["reason"] == "stale_predictions"
        assert _spent(c, ws) == 0.0
        attach(bastion, "visits", "triage-v3", predictions, replace=True)
        answer = c.post("/v1/evaluate", json=body, headers=ws.headers("analyst"))
        assert answer.status_code == 200, answer.text
        assert answer.json()["dataset_version"] == appended.version
    records = _records(ws)
    # the refusal is recorded under the error's reason
    assert [r["reason"] for r in records if r["decision"] == "denied"] == ["stale_predictions"]
    assert {r["version"] for r in records if r.get("phase") in {"admitted", "released"}} == {appended.version}
