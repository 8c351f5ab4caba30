"""The audit log as the gateway writes it: tampering caught by `bastion audit verify`, failing closed when the log
cannot be written, two gateway processes sharing one log, and who may read it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from audit import keys
from audit.checkpoint import Checkpoint
from audit.log import AuditLog
from audit.merkle import leaf_hash
from audit.record import canonical
from gateway.http.audit import api, web
from tests.conftest import BIN, Workspace, gateways

SQL = "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex"


def bastion(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BASTION_WORKSPACE": ""},
    )


def verify(workspace: Workspace, *extra: str) -> subprocess.CompletedProcess[str]:
    return bastion("audit", "verify", "--workspace", str(workspace.settings.workspace), *extra)


def _queries(workspace: Workspace, *sqls: str) -> None:
    with workspace.app() as c:
        for sql in sqls:
            c.post("/v1/query", json={"sql": sql, "epsilon": 0.2}, headers=workspace.headers("analyst"))
            c.post("/v1/query", json={"sql": sql, "epsilon": 0.2}, headers=workspace.headers("lf_author"))


@pytest.fixture
def logged(workspace: Workspace) -> Workspace:
    """A log written by the gateway: queries, a checkpoint made with the CLI in between, more queries; the
    gateway checkpoints what is left when it stops."""
    _queries(workspace, SQL, "SELECT COUNT(*) FROM visits", "SELECT MAX(age) FROM visits")
    made = bastion("audit", "checkpoint", "--workspace", str(workspace.settings.workspace))
    assert made.returncode == 0, made.stderr
    _queries(workspace, "SELECT AVG(age) FROM visits", SQL)
    assert verify(workspace).returncode == 0
    return workspace


def _lines(workspace: Workspace) -> list[bytes]:
    return (workspace.settings.audit_dir / "audit.jsonl").read_bytes().splitlines()


def _write(workspace: Workspace, lines: list[bytes]) -> None:
    (workspace.settings.audit_dir / "audit.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))


def _checkpoints(workspace: Workspace) -> list[bytes]:
    return (workspace.settings.audit_dir / "checkpoints.jsonl").read_bytes().splitlines()


def _edit_one_byte(ws: Workspace) -> str:
    lines = _lines(ws)
    line = bytearray(lines[3])
    at = line.index(b'"time":"') + len(b'"time":"2026-01-01T00:00:00.00000')
    line[at] = ord("0") if line[at] != ord("0") else ord("1")
    lines[3] = bytes(line)
    _write(ws, lines)
    return "line 4"


def _delete(ws: Workspace) -> str:
    lines = _lines(ws)
    del lines[3]
    _write(ws, lines)
    return "line 4"


def _swap(ws: Workspace) -> str:
    lines = _lines(ws)
    lines[3], lines[4] = lines[4], lines[3]
    _write(ws, lines)
    return "line 4"


def _insert_forged(ws: Workspace) -> str:
    lines = _lines(ws)
    forged = {**json.loads(lines[3]), "decision": "denied", "reason": "forbidden"}
    forged["prev_hash"] = leaf_hash(lines[2]).hex()  # links correctly to the record before it
    lines.insert(3, canonical(forged))
    _write(ws, lines)
    return "line 4"


def _truncate_after_checkpoint(ws: Workspace) -> str:
    covered = json.loads(_checkpoints(ws)[-1])["tree_size"]
    keep = covered - 3
    _write(ws, _lines(ws)[:keep])
    return f"line {keep + 1}"


def _checkpoint_by_another_key(ws: Workspace) -> str:
    cps = _checkpoints(ws)
    real = Checkpoint.from_dict(json.loads(cps[1]))
    other = keys.generate()
    signer = keys.Signer(keys.key_id_of(other.public_key()), other, (0, 0))
    cps[1] = canonical(Checkpoint.create(real.tree_size, real.root, signer, real.time).to_dict())
    (ws.settings.audit_dir / "checkpoints.jsonl").write_bytes(b"".join(c + b"\n" for c in cps))
    return "checkpoint at line 2 of checkpoints.jsonl"


TAMPERS = {
    "edit one byte": _edit_one_byte,
    "delete a record": _delete,
    "swap two records": _swap,
    "insert a forged record": _insert_forged,
    "truncate after a checkpoint": _truncate_after_checkpoint,
    "checkpoint signed by another key": _checkpoint_by_another_key,
}


@pytest.mark.parametrize("tamper", list(TAMPERS), ids=list(TAMPERS))
def test_verify_detects_tampering_and_names_the_position(logged: Workspace, tamper: str) -> None:
    where = TAMPERS[tamper](logged)
    out = verify(logged)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "BROKEN" in out.stderr and where in out.stderr, out.stderr
    as_json = json.loads(verify(logged, "--json").stdout)
    assert as_json["ok"] is False and as_json["status"] == "tampered"


def test_a_foreign_key_added_to_the_workspace_keyring_is_still_caught(logged: Workspace, tmp_path: Path) -> None:
    own_copy = tmp_path / "auditor-keyring.json"
    shutil.copy(logged.settings.keys_dir / "keyring.json", own_copy)
    _checkpoint_by_another_key(logged)
    forged = Checkpoint.from_dict(json.loads(_checkpoints(logged)[1]))
    other = keys.generate()  # the attacker also rewrites the keyring next to the log
    ring = json.loads((logged.settings.keys_dir / "keyring.json").read_text())
    signer = keys.Signer(keys.key_id_of(other.public_key()), other, (0, 0))
    resigned = Checkpoint.create(forged.tree_size, forged.root, signer, forged.time)
    cps = _checkpoints(logged)
    cps[1] = canonical(resigned.to_dict())
    (logged.settings.audit_dir / "checkpoints.jsonl").write_bytes(b"".join(c + b"\n" for c in cps))
    ring["keys"].append(keys.KeyInfo(signer.key_id, other.public_key()).to_dict())
    (logged.settings.keys_dir / "keyring.json").write_text(json.dumps(ring))
    out = verify(logged)
    assert out.returncode == 1 and "never announced a rotation" in out.stderr, out.stderr
    mine = verify(logged, "--keyring", str(own_copy))
    assert mine.returncode == 1 and "unknown key id" in mine.stderr


def test_trusted_checkpoint_catches_a_rewritten_history(logged: Workspace, tmp_path: Path) -> None:
    ws = str(logged.settings.workspace)
    inside = bastion("audit", "export-checkpoint", str(logged.settings.workspace / "anchor"), "--workspace", ws)
    assert inside.returncode == 1 and "inside the workspace" in inside.stderr
    out = bastion("audit", "export-checkpoint", str(tmp_path / "anchors"), "--workspace", ws)
    assert out.returncode == 0, out.stderr
    anchor = next((tmp_path / "anchors").glob("checkpoint-*.json"))
    size = json.loads(anchor.read_text())["tree_size"]
    assert size == len(_lines(logged))  # the export covers every record, including its own
    # Someone with write access drops the last records and every checkpoint that would give it away.
    _write(logged, _lines(logged)[: size - 4])
    (logged.settings.audit_dir / "checkpoints.jsonl").unlink()
    (logged.settings.audit_dir / "audit.state").unlink(missing_ok=True)
    assert verify(logged).returncode == 0  # the keyless hash chain alone cannot tell
    caught = verify(logged, "--trusted-checkpoint", str(anchor))
    assert caught.returncode == 1 and f"line {size - 3}" in caught.stderr, caught.stderr


def test_admin_commands(logged: Workspace, tmp_path: Path) -> None:
    ws = str(logged.settings.workspace)
    again = bastion("audit", "keygen", "--workspace", ws)
    assert again.returncode == 1 and "rotate-key" in again.stderr
    rotated = bastion("audit", "rotate-key", "--workspace", ws)
    assert rotated.returncode == 0 and "->" in rotated.stdout, rotated.stderr
    assert verify(logged).returncode == 0
    records = AuditLog(logged.settings.audit_dir).records()
    kinds = [r["event"] for r in records]
    assert "key_rotated" in kinds and "checkpoint_requested" in kinds
    rotation = next(r for r in records if r["event"] == "key_rotated")
    assert rotation["actor"]["role"] == "admin"
    assert len(json.loads((logged.settings.keys_dir / "keyring.json").read_text())["keys"]) == 2

    table = bastion("audit", "events", "--workspace", ws, "--actor", "alice", "--decision", "denied")
    assert table.returncode == 0 and "min_max" in table.stdout and "lena" not in table.stdout
    jsonl = bastion("audit", "events", "--workspace", ws, "--event", "query", "--format", "jsonl")
    parsed = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert parsed and {r["event"] for r in parsed} == {"query"}
    csv_out = bastion("audit", "events", "--workspace", ws, "--format", "csv", "--limit", "2")
    assert csv_out.stdout.splitlines()[0].startswith("seq,time,event") and len(csv_out.stdout.splitlines()) == 3
    spend = bastion("audit", "spend", "--workspace", ws, "--format", "json")
    visits = json.loads(spend.stdout)["datasets"]["visits"]
    assert visits["principals"]["alice"]["epsilon"] == pytest.approx(0.6) and visits["cap_epsilon"] == 100.0
    table = bastion("audit", "spend", "--workspace", ws)
    assert table.returncode == 0 and "visits" in table.stdout and "alice" in table.stdout

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    made = bastion("audit", "keygen", "--workspace", str(fresh))
    assert made.returncode == 0 and (fresh / "keys" / "signing.key").stat().st_mode & 0o077 == 0
    assert bastion("audit", "verify", "--workspace", str(fresh)).returncode == 0


def test_fail_closed_when_the_log_cannot_be_written(workspace: Workspace) -> None:
    log = workspace.settings.audit_dir / "audit.jsonl"
    with workspace.app() as c:
        analyst = workspace.headers("analyst")
        ok = c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=analyst)
        assert ok.status_code == 200 and ok.json()["rows"]
        before = c.get("/v1/budget", headers=analyst).json()
        # Mid-run the log file becomes unusable (a directory where the file was): root cannot write it either.
        log.rename(log.with_name("audit.jsonl.saved"))
        log.mkdir()
        for body in (
            {"sql": "SELECT COUNT(*) AS n FROM visits", "epsilon": 0.5},
            {"sql": SQL, "epsilon": 0.5},  # even a cached answer needs its record
            {"sql": "SELECT MAX(age) FROM visits", "epsilon": 1},
        ):
            r = c.post("/v1/query", json=body, headers=analyst)
            assert r.status_code == 503, r.text
            assert r.json() == {"error": {"code": "audit_unavailable", "message": r.json()["error"]["message"]}}
            assert not any(ch.isdigit() for ch in r.text)  # no numbers of any kind
        assert c.get("/v1/audit/events", headers=workspace.headers("auditor")).status_code == 503
        assert c.get("/audit", headers=workspace.headers("auditor")).status_code == 503
        after = c.get("/v1/budget", headers=analyst).json()
        spent = {b["dataset"]: b["spent"]["epsilon"] for b in after}
        # The charge made before the failed "admitted" record stands: never refunded.
        assert spent["visits"] == pytest.approx(
            next(b for b in before if b["dataset"] == "visits")["spent"]["epsilon"] + 0.5
        )
        log.rmdir()
        log.with_name("audit.jsonl.saved").rename(log)
        again = c.post("/v1/query", json={"sql": "SELECT AVG(age) FROM visits", "epsilon": 0.1}, headers=analyst)
        assert again.status_code == 200
    assert verify(workspace).returncode == 0


# --- two gateway processes, one log ------------------------------------------------------------------------------


@pytest.fixture
def two_gateways(workspace: Workspace) -> Iterator[list[str]]:
    with gateways(2, "--workspace", str(workspace.settings.workspace)) as urls:
        yield urls


@pytest.mark.slow
def test_two_gateway_processes_lose_no_record(workspace: Workspace, two_gateways: list[str]) -> None:
    per_thread, threads_per_gateway = 6, 3
    sent: list[tuple[str, int]] = []
    lock = threading.Lock()

    def client(url: str, worker: int) -> None:
        with httpx.Client(base_url=url, timeout=120, headers=workspace.headers("analyst")) as http:
            for i in range(per_thread):
                rid = uuid.uuid4().hex
                # Distinct SQL, so that every request is charged and computed (no cache hits).
                sql = f"SELECT COUNT(*) AS n FROM visits WHERE age >= {worker * 100 + i}"
                r = http.post("/v1/query", json={"sql": sql, "epsilon": 0.01}, headers={"X-Request-Id": rid})
                with lock:
                    sent.append((rid, r.status_code))

    threads = [
        threading.Thread(target=client, args=(url, g * threads_per_gateway + t))
        for g, url in enumerate(two_gateways)
        for t in range(threads_per_gateway)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sent) == 2 * threads_per_gateway * per_thread and {s for _, s in sent} == {200}

    records = AuditLog(workspace.settings.audit_dir).records()
    assert [r["seq"] for r in records] == list(range(len(records)))
    phases = Counter((r.get("correlation_id"), r.get("phase")) for r in records if r["event"] == "query")
    for rid, _ in sent:
        assert phases[(rid, "admitted")] == 1 and phases[(rid, "released")] == 1
    assert sum(1 for r in records if r["event"] == "query") == 2 * len(sent)
    out = verify(workspace)
    assert out.returncode == 0, out.stderr
    with httpx.Client(base_url=two_gateways[1], headers=workspace.headers("auditor")) as auditor:
        spend = auditor.get("/v1/audit/spend").json()
    assert spend["datasets"]["visits"]["epsilon"] == pytest.approx(0.01 * len(sent))


# --- who may read the log -------------------------------------------------------------------------------------------

AUDIT_ROUTES = [
    ("GET", "/v1/audit/events", {}),
    ("GET", "/v1/audit/events/0", {}),
    ("GET", "/v1/audit/export", {"format": "csv"}),
    ("GET", "/v1/audit/spend", {}),
    ("GET", "/v1/audit/verify", {}),
    ("GET", "/v1/audit/access", {}),
    ("GET", "/v1/audit/checkpoints/latest", {}),
    ("POST", "/v1/audit/checkpoints", {}),
    ("GET", "/v1/audit/checkpoints/consistency", {"old": 0}),
    ("GET", "/audit", {}),
    ("GET", "/audit/events/0", {}),
    ("GET", "/audit/export", {}),
]


def test_only_auditors_read_the_log_and_refusals_are_recorded(workspace: Workspace) -> None:
    with workspace.app() as c:
        # Starlette types routes as BaseRoute, which has no path; only a Route has methods, so no other route
        # could add a pair here.
        routes = {
            (m, r.path) for r in [*api.routes, *web.routes] if isinstance(r, Route) for m in getattr(r, "methods", ())
        }
        tested = {(m, p.replace("/0", "/{seq}")) for m, p, _ in AUDIT_ROUTES}
        assert routes - tested <= {("POST", "/audit/login"), ("POST", "/audit/logout"), ("GET", "/audit/login")}
        for role in ("analyst", "lf_author"):
            for method, path, params in AUDIT_ROUTES:
                r = c.request(method, path, params=params, headers=workspace.headers(role))
                assert r.status_code == 403, (role, path, r.text)
                assert "seq" not in r.text and "prev_hash" not in r.text
            login = c.post("/audit/login", data={"token": workspace.tokens[role]}, follow_redirects=False)
            assert login.status_code == 403
        for method, path, params in AUDIT_ROUTES:
            r = c.request(method, path, params=params, headers=workspace.headers("auditor"))
            assert r.status_code in (200, 404), (path, r.text)  # 404: no checkpoint of size 0 yet
    records = AuditLog(workspace.settings.audit_dir).records()
    reads = [r for r in records if r["event"] == "audit_read"]
    denied = Counter(r["actor"]["role"] for r in reads if r["decision"] == "denied")
    assert denied == {"analyst": len(AUDIT_ROUTES) + 1, "lf_author": len(AUDIT_ROUTES) + 1}
    assert all(r["reason"] == "forbidden" and r["request"]["action"] for r in reads if r["decision"] == "denied")
    assert Counter(r["decision"] for r in reads if r["actor"]["role"] == "auditor") == {"allowed": len(AUDIT_ROUTES)}
    assert verify(workspace).returncode == 0
