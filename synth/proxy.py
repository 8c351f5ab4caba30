"""Turning a model into a proxy table with SDV.

DP proxies (`dpcopula`, the default): training rows are sampled from the DP copula model in its latent form
(one normal score per column), an SDV `GaussianCopulaSynthesizer` is fitted on them and samples the proxy's
latent rows, and each column is mapped back to values through its DP marginal by rank (`calibrate`), then
cast to the policy's types and ranges. Fitting SDV on latent scores rather than on values keeps its marginals
exact and its category order the DP model's, so the proxy follows the DP histograms and the DP correlations
instead of SDV's parametric approximations of them. Every step after the DP measurements is post-processing:
SDV never sees a private row.

`dpcopula_direct` skips SDV and samples the proxy straight from the DP model (fastest; same guarantee).

The non-DP proxy (`sdv_gaussian_copula`) fits SDV on the private pre-bounded rows themselves. It is allowed only
where the policy opts in and an admin approved the job; `synth.disclosure` checks it before any release.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from sqlglot import exp

from policies.reader import ROW_ID, Reader
from policies.schema import ColumnType, Policy
from synth.columns import BinKind, ColumnBins, ProxySchema, fresh_ids
from synth.model import DPCopulaModel, inverse_cdf

Progress = Callable[[float, str], None]

DP_METHODS = ("dpcopula", "dpcopula_direct")
NON_DP_METHODS = ("sdv_gaussian_copula",)
METHODS = DP_METHODS + NON_DP_METHODS
DEFAULT_METHOD = "dpcopula"
# Rows sampled from the DP model to fit SDV on (more adds fitting time, not information: the model is fixed).
FIT_ROWS = 50_000
# Rows of the private table a non-DP SDV fit reads at most (a uniform sample of the pre-bounded table).
NON_DP_FIT_ROWS = 200_000
SDV_DISTRIBUTION = "truncnorm"


def _no_progress(fraction: float, stage: str) -> None:
    return None


def sdv_metadata(columns: list[ColumnBins], *, latent: bool = False) -> Any:
    """SDV metadata of the proxy's columns, from the policy's public facts only.

    With `latent`, every column is declared as an unrounded number (its latent normal score).
    """
    from sdv.metadata import Metadata

    md = Metadata()
    md.add_table("proxy")
    for c in columns:
        if latent:
            md.add_column(c.name, "proxy", sdtype="numerical")
        elif c.kind == BinKind.INT:
            md.add_column(c.name, "proxy", sdtype="numerical", decimal_places=0)
        elif c.kind == BinKind.FLOAT:
            places = max(0, int(round(-np.log10(c.scale)))) if 0 < c.scale < 1 else 0
            md.add_column(c.name, "proxy", sdtype="numerical", decimal_places=places)
        elif c.kind == BinKind.DATE:
            md.add_column(c.name, "proxy", sdtype="datetime", datetime_format="%Y-%m-%d")
        elif c.type is ColumnType.BOOL:
            md.add_column(c.name, "proxy", sdtype="boolean")
        elif c.type is ColumnType.INT:
            md.add_column(c.name, "proxy", sdtype="numerical", decimal_places=0)
        else:
            md.add_column(c.name, "proxy", sdtype="categorical")
    return md


def fit_and_sample_sdv(
    frame: pd.DataFrame,
    columns: list[ColumnBins],
    rows: int,
    seed: int,
    progress: Progress = _no_progress,
    *,
    latent: bool = False,
) -> pd.DataFrame:
    """Fit an SDV Gaussian copula on `frame` and sample `rows` rows from it.

    With `latent` (DP path), every column holds exact normal scores and is modelled as normal: SDV's marginals
    are then exact and its copula learns the DP model's dependence without distortion; `calibrate` maps the
    sampled scores back to values through the DP marginals.
    """
    from sdv.single_table import GaussianCopulaSynthesizer

    logging.getLogger("sdv").setLevel(logging.WARNING)
    logging.getLogger("rdt").setLevel(logging.WARNING)
    logging.getLogger("copulas").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if latent:
            synthesizer = GaussianCopulaSynthesizer(
                sdv_metadata(columns, latent=True),
                default_distribution="norm",
                enforce_min_max_values=False,
                enforce_rounding=False,
            )
        else:
            synthesizer = GaussianCopulaSynthesizer(sdv_metadata(columns), default_distribution=SDV_DISTRIBUTION)
        synthesizer.fit({"proxy": frame[[c.name for c in columns]]})
        progress(0.5, "sampling from SDV")
        synthesizer._set_random_state(seed)  # SDV 2.0: seeds the copula's sampler
        out = synthesizer.sample(rows)
    return out["proxy"] if isinstance(out, dict) else out


def calibrate(frame: pd.DataFrame, model: DPCopulaModel, seed: int) -> pd.DataFrame:
    """Map each column of latent scores onto its DP marginal, keeping the rank order SDV produced.

    Row r of a column with m non-null values gets the DP marginal's quantile at (rank(r) + U) / m, U uniform
    (ties broken at random), so the column follows the DP histogram while its dependence on other columns is
    kept: the inverse of the DP marginal's CDF applied to SDV's ranks (categories in the DP model's order).
    """
    rng = np.random.default_rng(seed + 1)
    out = frame.copy()
    for m in model.marginals:
        col = m.column
        s = frame[col.name]
        present = s.notna().to_numpy()
        n = int(present.sum())
        if n == 0:
            continue
        key = s[present].to_numpy(dtype=np.float64)
        # Latent scores are continuous, so ties are rare; a random permutation first breaks them at random.
        shuffle = rng.permutation(n)
        order = shuffle[np.argsort(key[shuffle], kind="stable")]
        u = np.empty(n)
        u[order] = (np.arange(n) + rng.random(n)) / n
        bins, frac = inverse_cdf(m.value_mass, u)
        values = col.values(bins, frac)
        full = np.resize(values, len(frame))  # placeholders where NULL (masked by to_series)
        full[present] = values
        out[col.name] = col.to_series(full, ~present if n < len(frame) else None).to_numpy()
    return out


def _finish(frame: pd.DataFrame, schema_columns: list[ColumnBins], unit_column: str | None) -> pd.DataFrame:
    """Column order, output dtypes, fresh unit ids."""
    out: dict[str, Any] = {}
    if unit_column:
        out[unit_column] = fresh_ids(len(frame))
    for c in schema_columns:
        s = frame[c.name].reset_index(drop=True)
        if c.kind == BinKind.DATE:
            s = pd.to_datetime(s).dt.normalize()
        elif c.kind == BinKind.INT or (c.kind == BinKind.DOMAIN and c.type is ColumnType.INT):
            s = s.round().astype("Int64" if s.isna().any() else "int64")
        elif c.kind == BinKind.FLOAT:
            s = s.astype(np.float64)
        elif c.type is ColumnType.BOOL:
            s = s.astype("boolean" if s.isna().any() else "bool")
        else:
            s = s.astype(object).where(s.notna(), None)
        out[c.name] = s
    return pd.DataFrame(out)


def dp_proxy(
    model: DPCopulaModel, rows: int, seed: int, method: str = DEFAULT_METHOD, progress: Progress = _no_progress
) -> pd.DataFrame:
    """A proxy of `rows` rows from a DP model (post-processing only)."""
    columns = [m.column for m in model.marginals]
    if method == "dpcopula_direct" or not columns:
        progress(0.5, "sampling from the DP model")
        return _finish(model.sample(rows, seed), columns, model.unit_column)
    progress(0.05, "sampling training rows from the DP model")
    train = model.sample(min(rows, FIT_ROWS), seed, latent=True)
    progress(0.15, "fitting SDV on rows from the DP model")
    sampled = fit_and_sample_sdv(train, columns, rows, seed, lambda f, s: progress(0.15 + 0.7 * f, s), latent=True)
    progress(0.9, "calibrating to the DP marginals")
    return _finish(calibrate(sampled, model, seed), columns, model.unit_column)


def non_dp_proxy(
    reader: Reader,
    table: str,
    policy: Policy,
    schema: ProxySchema,
    rows: int,
    seed: int,
    progress: Progress = _no_progress,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """NOT differentially private: fit SDV on the private rows. Returns (proxy, the private rows used)."""
    columns = schema.columns
    progress(0.05, "reading the pre-bounded table")
    # A repeatable sample of the rows that every engine draws alike: the first rows by a hash of (row id, seed).
    shuffle = exp.MD5(
        this=exp.Concat(
            expressions=[
                exp.Cast(this=exp.column(ROW_ID, quoted=True), to=exp.DataType.build("VARCHAR")),
                exp.Literal.string(f":{int(seed)}"),
            ]
        )
    )
    sample = (
        exp.select(*[exp.column(c.name, quoted=True) for c in columns])
        .from_(exp.table_(table, quoted=True))
        .order_by(shuffle)
        .limit(NON_DP_FIT_ROWS)
    )
    private = reader.arrow(sample).to_pandas()
    private = _finish(private, columns, None)
    progress(0.15, "fitting SDV on the private rows")
    sampled = fit_and_sample_sdv(private, columns, rows, seed, lambda f, s: progress(0.15 + 0.7 * f, s))
    return _finish(sampled, columns, schema.unit_column), private
