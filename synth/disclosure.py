"""The release check of a non-DP proxy: no proxy row may equal a private row, and DCR protection is reported.

A non-DP proxy has no formal guarantee, so before it is released Bastion checks it against the private
pre-bounded table (through the engine the gateway passed in): any proxy row equal to a private row on every proxy
column fails the check. SDMetrics' `NewRowSynthesis` and `DCRBaselineProtection` scores (on subsamples, for
speed) are reported alongside. If the check fails, nothing is released.
"""

from __future__ import annotations

import warnings
from typing import Any

import pandas as pd
import pyarrow as pa
from sqlglot import exp

from policies.reader import Reader
from synth.columns import BinKind, ColumnBins

# SDMetrics' row-matching and DCR metrics are quadratic in the rows compared: they are estimated on samples of
# this many private and proxy rows (the release gate itself, `exact_matches`, compares every row).
SDMETRICS_SAMPLE = 500


def exact_matches(reader: Reader, table: str, proxy: pd.DataFrame, columns: list[ColumnBins]) -> int:
    """How many proxy rows equal some private row on all proxy columns (NULL equals NULL)."""
    if not columns or proxy.empty:
        return 0
    frame = proxy[[c.name for c in columns]].copy()
    for c in columns:
        if c.kind == BinKind.DATE:
            frame[c.name] = pd.to_datetime(frame[c.name]).dt.date
    with reader.frame("__bastion_proxy_check", pa.Table.from_pandas(frame, preserve_index=False)) as view:

        def side(alias: str, c: ColumnBins) -> exp.Expr:
            return exp.Cast(this=exp.column(c.name, table=alias, quoted=True), to=exp.DataType.build(_sql_type(c)))

        same = exp.and_(*[exp.NullSafeEQ(this=side("p", c), expression=side("t", c)) for c in columns])
        private = exp.select(exp.Literal.number(1)).from_(exp.alias_(exp.table_(table, quoted=True), "t")).where(same)
        query = exp.select(exp.Count(this=exp.Star())).from_(exp.alias_(view, "p")).where(exp.Exists(this=private))
        rows = reader.rows(query)
    return int(rows[0][0])


def _sql_type(c: ColumnBins) -> str:
    if c.kind == BinKind.DATE:
        return "DATE"
    if c.kind == BinKind.FLOAT:
        return "DOUBLE"
    if c.kind == BinKind.INT:
        return "BIGINT"
    return "VARCHAR"


def sdmetrics_scores(private: pd.DataFrame, proxy: pd.DataFrame, metadata: dict[str, Any], seed: int) -> dict[str, Any]:
    """SDMetrics privacy scores on subsamples: NewRowSynthesis (1 = all new) and DCR baseline protection."""
    from sdmetrics.single_table import DCRBaselineProtection, NewRowSynthesis

    real = private.sample(min(len(private), SDMETRICS_SAMPLE), random_state=seed)
    synth = proxy[list(private.columns)].sample(min(len(proxy), SDMETRICS_SAMPLE), random_state=seed)
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out["new_row_synthesis"] = float(
                NewRowSynthesis.compute(real, synth, metadata, synthetic_sample_size=len(synth))
            )
        except Exception as exc:  # a metric failing must not release anything by itself; report it
            out["new_row_synthesis_error"] = type(exc).__name__
        try:
            dcr = DCRBaselineProtection.compute_breakdown(real, synth, {"tables": {"proxy": metadata}}, "proxy")
            medians = dcr.get("median_DCR_to_real_data", {})
            out["dcr_baseline_protection"] = {
                "score": float(dcr["score"]),
                "median_dcr_proxy_to_real": float(medians.get("synthetic_data", float("nan"))),
                "median_dcr_random_to_real": float(medians.get("random_data_baseline", float("nan"))),
            }
        except Exception as exc:
            out["dcr_baseline_protection_error"] = type(exc).__name__
    return out


def check_release(
    reader: Reader,
    table: str,
    private_sample: pd.DataFrame,
    proxy: pd.DataFrame,
    columns: list[ColumnBins],
    metadata: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """The verdict on a non-DP proxy: `passed` is False if any proxy row equals a private row."""
    matches = exact_matches(reader, table, proxy, columns)
    scores = sdmetrics_scores(private_sample, proxy, metadata, seed)
    return {
        "passed": matches == 0,
        "exact_matches": matches,
        "rule": "no proxy row may equal a private row of the pre-bounded table on every proxy column",
        "sdmetrics": scores,
        "sdmetrics_sample_rows": SDMETRICS_SAMPLE,
    }
