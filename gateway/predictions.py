"""Model predictions attached to a dataset: private data like the rows they belong to.

An admin on the gateway host attaches a model's predictions (`bastion predictions add <dataset> --model <name>
<file>`): one row per dataset row, keyed by the policy's `row_key`, with a predicted label among the policy's
`labels.classes` and optionally a `score` in [0, 1]. The file is validated (every key readable, known to the
dataset, not repeated; every label a class; every score in [0, 1]) against the table of every source row's key
that registration stores, and kept as one Parquet file per dataset and model in the workspace's private
directory, written to a temporary file and renamed into place after its `predictions_added` audit record is
durable. A file on disk is therefore whole or absent, which makes attaching safe while a gateway serves (it reads
the file when an evaluation runs, and the cache key of an evaluation names the attachment; a file replaced
between an evaluation's plan and its count is detected by its attachment id and not counted as the planned one).

Only `POST /v1/evaluate` reads predictions, through `gateway.evaluation`; what a caller may learn about an
attachment is public: the model's name, the dataset version it was attached to, when, and a random attachment id.
Row counts and digests are shown to the admin on the host only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlglot import exp

from audit.record import Event
from gateway.engines import recipe
from gateway.engines.kind import EngineKind
from gateway.service import Bastion
from gateway.tablefiles import TableFileError, read_table_file
from policies.errors import GatewayError, InvalidRequest
from policies.schema import ROW_KEY, Policy, row_keys_table

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEY = "__pred_key"  # the stored file's columns (dataset columns never start with __)
LABEL = "__pred_label"
SCORE = "__pred_score"
_FRAME = "__bastion_predictions_input"
_META = b"bastion"


class StalePredictions(Exception):
    """The predictions file of a model was replaced after an evaluation recorded its attachment id (an error after
    the charge: the evaluation's answer is then the release over the default input)."""


class PredictionsError(GatewayError):
    """Predictions cannot be attached (admin-facing: names the problem)."""

    status = 400
    code = "predictions_error"


@dataclass(frozen=True)
class Attachment:
    """One attached predictions file's metadata (in its Parquet schema's key-value metadata)."""

    dataset: str
    model: str
    dataset_version: str
    attachment: str  # a random id, new for every attachment: part of an evaluation's cache key
    added_at: str
    rows: int  # admin-facing only
    digest: str  # SHA-256 of the file as given; admin-facing only

    def public(self, current_version: str) -> dict[str, Any]:
        """What a granted caller may see: no row count, nothing derived from private bytes."""
        return {
            "model": self.model,
            "dataset_version": self.dataset_version,
            "current": self.dataset_version == current_version,
            "attached_at": self.added_at,
            "attachment": self.attachment,
        }


def check_model_name(model: Any) -> str:
    if not isinstance(model, str) or not MODEL_NAME.match(model):
        raise InvalidRequest(
            f"model name {model!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return model


class PredictionsStore:
    """The workspace's directory of attached predictions: <root>/<dataset>/<model>.parquet."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, dataset: str, model: str) -> Path:
        return self.root / dataset / f"{check_model_name(model)}.parquet"

    def attachments(self, dataset: str | None = None) -> list[Attachment]:
        """Every attachment (of `dataset`), by dataset and model, read from the files' metadata only."""
        if not self.root.is_dir():
            return []
        out = []
        for directory in sorted(self.root.iterdir()):
            if not directory.is_dir() or (dataset is not None and directory.name != dataset):
                continue
            for file in sorted(directory.glob("*.parquet")):
                meta = read_metadata(file)
                if meta is not None:
                    out.append(meta)
        return out

    def get(self, dataset: str, model: str) -> Attachment | None:
        path = self.path(dataset, model)
        return read_metadata(path) if path.exists() else None

    def schema(self, dataset: str, model: str) -> pa.Schema:
        """The stored predictions' (key, label) schema, read from the file's footer (no rows)."""
        schema = pq.read_schema(self.path(dataset, model))
        return pa.schema([schema.field(KEY), schema.field(LABEL)])

    def load(self, dataset: str, model: str, attachment: str) -> pa.Table:
        """The stored predictions (key, label) of `attachment`, read through one open file (a file renamed into place
        meanwhile does not change what is read), or StalePredictions if the file there now is another attachment's
        (replaced since the caller read its metadata)."""
        with open(self.path(dataset, model), "rb") as f:
            table = pq.read_table(f, columns=[KEY, LABEL])
        raw = (table.schema.metadata or {}).get(_META)
        found = json.loads(raw).get("attachment") if raw is not None else None
        if found != attachment:
            raise StalePredictions(f"{dataset}/{model}: the file is attachment {found}, not {attachment}")
        return table


def read_metadata(path: Path) -> Attachment | None:
    try:
        raw = (pq.read_schema(path).metadata or {}).get(_META)
        return Attachment(**json.loads(raw)) if raw is not None else None
    except (OSError, ValueError, TypeError, pa.ArrowException):
        return None


def _read_file(path: Path) -> pa.Table:
    """The file's table: Parquet as typed, CSV with every field as text (converted like the dataset's source)."""
    try:
        return read_table_file(path)
    except TableFileError as exc:
        raise PredictionsError(f"the predictions file: {exc}") from None


def _policy_for_predictions(policy: Policy) -> tuple[str, list[str]]:
    """The row key and the classes predictions are validated against, or why the dataset takes none."""
    if policy.row_key is None:
        raise PredictionsError(
            f"dataset {policy.dataset!r} has no row_key in its policy: name the column that identifies a row "
            "(row_key: <column>) and register the dataset again"
        )
    if policy.labels is None or policy.labels.gold_column is None:
        raise PredictionsError(
            f"dataset {policy.dataset!r} has no gold labels (labels: {{gold_column: ..., classes: [...]}}): "
            "predictions are evaluated against them"
        )
    return policy.row_key, list(policy.labels.classes)


def validate(bastion: Bastion, policy: Policy, table: pa.Table) -> pa.Table:
    """The predictions as stored (KEY converted like the dataset's row key, LABEL, SCORE), or PredictionsError
    naming the first problem."""
    row_key, classes = _policy_for_predictions(policy)
    names = {n.lower(): n for n in table.column_names}
    for needed in (row_key, "label"):
        if needed not in names:
            raise PredictionsError(
                f"the file has no {needed!r} column; it needs {row_key!r} (the row key), 'label' (the predicted "
                "class) and optionally 'score' (in [0, 1])"
            )
    has_score = "score" in names
    columns = {row_key: table[names[row_key]], "label": table[names["label"]]}
    if has_score:
        columns["score"] = table[names["score"]]
    frame_table = pa.table(columns)
    source = exp.table_(_FRAME, quoted=True)
    label = exp.column("label", quoted=True)
    selects: list[exp.Expr] = [
        exp.alias_(recipe.converted(row_key, policy.columns[row_key]), KEY, quoted=True),
        exp.alias_(exp.TryCast(this=label, to=exp.DataType.build("VARCHAR")), LABEL, quoted=True),
    ]
    if has_score:
        score = exp.column("score", quoted=True)
        selects.append(exp.alias_(exp.TryCast(this=score, to=exp.DataType.build("DOUBLE")), SCORE, quoted=True))
    engine = bastion.engine
    with engine.frame(_FRAME, frame_table):
        converted = engine.arrow(exp.select(*selects).from_(source))
    n = converted.num_rows
    if n == 0:
        raise PredictionsError("the file has no rows")
    keys = converted[KEY]
    if keys.null_count:
        raise PredictionsError(f"{keys.null_count:,} row(s) have no readable {row_key!r}")
    distinct = pc.count_distinct(keys).as_py()
    if distinct < n:
        raise PredictionsError(f"{n - distinct:,} row(s) repeat the {row_key!r} of an earlier row")
    labels = converted[LABEL]
    bad = pc.invert(pc.fill_null(pc.is_in(labels, value_set=pa.array(classes, pa.string())), False))
    if pc.any(bad).as_py():
        first = pc.filter(labels, bad)[0].as_py()
        raise PredictionsError(
            f"{pc.sum(bad).as_py():,} row(s) have a label that is not one of the classes {classes} "
            f"(the first: {first!r})"
        )
    if has_score:
        scores = converted[SCORE]
        given = pc.is_valid(table[names["score"]])
        unreadable = pc.and_(given, pc.is_null(scores))
        outside = pc.fill_null(pc.or_(pc.less(scores, 0.0), pc.greater(scores, 1.0)), False)
        if pc.any(unreadable).as_py() or pc.any(outside).as_py() or pc.any(pc.is_nan(scores)).as_py():
            raise PredictionsError("every score must be a number in [0, 1] (or missing)")
    _check_known(bastion, policy, converted)
    return converted


def _check_known(bastion: Bastion, policy: Policy, converted: pa.Table) -> None:
    """Refuse keys that no source row of the dataset has (anti-join with the row-keys table)."""
    engine = bastion.engine
    keys = exp.table_(row_keys_table(policy.dataset), quoted=True)
    given = pa.table({KEY: converted[KEY]})
    with engine.frame(_FRAME, given) as frame:
        query = (
            exp.select(exp.Count(this=exp.Star()))
            .from_(exp.alias_(frame, "p"))
            .join(
                exp.alias_(keys, "k"),
                on=exp.EQ(this=exp.column(KEY, "p", quoted=True), expression=exp.column(ROW_KEY, "k", quoted=True)),
                join_type="LEFT",
            )
            .where(exp.Is(this=exp.column(ROW_KEY, "k", quoted=True), expression=exp.Null()))
        )
        ((unknown,),) = engine.rows(query)
    if unknown:
        raise PredictionsError(f"{unknown:,} row key(s) are not keys of dataset {policy.dataset!r}")


def _durable_write(table: pa.Table, temp: Path) -> None:
    pq.write_table(table, temp)
    fd = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def attach(bastion: Bastion, dataset: str, model: str, file: Path, *, replace: bool = False) -> Attachment:
    """Validate `file` and attach it as `model`'s predictions for `dataset`'s current version; audited as
    `predictions_added` before the file takes its place. Admin only, on the host, DuckDB engine only."""
    check_model_name(model)
    if bastion.engine.kind is not EngineKind.DUCKDB:
        raise PredictionsError(
            "predictions are attached on the DuckDB engine only; this workspace keeps its rows on "
            f"{bastion.engine.kind.value}"
        )
    policy, version = bastion.engine.policy(dataset)
    store = PredictionsStore(bastion.settings.predictions_dir)
    target = store.path(dataset, model)
    if target.exists() and not replace:
        raise PredictionsError(
            f"model {model!r} already has predictions for {dataset!r}; pass --replace to replace them"
        )
    try:
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
    except OSError as exc:
        raise PredictionsError(f"cannot read {file}: {exc.strerror or exc}") from None
    table = validate(bastion, policy, _read_file(file))
    meta = Attachment(
        dataset=dataset,
        model=model,
        dataset_version=version,
        attachment=secrets.token_hex(8),
        added_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        rows=table.num_rows,
        digest=digest,
    )
    table = table.replace_schema_metadata({_META: json.dumps(asdict(meta)).encode()})
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        _durable_write(table, temp)
        os.chmod(temp, 0o600)
        bastion.audit(
            None,
            Event.PREDICTIONS_ADDED,
            dataset=dataset,
            decision="allowed",
            reason="ok",
            request={
                # no row count or digest: auditors read this record, and both are derived from private rows
                "model": model,
                "file": str(file),
                "dataset_version": version,
                "attachment": meta.attachment,
                "replaced": target.exists(),
            },
        )
        os.replace(temp, target)
        _sync_directory(target.parent)
    finally:
        temp.unlink(missing_ok=True)
    return meta
