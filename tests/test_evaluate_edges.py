"""Edge cases of model evaluation found by attacking it: the public bound on the groups one statement counts and the
CLI's rendering of slice texts and values."""

from __future__ import annotations

import math

import pytest
import yaml

from gateway.cli.evaluate import print_evaluation
from gateway.demo import EVALUATION_POLICY_YAML
from gateway.evaluation import JOINT_GROUPS, EvaluationPlan, _batches, plan_slice
from policies.schema import parse_policy

POLICY = parse_policy(yaml.safe_load(EVALUATION_POLICY_YAML))
WIDE = ["age", "date_trunc('month', visit_day)", "length_of_stay", "region", "sex"]


def _plan(texts: list[str]) -> EvaluationPlan:
    slices = tuple(plan_slice(t, POLICY) for t in texts)
    return EvaluationPlan(POLICY, "1-x", (), slices, ("accuracy",), True, 1.0, 0.05)


@pytest.mark.parametrize(
    "texts",
    [
        WIDE,
        # a slice with no public value (every row's value is missing) used to reset the bound to 0, so every later
        # slice joined one statement whose groups grow with the private rows (one per row, past 50,000)
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
