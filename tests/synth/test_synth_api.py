"""DP proxies through the real app: columns and types, nothing private, accounting, caching, downloads, report."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from pathlib import Path

import pandas as pd

from audit.log import AuditLog
from gateway.client import Client
from gateway.sql.price import default_delta
from tests.conftest import ROLES, Workspace, build_workspace
from tests.synth.helpers import USABLE, private_rows, proxy_frame, variant_workspace, wait

HIDDEN_OR_LABELING = {"patient_id", "ssn", "triage_note", "triage_label"}


def test_dp_proxy_has_the_usable_columns_and_types_and_no_private_row(workspace: Workspace) -> None:
    h = workspace.headers("analyst")
    with workspace.app() as c:
        r = c.post("/v1/synth", json={"dataset": "visits", "epsilon": 1.0, "rows": 20_000, "seed": 5}, headers=h)
        assert r.status_code == 200, r.text
        job = wait(c, h, r.json()["job_id"])
        assert job["status"] == "done", job
        proxy = proxy_frame(c, h, job["job_id"])
        report = c.get(f"/v1/synth/{job['job_id']}/report", headers=h).json()
    # Columns without a public domain may be dropped only when no key passes DP key selection.
    assert set(report["dropped"]) <= {"diagnosis"}
    assert list(proxy.columns) == [col for col in USABLE if col not in report["dropped"]]
    assert not HIDDEN_OR_LABELING & set(proxy.columns)
    assert len(proxy) == 20_000
    # A column is nullable (Int64) only if its DP NULL bin cleared the noise; values stay within bounds.
    for name, (lo, hi) in {"age": (0, 110), "length_of_stay": (0, 60)}.items():
        assert pd.api.types.is_integer_dtype(proxy[name]) and proxy[name].dropna().between(lo, hi).all()
    assert proxy["income"].dtype == "float64" and proxy["income"].dropna().between(0, 500_000).all()
    assert (proxy["income"].dropna().round(2) == proxy["income"].dropna()).all()
    assert set(proxy["sex"].dropna()) <= {"F", "M", "X"}
    assert set(proxy["region"].dropna()) <= {"north", "south", "east", "west", "central"}
    days = proxy["visit_day"].dropna()
    assert all(isinstance(d, dt.date) for d in days.head(50))
    assert days.min() >= dt.date(2015, 1, 1) and days.max() <= dt.date(2026, 12, 31)
    private = private_rows(workspace)
    cols = list(proxy.columns)
    real = private[cols].copy()
    real["visit_day"] = pd.to_datetime(real["visit_day"]).dt.date
    assert proxy.merge(real.drop_duplicates(), on=cols, how="inner").empty


def test_pums_proxy_keeps_int_domains_and_booleans(workspace: Workspace) -> None:
    h = workspace.headers("analyst")
    with workspace.app() as c:
        r = c.post(
            "/v1/synth", json={"dataset": "pums", "epsilon": 2.0, "rows": 3_000, "method": "dpcopula_direct"}, headers=h
        )
        assert r.status_code == 200, r.text
        job = wait(c, h, r.json()["job_id"])
        proxy = proxy_frame(c, h, job["job_id"])
    assert list(proxy.columns) == ["age", "sex", "educ", "race", "income", "married"]
    assert proxy["sex"].dtype == "int64" and set(proxy["sex"]) <= {0, 1}
    assert proxy["married"].dtype == "bool"
    assert proxy["educ"].between(1, 16).all() and proxy["race"].between(1, 6).all()


def test_privacy_unit_gets_fresh_ids(tmp_path: Path, demo_source: tuple[Path, Path]) -> None:
    ws = variant_workspace(
        tmp_path / "unit",
        demo_source,
        [("patient_id:     {type: int, usage: hidden}", "patient_id:     {type: int, bounds: [0, 100000000]}")],
    )
    h = ws.headers("analyst")
    with ws.app() as c:
        r = c.post(
            "/v1/synth",
            json={"dataset": "visits", "epsilon": 1.0, "rows": 5_000, "method": "dpcopula_direct"},
            headers=h,
        )
        job = wait(c, h, r.json()["job_id"])
        proxy = proxy_frame(c, h, job["job_id"])
    assert list(proxy.columns)[0] == "patient_id"
    assert proxy["patient_id"].str.startswith("syn_").all() and proxy["patient_id"].is_unique
    real_ids = set(private_rows(ws)["patient_id"].astype(str))
    assert not real_ids & set(proxy["patient_id"])


def test_proxy_charges_its_epsilon_once_and_repeat_is_free(workspace: Workspace) -> None:
    h = workspace.headers("analyst")
    body = {"dataset": "visits", "epsilon": 0.5, "rows": 2_000, "seed": 1, "method": "dpcopula_direct"}
    with workspace.app() as c:
        first = c.post("/v1/synth", json=body, headers=h).json()
        assert first["epsilon_spent"] == 0.5 and not first["cached"]
        assert math.isclose(first["delta_spent"], first["delta"])
        wait(c, h, first["job_id"])
        again = c.post("/v1/synth", json=body, headers=h).json()
        other_seed = c.post("/v1/synth", json={**body, "seed": 2}, headers=h).json()
        budget = next(b for b in c.get("/v1/budget", headers=h).json() if b["dataset"] == "visits")
        # no δ given: the δ cap's share that ε is of the ε cap, as for a query
        limit = budget["limit"]
        assert math.isclose(first["delta"], default_delta(limit["delta"], 0.5, limit["epsilon"]))
        a = proxy_frame(c, h, first["job_id"])
        b = proxy_frame(c, h, again["job_id"])
        wait(c, h, other_seed["job_id"])
    assert again["cached"] and again["epsilon_spent"] == 0.0 and again["job_id"] == first["job_id"]
    assert a.equals(b)
    assert other_seed["epsilon_spent"] == 0.5 and other_seed["job_id"] != first["job_id"]
    assert math.isclose(budget["spent"]["epsilon"], 1.0)
    assert math.isclose(budget["spent"]["delta"], 2 * first["delta"])
    assert first["dataset_version"] and first["policy_fingerprint"]


def test_over_budget_is_refused_before_any_job_exists(workspace: Workspace) -> None:
    h = workspace.headers("analyst")
    jobs_dir = workspace.settings.workspace / "synth" / "jobs"
    with workspace.app() as c:
        r = c.post("/v1/synth", json={"dataset": "visits", "epsilon": 10.5, "rows": 1_000}, headers=h)
        budget = next(b for b in c.get("/v1/budget", headers=h).json() if b["dataset"] == "visits")
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exhausted"
    assert budget["spent"]["epsilon"] == 0.0
    assert not jobs_dir.exists() or not any(jobs_dir.iterdir())


def test_synth_needs_the_grant_and_other_principals_see_nothing(workspace: Workspace) -> None:
    with workspace.app() as c:
        r = c.post("/v1/synth", json={"dataset": "visits", "epsilon": 1.0}, headers=workspace.headers("lf_author"))
        assert r.status_code == 403
        h = workspace.headers("analyst")
        job = c.post(
            "/v1/synth", json={"dataset": "visits", "epsilon": 0.2, "rows": 500, "method": "dpcopula_direct"}, headers=h
        ).json()
        wait(c, h, job["job_id"])
        other = c.get(f"/v1/synth/{job['job_id']}", headers=workspace.headers("auditor"))
        assert other.status_code == 404
        denied = [r for r in AuditLog(workspace.settings.audit_dir).records() if r["event"] == "synth_access"]
        assert denied[-1]["decision"] == "denied" and denied[-1]["actor"]["role"] == "auditor"
        # A refused download or report is recorded under the action's own event name, like an allowed one.
        other_h = workspace.headers("auditor")
        assert c.get(f"/v1/synth/{job['job_id']}/download", headers=other_h).status_code == 404
        assert c.get(f"/v1/synth/{job['job_id']}/report", headers=other_h).status_code == 404
        records = list(AuditLog(workspace.settings.audit_dir).records())
        assert [(r["event"], r["decision"], r["reason"]) for r in records[-2:]] == [
            ("synth_download", "denied", "not_owner"),
            ("synth_report", "denied", "not_owner"),
        ]
        bad = c.post("/v1/synth", json={"dataset": "visits", "epsilon": 1.0, "method": "magic"}, headers=h)
        assert bad.status_code == 400


def test_csv_download_report_pages_and_client(workspace: Workspace) -> None:
    h = workspace.headers("analyst")
    with workspace.app() as c:
        client = Client("http://testserver", workspace.tokens["analyst"], transport=c._transport)
        frame = client.synth("visits", epsilon=0.3, rows=1_000, seed=3, method="dpcopula_direct", poll=0.1)
        job_id = frame.attrs["job_id"]
        csv = proxy_frame(c, h, job_id, fmt="csv")
        report = client.synth_report(job_id)
        index = c.get(f"/v1/synth/{job_id}/report/index.html", headers=h)
        page = c.get(f"/v1/synth/{job_id}/report/column_age.html", headers=h)
        escape = c.get(f"/v1/synth/{job_id}/report/..%2Fjob.json", headers=h)
    assert len(frame) == 1_000 and list(csv.columns) == list(frame.columns)
    assert frame.attrs["epsilon"] == 0.3
    assert index.status_code == 200 and "column_age.html" in index.text
    assert page.status_code == 200 and "<svg" in page.text
    assert escape.status_code == 404
    assert set(report["columns"]) == set(frame.columns)
    assert "column_shapes" in report["scores"]


def test_missing_values_follow_the_dp_null_bins(tmp_path: Path, pums_source: tuple[Path, Path]) -> None:
    data, policy = pums_source
    ws = build_workspace(tmp_path, [(policy, data.with_name("PUMS_null.csv"))], ROLES)
    h = ws.headers("analyst")
    with ws.app() as c:
        r = c.post("/v1/synth", json={"dataset": "pums", "epsilon": 4.0, "rows": 4_000, "seed": 2}, headers=h)
        job = wait(c, h, r.json()["job_id"])
        assert job["status"] == "done", job
        proxy = proxy_frame(c, h, job["job_id"])
    truth = private_rows(ws, "pums")
    for name in ("age", "sex", "educ", "income", "married"):
        # Null counts of ~100 rows carry noise of scale 1/ε_column = 1.5; sampling 4,000 rows adds ±0.01.
        assert abs(proxy[name].isna().mean() - truth[name].isna().mean()) < 0.03, name
    assert str(proxy["age"].dtype) == "Int64" and str(proxy["married"].dtype) == "boolean"


def test_audit_trail_of_a_proxy(workspace: Workspace) -> None:
    h = workspace.headers("analyst")
    with workspace.app() as c:
        job = c.post(
            "/v1/synth", json={"dataset": "visits", "epsilon": 0.2, "rows": 500, "method": "dpcopula_direct"}, headers=h
        ).json()
        wait(c, h, job["job_id"])
        content = c.get(f"/v1/synth/{job['job_id']}/download", headers=h).content
    records = AuditLog(workspace.settings.audit_dir).records()
    synth = [r for r in records if r["event"] == "synth"]
    assert [r["phase"] for r in synth] == ["admitted", "released", "completed"]
    assert synth[0]["cost"]["epsilon"] == 0.2 and synth[0]["request"]["non_dp"] is False
    assert synth[2]["non_dp"] is False
    download = [r for r in records if r["event"] == "synth_download"]
    assert len(download) == 1 and download[0]["release_digest"] == hashlib.sha256(content).hexdigest()
    assert download[0]["actor"]["principal"] == "alice"


def test_interrupted_job_resumes_from_its_stored_model_at_no_cost(workspace: Workspace) -> None:
    h = workspace.headers("analyst")
    with workspace.app() as c:
        job = c.post(
            "/v1/synth",
            json={"dataset": "visits", "epsilon": 0.3, "rows": 800, "seed": 4, "method": "dpcopula_direct"},
            headers=h,
        ).json()
        wait(c, h, job["job_id"])
        before = proxy_frame(c, h, job["job_id"])
    # Simulate a crash after the DP measurements: the job is still "running" and has no proxy yet.
    job_dir = workspace.settings.workspace / "synth" / "jobs" / job["job_id"]
    record = json.loads((job_dir / "job.json").read_text())
    record.update(status="running", progress=0.3)
    (job_dir / "job.json").write_text(json.dumps(record))
    (job_dir / "proxy.parquet").unlink()
    model = (job_dir / "model.json").read_text()
    with workspace.app() as c:  # a restarted gateway
        done = wait(c, h, job["job_id"])
        after = proxy_frame(c, h, job["job_id"])
        budget = next(b for b in c.get("/v1/budget", headers=h).json() if b["dataset"] == "visits")
    assert done["status"] == "done" and (job_dir / "model.json").read_text() == model
    assert after.equals(before)  # same DP model, same seed: the same proxy
    assert math.isclose(budget["spent"]["epsilon"], 0.3)
