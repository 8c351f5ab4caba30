"""Sensitivities of Bastion's primitive measurements, from the rows-per-unit bound k and the policy's bounds.

Neighbouring datasets differ by all rows of one privacy unit, i.e. by at most k rows of the pre-bounded table.
Every figure here is the distance (L1 over all groups of a release, or L∞ of a quantile score vector within
one group) by which removing or adding one unit can move the measured vector.
"""

from __future__ import annotations

import math

import numpy as np

from policies.mechanisms import quantile_scores
from policies.schema import Column


def count_sensitivity(k: int) -> int:
    """COUNT(*) or COUNT(col) over any grouping: one unit adds or removes at most k rows in all."""
    return k


def distinct_unit_sensitivity(k: int, grouped: bool) -> int:
    """COUNT(DISTINCT unit): one unit is counted once per group it appears in, in at most k groups."""
    return k if grouped else 1


def sum_sensitivity(k: int, column: Column) -> int:
    """SUM over fixed-point units: at most k rows, each at most max(|low|, |high|) in absolute value."""
    return k * math.ceil(column.max_abs / column.fx_unit - 1e-9)


def sum_of_squares_sensitivity(k: int, column: Column) -> int:
    return k * math.ceil(column.max_abs**2 / column.fx2_unit - 1e-9)


def quantile_sensitivity(k: int, q: float) -> int:
    """L∞ change of the quantile score vector when k rows change (score weights per row from quantile_scores)."""
    _, per_row = quantile_scores(np.zeros(1), np.zeros(1), q)
    return k * per_row
