"""The `bastion` command line. Admin actions (register, token, demo, serve) act on the workspace of the current
directory (./bastion-workspace, or --workspace / BASTION_WORKSPACE); client commands talk to a gateway over HTTP.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gateway.cli.access import access_app, consent_app
from gateway.cli.audit import audit_app
from gateway.cli.evaluate import evaluate as evaluate_command
from gateway.cli.evaluate import evaluation_card as evaluation_card_command
from gateway.cli.evaluate import models as models_command
from gateway.cli.lf import lf_app
from gateway.cli.predictions import predictions_app
from gateway.cli.synth import synth_app
from gateway.cli.terminal import (
    AsJson,
    DataTable,
    SharedDir,
    Store,
    Token,
    Url,
    Workspace,
    console,
    fail,
    fmt,
    gateway_client,
    print_json,
    print_records,
    typer_app,
)
from gateway.engines.kind import EngineKind

if TYPE_CHECKING:
    from gateway.service import Bastion
    from gateway.settings import Settings
    from policies.schema import Policy

# Only what `--help` needs is imported above (typer, rich, this package's option types): each command imports
# the rest (settings, the service, pandas, httpx ...) when it runs. tests/test_cli_imports.py guards this.

app = typer_app("Bastion: privacy-preserving data exploration gateway.")
token_app = typer_app(help="Bearer tokens (admin, on the gateway host).")
ledger_app = typer_app(help="The privacy-budget ledger (admin, on the gateway host).")
version_app = typer_app(help="A dataset's versions: one per registration and per append (admin, on the gateway host).")
store_app = typer_app(
    help="The shared store of the ledger, release cache, tokens and synthesis job records (PostgreSQL, for several "
    "replicas)."
)
app.add_typer(token_app, name="token")
app.add_typer(ledger_app, name="ledger")
app.add_typer(store_app, name="store")
app.add_typer(version_app, name="version")
app.add_typer(audit_app, name="audit")
app.add_typer(synth_app, name="synth")
app.add_typer(lf_app, name="lf")
app.add_typer(predictions_app, name="predictions")
app.add_typer(access_app, name="access")
app.add_typer(consent_app, name="consent")
app.command("evaluate")(evaluate_command)
app.command("evaluation-card")(evaluation_card_command)
app.command("models")(models_command)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"bastion {version('bastion')}")
        except PackageNotFoundError:  # run from a source tree that is not installed
            fail("bastion is not installed (pip install -e .); its version is in pyproject.toml")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Bastion: privacy-preserving data exploration gateway."""


def _settings(workspace: Path | None, **overrides: Any) -> Any:
    from gateway.settings import Settings

    return Settings.load(workspace, **overrides)


def _admin(workspace: Path | None, **overrides: Any) -> Any:
    from gateway.service import Bastion

    return Bastion(_settings(workspace, **overrides), read_only=False)


EngineOption = Annotated[
    EngineKind | None,
    typer.Option("--engine", help="where the private rows live: duckdb (embedded) or spark; kept in the workspace"),
]


def _choose_engine(workspace: Path | None, engine: EngineKind | None) -> None:
    """Save the engine in the workspace's settings; a workspace keeps the engine its datasets were registered on."""
    if engine is None:
        return
    settings = _settings(workspace)
    if settings.settings_file.exists() and settings.engine is not engine and _has_datasets(settings):
        fail(
            f"this workspace keeps its datasets on {settings.engine.value}; "
            f"use another workspace (--workspace) for {engine.value}"
        )
    settings.engine = engine
    settings.save()


def _has_datasets(settings: Any) -> bool:
    if settings.engine is EngineKind.SPARK:
        return (settings.warehouse / "catalog.json").exists()
    return settings.database.exists()


def _checked_app(settings: Any) -> Any:
    """The app for `settings`, or a clean exit naming the problem if the ledger and the log disagree."""
    from gateway.http.app import create_app
    from policies.errors import GatewayError

    try:
        return create_app(settings)
    except GatewayError as exc:
        fail(str(exc))


# --- admin commands ---------------------------------------------------------------------------------------


def _register_audited(
    bastion: Bastion, policy: Policy, policy_file: Path, source: Path, base: Path | None = None
) -> str:
    """Register `source` under `policy` (read from `policy_file`), keep a copy of the policy in the workspace, and
    record the registration in the audit log; return the new version."""
    from audit.record import Event

    version = bastion.engine.register(policy, source, base=base)
    bastion.settings.policies_dir.mkdir(parents=True, exist_ok=True)
    (bastion.settings.policies_dir / f"{policy.dataset}.yaml").write_text(policy_file.read_text())
    bastion.audit(
        None,
        Event.DATASET_REGISTERED,
        dataset=policy.dataset,
        decision="allowed",
        reason="ok",
        request={"source": str(source), "version": version, "policy": policy.fingerprint()},
    )
    return version


@app.command()
def register(
    policy: Annotated[Path, typer.Argument(help="policy YAML file")],
    source: Annotated[Path | None, typer.Option(help="Parquet or CSV file [default: the policy's source]")] = None,
    engine: EngineOption = None,
    store: Store = None,
    workspace: Workspace = None,
) -> None:
    """Register a dataset: load its source into the private engine and build the pre-bounded table (and its
    consent to debug access, if the policy declares where it lives)."""
    from gateway.access import prepare_consent, store_consent
    from gateway.cli.monitoring import show_report
    from gateway.monitoring import monitor_version
    from policies.errors import GatewayError
    from policies.schema import PolicyError, load_policy

    _choose_engine(workspace, engine)
    try:
        pol = load_policy(policy)
        src = source or (Path(pol.source) if pol.source else None)
        if src is None:
            fail("the policy has no 'source'; pass --source")
        if not src.is_absolute() and pol.source and source is None:
            src = policy.parent / src
        consent = prepare_consent(pol, base=policy.parent)  # a bad consent source is refused before any change
        bastion = _admin(workspace, store=store)
        try:
            version = _register_audited(bastion, pol, policy, src, base=policy.parent)
            store_consent(bastion, consent)
            report = monitor_version(bastion, pol.dataset, version, src)
        finally:
            bastion.close()
    except (PolicyError, GatewayError) as exc:
        fail(str(exc))
    console.print(f"registered [bold]{pol.dataset}[/] version {version}")
    show_report(report)


@app.command()
def append(
    dataset: Annotated[str, typer.Argument(help="a registered dataset")],
    source: Annotated[Path, typer.Argument(help="Parquet or CSV file with the columns the policy declares")],
    store: Store = None,
    shared_dir: SharedDir = None,
    workspace: Workspace = None,
) -> None:
    """Add a batch of rows as the dataset's new version while gateways keep serving (DuckDB engine). Each unit
    keeps at most max_rows_per_unit rows over all versions together; rows kept before stay kept. Rerunning an
    append that was interrupted completes it; rerunning one that completed adds nothing. If the policy declares
    monitoring, the new version's DP monitoring report (charged to the monitoring budget) is shown, with its alerts.
    Then the LF sets that follow the dataset are recomputed at the versions they missed (each charged to its author,
    up to the author's cap)."""
    from audit.record import Event
    from gateway.cli.lf import follow_lf_sets
    from gateway.cli.monitoring import show_report
    from gateway.monitoring import ReportStore, monitor_version
    from gateway.service import Bastion
    from policies.errors import GatewayError

    report: dict[str, Any] | None = None
    try:
        settings = _settings(workspace, store=store, shared_dir=shared_dir)
        bastion = Bastion(settings, read_only=True)  # readers keep the database open
        try:
            version, added = bastion.engine.append(dataset, source)
            if added:
                bastion.audit(
                    None,
                    Event.DATASET_APPENDED,
                    dataset=dataset,
                    decision="allowed",
                    reason="ok",
                    request={"source": str(source), "version": version.version, "rows": version.rows},
                )
            if added or ReportStore.of(bastion.settings).get(dataset, version.version) is None:
                report = monitor_version(bastion, dataset, version.version, source)  # a crashed rerun's report too
            followed = follow_lf_sets(bastion, dataset)  # LF sets that follow the dataset, at the new version
        finally:
            bastion.close()
    except GatewayError as exc:
        fail(str(exc))
    if not added:
        console.print(
            f"{source} was appended to [bold]{dataset}[/] already, as version {version.version}: nothing added"
        )
    else:
        console.print(f"appended to [bold]{dataset}[/]: version {version.version} ({version.rows} rows in the batch)")
    show_report(report)
    for line in followed:
        console.print(line)


@version_app.command("list")
def version_list(
    dataset: Annotated[str, typer.Argument(help="a registered dataset")],
    as_json: AsJson = False,
    workspace: Workspace = None,
) -> None:
    """A dataset's versions, oldest first: version, time, the class of the batch's row count, retired or not."""
    from gateway.engines import open_engine
    from policies.errors import GatewayError

    engine = open_engine(_settings(workspace), read_only=True)
    try:
        rows = [v.public() for v in engine.versions(dataset)]
    except GatewayError as exc:
        fail(str(exc))
    finally:
        engine.close()
    if as_json:
        print_json(rows)
        return
    print_records(rows, ["version", "time", "rows", "retired"])


@version_app.command("retire")
def version_retire(
    dataset: Annotated[str, typer.Argument(help="a registered dataset")],
    version: Annotated[str, typer.Argument(help="the version to retire (bastion version list shows them)")],
    store: Store = None,
    workspace: Workspace = None,
) -> None:
    """Retire a version: a request pinned to it is refused from now on (version_retired); its rows stay in later
    versions. The last version not retired cannot be retired."""
    from audit.record import Event
    from gateway.service import Bastion
    from policies.errors import GatewayError

    try:
        bastion = Bastion(_settings(workspace, store=store), read_only=True)
        try:
            bastion.engine.retire(dataset, version)
            bastion.audit(
                None,
                Event.VERSION_RETIRED,
                dataset=dataset,
                decision="allowed",
                reason="ok",
                request={"version": version},
            )
        finally:
            bastion.close()
    except GatewayError as exc:
        fail(str(exc))
    console.print(f"retired version {version} of [bold]{dataset}[/]")


def _token_admin(workspace: Path | None, store: str | None) -> Any:
    """The workspace's gateway for a token command: its tokens on the store the ledger is on (PostgreSQL when
    `store` is a PostgreSQL address), or a clean exit naming why the store cannot be opened."""
    from policies.errors import GatewayError

    try:
        return _admin(workspace, store=store)
    except GatewayError as exc:
        fail(str(exc))


def _token_event(bastion: Any, event: str, request: dict[str, Any]) -> None:
    """Write the audit record of a token change; called by the token store inside the change's transaction, so
    a change whose record cannot be written (AuditUnavailable) is rolled back and never takes effect."""
    from policies.errors import AuditUnavailable

    try:
        bastion.audit(None, event, decision="allowed", reason="ok", request=request)
    except AuditUnavailable as exc:
        why = f" ({exc.__context__})" if exc.__context__ is not None else ""
        raise AuditUnavailable(f"the audit log cannot be written{why}; the token was not changed") from exc


def _issue_token(bastion: Any, name: str, role: str, lifetime: float | None = None, *, add: bool = False) -> str:
    """Issue a token with its `token_created` record written before the token is committed."""
    from audit.record import Event
    from gateway.stores.tokens import iso

    def record(r: Any) -> None:
        _token_event(
            bastion,
            Event.TOKEN_CREATED,
            {"name": r.name, "role": r.role, "token_id": r.token_id, "expires": iso(r.expires)},
        )
        if not add:  # the name's new owner: what its previous owner was granted ends before the token exists
            from gateway.access import end_requests_of

            end_requests_of(bastion, r.name)

    token, _ = bastion.tokens.issue(name, role, lifetime, add=add, record=record)
    return str(token)


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option(help="analyst, lf_author, auditor or admin")],
    name: Annotated[str, typer.Option(help="principal name, e.g. alice ('anonymous' and 'bastion' are reserved)")],
    expires: Annotated[
        str | None,
        typer.Option(help="lifetime: a whole number and s, m, h or d, e.g. 30d [default: no expiry]"),
    ] = None,
    add: Annotated[
        bool,
        typer.Option(
            "--add",
            help="give a principal that already has a token in use another one (same role; they share its budget, "
            "cached answers and jobs)",
        ),
    ] = False,
    store: Store = None,
    workspace: Workspace = None,
) -> None:
    """Create a bearer token. It is printed once; only its hash is stored. A name whose tokens are in use is refused
    unless --add, and a principal keeps one role."""
    from gateway.stores.tokens import parse_duration
    from policies.errors import GatewayError

    try:
        lifetime = parse_duration(expires) if expires is not None else None
    except GatewayError as exc:
        fail(str(exc))
    bastion = _token_admin(workspace, store)
    try:
        token = _issue_token(bastion, name, role, lifetime, add=add)
    except GatewayError as exc:
        fail(str(exc))
    finally:
        bastion.close()
    typer.echo(token)


@token_app.command("revoke")
def token_revoke(
    token: Annotated[str, typer.Argument(help="a token id, or a principal name that has one token in use")],
    store: Store = None,
    workspace: Workspace = None,
) -> None:
    """Revoke a token: every gateway process of the workspace (every replica, on a PostgreSQL store) refuses it
    (401) within a second."""
    from audit.record import Event
    from policies.errors import GatewayError

    bastion = _token_admin(workspace, store)
    try:
        record = bastion.tokens.revoke(
            bastion.tokens.find(token).token_id,
            record=lambda r: _token_event(
                bastion, Event.TOKEN_REVOKED, {"name": r.name, "role": r.role, "token_id": r.token_id}
            ),
        )
    except GatewayError as exc:
        fail(str(exc))
    finally:
        bastion.close()
    console.print(f"revoked token {record.token_id} of {record.name} ({record.role})")


@token_app.command("rotate")
def token_rotate(
    token: Annotated[str, typer.Argument(help="a token id, or a principal name that has one token in use")],
    store: Store = None,
    workspace: Workspace = None,
) -> None:
    """Replace a token by a new one for the same principal, role and expiry. The old one stops working at once;
    the new one is printed once."""
    from audit.record import Event
    from policies.errors import GatewayError

    bastion = _token_admin(workspace, store)
    try:
        new_token, _, _ = bastion.tokens.rotate(
            bastion.tokens.find(token).token_id,
            record=lambda old: _token_event(
                bastion,
                Event.TOKEN_ROTATED,
                {"name": old.name, "role": old.role, "token_id": old.token_id, "new_token_id": old.replaced_by},
            ),
        )
    except GatewayError as exc:
        fail(str(exc))
    finally:
        bastion.close()
    typer.echo(new_token)


@token_app.command("list")
def token_list(
    as_json: AsJson = False,
    store: Store = None,
    workspace: Workspace = None,
) -> None:
    """List tokens: id, name, role, state, created, expires, last used (written at most once a minute per
    gateway process), revoked; never secrets."""
    from gateway.stores.base import open_token_store
    from policies.errors import GatewayError

    try:
        tokens = open_token_store(_settings(workspace, store=store))
        try:
            records = tokens.list()
        finally:
            tokens.close()
    except GatewayError as exc:
        fail(str(exc))
    now = time.time()
    if as_json:
        typer.echo(json.dumps([{**r.public(), "state": r.state(now)} for r in records], indent=2))
        return
    table = DataTable("token id", "name", "role", "state", "created", "expires", "last used", "revoked")
    for r in records:
        t = r.public()
        state = r.state(now) + (f" → {r.replaced_by}" if r.replaced_by else "")
        table.add_row(
            r.token_id,
            r.name,
            r.role,
            state,
            t["created"],
            t["expires"] or "never",
            t["last_used"] or "-",
            t["revoked"] or "-",
        )
    console.print(table)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="interface to listen on [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port [default: 8000]")] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="worker processes (they share the ledger, cache, tokens and audit log)")
    ] = 1,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="log every HTTP request")] = True,
    trusted_proxy: Annotated[
        list[str] | None,
        typer.Option(
            metavar="<address>",
            help="address of a reverse proxy whose X-Forwarded-For is believed (repeatable; default: none, the "
            "client address is the connection's)",
        ),
    ] = None,
    store: Store = None,
    shared_dir: SharedDir = None,
    workspace: Workspace = None,
) -> None:
    """Run the gateway on the workspace."""
    settings = _settings(
        workspace, host=host, port=port, trusted_proxies=trusted_proxy or None, store=store, shared_dir=shared_dir
    )
    if not settings.database.exists():
        fail(f"no private database in {settings.workspace}: run 'bastion demo' or 'bastion register' first")
    if workers > 1:
        _checked_app(settings).state.bastion.close()  # fail here, once, rather than in every worker
        os.environ["BASTION_WORKSPACE"] = str(settings.workspace.resolve())
        if settings.store:
            os.environ["BASTION_STORE"] = settings.store  # the workers read it (it is never saved in the workspace)
        if settings.shared_dir is not None:
            os.environ["BASTION_SHARED_DIR"] = str(settings.shared_dir.resolve())
        _run_server(
            "gateway.http.app:app_from_environment",
            settings,
            factory=True,
            workers=workers,
            log_level="info",
            access_log=access_log,
        )
        return
    _run_server(_checked_app(settings), settings, log_level="info", access_log=access_log)


def _run_server(app_: Any, settings: Settings, **options: Any) -> None:
    """uvicorn on the settings' address. Proxy headers are believed only from `trusted_proxies` (none by default:
    uvicorn would otherwise take X-Forwarded-For from any local client as its address)."""
    import uvicorn

    trusted = settings.trusted_proxies
    uvicorn.run(
        app_,
        host=settings.host,
        port=settings.port,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=",".join(trusted) if trusted else "",
        **options,
    )


@app.command()
def demo(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    rows: Annotated[int, typer.Option(help="rows of the generated visits table")] = 500_000,
    serve_: Annotated[bool, typer.Option("--serve/--no-serve", help="start the gateway")] = True,
    engine: EngineOption = None,
    store: Store = None,
    shared_dir: SharedDir = None,
    workspace: Workspace = None,
) -> None:
    """Create (or reuse) the demo workspace here: generated hospital visits, its policy, tokens, an example model's
    predictions, a few patients' consent to debug access and a small hospital of patients, visits and labs joined
    on the patient (DuckDB); then serve."""
    from gateway.access import load_consent
    from gateway.demo import write_access_demo, write_demo, write_examples, write_hospital, write_next_batch
    from gateway.monitoring import monitor_version
    from gateway.predictions import attach
    from gateway.settings import Settings
    from policies.schema import load_policy

    _choose_engine(workspace, engine)
    settings = Settings.load(workspace, host=host, port=port, store=store, shared_dir=shared_dir)
    tokens_file = settings.workspace / "demo-tokens.json"
    if not _has_datasets(settings) or not tokens_file.exists():
        console.print(f"creating the demo workspace in {settings.workspace} ({rows:,} visits)...")
        settings.save()
        # Public tables, predictions and consent run on DuckDB only for now.
        duckdb = settings.engine is EngineKind.DUCKDB
        predictions = None
        if duckdb:
            data, policy_path, predictions, _ = write_access_demo(settings.private_dir / "source", n_rows=rows)
        else:
            data, policy_path = write_demo(settings.private_dir / "source", n_rows=rows, public_tables=False)
        os.chmod(settings.private_dir, 0o700)
        bastion = _admin(settings.workspace, store=store)
        try:
            policy = load_policy(policy_path)
            version = _register_audited(bastion, policy, policy_path, data)
            load_consent(bastion, policy, base=policy_path.parent)
            if duckdb:  # the registration's monitoring report (the baseline of the next batch's), and that batch
                monitor_version(bastion, "visits", version, data)
                write_next_batch(settings.workspace / "examples", data, max(10_000, rows // 5))
            if predictions is not None:
                attach(bastion, "visits", "triage-v3", predictions)
            if duckdb:  # the hospital: patients, visits and labs, private tables joined on the patient
                hospital_data, hospital_path = write_hospital(
                    settings.private_dir / "source" / "hospital", n_patients=max(rows // 25, 200)
                )
                _register_audited(bastion, load_policy(hospital_path), hospital_path, hospital_data)
            _demo_tokens(bastion, tokens_file)
        finally:
            bastion.close()
    else:
        settings = Settings.load(settings.workspace, host=host, port=port, store=store, shared_dir=shared_dir)
        settings.save()
        console.print(f"reusing the demo workspace in {settings.workspace}")
        _reuse_demo_tokens(settings, tokens_file)
    made = json.loads(tokens_file.read_text())
    url = f"http://{settings.host}:{settings.port}"
    console.print("\n[bold]Tokens[/] (also in " + str(tokens_file) + ", readable only by you):")
    for role, t in made.items():
        typer.echo(f"  {role:<10} {t['name']:<6} {t['token']}")
    analyst = made["analyst"]["token"]
    sql = "SELECT region, COUNT(*) AS visits, AVG(income) AS mean_income FROM visits WHERE age >= 65 GROUP BY region"
    activate = _activation_hint()
    if activate:
        console.print(f"\n[bold]First[/], in another terminal: {activate}", highlight=False)
    console.print("\n[bold]Try it[/] (as the analyst):", highlight=False)
    typer.echo(f"  export BASTION_URL={url} BASTION_TOKEN={analyst}")
    typer.echo(f'  bastion query "{sql}" --epsilon 1')
    typer.echo(f'  bastion query "{sql}" --accuracy 50 --dry-run')
    typer.echo(
        f"  curl -s -H 'Authorization: Bearer {analyst}' -H 'Content-Type: application/json' "
        f'-d \'{{"sql": "{sql}", "epsilon": 1}}\' {url}/v1/query'
    )
    typer.echo(
        f"  python -c \"from gateway.client import Client; print(Client('{url}', '{analyst}').query("
        f"'SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex', epsilon=0.5))\""
    )
    if settings.engine is EngineKind.DUCKDB:
        joined = (
            "SELECT c.chapter, AVG(l.value) AS mean_value FROM hospital.labs l JOIN hospital.visits v "
            "ON l.patient_id = v.patient_id AND l.visit_id = v.visit_id JOIN diagnosis_chapters c "
            "ON v.diagnosis = c.code WHERE l.test = 'crp' GROUP BY c.chapter"
        )
        typer.echo(f'  bastion query "{joined}" --epsilon 1')
    typer.echo(f"  API docs: {url}/docs")
    lfs = write_examples(settings.workspace / "examples")
    console.print("\n[bold]As the labeling-function author[/]:", highlight=False)
    typer.echo(
        f"  BASTION_URL={url} BASTION_TOKEN={made['lf_author']['token']} "
        f"bastion lf stats {lfs} --dataset visits --epsilon 1"
    )
    batch = settings.workspace / "examples" / "visits-batch-2.parquet"
    if batch.exists():
        console.print("\n[bold]Append the next batch[/] (on this host; a new version and its monitoring alerts):")
        typer.echo(f"  bastion append visits {batch}")
    consenting = _demo_consenting(settings)
    if consenting:
        console.print("\n[bold]Evaluate the example model[/] (triage-v3, attached to visits; as the analyst):")
        senior = "CASE WHEN age >= 65 THEN 'senior' ELSE 'adult' END"
        typer.echo("  bastion models")
        typer.echo(f'  bastion evaluate visits --model triage-v3 --slice "{senior}" --slice sex --epsilon 1')
        units = ",".join(str(u) for u in consenting[:2])
        console.print("\n[bold]Consented debug access[/] (raw rows, not DP; every step audited):", highlight=False)
        typer.echo(f'  bastion access request --dataset visits --units {units} --purpose "ticket 8812: wrong triage"')
        typer.echo("  then, on this host (the approver must not be the requester):")
        typer.echo("  bastion access list && bastion access approve ID --rows 20 --hours 1")
        typer.echo("  and as the analyst: bastion access rows ID")
    console.print("\n[bold]As the auditor[/]:", highlight=False)
    typer.echo(f"  open {url}/audit and paste the auditor token; on this host: bastion audit verify")
    if serve_:
        served = _checked_app(settings)
        console.print(f"\nserving on {url} (Ctrl-C to stop)")
        _run_server(served, settings, log_level="warning")


def _demo_consenting(settings: Any) -> list[int]:
    """The demo patients whose consent to debug access holds (from the demo's consent file), if it has one."""
    import datetime as dt

    import pyarrow.csv as pacsv

    path = settings.private_dir / "source" / "consent.csv"
    if not path.exists():
        return []
    now = dt.datetime.now(dt.UTC)
    rows = pacsv.read_csv(path).to_pylist()
    return [int(r["patient_id"]) for r in rows if dt.datetime.fromisoformat(str(r["expires_at"])) > now]


def _demo_tokens(bastion: Any, tokens_file: Path) -> None:
    """Create the demo's tokens in the store of `bastion` (each with its `token_created` record, as `bastion token
    create` makes them) and write them to `tokens_file`, readable only by its owner."""
    made = {}
    for role, name in (("analyst", "alice"), ("lf_author", "lena"), ("auditor", "otto")):
        made[role] = {"name": name, "token": _issue_token(bastion, name, role, add=True)}
    fd = os.open(tokens_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(made, f, indent=2)


def _reuse_demo_tokens(settings: Any, tokens_file: Path) -> None:
    """Keep the demo's tokens if the store the demo now runs on holds them all (whatever their state); else (the
    demo was made on the other store: tokens follow the ledger's store) create them in this one."""
    import hashlib

    from gateway.stores.base import open_token_store
    from policies.errors import GatewayError

    secrets = [str(entry["token"]).split("_", 2)[-1] for entry in json.loads(tokens_file.read_text()).values()]
    try:
        tokens = open_token_store(settings)
        try:
            missing = any(tokens.get_by_hash(hashlib.sha256(s.encode()).hexdigest()) is None for s in secrets)
        finally:
            tokens.close()
        if missing:
            console.print("the demo's tokens are not in this store: creating them there")
            bastion = _admin(settings.workspace, store=settings.store)
            try:
                _demo_tokens(bastion, tokens_file)
            finally:
                bastion.close()
    except GatewayError as exc:
        fail(str(exc))


def _activation_hint() -> str | None:
    """How to get `bastion` on PATH when it is not: `source <venv>/bin/activate` (or the full path)."""
    import shutil

    here = Path(sys.executable).parent  # the virtual environment's bin directory, which holds `bastion`
    found = shutil.which("bastion")
    if found and Path(found).parent.resolve() == here.resolve():
        return None
    try:
        bindir = Path(os.path.relpath(here))
    except ValueError:  # another drive (Windows)
        bindir = here
    if bindir.parts[:1] == ("..",):  # not below the current directory: the absolute path reads better
        bindir = here
    if not (here / "activate").exists():
        return f"bastion is not on PATH; call it as {bindir / 'bastion'}"
    return f"source {bindir / 'activate'}   (puts bastion on PATH; or call {bindir / 'bastion'})"


# --- the ledger -------------------------------------------------------------------------------------------


def _ledger_bastion(workspace: Path | None, store: str | None) -> Any:
    from gateway.service import Bastion

    settings = _settings(workspace, store=store)
    if not settings.workspace.is_dir():
        fail(f"no workspace at {settings.workspace} (use --workspace or BASTION_WORKSPACE)")
    return Bastion(settings)


@ledger_app.command("check")
def ledger_check(store: Store = None, workspace: Workspace = None) -> None:
    """Check the ledger against the audit log, as the gateway does at start-up (orphan charges get recorded)."""
    from policies.errors import GatewayError

    bastion = _ledger_bastion(workspace, store)
    try:
        bastion.check_consistency()
    except GatewayError as exc:
        fail(str(exc))
    finally:
        bastion.close()
    console.print("the ledger is not behind the audit log")


@ledger_app.command("reconcile")
def ledger_reconcile(store: Store = None, workspace: Workspace = None) -> None:
    """Re-charge the ledger from the audit log where it is behind (deleted, or restored from an older copy).

    Every charge the log shows and the ledger lacks is charged again; nothing is ever refunded. The action is
    recorded in the audit log.
    """
    from policies.errors import GatewayError

    bastion = _ledger_bastion(workspace, store)
    try:
        added = bastion.reconcile_ledger()
    except GatewayError as exc:
        fail(str(exc))
    finally:
        bastion.close()
    if not added:
        console.print("the ledger was not behind the audit log; nothing re-charged")
        return
    totals: dict[tuple[str, str], list[Any]] = {}
    for c in added:
        totals.setdefault((c.principal, c.dataset), []).append(c)
    table = DataTable("principal", "dataset", "charges", "ε re-charged", "δ re-charged", "ρ re-charged")
    for (principal, dataset), charges in sorted(totals.items()):
        eps = sum(c.cost.epsilon for c in charges)
        delta = sum(c.cost.delta for c in charges)
        rho = sum(c.cost.rho for c in charges)
        table.add_row(principal, dataset, str(len(charges)), f"{eps:.6g}", f"{delta:.3g}", f"{rho:.6g}")
    console.print(table)
    console.print(f"re-charged {len(added)} charge(s) from the audit log; the gateway can start")


@store_app.command("migrate")
def store_migrate(store: Store = None) -> None:
    """Create or upgrade the PostgreSQL store's schema (ledger, cache, tokens, job records). Safe to run again:
    versions already applied are skipped. Run it once before the first `bastion serve --store ...`, and after
    upgrading."""
    from gateway.stores.base import is_postgresql

    if not is_postgresql(store):
        fail(
            "give the PostgreSQL store to migrate: --store postgresql://user@host/db or BASTION_STORE (the "
            "default SQLite ledger and cache in the workspace need no migration)",
            2,
        )
    from gateway.stores.pg import describe, migrate
    from policies.errors import GatewayError

    assert store is not None
    try:
        before, after = migrate(store)
    except GatewayError as exc:
        fail(str(exc))
    if before == after:
        console.print(f"the store {describe(store)} is at schema version {after}; nothing to do", highlight=False)
    else:
        console.print(f"migrated the store {describe(store)} from schema version {before} to {after}", highlight=False)


# --- client commands --------------------------------------------------------------------------------------
# They render the gateway's JSON directly (no pandas): a plain query imports httpx and nothing heavier.


def _cell_flags(entry: Any, columns: list[str]) -> list[str]:
    """The flags of one row as `column: flag` texts. A row's entry may be null, one text, a list aligned with the
    columns (each null, a text or a list of texts) or a {column: flags} map."""
    if not entry:
        return []
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, dict):
        return [f"{k}: {fmt(v)}" for k, v in entry.items() if v]
    if isinstance(entry, list) and len(entry) == len(columns):
        return [f"{columns[j]}: {fmt(f)}" for j, f in enumerate(entry) if f]
    if isinstance(entry, list):
        return [fmt(f) for f in entry if f]
    return [fmt(entry)]


def print_answer(raw: dict[str, Any]) -> None:
    """A released answer as a table: each noisy column followed by its confidence interval, then the cells'
    flags (if the gateway sent any)."""
    columns = [str(c) for c in raw["columns"]]
    rows = raw.get("rows") or []
    intervals = raw.get("intervals") or [None] * len(rows)
    flags = raw.get("flags")
    row_flags = (
        [_cell_flags(f, columns) for f in flags] if isinstance(flags, list) and len(flags) == len(rows) else None
    )
    noisy = {j for iv in intervals if iv for j, cell in enumerate(iv) if cell is not None}
    alpha = raw.get("alpha")
    level = f"{1 - alpha:.0%} CI" if alpha else "interval"
    headers = []
    for j, c in enumerate(columns):
        headers += [c, f"{c} {level}"] if j in noisy else [c]
    show_flags = row_flags is not None and any(row_flags)
    table = DataTable(*headers, *(["flags"] if show_flags else []))
    for i, row in enumerate(rows):
        cells = []
        for j, value in enumerate(row):
            cells.append(fmt(value))
            if j in noisy:
                cell = intervals[i][j] if intervals[i] else None
                cells.append("" if cell is None else f"{fmt(cell[0])} … {fmt(cell[1])}")
        if show_flags and row_flags is not None:
            cells.append("; ".join(row_flags[i]))
        table.add_row(*cells)
    console.print(table)
    if isinstance(flags, dict) and flags:  # a shape this client does not know: show it rather than drop it
        console.print(f"flags: {fmt(flags)}", highlight=False)


def _print_notes(raw: dict[str, Any]) -> None:
    from rich.markup import escape

    for warning in raw.get("warnings") or []:
        console.print(f"[bold yellow]warning:[/] {escape(str(warning))}", highlight=False)
    for note in raw.get("notes") or []:
        console.print(f"[dim]note: {escape(str(note))}[/]", highlight=False)


def _cost(raw: dict[str, Any]) -> str:
    """A query's cost as its accounting states it: ε and δ, or ρ and δ under zCDP."""
    if raw.get("accounting") == "zcdp":
        return f"ρ={raw.get('rho') or 0.0:.4g}, δ={raw['delta']:.3g}"
    return f"ε={raw['epsilon']:.4g}, δ={raw['delta']:.3g}"


def print_dry_run(raw: dict[str, Any]) -> None:
    cached = " (an identical query was already answered: running it costs nothing)" if raw.get("cached") else ""
    accounting = raw.get("accounting", "pure")
    console.print(f"dry run: would cost {_cost(raw)} ({accounting} accounting){cached}", highlight=False)
    costs = raw.get("costs") or {}
    pure, zcdp = costs.get("pure") or {}, costs.get("zcdp") or {}
    if "epsilon" in pure:
        console.print(f"  under pure ε accounting: ε={pure['epsilon']:.4g}, δ={pure['delta']:.3g}", highlight=False)
    if "rho" in zcdp:
        worth = zcdp.get("epsilon_equivalent")
        equivalent = f" (worth ε={worth:.4g}, δ={zcdp['delta_equivalent']:.3g} on its own)" if worth is not None else ""
        console.print(
            f"  under zCDP accounting: ρ={zcdp['rho']:.4g}, δ={zcdp['delta']:.3g}{equivalent}", highlight=False
        )
    for name in ("pure", "zcdp"):
        if "error" in (costs.get(name) or {}):
            console.print(f"  under {name} accounting: {costs[name]['error']}", highlight=False)
    for col, acc in (raw.get("accuracy") or {}).items():
        console.print(
            f"  {col}: ±{acc:.4g} at {1 - raw['alpha']:.0%}"
            if acc is not None
            else f"  {col}: accuracy depends on the data (see measurements)",
            highlight=False,
        )
    if raw.get("measurements"):
        print_records(raw["measurements"], title="measurements (mechanism, and the ε or ρ each gets)")


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="one aggregate SELECT")],
    epsilon: Annotated[
        float | None, typer.Option(help="privacy loss to spend (this or --accuracy is required)")
    ] = None,
    accuracy: Annotated[
        float | None, typer.Option(help="target 95% half-width of the first COUNT/SUM column; Bastion derives ε")
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option(
            metavar="<column=half-width>",
            help="target half-width of one COUNT/SUM output column, repeatable (e.g. --target n=50 --target "
            "total=5000); each column gets the ε its target needs, the others the smallest of those",
        ),
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="1 - confidence level [default: 0.05]")] = None,
    delta: Annotated[float | None, typer.Option(help="δ for private key selection")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show cost and accuracy without spending")] = False,
    quantile_interval: Annotated[
        bool,
        typer.Option(
            "--quantile-interval/--no-quantile-interval",
            help="--no-quantile-interval: release each quantile's value only, spending its whole ε on one selection "
            "(more accurate), with no interval",
        ),
    ] = True,
    as_json: AsJson = False,
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Run a differentially private query and print the table with its confidence intervals."""
    targets: dict[str, float] = {}
    for given in target or []:
        column, _, half_width = given.partition("=")
        try:
            targets[column.strip()] = float(half_width)
        except ValueError:
            fail(f"--target takes <column=half-width>, e.g. --target n=50; got {given!r}", 2)
    if targets and accuracy is not None:
        fail("give --accuracy (the first COUNT/SUM column) or --target (named columns), not both", 2)
    wanted: float | dict[str, float] | None = targets or accuracy
    if epsilon is None and wanted is None:
        fail(
            "say what to spend: --epsilon E (privacy loss, e.g. --epsilon 0.5) or --accuracy A (a target 95% "
            "half-width of the first COUNT/SUM); add --dry-run to see the cost without spending",
            2,
        )
    with gateway_client(url, token) as c:
        raw = c.query_raw(
            sql,
            epsilon=epsilon,
            accuracy=wanted,
            alpha=alpha,
            delta=delta,
            dry_run=dry_run,
            quantile_interval=quantile_interval,
        ).raw
    if as_json:
        print_json(raw)
        return
    if raw.get("dry_run"):
        print_dry_run(raw)
    else:
        print_answer(raw)
    _print_notes(raw)
    b = raw["budget"]
    left = b["remaining"]
    if b.get("accounting") == "zcdp":
        spent = f"ρ={raw.get('rho_spent') or 0.0:.4g}"
        remaining = f"ρ={left['rho']:.4g}, δ={left['delta']:.3g}"
    else:
        spent, remaining = f"ε={raw['epsilon_spent']:.4g}", f"ε={left['epsilon']:.4g}, δ={left['delta']:.3g}"
    console.print(
        f"spent {spent}{' (cached)' if raw['cached'] else ''}; remaining on {b['dataset']}: {remaining}",
        highlight=False,
    )


@app.command()
def budget(as_json: AsJson = False, url: Url = "http://127.0.0.1:8000", token: Token = None) -> None:
    """Show your privacy spend and remaining budget per dataset."""
    with gateway_client(url, token) as c:
        rows = c.budget_raw()
    if as_json:
        print_json(rows)
        return
    zcdp = any(b.get("accounting") == "zcdp" for b in rows)
    rho_headers = ("ρ spent", "ρ limit", "ρ remaining") if zcdp else ()
    table = DataTable("dataset", "ε spent", "ε limit", "ε remaining", "δ spent", "δ limit", "δ remaining", *rho_headers)
    for b in rows:
        spent, limit, left = b["spent"], b["limit"], b["remaining"]
        rho_cells = [f"{x['rho']:.4g}" if "rho" in x else "" for x in (spent, limit, left)] if zcdp else []
        table.add_row(
            b["dataset"],
            f"{spent['epsilon']:.4g}",
            f"{limit['epsilon']:.4g}",
            f"{left['epsilon']:.4g}",
            f"{spent['delta']:.3g}",
            f"{limit['delta']:.3g}",
            f"{left['delta']:.3g}",
            *rho_cells,
        )
    console.print(table)
    if zcdp:
        console.print(
            "under zCDP accounting the cap is on ρ (the ε spent is what that ρ is worth at half the δ cap; the "
            "other half is what key selection may spend)",
            highlight=False,
        )


@app.command()
def datasets(as_json: AsJson = False, url: Url = "http://127.0.0.1:8000", token: Token = None) -> None:
    """List the datasets you may use, with their public schema."""
    with gateway_client(url, token) as c:
        found = c.datasets()
    if as_json:
        print_json(found)
        return
    table = DataTable("dataset", "version", "privacy unit", "rows per unit", "your grants", "budget per principal")
    for d in found:
        per = (d.get("budget") or {}).get("per_principal") or {}
        table.add_row(
            d["dataset"],
            fmt(d.get("version")),
            fmt(d.get("privacy_unit")),
            fmt(d.get("max_rows_per_unit")),
            fmt(d.get("grants")),
            fmt(per),
        )
    console.print(table)
    for d in found:
        cols = [{"column": name, **spec} for name, spec in (d.get("columns") or {}).items()]
        print_records(cols, title=f"{d['dataset']}: columns")
        for name, public in (d.get("public_tables") or {}).items():
            multiplicity = public.get("max_multiplicity") or {}
            rows = [
                {
                    "column": column,
                    **spec,
                    "join key": "unique" if column == public.get("unique_key") else multiplicity.get(column),
                }
                for column, spec in (public.get("columns") or {}).items()
            ]
            print_records(rows, title=f"{d['dataset']}: public table {name} (rows: bastion public-table)")
        for name, private in (d.get("private_tables") or {}).items():
            keys = private.get("foreign_keys") or {}
            rows = [
                {"column": column, **spec, "references": keys.get(column)}
                for column, spec in (private.get("columns") or {}).items()
            ]
            title = (
                f"{d['dataset']}.{name}: private table, unit {private.get('unit_column')}, at most "
                f"{private.get('max_rows_per_unit')} rows per unit (joined on the unit)"
            )
            print_records(rows, title=title)
    if not found:
        console.print("no dataset grants your role anything")


@app.command("public-table")
def public_table(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    table: Annotated[str, typer.Argument(help="one of its public tables (bastion datasets lists them)")],
    offset: Annotated[int, typer.Option(min=0, help="first row")] = 0,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="rows to show")] = 1_000,
    as_json: AsJson = False,
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Show rows of a dataset's public table (public data: audited, never charged)."""
    with gateway_client(url, token) as c:
        page = c.public_table(dataset, table, offset=offset, limit=limit)
    if as_json:
        print_json(page)
        return
    records = [dict(zip(page["columns"], row, strict=True)) for row in page["rows"]]
    title = f"{dataset}.{table}: rows {offset + 1}-{offset + len(records)} of {page['total']}"
    print_records(records, columns=page["columns"], title=title)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
