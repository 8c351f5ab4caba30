"""Parsing and validation of row-level SQL expressions against a policy.

The same validator serves WHERE clauses, GROUP BY keys and labeling-function conditions: an expression may
reference usable columns (labeling-only columns inside labeling functions) and the functions of the typed
allowlist in `policies.typecheck`, which also compiles it to a total form that no row value can make fail.
Anything else raises QueryRejected pointing at the offending span, before anything is charged.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

from policies.errors import QueryRejected, SqlSyntaxError
from policies.schema import Policy, Usage
from policies.sqltypes import SqlType, Typed, column_type

_VOLATILE = tuple(
    getattr(exp, n) for n in ("Rand", "CurrentDate", "CurrentTimestamp", "CurrentTime", "Uuid") if hasattr(exp, n)
)
_VOLATILE_NAMES = {
    "random",
    "rand",
    "setseed",
    "now",
    "gen_random_uuid",
    "uuid",
    "current_timestamp",
    "current_date",
    "today",
    "get_current_time",
    "get_current_timestamp",
    "nextval",
    "currval",
    "transaction_timestamp",
    "current_time",
    "localtime",
    "localtimestamp",
    "random_uuid",
    "uuidv4",
    "uuidv7",
}


MAX_NESTING = 64  # parentheses deep; deeper text is refused before the parser recurses into it
MAX_STATEMENT_NODES = 10_000  # syntax nodes in one statement, checked right after parsing, before planning


def _parentheses(text: str, start: int = 0) -> Iterator[tuple[int, int]]:
    """(offset, depth after it) of every parenthesis outside quotes, from `start` on."""
    depth = 0
    quote = None
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "()":
            depth += 1 if ch == "(" else -1
            yield i, depth


def _nesting(text: str) -> int:
    return max((depth for _, depth in _parentheses(text)), default=0)


def parse_statements(text: str) -> list[exp.Expr]:
    """Parse SQL text (DuckDB dialect) into statements, or raise SqlSyntaxError pointing at the problem."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SqlSyntaxError(
            f"the text is not valid Unicode (a lone surrogate at offset {exc.start})", reason="syntax"
        ) from None
    if _nesting(text) > MAX_NESTING:
        raise QueryRejected(
            f"the query nests parentheses more than {MAX_NESTING} deep",
            reason="too_complex",
            hint="write a flatter expression",
        )
    try:
        statements = [s for s in sqlglot.parse(text, read="duckdb") if s is not None]
    except ParseError as exc:
        err = exc.errors[0] if exc.errors else {}
        start = None
        if "line" in err and "col" in err:
            lines = text.split("\n")
            start = sum(len(x) + 1 for x in lines[: err["line"] - 1]) + max(err["col"] - 1, 0)
            start = max(0, start - len(err.get("highlight") or "") + 1)
        raise SqlSyntaxError(
            f"SQL syntax error: {str(err.get('description', exc)).split(' <Token')[0]}",
            reason="syntax",
            sql=text,
            start=start,
            end=None if start is None else start + len(err.get("highlight") or ""),
        ) from None
    except TokenError as exc:
        raise SqlSyntaxError(f"SQL syntax error: {exc}", reason="syntax") from None
    except RecursionError:
        raise QueryRejected(
            "the query is too deeply nested", reason="too_complex", hint="write a flatter expression"
        ) from None
    for statement in statements:
        # The planner copies and renders whole trees; a tree this large is refused before it gets there.
        size = sum(1 for _ in itertools.islice(statement.walk(), MAX_STATEMENT_NODES + 1))
        if size > MAX_STATEMENT_NODES:
            raise QueryRejected(
                f"the statement has more than {MAX_STATEMENT_NODES:,} syntax nodes",
                reason="too_complex",
                hint="split the question into simpler queries",
            )
    return statements


def span(node: exp.Expr, sql: str) -> tuple[int | None, int | None]:
    """Start and end offsets of a node in the original text, from sqlglot's token positions."""
    positions = [n.meta for n in node.walk() if n.meta and "start" in n.meta]
    if not positions:
        # No token position recorded (keywords such as DISTINCT, CURRENT_DATE, SHOW): find the text itself.
        low = sql.lower()
        for needle in (node.sql(dialect="duckdb"), func_name(node).replace("_", " "), func_name(node)):
            at = low.find(needle.lower()) if needle else -1
            if at != -1:
                return at, at + len(needle)
        return None, None
    start = min(m["start"] for m in positions)
    end = max(m["end"] for m in positions) + 1
    if isinstance(node, exp.Func):
        if not node.meta:  # the name token has no position: find the name before the first argument
            name = node.sql_name() if not isinstance(node, exp.Anonymous) else str(node.this)
            at = sql.lower().rfind(name.lower(), 0, start)
            if at != -1:
                start = at
        end = _closing_paren(sql, start, end)
    unplaced = sum(1 for n in node.walk() if isinstance(n, exp.Boolean | exp.Null))
    if unplaced:
        start, end = _keyword_literals(sql, start, end, unplaced)
    # A subquery is shown with its parentheses and SELECT keyword, which carry no position of their own.
    return balanced(
        sql,
        start,
        end,
        enclosed=isinstance(node, exp.Subquery) or (isinstance(node, exp.Select) and node.parent is not None),
    )


_KEYWORD_LITERALS = {TokenType.TRUE, TokenType.FALSE, TokenType.NULL}
_OPERATORS = {
    TokenType.EQ,
    TokenType.NEQ,
    TokenType.GT,
    TokenType.GTE,
    TokenType.LT,
    TokenType.LTE,
    TokenType.NULLSAFE_EQ,
    TokenType.IS,
    TokenType.NOT,
}


def _keyword_literals(sql: str, start: int, end: int, count: int) -> tuple[int, int]:
    """The span grown over up to `count` TRUE, FALSE or NULL literals next to it, with the operators between: those
    literals record no position of their own, so a span from the tree leaves them out (`age = TRUE` was `age`)."""
    tokens = _tokens(sql)
    after = [t for t in tokens if t[1] >= end]
    before = [t for t in tokens if t[2] <= start][::-1]
    for side in (after, before):
        for kind, at, stop in side:
            if count == 0 or kind not in _KEYWORD_LITERALS | _OPERATORS:
                break
            if kind in _KEYWORD_LITERALS:
                count -= 1
                start, end = min(start, at), max(end, stop)
    return start, end


_OPENING = {TokenType.L_PAREN, TokenType.L_BRACKET, TokenType.L_BRACE}
_CLOSING = {TokenType.R_PAREN, TokenType.R_BRACKET, TokenType.R_BRACE}


@lru_cache(maxsize=4)  # the spans of one refusal read the same text; a text may be 100,000 characters long
def _tokens(sql: str) -> tuple[tuple[TokenType, int, int], ...]:
    """(type, start, end exclusive) of each token of the text, or nothing if it does not tokenize."""
    try:
        return tuple((t.token_type, t.start, t.end + 1) for t in DuckDB().tokenize(sql))
    except (TokenError, ValueError, RecursionError):
        return ()


def balanced(sql: str, start: int, end: int, *, enclosed: bool = False) -> tuple[int, int]:
    """The span [start, end) grown to balanced brackets: the nodes of a tree record the positions of their names
    and values only, so a span from them can miss an opening `(`, `[` or the closing one (`IN (1, 'a'`,
    `1,2,3]) AS x`). With `enclosed`, the span is also grown to the brackets around it (a subquery's). A bracket
    opened just after a name (a call such as `UNNEST(`) takes the name with it."""
    tokens = _tokens(sql)
    if not tokens:
        return start, end
    first = next((i for i, t in enumerate(tokens) if t[1] >= start), len(tokens))
    last = next((i for i, t in enumerate(tokens) if t[2] > end), len(tokens))  # first token past the span
    unclosed, unopened = 0, 1 if enclosed else 0
    for kind, _, _ in tokens[first:last]:
        if kind in _OPENING:
            unclosed += 1
        elif kind in _CLOSING:
            if unclosed:
                unclosed -= 1
            else:
                unopened += 1
    depth = 0
    i = first - 1
    while unopened and i >= 0:
        kind, at, _ = tokens[i]
        if kind in _CLOSING:
            depth += 1
        elif kind in _OPENING:
            if depth:
                depth -= 1
            else:
                unopened -= 1
                unclosed += 1  # its closing bracket is to be found on the right
                start = at
                if i > 0 and tokens[i - 1][2] == at and tokens[i - 1][0] not in _OPENING | _CLOSING:
                    start = tokens[i - 1][1]  # a call: the name just before the bracket
                    i -= 1
        i -= 1
    i = last
    depth = 0
    while unclosed and i < len(tokens):
        kind, _, stop = tokens[i]
        if kind in _OPENING:
            depth += 1
        elif kind in _CLOSING:
            if depth:
                depth -= 1
            else:
                unclosed -= 1
            end = max(end, stop)
        i += 1
    return start, end


def _closing_paren(sql: str, start: int, end: int) -> int:
    """End offset just past the parenthesis that closes the call starting at `start` (or `end` if none)."""
    open_at = sql.find("(", start)
    if open_at == -1:
        return end
    for i, depth in _parentheses(sql, open_at):
        if depth == 0:
            return max(end, i + 1)
    return end


def reject(message: str, reason: str, node: exp.Expr | None, sql: str, hint: str | None = None) -> QueryRejected:
    start, end = span(node, sql) if node is not None else (None, None)
    return QueryRejected(message, reason=reason, sql=sql, start=start, end=end, hint=hint)


def func_name(node: exp.Expr) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.this).lower()
    return node.sql_name().lower() if isinstance(node, exp.Func) else type(node).__name__.lower()


def check_column(col: exp.Column, policy: Policy, sql: str, *, labeling: bool) -> str:
    """Resolve a column reference; raise if it is unknown or not usable here."""
    name = col.name.lower()
    if col.table and col.table.lower() not in {policy.dataset}:
        raise reject(f"unknown table qualifier {col.table!r}", "unknown_table", col, sql)
    spec = policy.columns.get(name)
    if spec is None or not policy.names_column(name):
        usable = sorted(policy.usable_columns(labeling=labeling))
        near = difflib.get_close_matches(name, usable, n=1, cutoff=0.6)
        hint = (f"did you mean {near[0]!r}? " if near else "") + f"usable columns: {', '.join(usable)}"
        raise reject(f"unknown column {name!r}", "unknown_column", col, sql, hint=hint)
    if name == policy.privacy_unit:
        raise reject(
            f"the privacy-unit column {name!r} cannot be used here",
            "privacy_unit_column",
            col,
            sql,
            hint=f"{name!r} can only be counted: COUNT({name}) (its rows) or COUNT(DISTINCT {name}) (the units)",
        )
    if spec.usage is Usage.LABELING and not labeling:
        raise reject(
            f"column {name!r} is usable inside labeling functions only",
            "labeling_only_column",
            col,
            sql,
            hint="use it in a labeling-function condition (POST /v1/lf/stats)",
        )
    return name


def check_no_volatile(node: exp.Expr, sql: str) -> None:
    for n in node.walk():
        if isinstance(n, _VOLATILE) or (isinstance(n, exp.Anonymous) and func_name(n) in _VOLATILE_NAMES):
            raise reject(
                f"volatile function {func_name(n).upper()}() is not allowed",
                "volatile_function",
                n,
                sql,
                hint="Bastion answers must be a deterministic function of the rows",
            )


# --- typed, total row expressions -----------------------------------------------------------------------


@dataclass(frozen=True)
class RowExpression:
    """A validated row-level expression: its type with public range, the columns it reads, and its total form
    over the pre-bounded table (quoted columns; no operation can fail on any row value)."""

    typed: Typed
    tree: exp.Expr
    columns: frozenset[str]
    # Every node of the analyst's expression with its type and public range (which sub-expression is unbounded).
    ranges: tuple[tuple[exp.Expr, Typed], ...] = field(default=(), compare=False, repr=False)

    @property
    def sql(self) -> str:
        return self.tree.sql(dialect="duckdb")


@lru_cache(maxsize=1)
def _re2_options() -> Any:
    import re2  # Google's RE2, the library DuckDB's regular expressions use

    options = re2.Options()
    options.log_errors = False
    return options


@lru_cache(maxsize=4096)
def re2_problem(pattern: str) -> str | None:
    """Why RE2 rejects `pattern`, or None: checked by the RE2 library itself on the pattern alone (public input), so
    that an invalid pattern is a 400 before any charge, never an error over the rows."""
    import re2

    try:
        re2.compile(pattern, _re2_options())
    except re2.error as exc:
        message = exc.args[0] if exc.args else ""
        return message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def _structure(node: exp.Expr, sql: str) -> None:
    """Refusals with their own reasons, before type checking: subqueries, windows, aggregates, *, volatility."""
    check_no_volatile(node, sql)
    for n in node.walk():
        if isinstance(n, exp.Subquery | exp.Select | exp.Exists):
            raise reject("subqueries are not allowed", "subquery", n, sql, hint="write one SELECT over one dataset")
        if isinstance(n, exp.Window):
            raise reject("window functions are not allowed", "window_function", n, sql)
        if isinstance(n, exp.AggFunc):
            raise reject(
                f"aggregate {func_name(n).upper()}() is not allowed in a row-level expression",
                "aggregate_in_row_expression",
                n,
                sql,
                hint="use HAVING to filter on aggregates",
            )
        if isinstance(n, exp.Star):
            raise reject("* is not allowed here", "raw_rows", n, sql)


def check_row_expression(
    node: exp.Expr,
    policy: Policy,
    sql: str,
    *,
    labeling: bool = False,
    condition: str | None = None,
    check_pattern: Callable[[str], str | None] = re2_problem,
) -> RowExpression:
    """Type-check a row-level expression against the policy's column types and compile its total form.

    `condition` names the clause when the expression must be a condition (e.g. "WHERE"). Raises QueryRejected
    with the span for anything not allowed; nothing here reads a row.
    """
    from policies.typecheck import Checker

    _structure(node, sql)
    columns: set[str] = set()

    def resolve(col: exp.Column) -> tuple[Typed, exp.Expr]:
        name = check_column(col, policy, sql, labeling=labeling)
        columns.add(name)
        return column_type(policy.columns[name]), exp.column(name, quoted=True)

    checker = Checker(sql, resolve, check_pattern=check_pattern)
    got = checker.condition(node, condition) if condition else checker.check(node)
    if got.typed.type is SqlType.INTERVAL:
        raise reject(
            "an interval is not a value of a row",
            "type_error",
            node,
            sql,
            hint="add it to a date: visit_day + INTERVAL 7 DAY",
        )
    return RowExpression(got.typed, got.tree, frozenset(columns), tuple(checker.ranges()))
