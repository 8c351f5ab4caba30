"""The Apache Spark engine: the same plans, bounds and guarantees as DuckDB, on tables that outgrow one machine.

One Spark context per process (`settings.spark_master`: `local[N]` on one machine, a cluster's master URL
otherwise; `settings.spark_conf` adds settings), and a session of its own per engine on it (its views are its
own). Registration reads the source with Spark (Parquet; CSV with every
field as text), converts and bounds it with the shared recipe (`gateway.engines.recipe`, generated in Spark's
dialect) and the shared keyed digest, computed in Python workers over Arrow batches (`mapInArrow`), so the secret
key appears in no SQL text, plan, log line or UI, and both engines keep exactly the same rows. The bounded table is
written as Parquet to `<warehouse>/<dataset>/<version>/` (into a temporary directory first, renamed when complete,
so a crash leaves the previous version in place), and the catalog of datasets is a JSON file in the warehouse,
replaced atomically. Every statement reads temporary views named like DuckDB's bounded tables, so the compiled
trees are the same for both engines.

ANSI mode is off (`spark.sql.ansi.enabled=false`): a failed CAST, a division by zero or an array index out of range
is NULL, as in DuckDB, instead of an error. The compiler's total expressions rely on that (sqlglot writes DuckDB's
TRY_CAST as Spark's CAST for this reason); integer overflow cannot happen, as the type checker keeps integer
arithmetic within public ranges and sums are DECIMAL(38, 0).

Spark's regular expressions are java.util.regex, which backtracks: `regex = False`, so the planner refuses regex
functions and LIKE patterns Spark would not rewrite to a linear-time test (see gateway.sql.compile).

The warehouse must be a directory every Spark worker reads at the same path (local disk for `local[N]`, a shared
file system for a cluster).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import decimal
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from sqlglot import exp

from gateway.engines import recipe
from gateway.engines.base import CatalogError, Engine, EngineError, EngineKind, registrable
from gateway.engines.versions import Version
from policies.errors import DatasetNotFound, PublicTableNotFound, VersionNotFound
from policies.schema import Policy, bounded_table, parse_policy

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from gateway.settings import Settings

CATALOG = "catalog.json"
_ANALYSED = 256  # analysed statements kept per engine

_session_lock = threading.Lock()
_sessions: dict[tuple[str, str], SparkSession] = {}


def spark_session(master: str, conf: dict[str, str] | None = None) -> SparkSession:
    """The process's SparkSession for `master` (created on first use, quiet, UI off unless configured)."""
    from pyspark.sql import SparkSession

    settings = {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.ansi.enabled": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": "8",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        **(conf or {}),
    }
    # Python workers run this interpreter (the one with Bastion's packages) unless the environment names another.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    key = (master, json.dumps(settings, sort_keys=True))
    with _session_lock:
        session = _sessions.get(key)
        if session is None:
            builder = SparkSession.builder.master(master).appName("bastion")
            for name, value in settings.items():
                builder = builder.config(name, value)
            session = builder.getOrCreate()
            session.sparkContext.setLogLevel("OFF")  # errors reach the caller as EngineError classes only
            logging.getLogger("SQLQueryContextLogger").setLevel(logging.CRITICAL + 1)
            _sessions[key] = session
        return session


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "getMessage", lambda: str(exc))() if hasattr(exc, "getMessage") else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _python(value: Any) -> Any:
    """Spark's DECIMAL sums as exact Python ints; datetimes as dates only where Spark widened a date."""
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


class SparkEngine:
    kind = EngineKind.SPARK
    dialect = "spark"
    regex = False  # java.util.regex backtracks: see the module docstring

    def __init__(self, settings: Settings, *, read_only: bool = True) -> None:
        self.settings = settings
        self.warehouse = settings.warehouse
        self.key_path = settings.bounding_key
        self.read_only = read_only
        self._lock = threading.Lock()
        self._session_lock = threading.Lock()
        self._session: SparkSession | None = None
        self._catalog_stamp: tuple[float, int] | None = None
        self._datasets: dict[str, dict[str, Any]] = {}
        self._policies: dict[str, tuple[Policy, str]] = {}
        self._views: dict[str, str] = {}  # dataset → version its view reads
        # Statements analysed by a bind check, by SQL text, until the run that follows takes them (the check before
        # the charge analyses the statement the release then runs, so the run does not analyse it again). Cleared
        # whenever a view moves to another version, so a statement never reads a version it was not analysed against.
        self._analysed: collections.OrderedDict[str, DataFrame] = collections.OrderedDict()

    # --- session and catalog ------------------------------------------------------------------------------

    def session(self) -> SparkSession:
        """This engine's own session on the process's Spark context: its temporary views (the bounded tables) are
        its own, so two engines in one process (two workspaces, say) never read each other's tables."""
        with self._session_lock:
            if self._session is None:
                self._session = spark_session(self.settings.spark_master, self.settings.spark_conf).newSession()
            return self._session

    @property
    def _catalog_file(self) -> Path:
        return self.warehouse / CATALOG

    def _load(self) -> dict[str, dict[str, Any]]:
        """The catalog file's entries, re-read when the file changed (another process registered a dataset)."""
        try:
            st = self._catalog_file.stat()
        except FileNotFoundError:
            if self.read_only and not self.warehouse.exists():
                raise CatalogError("no Spark warehouse yet: register a dataset first (bastion register)") from None
            return {}
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._catalog_stamp:
            self._datasets = json.loads(self._catalog_file.read_text())
            self._policies = {
                name: (parse_policy(entry["policy"], origin=name), entry["version"])
                for name, entry in self._datasets.items()
            }
            self._catalog_stamp = stamp
        return self._datasets

    def _save(self, entries: dict[str, dict[str, Any]]) -> None:
        self.warehouse.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.warehouse, prefix=".catalog-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._catalog_file)

    def _ensure_views(self) -> None:
        """Point each dataset's bounded-table view at its current version."""
        with self._lock:
            entries = self._load()
            spark = None
            for name, entry in entries.items():
                if self._views.get(name) != entry["version"]:
                    spark = spark or self.session()
                    spark.read.parquet(entry["path"]).createOrReplaceTempView(bounded_table(name))
                    self._views[name] = entry["version"]
                    self._analysed.clear()

    def datasets(self) -> dict[str, tuple[Policy, str]]:
        with self._lock:
            self._load()
            return dict(self._policies)

    def public_table(self, dataset: str, table: str) -> pa.Table:
        """No dataset registered on Spark has public tables (registration refuses them)."""
        self.policy(dataset)
        raise PublicTableNotFound(
            f"dataset {dataset!r} has no public table {table!r} (public tables run on DuckDB only for now)",
            dataset=dataset,
        )

    def policy(self, dataset: str) -> tuple[Policy, str]:
        found = self.datasets().get(dataset)
        if found is None:
            raise DatasetNotFound(f"no dataset named {dataset!r}", dataset=dataset)
        return found

    # --- versions (one per registration: appends run on DuckDB only) ---------------------------------------

    def append(self, dataset: str, source: Path) -> tuple[Version, bool]:
        raise CatalogError(
            "appends run on the DuckDB engine only: this workspace keeps its rows on Spark, where a dataset has one "
            "version per registration (register it again, with the gateways stopped, to replace its rows)"
        )

    def retire(self, dataset: str, version: str) -> Version:
        self.version(dataset, version)
        raise CatalogError("on the Spark engine a dataset has one version, which cannot be retired")

    def versions(self, dataset: str) -> list[Version]:
        _, version = self.policy(dataset)
        entry = self._load().get(dataset, {})
        serial = int(entry.get("serial", 0)) or 1
        return [Version(version=version, serial=serial, time=str(entry.get("registered_at", "")), rows="unknown")]

    def version(self, dataset: str, version: str | None) -> Version:
        (only,) = self.versions(dataset)
        if version is not None and version != only.version:
            raise VersionNotFound(
                f"dataset {dataset!r} has no version {version!r}",
                dataset=dataset,
                hint=f"GET /v1/datasets/{dataset}/versions lists its versions",
            )
        return only

    def at(self, pins: dict[str, str], *, retired: bool = False) -> Engine:
        for dataset, version in pins.items():  # its one version is never retired
            self.version(dataset, version)
        return self

    # --- registration -------------------------------------------------------------------------------------

    def _read(self, source: Path) -> DataFrame:
        spark = self.session()
        suffix = "".join(source.suffixes).lower()
        if suffix.endswith(".parquet"):
            return spark.read.parquet(str(source))
        if suffix.endswith((".csv", ".csv.gz", ".tsv")):
            # Every field as text, converted by the policy's types (as on DuckDB).
            sep = "\t" if suffix.endswith(".tsv") else ","
            return spark.read.option("header", "true").option("sep", sep).csv(str(source))
        raise CatalogError(f"unsupported source format {source.name!r}: use Parquet or CSV")

    def register(self, policy: Policy, source: str | Path, *, base: Path | None = None) -> str:
        src = registrable(source, read_only=self.read_only)
        if policy.private_tables:
            raise CatalogError(
                f"{policy.dataset!r} declares private tables ({', '.join(sorted(policy.private_tables))}): datasets of "
                "several private tables and their joins run on DuckDB only for now; register it on the DuckDB engine"
            )
        if policy.period is not None:
            raise CatalogError(
                f"{policy.dataset!r} declares a period (a time-partitioned privacy unit): periods run on DuckDB only; "
                "register it on the DuckDB engine, or remove `period` from its policy"
            )
        if policy.public_tables:
            raise CatalogError(
                f"{policy.dataset!r} declares public tables: public tables and joins with them run on DuckDB only "
                "for now; register it on the DuckDB engine"
            )
        try:
            return self._register(policy, src)
        except CatalogError:
            raise
        except Exception as exc:  # noqa: BLE001 - Spark's errors (AnalysisException, Py4JJavaError) are admin-facing
            raise CatalogError(f"registering {policy.dataset!r} failed: {_first_line(exc)}") from None

    def _register(self, policy: Policy, src: Path) -> str:
        from pyspark.sql.types import StringType, StructField, StructType

        spark = self.session()
        frame = self._read(src)
        available = {c.lower() for c in frame.columns}
        missing = [c for c in policy.columns if c not in available]
        if missing:
            raise CatalogError(f"the source has no column(s) {missing} declared in the policy")
        token = secrets.token_hex(4)
        source_view, values_view = f"__bastion_source_{token}", f"__bastion_values_{token}"
        frame.createOrReplaceTempView(source_view)
        values = spark.sql(recipe.values_query(policy, exp.table_(source_view, quoted=True)).sql(dialect="spark"))
        if policy.unit_column is not None:
            key = recipe.bounding_key(self.key_path)
            columns = recipe.kept_columns(policy)

            def digest(batches: Iterable[pa.RecordBatch]) -> Iterable[pa.RecordBatch]:
                for b in batches:
                    names = [*b.schema.names, recipe.DIGEST]
                    yield pa.RecordBatch.from_arrays([*b.columns, recipe.digests(key, b, columns)], names=names)

            schema = StructType([*values.schema.fields, StructField(recipe.DIGEST, StringType(), False)])
            values = values.mapInArrow(digest, schema)
        values.createOrReplaceTempView(values_view)
        # Unique per row of the written table (partition number and position within it); never released.
        row_id = exp.Anonymous(this="monotonically_increasing_id", expressions=[])
        bounded = spark.sql(
            recipe.ranked_query(policy, exp.table_(values_view, quoted=True), row_id).sql(dialect="spark")
        )
        entries = dict(self._load())
        serial = int(entries.get(policy.dataset, {}).get("serial", 0)) + 1
        version = f"{serial}-{secrets.token_hex(4)}"
        home = self.warehouse / policy.dataset
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = home / f".partial-{version}"
        final = home / version
        try:
            bounded.write.mode("error").parquet(str(partial))
            os.replace(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
            spark.catalog.dropTempView(source_view)
            spark.catalog.dropTempView(values_view)
        previous = entries.get(policy.dataset, {}).get("path")
        entries[policy.dataset] = {
            "version": version,
            "serial": serial,
            "path": str(final),
            "policy": policy.model_dump(mode="json"),
            "source": str(src),
            "registered_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        self._save(entries)
        # The version before this one stays (a reader may still scan it); older ones go.
        keep = {final.name, Path(previous).name if previous else ""}
        for old in home.iterdir():
            if old.is_dir() and old.name not in keep and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
        self._policies.pop(policy.dataset, None)
        return version

    # --- statements ---------------------------------------------------------------------------------------

    def _frame(self, query: exp.Query, *, run: bool) -> DataFrame:
        """The statement as a DataFrame. A bind check keeps what it analysed for the run that follows; a run takes
        it (each analysis serves one run at most: a DataFrame that ran keeps Spark's finished stages, and running it
        again would answer faster, which would tell a caller that someone ran the same statement before)."""
        self._ensure_views()
        text = query.sql(dialect=self.dialect)
        with self._lock:
            frame = self._analysed.pop(text, None) if run else self._analysed.get(text)
        if frame is None:
            frame = self.session().sql(text)  # analysed here (names, types, functions); no row is read
        if not run:
            with self._lock:
                self._analysed[text] = frame
                self._analysed.move_to_end(text)
                while len(self._analysed) > _ANALYSED:
                    self._analysed.popitem(last=False)
        return frame

    def check(self, query: exp.Query) -> None:
        """Analyse the statement (names, types, functions) without running a job."""
        try:
            self._frame(query, run=False).schema  # noqa: B018 - forces the analysis, reads no row
        except CatalogError:
            raise
        except Exception as exc:  # noqa: BLE001 - AnalysisException and friends: before any row is read
            raise EngineError(_first_line(exc)) from None

    def rows(self, query: exp.Query) -> list[tuple[Any, ...]]:
        try:
            return [tuple(_python(v) for v in r) for r in self._frame(query, run=True).collect()]
        except Exception as exc:  # noqa: BLE001 - the class only: a message could carry a value of a row
            raise EngineError(type(exc).__name__) from None

    def arrow(self, query: exp.Query) -> pa.Table:
        try:
            return self._frame(query, run=True).toArrow()
        except Exception as exc:  # noqa: BLE001 - the class only
            raise EngineError(type(exc).__name__) from None

    @contextlib.contextmanager
    def frame(self, name: str, table: pa.Table) -> Iterator[exp.Table]:
        spark = self.session()
        spark.createDataFrame(table).createOrReplaceTempView(name)
        try:
            yield exp.table_(name, quoted=True)
        finally:
            spark.catalog.dropTempView(name)

    def close(self) -> None:
        """Drop this engine's views (the Spark context stays: it is the process's, shared by every engine on it)."""
        with self._lock:
            if self._views:
                spark = self.session()
                for name in self._views:
                    spark.catalog.dropTempView(bounded_table(name))
            self._views.clear()
            self._analysed.clear()
