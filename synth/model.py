"""The DP copula model: released measurements of one dataset, and sampling rows from them.

A `DPCopulaModel` holds only outputs of DP mechanisms (noisy histograms, noisy two-way tables) and what was
derived from them, plus public facts from the policy. Everything it does afterwards (cleaning histograms,
estimating correlations, sampling rows with a seeded numpy generator) is post-processing and costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import ndtr

from synth.columns import BinKind, ColumnBins, fresh_ids

# A released bin count below this many noise scales is treated as empty: for an empty bin the chance that
# discrete Laplace noise reaches 2·scale is about e^-2 / 2 ≈ 7%, so few phantom rows survive, while bins this
# small are at the noise level anyway.
EMPTY_BELOW_SCALES = 2.0
# The NULL bin needs more evidence (a phantom NULL bin, chance e^-5 / 2 ≈ 0.3%, would make a column nullable).
NULL_BELOW_SCALES = 5.0


@dataclass
class Marginal:
    """A DP histogram of one column over its public bins (last entry: NULL bin, if the column has one)."""

    column: ColumnBins
    noisy: list[int]
    scale: float  # discrete Laplace scale of each count
    epsilon: float
    delta: float = 0.0
    threshold: int | None = None  # key selection: released keys passed this noisy count

    @property
    def cleaned(self) -> np.ndarray:
        v = np.asarray(self.noisy, dtype=np.float64)
        if self.column.kind == BinKind.KEYS:
            return np.clip(v, 0, None)
        floor = np.full(len(v), EMPTY_BELOW_SCALES * self.scale)
        floor[-1] = NULL_BELOW_SCALES * self.scale
        return np.where(v >= floor, v, 0.0)

    @property
    def value_mass(self) -> np.ndarray:
        """Non-negative weights of the value bins (uniform if the histogram came out empty)."""
        c = self.cleaned[: self.column.n_bins]
        if c.sum() <= 0:
            return np.ones(self.column.n_bins)
        return c

    @property
    def probabilities(self) -> np.ndarray:
        m = self.value_mass
        return m / m.sum()

    @property
    def null_fraction(self) -> float:
        if not self.column.has_null_bin:
            return 0.0
        c = self.cleaned
        total = c.sum()
        return float(c[-1] / total) if total > 0 else 0.0

    @property
    def noisy_total(self) -> float:
        return float(max(sum(self.noisy), 1))

    def to_json(self) -> dict[str, Any]:
        return {
            "column": self.column.to_json(),
            "noisy": [int(v) for v in self.noisy],
            "scale": self.scale,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "threshold": self.threshold,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Marginal:
        return Marginal(
            ColumnBins.from_json(d["column"]), list(d["noisy"]), d["scale"], d["epsilon"], d["delta"], d["threshold"]
        )


@dataclass
class PairTable:
    """A DP two-way table of two columns' coarse groups, and the latent correlation estimated from it."""

    a: str
    b: str
    groups_a: list[int]  # coarse group of each value bin of a
    groups_b: list[int]
    noisy: list[list[int]]
    scale: float
    epsilon: float
    rho: float  # maximum-likelihood latent correlation
    lr: float = 0.0  # likelihood-ratio statistic against independence
    rho_used: float = 0.0  # after shrinking by the evidence (before the positive-definite repair)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @staticmethod
    def from_json(d: dict[str, Any]) -> PairTable:
        return PairTable(**d)


@dataclass
class DPCopulaModel:
    dataset: str
    rows_per_unit: int
    epsilon: float
    delta: float
    allocation: dict[str, Any]
    marginals: list[Marginal]
    pairs: list[PairTable]
    correlation: list[list[float]]
    unit_column: str | None = None
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        return ([self.unit_column] if self.unit_column else []) + [m.column.name for m in self.marginals]

    def marginal(self, name: str) -> Marginal:
        return next(m for m in self.marginals if m.column.name == name)

    def sample(self, n: int, seed: int, *, latent: bool = False) -> pd.DataFrame:
        """`n` rows from the Gaussian copula with the DP marginals and the DP correlation matrix.

        With `latent`, every column is left as its latent normal score (a float; NaN for NULL), the form in which
        SDV's Gaussian copula learns the dependence exactly, without fitting marginal shapes or ordering
        categories its own way.
        """
        rng = np.random.default_rng(seed)
        d = len(self.marginals)
        out: dict[str, pd.Series] = {}
        if self.unit_column:
            out[self.unit_column] = fresh_ids(n)
        if d == 0:
            return pd.DataFrame(out, index=pd.RangeIndex(n))
        chol = np.linalg.cholesky(np.asarray(self.correlation, dtype=np.float64))
        z = rng.standard_normal((n, d)) @ chol.T
        u = ndtr(z)
        for j, m in enumerate(self.marginals):
            if latent:
                scores = z[:, j].copy()
                if m.null_fraction > 0:
                    scores[rng.random(n) < m.null_fraction] = np.nan
                out[m.column.name] = pd.Series(scores)
                continue
            bins, frac = inverse_cdf(m.value_mass, u[:, j])
            values = m.column.values(bins, frac)
            null = rng.random(n) < m.null_fraction if m.null_fraction > 0 else None
            out[m.column.name] = m.column.to_series(values, null)
        return pd.DataFrame(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "rows_per_unit": self.rows_per_unit,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "allocation": self.allocation,
            "marginals": [m.to_json() for m in self.marginals],
            "pairs": [p.to_json() for p in self.pairs],
            "correlation": self.correlation,
            "unit_column": self.unit_column,
            "dropped": self.dropped,
            "notes": self.notes,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> DPCopulaModel:
        return DPCopulaModel(
            dataset=d["dataset"],
            rows_per_unit=d["rows_per_unit"],
            epsilon=d["epsilon"],
            delta=d["delta"],
            allocation=d["allocation"],
            marginals=[Marginal.from_json(m) for m in d["marginals"]],
            pairs=[PairTable.from_json(p) for p in d["pairs"]],
            correlation=d["correlation"],
            unit_column=d["unit_column"],
            dropped=d["dropped"],
            notes=d["notes"],
        )


def inverse_cdf(mass: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bin index of each u ∈ [0, 1] under the histogram `mass`, and u's relative position inside that bin."""
    p = np.asarray(mass, dtype=np.float64)
    cdf = np.cumsum(p) / p.sum()
    bins = np.minimum(np.searchsorted(cdf, u, side="right"), len(p) - 1)
    lower = np.where(bins > 0, cdf[np.maximum(bins - 1, 0)], 0.0)
    width = cdf[bins] - lower
    frac = np.where(width > 0, (u - lower) / np.where(width > 0, width, 1.0), 0.5)
    return bins, np.clip(frac, 0.0, np.nextafter(1.0, 0.0))
