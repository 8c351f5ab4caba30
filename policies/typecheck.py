"""Type checking of SQL expressions against public types, and their compilation to total SQL.

Every expression that runs over private rows (WHERE, GROUP BY keys, LF conditions) or over released cells (the
SELECT list, HAVING, ORDER BY) goes through `Checker.check`, which returns its type with its public range and a new
sqlglot tree in which no operation can raise on any value:

- each function comes from an allowlist with its signature; anything else is refused with the span;
- values are never converted implicitly (a category compared with a number is a type error, before any charge);
  CAST becomes TRY_CAST (NULL when a value does not convert); date strings are checked as dates when planning;
- integer arithmetic stays in BIGINT only while its public range (from the policy's bounds) cannot overflow,
  otherwise it is computed in DOUBLE (which yields ±inf, never an error); `//` and `%` divide by NULLIF(b, 0);
- substring offsets, date arithmetic and padding need public ranges that keep them inside the engine's limits;
- patterns (LIKE, regular expressions) and needles are literals checked when planning, and every text value has a
  public maximum length, so the work per row is bounded by the query text and the policy, not by the data.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass

from sqlglot import exp

from policies.errors import QueryRejected
from policies.expressions import func_name, reject
from policies.sqltypes import (
    BOOL,
    FLOAT,
    MAX_DAY,
    MAX_TEXT,
    MIN_DAY,
    NULL,
    SAFE_INT,
    SqlType,
    Typed,
    float_range,
    int_range,
    text,
    unify,
)

MAX_NODES = 2_000  # syntax nodes in one expression
MAX_PATTERN = 1_000  # characters of a LIKE pattern or regular expression
MAX_IN_LIST = 10_000
MAX_COMPILED_DEPTH = 120  # levels of the compiled tree: the engines and the SQL generator recurse over it
# Work per row (characters read or written by text functions, weighted by their measured cost per character, about
# 0.7 ns for a scan): every row does all of it (CASE, COALESCE and costly AND/OR are compiled without
# short-circuits), so which rows match does not change the running time, and one unit's own values can change it
# by at most max_rows_per_unit times this much (about 70 µs per row here).
MAX_ROW_WORK = 100_000
_REGEX_WORK = 20
_PAD_WORK = 10  # padding writes multi-byte fill characters: measured about ten times the cost of a scan
# Substring offsets and lengths the engines accept without an out-of-range error.
MAX_OFFSET = 2**31 - 1

ColumnResolver = Callable[[exp.Column], tuple[Typed, exp.Expr]]
PatternCheck = Callable[[str], str | None]

_DATE_PARTS_TRUNC = {"year", "quarter", "month", "week", "day"}
# Parts of a date that EXTRACT / date_part may take, with their ranges (None: derived from the date's range).
_DATE_PARTS = {
    "year": None,
    "quarter": (1, 4),
    "month": (1, 12),
    "week": (1, 53),
    "day": (1, 31),
    "dayofweek": (0, 6),
    "dow": (0, 6),
    "isodow": (1, 7),
    "dayofyear": (1, 366),
    "doy": (1, 366),
    "decade": None,
    "century": None,
}
_DIFF_PARTS = {"day": 1, "week": 7, "month": 28, "quarter": 89, "year": 365}
_INTERVAL_DAYS = {"day": 1, "days": 1, "week": 7, "weeks": 7, "month": 31, "months": 31, "year": 366, "years": 366}
_CASTS = {
    "BIGINT": SqlType.INT,
    "INT": SqlType.INT,
    "INTEGER": SqlType.INT,
    "SMALLINT": SqlType.INT,
    "TINYINT": SqlType.INT,
    "DOUBLE": SqlType.FLOAT,
    "FLOAT": SqlType.FLOAT,
    "REAL": SqlType.FLOAT,
    "TEXT": SqlType.TEXT,
    "VARCHAR": SqlType.TEXT,
    "CHAR": SqlType.TEXT,
    "DATE": SqlType.DATE,
    "BOOLEAN": SqlType.BOOL,
}
_ENGINE_TYPE = {
    SqlType.INT: "BIGINT",
    SqlType.FLOAT: "DOUBLE",
    SqlType.TEXT: "VARCHAR",
    SqlType.DATE: "DATE",
    SqlType.BOOL: "BOOLEAN",
}
_TEXT_OF = {SqlType.INT: 24, SqlType.FLOAT: 32, SqlType.DATE: 10, SqlType.BOOL: 5, SqlType.NULL: 0}
_REGEX_FLAGS = set("icsmnlpg")
_UNARY_FLOAT = (exp.Sqrt, exp.Cbrt, exp.Ln, exp.Exp)
_SAME_TEXT = (exp.Lower, exp.Upper, exp.Reverse)
_TEXT_TESTS = (exp.Contains, exp.StartsWith, exp.EndsWith)
_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.NullSafeEQ, exp.NullSafeNEQ)
_ANON_TEXT_TESTS = {"prefix": exp.StartsWith, "suffix": exp.EndsWith}
_DATE_FUNCS: dict[type[exp.Expr], str] = {
    exp.Year: "year",
    exp.Month: "month",
    exp.Day: "day",
    exp.Quarter: "quarter",
    exp.DayOfWeek: "dayofweek",
    exp.DayOfYear: "dayofyear",
    exp.Week: "week",
}

_PAST_THE_END = 2**31 - 1  # a split_part index beyond any text's parts: '' on every engine

ROW_FUNCTIONS = (
    "abs, sign, floor, ceil, round, trunc, sqrt, cbrt, ln, log, exp, power, greatest, least, isnan, isinf, "
    "lower, upper, trim, ltrim, rtrim, reverse, length, contains, starts_with, ends_with, strpos, substring, left, "
    "right, replace, concat, ||, lpad, rpad, repeat, split_part, regexp_matches, regexp_full_match, regexp_extract, "
    "LIKE, ILIKE, date_trunc, extract, date_part, year, quarter, month, week, day, dayofweek, dayofyear, "
    "date_diff, last_day, dayname, monthname, CASE, IF, COALESCE, NULLIF, CAST"
)


# An AND/OR whose operands are at most this many syntax nodes and use no text function short-circuits as usual:
# what skipping such an operand saves per row is a few nanoseconds.
CHEAP_NODES = 16


def _depth(tree: exp.Expr) -> int:
    """Depth of a syntax tree, computed without recursion."""
    deepest = 0
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node.iter_expressions())
    return deepest


def _call(name: str, *args: exp.Expr) -> exp.Expr:
    return exp.Anonymous(this=name, expressions=list(args))


# The doubles nearest ±2**63 that a BIGINT still holds, as literals.
_BIGINT_DOUBLE_MIN = exp.Literal.number("-9.223372036854775e18")
_BIGINT_DOUBLE_MAX = exp.Literal.number("9.223372036854775e18")


def _infinity_test(name: str, value: exp.Expr) -> exp.Expr:
    """isinf(x) / isfinite(x) from comparisons every engine has (Spark has neither function); NaN is neither."""
    infinity = exp.Cast(this=exp.Literal.string("Infinity"), to=exp.DataType.build("DOUBLE"))
    magnitude = exp.Abs(this=_as_double(value))
    if name == "isinf":
        return exp.Paren(this=exp.EQ(this=magnitude, expression=infinity))
    return exp.Paren(this=exp.LT(this=magnitude, expression=infinity))


def _calendar_diff(unit: str, end: exp.Expr, start: exp.Expr) -> exp.Expr:
    """date_diff in months, quarters or years as DuckDB counts them: the calendar boundaries crossed from `start` to
    `end` (Spark's datediff counts whole elapsed units instead), from the dates' year and month in every engine."""

    def part(name: str, date: exp.Expr) -> exp.Expr:
        return exp.Extract(this=exp.var(name), expression=date.copy())

    years = exp.Sub(this=part("YEAR", end), expression=part("YEAR", start))
    if unit == "year":
        return years
    per_year, name = (12, "MONTH") if unit == "month" else (4, "QUARTER")
    within = exp.Sub(this=part(name, end), expression=part(name, start))
    return exp.Add(this=exp.Mul(this=exp.Paren(this=years), expression=exp.Literal.number(per_year)), expression=within)


def select_first(conditions: list[exp.Expr], values: list[exp.Expr]) -> exp.Expr:
    """CASE WHEN c1 THEN v1 ... ELSE vn END, evaluated eagerly: every condition and every value is computed on
    every row (a list of them is built), so the work per row does not depend on which branch a row takes, and the
    result is never a constant vector for some row batches and a full one for others (both would show in the
    running time). `values` has one more entry than `conditions` (the ELSE value)."""
    flags = [exp.Coalesce(this=c, expressions=[exp.Boolean(this=False)]) for c in conditions]
    # Engine-neutral nodes: DuckDB writes [v1, ...][list_position(...)], Spark element_at(array(...), ...). The
    # position is always within the list (the last flag is TRUE), so no engine can fail on it.
    found = exp.ArrayPosition(this=exp.Array(expressions=[*flags, exp.true()]), expression=exp.true())
    position = exp.Cast(this=found, to=exp.DataType.build("INT"))  # Spark's element_at takes an INT index
    return exp.Bracket(this=exp.Array(expressions=list(values)), expressions=[position], offset=1, safe=False)


def _tri(condition: exp.Expr) -> exp.Expr:
    """A condition as 0 (false), 1 (NULL) or 2 (true), so that AND is LEAST and OR is GREATEST in SQL's logic."""
    as_int = exp.Cast(this=exp.Paren(this=condition), to=exp.DataType.build("INTEGER"))
    return exp.Coalesce(
        this=exp.Mul(this=as_int, expression=exp.Literal.number(2)), expressions=[exp.Literal.number(1)]
    )


def eager_logic(operands: list[exp.Expr], *, conjunction: bool) -> exp.Expr:
    """a AND b AND ... (or OR) with every operand evaluated on every row, in SQL's three-valued logic."""
    # The engine's LEAST/GREATEST, called as such: no operand is NULL here, so no NULL-handling rewrite is needed.
    tris = [_tri(o) for o in operands]
    combined = _call("least" if conjunction else "greatest", *tris) if len(tris) > 1 else tris[0]
    return exp.Paren(
        this=exp.EQ(this=exp.Nullif(this=combined, expression=exp.Literal.number(1)), expression=exp.Literal.number(2))
    )


_DAY_NAMES = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_MONTH_NAMES = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip


def _weekday(date: exp.Expr, *, iso: bool = False) -> exp.Expr:
    """The day of the week from the days since a Sunday (1970-01-04): 0 = Sunday .. 6 = Saturday, or with `iso`
    1 = Monday .. 7 = Sunday. Engines number EXTRACT(DOW) differently (DuckDB from 0, Spark from 1); this does not
    depend on any engine's convention."""
    sunday = exp.Cast(this=exp.Literal.string("1970-01-04"), to=exp.DataType.build("DATE"))
    days: exp.Expr = exp.DateDiff(this=date.copy(), expression=sunday, unit=exp.var("DAY"))
    if iso:
        days = exp.Paren(this=exp.Add(this=days, expression=exp.Literal.number(6)))
    seven = exp.Literal.number(7)
    day = exp.Mod(
        this=exp.Paren(this=exp.Add(this=exp.Paren(this=exp.Mod(this=days, expression=seven)), expression=seven)),
        expression=seven.copy(),
    )
    return exp.Add(this=exp.Paren(this=day), expression=exp.Literal.number(1)) if iso else exp.Paren(this=day)


def _positive(value: exp.Expr) -> exp.Expr:
    """`value` where it is > 0, else NULL: the logarithm's domain, so every engine gives NULL outside it (DuckDB
    would give NaN or -inf, Spark NULL)."""
    return exp.Case(ifs=[exp.If(this=exp.GT(this=value.copy(), expression=exp.Literal.number(0)), true=value)])


def _coerce(value: Checked, typed: Typed) -> exp.Expr:
    """A branch's tree in the common type of the branches (integers become DOUBLE next to numbers)."""
    if typed.type is SqlType.FLOAT and value.typed.type is SqlType.INT:
        return _as_double(value.tree)
    return value.tree


@dataclass(frozen=True)
class Checked:
    """An expression's type and its total compiled form."""

    typed: Typed
    tree: exp.Expr


def _type_name(t: Typed) -> str:
    return t.type.value


def _int_literal(value: int) -> exp.Expr:
    return exp.Cast(this=exp.Literal.number(value), to=exp.DataType.build("BIGINT"))


def _as_double(tree: exp.Expr) -> exp.Expr:
    return exp.Cast(this=tree, to=exp.DataType.build("DOUBLE"))


def _nullif_zero(tree: exp.Expr) -> exp.Expr:
    return exp.Nullif(this=tree, expression=exp.Literal.number(0))


def _parse_date(value: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value.strip())
    except ValueError:
        return None


def _date_literal(day: dt.date) -> exp.Expr:
    return exp.Cast(this=exp.Literal.string(day.isoformat()), to=exp.DataType.build("DATE"))


def within_calendar(day: exp.Expr) -> exp.Expr:
    """`day`, or NULL outside years 1-9999: engines read text such as '+1000000-01-01' or '-0001-01-01' as dates
    there, where some functions and the conversion of results fail."""
    inside = exp.Between(this=day.copy(), low=_date_literal(dt.date.min), high=_date_literal(dt.date.max))
    return exp.Case(ifs=[exp.If(this=inside, true=day)], default=exp.Null())


def _literal_int(node: exp.Expr | None) -> int | None:
    """The value of an integer literal (possibly negated), or None."""
    if isinstance(node, exp.Neg):
        inner = _literal_int(node.this)
        return None if inner is None else -inner
    if isinstance(node, exp.Paren):
        return _literal_int(node.this)
    if isinstance(node, exp.Literal) and not node.is_string:
        try:
            return int(str(node.this))
        except ValueError:
            return None
    return None


def _string_literal(node: exp.Expr | None) -> str | None:
    if isinstance(node, exp.Literal) and node.is_string:
        return str(node.this)
    return None


def _part_name(node: exp.Expr | None) -> str | None:
    if isinstance(node, exp.Var | exp.Identifier):
        return str(node.this).lower()
    if isinstance(node, exp.Literal) and node.is_string:
        return str(node.this).lower()
    if isinstance(node, exp.Column) and not node.table:
        return node.name.lower()
    return None


def _corners(a: Typed, b: Typed, op: Callable[[float, float], float]) -> Typed:
    if not (a.bounded and b.bounded):
        return Typed(SqlType.INT)
    values = [op(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]  # type: ignore[arg-type]
    return int_range(min(values), max(values))


def _float_corners(a: Typed, b: Typed, op: Callable[[float, float], float]) -> Typed:
    """The range of `a op b` in DOUBLE, for an operation monotone in each operand (+, -, *, and / by a divisor of
    one sign): its extremes are at the corners. Correctly rounded floating-point operations are monotone too, so
    the engine's results lie within the corners it computes."""
    if not (a.bounded and b.bounded):
        return FLOAT
    values = [op(float(x), float(y)) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]  # type: ignore[arg-type]
    return float_range(min(values), max(values))


def _quotient(a: Typed, b: Typed) -> Typed:
    """The range of a / b with b = 0 giving NULL (NULLIF): bounded when the divisor's range excludes 0, or, for an
    integer divisor, from its pieces below -1 and above 1."""
    if not (a.bounded and b.bounded):
        return FLOAT
    lo, hi = float(b.lo), float(b.hi)  # type: ignore[arg-type]
    if lo > 0 or hi < 0:
        pieces = [(lo, hi)]
    elif b.type is SqlType.INT:
        pieces = [p for p in ((lo, -1.0), (1.0, hi)) if p[0] <= p[1]]
    else:
        return FLOAT
    if not pieces:  # always 0: always NULL
        return FLOAT
    ranges = [_float_corners(a, Typed(SqlType.FLOAT, p, q), lambda x, y: x / y) for p, q in pieces]
    if not all(r.bounded for r in ranges):
        return FLOAT
    return float_range(min(r.lo for r in ranges), max(r.hi for r in ranges))  # type: ignore[type-var]


def _literal_number(node: exp.Expr | None) -> float | None:
    """The value of a finite number literal (possibly negated), or None."""
    if isinstance(node, exp.Neg):
        inner = _literal_number(node.this)
        return None if inner is None else -inner
    if isinstance(node, exp.Paren):
        return _literal_number(node.this)
    if isinstance(node, exp.Literal) and not node.is_string:
        try:
            value = float(str(node.this))
        except (ValueError, OverflowError):
            return None
        return value if math.isfinite(value) else None
    return None


def _magnitude(t: Typed) -> Typed:
    """The range of ABS(x) for x in t's range."""
    lo, hi = float(t.lo), float(t.hi)  # type: ignore[arg-type]
    least = lo if lo >= 0 else -hi if hi <= 0 else 0.0
    return float_range(least, max(abs(lo), abs(hi)))


def _power(base: Typed, exponent: int | None) -> Typed:
    """The range of POWER(x, p) for a literal integer exponent 0 <= p <= 8 (through |x| for an even one); unknown
    otherwise."""
    if exponent is None or not 0 <= exponent <= 8 or not base.bounded or base.type not in (SqlType.INT, SqlType.FLOAT):
        return FLOAT
    lo, hi = float(base.lo), float(base.hi)  # type: ignore[arg-type]
    if exponent % 2 == 0:
        magnitude = _magnitude(base)
        lo, hi = magnitude.lo, magnitude.hi  # type: ignore[assignment]
    try:
        return float_range(lo**exponent, hi**exponent)
    except OverflowError:
        return FLOAT


def _increasing(n: exp.Expr, t: Typed) -> Typed:
    """The range of SQRT, CBRT, LN or EXP of x: increasing functions, bounded where x's range is inside their domain
    (and EXP's result finite)."""
    if not t.bounded or t.type not in (SqlType.INT, SqlType.FLOAT):
        return FLOAT
    lo, hi = float(t.lo), float(t.hi)  # type: ignore[arg-type]
    if isinstance(n, exp.Sqrt) and lo >= 0:  # correctly rounded in IEEE arithmetic, like + - * /
        return float_range(math.sqrt(lo), math.sqrt(hi))
    # The engines' cube roots, logarithms and exponentials may differ from Python's in the last bits: widened.
    if isinstance(n, exp.Cbrt):
        return _widened(math.copysign(abs(lo) ** (1 / 3), lo), math.copysign(abs(hi) ** (1 / 3), hi))
    if isinstance(n, exp.Ln) and lo > 0:
        return _widened(math.log(lo), math.log(hi))
    if isinstance(n, exp.Exp) and hi <= 700:
        return _widened(math.exp(lo), math.exp(hi))
    return FLOAT


def _widened(lo: float, hi: float) -> Typed:
    return float_range(lo - abs(lo) * 1e-12, hi + abs(hi) * 1e-12)


class Checker:
    """Type-checks and compiles one expression. `resolve` types a column reference and gives its compiled form;
    `check_pattern` says why a regular expression is invalid in the engine's syntax (None if valid)."""

    def __init__(
        self,
        sql: str,
        resolve: ColumnResolver,
        *,
        check_pattern: PatternCheck | None = None,
        functions: str = ROW_FUNCTIONS,
    ) -> None:
        self.sql = sql
        self.resolve = resolve
        self.check_pattern = check_pattern
        self.functions = functions
        self.work = 0
        self.types: dict[int, tuple[exp.Expr, Typed]] = {}

    # --- entry points -------------------------------------------------------------------------------------

    def check(self, node: exp.Expr) -> Checked:
        size = sum(1 for _ in node.walk())
        if size > MAX_NODES:
            raise reject(
                f"the expression has {size} syntax nodes; at most {MAX_NODES} are allowed",
                "too_complex",
                node,
                self.sql,
                hint="split the question into simpler queries",
            )
        self.work = 0
        try:
            got = self._check(node)
        except RecursionError:
            raise reject(
                "the expression is too deeply nested", "too_complex", node, self.sql, hint="write a flatter expression"
            ) from None
        if _depth(got.tree) > MAX_COMPILED_DEPTH:
            raise reject(
                f"the expression nests too deeply (its compiled form is more than {MAX_COMPILED_DEPTH} levels deep)",
                "too_complex",
                node,
                self.sql,
                hint="nest fewer CASE, COALESCE or function calls",
            )
        if self.work > MAX_ROW_WORK:
            raise reject(
                f"this expression may process {self.work:,} characters per row; at most {MAX_ROW_WORK:,} are allowed",
                "too_expensive",
                node,
                self.sql,
                hint="use fewer or simpler text functions, or shorter patterns",
            )
        return got

    def _cost(self, chars: float, factor: float = 1.0) -> None:
        self.work += int(chars * factor)

    def condition(self, node: exp.Expr, what: str) -> Checked:
        """A boolean condition (WHERE, an LF's `when`)."""
        got = self.check(node)
        if got.typed.type not in (SqlType.BOOL, SqlType.NULL):
            raise reject(
                f"{what} must be a condition (true or false); this expression is {_type_name(got.typed)}",
                "type_error",
                node,
                self.sql,
                hint="compare it with something, e.g. age >= 65",
            )
        return got

    # --- errors -------------------------------------------------------------------------------------------

    def _type_error(self, message: str, node: exp.Expr, hint: str | None = None) -> QueryRejected:
        return reject(message, "type_error", node, self.sql, hint=hint)

    def _need(self, node: exp.Expr | None, *types: SqlType, what: str = "argument") -> Checked:
        if node is None:
            raise self._type_error(f"missing {what}", exp.Null())
        got = self._check(node)
        if got.typed.type is not SqlType.NULL and got.typed.type not in types:
            wanted = " or ".join(t.value for t in types)
            raise self._type_error(
                f"{what} must be {wanted}; this one is {_type_name(got.typed)}",
                node,
                hint=self._cast_hint(got.typed, types),
            )
        return got

    @staticmethod
    def _cast_hint(got: Typed, wanted: tuple[SqlType, ...]) -> str | None:
        if got.type is SqlType.TEXT and any(t.numeric for t in wanted):
            return (
                "a category or text value is not a number: compare it with a quoted value such as '2', or "
                "use TRY_CAST(col AS INT)"
            )
        if got.type.numeric and SqlType.TEXT in wanted:
            return "use CAST(x AS VARCHAR) to make text of a number"
        if got.type is SqlType.FLOAT and wanted == (SqlType.INT,):
            return "a real number is not an integer: use CAST(x AS BIGINT) to round it to one"
        return None

    def _literal_text(self, node: exp.Expr | None, what: str) -> str:
        value = _string_literal(node)
        if value is None:
            raise reject(
                f"{what} must be a quoted literal",
                "non_literal_argument",
                node or exp.Null(),
                self.sql,
                hint="patterns and search strings are fixed in the query text, never taken from the rows",
            )
        if len(value) > MAX_PATTERN:
            raise reject(f"{what} is longer than {MAX_PATTERN} characters", "too_complex", node, self.sql)  # type: ignore[arg-type]
        return value

    def _regex(self, node: exp.Expr | None) -> str:
        pattern = self._literal_text(node, "the regular expression")
        problem = self.check_pattern(pattern) if self.check_pattern else None
        if problem is not None:
            raise reject(
                f"invalid regular expression {pattern!r}: {problem}",
                "invalid_regex",
                node,
                self.sql,  # type: ignore[arg-type]
                hint="use RE2 syntax (no look-around, no back-references)",
            )
        return pattern

    def _small_int(self, node: exp.Expr | None, what: str, low: int, high: int) -> int:
        value = _literal_int(node)
        if value is None or not low <= value <= high:
            raise reject(
                f"{what} must be an integer literal in [{low}, {high}]", "bad_argument", node or exp.Null(), self.sql
            )
        return value

    def _text_length(self, length: float, node: exp.Expr) -> int:
        if not math.isfinite(length) or length > MAX_TEXT:
            raise reject(
                f"this text expression can produce more than {MAX_TEXT:,} characters per row",
                "too_expensive",
                node,
                self.sql,
                hint="the work per row must be bounded by the query: build shorter strings",
            )
        return int(length)

    # --- the checker --------------------------------------------------------------------------------------

    def _check(self, n: exp.Expr) -> Checked:
        got = self._check_node(n)
        self.types[id(n)] = (n, got.typed)
        return got

    def ranges(self) -> list[tuple[exp.Expr, Typed]]:
        """Every node of the expressions checked so far with its type and public range."""
        return list(self.types.values())

    def _check_node(self, n: exp.Expr) -> Checked:  # noqa: C901 - one dispatch over node kinds
        if isinstance(n, exp.Column):
            if not isinstance(n.this, exp.Identifier):
                raise reject("* is not allowed here", "raw_rows", n, self.sql)
            typed, tree = self.resolve(n)
            return Checked(typed, tree)
        if isinstance(n, exp.Paren):
            inner = self._check(n.this)
            return Checked(inner.typed, exp.Paren(this=inner.tree))
        if isinstance(n, exp.Literal):
            return self._literal(n)
        if isinstance(n, exp.Boolean):
            return Checked(BOOL, n.copy())
        if isinstance(n, exp.Null):
            return Checked(NULL, n.copy())
        if isinstance(n, exp.Neg):
            inner = self._need(n.this, SqlType.INT, SqlType.FLOAT, what="the operand of -")
            t = inner.typed
            if t.type is SqlType.INT:
                if t.bounded:
                    return Checked(int_range(-t.hi, -t.lo), exp.Neg(this=inner.tree))  # type: ignore[operator]
                return Checked(FLOAT, exp.Neg(this=_as_double(inner.tree)))
            if t.type is SqlType.FLOAT and t.bounded:
                return Checked(float_range(-t.hi, -t.lo), exp.Neg(this=inner.tree))  # type: ignore[operator]
            return Checked(t if t.type is SqlType.NULL else FLOAT, exp.Neg(this=inner.tree))
        if isinstance(n, exp.Add | exp.Sub):
            return self._add_sub(n)
        if isinstance(n, exp.Mul):
            return self._arith(n, lambda x, y: x * y)
        if isinstance(n, exp.Div):
            a = self._need(n.this, SqlType.INT, SqlType.FLOAT, what="the dividend")
            b = self._need(n.expression, SqlType.INT, SqlType.FLOAT, what="the divisor")
            # Real division; a zero divisor gives NULL on every engine (DuckDB would give ±inf or NaN, Spark NULL).
            divisor = exp.Nullif(this=_as_double(b.tree), expression=_as_double(exp.Literal.number(0)))
            return Checked(_quotient(a.typed, b.typed), exp.Div(this=_as_double(a.tree), expression=divisor))
        if isinstance(n, exp.IntDiv | exp.Mod):
            return self._int_div(n)
        if isinstance(n, exp.Pow):
            a = self._need(n.this, SqlType.INT, SqlType.FLOAT, what="the base")
            b = self._need(n.expression, SqlType.INT, SqlType.FLOAT, what="the exponent")
            return Checked(
                _power(a.typed, _literal_int(n.expression)),
                exp.Pow(this=_as_double(a.tree), expression=_as_double(b.tree)),
            )
        if isinstance(n, exp.BitwiseAnd | exp.BitwiseOr | exp.BitwiseXor):
            a = self._need(n.this, SqlType.INT, what="an operand of a bitwise operator")
            b = self._need(n.expression, SqlType.INT, what="an operand of a bitwise operator")
            return Checked(Typed(SqlType.INT), n.__class__(this=a.tree, expression=b.tree))
        if isinstance(n, _COMPARISONS):
            a, b = self._comparable(n.this, n.expression, n)
            return Checked(BOOL, n.__class__(this=a.tree, expression=b.tree))
        if isinstance(n, exp.And | exp.Or):
            before = self.work
            word = type(n).__name__.upper()
            # A chain a AND b AND c ... is one operation over all its operands (flat, however long).
            operands = [self._need(o, SqlType.BOOL, what=f"an operand of {word}") for o in n.flatten()]
            size = sum(1 for _ in n.walk())
            if self.work > before or size > CHEAP_NODES:
                # An operand that costs something is evaluated on every row: no short-circuit whose saving would
                # depend on the values of the rows.
                return Checked(BOOL, eager_logic([o.tree for o in operands], conjunction=isinstance(n, exp.And)))
            tree = operands[0].tree
            for o in operands[1:]:
                tree = n.__class__(this=tree, expression=o.tree)
            return Checked(BOOL, tree)
        if isinstance(n, exp.Not):
            inner = self._need(n.this, SqlType.BOOL, what="the operand of NOT")
            return Checked(BOOL, exp.Not(this=inner.tree))
        if isinstance(n, exp.Is):
            inner = self._check(n.this)
            target = n.expression
            if not isinstance(target, exp.Null | exp.Boolean):
                raise self._type_error("IS takes NULL, TRUE or FALSE", n)
            if isinstance(target, exp.Boolean) and inner.typed.type not in (SqlType.BOOL, SqlType.NULL):
                raise self._type_error(f"IS TRUE/FALSE needs a condition; this is {_type_name(inner.typed)}", n)
            return Checked(BOOL, exp.Is(this=inner.tree, expression=target.copy()))
        if isinstance(n, exp.In):
            return self._in(n)
        if isinstance(n, exp.Between):
            a, lo = self._comparable(n.this, n.args["low"], n)
            _, hi = self._comparable(n.this, n.args["high"], n)
            return Checked(BOOL, exp.Between(this=a.tree, low=lo.tree, high=hi.tree))
        if isinstance(n, exp.Escape):
            like = n.this
            if not isinstance(like, exp.Like | exp.ILike):
                raise reject("ESCAPE goes with LIKE", "unsupported_expression", n, self.sql)
            escape = self._literal_text(n.expression, "the ESCAPE character")
            if len(escape.encode()) > 1:
                # The engines count bytes: a longer escape fails there only when a row reaches the LIKE (data-
                # dependent), so it is refused here, before the charge.
                raise reject("the ESCAPE string must be one ASCII character", "bad_argument", n.expression, self.sql)
            inner = self._like(like)
            if escape:
                _check_escapes(
                    self._literal_text(like.expression, "the LIKE pattern"), escape, like.expression, self.sql
                )
            return Checked(BOOL, exp.Escape(this=inner.tree, expression=exp.Literal.string(escape)))
        if isinstance(n, exp.Like | exp.ILike):
            return self._like(n)
        if isinstance(n, exp.Case):
            return self._case(n)
        if isinstance(n, exp.If):
            cond = self._need(n.this, SqlType.BOOL, what="the condition of IF")
            branches = [self._check(b) for b in (n.args.get("true"), n.args.get("false")) if b is not None]
            typed = self._unify_all(branches, n)
            values = [_coerce(b, typed) for b in branches] + ([] if len(branches) > 1 else [exp.Null()])
            return Checked(typed, select_first([cond.tree], values))
        if isinstance(n, exp.Coalesce):
            items = [self._check(a) for a in [n.this, *n.expressions]]
            typed = self._unify_all(items, n)
            present: list[exp.Expr] = [exp.Not(this=exp.Is(this=i.tree, expression=exp.Null())) for i in items[:-1]]
            return Checked(typed, select_first(present, [_coerce(i, typed) for i in items]))
        if isinstance(n, exp.Greatest | exp.Least):
            items = [self._check(a) for a in [n.this, *n.expressions]]
            typed = self._unify_all(items, n)
            literals = [v for v in (_literal_number(a) for a in [n.this, *n.expressions]) if v is not None]
            if typed.type.numeric and typed.bounded and literals:
                # Both engines skip NULL arguments, so the result is one of the arguments' values; a literal is never
                # NULL, so GREATEST is at least (LEAST at most) every literal among them.
                make = int_range if typed.type is SqlType.INT else float_range
                if isinstance(n, exp.Greatest):
                    typed = make(max(typed.lo, max(literals)), typed.hi)  # type: ignore[type-var]
                else:
                    typed = make(typed.lo, min(typed.hi, min(literals)))  # type: ignore[type-var]
            # NULL arguments are skipped (DuckDB's and Spark's own GREATEST/LEAST): said in the tree, else sqlglot
            # writes DuckDB's as NULL when any argument is.
            tree = n.__class__(this=items[0].tree, expressions=[i.tree for i in items[1:]], ignore_nulls=True)
            return Checked(typed, tree)
        if isinstance(n, exp.Nullif):
            a, b = self._comparable(n.this, n.expression, n)
            return Checked(a.typed, exp.Nullif(this=a.tree, expression=b.tree))
        if isinstance(n, exp.Cast | exp.TryCast):
            return self._cast(n)
        return self._function(n)

    def _literal(self, n: exp.Literal) -> Checked:
        if n.is_string:
            return Checked(text(len(str(n.this))), n.copy())
        raw = str(n.this)
        try:
            value = int(raw)
        except ValueError:
            number = float(raw)
            if not math.isfinite(number):
                raise reject("number literals must be finite", "bad_argument", n, self.sql) from None
            return Checked(Typed(SqlType.FLOAT, number, number), _as_double(n.copy()))
        if abs(value) > SAFE_INT:
            try:
                number = float(value)
            except OverflowError:  # an integer no float can hold, like 1e309 written out
                raise reject("number literals must be finite", "bad_argument", n, self.sql) from None
            return Checked(Typed(SqlType.FLOAT, number, number), _as_double(n.copy()))
        return Checked(int_range(value, value), _int_literal(value))

    def _add_sub(self, n: exp.Add | exp.Sub) -> Checked:
        a, b = self._check(n.this), self._check(n.expression)
        ta, tb = a.typed.type, b.typed.type
        sub = isinstance(n, exp.Sub)
        if ta is SqlType.DATE and tb in (SqlType.INT, SqlType.INTERVAL):
            return self._date_shift(a, b, n, -1 if sub else 1)
        if not sub and tb is SqlType.DATE and ta in (SqlType.INT, SqlType.INTERVAL):
            return self._date_shift(b, a, n, 1)
        if sub and ta is SqlType.DATE and tb is SqlType.DATE:
            days = int_range(a.typed.lo - b.typed.hi, a.typed.hi - b.typed.lo)  # type: ignore[operator]
            # A number of days on every engine: Spark's own date - date is an interval (in microseconds), which
            # fails arithmetic (an exact multiply) and compares with no number.
            return Checked(days, exp.DateDiff(this=a.tree, expression=b.tree, unit=exp.var("DAY")))
        return self._arith(n, (lambda x, y: x - y) if sub else (lambda x, y: x + y), (a, b))

    def _arith(
        self, n: exp.Expr, op: Callable[[float, float], float], operands: tuple[Checked, Checked] | None = None
    ) -> Checked:
        a, b = operands or (self._check(n.this), self._check(n.expression))
        for side, node in ((a, n.this), (b, n.expression)):
            if side.typed.type not in (SqlType.INT, SqlType.FLOAT, SqlType.NULL):
                raise self._type_error(
                    f"arithmetic needs numbers; this operand is {_type_name(side.typed)}",
                    node,
                    hint=self._cast_hint(side.typed, (SqlType.INT,)),
                )
        if a.typed.type is SqlType.INT and b.typed.type is SqlType.INT:
            result = _corners(a.typed, b.typed, op)
            if result.bounded:
                return Checked(result, n.__class__(this=a.tree, expression=b.tree))
        # Beyond the public integer range (or with a real operand): compute in DOUBLE, which cannot raise.
        typed = _float_corners(a.typed, b.typed, op) if SqlType.NULL not in (a.typed.type, b.typed.type) else FLOAT
        return Checked(typed, n.__class__(this=_as_double(a.tree), expression=_as_double(b.tree)))

    def _int_div(self, n: exp.IntDiv | exp.Mod) -> Checked:
        a = self._need(n.this, SqlType.INT, SqlType.FLOAT, what="the dividend")
        b = self._need(n.expression, SqlType.INT, SqlType.FLOAT, what="the divisor")
        if a.typed.type is SqlType.INT and b.typed.type is SqlType.INT and a.typed.bounded:
            reach = a.typed.max_abs or 0.0
            tree = n.__class__(this=a.tree, expression=_nullif_zero(b.tree))
            if isinstance(n, exp.Mod) and b.typed.bounded:
                # A remainder has the dividend's sign (on every engine) and is smaller than the divisor.
                reach = min(reach, max((b.typed.max_abs or 0.0) - 1, 0.0))
                lo = -reach if (a.typed.lo or 0) < 0 else 0.0
                hi = reach if (a.typed.hi or 0) > 0 else 0.0
                return Checked(int_range(lo, hi), tree)
            return Checked(int_range(-reach - 1, reach + 1), tree)
        return Checked(FLOAT, n.__class__(this=_as_double(a.tree), expression=_nullif_zero(_as_double(b.tree))))

    def _date_shift(self, date: Checked, by: Checked, n: exp.Expr, sign: int) -> Checked:
        if by.typed.type is SqlType.INTERVAL:
            lo, hi = by.typed.lo, by.typed.hi
        elif by.typed.bounded:
            lo, hi = by.typed.lo, by.typed.hi
        else:
            raise reject(
                "a date plus a number of days needs a number with bounds",
                "date_range",
                n,
                self.sql,
                hint="add an integer column with declared bounds, or an INTERVAL literal",
            )
        if sign < 0:
            lo, hi = -hi, -lo  # type: ignore[operator]
        new_lo, new_hi = date.typed.lo + lo, date.typed.hi + hi  # type: ignore[operator]
        if new_lo < MIN_DAY or new_hi > MAX_DAY:
            raise reject(
                "this date arithmetic can leave the range of dates (years 1 to 9999)",
                "date_range",
                n,
                self.sql,
                hint="use smaller intervals",
            )
        op = exp.Sub if isinstance(n, exp.Sub) else exp.Add
        days = by.tree
        if by.typed.type is not SqlType.INTERVAL:
            # Engines add an INTEGER number of days to a date, not a BIGINT (DuckDB has no DATE + BIGINT); the
            # range checked above keeps the number within a few million.
            days = exp.Cast(this=days, to=exp.DataType.build("INT"))
        shifted: exp.Expr = op(this=date.tree, expression=days)
        if by.typed.type is SqlType.INTERVAL:  # date ± interval is a timestamp in the engine: keep it a date
            shifted = exp.Cast(this=shifted, to=exp.DataType.build("DATE"))
        return Checked(Typed(SqlType.DATE, new_lo, new_hi), shifted)

    def _comparable(self, left: exp.Expr, right: exp.Expr, n: exp.Expr) -> tuple[Checked, Checked]:
        a, b = self._check(left), self._check(right)
        # A quoted date compared with a date is checked now, so that no conversion can fail on the rows.
        if a.typed.type is SqlType.DATE and b.typed.type is SqlType.TEXT:
            b = self._as_date_literal(right, b)
        elif b.typed.type is SqlType.DATE and a.typed.type is SqlType.TEXT:
            a = self._as_date_literal(left, a)
        if a.typed.type is SqlType.TEXT:
            self._cost(min(a.typed.length, b.typed.length or a.typed.length))
        if unify(a.typed, b.typed) is None or SqlType.INTERVAL in (a.typed.type, b.typed.type):
            raise self._type_error(
                f"cannot compare {_type_name(a.typed)} with {_type_name(b.typed)}",
                n,
                hint=self._cast_hint(a.typed, (b.typed.type,)) or self._cast_hint(b.typed, (a.typed.type,)),
            )
        return a, b

    def _as_date_literal(self, node: exp.Expr, got: Checked) -> Checked:
        value = _string_literal(node)
        day = _parse_date(value) if value is not None else None
        if day is None:
            raise self._type_error("a date can be compared with a date or a quoted date 'YYYY-MM-DD'", node)
        return Checked(Typed(SqlType.DATE, day.toordinal(), day.toordinal()), _date_literal(day))

    def _in(self, n: exp.In) -> Checked:
        if n.args.get("query") or n.args.get("unnest") or n.args.get("field"):
            raise reject("IN takes a list of values", "subquery", n, self.sql, hint="write the values in the query")
        if len(n.expressions) > MAX_IN_LIST:
            raise reject(f"IN lists may hold at most {MAX_IN_LIST:,} values", "too_complex", n, self.sql)
        items = [self._comparable(n.this, e, n) for e in n.expressions]
        if not items:
            raise self._type_error("IN needs at least one value", n)
        return Checked(BOOL, exp.In(this=items[0][0].tree, expressions=[b.tree for _, b in items]))

    def _like(self, n: exp.Like | exp.ILike) -> Checked:
        word = "ILIKE" if isinstance(n, exp.ILike) else "LIKE"
        subject = self._need(n.this, SqlType.TEXT, what=f"the left side of {word}")
        pattern = self._literal_text(n.expression, "the LIKE pattern")
        self._cost(subject.typed.length, 1 + pattern.count("%") + pattern.count("_") / 4 + len(pattern) / 16)
        return Checked(BOOL, n.__class__(this=subject.tree, expression=exp.Literal.string(pattern)))

    def _case(self, n: exp.Case) -> Checked:
        operand = n.this
        conditions: list[exp.Expr] = []
        values: list[Checked] = []
        for branch in n.args.get("ifs") or []:
            if operand is not None:
                op, cond = self._comparable(operand, branch.this, branch)
                conditions.append(exp.EQ(this=op.tree, expression=cond.tree))
            else:
                conditions.append(self._need(branch.this, SqlType.BOOL, what="a WHEN condition").tree)
            values.append(self._check(branch.args["true"]))
        default = n.args.get("default")
        if default is not None:
            values.append(self._check(default))
        typed = self._unify_all(values, n)
        trees = [_coerce(v, typed) for v in values] + ([] if default is not None else [exp.Null()])
        return Checked(typed, select_first(conditions, trees))

    def _unify_all(self, items: list[Checked], n: exp.Expr) -> Typed:
        typed = NULL
        for item in items:
            joined = unify(typed, item.typed)
            if joined is None:
                raise self._type_error(
                    f"the branches mix {_type_name(typed)} and {_type_name(item.typed)}",
                    n,
                    hint="give every branch the same type (CAST one of them)",
                )
            typed = joined
        return typed

    def _cast(self, n: exp.Cast | exp.TryCast) -> Checked:
        to = n.args.get("to")
        name = to.this.name if isinstance(to, exp.DataType) and hasattr(to.this, "name") else str(to)
        target = _CASTS.get(name.upper())
        if target is None:
            raise reject(
                f"CAST to {name} is not supported",
                "unsupported_cast",
                n,
                self.sql,
                hint="cast to BIGINT, DOUBLE, VARCHAR, DATE or BOOLEAN",
            )
        value = n.this
        if target is SqlType.DATE and isinstance(value, exp.Literal) and value.is_string:
            day = _parse_date(str(value.this))
            if day is None:
                raise reject(f"{str(value.this)!r} is not a date (YYYY-MM-DD)", "bad_argument", n, self.sql)
            return Checked(Typed(SqlType.DATE, day.toordinal(), day.toordinal()), _date_literal(day))
        inner = self._check(value)
        src = inner.typed
        if target is SqlType.DATE and src.type not in (SqlType.TEXT, SqlType.DATE, SqlType.NULL):
            raise self._type_error(f"cannot cast {_type_name(src)} to a date", n)
        if src.type is SqlType.DATE and target not in (SqlType.DATE, SqlType.TEXT):
            raise self._type_error(f"cannot cast a date to {target.value}", n, hint="use year(), month(), ...")
        if target is SqlType.INT:
            typed = (
                int_range(math.floor(src.lo), math.ceil(src.hi))  # type: ignore[arg-type]
                if src.type.numeric and src.bounded
                else Typed(SqlType.INT)
            )
            typed = int_range(0, 1) if src.type is SqlType.BOOL else typed
        elif target is SqlType.FLOAT:
            typed = (
                Typed(SqlType.FLOAT, src.lo, src.hi)
                if src.type.numeric
                else float_range(0, 1)
                if src.type is SqlType.BOOL
                else FLOAT
            )
        elif target is SqlType.TEXT:
            typed = text(src.length if src.type is SqlType.TEXT else _TEXT_OF.get(src.type, 32))
        elif target is SqlType.DATE:
            typed = src if src.type is SqlType.DATE else Typed(SqlType.DATE, MIN_DAY, MAX_DAY)
        else:
            typed = BOOL
        # TRY_CAST: a value that does not convert becomes NULL instead of failing the query.
        tree: exp.Expr = exp.TryCast(this=inner.tree, to=exp.DataType.build(_ENGINE_TYPE[target]))
        if target is SqlType.INT and src.type is SqlType.FLOAT:
            # DuckDB rounds and is NULL out of range; Spark (ANSI off) truncates and wraps: round first, and keep
            # only values a BIGINT holds (NaN compares above every number on both engines, so it is NULL too).
            rounded = exp.Round(this=_as_double(inner.tree))
            low, high = _as_double(_BIGINT_DOUBLE_MIN.copy()), _as_double(_BIGINT_DOUBLE_MAX.copy())
            fits = exp.Between(this=rounded.copy(), low=low, high=high)
            cast = exp.TryCast(this=rounded, to=exp.DataType.build(_ENGINE_TYPE[target]))
            tree = exp.Case(ifs=[exp.If(this=fits, true=cast)], default=exp.Null())
        if target is SqlType.DATE and src.type is SqlType.TEXT:
            # Engines read text such as '+1000000-01-01' or '-0001-01-01' as dates outside years 1-9999, where
            # some functions and the conversion of a result fail: such a date is missing, as the range says.
            tree = within_calendar(tree)
        return Checked(typed, tree)

    # --- functions ----------------------------------------------------------------------------------------

    def _function(self, n: exp.Expr) -> Checked:  # noqa: C901 - one dispatch over the allowlist
        name = func_name(n)
        if isinstance(n, exp.Anonymous):
            return self._anonymous(n, name)
        if isinstance(n, exp.Abs):
            inner = self._need(n.this, SqlType.INT, SqlType.FLOAT)
            t = inner.typed
            typed = (
                int_range(0, t.max_abs)
                if t.type is SqlType.INT and t.bounded
                else (t if t.type is not SqlType.INT else Typed(SqlType.INT))
            )
            if t.type is SqlType.INT and not t.bounded:
                return Checked(FLOAT, exp.Abs(this=_as_double(inner.tree)))
            if t.type is SqlType.FLOAT:
                typed = _magnitude(t) if t.bounded else FLOAT
            return Checked(typed, exp.Abs(this=inner.tree))
        if isinstance(n, exp.Sign):
            inner = self._need(n.this, SqlType.INT, SqlType.FLOAT)
            return Checked(int_range(-1, 1), exp.Sign(this=inner.tree))
        if isinstance(n, exp.Floor | exp.Ceil | exp.Round | exp.Trunc):
            return self._rounding(n)
        if isinstance(n, _UNARY_FLOAT):
            inner = self._need(n.this, SqlType.INT, SqlType.FLOAT)
            value = _as_double(inner.tree)
            return Checked(
                _increasing(n, inner.typed), n.__class__(this=_positive(value) if isinstance(n, exp.Ln) else value)
            )
        if isinstance(n, exp.Log):
            args = [self._need(a, SqlType.INT, SqlType.FLOAT) for a in (n.this, n.expression) if a is not None]
            trees = [_positive(_as_double(a.tree)) for a in args]
            if len(trees) > 1:  # log(base, x): a base of 1 has no logarithm
                one = _as_double(exp.Literal.number(1))
                trees[0] = exp.Nullif(this=trees[0], expression=one)
            return Checked(FLOAT, exp.Log(this=trees[0], expression=trees[1] if len(trees) > 1 else None))
        if isinstance(n, exp.IsNan):
            inner = self._need(n.this, SqlType.INT, SqlType.FLOAT)
            return Checked(BOOL, exp.IsNan(this=_as_double(inner.tree)))
        if isinstance(n, exp.IsInf):
            return Checked(BOOL, _infinity_test("isinf", self._need(n.this, SqlType.INT, SqlType.FLOAT).tree))
        if isinstance(n, _SAME_TEXT):
            inner = self._need(n.this, SqlType.TEXT)
            # Upper/lower case can change a character into up to three (e.g. 'ß').
            self._cost(inner.typed.length)
            return Checked(text(self._text_length(inner.typed.length * 3, n)), n.__class__(this=inner.tree))
        if isinstance(n, exp.Trim):
            inner = self._need(n.this, SqlType.TEXT)
            chars = n.args.get("expression")
            self._cost(inner.typed.length)
            tree: exp.Expr = n.copy()
            tree.set("this", inner.tree)
            if chars is not None:
                tree.set("expression", exp.Literal.string(self._literal_text(chars, "the characters to trim")))
            return Checked(inner.typed, tree)
        if isinstance(n, exp.Length):
            inner = self._need(n.this, SqlType.TEXT)
            self._cost(inner.typed.length)
            return Checked(int_range(0, inner.typed.length), exp.Length(this=inner.tree))
        if isinstance(n, _TEXT_TESTS):
            subject = self._need(n.this, SqlType.TEXT)
            needle = self._literal_text(n.expression, f"the second argument of {name}()")
            self._cost(subject.typed.length, 0.5 + len(needle) / 64)
            return Checked(BOOL, n.__class__(this=subject.tree, expression=exp.Literal.string(needle)))
        if isinstance(n, exp.StrPosition):
            if n.args.get("position") is not None or n.args.get("occurrence") is not None:
                raise reject("strpos takes two arguments", "bad_argument", n, self.sql)
            subject = self._need(n.this, SqlType.TEXT)
            needle = self._literal_text(n.args.get("substr"), "the string to find")
            self._cost(subject.typed.length, 1 + len(needle) / 16)
            return Checked(
                int_range(0, subject.typed.length),
                exp.StrPosition(this=subject.tree, substr=exp.Literal.string(needle)),
            )
        if isinstance(n, exp.Substring):
            subject = self._need(n.this, SqlType.TEXT)
            start = self._offset(n.args.get("start"), "the start of substring()", least=1)
            size = (
                self._offset(n.args.get("length"), "the length of substring()", least=0)
                if n.args.get("length") is not None
                else None
            )
            self._cost(subject.typed.length)
            return Checked(
                subject.typed,
                exp.Substring(this=subject.tree, start=start.tree, length=size.tree if size else None),
            )
        if isinstance(n, exp.Left | exp.Right):
            subject = self._need(n.this, SqlType.TEXT)
            count = self._offset(n.expression, f"the length of {name}()", least=0)
            self._cost(subject.typed.length)
            return Checked(subject.typed, n.__class__(this=subject.tree, expression=count.tree))
        if isinstance(n, exp.Replace):
            subject = self._need(n.this, SqlType.TEXT)
            old = self._literal_text(n.expression, "the string to replace")
            new = self._literal_text(n.args.get("replacement"), "the replacement")
            growth = max(1.0, len(new) / len(old)) if old else 1.0
            length = self._text_length(subject.typed.length * growth, n)
            self._cost(subject.typed.length + length, 2)
            return Checked(
                text(length),
                exp.Replace(this=subject.tree, expression=exp.Literal.string(old), replacement=exp.Literal.string(new)),
            )
        if isinstance(n, exp.Concat | exp.DPipe):
            parts = n.expressions if isinstance(n, exp.Concat) else [n.this, n.expression]
            checked = [self._check(p) for p in parts]
            for c, p in zip(checked, parts, strict=True):
                if c.typed.type is SqlType.INTERVAL:
                    raise self._type_error("an interval cannot be concatenated", p)
            length = sum(
                c.typed.length if c.typed.type is SqlType.TEXT else _TEXT_OF.get(c.typed.type, 32) for c in checked
            )
            trees = [
                c.tree if c.typed.type is SqlType.TEXT else exp.TryCast(this=c.tree, to=exp.DataType.build("VARCHAR"))
                for c in checked
            ]
            self._cost(length)
            return Checked(text(self._text_length(length, n)), exp.Concat(expressions=trees, safe=True))
        if isinstance(n, exp.Pad):
            subject = self._need(n.this, SqlType.TEXT)
            width = self._offset(n.expression, f"the width of {name}()")
            fill = self._literal_text(n.args.get("fill_pattern"), "the padding")
            if not fill:
                raise reject("the padding must not be empty", "bad_argument", n, self.sql)
            length = self._text_length(max(width.typed.hi or 0, 0), n)
            self._cost(subject.typed.length + length, _PAD_WORK)
            return Checked(
                text(length),
                exp.Pad(
                    this=subject.tree,
                    expression=width.tree,
                    fill_pattern=exp.Literal.string(fill),
                    is_left=n.args.get("is_left"),
                ),
            )
        if isinstance(n, exp.Repeat):
            subject = self._need(n.this, SqlType.TEXT)
            times = self._offset(n.args.get("times"), "the count of repeat()")
            length = self._text_length(subject.typed.length * max(times.typed.hi or 0, 0), n)
            self._cost(length, 2)
            return Checked(text(length), exp.Repeat(this=subject.tree, times=times.tree))
        if isinstance(n, exp.SplitPart):
            subject = self._need(n.this, SqlType.TEXT)
            sep = self._literal_text(n.args.get("delimiter"), "the delimiter")
            index = self._offset(n.args.get("part_index"), "the part index")
            self._cost(subject.typed.length)
            # Part 0 is '' in DuckDB but an error in Spark, whatever its ANSI mode: it becomes a part past the end
            # ('' on every engine). The CASE is over integers only; the split itself runs on every row.
            part = exp.Case(
                ifs=[
                    exp.If(
                        this=exp.EQ(this=index.tree.copy(), expression=exp.Literal.number(0)),
                        true=exp.Literal.number(_PAST_THE_END),
                    )
                ],
                default=index.tree,
            )
            return Checked(
                subject.typed,
                exp.SplitPart(this=subject.tree, delimiter=exp.Literal.string(sep), part_index=part),
            )
        if isinstance(n, exp.RegexpLike | exp.RegexpFullMatch):
            subject = self._need(n.this, SqlType.TEXT)
            pattern = self._regex(n.expression)
            self._cost(subject.typed.length, _REGEX_WORK + len(pattern) / 16)
            tree = n.__class__(this=subject.tree, expression=exp.Literal.string(pattern))
            flag = n.args.get("flag") or n.args.get("options")
            if flag is not None:
                flags = self._literal_text(flag, "the regular-expression options")
                if not set(flags) <= _REGEX_FLAGS:
                    raise reject(f"unknown regular-expression option in {flags!r}", "bad_argument", flag, self.sql)
                tree.set("flag" if "flag" in n.args else "options", exp.Literal.string(flags))
            return Checked(BOOL, tree)
        if isinstance(n, exp.RegexpExtract):
            subject = self._need(n.this, SqlType.TEXT)
            pattern = self._regex(n.expression)
            self._cost(subject.typed.length, _REGEX_WORK + len(pattern) / 16)
            for extra in ("position", "occurrence", "parameters"):
                if n.args.get(extra) is not None:
                    raise reject("regexp_extract takes (text, pattern[, group])", "bad_argument", n, self.sql)
            group = n.args.get("group")
            tree = exp.RegexpExtract(this=subject.tree, expression=exp.Literal.string(pattern))
            if group is not None:
                tree.set("group", exp.Literal.number(self._small_int(group, "the group", 0, 9)))
            return Checked(subject.typed, tree)
        if isinstance(n, exp.TimestampTrunc | exp.DateTrunc):
            unit = _part_name(n.args.get("unit"))
            if unit not in _DATE_PARTS_TRUNC:
                raise reject(f"date_trunc takes one of {sorted(_DATE_PARTS_TRUNC)}", "bad_argument", n, self.sql)
            date = self._need(n.this, SqlType.DATE)
            if unit == "day":  # a date is its own day (Spark's TRUNC has no 'day' unit: it answered NULL)
                return Checked(date.typed, date.tree)
            tree = exp.Cast(
                this=exp.DateTrunc(unit=exp.Literal.string(unit), this=date.tree), to=exp.DataType.build("DATE")
            )
            return Checked(Typed(SqlType.DATE, max(MIN_DAY, date.typed.lo - 366), date.typed.hi), tree)  # type: ignore[operator]
        if isinstance(n, exp.Extract):
            return self._date_part(_part_name(n.this), n.expression, n)
        if type(n) in _DATE_FUNCS:
            return self._date_part(_DATE_FUNCS[type(n)], n.this, n)
        if isinstance(n, exp.DateDiff):
            unit = _part_name(n.args.get("unit")) or "day"
            if unit not in _DIFF_PARTS:
                raise reject(f"date_diff takes one of {sorted(_DIFF_PARTS)}", "bad_argument", n, self.sql)
            a, b = self._need(n.this, SqlType.DATE), self._need(n.expression, SqlType.DATE)
            span_days = float(MAX_DAY - MIN_DAY)
            if a.typed.bounded and b.typed.bounded:
                span_days = max(a.typed.hi, b.typed.hi) - min(a.typed.lo, b.typed.lo)  # type: ignore[type-var, operator]
            reach = span_days // _DIFF_PARTS[unit] + 1
            tree = (
                exp.DateDiff(this=a.tree, expression=b.tree, unit=exp.var(unit.upper()))
                if unit in ("day", "week")  # whole days, or whole weeks of them, toward zero: alike everywhere
                else _calendar_diff(unit, a.tree, b.tree)
            )
            return Checked(int_range(-reach, reach), tree)
        if isinstance(n, exp.LastDay):
            date = self._need(n.this, SqlType.DATE)
            return Checked(
                Typed(SqlType.DATE, date.typed.lo, min(MAX_DAY, date.typed.hi + 31)),  # type: ignore[operator]
                exp.LastDay(this=date.tree),
            )
        if isinstance(n, exp.Dayname | exp.Monthname):
            date = self._need(n.this, SqlType.DATE)
            names: tuple[str, ...] = _DAY_NAMES if isinstance(n, exp.Dayname) else _MONTH_NAMES
            number: exp.Expr = (
                exp.Add(this=_weekday(date.tree), expression=exp.Literal.number(1))
                if isinstance(n, exp.Dayname)
                else exp.Extract(this=exp.var("MONTH"), expression=date.tree)
            )
            position = exp.Cast(this=number, to=exp.DataType.build("INT"))
            array = exp.Array(expressions=[exp.Literal.string(name) for name in names])
            return Checked(text(9), exp.Bracket(this=array, expressions=[position], offset=1, safe=False))
        if isinstance(n, exp.Interval):
            return self._interval(n)
        if isinstance(n, exp.DateAdd):
            date = self._need(n.this, SqlType.DATE)
            by = self._check(n.expression)
            if by.typed.type is not SqlType.INTERVAL:
                raise self._type_error("date_add takes an INTERVAL", n)
            return self._date_shift(date, by, exp.Add(this=n.this, expression=n.expression), 1)
        if isinstance(n, exp.Func | exp.Binary | exp.Unary | exp.Predicate):
            raise reject(
                f"function {name.upper()}() is not allowed here",
                "unsupported_function",
                n,
                self.sql,
                hint=f"allowed: {self.functions}",
            )
        raise reject(
            f"{type(n).__name__.upper()} is not allowed in this expression", "unsupported_expression", n, self.sql
        )

    def _anonymous(self, n: exp.Anonymous, name: str) -> Checked:
        args = n.expressions
        if name in _ANON_TEXT_TESTS and len(args) == 2:
            return self._check(_ANON_TEXT_TESTS[name](this=args[0], expression=args[1]))
        if name == "strlen" and len(args) == 1:
            return self._check(exp.Length(this=args[0]))
        if name in ("date_part", "datepart") and len(args) == 2:
            return self._date_part(_part_name(args[0]), args[1], n)
        if name in ("isinf", "isfinite") and len(args) == 1:
            return Checked(BOOL, _infinity_test(name, self._need(args[0], SqlType.INT, SqlType.FLOAT).tree))
        if name == "strip_accents" and len(args) == 1:
            inner = self._need(args[0], SqlType.TEXT)
            self._cost(inner.typed.length, 2)
            return Checked(inner.typed, exp.Anonymous(this=name, expressions=[inner.tree]))
        raise reject(
            f"function {name.upper()}() is not allowed here",
            "unsupported_function",
            n,
            self.sql,
            hint=f"allowed: {self.functions}",
        )

    def _rounding(self, n: exp.Floor | exp.Ceil | exp.Round | exp.Trunc) -> Checked:
        inner = self._need(n.this, SqlType.INT, SqlType.FLOAT)
        decimals = n.args.get("decimals")
        digits = self._small_int(decimals, f"the digits of {func_name(n)}()", -30, 30) if decimals is not None else None
        extra = {k: v for k, v in n.args.items() if k not in ("this", "decimals") and v}
        if extra:
            raise reject(f"{func_name(n)}() takes (number[, digits])", "bad_argument", n, self.sql)
        tree = n.__class__(this=inner.tree)
        if digits is not None:
            tree.set("decimals", exp.Literal.number(digits))
        t = inner.typed
        if t.type is SqlType.INT:
            if not t.bounded:
                return Checked(FLOAT, n.__class__(this=_as_double(inner.tree), decimals=tree.args.get("decimals")))
            reach = (t.max_abs or 0.0) * 10 + 10  # rounding to tens and beyond can move a value up to one unit
            # An integer stays an integer in the engine too: DuckDB's FLOOR and CEIL of an integer are DOUBLE, which
            # an operator taking integers only (| & ^) would fail to bind after the checker had typed it INT.
            whole_number = exp.Cast(this=tree, to=exp.DataType.build("BIGINT"))
            return Checked(int_range(-reach, reach) if digits is None or digits < 0 else t, whole_number)
        typed = FLOAT
        if t.lo is not None and t.hi is not None and math.isfinite(t.lo) and math.isfinite(t.hi):
            # Rounding to multiples of s (1, or 10**-digits for negative digits) lands between the multiples of s
            # at or below the least value and at or above the greatest (finer digits stay within whole numbers);
            # FLOOR and CEIL to whole multiples go one way only.
            step = 10.0**-digits if digits is not None and digits < 0 else 1.0
            whole = digits is None or digits <= 0
            down = math.ceil if whole and isinstance(n, exp.Ceil) else math.floor
            up = math.floor if whole and isinstance(n, exp.Floor) else math.ceil
            typed = float_range(down(t.lo / step) * step, up(t.hi / step) * step)
        return Checked(typed, tree)

    def _offset(self, node: exp.Expr | None, what: str, *, least: int | None = None) -> Checked:
        """An integer argument whose public range keeps it inside the engine's offset limits (and, with `least`, at
        or above it: below it the engines disagree on what the function returns)."""
        got = self._need(node, SqlType.INT, what=what)
        if got.typed.type is SqlType.NULL:
            return got
        if not got.typed.bounded or (got.typed.max_abs or 0) > MAX_OFFSET:
            raise reject(
                f"{what} needs an integer with bounds within ±{MAX_OFFSET:,}",
                "bad_argument",
                node or exp.Null(),
                self.sql,
                hint="use a literal or a column with declared bounds",
            )
        if least is not None and (got.typed.lo is None or got.typed.lo < least):
            raise reject(
                f"{what} must be at least {least} on every row (engines disagree below it); its range here starts at "
                f"{got.typed.lo:g}",
                "bad_argument",
                node or exp.Null(),
                self.sql,
                hint=f"use GREATEST(..., {least}), or count from the other end with right() / left()",
            )
        # The engines take 32-bit offsets here; the public range proves the value fits.
        value = _literal_int(node)
        tree = (
            exp.Literal.number(value)
            if value is not None
            else exp.Cast(this=got.tree, to=exp.DataType.build("INTEGER"))
        )
        return Checked(got.typed, tree)

    def _date_part(self, part: str | None, value: exp.Expr | None, n: exp.Expr) -> Checked:
        if part not in _DATE_PARTS:
            raise reject(f"date parts are {sorted(_DATE_PARTS)}", "bad_argument", n, self.sql)
        date = self._need(value, SqlType.DATE)
        fixed = _DATE_PARTS[part]
        if fixed is None:
            lo = dt.date.fromordinal(int(date.typed.lo)).year  # type: ignore[arg-type]
            hi = dt.date.fromordinal(int(date.typed.hi)).year  # type: ignore[arg-type]
            typed = int_range(
                lo // 100 if part == "century" else lo // 10 if part == "decade" else lo,
                hi // 100 + 1 if part == "century" else hi // 10 if part == "decade" else hi,
            )
        else:
            typed = int_range(*fixed)
        if part in ("dayofweek", "dow"):
            return Checked(typed, _weekday(date.tree))
        if part == "isodow":
            return Checked(typed, _weekday(date.tree, iso=True))
        return Checked(typed, exp.Extract(this=exp.var(part.upper()), expression=date.tree))

    def _interval(self, n: exp.Interval) -> Checked:
        value = n.this
        unit = _part_name(n.args.get("unit"))
        raw = str(value.this).strip() if isinstance(value, exp.Literal) else None
        if raw is not None and unit is None and " " in raw:  # INTERVAL '3 days'
            raw, unit = raw.split(None, 1)
            unit = unit.lower()
        try:
            count = int(raw) if raw is not None else None
        except ValueError:
            count = None
        if count is None or unit not in _INTERVAL_DAYS or abs(count) > 100_000:
            raise reject(
                "intervals are INTERVAL n DAY|WEEK|MONTH|YEAR with an integer literal n (|n| ≤ 100,000)",
                "bad_argument",
                n,
                self.sql,
            )
        days = count * _INTERVAL_DAYS[unit]
        unit_name = unit.rstrip("s").upper()
        return Checked(
            Typed(SqlType.INTERVAL, min(0, days) - 1, max(0, days) + 1),
            exp.Interval(this=exp.Literal.string(str(count)), unit=exp.var(unit_name)),
        )


def _check_escapes(pattern: str, escape: str, node: exp.Expr, sql: str) -> None:
    """Every escape in a LIKE pattern must be followed by `%`, `_` or the escape itself. An engine checks this only
    when a value matches up to a dangling escape, so its error would depend on the rows: refused before the charge."""
    i = 0
    while i < len(pattern):
        if pattern[i] == escape:
            if i + 1 >= len(pattern) or pattern[i + 1] not in ("%", "_", escape):
                raise reject(
                    f"in the LIKE pattern, the escape {escape!r} must be followed by '%', '_' or itself",
                    "bad_argument",
                    node,
                    sql,
                    hint=f"write {escape}% for a literal %, {escape}_ for a literal _, {escape}{escape} for {escape}",
                )
            i += 2
        else:
            i += 1
