"""Declarative labeling functions: `{"name", "label", "when" | "keywords" | "regex"}`, validated against a policy
and compiled to one SQL expression each.

`when` is a condition in the SQL expression language WHERE accepts (sqlglot, read as DuckDB's), checked by the same
validator with labeling-only columns allowed. `keywords` and `regex` are shortcuts compiled to such a condition
and validated the same way; the compiled form is a sqlglot tree that each engine generates in its own dialect.
Votes follow Snorkel's encoding: abstain = -1, classes indexed by their order in the policy's `labels.classes`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlglot import exp

from policies.errors import InvalidRequest, QueryRejected
from policies.expressions import check_row_expression, func_name, parse_statements, re2_problem, reject
from policies.schema import Policy

ABSTAIN = -1
MAX_LFS = 50
MAX_CONDITION_CHARS = 20_000
MAX_KEYWORDS = 1_000
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,79}$")

# Table functions read files, catalogs or generate rows; none of them is a row-level expression.
_TABLE_FUNCTIONS = tuple(
    getattr(exp, n)
    for n in (
        "ReadCSV",
        "ReadParquet",
        "GenerateSeries",
        "ExplodingGenerateSeries",
        "Unnest",
        "GenerateDateArray",
        "GenerateTimestampArray",
    )
    if hasattr(exp, n)
)
_TABLE_FUNCTION_NAMES = {
    "read_csv",
    "read_csv_auto",
    "read_parquet",
    "parquet_scan",
    "read_json",
    "read_json_auto",
    "read_ndjson",
    "read_text",
    "read_blob",
    "glob",
    "range",
    "generate_series",
    "unnest",
    "query",
    "query_table",
    "sniff_csv",
    "parquet_metadata",
    "parquet_schema",
    "iceberg_scan",
    "delta_scan",
    "sqlite_scan",
    "postgres_scan",
    "duckdb_tables",
    "duckdb_columns",
    "duckdb_settings",
    "duckdb_functions",
    "pragma_table_info",
    "getenv",
}


@dataclass(frozen=True)
class CompiledLF:
    """A validated declarative LF: its vote expression over the pre-bounded table."""

    name: str
    label: str
    label_index: int
    condition: str  # the validated condition, as the author wrote it or as a shortcut compiled it
    tree: exp.Expr  # its total form over the pre-bounded table (columns quoted, casts made non-failing)
    columns: tuple[str, ...]

    @property
    def sql(self) -> str:
        """The total form as text (one fixed dialect): what identifies the LF in a cache key."""
        return self.tree.sql(dialect="duckdb")

    @property
    def vote(self) -> exp.Expr:
        """The LF's vote on a row: its label's index where the condition holds, else ABSTAIN."""
        return exp.Case(
            ifs=[exp.If(this=exp.Paren(this=self.tree.copy()), true=exp.Literal.number(self.label_index))],
            default=exp.Literal.number(ABSTAIN),
        )

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "sql", "label": self.label, "condition": self.condition}


def classes_of(policy: Policy) -> list[str]:
    if policy.labels is None:
        raise InvalidRequest(
            f"dataset {policy.dataset!r} declares no label classes (policy 'labels'); labeling functions need them"
        )
    return list(policy.labels.classes)


def check_name(name: Any, seen: set[str]) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest(f"labeling function name {name!r} must be 1-80 letters, digits, '_', '.', '-'")
    if name in seen:
        raise InvalidRequest(f"labeling function name {name!r} is used twice")
    seen.add(name)
    return name


def parse_condition(text: str) -> exp.Expr:
    """Parse one SQL condition, or raise SqlSyntaxError pointing at the problem."""
    if not text.strip():
        raise QueryRejected("the condition is empty", reason="empty_condition")
    if len(text) > MAX_CONDITION_CHARS:
        raise QueryRejected(f"the condition is longer than {MAX_CONDITION_CHARS} characters", reason="too_long")
    statements = parse_statements(text)
    if len(statements) != 1:
        raise reject(
            "a condition is one expression",
            "multiple_statements",
            statements[1] if len(statements) > 1 else None,
            text,
            hint="write a boolean expression such as age >= 70 AND diagnosis = 'I21'",
        )
    return statements[0]


def _check_table_functions(node: exp.Expr, text: str) -> None:
    for n in node.walk():
        if isinstance(n, _TABLE_FUNCTIONS) or (isinstance(n, exp.Anonymous) and func_name(n) in _TABLE_FUNCTION_NAMES):
            raise reject(
                f"table function {func_name(n).upper()}() is not allowed",
                "table_function",
                n,
                text,
                hint="a labeling function is a condition on one row of the dataset",
            )


def _literal(value: str) -> str:
    return exp.Literal.string(value).sql(dialect="duckdb")


def _column_ref(spec: dict[str, Any], what: str) -> str:
    column = spec.get("column")
    if not isinstance(column, str) or not column.isidentifier():
        raise InvalidRequest(f"{what}.column must be a column name")
    return column


def _flag(spec: dict[str, Any], key: str, what: str) -> bool:
    """An optional JSON boolean option (false when absent); anything else is refused, not read as true."""
    value = spec.get(key, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{what}.{key} must be true or false")
    return value


def _keywords_condition(spec: Any) -> str:
    if not isinstance(spec, dict) or set(spec) - {"column", "any", "case_sensitive"}:
        raise InvalidRequest("keywords must be {column, any: [words], case_sensitive?}")
    column = _column_ref(spec, "keywords")
    words = spec.get("any")
    if (
        not isinstance(words, list)
        or not words
        or len(words) > MAX_KEYWORDS
        or not all(isinstance(w, str) and w for w in words)
    ):
        raise InvalidRequest(f"keywords.any must be a list of 1-{MAX_KEYWORDS} non-empty strings")
    if _flag(spec, "case_sensitive", "keywords"):
        return " OR ".join(f"contains({column}, {_literal(w)})" for w in words)
    return " OR ".join(f"contains(lower({column}), {_literal(w.lower())})" for w in words)


def _regex_condition(spec: Any) -> str:
    if not isinstance(spec, dict) or set(spec) - {"column", "pattern", "ignore_case"}:
        raise InvalidRequest("regex must be {column, pattern, ignore_case?}")
    column = _column_ref(spec, "regex")
    pattern = spec.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise InvalidRequest("regex.pattern must be a non-empty string")
    problem = re2_problem(pattern)
    if problem is not None:
        raise QueryRejected(
            f"invalid regular expression {pattern!r}: {problem}",
            reason="invalid_regex",
            hint="use RE2 syntax (no look-around, no back-references)",
        )
    flags = ", 'i'" if _flag(spec, "ignore_case", "regex") else ""
    return f"regexp_matches({column}, {_literal(pattern)}{flags})"


# The shared validator's hint for the privacy unit is about queries (count distinct units); in an LF it is not.
_UNIT_HINT = "a labeling function votes on each row from its other columns: the privacy unit is never readable in one"


def named(exc: QueryRejected | InvalidRequest, name: str) -> QueryRejected | InvalidRequest:
    """`exc` with the LF it is about: in its message (first) and as `lf`, with a hint that fits an LF."""
    exc.details["lf"] = name
    if exc.details.get("reason") == "privacy_unit_column" and exc.details.get("hint"):
        exc.message = exc.message.replace(exc.details["hint"], _UNIT_HINT)
        exc.details["hint"] = _UNIT_HINT
    prefix = f"labeling function {name!r}: "
    if not exc.message.startswith(prefix):
        exc.message = prefix + exc.message
    exc.args = (exc.message,)
    return exc


def compile_lf(raw: Any, policy: Policy, seen: set[str]) -> CompiledLF:
    """Validate one declarative LF against the policy and compile it."""
    if not isinstance(raw, dict):
        raise InvalidRequest("each labeling function is an object {name, label, when | keywords | regex}")
    extra = set(raw) - {"name", "label", "when", "keywords", "regex", "description"}
    if extra:
        raise InvalidRequest(f"unknown labeling-function field(s) {sorted(extra)}")
    name = check_name(raw.get("name"), seen)
    classes = classes_of(policy)
    label = raw.get("label")
    if label not in classes:
        raise InvalidRequest(f"labeling function {name!r}: label {label!r} is not one of the classes {classes}")
    given = [k for k in ("when", "keywords", "regex") if raw.get(k) is not None]
    if len(given) != 1:
        raise InvalidRequest(f"labeling function {name!r} needs exactly one of when, keywords, regex")
    kind = given[0]
    try:
        if kind == "when":
            if not isinstance(raw["when"], str):
                raise InvalidRequest(f"labeling function {name!r}: when must be a SQL condition (a string)")
            condition = raw["when"]
        elif kind == "keywords":
            condition = _keywords_condition(raw["keywords"])
        else:
            condition = _regex_condition(raw["regex"])
        node = parse_condition(condition)
        _check_table_functions(node, condition)
        checked = check_row_expression(
            node, policy, condition, labeling=True, condition="a labeling function's condition"
        )
    except (QueryRejected, InvalidRequest) as exc:
        raise named(exc, name) from None
    except RecursionError:
        raise QueryRejected(
            f"labeling function {name!r}: the condition is too deeply nested",
            reason="too_complex",
            hint="use fewer alternatives, or a regex shortcut",
        ) from None
    return CompiledLF(
        name=name,
        label=label,
        label_index=classes.index(label),
        condition=condition,
        tree=checked.tree,
        columns=tuple(sorted(checked.columns)),
    )


def compile_lfs(raws: list[Any], policy: Policy, seen: set[str] | None = None) -> list[CompiledLF]:
    """Validate and compile a set of declarative LFs; names must be unique (also against `seen`)."""
    if not isinstance(raws, list):
        raise InvalidRequest("lfs must be a list of labeling functions")
    seen = set() if seen is None else seen
    return [compile_lf(raw, policy, seen) for raw in raws]
