"""POST /v1/lf/stats and GET /v1/lf/registry through the real app: answers, accounting, cache, audit, label model,
client DataFrame, CLI, and LF conditions rejected exactly like bad SQL."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest

from audit.log import AuditLog
from gateway.client import Client
from gateway.service import Bastion
from labeling_functions.analysis import (
    LFEngineFailed,
    LFRunFailed,
    compute_lf_stats,
    compute_lf_stats_default,
    plan_lf_stats,
)
from policies.reader import EmptyReader, EngineError
from tests.conftest import Workspace
from tests.lf.test_lf_sandbox import shape

LFS: list[dict[str, Any]] = [
    {
        "name": "red_flags",
        "label": "urgent",
        "keywords": {"column": "triage_note", "any": ["chest pain", "shortness of breath", "unresponsive"]},
    },
    {"name": "urgent_dx", "label": "urgent", "when": "diagnosis IN ('I21', 'I63', 'J96', 'R07')"},
    {"name": "planned", "label": "routine", "regex": {"column": "triage_note", "pattern": "routine|follow-up|refill"}},
]


def _stats(c: Any, ws: Workspace, role: str = "lf_author", **body: Any) -> Any:
    payload = {"dataset": "visits", "lfs": LFS, "epsilon": 1.0, **body}
    return c.post("/v1/lf/stats", json=payload, headers=ws.headers(role))


def test_stats_are_released_with_intervals_charged_once_and_cached(workspace: Workspace) -> None:
    with workspace.app() as c:
        r = _stats(c, workspace)
        assert r.status_code == 200, r.text
        body = r.json()
        again = _stats(c, workspace).json()
        budget = c.get("/v1/budget", headers=workspace.headers("lf_author")).json()
    assert body["classes"] == ["urgent", "routine"] and body["gold_column"] == "triage_label"
    assert [lf["name"] for lf in body["lfs"]] == ["red_flags", "urgent_dx", "planned"]
    assert [lf["polarity"] for lf in body["lfs"]] == [["urgent"], ["urgent"], ["routine"]]
    for lf in body["lfs"]:
        for key in ("coverage", "overlaps", "conflicts", "emp_acc"):
            lo, hi = lf[key]["interval"]
            assert 0.0 <= lo <= hi <= 1.0, (lf["name"], key)
        for key in ("correct", "incorrect", "votes"):
            lo, hi = lf[key]["interval"]
            assert 0 <= lo <= hi and isinstance(lf[key]["value"], int)
        assert set(lf["per_class"]) == set(lf["polarity"])
    # The demo's planted structure shows through the noise: urgent diagnoses are mostly urgent.
    assert body["lfs"][1]["emp_acc"]["value"] > 0.6
    assert len(body["pairwise"]["overlaps"]) == 3 and body["pairwise"]["conflicts"][0][0] == 0.0
    assert 0 < body["label_set"]["coverage"]["value"] <= 1
    assert math.isclose(sum(m["epsilon"] for m in body["measurements"]), 1.0)
    assert {m["measurement"] for m in body["measurements"]} == {"rows", "lf", "pairwise", "gold"}
    assert body["epsilon_spent"] == 1.0 and not body["cached"]
    assert again["cached"] and again["epsilon_spent"] == 0.0 and again["lfs"] == body["lfs"]
    visits = next(b for b in budget if b["dataset"] == "visits")
    assert math.isclose(visits["spent"]["epsilon"], 1.0)

    records = [r for r in AuditLog(workspace.settings.audit_dir).records() if r.get("event") == "lf_stats"]
    phases = [(r.get("phase"), r.get("reason")) for r in records]
    assert phases == [("admitted", "ok"), ("released", "ok"), ("released", "cached")]


def test_dry_run_costs_nothing_and_roles_need_the_labeling_grant(workspace: Workspace) -> None:
    with workspace.app() as c:
        dry = _stats(c, workspace, dry_run=True).json()
        denied = _stats(c, workspace, role="analyst")
        budget = c.get("/v1/budget", headers=workspace.headers("lf_author")).json()
        ds = c.get("/v1/datasets", headers=workspace.headers("lf_author")).json()
    assert dry["dry_run"] and dry["epsilon_spent"] == 0.0 and "lfs" not in dry
    assert all(m["half_width"] > 0 for m in dry["measurements"])
    assert all(b["spent"]["epsilon"] == 0.0 for b in budget)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
    visits = next(d for d in ds if d["dataset"] == "visits")
    assert visits["labels"]["classes"] == ["urgent", "routine"]


BAD_CONDITIONS: list[tuple[dict[str, Any], str, str | None]] = [
    ({"when": "ssn LIKE '9%'"}, "unknown_column", "ssn"),
    ({"when": "patient_id > 100"}, "privacy_unit_column", "patient_id"),
    ({"keywords": {"column": "ssn", "any": ["123"]}}, "unknown_column", "ssn"),
    ({"regex": {"column": "ssn", "pattern": "^9"}}, "unknown_column", "ssn"),
    ({"when": "random() < 0.5"}, "volatile_function", "random"),
    ({"when": "age > 3 AND now() > DATE '2020-01-01'"}, "volatile_function", "now"),
    ({"when": "read_parquet('/etc/passwd') IS NOT NULL"}, "table_function", "read_parquet('/etc/passwd'"),
    ({"when": "glob('/tmp/*') IS NOT NULL"}, "table_function", "glob('/tmp/*'"),
    ({"when": "age IN (SELECT age FROM visits)"}, "subquery", None),
    ({"when": "age > 3; DROP TABLE bounded_visits"}, "multiple_statements", None),
    ({"when": "COUNT(*) > 3"}, "aggregate_in_row_expression", "COUNT(*"),
    ({"when": "shoe_size > 3"}, "unknown_column", "shoe_size"),
    ({"regex": {"column": "triage_note", "pattern": "(?<=x)y"}}, "invalid_regex", None),
]


def test_bad_conditions_are_rejected_like_bad_sql_before_any_charge(workspace: Workspace) -> None:
    with workspace.app() as c:
        h = workspace.headers("lf_author")
        for lf, reason, highlight in BAD_CONDITIONS:
            bad = {"name": "bad", "label": "urgent", **lf}
            r = c.post("/v1/lf/stats", json={"dataset": "visits", "lfs": [LFS[0], bad], "epsilon": 1.0}, headers=h)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "query_rejected" and err["reason"] == reason, err
            assert err["lf"] == "bad", err
            assert err["message"].startswith("labeling function 'bad': "), err  # the message names the LF too
            assert "COUNT(DISTINCT" not in err["message"] and "COUNT(DISTINCT" not in (err.get("hint") or ""), err
            if reason == "privacy_unit_column":
                assert "labeling function" in err["hint"], err
            if highlight is not None:
                # The span is the shared validator's (as for WHERE); it may stop before a closing parenthesis.
                assert err["highlight"].lower().startswith(highlight.lower()), err
                assert err["line"] == 1 and err["column"] >= 1
        budget = c.get("/v1/budget", headers=h).json()
    assert all(b["spent"]["epsilon"] == 0.0 for b in budget)  # nothing was charged
    denials = [
        r
        for r in AuditLog(workspace.settings.audit_dir).records()
        if r.get("event") == "lf_stats" and r.get("decision") == "denied"
    ]
    assert len(denials) == len(BAD_CONDITIONS)


def test_syntax_errors_and_invalid_requests(workspace: Workspace) -> None:
    with workspace.app() as c:
        h = workspace.headers("lf_author")
        syntax = c.post(
            "/v1/lf/stats",
            json={"dataset": "visits", "epsilon": 1, "lfs": [{"name": "x", "label": "urgent", "when": "age >"}]},
            headers=h,
        )
        label = c.post(
            "/v1/lf/stats",
            json={"dataset": "visits", "epsilon": 1, "lfs": [{"name": "x", "label": "stable", "when": "age > 3"}]},
            headers=h,
        )
        dup = c.post("/v1/lf/stats", json={"dataset": "visits", "epsilon": 1, "lfs": [LFS[0], LFS[0]]}, headers=h)
        unknown = c.post("/v1/lf/stats", json={"dataset": "visits", "epsilon": 1, "python_lfs": ["nope"]}, headers=h)
        types = c.post(
            "/v1/lf/stats",
            json={
                "dataset": "visits",
                "epsilon": 1,
                "lfs": [{"name": "x", "label": "urgent", "when": "age > DATE '2020-01-01'"}],
            },
            headers=h,
        )
    assert syntax.status_code == 400 and syntax.json()["error"]["code"] == "sql_syntax_error"
    assert label.status_code == 400 and "classes" in label.json()["error"]["message"]
    assert dup.status_code == 400 and "twice" in dup.json()["error"]["message"]
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "lf_not_found"
    assert types.status_code == 400 and types.json()["error"]["reason"] == "type_error"


def test_a_condition_that_could_fail_on_some_rows_answers_like_any_other(workspace: Workspace) -> None:
    # Integer division by length_of_stay, which is 0 on some rows: the answer has the status and shape of any
    # answer (the condition is compiled so that it cannot fail; if the engine failed anyway, the default release
    # would be given), and nothing in it speaks of the rows.
    lf = {"name": "x", "label": "urgent", "when": "100 // length_of_stay > 1"}
    with workspace.app() as c:
        h = workspace.headers("lf_author")
        r = c.post("/v1/lf/stats", json={"dataset": "visits", "epsilon": 0.5, "lfs": [lf]}, headers=h)
        plain = c.post("/v1/lf/stats", json={"dataset": "visits", "epsilon": 0.5, "lfs": [LFS[1]]}, headers=h)
        budget = c.get("/v1/budget", headers=h).json()
    assert r.status_code == 200 == plain.status_code, r.text
    assert shape(r.json()) == shape(plain.json())
    assert "zero" not in r.text.lower()
    visits = next(b for b in budget if b["dataset"] == "visits")
    assert visits["spent"]["epsilon"] == 1.0


def test_engine_failures_after_the_charge_carry_no_detail_and_the_default_has_the_same_shape(
    workspace: Workspace,
) -> None:
    bastion = Bastion(workspace.settings)
    try:
        policy, _ = bastion.engine.policy("visits")
        plan = plan_lf_stats(policy, lfs=LFS, epsilon=1.0, alpha=0.05, label_model=True)
        real = compute_lf_stats(plan, bastion.engine, outputs_dir=workspace.settings.outputs_dir)
    finally:
        bastion.close()

    class FailingEngine(EmptyReader):
        """Fails every statement the way an engine does: with the error's class only."""

        def arrow(self, query: Any) -> Any:
            try:
                raise duckdb.ConversionException("Could not convert string 'row contents: chest pain' to INT32")
            except duckdb.Error as exc:
                raise EngineError(type(exc).__name__) from None

        rows = arrow

    with pytest.raises(LFRunFailed) as info:
        compute_lf_stats(plan, FailingEngine(), outputs_dir=workspace.settings.outputs_dir)
    err = info.value
    assert type(err) is LFEngineFailed and err.reason == "engine"
    assert "row contents" not in str(err) and err.__context__ is None and err.__cause__ is None
    default = compute_lf_stats_default(plan, outputs_dir=workspace.settings.outputs_dir)
    assert shape(default) == shape(real) and default["notes"] == real["notes"]
    assert pd.read_parquet(workspace.settings.outputs_dir / default["label_model"]["output"]).empty


BAD_PARAMETERS: list[dict[str, Any]] = [
    {"epsilon": float("nan")},
    {"epsilon": float("inf")},
    {"epsilon": 5e-324},
    {"epsilon": -1.0},
    {"epsilon": 0},
    {"epsilon": 1e9},
    {"epsilon": 1.0, "alpha": float("nan")},
    {"epsilon": 1.0, "alpha": 5e-324},
    {"epsilon": 1.0, "alpha": 1.0},
    {"epsilon": 1.0, "alpha": float("-inf")},
]


def test_public_parameters_out_of_range_are_refused_before_any_charge(workspace: Workspace) -> None:
    many = [{"name": f"lf{i}", "label": "urgent", "when": f"age > {i}"} for i in range(15)]
    with workspace.app() as c:
        h = workspace.headers("lf_author")
        for params in BAD_PARAMETERS:  # NaN and infinities as Python's json writes them (not strict JSON)
            r = c.post(
                "/v1/lf/stats",
                content=json.dumps({"dataset": "visits", "lfs": LFS, **params}),
                headers={**h, "content-type": "application/json"},
            )
            assert r.status_code == 400, (params, r.text)
            assert r.json()["error"]["code"] == "invalid_request", r.text
            assert "epsilon" in r.json()["error"]["message"] or "alpha" in r.json()["error"]["message"]
        capped = c.post(
            "/v1/lf/stats", json={"dataset": "visits", "lfs": many, "epsilon": 1.0, "label_model": True}, headers=h
        )
        budget = c.get("/v1/budget", headers=h).json()
    assert capped.status_code == 400 and capped.json()["error"]["code"] == "invalid_request"
    assert "cells" in capped.json()["error"]["message"]
    assert all(b["spent"]["epsilon"] == 0.0 for b in budget)


def test_registry_python_lfs_label_model_and_client_frame(workspace: Workspace) -> None:
    with workspace.app() as c:
        client = Client(str(c.base_url), workspace.tokens["lf_author"], transport=c._transport)
        chosen = c.post(
            "/v1/lf/stats",
            json={"dataset": "visits", "lfs": LFS, "epsilon": 0.5, "label_model": True},
            headers={**workspace.headers("lf_author"), "X-Request-ID": "../../../tmp/owned"},
        )
        registry = client.lf_registry()
        names = {e["name"] for e in registry}
        assert {"urgent_diagnosis", "red_flag_words", "routine_words", "stay_and_age"} <= names
        assert all(e["dataset"] == "visits" and e["code_sha256"] for e in registry)
        assert next(e for e in registry if e["name"] == "stay_and_age")["columns"] == ["age", "length_of_stay"]
        frame = client.lf_stats(
            "visits", LFS, python_lfs=["urgent_diagnosis", "stay_and_age"], epsilon=2.0, label_model=True
        )
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.index) == ["red_flags", "urgent_dx", "planned", "urgent_diagnosis", "stay_and_age"]
    for col in (
        "Polarity",
        "Coverage",
        "Overlaps",
        "Conflicts",
        "Correct",
        "Incorrect",
        "Emp. Acc.",
        "Coverage_low",
        "Coverage_high",
        "Emp. Acc._low",
        "Emp. Acc._high",
    ):
        assert col in frame.columns
    assert frame.loc["stay_and_age", "Polarity"] == ["urgent", "routine"]
    assert (frame["Coverage_low"] <= frame["Coverage"]).all() and (frame["Coverage"] <= frame["Coverage_high"]).all()

    lm = frame.attrs["label_model"]
    assert set(lm["class_balance"]) == {"urgent", "routine", "abstain"}
    assert 0.5 < lm["gold_agreement"]["value"] <= 1.0
    output = workspace.settings.outputs_dir / lm["output"]
    assert output.exists() and (output.stat().st_mode & 0o077) == 0
    labels = pd.read_parquet(output)
    assert list(labels.columns) == ["row", "label", "prob_urgent", "prob_routine"]
    assert "prob_urgent" not in json.dumps(frame.attrs)  # probabilities never reach the caller
    # Every bounded row has the label of its vote pattern: rows with the same votes get the same label.
    assert len(labels) > 40_000 and set(labels["label"]) <= {-1, 0, 1}
    # The file's name is the gateway's own, whatever the client sends.
    assert chosen.status_code == 200, chosen.text
    name = chosen.json()["label_model"]["output"]
    assert re.fullmatch(r"lf-labels-[0-9a-f]{32}\.parquet", name) and (workspace.settings.outputs_dir / name).exists()
    assert not Path("/tmp/owned").exists()


def test_cli_prints_the_summary(workspace: Workspace, tmp_path: Path) -> None:
    import threading

    import uvicorn

    from gateway.http.app import create_app

    lf_file = tmp_path / "lfs.yaml"
    lf_file.write_text(json.dumps({"lfs": LFS}))
    server = uvicorn.Server(
        uvicorn.Config(create_app(workspace.settings), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway.cli.main",
                "lf",
                "stats",
                str(lf_file),
                "--dataset",
                "visits",
                "--epsilon",
                "1",
                "--url",
                f"http://127.0.0.1:{port}",
                "--token",
                workspace.tokens["lf_author"],
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        )
    finally:
        server.should_exit = True
        thread.join(10)
    assert out.returncode == 0, out.stderr
    for word in ("red_flags", "urgent_dx", "planned", "Coverage", "Emp. Acc.", "label-set coverage", "spent ε=1"):
        assert word in out.stdout, (word, out.stdout)
