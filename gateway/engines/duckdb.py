"""The DuckDB engine (the embedded default): the private database, dataset registration and the pre-bounded
tables.

Registering a dataset loads its Parquet or CSV source into the private database and builds
`bounded_<dataset>`: every value converted to its policy type by total expressions (numbers and dates clamped to
the policy's bounds, text and categories cut to their `max_length`, unreadable values missing), fixed-point integer
copies (`__fx_<col>`, `__fx2_<col>` for squares) for exact sums, and at most `max_rows_per_unit` rows per privacy
unit: those whose keyed hash of (secret key, the row's own converted values, the unit among them) ranks lowest
within the unit. So the kept rows of a unit depend on the key and that unit's rows only: the bounded tables of two
neighbouring datasets differ in the rows of the unit that differs, and not at all with the order of the rows.
Every query, synthesis and labeling-function run reads only that table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import json
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from sqlglot import exp

from gateway.engines.base import CatalogError, EngineError, EngineKind
from policies.errors import DatasetNotFound
from policies.schema import NUMERIC_TYPES, Column, ColumnType, Policy, Usage, bounded_table, parse_policy

_META = "__bastion_datasets"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _double(value: float) -> str:
    """A DOUBLE literal that DuckDB reads as exactly this float (a plain decimal would be read as a DECIMAL)."""
    text = repr(float(value))
    return text if "e" in text else text + "e0"


def _lit(value: Any) -> str:
    if isinstance(value, dt.date):
        return f"DATE '{value.isoformat()}'"
    return _double(value)


def _value(name: str, col: Column) -> str:
    """The SQL of a column's bounded value from the source row: total, whatever the source type and value."""
    src = _q(name)
    t = col.type
    if t in NUMERIC_TYPES:
        number = f"TRY_CAST({src} AS DOUBLE)"
        if col.bounds is None:  # the privacy unit, the gold column or a declared domain: kept, never summed
            if t is ColumnType.INT:
                return f"TRY_CAST({src} AS BIGINT)"
            return f"CASE WHEN isnan({number}) THEN NULL ELSE {number} END"
        lo, hi = (_double(b) for b in col.bounds)
        # Clamp as a double (NaN is missing; ±inf and out-of-range values go to a bound), then convert: an int's
        # bounds lie within ±2**53, so the rounded clamped value always fits a BIGINT.
        clamped = f"LEAST(GREATEST({number}, {lo}), {hi})"
        if t is ColumnType.INT:
            clamped = f"TRY_CAST(ROUND({clamped}) AS BIGINT)"
        # DuckDB's GREATEST/LEAST skip NULLs: keep a missing value missing instead of clamping it to a bound.
        return f"CASE WHEN {number} IS NULL OR isnan({number}) THEN NULL ELSE {clamped} END"
    if t is ColumnType.DATE:
        day = f"TRY_CAST({src} AS DATE)"
        if col.bounds is None:
            return day
        lo, hi = (_lit(b) for b in col.bounds)
        return f"CASE WHEN {day} IS NULL THEN NULL ELSE LEAST(GREATEST({day}, {lo}), {hi}) END"
    if t is ColumnType.BOOL:
        return f"TRY_CAST({src} AS BOOLEAN)"
    text = f"TRY_CAST({src} AS VARCHAR)"
    return text if col.max_length is None else f"left({text}, {int(col.max_length)})"


def _fixed_point(name: str, col: Column) -> list[str]:
    """Fixed-point integer copies of a clamped numeric column for exact sums and sums of squares.

    |value| <= max_abs, fx_unit >= max_abs / 2**31 and fx2_unit >= max_abs**2 / 2**31 (squared in DOUBLE, finite as
    |bounds| <= 1e150), so both fit a BIGINT; TRY_CAST keeps the expressions total regardless."""
    value = f"CAST({_q(name)} AS DOUBLE)"
    return [
        f"TRY_CAST(ROUND({value} / {_double(col.fx_unit)}) AS BIGINT) AS {_q('__fx_' + name)}",
        f"TRY_CAST(ROUND({value} * {value} / {_double(col.fx2_unit)}) AS BIGINT) AS {_q('__fx2_' + name)}",
    ]


def _outputs(name: str, col: Column) -> list[str]:
    """The bounded table's columns for one policy column."""
    summed = col.type in NUMERIC_TYPES and col.bounds is not None
    return [_q(name), *(_fixed_point(name, col) if summed else [])]


def _reader(source: Path) -> str:
    suffix = "".join(source.suffixes).lower()
    path = str(source).replace("'", "''")
    if suffix.endswith(".parquet"):
        return f"read_parquet('{path}')"
    if suffix.endswith((".csv", ".csv.gz", ".tsv")):
        # Every field as text, converted by the policy's types: no value can fail the read, and a row's values do
        # not depend on the types DuckDB would infer from the other rows.
        return f"read_csv('{path}', header=true, auto_detect=true, all_varchar=true)"
    raise CatalogError(f"unsupported source format {source.name!r}: use Parquet or CSV")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@contextlib.contextmanager
def _without_type_pushdown(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """DuckDB's type pushdown turns a TRY_CAST over read_csv into a strict typed read that fails on a bad cell
    (duckdb/duckdb#23818); it is switched off while a source is read, so every conversion stays total. The setting
    is global to the database instance: the previous value comes back afterwards."""
    names = {r[0] for r in con.execute("SELECT name FROM duckdb_optimizers()").fetchall()}
    if "type_pushdown" not in names:
        yield
        return
    (before,) = con.execute("SELECT current_setting('disabled_optimizers')").fetchone() or ("",)
    disabled = [o for o in str(before or "").split(",") if o.strip()]
    con.execute("SET disabled_optimizers = ?", [",".join([*disabled, "type_pushdown"])])
    try:
        yield
    finally:
        con.execute("SET disabled_optimizers = ?", [",".join(disabled)])


def _bounded_query(policy: Policy, keep: list[str], reader: str, key: str) -> tuple[str, list[str] | None]:
    """The SELECT that builds the pre-bounded table, and its parameters (the bounding key is one, never SQL text).

    Each unit keeps the k rows whose keyed SHA-256 of the JSON list of the row's converted values (the unit among
    them) is lowest. Rows that tie are identical in every kept column, so which of them is taken does not matter."""
    cols = policy.columns
    values = ", ".join(f"{_value(name, cols[name])} AS {_q(name)}" for name in keep)
    outputs = ", ".join(out for name in keep for out in _outputs(name, cols[name]))
    unit = policy.unit_column
    if unit is None:
        return f"WITH vals AS (SELECT {values} FROM {reader}) SELECT {outputs} FROM vals", None
    row = f"to_json(list_value({', '.join(f'CAST({_q(name)} AS VARCHAR)' for name in keep)}))"
    body = (
        f"WITH vals AS (SELECT {values} FROM {reader}), "
        f"ranked AS (SELECT *, row_number() OVER (PARTITION BY {_q(unit)} ORDER BY sha256(? || '/' || {row})) "
        f"AS __take FROM vals) "
        f"SELECT {outputs} FROM ranked WHERE __take <= {policy.max_rows_per_unit}"
    )
    return body, [key]


def _diagnose(con: duckdb.DuckDBPyConnection, policy: Policy, keep: list[str], reader: str, exc: Exception) -> str:
    """Say which column could not be read or converted, if one fails on its own; else what DuckDB said."""
    for name in keep:
        for expr, failure in (
            (_q(name), f"cannot read column {name!r} of the source"),
            (_value(name, policy.columns[name]), f"column {name!r} cannot be converted to {policy.columns[name].type}"),
        ):
            try:
                con.execute(f"SELECT count({expr}) FROM {reader}").fetchall()
            except duckdb.Error as col_exc:
                return f"{failure}: {_first_line(col_exc)}"
    return f"cannot build the bounded table: {_first_line(exc)}"


class DuckDBEngine:
    """The private database. The gateway opens it read-only; registration is an admin action."""

    kind = EngineKind.DUCKDB
    dialect = "duckdb"
    regex = True  # DuckDB's regular expressions and LIKE run in linear time (RE2)

    def __init__(self, db_path: str | Path, key_path: str | Path, *, read_only: bool = True) -> None:
        self.db_path = Path(db_path)
        self.key_path = Path(key_path)
        self.read_only = read_only
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()
        self._policies: dict[str, tuple[Policy, str]] = {}

    # --- connection ---------------------------------------------------------------------------------------

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A cursor on the private database for the calling thread."""
        with self._lock:
            if self._con is None:
                if not self.db_path.exists() and self.read_only:
                    raise CatalogError("no private database yet: register a dataset first (bastion register)")
                self.db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._con = duckdb.connect(str(self.db_path), read_only=self.read_only)
                if not self.read_only:
                    os.chmod(self.db_path, 0o600)
            return self._con.cursor()

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    def _bounding_key(self) -> str:
        if not self.key_path.exists():
            self.key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return self.key_path.read_text().strip()

    # --- registration -------------------------------------------------------------------------------------

    def register(self, policy: Policy, source: str | Path) -> str:
        """Load `source` and build the pre-bounded table; return the new dataset version."""
        if self.read_only:
            raise CatalogError("the catalog is open read-only")
        src = Path(source)
        if not src.exists():
            raise CatalogError(f"source file not found: {src}")
        con = self.connect()
        with _without_type_pushdown(con):
            return self._register(con, policy, src)

    def _register(self, con: duckdb.DuckDBPyConnection, policy: Policy, src: Path) -> str:
        reader = _reader(src)
        try:
            available = {r[0].lower() for r in con.execute(f"DESCRIBE SELECT * FROM {reader}").fetchall()}
        except duckdb.Error as exc:
            raise CatalogError(f"cannot read {src.name}: {_first_line(exc)}") from None
        missing = [c for c in policy.columns if c not in available]
        if missing:
            raise CatalogError(f"the source has no column(s) {missing} declared in the policy")
        keep = [
            name
            for name, col in policy.columns.items()
            if col.usage is not Usage.HIDDEN
            or (policy.labels is not None and policy.labels.gold_column == name)
            or name == policy.privacy_unit
        ]
        table = bounded_table(policy.dataset)
        body, params = _bounded_query(policy, keep, reader, self._bounding_key())
        try:
            con.execute("BEGIN TRANSACTION")
            con.execute(f"CREATE OR REPLACE TABLE {_q(table)} AS {body}", params)
            version = self._record(con, policy, src)
            con.execute("COMMIT")
        except duckdb.Error as exc:
            con.execute("ROLLBACK")
            raise CatalogError(
                f"registering {policy.dataset!r} failed: {_diagnose(con, policy, keep, reader, exc)}"
            ) from None
        self._policies.pop(policy.dataset, None)
        return version

    @staticmethod
    def _record(con: duckdb.DuckDBPyConnection, policy: Policy, src: Path) -> str:
        """Write the dataset's metadata row and return its new version: the registration's serial number and a
        random suffix (so a version never repeats, also in a rebuilt database), never anything derived from data."""
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {_META} (name VARCHAR PRIMARY KEY, version VARCHAR, "
            "policy_json VARCHAR, source VARCHAR, registered_at TIMESTAMP, serial BIGINT)"
        )
        con.execute(f"ALTER TABLE {_META} ADD COLUMN IF NOT EXISTS serial BIGINT")  # databases from before serials
        row = con.execute(f"SELECT COALESCE(max(serial), 0) FROM {_META} WHERE name = ?", [policy.dataset]).fetchone()
        serial = int(row[0] if row else 0) + 1
        version = f"{serial}-{secrets.token_hex(4)}"
        con.execute(f"DELETE FROM {_META} WHERE name = ?", [policy.dataset])
        con.execute(
            f"INSERT INTO {_META} (name, version, policy_json, source, registered_at, serial) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                policy.dataset,
                version,
                json.dumps(policy.model_dump(mode="json")),
                str(src),
                dt.datetime.now(dt.UTC).replace(tzinfo=None),
                serial,
            ],
        )
        return version

    # --- lookups ------------------------------------------------------------------------------------------

    def datasets(self) -> dict[str, tuple[Policy, str]]:
        """All registered datasets: name → (policy, version)."""
        con = self.connect()
        try:
            rows = con.execute(f"SELECT name, version, policy_json FROM {_META} ORDER BY name").fetchall()
        except duckdb.CatalogException:
            return {}
        out = {}
        for name, version, policy_json in rows:
            out[name] = (parse_policy(json.loads(policy_json), origin=name), version)
        self._policies = out
        return out

    def policy(self, dataset: str) -> tuple[Policy, str]:
        if dataset not in self._policies:
            self.datasets()
        try:
            return self._policies[dataset]
        except KeyError:
            raise DatasetNotFound(f"no dataset named {dataset!r}", dataset=dataset) from None

    # --- statements ---------------------------------------------------------------------------------------

    def _sql(self, query: exp.Query) -> str:
        return query.sql(dialect=self.dialect)

    def check(self, query: exp.Query) -> None:
        try:
            self.connect().execute(f"DESCRIBE {self._sql(query)}").fetchall()
        except duckdb.Error as exc:
            raise EngineError(_first_line(exc)) from None

    def rows(self, query: exp.Query) -> list[tuple[Any, ...]]:
        try:
            return [tuple(_python(v) for v in r) for r in self.connect().execute(self._sql(query)).fetchall()]
        except duckdb.Error as exc:
            raise EngineError(type(exc).__name__) from None

    def arrow(self, query: exp.Query) -> pa.Table:
        try:
            return self.connect().execute(self._sql(query)).to_arrow_table()
        except duckdb.Error as exc:
            raise EngineError(type(exc).__name__) from None

    @contextlib.contextmanager
    def frame(self, name: str, table: pa.Table) -> Iterator[exp.Table]:
        cur = self.connect()
        cur.register(name, table)
        try:
            yield exp.table_(name, quoted=True)
        finally:
            cur.unregister(name)


def _python(value: Any) -> Any:
    """DuckDB's HUGEINT and DECIMAL sums as exact Python ints; other values as DuckDB returns them."""
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value
