"""`bastion synth run / report / status` against the real app (the HTTP client is pointed at it in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

import gateway.cli.terminal as terminal
from gateway.cli.main import app
from gateway.client import Client
from tests.conftest import Workspace


def test_synth_run_follows_progress_and_writes_the_proxy(workspace: Workspace, tmp_path: Path, monkeypatch) -> None:
    token = workspace.tokens["analyst"]
    with workspace.app() as c:
        monkeypatch.setattr(
            terminal, "make_client", lambda url, tok: Client("http://testserver", tok, transport=c._transport)
        )
        runner = CliRunner()
        out = tmp_path / "proxy.csv"
        run = runner.invoke(
            app,
            [
                "synth",
                "run",
                "visits",
                "--epsilon",
                "0.4",
                "--rows",
                "1500",
                "--seed",
                "9",
                "--method",
                "dpcopula_direct",
                "--out",
                str(out),
                "--poll",
                "0.1",
                "--token",
                token,
            ],
        )
        assert run.exit_code == 0, run.output
        job_id = run.output.split("job ")[1].split()[0]
        report = runner.invoke(app, ["synth", "report", job_id, "--token", token])
        status = runner.invoke(app, ["synth", "status", job_id, "--json", "--token", token])
        refused = runner.invoke(app, ["synth", "run", "visits", "--epsilon", "50", "--token", token])
    assert "spent ε=0.4" in run.output and "wrote 1,500 rows" in run.output
    assert len(pd.read_csv(out)) == 1500
    assert report.exit_code == 0 and "age" in report.output and "TVComplement" in report.output
    assert json.loads(status.output)["status"] == "done"
    assert refused.exit_code == 1 and "budget_exhausted" in refused.output
