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

import math
from dataclasses import dataclass
from functools import lru_cache

import opendp.prelude as dp

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
    hi = float(dp.accuracy_to_discrete_gaussian_scale(accuracy, alpha))
    if meets(hi):
        return hi
    lo = hi / 2
    while not meets(lo):
        lo /= 2
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


# --- quantiles ------------------------------------------------------------------------------------------


def quantile_candidates(lo: float, hi: float, integer: bool, max_candidates: int = 1024) -> list[float]:
    """A public grid of candidate answers from the policy's bounds."""
    if integer and hi - lo + 1 <= max_candidates:
        return [float(v) for v in range(int(lo), int(hi) + 1)]
    n = max_candidates
    step = (hi - lo) / (n - 1)
    return [lo + i * step for i in range(n)]


QUANTILE_DENOMINATOR = 1000


@lru_cache(maxsize=256)
def _noisy_min(scale: float) -> dp.Measurement:
    space = dp.vector_domain(dp.atom_domain(T="i64")), dp.linf_distance(T="i64", monotonic=False)
    return dp.m.make_noisy_max(*space, dp.max_divergence(), scale=scale, negate=True)


def quantile_scores(below: list[int], above: list[int], q: float) -> tuple[list[int], int]:
    """Integer scores |(1-q)·#below(c) - q·#above(c)| per candidate (lower is better), with sensitivity per row.

    Adding or removing one row changes #below or #above of each candidate by at most one, so each score moves by
    at most max(q, 1-q)·D with q = num/D.
    """
    num = round(q * QUANTILE_DENOMINATOR)
    den = QUANTILE_DENOMINATOR
    scores = [abs((den - num) * b - num * a) for b, a in zip(below, above, strict=True)]
    return scores, max(num, den - num)


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


def quantile_rank_error(scale: float, n_candidates: int, q: float, alpha: float) -> float:
    """With probability ≥ 1-alpha the released candidate's rank is within this many rows of the target rank.

    A candidate whose score is worse than the best by g wins only if its noise beats the best one's by g,
    which happens with probability at most 1/(1+e^(g/scale)); a union bound over candidates gives
    g ≤ scale·ln(|C|/alpha). Moving a candidate past one row changes its score by at least min(q, 1-q)·D.
    """
    num = round(q * QUANTILE_DENOMINATOR)
    step = min(num, QUANTILE_DENOMINATOR - num)
    return scale * math.log(n_candidates / alpha) / step
