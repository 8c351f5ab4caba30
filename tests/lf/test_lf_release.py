"""Released LF statistics: intervals cover the exact values at about the stated rate, the sensitivities are
honest (removing one privacy unit moves each released vector by at most its d_in), and ε adds up."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from labeling_functions.statistics import (
    ExactStatistics,
    LFInfo,
    exact_summary,
    max_disagreeing_pairs,
    plan_measurements,
    release_statistics,
)

CLASSES = ["urgent", "routine"]
K = 10
LFS = [LFInfo("a", "sql", (0,)), LFInfo("b", "sql", (1,)), LFInfo("c", "python", (0, 1)), LFInfo("d", "sql", (0,))]
POLARITY = [lf.polarity for lf in LFS]


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
    return ExactStatistics.from_patterns(keys[:, :-1], counts, keys[:, -1], len(CLASSES))


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
            hits["pair_overlaps"].append(_covers({"interval": pw["overlaps_intervals"][j][i]},
                                                 ex.pair_overlaps[j, i] / n))
            hits["pair_conflicts"].append(_covers({"interval": pw["conflicts_intervals"][j][i]},
                                                  ex.pair_conflicts[j, i] / n))
    lm = released["label_model"]
    assert ex.predicted is not None
    for idx, cell in enumerate(lm["class_balance"].values()):
        hits["class_balance"].append(_covers(cell, ex.predicted[idx] / n))
    hits["gold_agreement"].append(_covers(lm["gold_agreement"], ex.agree / (ex.agree + ex.disagree)))


def test_intervals_cover_the_exact_statistics_at_the_stated_rate() -> None:
    votes, gold = _random_votes(3_000, seed=1)
    ex = _exact(votes, gold)
    ex.predicted = np.array([1_400, 1_300, 300])
    ex.agree, ex.disagree = 2_100, 600
    measurements = plan_measurements(m=len(LFS), polarity=POLARITY, k=K, epsilon=2.0, has_gold=True,
                                     label_model=True, n_classes=2)
    hits: dict[str, list[bool]] = defaultdict(list)
    releases = 200
    for _ in range(releases):
        _check(release_statistics(ex, measurements, LFS, CLASSES, alpha=0.05), ex, hits)
    rates = {name: float(np.mean(h)) for name, h in hits.items()}
    for name, rate in rates.items():
        assert rate >= 0.9, (name, rate, rates)
    # A single released count is neither over- nor under-covered much: about 95%.
    for name in ("votes", "correct", "incorrect", "rows", "class_correct"):
        assert 0.92 <= rates[name] <= 0.99, (name, rates[name])


def test_noise_shrinks_with_epsilon_and_exact_summary_matches() -> None:
    votes, gold = _random_votes(2_000, seed=2)
    ex = _exact(votes, gold)
    widths = []
    for eps in (0.5, 5.0):
        ms = plan_measurements(m=len(LFS), polarity=POLARITY, k=K, epsilon=eps, has_gold=True, label_model=False,
                               n_classes=2)
        out = release_statistics(ex, ms, LFS, CLASSES, alpha=0.05)
        widths.append(next(x["half_width"] for x in out["measurements"] if x["measurement"] == "lf"))
        assert "label_model" not in out and {m["measurement"] for m in out["measurements"]} == {
            "rows", "lf", "pairwise", "gold"}
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
    assert d_in == {"rows": 2 * K, "lf": 3 * m * K, "pairwise": (6 + 4) * K, "gold": m * K, "label_model": 2 * K}
    alone = plan_measurements(m=1, polarity=[(0,)], k=K, epsilon=1.0, has_gold=False, label_model=False,
                              n_classes=2)
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
    ms = plan_measurements(m=len(LFS), polarity=POLARITY, k=K, epsilon=1.0, has_gold=True, label_model=False,
                           n_classes=2)
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
    assert moved["rows"] == 2 * K and moved["gold"] == len(LFS) * K


def test_max_disagreeing_pairs() -> None:
    assert [max_disagreeing_pairs(m, 2) for m in (1, 2, 3, 4, 5)] == [0, 1, 2, 4, 6]
    assert max_disagreeing_pairs(4, 4) == 6 and max_disagreeing_pairs(4, 10) == 6  # every pair
    assert max_disagreeing_pairs(6, 3) == 12  # 2 + 2 + 2
