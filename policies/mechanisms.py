"""Noise mechanisms, all from OpenDP, and their accuracy.

Bastion enables OpenDP's "contrib" feature: the mechanisms used here (discrete Laplace on integer vectors,
Laplace thresholding for key selection, report-noisy-max for quantiles) are in contrib in OpenDP 0.16.

Under zCDP accounting (policies.accountant), integer vectors get the discrete Gaussian mechanism instead, calibrated
for an L2 distance, and private keys OpenDP's Gaussian threshold; see the Gaussian section below.

Every release here is calibrated for a neighbouring relation where one privacy unit changes the input by
`d_in` (an L1 / L∞ distance already multiplied by the rows-per-unit bound); the privacy maps of these
mechanisms are linear in d_in, which is what makes user-level accounting over grouped releases correct.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import numpy as np
import opendp.prelude as dp
from scipy.special import log_ndtr

dp.enable_features("contrib")

# Tolerance for comparing an OpenDP privacy map with the ε we meant to spend (float round-off only).
_MAP_SLACK = 1e-9


class MechanismError(ValueError):
    pass


@lru_cache(maxsize=256)
def _int_vector_laplace(scale: float) -> dp.Measurement:
    return dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"), scale=scale)


@lru_cache(maxsize=256)
def _calibrated_laplace(d_in: int, epsilon: float) -> tuple[dp.Measurement, float]:
    """The discrete Laplace measurement for (d_in, ε) and its scale, once its OpenDP privacy map has been checked
    to give at most ε at d_in. Both depend on public values only, so the check is made once per pair."""
    scale = laplace_scale_for(d_in, epsilon)
    meas = _int_vector_laplace(scale)
    spent = meas.map(d_in)
    if spent > epsilon * (1 + _MAP_SLACK):
        raise MechanismError(f"calibration error: map gives ε={spent} > {epsilon}")
    return meas, scale


@dataclass(frozen=True)
class IntegerRelease:
    values: list[int]
    scale: float
    epsilon: float
    rho: float = 0.0  # > 0 for a discrete Gaussian release (then `epsilon` is 0)

    def accuracy(self, alpha: float) -> float:
        """Half-width of the (1 - alpha) interval of each released integer."""
        return gaussian_accuracy(self.scale, alpha) if self.rho else integer_accuracy(self.scale, alpha)


def laplace_scale_for(d_in: int, epsilon: float) -> float:
    if epsilon <= 0:
        raise MechanismError("epsilon must be positive")
    return d_in / epsilon


def release_integers(values: list[int], d_in: int, epsilon: float) -> IntegerRelease:
    """Discrete Laplace noise on a vector of integers whose L1 sensitivity is `d_in`, costing `epsilon`."""
    meas, scale = _calibrated_laplace(d_in, epsilon)
    noisy = meas([int(v) for v in values]) if values else []
    return IntegerRelease(values=list(noisy), scale=scale, epsilon=epsilon)


@lru_cache(maxsize=1024)
def integer_accuracy(scale: float, alpha: float) -> float:
    """Half-width of the (1 - alpha) interval of discrete Laplace noise at `scale` (OpenDP's accuracy function;
    public values only, so it is computed once per (scale, alpha))."""
    return float(dp.discrete_laplacian_scale_to_accuracy(scale, alpha))


def epsilon_for_accuracy(d_in: int, accuracy: float, alpha: float) -> float:
    """The ε at which a discrete-Laplace release of sensitivity d_in has the requested half-width at alpha."""
    if accuracy <= 0:
        raise MechanismError("accuracy must be positive")
    scale = float(dp.accuracy_to_discrete_laplacian_scale(accuracy, alpha))
    return d_in / scale


def laplace_sum_tail(z: np.ndarray, a: float, b: np.ndarray) -> np.ndarray:
    """P(|Y_a + Y_b| > z) for independent continuous Laplace variables of scales a > 0 and b ≥ 0."""
    z, b = np.asarray(z, dtype=np.float64), np.asarray(b, dtype=np.float64)
    near = np.abs(a - b) <= 1e-9 * a
    bb = np.where(near, a * (1 + 1e-6), b)  # the equal-scale limit, approached (the formula is continuous in b)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        general = (a * a * np.exp(-z / a) - bb * bb * np.exp(-z / np.maximum(bb, 1e-300))) / (a * a - bb * bb)
        equal = np.exp(-z / a) * (1 + z / (2 * a))
    return np.clip(np.where(near, equal, np.where(b > 0, general, np.exp(-z / a))), 0.0, 1.0)


def ratio_error_bound(
    sum_scale: float, sum_unit: float, count_scale: float, mean_abs: np.ndarray, alpha: float, gaussian: bool = False
) -> np.ndarray:
    """A bound z, per group, with P(|X_s·sum_unit - m·X_c| > z) ≤ alpha, for discrete Laplace X_s (scale
    `sum_scale`, in integer units of `sum_unit`) and X_c (scale `count_scale`) and any mean |m| ≤ `mean_abs`.

    A released mean is S'/C' with S' = S + X_s, C' = C + X_c, and S'/C' - S/C = (X_s - m·X_c) / C' exactly (m = S/C
    the true mean), so z / C' is the half-width of a (1 - alpha) interval around S'/C': one interval for the
    combined noise instead of a union bound over the two measurements' own intervals. The quantile is that of
    continuous Laplace noise of the same scales (closed form) plus one integer unit of each, which bounds the discrete
    noise's (a discrete Laplace variable couples to a continuous one of the same scale within one unit). With
    `gaussian`, X_s and X_c are discrete Gaussian of those scales: the continuous counterpart of the combined noise
    is normal with variance a² + b², and the same one-unit coupling holds.
    """
    a = sum_scale * sum_unit
    b = count_scale * np.asarray(mean_abs, dtype=np.float64)
    slack = sum_unit + np.asarray(mean_abs, dtype=np.float64)
    if gaussian:
        return np.asarray(NormalDist().inv_cdf(1 - alpha / 2) * np.sqrt(a * a + b * b) + slack, dtype=np.float64)
    lo = np.zeros_like(b)
    hi = np.full_like(b, 1.0) * (a + b) * (math.log(2 / alpha) + 1) * 4 + 1.0  # P(|Z| > hi) < alpha
    for _ in range(80):
        mid = (lo + hi) / 2
        over = laplace_sum_tail(mid, a, b) > alpha
        lo, hi = np.where(over, mid, lo), np.where(over, hi, mid)
    return np.asarray(hi + slack, dtype=np.float64)


# --- Gaussian mechanism (zCDP) ------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _int_vector_gaussian(scale: float) -> dp.Measurement:
    # An L2 distance over f64, so that a sensitivity such as √k (distinct units in k groups) is exact.
    return dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T="i64")), dp.l2_distance(T="f64"), scale=scale)


def gaussian_scale_for(d_in: float, rho: float) -> float:
    """Scale of the discrete Gaussian giving ρ-zCDP at L2 sensitivity d_in: ρ = (d_in / scale)² / 2."""
    if rho <= 0:
        raise MechanismError("rho must be positive")
    return d_in / math.sqrt(2 * rho)


@lru_cache(maxsize=256)
def _calibrated_gaussian(d_in: float, rho: float) -> tuple[dp.Measurement, float]:
    """The discrete Gaussian measurement for (d_in, ρ) and its scale, once OpenDP's privacy map (in
    `zero_concentrated_divergence`) has been checked to give at most ρ at d_in."""
    scale = gaussian_scale_for(d_in, rho)
    meas = _int_vector_gaussian(scale)
    if meas.output_measure != dp.zero_concentrated_divergence():
        raise MechanismError(f"calibration error: {meas.output_measure} is not zCDP")
    spent = meas.map(float(d_in))
    if spent > rho * (1 + _MAP_SLACK):
        raise MechanismError(f"calibration error: map gives ρ={spent} > {rho}")
    return meas, scale


def release_gaussian_integers(values: list[int], d_in: float, rho: float) -> IntegerRelease:
    """Discrete Gaussian noise on a vector of integers whose L2 sensitivity is `d_in`, costing ρ (zCDP)."""
    meas, scale = _calibrated_gaussian(d_in, rho)
    noisy = meas([int(v) for v in values]) if values else []
    return IntegerRelease(values=list(noisy), scale=scale, epsilon=0.0, rho=rho)


# Above this scale a discrete Gaussian's half-width is bounded through the continuous Gaussian's instead of OpenDP's
# discrete accuracy functions, whose time grows linearly with the scale (about 25 s for the inverse at 1e6, and a
# SUM's scale in fixed-point units is easily 1e8).
DISCRETE_ACCURACY_MAX_SCALE = 1_000.0


def _gaussian_accuracy(scale: float, alpha: float) -> float:
    if scale <= DISCRETE_ACCURACY_MAX_SCALE:
        return float(dp.discrete_gaussian_scale_to_accuracy(scale, alpha))
    # Canonne, Kamath and Steinke (2020), Prop. 25: for X ~ N_Z(0, σ²) and integer m ≥ 1,
    # P[X ≥ m] ≤ P[N(0, σ²) ≥ m − 1]. So with a = OpenDP's continuous half-width, P[|X| ≥ ⌈a⌉ + 1] ≤ alpha and
    # [v − ⌈a⌉, v + ⌈a⌉] already covers; one more unit keeps it at least OpenDP's discrete figure (1,961 at 1,000).
    return float(math.ceil(dp.gaussian_scale_to_accuracy(scale, alpha)) + 1)


@lru_cache(maxsize=1024)
def gaussian_accuracy(scale: float, alpha: float) -> float:
    """Half-width of the (1 - alpha) interval of discrete Gaussian noise at `scale`: OpenDP's
    `discrete_gaussian_scale_to_accuracy` up to DISCRETE_ACCURACY_MAX_SCALE, above it a bound through OpenDP's
    continuous `gaussian_scale_to_accuracy` (public values only, so computed once per (scale, alpha))."""
    return _gaussian_accuracy(scale, alpha)


def rho_for_accuracy(d_in: float, accuracy: float, alpha: float) -> float:
    """The ρ at which a discrete Gaussian release of L2 sensitivity d_in has the requested half-width at alpha."""
    if accuracy <= 0:
        raise MechanismError("accuracy must be positive")
    return (d_in / _gaussian_scale_for_accuracy(float(accuracy), float(alpha))) ** 2 / 2


@lru_cache(maxsize=256)
def _gaussian_scale_for_accuracy(accuracy: float, alpha: float) -> float:
    """The largest scale whose half-width (`gaussian_accuracy`) is at most `accuracy`. Within the discrete range,
    OpenDP's inverse gives the scale at which the target is the exact boundary, where the (integer) half-width is
    one more, so the scale is bisected down to the largest one that meets the target; above it, the inverse of the
    continuous bound."""

    def meets(scale: float) -> bool:
        return _gaussian_accuracy(scale, alpha) <= accuracy

    if accuracy > _gaussian_accuracy(DISCRETE_ACCURACY_MAX_SCALE, alpha):
        scale = float(dp.accuracy_to_gaussian_scale(float(math.floor(accuracy) - 1), alpha))
        while not meets(scale):  # float round-off at the ceiling only
            scale *= 1 - 1e-12
        return scale
    if accuracy < 1:
        # OpenDP's discrete half-widths are whole units, never below 1: no scale reaches a target under one unit.
        raise MechanismError("an accuracy below one unit of the measurement cannot be reached by discrete noise")
    hi = float(dp.accuracy_to_discrete_gaussian_scale(accuracy, alpha))
    if meets(hi):
        return hi
    lo = hi / 2
    for _ in range(200):  # bounded: every target of at least one unit is met at some positive scale
        if meets(lo):
            break
        lo /= 2
    else:
        raise MechanismError(f"no discrete Gaussian scale has a half-width of at most {accuracy:g}")
    for _ in range(60):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo


# --- key selection --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySelection:
    kept: dict[str, int]
    threshold: int
    scale: float
    epsilon: float
    delta: float
    rho: float = 0.0  # > 0 when selected with the Gaussian threshold (zCDP; then `epsilon` is 0)


def _threshold_measurement(scale: float, threshold: int, gaussian: bool = False) -> dp.Measurement:
    dom = dp.map_domain(dp.atom_domain(T=str), dp.atom_domain(T="i64"))
    if gaussian:
        return dp.m.make_gaussian_threshold(
            dom, dp.l02inf_distance(dp.absolute_distance(T="i64")), scale=scale, threshold=threshold
        )
    met = dp.l01inf_distance(dp.absolute_distance(T="i64"))
    return dp.m.make_laplace_threshold(dom, met, scale=scale, threshold=threshold)


@lru_cache(maxsize=256)
def threshold_for(k: int, epsilon: float, delta: float, rho: float = 0.0) -> tuple[float, int]:
    """Scale and smallest threshold so that releasing keys whose noisy count passes costs (ε, δ), or with `rho`
    (zCDP) the approximate-zCDP (ρ, δ) of OpenDP's Gaussian threshold.

    One unit touches at most k keys, each by at most k rows, and k rows in all: d_in = (l0, l1, l∞) = (k, k, k),
    and its L2 distance is at most its L1 distance k (all k rows in one key): (l0, l2, l∞) = (k, k, k).
    """
    if delta <= 0:
        raise MechanismError("key selection needs δ > 0")
    gaussian = rho > 0
    scale = gaussian_scale_for(k, rho) if gaussian else k / epsilon
    d_in = (k, k, k)

    def delta_at(t: int) -> float:
        return _threshold_measurement(scale, t, gaussian).map(d_in)[1]

    lo, hi = k + 1, k + 2
    while delta_at(hi) > delta:
        hi *= 2
        if hi > 2**40:
            raise MechanismError("no threshold reaches the requested δ")
    while lo < hi:
        mid = (lo + hi) // 2
        if delta_at(mid) <= delta:
            hi = mid
        else:
            lo = mid + 1
    spent, _ = _threshold_measurement(scale, lo, gaussian).map(d_in)
    budget = rho if gaussian else epsilon
    if spent > budget * (1 + _MAP_SLACK):
        raise MechanismError(f"calibration error: threshold map gives {spent} > {budget}")
    return scale, lo


# Key selection always runs OpenDP over at least this many candidate keys (the real ones padded with empty
# ones), so that its running time does not tell how many distinct private keys there are below the cap.
KEY_CANDIDATES = 1_000
_PAD = "\x00pad:"


def select_keys(
    counts: dict[str, int],
    k: int,
    epsilon: float,
    delta: float,
    candidates: int = KEY_CANDIDATES,
    rho: float = 0.0,
) -> KeySelection:
    """Release the keys (with noisy counts) of a histogram whose key set is not public.

    The map given to OpenDP is padded with keys of count zero up to `candidates` entries. Padding adds the same
    keys to neighbouring datasets, so the neighbouring relation (and the privacy map) is unchanged; padded keys
    that pass the threshold are dropped, which is post-processing. Above `candidates` distinct keys the time
    grows with their number (the README says so).
    """
    scale, threshold = threshold_for(k, epsilon, delta, rho)
    meas = _threshold_measurement(scale, threshold, rho > 0)
    padded = {key: int(v) for key, v in counts.items()}
    i = 0
    while len(padded) < candidates:
        label = f"{_PAD}{i}"
        i += 1
        if label not in padded:
            padded[label] = 0
    kept = meas(padded)
    real = {key: v for key, v in dict(kept).items() if key in counts}
    if rho > 0:
        return KeySelection(kept=real, threshold=threshold, scale=scale, epsilon=0.0, delta=delta, rho=rho)
    return KeySelection(kept=real, threshold=threshold, scale=scale, epsilon=epsilon, delta=delta)


def _log_tail(x: np.ndarray, scale: float) -> np.ndarray:
    """log P(X ≥ x) for discrete Laplace noise X of `scale` (P(X = x) ∝ e^(-|x|/scale)), at integers x."""
    log_r = -1.0 / scale
    log_norm = math.log1p(math.exp(log_r))  # log(1 + r)
    upper = x * log_r - log_norm  # x ≥ 1: r^x / (1 + r)
    lower = np.log1p(-np.exp((1 - np.minimum(x, 0)) * log_r - log_norm))  # x ≤ 0: 1 - r^(1-x) / (1 + r)
    return np.where(x >= 1, upper, lower)


def selected_count_interval(
    values: np.ndarray, scale: float, threshold: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """A (1 - alpha) confidence interval for the true count c of each key that the Laplace threshold kept, given
    that it was kept (post-processing of the released value v ≥ threshold and public parameters only).

    Given c, a kept key's released value is c + X conditioned on c + X ≥ threshold. The interval holds every
    c ≥ 0 at which neither conditional tail of v is below alpha / 2: P(V ≥ v | kept; c) and P(V ≤ v | kept; c).
    Both are monotone in c (discrete Laplace is log-concave), so each end is found by bisection over integers.
    Far above the threshold this is the usual interval; just above it, every small count stays plausible (a key
    can be kept because its noise was large), so the lower end reaches down to 0.
    """
    v = np.asarray(values, dtype=np.float64)
    cut = math.log(alpha / 2)

    def upper_tail_ok(c: np.ndarray) -> np.ndarray:  # P(V ≥ v | kept; c) > alpha/2: increasing in c
        return _log_tail(v - c, scale) - _log_tail(threshold - c, scale) > cut

    def lower_tail_ok(c: np.ndarray) -> np.ndarray:  # P(V ≤ v | kept; c) > alpha/2: decreasing in c
        p_above = np.exp(_log_tail(v + 1 - c, scale) - _log_tail(threshold - c, scale))
        return np.log(np.maximum(1.0 - p_above, 1e-300)) > cut

    span = float(integer_accuracy(scale, alpha / 2)) + 2.0
    return _conditioned_interval(v, span, upper_tail_ok, lower_tail_ok)


def _conditioned_interval(
    v: np.ndarray,
    span: float,
    upper_tail_ok: Callable[[np.ndarray], np.ndarray],
    lower_tail_ok: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The integer counts c ≥ 0 at which neither conditional tail of the released v is below alpha / 2, as
    [low, high]: `upper_tail_ok` (P(V ≥ v | kept; c) > alpha/2) is increasing in c and true at c = v, so the low end
    is bisected in [0, v]; `lower_tail_ok` (P(V ≤ v | kept; c) > alpha/2) is decreasing in c and false beyond
    v + span, so the high end is bisected in [v, v + span] (v itself where it is already false at v, which only
    widens the interval)."""
    lo, hi = np.zeros_like(v), v.copy()
    while np.any(hi - lo > 0):
        mid = np.floor((lo + hi) / 2)
        ok = upper_tail_ok(mid)
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid + 1)
    low = hi
    lo, hi = v.copy(), v + span
    while np.any(hi - lo > 0):
        mid = np.ceil((lo + hi) / 2)
        ok = lower_tail_ok(mid)
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid - 1)
    return low, lo


# The exact table of a discrete Gaussian's tails reaches this many scales beyond the threshold: a tail there is
# below e^-800 of the tail at the threshold, so clipping beyond it changes no comparison with alpha / 2.
GAUSSIAN_TAIL_REACH = 40


@lru_cache(maxsize=32)
def _discrete_gaussian_log_tails(scale: float, reach: int) -> np.ndarray:
    """log P(X ≥ x) at x = -reach..reach, for X discrete Gaussian of `scale` (P(X = x) ∝ e^(-x²/2σ²)), summed
    exactly over that range (the mass outside it is below e^-800 of the total)."""
    x = np.arange(-reach, reach + 1, dtype=np.float64)
    tails = np.logaddexp.accumulate((-(x * x) / (2 * scale * scale))[::-1])[::-1]
    return np.asarray(tails - tails[0], dtype=np.float64)


def _gaussian_log_tail_bounds(x: np.ndarray, scale: float, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds on log P(X ≥ x) at integers x, X discrete Gaussian of `scale`.

    Up to DISCRETE_ACCURACY_MAX_SCALE both are the exact value from a table over [-reach, reach] (beyond reach the
    upper bound is the table's last value and the lower bound -inf). Above it, where the table would be long, they
    are the continuous Gaussian's: P(N ≥ x) ≤ P(X ≥ x) ≤ P(N ≥ x - 1), N ~ N(0, σ²). The upper bound is Canonne,
    Kamath and Steinke (2020), Prop. 25 for x ≥ 1; the lower bound holds for x ≥ 1 because the sum of the density
    over the integers from x on is at least its integral from x on (it decreases there), and the discrete
    normaliser exceeds the continuous one by a factor 1 + 2·e^(-2π²σ²) at most, which is 1 in double precision at
    these scales; both extend to x ≤ 0 by symmetry (P(X ≥ x) = 1 - P(X ≥ 1 - x))."""
    x = np.asarray(x, dtype=np.float64)
    if scale <= DISCRETE_ACCURACY_MAX_SCALE:
        table = _discrete_gaussian_log_tails(scale, reach)
        exact = table[np.clip(x, -reach, reach).astype(np.int64) + reach]
        return np.where(x > reach, -np.inf, exact), exact
    return log_ndtr(-x / scale), log_ndtr(-(x - 1) / scale)


def selected_gaussian_count_interval(
    values: np.ndarray, scale: float, threshold: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """`selected_count_interval` for OpenDP's Gaussian threshold (zCDP): a (1 - alpha) confidence interval for the
    true count c of each kept key given that it was kept, from its released value v ≥ threshold (discrete Gaussian
    noise of `scale`, kept where the noisy count is at least the threshold) and public parameters only.

    The interval holds every c ≥ 0 at which neither conditional tail of v is below alpha / 2, each tail taken at its
    upper bound where the tails are bounded rather than exact (`_gaussian_log_tail_bounds`, above a scale of 1,000),
    so the interval holds at least the counts the exact tails would keep and covers at least as often. The discrete
    Gaussian is log-concave, so both conditional tails are monotone in c (so are the bounds: the continuous
    Gaussian is log-concave too) and each end is bisected over integers."""
    v = np.asarray(values, dtype=np.float64)
    cut = math.log(alpha / 2)
    reach = int(threshold) + math.ceil(GAUSSIAN_TAIL_REACH * scale) + 2

    def tail(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _gaussian_log_tail_bounds(x, scale, reach)

    def upper_tail_ok(c: np.ndarray) -> np.ndarray:  # an upper bound of P(V ≥ v | kept; c) > alpha/2
        return tail(v - c)[1] - tail(threshold - c)[0] > cut

    def lower_tail_ok(c: np.ndarray) -> np.ndarray:  # an upper bound of P(V ≤ v | kept; c) > alpha/2
        p_above = np.exp(tail(v + 1 - c)[0] - tail(threshold - c)[1])
        return np.log(np.maximum(1.0 - p_above, 1e-300)) > cut

    span = float(gaussian_accuracy(scale, alpha / 2)) + 2.0
    return _conditioned_interval(v, span, upper_tail_ok, lower_tail_ok)


# --- quantiles ------------------------------------------------------------------------------------------
#
# A quantile is released by three measurements, each computed from the exact row counts of one group at the
# position codes of a public grid (code 2j+1: a value on position j; code 2j+2: strictly between positions j and
# j+1), and each charged its share of the quantile's ε:
#   1. centre:   report-noisy-min over at most 1,024 evenly spaced positions, with integer rank scores;
#   2. interval: discrete Laplace on the row counts of a ladder of bins around the centre (cuts at centre ± 2^i
#                positions, every row in exactly one bin: L1 sensitivity k); a cut is a proven lower (upper) end
#                when the noisy counts below and above it, less a bound on their noise that holds for every cut at
#                once with probability 1 - alpha, say that the quantile cannot lie below (above) it;
#   3. point:    report-noisy-min over positions evenly spread over that interval's values (a grid of its own,
#                `QuantileRelease.fine_grid`), counted by a second engine pass: the interval is a DP output, so its
#                positions are public, and the rows outside it fall in the codes 0 (below the first position) and
#                2·size (above the last), so every position's rank score is exact. The positions are about
#                QUANTILE_POINT_SPACING noise scales of the point's selection apart in rank where the ladder's
#                noisy counts show the most rows per grid step inside the interval (at most 1,024 positions):
#                finer positions only add candidates that the noise cannot tell apart, which spreads the choice
#                (on the accuracy benchmark's median, positions 1.25 scales apart err about a third less than
#                positions one row apart).
# Stages 1 and 2 are `release_quantile_interval`, stage 3 `release_quantile_point`; `release_quantile` composes
# them for one group given a way to count its rows at a grid.
#
# A request may instead ask for the value only (no interval): one measurement, report-noisy-min at the quantile's
# whole ε over a fine public grid of the column's bounds (`quantile_value_grid`: every integer of an integer column
# with at most QUANTILE_VALUE_POSITIONS + 1 of them, else that many steps), counted by one engine pass. It is the
# mechanism of OpenDP's own quantile (one selection over fixed candidates); `release_quantile_value`.

QUANTILE_DENOMINATOR = 1000
QUANTILE_COARSE = 1024  # positions of the centre's selection
QUANTILE_SUBDIVISIONS = 1  # grid positions per coarse step of the first pass (the ladder's resolution)
QUANTILE_POINT_CANDIDATES = 1024  # at most this many positions of the point's selection (second pass)
QUANTILE_POINT_SPACING = 1.25  # rank distance between them, in noise scales of the point's selection
QUANTILE_POINT_MIN_CANDIDATES = 16  # at least this many (where the interval holds more than one value)
QUANTILE_SHARES = (0.02, 0.18, 0.8)  # of the quantile's ε: centre, interval, point
QUANTILE_VALUE_POSITIONS = 1 << 17  # grid steps of a value-only quantile's selection (131,073 positions)
# Candidates (positions × groups) of one value-only quantile at most, which bounds its noise sampling (OpenDP draws
# about a million exact exponential samples a second): with more groups each gets fewer positions, never fewer
# than QUANTILE_COARSE steps.
QUANTILE_VALUE_CANDIDATES = 1 << 21


@dataclass(frozen=True)
class QuantileGrid:
    """The positions lo + j·step, 0 ≤ j < size: from a column's bounds (public), every integer of a narrow integer
    column, else evenly spaced positions whose every QUANTILE_SUBDIVISIONS-th is the coarse grid of the centre; or
    over a released interval (a DP output), the positions of the point's selection. `integer`: every integer from
    lo (an integer) on."""

    lo: float
    step: float
    size: int
    integer: bool = False

    def value(self, j: np.ndarray | int) -> np.ndarray:
        return self.lo + np.asarray(j, dtype=np.float64) * self.step

    @property
    def hi(self) -> float:
        return float(self.value(self.size - 1))

    def coarse(self) -> np.ndarray:
        """At most QUANTILE_COARSE evenly spaced positions, both ends included."""
        return spread(0, self.size - 1, QUANTILE_COARSE)


def quantile_grid(lo: float, hi: float, integer: bool) -> QuantileGrid:
    """The public grid of a quantile of a column with bounds [lo, hi]."""
    size = (QUANTILE_COARSE - 1) * QUANTILE_SUBDIVISIONS + 1
    if integer and hi - lo + 1 <= size:
        return QuantileGrid(float(lo), 1.0, int(hi - lo) + 1, integer=True)
    return QuantileGrid(float(lo), (hi - lo) / (size - 1), size)


def quantile_value_steps(n_groups: int) -> int:
    """Grid steps of a value-only quantile's selection for a query releasing n_groups groups (a public number:
    declared groups, or the keys a private selection kept)."""
    share = QUANTILE_VALUE_CANDIDATES // max(n_groups, 1)
    return min(max(share, QUANTILE_COARSE), QUANTILE_VALUE_POSITIONS)


def quantile_value_grid(lo: float, hi: float, integer: bool, n_groups: int = 1) -> QuantileGrid:
    """The public grid of a value-only quantile of a column with bounds [lo, hi]: every integer of an integer column
    with at most `quantile_value_steps` + 1 of them, else that many steps, both bounds included."""
    steps = quantile_value_steps(n_groups)
    if integer and hi - lo <= steps:
        return QuantileGrid(float(lo), 1.0, int(hi - lo) + 1, integer=True)
    return QuantileGrid(float(lo), (hi - lo) / steps, steps + 1)


def spread(first: int, last: int, n: int) -> np.ndarray:
    """Every integer of [first, last] if there are at most n, else n of them evenly spread, both ends included."""
    if last - first + 1 <= n:
        return np.arange(first, last + 1, dtype=np.int64)
    return np.unique(np.round(np.linspace(first, last, n)).astype(np.int64))


@dataclass(frozen=True)
class PositionCounts:
    """Exact row counts of one group at the grid's position codes (private: only ever handed to mechanisms)."""

    codes: np.ndarray  # int64, in any order, possibly repeated
    counts: np.ndarray  # int64, rows at each code

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def below(self, codes: np.ndarray) -> np.ndarray:
        """Rows whose code is below each of the given (ascending) codes."""
        at = np.searchsorted(codes, self.codes, side="right")  # rows with code c are below every given code > c
        per = np.bincount(at, weights=self.counts, minlength=len(codes) + 1)
        return np.rint(np.cumsum(per[: len(codes)])).astype(np.int64)


def quantile_scores(below: np.ndarray, above: np.ndarray, q: float) -> tuple[list[int], int]:
    """Integer scores |(1-q)·#below(c) - q·#above(c)| per candidate (lower is better), with sensitivity per row.

    Adding or removing one row changes #below or #above of each candidate by at most one, so each score moves by
    at most max(q, 1-q)·D with q = num/D.
    """
    num = round(q * QUANTILE_DENOMINATOR)
    den = QUANTILE_DENOMINATOR
    b, a = np.asarray(below, dtype=np.int64), np.asarray(above, dtype=np.int64)
    return np.abs((den - num) * b - num * a).tolist(), max(num, den - num)


def position_scores(counts: PositionCounts, positions: np.ndarray, q: float) -> list[int]:
    """The rank scores of the given (ascending) grid positions: rows strictly below and strictly above each."""
    codes = np.empty(2 * len(positions), dtype=np.int64)
    codes[0::2], codes[1::2] = 2 * positions + 1, 2 * positions + 2
    below = counts.below(codes)
    return quantile_scores(below[0::2], counts.total - below[1::2], q)[0]


@lru_cache(maxsize=256)
def _noisy_min(scale: float) -> dp.Measurement:
    space = dp.vector_domain(dp.atom_domain(T="i64")), dp.linf_distance(T="i64", monotonic=False)
    return dp.m.make_noisy_max(*space, dp.max_divergence(), scale=scale, negate=True)


def release_quantile_index(scores: list[int], d_in: int, epsilon: float) -> tuple[int, float]:
    """Index of the candidate with (noisily) the lowest score, and the noise scale used.

    d_in is the L∞ sensitivity of the score vector; report-noisy-max (OpenDP's exponential-noise form) on
    non-monotonic scores costs 2·d_in / scale.
    """
    meas, scale = _calibrated_noisy_min(d_in, epsilon)
    return int(meas(scores)), scale


@lru_cache(maxsize=256)
def _calibrated_noisy_min(d_in: int, epsilon: float) -> tuple[dp.Measurement, float]:
    """Report-noisy-min for (d_in, ε) and its scale, once its privacy map has been checked (public values only)."""
    scale = 2 * d_in / epsilon
    meas = _noisy_min(scale)
    spent = meas.map(d_in)
    if spent > epsilon * (1 + _MAP_SLACK):
        raise MechanismError(f"calibration error: noisy max map gives ε={spent} > {epsilon}")
    return meas, scale


def release_quantile_bins(counts: list[int], k: int, epsilon: float) -> IntegerRelease:
    """The interval's ladder of bin counts with discrete Laplace noise: every row is in exactly one bin, so one
    unit moves the vector by at most k in L1 (a histogram, calibrated as any other)."""
    return release_integers(counts, k, epsilon)


def quantile_epsilons(epsilon: float) -> tuple[float, float, float]:
    """The quantile's ε split between its centre, interval and point (summing to ε)."""
    centre, interval = epsilon * QUANTILE_SHARES[0], epsilon * QUANTILE_SHARES[1]
    return centre, interval, epsilon - centre - interval


def ladder(centre: int, size: int) -> np.ndarray:
    """The interval's cuts: positions centre ± 2^i within the grid (position 0, which no row is below, left out),
    ascending and distinct. They depend on the released centre and public values only."""
    offsets = 1 << np.arange(max(size - 1, 1).bit_length() + 1, dtype=np.int64)
    cuts = np.concatenate([centre - offsets, [centre], centre + offsets])
    return np.unique(cuts[(cuts >= 1) & (cuts <= size - 1)])


def _log_mgf(t: np.ndarray, scale: float) -> np.ndarray:
    """log E[e^(tX)] for discrete Laplace noise X of `scale` (P(X = x) ∝ e^(-|x|/scale)), |t| < 1/scale."""
    p = math.exp(-1.0 / scale)
    return 2 * math.log1p(-p) - np.log1p(-p * np.exp(t)) - np.log1p(-p * np.exp(-t))


@lru_cache(maxsize=256)
def interval_errors(scale: float, q: float, n_cuts: int, alpha: float) -> tuple[float, ...]:
    """Per cut i of a ladder of n_cuts, a bound E_i on the noise Z_i = (1-q)·ΣX(bins below) - q·ΣX(bins above)
    of the cut's noisy rank balance (i+1 bins below it, n_cuts - i above, X discrete Laplace of `scale`), such
    that |Z_i| ≤ E_i for every cut at once with probability ≥ 1 - alpha.

    Chernoff: P(Z_i ≥ E) ≤ exp(K_i(λ) - λE) for every 0 < λ < 1/(max(q, 1-q)·scale), K_i the log moment
    generating function of Z_i (exact for discrete Laplace), and likewise for -Z_i; a union bound over the
    2·n_cuts tails gives E_i = min over λ of (K_i(λ) - ln(alpha / (2·n_cuts))) / λ. The minimum is taken over a
    grid of λ, which can only make E_i larger.
    """
    if n_cuts == 0:
        return ()
    lam = np.linspace(0.001, 0.999, 1000) / (max(q, 1 - q) * scale)
    below, above = _log_mgf((1 - q) * lam, scale), _log_mgf(q * lam, scale)
    i = np.arange(n_cuts, dtype=np.float64)[:, None]
    log_mgf = (i + 1) * below + (n_cuts - i) * above  # one row per cut, one column per λ
    return tuple(np.min((log_mgf - math.log(alpha / (2 * n_cuts))) / lam, axis=1).tolist())


@dataclass(frozen=True)
class QuantileRelease:
    """One group's released quantile: the point, and the noisy ladder from which its interval follows at any
    alpha (post-processing of DP outputs and public values only)."""

    value: float
    cuts: np.ndarray  # grid positions of the ladder's cuts
    bins: np.ndarray  # noisy row counts of the n_cuts + 1 bins
    bin_scale: float
    q: float
    grid: QuantileGrid
    point_scale: float = math.nan  # noise scale of the point's selection (score units): public
    has_interval: bool = True  # False for a value-only release (no ladder: `cuts` and `bins` are empty)

    def interval(self, alpha: float) -> tuple[int, int]:
        """Grid positions [low, high] that hold the true quantile with probability ≥ 1 - alpha.

        With n rows, B(c) rows below position c and A(c) = n - B(c) at or above it, the quantile (interpolated
        between order statistics ⌊q(n-1)⌋ and ⌈q(n-1)⌉) is at least c when (1-q)·B(c) - q·A(c) + q ≤ 0, and at most
        c when it is ≥ 1. A cut is an end when its noisy balance passes that test with E_i to spare; else the
        bounds of the column are the ends (always, for a value-only release, which has no ladder)."""
        if not self.has_interval:
            return 0, self.grid.size - 1
        errors = np.asarray(interval_errors(self.bin_scale, self.q, len(self.cuts), alpha))
        below = np.cumsum(self.bins)[:-1]
        balance = (1 - self.q) * below - self.q * (self.bins.sum() - below)
        lows = np.flatnonzero(balance + self.q + errors <= 0)
        highs = np.flatnonzero(balance + self.q - errors >= 1)
        low = int(self.cuts[lows[-1]]) if lows.size else 0
        high = int(self.cuts[highs[0]]) if highs.size else self.grid.size - 1
        return min(low, high), max(low, high)  # crossed only where the bound failed (probability ≤ alpha)

    def value_interval(self, alpha: float) -> tuple[float, float]:
        low, high = self.interval(alpha)
        return float(self.grid.value(low)), float(self.grid.value(high))

    def peak_density(self, low: int, high: int) -> float:
        """The most rows per grid step that the ladder's noisy counts show in a bin between two of its ends (cuts, or
        the grid's first and last positions): post-processing of the ladder. The narrowest bins are those around
        the centre, so this is the density near the quantile (a peak that the noise raises only adds positions)."""
        edges = np.concatenate([[0], self.cuts, [self.grid.size - 1]])
        widths = np.maximum(np.diff(edges), 1)
        inside = (edges[:-1] >= low) & (edges[1:] <= high)
        if not inside.any():
            return 0.0
        return float(np.max(np.maximum(self.bins[inside], 0) / widths[inside]))

    def point_candidates(self, low: int, high: int) -> int:
        """How many evenly spaced positions the value's selection gets over [low, high]: one per
        QUANTILE_POINT_SPACING noise scales of rank at the ladder's peak density there (a row moves a position's
        score by QUANTILE_DENOMINATOR), between QUANTILE_POINT_MIN_CANDIDATES and QUANTILE_POINT_CANDIDATES."""
        if not math.isfinite(self.point_scale):
            return QUANTILE_POINT_CANDIDATES
        spacing = QUANTILE_POINT_SPACING * self.point_scale / QUANTILE_DENOMINATOR  # rows
        wanted = math.ceil((high - low) * self.peak_density(low, high) / spacing) + 1
        return min(max(wanted, QUANTILE_POINT_MIN_CANDIDATES), QUANTILE_POINT_CANDIDATES)

    def fine_grid(self, alpha: float) -> QuantileGrid:
        """The positions of the value's selection: `point_candidates` of them evenly spaced over the interval at
        alpha, both ends included (on a grid of integers, every integer of it where there are no more).
        Post-processing of the ladder and public values: public once the ladder is released."""
        low, high = self.interval(alpha)
        lo, hi = (float(v) for v in self.grid.value(np.asarray([low, high])))
        if high == low:
            return QuantileGrid(lo, self.grid.step, 1)
        n = self.point_candidates(low, high)
        if self.grid.integer and high - low < n:
            return QuantileGrid(lo, 1.0, high - low + 1, integer=True)
        return QuantileGrid(lo, (hi - lo) / (n - 1), n)


def release_quantile_interval(
    counts: PositionCounts, grid: QuantileGrid, q: float, d_in: int, k: int, epsilon: float
) -> QuantileRelease:
    """Stages 1 and 2 of one group's quantile (see above) from its counts at the grid's codes: the centre, then the
    noisy ladder around it, at their shares of `epsilon` (the quantile's whole ε). Its value is not yet chosen
    (NaN); d_in is the L∞ sensitivity of the rank scores (quantile_sensitivity), k the L1 sensitivity of the
    ladder's counts."""
    eps_centre, eps_interval, _ = quantile_epsilons(epsilon)
    coarse = grid.coarse()
    centre = int(coarse[release_quantile_index(position_scores(counts, coarse, q), d_in, eps_centre)[0]])
    cuts = ladder(centre, grid.size)
    below = counts.below(2 * cuts + 1)  # rows below each cut
    exact = np.diff(np.concatenate([[0], below, [counts.total]]))
    noisy = release_quantile_bins(exact.tolist(), k, eps_interval)
    _, _, eps_point = quantile_epsilons(epsilon)
    point_scale = _calibrated_noisy_min(d_in, eps_point)[1]
    return QuantileRelease(math.nan, cuts, np.asarray(noisy.values, dtype=np.int64), noisy.scale, q, grid, point_scale)


def release_quantile_point(
    release: QuantileRelease, fine: PositionCounts, d_in: int, epsilon: float, alpha: float
) -> QuantileRelease:
    """Stage 3: the value, by report-noisy-min over every position of `release.fine_grid(alpha)`, from the group's
    exact counts at that grid's codes (`fine`, the second pass), at the point's share of `epsilon`."""
    _, _, eps_point = quantile_epsilons(epsilon)
    points = release.fine_grid(alpha)
    scores = position_scores(fine, np.arange(points.size, dtype=np.int64), release.q)
    point = release_quantile_index(scores, d_in, eps_point)[0]
    return dataclasses.replace(release, value=float(points.value(point)))


def release_quantile(
    counts: PositionCounts,
    grid: QuantileGrid,
    q: float,
    d_in: int,
    k: int,
    epsilon: float,
    alpha: float,
    fine: Callable[[QuantileGrid], PositionCounts],
) -> QuantileRelease:
    """One group's quantile at level q in three measurements costing `epsilon` in all (see above); `fine` counts
    the group's rows at the codes of a grid (the second pass), alpha is the level of the interval that bounds the
    point's candidates."""
    release = release_quantile_interval(counts, grid, q, d_in, k, epsilon)
    return release_quantile_point(release, fine(release.fine_grid(alpha)), d_in, epsilon, alpha)


def release_quantile_value(
    counts: PositionCounts, grid: QuantileGrid, q: float, d_in: int, epsilon: float
) -> QuantileRelease:
    """A value-only quantile: one report-noisy-min at the whole `epsilon` over every position of `grid` (public:
    `quantile_value_grid`), from the group's exact counts at that grid's codes. No ladder, so no interval."""
    scores = position_scores(counts, np.arange(grid.size, dtype=np.int64), q)
    point, scale = release_quantile_index(scores, d_in, epsilon)
    none = np.zeros(0, dtype=np.int64)
    return QuantileRelease(float(grid.value(point)), none, none, math.nan, q, grid, scale, has_interval=False)


def quantile_rank_error(scale: float, n_candidates: int, q: float, alpha: float) -> float:
    """With probability ≥ 1-alpha the released candidate's rank is within this many rows of the best candidate's.

    A candidate whose score is worse than the best by g wins only if its noise beats the best one's by g,
    which happens with probability at most 1/(1+e^(g/scale)); a union bound over candidates gives
    g ≤ scale·ln(|C|/alpha). Moving a candidate past one row changes its score by at least min(q, 1-q)·D.
    """
    num = round(q * QUANTILE_DENOMINATOR)
    step = min(num, QUANTILE_DENOMINATOR - num)
    return scale * math.log(n_candidates / alpha) / step


def quantile_point_rank_error(
    d_in: int, epsilon_point: float, q: float, alpha: float, n_candidates: int = QUANTILE_POINT_CANDIDATES
) -> float:
    """The rank error (rows, at 1-alpha) of a quantile's value among the candidates of its last selection (at most
    QUANTILE_POINT_CANDIDATES of them; a value-only quantile's: its grid's size)."""
    return quantile_rank_error(2 * d_in / epsilon_point, n_candidates, q, alpha)
