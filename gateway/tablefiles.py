"""Reading a table file an administrator hands the gateway on the host (predictions, consent records): Parquet as
typed, CSV with every field as text, so that its values are converted like a dataset's source."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq


class TableFileError(ValueError):
    """The file cannot be read as a table; the message says why."""


def read_table_file(path: Path) -> pa.Table:
    """The file's table: Parquet as typed, CSV (or .csv.gz) with every field as text."""
    suffix = "".join(path.suffixes).lower()
    try:
        if suffix.endswith(".parquet"):
            return pq.read_table(path)
        if suffix.endswith((".csv", ".csv.gz")):
            with pacsv.open_csv(path) as reader:
                names = reader.schema.names
            options = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=True)
            return pacsv.read_csv(path, convert_options=options)
    except (OSError, pa.ArrowException) as exc:
        raise TableFileError(f"cannot read {path}: {exc}") from None
    raise TableFileError(f"unsupported format {path.name!r}: use Parquet or CSV")
