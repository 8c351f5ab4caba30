"""Synth admission: ε and δ the synthesizer's OpenDP measurements cannot calibrate are refused before the charge
(with the range that works), a principal runs a bounded number of jobs at a time, and a job's terminal state
survives a full disk."""

from __future__ import annotations

import dataclasses
import errno
import json
import threading
import time
from typing import Any

import pytest

from audit.log import AuditLog
from gateway.service import Bastion
from gateway.stores import jobs as job_files
from gateway.synth_jobs import SynthJobs
from policies.accountant import MAX_DELTA, MAX_EPSILON
from synth.measure import allocate, epsilon_range, uncalibrated
from tests.conftest import Workspace
from tests.synth.helpers import wait


def _spent(c: Any, h: dict[str, str]) -> float:
    budget = c.get("/v1/budget", headers=h).json()
    return float(next(b for b in budget if b["dataset"] == "visits")["spent"]["epsilon"])


def _denials(ws: Workspace) -> list[dict[str, Any]]:
    return [
        r
        for r in AuditLog(ws.settings.audit_dir).records()
        if r.get("event") == "synth" and r.get("decision") == "denied"
    ]


def test_parameters_that_cannot_be_calibrated_are_refused_before_the_charge(workspace: Workspace) -> None:
    h = workspace.headers("analyst")
    with workspace.app() as c:
        # δ = 1e-30: key selection of `diagnosis` (no public domain) cannot reach it at any ε; this job used to be
        # admitted, charged, and then fail with a MechanismError.
        r = c.post("/v1/synth", json={"dataset": "visits", "epsilon": 0.001, "delta": 1e-30, "rows": 100}, headers=h)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and error["reason"] == "uncalibrated"
        least, most = error["allowed"]["delta"]
        assert 1e-30 < least < 1e-7 and most == MAX_DELTA and f"{least:g}" in error["message"]
        # Tiny and huge ε (1.8e296 and beyond used to overflow): refused with the range.
        for epsilon in (1e-300, 1e-4, 1.8e296, 1e308):
            r = c.post("/v1/synth", json={"dataset": "visits", "epsilon": epsilon, "rows": 100}, headers=h)
            assert r.status_code == 400 and "between 0.001 and 1000" in r.json()["error"]["message"], r.text
        assert _spent(c, h) == 0.0  # nothing was charged
        assert len(_denials(workspace)) == 5  # every refusal is audited

        # The least δ is what OpenDP can do: it works, a little below it does not.
        bastion: Bastion = c.app.state.bastion
        policy, _ = bastion.engine.policy("visits")
        assert uncalibrated(policy, allocate(policy, MAX_EPSILON, least)) is None
        assert uncalibrated(policy, allocate(policy, MAX_EPSILON, least * 0.99)) is not None
        r = c.post("/v1/synth", json={"dataset": "visits", "epsilon": 0.001, "delta": least, "rows": 100}, headers=h)
        assert r.status_code == 200, r.text
        assert wait(c, h, r.json()["job_id"])["status"] == "done"  # admitted at the edge: it also runs


def test_the_least_epsilon_is_derived_from_the_measurements(workspace: Workspace) -> None:
    bastion = Bastion(workspace.settings)
    try:
        policy, _ = bastion.engine.policy("visits")
    finally:
        bastion.close()
    assert epsilon_range(policy, 1e-7) == (0.001, MAX_EPSILON)  # every ε the API takes works at the default δ
    # Below the API's limit, key selection's threshold search gives out at some ε: the bisection finds it.
    got = epsilon_range(policy, 1e-7, lowest=1e-15)
    assert got is not None
    lo, _ = got
    assert 1e-15 < lo < 0.001
    assert uncalibrated(policy, allocate(policy, lo, 1e-7)) is None
    assert uncalibrated(policy, allocate(policy, lo * 0.99, 1e-7)) is not None


def _post(c: Any, h: dict[str, str], epsilon: float) -> Any:
    body = {"dataset": "visits", "epsilon": epsilon, "rows": 200, "seed": 1, "method": "dpcopula_direct"}
    return c.post("/v1/synth", json=body, headers=h)


def test_one_unfinished_job_per_principal_by_default(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    original = SynthJobs._run

    def held(self: SynthJobs, job: dict[str, Any]) -> None:
        assert gate.wait(120)
        original(self, job)

    monkeypatch.setattr(SynthJobs, "_run", held)
    h = workspace.headers("analyst")
    with workspace.app() as c:
        first = _post(c, h, 0.2)
        assert first.status_code == 200, first.text
        second = _post(c, h, 0.3)
        assert second.status_code == 429, second.text
        error = second.json()["error"]
        assert error["code"] == "too_many_jobs" and error["limit"] == 1 and "GET /v1/synth" in error["message"]
        repeat = _post(c, h, 0.2)  # an identical repeat is the same job, from the cache: not a new one
        assert repeat.status_code == 200 and repeat.json()["job_id"] == first.json()["job_id"]
        assert repeat.json()["cached"] is True
        assert _spent(c, h) == pytest.approx(0.2)  # the refused job was not charged
        assert [d["reason"] for d in _denials(workspace)] == ["too_many_jobs"]  # and it was audited
        gate.set()
        assert wait(c, h, first.json()["job_id"])["status"] == "done"
        third = _post(c, h, 0.3)  # once the first is done, another may start
        assert third.status_code == 200, third.text
        assert wait(c, h, third.json()["job_id"])["status"] == "done"

    gate.clear()
    two = dataclasses.replace(workspace, settings=workspace.settings.model_copy(update={"synth_jobs_per_principal": 2}))
    with two.app() as c:
        assert _post(c, h, 0.11).status_code == 200 and _post(c, h, 0.12).status_code == 200
        assert _post(c, h, 0.13).json()["error"]["code"] == "too_many_jobs"
        gate.set()
        for job in c.get("/v1/synth", headers=h).json():
            assert wait(c, h, job["job_id"])["status"] == "done"


def test_the_synth_routes_declare_their_errors_in_openapi(workspace: Workspace) -> None:
    with workspace.app() as c:
        paths = c.get("/openapi.json").json()["paths"]
    submit = paths["/v1/synth"]["post"]["responses"]
    assert "too_many_jobs" in submit["429"]["description"] and "budget_exhausted" in submit["429"]["description"]
    assert "uncalibrated" in submit["400"]["description"]
    for path in ("/v1/synth/{job_id}/download", "/v1/synth/{job_id}/report", "/v1/synth/{job_id}/report/{page}"):
        assert "synth_job_not_ready" in paths[path]["get"]["responses"]["409"]["description"], path


def _no_space(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_job_stays_failed_when_the_disk_is_full(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[str] = []
    write_json = job_files.write_json

    def fails_on_a_full_disk(self: SynthJobs, job: dict[str, Any]) -> None:
        runs.append(job["job_id"])
        job.update(status="running")
        self._save(job)
        monkeypatch.setattr(job_files, "write_json", _no_space)  # from here on, no file can be written anew
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SynthJobs, "_run", fails_on_a_full_disk)
    h = workspace.headers("analyst")
    with workspace.app() as c:
        job_id = _post(c, h, 0.2).json()["job_id"]
        failed = wait(c, h, job_id, timeout=30)
        assert failed["status"] == "failed" and "the charge stands" in failed["error"]
    job_dir = workspace.settings.workspace / "synth" / "jobs" / job_id
    assert json.loads((job_dir / "job.json").read_text())["status"] == "running"  # its rewrite failed
    assert not list(job_dir.glob("*.tmp"))  # and left nothing behind
    # A restarted gateway reads the failure from the reserved file: the job is failed, not resumed.
    with workspace.app() as c:
        assert c.get(f"/v1/synth/{job_id}", headers=h).json()["status"] == "failed"
        time.sleep(0.5)
    assert runs == [job_id]

    # Not even the reserved file can be written: the failure is kept in memory by the gateway that saw it.
    runs.clear()
    monkeypatch.setattr(job_files, "write_json", write_json)
    monkeypatch.setattr(job_files, "write_in_place", _no_space)
    with workspace.app() as c:
        other = _post(c, h, 0.3).json()["job_id"]
        assert wait(c, h, other, timeout=30)["status"] == "failed"
        time.sleep(0.5)
        assert c.get(f"/v1/synth/{other}", headers=h).json()["status"] == "failed"
    assert runs == [other]
