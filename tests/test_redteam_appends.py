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


def bounded_rows(engine: Any) -> Counter[tuple[Any, ...]]:
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


def test_a_unit_at_k_gains_nothing_from_later_batches_whatever_form_its_id_takes(tmp_path: Path) -> None:
    """The target has k rows at registration, then appears again: duplicate rows in a CSV batch, its id as ` 5`,
    `5.0` and `05` text in a Parquet batch with its columns reordered and an extra column, and as a float in
    another. Every form converts to the same unit, which keeps its k rows; the other units' rows are the same
    with and without the target, version by version."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def build(root: Path, with_target: bool) -> list[Counter[tuple[Any, ...]]]:
        root.mkdir()
        (root / "key").write_text("ef" * 32)
        reg = [(u, "Paris" if u % 2 else "Lyon", u % 1000) for u in range(1, 501) if u != TARGET]
        b1 = [(u, "Lyon", 7) for u in range(501, 700)]
        b2: list[tuple[Any, str, int]] = [(str(u), "Paris", 3) for u in range(700, 790)]
        b3: list[tuple[Any, str, int]] = [(float(u), "Nice", 10) for u in range(790, 880)]
        if with_target:
            reg += [(TARGET, "Paris", 1000), (TARGET, "Paris", 999)]
            b1 += [(TARGET, "Nice", 1000)] * 3
            b2 += [(" 5", "Nice", 1000), ("5.0", "Nice", 1000), ("05", "Nice", 1000)]
            b3 += [(5.0, "Nice", 1000)]
        (root / "reg.csv").write_text("uid,city,value\n" + "".join(f"{u},{c},{v}\n" for u, c, v in reg))
        (root / "b1.csv").write_text("uid,city,value\n" + "".join(f"{u},{c},{v}\n" for u, c, v in b1))
        columns = {"value": [r[2] for r in b2], "uid": [r[0] for r in b2], "city": [r[1] for r in b2]}
        pq.write_table(pa.table({**columns, "extra": ["x"] * len(b2)}), root / "b2.parquet")
        pq.write_table(
            pa.table({"uid": [r[0] for r in b3], "city": [r[1] for r in b3], "value": [float(r[2]) for r in b3]}),
            root / "b3.parquet",
        )
        engine = DuckDBEngine(root / "db.duckdb", root / "key", read_only=False)
        try:
            engine.register(POLICY, root / "reg.csv")
            for name in ("b1.csv", "b2.parquet", "b3.parquet"):
                engine.append("feed", root / name)
            return [bounded_rows(engine.at({"feed": v.version})) for v in engine.versions("feed")]
        finally:
            engine.close()

    full = build(tmp_path / "full", True)
    neighbour = build(tmp_path / "neighbour", False)
    assert len(full) == len(neighbour) == 4
    for with_target, without in zip(full, neighbour, strict=True):
        assert others(with_target) == others(without) == without
        assert Counter({r: n for r, n in with_target.items() if r[0] == TARGET}) == Counter(
            {(TARGET, "Paris", 1000): 1, (TARGET, "Paris", 999): 1}
        )


@pytest.fixture
def demo_workspace(tmp_path: Path, demo_source: tuple[Path, Path]) -> Any:
    from tests.conftest import ROLES, build_workspace

    data, policy = demo_source
    return build_workspace(tmp_path, [(policy, data)], ROLES)


def test_a_synthesis_job_admitted_before_its_version_is_retired_still_reads_it(
    demo_workspace: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job is charged at admission; retiring its version afterwards (an admin's act: its rows stay in the later
    versions, and its file is kept) failed the job with "the charge stands", a refusal after the charge. The job
    reads the version it was admitted at, retired since or not; only a version a new registration dropped fails."""
    from gateway.demo import write_demo
    from gateway.http.synth import jobs_of
    from gateway.synth_jobs import SynthJobs
    from tests.synth.helpers import wait

    ws = demo_workspace
    batch, _ = write_demo(tmp_path / "batch", n_rows=2000, seed=97)
    headers = ws.headers("analyst")
    with ws.app() as client:
        bastion = client.app.state.bastion
        v1 = bastion.engine.policy("visits")[1]
        bastion.engine.append("visits", batch)
        monkeypatch.setattr(SynthJobs, "_maybe_start", lambda self, job: None)  # admitted, not started yet
        body = {"dataset": "visits", "epsilon": 1.0, "rows": 100, "seed": 5, "version": v1}
        admitted = client.post("/v1/synth", json=body, headers=headers)
        assert admitted.status_code == 200 and admitted.json()["status"] == "queued", admitted.text
        spent = client.get("/v1/budget", headers=headers).json()
        bastion.engine.retire("visits", v1)
        monkeypatch.undo()
        jobs_of(client.app.state, bastion).resume()
        job = wait(client, headers, admitted.json()["job_id"])
        assert job["status"] == "done", job.get("error")
        assert job["dataset_version"] == v1
        assert client.get("/v1/budget", headers=headers).json() == spent  # charged once, at admission
