"""Parse stage: one analyst statement with sqlglot, refused unless it is one SELECT over one registered dataset
(no joins but a list of public groups, `gateway/sql/groups.py`; no subqueries, table functions or catalogs). The
text is never executed; later stages work on the tree.

Spellings of other dialects are read here into the tree the planner knows: `SELECT TOP n` (SQL Server,
SmartNoise SQL) becomes `LIMIT n`, a table alias or the dataset's own name as a column qualifier is dropped, and
`FROM <dataset>.<dataset>` (SmartNoise SQL's `schema.table` metadata names a one-table dataset so) reads the
dataset."""

from __future__ import annotations

from dataclasses import dataclass

from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.errors import TokenError
from sqlglot.tokens import Token, TokenType

from gateway.sql.groups import join_hint
from policies.errors import QueryRejected
from policies.expressions import balanced, parse_statements, reject, span

_SYSTEM_SCHEMAS = {"information_schema", "pg_catalog", "main", "temp", "system", "sqlite_master"}
_SYSTEM_PREFIXES = ("duckdb_", "pg_", "sqlite_", "pragma_")

_STATEMENT_REASONS: list[tuple[tuple[str, ...], str, str]] = [
    (("Union", "Intersect", "Except"), "set_operation", "set operations (UNION, INTERSECT, EXCEPT) are not allowed"),
    (("Insert", "Update", "Delete", "Merge"), "dml", "data modification is not allowed"),
    (("Create", "Drop", "Alter", "TruncateTable", "Comment"), "ddl", "DDL statements are not allowed"),
    (("Pragma",), "pragma", "PRAGMA is not allowed"),
    (("Attach", "Detach"), "attach", "ATTACH/DETACH is not allowed"),
    (("Copy", "Export"), "copy", "COPY/EXPORT is not allowed"),
    (("Install",), "install_load", "INSTALL/LOAD is not allowed"),
    (("Set", "Use"), "set", "SET/USE is not allowed"),
    (("Show", "Describe", "Summarize"), "system_catalog", "catalog statements are not allowed"),
]


def _statement_reason(stmt: exp.Expr) -> tuple[str, str] | None:
    name = type(stmt).__name__
    for names, reason, message in _STATEMENT_REASONS:
        if name in names:
            return reason, message
    if isinstance(stmt, exp.Command):
        word = str(stmt.this).upper()
        if word in {"LOAD", "INSTALL"}:
            return "install_load", "INSTALL/LOAD is not allowed"
        if word in {"CALL", "CHECKPOINT", "VACUUM", "EXPORT", "IMPORT", "DETACH", "RESET"}:
            return "ddl", f"{word} is not allowed"
        return "unsupported_statement", f"{word} statements are not allowed"
    return None


def parse_select(sql: str) -> exp.Select:
    """Parse exactly one SELECT statement, or raise with the position of the problem."""
    if not sql or not sql.strip():
        raise QueryRejected("the query is empty", reason="empty_query")
    tokens = _tokenize(sql)
    top = None
    if tokens:
        _refuse_dp_syntax(sql, tokens)
        top = _top(sql, tokens)
    statements = parse_statements(top.text if top else sql)
    if len(statements) != 1:
        second = statements[1] if len(statements) > 1 else None
        raise reject(
            "exactly one statement is allowed", "multiple_statements", second, sql, hint="send one SELECT per request"
        )
    stmt = statements[0]
    found = _statement_reason(stmt)
    if found:
        reason, message = found
        raise reject(message, reason, stmt, sql, hint="Bastion answers one aggregate SELECT over one dataset")
    if not isinstance(stmt, exp.Select):
        raise reject(f"{type(stmt).__name__} statements are not allowed", "unsupported_statement", stmt, sql)
    sample = stmt.find(exp.TableSample)
    if sample is not None:
        start, end = _sample_span(sql, sample)
        raise QueryRejected(
            "sampling (TABLESAMPLE, USING SAMPLE) is not supported",
            reason="sampling",
            sql=sql,
            start=start,
            end=end,
            hint=SAMPLING_HINT,
        )
    if top is not None:
        if stmt.args.get("limit") is not None:
            raise QueryRejected(
                "TOP and LIMIT cannot both be given",
                reason="bad_limit",
                sql=sql,
                start=top.start,
                end=top.end,
                hint="keep one of them",
            )
        stmt.set("limit", exp.Limit(expression=exp.Literal.number(top.rows)))
        stmt.meta["top"] = (top.start, top.end)
    return stmt


SAMPLING_HINT = (
    "remove it and query the whole dataset: a DP answer is already noisy, and a random sample would need "
    "privacy amplification by subsampling in the accounting, which Bastion does not do (it would charge the full "
    "ε for a noisier answer); ask for a smaller ε instead"
)
# Tokens a sampling clause is made of after its keyword: `10%`, `10 PERCENT (bernoulli)`, `reservoir(50 ROWS)`,
# `SYSTEM (5) REPEATABLE (3)`.
_SAMPLE_TOKENS = {
    TokenType.NUMBER,
    TokenType.PERCENT,
    TokenType.MOD,
    TokenType.ROWS,
    TokenType.VAR,
    TokenType.COMMA,
    TokenType.L_PAREN,
    TokenType.R_PAREN,
}

_SAMPLE_WORDS = {"SYSTEM", "BERNOULLI", "RESERVOIR", "REPEATABLE", "BLOCK"}


def _sample_span(sql: str, sample: exp.TableSample) -> tuple[int | None, int | None]:
    """The text of a sampling clause, from `TABLESAMPLE` or `USING SAMPLE` to its end (the tree places only its
    numbers); where the keyword cannot be found, what `span` finds."""
    tokens = _tokenize(sql)
    at, _ = span(sample, sql)
    if tokens is None or at is None:
        return span(sample, sql)
    starts = [
        i
        for i, t in enumerate(tokens[:-1])
        if t.start < at
        and (
            t.token_type is TokenType.TABLE_SAMPLE
            or (t.token_type is TokenType.USING and tokens[i + 1].text.upper() == "SAMPLE")
        )
    ]
    if not starts:
        return span(sample, sql)
    first = starts[-1]
    i = first + (1 if tokens[first].token_type is TokenType.TABLE_SAMPLE else 2)
    depth, last = 0, i - 1
    while i < len(tokens) and tokens[i].token_type in _SAMPLE_TOKENS:
        kind = tokens[i].token_type
        if kind is TokenType.R_PAREN and depth == 0:
            break  # the parenthesis around the FROM item, not the clause's
        if kind is TokenType.VAR and depth == 0 and tokens[i].text.upper() not in _SAMPLE_WORDS:
            break  # an alias, say
        depth += (kind is TokenType.L_PAREN) - (kind is TokenType.R_PAREN)
        last = i
        i += 1
    return tokens[first].start, tokens[last].end + 1


_BOUNDS_ARGUMENTS = {"contribution_bounds_per_group", "contribution_bounds_per_row"}
# Tokens an expression can end with: `CLAMPED BETWEEN` after one is ZetaSQL's bound, after a keyword a column's name.
_EXPRESSION_ENDS = {TokenType.VAR, TokenType.IDENTIFIER, TokenType.NUMBER, TokenType.STRING, TokenType.R_PAREN}


def _tokenize(sql: str) -> list[Token] | None:
    """The text's tokens, or None if it does not tokenize (the parser then reports the problem)."""
    try:
        return DuckDB().tokenize(sql)
    except (TokenError, ValueError, RecursionError):
        return None


def _refuse_dp_syntax(sql: str, tokens: list[Token]) -> None:
    """Refuse the privacy parameters of other DP SQL dialects with what to do instead (they are syntax errors to
    the parser): ZetaSQL's `SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS(...)` / `WITH ANONYMIZATION`, and per-aggregate
    bounds (`CLAMPED BETWEEN lo AND hi`, `contribution_bounds_per_group => (lo, hi)`). In Bastion ε and δ come with
    the request, and the privacy unit, the contribution bound and the bounds of every column from the policy."""
    for i, t in enumerate(tokens[:-2]):
        after = tokens[i + 1]
        if (
            t.token_type is TokenType.SELECT
            and after.token_type is TokenType.WITH
            and tokens[i + 2].text.upper() in ("DIFFERENTIAL_PRIVACY", "ANONYMIZATION")
        ):
            end = _call_end(tokens, i + 3) if len(tokens) > i + 3 and tokens[i + 3].text.upper() == "OPTIONS" else None
            raise QueryRejected(
                f"WITH {tokens[i + 2].text.upper()} is not needed: ε and δ come with the request, the privacy unit "
                "and the contribution bound from the dataset's policy",
                reason="dp_clause",
                sql=sql,
                start=after.start,
                end=end if end is not None else tokens[i + 2].end + 1,
                hint="remove the clause and send epsilon (and delta) with the request; GET /v1/datasets shows the "
                "policy",
            )
        clamped = (
            t.text.upper() == "CLAMPED"
            and t.token_type is TokenType.VAR
            and after.token_type is TokenType.BETWEEN
            and i > 0
            and tokens[i - 1].token_type in _EXPRESSION_ENDS
        )
        if clamped or (t.text.lower() in _BOUNDS_ARGUMENTS and after.token_type is TokenType.FARROW):
            raise QueryRejected(
                "bounds in the query are not used: every column's bounds come from the dataset's policy (values are "
                "clamped to them before any aggregate)",
                reason="query_bounds",
                sql=sql,
                start=t.start,
                end=_enclosed_end(tokens, i),
                hint="remove them, e.g. SUM(income); filter with WHERE to narrow the range",
            )


def _call_end(tokens: list[Token], i: int) -> int | None:
    """End offset of the parenthesised list that opens right after token i (`OPTIONS(...)`), if there is one."""
    if i + 1 >= len(tokens) or tokens[i + 1].token_type is not TokenType.L_PAREN:
        return None
    depth = 0
    for t in tokens[i + 1 :]:
        depth += t.token_type is TokenType.L_PAREN
        depth -= t.token_type is TokenType.R_PAREN
        if depth == 0:
            return t.end + 1
    return None


def _enclosed_end(tokens: list[Token], i: int) -> int:
    """End offset of the last token from i on before the parenthesis that closes the call token i is inside."""
    depth, end = 0, tokens[i].end + 1
    for t in tokens[i:]:
        if t.token_type is TokenType.L_PAREN:
            depth += 1
        elif t.token_type is TokenType.R_PAREN:
            if depth == 0:
                break
            depth -= 1
        end = t.end + 1
    return end


@dataclass(frozen=True)
class Top:
    """`TOP n` after the first SELECT: the text with it blanked out (same length, so every position still points
    into the analyst's text), where it was, and n."""

    text: str
    start: int
    end: int
    rows: int


def _top(sql: str, tokens: list[Token]) -> Top | None:
    """Find `SELECT [DISTINCT|ALL] TOP n` or `TOP (n)` (n an integer literal) in the first SELECT of the text."""
    i = next((i for i, t in enumerate(tokens) if t.token_type is TokenType.SELECT), None)
    if i is None:
        return None
    i += 1
    if i < len(tokens) and tokens[i].token_type in (TokenType.DISTINCT, TokenType.ALL):
        i += 1
    if i + 1 >= len(tokens) or tokens[i].text.upper() != "TOP" or tokens[i].token_type is TokenType.STRING:
        return None
    rest = tokens[i + 1 : i + 4]
    if rest[0].token_type is TokenType.NUMBER:
        number, last = rest[0], rest[0]
    elif (
        len(rest) == 3
        and rest[0].token_type is TokenType.L_PAREN
        and rest[1].token_type is TokenType.NUMBER
        and rest[2].token_type is TokenType.R_PAREN
    ):
        number, last = rest[1], rest[2]
    else:
        return None
    if not number.text.isdigit():
        return None
    start, end = tokens[i].start, last.end + 1
    after = i + 2 if last is number else i + 4  # the token after `TOP n` or `TOP (n)`
    following = [t.text.upper() for t in tokens[after : after + 2]]
    if following[:1] == ["PERCENT"] or following == ["WITH", "TIES"]:
        raise QueryRejected(
            f"TOP n {' '.join(following[:1] if following[0] == 'PERCENT' else following)} is not supported",
            reason="bad_limit",
            sql=sql,
            start=start,
            end=end,
            hint="give the number of rows: TOP n with ORDER BY, or LIMIT n",
        )
    text = sql[:start] + " " * (end - start) + sql[end:]
    return Top(text, start, end, int(number.text))


def top_span(select: exp.Select) -> tuple[int, int] | None:
    """Where `TOP n` was in the text, if the query limited its rows so."""
    found = select.meta.get("top")
    return (int(found[0]), int(found[1])) if found else None


def join_span(select: exp.Select, join: exp.Expr, sql: str) -> tuple[int | None, int | None]:
    """The text of a join from its first keyword (`JOIN`, `CROSS JOIN`, ...; after the comma of `FROM a, b`) to
    its end: the tree records the positions of the joined names and values only. A later join starts after the
    join before it."""
    start, end = span(join, sql)
    from_ = select.args.get("from_") or select.args.get("from")
    joins = list(select.args.get("joins") or [])
    at = next((i for i, j in enumerate(joins) if j is join), 0)
    before = joins[at - 1] if at > 0 else from_.this if from_ is not None else None
    previous = span(before, sql)[1] if before is not None else None
    tokens = _tokenize(sql)
    if start is None or end is None or previous is None or tokens is None:
        return start, end
    after = [t for t in tokens if previous <= t.start < start and t.token_type is not TokenType.COMMA]
    if after:
        start = after[0].start
    return balanced(sql, start, end)


def dataset_name(select: exp.Select, sql: str) -> str:
    """The one table the SELECT reads, after rejecting joins, subqueries, table functions and catalogs."""
    if select.args.get("with_") or select.args.get("with"):
        raise reject(
            "CTEs (WITH) are not allowed",
            "cte",
            select.args.get("with_") or select.args.get("with"),
            sql,
            hint="write one SELECT over one dataset",
        )
    joined = select.args.get("joins") or select.args.get("laterals")
    if joined:
        start, end = join_span(select, joined[0], sql)
        raise QueryRejected(
            "joins are not allowed",
            reason="join",
            sql=sql,
            start=start,
            end=end,
            hint=join_hint(joined[0]),
        )
    from_ = select.args.get("from_") or select.args.get("from")
    if from_ is None:
        raise reject("the query must read FROM a dataset", "no_dataset", select, sql)
    source = from_.this
    if isinstance(source, exp.Subquery | exp.Select):
        raise reject("subqueries are not allowed", "subquery", source, sql, hint="write one SELECT over one dataset")
    if not isinstance(source, exp.Table) or not isinstance(source.this, exp.Identifier):
        raise reject(
            "table functions are not allowed",
            "table_function",
            source,
            sql,
            hint="query a registered dataset by name (GET /v1/datasets lists them)",
        )
    refuse_alias_columns(source, sql, inside="the dataset's own column names")
    name = source.name.lower()
    db = (source.db or "").lower()
    if db in _SYSTEM_SCHEMAS or source.catalog or name.startswith(_SYSTEM_PREFIXES) or name in _SYSTEM_SCHEMAS:
        raise reject(
            "system catalogs are not allowed",
            "system_catalog",
            source,
            sql,
            hint="GET /v1/datasets shows the public schema",
        )
    if db and db != name:
        # A dataset is one table, its own schema: `pums.pums` (SmartNoise SQL's metadata names it so) is `pums`.
        raise reject(
            f"no schema {db!r}: a dataset is read by its name, or as <dataset>.<dataset>",
            "unknown_schema",
            source,
            sql,
            hint=f"write FROM {name} (GET /v1/datasets lists the datasets)",
        )
    return name


def refuse_alias_columns(source: exp.Expr, sql: str, *, inside: str) -> None:
    """Refuse a column list on the alias of what a query reads FROM (`FROM visits AS v(a, b)`, `FROM (SELECT ...)
    AS t(n, x)`): it would rename the columns by position, which Bastion does not do, so the query would read
    other columns than it names. `inside` says how to name them instead. An Oracle-style `FROM visits SAMPLE (10)`
    reads as an alias `SAMPLE` with a column list, and is refused as the sampling it means."""
    alias = source.args.get("alias")
    if not isinstance(alias, exp.TableAlias) or not alias.columns:
        return
    start, end = span(alias, sql)
    if start is not None:
        before = sql[:start].rstrip()
        if before[-2:].upper() == "AS" and (len(before) == 2 or not before[-3].isalnum()):
            start = len(before) - 2
    if alias.name.upper() == "SAMPLE":
        raise QueryRejected(
            "sampling is not supported", reason="sampling", sql=sql, start=start, end=end, hint=SAMPLING_HINT
        )
    raise QueryRejected(
        "a column list on the alias of a FROM item is not supported (it would rename the columns by position)",
        reason="alias_columns",
        sql=sql,
        start=start,
        end=end,
        hint=f"drop the column list and use {inside}",
    )


def drop_qualifiers(select: exp.Select, dataset: str) -> None:
    """Drop the table qualifier of columns that name the one table read: its alias (`FROM visits v ... v.age`),
    the dataset's name, or `<dataset>.<dataset>`. Other qualifiers stay, for the planner to refuse as unknown."""
    from_ = select.args.get("from_") or select.args.get("from")
    source = from_.this if from_ is not None else None
    names = {dataset}
    if isinstance(source, exp.Table) and source.alias:
        names.add(source.alias.lower())
    for col in list(select.find_all(exp.Column)):
        table, db = col.table.lower(), (col.db or "").lower()
        if table in names and db in ("", dataset) and not col.catalog:
            col.set("table", None)
            col.set("db", None)
