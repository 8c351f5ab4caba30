"""Synth admission: ε and δ the synthesizer's OpenDP measurements cannot calibrate are refused before the charge
(with the range that works), a principal runs a bounded number of jobs at a time, and a job's terminal state
survives a full disk."""

from __future__ import annotations

from typing import Any

from audit.log import AuditLog
from gateway.service import Bastion
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
