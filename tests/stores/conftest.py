"""A real PostgreSQL server for the store tests: Debian's server binaries, a cluster made by `initdb` in a temporary
directory owned by a non-root system user (the server refuses to run as root), on a free loopback port, stopped at
the end of the session. Each test gets a database of its own; a test that stops and starts the server takes one of
its own (`pg_cluster`).

Without the binaries (scripts/postgres.sh installs them) the PostgreSQL tests fail when CI is set, and are skipped
with the reason otherwise."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.stores.base import LedgerStore
from gateway.stores.ledger import Ledger
from gateway.stores.pg import PgLedger, migrate
from gateway.stores.pg_audit import PgAuditLog
from gateway.stores.pg_tokens import PgTokenStore
from gateway.stores.tokens import SqliteTokenStore, TokenStore
from tests.conftest import ROLES, Workspace, free_port

SERVER_USER = "bastion-pg"  # the system user that owns and runs the test cluster when the tests run as root
DB_USER = "bastion"


def server_bindir() -> Path | None:
    """The directory of PostgreSQL's initdb and pg_ctl (the newest Debian version first), or None."""
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True):
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


@dataclass
class PgServer:
    host: str
    port: int

    def url(self, dbname: str) -> str:
        return f"postgresql://{DB_USER}@{self.host}:{self.port}/{dbname}"

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _server_user() -> dict[str, Any]:
    """subprocess arguments that run the server as a non-root system user (made if missing) when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(SERVER_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class PgCluster:
    """A PostgreSQL cluster of the tests' own: made by `initdb` in a temporary directory (owned by the non-root
    system user when the tests run as root), on a free loopback port; `stop` and `start` take it down and bring it
    back on the same port with its data."""

    def __init__(self, bindir: Path) -> None:
        self.run_as = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="bastion-pg-"))  # not under pytest's tmp dirs: only root enters
        if self.run_as:
            os.chown(self.root, self.run_as["user"], self.run_as["group"])
        self.data, self.logfile = self.root / "data", self.root / "server.log"
        initdb = [str(bindir / "initdb"), "-D", str(self.data), "-U", DB_USER, "--auth=trust", "-E", "UTF8"]
        subprocess.run([*initdb, "--no-sync"], check=True, capture_output=True, cwd=self.root, **self.run_as)
        self.server = PgServer("127.0.0.1", free_port())
        self._pg_ctl = [str(bindir / "pg_ctl"), "-D", str(self.data)]

    def start(self) -> None:
        options = (
            f"-p {self.server.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
        )
        started = subprocess.run(
            [*self._pg_ctl, "-l", str(self.logfile), "-w", "-t", "60", "-o", options, "start"],
            capture_output=True,
            text=True,
            cwd=self.root,
            **self.run_as,
        )
        if started.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(f"the PostgreSQL test server did not start: {started.stderr}\n{log}")

    def stop(self) -> None:
        """Stop at once (`-m immediate`: every connection ends, as when the server or its host goes away)."""
        subprocess.run(
            [*self._pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True, cwd=self.root, **self.run_as
        )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def _cluster() -> Iterator[PgCluster]:
    bindir = server_bindir()
    if bindir is None:
        reason = "PostgreSQL's server binaries (initdb, pg_ctl) are missing: run scripts/postgres.sh"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = PgCluster(bindir)
    try:
        try:
            cluster.start()
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The tests' PostgreSQL server, shared by the session (each test makes its databases on it)."""
    with _cluster() as cluster:
        yield cluster.server


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL server of this test's own, which the test may stop and start again."""
    with _cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_database(pg_server: PgServer) -> Iterator[str]:
    """The address of an empty database of this test's own (no schema: `bastion store migrate` not run)."""
    name = pg_server.create_database()
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def pg_store(pg_database: str) -> str:
    """The address of a migrated database of this test's own."""
    migrate(pg_database)
    return pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_address(store_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a ledger of the parametrized kind lives: a SQLite file or a migrated PostgreSQL database."""
    if store_kind == "postgresql":
        return str(request.getfixturevalue("pg_store"))
    return str(tmp_path / "ledger.sqlite")


def open_ledger_at(address: str) -> LedgerStore:
    return PgLedger(address) if address.startswith("postgresql://") else Ledger(address)


@pytest.fixture
def open_ledger(store_address: str) -> Iterator[Callable[[], LedgerStore]]:
    """Opens ledgers on the parametrized store (each one a process's own), closing them at the end."""
    opened: list[LedgerStore] = []

    def make() -> LedgerStore:
        ledger = open_ledger_at(store_address)
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        ledger.close()


@pytest.fixture
def pg_workspace(workspace: Workspace, pg_store: str) -> Workspace:
    """The workspace on a migrated PostgreSQL store of its own, with one token per role made in that store."""
    tokens = PgTokenStore(pg_store)
    try:
        made = {role: tokens.create(name, role)[0] for role, name in ROLES.items()}
    finally:
        tokens.close()
    return Workspace(workspace.settings.model_copy(update={"store": pg_store}), made)


def open_tokens_at(address: str, clock: Callable[[], float]) -> TokenStore:
    if address.startswith("postgresql://"):
        return PgTokenStore(address, clock=clock)
    return SqliteTokenStore(Path(address).with_name("tokens.sqlite"), clock=clock)


@pytest.fixture
def open_token_store(store_address: str) -> Iterator[Callable[[Callable[[], float]], TokenStore]]:
    """Opens token stores on the parametrized store (each one a process's own, with its clock), closing them."""
    opened: list[TokenStore] = []

    def make(clock: Callable[[], float]) -> TokenStore:
        store = open_tokens_at(store_address, clock)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def pg_records(address: str, key_dir: Path) -> list[dict[str, Any]]:
    """Every record of the PostgreSQL store's audit log (read only: nothing is checkpointed on the way out)."""
    log = PgAuditLog(address, key_dir=key_dir)
    try:
        return log.records()
    finally:
        log.close(seal=False)
