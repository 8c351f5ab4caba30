"""LF statistics: exact values from the vote patterns, and their differentially private release.

Exact statistics are computed from the GROUP BY over the vote pattern (one row per distinct combination of LF
votes and gold label, with its row count), so no per-row data leaves DuckDB. They are released as a few integer
count vectors through OpenDP's discrete Laplace mechanism (`policies.mechanisms.release_integers`); everything
reported is post-processing of those vectors.

Sensitivities. One privacy unit changes at most k = max_rows_per_unit rows of the pre-bounded table. If one row
adds 1 to at most r cells of a count vector, adding or removing a unit moves the vector by at most k·r in L1.
With m LFs (one vote each per row) the vectors and their r are:

=============  =====================================================================  ===========
measurement    cells                                                                  r (per row)
=============  =====================================================================  ===========
rows           [rows, rows with at least one vote]                                    2
lf             per LF: coverage, overlaps, conflicts                                  3m
pairwise       per pair j<l: both vote, both vote and disagree                        m(m-1)/2 + D
gold           per LF and class in its polarity: correct, incorrect                   m
label_model    histogram over (vote pattern × gold class or missing), public domain   1
=============  =====================================================================  ===========

D = max_disagreeing_pairs(m, classes) is the most pairs that can disagree on one row (votes split as evenly as
possible over the classes: m²/4 for two classes), at most m(m-1)/2. The label model's pattern domain is every
combination of {abstain} ∪ polarity per LF (`labeling_functions.patterns`), capped at `MAX_CELLS` cells; Snorkel's
LabelModel is fitted on that noisy histogram only (`labeling_functions.label_model`), and its class balance and
agreement with the gold labels are sums of cells of the same histogram, so they cost nothing more.

ε split: the request's ε is divided equally among the measurements that apply (pairwise needs m ≥ 2, gold a
gold column in the policy, label_model the option). By sequential composition the request costs exactly ε.

Intervals. A count's (1-alpha) interval is its noisy value ± the discrete Laplace half-width at alpha. A fraction
a/b (coverage, overlaps, conflicts, pairwise rates, label-set coverage, class balance) uses a and b each at alpha/2
(Bonferroni) and takes the extreme ratios; an accuracy c/(c+i) likewise with c and i at alpha/2. A sum of several
cells of one vector uses the smaller of the union bound and a Chernoff bound on the sum of their noises
(`sum_half_width`); the label model's sums treat its labels of the patterns as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from labeling_functions.label_model import PatternLabels, fit_on_counts
from labeling_functions.patterns import ABSTAIN, MAX_CELLS, PatternDomain
from policies.errors import InvalidRequest
from policies.mechanisms import integer_accuracy, release_integers


@dataclass(frozen=True)
class Measurement:
    """One released integer vector: its size, per-row reach, sensitivity and share of ε."""

    name: str
    cells: int
    per_row: int
    k: int
    epsilon: float

    @property
    def d_in(self) -> int:
        return self.k * self.per_row

    @property
    def scale(self) -> float:
        return self.d_in / self.epsilon

    def half_width(self, alpha: float) -> float:
        return integer_accuracy(self.scale, alpha)

    def sum_half_width(self, cells: int, alpha: float) -> float:
        return sum_half_width(self.scale, cells, alpha)

    def public(self, alpha: float) -> dict[str, Any]:
        return {
            "measurement": self.name,
            "cells": self.cells,
            "sensitivity": self.d_in,
            "epsilon": self.epsilon,
            "half_width": self.half_width(alpha),
        }


def max_disagreeing_pairs(m: int, n_classes: int) -> int:
    """Most LF pairs that can vote differently on one row: votes split as evenly as possible over the classes."""
    groups = min(m, n_classes)
    sizes = [m // groups + (1 if i < m % groups else 0) for i in range(groups)]
    return (m * m - sum(g * g for g in sizes)) // 2


def plan_measurements(
    *,
    m: int,
    polarity: list[tuple[int, ...]],
    k: int,
    epsilon: float,
    has_gold: bool,
    label_model: bool,
    n_classes: int,
) -> list[Measurement]:
    """The measurements of an LF-statistics request and their ε (equal split)."""
    shapes: list[tuple[str, int, int]] = [("rows", 2, 2), ("lf", 3 * m, 3 * m)]
    if m >= 2:
        shapes.append(("pairwise", m * (m - 1), m * (m - 1) // 2 + max_disagreeing_pairs(m, n_classes)))
    if has_gold:
        shapes.append(("gold", 2 * sum(len(p) for p in polarity), m))
    if label_model:
        domain = PatternDomain(tuple(polarity), n_classes, has_gold)
        if domain.cells > MAX_CELLS:
            raise InvalidRequest(
                f"the label model's histogram would have {domain.cells:,} cells (every combination of abstain or a "
                f"label per LF, times the gold values); at most {MAX_CELLS:,} are allowed: use fewer labeling "
                "functions with the label model"
            )
        shapes.append(("label_model", domain.cells, 1))
    each = epsilon / len(shapes)
    return [Measurement(name, cells, per_row, k, each) for name, cells, per_row in shapes]


def check_calibration(measurements: list[Measurement], alpha: float, n_classes: int) -> None:
    """Refuse (before any charge) an ε or alpha for which a measurement or an interval cannot be computed."""
    smallest = alpha / (2 * max(n_classes, 1))
    for ms in measurements:
        try:
            release_integers([], ms.d_in, ms.epsilon)  # builds the OpenDP measurement and checks its privacy map
            widths = [ms.scale, ms.half_width(smallest), ms.half_width(alpha), ms.sum_half_width(ms.cells, smallest)]
        except Exception:  # noqa: BLE001 - OpenDP, overflow: all mean the parameters are out of range
            widths = [math.nan]
        if not all(math.isfinite(w) and w >= 0 for w in widths) or ms.scale <= 0:
            raise InvalidRequest(
                f"epsilon={sum(x.epsilon for x in measurements):g} with alpha={alpha:g} cannot be calibrated: the "
                f"noise scale of measurement {ms.name!r} (sensitivity {ms.d_in}, ε={ms.epsilon:g}) or its interval "
                "would not be a finite positive number; choose a smaller epsilon or a larger alpha"
            )


@lru_cache(maxsize=4096)
def sum_half_width(scale: float, n: int, alpha: float) -> float:
    """h with P(|X_1 + … + X_n| > h) ≤ alpha for n independent discrete Laplace noises of `scale`.

    The smaller of two valid bounds: the union bound (n times one noise's half-width at alpha/n) and the Chernoff
    bound min over 0 < λ < 1/scale of (n·ln M(λ) + ln(2/alpha)) / λ, with the noise's moment generating function
    M(λ) = (1-a)² / ((1-a·e^λ)(1-a·e^-λ)), a = e^(-1/scale).
    """
    if n <= 0:
        return 0.0
    union = n * integer_accuracy(scale, alpha / n)
    if n == 1:
        return union
    r = 1.0 / scale
    c = math.log(2.0 / alpha)
    log_norm = 2.0 * math.log(-math.expm1(-r))

    def chernoff(u: float) -> float:  # λ = u / scale, 0 < u < 1
        lam = u * r
        log_m = log_norm - math.log(-math.expm1(lam - r)) - math.log(-math.expm1(-lam - r))
        return (n * log_m + c) / lam

    lo, hi = 1e-12, 1.0 - 1e-12  # chernoff is unimodal in u: golden-section search
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = chernoff(a), chernoff(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = chernoff(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = chernoff(b)
    return min(union, fa, fb)


@dataclass
class ExactStatistics:
    """Exact counts over the pre-bounded table (never released as such)."""

    rows: int
    covered: int
    coverage: np.ndarray  # (m,)
    overlaps: np.ndarray  # (m,)
    conflicts: np.ndarray  # (m,)
    pair_overlaps: np.ndarray  # (m, m)
    pair_conflicts: np.ndarray  # (m, m)
    correct: np.ndarray | None = None  # (m, classes): votes for a class that equal the gold label
    incorrect: np.ndarray | None = None  # (m, classes): votes for a class, gold present and different
    histogram: np.ndarray | None = None  # (cells,) rows per (vote pattern × gold) cell, for the label model

    @classmethod
    def from_patterns(
        cls,
        votes: np.ndarray,
        counts: np.ndarray,
        gold: np.ndarray | None,
        n_classes: int,
        domain: PatternDomain | None = None,
    ) -> ExactStatistics:
        """From distinct vote patterns (p × m), their row counts (p,) and gold labels (p,; -1 = none); with a
        pattern domain, also the label model's histogram."""
        votes = np.asarray(votes, dtype=np.int64)
        if votes.ndim != 2:
            votes = votes.reshape(len(counts), -1)
        w = np.asarray(counts, dtype=np.int64)
        fired = votes != ABSTAIN
        n_fired = fired.sum(axis=1)
        both = fired[:, :, None] & fired[:, None, :]
        differ = both & (votes[:, :, None] != votes[:, None, :])
        pair_overlaps = np.einsum("p,pjl->jl", w, both.astype(np.int64))
        pair_conflicts = np.einsum("p,pjl->jl", w, differ.astype(np.int64))
        stats = cls(
            rows=int(w.sum()),
            covered=int(w[n_fired >= 1].sum()),
            coverage=w @ fired.astype(np.int64),
            overlaps=w @ (fired & (n_fired >= 2)[:, None]).astype(np.int64),
            conflicts=w @ differ.any(axis=2).astype(np.int64),
            pair_overlaps=pair_overlaps,
            pair_conflicts=pair_conflicts,
        )
        g = np.full(len(w), ABSTAIN, dtype=np.int64) if gold is None else np.asarray(gold, dtype=np.int64)
        if gold is not None:
            m = votes.shape[1]
            correct = np.zeros((m, n_classes), dtype=np.int64)
            incorrect = np.zeros((m, n_classes), dtype=np.int64)
            for c in range(n_classes):
                voted = votes == c
                correct[:, c] = w @ (voted & (g == c)[:, None]).astype(np.int64)
                incorrect[:, c] = w @ (voted & ((g != c) & (g != ABSTAIN))[:, None]).astype(np.int64)
            stats.correct, stats.incorrect = correct, incorrect
        if domain is not None:
            stats.histogram = domain.histogram(votes, g, w)
        return stats

    @classmethod
    def empty(cls, m: int, n_classes: int, has_gold: bool, domain: PatternDomain | None = None) -> ExactStatistics:
        """The exact statistics of an empty table: the fixed public input released when a run fails."""
        gold = np.zeros(0, dtype=np.int64) if has_gold else None
        return cls.from_patterns(np.zeros((0, m), dtype=np.int64), np.zeros(0, dtype=np.int64), gold, n_classes, domain)

    def vector(self, name: str, polarity: list[tuple[int, ...]]) -> list[int]:
        """The cells of measurement `name`, in the order `release_statistics` reads them back."""
        m = len(self.coverage)
        if name == "rows":
            return [self.rows, self.covered]
        if name == "lf":
            return [int(v) for j in range(m) for v in (self.coverage[j], self.overlaps[j], self.conflicts[j])]
        if name == "pairwise":
            return [
                int(v)
                for j in range(m)
                for i in range(j + 1, m)
                for v in (self.pair_overlaps[j, i], self.pair_conflicts[j, i])
            ]
        if name == "gold":
            assert self.correct is not None and self.incorrect is not None
            return [int(v) for j in range(m) for c in polarity[j] for v in (self.correct[j, c], self.incorrect[j, c])]
        if name == "label_model":
            assert self.histogram is not None
            return self.histogram.tolist()
        raise ValueError(name)


# --- interval arithmetic on released counts -------------------------------------------------------------


@dataclass(frozen=True)
class Noisy:
    """A released count (or a sum of released counts) and the half-width of its interval."""

    value: float
    half_width: float

    @property
    def low(self) -> float:
        return max(self.value - self.half_width, 0.0)

    @property
    def high(self) -> float:
        return max(self.value + self.half_width, 0.0)

    def count(self) -> dict[str, Any]:
        return {"value": int(max(self.value, 0)), "interval": [self.low, self.high]}


def ratio(num: Noisy, den: Noisy) -> dict[str, Any]:
    """num/den for 0 ≤ num ≤ den, with the interval of extreme ratios (num, den each at its own level)."""
    point = min(max(num.value, 0.0) / max(den.value, 1.0), 1.0)
    low = num.low / den.high if den.high > 0 else 0.0
    high = min(num.high / den.low, 1.0) if den.low > 0 else 1.0
    return {"value": point, "interval": [min(low, 1.0), high]}


def accuracy(correct: Noisy, incorrect: Noisy) -> dict[str, Any]:
    """correct / (correct + incorrect): increasing in correct, decreasing in incorrect."""
    c, i = max(correct.value, 0.0), max(incorrect.value, 0.0)
    point = c / (c + i) if c + i > 0 else None
    low = correct.low / (correct.low + incorrect.high) if correct.low + incorrect.high > 0 else 0.0
    high = correct.high / (correct.high + incorrect.low) if correct.high + incorrect.low > 0 else 1.0
    return {"value": point, "interval": [low, high]}


def _sum(values: list[int], ms: Measurement, alpha: float) -> Noisy:
    return Noisy(float(sum(values)), ms.sum_half_width(len(values), alpha))


@dataclass(frozen=True)
class LFInfo:
    name: str
    kind: str  # sql | python
    polarity: tuple[int, ...]  # class indices the LF may emit (public, declared)


@dataclass(frozen=True)
class Release:
    """A released answer, and the label model's labels of the vote patterns (post-processing, kept inside)."""

    answer: dict[str, Any]
    labels: PatternLabels | None = None


def release_counts(
    exact: ExactStatistics, measurements: list[Measurement], polarity: list[tuple[int, ...]]
) -> dict[str, list[int]]:
    """Release every measurement once through OpenDP: the only step that reads the exact statistics."""
    noisy: dict[str, list[int]] = {}
    for ms in measurements:
        cells = exact.vector(ms.name, polarity)
        if len(cells) != ms.cells:
            raise ValueError(f"measurement {ms.name!r} has {len(cells)} cells, not {ms.cells}")
        noisy[ms.name] = release_integers(cells, ms.d_in, ms.epsilon).values
    return noisy


def release_statistics(
    exact: ExactStatistics, measurements: list[Measurement], lfs: list[LFInfo], classes: list[str], alpha: float
) -> Release:
    """Release every measurement once and derive the reported statistics from the noisy counts."""
    noisy = release_counts(exact, measurements, [lf.polarity for lf in lfs])
    return derive_statistics(noisy, measurements, lfs, classes, alpha)


def derive_statistics(
    noisy: dict[str, list[int]], measurements: list[Measurement], lfs: list[LFInfo], classes: list[str], alpha: float
) -> Release:
    """The reported statistics, intervals and label model: post-processing of the released counts only."""
    by_name = {ms.name: ms for ms in measurements}

    def at(name: str, a: float) -> float:
        return by_name[name].half_width(a)

    m = len(lfs)
    rows_v, covered_v = noisy["rows"]
    rows_half = Noisy(rows_v, at("rows", alpha / 2))
    out_lfs: list[dict[str, Any]] = []
    for j, lf in enumerate(lfs):
        cov, ovl, con = noisy["lf"][3 * j : 3 * j + 3]
        entry: dict[str, Any] = {
            "name": lf.name,
            "kind": lf.kind,
            "polarity": [classes[c] for c in lf.polarity],
            "coverage": ratio(Noisy(cov, at("lf", alpha / 2)), rows_half),
            "overlaps": ratio(Noisy(ovl, at("lf", alpha / 2)), rows_half),
            "conflicts": ratio(Noisy(con, at("lf", alpha / 2)), rows_half),
            "votes": Noisy(cov, at("lf", alpha)).count(),
        }
        out_lfs.append(entry)
    if "gold" in by_name:
        gold, gms = noisy["gold"], by_name["gold"]
        pos = 0
        for j, lf in enumerate(lfs):
            p = len(lf.polarity)
            cells = gold[pos : pos + 2 * p]
            pos += 2 * p
            corr, inc = cells[0::2], cells[1::2]
            entry = out_lfs[j]
            entry["correct"] = _sum(corr, gms, alpha).count()
            entry["incorrect"] = _sum(inc, gms, alpha).count()
            entry["emp_acc"] = accuracy(_sum(corr, gms, alpha / 2), _sum(inc, gms, alpha / 2))
            entry["per_class"] = {
                classes[c]: {
                    "correct": Noisy(corr[i], at("gold", alpha)).count(),
                    "incorrect": Noisy(inc[i], at("gold", alpha)).count(),
                    "emp_acc": accuracy(Noisy(corr[i], at("gold", alpha / 2)), Noisy(inc[i], at("gold", alpha / 2))),
                }
                for i, c in enumerate(lf.polarity)
            }
    result: dict[str, Any] = {
        "lfs": out_lfs,
        "label_set": {
            "rows": Noisy(rows_v, at("rows", alpha)).count(),
            "covered": Noisy(covered_v, at("rows", alpha)).count(),
            "coverage": ratio(Noisy(covered_v, at("rows", alpha / 2)), rows_half),
        },
    }
    names = [lf.name for lf in lfs]
    if "pairwise" in by_name:
        overlaps: list[list[dict[str, Any]]] = [[{} for _ in range(m)] for _ in range(m)]
        conflicts: list[list[dict[str, Any]]] = [[{} for _ in range(m)] for _ in range(m)]
        pair_cells = iter(noisy["pairwise"])
        hw = at("pairwise", alpha / 2)
        for j in range(m):
            overlaps[j][j] = out_lfs[j]["coverage"]
            conflicts[j][j] = {"value": 0.0, "interval": [0.0, 0.0]}
            for i in range(j + 1, m):
                o, c = next(pair_cells), next(pair_cells)
                overlaps[j][i] = overlaps[i][j] = ratio(Noisy(o, hw), rows_half)
                conflicts[j][i] = conflicts[i][j] = ratio(Noisy(c, hw), rows_half)
        result["pairwise"] = {
            "lfs": names,
            "overlaps": [[cell["value"] for cell in row] for row in overlaps],
            "overlaps_intervals": [[cell["interval"] for cell in row] for row in overlaps],
            "conflicts": [[cell["value"] for cell in row] for row in conflicts],
            "conflicts_intervals": [[cell["interval"] for cell in row] for row in conflicts],
        }
    labels = None
    if "label_model" in by_name:
        domain = PatternDomain(tuple(lf.polarity for lf in lfs), len(classes), "gold" in by_name)
        result["label_model"], labels = _label_model(
            noisy["label_model"], by_name["label_model"], domain, classes, rows_half, alpha
        )
    result["measurements"] = [ms.public(alpha) for ms in measurements]
    return Release(result, labels)


def _label_model(
    cells: list[int], ms: Measurement, domain: PatternDomain, classes: list[str], rows_half: Noisy, alpha: float
) -> tuple[dict[str, Any], PatternLabels]:
    """Fit the label model on the noisy histogram; its class balance and gold agreement are sums of its cells."""
    hist = np.asarray(cells, dtype=np.float64).reshape(domain.patterns, domain.gold_values)
    labels = fit_on_counts(domain.all_patterns(), hist.sum(axis=1), len(classes))
    pred = labels.predicted
    balance = {}
    for c, name in [*enumerate(classes), (ABSTAIN, "abstain")]:
        chosen = pred == c
        total = Noisy(float(hist[chosen].sum()), ms.sum_half_width(int(chosen.sum()) * domain.gold_values, alpha / 2))
        balance[name] = ratio(total, rows_half)
    out: dict[str, Any] = {"class_balance": balance, "gold_agreement": None, "compared_with_gold": None}
    if domain.has_gold:
        voted = np.flatnonzero(pred != ABSTAIN)
        agree = float(hist[voted, pred[voted] + 1].sum())
        disagree = float(hist[voted, 1:].sum()) - agree
        n_agree, n_disagree = len(voted), len(voted) * (len(classes) - 1)
        out["gold_agreement"] = accuracy(
            Noisy(agree, ms.sum_half_width(n_agree, alpha / 2)),
            Noisy(disagree, ms.sum_half_width(n_disagree, alpha / 2)),
        )
        out["compared_with_gold"] = Noisy(agree + disagree, ms.sum_half_width(n_agree + n_disagree, alpha)).count()
    return out, labels


def exact_summary(exact: ExactStatistics, lfs: list[LFInfo]) -> dict[str, Any]:
    """Exact values in the shape of the released ones (for tests and the benchmark; never served)."""
    n = max(exact.rows, 1)
    out: dict[str, Any] = {"rows": exact.rows, "covered": exact.covered, "coverage": exact.covered / n, "lfs": []}
    for j, lf in enumerate(lfs):
        entry = {
            "name": lf.name,
            "coverage": exact.coverage[j] / n,
            "overlaps": exact.overlaps[j] / n,
            "conflicts": exact.conflicts[j] / n,
            "votes": int(exact.coverage[j]),
        }
        if exact.correct is not None and exact.incorrect is not None:
            c = int(exact.correct[j].sum())
            i = int(exact.incorrect[j].sum())
            entry.update(correct=c, incorrect=i, emp_acc=c / (c + i) if c + i else math.nan)
        out["lfs"].append(entry)
    return out
