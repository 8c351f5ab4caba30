"""Gaussian-copula arithmetic on already-released numbers (post-processing only, no private data).

- `coarse_groups`: cut a column's bins into at most `MAX_GROUPS` contiguous groups of roughly equal DP mass;
- `polychoric`: the latent-normal correlation ρ that best explains a (noisy) two-way table of coarse groups,
  by maximum likelihood of a discretised bivariate normal (the table's cells are rectangles between the normal
  quantiles of the columns' DP marginals). It plays the role of DPCopula's Kendall τ → sin(πτ/2) step, but is
  not biased towards 0 by coarse bins and ties;
- `shrink`: fade out estimates at the noise level (by their likelihood-ratio statistic);
- `nearest_correlation`: repair a matrix of pairwise estimates into a positive definite correlation matrix.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri

MAX_GROUPS = 5
_Z_CAP = 8.0
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(24)
_RHO_GRID = np.linspace(-0.985, 0.985, 198)


def coarse_groups(mass: np.ndarray, max_groups: int = MAX_GROUPS) -> np.ndarray:
    """Group index (0..G-1) for each bin: contiguous runs with about 1/max_groups of the mass each.

    Bins without mass join a neighbouring group, so every group has positive mass (if any bin has).
    """
    p = np.clip(np.asarray(mass, dtype=np.float64), 0, None)
    total = p.sum()
    if total <= 0 or len(p) == 0:
        return np.zeros(len(p), dtype=np.int64)
    if len(p) <= max_groups:
        groups = np.arange(len(p))
    else:
        start = np.concatenate([[0.0], np.cumsum(p)[:-1]]) / total
        groups = np.minimum((start * max_groups + 1e-9).astype(np.int64), max_groups - 1)
    # Merge groups without mass into the previous (or next) group, then renumber 0..G-1.
    gmass = np.bincount(groups, weights=p, minlength=groups.max() + 1)
    keep = np.flatnonzero(gmass > 0)
    remap = np.searchsorted(keep, np.arange(len(gmass)), side="right") - 1
    remap = np.maximum(remap, 0)
    return remap[groups]


def group_thresholds(mass: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Normal-scale boundaries (length G+1, ±8 at the ends) of the coarse groups of a marginal."""
    p = np.clip(np.asarray(mass, dtype=np.float64), 0, None)
    n_groups = int(groups.max()) + 1 if len(groups) else 1
    gmass = np.bincount(groups, weights=p, minlength=n_groups)
    cum = np.cumsum(gmass) / max(gmass.sum(), 1e-300)
    inner = ndtri(np.clip(cum[:-1], 1e-12, 1 - 1e-12))
    return np.concatenate([[-_Z_CAP], np.clip(inner, -_Z_CAP, _Z_CAP), [_Z_CAP]])


def bvn_cdf(x: np.ndarray, y: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Standard bivariate normal CDF Φ2(x, y; ρ), broadcast over its arguments.

    Φ2(x, y; ρ) = Φ(x)Φ(y) + ∫₀^ρ φ2(x, y; r) dr, integrated by Gauss–Legendre (|ρ| ≤ 0.985 keeps it smooth).
    """
    x, y, rho = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), np.asarray(rho, float))
    r = rho[..., None] * (_NODES + 1) / 2
    one = 1 - r * r
    dens = np.exp(-(x[..., None] ** 2 - 2 * r * x[..., None] * y[..., None] + y[..., None] ** 2) / (2 * one))
    dens /= 2 * np.pi * np.sqrt(one)
    integral = (dens * _WEIGHTS).sum(-1) * rho / 2
    return ndtr(x) * ndtr(y) + integral


def cell_probabilities(hx: np.ndarray, hy: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """P(cell a, b) for every ρ in `rho`: array of shape (len(rho), len(hx)-1, len(hy)-1)."""
    rho = np.atleast_1d(rho)
    cdf = bvn_cdf(hx[None, :, None], hy[None, None, :], rho[:, None, None])
    p = cdf[:, 1:, 1:] - cdf[:, :-1, 1:] - cdf[:, 1:, :-1] + cdf[:, :-1, :-1]
    return np.clip(p, 1e-15, None)


def polychoric(table: np.ndarray, hx: np.ndarray, hy: np.ndarray, noise_scale: float = 0.0) -> float:
    """Maximum-likelihood latent correlation of a two-way table of counts (see `polychoric_fit`)."""
    return polychoric_fit(table, hx, hy, noise_scale)[0]


def polychoric_fit(table: np.ndarray, hx: np.ndarray, hy: np.ndarray, noise_scale: float = 0.0) -> tuple[float, float]:
    """Maximum-likelihood latent correlation of a two-way table of counts, noisy ones included, and the
    likelihood-ratio statistic 2·(ℓ(ρ̂) − ℓ(0)) against independence (about χ²₁ when there is no dependence).

    Without noise the likelihood is the multinomial Σ n_ab log P_ab(ρ). With discrete-Laplace noise of scale b
    on every cell, a count is modelled as y_ab ≈ Normal(N·P_ab, N·P_ab + 2b²) (multinomial variance plus noise
    variance), N = Σ y. Negative counts are kept: clipping them to 0 would add mass to the near-empty cells away
    from the diagonal and pull ρ towards 0, while the plain multinomial likelihood with negative counts would
    reward P_ab → 0 there and push ρ towards ±1.
    """
    y = np.asarray(table, dtype=np.float64)
    if y.shape[0] < 2 or y.shape[1] < 2:
        return 0.0, 1.0
    if noise_scale <= 0:
        counts = np.clip(y, 0, None)
        if counts.sum() <= 0:
            return 0.0, 1.0

        def loglik(rhos: np.ndarray) -> np.ndarray:
            return (counts[None] * np.log(cell_probabilities(hx, hy, rhos))).sum(axis=(1, 2))
    else:
        total = y.sum()
        if total <= 0:
            return 0.0, 1.0
        noise_var = 2 * noise_scale**2

        def loglik(rhos: np.ndarray) -> np.ndarray:
            mean = total * cell_probabilities(hx, hy, rhos)
            var = mean + noise_var
            return -0.5 * (((y[None] - mean) ** 2) / var + np.log(var)).sum(axis=(1, 2))

    ll = loglik(_RHO_GRID)
    i = int(np.argmax(ll))
    lo, hi = _RHO_GRID[max(i - 1, 0)], _RHO_GRID[min(i + 1, len(_RHO_GRID) - 1)]
    fine = np.linspace(lo, hi, 41)
    fine_ll = loglik(fine)
    best = int(np.argmax(fine_ll))
    lr = 2 * float(fine_ll[best] - loglik(np.array([0.0]))[0])
    return float(fine[best]), max(lr, 0.0)


SHRINK_LR = 4.0


def shrink(rho: float, lr: float) -> float:
    """Shrink an estimate towards 0 by the evidence for it: ρ · max(0, 1 − 4 / LR).

    Under independence the likelihood-ratio statistic LR is about χ²₁ (P(LR > 4) ≈ 5%), so estimates at the
    noise level fade out while well-measured ones (LR in the hundreds) keep ~99% of their size. Without this,
    a few confident-looking noise estimates (typically pairs with a handful of released keys) would force the
    positive-definite repair to distort the well-measured pairs.
    """
    return rho * max(0.0, 1.0 - SHRINK_LR / lr) if lr > 0 else 0.0


def nearest_correlation(matrix: np.ndarray, floor: float = 1e-3, iterations: int = 200) -> np.ndarray:
    """The positive definite correlation matrix nearest to `matrix` (Frobenius norm; Higham's alternating
    projections with Dykstra's correction), with eigenvalues at least about `floor`."""
    a = np.asarray(matrix, dtype=np.float64)
    a = (a + a.T) / 2
    np.fill_diagonal(a, 1.0)

    def psd(m: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(m)
        return (v * np.maximum(w, floor)) @ v.T

    if np.linalg.eigvalsh(a).min() >= floor:
        return a
    y, correction = a.copy(), np.zeros_like(a)
    for _ in range(iterations):
        r = y - correction
        x = psd(r)
        correction = x - r
        y_next = x.copy()
        np.fill_diagonal(y_next, 1.0)
        done = np.linalg.norm(y_next - y) <= 1e-9 * max(float(np.linalg.norm(y)), 1.0)
        y = y_next
        if done:
            break
    y = psd(y)
    d = np.sqrt(np.diag(y))
    y = y / np.outer(d, d)
    np.fill_diagonal(y, 1.0)
    return y
