"""`bastion audit ...`: verify, keys, checkpoints, events and privacy spend of the workspace's audit log.

The log is the workspace's `audit/` directory, or the PostgreSQL store's log with `--store` (or BASTION_STORE).
Admin commands (keygen, rotate-key, checkpoint, export-checkpoint) act on the host workspace directly and are
recorded in the log. Reading commands (verify, events, spend, export) only read: they work on a copy of a workspace
and on a log that cannot be written, and recompute everything from the files and the public keys; a PostgreSQL log
is first exported in the file format, and the same verifier checks the copy.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.terminal import DataTable, Store, Workspace, console, err, fail, typer_app

audit_app = typer_app(help="The tamper-evident audit log.")

ADMIN = {"principal": "admin", "role": "admin", "token_id": None}

Since = Annotated[
    str | None,
    typer.Option(help="from this time on (ISO 8601 such as 2026-01-31 or 2026-01-31T12:00:00Z; UTC if no zone)"),
]
Until = Annotated[str | None, typer.Option(help="before this time (ISO 8601)")]
Actor = Annotated[str | None, typer.Option(help="principal")]
Dataset = Annotated[str | None, typer.Option(help="dataset")]


def _settings(workspace: Path | None, store: str | None = None) -> Any:
    from gateway.settings import Settings

    settings = Settings.load(workspace, **({"store": store} if store else {}))
    if not settings.workspace.is_dir():
        fail(f"no workspace at {settings.workspace} (use --workspace or BASTION_WORKSPACE)")
    return settings


def _open(settings: Any) -> Any:
    """The workspace's audit log (on the PostgreSQL store when the settings name one), or a clean exit."""
    from gateway.stores.base import open_audit_log
    from policies.errors import GatewayError

    try:
        return open_audit_log(settings)
    except GatewayError as exc:
        fail(str(exc))


@contextlib.contextmanager
def _log(settings: Any) -> Iterator[Any]:
    """The audit log for writing, closed (and its new records checkpointed) at the end."""
    from audit.errors import AuditError

    log = _open(settings)
    try:
        yield log
    finally:
        try:
            log.close()
        except AuditError as exc:
            err.print(f"the audit log could not be closed cleanly: {exc}", highlight=False)


@contextlib.contextmanager
def _readable(settings: Any) -> Iterator[Path]:
    """A directory in the file format holding the log, for reading only: the workspace's `audit/`, or a temporary
    export of the PostgreSQL store's log (nothing is written to the store)."""
    from audit.errors import AuditError
    from gateway.stores.base import is_postgresql

    if not is_postgresql(settings.store):
        yield settings.audit_dir
        return
    with tempfile.TemporaryDirectory(prefix="bastion-audit-") as tmp:
        log = _open(settings)
        try:
            directory = log.export(tmp, durable=False)
        except (AuditError, OSError) as exc:
            fail(f"the audit log cannot be exported: {exc}")
        finally:
            _close_reader(log)
        yield directory


def _record(log: Any, event: str, **fields: Any) -> None:
    import uuid

    from audit.errors import AuditWriteError

    try:
        log.append(
            {
                "event": event,
                "actor": ADMIN,
                "source": "cli",
                "request_id": uuid.uuid4().hex,
                "decision": "allowed",
                "reason": "ok",
                **fields,
            }
        )
    except AuditWriteError as exc:
        fail(f"the audit log cannot be written: {exc}")


@audit_app.command("verify")
def verify(
    workspace: Workspace = None,
    store: Store = None,
    keyring: Annotated[
        Path | None,
        typer.Option(
            help="your own copy of the public keys (keyring.json, key directory or PEM) [default: the workspace's]"
        ),
    ] = None,
    trusted_checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--trusted-checkpoint",
            help="a checkpoint kept outside the workspace (export-checkpoint): the log must extend it",
        ),
    ] = None,
    log_dir: Annotated[
        Path | None,
        typer.Option("--log-dir", help="verify this log directory (made by 'bastion audit export') instead"),
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="also parse every record and check it is canonical")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the full report as JSON")] = False,
) -> None:
    """Recompute hashes, chain, Merkle roots and signatures; exit 1 naming the first bad record or line."""
    from audit.errors import AuditKeyError
    from audit.verify import verdict, verify_log

    settings = _settings(workspace, store)
    with contextlib.nullcontext(log_dir) if log_dir is not None else _readable(settings) as directory:
        try:
            report = verify_log(directory, keyring or settings.keys_dir, trusted_checkpoint, strict=strict)
        except (AuditKeyError, OSError, ValueError) as exc:
            fail(f"cannot verify: {exc}", 2)
    if as_json:
        typer.echo(json.dumps({**report.to_dict(), "verdict": verdict(report)}, indent=2))
    if report.ok:
        if not as_json:
            console.print(f"audit log OK: {report.message.removeprefix('ok: ')}", highlight=False)
        return
    if report.first_bad is not None:
        err.print(
            f"[bold red]audit log {verdict(report)}[/] (position {report.first_bad}): {report.message}", highlight=False
        )
    else:
        err.print(f"[bold red]audit log BROKEN[/]: {report.message}", highlight=False)
    for problem in [p for p in report.problems if p != report.message][:9]:
        err.print(f"  also: {problem}", highlight=False)
    raise typer.Exit(1)


@audit_app.command("keygen")
def keygen(workspace: Workspace = None, store: Store = None) -> None:
    """Create the checkpoint-signing key of the workspace (refuses to replace one: use rotate-key)."""
    from audit import keys
    from audit.record import Event

    settings = _settings(workspace, store)
    try:
        key_id = keys.keygen(settings.keys_dir)
    except FileExistsError:
        fail(f"{settings.keys_dir} already has a signing key; use 'bastion audit rotate-key' to replace it")
    with _log(settings) as log:
        _record(log, Event.KEY_GENERATED, key_id=key_id)
    console.print(f"signing key {key_id} created in {settings.keys_dir}", highlight=False)


@audit_app.command("rotate-key")
def rotate_key(workspace: Workspace = None, store: Store = None) -> None:
    """Replace the signing key: recorded in the log, sealed by the old key and then by the new one. On a
    PostgreSQL store, copy the key directory to every other replica afterwards (they refuse to append until then)."""
    from audit.errors import AuditError

    settings = _settings(workspace, store)
    with _log(settings) as log:
        try:
            old, new = log.rotate_key(actor=ADMIN)
        except AuditError as exc:
            fail(f"cannot rotate the key: {exc}")
    console.print(f"signing key rotated: {old} -> {new} (old public key kept in the keyring)", highlight=False)


@audit_app.command("checkpoint")
def checkpoint(workspace: Workspace = None, store: Store = None) -> None:
    """Sign a checkpoint of the log now."""
    from audit.errors import AuditError
    from audit.record import Event

    settings = _settings(workspace, store)
    with _log(settings) as log:
        _record(log, Event.CHECKPOINT_REQUESTED)
        try:
            cp = log.checkpoint()
        except AuditError as exc:
            fail(f"cannot checkpoint: {exc}")
    console.print(
        f"checkpoint: {cp.tree_size} records, root {cp.root_hash}, key {cp.key_id}, {cp.time}", highlight=False
    )


@audit_app.command("export-checkpoint")
def export_checkpoint(
    dest: Annotated[Path, typer.Argument(help="file or directory outside the workspace (another volume or host)")],
    workspace: Workspace = None,
    store: Store = None,
) -> None:
    """Write the latest checkpoint (signing one that covers every record) outside the workspace: the anchor
    for 'verify --trusted-checkpoint'. Keep it off the database host too when the log is on PostgreSQL."""
    from audit.errors import AuditError
    from audit.record import Event

    settings = _settings(workspace, store)
    ws = settings.workspace.resolve()
    target = dest.resolve()
    if target == ws or ws in target.parents:
        fail(f"{dest} is inside the workspace {settings.workspace}; keep the anchor elsewhere")
    with _log(settings) as log:
        _record(log, Event.CHECKPOINT_EXPORTED, request={"dest": str(target)})
        try:
            written = log.export_checkpoint(target)
        except AuditError as exc:
            fail(str(exc))
    cp = json.loads(written.read_text())
    console.print(f"checkpoint of {cp['tree_size']} records written to {written}", highlight=False)


@audit_app.command("export")
def export(
    to: Annotated[
        Path, typer.Option("--to", help="directory to write audit.jsonl and checkpoints.jsonl in (replaced if there)")
    ],
    workspace: Workspace = None,
    store: Store = None,
) -> None:
    """Copy the log, as of one moment, into a directory in the file format (audit/SCHEMA.md), e.g. to keep it or
    verify it off the database host: 'bastion audit verify --log-dir DIR --keyring ...'."""
    from audit.errors import AuditError

    settings = _settings(workspace, store)
    if to.resolve() == settings.audit_dir.resolve():
        fail(f"{to} is the workspace's own log directory")
    log = _open(settings)
    try:
        written = log.export(to)
    except (AuditError, OSError, ValueError) as exc:
        fail(f"the audit log cannot be exported: {exc}")
    finally:
        _close_reader(log)
    from audit import storage

    lines = sum(1 for _ in open(written / storage.LOG, "rb"))
    console.print(f"{lines} records and their checkpoints written to {written}", highlight=False)


def _close_reader(log: Any) -> None:
    """Release a log opened only to read it: a PostgreSQL log is not checkpointed on the way out."""
    from gateway.stores.pg_audit import PgAuditLog

    if isinstance(log, PgAuditLog):
        log.close(seal=False)


@audit_app.command("events")
def events(
    workspace: Workspace = None,
    store: Store = None,
    since: Since = None,
    until: Until = None,
    actor: Actor = None,
    dataset: Dataset = None,
    event: Annotated[str | None, typer.Option(help="event type, e.g. query or lf_stats (audit/SCHEMA.md)")] = None,
    decision: Annotated[str | None, typer.Option(help="allowed, denied or error")] = None,
    limit: Annotated[int | None, typer.Option(min=1)] = None,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    format: Annotated[str, typer.Option("--format", help="table, jsonl or csv")] = "table",
) -> None:
    """List audit records matching the filters, in log order."""
    from audit import report

    if format not in ("table", "jsonl", "csv"):
        fail("--format is table, jsonl or csv", 2)
    _check_times(since=since, until=until)
    if event is not None:
        from audit.record import check_event_name

        try:
            check_event_name(event)
        except ValueError as exc:
            fail(f"--event: {exc}", 2)
    settings = _settings(workspace, store)
    with _readable(settings) as directory:
        try:
            found = report.query_events(
                directory,
                since=since,
                until=until,
                actor=actor,
                dataset=dataset,
                event=event,
                decision=decision,
                limit=limit,
                offset=offset,
            )
        except ValueError as exc:
            fail(f"{exc}")
    if format == "jsonl":
        sys.stdout.write(report.to_jsonl(found))
        return
    if format == "csv":
        sys.stdout.write(report.to_csv(found))
        return
    table = DataTable("seq", "time", "event", "principal", "role", "dataset", "decision", "reason", "phase", "ε")
    for r in found:
        actor_, cost = r.get("actor"), r.get("cost")
        actor_ = actor_ if isinstance(actor_, dict) else {}
        cost = cost if isinstance(cost, dict) else {}
        table.add_row(
            *(
                str(v) if v is not None else ""
                for v in (
                    r.get("seq"),
                    r.get("time"),
                    r.get("event"),
                    actor_.get("principal"),
                    actor_.get("role"),
                    r.get("dataset"),
                    r.get("decision"),
                    r.get("reason"),
                    r.get("phase"),
                    cost.get("epsilon"),
                )
            )
        )
    console.print(table)
    console.print(f"{len(found)} records", highlight=False)


def _caps(settings: Any) -> dict[str, dict[str, Any]]:
    """Budget caps of the registered datasets: their policies in the catalog (opened read-only, like a running
    gateway does), else the policy files of the workspace."""
    from policies.schema import PolicyError, load_policy

    policies = []
    try:
        from gateway.engines.duckdb import DuckDBEngine

        catalog = DuckDBEngine(settings.database, settings.bounding_key, read_only=True)
        try:
            policies = [policy for policy, _ in catalog.datasets().values()]
        finally:
            catalog.close()
    except Exception:  # noqa: BLE001 - no database, or it is locked by a writer: fall back to the files
        for path in sorted(settings.policies_dir.glob("*.yaml")):
            try:
                policies.append(load_policy(path))
            except PolicyError:
                continue
    from policies.accountant import spend_caps

    return {p.dataset: spend_caps(p.budget.total, p.budget.per_principal, p.accounting) for p in policies}


@audit_app.command("spend")
def spend(
    workspace: Workspace = None,
    store: Store = None,
    since: Since = None,
    until: Until = None,
    dataset: Dataset = None,
    format: Annotated[str, typer.Option("--format", help="table or json")] = "table",
) -> None:
    """Privacy spend (ε, δ, and ρ under zCDP) per principal and dataset, and per dataset against its caps (ρ and δ
    under zCDP, as the ledger caps them), from the log."""
    from audit import report

    if format not in ("table", "json"):
        fail("--format is table or json", 2)
    _check_times(since=since, until=until)
    settings = _settings(workspace, store)
    caps = _caps(settings)
    if dataset is not None:
        caps = {k: v for k, v in caps.items() if k == dataset}
    with _readable(settings) as directory:
        try:
            records = report.query_events(directory, dataset=dataset, decision="allowed")
            result = report.privacy_spend(records, caps, since=since, until=until)
        except ValueError as exc:
            fail(str(exc))
    if format == "json":
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    totals = DataTable(
        "dataset", "ε spent", "ε cap", "ρ spent", "ρ cap", "δ spent", "δ cap", "over cap", "principals over their cap"
    )
    for name, d in sorted(result.datasets.items()):
        totals.add_row(
            name,
            f"{d.epsilon:.6g}",
            "– (zCDP: ρ)" if d.accounting == "zcdp" else _g(d.cap_epsilon),
            f"{d.rho:.6g}" if d.accounting == "zcdp" or d.rho else "–",
            _g(d.cap_rho),
            f"{d.delta:.3g}",
            _g(d.cap_delta),
            "YES" if d.over_cap else "no",
            ", ".join(d.principals_over_cap),
        )
    console.print(totals)
    if any(d.periods for d in result.datasets.values()):
        # A dataset with periods: each period is a budget under the dataset's caps (the row above is the most spent).
        periods = DataTable(
            "dataset", "period", "ε spent", "ρ spent", "δ spent", "over cap", "principals over their cap"
        )
        for name, d in sorted(result.datasets.items()):
            for label, p in (d.periods or {}).items():
                periods.add_row(
                    name,
                    label,
                    f"{p['epsilon']:.6g}",
                    f"{p['rho']:.6g}" if d.accounting == "zcdp" or p["rho"] else "–",
                    f"{p['delta']:.3g}",
                    "YES" if p["over_cap"] else "no",
                    ", ".join(p["principals_over_cap"]),
                )
        console.print(periods)
    per = DataTable("principal", "dataset", "charges", "ε", "ρ", "δ", "first", "last")
    for (principal, name), points in sorted(result.series.items()):
        per.add_row(
            principal,
            name,
            str(len(points)),
            f"{points[-1].cumulative_epsilon:.6g}",
            f"{points[-1].cumulative_rho:.6g}",
            f"{points[-1].cumulative_delta:.3g}",
            points[0].time,
            points[-1].time,
        )
    console.print(per)


def _check_times(**times: str | None) -> None:
    """Each given time is ISO 8601 (as the API requires), else a message naming the option and a valid form."""
    from audit.record import format_time

    for name, value in times.items():
        if value is None:
            continue
        try:
            format_time(value)
        except ValueError:
            fail(f"--{name} must be an ISO 8601 time such as 2026-01-31 or 2026-01-31T12:00:00Z (got {value!r})", 2)


def _g(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"
