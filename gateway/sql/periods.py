"""Which periods of a time-partitioned dataset (`Policy.period`) a query may read, and the filter that makes the
compiled statements read only those.

The analysis is sound, not complete: it looks only at the top-level conjuncts of the WHERE clause that compare the
period column with date literals (=, <, <=, >, >=, BETWEEN, IN, either side). Each such conjunct narrows the set of
days a row may have; anything else (OR, NOT, functions of the column, comparisons with other columns) narrows
nothing, so such a query is charged every period. The periods charged are those holding a day of the narrowed set.
Whatever the analysis finds, `period_filter` is added to the bounded table the statements read, so a row of an
uncharged period is never read, even if the analysis were wrong.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlglot import exp

from policies.schema import Policy


def _date(node: exp.Expr) -> dt.date | None:
    """The date a literal stands for: DATE 'YYYY-MM-DD', CAST('YYYY-MM-DD' AS DATE) or a string 'YYYY-MM-DD'."""
    if isinstance(node, exp.Paren):
        return _date(node.this)
    if isinstance(node, (exp.Cast, exp.TryCast)) and node.to.is_type(exp.DataType.Type.DATE):
        return _date(node.this)
    if isinstance(node, (exp.Date, exp.DateStrToDate, exp.TsOrDsToDate)) and not node.expressions:
        return _date(node.this)
    if isinstance(node, exp.Literal) and node.is_string:
        try:
            return dt.date.fromisoformat(node.this)
        except ValueError:
            return None
    return None


def _is_column(node: exp.Expr, column: str) -> bool:
    while isinstance(node, exp.Paren):
        node = node.this
    return isinstance(node, exp.Column) and node.name == column


def _conjuncts(where: exp.Expr) -> list[exp.Expr]:
    while isinstance(where, exp.Paren):
        where = where.this
    if isinstance(where, exp.And):
        return _conjuncts(where.this) + _conjuncts(where.expression)
    return [where]


_FLIP = {exp.LT: exp.GT, exp.GT: exp.LT, exp.LTE: exp.GTE, exp.GTE: exp.LTE, exp.EQ: exp.EQ}


def _days(node: exp.Expr, column: str) -> tuple[dt.date, dt.date] | list[dt.date] | None:
    """The days a conjunct lets through, as an inclusive range or a set; None when it narrows nothing."""
    one = dt.timedelta(days=1)
    if isinstance(node, exp.Between) and _is_column(node.this, column):
        lo, hi = _date(node.args["low"]), _date(node.args["high"])
        if lo is not None and hi is not None:
            return (lo, hi)
        return None
    if isinstance(node, exp.In) and _is_column(node.this, column) and not node.args.get("query"):
        days = [_date(e) for e in node.expressions]
        if node.expressions and all(d is not None for d in days):
            return [d for d in days if d is not None]
        return None
    kind = type(node)
    if kind not in _FLIP:
        return None
    left, right = node.this, node.expression
    if _is_column(right, column) and not _is_column(left, column):
        left, right, kind = right, left, _FLIP[kind]
    if not _is_column(left, column):
        return None
    day = _date(right)
    if day is None:
        return None
    if kind is exp.EQ:
        return (day, day)
    if kind is exp.LT:
        return (dt.date.min, day - one) if day > dt.date.min else None
    if kind is exp.LTE:
        return (dt.date.min, day)
    if kind is exp.GT:
        return (day + one, dt.date.max) if day < dt.date.max else None
    return (day, dt.date.max)


def periods_read(policy: Policy, where: exp.Expr | None) -> list[str]:
    """The labels of the periods a query with this WHERE clause may read (every period when it cannot tell)."""
    periods = policy.periods()
    assert policy.period is not None
    column = policy.period.column
    keep = [True] * len(periods)
    for conjunct in _conjuncts(where) if where is not None else []:
        days = _days(conjunct, column)
        if days is None:
            continue
        for i, (_, start, end) in enumerate(periods):
            last = end - dt.timedelta(days=1)
            if isinstance(days, tuple):
                hit = days[0] <= last and days[1] >= start
            else:
                hit = any(start <= d <= last for d in days)
            keep[i] = keep[i] and hit
    # Stored values are clamped to the column's bounds, so every stored row lies in one of the periods.
    return [label for (label, _, _), k in zip(periods, keep, strict=True) if k]


def period_filter(policy: Policy, labels: Sequence[str]) -> exp.Expr:
    """A condition on the bounded table's period column that holds exactly on the rows of the periods `labels`
    (contiguous periods as one half-open range of days; no period: FALSE)."""
    assert policy.period is not None
    column = exp.column(policy.period.column, quoted=True)
    wanted = set(labels)
    ranges: list[tuple[dt.date, dt.date]] = []
    for label, start, end in policy.periods():
        if label not in wanted:
            continue
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    if not ranges:
        return exp.false()
    parts: list[exp.Expr] = []
    for start, end in ranges:
        parts.append(
            exp.and_(
                exp.GTE(this=column.copy(), expression=_literal(start)),
                exp.LT(this=column.copy(), expression=_literal(end)),
            )
        )
    return parts[0] if len(parts) == 1 else exp.Paren(this=exp.or_(*parts))


def _literal(day: dt.date) -> exp.Expr:
    return exp.Cast(this=exp.Literal.string(day.isoformat()), to=exp.DataType.build("DATE"))


def filtered(table: exp.Table, policy: Policy, labels: Sequence[str]) -> exp.Expr:
    """`table` restricted to the rows of the periods `labels`, under the table's own name (a FROM clause's tree)."""
    inner = exp.select(exp.Star()).from_(table.copy()).where(period_filter(policy, labels))
    return exp.alias_(exp.Subquery(this=inner), table.name, quoted=True)
