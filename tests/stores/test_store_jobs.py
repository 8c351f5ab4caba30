"""Synthesis jobs and labeling-function outputs shared by replicas: two gateways on one store (SQLite files on one
workspace, or one PostgreSQL store with a workspace each) and one shared directory. A job submitted through one is
listed, read and downloaded through the other; the per-principal cap counts the jobs of both; a job whose runner
process is killed is resumed by the other under its one charge, reusing the DP model already stored; label outputs
land in the shared directory."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import shutil
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest

from audit import keys
from audit.log import AuditLog
from gateway.http.app import create_app
from gateway.settings import Settings
from gateway.stores import pg
from gateway.stores.base import open_job_store
from gateway.stores.pg_jobs import PgJobStore
from gateway.stores.pg_tokens import PgTokenStore
from gateway.synth_jobs import SynthJobs
from tests.conftest import BIN, AppClient, Workspace
from tests.lf.test_lf_api import LFS
from tests.stores.conftest import pg_records
from tests.synth.helpers import variant_workspace, wait

BODY = {"dataset": "visits", "rows": 200, "method": "dpcopula_direct"}


@dataclass
class Replicas:
    one: Settings
    two: Settings
    shared: Path
    tokens: dict[str, str]
    store: str | None  # the PostgreSQL address, or None for the workspace's SQLite files

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def records(self) -> list[dict[str, Any]]:
        """The audit records of both replicas: the one log in the store, or the one host's file log."""
        if self.store is not None:
            return pg_records(self.store, self.one.keys_dir)
        return AuditLog(self.one.audit_dir).records()


@pytest.fixture
def replicas(store_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Replicas:
    """Two replicas' settings with one shared directory: on SQLite, two gateways on one workspace (one host); on
    PostgreSQL, each its own workspace (the second a copy of the first's registered data and signing key, as the
    README says to install replicas; the audit log is the store's)."""
    shared = tmp_path / "shared"
    if store_kind == "sqlite":
        ws: Workspace = request.getfixturevalue("workspace")
        one = ws.settings.model_copy(update={"shared_dir": shared})
        return Replicas(one, one, shared, ws.tokens, None)
    ws = request.getfixturevalue("pg_workspace")
    one = ws.settings.model_copy(update={"shared_dir": shared})
    copy = tmp_path / "replica-two"
    if not (one.keys_dir / "signing.key").exists():
        keys.keygen(one.keys_dir)  # `bastion audit keygen`, once, before the keys are copied to every replica
    shutil.copytree(one.workspace, copy, ignore=shutil.ignore_patterns("audit", "sessions"))
    assert (copy / "keys").is_dir()  # one signing key for every replica of the one log
    two = one.model_copy(update={"workspace": copy})
    return Replicas(one, two, shared, ws.tokens, one.store)


def _submit(c: AppClient, h: dict[str, str], epsilon: float) -> Any:
    return c.post("/v1/synth", json={**BODY, "epsilon": epsilon, "seed": 1}, headers=h)


def _spent(c: AppClient, h: dict[str, str]) -> float:
    budget = c.get("/v1/budget", headers=h).json()
    return float(next(b for b in budget if b["dataset"] == "visits")["spent"]["epsilon"])


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_a_job_submitted_through_one_replica_is_served_by_the_other(replicas: Replicas) -> None:
    h = replicas.headers("analyst")
    with AppClient(create_app(replicas.one)) as one, AppClient(create_app(replicas.two)) as two:
        r = _submit(one, h, 0.5)
        assert r.status_code == 200, r.text
        job_id = r.json()["job_id"]
        assert [j["job_id"] for j in two.get("/v1/synth", headers=h).json()] == [job_id]
        done = wait(two, h, job_id)
        assert done["status"] == "done", done
        proxy = two.get(f"/v1/synth/{job_id}/download", headers=h)
        assert proxy.status_code == 200, proxy.text
        frame = pd.read_parquet(io.BytesIO(proxy.content))
        assert len(frame) == 200
        csv = two.get(f"/v1/synth/{job_id}/download", params={"format": "csv"}, headers=h)
        assert csv.status_code == 200 and len(pd.read_csv(io.StringIO(csv.text))) == 200
        report = two.get(f"/v1/synth/{job_id}/report", headers=h)
        assert report.status_code == 200 and report.json()["job"]["job_id"] == job_id
        assert one.get(f"/v1/synth/{job_id}", headers=h).json()["proxy_digest"] == done["proxy_digest"]
        # An identical request through the other replica is the same job, at no cost.
        again = _submit(two, h, 0.5)
        assert again.json()["job_id"] == job_id and again.json()["cached"] is True
        assert _spent(two, h) == pytest.approx(0.5)
        # Another principal's job does not exist for the auditor, on either replica.
        assert two.get(f"/v1/synth/{job_id}", headers=replicas.headers("auditor")).status_code in (403, 404)

    # The job's files are in the shared directory, private to the gateway's user; none in either workspace.
    job_dir = replicas.shared / "synth" / "jobs" / job_id
    assert {"proxy.parquet", "proxy.csv", "report.json", "model.json"} <= {p.name for p in job_dir.iterdir()}
    assert all(_private(p) for p in (replicas.shared, job_dir, *job_dir.rglob("*")))
    for settings in (replicas.one, replicas.two):
        assert not (settings.workspace / "synth").exists()
    # The record: job.json on the file store, the store's table on PostgreSQL (no job.json then).
    if replicas.store is None:
        assert (job_dir / "job.json").exists() and (job_dir / "failed").exists()
    else:
        assert not (job_dir / "job.json").exists()
        with psycopg.connect(replicas.store) as con:
            rows = con.execute("SELECT job_id, principal, status FROM synth_jobs").fetchall()
        assert rows == [(job_id, "alice", "done")]


def test_the_unfinished_job_cap_counts_the_jobs_of_every_replica(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    original = SynthJobs._run

    def held(self: SynthJobs, job: dict[str, Any]) -> None:
        assert gate.wait(120)
        original(self, job)

    monkeypatch.setattr(SynthJobs, "_run", held)
    h = replicas.headers("analyst")
    with AppClient(create_app(replicas.one)) as one, AppClient(create_app(replicas.two)) as two:
        first = _submit(one, h, 0.2)
        assert first.status_code == 200, first.text
        refused = _submit(two, h, 0.3)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs", refused.text
        # At once through both replicas: still none admitted while the first is unfinished.
        answers: list[int] = []
        threads = [
            threading.Thread(target=lambda c=c, e=e: answers.append(_submit(c, h, e).status_code))
            for c, e in ((one, 0.31), (two, 0.32), (one, 0.33), (two, 0.34))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert answers == [429] * 4
        assert _spent(one, h) == pytest.approx(0.2)  # the refused jobs were not charged
        gate.set()
        assert wait(two, h, first.json()["job_id"])["status"] == "done"
        # Once it is done, one more fits; of several at once through both replicas, exactly one is admitted.
        gate.clear()
        answers.clear()
        threads = [
            threading.Thread(target=lambda c=c, e=e: answers.append(_submit(c, h, e).status_code))
            for c, e in ((one, 0.41), (two, 0.42), (one, 0.43), (two, 0.44))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(answers) == [200, 429, 429, 429]
        gate.set()
        for job in two.get("/v1/synth", headers=h).json():
            assert wait(one, h, job["job_id"])["status"] == "done"
        assert len(one.get("/v1/synth", headers=h).json()) == 2
    denials = [r for r in replicas.records() if r.get("event") == "synth" and r.get("reason") == "too_many_jobs"]
    assert len(denials) == 8  # every refusal audited by the replica that refused it


def _submit_then_die(settings_json: str, token: str, out: Any) -> None:
    """A replica that admits a job, measures and stores its DP model, and is killed while it samples the proxy."""
    import synth
    from gateway.service import Bastion, Context
    from gateway.synth_jobs import SynthJobs

    def stalled(*_: Any, **__: Any) -> None:
        out.put("measured")  # the model is stored before the proxy is sampled
        time.sleep(600)

    synth.dp_proxy = stalled
    bastion = Bastion(Settings.model_validate_json(settings_json))
    jobs = SynthJobs(bastion)
    ctx = Context(bastion.authenticate(token), source="replica-one")
    job = jobs.submit(ctx, "visits", epsilon=0.5, rows=200, seed=3, method="dpcopula_direct")
    out.put(job["job_id"])
    time.sleep(600)


def test_a_job_whose_runner_is_killed_is_resumed_by_the_other_replica(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(
        target=_submit_then_die, args=(replicas.one.model_dump_json(), replicas.tokens["analyst"], out), daemon=True
    )
    p.start()
    try:
        got = {out.get(timeout=180), out.get(timeout=180)}
    finally:
        p.kill()
        p.join(30)
    got.discard("measured")
    (job_id,) = got
    model = replicas.shared / "synth" / "jobs" / job_id / "model.json"
    stored = model.read_bytes()

    import synth

    measured: list[str] = []
    monkeypatch.setattr(synth, "measure", lambda *a, **k: measured.append("again"))  # must not be called
    left = open_job_store(replicas.two)
    try:
        assert (left.read(job_id) or {}).get("status") == "running"  # as the dead replica left it
    finally:
        left.close()
    h = replicas.headers("analyst")
    with AppClient(create_app(replicas.two)) as two:
        done = wait(two, h, job_id, timeout=60)
        assert done["status"] == "done", done
        assert two.get(f"/v1/synth/{job_id}/download", headers=h).status_code == 200
        assert _spent(two, h) == pytest.approx(0.5)  # one charge, the original
    assert measured == [] and model.read_bytes() == stored  # the stored DP model was reused, not measured again
    completed = [r for r in replicas.records() if r.get("event") == "synth" and r.get("phase") == "completed"]
    assert len(completed) == 1 and completed[0]["request"]["job_id"] == job_id


def test_a_serving_replica_resumes_a_dead_runners_job_without_a_request(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica two serves before replica one's runner dies: its sweep takes the job up with nobody asking."""
    import gateway.http.synth as http_synth

    monkeypatch.setattr(http_synth, "SWEEP_SECONDS", 0.5)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with AppClient(create_app(replicas.two)):  # serving, and asked nothing below
        p = ctx.Process(
            target=_submit_then_die, args=(replicas.one.model_dump_json(), replicas.tokens["analyst"], out), daemon=True
        )
        p.start()
        try:
            got = {out.get(timeout=180), out.get(timeout=180)}
        finally:
            p.kill()
            p.join(30)
        got.discard("measured")
        (job_id,) = got
        store = open_job_store(replicas.two)
        try:
            deadline = time.monotonic() + 90
            while (store.read(job_id) or {}).get("status") != "done":
                assert time.monotonic() < deadline, store.read(job_id)
                time.sleep(0.2)
        finally:
            store.close()
    completed = [r for r in replicas.records() if r.get("event") == "synth" and r.get("phase") == "completed"]
    assert len(completed) == 1 and completed[0]["request"]["job_id"] == job_id
    resumed = [r for r in replicas.records() if r.get("event") == "synth" and r.get("phase") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["request"]["job_id"] == job_id  # the takeover is on the record
    assert resumed[0]["actor"]["principal"] == completed[0]["actor"]["principal"]


def test_a_failed_job_stays_failed_for_every_replica(replicas: Replicas, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[str] = []

    def fails(self: SynthJobs, job: dict[str, Any]) -> None:
        runs.append(job["job_id"])
        job.update(status="running")
        self._save(job)
        raise RuntimeError("boom")

    monkeypatch.setattr(SynthJobs, "_run", fails)
    h = replicas.headers("analyst")
    with AppClient(create_app(replicas.one)) as one:
        job_id = _submit(one, h, 0.2).json()["job_id"]
        failed = wait(one, h, job_id, timeout=30)
        assert failed["status"] == "failed" and "the charge stands" in failed["error"]
    with AppClient(create_app(replicas.two)) as two:
        assert two.get(f"/v1/synth/{job_id}", headers=h).json()["status"] == "failed"
        assert two.get("/v1/synth", headers=h).json()[0]["status"] == "failed"
        time.sleep(0.5)
        assert _submit(two, h, 0.3).status_code == 200  # a failed job is not unfinished
    assert runs[0] == job_id and runs.count(job_id) == 1  # not resumed


def test_label_outputs_go_to_the_shared_directory(workspace: Workspace, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    settings = workspace.settings.model_copy(update={"shared_dir": shared})
    body = {"dataset": "visits", "lfs": LFS, "epsilon": 1.0, "label_model": True}
    with AppClient(create_app(settings)) as c:
        r = c.post("/v1/lf/stats", json=body, headers=workspace.headers("lf_author"))
        assert r.status_code == 200, r.text
    output = shared / "outputs" / r.json()["label_model"]["output"]
    assert output.exists() and _private(output) and _private(shared)
    assert not (settings.private_dir / "outputs").exists()


def test_a_job_lease_is_held_by_one_process_and_ends_with_its_connection(pg_store: str) -> None:
    one, two = PgJobStore(pg_store), PgJobStore(pg_store)
    job_id = "ab" * 16
    try:
        with one.claim(job_id) as lease:
            assert lease is not None and lease.held()
            with two.claim(job_id) as other:
                assert other is None  # held by the first
            with psycopg.connect(pg_store, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND classid::bigint = %s",
                    (pg._JOB_RUN_LOCK,),
                )
            time.sleep(0.2)
            assert not lease.held()  # its session is gone, and the lock with it
            with two.claim(job_id) as other:
                assert other is not None and other.held()
        with one.claim(job_id) as again:
            assert again is not None
    finally:
        one.close()
        two.close()


def test_a_version_missing_below_the_highest_is_applied_by_migrate(pg_store: str) -> None:
    """Versions are applied by number: a store that has version 4 but lacks an earlier one is refused until
    `migrate` applies the missing one."""
    with psycopg.connect(pg_store, autocommit=True) as con:
        con.execute("DROP TABLE tokens")
        con.execute("DELETE FROM bastion_schema WHERE version = 2")
    with pytest.raises(pg.StoreNotMigrated, match="lacks schema version 2"):
        PgJobStore(pg_store)
    assert pg.migrate(pg_store) == (pg.SCHEMA_VERSION, pg.SCHEMA_VERSION)
    PgJobStore(pg_store).close()
    with psycopg.connect(pg_store) as con:
        assert con.execute("SELECT to_regclass('tokens') IS NOT NULL").fetchone() == (True,)


def _bastion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BASTION_WORKSPACE": "", "BASTION_STORE": "", "BASTION_SHARED_DIR": "", "COLUMNS": "400"},
    )


def test_the_host_commands_approve_a_job_on_the_shared_store(
    tmp_path: Path, demo_source: tuple[Path, Path], pg_store: str
) -> None:
    """`bastion synth pending` and `approve` with the gateway's --store and --shared-dir act on the shared jobs."""
    ws = variant_workspace(
        tmp_path / "optin", demo_source, [("synthesis: {mode: dp}", "synthesis: {mode: non_dp_allowed}")]
    )
    tokens = PgTokenStore(pg_store)
    try:
        token, _ = tokens.create("alice", "analyst")
    finally:
        tokens.close()
    shared = tmp_path / "shared"
    settings = ws.settings.model_copy(update={"store": pg_store, "shared_dir": shared})
    h = {"Authorization": f"Bearer {token}"}
    where = ("-w", str(settings.workspace))
    with AppClient(create_app(settings)) as c:
        body = {"dataset": "visits", "rows": 5_000, "seed": 4, "method": "sdv_gaussian_copula"}
        job_id = c.post("/v1/synth", json=body, headers=h).json()["job_id"]
        alone = _bastion("synth", "pending", *where)  # the workspace's own files: not the shared jobs
        assert alone.returncode == 0 and job_id not in alone.stdout, alone.stderr
        pending = _bastion("synth", "pending", "--store", pg_store, "--shared-dir", str(shared), *where)
        assert pending.returncode == 0 and job_id in pending.stdout, pending.stderr
        approved = _bastion("synth", "approve", job_id, "--store", pg_store, "--shared-dir", str(shared), *where)
        assert approved.returncode == 0, approved.stderr
        assert wait(c, h, job_id)["status"] == "done"
    assert (shared / "synth" / "jobs" / job_id / "proxy.parquet").exists()


def test_a_runner_that_loses_its_lease_stops_and_the_job_is_taken_again(
    pg_workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease's connection ends while the DP model is measured (a server restart, say): the runner stores
    nothing, the job is not failed, and the next look at it takes the lease again and runs it under its charge."""
    import synth

    store = pg_workspace.settings.store
    assert store is not None
    original = synth.measure
    calls: list[int] = []

    def measure_and_lose_the_lease(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            with psycopg.connect(store, autocommit=True) as admin:
                ended = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND classid::bigint = %s",
                    (pg._JOB_RUN_LOCK,),
                ).fetchall()
            assert ended == [(True,)]
        return original(*args, **kwargs)

    monkeypatch.setattr(synth, "measure", measure_and_lose_the_lease)
    settings = pg_workspace.settings.model_copy(update={"shared_dir": tmp_path / "shared"})
    h = pg_workspace.headers("analyst")
    with AppClient(create_app(settings)) as c:
        job_id = _submit(c, h, 0.5).json()["job_id"]
        deadline = time.monotonic() + 30
        while not calls and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        job = c.get(f"/v1/synth/{job_id}", headers=h).json()  # takes the job again
        assert job["status"] in ("queued", "running"), job
        done = wait(c, h, job_id, timeout=60)
        assert done["status"] == "done", done
        assert _spent(c, h) == pytest.approx(0.5)
    assert len(calls) == 2  # the first measurement was never stored, so never released: it is made anew
