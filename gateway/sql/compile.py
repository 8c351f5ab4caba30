"""Compile stage: a Plan's measurements as sqlglot trees over the pre-bounded table. Every engine generates its own
dialect from these trees (golden fixtures in tests/fixtures/compiled/ show what each generates); nothing here is
SQL text, and nothing is patched after it is built.

What the trees guarantee, whatever the engine:
- the row condition is an aggregate FILTER, not a WHERE: keys and the condition are computed on every row, so the
  work does not depend on how many rows match;
- sums are of fixed-point integers cast to DECIMAL(38, 0) first, so no engine can overflow or round them (DuckDB
  would widen a BIGINT sum, Spark would not);
- an aggregate's row expression (SUM(age + 1)) is computed once per row, in a derived table over the bounded
  table, and its fixed-point integer is its value clamped to its public range, divided by its unit (a power of
  two) and rounded: whatever floating-point error the engine makes, no row moves a sum by more than the
  sensitivity;
- group keys are cast to one SQL type per key type, so a key read from any engine compares equal to the same key of
  a public domain;
- where keys are selected privately, the groups are padded to the policy's public candidate count inside the
  engine, so that fetching and preparing them takes the same time whatever the number of distinct private keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlglot import exp

from gateway.engines.base import bounded
from gateway.sql.periods import filtered
from gateway.sql.plan import Kind, Measurement, Plan, RowValue
from policies import mechanisms as mech
from policies.schema import ColumnType
from policies.sqltypes import sql_type_name
from policies.typecheck import eager_logic

ROWS = "__n"  # the row count of every group, first measure of the plain statement
PAD = "__pad"  # -1 for a real group, the pad's index for a padded one
CODE = "__code"  # a quantile statement's position code


@dataclass(frozen=True)
class Measure:
    """One aggregate of the plain statement: its call, its alias, whether an empty group gives NULL (read as 0)."""

    call: exp.Expr
    alias: str
    nullable: bool


def _col(name: str) -> exp.Column:
    return exp.column(name, quoted=True)


def _exact_sum(column: str) -> exp.Expr:
    return exp.Sum(this=exp.Cast(this=_col(column), to=exp.DataType.build("DECIMAL(38, 0)")))


def _value(v: RowValue) -> exp.Column:
    """A row expression's column in the derived table of the measurement statement."""
    return _col(f"__{v.name}")


def _clamped(v: RowValue) -> exp.Expr:
    """The expression's value as a DOUBLE within its public range (NULL stays NULL; NaN, above every number on the
    engines, goes to the top)."""
    x = exp.Cast(this=_value(v), to=exp.DataType.build("DOUBLE"))
    return exp.Case(
        ifs=[
            exp.If(this=exp.LT(this=x.copy(), expression=_double(v.lo)), true=_double(v.lo)),
            exp.If(this=exp.GT(this=x.copy(), expression=_double(v.hi)), true=_double(v.hi)),
        ],
        default=x,
    )


def _fixed_point(value: exp.Expr, unit: float) -> exp.Expr:
    """round(value / unit) as a BIGINT; |value| / unit <= 2**31 by the choice of unit, so it always fits."""
    scaled = exp.Div(this=exp.Paren(this=value), expression=_double(unit))
    return exp.TryCast(this=exp.Round(this=scaled), to=exp.DataType.build("BIGINT"))


def _exact_sum_of(value: exp.Expr) -> exp.Expr:
    return exp.Sum(this=exp.Cast(this=value, to=exp.DataType.build("DECIMAL(38, 0)")))


def _expression_call(plan: Plan, m: Measurement) -> tuple[exp.Expr, bool]:
    v = plan.row_values[m.expression]
    match m.kind:
        case Kind.COUNT:
            return exp.Count(this=_value(v)), False
        case Kind.SUM:
            return _exact_sum_of(_fixed_point(_clamped(v), v.unit)), True
        case Kind.SUMSQ:
            square = exp.Mul(this=exp.Paren(this=_clamped(v)), expression=exp.Paren(this=_clamped(v)))
            return _exact_sum_of(_fixed_point(square, v.unit2)), True
    raise AssertionError(m.kind)


def read_table(plan: Plan) -> exp.Expr:
    """The table a plan's statements read: the bounded table, a per-unit query's derived table, or the bounded
    table joined with a public table."""
    if plan.per_unit is not None:
        return plan.per_unit.table()
    if plan.join is not None:
        return plan.join.table_tree()
    if plan.periods is not None:
        # Only the rows of the periods charged are read, whatever the WHERE clause says (gateway.sql.periods).
        return filtered(bounded(plan.dataset), plan.policy, plan.periods)
    return bounded(plan.dataset)


def values_source(plan: Plan) -> exp.Expr:
    """What the measurement statement reads: the plan's table, with each of the plan's row expressions computed
    once per row as a column `__e<i>` when it has any."""
    source = read_table(plan)
    if not plan.row_values:
        return source
    inner = exp.select(
        exp.Star(), *[exp.alias_(v.tree.copy(), f"__{v.name}", quoted=True) for v in plan.row_values.values()]
    ).from_(source)
    return exp.alias_(exp.Subquery(this=inner), "__rows", quoted=True)


def _call(plan: Plan, m: Measurement) -> tuple[exp.Expr, bool]:
    if m.expression:
        return _expression_call(plan, m)
    match m.kind:
        case Kind.COUNT_STAR:
            return exp.Count(this=exp.Star()), False
        case Kind.COUNT:
            return exp.Count(this=_col(m.column)), False
        case Kind.COUNT_DISTINCT:
            return exp.Count(this=exp.Distinct(expressions=[_col(m.column)])), False
        case Kind.COUNT_DISTINCT_UNIT:
            unit = plan.policy.unit_column
            assert unit is not None, "the planner allows COUNT(DISTINCT unit) only with a unit column"
            return exp.Count(this=exp.Distinct(expressions=[_col(unit)])), False
        case Kind.SUM:
            return _exact_sum(f"__fx_{m.column}"), True
        case Kind.SUMSQ:
            return _exact_sum(f"__fx2_{m.column}"), True
    raise AssertionError(m.kind)


def plain_measurements(plan: Plan) -> list[Measurement]:
    return [m for m in plan.measurements if m.kind != Kind.QUANTILE]


def measures(plan: Plan) -> list[Measure]:
    """The row count and each plain (non-quantile) measurement, in order."""
    out = [Measure(exp.Count(this=exp.Star()), ROWS, False)]
    for i, m in enumerate(plain_measurements(plan)):
        call, nullable = _call(plan, m)
        out.append(Measure(call, f"m{i}", nullable))
    return out


def _row_filter(plan: Plan, extra: exp.Expr | None) -> exp.Expr | None:
    """The WHERE condition (and `extra`), combined so that both are evaluated on every row."""
    parts = [t.copy() for t in (plan.where, extra) if t is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else eager_logic(parts, conjunction=True)


def _key(plan: Plan, i: int) -> exp.Expr:
    key = plan.keys[i]
    return exp.Cast(this=key.tree.copy(), to=exp.DataType.build(sql_type_name(key.typed.type)))


def grouped(
    plan: Plan,
    aggregates: list[Measure],
    *,
    extra_where: exp.Expr | None = None,
    extra_group: exp.Expr | None = None,
    empty: bool = False,
    source: exp.Expr | None = None,
) -> exp.Select:
    """The grouped measurement statement. `empty` reads no row at all: the default input of the fallback release
    and the form bound before the charge."""
    keys = [_key(plan, i) for i in range(len(plan.keys))] + ([extra_group] if extra_group is not None else [])
    aliases = [k.alias for k in plan.keys] + ([CODE] if extra_group is not None else [])
    condition = _row_filter(plan, extra_where)
    select: list[exp.Expr] = [exp.alias_(k, a, quoted=True) for k, a in zip(keys, aliases, strict=True)]
    for m in aggregates:
        value: exp.Expr = m.call.copy()
        if condition is not None:
            value = exp.Filter(this=value, expression=exp.Where(this=condition.copy()))
        if m.nullable:
            value = exp.Coalesce(this=value, expressions=[exp.Literal.number(0)])
        select.append(exp.alias_(value, m.alias, quoted=True))
    query = exp.select(*select).from_(source if source is not None else read_table(plan))
    if empty:
        query = query.where(exp.false())
    if keys:
        query = query.group_by(*[k.copy() for k in keys])
    return query


def _series(n: int) -> exp.Select:
    """SELECT i FROM the integers 0..n-1, spelled in plain SQL every engine reads: a cross join of VALUES tables of
    the digits. Its size is public (the policy's candidate count)."""
    digits = max(1, math.ceil(math.log10(max(n, 2))))
    tables = [
        exp.values([exp.Tuple(expressions=[exp.Literal.number(d)]) for d in range(10)], alias=f"d{j}", columns=["i"])
        for j in range(digits)
    ]
    total: exp.Expr = exp.column("i", table=f"d{digits - 1}")
    for j in range(digits - 2, -1, -1):
        total = exp.Add(
            this=exp.Mul(this=exp.Paren(this=total), expression=exp.Literal.number(10)),
            expression=exp.column("i", table=f"d{j}"),
        )
    query = exp.select(exp.alias_(total, "i")).from_(tables[0])
    for t in tables[1:]:
        query = query.join(t, join_type="CROSS")
    return query


def measurement_query(plan: Plan, *, empty: bool = False) -> exp.Query:
    """The statement of the plain measurements; padded to the public candidate count where keys are selected
    privately (a last column `__pad`: -1 for a real group, the pad's index otherwise)."""
    aggregates = measures(plan)
    query = grouped(plan, aggregates, empty=empty, source=values_source(plan))
    if not plan.needs_key_selection:
        return query
    candidates = int(plan.policy.key_candidates)
    real = exp.select(exp.Star(), exp.alias_(exp.Literal.number(-1), PAD, quoted=True)).from_("g")
    missing = exp.Sub(
        this=exp.Literal.number(candidates),
        expression=exp.Subquery(this=exp.select(exp.Count(this=exp.Star())).from_("g")),
    )
    pads = (
        exp.select(
            *[exp.alias_(exp.Null(), k.alias, quoted=True) for k in plan.keys],
            *[exp.alias_(exp.Literal.number(0), m.alias, quoted=True) for m in aggregates],
            exp.alias_(exp.column("i", table="r"), PAD, quoted=True),
        )
        .from_(exp.alias_(exp.Subquery(this=_series(candidates)), "r"))
        .where(exp.LT(this=exp.column("i", table="r"), expression=missing))
    )
    return exp.union(real, pads, distinct=False).with_("g", as_=query)


def empty_result(plan: Plan) -> list[tuple[Any, ...]]:
    """The rows `measurement_query` returns over an empty table, known from the plan alone: one row of zeros
    without keys, none with keys, plus the padding where keys are selected. The fallback release reads these, so
    it needs no engine at all (it must answer when the engine is what failed)."""
    width = len(measures(plan))
    rows: list[tuple[Any, ...]] = [] if plan.keys else [(0,) * width]
    if plan.needs_key_selection:
        nulls = (None,) * len(plan.keys)
        rows += [(*nulls, *(0,) * width, i) for i in range(int(plan.policy.key_candidates))]
    return rows


def quantile_grid(plan: Plan, m: Measurement) -> mech.QuantileGrid:
    col = plan.policy.columns[m.column]
    assert col.bounds is not None, "the planner allows quantiles of bounded columns only"
    lo, hi = (float(b) for b in col.bounds)
    return mech.quantile_grid(lo, hi, integer=col.type is ColumnType.INT)


def quantile_value_grid(plan: Plan, m: Measurement, n_groups: int) -> mech.QuantileGrid:
    """The grid of a value-only quantile released for n_groups groups (public: bounds and group count)."""
    col = plan.policy.columns[m.column]
    assert col.bounds is not None, "the planner allows quantiles of bounded columns only"
    lo, hi = (float(b) for b in col.bounds)
    return mech.quantile_value_grid(lo, hi, col.type is ColumnType.INT, n_groups)


def _double(v: float) -> exp.Expr:
    return exp.Cast(this=exp.Literal.number(repr(float(v))), to=exp.DataType.build("DOUBLE"))


def _position_code(column: str, lo: exp.Expr, step: exp.Expr, top: exp.Expr | None = None) -> exp.Expr:
    """A value's code relative to the positions lo + j·step, with t = (value - lo) / step: CEIL(t) + FLOOR(t) + 1,
    i.e. 2j+1 exactly on position j (t = j) and 2j+2 strictly between positions j and j+1 (monotone in the value).
    With `top` (2·size), every value below position 0 has code 0 and every value above position size - 1 has code
    `top`."""

    def t() -> exp.Expr:
        value = exp.Cast(this=_col(column), to=exp.DataType.build("DOUBLE"))
        return exp.Paren(
            this=exp.Div(this=exp.Paren(this=exp.Sub(this=value, expression=lo.copy())), expression=step.copy())
        )

    code = exp.Add(
        this=exp.Add(this=exp.Ceil(this=t()), expression=exp.Floor(this=t())), expression=exp.Literal.number(1)
    )
    if top is None:
        return code
    last = exp.Paren(
        this=exp.Sub(this=exp.Div(this=top.copy(), expression=exp.Literal.number(2)), expression=exp.Literal.number(1))
    )
    return exp.Case(
        ifs=[
            exp.If(this=exp.LT(this=t(), expression=exp.Literal.number(0)), true=exp.Literal.number(0)),
            exp.If(this=exp.GT(this=t(), expression=last), true=top.copy()),
        ],
        default=code,
    )


def _present(m: Measurement) -> exp.Expr:
    return exp.Not(this=exp.Is(this=_col(m.column), expression=exp.Null()))


def quantile_query(
    plan: Plan, m: Measurement, *, empty: bool = False, grid: mech.QuantileGrid | None = None
) -> exp.Select:
    """Per group, row counts at each of the 2·|P|+1 codes relative to the public grid of positions P (the plan's
    `quantile_grid`, or a given public one): code 2j+1 is exactly on position j, code 2j+2 strictly between
    positions j and j+1 (a NULL value has no code). Only the codes that some row has come back (at most one per
    distinct value)."""
    grid = quantile_grid(plan, m) if grid is None else grid
    code = exp.Cast(
        this=_position_code(m.column, _double(grid.lo), _double(grid.step)), to=exp.DataType.build("BIGINT")
    )
    return grouped(
        plan, [Measure(exp.Count(this=exp.Star()), ROWS, False)], extra_where=_present(m), extra_group=code, empty=empty
    )


FINE = "__fine"  # the second pass's table of released intervals, one row per group
FINE_LO, FINE_STEP, FINE_TOP = "__lo", "__step", "__top"


def _key_literal(value: Any, plan: Plan, i: int) -> exp.Expr:
    """A released group's key value as a literal of the key's SQL type (as `_key` casts the key)."""
    if value is None:
        node: exp.Expr = exp.Null()
    elif isinstance(value, bool):
        node = exp.Boolean(this=value)
    elif isinstance(value, float) and not math.isfinite(value):
        # inf, -inf and NaN have no numeric literal (a bare `inf` binds as a column): their text, cast below
        node = exp.Literal.string("NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity")
    elif isinstance(value, int | float):
        node = exp.Literal.number(repr(value) if isinstance(value, float) else value)
    else:
        node = exp.Literal.string(value.isoformat() if hasattr(value, "isoformat") else str(value))
    return exp.Cast(this=node, to=exp.DataType.build(sql_type_name(plan.keys[i].typed.type)))


def quantile_fine_query(
    plan: Plan, m: Measurement, fine: list[tuple[tuple[Any, ...], mech.QuantileGrid]] | None = None
) -> exp.Select:
    """The second pass of a quantile: per released group, row counts at the codes of that group's own positions
    (`fine`: each group with the grid of its value's selection, a DP output), every row below the first position
    in code 0 and every row above the last in code 2·size, so at most 2·size + 1 rows per group come back.

    Without keys the grid's numbers are literals; with keys each group's (lo, step, 2·size) is a row of a VALUES
    table joined on the keys (IS NOT DISTINCT FROM, so a NULL key is a group too) and the rows of groups not
    released find no match. The condition stays an aggregate FILTER. Without `fine` it is the statement's shape
    (one placeholder group), which binds as the real one does: what the binder sees depends on the query alone."""
    placeholder = mech.QuantileGrid(0.0, 1.0, 1)
    entries = fine if fine is not None else [(tuple(None for _ in plan.keys), placeholder)]
    counted = [Measure(exp.Count(this=exp.Star()), ROWS, False)]
    lo: exp.Expr
    step: exp.Expr
    top: exp.Expr
    if not plan.keys:
        ((_, grid),) = entries
        lo, step, top = _double(grid.lo), _double(grid.step), exp.Literal.number(2 * grid.size)
    else:
        lo, step = exp.column(FINE_LO, table=FINE, quoted=True), exp.column(FINE_STEP, table=FINE, quoted=True)
        top = exp.column(FINE_TOP, table=FINE, quoted=True)
    code = exp.Cast(this=_position_code(m.column, lo, step, top), to=exp.DataType.build("BIGINT"))
    query = grouped(plan, counted, extra_where=_present(m), extra_group=code)
    if not plan.keys:
        return query
    names = [f"__k{i}" for i in range(len(plan.keys))]
    rows = [
        exp.Tuple(
            expressions=[
                *(_key_literal(v, plan, i) for i, v in enumerate(group)),
                _double(grid.lo),
                _double(grid.step),
                exp.Cast(this=exp.Literal.number(2 * grid.size), to=exp.DataType.build("BIGINT")),
            ]
        )
        for group, grid in entries
    ]
    table = exp.values(rows, alias=FINE, columns=[*names, FINE_LO, FINE_STEP, FINE_TOP])
    on = [
        exp.NullSafeEQ(this=_key(plan, i), expression=exp.column(name, table=FINE, quoted=True))
        for i, name in enumerate(names)
    ]
    return query.join(table, on=exp.and_(*on), join_type="INNER")


def statements(plan: Plan, *, empty: bool = False) -> list[exp.Query]:
    """Every statement of the plan's first pass, in order: the plain measurements, then one per quantile. (Each
    quantile's second pass, `quantile_fine_query`, is built once its intervals are released.)"""
    out: list[exp.Query] = [measurement_query(plan, empty=empty)]
    out += [quantile_query(plan, m, empty=empty) for m in plan.measurements if m.kind == Kind.QUANTILE]
    return out


def _linear_like(pattern: str) -> bool:
    """Whether a LIKE pattern is one that an engine without a linear-time matcher still matches in linear time
    (Spark rewrites these to equality, startsWith, endsWith and contains): no `_` or escape, and the form `abc`,
    `abc%`, `%abc`, `abc%def` or `%abc%`."""
    if "_" in pattern or "\\" in pattern:
        return False
    parts = pattern.split("%")
    if len(parts) <= 2:
        return True
    return len(parts) == 3 and parts[0] == "" and parts[2] == "" and parts[1] != ""


def backtracking_pattern(trees: Iterable[exp.Expr]) -> str | None:
    """The first pattern in `trees` (a plan's WHERE and keys, labeling functions' conditions) that a backtracking
    matcher (java.util.regex) would need, described for an error; None if there is none. Such a matcher's running
    time on a crafted pattern depends on the row's text, so engines without a linear-time matcher refuse these
    before the charge."""
    for tree in trees:
        for node in tree.walk():
            if type(node).__name__.startswith("Regexp"):
                return "regular-expression functions"
            if isinstance(node, exp.Like | exp.ILike):
                pattern = node.expression
                text = pattern.this if isinstance(pattern, exp.Literal) and pattern.is_string else None
                if text is None or not _linear_like(str(text)):
                    return f"the LIKE pattern {node.expression.sql()}"
    return None
