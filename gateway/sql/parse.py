"""Parse stage: one analyst statement with sqlglot, refused unless it is one SELECT over one registered dataset
(no joins, subqueries, table functions or catalogs). The text is never executed; later stages work on the tree."""

from __future__ import annotations

from sqlglot import exp

from policies.errors import QueryRejected
from policies.expressions import parse_statements, reject

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
    statements = parse_statements(sql)
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
    return stmt


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
        node = joined[0]
        raise reject("joins are not allowed", "join", node, sql, hint="query one dataset at a time")
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
    if source.args.get("sample"):
        raise reject("TABLESAMPLE is not allowed", "sampling", source, sql)
    name = source.name.lower()
    db = (source.db or "").lower()
    if db in _SYSTEM_SCHEMAS or db or source.catalog or name.startswith(_SYSTEM_PREFIXES) or name in _SYSTEM_SCHEMAS:
        raise reject(
            "system catalogs are not allowed",
            "system_catalog",
            source,
            sql,
            hint="GET /v1/datasets shows the public schema",
        )
    return name
