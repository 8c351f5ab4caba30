"""A DP synthesis whose measurement fails after the charge still completes, from the default input."""

from __future__ import annotations

from typing import Any

import pytest

import synth
from audit.log import AuditLog
from policies.reader import EmptyReader
from tests.conftest import Workspace
from tests.synth.helpers import proxy_frame, wait


def test_a_failed_measurement_releases_the_default_input_with_the_same_status(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = synth.measure

    def failing(reader: Any, table: str, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(reader, EmptyReader):  # the engine itself, not the default input
            raise RuntimeError("Conversion Error: could not convert 'south' to INT32")  # an engine message
        return real(reader, table, *args, **kwargs)

    monkeypatch.setattr(synth, "measure", failing)
    h = workspace.headers("analyst")
    with workspace.app() as c:
        r = c.post(
            "/v1/synth",
            json={"dataset": "pums", "epsilon": 1.0, "rows": 500, "seed": 3, "method": "dpcopula_direct"},
            headers=h,
        )
        assert r.status_code == 200, r.text
        job = wait(c, h, r.json()["job_id"])
        assert job["status"] == "done", job
        assert len(proxy_frame(c, h, job["job_id"])) == 500
    assert "south" not in caplog.text
    records = AuditLog(workspace.settings.audit_dir, key_dir=workspace.settings.keys_dir).records()
    fallback = [r for r in records if r.get("reason") == "fallback" and r.get("event") == "synth"]
    assert fallback and fallback[0]["error_class"] == "RuntimeError"
