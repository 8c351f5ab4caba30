"""Per-unit aggregation: one level of subquery that aggregates each privacy unit's rows (ZetaSQL's per-user
aggregation, Tumult's grouping by the id), under an outer aggregate query:

    SELECT n, COUNT(*) FROM (SELECT patient_id, COUNT(*) AS n FROM visits GROUP BY patient_id) GROUP BY n

The inner query groups the contribution-bounded rows (at most k per unit) by the privacy-unit column, and may select
the unit and named aggregates: COUNT(*), COUNT(x), and SUM, MIN, MAX or AVG of a bounded column or row expression.
Each derived column gets public bounds from k and the policy alone: a per-unit COUNT(*) is in [1, k], COUNT(x) in
[0, k], a SUM of a value in [lo, hi] in [k·min(lo, 0), k·max(hi, 0)], MIN, MAX and AVG in [lo, hi]. The derived
table has exactly one row per unit, so the outer query is planned as a query over a dataset of those columns with at
most one row per unit (k = 1): it is priced, released and cached like any other, against the derived bounds (an
integer derived column of at most 10,000 values is a key with a public domain). The derived table is computed from
the bounded table by generated trees only (its values clamped to their public bounds, with the fixed-point copies
every summed column has), and the outer statements read it in place of the bounded table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from sqlglot import exp

from gateway.engines import recipe
from gateway.engines.base import bounded
from gateway.sql.parse import dataset_name, drop_qualifiers, refuse_alias_columns
from policies import sensitivity as sens
from policies.errors import QueryRejected
from policies.expressions import check_row_expression, reject
from policies.schema import MAX_FLOAT_BOUND, MAX_INT_BOUND, PRECISION_RANGE, Column, ColumnType, Policy
from policies.sqltypes import SqlType, Typed

if TYPE_CHECKING:
    from gateway.sql.joins import PublicReader
    from gateway.sql.plan import Plan

SUBQUERY = "subquery"  # the reason of every refusal of the subquery's form (as for any other subquery)
UNITS = "__units"  # the alias of the derived table of per-unit values
_AGGREGATES = "COUNT(*), COUNT(x), SUM(x), MIN(x), MAX(x) and AVG(x) of a bounded column or row expression"


@dataclass(frozen=True)
class Derived:
    """One derived column: its name, its aggregate (count_star, count, sum, min, max, avg), the argument's total
    form over the bounded table (None for COUNT(*)), and the public column it is in the derived table."""

    name: str
    kind: str
    tree: exp.Expr | None = field(compare=False)
    column: Column


@dataclass(frozen=True)
class PerUnit:
    """The subquery of a per-unit query: the dataset's own policy, its unit, the derived columns and the inner WHERE
    condition's total form over the bounded table."""

    policy: Policy
    unit: str
    columns: tuple[Derived, ...]
    where: exp.Expr | None = field(compare=False)
    # The table the subquery reads when it is not the bounded table: a join of private tables on the unit
    # (gateway.sql.privatejoins), whose joined policy is then `policy`.
    source: exp.Expr | None = field(default=None, compare=False)

    @property
    def trees(self) -> list[exp.Expr]:
        """The row-level expressions the subquery evaluates on every bounded row."""
        return [t for t in (self.where, *(d.tree for d in self.columns)) if t is not None]

    def derived_policy(self) -> Policy:
        """The derived table as a dataset of its own: the unit and the derived columns, at most one row per unit,
        with the dataset's budget, accounting and key candidates."""
        columns = {self.unit: self.policy.columns[self.unit], **{d.name: d.column for d in self.columns}}
        return self.policy.model_copy(update={"columns": columns, "max_rows_per_unit": 1, "labels": None})

    def table(self) -> exp.Expr:
        """The derived table, one row per unit that has a row matching the inner WHERE: the unit, each derived
        value (clamped to its public bounds; NULL stays NULL) and its fixed-point copies. The condition is an
        aggregate FILTER, so every bounded row is read whatever it matches; a unit none of whose rows match has
        no row (HAVING)."""
        unit = exp.column(self.unit, quoted=True)
        items: list[exp.Expr] = [exp.alias_(unit.copy(), self.unit, quoted=True)]
        for d in self.columns:
            items.append(exp.alias_(_value(d, self.where), d.name, quoted=True))
        read = self.source.copy() if self.source is not None else bounded(self.policy.dataset)
        grouped = exp.select(*items).from_(read).group_by(unit.copy())
        if self.where is not None:
            grouped = grouped.having(
                exp.GT(this=_filtered(exp.Count(this=exp.Star()), self.where), expression=exp.Literal.number(0))
            )
        outputs = [exp.alias_(unit.copy(), self.unit, quoted=True)]
        for d in self.columns:
            outputs += recipe.outputs(d.name, d.column)
        return exp.alias_(
            exp.Subquery(this=exp.select(*outputs).from_(exp.alias_(exp.Subquery(this=grouped), "u"))),
            UNITS,
            quoted=True,
        )


def _filtered(call: exp.Expr, where: exp.Expr | None) -> exp.Expr:
    return call if where is None else exp.Filter(this=call, expression=exp.Where(this=where.copy()))


def _double(value: float) -> exp.Expr:
    return exp.Cast(this=exp.Literal.number(repr(float(value))), to=exp.DataType.build("DOUBLE"))


def _value(d: Derived, where: exp.Expr | None) -> exp.Expr:
    """A derived column's value per unit: the aggregate in DOUBLE (exact for integers within ±2**53), clamped to
    the column's bounds, an integer column's rounded to a BIGINT."""
    arg = exp.Cast(this=d.tree.copy(), to=exp.DataType.build("DOUBLE")) if d.tree is not None else None
    call: exp.Expr
    match d.kind:
        case "count_star":
            call = exp.Count(this=exp.Star())
        case "count":
            call = exp.Count(this=d.tree.copy() if d.tree is not None else None)
        case "sum":
            call = exp.Sum(this=arg)
        case "min":
            call = exp.Min(this=arg)
        case "max":
            call = exp.Max(this=arg)
        case "avg":
            call = exp.Avg(this=arg)
        case _:
            raise AssertionError(d.kind)
    assert d.column.bounds is not None
    lo, hi = (float(b) for b in d.column.bounds)
    x = exp.Cast(this=_filtered(call, where), to=exp.DataType.build("DOUBLE"))
    clamped: exp.Expr = exp.Case(
        ifs=[
            exp.If(this=exp.LT(this=x.copy(), expression=_double(lo)), true=_double(lo)),
            exp.If(this=exp.GT(this=x.copy(), expression=_double(hi)), true=_double(hi)),
        ],
        default=x,
    )
    if d.column.type is ColumnType.INT:
        return exp.TryCast(this=exp.Round(this=clamped), to=exp.DataType.build("BIGINT"))
    return clamped


def source(select: exp.Select) -> exp.Subquery | None:
    """The subquery a SELECT reads FROM, if it reads one (the per-unit form is then the only one accepted)."""
    from_ = select.args.get("from_") or select.args.get("from")
    found = from_.this if from_ is not None else None
    return found if isinstance(found, exp.Subquery) else None


def _refuse(message: str, node: exp.Expr, sql: str, hint: str | None = None) -> QueryRejected:
    return reject(message, SUBQUERY, node, sql, hint=hint)


def _example(unit: str, dataset: str) -> str:
    return f"SELECT n, COUNT(*) FROM (SELECT {unit}, COUNT(*) AS n FROM {dataset} GROUP BY {unit}) GROUP BY n"


def _range(kind: str, typed: Typed | None, k: int) -> tuple[float, float, bool]:
    """The public range of a per-unit aggregate over at most k rows of a value of range `typed`, and whether it is
    an integer."""
    if kind == "count_star":
        return 1.0, float(k), True
    if kind == "count":
        return 0.0, float(k), True
    assert typed is not None and typed.lo is not None and typed.hi is not None
    integer = typed.type is SqlType.INT
    if kind == "sum":
        return k * min(float(typed.lo), 0.0), k * max(float(typed.hi), 0.0), integer
    return float(typed.lo), float(typed.hi), integer and kind != "avg"


def _column(lo: float, hi: float, integer: bool) -> Column:
    """The public column of a derived value in [lo, hi]: an int column when it is an integer within ±2**53 (its
    bounds widened by one when they meet, as a column's bounds must satisfy low < high), else a float column whose
    fixed-point unit is that of a row expression of the same range (`sens.fixed_point_unit`)."""
    if integer and max(abs(lo), abs(hi)) <= MAX_INT_BOUND - 1:
        return Column(type=ColumnType.INT, bounds=(int(lo), int(hi) if hi > lo else int(lo) + 1))
    hi = hi if hi > lo else lo + 1.0
    unit = sens.fixed_point_unit(max(abs(lo), abs(hi)), integral=False)
    return Column(type=ColumnType.FLOAT, bounds=(lo, hi), precision=max(unit, PRECISION_RANGE[0]))


def per_unit(subquery: exp.Subquery, sql: str, policy: Policy) -> PerUnit:
    """Validate the subquery against the dataset's policy (already resolved from its FROM) and derive its columns'
    public bounds. Nothing is read or charged here."""
    from gateway.sql.plan import _Planner, read_spellings  # the planner's own checks of aggregates' arguments

    inner = subquery.this
    assert isinstance(inner, exp.Select)
    unit = policy.unit_column
    if unit is None:
        raise _refuse(
            f"the privacy unit of {policy.dataset!r} is the row: there is no unit to aggregate per",
            subquery,
            sql,
            hint="query the dataset directly: each row is its own unit",
        )
    example = _example(unit, policy.dataset)
    group = inner.args.get("group")
    keys = list(group.expressions) if group is not None else []
    if (
        group is None
        or len(keys) != 1
        or not isinstance(keys[0], exp.Column)
        or keys[0].table
        or keys[0].name.lower() != unit
        or any(group.args.get(a) for a in ("rollup", "cube", "grouping_sets", "all"))
    ):
        raise _refuse(
            f"a subquery must group by the privacy unit {unit!r} alone (one row per unit)",
            subquery,
            sql,
            hint=f"aggregate each unit's rows, then the units: {example}",
        )
    for clause in ("having", "order", "limit", "offset", "distinct", "qualify", "windows", "with_", "with"):
        if inner.args.get(clause):
            raise _refuse(
                f"{clause.rstrip('_').upper()} is not allowed in the per-unit subquery",
                subquery,
                sql,
                hint="filter the units in the outer query's WHERE, over the derived columns",
            )
    read_spellings(inner)
    helper = _Planner(inner, sql, policy)
    k = policy.max_rows_per_unit
    columns: list[Derived] = []
    for item in inner.expressions:
        if isinstance(item, exp.Column) and not item.table and item.name.lower() == unit:
            continue  # the unit itself: the derived table has it, the outer query may only count it
        node = item.this if isinstance(item, exp.Alias) else item
        if not isinstance(node, exp.Count | exp.Sum | exp.Min | exp.Max | exp.Avg):
            raise _refuse(
                "a per-unit subquery selects the unit and named aggregates only",
                item,
                sql,
                hint=f"aggregates per unit: {_AGGREGATES}; e.g. {example}",
            )
        if not isinstance(item, exp.Alias):
            raise _refuse(
                "a per-unit aggregate needs a name for the outer query",
                item,
                sql,
                hint=f"name it: {node.sql(dialect='duckdb')} AS n",
            )
        name = item.alias.lower()
        if not name.isidentifier() or name.startswith("__") or name == unit or any(d.name == name for d in columns):
            raise _refuse(
                f"{item.alias!r} cannot name a per-unit column (a new lower-case identifier other than the unit, "
                "not starting with __)",
                item,
                sql,
            )
        arg = node.this
        while isinstance(arg, exp.Paren):
            arg = arg.this
        what = type(node).__name__.upper()
        kind = what.lower()
        if isinstance(arg, exp.Distinct):
            raise _refuse(
                f"{what}(DISTINCT ...) is not allowed per unit",
                node,
                sql,
                hint=f"aggregates per unit: {_AGGREGATES}",
            )
        tree: exp.Expr | None = None
        typed: Typed | None = None
        if isinstance(node, exp.Count) and isinstance(arg, exp.Star):
            kind = "count_star"
        elif isinstance(node, exp.Count):
            if arg is None:
                raise reject("COUNT takes *, a column or an expression", "aggregate_argument", node, sql)
            if isinstance(arg, exp.Column) and not arg.table and arg.name.lower() == unit:
                # COUNT(unit): the unit's rows whose unit is not NULL (all of them in a group of a unit), [0, k]
                # like COUNT(x); its value is never released, only aggregated over the units.
                tree = exp.column(unit, quoted=True)
            else:
                tree = check_row_expression(arg, policy, sql).tree
        else:
            value = helper._row_value(arg, node, what, summed=True)
            tree, typed = value.tree, value.typed
        lo, hi, integer = _range(kind, typed, k)
        if max(abs(lo), abs(hi)) > MAX_FLOAT_BOUND:
            raise reject(
                f"the per-unit {what} reaches ±{max(abs(lo), abs(hi)):.3g}, beyond the ±{MAX_FLOAT_BOUND:g} Bastion "
                "sums",
                "unbounded_expression",
                node,
                sql,
                hint="scale the expression down (divide it by a literal) and the result back up",
            )
        columns.append(Derived(name, kind, tree, _column(lo, hi, integer)))
    if not columns:
        raise _refuse(
            "the per-unit subquery has no aggregate", subquery, sql, hint=f"name one per unit, e.g. {example}"
        )
    where = inner.args.get("where")
    where_tree = check_row_expression(where.this, policy, sql, condition="WHERE").tree if where is not None else None
    return PerUnit(policy, unit, tuple(columns), where_tree)


def check_outer_unit(select: exp.Select, unit: str, sql: str) -> None:
    """Refuse the outer query's use of the unit column but for counting it (COUNT(unit), COUNT(DISTINCT unit)):
    selecting, grouping or filtering by it would release unit ids."""
    for col in select.find_all(exp.Column):
        if col.table or col.name.lower() != unit:
            continue
        parent = col.parent
        if isinstance(parent, exp.Distinct):
            parent = parent.parent
        if isinstance(parent, exp.Count):
            continue
        raise reject(
            f"the privacy-unit column {unit!r} of the subquery cannot be selected, grouped by or filtered on: it "
            "would release unit ids",
            "privacy_unit_column",
            col,
            sql,
            hint="aggregate the per-unit values over the units, e.g. SELECT n, COUNT(*) ... GROUP BY n",
        )


def plan(select: exp.Select, sql: str, resolve: Callable[[str], Policy], public: PublicReader | None = None) -> Plan:
    """Plan a query over a per-unit subquery: the subquery's form checked against the dataset's policy, then the
    outer query planned over the derived table (its columns' public bounds, at most one row per unit). The plan's
    normalized SQL, the identity of its release in the cache, is the whole query's, inner query included."""
    from gateway.sql import privatejoins
    from gateway.sql.plan import _Planner

    subquery = source(select)
    assert subquery is not None
    inner = subquery.this
    if not isinstance(inner, exp.Select):
        raise _refuse(
            "a subquery must be one SELECT grouped by the privacy unit",
            subquery,
            sql,
            hint="aggregate each unit's rows in one SELECT ... GROUP BY <unit>",
        )
    joined = None
    if privatejoins.applies(inner):  # a private table, or a join of private tables on the unit, as its table
        joined, inner = privatejoins.prepare(inner, sql, resolve, public)
        subquery = subquery.copy()
        subquery.set("this", inner)
    nested = source(inner)
    if nested is not None:
        raise _refuse(
            "one level of subquery is allowed: a per-unit aggregation over the dataset",
            nested,
            sql,
            hint="read the dataset in the subquery: SELECT <unit>, COUNT(*) AS n FROM <dataset> GROUP BY <unit>",
        )
    name = dataset_name(inner, sql)
    outer = select.copy()
    placeholder = exp.Table(this=exp.to_identifier(name))
    if subquery.args.get("alias") is not None:
        alias = subquery.args["alias"].copy()
        alias.set("columns", None)  # a column list is refused below, with the subquery's hint
        placeholder.set("alias", alias)
    (outer.args.get("from_") or outer.args["from"]).set("this", placeholder)
    dataset_name(outer, sql)  # the outer query's own joins and CTEs are refused as in any query
    policy = joined.derived_policy() if joined is not None else resolve(name)
    unit = policy.unit_column or "<unit>"
    refuse_alias_columns(subquery, sql, inside=f"the names the subquery gives its columns: {_example(unit, name)}")
    drop_qualifiers(inner, name)
    found = per_unit(subquery, sql, policy)
    if joined is not None:
        found = replace(found, source=joined.table_tree())
    drop_qualifiers(outer, name)
    check_outer_unit(outer, found.unit, sql)
    planned = _Planner(outer, sql, found.derived_policy()).plan()
    planned.per_unit = found
    planned.join = joined
    if joined is not None:
        planned.warnings.append(joined.note())
    planned.normalized_sql = select.sql(dialect="duckdb", normalize=True)
    return planned
