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

from gateway.engines import recipe
from gateway.engines.base import ROW_ID, CatalogError, Engine, EngineError, EngineKind, registrable
from gateway.engines.versions import Manifest, Version, VersionStore, fsync_file, now, rows_class
from policies.errors import DatasetNotFound, PublicTableNotFound, VersionNotFound, VersionRetired
from policies.schema import (
    ROW_KEY,
    Policy,
    PublicTable,
    bounded_table,
    parse_policy,
    private_table_name,
    public_table_name,
    row_keys_table,
)

_META = "__bastion_datasets"
_BATCH = 100_000  # rows per batch of converted values streamed through the digest
_VALUES = "__bastion_values"


def _reader(source: Path) -> exp.Expr:
    """The source as a table function tree."""
    suffix = "".join(source.suffixes).lower()
    path = exp.Literal.string(str(source))
    if suffix.endswith(".parquet"):
        return exp.Table(this=exp.Anonymous(this="read_parquet", expressions=[path]))
    if suffix.endswith((".csv", ".csv.gz", ".tsv")):
        # Every field as text, converted by the policy's types: no value can fail the read, and a row's values do
        # not depend on the types DuckDB would infer from the other rows. Nor on the dialect it would infer: the
        # sniffer picks quote, escape, comment and leading rows to skip from the file's contents, so one unit's odd
        # line (an opening quote that never closes) could switch the whole file to no quoting and change every
        # other unit's values. They are fixed (RFC 4180, a tab for .tsv); a file that does not parse so is refused.
        flags = [exp.EQ(this=exp.column(o), expression=exp.true()) for o in ("header", "auto_detect", "all_varchar")]
        dialect = {
            "delim": "\t" if suffix.endswith(".tsv") else ",",
            "quote": '"',
            "escape": '"',
            "comment": "",
        }
        fixed = [exp.EQ(this=exp.column(o), expression=exp.Literal.string(v)) for o, v in dialect.items()]
        fixed.append(exp.EQ(this=exp.column("skip"), expression=exp.Literal.number(0)))
        return exp.Table(this=exp.Anonymous(this="read_csv", expressions=[path, *flags, *fixed]))
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


def _diagnose(con: duckdb.DuckDBPyConnection, policy: Policy, reader: exp.Expr, exc: Exception) -> str:
    """Say which column could not be read or converted, if one fails on its own; else what DuckDB said."""
    for name in recipe.kept_columns(policy):
        for expr, failure in (
            (exp.column(name, quoted=True), f"cannot read column {name!r} of the source"),
            (
                recipe.converted(name, policy.columns[name]),
                f"column {name!r} cannot be converted to {policy.columns[name].type}",
            ),
        ):
            try:
                con.execute(exp.select(exp.Count(this=expr)).from_(reader.copy()).sql(dialect="duckdb")).fetchall()
            except duckdb.Error as col_exc:
                return f"{failure}: {_first_line(col_exc)}"
    return f"cannot build the bounded table: {_first_line(exc)}"


def _check_source(
    con: duckdb.DuckDBPyConnection, reader: exp.Expr, path: Path, declared: list[str], *, what: str = ""
) -> None:
    """Refuse a source that cannot be read or lacks a declared column (`what` prefixes the message)."""
    try:
        described = con.execute(f"DESCRIBE {exp.select(exp.Star()).from_(reader.copy()).sql(dialect='duckdb')}")
        available = {r[0].lower() for r in described.fetchall()}
    except duckdb.Error as exc:
        raise CatalogError(f"{what}cannot read {path.name}: {_first_line(exc)}") from None
    missing = [c for c in declared if c not in available]
    if missing:
        raise CatalogError(f"{what}the source has no column(s) {missing} declared in the policy")


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
        self._local = threading.local()  # each thread's own cursor for statements (a cursor is not thread-safe)
        self._generation = 0  # bumped by close(): threads then open new cursors
        self._policies: dict[str, tuple[Policy, str]] = {}
        # Statements that bound without error on the current schema: binding depends on the statement and the
        # schema only, and the schema changes only by `register` (which clears this) or in a new connection.
        self._bound: set[str] = set()
        # Public tables' rows as read (immutable Arrow tables), by (dataset, table, version): planning a join reads
        # the table's values for its group keys.
        self._public_rows: dict[tuple[str, str, str], pa.Table] = {}
        # Appended versions: their files beside the private database, attached read-only when first read.
        self.versions_store = VersionStore(self.db_path.with_name(f"{self.db_path.name}.versions"))
        self._attached: dict[str, str] = {}  # version file → its catalog name in this connection
        self._registrations: dict[str, Version] = {}

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

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        """The calling thread's cursor for statements: the one a `frame` registers its table on, so the
        statements run in that context see it."""
        local = self._local
        if getattr(local, "key", None) != (os.getpid(), self._generation):
            local.cursor, local.key = self.connect(), (os.getpid(), self._generation)
        cursor: duckdb.DuckDBPyConnection = local.cursor
        return cursor

    def close(self) -> None:
        with self._lock:
            self._generation += 1
            self._bound.clear()
            self._attached.clear()
            self._registrations.clear()
            if self._con is not None:
                self._con.close()
                self._con = None

    # --- registration -------------------------------------------------------------------------------------

    def register(self, policy: Policy, source: str | Path, *, base: Path | None = None) -> str:
        """Load `source` and build the pre-bounded table, and the policy's public tables (their sources relative to
        `base`, by default the source's directory); return the new dataset version."""
        src = registrable(source, read_only=self.read_only)
        con = self.connect()
        with self.versions_store.locked(policy.dataset):
            # The serial goes on from the appended versions of the registration it replaces, which are then dropped.
            published = self.versions_store.load(policy.dataset)
            floor = published.newest.serial if published is not None else 0
            with _without_type_pushdown(con):
                version = self._register(con, policy, src, base if base is not None else src.parent, floor)
        self.versions_store.discard(policy.dataset)
        self._registrations.pop(policy.dataset, None)
        return version

    def _register(self, con: duckdb.DuckDBPyConnection, policy: Policy, src: Path, base: Path, floor: int) -> str:
        reader = _reader(src)
        _check_source(con, reader, src, list(policy.columns))
        table = exp.table_(bounded_table(policy.dataset), quoted=True)
        # One cursor streams the converted values; the writer digests them batch by batch (recipe.with_digests)
        # and builds the table and its metadata row in one transaction.
        privates = self._private_sources(con, policy, base)
        writer = con.cursor()
        try:
            writer.execute("BEGIN TRANSACTION")
            self._bound_table(con, writer, policy, reader, table)
            for private, (sub, sub_reader) in privates.items():
                try:
                    self._bound_table(con, writer, sub, sub_reader, exp.table_(bounded_table(sub.dataset), quoted=True))
                except duckdb.Error as exc:
                    failure = _diagnose(con, sub, sub_reader, exc)
                    raise CatalogError(
                        f"registering {policy.dataset!r} failed: private table {private!r}: {failure}"
                    ) from None
            # Every private source of the dataset: its own, and each private table's.
            private_files = {src.resolve(): "the dataset's own private source"} | {
                recipe.public_source(spec.source, base).resolve(): f"the source of its private table {table!r},"
                for table, spec in policy.private_tables.items()
            }
            for name, public in policy.public_tables.items():
                path = recipe.public_source(public.source, base)
                if path.exists() and path.resolve() in private_files:
                    raise CatalogError(
                        f"public table {name!r}: its source is {private_files[path.resolve()]} {path.name!r}; a "
                        "public table's rows are served to every granted role, so its source must be a public file"
                    )
                self._public(writer, policy.dataset, name, public, path)
            problem = self._row_keys(writer, policy, reader)
            if problem is not None:
                writer.execute("ROLLBACK")
                raise CatalogError(f"registering {policy.dataset!r} failed: {problem}")
            version = self._record(writer, policy, src, floor, self._count(con, reader))
            writer.execute("COMMIT")
        except CatalogError:
            with contextlib.suppress(duckdb.Error):
                writer.execute("ROLLBACK")
            raise
        except duckdb.Error as exc:
            with contextlib.suppress(duckdb.Error):
                writer.execute("ROLLBACK")
            failure = _diagnose(con, policy, reader, exc)
            raise CatalogError(f"registering {policy.dataset!r} failed: {failure}") from None
        finally:
            writer.close()
        self._policies.pop(policy.dataset, None)
        self._bound.clear()
        return version

    def _bound_table(
        self,
        con: duckdb.DuckDBPyConnection,
        writer: duckdb.DuckDBPyConnection,
        policy: Policy,
        reader: exp.Expr,
        table: exp.Table,
    ) -> None:
        """Build one bounded table from a source, inside the writer's transaction: the converted values streamed
        through the keyed digest, at most k rows per unit kept (`recipe.ranked_query`)."""
        source: exp.Expr = exp.Subquery(this=recipe.values_query(policy, reader))
        if policy.unit_column is not None:
            stream = con.sql(recipe.values_query(policy, reader).sql(dialect="duckdb")).to_arrow_reader(_BATCH)
            assert stream is not None, "a SELECT always has a result"
            key = recipe.bounding_key(self.key_path)
            writer.register(_VALUES, recipe.with_digests(key, stream, stream.schema, recipe.kept_columns(policy)))
            source = exp.table_(_VALUES, quoted=True)
        built = recipe.ranked_query(policy, source, exp.Window(this=exp.RowNumber()))
        writer.execute(exp.Create(this=table, kind="TABLE", replace=True, expression=built).sql(dialect="duckdb"))

    def _private_sources(
        self, con: duckdb.DuckDBPyConnection, policy: Policy, base: Path
    ) -> dict[str, tuple[Policy, exp.Expr]]:
        """Each further private table's policy and source reader, checked before anything is written: its source
        exists and has the declared columns, and its engine name is no registered dataset's (nor the reverse)."""
        registered = self._load()
        for name, (other, _) in registered.items():
            if name == policy.dataset:
                continue
            clash = [t for t in policy.private_tables if private_table_name(policy.dataset, t) == name]
            clash += [t for t in other.private_tables if private_table_name(name, t) == policy.dataset]
            if clash:
                raise CatalogError(
                    f"registering {policy.dataset!r} failed: its private table {clash[0]!r} and the dataset "
                    f"{name!r} would have the same bounded table; rename one"
                )
        out: dict[str, tuple[Policy, exp.Expr]] = {}
        for name in policy.private_tables:
            sub = policy.private_policy(name)
            path = recipe.public_source(policy.private_tables[name].source, base)
            if not path.exists():
                raise CatalogError(f"private table {name!r}: source file not found: {path}")
            reader = _reader(path)
            _check_source(con, reader, path, list(sub.columns), what=f"private table {name!r}: ")
            out[name] = (sub, reader)
        return out

    @staticmethod
    def _public(con: duckdb.DuckDBPyConnection, dataset: str, name: str, table: PublicTable, path: Path) -> None:
        """Build a public table `public_<dataset>__<name>` from its source, its values converted as a dataset's,
        and check its declared unique key and multiplicities (refused with the column and the count otherwise)."""
        what = f"public table {name!r}"
        if not path.exists():
            raise CatalogError(f"{what}: source file not found: {path}")
        reader = _reader(path)
        _check_source(con, reader, path, list(table.columns), what=f"{what}: ")
        target = exp.table_(public_table_name(dataset, name), quoted=True)
        try:
            con.execute(
                exp.Create(this=target, kind="TABLE", replace=True, expression=recipe.public_values(table, reader)).sql(
                    dialect="duckdb"
                )
            )
        except duckdb.Error as exc:
            failure = _first_line(exc)
            raise CatalogError(f"{what}: cannot convert {path.name} to the declared types: {failure}") from None
        declared = {**({table.unique_key: 1} if table.unique_key else {}), **table.max_multiplicity}
        for column, bound in declared.items():
            row = con.execute(recipe.multiplicity_query(target, column).sql(dialect="duckdb")).fetchone()
            most = int(row[0]) if row and row[0] is not None else 0
            if most > bound:
                declared_as = "its unique_key" if column == table.unique_key else f"max_multiplicity {bound}"
                raise CatalogError(
                    f"{what}: column {column!r} is declared {declared_as}, but a value of it has {most} rows"
                )

    @staticmethod
    def _row_keys(con: duckdb.DuckDBPyConnection, policy: Policy, reader: exp.Expr) -> str | None:
        """Store every source row's key (if the policy names a `row_key`) and say why they are no row identity if
        they are not (some missing or repeated); None if they are, or there is no row key."""
        table = exp.table_(row_keys_table(policy.dataset), quoted=True)
        if policy.row_key is None:
            con.execute(exp.Drop(tables=[table], kind="TABLE", exists=True).sql(dialect="duckdb"))
            return None
        keys = recipe.row_keys_query(policy, reader.copy())
        con.execute(exp.Create(this=table, kind="TABLE", replace=True, expression=keys).sql(dialect="duckdb"))
        return _row_key_problem(con, policy, table)

    @staticmethod
    def _count(con: duckdb.DuckDBPyConnection, reader: exp.Expr) -> int:
        """The number of rows of a source (for its version's row-count class)."""
        ((count,),) = con.execute(
            exp.select(exp.Count(this=exp.Star())).from_(reader.copy()).sql(dialect="duckdb")
        ).fetchall()
        return int(count)

    @staticmethod
    def _record(con: duckdb.DuckDBPyConnection, policy: Policy, src: Path, floor: int, rows: int) -> str:
        """Write the dataset's metadata row and return its new version: the registration's serial number (after
        `floor`, the last serial of the versions it replaces) and a random suffix (so a version never repeats, also
        in a rebuilt database), never anything derived from data. `rows` is the source's row count."""
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {_META} (name VARCHAR PRIMARY KEY, version VARCHAR, "
            "policy_json VARCHAR, source VARCHAR, registered_at TIMESTAMP, serial BIGINT)"
        )
        con.execute(f"ALTER TABLE {_META} ADD COLUMN IF NOT EXISTS serial BIGINT")  # databases from before serials
        con.execute(f"ALTER TABLE {_META} ADD COLUMN IF NOT EXISTS source_rows BIGINT")  # ... and before appends
        row = con.execute(f"SELECT COALESCE(max(serial), 0) FROM {_META} WHERE name = ?", [policy.dataset]).fetchone()
        serial = max(int(row[0] if row else 0), floor) + 1
        version = f"{serial}-{secrets.token_hex(4)}"
        con.execute(f"DELETE FROM {_META} WHERE name = ?", [policy.dataset])
        con.execute(
            f"INSERT INTO {_META} (name, version, policy_json, source, registered_at, serial, source_rows) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                policy.dataset,
                version,
                json.dumps(policy.model_dump(mode="json")),
                str(src),
                dt.datetime.now(dt.UTC).replace(tzinfo=None),
                serial,
                rows,
            ],
        )
        return version

    # --- versions -----------------------------------------------------------------------------------------

    def append(self, dataset: str, source: str | Path) -> tuple[Version, bool]:
        """Add a batch (Parquet or CSV, the policy's columns) as a new version, while readers go on reading; return
        it, and False if this very file was appended already (its version is returned, nothing is added). The
        private database is only read: the version is a file of its own, visible once the manifest lists it."""
        src = registrable(source, read_only=False)
        policy, _ = self.policy(dataset)
        batch = recipe.file_digest(recipe.bounding_key(self.key_path), src)
        store = self.versions_store
        with store.locked(dataset) as folder:
            manifest = self.manifest(dataset)
            done = next((v for v in manifest.versions if v.batch == batch), None)
            if done is not None:
                return done, False
            store.sweep(dataset, manifest)  # what an append that crashed left
            serial = manifest.newest.serial + 1
            name = f"{serial}-{secrets.token_hex(4)}"
            partial = folder / f"{serial}.partial.duckdb"
            count = self._build(policy, src, manifest.newest, partial)
            os.chmod(partial, 0o600)  # private rows, as the private database
            fsync_file(partial)
            os.replace(partial, folder / f"{name}.duckdb")
            fsync_file(folder)
            version = Version(name, serial, now(), rows_class(count), file=f"{name}.duckdb", batch=batch)
            store.publish(dataset, manifest.with_version(version))
        return version, True

    def _build(self, policy: Policy, src: Path, previous: Version, target: Path) -> int:
        """Write `target`: the bounded table (and row keys) of `previous` with the batch's kept rows added; return
        the batch's row count."""
        con = self.connect()
        reader = _reader(src)
        _check_source(con, reader, src, list(policy.columns))
        kept = self._table(policy.dataset, previous, bounded_table(policy.dataset))
        catalog = f"__append_{policy.dataset}"
        con.execute(
            exp.Attach(
                this=exp.alias_(exp.Literal.string(str(target)), catalog),
                expressions=[exp.AttachOption(this=exp.var("READ_ONLY"), expression=exp.false())],
            ).sql(dialect="duckdb")
        )
        writer, streaming = con.cursor(), con.cursor()
        try:
            with _without_type_pushdown(con):
                count = self._count(con, reader)
                source: exp.Expr = exp.Subquery(this=recipe.values_query(policy, reader))
                if policy.unit_column is not None:
                    query = recipe.values_query(policy, reader).sql(dialect="duckdb")
                    stream = streaming.sql(query).to_arrow_reader(_BATCH)
                    assert stream is not None, "a SELECT always has a result"
                    key = recipe.bounding_key(self.key_path)
                    digested = recipe.with_digests(key, stream, stream.schema, recipe.kept_columns(policy))
                    writer.register(_VALUES, digested)
                    source = exp.table_(_VALUES, quoted=True)
                last = exp.select(
                    exp.Coalesce(this=exp.Max(this=exp.column(ROW_ID)), expressions=[exp.Literal.number(0)])
                )
                ((offset,),) = writer.execute(last.from_(kept.copy()).sql(dialect="duckdb")).fetchall()
                # The batch's kept rows are numbered after the rows kept before, so every ROW_ID stays unique.
                row_id = exp.Add(this=exp.Window(this=exp.RowNumber()), expression=exp.Literal.number(int(offset)))
                added = recipe.ranked_query(policy, source, row_id, kept=kept.copy())
                union = exp.union(exp.select(exp.Star()).from_(kept.copy()), added, distinct=False)
                table = exp.table_(bounded_table(policy.dataset), db="main", catalog=catalog, quoted=True)
                writer.execute(exp.Create(this=table, kind="TABLE", expression=union).sql(dialect="duckdb"))
                if policy.row_key is not None:
                    problem = self._appended_keys(writer, policy, previous, reader, catalog)
                    if problem is not None:
                        raise CatalogError(f"appending to {policy.dataset!r} failed: {problem}")
        except duckdb.Error as exc:
            failure = _diagnose(con, policy, reader, exc)
            raise CatalogError(f"appending to {policy.dataset!r} failed: {failure}") from None
        finally:
            writer.close()
            streaming.close()
            con.execute(exp.Detach(this=exp.to_identifier(catalog, quoted=True)).sql(dialect="duckdb"))
        return count

    def profile(self, dataset: str, source: str | Path, version: str, bins: int) -> list[int]:
        """The exact monitoring counts of `version`'s batch (gateway.engines.monitor): the rows of `source` that
        `version` kept (ranked as its append ranked them, after the version before it), each in one cell per
        monitored column. Private: only a DP release of these may leave (gateway.monitoring)."""
        from gateway.engines import monitor

        src = registrable(source, read_only=False)
        policy, _ = self.policy(dataset)
        versions = self.manifest(dataset).versions
        index = next((i for i, v in enumerate(versions) if v.version == version), None)
        if index is None:
            raise VersionNotFound(f"dataset {dataset!r} has no version {version!r}", dataset=dataset)
        previous = versions[index - 1] if index > 0 else None
        columns = monitor.monitored(policy, bins)
        names = [monitor.cell_column(m.name) for m in columns]
        con = self.connect()
        reader = _reader(src)
        _check_source(con, reader, src, list(policy.columns))
        values = recipe.values_query(policy, reader).select(*monitor.cells_select(columns, bins))
        streaming, writer = con.cursor(), con.cursor()
        try:
            with _without_type_pushdown(con):
                rows: exp.Expr = exp.Subquery(this=values)
                if policy.unit_column is not None:
                    stream = streaming.sql(values.sql(dialect="duckdb")).to_arrow_reader(_BATCH)
                    assert stream is not None, "a SELECT always has a result"
                    key = recipe.bounding_key(self.key_path)
                    writer.register(
                        _VALUES, recipe.with_digests(key, stream, stream.schema, recipe.kept_columns(policy))
                    )
                    rows = exp.table_(_VALUES, quoted=True)
                kept = None if previous is None else self._table(dataset, previous, bounded_table(dataset))
                ranked = recipe.ranked_query(policy, rows, exp.Null(), kept=kept, columns=names)
                query = monitor.counts_query(columns, exp.alias_(exp.Subquery(this=ranked), "kept"))
                (found,) = writer.execute(query.sql(dialect="duckdb")).fetchall()
        except duckdb.Error as exc:
            raise EngineError(type(exc).__name__) from None
        finally:
            writer.close()
            streaming.close()
        return [int(v or 0) for v in found]

    def _appended_keys(
        self, con: duckdb.DuckDBPyConnection, policy: Policy, previous: Version, reader: exp.Expr, catalog: str
    ) -> str | None:
        """Write the row keys of `previous` and the batch into `catalog`; why they are no row identity, if not."""
        earlier = self._table(policy.dataset, previous, row_keys_table(policy.dataset))
        keys = exp.union(
            exp.select(exp.Star()).from_(earlier), recipe.row_keys_query(policy, reader.copy()), distinct=False
        )
        table = exp.table_(row_keys_table(policy.dataset), db="main", catalog=catalog, quoted=True)
        con.execute(exp.Create(this=table, kind="TABLE", expression=keys).sql(dialect="duckdb"))
        return _row_key_problem(con, policy, table)

    def retire(self, dataset: str, version: str) -> Version:
        """Retire a version: pinning it is refused from now on. The last version that is not retired cannot be."""
        self.policy(dataset)
        with self.versions_store.locked(dataset):
            manifest = self.manifest(dataset)
            found = manifest.find(version)
            if found is None:
                raise VersionNotFound(f"dataset {dataset!r} has no version {version!r}", dataset=dataset)
            if not found.retired:
                if manifest.latest.version == version and sum(not v.retired for v in manifest.versions) == 1:
                    raise CatalogError(f"version {version!r} is the only version of {dataset!r} not retired")
                manifest = manifest.retiring(version)
                self.versions_store.publish(dataset, manifest)
        out = manifest.find(version)
        assert out is not None
        return out

    def manifest(self, dataset: str) -> Manifest:
        """The dataset's versions: its registration and the appends published since (DatasetNotFound if none)."""
        base = self._registration(dataset)
        published = self.versions_store.load(dataset)
        if published is None or published.base != base.version:
            return Manifest(base=base.version, versions=(base,))  # none yet, or those of a replaced registration
        return published

    def versions(self, dataset: str) -> list[Version]:
        return list(self.manifest(dataset).versions)

    def version(self, dataset: str, version: str | None) -> Version:
        """The version a request reads: `version` if the dataset has it and it is not retired, else the latest."""
        manifest = self.manifest(dataset)
        if version is None:
            return manifest.latest
        found = manifest.find(version)
        if found is None:
            raise VersionNotFound(
                f"dataset {dataset!r} has no version {version!r}",
                dataset=dataset,
                hint=f"GET /v1/datasets/{dataset}/versions lists its versions",
            )
        if found.retired:
            raise VersionRetired(
                f"version {version!r} of dataset {dataset!r} is retired; the latest is {manifest.latest.version!r}",
                dataset=dataset,
                hint="pin a later version, or none to read the latest",
            )
        return found

    def _registration(self, dataset: str) -> Version:
        found = self._registrations.get(dataset)
        if found is not None:
            return found
        self._registered(dataset)  # DatasetNotFound if there is none
        con = self.connect()
        # Every column by name: databases from before serials or appends lack some.
        cursor = con.execute(f"SELECT * FROM {_META} WHERE name = ?", [dataset])
        names = [d[0] for d in cursor.description or []]
        found_row = cursor.fetchall()
        assert found_row, "a registered dataset has its row"
        meta = dict(zip(names, found_row[0], strict=True))
        version, serial, at, rows = (meta.get(c) for c in ("version", "serial", "registered_at", "source_rows"))
        when = at.replace(tzinfo=dt.UTC, microsecond=0).isoformat() if at is not None else ""
        found = Version(
            version=str(version),
            serial=int(serial) if serial is not None else 1,
            time=when,
            rows=rows_class(int(rows)) if rows is not None else "unknown",
        )
        self._registrations[dataset] = found
        return found

    def _table(self, dataset: str, version: Version, name: str) -> exp.Table:
        """The table `name` of a dataset as of `version` (its version file attached read-only when first read)."""
        if version.file is None:
            return exp.table_(name, quoted=True)
        path = str(self.versions_store.folder(dataset) / version.file)
        with self._lock:
            catalog = self._attached.get(path)
        if catalog is None:
            catalog = self._attach(path)
        return exp.table_(name, db="main", catalog=catalog, quoted=True)

    def _attach(self, path: str) -> str:
        con = self.connect()
        with self._lock:
            catalog = self._attached.get(path)
            if catalog is not None:
                return catalog
            catalog = f"__version_{len(self._attached)}"
            attach = exp.Attach(
                this=exp.alias_(exp.Literal.string(path), catalog),
                expressions=[exp.AttachOption(this=exp.var("READ_ONLY"))],
            )
            con.execute(attach.sql(dialect="duckdb"))
            self._attached[path] = catalog
            return catalog

    def at(self, pins: dict[str, str], *, retired: bool = False) -> Engine:
        """This engine reading the pinned version of each dataset in `pins` (the latest of any other); `retired`:
        a retired version too (its file is kept), for work admitted and charged before it was retired."""
        return _Pinned(self, {d: self._pinned(d, v, retired=retired) for d, v in pins.items()})

    def _pinned(self, dataset: str, version: str, *, retired: bool) -> Version:
        if retired:
            found = self.manifest(dataset).find(version)
            if found is not None:
                return found
        return self.version(dataset, version)

    def _versioned(self, query: exp.Query, pins: dict[str, Version]) -> exp.Query:
        """`query` with each bounded (and row-key) table read at its pinned version, else its latest (the query
        itself when every such table is read at a registration, which the private database holds)."""
        located: dict[str, exp.Table] = {}
        for table in query.find_all(exp.Table):
            dataset = _versioned_dataset(table)
            if dataset is None or table.name in located or self._private_table(dataset):
                continue
            try:
                version = pins.get(dataset) or self.manifest(dataset).latest
            except DatasetNotFound:
                continue  # not a dataset's table: left for the binder to refuse
            if version.file is not None:
                located[table.name] = self._table(dataset, version, table.name)
        if not located:
            return query
        out = query.copy()
        for table in list(out.find_all(exp.Table)):
            found = located.get(table.name) if _versioned_dataset(table) is not None else None
            if found is not None:
                for part in ("db", "catalog"):
                    table.set(part, found.args[part].copy())
        return out

    def _private_table(self, name: str) -> bool:
        """Whether `name` is `<dataset>__<table>` of a registered dataset's private table: read as registered (appends
        add to the dataset's own table only), without looking up a dataset of that name."""
        dataset, sep, table = name.rpartition("__")
        found = self._policies.get(dataset) if sep else None
        return found is not None and table in found[0].private_tables

    # --- lookups ------------------------------------------------------------------------------------------

    def datasets(self) -> dict[str, tuple[Policy, str]]:
        """All registered datasets: name → (policy, latest version)."""
        registered = self._load()
        return {name: (policy, self.manifest(name).latest.version) for name, (policy, _) in registered.items()}

    def _load(self) -> dict[str, tuple[Policy, str]]:
        """The registrations: name → (policy, the registration's version), read anew."""
        con = self.connect()
        try:
            rows = con.execute(f"SELECT name, version, policy_json FROM {_META} ORDER BY name").fetchall()
        except duckdb.CatalogException:
            return {}
        out = {}
        for name, version, policy_json in rows:
            out[name] = (parse_policy(json.loads(policy_json), origin=name), version)
        self._policies = out
        self._registrations.clear()
        return out

    def _registered(self, dataset: str) -> Policy:
        if dataset not in self._policies:
            self._load()
        try:
            return self._policies[dataset][0]
        except KeyError:
            raise DatasetNotFound(f"no dataset named {dataset!r}", dataset=dataset) from None

    def public_table(self, dataset: str, table: str) -> pa.Table:
        """A public table's rows (its declared columns, in a fixed order). Public data: no charge, no noise."""
        policy, version = self.policy(dataset)
        public = policy.public_tables.get(table)
        if public is None:
            raise PublicTableNotFound(f"dataset {dataset!r} has no public table {table!r}", dataset=dataset)
        key = (dataset, table, version)  # a table changes only with a new registration, which is a new version
        found = self._public_rows.get(key)
        if found is not None:
            return found
        query = recipe.public_rows_query(exp.table_(public_table_name(dataset, table), quoted=True), public)
        try:
            found = self._cursor().sql(query.sql(dialect=self.dialect)).to_arrow_table()
        except duckdb.Error as exc:
            raise EngineError(type(exc).__name__) from None
        if len(self._public_rows) >= 64:
            self._public_rows.clear()
        self._public_rows[key] = found
        return found

    def policy(self, dataset: str) -> tuple[Policy, str]:
        """The dataset's policy and its latest version."""
        policy = self._registered(dataset)
        return policy, self.manifest(dataset).latest.version

    # --- statements ---------------------------------------------------------------------------------------

    def _sql(self, query: exp.Query, pins: dict[str, Version] | None = None) -> str:
        return _native_sums(self._versioned(query, pins or {})).sql(dialect=self.dialect)

    def check(self, query: exp.Query, pins: dict[str, Version] | None = None) -> None:
        sql = self._sql(query, pins)
        if sql in self._bound:
            return
        try:
            self._cursor().execute(f"DESCRIBE {sql}").fetchall()
        except duckdb.Error as exc:
            raise EngineError(_first_line(exc)) from None
        if len(self._bound) >= 4096:
            self._bound.clear()
        self._bound.add(sql)

    def rows(self, query: exp.Query, pins: dict[str, Version] | None = None) -> list[tuple[Any, ...]]:
        try:
            return [tuple(_python(v) for v in r) for r in self._cursor().execute(self._sql(query, pins)).fetchall()]
        except duckdb.Error as exc:
            raise EngineError(type(exc).__name__) from None

    def arrow(self, query: exp.Query, pins: dict[str, Version] | None = None) -> pa.Table:
        try:
            return self._cursor().sql(self._sql(query, pins)).to_arrow_table()
        except duckdb.Error as exc:
            raise EngineError(type(exc).__name__) from None

    @contextlib.contextmanager
    def frame(self, name: str, table: pa.Table) -> Iterator[exp.Table]:
        cur = self._cursor()
        cur.register(name, table)
        try:
            yield exp.table_(name, quoted=True)
        finally:
            cur.unregister(name)


def _versioned_dataset(table: exp.Table) -> str | None:
    """The dataset whose bounded or row-key table `table` names (unqualified), or None."""
    if table.args.get("db") or table.args.get("catalog"):
        return None
    for prefix in (bounded_table(""), row_keys_table("")):
        if table.name.startswith(prefix) and len(table.name) > len(prefix):
            return table.name[len(prefix) :]
    return None


class _Pinned:
    """A DuckDB engine reading pinned versions: every statement of one request reads the same version."""

    def __init__(self, engine: DuckDBEngine, pins: dict[str, Version]) -> None:
        self.engine = engine
        self.pins = pins
        self.kind = engine.kind
        self.dialect = engine.dialect
        self.regex = engine.regex

    def rows(self, query: exp.Query) -> list[tuple[Any, ...]]:
        return self.engine.rows(query, self.pins)

    def arrow(self, query: exp.Query) -> pa.Table:
        return self.engine.arrow(query, self.pins)

    def check(self, query: exp.Query) -> None:
        self.engine.check(query, self.pins)

    def frame(self, name: str, table: pa.Table) -> contextlib.AbstractContextManager[exp.Table]:
        return self.engine.frame(name, table)

    def register(self, policy: Policy, source: Path, *, base: Path | None = None) -> str:
        raise CatalogError("a pinned reader registers nothing")

    def append(self, dataset: str, source: str | Path) -> tuple[Version, bool]:
        raise CatalogError("a pinned reader appends nothing")

    def retire(self, dataset: str, version: str) -> Version:
        raise CatalogError("a pinned reader retires nothing")

    def public_table(self, dataset: str, table: str) -> pa.Table:
        return self.engine.public_table(dataset, table)

    def datasets(self) -> dict[str, tuple[Policy, str]]:
        return self.engine.datasets()

    def policy(self, dataset: str) -> tuple[Policy, str]:
        policy, latest = self.engine.policy(dataset)
        pinned = self.pins.get(dataset)
        return policy, pinned.version if pinned is not None else latest

    def versions(self, dataset: str) -> list[Version]:
        return self.engine.versions(dataset)

    def version(self, dataset: str, version: str | None) -> Version:
        pinned = self.pins.get(dataset)
        return self.engine.version(dataset, version or (pinned.version if pinned is not None else None))

    def at(self, pins: dict[str, str], *, retired: bool = False) -> Engine:
        return self.engine.at({**{d: v.version for d, v in self.pins.items()}, **pins}, retired=retired)

    def close(self) -> None:
        return None


def _is_exact_cast(node: exp.Expr) -> bool:
    """`CAST(__fx… AS DECIMAL(38, 0))`: a fixed-point integer copy (BIGINT by construction) cast for an exact sum."""
    if not isinstance(node, exp.Cast) or not isinstance(node.this, exp.Column) or not node.this.name.startswith("__fx"):
        return False
    return node.to.sql(dialect="duckdb") == "DECIMAL(38, 0)"


def _native_sums(query: exp.Query) -> exp.Query:
    """The statement with `SUM(CAST(__fx… AS DECIMAL(38, 0)))` as `SUM(CAST(__fx… AS HUGEINT))`: the same exact
    128-bit sum, in DuckDB's native integer type, which takes two thirds of the DECIMAL sum's time on a grouped SUM.
    (Not `SUM(__fx…)`: for that DuckDB chooses a 64-bit sum when the table's statistics prove it cannot overflow, a
    choice made from the data.) The compiled tree is left as it is."""
    if not any(isinstance(n.parent, exp.Sum) and _is_exact_cast(n) for n in query.find_all(exp.Cast)):
        return query
    out = query.copy()
    for node in [n for n in out.find_all(exp.Cast) if isinstance(n.parent, exp.Sum) and _is_exact_cast(n)]:
        node.set("to", exp.DataType.build("HUGEINT"))
    return out


def _python(value: Any) -> Any:
    """DuckDB's HUGEINT and DECIMAL sums as exact Python ints; other values as DuckDB returns them."""
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _row_key_problem(con: duckdb.DuckDBPyConnection, policy: Policy, table: exp.Table) -> str | None:
    """Why the keys stored in `table` are no row identity of the dataset (some missing or repeated), or None."""
    key = exp.column(ROW_KEY, quoted=True)
    counts = exp.select(
        exp.Count(this=exp.Star()),
        exp.Count(this=exp.Distinct(expressions=[key.copy()])),
        exp.Count(this=key.copy()),
    ).from_(table)
    row = con.execute(counts.sql(dialect="duckdb")).fetchone()
    assert row is not None
    problem = recipe.row_key_problem(int(row[0]), int(row[1]), int(row[2]))
    return None if problem is None else f"row_key {policy.row_key!r} is not a row identity: {problem}"
