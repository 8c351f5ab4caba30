"""The non-DP SDV proxy: refused without the policy's opt-in, waits for an admin approval made on the host with
the CLI, is checked for disclosure before release, and is audited as non-DP at every step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from audit.log import AuditLog
from tests.conftest import Workspace
from tests.synth.helpers import proxy_frame, variant_workspace, wait


def _records(ws: Workspace, event: str) -> list[dict]:
    return [r for r in AuditLog(ws.settings.audit_dir).records() if r.get("event") == event]


def test_non_dp_refused_without_policy_opt_in(workspace: Workspace) -> None:
    h = workspace.headers("analyst")
    with workspace.app() as c:
        r = c.post("/v1/synth", json={"dataset": "visits", "rows": 1_000, "method": "sdv_gaussian_copula"}, headers=h)
        budget = c.get("/v1/budget", headers=h).json()
    assert r.status_code == 403 and r.json()["error"]["code"] == "non_dp_not_allowed"
    denied = _records(workspace, "synth")[-1]
    assert denied["decision"] == "denied" and denied["reason"] == "non_dp_not_allowed"
    assert denied["request"]["non_dp"] is True
    assert all(b["spent"]["epsilon"] == 0 for b in budget)
    jobs = workspace.settings.workspace / "synth" / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir())


def test_non_dp_needs_approval_and_is_audited(tmp_path: Path, demo_source: tuple[Path, Path]) -> None:
    ws = variant_workspace(
        tmp_path / "optin", demo_source, [("synthesis: {mode: dp}", "synthesis: {mode: non_dp_allowed}")]
    )
    h = ws.headers("analyst")
    with ws.app() as c:
        job = c.post(
            "/v1/synth",
            json={"dataset": "visits", "rows": 5_000, "seed": 4, "method": "sdv_gaussian_copula"},
            headers=h,
        ).json()
        assert job["status"] == "awaiting_approval" and job["non_dp"] and job["epsilon"] == 0
        assert c.get(f"/v1/synth/{job['job_id']}", headers=h).json()["status"] == "awaiting_approval"
        early = c.get(f"/v1/synth/{job['job_id']}/download", headers=h)
        assert early.status_code == 409 and early.json()["error"]["code"] == "synth_job_not_ready"
        refused = list(AuditLog(ws.settings.audit_dir).records())[-1]
        assert (refused["event"], refused["decision"], refused["reason"]) == (
            "synth_download",
            "denied",
            "synth_job_not_ready",
        )

        approved = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway.cli.main",
                "synth",
                "approve",
                job["job_id"],
                "-w",
                str(ws.settings.workspace),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert approved.returncode == 0, approved.stderr
        again = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway.cli.main",
                "synth",
                "approve",
                job["job_id"],
                "-w",
                str(ws.settings.workspace),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 1 and "conflict" in again.stderr

        done = wait(c, h, job["job_id"])
        assert done["status"] in ("done", "withheld")
        report = c.get(f"/v1/synth/{job['job_id']}/report", headers=h).json()
        check = report["privacy_check"]
        if done["status"] == "done":
            assert check["passed"] and check["exact_matches"] == 0
            proxy = proxy_frame(c, h, job["job_id"])
            assert len(proxy) == 5_000 and "ssn" not in proxy.columns and "patient_id" not in proxy.columns
        else:
            assert not check["passed"]
            assert c.get(f"/v1/synth/{job['job_id']}/download", headers=h).status_code == 409
    assert "new_row_synthesis" in check["sdmetrics"] and "dcr_baseline_protection" in check["sdmetrics"]
    approval = _records(ws, "synth_approved")
    assert len(approval) == 1 and approval[0]["non_dp"] is True
    assert approval[0]["actor"]["role"] == "admin"
    outcome = [r for r in _records(ws, "synth") if r.get("phase") in ("completed", "withheld")]
    assert len(outcome) == 1 and outcome[0]["non_dp"] is True
