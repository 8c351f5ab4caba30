"""Released LF statistics: intervals cover the exact values at about the stated rate, the sensitivities are
honest (removing one privacy unit moves each released vector by at most its d_in), ε adds up, and the label
model is fitted on the DP histogram of vote patterns only."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from labeling_functions.label_model import fit_on_counts, rebuilt_counts
from labeling_functions.patterns import MAX_CELLS, PatternDomain
from labeling_functions.statistics import (
    ExactStatistics,
    LFInfo,
    Release,
    check_calibration,
    derive_statistics,
    exact_summary,
    max_disagreeing_pairs,
    plan_measurements,
    release_counts,
    release_statistics,
    sum_half_width,
)
from policies.errors import InvalidRequest
from policies.mechanisms import release_integers

CLASSES = ["urgent", "routine"]
K = 10
LFS = [LFInfo("a", "sql", (0,)), LFInfo("b", "sql", (1,)), LFInfo("c", "python", (0, 1)), LFInfo("d", "sql", (0,))]
POLARITY = [lf.polarity for lf in LFS]
DOMAIN = PatternDomain(tuple(POLARITY), len(CLASSES), True)


def _random_votes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A label matrix with LFs that fire on part of the rows, mostly agreeing with a gold label."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, n)
    votes = np.full((n, len(LFS)), -1)
    for j, lf in enumerate(LFS):
        fires = rng.random(n) < [0.3, 0.5, 0.2, 0.05][j]
        guess = np.where(rng.random(n) < 0.8, gold, 1 - gold)
        ok = np.isin(guess, lf.polarity)
        votes[:, j] = np.where(fires & ok, guess, -1)
    return votes, gold


def _exact(votes: np.ndarray, gold: np.ndarray) -> ExactStatistics:
    keys, counts = np.unique(np.column_stack([votes, gold]), axis=0, return_counts=True)
    return ExactStatistics.from_patterns(keys[:, :-1], counts, keys[:, -1], len(CLASSES), DOMAIN)


def _covers(cell: dict[str, Any], exact: float) -> bool:
    lo, hi = cell["interval"]
    return lo - 1e-9 <= exact <= hi + 1e-9


def _check(released: dict[str, Any], ex: ExactStatistics, hits: dict[str, list[bool]]) -> None:
    n = ex.rows
    assert ex.correct is not None and ex.incorrect is not None
    for j, lf in enumerate(released["lfs"]):
        hits["coverage"].append(_covers(lf["coverage"], ex.coverage[j] / n))
        hits["overlaps"].append(_covers(lf["overlaps"], ex.overlaps[j] / n))
        hits["conflicts"].append(_covers(lf["conflicts"], ex.conflicts[j] / n))
        hits["votes"].append(_covers(lf["votes"], ex.coverage[j]))
        c, i = ex.correct[j].sum(), ex.incorrect[j].sum()
        hits["correct"].append(_covers(lf["correct"], c))
        hits["incorrect"].append(_covers(lf["incorrect"], i))
        hits["emp_acc"].append(_covers(lf["emp_acc"], c / (c + i)))
        for cls, cell in lf["per_class"].items():
            k = CLASSES.index(cls)
            ck, ik = ex.correct[j, k], ex.incorrect[j, k]
            hits["class_correct"].append(_covers(cell["correct"], ck))
            hits["class_emp_acc"].append(_covers(cell["emp_acc"], ck / (ck + ik)))
    ls = released["label_set"]
    hits["rows"].append(_covers(ls["rows"], n))
    hits["label_set"].append(_covers(ls["coverage"], ex.covered / n))
    pw = released["pairwise"]
    m = len(released["lfs"])
    for j in range(m):
        for i in range(j + 1, m):
            hits["pair_overlaps"].append(
                _covers({"interval": pw["overlaps_intervals"][j][i]}, ex.pair_overlaps[j, i] / n)
            )
            hits["pair_conflicts"].append(
                _covers({"interval": pw["conflicts_intervals"][j][i]}, ex.pair_conflicts[j, i] / n)
            )


def _check_label_model(release: Release, ex: ExactStatistics, hits: dict[str, list[bool]]) -> None:
    """The label model's sums cover the exact counts of the rows under the labels it gave the patterns."""
    assert release.labels is not None and ex.histogram is not None
    hist = ex.histogram.reshape(DOMAIN.patterns, DOMAIN.gold_values)
    pred = release.labels.predicted
    lm = release.answer["label_model"]
    for c, name in [*enumerate(CLASSES), (-1, "abstain")]:
        hits["class_balance"].append(_covers(lm["class_balance"][name], hist[pred == c].sum() / ex.rows))
    voted = np.flatnonzero(pred != -1)
    agree = hist[voted, pred[voted] + 1].sum()
    compared = hist[voted, 1:].sum()
    hits["gold_agreement"].append(_covers(lm["gold_agreement"], agree / compared))
    hits["compared_with_gold"].append(_covers(lm["compared_with_gold"], compared))


def test_intervals_cover_the_exact_statistics_at_the_stated_rate() -> None:
    votes, gold = _random_votes(3_000, seed=1)
    ex = _exact(votes, gold)
    measurements = plan_measurements(
        m=len(LFS), polarity=POLARITY, k=K, epsilon=2.0, has_gold=True, label_model=False, n_classes=2
    )
    hits: dict[str, list[bool]] = defaultdict(list)
    for _ in range(200):
        _check(release_statistics(ex, measurements, LFS, CLASSES, alpha=0.05).answer, ex, hits)
    rates = {name: float(np.mean(h)) for name, h in hits.items()}
    for name, rate in rates.items():
        assert rate >= 0.9, (name, rate, rates)
    # A single released count is neither over- nor under-covered much: about 95%, within four standard errors of
    # the rate over its cells (each cell's noise is drawn afresh; a fixed band of 0.92-0.99 failed now and then).
    for name in ("votes", "rows", "class_correct"):
        spread = 4 * math.sqrt(0.95 * 0.05 / len(hits[name]))
        assert 0.95 - spread <= rates[name] <= 0.95 + spread, (name, rates[name], len(hits[name]))


def test_label_model_intervals_cover_the_counts_under_its_labels() -> None:
    votes, gold = _random_votes(3_000, seed=4)
    ex = _exact(votes, gold)
    measurements = plan_measurements(
        m=len(LFS), polarity=POLARITY, k=K, epsilon=4.0, has_gold=True, label_model=True, n_classes=2
    )
    patterns = DOMAIN.all_patterns()
    only_a = DOMAIN.pattern_index(np.array([[0, -1, -1, -1]]))[0]
    only_b = DOMAIN.pattern_index(np.array([[-1, 1, -1, -1]]))[0]
    assert patterns[only_a].tolist() == [0, -1, -1, -1]
    hits: dict[str, list[bool]] = defaultdict(list)
    follows: list[bool] = []
    for _ in range(40):
        release = release_statistics(ex, measurements, LFS, CLASSES, alpha=0.05)
        _check(release.answer, ex, hits)
        _check_label_model(release, ex, hits)
        assert release.labels is not None
        assert release.labels.predicted[0] == -1  # nobody voted: no label, whatever the noise
        follows.append(bool(release.labels.predicted[only_a] == 0 and release.labels.predicted[only_b] == 1))
    rates = {name: float(np.mean(h)) for name, h in hits.items()}
    for name in ("class_balance", "gold_agreement", "compared_with_gold"):
        assert rates[name] >= 0.9, (name, rates)
    # The planted structure shows through the noise in most releases (one fit on a noisy histogram can flip a
    # lone LF's class; checking one release failed now and then): LF "a" votes urgent, "b" routine.
    assert np.mean(follows) >= 0.75, follows


def test_noise_shrinks_with_epsilon_and_exact_summary_matches() -> None:
    votes, gold = _random_votes(2_000, seed=2)
    ex = _exact(votes, gold)
    widths = []
    for eps in (0.5, 5.0):
        ms = plan_measurements(
            m=len(LFS), polarity=POLARITY, k=K, epsilon=eps, has_gold=True, label_model=False, n_classes=2
        )
        out = release_statistics(ex, ms, LFS, CLASSES, alpha=0.05).answer
        widths.append(next(x["half_width"] for x in out["measurements"] if x["measurement"] == "lf"))
        assert "label_model" not in out and {m["measurement"] for m in out["measurements"]} == {
            "rows",
            "lf",
            "pairwise",
            "gold",
        }
    assert math.isclose(widths[1], widths[0] / 10, rel_tol=0.05)
    summary = exact_summary(ex, LFS)
    assert summary["rows"] == 2_000
    assert math.isclose(summary["lfs"][1]["coverage"], float((votes[:, 1] != -1).mean()))


def test_epsilon_split_adds_up_and_sensitivities_follow_from_k() -> None:
    m = len(LFS)
    ms = plan_measurements(m=m, polarity=POLARITY, k=K, epsilon=1.0, has_gold=True, label_model=True, n_classes=2)
    assert math.isclose(sum(x.epsilon for x in ms), 1.0)
    d_in = {x.name: x.d_in for x in ms}
    # pairwise: all 6 pairs overlap, and with two classes at most 2 × 2 = 4 pairs can disagree.
    # label_model: a row falls in exactly one (pattern × gold) cell; 2·2·3·2 patterns × 3 gold values.
    assert d_in == {"rows": 2 * K, "lf": 3 * m * K, "pairwise": (6 + 4) * K, "gold": m * K, "label_model": K}
    assert next(x.cells for x in ms if x.name == "label_model") == 24 * 3 == DOMAIN.cells
    alone = plan_measurements(m=1, polarity=[(0,)], k=K, epsilon=1.0, has_gold=False, label_model=False, n_classes=2)
    assert [x.name for x in alone] == ["rows", "lf"] and all(x.epsilon == 0.5 for x in alone)


def test_removing_one_unit_moves_each_vector_by_at_most_its_sensitivity() -> None:
    """Brute force on neighbouring datasets: every unit owns up to K rows; drop each unit in turn."""
    rng = np.random.default_rng(3)
    votes, gold = _random_votes(600, seed=3)
    # Worst cases for the sensitivities: a unit whose K rows all have every LF voting, in disagreement.
    worst = np.tile(np.array([[0, 1, 1, 0]]), (K, 1))
    votes = np.vstack([votes, worst])
    gold = np.concatenate([gold, np.full(K, 1)])
    units = np.concatenate([rng.permutation(np.arange(600) % 75), np.full(K, 999)])
    _, counts = np.unique(units, return_counts=True)
    assert counts.max() <= K
    ms = plan_measurements(
        m=len(LFS), polarity=POLARITY, k=K, epsilon=1.0, has_gold=True, label_model=True, n_classes=2
    )
    full = _exact(votes, gold)
    moved: dict[str, int] = defaultdict(int)
    for u in np.unique(units):
        keep = units != u
        neighbour = _exact(votes[keep], gold[keep])
        for x in ms:
            a, b = np.array(full.vector(x.name, POLARITY)), np.array(neighbour.vector(x.name, POLARITY))
            dist = int(np.abs(a - b).sum())
            assert dist <= x.d_in, (x.name, u, dist, x.d_in)
            moved[x.name] = max(moved[x.name], dist)
    # The worst-case unit attains the bound: the sensitivities are not loose by design.
    assert moved["lf"] == 3 * len(LFS) * K and moved["pairwise"] == (6 + 4) * K
    assert moved["rows"] == 2 * K and moved["gold"] == len(LFS) * K and moved["label_model"] == K


def test_max_disagreeing_pairs() -> None:
    assert [max_disagreeing_pairs(m, 2) for m in (1, 2, 3, 4, 5)] == [0, 1, 2, 4, 6]
    assert max_disagreeing_pairs(4, 4) == 6 and max_disagreeing_pairs(4, 10) == 6  # every pair
    assert max_disagreeing_pairs(6, 3) == 12  # 2 + 2 + 2


def test_the_pattern_domain_numbers_every_combination_once() -> None:
    patterns = DOMAIN.all_patterns()
    assert patterns.shape == (DOMAIN.patterns, len(LFS)) == (24, 4)
    assert len({tuple(p) for p in patterns}) == 24
    assert np.array_equal(DOMAIN.pattern_index(patterns), np.arange(24))
    for j, lf in enumerate(LFS):
        assert set(patterns[:, j]) == {-1, *lf.polarity}
    # A vote outside an LF's polarity (never produced: the gateway masks it) counts as an abstention.
    assert DOMAIN.pattern_index(np.array([[1, -1, -1, -1]]))[0] == 0
    cells = DOMAIN.cell_index(np.array([[0, -1, -1, -1]] * 3), np.array([-1, 0, 1]))
    assert cells.tolist() == [3, 4, 5] and DOMAIN.cells == 72


def test_the_label_model_histogram_is_capped_before_anything_is_spent() -> None:
    def plan(m: int) -> list[Any]:
        return plan_measurements(
            m=m, polarity=[(0,)] * m, k=K, epsilon=1.0, has_gold=True, label_model=True, n_classes=2
        )

    assert next(x.cells for x in plan(14) if x.name == "label_model") == 2**14 * 3 <= MAX_CELLS
    with pytest.raises(InvalidRequest, match="at most 65,536"):
        plan(15)
    assert (
        len(
            plan_measurements(
                m=40, polarity=[(0,)] * 40, k=K, epsilon=1.0, has_gold=True, label_model=False, n_classes=2
            )
        )
        == 4
    )


@pytest.mark.parametrize("epsilon, alpha", [(1e300, 0.05), (1e6, 0.05), (1.0, 5e-324), (1.0, 0.0)])
def test_parameters_that_cannot_be_calibrated_are_refused(epsilon: float, alpha: float) -> None:
    ms = plan_measurements(
        m=2, polarity=[(0,), (1,)], k=K, epsilon=epsilon, has_gold=True, label_model=False, n_classes=2
    )
    with pytest.raises(InvalidRequest, match="cannot be calibrated"):
        check_calibration(ms, alpha, 2)
    check_calibration(
        plan_measurements(m=2, polarity=[(0,), (1,)], k=K, epsilon=1e-6, has_gold=True, label_model=False, n_classes=2),
        1e-9,
        2,
    )


def test_the_interval_of_a_sum_of_noisy_cells_covers_its_exact_value() -> None:
    scale, alpha = 25.0, 0.1
    for n in (1, 3, 40):
        h = sum_half_width(scale, n, alpha)
        assert h <= n * release_integers([0], 1, 1 / scale).accuracy(alpha / n) + 1e-9  # never above the union bound
        draws = np.array(release_integers([0] * (n * 2_000), 1, 1 / scale).values).reshape(2_000, n).sum(axis=1)
        assert float(np.mean(np.abs(draws) > h)) <= alpha + 0.02, n  # 3 standard errors of 2,000 draws
    # Much tighter than the union bound for many cells (about √n growth instead of n).
    assert sum_half_width(scale, 10_000, alpha) < 0.02 * 10_000 * release_integers([0], 1, 1 / scale).accuracy(
        alpha / 10_000
    )


def test_the_label_model_sees_only_noisy_counts_and_survives_any_of_them() -> None:
    assert rebuilt_counts(np.array([-5.0, 3.0, 0.0])).tolist() == [0, 3, 0]
    assert rebuilt_counts(np.array([1e9, 1e9, -1.0]), max_rows=1_000).tolist() == [500, 500, 0]
    patterns = DOMAIN.all_patterns()
    for counts in (np.zeros(24), np.full(24, -3.0), np.where(np.arange(24) == 0, 50.0, 0.0)):
        labels = fit_on_counts(patterns, counts, 2)  # nothing to fit: the majority vote of each pattern
        assert labels.predicted.shape == (24,) and labels.probabilities.shape == (24, 2)
        assert labels.predicted[DOMAIN.pattern_index(np.array([[0, -1, -1, -1]]))[0]] == 0
        assert labels.predicted[0] == -1


def test_the_default_input_is_released_with_the_same_shape() -> None:
    votes, gold = _random_votes(500, seed=5)
    ms = plan_measurements(
        m=len(LFS), polarity=POLARITY, k=K, epsilon=1.0, has_gold=True, label_model=True, n_classes=2
    )
    real = release_statistics(_exact(votes, gold), ms, LFS, CLASSES, alpha=0.05)
    empty = ExactStatistics.empty(len(LFS), 2, True, DOMAIN)
    assert empty.rows == 0 and empty.histogram is not None and empty.histogram.tolist() == [0] * 72
    default = derive_statistics(release_counts(empty, ms, POLARITY), ms, LFS, CLASSES, alpha=0.05)
    assert _shape(default.answer) == _shape(real.answer)


def _shape(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in sorted(x.items())}
    if isinstance(x, list):
        return [_shape(v) for v in x]
    return "scalar"
