"""Three `bastion serve` replicas on one PostgreSQL store, as real processes on this host sharing one workspace made
by the commands a user runs (`bastion store migrate`, `bastion demo --no-serve`, `bastion token ...`): clients racing
for a budget that fits a known number of queries, the server stopped and started under them, a replica killed with
SIGKILL mid-request and started again, and a token revoked while all three serve.

Replicas on one host that share a workspace share its audit log (appends under an exclusive file lock), so the log
read here is the log of all three; every read of it goes through `_audit`."""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from tests.stores.conftest import PgCluster, PgServer

# Only light modules at the top: the client processes of the race import this module.
BIN = Path(sys.executable).parent / "bastion"
DEMO_ROWS = 3000
CAP = 10.0  # the demo policy's per-principal ε on visits (checked below)
EPSILON = 2.0  # per query
FIT = round(CAP / EPSILON)  # exactly 5 queries fit, with nothing left over
QUERIES = 16
CLIENTS = 8


def _bastion(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [str(BIN), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BASTION_WORKSPACE": "", "BASTION_STORE": "", "COLUMNS": "400"},
    )
    assert out.returncode == 0, f"bastion {' '.join(args[:2])}: {out.stdout}\n{out.stderr}"
    return out


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()


@dataclass
class Site:
    """One workspace on one PostgreSQL store, served by replicas of `bastion serve` on distinct ports."""

    workspace: Path
    store: str
    tokens: dict[str, str]  # role -> token
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes] | None] = field(default_factory=list)

    @classmethod
    def make(cls, root: Path, store: str, replicas: int = 3) -> Site:
        workspace = root / "ws"
        _bastion("store", "migrate", "--store", store)
        _bastion("demo", "--no-serve", "--rows", str(DEMO_ROWS), "--store", store, "--workspace", str(workspace))
        made = json.loads((workspace / "demo-tokens.json").read_text())
        site = cls(workspace, store, {role: t["token"] for role, t in made.items()})
        site.ports = [_free_port() for _ in range(replicas)]
        site.procs = [None] * replicas
        return site

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def headers(self, role: str = "analyst") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def start(self, *which: int) -> None:
        """Start the replicas `which` (all by default) and wait until each answers its health check."""
        which = which or tuple(range(len(self.ports)))
        for i in which:
            log = (self.workspace.parent / f"replica-{i}.log").open("ab")
            self.procs[i] = subprocess.Popen(
                [str(BIN), "serve", "--port", str(self.ports[i]), "--no-access-log"]
                + ["--workspace", str(self.workspace), "--store", self.store],
                stdout=log,
                stderr=log,
                env={**os.environ, "BASTION_WORKSPACE": "", "BASTION_STORE": ""},
            )
            log.close()
        for i in which:
            self._wait(i)

    def _wait(self, i: int) -> None:
        proc = self.procs[i]
        assert proc is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url(i)}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        log = (self.workspace.parent / f"replica-{i}.log").read_text(errors="replace")
        raise AssertionError(f"replica {i} did not start (exit code {proc.poll()}):\n{log[-3000:]}")

    def kill(self, i: int) -> None:
        """SIGKILL: the process ends where it is, with no clean-up of any kind."""
        proc = self.procs[i]
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        self.procs[i] = None

    def stop(self) -> None:
        running = [p for p in self.procs if p is not None]
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        self.procs = [None] * len(self.ports)


@contextlib.contextmanager
def _serving(root: Path, store: str) -> Iterator[Site]:
    site = Site.make(root, store)
    try:
        site.start()
        yield site
    finally:
        site.stop()


@pytest.fixture(scope="module")
def site(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Three replicas on a database of this module's own, for the tests that neither stop the server nor kill a
    replica (the race charges alice, the revocation uses a token of bob's: each checks only its own principal)."""
    name = pg_server.create_database()
    try:
        with _serving(tmp_path_factory.mktemp("replicas"), pg_server.url(name)) as serving:
            yield serving
    finally:
        pg_server.drop_database(name)


def _audit(site: Site) -> list[dict[str, Any]]:
    """The audit records of the site's replicas, once the one log they share in the store verifies: exported in the
    file format and verified strictly, as `bastion audit verify --store ... --strict` does."""
    import tempfile

    from audit.log import AuditLog
    from audit.verify import verify_log
    from gateway.stores.pg_audit import PgAuditLog

    log = PgAuditLog(site.store, key_dir=site.workspace / "keys")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            exported = log.export(Path(tmp) / "audit", durable=False)
            verified = verify_log(exported, site.workspace / "keys", strict=True)
            assert verified.ok, verified.message
            records = AuditLog(exported, key_dir=Path(tmp) / "keys").records()
    finally:
        log.close(seal=False)
    # The demo's registration has a monitoring report (set-up, charged to the monitor): not the replicas' traffic.
    return [r for r in records if r["event"] != "monitoring_report"]


def _ids(records: list[dict[str, Any]], **match: str) -> list[str]:
    """The request ids of the records whose fields have the values in `match`."""
    return [r["request_id"] for r in records if all(r.get(k) == v for k, v in match.items())]


def _ledger(store: str) -> tuple[list[dict[str, Any]], dict[tuple[str, str], tuple[int, int, int]]]:
    """Every charge of the shared ledger and its totals in exact units."""
    from gateway.stores.pg import PgLedger

    ledger = PgLedger(store)
    try:
        # Without the monitor's charge for the demo registration's report (set-up, not the replicas' traffic).
        history = [c for c in ledger.history() if c["principal"] != "bastion:monitoring"]
        totals = {k: v for k, v in ledger.totals().items() if k[0] != "bastion:monitoring"}
        return history, totals
    finally:
        ledger.close()


def _units(epsilon: float) -> int:
    from policies.accountant import PrivacyLoss

    return PrivacyLoss(epsilon).units(round_up=True)[0]


def _logged_units(records: list[dict[str, Any]], principal: str) -> int:
    """ε units the log shows charged to `principal`: its "admitted" records and the orphan charges recorded for it."""
    return sum(
        _units(r["cost"]["epsilon"])
        for r in records
        if r.get("actor", {}).get("principal") == principal
        and (r.get("phase") == "admitted" or r.get("event") == "orphan_charge")
    )


def _sql(k: int) -> str:
    return f"SELECT COUNT(*) AS n FROM visits WHERE age >= {k}"


def _post(client: httpx.Client, url: str, sql: str, epsilon: float, correlation: str) -> dict[str, Any]:
    """One query; what the client received: status, the gateway's request id, the body."""
    reply = client.post(
        f"{url}/v1/query", json={"sql": sql, "epsilon": epsilon}, headers={"X-Request-Id": correlation}, timeout=60
    )
    return {"status": reply.status_code, "request_id": reply.headers.get("x-request-id"), "body": reply.json()}


def _race_client(jobs: list[tuple[str, str, str]], token: str, go: Any, out: Any) -> None:
    """A client process: waits for the others, then sends its queries (url, sql, correlation id) one after another."""
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as client:
        go.wait(120)
        for url, sql, correlation in jobs:
            out.put({"correlation": correlation, **_post(client, url, sql, EPSILON, correlation)})


def test_clients_racing_through_three_replicas_never_overspend(site: Site) -> None:
    """Eight client processes send sixteen distinct queries at once through three replicas, against a budget that
    fits exactly five: five answers, eleven refusals, the ledger holds exactly the admitted costs, and the log has a
    "released" record for every answer and none for a refusal."""
    from policies.schema import load_policy

    assert load_policy(site.workspace / "policies" / "visits.yaml").budget.per_principal.epsilon == CAP
    ctx = mp.get_context("spawn")
    go, out = ctx.Barrier(CLIENTS), ctx.Queue()
    jobs = [(site.url(q % 3), _sql(q), f"race-{q}") for q in range(QUERIES)]
    procs = [
        ctx.Process(target=_race_client, args=(jobs[c::CLIENTS], site.tokens["analyst"], go, out))
        for c in range(CLIENTS)
    ]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in range(QUERIES)]
    for p in procs:
        p.join(30)
    records = [r for r in _audit(site) if r.get("actor", {}).get("principal") == "alice"]
    assert sorted(g["correlation"] for g in got) == sorted(f"race-{q}" for q in range(QUERIES))  # each sent once
    answered = [g for g in got if g["status"] == 200]
    refused = [g for g in got if g["status"] != 200]
    assert len(answered) == FIT, [(g["status"], g["body"]) for g in got]
    assert all(g["body"]["rows"] and g["body"]["epsilon_spent"] == EPSILON for g in answered)
    assert {(g["status"], g["body"]["error"]["code"]) for g in refused} == {(429, "budget_exhausted")}
    assert all("rows" not in g["body"] for g in refused)

    history, totals = _ledger(site.store)
    history = [h for h in history if h["principal"] == "alice"]
    admitted_units = sum(_units(g["body"]["epsilon_spent"]) for g in answered)
    assert totals[("alice", "visits")] == (admitted_units, 0, 0) and admitted_units == _units(CAP)
    assert sorted(h["request_id"] for h in history) == sorted(g["request_id"] for g in answered)
    assert all(h["audited"] for h in history)

    released = _ids(records, phase="released")
    assert sorted(released) == sorted(g["request_id"] for g in answered)  # every answer, once; no refusal
    assert sorted(_ids(records, phase="refused")) == sorted(g["request_id"] for g in refused)
    assert _logged_units(records, "alice") == admitted_units
    # The client's own X-Request-Id is kept as the records' correlation id.
    by_id = {r["request_id"]: r.get("correlation_id") for r in records if r.get("phase") in {"released", "refused"}}
    assert {by_id[g["request_id"]] for g in got} == {g["correlation"] for g in got}


def test_the_store_stopped_under_three_replicas(tmp_path: Path, pg_cluster: PgCluster) -> None:
    """While the server is down every request to every replica answers 503 and nothing is released (a repeat of an
    answered query included: the release cache fails closed); started again, every replica answers and charges again
    within a few seconds, and the log verifies."""
    from gateway.stores.pg import POOL_TIMEOUT, RECONNECT_SECONDS

    server = pg_cluster.server
    store = server.url(server.create_database())
    with _serving(tmp_path, store) as site, httpx.Client(headers=site.headers()) as client:
        before = [_post(client, site.url(i), _sql(i), 0.5, f"before-{i}") for i in range(3)]
        assert [b["status"] for b in before] == [200] * 3, before

        pg_cluster.stop()  # the audit log is in the store too: what was released meanwhile is read once it is back
        asks = [(site.url(i), _sql(10 + i), f"down-{i}") for i in range(3)]
        asks += [(site.url((i + 1) % 3), _sql(i), f"repeat-{i}") for i in range(3)]  # answered before, elsewhere
        with ThreadPoolExecutor(len(asks)) as pool:  # each waits POOL_TIMEOUT for a connection: wait at once
            during = list(pool.map(lambda a: _post(client, a[0], a[1], 0.5, a[2]), asks))
            budget = list(pool.map(lambda i: client.get(f"{site.url(i)}/v1/budget", timeout=60), range(3)))
        assert [d["status"] for d in during] == [503] * len(asks), during
        assert {d["body"]["error"]["code"] for d in during} == {"ledger_unavailable"}
        assert all("rows" not in d["body"] for d in during)
        assert [b.status_code for b in budget] == [503] * 3

        pg_cluster.start()
        restarted = time.monotonic()
        after: list[dict[str, Any]] = []
        for i in range(3):
            k = 20 + i
            while not after or after[-1]["status"] != 200:
                assert time.monotonic() - restarted < RECONNECT_SECONDS + 2 * POOL_TIMEOUT, after
                after.append(_post(client, site.url(i), _sql(k), 0.5, f"after-{k}"))
                k += 3
            if i < 2:
                after.append({"status": 0})  # the next replica's first try
        after = [a for a in after if a["status"]]
        assert {a["status"] for a in after} <= {200, 503}
        repeat = _post(client, site.url(2), _sql(0), 0.5, "repeat-after")
        assert repeat["status"] == 200 and repeat["body"]["cached"] is True
        assert repeat["body"]["rows"] == before[0]["body"]["rows"]
        records = _audit(site)
    answered = before + [a for a in after if a["status"] == 200]
    # Exactly the answers have "released" records: none of the requests made while the store was down.
    assert set(_ids(records, phase="released")) == {a["request_id"] for a in [*answered, repeat]}
    assert not {d["request_id"] for d in during} & set(_ids(records, phase="admitted"))
    _, totals = _ledger(store)
    assert totals == {("alice", "visits"): (_units(0.5) * len(answered), 0, 0)}
    assert _logged_units(records, "alice") == _units(0.5) * len(answered)


def _stream(
    site: Site, i: int, stop: threading.Event, got: list[dict[str, Any]], lock: threading.Lock, ks: Iterator[int]
) -> None:
    """Distinct queries to replica `i`, one after another, until `stop` or until the replica is gone."""
    with httpx.Client(headers=site.headers()) as client:
        while not stop.is_set():
            with lock:
                k = next(ks)
            try:
                reply = _post(client, site.url(i), _sql(k), 0.01, f"crash-{k}")
            except httpx.ConnectError:
                return  # the replica is gone
            except httpx.HTTPError:  # killed mid-request: the client received nothing
                reply = {"status": None, "correlation": f"crash-{k}"}
            with lock:
                got.append(reply)


def test_replicas_killed_mid_request_lose_no_charge(tmp_path: Path, pg_store: str) -> None:
    """One replica is killed with SIGKILL while four clients query it, and started again, three times (the other two
    serve meanwhile): every charge in the ledger ends up recorded in the log, as "admitted" by the replica that made
    it or as an "orphan_charge" by the start-up after the kill; every answer a client received has its "released"
    record; the ledger never shows less spend than the log (on one shared log, exactly as much)."""
    got: list[dict[str, Any]] = []
    lock, ks = threading.Lock(), itertools.count(1000)  # every query new: charged, never a cached answer
    with _serving(tmp_path, pg_store) as site:
        for round_ in range(3):
            victim = round_ % 3
            stop = threading.Event()
            targets = [victim] * 4 + [(victim + 1) % 3]  # four clients on the victim, one on another replica
            clients = [threading.Thread(target=_stream, args=(site, i, stop, got, lock, ks)) for i in targets]
            for t in clients:
                t.start()
            time.sleep(random.uniform(0.8, 1.5))
            site.kill(victim)
            stop.set()
            for t in clients:
                t.join(60)
            site.start(victim)  # its start-up takes over the charges its dead predecessor left pending
        records = _audit(site)
        history, totals = _ledger(pg_store)
    answered = [g for g in got if g["status"] == 200]
    cut = [g for g in got if g["status"] is None]
    assert answered and cut, (len(answered), len(cut))  # some requests were in flight when their replica died
    assert all(g["status"] in {200, 503, None} for g in got), {g["status"] for g in got}
    charged = [h["request_id"] for h in history]
    recorded = set(_ids(records, phase="admitted")) | set(_ids(records, event="orphan_charge"))
    assert set(charged) <= recorded, set(charged) - recorded
    assert len(set(charged)) == len(charged) and all(h["audited"] for h in history)
    assert {g["request_id"] for g in answered} <= set(_ids(records, phase="released"))
    assert {g["request_id"] for g in answered} <= set(charged)
    logged = _logged_units(records, "alice")
    assert totals[("alice", "visits")][0] >= logged
    assert totals == {("alice", "visits"): (logged, 0, 0)}  # one log shared by the replicas: nothing counted twice


def test_a_token_revoked_while_three_replicas_serve(site: Site) -> None:
    """A token revoked with `bastion token revoke --store` while three replicas serve it is refused (401) by each of
    them from the first request after the command returns: its state is read on every request, never cached, so
    "within a second" is the time of one request."""
    args = ["--store", site.store, "--workspace", str(site.workspace)]
    token = _bastion("token", "create", "--role", "analyst", "--name", "bob", *args).stdout.strip()
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        assert [client.get(f"{site.url(i)}/v1/budget").status_code for i in range(3)] == [200] * 3
        _bastion("token", "revoke", "bob", *args)
        with ThreadPoolExecutor(3) as pool:
            after = list(pool.map(lambda i: client.get(f"{site.url(i)}/v1/budget"), range(3)))
    assert [a.status_code for a in after] == [401] * 3
    assert {a.json()["error"]["code"] for a in after} == {"unauthorized"}
    records = _audit(site)
    assert [r["request"]["name"] for r in records if r["event"] == "token_revoked"] == ["bob"]
    denied = [r for r in records if r.get("reason") == "token_revoked"]
    assert denied and {r["actor"]["principal"] for r in denied} == {"bob"}
