"""Fixtures for the audit tests: realistic gateway events and helpers to edit a log's files on disk."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from audit.log import AuditLog
from audit.merkle import leaf_hash

EventFactory = Callable[..., dict[str, Any]]


def gateway_event(
    i: int = 0,
    *,
    principal: str = "alice",
    dataset: str = "visits",
    decision: str = "allowed",
    epsilon: float = 0.1,
    delta: float = 0.0,
    phase: str = "admitted",
    request_id: str | None = None,
) -> dict[str, Any]:
    """An event shaped like the ones the gateway writes."""
    return {
        "event": "query",
        "actor": {"principal": principal, "role": "analyst", "token_id": "t_ab12"},
        "source": "127.0.0.1",
        "request_id": request_id or f"req-{i}",
        "dataset": dataset,
        "request": {"sql": f"SELECT sex, COUNT(*) FROM {dataset} GROUP BY sex -- {i}"},
        "decision": decision,
        "reason": "ok" if decision == "allowed" else "budget_exhausted",
        "cost": {"epsilon": epsilon, "delta": delta},
        "budget_before": {"epsilon": 3.0, "delta": 1e-6},
        "budget_after": {"epsilon": 3.0 - epsilon, "delta": 1e-6 - delta},
        "release_digest": None,
        "phase": phase,
    }


@pytest.fixture
def make_event() -> EventFactory:
    return gateway_event


class LogFiles:
    """Direct access to a log directory's files, to tamper with them as an attacker with disk access would."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.log = directory / "audit.jsonl"
        self.checkpoints = directory / "checkpoints.jsonl"

    def lines(self) -> list[bytes]:
        return self.log.read_bytes().split(b"\n")[:-1]

    def write_lines(self, lines: list[bytes]) -> None:
        self.log.write_bytes(b"".join(line + b"\n" for line in lines))

    def checkpoint_lines(self) -> list[bytes]:
        return self.checkpoints.read_bytes().split(b"\n")[:-1]

    def write_checkpoint_lines(self, lines: list[bytes]) -> None:
        self.checkpoints.write_bytes(b"".join(line + b"\n" for line in lines))

    @staticmethod
    def forge(template: bytes, **changes: Any) -> bytes:
        """A canonical record line made from `template` with some fields changed."""
        record = json.loads(template)
        record.update(changes)
        return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @staticmethod
    def leaf_hex(line: bytes) -> str:
        return leaf_hash(line).hex()


@pytest.fixture
def new_log(tmp_path: Path) -> Callable[..., AuditLog]:
    def make(name: str = "audit", **kwargs: Any) -> AuditLog:
        kwargs.setdefault("key_dir", tmp_path / "keys")
        return AuditLog(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def filled(tmp_path: Path, new_log: Callable[..., AuditLog]) -> tuple[AuditLog, LogFiles]:
    """A closed log of 30 records with checkpoints at 10, 20 and 30."""
    log = new_log(checkpoint_every=10)
    for i in range(30):
        log.append(gateway_event(i))
    log.close()
    return log, LogFiles(log.directory)
