"""Joins of the private table with one of its dataset's public tables (`public_tables` in the policy):

    SELECT c.chapter, COUNT(*) FROM visits v JOIN diagnosis_chapters c ON v.diagnosis = c.code GROUP BY c.chapter

The form accepted: `FROM <dataset> [AS a] [INNER | LEFT [OUTER] | RIGHT [OUTER]] JOIN <public table> [AS b]
ON a.<col> = b.<key>` (either way round) or `USING (<key>)`, where `<key>` is the public table's `unique_key` or a
column with a declared `max_multiplicity` m. The join reads the contribution-bounded table (at most k rows per unit,
bounded when the dataset was registered), so each unit has at most k rows before the join and at most k·m after it:
the query is planned as a query over the joined table with k·m rows per unit, and every sensitivity follows from
that (unchanged for a unique key, m times for a multiplicity m; the plan says so). The joined public columns are
columns of that table like the dataset's (in WHERE, GROUP BY, inside aggregates), with the policy's declared types
and bounds; a category, int or bool public column without a declared domain takes the public table's own distinct
values as its domain, so grouping by it releases every one of those keys, empty groups included, without key
selection and without δ (the table is public). After an inner or right join, the dataset's join column takes the
public key's values as its domain the same way (a row without a match is not in the join).

A RIGHT JOIN is read as the inner join whose public keys are all released: each group's aggregates are over the
private rows that match it (an empty group counts 0, where SQL's RIGHT JOIN would count the public row itself).

Refused before any charge, with the span and the allowed form: joins on a public column that is neither the unique
key nor has a multiplicity, FULL and CROSS joins, the dataset joined with itself or with anything that is not one
of its public tables (a dataset that declares private tables plans its joins in `gateway.sql.privatejoins`, joins of
its private tables on the unit included), a condition other than one equality of two columns, more than one join,
and join columns whose types differ (`type_error`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from sqlglot import exp

from gateway.engines import recipe
from gateway.engines.base import bounded
from gateway.sql.parse import dataset_name, drop_qualifiers, join_span, refuse_alias_columns
from policies.errors import QueryRejected
from policies.expressions import check_column, reject, span
from policies.schema import MAX_ENUMERABLE_DOMAIN, NUMERIC_TYPES, Column, ColumnType, Policy, public_table_name
from policies.sqltypes import SqlType, column_type

if TYPE_CHECKING:
    from gateway.sql.plan import Plan

REASON = "join"
JOINED = "__joined"  # the alias of the joined table the statements read
_PRIVATE, _PUBLIC = "b", "p"  # the two sides inside it
DUCKDB_ONLY = "joins with public tables run on DuckDB only for now"

# Reads a public table's rows (the engine's `public_table`): public data, read when planning.
PublicReader = Callable[[str, str], pa.Table]


def form(dataset: str, table: str, key: str) -> str:
    """The accepted form, for hints."""
    return f"FROM {dataset} d [LEFT|RIGHT] JOIN {table} t ON d.<column> = t.{key} (or USING ({key}))"


@dataclass(frozen=True)
class PublicJoin:
    """One join of the private table with a public table: the dataset's policy, the public table's name, the join's
    kind (INNER, LEFT or RIGHT: RIGHT runs as INNER), the join columns on both sides, the public key's multiplicity
    and the joined public columns' names in the joined table (public column → name)."""

    policy: Policy
    table: str
    kind: str
    private_key: str
    public_key: str
    multiplicity: int
    names: dict[str, str] = field(compare=False)
    domains: dict[str, list[Any]] = field(compare=False)  # public column → its distinct values (public)

    @property
    def outer(self) -> bool:
        return self.kind == "LEFT"

    def derived_policy(self) -> Policy:
        """The joined table as a dataset: the dataset's columns and the public ones, at most k·m rows per unit."""
        public = self.policy.public_tables[self.table]
        columns = dict(self.policy.columns)
        for name, derived in self.names.items():
            columns[derived] = _with_domain(public.columns[name], self.domains.get(name))
        if not self.outer:
            spec = columns[self.private_key]
            key_values = self.domains.get(self.public_key)
            if spec.domain is None and spec.type == public.columns[self.public_key].type:
                columns[self.private_key] = _with_domain(spec, key_values)
        return self.policy.model_copy(
            update={"columns": columns, "max_rows_per_unit": self.policy.max_rows_per_unit * self.multiplicity}
        )

    def table_tree(self) -> exp.Expr:
        """The joined table: every column of the bounded table (bounded first, at most k rows per unit), then the
        public columns (and fixed-point copies of summed ones) under their names, the private rows joined to the
        public rows whose key equals their join column."""
        public = self.policy.public_tables[self.table]
        items: list[exp.Expr] = [exp.Column(this=exp.Star(), table=exp.to_identifier(_PRIVATE, quoted=True))]
        for name, derived in self.names.items():
            outs = [(name, derived)]
            if recipe.summed(public.columns[name]):
                outs += [(f"__fx_{name}", f"__fx_{derived}"), (f"__fx2_{name}", f"__fx2_{derived}")]
            for out, alias in outs:
                items.append(exp.alias_(exp.column(out, _PUBLIC, quoted=True), alias, quoted=True))
        condition = exp.EQ(
            this=exp.column(self.private_key, _PRIVATE, quoted=True),
            expression=exp.column(self.public_key, _PUBLIC, quoted=True),
        )
        joined = (
            exp.select(*items)
            .from_(exp.alias_(bounded(self.policy.dataset), _PRIVATE, quoted=True))
            .join(
                exp.alias_(
                    exp.table_(public_table_name(self.policy.dataset, self.table), quoted=True), _PUBLIC, quoted=True
                ),
                on=condition,
                join_type="LEFT" if self.outer else "INNER",
            )
        )
        return exp.alias_(exp.Subquery(this=joined), JOINED, quoted=True)

    def note(self) -> str:
        key = f"{self.table}.{self.public_key}"
        if self.multiplicity == 1:
            return f"joined with the public table {self.table!r} on its unique key {key}: sensitivities unchanged"
        return (
            f"joined with the public table {self.table!r} on {key}, of max_multiplicity {self.multiplicity}: each "
            f"private row may join up to {self.multiplicity} rows, so every measurement's sensitivity is multiplied "
            f"by {self.multiplicity} (priced at {self.policy.max_rows_per_unit * self.multiplicity} rows per unit)"
        )


def _with_domain(spec: Column, values: list[Any] | None) -> Column:
    """A column with `values` as its public domain, when it has none, can take one and they fit it."""
    if values is None or spec.domain is not None or not values:
        return spec
    if spec.type not in {ColumnType.CATEGORY, ColumnType.INT, ColumnType.BOOL} or len(values) > MAX_ENUMERABLE_DOMAIN:
        return spec
    if spec.max_length is not None and any(len(str(v)) > spec.max_length for v in values):
        return spec
    if spec.type is ColumnType.INT and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return spec
    return spec.model_copy(update={"domain": list(values)})


def applies(select: exp.Select) -> bool:
    """Whether the SELECT reads a table joined with tables (the form this module plans or refuses); other joins
    (lists of values, subqueries, UNNEST) are left to the parse stage."""
    joins = select.args.get("joins") or []
    from_ = select.args.get("from_") or select.args.get("from")
    if not joins or from_ is None or select.args.get("laterals") or not isinstance(from_.this, exp.Table):
        return False
    return all(isinstance(j.this, exp.Table) and isinstance(j.this.this, exp.Identifier) for j in joins)


def _join_span(join: exp.Join, sql: str) -> tuple[int | None, int | None]:
    select = join.parent
    assert isinstance(select, exp.Select)
    return join_span(select, join, sql)


def _refuse(message: str, join: exp.Join, sql: str, hint: str, node: exp.Expr | None = None) -> QueryRejected:
    if node is not None:
        return reject(message, REASON, node, sql, hint=hint)
    start, end = _join_span(join, sql)
    return QueryRejected(message, reason=REASON, sql=sql, start=start, end=end, hint=hint)


def _names(table: exp.Table) -> set[str]:
    return {table.name.lower()} | ({table.alias.lower()} if table.alias else set())


def plan(select: exp.Select, sql: str, resolve: Callable[[str], Policy], public: PublicReader | None) -> Plan:
    """Validate the join against the dataset's policy and plan the query over the joined table. Nothing is charged
    here; the public table's rows are read for the domains of its columns."""
    from gateway.sql.plan import _Planner

    joins: list[exp.Join] = list(select.args["joins"])
    from_ = select.args.get("from_") or select.args["from"]
    private = from_.this
    assert isinstance(private, exp.Table)
    bare = select.copy()
    bare.set("joins", None)
    name = dataset_name(bare, sql)  # the FROM's own refusals (catalogs, schemas, sampling), as in any query
    policy = resolve(name)
    if policy.private_tables:  # a dataset of several private tables: its joins are planned there
        from gateway.sql import privatejoins

        return privatejoins.plan(select, sql, resolve, public, resolved=(name, policy))
    tables = sorted(policy.public_tables)
    first = tables[0] if tables else "<public table>"
    key0 = policy.public_tables[first].unique_key if tables else None
    allowed = form(name, first, key0 or "<key>")
    if len(joins) > 1:
        raise _refuse(
            "one join per query: the dataset with one of its public tables", joins[1], sql, hint=f"write {allowed}"
        )
    join = joins[0]
    target = join.this
    assert isinstance(target, exp.Table)
    side, kind = (join.side or "").upper(), (join.kind or "").upper()
    if (
        kind == "CROSS"
        or side == "FULL"
        or (not side and not kind and join.args.get("on") is None and not _using(join))
    ):
        what = "FULL joins" if side == "FULL" else "CROSS joins"
        raise _refuse(
            f"{what} are not allowed: they pair rows without a key, so one unit's rows would join without bound",
            join,
            sql,
            hint=f"join a public table on its key: {allowed}",
        )
    if kind not in ("", "INNER", "OUTER") or side not in ("", "LEFT", "RIGHT") or (kind == "INNER" and side):
        raise _refuse(
            f"{' '.join(x for x in (side, kind) if x)} JOIN is not supported", join, sql, hint=f"write {allowed}"
        )
    method = str(join.args.get("method") or "").upper()
    if method:  # NATURAL, ASOF, POSITIONAL: another pairing than the ON's equality, which is what would run
        raise _refuse(
            f"{method} joins are not supported: only the equality join of ON (or USING) runs",
            join,
            sql,
            hint=f"write {allowed}",
        )
    for table_node in (private, target):  # a column list renames the table's columns by position
        refuse_alias_columns(table_node, sql, inside="the table's own column names, qualified by its alias")
    table = target.name.lower()
    if table == name or target.catalog or target.db:
        raise _refuse(
            "joins of the dataset with itself (or with another private table) are not supported",
            join,
            sql,
            hint=f"join one of its public tables: {allowed}" if tables else "query one dataset at a time",
        )
    if public is None:
        raise _refuse(DUCKDB_ONLY, join, sql, hint="query the dataset without a join on this engine")
    if table not in policy.public_tables:
        listed = ", ".join(tables) if tables else "none"
        raise reject(
            f"{target.name!r} is not a public table of dataset {name!r} (its public tables: {listed}); it declares "
            "no private tables to join on the unit",
            "unknown_table",
            target,
            sql,
            hint=f"write {allowed}" if tables else "query one dataset at a time",
        )
    spec = policy.public_tables[table]
    private_names, public_names = _names(private) | {name}, _names(target)
    if private_names & _names(target):
        raise _refuse("the two tables need different names", join, sql, hint="give them aliases: FROM d JOIN t")
    keys = [*([spec.unique_key] if spec.unique_key else []), *spec.max_multiplicity]
    allowed = form(name, table, keys[0])
    private_key, public_key, condition, private_node = _condition(
        join, sql, policy, spec.columns, private_names, public_names, allowed
    )
    multiplicity = spec.multiplicity(public_key)
    if multiplicity is None:
        declared = ", ".join(f"{k} (unique)" if k == spec.unique_key else f"{k} (max_multiplicity)" for k in keys)
        raise _refuse(
            f"{table}.{public_key} is neither the table's unique key nor a column with a declared max_multiplicity: "
            "one private row could join without bound",
            join,
            sql,
            hint=f"join on {declared}: {allowed}",
            node=condition,
        )
    # Usable, not the unit, not hidden: refused at the join column's place in the text.
    check_column(_unqualified(private_node, private_key), policy, sql, labeling=False)
    _check_types(policy.columns[private_key], spec.columns[public_key], private_key, public_key, condition, sql)
    names = _derived_names(policy, spec.columns, table)
    read = public(name, table)
    domains: dict[str, list[Any]] = {}
    for column in spec.columns:
        if column in read.column_names:
            values = {v for v in read.column(column).to_pylist() if v is not None}
            if len(values) <= MAX_ENUMERABLE_DOMAIN:
                domains[column] = sorted(values, key=lambda v: (str(type(v)), v))
    found = PublicJoin(
        policy, table, "LEFT" if side == "LEFT" else "INNER", private_key, public_key, multiplicity, names, domains
    )
    outer = select.copy()
    using = _using(join)
    _rewrite_columns(outer, policy, spec.columns, names, private_names, public_names, sql, using)
    outer.set("joins", None)
    drop_qualifiers(outer, name)
    planned = _Planner(outer, sql, found.derived_policy()).plan()
    planned.join = found
    planned.normalized_sql = select.sql(dialect="duckdb", normalize=True)
    planned.warnings.append(found.note())
    return planned


def _using(join: exp.Join) -> list[str]:
    return [str(u.name).lower() for u in join.args.get("using") or []]


def _side_of(
    col: exp.Column,
    private_cols: dict[str, Column],
    public_cols: dict[str, Column],
    private: set[str],
    public: set[str],
) -> str | None:
    """Which table a column reference names: 'private', 'public', or None if it names none or both."""
    table = col.table.lower() if col.table else ""
    if table:
        return "private" if table in private else "public" if table in public else None
    name = col.name.lower()
    in_private, in_public = name in private_cols, name in public_cols
    if in_private == in_public:
        return None
    return "private" if in_private else "public"


def _condition(
    join: exp.Join,
    sql: str,
    policy: Policy,
    public_cols: dict[str, Column],
    private: set[str],
    public: set[str],
    allowed: str,
) -> tuple[str, str, exp.Expr, exp.Expr]:
    """The join columns (private, public) of `ON a.x = b.y` or `USING (k)`, the condition's node and the private
    column's (the join itself for USING)."""
    using = _using(join)
    if using:
        if len(using) != 1:
            raise _refuse("USING takes one column", join, sql, hint=f"write {allowed}")
        column = using[0]
        if column not in public_cols or column not in policy.columns:
            raise _refuse(
                f"USING ({column}) needs a column of that name in both tables", join, sql, hint=f"write {allowed}"
            )
        return column, column, join, join
    on: exp.Expr = join.args.get("on") or join
    inner = on
    while isinstance(inner, exp.Paren):
        inner = inner.this
    if not isinstance(inner, exp.EQ) or not all(isinstance(x, exp.Column) for x in (inner.this, inner.expression)):
        raise _refuse(
            "a join condition must be one equality of a dataset column with a public table's key",
            join,
            sql,
            hint=f"write {allowed}",
            node=on,
        )
    left, right = inner.this, inner.expression
    sides = [_side_of(c, policy.columns, public_cols, private, public) for c in (left, right)]
    if sorted(s or "" for s in sides) != ["private", "public"]:
        raise _refuse(
            "the join condition must relate a column of the dataset to a column of the public table (qualify both)",
            join,
            sql,
            hint=f"write {allowed}",
            node=on,
        )
    mine, theirs = (left, right) if sides[0] == "private" else (right, left)
    public_key = theirs.name.lower()
    if public_key not in public_cols:
        raise reject(f"the public table has no column {public_key!r}", "unknown_column", theirs, sql)
    private_key = mine.name.lower()
    if not policy.names_column(private_key):
        check_column(_unqualified(mine, private_key), policy, sql, labeling=False)
    return private_key, public_key, on, mine


def _unqualified(node: exp.Expr, name: str) -> exp.Column:
    """The dataset's column `name` as an unqualified reference placed where `node` is in the text."""
    identifier = exp.to_identifier(name)
    positions = [n.meta for n in node.walk() if n.meta and "start" in n.meta]
    if positions:
        identifier.meta.update(start=min(m["start"] for m in positions), end=max(m["end"] for m in positions))
    return exp.Column(this=identifier)


def _check_types(mine: Column, theirs: Column, private_key: str, public_key: str, node: exp.Expr, sql: str) -> None:
    a, b = column_type(mine), column_type(theirs)
    if a.type == b.type:
        return
    if mine.type in NUMERIC_TYPES and theirs.type in NUMERIC_TYPES:
        # An int is compared with a float as a double: beyond ±2**53 distinct ints can be one double, and one private
        # row would join several rows of a key checked unique as ints. Within ±2**53 (a bounded int range, see
        # `int_range`) every int is exactly one double.
        whole = a if a.type is SqlType.INT else b
        if whole.bounded:
            return
        raise reject(
            f"the join columns differ in type: {private_key} is {mine.type.value}, {public_key} is "
            f"{theirs.type.value}, and the int's values are not known to lie within ±2**53, where a number compares "
            "with exactly one int",
            "type_error",
            node,
            sql,
            hint="join columns of the same type, or declare bounds for the int column",
        )
    raise reject(
        f"the join columns differ in type: {private_key} is {mine.type.value}, {public_key} is {theirs.type.value}",
        "type_error",
        node,
        sql,
        hint="join columns of the same type (the policy declares them)",
    )


def _derived_names(policy: Policy, public_cols: dict[str, Column], table: str) -> dict[str, str]:
    """Each public column's name in the joined table: its own, or `<table>__<column>` (with more underscores while
    that is taken) if the dataset has a column of that name."""
    out: dict[str, str] = {}
    for c in public_cols:
        name, sep = c, "__"
        while name in policy.columns or name in out.values() or (name != c and name in public_cols):
            name, sep = f"{table}{sep}{c}", sep + "_"
        out[c] = name
    return out


def _rewrite_columns(
    select: exp.Select,
    policy: Policy,
    public_cols: dict[str, Column],
    names: dict[str, str],
    private: set[str],
    public: set[str],
    sql: str,
    using: list[str],
) -> None:
    """Columns of the public table (qualified by its name or alias, or unqualified and not a dataset column) become
    the joined table's columns, keeping their place in the text; an unqualified name of both tables is ambiguous,
    but for the USING column, which is the dataset's."""
    aliases = {i.alias.lower() for i in select.expressions if isinstance(i, exp.Alias)}
    for col in list(select.find_all(exp.Column)):
        if not isinstance(col.this, exp.Identifier):
            continue
        table, name = (col.table or "").lower(), col.name.lower()
        if table and table in public:
            if name not in public_cols:
                raise reject(f"the public table has no column {name!r}", "unknown_column", col, sql)
        elif table or name not in public_cols or name in using:
            continue
        elif name in policy.columns and policy.names_column(name):
            raise reject(
                f"column {name!r} is in both tables",
                "ambiguous_column",
                col,
                sql,
                hint=f"qualify it with the table's name or alias, e.g. {sorted(public)[0]}.{name}",
            )
        elif name in aliases:
            continue
        start, end = span(col, sql)
        identifier = exp.to_identifier(names[name])
        if start is not None and end is not None:
            identifier.meta.update(start=start, end=end - 1)
        new: exp.Expr = exp.Column(this=identifier)
        if names[name] != name and col.parent is select and col.arg_key == "expressions":
            new = exp.alias_(new, name)  # a selected column keeps its own name as the output's
        col.replace(new)
