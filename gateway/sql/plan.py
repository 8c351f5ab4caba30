"""SQL planner: parse one analyst query with sqlglot, validate it against the dataset's policy and turn it into a
Plan of primitive DP measurements, the SQL Bastion generates to compute them, and the post-processing over the
noisy results (output expressions, HAVING, ORDER BY, LIMIT).

The analyst's SQL text is never executed; every executed statement is generated from the validated tree.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlglot import exp

from gateway.engines.public import PublicError, public_rows
from gateway.sql.groups import PublicGroups, listed_domains, listed_filter, read_public_groups, refuse_listed_total
from gateway.sql.parse import dataset_name, drop_qualifiers, parse_select, top_span
from gateway.sql.periods import periods_read
from policies import sensitivity as sens
from policies.errors import QueryRejected
from policies.expressions import (
    check_column,
    check_no_volatile,
    check_row_expression,
    func_name,
    reject,
    span,
)
from policies.schema import NUMERIC_TYPES, Column, ColumnType, Policy
from policies.sqltypes import FLOAT, SqlType, Typed, canonical, sql_type_name
from policies.sqltypes import column_type as column_type_of
from policies.typecheck import Checked, Checker

if TYPE_CHECKING:
    from gateway.sql.joins import PublicJoin, PublicReader
    from gateway.sql.perunit import PerUnit
    from gateway.sql.privatejoins import PrivateJoin

# Largest number of groups Bastion enumerates from public domains; larger key spaces go through key selection.
MAX_DECLARED_GROUPS = 100_000
# Largest number of bins of a binned key over a bounded column (FLOOR(col / w) ...) released as public keys.
MAX_BINS = 1_000
# Quantiles one query may release: each is a search of its own over the column's range (a ladder of noisy counts and
# a selection among up to 1,024 value positions), so a query of many would tie a worker up for long.
MAX_QUANTILES = 8
# Quantile searches (quantiles × groups) one query may run, for the same reason: a query over declared groups beyond
# it is refused before the charge; over selected keys, the quantiles go to this many of the groups with the largest
# noisy counts (post-processing of the selection), and the answer says so.
MAX_QUANTILE_SEARCHES = 1_000
# Largest magnitude a summed row expression's range may reach: its square must stay finite in DOUBLE (VARIANCE).
MAX_EXPRESSION_MAGNITUDE = 1e150


class Kind(StrEnum):
    """What an aggregate or a primitive measurement computes."""

    COUNT_STAR = "count_star"
    COUNT = "count"
    COUNT_DISTINCT_UNIT = "count_distinct_unit"
    COUNT_DISTINCT = "count_distinct"  # of a column other than the unit
    SUM = "sum"
    SUMSQ = "sumsq"  # a measurement only: the sum of squares behind VARIANCE and STDDEV
    AVG = "avg"
    VAR = "var"
    VAR_POP = "var_pop"
    STD = "std"
    STD_POP = "std_pop"
    QUANTILE = "quantile"


_QUANTILE_FUNCS = ("Quantile", "PercentileCont", "PercentileDisc", "ApproxQuantile")
# Aggregates other dialects spell differently, read as the sqlglot node Bastion plans (one argument each): VAR, STD
# (MySQL, SmartNoise SQL), VARP/STDEVP/COUNT_BIG (SQL Server), and ZetaSQL's ANON_* (bounds come from the policy).
_SPELLINGS: dict[str, type[exp.AggFunc]] = {
    "var": exp.Variance,
    "varsamp": exp.Variance,
    "std": exp.Stddev,
    "stddevsamp": exp.StddevSamp,
    "stdevsamp": exp.StddevSamp,
    "varp": exp.VariancePop,
    "stdevp": exp.StddevPop,
    "count_big": exp.Count,
    "anon_count": exp.Count,
    "anon_sum": exp.Sum,
    "anon_avg": exp.Avg,
    "anon_var_pop": exp.VariancePop,
    "anon_stddev_pop": exp.StddevPop,
}
SUPPORTED_AGGREGATES = (
    "COUNT, SUM, AVG, VARIANCE (VAR, VAR_SAMP), VAR_POP, STDDEV (STD, STDDEV_SAMP), STDDEV_POP, MEDIAN, "
    "QUANTILE_CONT, PERCENTILE_CONT"
)
_VARIANCE_FUNCS = {
    "Variance": Kind.VAR,
    "VarianceSamp": Kind.VAR,
    "VariancePop": Kind.VAR_POP,
    "Stddev": Kind.STD,
    "StddevSamp": Kind.STD,
    "StddevPop": Kind.STD_POP,
}


@dataclass(frozen=True, order=True)
class Measurement:
    """One primitive noisy measurement per group: a count, a fixed-point sum, or a quantile selection; of a column,
    or of a row expression (`expression`: its normalized SQL, a key of `Plan.row_values`)."""

    kind: Kind  # COUNT_STAR, COUNT, COUNT_DISTINCT_UNIT, COUNT_DISTINCT, SUM, SUMSQ or QUANTILE
    column: str = ""
    q: float = 0.0
    expression: str = ""

    @property
    def label(self) -> str:
        if self.kind == Kind.QUANTILE:
            return f"quantile({self.column}, {self.q:g})"
        argument = self.column or self.expression
        return f"{self.kind}({argument})" if argument else self.kind


@dataclass(frozen=True)
class Aggregate:
    """A user-facing aggregate (COUNT, SUM, AVG, VARIANCE, STDDEV, quantile) computed from measurements, of a
    column or of a row expression (`expression`, as in Measurement)."""

    alias: str  # a0, a1, ... in the released table
    kind: Kind  # any but SUMSQ
    column: str = ""
    q: float = 0.0
    expression: str = ""

    @property
    def measurements(self) -> tuple[Measurement, ...]:
        c, e = self.column, self.expression
        match self.kind:
            case Kind.COUNT_STAR | Kind.COUNT_DISTINCT_UNIT:
                return (Measurement(self.kind),)
            case Kind.COUNT | Kind.COUNT_DISTINCT:
                return (Measurement(self.kind, c, expression=e),)
            case Kind.SUM:
                return (Measurement(Kind.SUM, c, expression=e),)
            case Kind.AVG:
                return (Measurement(Kind.SUM, c, expression=e), Measurement(Kind.COUNT, c, expression=e))
            case Kind.VAR | Kind.VAR_POP | Kind.STD | Kind.STD_POP:
                return (
                    Measurement(Kind.SUMSQ, c, expression=e),
                    Measurement(Kind.SUM, c, expression=e),
                    Measurement(Kind.COUNT, c, expression=e),
                )
            case Kind.QUANTILE:
                return (Measurement(Kind.QUANTILE, c, self.q),)
        raise AssertionError(self.kind)


@dataclass(frozen=True)
class RowValue:
    """A row expression an aggregate takes (anything but a bare column): its normalized SQL (the identity of its
    measurements), its column in the measurement statement (`__<name>`), its total form over the bounded table,
    and its type with the public range propagated from the policy's bounds. A summed expression is always bounded;
    a counted one need not be."""

    sql: str
    name: str  # e0, e1, ...
    tree: exp.Expr = field(compare=False)
    typed: Typed = field(compare=False)

    @property
    def summable(self) -> bool:
        return self.typed.type.numeric and self.typed.bounded

    @property
    def lo(self) -> float:
        assert self.typed.lo is not None, self.sql
        return float(self.typed.lo)

    @property
    def hi(self) -> float:
        assert self.typed.hi is not None, self.sql
        return float(self.typed.hi)

    @property
    def max_abs(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    @property
    def square_max(self) -> float:
        return self.max_abs * self.max_abs

    @property
    def square_min(self) -> float:
        return 0.0 if self.lo <= 0 <= self.hi else min(self.lo * self.lo, self.hi * self.hi)

    @property
    def unit(self) -> float:
        """Fixed-point unit of its sums (`sens.fixed_point_unit`)."""
        return sens.fixed_point_unit(self.max_abs, integral=self.typed.type is SqlType.INT)

    @property
    def unit2(self) -> float:
        """Fixed-point unit of its sums of squares."""
        return sens.fixed_point_unit(self.square_max, integral=self.typed.type is SqlType.INT)


@dataclass(frozen=True)
class GroupKey:
    alias: str  # k0, k1, ...
    tree: exp.Expr  # total expression over the bounded table
    domain: list[Any] | None  # public key values, or None when keys must be selected privately
    typed: Typed = FLOAT  # the key's type and public range


# What output expressions (the SELECT list, HAVING, ORDER BY over released cells) may contain: arithmetic,
# rounding, comparison and CASE on released cells and keys. They run after the release, over DP outputs only.
_OUTPUT_NODES = (
    exp.Column,
    exp.Identifier,
    exp.Literal,
    exp.Boolean,
    exp.Null,
    exp.Paren,
    exp.Neg,
    exp.Add,
    exp.Sub,
    exp.Mul,
    exp.Div,
    exp.IntDiv,
    exp.Mod,
    exp.Pow,
    exp.EQ,
    exp.NEQ,
    exp.GT,
    exp.GTE,
    exp.LT,
    exp.LTE,
    exp.NullSafeEQ,
    exp.NullSafeNEQ,
    exp.And,
    exp.Or,
    exp.Not,
    exp.Is,
    exp.In,
    exp.Between,
    exp.Case,
    exp.If,
    exp.Coalesce,
    exp.Nullif,
    exp.Greatest,
    exp.Least,
    exp.Abs,
    exp.Sign,
    exp.Floor,
    exp.Ceil,
    exp.Round,
    exp.Trunc,
    exp.Sqrt,
    exp.Cbrt,
    exp.Ln,
    exp.Log,
    exp.Exp,
    exp.Cast,
    exp.TryCast,
    exp.DataType,
    exp.DataTypeParam,
    exp.Ordered,
)
OUTPUT_FUNCTIONS = (
    "abs, sign, floor, ceil, round, trunc, sqrt, cbrt, ln, log, exp, power, greatest, least, CASE, IF, "
    "COALESCE, NULLIF, CAST, arithmetic and comparisons"
)


@dataclass
class Plan:
    dataset: str
    policy: Policy
    normalized_sql: str
    keys: list[GroupKey]
    aggregates: list[Aggregate]
    output_names: list[str]
    output_exprs: list[exp.Expr]  # over k*/a* columns, for interval arithmetic
    post: exp.Select  # output expressions, HAVING, ORDER BY and LIMIT over the released table "released"
    measurements: list[Measurement] = field(default_factory=list)
    where: exp.Expr | None = None  # the WHERE condition's total form over the bounded table
    # The row expressions aggregates take, by normalized SQL (SUM(age + 1), COUNT(CASE WHEN ... THEN 1 END), ...).
    row_values: dict[str, RowValue] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # advice on the query's form (public facts only)
    # The statements the plan runs (`gateway.sql.compile.statements`), built once by the release when first needed:
    # the bind check before the charge and the run after it use the same trees (engines only read them).
    compiled: list[exp.Query] | None = field(default=None, repr=False, compare=False)
    # A query over a per-unit subquery (gateway.sql.perunit): `policy` is then the derived table's, and the
    # statements read the derived table in place of the bounded table.
    per_unit: PerUnit | None = field(default=None, repr=False, compare=False)
    # A query joining the dataset with a public table (gateway.sql.joins): `policy` is then the joined table's (k·m
    # rows per unit), and the statements read the joined table in place of the bounded table.
    join: PublicJoin | PrivateJoin | None = field(default=None, repr=False, compare=False)
    # A dataset with periods (`Policy.period`): the periods the query may read and is charged for, sorted; the
    # statements read only their rows (gateway.sql.periods). None: a dataset without periods.
    periods: tuple[str, ...] | None = field(default=None, compare=False)

    @property
    def dataset_policy(self) -> Policy:
        """The policy of the dataset the query reads (`policy` but for a per-unit or joined query)."""
        if self.join is not None:  # a join's (also under a per-unit subquery): the dataset's own policy
            return self.join.policy
        return self.per_unit.policy if self.per_unit is not None else self.policy

    @property
    def row_trees(self) -> list[exp.Expr]:
        """The row-level expressions the plan evaluates on every bounded row: the WHERE condition, the keys and the
        aggregates' row expressions (and a per-unit subquery's)."""
        trees = [self.where, *(k.tree for k in self.keys), *(v.tree for v in self.row_values.values())]
        if self.per_unit is not None:
            trees += self.per_unit.trees
        return [t for t in trees if t is not None]

    @property
    def needs_key_selection(self) -> bool:
        return any(k.domain is None for k in self.keys)

    def declared_groups(self) -> list[tuple[Any, ...]] | None:
        domains: list[list[Any]] = []
        for k in self.keys:
            if k.domain is None:  # needs_key_selection
                return None
            domains.append(k.domain)
        return list(itertools.product(*domains))


class _Planner:
    def __init__(self, select: exp.Select, sql: str, policy: Policy, listed: PublicGroups | None = None) -> None:
        self.select = select
        self.sql = sql
        self.policy = policy
        self.listed = listed  # public group lists the query wrote (gateway/sql/groups.py)
        self.listed_domains: dict[int, list[Any]] = {}  # by key position
        self.aggregates: dict[tuple[Kind, str, float, str], Aggregate] = {}
        self.row_values: dict[str, RowValue] = {}
        self.keys: list[tuple[exp.Expr, GroupKey]] = []
        self.warnings: list[str] = []

    # --- aggregates ---------------------------------------------------------------------------------------

    def _numeric_column(self, node: exp.Expr, agg: exp.Expr, what: str) -> str:
        if not isinstance(node, exp.Column):
            raise reject(
                f"the argument of {what} must be a column",
                "aggregate_argument",
                agg,
                self.sql,
                hint="filter rows with WHERE, and apply arithmetic to the aggregate's result instead",
            )
        name = check_column(node, self.policy, self.sql, labeling=False)
        spec = self.policy.columns[name]
        if spec.type not in NUMERIC_TYPES:
            raise reject(
                f"{what} needs a numeric column; {name!r} is {spec.type.value}", "aggregate_argument", agg, self.sql
            )
        if spec.bounds is None:
            raise reject(
                f"{what} needs bounds for {name!r}, and the policy declares none",
                "unbounded_column",
                agg,
                self.sql,
                hint="ask the dataset's admin to declare bounds: [low, high]",
            )
        return name

    def _summand(self, node: exp.Expr, agg: exp.Expr, what: str) -> tuple[str, str]:
        """The argument of SUM, AVG, VARIANCE or STDDEV: a bounded numeric column (column, "") or a bounded numeric
        row expression ("", its normalized SQL)."""
        inner = node
        while isinstance(inner, exp.Paren):
            inner = inner.this
        if isinstance(inner, exp.Column):
            return self._numeric_column(inner, agg, what), ""
        return "", self._row_value(inner, agg, what, summed=True).sql

    def _row_value(self, node: exp.Expr, agg: exp.Expr, what: str, *, summed: bool) -> RowValue:
        """Type-check an aggregate's row expression and register it. A summed one must be numeric with a range the
        policy's bounds give it (propagated through the expression); refused otherwise, naming the sub-expression
        whose range is unknown. Nothing is read or charged here."""
        checked = check_row_expression(node, self.policy, self.sql)
        typed = checked.typed
        if summed:
            if not typed.type.numeric:
                raise reject(
                    f"{what} needs a numeric expression; this one is {typed.type.value}",
                    "aggregate_argument",
                    agg,
                    self.sql,
                    hint="sum a number, e.g. SUM(CASE WHEN sex = 'F' THEN 1 ELSE 0 END); count rows with "
                    "COUNT(CASE WHEN ... THEN 1 END)",
                )
            if not typed.bounded:
                raise self._unbounded(checked.ranges, node, agg, what)
            magnitude = max(abs(typed.lo), abs(typed.hi))  # type: ignore[arg-type]
            if magnitude > MAX_EXPRESSION_MAGNITUDE:
                raise reject(
                    f"{what}: the range of {node.sql(dialect='duckdb')} reaches ±{magnitude:.3g}, beyond the "
                    f"±{MAX_EXPRESSION_MAGNITUDE:g} Bastion sums",
                    "unbounded_expression",
                    node,
                    self.sql,
                    hint="scale the expression down (divide it by a literal) and the result back up",
                )
        key = node.sql(dialect="duckdb", normalize=True)
        if key not in self.row_values:
            self.row_values[key] = RowValue(key, f"e{len(self.row_values)}", checked.tree, typed)
        return self.row_values[key]

    def _unbounded(
        self, ranges: tuple[tuple[exp.Expr, Typed], ...], node: exp.Expr, agg: exp.Expr, what: str
    ) -> QueryRejected:
        """The refusal of a summed expression without a public range: it names the first (in the text) innermost
        numeric sub-expression whose range is unknown."""
        unknown = {id(n) for n, t in ranges if t.type.numeric and not t.bounded}
        innermost = [
            n for n, t in ranges if id(n) in unknown and not any(id(d) in unknown for d in n.walk() if d is not n)
        ]
        culprit = min(innermost, key=lambda n: span(n, self.sql)[0] or 0) if innermost else node
        text = culprit.sql(dialect="duckdb")
        if isinstance(culprit, exp.Column):
            return reject(
                f"{what} needs bounds for {culprit.name.lower()!r}, and the policy declares none",
                "unbounded_column",
                culprit,
                self.sql,
                hint="ask the dataset's admin to declare bounds: [low, high]",
            )
        if isinstance(culprit, exp.Div):
            reason = "its divisor's range includes 0 (values near 0 make the quotient unbounded)"
        elif isinstance(culprit, exp.Ln | exp.Log):
            reason = "its argument's range reaches 0 or below"
        elif isinstance(culprit, exp.Sqrt):
            reason = "its argument's range reaches below 0"
        elif isinstance(culprit, exp.Exp):
            reason = "its argument's range reaches above 700"
        elif isinstance(culprit, exp.Pow):
            reason = "only POWER(x, p) of a literal integer 0 <= p <= 8 is bounded"
        else:
            reason = "the policy's bounds give it no range"
        return reject(
            f"{what} needs a bounded expression: {text} is unbounded, as {reason}",
            "unbounded_expression",
            culprit,
            self.sql,
            hint="use + - * /, CASE, COALESCE, ABS, LEAST/GREATEST, ROUND, FLOOR, CEIL, CAST, SQRT or POWER by a "
            "small integer over bounded columns and literals; divide by a literal or by a range without 0 "
            "(e.g. GREATEST(x, 1)); or clamp with LEAST(GREATEST(x, low), high)",
        )

    def _quantile_q(self, node: exp.Expr | None, agg: exp.Expr) -> float:
        if not isinstance(node, exp.Literal) or node.is_string:
            raise reject("the quantile must be a number literal between 0 and 1", "aggregate_argument", agg, self.sql)
        q = float(node.this)
        if not 0.001 <= q <= 0.999:
            raise reject(
                "the quantile must be between 0.001 and 0.999",
                "aggregate_argument",
                agg,
                self.sql,
                hint="use e.g. QUANTILE_CONT(col, 0.99) instead of MAX",
            )
        return round(q, 3)

    def aggregate(self, node: exp.AggFunc) -> Aggregate:
        name = type(node).__name__
        if any(isinstance(n, exp.AggFunc) for n in node.walk() if n is not node):
            raise reject("nested aggregates are not allowed", "nested_aggregate", node, self.sql)
        if name in {"Min", "Max", "ArgMin", "ArgMax"}:
            raise reject(
                f"{name.upper()}() would reveal an individual value",
                "min_max",
                node,
                self.sql,
                hint="use a quantile instead, e.g. QUANTILE_CONT(col, 0.01) or QUANTILE_CONT(col, 0.99)",
            )
        arg = node.this
        while isinstance(arg, exp.Paren):  # COUNT((age)) is COUNT(age)
            arg = arg.this
        if name == "Count":
            if isinstance(arg, exp.Star):
                kind, col = Kind.COUNT_STAR, ""
            elif isinstance(arg, exp.Distinct):
                cols = arg.expressions
                unit = self.policy.unit_column
                if len(cols) == 1 and isinstance(cols[0], exp.Column) and unit and cols[0].name.lower() == unit:
                    if cols[0].table and cols[0].table.lower() != self.policy.dataset:
                        raise reject(f"unknown table qualifier {cols[0].table!r}", "unknown_table", cols[0], self.sql)
                    kind, col = Kind.COUNT_DISTINCT_UNIT, ""
                elif len(cols) == 1 and isinstance(cols[0], exp.Column):
                    # The distinct values of another column: one unit's k rows add or remove at most k of them
                    # (in all groups together), so it is priced as a count.
                    kind, col = Kind.COUNT_DISTINCT, check_column(cols[0], self.policy, self.sql, labeling=False)
                else:
                    raise reject(
                        "COUNT(DISTINCT ...) takes one column",
                        "count_distinct",
                        node,
                        self.sql,
                        hint="count the distinct values of one column, e.g. COUNT(DISTINCT col)",
                    )
            elif isinstance(arg, exp.Column) and not arg.table and arg.name.lower() == self.policy.unit_column:
                # COUNT(unit): the rows whose unit is present, a count like any other (one unit moves it by k).
                kind, col = Kind.COUNT, arg.name.lower()
            elif isinstance(arg, exp.Column):
                kind, col = Kind.COUNT, check_column(arg, self.policy, self.sql, labeling=False)
            elif arg is None:
                raise reject("COUNT takes *, a column or an expression", "aggregate_argument", node, self.sql)
            else:
                # The rows where a row expression is not NULL (COUNT(CASE WHEN ... THEN 1 END)): a count.
                value = self._row_value(arg, node, "COUNT", summed=False)
                return self._register(Kind.COUNT, "", expression=value.sql)
            return self._register(kind, col)
        if name in {"Sum", "Avg"}:
            if isinstance(arg, exp.Distinct):
                raise reject(f"{name.upper()}(DISTINCT ...) is not allowed", "aggregate_argument", node, self.sql)
            col, expression = self._summand(arg, node, name.upper())
            return self._register(Kind(name.lower()), col, expression=expression)
        if name in _VARIANCE_FUNCS:
            col, expression = self._summand(arg, node, name.upper())
            return self._register(_VARIANCE_FUNCS[name], col, expression=expression)
        if name == "Median":
            return self._register(Kind.QUANTILE, self._numeric_column(arg, node, "MEDIAN"), 0.5, node)
        if name in _QUANTILE_FUNCS:
            q_node = node.args.get("quantile") or node.args.get("expression")
            return self._register(
                Kind.QUANTILE, self._numeric_column(arg, node, "a quantile"), self._quantile_q(q_node, node), node
            )
        raise reject(
            f"aggregate {func_name(node).upper()}() is not supported",
            "unsupported_aggregate",
            node,
            self.sql,
            hint=f"supported: {SUPPORTED_AGGREGATES}",
        )

    def _within_group(self, node: exp.WithinGroup) -> Aggregate:
        inner = node.this
        order = node.expression
        if type(inner).__name__ not in {"PercentileCont", "PercentileDisc"} or not isinstance(order, exp.Order):
            raise reject("unsupported WITHIN GROUP aggregate", "unsupported_aggregate", node, self.sql)
        col = self._numeric_column(order.expressions[0].this, node, "PERCENTILE_CONT")
        return self._register(Kind.QUANTILE, col, self._quantile_q(inner.this, node), node)

    def _register(
        self, kind: Kind, column: str, q: float = 0.0, node: exp.Expr | None = None, *, expression: str = ""
    ) -> Aggregate:
        key = (kind, column, q, expression)
        if kind == Kind.QUANTILE and key not in self.aggregates:
            if sum(a.kind == Kind.QUANTILE for a in self.aggregates.values()) >= MAX_QUANTILES:
                raise reject(
                    f"at most {MAX_QUANTILES} distinct quantiles (MEDIAN, PERCENTILE_CONT, ...) per query",
                    "too_many_quantiles",
                    node,
                    self.sql,
                    hint="split the quantiles over several queries",
                )
        if key not in self.aggregates:
            self.aggregates[key] = Aggregate(f"a{len(self.aggregates)}", kind, column, q, expression)
        return self.aggregates[key]

    # --- group keys ---------------------------------------------------------------------------------------

    def group_keys(self) -> None:
        group = self.select.args.get("group")
        if not group:
            return
        if group.args.get("rollup") or group.args.get("cube") or group.args.get("grouping_sets"):
            raise reject(
                "ROLLUP, CUBE and GROUPING SETS are not supported",
                "unsupported_grouping",
                group,
                self.sql,
                hint="run one GROUP BY per grouping",
            )
        items = {}
        for i, item in enumerate(self.select.expressions):
            if isinstance(item, exp.Alias):
                items[item.alias.lower()] = item.this
            items[str(i + 1)] = item.this if isinstance(item, exp.Alias) else item
        nodes = list(group.expressions)
        if group.args.get("all"):
            nodes = [
                item.this if isinstance(item, exp.Alias) else item
                for item in self.select.expressions
                if not any(isinstance(n, exp.AggFunc) for n in item.walk())
            ]
        for node in nodes:
            if isinstance(node, exp.Rollup | exp.Cube | exp.GroupingSets):
                raise reject("ROLLUP, CUBE and GROUPING SETS are not supported", "unsupported_grouping", node, self.sql)
            target = node
            if isinstance(node, exp.Literal) and not node.is_string and str(node.this) in items:
                target = items[str(node.this)]
            elif (
                isinstance(node, exp.Column)
                and not node.table
                and node.name.lower() in items
                and node.name.lower() not in self.policy.columns
            ):
                target = items[node.name.lower()]
            if any(isinstance(n, exp.AggFunc) for n in target.walk()):
                raise reject("GROUP BY cannot use an aggregate", "aggregate_in_group_by", node, self.sql)
            checked = check_row_expression(target, self.policy, self.sql)
            if not checked.columns:
                raise reject("GROUP BY needs an expression of a column", "constant_group_key", node, self.sql)
            if checked.typed.type is SqlType.NULL:
                raise reject("GROUP BY needs an expression of a column", "constant_group_key", node, self.sql)
            alias = f"k{len(self.keys)}"
            self.keys.append((target, GroupKey(alias, checked.tree, None, checked.typed)))

    def key_domains(self) -> None:
        """Fill in the public domain of each key that has one (evaluated on public values only)."""
        listed = self.listed_domains = listed_domains(self.listed, [(e, k.typed.type) for e, k in self.keys], self.sql)
        domains: list[list[Any] | None] = []
        for i, (expr, key) in enumerate(self.keys):
            domains.append(listed[i] if i in listed else public_key_domain(expr, self.policy, key.tree, key.typed))
        total = 1
        for d in domains:
            total *= len(d) if d is not None else MAX_DECLARED_GROUPS + 1
        declared = total <= MAX_DECLARED_GROUPS
        if not declared and all(d is not None for d in domains):
            refuse_listed_total(self.listed, total, MAX_DECLARED_GROUPS, self.sql)  # listed keys are never selected
        self.keys = [
            (expr, GroupKey(key.alias, key.tree, d if declared else None, key.typed))
            for (expr, key), d in zip(self.keys, domains, strict=True)
        ]
        for expr, key in self.keys:
            if key.domain is None:
                warning = continuous_key_warning(expr, self.policy)
                if warning is not None:
                    self.warnings.append(warning)

    def match_key(self, node: exp.Expr) -> GroupKey | None:
        for expr, key in self.keys:
            if node == expr:
                return key
        return None

    # --- outputs ------------------------------------------------------------------------------------------

    def rewrite(self, node: exp.Expr, aliases: dict[str, exp.Expr] | None = None) -> exp.Expr:
        """Replace aggregates by a* columns and group-key expressions by k* columns; reject stray columns.

        In HAVING and ORDER BY, `aliases` maps output names to their rewritten expressions.
        """
        aliases = aliases or {}

        def placed(new: exp.Expr, old: exp.Expr) -> exp.Expr:
            """`new` standing where `old` was in the text, so that a type error in it points there."""
            start, end = span(old, self.sql)
            if start is not None and end is not None:
                new.meta.update(start=start, end=end - 1)
            return new

        def transform(n: exp.Expr) -> exp.Expr:
            if isinstance(n, exp.Column) and not n.table and n.name.lower() in aliases:
                # An output name wins over a column of the same name in HAVING and ORDER BY, as in the major
                # dialects (GROUP BY reads the column).
                return placed(aliases[n.name.lower()].copy(), n)
            key = self.match_key(n) if not isinstance(n, exp.AggFunc) else None
            if key is not None:
                return placed(exp.column(key.alias, quoted=True), n)
            if isinstance(n, exp.WithinGroup):
                return placed(exp.column(self._within_group(n).alias, quoted=True), n)
            if isinstance(n, exp.AggFunc):
                return placed(exp.column(self.aggregate(n).alias, quoted=True), n)
            if isinstance(n, exp.Anonymous):
                name = func_name(n).upper()
                aggregate = any(isinstance(c, exp.Column | exp.Star) for c in n.expressions)
                raise reject(
                    f"{name}() is neither a supported aggregate nor a function of released values",
                    "unsupported_aggregate" if aggregate else "unsupported_function",
                    n,
                    self.sql,
                    hint=f"aggregates: {SUPPORTED_AGGREGATES}; on released values: {OUTPUT_FUNCTIONS}",
                )
            if isinstance(n, exp.Filter):
                raise reject(
                    "aggregate FILTER clauses are not allowed", "aggregate_filter", n, self.sql, hint="use WHERE"
                )
            if isinstance(n, exp.Window):
                raise reject("window functions are not allowed", "window_function", n, self.sql)
            if isinstance(n, exp.Subquery | exp.Select | exp.Exists):
                raise reject("subqueries are not allowed", "subquery", n, self.sql)
            if isinstance(n, exp.Column):
                name = n.name.lower()
                outputs = {i.alias.lower() for i in self.select.expressions if isinstance(i, exp.Alias)}
                if not n.table and name in outputs and not self.policy.names_column(name):
                    raise reject(
                        f"the output name {name!r} is used before the item that defines it",
                        "unknown_column",
                        n,
                        self.sql,
                        hint="an output name can be used by the SELECT items after it, HAVING and ORDER BY; "
                        "move this item after it, or repeat its expression",
                    )
                check_column(n, self.policy, self.sql, labeling=False)
                raise reject(
                    f"column {name!r} must be aggregated or be a GROUP BY key",
                    "non_aggregated_column",
                    n,
                    self.sql,
                    hint=f"add GROUP BY {name}, or aggregate it (COUNT, SUM, AVG, ...)",
                )
            return n

        check_no_volatile(node, self.sql)
        for n in node.walk():
            if isinstance(n, exp.Star) and not isinstance(n.parent, exp.Count):
                raise reject(
                    "SELECT * would return raw rows",
                    "raw_rows",
                    n,
                    self.sql,
                    hint="select aggregates such as COUNT(*) or AVG(col), grouped by public keys",
                )
        return _transform_top_down(node.copy(), transform)

    def output(self, node: exp.Expr, *, condition: bool = False, extra: dict[str, Typed] | None = None) -> Checked:
        """Type-check an output expression over released cells (k*, a*, o*) and compile its total form."""
        for n in node.walk():
            if not isinstance(n, _OUTPUT_NODES):
                raise reject(
                    f"{func_name(n).upper()} is not allowed in an output expression",
                    "unsupported_function",
                    n,
                    self.sql,
                    hint=f"on released cells Bastion computes {OUTPUT_FUNCTIONS}",
                )
        keys = {k.alias: k.typed for _, k in self.keys}
        known = {**keys, **(extra or {})}

        def resolve(col: exp.Column) -> tuple[Typed, exp.Expr]:
            name = col.name
            if name in known:
                return known[name], exp.column(name, quoted=True)
            if name.startswith("a") and name[1:].isdigit():
                return FLOAT, exp.column(name, quoted=True)
            raise reject(f"unknown column {name!r}", "unknown_column", col, self.sql)

        checker = Checker(self.sql, resolve, functions=OUTPUT_FUNCTIONS)
        return checker.condition(node, "HAVING") if condition else checker.check(node)

    def unknown_columns(self) -> None:
        """Refuse an unknown column at its first use in the text (the stages below meet GROUP BY before SELECT); a
        hidden column is an unknown one."""
        aliases = {item.alias.lower() for item in self.select.expressions if isinstance(item, exp.Alias)}
        unknown = [
            c
            for c in self.select.find_all(exp.Column)
            if isinstance(c.this, exp.Identifier)
            and not self.policy.names_column(c.name.lower())
            and (c.table or c.name.lower() not in aliases)
        ]
        if unknown:
            first = min(unknown, key=lambda c: span(c, self.sql)[0] or 0)
            check_column(first, self.policy, self.sql, labeling=False)

    def quantile_searches(self, measurements: list[Measurement]) -> None:
        """Refuse quantiles over more declared groups than `MAX_QUANTILE_SEARCHES` allows (a public fact)."""
        quantiles = sum(m.kind == Kind.QUANTILE for m in measurements)
        if not quantiles or any(k.domain is None for _, k in self.keys):
            return
        groups = math.prod(len(k.domain or ()) for _, k in self.keys)
        if quantiles * groups > MAX_QUANTILE_SEARCHES:
            raise reject(
                f"{quantiles} quantile(s) over {groups:,} groups is {quantiles * groups:,} quantile searches; at most "
                f"{MAX_QUANTILE_SEARCHES:,} per query",
                "too_many_quantile_groups",
                self.select.args.get("group"),
                self.sql,
                hint="group by coarser keys, restrict the keys with WHERE, or ask fewer quantiles per query",
            )

    def plan(self) -> Plan:
        select = self.select
        read_spellings(select)
        self.unknown_columns()
        if select.args.get("distinct"):
            aggregated = any(isinstance(n, exp.AggFunc) for e in select.expressions for n in e.walk())
            if aggregated or select.args.get("group") or select.args["distinct"].args.get("on"):
                raise reject(
                    "SELECT DISTINCT over aggregates or groups is not supported",
                    "distinct_select",
                    select.args["distinct"],
                    self.sql,
                    hint="drop DISTINCT: the groups of a GROUP BY are distinct already",
                )
            # SELECT DISTINCT a, b is the keys of GROUP BY a, b: released like any group keys (below).
            self.select = select = select.copy()
            select.set("distinct", None)
            ordinals = [exp.Literal.number(i + 1) for i in range(len(select.expressions))]
            select.set("group", exp.Group(expressions=ordinals))
        windows = select.args.get("windows")
        window_node = select.args.get("qualify") or (windows[0] if windows else None)
        if window_node is not None:
            raise reject(
                "window functions are not allowed",
                "window_function",
                window_node,
                self.sql,
            )
        for forbidden in ("into", "locks", "connect", "prewhere", "match", "pivots"):
            if select.args.get(forbidden):
                raise reject(f"{forbidden.upper()} is not allowed", "unsupported_clause", select, self.sql)
        where = select.args.get("where")
        where_tree = None
        if where is not None:
            where_tree = check_row_expression(where.this, self.policy, self.sql, condition="WHERE").tree
        self.group_keys()
        names: list[str] = []
        outputs: list[exp.Expr] = []
        earlier: dict[str, exp.Expr] = {}  # output names of earlier items, usable later in the list (DuckDB's)
        for item in select.expressions:
            inner = item.this if isinstance(item, exp.Alias) else item
            names.append(item.alias if isinstance(item, exp.Alias) else _default_name(inner))
            outputs.append(self.rewrite(inner, earlier))
            if isinstance(item, exp.Alias) and names[-1].lower() not in self.policy.columns:
                earlier[names[-1].lower()] = outputs[-1]  # a column of the same name keeps its meaning
        having = select.args.get("having")
        aliases = {n.lower(): o for n, o in zip(names, outputs, strict=True)}
        having_expr = self.rewrite(having.this, aliases) if having is not None else None
        order = select.args.get("order")
        order_exprs: list[exp.Ordered] = []
        if order is not None:
            by_alias = {n.lower(): i for i, n in enumerate(names)}
            for o in order.expressions:
                target = o.this
                new: exp.Expr
                if isinstance(target, exp.Column) and not target.table and target.name.lower() in by_alias:
                    new = exp.column(f"o{by_alias[target.name.lower()]}", quoted=True)
                elif isinstance(target, exp.Literal) and not target.is_string:
                    new = exp.column(f"o{int(target.this) - 1}", quoted=True)
                else:
                    new = self.rewrite(target, aliases)
                order_exprs.append(
                    exp.Ordered(this=new, desc=o.args.get("desc"), nulls_first=o.args.get("nulls_first"))
                )
        if not self.aggregates and not self.keys:
            raise reject(
                "the query has no aggregate",
                "raw_rows",
                select.expressions[0],
                self.sql,
                hint="select aggregates such as COUNT(*) or AVG(col)",
            )
        bounds: dict[str, int] = {}
        for clause in ("limit", "offset"):
            node = select.args.get(clause)
            if node is not None:
                value = node.expression if isinstance(node, exp.Limit | exp.Offset) else node
                if not (isinstance(value, exp.Literal) and not value.is_string and str(value.this).isdigit()):
                    raise reject(
                        f"{clause.upper()} must be a non-negative integer literal", "bad_limit", node, self.sql
                    )
                bounds[clause] = int(value.this)
        self.key_domains()
        where_tree = listed_filter(where_tree, [(self.keys[i][1], d) for i, d in self.listed_domains.items()])
        compiled = [self.output(o) for o in outputs]
        post = exp.select(
            *[exp.alias_(c.tree, f"o{i}", quoted=True) for i, c in enumerate(compiled)],
            exp.column("__row", quoted=True),
        ).from_("released")
        if having_expr is not None:
            post = post.where(self.output(having_expr, condition=True).tree)
        if order_exprs:
            typed = {f"o{i}": c.typed for i, c in enumerate(compiled)}
            post = post.order_by(
                *[
                    exp.Ordered(
                        this=self.output(o.this, extra=typed).tree,
                        desc=o.args.get("desc"),
                        nulls_first=o.args.get("nulls_first"),
                    )
                    for o in order_exprs
                ]
            )
        if "limit" in bounds:
            post = post.limit(bounds["limit"])
            if not order_exprs and top_span(select) is not None:
                self.warnings.append(
                    f"TOP {bounds['limit']} without ORDER BY keeps {bounds['limit']} groups in no particular order: "
                    "add ORDER BY (e.g. ORDER BY COUNT(*) DESC) to choose which"
                )
        if "offset" in bounds:
            post = post.offset(bounds["offset"])
        aggregates = list(self.aggregates.values())
        measurements = sorted({m for a in aggregates for m in a.measurements})
        self.quantile_searches(measurements)
        return Plan(
            dataset=self.policy.dataset,
            policy=self.policy,
            normalized_sql=self.listed.normalized_sql if self.listed else select.sql(dialect="duckdb", normalize=True),
            where=where_tree,
            keys=[k for _, k in self.keys],
            aggregates=aggregates,
            output_names=names,
            output_exprs=outputs,
            post=post,
            measurements=measurements,
            warnings=self.warnings,
            row_values=self.row_values,
        )


def read_spellings(select: exp.Select) -> None:
    """Replace aggregates spelled as in other dialects (`_SPELLINGS`) by the node Bastion plans, in place."""
    for node in list(select.find_all(exp.Anonymous)):
        name, args = func_name(node), node.expressions
        new: exp.Expr
        if name in ("anon_percentile_cont", "percentile_cont") and len(args) == 2:
            new = exp.Quantile(this=args[0], quantile=args[1])  # ZetaSQL's ANON_PERCENTILE_CONT(col, q)
        elif name in _SPELLINGS and len(args) == 1:
            new = _SPELLINGS[name](this=args[0])
        else:
            continue
        new.meta.update(node.meta)
        node.replace(new)


def _transform_top_down(node: exp.Expr, fn: Callable[[exp.Expr], exp.Expr]) -> exp.Expr:
    new = fn(node)
    if new is not node:
        return new
    for key, value in list(node.args.items()):
        if isinstance(value, exp.Expr):
            node.set(key, _transform_top_down(value, fn))
        elif isinstance(value, list):
            node.set(key, [_transform_top_down(v, fn) if isinstance(v, exp.Expr) else v for v in value])
    return node


def _default_name(node: exp.Expr) -> str:
    if isinstance(node, exp.Column):
        return node.name
    return node.sql(dialect="duckdb")


def _literal(value: Any, spec: Column) -> exp.Expr:
    """A public domain value as a typed literal tree."""
    if isinstance(value, bool):
        node: exp.Expr = exp.Boolean(this=value)
    elif isinstance(value, int | float):
        node = exp.Literal.number(repr(value) if isinstance(value, float) else value)
    else:
        node = exp.Literal.string(value.isoformat() if hasattr(value, "isoformat") else str(value))
    return exp.Cast(this=node, to=exp.DataType.build(sql_type_name(column_type_of(spec).type)))


@dataclass(frozen=True)
class Binning:
    """A key of the form FLOOR(col / width) [* scale] [+ offset] (literals), over one column."""

    column: str
    width: float


def _number(node: exp.Expr) -> float | None:
    """The value of a numeric literal (or its negation), else None."""
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Neg):
        inner = _number(node.this)
        return None if inner is None else -inner
    if isinstance(node, exp.Literal) and not node.is_string:
        try:
            value = float(node.this)
        except ValueError:
            return None
        return value if math.isfinite(value) else None
    return None


def binning(expr: exp.Expr) -> Binning | None:
    """The binning a key expression is, if it is FLOOR(col / w), optionally times a literal and plus or minus a
    literal (in either operand order), with w > 0."""
    node = expr
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Add | exp.Sub):
        left, right = node.this, node.expression
        if _number(right) is not None:
            node = left
        elif isinstance(node, exp.Add) and _number(left) is not None:
            node = right
        else:
            return None
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Mul):
        left, right = node.this, node.expression
        if _number(right) is not None:
            node = left
        elif _number(left) is not None:
            node = right
        else:
            return None
    while isinstance(node, exp.Paren):
        node = node.this
    if not isinstance(node, exp.Floor) or node.args.get("decimals") is not None:
        return None
    div = node.this
    while isinstance(div, exp.Paren):
        div = div.this
    if not isinstance(div, exp.Div):
        return None
    column = div.this
    while isinstance(column, exp.Paren):
        column = column.this
    width = _number(div.expression)
    if not isinstance(column, exp.Column) or width is None or width <= 0:
        return None
    return Binning(column.name.lower(), width)


def bin_count(spec: Column, width: float) -> int | None:
    """Number of bins FLOOR(col / width) takes over a column's bounds, or None if the column has no bounds."""
    if spec.type not in NUMERIC_TYPES or spec.bounds is None:
        return None
    lo, hi = float(spec.bounds[0]), float(spec.bounds[1])
    return math.floor(hi / width) - math.floor(lo / width) + 1


def bin_representatives(spec: Column, width: float) -> list[Any] | None:
    """One value of the column inside each bin FLOOR(col / width) meets within the column's bounds (at most
    MAX_BINS bins), from the policy alone; None if there are more bins or no bounds."""
    n = bin_count(spec, width)
    if n is None or n > MAX_BINS:
        return None
    lo, hi = float(spec.bounds[0]), float(spec.bounds[1])  # type: ignore[index]
    integral = spec.type is ColumnType.INT
    out: list[Any] = []
    for i in range(math.floor(lo / width), math.floor(hi / width) + 1):
        left, right = max(lo, i * width), min(hi, (i + 1) * width)
        value: float = math.ceil(left) if integral else (left + right) / 2
        if value > hi or math.floor(value / width) != i:
            continue  # no value of the column in this bin (an integer column, a bin narrower than one)
        out.append(int(value) if integral else value)
    return out


def _nice_width(span_: float, bins: int = 50) -> float:
    """A round bin width (1, 2 or 5 times a power of ten) giving at most about `bins` bins over `span_`."""
    raw = max(span_ / bins, 1e-12)
    power = 10.0 ** math.floor(math.log10(raw))
    return next(step * power for step in (1.0, 2.0, 5.0, 10.0) if step * power >= raw * (1 - 1e-9))


def continuous_key_warning(expr: exp.Expr, policy: Policy) -> str | None:
    """Advice for a GROUP BY key over a numeric column with no public key set: bin it."""
    bins = binning(expr)
    if bins is not None:
        spec = policy.columns.get(bins.column)
        n = None if spec is None else bin_count(spec, bins.width)
        if n is not None and n > MAX_BINS:
            return (
                f"GROUP BY {expr.sql(dialect='duckdb')} has {n:,} bins over the bounds of {bins.column!r}, more than "
                f"{MAX_BINS:,}: its keys are selected privately (costing δ); use a wider bin to have every bin "
                "released as a public key"
            )
        return None
    if not isinstance(expr, exp.Column):
        return None
    name = expr.name.lower()
    spec = policy.columns.get(name)
    if spec is None or spec.type not in NUMERIC_TYPES:
        return None
    advice = (
        f"GROUP BY {name} groups by every distinct value of a numeric column without a public key set: most groups "
        "hold a few units and private key selection (which costs δ) releases few or none of them."
    )
    binned = suggested_bin(name, spec)
    if binned is None:
        return advice + f" Group by a column with a public domain, or ask for bounds on {name!r} to bin it"
    return (
        advice + f" Bin it instead, e.g. GROUP BY {binned}: bins of a bounded column follow "
        f"from the policy's bounds, so all of them (at most {MAX_BINS:,}) are released as public keys, without δ"
    )


def suggested_bin(name: str, spec: Column) -> str | None:
    """A binning of a bounded numeric column into about 50 bins of a round width (`FLOOR(col / w) * w`), or None
    for a column without bounds."""
    if spec.bounds is None:
        return None
    width = _nice_width(float(spec.bounds[1]) - float(spec.bounds[0]))
    shown = f"{width:g}" if width < 1 else f"{int(width)}"
    return f"FLOOR({name} / {shown}) * {shown}"


def public_key_domain(expr: exp.Expr, policy: Policy, tree: exp.Expr, typed: Typed) -> list[Any] | None:
    """Values a key expression can take, computed from the policy's public domains only (no private data): the
    key's compiled tree over a VALUES table of each column's domain, on the public engine, each value canonical
    for the key's type (so it matches the same group read from any engine). A binned key over a bounded column
    (`binning`) takes its column's domain as one value inside each bin its bounds meet."""
    columns = sorted({c.name.lower() for c in expr.find_all(exp.Column)})
    bins = binning(expr)
    domains: list[list[Any]] = []
    for c in columns:
        domain = policy.columns[c].key_domain()
        if domain is None and bins is not None and bins.column == c:
            domain = bin_representatives(policy.columns[c], bins.width)
        if domain is None:
            return None
        domains.append(domain)
    size = 1
    for d in domains:
        size *= len(d)
    if size > MAX_DECLARED_GROUPS:
        return None
    if isinstance(expr, exp.Column):
        return [canonical(v, typed.type) for v in domains[0]]
    query = exp.select(exp.alias_(tree.copy(), "k", quoted=True)).distinct()
    for i, (c, d) in enumerate(zip(columns, domains, strict=True)):
        spec = policy.columns[c]
        values = exp.values([exp.Tuple(expressions=[_literal(v, spec)]) for v in d], alias=f"v{i}", columns=[c])
        query = query.from_(values) if i == 0 else query.join(values, join_type="CROSS")
    try:
        rows = public_rows(query)
    except PublicError as exc:
        raise QueryRejected(f"cannot evaluate the GROUP BY expression: {exc}", reason="bad_group_key") from None
    try:
        found = {canonical(r[0], typed.type) for r in rows if r[0] is not None}
    except (ValueError, OverflowError) as exc:  # a value Python cannot hold (a date outside years 1-9999, say)
        raise QueryRejected(f"cannot evaluate the GROUP BY expression: {exc}", reason="bad_group_key") from None
    return sorted(found, key=lambda v: (str(type(v)), v))


def _all_periods(plan: Plan) -> Plan:
    """A join or a per-unit query on a dataset with periods reads and is charged every period (no analysis)."""
    policy = plan.dataset_policy
    if policy.period is not None:
        plan.periods = tuple(label for label, _, _ in policy.periods())
    return plan


def plan_query(sql: str, resolve: Callable[[str], Policy], public: PublicReader | None = None) -> Plan:
    """Parse, validate and plan one analyst query. `resolve` maps a dataset name to its policy (or raises);
    `public` reads a dataset's public table (None: an engine without public tables, where joins are refused)."""
    from gateway.sql import joins, perunit, privatejoins  # they build on this module's planner

    try:
        select = parse_select(sql)
        listed = read_public_groups(select, sql)  # a join listing public groups becomes one SELECT and its lists
        if listed is None and privatejoins.applies(select):  # reads a further private table, <dataset>.<table>
            return _all_periods(privatejoins.plan(select, sql, resolve, public))
        if listed is None and joins.applies(select):  # a join with a public table of the dataset
            return _all_periods(joins.plan(select, sql, resolve, public))
        if perunit.source(select) is not None:  # a list of public groups may itself be the FROM's subquery
            return _all_periods(perunit.plan(select, sql, resolve, public))
        name = dataset_name(select, sql)
        policy = resolve(name)
        drop_qualifiers(select, name)
        where = select.args.get("where")
        read = periods_read(policy, where.this.copy() if where is not None else None) if policy.period else None
        plan = _Planner(select, sql, policy, listed).plan()
        if read is not None:
            plan.periods = tuple(read)
        return plan
    except RecursionError:
        raise QueryRejected(
            "the query is too deeply nested", reason="too_complex", hint="write a flatter expression"
        ) from None
