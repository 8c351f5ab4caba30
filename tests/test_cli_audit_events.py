"""`bastion audit events` refuses unknown filter values with one line like the API's (a real subprocess)."""

from __future__ import annotations

import os
import subprocess

from audit.record import known_events
from tests.conftest import BIN, Workspace


def _events(workspace: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), "audit", "events", "--workspace", str(workspace.settings.workspace), *args],
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unknown_event_and_bad_time_are_one_line_messages(workspace: Workspace) -> None:
    wrong = _events(workspace, "--event", "lf_stat")
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr.strip().count("\n") == 0
    assert f"--event: unknown event 'lf_stat'; the events are: {', '.join(known_events())}" in wrong.stderr
    since = _events(workspace, "--since", "yesterday")
    assert since.returncode == 2 and since.stderr.strip().count("\n") == 0
    assert "--since must be an ISO 8601 time such as 2026-01-31" in since.stderr
    ok = _events(workspace, "--event", "lf_stats", "--format", "jsonl")
    assert ok.returncode == 0, ok.stderr
