"""Shared fixtures: real workspaces (DuckDB file, SQLite ledger, audit log) built by Bastion's own code."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gateway.demo import write_demo
from gateway.engines.kind import EngineKind
from gateway.http.app import create_app
from gateway.service import Bastion
from gateway.settings import Settings
from policies.schema import load_policy

DATA = Path(__file__).parent / "data"
BIN = Path(sys.executable).parent / "bastion"
DEMO_ROWS = 60_000


class AppClient(TestClient):
    """A TestClient on the gateway's app. Starlette types `TestClient.app` as any ASGI callable; here it is always
    the FastAPI app `create_app` built, whose `state` (the Bastion, the LF limits) tests read and set."""

    app: FastAPI


@dataclass
class Workspace:
    settings: Settings
    tokens: dict[str, str]  # role -> token

    def app(self) -> AppClient:
        return AppClient(create_app(self.settings))

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


def build_workspace(
    root: Path, register: list[tuple[Path, Path]], roles: dict[str, str], *, engine: EngineKind = EngineKind.DUCKDB
) -> Workspace:
    settings = Settings(workspace=root / "ws", engine=engine)
    settings.save()
    bastion = Bastion(settings, read_only=False)
    try:
        for policy_path, source in register:
            bastion.engine.register(load_policy(policy_path), source)
        tokens = {role: bastion.tokens.create(name, role)[0] for role, name in roles.items()}
    finally:
        bastion.close()
    return Workspace(settings, tokens)


ROLES = {"analyst": "alice", "lf_author": "lena", "auditor": "otto", "admin": "root"}


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_demo(tmp_path_factory.mktemp("demo"), n_rows=DEMO_ROWS, seed=11)


@pytest.fixture(scope="session")
def pums_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pums")
    for name in ("pums.yaml", "PUMS_pid.csv", "PUMS_null.csv"):
        shutil.copy(DATA / name, d / name)
    return d / "PUMS_pid.csv", d / "pums.yaml"


@pytest.fixture
def workspace(tmp_path: Path, demo_source: tuple[Path, Path], pums_source: tuple[Path, Path]) -> Workspace:
    """A fresh workspace with the demo visits and PUMS registered, and one token per role."""
    data, policy = demo_source
    pdata, ppolicy = pums_source
    return build_workspace(tmp_path, [(policy, data), (ppolicy, pdata)], ROLES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gateways(n: int, *args: str, cwd: Path | None = None) -> Iterator[list[str]]:
    """`n` real `bastion serve` processes (with `args`) on free loopback ports, until the block ends."""
    procs, urls = [], []
    try:
        for _ in range(n):
            port = free_port()
            procs.append(
                subprocess.Popen(
                    [str(BIN), "serve", "--port", str(port), *args],
                    cwd=cwd,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            else:
                raise RuntimeError("a gateway did not start")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
