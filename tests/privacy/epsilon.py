"""Empirical lower bounds on ε from two samples of a mechanism's releases.

A mechanism M is ε-DP only if, for every event S and neighbouring inputs D, D′, P[M(D) ∈ S] ≤ e^ε · P[M(D′) ∈ S].
Drawing n_a releases on D and n_b on D′ and counting how many fall in a fixed event S gives binomial samples of
p_a = P[M(D) ∈ S] and p_b = P[M(D′) ∈ S]. A one-sided Clopper–Pearson lower bound on p_a and upper bound on p_b,
each at level 1 - (1 - confidence) / 2 (Bonferroni), give with probability at least `confidence`

    ε ≥ ln(lower(p_a) / upper(p_b)),

so a bound above the claimed ε is evidence, at that confidence, that the mechanism is not as private as claimed.
The event must be fixed before sampling (here: by the exact values and the calibration), never chosen from the
draws themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
from scipy.stats import beta, norm


def clopper_pearson_lower(hits: int, n: int, confidence: float) -> float:
    """One-sided lower confidence bound for a binomial proportion (exact, Clopper–Pearson)."""
    _check(hits, n, confidence)
    if hits == 0:
        return 0.0
    return float(beta.ppf(1.0 - confidence, hits, n - hits + 1))


def clopper_pearson_upper(hits: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound for a binomial proportion (exact, Clopper–Pearson)."""
    _check(hits, n, confidence)
    if hits == n:
        return 1.0
    return float(beta.ppf(confidence, hits + 1, n - hits))


def epsilon_lower_bound(
    hits_a: int, n_a: int, hits_b: int, n_b: int, confidence: float = 0.99, *, delta: float = 0.0
) -> float:
    """Lower confidence bound on ε from `hits_a` of `n_a` releases on D and `hits_b` of `n_b` on D′ in one event.

    The confidence is split equally (Bonferroni) between the lower bound of p_a and the upper bound of p_b.
    Returns max(0, ln(lower_a / upper_b)), and 0 where the ratio is undefined (no hit on D). For a mechanism
    claimed (ε, δ)-DP, p_a ≤ e^ε · p_b + δ, so `delta` is taken off lower_a first.
    """
    each = 1.0 - (1.0 - confidence) / 2.0
    lower_a = clopper_pearson_lower(hits_a, n_a, each) - delta
    upper_b = clopper_pearson_upper(hits_b, n_b, each)
    if lower_a <= 0.0 or upper_b <= 0.0:
        return 0.0
    return max(0.0, math.log(lower_a / upper_b))


def epsilon_lower_bound_both_ways(hits_a: int, n_a: int, hits_b: int, n_b: int, confidence: float = 0.99) -> float:
    """The larger of the bounds for the event and for its complement (each tested at `confidence` / 2)."""
    each = 1.0 - (1.0 - confidence) / 2.0
    return max(
        epsilon_lower_bound(hits_a, n_a, hits_b, n_b, each),
        epsilon_lower_bound(n_b - hits_b, n_b, n_a - hits_a, n_a, each),
    )


def tail_threshold(exact_a: float, exact_b: float) -> tuple[float, bool]:
    """A tail event for an additive-noise release, from the exact values on D (`exact_a`) and D′ (`exact_b`).

    Returns (t, upper): the event is "release ≥ t" when `upper`, else "release ≤ t", with t = exact_a on the side
    away from exact_b. For (discrete) Laplace noise of scale s this event has probability about 1/2 on D, and its
    probability ratio is exactly exp(|exact_a - exact_b| / s): the largest ratio any event reaches, with the most
    mass on D, hence the most statistical power per draw.
    """
    if exact_a == exact_b:
        raise ValueError("the two exact values are equal: no tail event separates D from D′")
    return exact_a, exact_a > exact_b


def tail_event(releases: Any, exact_a: Any, exact_b: Any) -> np.ndarray:
    """Per release, whether it falls in the joint tail event of the coordinates where D and D′ differ.

    `releases` is one release per row (a 2-D array, draws × coordinates) or a 1-D array of scalar releases;
    `exact_a` / `exact_b` are the exact vectors (or scalars) on D and D′. A release is a hit when every differing
    coordinate is in its `tail_threshold` event; for independent noise per coordinate the ratio multiplies.
    """
    a = np.atleast_1d(np.asarray(exact_a, dtype=np.float64))
    b = np.atleast_1d(np.asarray(exact_b, dtype=np.float64))
    draws = np.asarray(releases, dtype=np.float64)
    draws = draws.reshape(len(draws), -1) if draws.ndim == 1 else draws
    differ = np.flatnonzero(a != b)
    if differ.size == 0:
        raise ValueError("the two exact vectors are equal: no tail event separates D from D′")
    upper = a[differ] > b[differ]
    cols = draws[:, differ]
    # `cols` is 2-D, so `.all(axis=1)` is an array (numpy's stubs also allow a scalar bool)
    return cast(np.ndarray, np.where(upper, cols >= a[differ], cols <= a[differ]).all(axis=1))


def tail_hits(releases: Any, exact_a: Any, exact_b: Any) -> int:
    """How many releases fall in `tail_event(releases, exact_a, exact_b)`."""
    return int(tail_event(releases, exact_a, exact_b).sum())


def best_event(
    p_a: Sequence[float] | np.ndarray,
    p_b: Sequence[float] | np.ndarray,
    n_a: int,
    n_b: int,
    confidence: float = 0.99,
) -> list[int]:
    """A set of outcomes of a finite-output mechanism to test, chosen from its exact output distributions.

    `p_a` and `p_b` are the probabilities of each outcome on D and D′ (computed, not sampled). Outcomes are ranked
    by p_a / p_b; of the sets made of the top-ranked ones, the one whose expected lower bound (normal approximation
    of `epsilon_lower_bound` with n_a and n_b draws) is largest is returned. It depends on public facts and exact
    values only, so it is fixed before any release is drawn.
    """
    pa, pb = np.asarray(p_a, dtype=np.float64), np.asarray(p_b, dtype=np.float64)
    z = float(norm.ppf(1.0 - (1.0 - confidence) / 2.0))
    order = np.argsort(-(pa / np.maximum(pb, 1e-300)), kind="stable")
    best: tuple[float, int] = (-math.inf, 1)
    mass_a = mass_b = 0.0
    for size, i in enumerate(order, start=1):
        mass_a, mass_b = mass_a + pa[i], mass_b + pb[i]
        if not (0.0 < mass_a < 1.0 and 0.0 < mass_b < 1.0):
            continue
        spread = math.sqrt((1 - mass_a) / (n_a * mass_a)) + math.sqrt((1 - mass_b) / (n_b * mass_b))
        expected = math.log(mass_a / mass_b) - z * spread
        if expected > best[0]:
            best = (expected, size)
    return sorted(int(i) for i in order[: best[1]])


def _check(hits: int, n: int, confidence: float) -> None:
    if not (0 <= hits <= n and n > 0):
        raise ValueError(f"need 0 <= hits <= n and n > 0, got hits={hits}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be strictly between 0 and 1")
