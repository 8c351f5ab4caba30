"""The label matrix as SQL: every declarative LF becomes one CASE column of one DuckDB query over the pre-bounded
table; Python LFs' votes (computed in the sandbox) are joined in by row id. The statistics need only the vote
patterns with their counts, which DuckDB aggregates itself (GROUP BY over the votes), so rows never leave it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from labeling_functions.specs import ABSTAIN, CompiledLF
from policies.errors import GatewayError, QueryRejected
from policies.schema import Policy

ROW_ID = "__row"


class LFExecutionError(GatewayError):
    """The generated SQL failed on the rows; what failed is not said (it could depend on them). Raised after the
    charge only, where the gateway answers with the default release instead of rendering it."""

    status = 422
    code = "lf_execution_failed"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def gold_sql(policy: Policy) -> str | None:
    """The gold label as a class index (-1 when missing or outside the classes), if the policy declares one."""
    if policy.labels is None or policy.labels.gold_column is None:
        return None
    col = f"CAST({_q(policy.labels.gold_column)} AS VARCHAR)"
    arms = " ".join(
        f"WHEN {col} = '{c.replace(chr(39), chr(39) * 2)}' THEN {i}" for i, c in enumerate(policy.labels.classes)
    )
    return f"CASE {arms} ELSE {ABSTAIN} END"


@dataclass(frozen=True)
class VoteQuery:
    """The generated SELECT of the vote columns (v0, v1, ...) and the gold index (g) per bounded row."""

    policy: Policy
    lfs: tuple[CompiledLF, ...]
    python_columns: int = 0  # number of Python LF vote columns joined from PY_VOTES
    python_relation: str = ""

    @property
    def width(self) -> int:
        return len(self.lfs) + self.python_columns

    def select_sql(self, *, with_row_id: bool = False) -> str:
        cols = [f"{lf.vote_sql} AS v{j}" for j, lf in enumerate(self.lfs)]
        cols += [f"p.v{j} AS v{len(self.lfs) + j}" for j in range(self.python_columns)]
        gold = gold_sql(self.policy)
        cols.append(f"{gold} AS g" if gold else f"{ABSTAIN} AS g")
        if with_row_id:
            cols.insert(0, f"b.rowid AS {ROW_ID}")
        source = f"{_q(self.policy.bounded_table)} AS b"
        if self.python_columns:
            source += f" JOIN {self.python_relation} AS p ON b.rowid = p.{ROW_ID}"
        return f"SELECT {', '.join(cols)} FROM {source}"

    def patterns_sql(self) -> str:
        keys = [f"v{j}" for j in range(self.width)] + ["g"]
        return f"SELECT {', '.join(keys)}, COUNT(*) AS n FROM ({self.select_sql()}) AS votes GROUP BY {', '.join(keys)}"

    def matrix_sql(self) -> str:
        return f"{self.select_sql(with_row_id=True)} ORDER BY {ROW_ID}"


def check_binds(cur: duckdb.DuckDBPyConnection, policy: Policy, lfs: list[CompiledLF]) -> None:
    """Bind every LF's SQL against the table's schema without reading a row (LIMIT 0), so type errors are
    reported, with the LF's name, before anything is charged. The engine's message is not passed on: only the
    LF and its columns, which are public."""
    table = _q(policy.bounded_table)
    for lf in lfs:
        failed = False
        try:
            cur.execute(f"SELECT {lf.vote_sql} FROM {table} LIMIT 0").fetchall()
        except duckdb.Error:
            failed = True
        if failed:
            types = ", ".join(f"{c} ({policy.columns[c].type.value})" for c in lf.columns if c in policy.columns)
            raise QueryRejected(
                f"labeling function {lf.name!r}: the condition does not type-check against the "
                f"columns it uses: {types or 'none'}",
                reason="invalid_condition",
                hint="compare each column with values of its type (GET /v1/datasets)",
            )


@contextmanager
def python_votes(cur: duckdb.DuckDBPyConnection, row_ids: np.ndarray, votes: np.ndarray, name: str) -> Iterator[str]:
    """Expose Python LFs' votes (aligned with row_ids) to DuckDB as a relation for the duration of a block."""
    table = pa.table(
        {
            ROW_ID: pa.array(row_ids, pa.int64()),
            **{f"v{j}": pa.array(votes[:, j], pa.int64()) for j in range(votes.shape[1])},
        }
    )
    cur.register(name, table)
    try:
        yield name
    finally:
        cur.unregister(name)


def _run(cur: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyConnection:
    try:
        return cur.execute(sql)
    except duckdb.Error:
        # A runtime error can depend on the rows; say nothing about it beyond that it happened.
        raise LFExecutionError(
            "the labeling functions failed while running over the rows; no details are given "
            "since they could depend on the rows"
        ) from None


def vote_patterns(cur: duckdb.DuckDBPyConnection, query: VoteQuery) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(votes p × m, gold p, counts p) over the distinct vote patterns."""
    got = _run(cur, query.patterns_sql()).fetchnumpy()
    counts = np.asarray(got["n"], dtype=np.int64)
    votes = (
        np.column_stack([np.asarray(got[f"v{j}"], dtype=np.int64) for j in range(query.width)])
        if query.width
        else np.zeros((len(counts), 0), dtype=np.int64)
    )
    return votes, np.asarray(got["g"], dtype=np.int64), counts


def label_matrix(cur: duckdb.DuckDBPyConnection, query: VoteQuery) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row ids, label matrix n × m, gold n), ordered by row id: for the label model and for tests."""
    got = _run(cur, query.matrix_sql()).fetchnumpy()
    rows = np.asarray(got[ROW_ID], dtype=np.int64)
    matrix = (
        np.column_stack([np.asarray(got[f"v{j}"], dtype=np.int64) for j in range(query.width)])
        if query.width
        else np.zeros((len(rows), 0), dtype=np.int64)
    )
    return rows, matrix, np.asarray(got["g"], dtype=np.int64)


def lf_input_frame(cur: duckdb.DuckDBPyConnection, policy: Policy) -> tuple[np.ndarray, pd.DataFrame]:
    """Row ids and the rows Python LFs see: the columns usable in labeling functions, ordered by row id."""
    columns = sorted(policy.usable_columns(labeling=True))
    sql = (
        f"SELECT rowid AS {ROW_ID}, {', '.join(_q(c) for c in columns)} FROM {_q(policy.bounded_table)} ORDER BY rowid"
    )
    frame = _run(cur, sql).df()
    rows = frame.pop(ROW_ID).to_numpy(dtype=np.int64)
    return rows, frame
