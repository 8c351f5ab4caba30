"""Validation of row-level SQL expressions against a policy.

The same validator serves WHERE clauses, GROUP BY keys and labeling-function conditions: an expression may
reference usable columns (labeling-only columns inside labeling functions) and deterministic functions only.
Anything else raises QueryRejected pointing at the offending span.
"""

from __future__ import annotations

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from policies.errors import QueryRejected, SqlSyntaxError
from policies.schema import Policy, Usage

_ROW_NODE_NAMES = """
Column Identifier Literal Null Boolean Paren Tuple Add Sub Mul Div IntDiv Mod Neg
EQ NEQ GT GTE LT LTE NullSafeEQ NullSafeNEQ And Or Not In Between Is Like ILike
Case If Coalesce Nullif Cast TryCast DataType DataTypeParam
Abs Floor Ceil Round Ln Log Exp Sqrt Pow Sign
Lower Upper Length Substring Trim Concat DPipe Left Right StrPosition Replace Contains EndsWith StartsWith
TimestampTrunc DateTrunc Extract Year Month Day DayOfWeek DayOfYear Quarter Week Var Interval DateAdd DateSub
DateDiff RegexpLike RegexpExtract Greatest Least Bracket Array BitwiseAnd BitwiseOr
""".split()
# Deterministic, row-level expression nodes that may appear in WHERE, GROUP BY and LF conditions.
_ROW_NODES: tuple[type[exp.Expression], ...] = tuple(
    getattr(exp, name) for name in _ROW_NODE_NAMES if hasattr(exp, name)
)

# Function names accepted when sqlglot parses them as anonymous calls.
_ANONYMOUS_OK = {
    "date_part", "datepart", "ends_with", "suffix", "prefix", "contains", "strlen", "lcase", "ucase",
    "regexp_full_match", "ilike_escape", "like_escape", "isnan", "isinf", "isfinite", "trunc", "even",
    "width_bucket", "bin", "date_diff", "datediff", "last_day", "dayname", "monthname", "epoch",
    "len", "list_contains", "array_contains", "string_split", "split_part", "levenshtein", "jaccard",
    "jaro_winkler_similarity", "hamming", "lpad", "rpad", "repeat", "reverse", "ltrim", "rtrim",
    "strip_accents", "to_days", "to_months", "to_years", "make_date", "greatest", "least",
}

_VOLATILE = tuple(
    getattr(exp, n) for n in ("Rand", "CurrentDate", "CurrentTimestamp", "CurrentTime", "Uuid") if hasattr(exp, n)
)
_VOLATILE_NAMES = {
    "random", "rand", "setseed", "now", "gen_random_uuid", "uuid", "current_timestamp", "current_date",
    "today", "get_current_time", "get_current_timestamp", "nextval", "currval", "transaction_timestamp",
    "current_time", "localtime", "localtimestamp", "random_uuid", "uuidv4", "uuidv7",
}


def parse_statements(text: str) -> list[exp.Expression]:
    """Parse SQL text (DuckDB dialect) into statements, or raise SqlSyntaxError pointing at the problem."""
    try:
        return [s for s in sqlglot.parse(text, read="duckdb") if s is not None]
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


def span(node: exp.Expression, sql: str) -> tuple[int | None, int | None]:
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
    return start, end


def _closing_paren(sql: str, start: int, end: int) -> int:
    """End offset just past the parenthesis that closes the call starting at `start` (or `end` if none)."""
    open_at = sql.find("(", start)
    if open_at == -1:
        return end
    depth = 0
    quote = None
    for i in range(open_at, len(sql)):
        ch = sql[i]
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return max(end, i + 1)
    return end


def reject(message: str, reason: str, node: exp.Expression | None, sql: str, hint: str | None = None) -> QueryRejected:
    start, end = span(node, sql) if node is not None else (None, None)
    return QueryRejected(message, reason=reason, sql=sql, start=start, end=end, hint=hint)


def func_name(node: exp.Expression) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.this).lower()
    return node.sql_name().lower() if isinstance(node, exp.Func) else type(node).__name__.lower()


def check_column(col: exp.Column, policy: Policy, sql: str, *, labeling: bool) -> str:
    """Resolve a column reference; raise if it is unknown or not usable here."""
    name = col.name.lower()
    if col.table and col.table.lower() not in {policy.dataset}:
        raise reject(f"unknown table qualifier {col.table!r}", "unknown_table", col, sql)
    spec = policy.columns.get(name)
    if spec is None:
        usable = ", ".join(sorted(policy.usable_columns(labeling=labeling)))
        raise reject(f"unknown column {name!r}", "unknown_column", col, sql, hint=f"usable columns: {usable}")
    if name == policy.privacy_unit:
        raise reject(
            f"the privacy-unit column {name!r} cannot be used here",
            "privacy_unit_column",
            col,
            sql,
            hint=f"the only use of {name!r} is COUNT(DISTINCT {name})",
        )
    if spec.usage is Usage.HIDDEN:
        raise reject(f"column {name!r} is hidden by the dataset's policy", "hidden_column", col, sql)
    if spec.usage is Usage.LABELING and not labeling:
        raise reject(
            f"column {name!r} is usable inside labeling functions only",
            "labeling_only_column",
            col,
            sql,
            hint="use it in a labeling-function condition (POST /v1/lf/stats)",
        )
    return name


def check_no_volatile(node: exp.Expression, sql: str) -> None:
    for n in node.walk():
        if isinstance(n, _VOLATILE) or (isinstance(n, exp.Anonymous) and func_name(n) in _VOLATILE_NAMES):
            raise reject(
                f"volatile function {func_name(n).upper()}() is not allowed",
                "volatile_function",
                n,
                sql,
                hint="Bastion answers must be a deterministic function of the rows",
            )


def validate_row_expression(node: exp.Expression, policy: Policy, sql: str, *, labeling: bool = False) -> set[str]:
    """Check a row-level expression; return the columns it references."""
    check_no_volatile(node, sql)
    columns: set[str] = set()
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
        if isinstance(n, exp.Column):
            columns.add(check_column(n, policy, sql, labeling=labeling))
        elif isinstance(n, exp.Anonymous):
            if func_name(n) not in _ANONYMOUS_OK:
                raise reject(
                    f"function {func_name(n).upper()}() is not allowed",
                    "unsupported_function",
                    n,
                    sql,
                    hint="use deterministic scalar functions (arithmetic, CASE, date_trunc, string functions)",
                )
        elif not isinstance(n, _ROW_NODES):
            raise reject(
                f"{func_name(n).upper()} is not allowed in a row-level expression",
                "unsupported_expression",
                n,
                sql,
            )
    return columns


def bounded_sql(node: exp.Expression) -> str:
    """SQL for a validated row-level expression over the pre-bounded table: quoted lower-case columns, and CAST
    turned into TRY_CAST so that no value of a row can make the query fail (an error that depends on the rows
    would leak them)."""

    def rewrite(n: exp.Expression) -> exp.Expression:
        if isinstance(n, exp.Column):
            return exp.column(n.name.lower(), quoted=True)
        if type(n) is exp.Cast:
            return exp.TryCast(this=n.this, to=n.args.get("to"))
        return n

    return node.copy().transform(rewrite).sql(dialect="duckdb")

