"""Catalog: the private DuckDB database, dataset registration and the pre-bounded tables.

Registering a dataset loads its Parquet or CSV source into the private database and builds
`bounded_<dataset>`: at most `max_rows_per_unit` rows per privacy unit, chosen by a keyed hash of the unit and
the row's position (independent of the data values), with numeric values clamped to the policy's bounds and
fixed-point integer copies (`__fx_<col>`, `__fx2_<col>` for squares) for exact sums. Every query, synthesis and
labeling-function run reads only that table.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any

import duckdb

from policies.errors import DatasetNotFound, GatewayError
from policies.schema import ColumnType, Policy, Usage, bounded_table, parse_policy

_META = "__bastion_datasets"


class CatalogError(GatewayError):
    status = 400
    code = "catalog_error"


_scratch_lock = threading.Lock()
_scratch_dbs: dict[int, duckdb.DuckDBPyConnection] = {}


def scratch() -> duckdb.DuckDBPyConnection:
    """A cursor on an empty in-memory DuckDB, never the private database, for computing over public or released
    values. Opening a database costs ~20 ms, so each process keeps one and hands out cursors: a cursor is its own
    connection, so the views that concurrent requests register there do not meet. Close the cursor after use."""
    with _scratch_lock:
        db = _scratch_dbs.get(os.getpid())  # per process: a forked child must not share its parent's database
        if db is None:
            db = _scratch_dbs[os.getpid()] = duckdb.connect(":memory:")
        return db.cursor()


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(value: Any) -> str:
    if isinstance(value, dt.date):
        return f"DATE '{value.isoformat()}'"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _projection(name: str, policy: Policy) -> list[str]:
    col = policy.columns[name]
    src = _q(name)
    t = col.type
    numeric = t in (ColumnType.INT, ColumnType.FLOAT, ColumnType.DECIMAL)
    if numeric and col.bounds is None:  # the privacy unit or the gold column: kept as is, never summed
        return [f"TRY_CAST({src} AS {'BIGINT' if t is ColumnType.INT else 'DOUBLE'}) AS {_q(name)}"]
    if t is ColumnType.INT:
        cast = f"TRY_CAST(ROUND(TRY_CAST({src} AS DOUBLE)) AS BIGINT)"
    elif t in (ColumnType.FLOAT, ColumnType.DECIMAL):
        cast = f"TRY_CAST({src} AS DOUBLE)"
    elif t is ColumnType.DATE:
        cast = f"TRY_CAST({src} AS DATE)"
    elif t is ColumnType.BOOL:
        cast = f"TRY_CAST({src} AS BOOLEAN)"
    else:
        cast = f"CAST({src} AS VARCHAR)"
    value = cast
    if col.bounds is not None:
        lo, hi = col.bounds
        if t is ColumnType.INT:
            lo, hi = int(lo), int(hi)
        elif t is not ColumnType.DATE:
            lo, hi = float(lo), float(hi)
        # DuckDB's GREATEST/LEAST skip NULLs: keep a missing value missing instead of clamping it to a bound.
        value = f"CASE WHEN {cast} IS NULL THEN NULL ELSE LEAST(GREATEST({cast}, {_lit(lo)}), {_lit(hi)}) END"
    out = [f"{value} AS {_q(name)}"]
    if numeric:
        out.append(f"CAST(ROUND({value} / {col.fx_unit!r}) AS BIGINT) AS {_q('__fx_' + name)}")
        out.append(f"CAST(ROUND(({value}) * ({value}) / {col.fx2_unit!r}) AS BIGINT) AS {_q('__fx2_' + name)}")
    return out


def _reader(source: Path) -> str:
    suffix = "".join(source.suffixes).lower()
    path = str(source).replace("'", "''")
    if suffix.endswith(".parquet"):
        return f"read_parquet('{path}')"
    if suffix.endswith((".csv", ".csv.gz", ".tsv")):
        return f"read_csv('{path}', header=true, auto_detect=true)"
    raise CatalogError(f"unsupported source format {source.name!r}: use Parquet or CSV")


class Catalog:
    """The private database. The gateway opens it read-only; registration is an admin action."""

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
        reader = _reader(src)
        try:
            available = {r[0].lower() for r in con.execute(f"DESCRIBE SELECT * FROM {reader}").fetchall()}
        except duckdb.Error as exc:
            raise CatalogError(f"cannot read {src.name}: {exc}") from None
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
        projections = [p for name in keep for p in _projection(name, policy)]
        table = bounded_table(policy.dataset)
        k = policy.max_rows_per_unit
        unit = policy.unit_column
        key = self._bounding_key()
        if unit is None:
            body = f"SELECT {', '.join(projections)} FROM {reader}"
        else:
            body = (
                f"WITH src AS (SELECT *, row_number() OVER () AS __rn FROM {reader}), "
                f"ranked AS (SELECT *, row_number() OVER (PARTITION BY {_q(unit)} ORDER BY "
                f"md5('{key}' || '/' || COALESCE(CAST({_q(unit)} AS VARCHAR), '') || '/' || CAST(__rn AS VARCHAR))"
                f") AS __take FROM src) "
                f"SELECT {', '.join(projections)} FROM ranked WHERE __take <= {k}"
            )
        digest = hashlib.sha256()
        with open(src, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        version = hashlib.sha256(f"{digest.hexdigest()}/{policy.fingerprint()}".encode()).hexdigest()[:16]
        try:
            con.execute("BEGIN TRANSACTION")
            con.execute(f"CREATE OR REPLACE TABLE {_q(table)} AS {body}")
            con.execute(
                f"CREATE TABLE IF NOT EXISTS {_META} (name VARCHAR PRIMARY KEY, version VARCHAR, "
                "policy_json VARCHAR, source VARCHAR, registered_at TIMESTAMP)"
            )
            con.execute(f"DELETE FROM {_META} WHERE name = ?", [policy.dataset])
            con.execute(
                f"INSERT INTO {_META} VALUES (?, ?, ?, ?, ?)",
                [policy.dataset, version, json.dumps(policy.model_dump(mode="json")), str(src),
                 dt.datetime.now(dt.UTC).replace(tzinfo=None)],
            )
            con.execute("COMMIT")
        except duckdb.Error as exc:
            con.execute("ROLLBACK")
            raise CatalogError(f"registering {policy.dataset!r} failed: {exc}") from None
        self._policies.pop(policy.dataset, None)
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
