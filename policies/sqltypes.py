"""The types of Bastion's row and output expressions, with the public facts each value carries.

A value's type comes with what the policy says about its range: a numeric or date expression carries the
interval its values lie in (from the policy's bounds, propagated through arithmetic), a text expression the most
characters it can have (from the policy's `max_length`). These public facts are what lets the compiler prove that
no row value can make an operation fail (integer overflow, an out-of-range date or substring) and that the work
per row is bounded by the query text, never by the data.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from enum import StrEnum

from policies.schema import Column, ColumnType

# Integer arithmetic stays in BIGINT while its public range fits here; beyond, it is computed in DOUBLE, which in
# the engines Bastion targets yields ±inf instead of raising.
SAFE_INT = 2**53
# The longest text any intermediate value of an expression may have (characters), and the default length of a
# text or category column whose policy declares no max_length.
MAX_TEXT = 100_000
DEFAULT_TEXT_LENGTH = 2_000
DEFAULT_CATEGORY_LENGTH = 200
# Dates must stay within what Python (and so every client) can represent.
MIN_DAY = dt.date.min.toordinal()
MAX_DAY = dt.date.max.toordinal()


class SqlType(StrEnum):
    INT = "integer"
    FLOAT = "number"
    TEXT = "text"
    DATE = "date"
    BOOL = "boolean"
    INTERVAL = "interval"
    NULL = "null"

    @property
    def numeric(self) -> bool:
        return self in (SqlType.INT, SqlType.FLOAT)


@dataclass(frozen=True)
class Typed:
    """A value's type and its public range: [lo, hi] for integers and numbers (None: unknown), day ordinals for
    dates, `length` (characters) for text."""

    type: SqlType
    lo: float | None = None
    hi: float | None = None
    length: int = 0

    @property
    def bounded(self) -> bool:
        return self.lo is not None and self.hi is not None

    @property
    def max_abs(self) -> float | None:
        if self.lo is None or self.hi is None:
            return None
        return max(abs(self.lo), abs(self.hi))


NULL = Typed(SqlType.NULL)
BOOL = Typed(SqlType.BOOL)
FLOAT = Typed(SqlType.FLOAT)


def int_range(lo: float | None, hi: float | None) -> Typed:
    """An integer value in [lo, hi]; unknown when either end is unknown or beyond SAFE_INT."""
    if lo is None or hi is None or max(abs(lo), abs(hi)) > SAFE_INT:
        return Typed(SqlType.INT)
    return Typed(SqlType.INT, float(lo), float(hi))


def float_range(lo: float | None, hi: float | None) -> Typed:
    """A number in [lo, hi]; unknown when either end is unknown or not finite."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return FLOAT
    return Typed(SqlType.FLOAT, float(lo), float(hi))


def text(length: int) -> Typed:
    return Typed(SqlType.TEXT, length=length)


def column_type(spec: Column) -> Typed:
    """The type and public range of a column of the pre-bounded table (values are clamped to the bounds)."""
    t = spec.type
    if t is ColumnType.INT:
        if spec.bounds is not None:
            return int_range(float(spec.bounds[0]), float(spec.bounds[1]))
        if spec.domain is not None and all(isinstance(v, int) and not isinstance(v, bool) for v in spec.domain):
            values = [int(v) for v in spec.domain]
            return int_range(min(values), max(values))
        return Typed(SqlType.INT)
    if t in (ColumnType.FLOAT, ColumnType.DECIMAL):
        if spec.bounds is not None:
            return Typed(SqlType.FLOAT, float(spec.bounds[0]), float(spec.bounds[1]))
        return FLOAT
    if t is ColumnType.DATE:
        if spec.bounds is not None:
            return Typed(SqlType.DATE, spec.bounds[0].toordinal(), spec.bounds[1].toordinal())
        return Typed(SqlType.DATE, MIN_DAY, MAX_DAY)
    if t is ColumnType.BOOL:
        return BOOL
    default = DEFAULT_TEXT_LENGTH if t is ColumnType.TEXT else DEFAULT_CATEGORY_LENGTH
    return text(int(getattr(spec, "max_length", None) or default))


def unify(a: Typed, b: Typed) -> Typed | None:
    """The common type of two branches (CASE, COALESCE, IN lists ...), or None if they cannot meet without a
    conversion that could fail on some value."""
    if a.type is SqlType.NULL:
        return b
    if b.type is SqlType.NULL:
        return a
    if a.type.numeric and b.type.numeric:
        if a.type is SqlType.INT and b.type is SqlType.INT:
            if a.bounded and b.bounded:
                return int_range(min(a.lo, b.lo), max(a.hi, b.hi))  # type: ignore[type-var]
            return Typed(SqlType.INT)
        if a.bounded and b.bounded:  # a number next to a number: the hull of both ranges
            return float_range(min(a.lo, b.lo), max(a.hi, b.hi))  # type: ignore[type-var]
        return FLOAT
    if a.type is not b.type:
        return None
    if a.type is SqlType.TEXT:
        return text(max(a.length, b.length))
    if a.type is SqlType.DATE:
        return Typed(SqlType.DATE, min(a.lo, b.lo), max(a.hi, b.hi))  # type: ignore[type-var]
    return a


_SQL_NAMES = {
    SqlType.INT: "BIGINT",
    SqlType.FLOAT: "DOUBLE",
    SqlType.TEXT: "VARCHAR",
    SqlType.DATE: "DATE",
    SqlType.BOOL: "BOOLEAN",
}


def sql_type_name(t: SqlType) -> str:
    """The SQL type a value of this type is cast to wherever engines must agree (group keys, domain values); every
    engine's dialect spells it from this name."""
    return _SQL_NAMES.get(t, "DOUBLE")


def canonical(value: object, t: SqlType) -> object:
    """A key value as one Python value whatever the engine returned it as (an engine's DECIMAL, numpy scalar, 1.0
    for 1, -0.0 for 0.0), so that a group found in the rows and the same group of a public domain compare equal."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()  # type: ignore[attr-defined]
    if t is SqlType.INT:
        return int(value)  # type: ignore[call-overload]
    if t is SqlType.FLOAT:
        number = float(value)  # type: ignore[arg-type]
        return 0.0 if number == 0 else number
    if t is SqlType.BOOL:
        return bool(value)
    if t is SqlType.DATE:
        if isinstance(value, dt.datetime):
            return value.date()
        return value if isinstance(value, dt.date) else dt.date.fromisoformat(str(value))
    return str(value)
