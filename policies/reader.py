"""What synthesis and labeling functions may do with private rows: run statements that Bastion compiled, as
sqlglot trees, over the pre-bounded tables. The gateway hands them its engine, which is such a reader; they never
open a database, name an engine or see SQL text from a caller. (A protocol only: no engine is imported here.)"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import pyarrow as pa
from sqlglot import exp

ROW_ID = "__row_id"  # every bounded table's row identity: unique within a dataset version, never released


class EngineError(Exception):
    """The engine refused or failed a statement. `message` is the engine's first line: shown only for statements
    checked before any row is read (a bind check), never for one that read rows."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Reader(Protocol):
    def rows(self, query: exp.Query) -> list[tuple[Any, ...]]:
        """Run `query` over the bounded tables. Values come back as Python ints (sums and counts exact), floats,
        str, datetime.date, bool or None, whatever the engine's own types. A failure is an EngineError that names
        the error's class only (its message could quote a row)."""
        ...

    def arrow(self, query: exp.Query) -> pa.Table:
        """Run `query` and return its result as an Arrow table."""
        ...

    def check(self, query: exp.Query) -> None:
        """Bind `query` without reading a row; raise EngineError with the binder's message if it does not bind."""
        ...

    def frame(self, name: str, table: pa.Table) -> contextlib.AbstractContextManager[exp.Table]:
        """Make a non-private Arrow table readable by this reader's statements under a temporary name, for the
        duration of the context, in the calling thread (a synthetic proxy compared with the private rows, say)."""
        ...


class EmptyReader:
    """A reader of tables with no rows (the default input released after a failure): every aggregate grouped by
    something has no group, so `rows` of a grouped statement is always []. Only grouped statements may be run."""

    def rows(self, query: exp.Query) -> list[tuple[Any, ...]]:
        if not isinstance(query, exp.Select) or not query.args.get("group"):
            raise ValueError("the empty reader answers grouped statements only")
        return []

    def arrow(self, query: exp.Query) -> pa.Table:
        raise ValueError("the empty reader has no rows to return")

    def check(self, query: exp.Query) -> None:
        return None

    def frame(self, name: str, table: pa.Table) -> contextlib.AbstractContextManager[exp.Table]:
        return contextlib.nullcontext(exp.table_(name, quoted=True))
