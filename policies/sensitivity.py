"""Sensitivities of Bastion's primitive measurements, from the rows-per-unit bound k and the policy's bounds.

Neighbouring datasets differ by all rows of one privacy unit, i.e. by at most k rows of the pre-bounded table.
Every figure here is the distance (L1 over all groups of a release, or L∞ of a quantile score vector within
one group) by which removing or adding one unit can move the measured vector; the `*_l2` functions give the L2
distance that the Gaussian mechanism (zCDP accounting) is calibrated for.

L2 of a grouped release: one unit changes group g by c_g (its rows there, times the per-row bound for a sum),
with Σ c_g ≤ k rows. Then ‖c‖₂ = √(Σ c_g²) ≤ Σ c_g (all terms ≥ 0), with equality when all k rows are in one
group, which a unit may do: so L2 = L1 for counts and sums. COUNT(DISTINCT unit) is the exception: a unit adds
at most 1 to each of at most k groups, so ‖c‖₂ ≤ √k (L1 is k).
"""

from __future__ import annotations

import math

import numpy as np

from policies.mechanisms import quantile_scores
from policies.schema import Column


def count_sensitivity(k: int) -> int:
    """COUNT(*), COUNT(col) or COUNT(DISTINCT col) (col not the unit) over any grouping: one unit adds or removes
    at most k rows in all, so at most k counted rows or distinct values."""
    return k


def distinct_unit_sensitivity(k: int, grouped: bool) -> int:
    """COUNT(DISTINCT unit): one unit is counted once per group it appears in, in at most k groups."""
    return k if grouped else 1


def sum_sensitivity(k: int, column: Column) -> int:
    """SUM over fixed-point units: at most k rows, each at most max(|low|, |high|) in absolute value."""
    return k * math.ceil(column.max_abs / column.fx_unit - 1e-9)


def sum_of_squares_sensitivity(k: int, column: Column) -> int:
    return k * math.ceil(column.max_abs**2 / column.fx2_unit - 1e-9)


def fixed_point_unit(max_abs: float, *, integral: bool) -> float:
    """Fixed-point unit of sums of a row expression whose values lie within ±max_abs: the least power of two with
    max_abs / unit <= 2**31 (one row fits in 31 bits, and dividing by a power of two is exact in DOUBLE); at least
    1 for an integer expression, whose sums are then exact."""
    if max_abs <= 0:
        return 1.0
    mantissa, exponent = math.frexp(max_abs / 2**31)  # max_abs / 2**31 = m * 2**e, 0.5 <= m < 1
    unit = math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)
    return max(unit, 1.0) if integral else unit


def fixed_point_sensitivity(k: int, max_abs: float, unit: float) -> int:
    """SUM of a row expression in fixed-point units: at most k rows, each at most max_abs / unit in absolute value
    (the compiled value is clamped to the expression's range before it is rounded); never below one unit."""
    return k * max(1, math.ceil(max_abs / unit - 1e-9))


def quantile_sensitivity(k: int, q: float) -> int:
    """L∞ change of the quantile score vector when k rows change (score weights per row from quantile_scores)."""
    _, per_row = quantile_scores(np.zeros(1), np.zeros(1), q)
    return k * per_row


def count_l2(k: int) -> int:
    """COUNT(*), COUNT(col), COUNT(DISTINCT col): k rows (k new values) in one group is the worst case, L2 = k."""
    return k


def distinct_unit_l2(k: int, grouped: bool) -> float:
    """COUNT(DISTINCT unit): 1 in each of at most k groups, L2 = √k (1 ungrouped)."""
    return math.sqrt(k) if grouped else 1.0


def sum_l2(k: int, column: Column) -> int:
    """SUM: k rows of at most max|v| each in one group is the worst case; L2 = L1."""
    return sum_sensitivity(k, column)


def sum_of_squares_l2(k: int, column: Column) -> int:
    return sum_of_squares_sensitivity(k, column)
