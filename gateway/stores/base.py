"""The store interfaces the gateway uses, whichever store holds them: SQLite files in the workspace (one host, the
default) or a PostgreSQL database (`--store postgresql://...` or BASTION_STORE, shared by replicas on many hosts).

`open_ledger`, `open_cache`, `open_token_store`, `open_audit_log` and `open_job_store` pick the implementation from
the settings (tokens, the audit log and synthesis job records follow the ledger: on PostgreSQL when `Settings.store`
is a PostgreSQL address, else `tokens.sqlite`, the `audit/` directory and job.json files in the workspace or the
shared directory)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from policies.accountant import Accounting, PrivacyLoss
from policies.schema import Budget

if TYPE_CHECKING:
    from audit.checkpoint import Checkpoint
    from gateway.settings import Settings
    from gateway.stores.jobs import JobStore
    from gateway.stores.ledger import Charge, LedgerCharge
    from gateway.stores.tokens import TokenStore


class LedgerStore(Protocol):
    """Durable privacy budgets (see gateway/stores/ledger.py for the guarantees every implementation keeps)."""

    location: str

    def owner(self) -> str: ...

    def close(self) -> None: ...

    def charge(
        self,
        *,
        principal: str,
        dataset: str,
        cost: PrivacyLoss,
        per_principal: Budget,
        total: Budget,
        request_id: str,
        kind: str = "query",
        accounting: Accounting = Accounting.PURE,
        periods: Sequence[str] = (),
    ) -> Charge: ...

    def mark_audited(self, ids: Iterable[int | None]) -> None: ...

    def mark_unrecorded(self, ids: Iterable[int | None]) -> None: ...

    def claim_unrecorded(self) -> tuple[LedgerCharge, ...]: ...

    def claim_stale(self) -> tuple[LedgerCharge, ...]: ...

    def totals(self) -> dict[tuple[str, str], tuple[int, int, int]]: ...

    def recharge(
        self, charges: Iterable[LedgerCharge], expected: Mapping[tuple[str, str], tuple[int, int, int]]
    ) -> list[LedgerCharge]: ...

    def spent(self, principal: str, dataset: str) -> PrivacyLoss: ...

    def spent_total(self, dataset: str) -> PrivacyLoss: ...

    def history(self, dataset: str | None = None) -> list[dict[str, object]]: ...


class CacheStore(Protocol):
    """Released answers per principal: the first stored answer for a key wins."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, principal: str, response: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class AuditStore(Protocol):
    """The tamper-evident audit log (audit/log.py for the file log; gateway/stores/pg_audit.py on PostgreSQL).

    Writes raise `audit.errors.AuditWriteError` when the record is not durable (the caller fails closed). Readers of
    `audit.report` and `audit.verify` work on `snapshot()`, a directory in the file format (`fresh=True`: as the
    store holds every record now, for verification; otherwise a copy may be extended from an earlier one)."""

    location: str
    key_dir: Path

    def append(self, event: dict[str, Any]) -> dict[str, Any]: ...

    def append_many(self, events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]: ...

    def records(self) -> list[dict[str, Any]]: ...

    def verify(self) -> tuple[bool, str]: ...

    def checkpoint(self) -> Checkpoint: ...

    def latest_checkpoint(self) -> Checkpoint | None: ...

    def export_checkpoint(self, dest: str | Path) -> Path: ...

    def rotate_key(self, actor: dict[str, Any] | None = None) -> tuple[str, str]: ...

    def export(self, dest: str | Path, *, durable: bool = True) -> Path: ...

    def snapshot(self, *, fresh: bool = False) -> Path: ...

    def close(self) -> None: ...


def is_postgresql(store: str | None) -> bool:
    return bool(store) and str(store).startswith(("postgresql://", "postgres://"))


def open_ledger(settings: Settings) -> LedgerStore:
    if is_postgresql(settings.store):
        from gateway.stores.pg import PgLedger

        return PgLedger(str(settings.store))
    from gateway.stores.ledger import Ledger

    return Ledger(settings.ledger)


def open_cache(settings: Settings) -> CacheStore:
    if is_postgresql(settings.store):
        from gateway.stores.pg import PgReleaseCache

        return PgReleaseCache(str(settings.store))
    from gateway.stores.cache import ReleaseCache

    return ReleaseCache(settings.cache)


def open_token_store(settings: Settings) -> TokenStore:
    if is_postgresql(settings.store):
        from gateway.stores.pg_tokens import PgTokenStore

        return PgTokenStore(str(settings.store))
    from gateway.stores.tokens import open_tokens

    return open_tokens(settings.tokens)


def open_audit_log(settings: Settings) -> AuditStore:
    """The audit log: in the PostgreSQL store (one log for all replicas), else the workspace's `audit/` directory.
    The signing key is read from the workspace's key directory either way."""
    if is_postgresql(settings.store):
        from gateway.stores.pg_audit import PgAuditLog

        return PgAuditLog(str(settings.store), key_dir=settings.keys_dir)
    from audit.log import AuditLog

    return AuditLog(settings.audit_dir, key_dir=settings.keys_dir)


def open_job_store(settings: Settings) -> JobStore:
    if is_postgresql(settings.store):
        from gateway.stores.pg_jobs import PgJobStore

        return PgJobStore(str(settings.store))
    from gateway.stores.jobs import FileJobStore

    return FileJobStore(settings.synth_jobs_dir)
