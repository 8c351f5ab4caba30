"""Public group lists written in the query: the one join Bastion accepts, ZetaSQL's public-groups form, in which
the query itself lists the keys a GROUP BY releases.

    SELECT g.region, COUNT(*) FROM visits v
    RIGHT OUTER JOIN (SELECT DISTINCT region FROM UNNEST(['north', 'south']) AS region) g ON v.region = g.region
    GROUP BY g.region

The public table is written with literals only: `(SELECT DISTINCT x FROM UNNEST([...]) AS x)` (also over
`UNNEST(GENERATE_ARRAY(lo, hi[, step]))`, as ZetaSQL's own tests write the days of the week), `(VALUES (1), (2)) AS
g(x)`, `(SELECT 1 AS x UNION ALL SELECT 2 ...)` or `UNNEST([...]) AS x`. It is joined by an outer join that keeps
all its rows: `<dataset> RIGHT [OUTER] JOIN <list>`, or `<list> LEFT [OUTER] JOIN <dataset>`, on an equality of its
column with a column or row expression of the dataset (either way round), or `USING (col)`. Several lists, one per
key, chain further RIGHT JOINs. Every other join stays refused.

The parse stage (`read_public_groups`) turns the form back into one SELECT over the dataset, the listed column
replaced by the dataset's expression everywhere, and keeps the lists. The planner (`listed_domain`,
`listed_filter`) types each list against its key, gives the key that list as its public domain (the released keys
are exactly the listed ones: an empty group is released with noise, and nothing is selected, so no δ: the keys are
public because the query wrote them), and filters the rows to the listed keys, which depends on the row alone.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from sqlglot import exp

from policies.errors import QueryRejected
from policies.expressions import reject, span
from policies.sqltypes import SqlType, canonical, sql_type_name
from policies.typecheck import eager_logic

if TYPE_CHECKING:
    from gateway.sql.plan import GroupKey

# The form named in the hints of refused joins.
PUBLIC_GROUPS_FORM = (
    "FROM <dataset> RIGHT OUTER JOIN (SELECT DISTINCT k FROM UNNEST(['a', 'b']) AS k) ON <column> = k GROUP BY k"
)
JOIN_HINT = (
    "query one dataset at a time; to release a list of groups, join it as a public table: "
    f"{PUBLIC_GROUPS_FORM} (or VALUES, or SELECT 'a' AS k UNION ALL SELECT 'b'); or group by a column with a public "
    "domain or a CASE over it"
)
CROSS_UNNEST_HINT = (
    "CROSS JOIN UNNEST(...) with a WHERE equality is not ZetaSQL's public-groups form (and would drop the empty "
    f"groups): write {PUBLIC_GROUPS_FORM}"
)
_REASON = "public_groups"
# The integers every engine's BIGINT holds: an integer key is compared with its listed values as BIGINTs.
BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
# Values one query may list (all its lists together): each is a literal of the row filter every measurement's
# FILTER repeats, so the size of the generated statements grows with them (1,000 values and three measures compile
# in under a second; 10,000 take seconds, benchmarks/public_groups.py). Larger key sets are the policy's domains,
# bins of a bounded column, or private key selection.
MAX_LISTED_GROUPS = 1_000


@dataclass(frozen=True)
class Value:
    """One listed value as written: its kind (number, string, date, bool), its text or value, and the node that
    shows where it is."""

    kind: str
    value: Any
    node: exp.Expr


@dataclass(frozen=True)
class Listed:
    """One public-groups join: the dataset's key expression it compares with (qualifiers of the dataset dropped),
    the public column's name, the listed values and the public table (for spans)."""

    key: exp.Expr
    name: str
    values: tuple[Value, ...]
    table: exp.Expr


@dataclass(frozen=True)
class PublicGroups:
    lists: tuple[Listed, ...]
    normalized_sql: str  # of the query as written (the lists are part of what it asks)


def _side(join: exp.Join) -> str:
    return (join.side or "").upper()


def _kind(join: exp.Join) -> str:
    return (join.kind or "").upper()


def _outer(join: exp.Join, side: str) -> bool:
    return _side(join) == side and _kind(join) in ("", "OUTER")


def _public_like(node: exp.Expr) -> bool:
    """A relation that can only be a public list: a subquery, VALUES or UNNEST (never a dataset's table)."""
    return isinstance(node, exp.Subquery | exp.Values | exp.Unnest)


def join_hint(join: exp.Expr) -> str:
    """The hint of a refused join: the public-groups form, said outright for a CROSS JOIN UNNEST."""
    if isinstance(join, exp.Join) and _kind(join) == "CROSS" and isinstance(join.this, exp.Unnest):
        return CROSS_UNNEST_HINT
    return JOIN_HINT


def read_public_groups(select: exp.Select, sql: str) -> PublicGroups | None:
    """If every join of the SELECT is a public-groups join, rewrite the SELECT in place into one SELECT over the
    dataset and return the lists; otherwise leave it as it is (the parse stage refuses the join) and return None.
    A join of the form with something wrong inside (a value that is not a literal, NULL, an ON that is not an
    equality with the listed column) is refused here, with its span."""
    joins: list[exp.Join] = list(select.args.get("joins") or [])
    from_ = select.args.get("from_") or select.args.get("from")
    if not joins or from_ is None or select.args.get("laterals"):
        return None
    first = from_.this
    pairs: list[tuple[exp.Expr, exp.Join]] = []  # (public table, the join whose condition relates it)
    private: exp.Table
    if isinstance(first, exp.Table) and all(_outer(j, "RIGHT") and _public_like(j.this) for j in joins):
        private = first
        pairs = [(j.this, j) for j in joins]
    elif (
        _public_like(first)
        and isinstance(joins[0].this, exp.Table)
        and _outer(joins[0], "LEFT")
        and all(_outer(j, "RIGHT") and _public_like(j.this) for j in joins[1:])
    ):
        private = joins[0].this
        pairs = [(first, joins[0])] + [(j.this, j) for j in joins[1:]]
    else:
        return None
    names = {private.name.lower()} | ({private.alias.lower()} if private.alias else set())
    normalized = select.sql(dialect="duckdb", normalize=True)
    lists: list[Listed] = []
    replacements: list[tuple[str | None, str, exp.Expr]] = []
    for table, join in pairs:
        table_alias, column, values = _listed_values(table, sql)
        key = _key_side(join, table_alias, column, table, sql)
        unqualified = _unqualified(key, names)
        lists.append(Listed(unqualified, column, tuple(values), table))
        replacements.append((table_alias, column, key))
    written = sum(len(g.values) for g in lists)
    if written > MAX_LISTED_GROUPS:
        start, end = values_span(max(lists, key=lambda g: len(g.values)), sql)
        raise QueryRejected(
            f"the query lists {written:,} groups; at most {MAX_LISTED_GROUPS:,}",
            reason=_REASON,
            sql=sql,
            start=start,
            end=end,
            hint="list fewer groups; for more keys, group by the column itself (its policy domain, bins of a "
            "bounded column, or private key selection)",
        )
    select.set("from_" if "from_" in exp.Select.arg_types else "from", exp.From(this=private.copy()))
    select.set("joins", None)
    _substitute(select, replacements)
    return PublicGroups(tuple(lists), normalized)


# --- the public table -------------------------------------------------------------------------------------


def _listed_values(table: exp.Expr, sql: str) -> tuple[str | None, str, list[Value]]:
    """The public table's alias (None without one), its one column's name and its values."""
    alias = table.args.get("alias")
    alias_name = alias.name.lower() if isinstance(alias, exp.TableAlias) and alias.name else None
    alias_columns = [c.name.lower() for c in alias.columns] if isinstance(alias, exp.TableAlias) else []
    if isinstance(table, exp.Values):
        return alias_name, *_values_table(table, alias_columns, sql)
    if isinstance(table, exp.Unnest):
        column, values = _unnest(table, sql)
        if alias_columns:  # UNNEST([...]) AS g(x)
            return alias_name, alias_columns[0], values
        return None, column, values  # UNNEST([...]) AS x: x names the column
    inner = table.this if isinstance(table, exp.Subquery) else table
    if alias_columns:
        raise reject(
            "a listed groups table names its column inside: (SELECT ... AS k ...) AS g",
            _REASON,
            alias,
            sql,
            hint=f"write {PUBLIC_GROUPS_FORM}",
        )
    if isinstance(inner, exp.Union):
        column, values = _union(inner, sql)
        return alias_name, column, values
    if isinstance(inner, exp.Select):
        column, values = _select(inner, sql)
        return alias_name, column, values
    raise _not_a_list(table, sql)


def _not_a_list(node: exp.Expr, sql: str) -> QueryRejected:
    return reject(
        "a public groups table must list its keys as literals (it cannot read a dataset)",
        _REASON,
        node,
        sql,
        hint=f"write {PUBLIC_GROUPS_FORM}, or (VALUES ('a'), ('b')) AS g(k), or (SELECT 'a' AS k UNION ALL "
        "SELECT 'b') g",
    )


def _values_table(values: exp.Values, columns: list[str], sql: str) -> tuple[str, list[Value]]:
    if len(columns) != 1:
        raise reject(
            "a VALUES list of groups names its one column: (VALUES (1), (2)) AS g(k)",
            _REASON,
            values,
            sql,
            hint="list one key per row and name the column",
        )
    out: list[Value] = []
    for row in values.expressions:
        items = row.expressions if isinstance(row, exp.Tuple) else [row]
        if len(items) != 1:
            raise reject("a VALUES list of groups has one column", _REASON, row, sql, hint="list one key per row")
        out.append(_literal(items[0], sql))
    return columns[0], out


def _unnest(unnest: exp.Unnest, sql: str) -> tuple[str, list[Value]]:
    alias = unnest.args.get("alias")
    name = alias.name.lower() if isinstance(alias, exp.TableAlias) and alias.name else ""
    if len(unnest.expressions) != 1 or unnest.args.get("offset") or not name:
        raise reject(
            "UNNEST of one literal array, named: UNNEST([...]) AS k",
            _REASON,
            unnest,
            sql,
            hint=f"write {PUBLIC_GROUPS_FORM}",
        )
    array = unnest.expressions[0]
    if isinstance(array, exp.Array):
        return name, [_literal(v, sql) for v in array.expressions]
    generated = _generate_array(array, sql)
    if generated is not None:
        return name, generated
    raise reject(
        "UNNEST of a literal array ([1, 2, 3]) or of GENERATE_ARRAY(low, high[, step]) of integer literals",
        _REASON,
        array,
        sql,
        hint=f"write {PUBLIC_GROUPS_FORM}",
    )


def _generate_array(node: exp.Expr, sql: str) -> list[Value] | None:
    """GENERATE_ARRAY(low, high[, step]) of integer literals (at most MAX_LISTED_GROUPS values, at least one);
    None if it is not such a call."""
    if not isinstance(node, exp.Anonymous) or str(node.this).lower() != "generate_array":
        return None
    found = [_integer(a) for a in node.expressions]
    args = [a for a in found if a is not None]
    if not 2 <= len(args) == len(found) <= 3:
        return None
    low, high = args[0], args[1]
    step = args[2] if len(args) == 3 else 1
    beyond = next((a for a, v in zip(node.expressions, args, strict=True) if not _in_bigint(v)), None)
    if beyond is not None:
        raise reject(
            f"GENERATE_ARRAY takes BIGINT arguments; {_shown(beyond)} is beyond [{BIGINT_MIN:,}, {BIGINT_MAX:,}]",
            "type_error",
            beyond,
            sql,
            hint="list integers within the BIGINT range",
        )
    if step == 0:
        return None
    count = max(0, math.floor((high - low) / step) + 1)
    if not 0 < count <= MAX_LISTED_GROUPS:
        raise reject(
            f"{node.sql(dialect='duckdb')} lists {count:,} groups; a query lists 1 to {MAX_LISTED_GROUPS:,}",
            _REASON,
            node,
            sql,
            hint="list fewer groups, or leave the key to private key selection",
        )
    return [Value("number", str(low + i * step), node) for i in range(count)]


def _integer(node: exp.Expr) -> int | None:
    """An integer literal's value (ASCII digits, any sign), None for anything else. Its magnitude is not checked
    here (GENERATE_ARRAY does that): at most 20 digits are converted, so no text is too long for `int`."""
    negative = False
    while isinstance(node, exp.Neg | exp.Paren):
        negative ^= isinstance(node, exp.Neg)
        node = node.this
    if not isinstance(node, exp.Literal) or node.is_string:
        return None
    digits = str(node.this).lstrip("0") or "0"
    if not (digits.isascii() and digits.isdigit()):
        return None
    value = int(digits) if len(digits) <= 20 else 10**20  # any value beyond BIGINT stands for all of them
    return -value if negative else value


def _union(union: exp.Union, sql: str) -> tuple[str, list[Value]]:
    """SELECT a AS k UNION [ALL] SELECT b [UNION ...]: each side one literal, no FROM; the first names the column."""
    selects: list[exp.Expr] = []
    stack: list[exp.Expr] = [union]
    while stack:
        node = stack.pop()
        if isinstance(node, exp.Union):
            if node.args.get("order") or node.args.get("limit") or node.args.get("offset"):
                raise _not_a_list(node, sql)
            stack.extend([node.expression, node.this])  # left first
        elif isinstance(node, exp.Subquery):
            stack.append(node.this)
        else:
            selects.append(node)
    out: list[Value] = []
    column = ""
    for i, s in enumerate(selects):
        if not isinstance(s, exp.Select) or _clauses(s, allowed=()) or len(s.expressions) != 1:
            raise _not_a_list(s, sql)
        item = s.expressions[0]
        if i == 0:
            if not isinstance(item, exp.Alias):
                raise reject(
                    "the first SELECT of a list of groups names its column: SELECT 'a' AS k UNION ALL ...",
                    _REASON,
                    item,
                    sql,
                    hint="name the column with AS",
                )
            column = item.alias.lower()
        out.append(_literal(item.this if isinstance(item, exp.Alias) else item, sql))
    return column, out


def _clauses(select: exp.Select, allowed: tuple[str, ...]) -> list[str]:
    """The clauses a SELECT has beyond its list and those allowed."""
    present = [k for k, v in select.args.items() if v and k not in ("expressions", *allowed)]
    return [k for k in present if k not in ("kind",)]


def _select(select: exp.Select, sql: str) -> tuple[str, list[Value]]:
    """SELECT [DISTINCT] k FROM UNNEST([...]) AS k, SELECT [DISTINCT] k FROM (VALUES ...) AS g(k), or SELECT 'a' AS k
    (a list of one)."""
    from_ = select.args.get("from_") or select.args.get("from")
    extra = [k for k in _clauses(select, allowed=("from_", "from", "distinct")) if k]
    distinct = select.args.get("distinct")
    if extra or len(select.expressions) != 1 or (distinct is not None and distinct.args.get("on")):
        raise _not_a_list(select, sql)
    item = select.expressions[0]
    if from_ is None:
        if not isinstance(item, exp.Alias):
            raise reject("a list of groups names its column: SELECT 'a' AS k", _REASON, item, sql, hint="add AS k")
        return item.alias.lower(), [_literal(item.this, sql)]
    source = from_.this
    if isinstance(source, exp.Unnest):
        column, values = _unnest(source, sql)
    elif isinstance(source, exp.Values) or (isinstance(source, exp.Subquery) and isinstance(source.this, exp.Values)):
        alias = source.args.get("alias")
        columns = [c.name.lower() for c in alias.columns] if isinstance(alias, exp.TableAlias) else []
        column, values = _values_table(source if isinstance(source, exp.Values) else source.this, columns, sql)
    else:
        raise _not_a_list(source, sql)
    target = item.this if isinstance(item, exp.Alias) else item
    if not isinstance(target, exp.Column) or target.name.lower() != column:
        raise reject(f"select the listed column {column!r}", _REASON, item, sql, hint=f"write SELECT DISTINCT {column}")
    return (item.alias.lower() if isinstance(item, exp.Alias) else column), values


def _literal(node: exp.Expr, sql: str) -> Value:
    """A listed value: a number, a string, a DATE '...' or TRUE/FALSE literal. NULL and anything else is refused."""
    inner = node
    while isinstance(inner, exp.Paren):
        inner = inner.this
    if isinstance(inner, exp.Null):
        raise reject(
            "NULL cannot be a listed group",
            _REASON,
            node,
            sql,
            hint="list values only; rows whose key is NULL are in no listed group",
        )
    if isinstance(inner, exp.Boolean):
        return Value("bool", bool(inner.this), node)
    if isinstance(inner, exp.Literal):
        return Value("string" if inner.is_string else "number", str(inner.this), node)
    if isinstance(inner, exp.Neg) and isinstance(inner.this, exp.Literal) and not inner.this.is_string:
        return Value("number", f"-{inner.this.this}", node)
    if (
        isinstance(inner, exp.Cast)
        and isinstance(inner.this, exp.Literal)
        and inner.this.is_string
        and inner.to.is_type(exp.DataType.Type.DATE)
    ):
        return Value("date", str(inner.this.this), node)
    raise reject(
        "a listed group must be a literal (a number, a string, a date or a boolean)",
        _REASON,
        node,
        sql,
        hint="list the keys themselves, e.g. UNNEST(['north', 'south'])",
    )


# --- the join condition -----------------------------------------------------------------------------------


def _key_side(join: exp.Join, alias: str | None, column: str, table: exp.Expr, sql: str) -> exp.Expr:
    """The dataset's side of the join's equality with the listed column."""
    using = join.args.get("using")
    on = join.args.get("on")
    if using:
        cols = [u.name.lower() for u in using]
        if cols != [column]:
            raise reject(
                f"USING names the listed column alone: USING ({column})",
                _REASON,
                join,
                sql,
                hint=f"write USING ({column}) or ON <column> = {column}",
            )
        return exp.column(column)
    condition = on
    while isinstance(condition, exp.Paren):
        condition = condition.this
    if not isinstance(condition, exp.EQ):
        raise reject(
            "a public groups join is ON one equality of the listed column with an expression of the dataset",
            _REASON,
            on if on is not None else table,
            sql,
            hint=f"write ON <column> = {alias + '.' if alias else ''}{column}",
        )
    left: exp.Expr = condition.this
    right: exp.Expr = condition.expression

    def public(node: exp.Expr) -> bool:
        if not isinstance(node, exp.Column) or node.name.lower() != column:
            return False
        qualifier = node.table.lower() if node.table else ""
        return qualifier == alias if qualifier else True

    def mentions_public(node: exp.Expr) -> bool:
        return any(
            isinstance(c, exp.Column) and alias is not None and c.table and c.table.lower() == alias
            for c in node.walk()
        )

    if public(left) and not public(right) and not mentions_public(right):
        return right
    if public(right) and not public(left) and not mentions_public(left):
        return left
    raise reject(
        "a public groups join compares the listed column with an expression of the dataset",
        _REASON,
        on,
        sql,
        hint=f"write ON <column> = {alias + '.' if alias else ''}{column}",
    )


def _unqualified(node: exp.Expr, names: set[str]) -> exp.Expr:
    """A copy with the dataset's qualifiers dropped (as `parse.drop_qualifiers` does for the whole SELECT)."""
    out = node.copy()
    for col in list(out.find_all(exp.Column)):
        if col.table.lower() in names and not col.catalog:
            col.set("table", None)
            col.set("db", None)
    return out


def _substitute(select: exp.Select, replacements: list[tuple[str | None, str, exp.Expr]]) -> None:
    """Every reference to a listed column becomes the dataset's expression it equals; a SELECT item that was the
    listed column keeps its name."""

    def target(col: exp.Column) -> exp.Expr | None:
        qualifier = col.table.lower() if col.table else ""
        for alias, column, key in replacements:
            if col.name.lower() == column and (qualifier == alias if qualifier else True):
                return key
        return None

    items = []
    for item in select.expressions:
        if isinstance(item, exp.Column) and target(item) is not None:
            item = exp.alias_(item, item.name)
        items.append(item)
    select.set("expressions", items)

    def transform(node: exp.Expr) -> exp.Expr:
        if isinstance(node, exp.Column):
            key = target(node)
            if key is not None:
                return key.copy()
        return node

    for arg in ("expressions", "where", "group", "having", "order"):
        value = select.args.get(arg)
        if isinstance(value, list):
            select.set(arg, [v.transform(transform, copy=False) for v in value])
        elif isinstance(value, exp.Expr):
            select.set(arg, value.transform(transform, copy=False))


# --- typing against the key, the domain and the row filter --------------------------------------------------


def values_span(listed: Listed, sql: str) -> tuple[int | None, int | None]:
    """Where the listed values are in the text: from the first to the last (a GENERATE_ARRAY call, if so listed)."""
    first, last = span(listed.values[0].node, sql), span(listed.values[-1].node, sql)
    return first[0], last[1]


def listed_domains(groups: PublicGroups | None, keys: list[tuple[exp.Expr, SqlType]], sql: str) -> dict[int, list[Any]]:
    """The public domain of each GROUP BY key the query lists, by the key's position: its listed values, typed as
    the key. `keys` are the planner's keys as written (after the rewrite) and their types. A list whose column is
    not a key of its own is refused."""
    if groups is None:
        return {}
    out: dict[int, list[Any]] = {}
    for listed in groups.lists:
        at = next((i for i, (expr, _) in enumerate(keys) if expr == listed.key), None)
        if at is None or at in out:
            raise reject(
                f"the listed column {listed.name!r} must be a GROUP BY key of its own"
                if at is None
                else "one list of groups per GROUP BY key",
                _REASON,
                listed.table,
                sql,
                hint=f"add GROUP BY {listed.name}" if at is None else "list a key's groups once",
            )
        out[at] = listed_domain(listed, keys[at][1], sql)
    return out


def refuse_listed_total(groups: PublicGroups | None, total: int, limit: int, sql: str) -> None:
    """Refuse a query whose listed keys make more groups than Bastion enumerates (with the planner's other public
    domains): listed keys are released as listed or not at all, never selected privately."""
    if groups is None:
        return
    start, end = values_span(max(groups.lists, key=lambda g: len(g.values)), sql)
    raise QueryRejected(
        f"the listed groups make {total:,} groups; at most {limit:,}",
        reason=_REASON,
        sql=sql,
        start=start,
        end=end,
        hint="list fewer groups",
    )


def listed_filter(where: exp.Expr | None, keys: list[tuple[GroupKey, list[Any]]]) -> exp.Expr | None:
    """The WHERE condition's total form and `key IN (<listed>)` for each listed key (`keys`: the planner's
    GroupKey and its listed domain), every one evaluated on every row: the rows of unlisted keys are in no released
    group. Applied as WHERE is, to the pre-bounded table: it depends on the row alone."""
    parts = [where] if where is not None else []
    parts += [listed_condition(key.tree, domain, key.typed.type) for key, domain in keys]
    if len(parts) <= 1:
        return parts[0] if parts else None
    return eager_logic(parts, conjunction=True)


def listed_domain(listed: Listed, key_type: SqlType, sql: str) -> list[Any]:
    """The listed values typed as the key's type, deduplicated and in the order public domains are kept (a value
    of another type is refused with its span, before anything is charged)."""
    found = {_typed(v, key_type, sql) for v in listed.values}
    return sorted(found, key=lambda v: (str(type(v)), v))


def _in_bigint(value: int | Decimal) -> bool:
    return BIGINT_MIN <= value <= BIGINT_MAX


def _value_span(node: exp.Expr, sql: str) -> tuple[int | None, int | None]:
    """Where a listed value is in the text: a `DATE '...'` literal from its keyword and a negative number from its
    sign (the tree places the quoted text and the digits only), anything else as `span` finds it."""
    inner = node
    while isinstance(inner, exp.Paren):
        inner = inner.this
    if isinstance(inner, exp.Cast | exp.Neg) and isinstance(inner.this, exp.Literal):
        start, end = span(inner.this, sql)
        if start is not None:
            before = sql[:start].rstrip()
            word = "DATE" if isinstance(inner, exp.Cast) else "-"
            if before[-len(word) :].upper() == word:
                start = len(before) - len(word)
        return start, end
    return span(node, sql)


def _typed(v: Value, t: SqlType, sql: str) -> Any:
    def mismatch(what: str) -> QueryRejected:
        start, end = _value_span(v.node, sql)
        return QueryRejected(
            f"the listed group {_shown(v.node)} is not {what}, the type of the key it is compared with",
            reason="type_error",
            sql=sql,
            start=start,
            end=end,
            hint="list values of the key's type",
        )

    if t is SqlType.INT:
        try:
            number = Decimal(str(v.value)) if v.kind == "number" else None
        except InvalidOperation:
            number = None
        if number is None or not number.is_finite():
            raise mismatch("an integer")
        # The range first: the engine casts every listed value to BIGINT (after the charge, where an error would
        # fail the release), and an integer too large for that is also too large to convert cheaply (1e999999).
        if not _in_bigint(number):
            raise mismatch(f"a BIGINT (an integer in [{BIGINT_MIN:,}, {BIGINT_MAX:,}])")
        if number != number.to_integral_value():
            raise mismatch("an integer")
        return canonical(int(number), t)
    if t is SqlType.FLOAT:
        if v.kind != "number" or not math.isfinite(float(v.value)):
            raise mismatch("a number")
        return canonical(float(v.value), t)
    if t is SqlType.TEXT:
        if v.kind != "string":
            raise mismatch("a string")
        return v.value
    if t is SqlType.DATE:
        if v.kind not in ("date", "string"):
            raise mismatch("a date")
        try:
            return dt.date.fromisoformat(str(v.value))
        except ValueError:
            raise mismatch("a date (YYYY-MM-DD)") from None
    if t is SqlType.BOOL:
        if v.kind != "bool":
            raise mismatch("a boolean")
        return bool(v.value)
    raise mismatch(f"a {t.value} key")


def _shown(node: exp.Expr) -> str:
    """A listed value as the message quotes it: at most 40 characters of it."""
    text = node.sql(dialect="duckdb")
    return text if len(text) <= 40 else f"{text[:37]}..."


def _value_literal(value: Any, t: SqlType) -> exp.Expr:
    """A typed domain value as a literal (a date as its ISO text), cast to the key's SQL type where it is used."""
    if t is SqlType.BOOL:
        return exp.Boolean(this=bool(value))
    if t is SqlType.INT:
        return exp.Literal.number(int(value))
    if t is SqlType.FLOAT:
        return exp.Literal.number(repr(float(value)))
    return exp.Literal.string(value.isoformat() if t is SqlType.DATE else str(value))


def listed_condition(key: exp.Expr, domain: list[Any], t: SqlType) -> exp.Expr:
    """`CAST(key AS T) IN (CAST(v1 AS T), ...)` over the key's total form: the rows whose key is listed, compared in
    the one SQL type every engine casts that key to (as the measurement statement groups it). It is built here,
    not type-checked again: the key is checked and each value typed as the key already (a list is longer than the
    checker's limit on the size of an expression)."""
    to = exp.DataType.build(sql_type_name(t))
    return exp.In(
        this=exp.Cast(this=key.copy(), to=to.copy()),
        expressions=[exp.Cast(this=_value_literal(v, t), to=to.copy()) for v in domain],
    )
