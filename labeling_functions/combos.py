"""The inputs of Python LFs: each LF is applied once per distinct combination of the columns it declares, not once
per row, and its votes are mapped back to the rows by the engine (a join on the combination's key).

The engine numbers the combinations: a combination's key is its dense rank in the order of the LF's columns
(`DENSE_RANK() OVER (ORDER BY columns)`), computed the same way in the statement that lists the combinations (one
row per key) and in the statement of the votes (every row's key), so both agree without comparing values in the
gateway. The LF's votes per key go back to the engine as a non-private frame (`Reader.frame`) that the vote
statement joins on the key; the engine then counts the vote patterns, and no row leaves it.

Timing: the number of distinct combinations depends on the rows, so it is never shown, and the work follows it
only as far as one unit can move it. An LF is applied to every combination, padded with all-NULL inputs (a
public input) up to `SandboxLimits.combinations` when there are fewer, so below that number the count of calls
is a public constant, and above it one unit's rows add at most k calls. There is no switch to another way of
working at any number of combinations (an earlier fallback to per-row application past the cap made the time
jump when one unit's rows crossed it). What the running time can still tell is, as with per-row application,
how long the LF takes on the inputs it is given, each call at most ROW_SECONDS: one unit's rows add at most k new
combinations, so at most k × ROW_SECONDS (plus k inputs' transfer and lookup). Padding with repeats of the
combinations would multiply a slow one's time.
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
from policies.reader import Reader
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


def combinations_query(policy: Policy, columns: tuple[str, ...]) -> exp.Select:
    """The distinct combinations of `columns`, one row per key, in key order. Rows with the same key compare equal
    on every column, so MIN picks the combination (NULL where they all are)."""
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
    )


@dataclass(frozen=True)
class LFInput:
    """What one Python LF is applied to: `table` (its columns and KEY; padded to a public size when there are
    fewer combinations, the first `size` rows real) and `key`, each bounded row's KEY in the vote statement."""

    lf: PythonLF
    key: exp.Expr
    table: pa.Table
    size: int

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


def lf_input(reader: Reader, policy: Policy, lf: PythonLF, pad_to: int) -> LFInput:
    """Every combination of `lf`'s columns, padded with NULL inputs to `pad_to` when there are fewer."""
    combos = reader.arrow(combinations_query(policy, lf.columns))
    table = _padded(combos, pad_to) if combos.num_rows < pad_to else combos
    return LFInput(lf, combination_key(lf.columns), table, combos.num_rows)
