"""Appends while serving: each batch is a new immutable version, bounding holds over all versions together, a
crashed append is invisible and a rerun completes it, and requests read (and may pin) exactly one version."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.engines.duckdb import DuckDBEngine
from gateway.engines.versions import VersionStore
from gateway.http.app import create_app
from gateway.service import Bastion
from gateway.settings import Settings
from policies.errors import VersionNotFound, VersionRetired
from policies.schema import parse_policy
from tests.conftest import BIN, AppClient, Workspace, gateways

K = 2
POLICY_YAML = f"""
dataset: feed
privacy_unit: uid
max_rows_per_unit: {K}
budget: {{per_principal: {{epsilon: 100000}}, total: {{epsilon: 1000000}}}}
columns:
  uid:   {{type: int, usage: hidden}}
  value: {{type: int, bounds: [0, 1000]}}
roles: {{analyst: [query]}}
"""
POLICY = parse_policy(yaml.safe_load(POLICY_YAML))


def write_batch(path: Path, rows: list[tuple[int, int]]) -> Path:
    path.write_text("uid,value\n" + "".join(f"{u},{v}\n" for u, v in rows))
    return path


def kept(engine: Any) -> list[tuple[int, int, int]]:
    """(uid, value, row id) of every row of the bounded table as the reader sees it."""
    from sqlglot import exp

    query = exp.select("uid", "value", "__row_id").from_(exp.table_("bounded_feed", quoted=True))
    return sorted(engine.rows(query))


def new_engine(root: Path, first: Path) -> DuckDBEngine:
    admin = DuckDBEngine(root / "db.duckdb", root / "key", read_only=False)
    admin.register(POLICY, first)
    admin.close()
    return DuckDBEngine(root / "db.duckdb", root / "key", read_only=True)


# --- bounding over versions --------------------------------------------------------------------------------------


def test_a_unit_keeps_at_most_k_rows_over_all_versions_and_earlier_rows_stay(tmp_path: Path) -> None:
    # Unit 1 has 2 rows in every batch, unit 2 one row per batch, unit 100+i only in batch i.
    batches = [[(1, 10 * i + 1), (1, 10 * i + 2), (2, 10 * i + 3), (100 + i, 5)] for i in range(6)]
    engine = new_engine(tmp_path, write_batch(tmp_path / "b0.csv", batches[0]))
    history = [kept(engine)]
    for i, batch in enumerate(batches[1:], start=1):
        version, added = engine.append("feed", write_batch(tmp_path / f"b{i}.csv", batch))
        assert added and version.serial == i + 1
        history.append(kept(engine))
    for before, after in zip(history, history[1:], strict=False):
        assert set(before) <= set(after)  # rows kept before stay kept, with the same row ids
    final = history[-1]
    per_unit = Counter(u for u, _, _ in final)
    assert per_unit[1] == K and per_unit[2] == K  # in total over six batches, not per batch
    assert {u for u in per_unit if u >= 100} == {100 + i for i in range(6)}  # new units always get their rows
    assert max(per_unit.values()) <= K
    # Unit 1's two rows are both from the first batch (kept there, so later batches give it nothing); unit 2's
    # second row comes from the second batch.
    assert sorted(v for u, v, _ in final if u == 1) == [1, 2]
    assert sorted(v for u, v, _ in final if u == 2) == [3, 13]
    assert len({r for _, _, r in final}) == len(final)  # row ids unique over versions
    # Every version stays readable as it was.
    for version, rows in zip(engine.versions("feed"), history, strict=True):
        assert kept(engine.at({"feed": version.version})) == rows
    engine.close()


def test_the_rows_a_unit_keeps_from_a_batch_depend_on_that_unit_only(tmp_path: Path) -> None:
    """Neighbouring feeds (one unit's rows removed from every batch) keep the same rows of every other unit."""
    rng = range(40)
    batches = [[(u, (u * 7 + 3 * b + j) % 1000) for u in rng for j in range((u + b) % 3)] for b in range(3)]
    out = []
    for name, drop in (("full", None), ("neighbour", 5)):
        root = tmp_path / name
        root.mkdir()
        (root / "key").write_text("ab" * 32)  # the same bounding key for both
        rows = [[r for r in b if r[0] != drop] for b in batches]
        engine = new_engine(root, write_batch(root / "b0.csv", rows[0]))
        for i, b in enumerate(rows[1:], start=1):
            engine.append("feed", write_batch(root / f"b{i}.csv", b))
        out.append(Counter((u, v) for u, v, _ in kept(engine)))
        engine.close()
    full, neighbour = out
    assert {k: n for k, n in full.items() if k[0] != 5} == neighbour
    assert 0 < sum(n for k, n in full.items() if k[0] == 5) <= K


# --- versions ----------------------------------------------------------------------------------------------------


def test_versions_are_counters_with_time_and_row_class_and_a_batch_is_added_once(tmp_path: Path) -> None:
    first = write_batch(tmp_path / "b0.csv", [(u, u) for u in range(12)])
    engine = new_engine(tmp_path, first)
    batch = write_batch(tmp_path / "b1.csv", [(u, u) for u in range(100, 250)])
    version, added = engine.append("feed", batch)
    again, added_again = engine.append("feed", batch)
    assert added and not added_again and again == version  # a rerun of a completed append adds nothing
    listed = [v.public() for v in engine.versions("feed")]
    assert [v["rows"] for v in listed] == ["10-99", "100-999"]
    assert [int(v["version"].split("-")[0]) for v in listed] == [1, 2]
    assert all(re.fullmatch(r"\d+-[0-9a-f]{8}", v["version"]) for v in listed)
    assert set(listed[0]) == {"version", "time", "rows", "retired"}  # the batch digest and file are not shown
    assert engine.policy("feed")[1] == version.version
    engine.close()
    # A new registration replaces the appended versions; its serial goes on after theirs.
    admin = DuckDBEngine(tmp_path / "db.duckdb", tmp_path / "key", read_only=False)
    replaced = admin.register(POLICY, first)
    assert replaced.startswith("3-") and [v.version for v in admin.versions("feed")] == [replaced]
    assert sorted(p.name for p in VersionStore(tmp_path / "db.duckdb.versions").folder("feed").iterdir()) == [".lock"]
    admin.close()


def test_retire_and_pinning(tmp_path: Path) -> None:
    engine = new_engine(tmp_path, write_batch(tmp_path / "b0.csv", [(1, 1)]))
    v1 = engine.versions("feed")[0].version
    v2, _ = engine.append("feed", write_batch(tmp_path / "b1.csv", [(2, 2)]))
    assert kept(engine.at({"feed": v1})) == [(1, 1, 1)]
    engine.retire("feed", v1)
    with pytest.raises(VersionRetired, match="retired"):
        engine.at({"feed": v1})
    with pytest.raises(VersionNotFound):
        engine.at({"feed": "9-00000000"})
    with pytest.raises(Exception, match="only version"):
        engine.retire("feed", v2.version)  # the last one not retired
    assert [v.retired for v in engine.versions("feed")] == [True, False]
    assert len(kept(engine)) == 2  # the retired version's rows are still in the later version
    engine.close()


# --- crashes -----------------------------------------------------------------------------------------------------


def test_an_append_that_fails_midway_is_invisible_and_a_rerun_completes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = new_engine(tmp_path, write_batch(tmp_path / "b0.csv", [(1, 1), (2, 2)]))
    before = kept(engine)
    batch = write_batch(tmp_path / "b1.csv", [(3, 3), (4, 4)])
    folder = engine.versions_store.folder("feed")

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("injected")

    # 1. while the version file is being written
    import gateway.engines.recipe as recipe

    original = recipe.ranked_query
    monkeypatch.setattr(recipe, "ranked_query", crash)
    with pytest.raises(OSError, match="injected"):
        engine.append("feed", batch)
    monkeypatch.setattr(recipe, "ranked_query", original)
    # 2. after the file is complete, before the manifest lists it
    monkeypatch.setattr(VersionStore, "publish", crash)
    with pytest.raises(OSError, match="injected"):
        engine.append("feed", batch)
    monkeypatch.undo()
    assert len(engine.versions("feed")) == 1 and kept(engine) == before
    assert any(p.suffix == ".duckdb" for p in folder.iterdir())  # what the failed appends left
    version, added = engine.append("feed", batch)
    assert added and version.serial == 2
    assert [p.name for p in folder.iterdir() if p.suffix == ".duckdb"] == [version.file]  # leftovers swept
    assert len(kept(engine)) == 4
    engine.close()


ROWS = 150_000
KILLED_APPEND = """
import sys
import threading
from gateway.engines.duckdb import DuckDBEngine
engine = DuckDBEngine(sys.argv[1], sys.argv[2], read_only=True)
print(engine.append("feed", sys.argv[3])[0].version, flush=True)
"""


def test_kill_9_at_several_points_leaves_a_consistent_store_and_the_rerun_completes(tmp_path: Path) -> None:
    engine = new_engine(tmp_path, write_batch(tmp_path / "b0.csv", [(u, u % 1000) for u in range(1000)]))
    base_rows = kept(engine)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    args = [str(tmp_path / "db.duckdb"), str(tmp_path / "key")]
    seen_states = set()
    for i, delay in enumerate([0.05, 0.3, 0.6, 0.9, 1.2, 1.6]):
        units = range(100_000 * (i + 1), 100_000 * (i + 1) + ROWS)
        batch = write_batch(tmp_path / f"k{i}.csv", [(u, (u * 3) % 1000) for u in units])
        before = [v.version for v in engine.versions("feed")]
        proc = subprocess.Popen([sys.executable, "-c", KILLED_APPEND, *args, str(batch)], env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        after = [v.version for v in engine.versions("feed")]
        # Either nothing or exactly the whole version became visible; every listed version reads.
        assert after == before or (after[:-1] == before and len(after) == len(before) + 1)
        seen_states.add(len(after) > len(before))
        print(f"kill after {delay}s: version published {len(after) > len(before)}")
        for v in after:
            assert kept(engine.at({"feed": v}))
        rerun = subprocess.run(
            [sys.executable, "-c", KILLED_APPEND, *args, str(batch)], env=env, capture_output=True, text=True
        )
        assert rerun.returncode == 0, rerun.stderr
        final = [v.version for v in engine.versions("feed")]
        assert len(final) == len(before) + 1 and final[-1] == rerun.stdout.strip()
        rows = kept(engine)
        assert set(base_rows) <= set(rows) and len(rows) == len(base_rows) + ROWS * (i + 1)
    assert False in seen_states  # at least one kill landed before the version was published
    engine.close()


# --- the gateway ------------------------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path) -> tuple[Settings, str]:
    settings = Settings(workspace=tmp_path / "ws")
    settings.save()
    bastion = Bastion(settings, read_only=False)
    try:
        bastion.engine.register(POLICY, write_batch(tmp_path / "b0.csv", [(u, 10) for u in range(1000)]))
        token = bastion.tokens.create("alice", "analyst")[0]
    finally:
        bastion.close()
    return settings, token


def query(client: Any, token: str, sql: str, **extra: Any) -> httpx.Response:
    body = {"sql": sql, "epsilon": 50.0, **extra}
    return client.post("/v1/query", json=body, headers={"Authorization": f"Bearer {token}"})


def test_versions_in_the_api_pinning_cache_retire_and_audit(workspace: tuple[Settings, str], tmp_path: Path) -> None:
    settings, token = workspace
    auth = {"Authorization": f"Bearer {token}"}
    sql = "SELECT COUNT(*) AS n FROM feed"
    with AppClient(create_app(settings)) as client:
        bastion: Bastion = client.app.state.bastion
        v1 = client.get("/v1/datasets/feed/versions", headers=auth).json()
        assert [set(v) for v in v1] == [{"version", "time", "rows", "retired"}]
        first = query(client, token, sql).json()
        assert first["version"] == v1[0]["version"] and not first["cached"]
        v2, _ = bastion.engine.append("feed", write_batch(tmp_path / "b1.csv", [(u, 10) for u in range(1000, 3000)]))
        listed = client.get("/v1/datasets/feed/versions", headers=auth).json()
        assert [v["version"] for v in listed] == [v1[0]["version"], v2.version]
        latest = query(client, token, sql).json()
        assert latest["version"] == v2.version and not latest["cached"]  # a new version is a new release
        pinned = query(client, token, sql, version=v1[0]["version"]).json()
        assert pinned["cached"] and pinned["rows"] == first["rows"]  # the cache keys on the version
        # scale k/ε = 0.04: the counts (1000, 3000) are read from the right version, to well within 1
        assert abs(latest["rows"][0][0] - 3000) < 2 and abs(first["rows"][0][0] - 1000) < 2
        spent = client.get("/v1/budget", headers=auth).json()
        bastion.engine.retire("feed", v1[0]["version"])
        refused = query(client, token, sql, version=v1[0]["version"])
        assert refused.status_code == 410 and refused.json()["error"]["code"] == "version_retired"
        unknown = query(client, token, sql, version="99-00000000")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "version_not_found"
        assert client.get("/v1/budget", headers=auth).json() == spent  # refused before the charge
        assert client.get("/v1/datasets/nope/versions", headers=auth).status_code == 404
        records = [r for r in bastion.audit_log.records() if r.get("event") == "query"]
    released = [r for r in records if r.get("phase") in {"admitted", "released"}]
    assert released and all(r["version"] in {v1[0]["version"], v2.version} for r in released)
    assert {r["version"] for r in released if r["reason"] == "cached"} == {v1[0]["version"]}
    denied = [(r["reason"], r["request"]["version"]) for r in records if r["decision"] == "denied"]
    assert denied == [("version_retired", v1[0]["version"]), ("version_not_found", "99-00000000")]


def bastion_cli(*args: str, settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args, "--workspace", str(settings.workspace)], capture_output=True, text=True, timeout=300
    )


def test_appends_racing_queries_on_two_gateways_read_one_version_each(
    workspace: tuple[Settings, str], tmp_path: Path
) -> None:
    settings, token = workspace
    sizes = {}  # version → rows (each batch adds 1,000 new units with one row each)
    with gateways(2, "--workspace", str(settings.workspace)) as urls:
        stop = time.monotonic() + 600

        def ask(i: int) -> dict[str, Any]:
            with httpx.Client(base_url=urls[i % 2], timeout=60) as client:
                # Distinct SQL per request, so no answer comes from the cache.
                sql = f"SELECT COUNT(*) AS n, SUM(value) AS s FROM feed WHERE value <= {500 + i}"
                response = query(client, token, sql)
                assert response.status_code == 200, response.text
                return response.json()

        appending = threading.Event()
        appending.set()

        def keep_asking(worker: int) -> list[dict[str, Any]]:
            out, i = [], worker
            while appending.is_set() and time.monotonic() < stop:
                out.append(ask(i))
                i += 4
            return out

        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(keep_asking, w) for w in range(4)]
            try:
                for b in range(1, 4):
                    batch = write_batch(tmp_path / f"r{b}.csv", [(u, 10) for u in range(1000 * b, 1000 * (b + 1))])
                    done = bastion_cli("append", "feed", str(batch), settings=settings)
                    assert done.returncode == 0, done.stderr
                    assert "appended to feed: version" in done.stdout
                    time.sleep(1.0)  # let both gateways answer at this version too
            finally:
                appending.clear()
            answers = [a for f in futures for a in f.result()]
            answers += [pool.submit(ask, 100_000 + i).result() for i in range(2)]
        assert time.monotonic() < stop
        listed = json.loads(bastion_cli("version", "list", "feed", "--json", settings=settings).stdout)
    assert len(listed) == 4
    for n, v in enumerate(listed):
        sizes[v["version"]] = 1000 * (n + 1)
    read = Counter(a["version"] for a in answers)
    print("answers per version:", [read[v["version"]] for v in listed])
    assert set(read) <= set(sizes) and answers[-1]["version"] == listed[-1]["version"]
    assert len(read) == 4  # the appends landed while queries were being answered, and every version was read
    for a in answers:
        n, s = a["rows"][0]
        # Laplace scale k/ε' (ε' = 25 per measurement) ≈ 0.08 rows and 0.08·1000 for the sum: 30 scales apart
        assert abs(n - sizes[a["version"]]) < 3, (a["version"], n)
        assert abs(s - 10 * sizes[a["version"]]) < 3 * 1000, (a["version"], s)
    bastion = Bastion(settings)
    try:
        appended = [r for r in bastion.audit_log.records() if r.get("event") == "dataset_appended"]
    finally:
        bastion.close()
    assert [r["request"]["version"] for r in appended] == [v["version"] for v in listed[1:]]


def test_spark_refuses_appends(tmp_path: Path) -> None:
    from gateway.engines.spark import SparkEngine

    settings = Settings(workspace=tmp_path / "ws")
    with pytest.raises(Exception, match="appends run on the DuckDB engine only"):
        SparkEngine(settings).append("feed", tmp_path / "b.csv")


@pytest.fixture
def workspace_demo(tmp_path: Path, demo_source: tuple[Path, Path]) -> Workspace:
    from tests.conftest import ROLES, build_workspace

    data, policy = demo_source
    return build_workspace(tmp_path, [(policy, data)], ROLES)


def test_lf_stats_read_the_pinned_version_and_say_which(workspace_demo: Workspace, tmp_path: Path) -> None:
    from gateway.demo import write_demo
    from tests.lf.test_lf_api import LFS

    ws = workspace_demo
    batch, _ = write_demo(tmp_path / "batch", n_rows=3000, seed=99)
    body = {"dataset": "visits", "lfs": LFS, "epsilon": 1.0}
    headers = ws.headers("lf_author")
    with ws.app() as client:
        bastion: Bastion = client.app.state.bastion
        v1 = bastion.engine.policy("visits")[1]
        v2, added = bastion.engine.append("visits", batch)
        assert added
        latest = client.post("/v1/lf/stats", json=body, headers=headers).json()
        pinned = client.post("/v1/lf/stats", json={**body, "version": v1}, headers=headers).json()
        unknown = client.post("/v1/lf/stats", json={**body, "version": "77-00000000"}, headers=headers)
        records = [r for r in bastion.audit_log.records() if r.get("event") == "lf_stats"]
    assert latest["version"] == v2.version and pinned["version"] == v1
    assert not latest["cached"] and not pinned["cached"]  # two versions, two releases
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "version_not_found"
    admitted = [r["version"] for r in records if r.get("phase") == "admitted"]
    assert admitted == [v2.version, v1]


def test_a_synthesis_job_reads_the_version_it_was_admitted_at(workspace_demo: Workspace, tmp_path: Path) -> None:
    from gateway.demo import write_demo
    from tests.synth.helpers import wait

    ws = workspace_demo
    batch, _ = write_demo(tmp_path / "batch", n_rows=3000, seed=98)
    headers = ws.headers("analyst")
    body = {"dataset": "visits", "epsilon": 1.0, "rows": 200, "seed": 3}
    with ws.app() as client:
        bastion: Bastion = client.app.state.bastion
        v1 = bastion.engine.policy("visits")[1]
        v2, _ = bastion.engine.append("visits", batch)
        pinned = client.post("/v1/synth", json={**body, "version": v1}, headers=headers).json()
        jobs = [wait(client, headers, pinned["job_id"])]  # one unfinished job per principal
        latest = client.post("/v1/synth", json=body, headers=headers).json()
        jobs.append(wait(client, headers, latest["job_id"]))
        assert (pinned["dataset_version"], latest["dataset_version"]) == (v1, v2.version)
        bastion.engine.retire("visits", v1)
        refused = client.post("/v1/synth", json={**body, "seed": 4, "version": v1}, headers=headers)
        records = [r for r in bastion.audit_log.records() if r.get("event") == "synth"]
    assert [j["status"] for j in jobs] == ["done", "done"]
    assert refused.status_code == 410 and refused.json()["error"]["code"] == "version_retired"
    assert [r["version"] for r in records if r.get("phase") == "admitted"] == [v1, v2.version]
