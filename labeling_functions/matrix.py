"""The label matrix as compiled statements: every declarative LF becomes one vote column of one SELECT over the
pre-bounded table, built as a sqlglot tree that the engine generates in its own dialect. The statistics need only
the vote patterns with their counts, which the engine aggregates itself (GROUP BY over the votes). Python LFs'
votes come back to the engine as non-private frames of (key, vote) (`labeling_functions.combos`), joined on each
row's key in the same statement, so their votes stay aligned with the declarative ones row by row and the rows
never leave the engine; only the label model needs every row's id and votes in the gateway's process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
from sqlglot import exp

from labeling_functions.specs import ABSTAIN, CompiledLF
from policies.errors import GatewayError, QueryRejected
from policies.reader import ROW_ID, EngineError, Reader
from policies.schema import Policy

GOLD = "__g"
COUNT = "__n"


class LFExecutionError(GatewayError):
    """The generated SQL failed on the rows; what failed is not said (it could depend on them). Raised after the
    charge only, where the gateway answers with the default release instead of rendering it."""

    status = 422
    code = "lf_execution_failed"


def _column(name: str) -> exp.Column:
    return exp.column(name, quoted=True)


def _table(policy: Policy) -> exp.Table:
    return exp.table_(policy.bounded_table, quoted=True)


def _source(policy: Policy, source: exp.Expr | None) -> exp.Expr:
    """What the LFs read: `source` (a private table of a dataset of several tables, or a join:
    `gateway.tablesources`) or the policy's bounded table."""
    return source.copy() if source is not None else _table(policy)


def vote_alias(j: int) -> str:
    return f"__v{j}"


def gold_expr(policy: Policy) -> exp.Expr:
    """The gold label as a class index (ABSTAIN when missing, outside the classes or not declared)."""
    if policy.labels is None or policy.labels.gold_column is None:
        return exp.Literal.number(ABSTAIN)
    text = exp.Cast(this=_column(policy.labels.gold_column), to=exp.DataType.build("VARCHAR"))
    return exp.Case(
        ifs=[
            exp.If(this=exp.EQ(this=text.copy(), expression=exp.Literal.string(c)), true=exp.Literal.number(i))
            for i, c in enumerate(policy.labels.classes)
        ],
        default=exp.Literal.number(ABSTAIN),
    )


def key_alias(j: int) -> str:
    return f"__k{j}"


@dataclass(frozen=True)
class VoteQuery:
    """The generated SELECT of the vote columns (__v0, __v1, ...) and the gold index (__g) per bounded row: first
    the declarative LFs' votes, then one per Python LF, looked up by the row's key (`keys[j]`, an expression over
    the row) in the frame of (key, vote) named `frames[j]` (`labeling_functions.combos`)."""

    policy: Policy
    lfs: tuple[CompiledLF, ...]
    keys: tuple[exp.Expr, ...] = ()
    frames: tuple[str, ...] = ()
    source: exp.Expr | None = None  # the rows read: the policy's bounded table by default, else this FROM source

    @property
    def width(self) -> int:
        return len(self.lfs) + len(self.keys)

    def _rows(self, extra: list[exp.Expr]) -> exp.Select:
        """Each bounded row's `extra` columns, declarative votes, gold index and Python LFs' vote keys."""
        out: list[exp.Expr] = [exp.alias_(lf.vote, vote_alias(j), quoted=True) for j, lf in enumerate(self.lfs)]
        out.append(exp.alias_(gold_expr(self.policy), GOLD, quoted=True))
        out += [exp.alias_(key, key_alias(j), quoted=True) for j, key in enumerate(self.keys)]
        return exp.select(*extra, *out).from_(_source(self.policy, self.source))

    def _joined(self, extra: list[str]) -> exp.Select:
        """`_rows` with every Python LF's vote joined on its key: the columns `extra`, __v0.., __g."""
        from labeling_functions.combos import KEY, VOTE

        if len(self.frames) != len(self.keys):
            raise ValueError("one frame of votes per Python LF key")
        base = self._rows([_column(c) for c in extra])
        if not self.keys:
            return base
        row = "r"
        columns: list[exp.Expr] = [exp.column(c, table=row, quoted=True) for c in extra]
        columns += [exp.column(vote_alias(j), table=row, quoted=True) for j in range(len(self.lfs))]
        columns.append(exp.column(GOLD, table=row, quoted=True))
        select = exp.select().from_(exp.alias_(exp.Subquery(this=base), row))
        for j, frame in enumerate(self.frames):
            alias = f"f{j}"
            select = select.join(
                exp.alias_(exp.table_(frame, quoted=True), alias),
                on=exp.EQ(
                    this=exp.column(key_alias(j), table=row, quoted=True),
                    expression=exp.column(KEY, table=alias, quoted=True),
                ),
                join_type="left",
            )
            vote = exp.Coalesce(
                this=exp.column(VOTE, table=alias, quoted=True), expressions=[exp.Literal.number(ABSTAIN)]
            )
            columns.insert(len(extra) + len(self.lfs) + j, exp.alias_(vote, vote_alias(len(self.lfs) + j), quoted=True))
        return select.select(*columns)

    def patterns(self) -> exp.Select:
        """The distinct (votes, gold) patterns with their row counts."""
        keys = [_column(vote_alias(j)) for j in range(self.width)] + [_column(GOLD)]
        return (
            exp.select(*keys, exp.alias_(exp.Count(this=exp.Star()), COUNT, quoted=True))
            .from_(exp.alias_(exp.Subquery(this=self._joined([])), "votes"))
            .group_by(*[k.copy() for k in keys])
        )

    def matrix(self, inputs: list[str] | None = None) -> exp.Select:
        """Every bounded row: its id, its votes and gold index, and the `inputs` columns (in no particular order
        of rows: the row id says which row is which)."""
        return self._joined([ROW_ID, *(inputs or [])])


def check_binds(reader: Reader, policy: Policy, lfs: list[CompiledLF], source: exp.Expr | None = None) -> None:
    """Bind every LF's vote expression against the table's schema without reading a row, so type errors are
    reported, with the LF's name, before anything is charged. The binder's message is passed on: like the LF and
    its columns, it depends on the schema and the condition only."""
    for lf in lfs:
        try:
            reader.check(exp.select(lf.vote).from_(_source(policy, source)))
        except EngineError as exc:
            types = ", ".join(f"{c} ({policy.columns[c].type.value})" for c in lf.columns if c in policy.columns)
            raise QueryRejected(
                f"labeling function {lf.name!r}: the engine cannot compile the condition over the columns it uses, "
                f"{types or 'none'}: {exc.message}",
                reason="invalid_condition",
                hint="compare each column with values of its type (GET /v1/datasets); some functions exist on one "
                "engine only",
            ) from None


def _failed() -> LFExecutionError:
    # A runtime error can depend on the rows; say nothing about it beyond that it happened.
    return LFExecutionError(
        "the labeling functions failed while running over the rows; no details are given "
        "since they could depend on the rows"
    )


def _ints(values: object) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def vote_patterns(reader: Reader, query: VoteQuery) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(votes p × m, gold p, counts p) over the distinct vote patterns, aggregated by the engine."""
    try:
        rows = reader.rows(query.patterns())
    except EngineError:
        raise _failed() from None
    got = np.asarray(rows, dtype=np.int64).reshape(len(rows), query.width + 2)
    return got[:, : query.width], got[:, query.width], got[:, query.width + 1]


def label_matrix(
    reader: Reader, query: VoteQuery, inputs: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """(row ids n, label matrix n × m, gold n, the `inputs` columns as a frame), ordered by row id."""
    try:
        table: pa.Table = reader.arrow(query.matrix(inputs))
    except EngineError:
        raise _failed() from None
    table = table.sort_by(ROW_ID)
    matrix = (
        np.column_stack([_ints(table.column(vote_alias(j))) for j in range(query.width)])
        if query.width
        else np.zeros((table.num_rows, 0), dtype=np.int64)
    )
    frame = table.select(list(inputs or [])).to_pandas()
    return _ints(table.column(ROW_ID)), matrix, _ints(table.column(GOLD)), frame


def lf_inputs(policy: Policy) -> list[str]:
    """The columns a labeling function may use: those usable in labeling functions, by name."""
    return sorted(policy.usable_columns(labeling=True))


def patterns_of(matrix: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(votes p × m, gold p, counts p): the distinct rows of [matrix | gold] with their counts (what
    `vote_patterns` has the engine compute, here over votes already in the gateway's process)."""
    stacked = np.column_stack([matrix, gold]) if len(gold) else np.zeros((0, matrix.shape[1] + 1), dtype=np.int64)
    unique, counts = np.unique(stacked, axis=0, return_counts=True)
    unique = unique.reshape(len(counts), matrix.shape[1] + 1)
    return unique[:, :-1], unique[:, -1], counts.astype(np.int64)
