"""Queries over a dataset's further private tables (`private_tables` in the policy), alone or joined on the
privacy unit with each other, the dataset's own table and at most one public table:

    SELECT c.chapter, AVG(l.value) FROM hospital.labs l
      JOIN hospital.visits v ON l.patient_id = v.patient_id AND l.visit_id = v.visit_id
      JOIN diagnosis_chapters c ON v.diagnosis = c.code
    GROUP BY c.chapter

A private table is read as `<dataset>.<table>`; the dataset's own table as `<dataset>`. Each is bounded at
registration to at most k_t rows per unit (keyed digest). A join of private tables must be INNER or LEFT and its ON
a conjunction of column equalities that contains the equality of the two sides' unit columns (`USING (<unit>, ...)`
too): then a row of one unit joins rows of the same unit only, so one unit has at most k_a·k_b rows after the join
(for a LEFT join too: an unmatched row is one row), and the rows of every other unit are the same on two
neighbouring datasets. The query is planned as a query over the joined table with the product of the sides' bounds
(times a joined public table's multiplicity m) as its rows per unit: every sensitivity follows from that, and the
plan's warning says the figure. Pricing at the product is exact (no row is dropped, so no bias) and is the default.
A policy may set `max_joined_rows_per_unit: K`: a join of several private tables whose product exceeds K then keeps
at most K joined rows per unit (Tumult's truncation), ranked by the MD5 of their values (a function of the unit's own
rows only), and is priced at K: less noise, but the dropped rows bias counts and sums downwards.

Refused before any charge, with the span and the allowed form: a join whose ON lacks the units' equality, or holds
an OR, a non-equality or a column of a hidden usage; CROSS, FULL and RIGHT joins of private tables; NATURAL and
other methods; joins with tables that are neither private nor public tables of the dataset (or of another dataset);
more than one public table; two sides with the same name; a join whose product of bounds exceeds 10,000 rows per
unit (`MAX_ROWS_PER_UNIT`: the engine builds every joined row of a unit, truncated or not, so a caller joining a
table again and again would make the work, and the time an answer takes, grow with the units' row counts); the unit
column of a LEFT-joined table outside the ON (the joined table keeps the first table's unit only, present on the
rows the LEFT-joined table did not match, so `COUNT(v.<unit>)` would count them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from math import prod
from typing import TYPE_CHECKING, Any

from sqlglot import exp

from gateway.engines import recipe
from gateway.engines.base import bounded
from gateway.sql import joins as public_joins
from gateway.sql.parse import _SYSTEM_SCHEMAS, join_span, refuse_alias_columns
from policies.errors import DatasetNotFound, QueryRejected
from policies.expressions import check_column, reject, span
from policies.schema import MAX_ENUMERABLE_DOMAIN, MAX_ROWS_PER_UNIT, Column, Policy, Usage, public_table_name

if TYPE_CHECKING:
    from gateway.sql.joins import PublicReader
    from gateway.sql.plan import Plan

REASON = "join"


def applies(select: exp.Select) -> bool:
    """Whether the SELECT reads a private table by `<dataset>.<table>` (in FROM or a join): this module plans it."""
    from_ = select.args.get("from_") or select.args.get("from")
    if from_ is None or select.args.get("laterals") or not isinstance(from_.this, exp.Table):
        return False
    tables = [from_.this, *[j.this for j in select.args.get("joins") or []]]
    if not all(isinstance(t, exp.Table) and isinstance(t.this, exp.Identifier) for t in tables):
        return False
    for t in tables:
        db = (t.db or "").lower()
        if db and db not in _SYSTEM_SCHEMAS and db != t.name.lower() and not t.catalog:
            return True
    return False


def form(dataset: str, policy: Policy) -> str:
    """The accepted form, for hints."""
    tables = sorted(policy.private_tables)
    other = tables[0] if tables else "<private table>"
    unit = policy.private_tables[other].unit_column if tables else policy.privacy_unit
    return (
        f"FROM {dataset} d [LEFT] JOIN {dataset}.{other} t ON d.{policy.privacy_unit} = t.{unit} [AND d.<col> = "
        "t.<col> ...]"
    )


@dataclass(frozen=True)
class Side:
    """One table of the FROM: the dataset's own (`table` None), a private table, or a public table."""

    alias: str  # its name in the joined tree
    names: frozenset[str]  # the name the query calls it by (its alias, else its name)
    table: str | None  # the private or public table's name (None: the dataset's own)
    policy: Policy | None  # its policy as a dataset (private sides), None for the public side
    columns: dict[str, Column]
    kind: str  # FROM, INNER or LEFT
    derived: dict[str, str]  # column → its name in the joined table
    multiplicity: int = 1  # public side: rows one value of its join column may match

    @property
    def unit(self) -> str | None:
        return self.policy.unit_column if self.policy is not None else None

    @property
    def public(self) -> bool:
        return self.policy is None


@dataclass(frozen=True)
class PrivateJoin:
    """A query's tables: the private sides (and at most one public), their ON equalities as (side, column, side,
    column), priced at the product of the private sides' bounds times the public side's multiplicity."""

    policy: Policy  # the dataset's
    sides: tuple[Side, ...]
    conditions: tuple[tuple[tuple[int, str, int, str], ...], ...]  # per side after the first
    domains: dict[str, list[Any]] = field(compare=False, default_factory=dict)  # joined public column → values

    @property
    def product(self) -> int:
        """The most joined rows one unit may have: the product of the private sides' bounds and the multiplicity."""
        return prod(s.policy.max_rows_per_unit for s in self.sides if s.policy is not None) * prod(
            s.multiplicity for s in self.sides
        )

    @property
    def truncated(self) -> int | None:
        """The bound the joined rows are truncated to (the policy's `max_joined_rows_per_unit`, when the product
        of a join of several private tables exceeds it), or None: priced at the product."""
        cap = self.policy.max_joined_rows_per_unit
        several = sum(1 for s in self.sides if not s.public) > 1
        return cap if several and cap is not None and cap < self.product else None

    @property
    def rows_per_unit(self) -> int:
        truncated = self.truncated
        return truncated if truncated is not None else self.product

    def derived_policy(self) -> Policy:
        """The joined table as a dataset: every side's columns under their derived names, the first side's unit as
        the unit, and the product of the bounds as its rows per unit."""
        first = self.sides[0]
        assert first.policy is not None
        columns: dict[str, Column] = {}
        for i, side in enumerate(self.sides):
            for name, spec in side.columns.items():
                if side.unit == name and i > 0:
                    continue  # equal to the first side's unit on every joined row (or missing)
                columns[side.derived[name]] = (
                    public_joins._with_domain(spec, self.domains.get(side.derived[name])) if side.public else spec
                )
        for i, side in enumerate(self.sides):
            if side.public and side.kind == "INNER":  # the private join column takes the public key's values
                ((private, private_col, _, public_col),) = self.conditions[i - 1]
                name = self.sides[private].derived[private_col]
                spec, key = columns[name], side.columns[public_col]
                if spec.domain is None and spec.type == key.type:
                    columns[name] = public_joins._with_domain(spec, self.domains.get(side.derived[public_col]))
        return first.policy.model_copy(
            update={
                "dataset": self.policy.dataset,
                "columns": columns,
                "max_rows_per_unit": self.rows_per_unit,
                "private_tables": {},
                "public_tables": {},
                "row_key": first.policy.row_key if first.table is None else None,
                "labels": first.policy.labels if first.table is None else None,
                "consent": None,
            }
        )

    def _source(self, side: Side) -> exp.Table:
        if side.public:
            assert side.table is not None
            return exp.table_(public_table_name(self.policy.dataset, side.table), quoted=True)
        assert side.policy is not None
        return bounded(side.policy.dataset)

    def table_tree(self) -> exp.Expr:
        """The joined table: the first side's bounded columns as they are, every other side's columns (and the
        fixed-point copies of summed ones) under their derived names, the sides joined on their equalities."""
        first = self.sides[0]
        if len(self.sides) == 1:
            return exp.alias_(self._source(first), public_joins.JOINED, quoted=True)
        items: list[exp.Expr] = [exp.Column(this=exp.Star(), table=exp.to_identifier(first.alias, quoted=True))]
        for side in self.sides[1:]:
            kept = list(side.columns) if side.policy is None else recipe.kept_columns(side.policy)
            for name in kept:
                if name == side.unit:
                    continue
                outs = [(name, side.derived[name])]
                if recipe.summed(side.columns[name]):
                    derived = side.derived[name]
                    outs += [(f"__fx_{name}", f"__fx_{derived}"), (f"__fx2_{name}", f"__fx2_{derived}")]
                for out, alias in outs:
                    items.append(exp.alias_(exp.column(out, side.alias, quoted=True), alias, quoted=True))
        query = exp.select(*items).from_(exp.alias_(self._source(first), first.alias, quoted=True))
        for i, side in enumerate(self.sides[1:], start=1):
            on = exp.and_(
                *[
                    exp.EQ(
                        this=exp.column(col_a, self.sides[a].alias, quoted=True),
                        expression=exp.column(col_b, self.sides[b].alias, quoted=True),
                    )
                    for a, col_a, b, col_b in self.conditions[i - 1]
                ]
            )
            query = query.join(
                exp.alias_(self._source(side), side.alias, quoted=True),
                on=on,
                join_type="LEFT" if side.kind == "LEFT" else "INNER",
            )
        if self.truncated is not None:
            query = self._truncate(query, self.truncated)
        return exp.alias_(exp.Subquery(this=query), public_joins.JOINED, quoted=True)

    def _truncate(self, joined: exp.Select, bound: int) -> exp.Select:
        """At most `bound` joined rows per unit (Tumult's truncation): those ranked lowest within their unit by the
        MD5 of their values, then by the values themselves. The rank is a function of the row's values only (not of
        row ids or the engine's order), so a unit's kept rows depend on that unit's rows alone; rows that tie are
        equal in every released column."""
        first = self.sides[0]
        assert first.policy is not None and first.policy.unit_column is not None
        values: list[str] = list(recipe.kept_columns(first.policy))
        for side in self.sides[1:]:
            kept = list(side.columns) if side.policy is None else recipe.kept_columns(side.policy)
            values += [side.derived[c] for c in kept if c != side.unit]
        text = [
            exp.Coalesce(
                this=exp.Cast(this=exp.column(c, "j", quoted=True), to=exp.DataType.build("VARCHAR")),
                expressions=[exp.Literal.string("-")],
            )
            for c in values
        ]
        digest = exp.MD5(this=exp.ConcatWs(expressions=[exp.Literal.string("|"), *text]))
        order = [exp.Ordered(this=digest), *[exp.Ordered(this=exp.column(c, "j", quoted=True)) for c in values]]
        rank = exp.Window(
            this=exp.RowNumber(),
            partition_by=[exp.column(first.policy.unit_column, "j", quoted=True)],
            order=exp.Order(expressions=order),
        )
        ranked = exp.select(
            exp.Column(this=exp.Star(), table=exp.to_identifier("j")), exp.alias_(rank, recipe.TAKE, quoted=True)
        ).from_(exp.alias_(exp.Subquery(this=joined), "j"))
        return (
            exp.select(exp.Star())
            .from_(exp.alias_(exp.Subquery(this=ranked), "r"))
            .where(exp.LTE(this=exp.column(recipe.TAKE, quoted=True), expression=exp.Literal.number(bound)))
        )

    def note(self) -> str:
        private = [s for s in self.sides if not s.public]
        bounds = " × ".join(
            f"{s.table or self.policy.dataset} ({s.policy.max_rows_per_unit})" for s in private if s.policy is not None
        )
        public = [s for s in self.sides if s.public]
        if public:
            bounds += f" × {public[0].table} (multiplicity {public[0].multiplicity})"
        if len(self.sides) == 1:
            return f"reads the private table {self.sides[0].table!r}: at most {self.rows_per_unit} rows per unit"
        if self.truncated is not None:
            return (
                f"joined on the privacy unit: each unit has at most {bounds} = {self.product} joined rows, truncated "
                f"to {self.truncated} per unit (the policy's max_joined_rows_per_unit; kept by a hash of their "
                f"values, the others dropped), and every sensitivity is priced at {self.truncated} rows per unit"
            )
        return (
            f"joined on the privacy unit: each unit has at most {bounds} = {self.rows_per_unit} joined rows, and "
            f"every sensitivity is priced at {self.rows_per_unit} rows per unit"
        )


def _refuse(
    message: str, select: exp.Select, join: exp.Expr, sql: str, hint: str, node: exp.Expr | None = None
) -> QueryRejected:
    if node is not None:
        return reject(message, REASON, node, sql, hint=hint)
    start, end = join_span(select, join, sql)
    return QueryRejected(message, reason=REASON, sql=sql, start=start, end=end, hint=hint)


def _dataset_of(table: exp.Table) -> str:
    return (table.db or table.name).lower()


def prepare(
    select: exp.Select,
    sql: str,
    resolve: Callable[[str], Policy],
    public: PublicReader | None,
    resolved: tuple[str, Policy] | None = None,
) -> tuple[PrivateJoin, exp.Select]:
    """Validate the tables and joins against the dataset's policy: the join, and the SELECT rewritten over the
    joined table (every column reference unqualified, under its name there; FROM the dataset's name)."""
    from_ = select.args.get("from_") or select.args["from"]
    first = from_.this
    assert isinstance(first, exp.Table)
    refuse_alias_columns(first, sql, inside="the table's own column names, qualified by its alias")
    if first.catalog or (first.db or "").lower() in _SYSTEM_SCHEMAS:
        raise reject("system catalogs are not allowed", "system_catalog", first, sql)
    if resolved is None:
        try:
            resolved = (_dataset_of(first), resolve(_dataset_of(first)))
        except DatasetNotFound:  # `schema.table` of no dataset: refused as any unknown schema
            raise reject(
                f"no schema {_dataset_of(first)!r}: a table is read as <dataset>, <dataset>.<dataset> or "
                "<dataset>.<private table>",
                "unknown_schema",
                first,
                sql,
                hint=f"write FROM {first.name.lower()} (GET /v1/datasets lists the datasets and their private tables)",
            ) from None
    name, policy = resolved
    allowed = form(name, policy)
    joins: list[exp.Join] = list(select.args.get("joins") or [])
    sides: list[Side] = []
    taken: set[str] = set()
    sides.append(_side(first, name, policy, sql, "FROM", taken, 0, select, None, allowed))
    conditions: list[tuple[tuple[int, str, int, str], ...]] = []
    for i, join in enumerate(joins, start=1):
        target = join.this
        assert isinstance(target, exp.Table)
        refuse_alias_columns(target, sql, inside="the table's own column names, qualified by its alias")
        kind = _kind(join, select, sql, allowed)
        side = _side(target, name, policy, sql, kind, taken, i, select, join, allowed)
        if side.public and any(s.public for s in sides):
            raise _refuse("at most one public table per query", select, join, sql, hint=f"write {allowed}")
        if side.public and public is None:
            raise _refuse(public_joins.DUCKDB_ONLY, select, join, sql, hint="query without the public table")
        if any(s.names & side.names for s in sides):
            raise _refuse(
                "two tables of the join have the same name", select, join, sql, hint="give them aliases: FROM d JOIN t"
            )
        sides.append(side)
        conditions.append(_conditions(join, select, sql, policy, sides, i, allowed))
        joined = PrivateJoin(policy, tuple(sides), tuple(conditions)).product
        if joined > MAX_ROWS_PER_UNIT:  # the engine builds every joined row of a unit before anything else runs
            raise _refuse(
                f"this join gives a unit up to {joined:,} joined rows (the product of the tables' bounds); at most "
                f"{MAX_ROWS_PER_UNIT:,} are allowed",
                select,
                join,
                sql,
                hint="join fewer tables (each table once, when you can)",
            )
    domains: dict[str, list[Any]] = {}
    for side in sides:
        if side.public and public is not None:
            assert side.table is not None
            read = public(name, side.table)
            for column in side.columns:
                if column in read.column_names:
                    values = {v for v in read.column(column).to_pylist() if v is not None}
                    if len(values) <= MAX_ENUMERABLE_DOMAIN:
                        domains[side.derived[column]] = sorted(values, key=lambda v: (str(type(v)), v))
    found = PrivateJoin(policy, tuple(sides), tuple(conditions), domains)
    outer = select.copy()
    _rewrite_columns(outer, sides, sql)
    outer.set("joins", None)
    outer.set("from_" if "from_" in select.args else "from", exp.From(this=exp.table_(name)))
    return found, outer


def plan(
    select: exp.Select,
    sql: str,
    resolve: Callable[[str], Policy],
    public: PublicReader | None,
    resolved: tuple[str, Policy] | None = None,
) -> Plan:
    """Validate the tables and joins against the dataset's policy and plan the query over the joined table.
    Nothing is charged here; a joined public table's rows are read for the domains of its columns."""
    from gateway.sql.plan import _Planner

    found, outer = prepare(select, sql, resolve, public, resolved)
    planned = _Planner(outer, sql, found.derived_policy()).plan()
    planned.join = found
    planned.normalized_sql = select.sql(dialect="duckdb", normalize=True)
    planned.warnings.append(found.note())
    return planned


def _kind(join: exp.Join, select: exp.Select, sql: str, allowed: str) -> str:
    side, kind = (join.side or "").upper(), (join.kind or "").upper()
    if kind == "CROSS" or side == "FULL" or (not side and not kind and not join.args.get("on") and not _using(join)):
        what = "FULL joins" if side == "FULL" else "CROSS joins"
        raise _refuse(
            f"{what} are not allowed: they pair rows of different units, without a bound",
            select,
            join,
            sql,
            hint=f"join on the privacy unit: {allowed}",
        )
    if kind not in ("", "INNER", "OUTER") or side not in ("", "LEFT") or (kind == "INNER" and side):
        raise _refuse(
            f"{' '.join(x for x in (side, kind) if x)} JOIN is not supported with private tables: INNER or LEFT",
            select,
            join,
            sql,
            hint=f"write {allowed}",
        )
    method = str(join.args.get("method") or "").upper()
    if method:
        raise _refuse(
            f"{method} joins are not supported: only the equalities of ON (or USING) run",
            select,
            join,
            sql,
            hint=f"write {allowed}",
        )
    return "LEFT" if side == "LEFT" else "INNER"


def _side(
    table: exp.Table,
    dataset: str,
    policy: Policy,
    sql: str,
    kind: str,
    taken: set[str],
    index: int,
    select: exp.Select,
    join: exp.Join | None,
    allowed: str,
) -> Side:
    db, name = (table.db or "").lower(), table.name.lower()
    names = frozenset({table.alias.lower() if table.alias else name})  # an aliased table is named by its alias
    alias = f"t{index}"
    if table.catalog or db in _SYSTEM_SCHEMAS:
        raise reject("system catalogs are not allowed", "system_catalog", table, sql)
    if db and db != dataset:
        raise reject(
            f"{db}.{name} is not a table of dataset {dataset!r}: a query reads one dataset's tables",
            "unknown_table" if join is None else REASON,
            table,
            sql,
            hint=f"write {allowed}",
        )
    own = name == dataset and db in ("", dataset)
    if own or (db == dataset and name in policy.private_tables):
        sub = policy if own else policy.private_policy(name)
        columns = dict(sub.columns)
        derived = {c: c for c in columns} if index == 0 else _derived(columns, name, taken)
        taken.update(derived.values())
        return Side(alias, names, None if own else name, sub, columns, kind, derived)
    if not db and name in policy.public_tables and join is not None:
        spec = policy.public_tables[name]
        derived = _derived(dict(spec.columns), name, taken)
        taken.update(derived.values())
        return Side(alias, names, name, None, dict(spec.columns), kind, derived)
    tables = ", ".join([dataset, *(f"{dataset}.{t}" for t in sorted(policy.private_tables))])
    public = ", ".join(sorted(policy.public_tables)) or "none"
    raise reject(
        f"{table.sql()} is not a table of dataset {dataset!r} (its private tables: {tables}; its public tables: "
        f"{public})",
        "unknown_schema" if join is None else "unknown_table",
        table,
        sql,
        hint=f"write {allowed}",
    )


def _derived(columns: dict[str, Column], table: str, taken: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in columns:
        name, sep = c, "__"
        while name in taken or name in out.values():
            name, sep = f"{table}{sep}{c}", sep + "_"
        out[c] = name
    return out


def _using(join: exp.Join) -> list[str]:
    return [str(u.name).lower() for u in join.args.get("using") or []]


def _which(col: exp.Column, sides: list[Side]) -> list[int]:
    """The sides a column reference may name: by its qualifier, or every side having a column of its name."""
    table = col.table.lower() if col.table else ""
    name = col.name.lower()
    if table:
        return [i for i, s in enumerate(sides) if table in s.names]
    return [i for i, s in enumerate(sides) if name in s.columns]


def _conditions(
    join: exp.Join, select: exp.Select, sql: str, policy: Policy, sides: list[Side], new: int, allowed: str
) -> tuple[tuple[int, str, int, str], ...]:
    """The join's equalities as (earlier side, column, new side, column), checked: columns of the two sides, usable,
    of one type; for a private side, the units' equality among them; for the public side, one equality with its
    unique key or a column of declared multiplicity."""
    side = sides[new]
    pairs: list[tuple[int, str, int, str, exp.Expr]] = []
    using = _using(join)
    if using:
        for column in using:
            earlier = [i for i, s in enumerate(sides[:new]) if column in s.columns]
            if column not in side.columns or len(earlier) != 1:
                raise _refuse(
                    f"USING ({column}) needs a column of that name in the joined table and in exactly one table "
                    "before it",
                    select,
                    join,
                    sql,
                    hint=f"write {allowed}",
                )
            pairs.append((earlier[0], column, new, column, join))
    else:
        on: exp.Expr = join.args.get("on") or join
        terms: list[exp.Expr] = []
        stack = [on]
        while stack:
            node = stack.pop()
            while isinstance(node, exp.Paren):
                node = node.this
            if isinstance(node, exp.And):
                stack += [node.expression, node.this]
            else:
                terms.append(node)
        for term in terms:
            if not isinstance(term, exp.EQ) or not all(isinstance(x, exp.Column) for x in (term.this, term.expression)):
                raise _refuse(
                    "a join condition of private tables is a conjunction (AND) of equalities of two columns, one of "
                    "each side, with the units' equality among them",
                    select,
                    join,
                    sql,
                    hint=f"write {allowed}",
                    node=term,
                )
            left, right = term.this, term.expression
            a, b = _which(left, sides), _which(right, sides)
            if len(a) != 1 or len(b) != 1 or {a[0] == new, b[0] == new} != {True, False}:
                raise _refuse(
                    "each equality of the join relates a column of the joined table to a column of a table before "
                    "it (qualify both)",
                    select,
                    join,
                    sql,
                    hint=f"write {allowed}",
                    node=term,
                )
            (i, ci), (j, cj) = (a[0], left), (b[0], right)
            if i == new:
                (i, ci), (j, cj) = (j, cj), (i, ci)
            pairs.append((i, ci.name.lower(), j, cj.name.lower(), term))
    if side.public and len(pairs) != 1:
        assert side.table is not None
        raise _refuse(
            "a public table joins on one equality of a private column with its key",
            select,
            join,
            sql,
            hint=public_joins.form(policy.dataset, side.table, policy.public_tables[side.table].unique_key or "<key>"),
        )
    for i, ci, j, cj, node in pairs:
        if side.public and sides[i].unit == ci:  # the unit is no join column for a public table
            check_column(_unqualified(node, ci), sides[i].policy or policy, sql, labeling=False)
        for k, c in ((i, ci), (j, cj)):
            if c not in sides[k].columns:
                raise reject(f"{sides[k].table or policy.dataset} has no column {c!r}", "unknown_column", node, sql)
            spec = sides[k].columns[c]
            if c != sides[k].unit and spec.usage is not Usage.QUERY:
                check_column(_unqualified(node, c), sides[k].policy or policy, sql, labeling=False)
        if sides[i].public:
            raise _refuse(
                "a table joins the private tables, not the public one", select, join, sql, hint=f"write {allowed}"
            )
        public_joins._check_types(sides[i].columns[ci], sides[j].columns[cj], ci, cj, node, sql)
    if side.public:
        assert side.table is not None
        lookup = policy.public_tables[side.table]
        i, ci, j, cj, node = pairs[0]
        multiplicity = lookup.multiplicity(cj)
        if multiplicity is None:
            raise _refuse(
                f"{side.table}.{cj} is neither the table's unique key nor a column with a declared max_multiplicity",
                select,
                join,
                sql,
                hint=public_joins.form(policy.dataset, side.table, lookup.unique_key or "<key>"),
                node=node,
            )
        sides[new] = replace(side, multiplicity=multiplicity)
    else:
        if not any(ci == sides[i].unit and cj == side.unit for i, ci, _, cj, _ in pairs):
            raise _refuse(
                "a join of private tables must hold the equality of the two sides' privacy-unit columns: without it "
                "one unit's rows would join other units' rows, without a bound",
                select,
                join,
                sql,
                hint=f"write {allowed}",
                node=join.args.get("on"),
            )
    return tuple((i, ci, j, cj) for i, ci, j, cj, _ in pairs)


def _unqualified(node: exp.Expr, name: str) -> exp.Column:
    return public_joins._unqualified(node, name)


def _rewrite_columns(select: exp.Select, sides: list[Side], sql: str) -> None:
    """Every column reference becomes the joined table's column, unqualified, keeping its place in the text; an
    unqualified name of several tables is ambiguous (but the unit, which is one column of the joined table)."""
    aliases = {i.alias.lower() for i in select.expressions if isinstance(i, exp.Alias)}
    unit_name = sides[0].derived.get(sides[0].unit or "", "")
    for col in list(select.find_all(exp.Column)):
        if not isinstance(col.this, exp.Identifier):
            continue
        table, name = (col.table or "").lower(), col.name.lower()
        if col.db or col.catalog:
            raise reject(
                "qualify a column by its table's name or alias only", "unknown_table", col, sql, hint="write t.<column>"
            )
        if table:
            matches = [i for i, s in enumerate(sides) if table in s.names]
        else:
            matches = [i for i, s in enumerate(sides) if name in s.columns]
        if table and not matches:
            raise reject(f"unknown table qualifier {col.table!r}", "unknown_table", col, sql)
        if not matches:
            continue  # an output alias, or an unknown column the planner refuses
        if len(matches) > 1:
            if all(sides[i].unit == name for i in matches):
                matches = [0]
            elif not table and name in aliases:
                continue
            else:
                raise reject(
                    f"column {name!r} is in several tables",
                    "ambiguous_column",
                    col,
                    sql,
                    hint="qualify it with the table's name or alias",
                )
        side = sides[matches[0]]
        if name not in side.columns:
            raise reject(f"{side.table or 'the dataset'} has no column {name!r}", "unknown_column", col, sql)
        if name == side.unit and side.kind == "LEFT" and col.find_ancestor(exp.Join) is None:
            # The joined table holds one unit column, the first table's: a LEFT-joined table's unit would be read
            # as that one, present on the rows it did not match too, and COUNT(v.<unit>) would count them. (In the
            # ON of a later join it is the table's own column, missing where it should be.)
            raise reject(
                f"the unit column of the LEFT-joined table {col.table or name!r} is missing on its unmatched rows, "
                "which the joined table does not tell apart",
                "privacy_unit_column",
                col,
                sql,
                hint="count the first table's unit, a column of the LEFT-joined table, or write an INNER JOIN to "
                "count only the units it matches",
            )
        derived = unit_name if name == side.unit else side.derived[name]
        start, end = span(col, sql)
        identifier = exp.to_identifier(derived)
        if start is not None and end is not None:
            identifier.meta.update(start=start, end=end - 1)
        new: exp.Expr = exp.Column(this=identifier)
        if derived != name and col.parent is select and col.arg_key == "expressions":
            new = exp.alias_(new, name)
        col.replace(new)
