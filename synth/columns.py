"""Columns of a proxy: which columns a policy lets a proxy have, and how each is cut into public bins.

Everything here comes from the policy alone (types, bounds, domains), never from the data, so the bin layout of a
measurement is public and every histogram over it releases all of its bins, empty ones included.

Bin layout per column type:

- int with bounds: the integers of [low, high] in at most `MAX_BINS` equal runs of consecutive integers;
- float / decimal with bounds: `MAX_BINS` equal-width intervals of [low, high];
- date with bounds: the days of [low, high] in at most `MAX_BINS` equal runs of consecutive days;
- category / int with a domain, bool: one bin per domain value;
- category without a domain: one bin per key released by DP key selection (costs δ).

Numeric, date and domain columns get one more bin, the last, for NULL (and, for domain columns, for values
outside the declared domain). Dates without bounds and free text are never part of a proxy.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd
from sqlglot import exp

from policies.schema import NUMERIC_TYPES, Column, ColumnType, Policy, Usage

MAX_BINS = 32


class BinKind(StrEnum):
    """How a proxy column is cut into bins (see the module docstring)."""

    INT = "int"
    FLOAT = "float"
    DATE = "date"
    DOMAIN = "domain"
    KEYS = "keys"


def column(name: str) -> exp.Column:
    """A quoted column of the pre-bounded table."""
    return exp.column(name, quoted=True)


def _int(value: int) -> exp.Expr:
    return exp.Literal.number(int(value))


def _double(value: float) -> exp.Expr:
    return exp.Cast(this=exp.Literal.number(repr(float(value))), to=exp.DataType.build("DOUBLE"))


def _text(node: exp.Expr) -> exp.Expr:
    return exp.Cast(this=node, to=exp.DataType.build("VARCHAR"))


@dataclass(frozen=True)
class ColumnBins:
    """The public bin layout of one proxy column."""

    name: str
    type: ColumnType
    kind: BinKind
    low: float = 0.0  # int / float: lower bound; date: 0 (offsets in days from `origin`)
    width: float = 1.0  # int / date: integers per bin; float: width of a bin
    n_bins: int = 0  # bins for values (the NULL bin comes on top, except for "keys")
    high: float = 0.0
    origin: dt.date | None = None
    labels: list[Any] = field(default_factory=list)  # domain values, or released keys
    scale: float = 0.0  # rounding unit of float / decimal values

    @property
    def has_null_bin(self) -> bool:
        return self.kind != BinKind.KEYS

    @property
    def size(self) -> int:
        """Length of the released histogram vector."""
        return self.n_bins + (1 if self.has_null_bin else 0)

    def with_keys(self, keys: list[str]) -> ColumnBins:
        return ColumnBins(self.name, self.type, BinKind.KEYS, n_bins=len(keys), labels=list(keys))

    # --- statements over the pre-bounded table ----------------------------------------------------------

    def bin_expr(self) -> exp.Expr:
        """Each row's bin index (the NULL bin for NULL or out-of-domain values; for "keys", NULL for NULL values
        and keys that were not released), as a tree every engine generates in its own dialect."""
        c = column(self.name)
        null_bin = _int(self.n_bins)
        if self.kind in (BinKind.INT, BinKind.FLOAT):
            offset = exp.Sub(
                this=exp.Cast(this=c.copy(), to=exp.DataType.build("DOUBLE")), expression=_double(self.low)
            )
            idx: exp.Expr = exp.Floor(this=exp.Div(this=exp.Paren(this=offset), expression=_double(self.width)))
        elif self.kind == BinKind.DATE:
            assert self.origin is not None
            origin = exp.Cast(this=exp.Literal.string(self.origin.isoformat()), to=exp.DataType.build("DATE"))
            days = exp.DateDiff(this=c.copy(), expression=origin, unit=exp.var("DAY"))
            idx = exp.Floor(
                this=exp.Div(this=exp.Cast(this=days, to=exp.DataType.build("DOUBLE")), expression=_double(self.width))
            )
        elif self.kind == BinKind.DOMAIN:
            tests: list[tuple[exp.Expr, exp.Expr]]
            if self.type is ColumnType.BOOL:
                tests = [(c.copy(), exp.Boolean(this=bool(v))) for v in self.labels]
            elif self.type is ColumnType.INT:
                tests = [(c.copy(), _int(int(v))) for v in self.labels]
            else:
                tests = [(_text(c.copy()), exp.Literal.string(str(v))) for v in self.labels]
            return exp.Case(
                ifs=[exp.If(this=exp.EQ(this=a, expression=b), true=_int(i)) for i, (a, b) in enumerate(tests)],
                default=null_bin,
            )
        else:  # keys
            if not self.labels:
                return exp.Cast(this=exp.Null(), to=exp.DataType.build("BIGINT"))
            keys = exp.Array(expressions=[exp.Literal.string(str(v)) for v in self.labels])
            # The 1-based position, 0 (Spark) or NULL (DuckDB) when absent: NULL either way, minus one.
            found = exp.Nullif(this=exp.ArrayPosition(this=keys, expression=_text(c)), expression=_int(0))
            return exp.Paren(this=exp.Sub(this=found, expression=_int(1)))
        clamped = exp.Least(
            this=exp.Greatest(this=exp.Cast(this=idx, to=exp.DataType.build("BIGINT")), expressions=[_int(0)]),
            expressions=[_int(self.n_bins - 1)],
        )
        # NULL is tested first: LEAST / GREATEST skip NULLs.
        return exp.Case(ifs=[exp.If(this=exp.Is(this=c, expression=exp.Null()), true=null_bin)], default=clamped)

    def bin_of(self, s: pd.Series) -> np.ndarray:
        """Bin index of each value of a proxy column (the NULL bin, or -1 for keys, when it has none)."""
        null_bin = self.n_bins if self.has_null_bin else -1
        present = s.notna().to_numpy()
        out = np.full(len(s), null_bin, dtype=np.int64)
        if not present.any():
            return out
        v = s[present]
        if self.kind in (BinKind.INT, BinKind.FLOAT, BinKind.DATE):
            if self.kind == BinKind.DATE:
                assert self.origin is not None
                x = (
                    pd.to_datetime(v).to_numpy().astype("datetime64[D]") - np.datetime64(self.origin.isoformat(), "D")
                ).astype(np.float64)
            else:
                x = v.to_numpy(dtype=np.float64)
            idx = np.floor((x - self.low) / self.width).astype(np.int64)
            out[present] = np.clip(idx, 0, self.n_bins - 1)
            return out
        index = {str(label): i for i, label in enumerate(self.labels)}
        out[present] = v.astype(str).map(index).fillna(null_bin).to_numpy(dtype=np.int64)
        return out

    # --- values from bins (post-processing) --------------------------------------------------------------

    def bin_ranges(self) -> list[tuple[float, float]]:
        """Numeric extent [lo, hi] of each value bin (ints and dates: inclusive integers)."""
        if self.kind in (BinKind.INT, BinKind.DATE):
            w = int(self.width)
            top = int(self.high)
            return [(self.low + b * w, min(self.low + (b + 1) * w - 1, top)) for b in range(self.n_bins)]
        if self.kind == BinKind.FLOAT:
            return [(self.low + b * self.width, self.low + (b + 1) * self.width) for b in range(self.n_bins)]
        return [(float(b), float(b)) for b in range(self.n_bins)]

    def bin_labels(self) -> list[str]:
        if self.kind == BinKind.INT:
            return [f"{int(a)}" if a == b else f"{int(a)}–{int(b)}" for a, b in self.bin_ranges()]
        if self.kind == BinKind.FLOAT:
            return [f"{a:,.6g}–{b:,.6g}" for a, b in self.bin_ranges()]
        if self.kind == BinKind.DATE:
            assert self.origin is not None
            o = self.origin
            return [
                (o + dt.timedelta(days=int(a))).isoformat()
                + ("" if a == b else "…" + (o + dt.timedelta(days=int(b))).isoformat())
                for a, b in self.bin_ranges()
            ]
        return [str(v) for v in self.labels]

    def values(self, bins: np.ndarray, frac: np.ndarray) -> np.ndarray:
        """Values for bin indices, placed at fraction `frac` ∈ [0, 1) inside each bin (value bins only)."""
        if self.kind in (BinKind.INT, BinKind.DATE):
            ranges = np.asarray(self.bin_ranges(), dtype=np.float64)
            lo = ranges[bins, 0]
            count = ranges[bins, 1] - lo + 1
            out = (lo + np.floor(frac * count)).astype(np.int64)
            return out
        if self.kind == BinKind.FLOAT:
            v = self.low + (bins + frac) * self.width
            v = np.clip(v, self.low, self.high)
            if self.scale > 0:
                v = np.round(np.round(v / self.scale) * self.scale, 10)
            return np.clip(v, self.low, self.high)
        labels = np.asarray(self.labels, dtype=object)
        return labels[bins]

    def to_series(self, values: np.ndarray, null: np.ndarray | None) -> pd.Series:
        """The proxy column in its output dtype; `null` marks rows that are NULL."""
        has_null = null is not None and bool(null.any())
        if self.kind == BinKind.DATE:
            assert self.origin is not None
            days = np.datetime64(self.origin.isoformat(), "D") + values.astype("timedelta64[D]")
            s = pd.Series(days.astype("datetime64[ns]"))
        elif self.kind == BinKind.INT:
            s = pd.Series(values.astype(np.int64), dtype="Int64" if has_null else "int64")
        elif self.kind == BinKind.FLOAT:
            s = pd.Series(values.astype(np.float64))
        elif self.type is ColumnType.BOOL:
            s = pd.Series(values.astype(bool), dtype="boolean" if has_null else "bool")
        elif self.type is ColumnType.INT:
            s = pd.Series(values.astype(np.int64), dtype="Int64" if has_null else "int64")
        else:
            s = pd.Series(values.astype(object), dtype=object)
        if has_null:
            assert null is not None
            s = s.copy()
            s[null] = None
        return s

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.value,
            "kind": self.kind,
            "low": self.low,
            "width": self.width,
            "n_bins": self.n_bins,
            "high": self.high,
            "origin": self.origin.isoformat() if self.origin else None,
            "labels": list(self.labels),
            "scale": self.scale,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> ColumnBins:
        return ColumnBins(
            name=d["name"],
            type=ColumnType(d["type"]),
            kind=BinKind(d["kind"]),
            low=d["low"],
            width=d["width"],
            n_bins=d["n_bins"],
            high=d["high"],
            origin=dt.date.fromisoformat(d["origin"]) if d["origin"] else None,
            labels=list(d["labels"]),
            scale=d["scale"],
        )


def _runs(n_values: int) -> tuple[int, int]:
    """Integers per bin and number of bins for a range of n_values consecutive integers."""
    width = max(1, math.ceil(n_values / MAX_BINS))
    return width, math.ceil(n_values / width)


def column_bins(name: str, col: Column) -> ColumnBins | None:
    """The bin layout of a usable column, or None if a proxy cannot have it (no public extent)."""
    t = col.type
    if col.domain is not None or t is ColumnType.BOOL:
        labels = list(col.domain) if col.domain is not None else [False, True]
        return ColumnBins(name, t, BinKind.DOMAIN, n_bins=len(labels), labels=labels)
    if t is ColumnType.INT and col.bounds is not None:
        lo, hi = int(col.bounds[0]), int(col.bounds[1])
        width, n = _runs(hi - lo + 1)
        return ColumnBins(name, t, BinKind.INT, low=float(lo), width=float(width), n_bins=n, high=float(hi))
    if t in NUMERIC_TYPES and col.bounds is not None:
        lo_f, hi_f = float(col.bounds[0]), float(col.bounds[1])
        width_f = (hi_f - lo_f) / MAX_BINS
        return ColumnBins(name, t, BinKind.FLOAT, low=lo_f, width=width_f, n_bins=MAX_BINS, high=hi_f, scale=col.scale)
    if t is ColumnType.DATE and col.bounds is not None:
        lo_d, hi_d = col.bounds
        days = (hi_d - lo_d).days + 1
        width, n = _runs(days)
        return ColumnBins(
            name, t, BinKind.DATE, low=0.0, width=float(width), n_bins=n, high=float(days - 1), origin=lo_d
        )
    if t is ColumnType.CATEGORY:
        return ColumnBins(name, t, BinKind.KEYS)  # keys come from DP key selection
    return None


@dataclass(frozen=True)
class ProxySchema:
    """Which columns a proxy of this policy has: usable columns with a public extent, plus fresh unit ids."""

    columns: list[ColumnBins]
    unit_column: str | None  # the privacy-unit column, filled with fresh synthetic ids (absent if hidden)
    dropped: dict[str, str]  # usable columns left out, with why

    @property
    def names(self) -> list[str]:
        out = [c.name for c in self.columns]
        return ([self.unit_column] if self.unit_column else []) + out


def proxy_schema(policy: Policy) -> ProxySchema:
    columns: list[ColumnBins] = []
    dropped: dict[str, str] = {}
    for name, col in policy.usable_columns().items():
        bins = column_bins(name, col)
        if bins is None:
            dropped[name] = "no public extent (declare bounds or a domain)"
        else:
            columns.append(bins)
    unit = policy.unit_column
    if unit is not None and policy.columns[unit].usage is Usage.HIDDEN:
        unit = None
    return ProxySchema(columns=columns, unit_column=unit, dropped=dropped)


def fresh_ids(n: int) -> pd.Series:
    """Synthetic privacy-unit ids: strings that can never equal a real id of any type."""
    width = max(6, len(str(n)))
    return pd.Series([f"syn_{i:0{width}d}" for i in range(1, n + 1)], dtype=object)
