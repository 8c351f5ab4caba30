"""Shared helpers of the synthetic-proxy tests."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
from fastapi.testclient import TestClient

from gateway.demo import POLICY_YAML
from tests.conftest import ROLES, Workspace, build_workspace

USABLE = ["age", "sex", "region", "diagnosis", "income", "length_of_stay", "visit_day"]


def wait(
    c: TestClient,
    headers: dict[str, str],
    job_id: str,
    until: tuple[str, ...] = ("done", "failed", "withheld"),
    timeout: float = 120.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/synth/{job_id}", headers=headers).json()
        if job["status"] in until:
            return job
        assert time.monotonic() < deadline, f"job still {job['status']}"
        time.sleep(0.2)


def proxy_frame(c: TestClient, headers: dict[str, str], job_id: str, fmt: str = "parquet") -> pd.DataFrame:
    r = c.get(f"/v1/synth/{job_id}/download", params={"format": fmt}, headers=headers)
    assert r.status_code == 200, r.text
    if fmt == "csv":
        return pd.read_csv(io.StringIO(r.text))
    return pd.read_parquet(io.BytesIO(r.content))


def private_rows(ws: Workspace, dataset: str = "visits") -> pd.DataFrame:
    """The pre-bounded table, read directly (tests only: the gateway never serves it)."""
    con = duckdb.connect(str(ws.settings.database), read_only=True)
    try:
        return con.execute(f"SELECT * FROM bounded_{dataset}").df()
    finally:
        con.close()


def variant_workspace(root: Path, demo_source: tuple[Path, Path], replacements: list[tuple[str, str]]) -> Workspace:
    """A workspace with the demo data under a modified copy of its policy."""
    data, _ = demo_source
    text = POLICY_YAML
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    policy = root / "visits.yaml"
    root.mkdir(parents=True, exist_ok=True)
    policy.write_text(text)
    return build_workspace(root, [(policy, data)], ROLES)
