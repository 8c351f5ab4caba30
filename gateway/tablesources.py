"""The rows a synthetic proxy or a labeling-function statistics request reads when they are not the dataset's own
table: a chosen private table of a dataset of several tables (`table`), optionally joined with one public table of
the dataset on its unique key (`join`, `join_on`) and with a further private table on the privacy unit
(`join_private`).

The request's choice is turned into a FROM clause built as a sqlglot tree (`<dataset>.<table> AS a [JOIN
<dataset>.<other> AS b ON a.<unit> = b.<unit>] [JOIN <public> AS c ON <x>.<join_on> = c.<unique key>]`) and
validated by the planner of joined queries (`gateway.sql.privatejoins.prepare`), so a proxy or an LF set reads
exactly the joined table a query of the same FROM reads, priced the same way:

- the private table alone: its bounded table, at most k_t rows per unit (its `max_rows_per_unit`);
- joined with a public table on the public table's unique key: one joined row per row of the private table at
  most (an INNER join drops the rows whose value has no key), so still k_t rows per unit: the sensitivity is
  unchanged. A join on a column of declared multiplicity m > 1 is refused here (it would repeat each row up to m
  times, and the proxy would be priced at k_t·m for rows that are copies);
- joined with another private table on the unit: at most k_a·k_b rows per unit, the product of the bounds (or the
  policy's `max_joined_rows_per_unit`, with the joined rows truncated to it), as a query.

Everything here depends on public facts only: the policy and the public table's rows (for its columns' domains).
Every refusal is an `InvalidRequest` (400) or the planner's `QueryRejected` (400), raised before any charge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import sqlglot
from sqlglot import exp

from gateway.sql import privatejoins
from policies.errors import InvalidRequest
from policies.schema import Labels, Policy

PublicReader = Callable[[str, str], pa.Table]


@dataclass(frozen=True)
class TableSource:
    """A request's rows: which tables, the joined table as a dataset (its columns under their joined names, its
    rows per unit) and the FROM source that reads it (the bounded table, or the joined subquery)."""

    table: str  # the private table read (the dataset's own table by its dataset's name)
    join: str | None  # the public table joined on its unique key
    join_on: str | None  # the column of the private side(s) matched with that key
    join_private: str | None  # a further private table joined on the unit
    policy: Policy  # the joined table as a dataset: columns, unit, rows per unit (the sensitivity's k)
    tree: exp.Expr  # the FROM source
    sql: str  # the FROM as SQL text (what a query reading the same rows would write)
    note: str

    @property
    def rows_per_unit(self) -> int:
        return self.policy.max_rows_per_unit

    def request(self) -> dict[str, Any]:
        """The choice as it is recorded (audit, job record, cache key)."""
        out: dict[str, Any] = {"table": self.table}
        if self.join_private is not None:
            out["join_private"] = self.join_private
        if self.join is not None:
            out.update(join=self.join, join_on=self.join_on)
        return out

    def public(self) -> dict[str, Any]:
        """What the answer says about its rows: the choice, the rows per unit and the columns by joined name."""
        return {
            **self.request(),
            "from": self.sql,
            "rows_per_unit": self.rows_per_unit,
            "columns": sorted(self.policy.usable_columns(labeling=True)),
            "note": self.note,
        }


def _tables(policy: Policy) -> str:
    return ", ".join([policy.dataset, *sorted(policy.private_tables)])


def _private(policy: Policy, name: str, what: str) -> str:
    name = name.lower()
    if name != policy.dataset and name not in policy.private_tables:
        raise InvalidRequest(
            f"{what} {name!r} is not a private table of dataset {policy.dataset!r} (its private tables: "
            f"{_tables(policy)})",
            reason="unknown_table",
            hint="GET /v1/datasets lists each dataset's private and public tables",
        )
    return name


def _table_node(policy: Policy, name: str, alias: str) -> exp.Table:
    db = None if name == policy.dataset else exp.to_identifier(policy.dataset)
    return exp.Table(this=exp.to_identifier(name), db=db, alias=exp.TableAlias(this=exp.to_identifier(alias)))


def _columns(policy: Policy, name: str) -> dict[str, Any]:
    return dict(policy.columns if name == policy.dataset else policy.private_tables[name].columns)


def _unit(policy: Policy, name: str) -> str:
    if name == policy.dataset:
        assert policy.unit_column is not None
        return policy.unit_column
    return policy.private_tables[name].unit_column


def resolve_source(
    policy: Policy,
    *,
    table: str | None,
    join: str | None = None,
    join_on: str | None = None,
    join_private: str | None = None,
    public: PublicReader | None,
    what: str,
) -> TableSource | None:
    """The rows a request of `what` ("a synthetic proxy", "labeling functions") reads, validated; None when the
    request names no table and no join (the dataset's own table, read as before)."""
    if table is None and join is None and join_on is None and join_private is None:
        return None
    if not policy.private_tables and not policy.public_tables:
        raise InvalidRequest(
            f"dataset {policy.dataset!r} has a single table: {what} over it names no table and no join",
            reason="unknown_table",
        )
    name = _private(policy, table or policy.dataset, "table")
    sides: list[tuple[str, str]] = [(name, "a")]
    select = exp.select(exp.Star()).from_(_table_node(policy, name, "a"))
    if join_private is not None:
        other = _private(policy, join_private, "join_private")
        if other == name:
            raise InvalidRequest(
                "join_private names the table itself: a self-join on the unit multiplies each unit's rows",
                reason="join",
            )
        on = exp.EQ(this=exp.column(_unit(policy, name), "a"), expression=exp.column(_unit(policy, other), "b"))
        select = select.join(_table_node(policy, other, "b"), on=on, join_type="INNER")
        sides.append((other, "b"))
    if (join is None) != (join_on is None):
        raise InvalidRequest(
            "join and join_on go together: join names a public table of the dataset, join_on the column of the "
            "private table matched with its unique key",
            reason="join",
        )
    if join is not None and join_on is not None:
        join, join_on = join.lower(), join_on.lower()
        lookup = policy.public_tables.get(join)
        if lookup is None:
            names = ", ".join(sorted(policy.public_tables)) or "none"
            raise InvalidRequest(
                f"{join!r} is not a public table of dataset {policy.dataset!r} (its public tables: {names})",
                reason="unknown_table",
            )
        if lookup.unique_key is None:
            raise InvalidRequest(
                f"{what} joins a public table on its unique key only, and {join!r} declares none: a join on a "
                "column of declared multiplicity would repeat each row up to that many times",
                reason="join",
                hint="ask the administrator to declare the table's unique_key, or use a query (priced by the "
                "multiplicity)",
            )
        owner = [alias for side, alias in sides if join_on in _columns(policy, side)]
        if not owner:
            raise InvalidRequest(
                f"join_on: no column {join_on!r} in {' or '.join(side for side, _ in sides)}",
                reason="unknown_column",
            )
        on = exp.EQ(this=exp.column(join_on, owner[0]), expression=exp.column(lookup.unique_key, "c"))
        select = select.join(
            exp.Table(this=exp.to_identifier(join), alias=exp.TableAlias(this=exp.to_identifier("c"))),
            on=on,
            join_type="INNER",
        )
    text = select.sql(dialect="duckdb")
    parsed = sqlglot.parse_one(text, dialect="duckdb")  # positions for the planner's spans
    assert isinstance(parsed, exp.Select)
    found, _ = privatejoins.prepare(parsed, text, lambda _: policy, public, resolved=(policy.dataset, policy))
    derived = found.derived_policy()
    return TableSource(
        table=name,
        join=join,
        join_on=join_on,
        join_private=join_private.lower() if join_private is not None else None,
        policy=derived,
        tree=found.table_tree(),
        sql=text.split(" FROM ", 1)[1],
        note=found.note(),
    )


def with_classes(source: TableSource, policy: Policy) -> Policy:
    """The joined table as a dataset for labeling functions: the policy's label classes (public), and its gold
    column only where the labels apply, i.e. when the rows are the dataset's own table (joined or not); over a
    private table the statistics run without gold (no accuracy)."""
    derived = source.policy
    if policy.labels is None:
        return derived
    gold = policy.labels.gold_column if source.table == policy.dataset else None
    return derived.model_copy(update={"labels": Labels(classes=list(policy.labels.classes), gold_column=gold)})
