"""Empirical ε of the LF statistics and of the label model's statistics, on two datasets that differ in one
worst-case privacy unit (k rows on which every LF votes and the LFs disagree, with a gold label).

The release functions are called directly (no DuckDB): `release_counts` is the only step of an LF-statistics
answer that reads the exact statistics; everything reported, the label model included, is post-processing of its
output. For each measurement the event is fixed before sampling, from the exact vectors a (D′) and b (D) and the
claimed noise scale s: the privacy loss Σ_i (|x_i - b_i| - |x_i - a_i|) / s is at least τ. A Clopper–Pearson
lower bound on ε at 99% confidence (family-wise over the measurements) must not exceed the claimed ε. The same
events catch a release with half the noise, one calibrated without the per-row reach r, and the former label
model (fitted on all the private rows, released with sensitivity 2k).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from labeling_functions.patterns import PatternDomain
from labeling_functions.statistics import ExactStatistics, LFInfo, Measurement, plan_measurements, release_counts
from policies.mechanisms import release_integers
from tests.privacy.epsilon import epsilon_lower_bound

K = 10
EPSILON = 5.0  # five measurements: ε = 1 each, large enough for the estimate to have power
DRAWS = 2_500
CONFIDENCE = 0.99
CLASSES = ["urgent", "routine"]
LFS = [LFInfo("a", "sql", (0,)), LFInfo("b", "sql", (1,)), LFInfo("c", "python", (0, 1))]
POLARITY = [lf.polarity for lf in LFS]
DOMAIN = PatternDomain(tuple(POLARITY), len(CLASSES), True)
# Every LF votes and they disagree (a: urgent, b: routine, c: urgent), gold routine: this unit moves every vector
# by exactly its sensitivity, and puts all k rows in one histogram cell.
WORST_VOTES, WORST_GOLD = (0, 1, 0), 1


def _dataset(n: int = 2_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)

    def lf(polarity: list[int], acc: float, cov: float) -> np.ndarray:
        v = np.where(rng.random(n) < acc, y, 1 - y)
        return np.where((rng.random(n) < cov) & np.isin(v, polarity), v, -1)

    return np.column_stack([lf([0], 0.8, 0.6), lf([1], 0.8, 0.6), lf([0, 1], 0.5, 0.5)]), y


def _exact(votes: np.ndarray, gold: np.ndarray) -> ExactStatistics:
    keys, counts = np.unique(np.column_stack([votes, gold]), axis=0, return_counts=True)
    return ExactStatistics.from_patterns(keys[:, :-1], counts, keys[:, -1], len(CLASSES), DOMAIN)


def _neighbours() -> tuple[ExactStatistics, ExactStatistics]:
    votes, gold = _dataset()
    unit_votes = np.tile(np.array([WORST_VOTES]), (K, 1))
    return _exact(votes, gold), _exact(np.vstack([votes, unit_votes]), np.concatenate([gold, np.full(K, WORST_GOLD)]))


def _loss_hits(draws: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, tau: float) -> int:
    """How many draws have privacy loss (for a against b, at the claimed scale) of at least tau."""
    loss = (np.abs(draws - b).sum(axis=1) - np.abs(draws - a).sum(axis=1)) / scale
    return int((loss >= tau - 1e-12).sum())


def _tau(ms: Measurement, a: np.ndarray, b: np.ndarray) -> float:
    """Fixed from public facts: near the largest loss when few cells differ, half of it when many do."""
    differing = int((a != b).sum())
    return ms.epsilon * (0.9 if differing <= 2 else 0.5)


def _bound(
    ms: Measurement, a: np.ndarray, b: np.ndarray, on_a: np.ndarray, on_b: np.ndarray, confidence: float
) -> float:
    tau = _tau(ms, a, b)
    return epsilon_lower_bound(
        _loss_hits(on_a, a, b, ms.scale, tau), len(on_a), _loss_hits(on_b, a, b, ms.scale, tau), len(on_b), confidence
    )


def _release_many(values: list[int], d_in: int, epsilon: float) -> np.ndarray:
    """DRAWS independent releases of one vector by OpenDP's discrete Laplace (one call over DRAWS copies: the
    mechanism adds independent noise to every entry)."""
    noisy = release_integers(values * DRAWS, d_in, epsilon).values
    return np.array(noisy, dtype=np.float64).reshape(DRAWS, len(values))


@pytest.fixture(scope="module")
def setup() -> tuple[ExactStatistics, ExactStatistics, list[Measurement]]:
    d, d_prime = _neighbours()
    ms = plan_measurements(
        m=len(LFS), polarity=POLARITY, k=K, epsilon=EPSILON, has_gold=True, label_model=True, n_classes=len(CLASSES)
    )
    return d, d_prime, ms


def test_the_unit_is_worst_case_for_every_measurement(setup: Any) -> None:
    d, d_prime, ms = setup
    assert [x.name for x in ms] == ["rows", "lf", "pairwise", "gold", "label_model"]
    assert all(x.epsilon == pytest.approx(EPSILON / 5) for x in ms)
    for x in ms:
        a, b = np.array(d_prime.vector(x.name, POLARITY)), np.array(d.vector(x.name, POLARITY))
        assert int(np.abs(a - b).sum()) == x.d_in, x.name
    # The label model's measurement is one histogram of sensitivity k: the unit's rows share one cell.
    lm = next(x for x in ms if x.name == "label_model")
    assert lm.d_in == K and int((d_prime.histogram != d.histogram).sum()) == 1


def test_lf_and_label_model_statistics_stay_within_their_epsilon(setup: Any) -> None:
    d, d_prime, ms = setup
    on_d: dict[str, list[list[int]]] = {x.name: [] for x in ms}
    on_d_prime: dict[str, list[list[int]]] = {x.name: [] for x in ms}
    for _ in range(DRAWS):  # the release function the gateway runs, as it runs it
        for exact, into in ((d, on_d), (d_prime, on_d_prime)):
            for name, values in release_counts(exact, ms, POLARITY).items():
                into[name].append(values)
    each = 1 - (1 - CONFIDENCE) / len(ms)
    bounds = {}
    for x in ms:
        a, b = np.array(d_prime.vector(x.name, POLARITY)), np.array(d.vector(x.name, POLARITY))
        bounds[x.name] = _bound(x, a, b, np.array(on_d_prime[x.name]), np.array(on_d[x.name]), each)
    for x in ms:
        assert bounds[x.name] <= x.epsilon, (x.name, bounds)
    assert sum(bounds.values()) <= EPSILON
    # The events have power: where few cells differ the bound comes close to the claim.
    assert bounds["label_model"] > 0.5 * EPSILON / 5 and bounds["rows"] > 0.3 * EPSILON / 5, bounds


def test_the_events_catch_releases_with_too_little_noise(setup: Any) -> None:
    d, d_prime, ms = setup
    for x in ms:
        a, b = d_prime.vector(x.name, POLARITY), d.vector(x.name, POLARITY)
        if x.per_row <= 2:  # half the noise scale
            broken = (x.d_in, 2 * x.epsilon)
        else:  # the sensitivity of one row instead of one row's reach r (k instead of k·r)
            broken = (x.k, x.epsilon)
        bound = _bound(x, np.array(a), np.array(b), _release_many(a, *broken), _release_many(b, *broken), CONFIDENCE)
        assert bound > x.epsilon, (x.name, bound)


def _old_label_model_counts(votes: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """The former release: LabelModel fitted on all private rows; predicted counts per class and abstain, then
    agree and disagree with gold."""
    import torch
    from snorkel.labeling.model import LabelModel

    torch.manual_seed(12345)
    model = LabelModel(cardinality=2, verbose=False, device="cpu")
    model.fit(L_train=votes, n_epochs=200, seed=12345, progress_bar=False, log_freq=201)
    preds = model.predict(votes, tie_break_policy="abstain")
    preds = np.where((votes != -1).any(axis=1), preds, -1)
    compared = preds != -1
    agree = int((compared & (preds == gold)).sum())
    return np.array([(preds == 0).sum(), (preds == 1).sum(), (preds == -1).sum(), agree, compared.sum() - agree])


def test_the_former_label_model_release_exceeds_its_claim() -> None:
    votes, gold = _dataset()
    base = _old_label_model_counts(votes, gold)
    # The unit (k rows of one vote pattern) that moves the old statistics most: some pattern's prediction flips.
    moved = []
    for unit in itertools.product([-1, 0], [-1, 1], [-1, 0, 1]):
        unit_votes = np.tile(np.array([unit]), (K, 1))
        other = _old_label_model_counts(np.vstack([votes, unit_votes]), np.concatenate([gold, np.full(K, 1)]))
        moved.append((int(np.abs(other - base).sum()), other))
    distance, worst = max(moved, key=lambda t: t[0])
    claimed = Measurement("label_model", 5, 2, K, 1.0)  # the old claim: L1 sensitivity 2k
    assert distance > claimed.d_in  # the claimed sensitivity was wrong
    a, b = worst.tolist(), base.tolist()
    bound = _bound(
        claimed,
        np.array(a),
        np.array(b),
        _release_many(a, claimed.d_in, claimed.epsilon),
        _release_many(b, claimed.d_in, claimed.epsilon),
        CONFIDENCE,
    )
    assert bound > claimed.epsilon, (distance, bound)
