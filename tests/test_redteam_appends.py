"""Red-team checks of appends and versions: neighbouring feeds (one unit's rows removed from the registration and
from every appended batch) must give every other unit the same bounded rows, version by version, and what a caller
sees of versions must not depend on the private rows beyond the documented row-count class."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlglot import exp

from gateway.engines.base import CatalogError
from gateway.engines.duckdb import DuckDBEngine
from policies.schema import parse_policy

K = 2
POLICY = parse_policy(
    yaml.safe_load(
        f"""
dataset: feed
privacy_unit: uid
max_rows_per_unit: {K}
budget: {{per_principal: {{epsilon: 1000}}, total: {{epsilon: 10000}}}}
columns:
  uid:   {{type: int, usage: hidden}}
  city:  {{type: category}}
  value: {{type: int, bounds: [0, 1000]}}
roles: {{analyst: [query]}}
"""
    )
)
TARGET = 5


def bounded_rows(engine: DuckDBEngine) -> Counter[tuple[Any, ...]]:
    query = exp.select("uid", "city", "value").from_(exp.table_("bounded_feed", quoted=True))
    return Counter(engine.rows(query))


def others(rows: Counter[tuple[Any, ...]]) -> Counter[tuple[Any, ...]]:
    """The rows of every unit but the target's (here the only rows without a readable unit are the target's)."""
    return Counter({r: n for r, n in rows.items() if r[0] not in {TARGET, None}})


def feed(root: Path, batches: list[str], *, with_target: bool) -> Counter[tuple[Any, ...]] | str:
    """Register the first batch and append the others (CSV text, one line a row, the target's lines marked by a
    leading `T:`), the target's rows kept or removed; the bounded rows of the last version, or the refusal."""
    root.mkdir()
    (root / "key").write_text("cd" * 32)  # the same bounding key for both feeds
    files = []
    for i, text in enumerate(batches):
        lines = [
            line.removeprefix("T:")
            for line in text.splitlines(keepends=True)
            if with_target or not line.startswith("T:")
        ]
        path = root / f"b{i}.csv"
        path.write_bytes("".join(lines).encode())
        files.append(path)
    engine = DuckDBEngine(root / "db.duckdb", root / "key", read_only=False)
    try:
        engine.register(POLICY, files[0])
        for path in files[1:]:
            engine.append("feed", path)
        return bounded_rows(engine)
    except CatalogError as exc:
        return f"refused: {exc}"
    finally:
        engine.close()


def paris(units: range) -> str:
    return "".join(f'{u},"Paris",{u % 7}\n' for u in units)


@pytest.mark.parametrize(
    "target_line",
    [
        '5,"Paris,3\n',  # an opening quote that never closes: the sniffer chose "no quoting" for the whole file
        "#5,Paris,3\n",  # a line that looks like a comment
    ],
)
def test_one_units_csv_line_does_not_change_how_the_other_rows_of_its_batch_are_read(
    tmp_path: Path, target_line: str
) -> None:
    """DuckDB's CSV sniffer picks the dialect (quote, escape, comment, rows to skip) from the file's contents, so
    one unit's odd line could switch it for the whole batch: every other unit's `"Paris"` read as the text with its
    quotes (a COUNT of Paris rows going from 3,000 to 0). The dialect is fixed, so that line is either read on its
    own or the batch is refused as a whole; the other units' rows never change."""
    batches = [
        "uid,city,value\n" + paris(range(1, 3001)),
        "uid,city,value\nT:" + target_line + paris(range(3001, 6001)),
    ]
    full = feed(tmp_path / "full", batches, with_target=True)
    neighbour = feed(tmp_path / "neighbour", batches, with_target=False)
    assert not isinstance(neighbour, str), neighbour
    assert neighbour[(3001, "Paris", 3001 % 7)] == 1
    if isinstance(full, str):
        assert full.startswith("refused: cannot read b1.csv"), full  # refused whole, at the admin
        return
    assert others(full) == others(neighbour)
    assert sum(n for r, n in full.items() if r[0] in {TARGET, None}) <= K


def test_the_same_at_registration(tmp_path: Path) -> None:
    batches = ['uid,city,value\nT:5,"Paris,3\n' + paris(range(1, 3001))]
    full = feed(tmp_path / "full", batches, with_target=True)
    neighbour = feed(tmp_path / "neighbour", batches, with_target=False)
    assert not isinstance(neighbour, str), neighbour
    assert isinstance(full, str) or others(full) == others(neighbour)
