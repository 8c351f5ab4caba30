"""The inputs of Python LFs: each LF is applied once per distinct combination of the columns it declares, not once
per row, and its votes are mapped back to the rows by the engine (a join on the combination's key).

The engine numbers the combinations: a combination's key is its dense rank in the order of the LF's columns
(`DENSE_RANK() OVER (ORDER BY columns)`), computed the same way in the statement that lists the combinations (one
row per key) and in the statement of the votes (every row's key), so both agree without comparing values in the
gateway. The LF's votes per key go back to the engine as a non-private frame (`Reader.frame`) that the vote
statement joins on the key; the engine then counts the vote patterns, and no row leaves it.

Timing: the number of distinct combinations depends on the rows, so it is never shown and the work does not
follow it. An LF is applied to exactly `SandboxLimits.combinations` inputs (a public number: the combinations,
then all-NULL inputs up to that number) when there are at most that many; above it, it is applied once per row of
the bounded table (its row count is not hidden: scanning the table takes time in proportion to it), keyed by the
row id. What the running time can still tell: whether there are more combinations than the cap (columns whose
public domains, category domains or integer bounds, allow at most the cap can never cross it), and, as with
per-row application, how long the LF takes on the inputs it is given, each call at most ROW_SECONDS: one unit's
rows add at most k new combinations, so at most k × ROW_SECONDS, never more than per row. (Padding with repeats
of the combinations would multiply a slow one's time.)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from sqlglot import exp

from labeling_functions.registry import PythonLF
from labeling_functions.sandbox import LFRef
from labeling_functions.specs import ABSTAIN
from policies.reader import ROW_ID, Reader
from policies.schema import Policy

KEY = "__k"
VOTE = "__vote"


def _column(name: str, table: str | None = None) -> exp.Column:
    return exp.column(name, table=table, quoted=True)


def combination_key(columns: tuple[str, ...]) -> exp.Expr:
    """A row's combination of `columns` as an integer: its dense rank in their order (1 when there are none)."""
    if not columns:
        return exp.Literal.number(1)
    return exp.Window(
        this=exp.Anonymous(this="DENSE_RANK"),
        order=exp.Order(expressions=[exp.Ordered(this=_column(c), desc=False) for c in columns]),
    )


def combinations_query(policy: Policy, columns: tuple[str, ...], limit: int) -> exp.Select:
    """The first `limit` distinct combinations of `columns`, one row per key, in key order. Rows with the same key
    compare equal on every column, so MIN picks the combination (NULL where they all are)."""
    table = exp.table_(policy.bounded_table, quoted=True)
    ranked = exp.select(*[_column(c) for c in columns], exp.alias_(combination_key(columns), KEY, quoted=True)).from_(
        table
    )
    mins = [exp.alias_(exp.Min(this=_column(c)), c, quoted=True) for c in columns]
    return (
        exp.select(*mins, _column(KEY))
        .from_(exp.alias_(exp.Subquery(this=ranked), "ranked"))
        .group_by(_column(KEY))
        .order_by(_column(KEY))
        .limit(limit)
    )


def rows_query(policy: Policy, columns: tuple[str, ...]) -> exp.Select:
    """Every bounded row's `columns`, keyed by its row id (the per-row fallback)."""
    table = exp.table_(policy.bounded_table, quoted=True)
    return exp.select(exp.alias_(_column(ROW_ID), KEY, quoted=True), *[_column(c) for c in columns]).from_(table)


@dataclass(frozen=True)
class LFInput:
    """What one Python LF is applied to: `table` (its columns and KEY; padded to a public size for combinations,
    of which the first `size` rows are real) and `key`, each bounded row's KEY in the vote statement."""

    lf: PythonLF
    key: exp.Expr
    table: pa.Table
    size: int
    per_row: bool

    @property
    def ref(self) -> LFRef:
        return LFRef(self.lf.name, self.lf.module, self.lf.attribute, self.lf.columns)

    def votes(self, applied: np.ndarray) -> pa.Table:
        """The frame of (KEY, VOTE) the vote statement joins: the real inputs' votes, those outside the LF's
        declared labels counted as abstentions."""
        real = applied[: self.size]
        kept = np.where(np.isin(real, self.lf.label_indices), real, ABSTAIN).astype(np.int64)
        keys = np.asarray(self.table.column(KEY).to_numpy(zero_copy_only=False)[: self.size], dtype=np.int64)
        return pa.table({KEY: pa.array(keys, pa.int64()), VOTE: pa.array(kept, pa.int64())})

    @staticmethod
    def frame_name() -> str:
        return f"__lf_votes_{uuid.uuid4().hex}"


def _padded(table: pa.Table, size: int) -> pa.Table:
    """`table` followed by rows of NULLs (a public input) up to exactly `size` rows. Not repeats of its rows: a
    slow combination would then be applied many times, and one unit's rows could slow the run by far more than
    k × ROW_SECONDS."""
    nulls = pa.table({f.name: pa.nulls(size - table.num_rows, f.type) for f in table.schema}, schema=table.schema)
    return pa.concat_tables([table, nulls])


def lf_input(reader: Reader, policy: Policy, lf: PythonLF, cap: int) -> LFInput:
    """The combinations of `lf`'s columns padded to `cap` inputs, or, when there are more than `cap`, every row."""
    combos = reader.arrow(combinations_query(policy, lf.columns, cap + 1))
    if combos.num_rows <= cap:
        return LFInput(lf, combination_key(lf.columns), _padded(combos, cap), combos.num_rows, per_row=False)
    rows = reader.arrow(rows_query(policy, lf.columns))
    return LFInput(lf, _column(ROW_ID), rows, rows.num_rows, per_row=True)
