"""Edge cases of model evaluation found by attacking it: the public bound on the groups one statement counts, the
CLI's and the Markdown model card's rendering of slice texts and values, and what the audit log (which auditors
read) says of an attachment."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from audit.log import AuditLog
from gateway.card import markdown
from gateway.cli.evaluate import print_evaluation
from gateway.demo import EVALUATION_POLICY_YAML, write_evaluation_demo
from gateway.evaluation import JOINT_GROUPS, EvaluationPlan, Slice, _batches, plan_slice
from gateway.predictions import attach
from gateway.service import Bastion
from policies.schema import parse_policy
from tests.conftest import ROLES, build_workspace

POLICY = parse_policy(yaml.safe_load(EVALUATION_POLICY_YAML))
WIDE = ["age", "date_trunc('month', visit_day)", "length_of_stay", "region", "sex"]


EMPTY = ("NULLIF(sex, sex)", "CASE WHEN age > 200 THEN 'a' END")  # refused by plan_slice (empty_slice)


def _plan(texts: list[str]) -> EvaluationPlan:
    slices = tuple(Slice(t, None, None, ()) if t in EMPTY else plan_slice(t, POLICY) for t in texts)
    return EvaluationPlan(POLICY, "1-x", (), slices, ("accuracy",), True, 1.0, 0.05)


@pytest.mark.parametrize(
    "texts",
    [
        WIDE,
        # a slice with no public value (every row's value is missing; refused before planning now) used to reset the
        # bound to 0, so every later slice joined one statement whose groups grow with the private rows
        ["NULLIF(sex, sex)", *WIDE],
        ["CASE WHEN age > 200 THEN 'a' END", *WIDE],
        # each slice's missing value is a group too: 111 × 111 values fit within the bound, 112 × 112 groups do not
        ["age", "age + 1"],
    ],
)
def test_batches_stay_within_the_public_group_bound(texts: list[str]) -> None:
    plan = _plan(texts)
    batches = _batches(plan)
    assert sorted(i for b in batches for i in b) == list(range(len(texts)))
    for batch in batches:
        groups = plan.matrix_cells * math.prod(len(plan.slices[i].values) + 1 for i in batch)
        assert len(batch) == 1 or groups <= JOINT_GROUPS, (batch, groups)


def test_cli_table_shows_slice_texts_and_values_as_given(capsys: pytest.CaptureFixture[str]) -> None:
    """Rich markup in a slice or its value is text: it neither crashes the table (after the charge) nor vanishes."""
    metric = {"metric": "accuracy", "class": None, "estimate": 0.5, "low": 0.4, "high": 0.6, "noise_dominated": False}
    raw = {
        "dataset": "visits",
        "dataset_version": "1-x",
        "alpha": 0.05,
        "metrics": [
            {"model": "m", "slice": "CASE WHEN sex = 'F' THEN '[/x]' ELSE 'b' END", "value": "[/x]", **metric},
            {"model": "m", "slice": "CASE WHEN sex = 'F' THEN '[red]f' ELSE 'b' END", "value": "[red]f", **metric},
        ],
    }
    print_evaluation(raw)
    out = capsys.readouterr().out
    assert "[/x]" in out and "[red]f" in out


def test_attachment_record_carries_no_count_or_digest_of_private_rows(tmp_path: Path) -> None:
    """The audit log is read by auditors over HTTP: an exact count of predictions (one per row) or a digest of the
    file would tell them what no DP release does (two neighbouring datasets differ in it)."""
    data, policy, predictions = write_evaluation_demo(tmp_path / "demo", n_rows=500, seed=2)
    ws = build_workspace(tmp_path, [(policy, data)], ROLES)
    bastion = Bastion(ws.settings)
    try:
        meta = attach(bastion, "visits", "triage-v3", predictions)
    finally:
        bastion.close()
    assert meta.rows == 500  # the admin on the host still sees it (`bastion predictions list`)
    (record,) = [r for r in AuditLog(ws.settings.audit_dir).records() if r["event"] == "predictions_added"]
    assert record["request"]["model"] == "triage-v3"
    assert record["request"]["attachment"] == meta.attachment
    assert "rows" not in record["request"] and "digest" not in record["request"]
    with ws.app() as c:
        events = c.get("/v1/audit/events", params={"event": "predictions_added"}, headers=ws.headers("auditor"))
    assert events.status_code == 200
    (shown,) = events.json()["events"]
    assert 500 not in shown["request"].values() and meta.digest not in events.text


def test_markdown_card_keeps_slice_texts_and_values_as_text() -> None:
    """A Markdown card is rendered by tools that pass inline HTML and follow links: a slice text or value ending
    its code span or carrying a tag or a link stays text there."""
    from markdown_it import MarkdownIt

    sl = "CASE WHEN sex = 'F' THEN '<img src=x onerror=alert(1)>' ELSE '`x` [y](javascript:alert(2))' END"
    values = ["<img src=x onerror=alert(1)>", "`x` [y](javascript:alert(2))"]
    half = 3.0
    answer = {
        "query_id": "abc",
        "dataset": "visits",
        "dataset_version": "1-x",
        "models": [{"model": "m", "attached_at": "2026-01-01T00:00:00+00:00"}],
        "slices": [{"slice": sl, "values": values}],
        "classes": ["urgent", "routine"],
        "alpha": 0.05,
        "epsilon": 1.0,
        "sensitivity": 10,
        "scale": 10.0,
        "count_half_width": half,
        "metrics_requested": ["accuracy"],
        "confusion": [{"model": "m", "slice": sl, "value": v, "counts": [[1, 0], [0, 1]]} for v in values],
        "metrics": [
            {"model": "m", "slice": sl, "value": v, "metric": "accuracy", "class": None, "estimate": 0.5}
            | {"low": 0.0, "high": 1.0, "noise_dominated": True}
            for v in values
        ],
    }
    html = MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown(answer))
    assert "<img" not in html and "<a " not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html  # shown, as text
