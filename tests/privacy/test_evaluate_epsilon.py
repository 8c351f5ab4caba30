"""Empirical ε of a model-evaluation release, on two registered datasets that differ in one worst-case privacy unit
(k rows, all in the same slice values, with the same gold label and the same wrong prediction from every model:
the unit and its predictions are there in D′ and absent from D).

The exact vectors are computed through the real path (registration, the bounded table, attached predictions,
`exact_counts` on DuckDB) and must differ by exactly the claimed sensitivity k·M·S in L1. Releases are drawn with
`gateway.evaluation.release`, the one step of an evaluation that reads the exact counts. The event is fixed before
sampling: the privacy loss Σ_i (|x_i - b_i| - |x_i - a_i|) / s at the claimed scale s reaches its maximum ε (every
differing cell at or beyond its value on D′). A Clopper–Pearson lower bound on ε at 99% confidence must not exceed
the claimed ε; the same event run on releases with half the noise must exceed it. Status and shape of the HTTP
answers are the same on both datasets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gateway.evaluation import EvaluationPlan, exact_counts, plan_evaluation, release
from gateway.predictions import PredictionsStore, attach
from gateway.service import Bastion
from policies.mechanisms import release_integers
from tests.conftest import ROLES, Workspace, build_workspace
from tests.privacy.epsilon import epsilon_lower_bound

K = 3
EPSILON = 1.0
DRAWS = 4_000
CONFIDENCE = 0.99
SLICES = ["sex", "CASE WHEN age >= 65 THEN 'old' ELSE 'young' END"]
MODELS = ["m1", "m2"]
POLICY = f"""\
dataset: ev
privacy_unit: patient_id
max_rows_per_unit: {K}
budget:
  per_principal: {{epsilon: 100.0}}
  total: {{epsilon: 1000.0}}
columns:
  patient_id: {{type: int, usage: hidden}}
  visit_id:   {{type: int, usage: hidden}}
  sex:        {{type: category, domain: [F, M]}}
  age:        {{type: int, bounds: [0, 100]}}
  gold:       {{type: category, domain: [pos, neg], usage: labeling}}
roles:
  analyst: [evaluate]
labels: {{gold_column: gold, classes: [pos, neg]}}
row_key: visit_id
"""


def _tables(with_unit: bool) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(4)
    n = 600
    patients = np.arange(n) // 2  # two rows per unit, fewer than k: bounding keeps every row on both datasets
    rows = {
        "patient_id": patients,
        "visit_id": np.arange(n) + 1,
        "sex": rng.choice(["F", "M"], n),
        "age": rng.integers(0, 100, n),
        "gold": rng.choice(["pos", "neg"], n),
    }
    predicted = np.where(rng.random(n) < 0.8, rows["gold"], np.where(rows["gold"] == "pos", "neg", "pos"))
    if with_unit:  # one unit of k rows in the same cell of every matrix: F, old, gold pos, predicted neg
        rows = {
            "patient_id": np.concatenate([rows["patient_id"], [9_999] * K]),
            "visit_id": np.concatenate([rows["visit_id"], 10_000 + np.arange(K)]),
            "sex": np.concatenate([rows["sex"], ["F"] * K]),
            "age": np.concatenate([rows["age"], [70] * K]),
            "gold": np.concatenate([rows["gold"], ["pos"] * K]),
        }
        predicted = np.concatenate([predicted, ["neg"] * K])
    data = pa.table({k: pa.array(v.tolist()) for k, v in rows.items()})
    predictions = pa.table({"visit_id": rows["visit_id"].tolist(), "label": predicted.tolist()})
    return data, predictions


def _workspace(root: Path, with_unit: bool) -> Workspace:
    root.mkdir()
    data, predictions = _tables(with_unit)
    pq.write_table(data, root / "ev.parquet")
    pq.write_table(predictions, root / "p.parquet")
    (root / "ev.yaml").write_text(POLICY)
    ws = build_workspace(root, [(root / "ev.yaml", root / "ev.parquet")], ROLES)
    bastion = Bastion(ws.settings)
    try:
        for model in MODELS:
            attach(bastion, "ev", model, root / "p.parquet")
    finally:
        bastion.close()
    return ws


def _plan_and_exact(ws: Workspace) -> tuple[EvaluationPlan, np.ndarray]:
    bastion = Bastion(ws.settings)
    try:
        policy, version = bastion.engine.policy("ev")
        request = {"models": MODELS, "slices": SLICES, "metrics": ["accuracy"], "per_class": False, "epsilon": EPSILON}
        plan = plan_evaluation(bastion, policy, version, request)
        exact = exact_counts(plan, bastion.engine, PredictionsStore(ws.settings.predictions_dir))
    finally:
        bastion.close()
    return plan, np.asarray(exact)


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, Workspace]:
    root = tmp_path_factory.mktemp("ev_neighbours")
    return _workspace(root / "d", with_unit=False), _workspace(root / "d_prime", with_unit=True)


def _loss_hits(draws: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, tau: float) -> int:
    loss = (np.abs(draws - b).sum(axis=1) - np.abs(draws - a).sum(axis=1)) / scale
    return int((loss >= tau - 1e-9).sum())


def _draws(plan: EvaluationPlan, exact: np.ndarray) -> np.ndarray:
    return np.array(
        [
            [x for m in release(plan, exact.tolist())["confusion"] for row in m["counts"] for x in row]
            for _ in range(DRAWS)
        ]
    )


def test_neighbours_differ_by_the_claimed_sensitivity(neighbours: tuple[Workspace, Workspace]) -> None:
    (plan_b, b), (plan_a, a) = (_plan_and_exact(ws) for ws in neighbours)
    assert plan_a.sensitivity == plan_b.sensitivity == K * len(MODELS) * len(SLICES)
    assert int(np.abs(a - b).sum()) == plan_a.sensitivity
    assert int((a != b).sum()) == len(MODELS) * len(SLICES)


def test_empirical_epsilon_of_an_evaluation_release(neighbours: tuple[Workspace, Workspace]) -> None:
    (plan, b), (_, a) = (_plan_and_exact(ws) for ws in neighbours)
    on_a, on_b = _draws(plan, a), _draws(plan, b)
    bound = epsilon_lower_bound(
        _loss_hits(on_a, a, b, plan.scale, EPSILON),
        DRAWS,
        _loss_hits(on_b, a, b, plan.scale, EPSILON),
        DRAWS,
        CONFIDENCE,
    )
    assert bound <= EPSILON, bound
    # Control: the same event on releases with half the noise (twice the ε, claimed scale kept) exceeds ε.
    half_a = np.array([release_integers(a.tolist(), plan.sensitivity, 2 * EPSILON).values for _ in range(DRAWS)])
    half_b = np.array([release_integers(b.tolist(), plan.sensitivity, 2 * EPSILON).values for _ in range(DRAWS)])
    control = epsilon_lower_bound(
        _loss_hits(half_a, a, b, plan.scale, EPSILON),
        DRAWS,
        _loss_hits(half_b, a, b, plan.scale, EPSILON),
        DRAWS,
        CONFIDENCE,
    )
    assert control > EPSILON, control


def _shape(answer: Any) -> Any:
    if isinstance(answer, dict):
        return {k: _shape(v) for k, v in answer.items() if k not in {"query_id", "dataset_version", "attachment"}}
    if isinstance(answer, list):
        return [_shape(v) for v in answer]
    if answer is None or isinstance(answer, int | float) and not isinstance(answer, bool):
        return "number"  # a metric of noisy counts whose denominator came out ≤ 0 is null: post-processing of noise
    return type(answer).__name__


def test_status_and_shape_are_the_same_on_both(neighbours: tuple[Workspace, Workspace]) -> None:
    answers = []
    for ws in neighbours:
        with ws.app() as c:
            body = {"dataset": "ev", "models": MODELS, "slices": SLICES, "epsilon": 0.5}
            r = c.post("/v1/evaluate", json=body, headers=ws.headers("analyst"))
            bad = c.post("/v1/evaluate", json={**body, "slices": ["gold"]}, headers=ws.headers("analyst"))
            answers.append((r.status_code, _shape(r.json()), bad.status_code, bad.json()))
    assert answers[0] == answers[1]
