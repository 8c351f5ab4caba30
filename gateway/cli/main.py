"""The `bastion` command line. Admin actions (register, token, demo, serve) act on the workspace of the current
directory (./bastion-workspace, or --workspace / BASTION_WORKSPACE); client commands talk to a gateway over HTTP.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from audit.record import Event
from gateway.cli.audit import audit_app
from gateway.cli.lf import lf_app
from gateway.cli.synth import synth_app
from gateway.cli.terminal import Token, Url, Workspace, console, fail, gateway_client
from gateway.engines.kind import EngineKind
from gateway.settings import Settings
from policies.errors import GatewayError
from policies.schema import PolicyError

app = typer.Typer(
    help="Bastion: privacy-preserving data exploration gateway.", no_args_is_help=True, pretty_exceptions_enable=False
)
token_app = typer.Typer(help="Bearer tokens (admin, on the gateway host).", no_args_is_help=True)
ledger_app = typer.Typer(help="The privacy-budget ledger (admin, on the gateway host).", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(ledger_app, name="ledger")
app.add_typer(audit_app, name="audit")
app.add_typer(synth_app, name="synth")
app.add_typer(lf_app, name="lf")


def _admin(workspace: Path | None, **overrides: Any) -> Any:
    from gateway.service import Bastion

    settings = Settings.load(workspace, **overrides)
    return Bastion(settings, read_only=False)


EngineOption = Annotated[
    EngineKind | None,
    typer.Option("--engine", help="where the private rows live: duckdb (embedded) or spark; kept in the workspace"),
]


def _choose_engine(workspace: Path | None, engine: EngineKind | None) -> None:
    """Save the engine in the workspace's settings; a workspace keeps the engine its datasets were registered on."""
    if engine is None:
        return
    settings = Settings.load(workspace)
    if settings.settings_file.exists() and settings.engine is not engine and _has_datasets(settings):
        fail(
            f"this workspace keeps its datasets on {settings.engine.value}; "
            f"use another workspace (--workspace) for {engine.value}"
        )
    settings.engine = engine
    settings.save()


def _has_datasets(settings: Settings) -> bool:
    if settings.engine is EngineKind.SPARK:
        return (settings.warehouse / "catalog.json").exists()
    return settings.database.exists()


def _checked_app(settings: Settings) -> Any:
    """The app for `settings`, or a clean exit naming the problem if the ledger and the log disagree."""
    from gateway.http.app import create_app

    try:
        return create_app(settings)
    except GatewayError as exc:
        fail(str(exc))


# --- admin commands ---------------------------------------------------------------------------------------


@app.command()
def register(
    policy: Annotated[Path, typer.Argument(help="policy YAML file")],
    source: Annotated[Path | None, typer.Option(help="Parquet or CSV file [default: the policy's source]")] = None,
    engine: EngineOption = None,
    workspace: Workspace = None,
) -> None:
    """Register a dataset: load its source into the private engine and build the pre-bounded table."""
    from policies.schema import load_policy

    _choose_engine(workspace, engine)
    try:
        pol = load_policy(policy)
        src = source or (Path(pol.source) if pol.source else None)
        if src is None:
            fail("the policy has no 'source'; pass --source")
        if not src.is_absolute() and pol.source and source is None:
            src = policy.parent / src
        bastion = _admin(workspace)
        try:
            version = bastion.engine.register(pol, src)
            bastion.settings.policies_dir.mkdir(parents=True, exist_ok=True)
            (bastion.settings.policies_dir / f"{pol.dataset}.yaml").write_text(policy.read_text())
            bastion.audit(
                None,
                Event.DATASET_REGISTERED,
                dataset=pol.dataset,
                decision="allowed",
                reason="ok",
                request={"source": str(src), "version": version, "policy": pol.fingerprint()},
            )
        finally:
            bastion.close()
    except (PolicyError, GatewayError) as exc:
        fail(str(exc))
    console.print(f"registered [bold]{pol.dataset}[/] version {version}")


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option(help="analyst, lf_author, auditor or admin")],
    name: Annotated[str, typer.Option(help="principal name, e.g. alice")],
    workspace: Workspace = None,
) -> None:
    """Create a bearer token. It is printed once; only its hash is stored."""
    bastion = _admin(workspace)
    try:
        token, principal = bastion.tokens.create(name, role)
        bastion.audit(
            None,
            Event.TOKEN_CREATED,
            decision="allowed",
            reason="ok",
            request={"name": name, "role": role, "token_id": principal.token_id},
        )
    except GatewayError as exc:
        fail(str(exc))
    finally:
        bastion.close()
    typer.echo(token)


@token_app.command("list")
def token_list(workspace: Workspace = None) -> None:
    """List tokens (ids, names, roles; never secrets)."""
    from gateway.stores.tokens import TokenStore

    settings = Settings.load(workspace)
    table = Table("token id", "name", "role", "created")
    for t in TokenStore(settings.tokens).list():
        table.add_row(t["token_id"], t["name"], t["role"], t["created"])
    console.print(table)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="interface to listen on [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port [default: 8000]")] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="worker processes (they share the ledger, cache and audit log)")
    ] = 1,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="log every HTTP request")] = True,
    workspace: Workspace = None,
) -> None:
    """Run the gateway on the workspace."""
    import uvicorn

    settings = Settings.load(workspace, host=host, port=port)
    if not settings.database.exists():
        fail(f"no private database in {settings.workspace}: run 'bastion demo' or 'bastion register' first")
    if workers > 1:
        _checked_app(settings).state.bastion.close()  # fail here, once, rather than in every worker
        os.environ["BASTION_WORKSPACE"] = str(settings.workspace.resolve())
        uvicorn.run(
            "gateway.http.app:app_from_environment",
            factory=True,
            workers=workers,
            host=settings.host,
            port=settings.port,
            log_level="info",
            access_log=access_log,
        )
        return
    uvicorn.run(_checked_app(settings), host=settings.host, port=settings.port, log_level="info", access_log=access_log)


@app.command()
def demo(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    rows: Annotated[int, typer.Option(help="rows of the generated visits table")] = 500_000,
    serve_: Annotated[bool, typer.Option("--serve/--no-serve", help="start the gateway")] = True,
    engine: EngineOption = None,
    workspace: Workspace = None,
) -> None:
    """Create (or reuse) the demo workspace here: generated hospital visits, its policy, tokens; then serve."""
    from gateway.demo import write_demo, write_examples
    from policies.schema import load_policy

    _choose_engine(workspace, engine)
    settings = Settings.load(workspace, host=host, port=port)
    tokens_file = settings.workspace / "demo-tokens.json"
    if not _has_datasets(settings) or not tokens_file.exists():
        console.print(f"creating the demo workspace in {settings.workspace} ({rows:,} visits)...")
        settings.save()
        data, policy_path = write_demo(settings.private_dir / "source", n_rows=rows)
        os.chmod(settings.private_dir, 0o700)
        bastion = _admin(settings.workspace)
        try:
            version = bastion.engine.register(load_policy(policy_path), data)
            settings.policies_dir.mkdir(parents=True, exist_ok=True)
            (settings.policies_dir / "visits.yaml").write_text(policy_path.read_text())
            bastion.audit(
                None,
                Event.DATASET_REGISTERED,
                dataset="visits",
                decision="allowed",
                reason="ok",
                request={"source": str(data), "version": version},
            )
            made = {}
            for role, name in (("analyst", "alice"), ("lf_author", "lena"), ("auditor", "otto")):
                token, _ = bastion.tokens.create(name, role)
                made[role] = {"name": name, "token": token}
        finally:
            bastion.close()
        fd = os.open(tokens_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(made, f, indent=2)
    else:
        settings = Settings.load(settings.workspace, host=host, port=port)
        settings.save()
        console.print(f"reusing the demo workspace in {settings.workspace}")
    made = json.loads(tokens_file.read_text())
    url = f"http://{settings.host}:{settings.port}"
    console.print("\n[bold]Tokens[/] (also in " + str(tokens_file) + ", readable only by you):")
    for role, t in made.items():
        typer.echo(f"  {role:<10} {t['name']:<6} {t['token']}")
    analyst = made["analyst"]["token"]
    sql = "SELECT region, COUNT(*) AS visits, AVG(income) AS mean_income FROM visits WHERE age >= 65 GROUP BY region"
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
    typer.echo(f"  API docs: {url}/docs")
    lfs = write_examples(settings.workspace / "examples")
    console.print("\n[bold]As the labeling-function author[/]:", highlight=False)
    typer.echo(
        f"  BASTION_URL={url} BASTION_TOKEN={made['lf_author']['token']} "
        f"bastion lf stats {lfs} --dataset visits --epsilon 1"
    )
    console.print("\n[bold]As the auditor[/]:", highlight=False)
    typer.echo(f"  open {url}/audit and paste the auditor token; on this host: bastion audit verify")
    if serve_:
        import uvicorn

        served = _checked_app(settings)
        console.print(f"\nserving on {url} (Ctrl-C to stop)")
        uvicorn.run(served, host=settings.host, port=settings.port, log_level="warning")


# --- the ledger -------------------------------------------------------------------------------------------


def _ledger_bastion(workspace: Path | None) -> Any:
    from gateway.service import Bastion

    settings = Settings.load(workspace)
    if not settings.workspace.is_dir():
        fail(f"no workspace at {settings.workspace} (use --workspace or BASTION_WORKSPACE)")
    return Bastion(settings)


@ledger_app.command("check")
def ledger_check(workspace: Workspace = None) -> None:
    """Check the ledger against the audit log, as the gateway does at start-up (orphan charges get recorded)."""
    bastion = _ledger_bastion(workspace)
    try:
        bastion.check_consistency()
    except GatewayError as exc:
        fail(str(exc))
    finally:
        bastion.close()
    console.print("the ledger is not behind the audit log")


@ledger_app.command("reconcile")
def ledger_reconcile(workspace: Workspace = None) -> None:
    """Re-charge the ledger from the audit log where it is behind (deleted, or restored from an older copy).

    Every charge the log shows and the ledger lacks is charged again; nothing is ever refunded. The action is
    recorded in the audit log.
    """
    bastion = _ledger_bastion(workspace)
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
    table = Table("principal", "dataset", "charges", "ε re-charged", "δ re-charged")
    for (principal, dataset), charges in sorted(totals.items()):
        eps = sum(c.cost.epsilon for c in charges)
        delta = sum(c.cost.delta for c in charges)
        table.add_row(principal, dataset, str(len(charges)), f"{eps:.6g}", f"{delta:.3g}")
    console.print(table)
    console.print(f"re-charged {len(added)} charge(s) from the audit log; the gateway can start")


# --- client commands --------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    return f"{v:,.6g}" if isinstance(v, float) else str(v)


def _print_frame(frame: Any, alpha: float | None = None) -> None:
    """Print a result frame, folding `c_low`/`c_high` into one interval column per noisy column."""
    names = [str(c) for c in frame.columns]
    shown = [c for c in names if not (c.endswith(("_low", "_high")) and c.rsplit("_", 1)[0] in names)]
    level = f"{1 - alpha:.0%} CI" if alpha else "interval"
    headers = []
    for c in shown:
        headers.append(c)
        if f"{c}_low" in names:
            headers.append(f"{c} {level}")
    table = Table(*headers)
    for _, row in frame.iterrows():
        cells = []
        for c in shown:
            cells.append(_fmt(row[c]))
            if f"{c}_low" in names:
                lo, hi = row[f"{c}_low"], row[f"{c}_high"]
                cells.append("" if lo is None or lo != lo else f"{_fmt(lo)} … {_fmt(hi)}")
        table.add_row(*cells)
    console.print(table)


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="one aggregate SELECT")],
    epsilon: Annotated[float | None, typer.Option(help="privacy loss to spend")] = None,
    accuracy: Annotated[float | None, typer.Option(help="target 95% half-width of the first COUNT/SUM column")] = None,
    alpha: Annotated[float | None, typer.Option(help="1 - confidence level [default: 0.05]")] = None,
    delta: Annotated[float | None, typer.Option(help="δ for private key selection")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show cost and accuracy without spending")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON answer")] = False,
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Run a differentially private query and print the table with its confidence intervals."""
    from gateway.client import result_frame

    if epsilon is None and accuracy is None:
        epsilon = 1.0
    with gateway_client(url, token) as c:
        raw = c.query_raw(sql, epsilon=epsilon, accuracy=accuracy, alpha=alpha, delta=delta, dry_run=dry_run).raw
    if as_json:
        typer.echo(json.dumps(raw, indent=2))
        return
    if raw.get("dry_run"):
        console.print(f"dry run: would cost ε={raw['epsilon']:.4g}, δ={raw['delta']:.3g}")
        for col, acc in (raw.get("accuracy") or {}).items():
            console.print(
                f"  {col}: ±{acc:.4g} at {1 - raw['alpha']:.0%}"
                if acc is not None
                else f"  {col}: accuracy depends on the data (see measurements)"
            )
    else:
        _print_frame(result_frame(raw), raw.get("alpha"))
        for note in raw.get("notes", []):
            console.print(f"[dim]note: {note}[/]")
    b = raw["budget"]
    console.print(
        f"spent ε={raw['epsilon_spent']:.4g}{' (cached)' if raw['cached'] else ''}; "
        f"remaining on {b['dataset']}: ε={b['remaining']['epsilon']:.4g}, δ={b['remaining']['delta']:.3g}"
    )


@app.command()
def budget(url: Url = "http://127.0.0.1:8000", token: Token = None) -> None:
    """Show your privacy spend and remaining budget per dataset."""
    with gateway_client(url, token) as c:
        _print_frame(c.budget())


@app.command()
def datasets(url: Url = "http://127.0.0.1:8000", token: Token = None) -> None:
    """List the datasets you may use, with their public schema."""
    with gateway_client(url, token) as c:
        typer.echo(json.dumps(c.datasets(), indent=2))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
