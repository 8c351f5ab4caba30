"""Findings of an adversarial review of model evaluation, each reproduced: free repeats that filled the disk with
copies of one release, a card that did not say what its guarantee is conditional on, a predictions file replaced
between the plan and the count, slices that release nothing, and error texts that named the wrong thing."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from audit.log import AuditLog
from gateway.card import card, markdown
from gateway.demo import write_evaluation_demo
from gateway.predictions import PredictionsStore, StalePredictions, attach
from gateway.service import Bastion
from tests.conftest import BIN, ROLES, AppClient, Workspace, build_workspace

N_ROWS = 1_500
BODY = {"dataset": "visits", "models": ["triage-v3", "copy"], "slices": ["sex", "region"], "epsilon": 0.5}


@pytest.fixture(scope="module")
def evaluation_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return write_evaluation_demo(tmp_path_factory.mktemp("evaluation"), n_rows=N_ROWS, seed=11)


def _workspace(tmp_path: Path, source: tuple[Path, Path, Path], **limits: int) -> Workspace:
    data, policy, predictions = source
    workspace = build_workspace(tmp_path, [(policy, data)], ROLES)
    if limits:
        settings = workspace.settings.model_copy(update={"limits": workspace.settings.limits.model_copy(update=limits)})
        settings.save()
        workspace = Workspace(settings, workspace.tokens)
    bastion = Bastion(workspace.settings)
    try:
        attach(bastion, "visits", "triage-v3", predictions)
        attach(bastion, "visits", "copy", predictions)
    finally:
        bastion.close()
    return workspace


@pytest.fixture
def ws(tmp_path: Path, evaluation_source: tuple[Path, Path, Path]) -> Workspace:
    return _workspace(tmp_path, evaluation_source)


def _stored(ws: Workspace) -> list[Path]:
    return sorted((ws.settings.outputs_dir / "evaluations").rglob("*.json"))


def _spent(c: AppClient, ws: Workspace) -> float:
    return sum(b["spent"]["epsilon"] for b in c.get("/v1/budget", headers=ws.headers("analyst")).json())


def _records(ws: Workspace) -> list[dict[str, Any]]:
    return [r for r in AuditLog(ws.settings.audit_dir).records() if r["event"] == "evaluate"]


# --- F2: a release is stored once, whatever the number of free repeats; at most a declared number per principal --


def test_identical_requests_store_one_release_and_every_reply_has_its_card(ws: Workspace) -> None:
    with ws.app() as c:
        replies = [c.post("/v1/evaluate", json=BODY, headers=ws.headers("analyst")).json() for _ in range(6)]
        assert math.isclose(_spent(c, ws), 0.5)
        cards = [
            c.get(
                f"/v1/evaluate/{r['evaluation_id']}/card", params={"format": "markdown"}, headers=ws.headers("analyst")
            )
            for r in replies
        ]
    assert [r["cached"] for r in replies] == [False] + [True] * 5
    assert len({r["query_id"] for r in replies}) == 6  # each reply is its own request ...
    assert {r["evaluation_id"] for r in replies} == {replies[0]["query_id"]}  # ... of one release
    assert len(_stored(ws)) == 1
    assert all(x.status_code == 200 for x in cards) and len({x.text for x in cards}) == 1
    assert f"`{replies[0]['query_id']}`" in cards[0].text


def test_a_new_release_beyond_the_cap_evicts_the_oldest(
    tmp_path: Path, evaluation_source: tuple[Path, Path, Path]
) -> None:
    ws = _workspace(tmp_path, evaluation_source, max_stored_evaluations=2)
    bastion = Bastion(ws.settings)
    try:
        bob = {"Authorization": f"Bearer {bastion.tokens.create('bob', 'analyst')[0]}"}
    finally:
        bastion.close()
    with ws.app() as c:
        ids = [
            c.post("/v1/evaluate", json={**BODY, "epsilon": eps}, headers=ws.headers("analyst")).json()["evaluation_id"]
            for eps in (0.1, 0.2, 0.3)
        ]
        status = [c.get(f"/v1/evaluate/{i}/card", headers=ws.headers("analyst")).status_code for i in ids]
        # another principal's evaluations have their own cap: bob's do not evict alice's
        assert c.post("/v1/evaluate", json={**BODY, "epsilon": 0.4}, headers=bob).status_code == 200
        after = [c.get(f"/v1/evaluate/{i}/card", headers=ws.headers("analyst")).status_code for i in ids]
    assert status == after == [404, 200, 200]
    assert len(_stored(ws)) == 3


def test_the_byte_cap_evicts_the_oldest_and_keeps_the_newest(tmp_path: Path) -> None:
    from gateway.evaluation import EvaluationStore

    store = EvaluationStore(tmp_path, max_count=10, max_bytes=2_500)
    answers = [{"evaluation_id": f"e{i}", "dataset": "visits", "blob": "x" * 1_000, "query_id": "q"} for i in range(4)]
    assert [store.put("alice", a) for a in answers] == [True] * 4
    assert not store.put("alice", {**answers[3], "query_id": "another reply"})  # the same release: not written again
    assert [store.get("alice", f"e{i}") is not None for i in range(4)] == [False, False, True, True]
    assert store.get("alice", "e3") == {"evaluation_id": "e3", "dataset": "visits", "blob": "x" * 1_000}
    assert store.get("bob", "e3") is None and store.get("alice", "../e3") is None
    big = EvaluationStore(tmp_path, max_count=10, max_bytes=100)  # one evaluation over the cap is still kept
    assert big.put("alice", {**answers[0], "evaluation_id": "e9"}) and big.get("alice", "e9") is not None
    assert big.get("alice", "e3") is None


# --- F3: the guarantee is conditional on the predictions ----------------------------------------------------------


def test_the_card_says_the_guarantee_is_given_the_predictions(ws: Workspace) -> None:
    with ws.app() as c:
        answer = c.post("/v1/evaluate", json=BODY, headers=ws.headers("analyst")).json()
        page = c.get(f"/v1/evaluate/{answer['evaluation_id']}/card", headers=ws.headers("analyst")).text
    scope = card(answer)["privacy"]["scope"]
    for words in ("given the predictions", "fitted on these rows", "separate access", "DP training", "synthetic"):
        assert words in scope
    assert scope in page
    assert " ".join(scope.split()) in " ".join(markdown(answer).split())


def test_predictions_add_prints_the_reminder(tmp_path: Path, evaluation_source: tuple[Path, Path, Path]) -> None:
    data, policy, predictions = evaluation_source
    ws = build_workspace(tmp_path, [(policy, data)], ROLES)
    out = subprocess.run(
        [str(BIN), "predictions", "add", "visits", str(predictions), "--model", "m1"],
        env={**os.environ, "BASTION_WORKSPACE": str(ws.settings.workspace)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "attached m1" in text and "given these predictions" in text and "must itself be" in text


# --- F7: the predictions replaced between the plan and the count -------------------------------------------------


def test_predictions_replaced_mid_request_are_not_counted_as_the_planned_attachment(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.evaluation as evaluation

    path = PredictionsStore(ws.settings.predictions_dir).path("visits", "triage-v3")
    planned = evaluation.precheck

    def replace_after_planning(*args: Any) -> None:
        planned(*args)
        # an admin's `predictions add --replace` lands now: a whole new file with a new attachment id
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"bastion"])
        replaced = table.replace_schema_metadata({b"bastion": json.dumps({**meta, "attachment": "f" * 16})})
        temp = path.with_name(".replacement.tmp")
        pq.write_table(replaced, temp)
        os.replace(temp, path)

    monkeypatch.setattr(evaluation, "precheck", replace_after_planning)
    body = {"dataset": "visits", "model": "triage-v3", "slices": ["sex"], "epsilon": 0.5}
    with ws.app() as c:
        r = c.post("/v1/evaluate", json=body, headers=ws.headers("analyst"))
    assert r.status_code == 200 and r.json()["epsilon_spent"] == 0.5  # charged: the release stands, status 200
    (released,) = [x for x in _records(ws) if x.get("phase") == "released"]
    assert released["reason"] == "fallback" and released["error"] == "StalePredictions"


def test_load_reads_the_planned_attachment_only(ws: Workspace) -> None:
    store = PredictionsStore(ws.settings.predictions_dir)
    meta = store.get("visits", "copy")
    assert meta is not None and store.load("visits", "copy", meta.attachment).num_rows == N_ROWS
    with pytest.raises(StalePredictions):
        store.load("visits", "copy", "0" * 16)


# --- F8: slices that release nothing, error texts -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["NULLIF(sex, sex)", "CASE WHEN age > 200 THEN 'a' END"])
def test_a_slice_with_no_public_value_is_refused_before_the_charge(ws: Workspace, text: str) -> None:
    with ws.app() as c:
        r = c.post(
            "/v1/evaluate",
            json={"dataset": "visits", "model": "triage-v3", "slices": ["sex", text], "epsilon": 1.0},
            headers=ws.headers("analyst"),
        )
        assert _spent(c, ws) == 0.0
    error = r.json()["error"]
    assert r.status_code == 400 and error["reason"] == "empty_slice", error
    assert error["column"] == 1 and text.startswith(error["highlight"]) and len(error["highlight"]) > len(text) // 2
    assert "no public value" in error["message"] and error["hint"]


def test_an_accuracy_too_small_names_the_accuracy(ws: Workspace) -> None:
    with ws.app() as c:
        small = c.post(
            "/v1/evaluate",
            json={"dataset": "visits", "model": "triage-v3", "accuracy": 1e-9},
            headers=ws.headers("analyst"),
        ).json()["error"]
        large = c.post(
            "/v1/evaluate",
            json={"dataset": "visits", "model": "triage-v3", "accuracy": 1e12},
            headers=ws.headers("analyst"),
        ).json()["error"]
    assert "accuracy=1e-09 is too small" in small["message"] and "epsilon" not in small["message"]
    assert "ε" in small["message"] and small["field"] == "accuracy"
    assert "accuracy=1e+12 is too large" in large["message"]


def test_a_continuous_slice_is_refused_with_advice_for_slices(ws: Workspace) -> None:
    with ws.app() as c:
        error = c.post(
            "/v1/evaluate",
            json={"dataset": "visits", "model": "triage-v3", "slices": ["income"], "epsilon": 1.0},
            headers=ws.headers("analyst"),
        ).json()["error"]
    assert "GROUP BY" not in error["hint"] and "key selection" not in error["hint"]
    assert "FLOOR(income / " in error["hint"] and "slice" in error["hint"]


# --- the card from the CLI ----------------------------------------------------------------------------------------


def test_the_card_from_the_cli(ws: Workspace, tmp_path: Path) -> None:
    from tests.conftest import gateways

    workspace = str(ws.settings.workspace)
    with gateways(1, "--workspace", workspace) as (url,):
        env = {**os.environ, "BASTION_URL": url, "BASTION_TOKEN": ws.tokens["analyst"]}

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(BIN), *args], env=env, capture_output=True, text=True, timeout=300, check=False)

        table = run("evaluate", "visits", "--model", "triage-v3", "--slice", "sex", "--epsilon", "0.5")
        answer = json.loads(
            run("evaluate", "visits", "--model", "triage-v3", "--slice", "sex", "--epsilon", "0.5", "--json").stdout
        )
        md = run("evaluation-card", answer["evaluation_id"], "--format", "markdown")
        out = tmp_path / "card.html"
        html = run("evaluation-card", answer["evaluation_id"], "--out", str(out))
        missing = run("evaluation-card", "0123abcd")
    assert table.returncode == 0 and f"bastion evaluation-card {answer['evaluation_id']}" in table.stdout
    assert answer["cached"]
    assert md.returncode == 0 and md.stdout.startswith("# Model card: triage-v3 on visits")
    assert html.returncode == 0 and out.read_text().startswith("<!doctype html>") and str(out) in html.stdout
    assert missing.returncode == 1 and "not_found" in missing.stderr
