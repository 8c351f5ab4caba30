"""The bounded-table recipe every engine follows, as sqlglot trees and one Python digest (no engine import).

Registering a dataset converts every kept source value to its policy type by total expressions (numbers and
dates clamped to the policy's bounds, text and categories cut to their `max_length`, unreadable values missing),
adds fixed-point integer copies (`__fx_<col>`, `__fx2_<col>` for squares) for exact sums, and keeps at most
`max_rows_per_unit` rows per privacy unit: those whose keyed digest (HMAC-SHA256 with the workspace's secret key)
of the row's converted values ranks lowest within the unit. So the kept rows of a unit depend on the key and that
unit's rows only: the bounded tables of two neighbouring datasets differ in the rows of the unit that differs, and
not at all with the order of the rows.

The digest is computed here, in Python, over the converted values as the engine returns them in Arrow: the same
bytes on every engine (so DuckDB and Spark keep exactly the same rows), and the key never appears in SQL text, a
plan, a log line or a UI, since it is never handed to an engine at all.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from policies.reader import ROW_ID
from policies.schema import NUMERIC_TYPES, ROW_KEY, Column, ColumnType, Policy, PublicTable, Usage
from policies.typecheck import within_calendar

DIGEST = "__digest"  # the column the digest is computed into, never kept
TAKE = "__take"  # the row's rank within its unit
PRIOR = "__prior"  # an appended row's unit's rows kept by earlier versions
PRIOR_UNIT = "__prior_unit"
PRIOR_PERIOD = "__prior_period"  # with periods: the first day of that unit's period


def _col(name: str) -> exp.Column:
    return exp.column(name, quoted=True)


def _cast(node: exp.Expr, to: str, *, try_: bool = False) -> exp.Expr:
    cls = exp.TryCast if try_ else exp.Cast
    return cls(this=node, to=exp.DataType.build(to))


def _double(value: float) -> exp.Expr:
    """A DOUBLE literal every engine reads as exactly this float (a plain decimal would be a DECIMAL in DuckDB)."""
    return _cast(exp.Literal.number(repr(float(value))), "DOUBLE")


def _literal(value: Any) -> exp.Expr:
    if isinstance(value, dt.date):
        return _cast(exp.Literal.string(value.isoformat()), "DATE")
    return _double(value)


def _unsigned_zero(value: exp.Expr) -> exp.Expr:
    """value + 0.0: -0.0 becomes 0.0 (engines differ in whether LEAST/GREATEST keep the sign of a zero)."""
    return exp.Add(this=exp.Paren(this=value), expression=_double(0.0))


def _null_if(condition: exp.Expr, value: exp.Expr) -> exp.Expr:
    return exp.Case(ifs=[exp.If(this=condition, true=exp.Null())], default=value)


def _clamp(value: exp.Expr, lo: exp.Expr, hi: exp.Expr) -> exp.Expr:
    return exp.Least(this=exp.Greatest(this=value, expressions=[lo]), expressions=[hi])


def bounding_key(path: Path) -> bytes:
    """The workspace's secret bounding key (created on first use, readable by its owner only)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def kept_columns(policy: Policy) -> list[str]:
    """The policy columns the bounded table keeps: all but hidden ones, except the unit, the gold column and the
    row key (which predictions are joined on)."""
    gold = policy.labels.gold_column if policy.labels is not None else None
    return [
        name
        for name, col in policy.columns.items()
        if col.usage is not Usage.HIDDEN or name in {gold, policy.privacy_unit, policy.row_key}
    ]


def converted(name: str, col: Column) -> exp.Expr:
    """A column's bounded value from the source row: total, whatever the source type and value."""
    src = _col(name)
    t = col.type
    if t in NUMERIC_TYPES:
        number = _cast(src.copy(), "DOUBLE", try_=True)
        missing = exp.Or(
            this=exp.Is(this=number.copy(), expression=exp.Null()), expression=exp.IsNan(this=number.copy())
        )
        if col.bounds is None:  # the privacy unit, the gold column or a declared domain: kept, never summed
            if t is ColumnType.INT:
                whole = _cast(src, "BIGINT", try_=True)
                values = _int_domain(col)
                if values is None:
                    return whole
                # Typed as lying within its domain's [min, max] (policies.sqltypes.column_type), which integer
                # arithmetic relies on: a value beyond that range is missing, so none can overflow after the charge.
                inside = exp.Between(this=whole.copy(), low=_int(min(values)), high=_int(max(values)))
                return _null_if(exp.Not(this=exp.Paren(this=inside)), whole)
            return _null_if(missing, _unsigned_zero(number))
        lo, hi = (_double(b) for b in col.bounds)
        # Clamp as a double (NaN is missing; ±inf and out-of-range values go to a bound), then convert: an int's
        # bounds lie within ±2**53, so the rounded clamped value always fits a BIGINT.
        clamped = _clamp(number.copy(), lo, hi)
        if t is ColumnType.INT:
            clamped = _cast(exp.Round(this=clamped), "BIGINT", try_=True)
        else:
            clamped = _unsigned_zero(clamped)
        return _null_if(missing, clamped)
    if t is ColumnType.DATE:
        day = _cast(src, "DATE", try_=True)
        if col.bounds is None:  # a date outside years 1-9999 (which engines can read from text) is missing
            return within_calendar(day)
        lo, hi = (_literal(b) for b in col.bounds)
        return _null_if(exp.Is(this=day.copy(), expression=exp.Null()), _clamp(day.copy(), lo, hi))
    if t is ColumnType.BOOL:
        return _cast(src, "BOOLEAN", try_=True)
    text = _cast(src, "VARCHAR", try_=True)
    if col.max_length is None:
        return text
    return exp.Left(this=text, expression=exp.Literal.number(int(col.max_length)))


def _int(value: int) -> exp.Expr:
    return _cast(exp.Literal.number(int(value)), "BIGINT")


def _int_domain(col: Column) -> list[int] | None:
    """The int values of an int column's declared domain (None if it has none, or one that is not all ints)."""
    if col.domain is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in col.domain):
        return None
    return [int(v) for v in col.domain]


def summed(col: Column) -> bool:
    return col.type in NUMERIC_TYPES and col.bounds is not None


def outputs(name: str, col: Column) -> list[exp.Expr]:
    """The bounded table's columns for one policy column, over its converted value: the value, and for a summed
    column its fixed-point copies. |value| <= max_abs, fx_unit >= max_abs / 2**31 and fx2_unit >= max_abs**2 / 2**31
    (squared in DOUBLE, finite as |bounds| <= 1e150), so both fit a BIGINT; TRY_CAST keeps them total regardless."""
    out: list[exp.Expr] = [exp.alias_(_col(name), name, quoted=True)]
    if summed(col):
        value = _cast(_col(name), "DOUBLE")
        fx = exp.Div(this=value, expression=_double(col.fx_unit))
        fx2 = exp.Div(this=exp.Mul(this=value.copy(), expression=value.copy()), expression=_double(col.fx2_unit))
        out.append(exp.alias_(_cast(exp.Round(this=fx), "BIGINT", try_=True), f"__fx_{name}", quoted=True))
        out.append(exp.alias_(_cast(exp.Round(this=fx2), "BIGINT", try_=True), f"__fx2_{name}", quoted=True))
    return out


def values_query(policy: Policy, source: exp.Expr) -> exp.Select:
    """SELECT the converted kept values FROM the source (a table or table function tree)."""
    cols = policy.columns
    return exp.select(*[exp.alias_(converted(n, cols[n]), n, quoted=True) for n in kept_columns(policy)]).from_(source)


def row_keys_query(policy: Policy, source: exp.Expr) -> exp.Select:
    """SELECT every source row's converted row key AS ROW_KEY (the policy must name a `row_key`)."""
    assert policy.row_key is not None
    key = converted(policy.row_key, policy.columns[policy.row_key])
    return exp.select(exp.alias_(key, ROW_KEY, quoted=True)).from_(source)


def row_key_problem(count: int, distinct: int, present: int) -> str | None:
    """Why a column of `count` values, `present` of them readable and `distinct` distinct, is no row key."""
    if present < count:
        return f"{count - present:,} row(s) have no readable key"
    if distinct < count:
        return f"{count - distinct:,} key(s) repeat an earlier row's"
    return None


def ranked_query(
    policy: Policy,
    values: exp.Expr,
    row_id: exp.Expr,
    *,
    kept: exp.Expr | None = None,
    columns: list[str] | None = None,
) -> exp.Select:
    """Over a table of converted values with their digest: the bounded table's columns of the rows ranked within k
    in their unit (all rows when the unit is the row), and `row_id`, the engine's expression of a unique BIGINT
    per kept row, as ROW_ID (the identity labeling functions' per-row outputs are keyed by; never released).

    `kept`, for an appended batch, is the bounded table of the version it is appended to: a unit with j rows kept
    there keeps at most k - j of the batch's rows (those ranked lowest), so the bound holds over all versions
    together and the rows kept before stay kept. (A missing unit is one unit, as in the partition.)

    `columns`, if given, are selected (by name, from `values`) instead of the bounded table's columns and ROW_ID:
    the same rows, other columns of them (monitoring reads the kept rows' cells this way)."""
    cols = policy.columns
    select: list[exp.Expr]
    if columns is None:
        select = [out for n in kept_columns(policy) for out in outputs(n, cols[n])]
        select.append(exp.alias_(row_id, ROW_ID, quoted=True))
    else:
        select = [_col(c) for c in columns]
    unit = policy.unit_column
    if unit is None:
        return exp.select(*select).from_(values)
    # With periods the unit of bounding is (unit, period): k rows per unit in each period. A row without a period
    # belongs to no period's budget and is never kept.
    period = period_of(policy, None)
    parts: list[exp.Expr] = [_col(unit)] + ([period] if period is not None else [])
    rank = exp.Window(
        this=exp.RowNumber(),
        partition_by=[p.copy() for p in parts],
        order=exp.Order(expressions=[exp.Ordered(this=_col(DIGEST))]),
    )
    bound: exp.Expr = exp.Literal.number(int(policy.max_rows_per_unit))
    inner = exp.select(exp.Star(), exp.alias_(rank, TAKE, quoted=True)).from_(values)
    if kept is not None:
        keys = [exp.alias_(_col(unit), PRIOR_UNIT, quoted=True)]
        if period is not None:
            keys.append(exp.alias_(period.copy(), PRIOR_PERIOD, quoted=True))
        earlier = (
            exp.select(*keys, exp.alias_(exp.Count(this=exp.Star()), PRIOR))
            .from_(kept)
            .group_by(*[p.copy() for p in parts])
        )
        prior = exp.Coalesce(this=exp.column(PRIOR, "p", quoted=True), expressions=[exp.Literal.number(0)])
        on: exp.Expr = exp.NullSafeEQ(
            this=exp.column(unit, "v", quoted=True), expression=exp.column(PRIOR_UNIT, "p", quoted=True)
        )
        if period is not None:
            on = exp.and_(
                on,
                exp.NullSafeEQ(this=period_of(policy, "v"), expression=exp.column(PRIOR_PERIOD, "p", quoted=True)),
            )
        inner = (
            exp.select(
                exp.Column(this=exp.Star(), table=exp.to_identifier("v")),
                exp.alias_(rank, TAKE, quoted=True),
                exp.alias_(prior, PRIOR, quoted=True),
            )
            .from_(exp.alias_(values, "v"))
            .join(exp.alias_(exp.Subquery(this=earlier), "p"), on=on, join_type="left")
        )
        bound = exp.Sub(this=bound, expression=_col(PRIOR))
    condition: exp.Expr = exp.LTE(this=_col(TAKE), expression=bound)
    if policy.period is not None:
        condition = exp.and_(condition, exp.Not(this=exp.Is(this=_col(policy.period.column), expression=exp.Null())))
    return exp.select(*select).from_(exp.alias_(exp.Subquery(this=inner), "ranked")).where(condition)


def period_of(policy: Policy, table: str | None) -> exp.Expr | None:
    """The first day of a row's period (`Policy.period`), as an expression over the period column (of `table`)."""
    if policy.period is None:
        return None
    column = exp.column(policy.period.column, table, quoted=True) if table else _col(policy.period.column)
    if policy.period.every == "day":
        return column
    return exp.DateTrunc(unit=exp.var(policy.period.every.upper()), this=column)


def digests(key: bytes, batch: pa.RecordBatch, columns: list[str]) -> pa.Array:
    """HMAC-SHA256 of each row's converted values, in hex (text sorts the same on every engine, where binary
    order may not). The hashed text is each value's Arrow text form (the same
    function of the same typed value on every engine) prefixed by its length, a missing value as `-`, joined by
    `|`: an injective encoding of the row, computed vectorised; only the MAC itself is per row."""
    parts = []
    for c in columns:
        text = pc.cast(batch.column(c), pa.string())
        length = pc.cast(pc.utf8_length(text), pa.string())
        parts.append(pc.fill_null(pc.binary_join_element_wise(length, text, ":"), "-"))
    rows = pc.binary_join_element_wise(*parts, "|") if len(parts) > 1 else parts[0]
    mac = hmac.new(key, digestmod=hashlib.sha256)
    out = []
    for row in rows.to_pylist():
        h = mac.copy()
        h.update(row.encode("utf-8", "surrogatepass"))
        out.append(h.hexdigest())
    return pa.array(out, pa.string())


def with_digests(
    key: bytes, batches: Iterable[pa.RecordBatch], schema: pa.Schema, columns: list[str]
) -> pa.RecordBatchReader:
    """The converted values' batches with their digest column appended, streamed (never all rows at once)."""
    out_schema = schema.append(pa.field(DIGEST, pa.string()))

    def gen() -> Iterator[pa.RecordBatch]:
        for b in batches:
            yield pa.RecordBatch.from_arrays([*b.columns, digests(key, b, columns)], schema=out_schema)

    return pa.RecordBatchReader.from_batches(out_schema, gen())


def file_digest(key: bytes, path: Path) -> str:
    """HMAC-SHA256 of a file's bytes under the bounding key: how an append recognises a batch it already added.
    Kept beside the private data for the admin; never shown to a caller, never a version."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            mac.update(chunk)
    return mac.hexdigest()


def public_source(source: str, base: Path) -> Path:
    """A public table's source file: absolute, or relative to `base` (the policy file's directory)."""
    path = Path(source)
    return path if path.is_absolute() else base / path


def public_values(table: PublicTable, source: exp.Expr) -> exp.Select:
    """A public table's rows as its engine table holds them: every declared column converted to its type as a
    dataset's (`converted`, clamped to its bounds, cut to its max_length), with the fixed-point copies of summed
    columns, so a join exposes them exactly as a dataset column."""
    converted_values = exp.select(
        *[exp.alias_(converted(n, c), n, quoted=True) for n, c in table.columns.items()]
    ).from_(source)
    outs = [o for n, c in table.columns.items() for o in outputs(n, c)]
    return exp.select(*outs).from_(exp.alias_(exp.Subquery(this=converted_values), "v"))


def multiplicity_query(engine_table: exp.Table, column: str) -> exp.Select:
    """The largest number of rows one non-NULL value of `column` has in a public table (NULL on an empty table)."""
    per_value = (
        exp.select(exp.alias_(exp.Count(this=exp.Star()), "n", quoted=True))
        .from_(engine_table)
        .where(exp.Not(this=exp.Is(this=_col(column), expression=exp.Null())))
        .group_by(_col(column))
    )
    return exp.select(exp.Max(this=_col("n"))).from_(exp.alias_(exp.Subquery(this=per_value), "m"))


def public_rows_query(engine_table: exp.Table, table: PublicTable) -> exp.Select:
    """A public table's declared columns, in a fixed order (all columns, NULLs last): what readers are shown."""
    columns = list(table.columns)
    return (
        exp.select(*[_col(c) for c in columns])
        .from_(engine_table)
        .order_by(*[exp.Ordered(this=_col(c), nulls_first=False) for c in columns])
    )
