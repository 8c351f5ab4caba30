"""What DP data monitoring counts in a version's batch, as sqlglot trees every engine can run (no engine import).

Each monitored column's values are split into cells that partition the rows: `missing` (the source value is
absent or unreadable), then for a numeric or date column with bounds `below` and `above` (the source value lies
outside the bounds and was clamped) and one `bin` per equal slice of the bounds (values inside them); for a column
with a declared domain `outside` (a value not in the domain) and one `value` cell per domain value; for a bool
column `true` and `false`; for any other column one `present` cell. The cells are decided on the source value,
before clamping and conversion, so each row of the batch falls in exactly one cell of each monitored column: one
unit's at most k kept rows change the whole count vector by at most k × (monitored columns) in L1.

Monitored columns are the policy's `usage: query` columns other than the privacy unit and the row key: the report
is readable by whoever may query the dataset.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Any

from sqlglot import exp

from policies.schema import NUMERIC_TYPES, Column, ColumnType, Policy, Usage


class CellKind(enum.StrEnum):
    MISSING = "missing"
    BELOW = "below"  # clamped at the lower bound
    ABOVE = "above"  # clamped at the upper bound
    OUTSIDE = "outside"  # not in the declared domain
    BIN = "bin"  # a slice of the bounds
    VALUE = "value"  # a domain value (or true/false)
    PRESENT = "present"  # a value of a column with neither bounds nor domain

    @property
    def flag(self) -> bool:
        """A cell that says something went wrong with a value (its share is tested on its own)."""
        return self in {CellKind.MISSING, CellKind.BELOW, CellKind.ABOVE, CellKind.OUTSIDE}


@dataclass(frozen=True)
class Cell:
    kind: CellKind
    label: str


@dataclass(frozen=True)
class Monitored:
    """One monitored column and its cells, in the order of the released vector."""

    name: str
    column: Column
    cells: tuple[Cell, ...]

    @property
    def distribution(self) -> list[int]:
        """The indices of the cells whose shares among valid values form the column's histogram."""
        return [i for i, c in enumerate(self.cells) if c.kind in {CellKind.BIN, CellKind.VALUE}]


def _label(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:,}" if isinstance(value, int) else f"{value:,.6g}"
    return str(value)


def _edges(col: Column, bins: int) -> list[Any]:
    """The bins' bounds: bins + 1 edges from low to high (dates: whole days)."""
    assert col.bounds is not None
    lo, hi = col.bounds
    if col.type is ColumnType.DATE:
        span = (hi - lo).days + 1
        return [lo + dt.timedelta(days=span * i // bins) for i in range(bins)] + [hi]
    step = (float(hi) - float(lo)) / bins
    edges: list[Any] = [float(lo) + step * i for i in range(bins)] + [float(hi)]
    return edges


def monitored(policy: Policy, bins: int) -> list[Monitored]:
    """The policy's monitored columns and their cells."""
    out = []
    for name, col in policy.columns.items():
        if col.usage is not Usage.QUERY or name in {policy.privacy_unit, policy.row_key}:
            continue
        cells = [Cell(CellKind.MISSING, "missing")]
        if col.type is ColumnType.BOOL:
            cells += [Cell(CellKind.VALUE, "true"), Cell(CellKind.VALUE, "false")]
        elif col.bounds is not None and (col.type in NUMERIC_TYPES or col.type is ColumnType.DATE):
            lo, hi = col.bounds
            cells += [Cell(CellKind.BELOW, _label(lo)), Cell(CellKind.ABOVE, _label(hi))]
            edges = _edges(col, bins)
            for i in range(bins):
                close = "]" if i == bins - 1 else ")"
                cells.append(Cell(CellKind.BIN, f"[{_label(edges[i])}, {_label(edges[i + 1])}{close}"))
        elif col.domain is not None:
            cells.append(Cell(CellKind.OUTSIDE, "outside"))
            cells += [Cell(CellKind.VALUE, _label(v)) for v in col.domain]
        else:
            cells.append(Cell(CellKind.PRESENT, "present"))
        out.append(Monitored(name, col, tuple(cells)))
    return out


def cell_column(name: str) -> str:
    return f"__cell_{name}"


def _int(value: int) -> exp.Expr:
    return exp.Literal.number(int(value))


def _double(value: float) -> exp.Expr:
    return exp.Cast(this=exp.Literal.number(repr(float(value))), to=exp.DataType.build("DOUBLE"))


def _date(value: dt.date) -> exp.Expr:
    return exp.Cast(this=exp.Literal.string(value.isoformat()), to=exp.DataType.build("DATE"))


def _try(node: exp.Expr, to: str) -> exp.Expr:
    return exp.TryCast(this=node, to=exp.DataType.build(to))


def _case(pairs: list[tuple[exp.Expr, int]], default: exp.Expr) -> exp.Expr:
    return exp.Case(ifs=[exp.If(this=c, true=_int(v)) for c, v in pairs], default=default)


def cell_of(m: Monitored, bins: int) -> exp.Expr:
    """The index of the cell a source row's value of `m` falls in (total: never fails, never NULL)."""
    src = exp.column(m.name, quoted=True)
    col = m.column
    kinds = [c.kind for c in m.cells]
    if col.type is ColumnType.BOOL:
        raw = _try(src, "BOOLEAN")
        return _case([(exp.Is(this=raw.copy(), expression=exp.Null()), 0), (raw.copy(), 1)], _int(2))
    if CellKind.BIN in kinds:
        assert col.bounds is not None
        lo, hi = col.bounds
        first = kinds.index(CellKind.BIN)
        if col.type is ColumnType.DATE:
            raw = _try(src, "DATE")
            missing: exp.Expr = exp.Is(this=raw.copy(), expression=exp.Null())
            low, high = _date(lo), _date(hi)
            days = exp.DateDiff(this=raw.copy(), expression=low.copy(), unit=exp.var("DAY"))
            span = (hi - lo).days + 1
            position = exp.Div(
                this=exp.Mul(this=exp.Cast(this=days, to=exp.DataType.build("DOUBLE")), expression=_double(bins)),
                expression=_double(span),
            )
        else:
            raw = _try(src, "DOUBLE")
            missing = exp.Or(this=exp.Is(this=raw.copy(), expression=exp.Null()), expression=exp.IsNan(this=raw.copy()))
            low, high = _double(float(lo)), _double(float(hi))
            position = exp.Div(
                this=exp.Mul(
                    this=exp.Paren(this=exp.Sub(this=raw.copy(), expression=low.copy())), expression=_double(bins)
                ),
                expression=_double(float(hi) - float(lo)),
            )
        index = exp.Least(
            this=exp.Cast(this=exp.Floor(this=position), to=exp.DataType.build("BIGINT")),
            expressions=[_int(bins - 1)],
        )
        return _case(
            [
                (missing, 0),
                (exp.LT(this=raw.copy(), expression=low), kinds.index(CellKind.BELOW)),
                (exp.GT(this=raw.copy(), expression=high), kinds.index(CellKind.ABOVE)),
            ],
            exp.Add(this=index, expression=_int(first)),
        )
    if CellKind.OUTSIDE in kinds:
        assert col.domain is not None
        ints = col.type is ColumnType.INT
        raw = _try(src, "BIGINT" if ints else "VARCHAR")
        pairs: list[tuple[exp.Expr, int]] = [(exp.Is(this=raw.copy(), expression=exp.Null()), 0)]
        first = kinds.index(CellKind.VALUE)
        for i, v in enumerate(col.domain):
            literal = _int(int(v)) if ints else exp.Literal.string(str(v))
            pairs.append((exp.EQ(this=raw.copy(), expression=literal), first + i))
        return _case(pairs, _int(kinds.index(CellKind.OUTSIDE)))
    raw = _try(src, "DATE" if col.type is ColumnType.DATE else "DOUBLE" if col.type in NUMERIC_TYPES else "VARCHAR")
    return _case([(exp.Is(this=raw.copy(), expression=exp.Null()), 0)], _int(1))


def cells_select(columns: list[Monitored], bins: int) -> list[exp.Expr]:
    """The cell index of every monitored column, as the columns `__cell_<name>` (to add to the values query)."""
    return [exp.alias_(cell_of(m, bins), cell_column(m.name), quoted=True) for m in columns]


def counts_query(columns: list[Monitored], rows: exp.Expr) -> exp.Select:
    """One row: the number of `rows` in every cell of every monitored column, in the released vector's order."""
    counts = []
    for m in columns:
        for i in range(len(m.cells)):
            hit = exp.EQ(this=exp.column(cell_column(m.name), quoted=True), expression=_int(i))
            counts.append(exp.Sum(this=exp.Case(ifs=[exp.If(this=hit, true=_int(1))], default=_int(0))))
    return exp.select(*counts).from_(rows)
