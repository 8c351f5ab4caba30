"""`bastion synth ...`: request a proxy and follow it with a progress bar (client), approve non-DP jobs (host)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.terminal import (
    AsJson,
    DataTable,
    SharedDir,
    Store,
    Token,
    Url,
    Workspace,
    console,
    err,
    fail,
    fmt,
    gateway_client,
    print_json,
    typer_app,
)

synth_app = typer_app(help="Synthetic proxy tables (DP by default).")

FINAL = ("done", "failed", "withheld")


def _follow(c: Any, job: dict[str, Any], poll: float) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(job["stage"] or job["status"], total=1.0, completed=job["progress"])
        while job["status"] not in FINAL:
            if job["status"] == "awaiting_approval":
                bar.update(task, description="awaiting admin approval (bastion synth approve on the host)")
            time.sleep(poll)
            job = c.synth_status(job["job_id"])
            bar.update(task, completed=job["progress"], description=job["stage"] or job["status"])
    return job


@synth_app.command("run")
def run(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    epsilon: Annotated[
        float | None, typer.Option(help="privacy loss to spend (required for the DP methods; none for the non-DP one)")
    ] = None,
    rows: Annotated[int, typer.Option(help="rows of the proxy")] = 10_000,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="dpcopula (default), dpcopula_direct, sdv_gaussian_copula (not DP: policy opt-in and admin approval)"
        ),
    ] = None,
    delta: Annotated[float | None, typer.Option(help="δ for key selection of columns without a domain")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write the proxy here (.parquet or .csv)")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="follow the job until it ends")] = True,
    poll: Annotated[float, typer.Option(help="seconds between status polls")] = 0.5,
    table: Annotated[
        str | None, typer.Option(help="a private table of the dataset (its private_tables) instead of its own table")
    ] = None,
    join: Annotated[
        str | None, typer.Option(help="a public table of the dataset joined on its unique key (with --join-on)")
    ] = None,
    join_on: Annotated[
        str | None, typer.Option(help="the column of the table matched with the public table's unique key")
    ] = None,
    join_private: Annotated[
        str | None,
        typer.Option(help="a further private table joined on the privacy unit (measured at the product of the bounds)"),
    ] = None,
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Request a synthetic proxy of DATASET (or of its private --table, with a public table joined by --join and
    --join-on: one proxy row per bounded row of that table), follow its progress and download it."""
    if epsilon is None and method != "sdv_gaussian_copula":
        fail("say what to spend: --epsilon E (the privacy loss of the proxy, e.g. --epsilon 1)", 2)
    with gateway_client(url, token) as c:
        job = c.synth_submit(
            dataset,
            epsilon=epsilon,
            rows=rows,
            seed=seed,
            method=method,
            delta=delta,
            table=table,
            join=join,
            join_on=join_on,
            join_private=join_private,
        )
        spent = "cached, nothing spent" if job["cached"] else f"spent ε={job['epsilon_spent']:.4g}"
        console.print(f"job [bold]{job['job_id']}[/] ({job['method']}, {spent})")
        if not wait:
            return
        job = _follow(c, job, poll)
        if job["status"] != "done":
            fail(f"job {job['status']}: {job.get('error') or ''}")
        target = out or Path(f"{dataset}-proxy-{job['job_id'][:8]}.parquet")
        fmt = "csv" if target.suffix.lower() == ".csv" else "parquet"
        target.write_bytes(c.synth_download(job["job_id"], format=fmt))
        report = c.synth_report(job["job_id"])
    scores = ", ".join(f"{k} {v:.3f}" for k, v in report.get("scores", {}).items())
    console.print(f"wrote {job['rows']:,} rows to {target}; fidelity: {scores}")
    for note in job.get("notes") or []:
        console.print(f"[dim]note: {note}[/]")


@synth_app.command("status")
def status(job_id: str, as_json: AsJson = False, url: Url = "http://127.0.0.1:8000", token: Token = None) -> None:
    """Show a job's status."""
    with gateway_client(url, token) as c:
        job = c.synth_status(job_id)
    if as_json:
        print_json(job)
        return
    table = DataTable("field", "value", show_header=False)
    for key, value in job.items():
        if isinstance(value, float) and key == "progress":
            table.add_row(key, f"{value:.0%}")
        else:
            table.add_row(key, fmt(value))
    console.print(table)


@synth_app.command("download")
def download(
    job_id: str,
    out: Annotated[Path, typer.Option("--out", "-o", help="file to write (.parquet or .csv)")],
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Download a finished proxy."""
    with gateway_client(url, token) as c:
        out.write_bytes(c.synth_download(job_id, format="csv" if out.suffix.lower() == ".csv" else "parquet"))
    console.print(f"wrote {out}")


def _save_report(c: Any, job_id: str, report: dict[str, Any], out: Path) -> Path:
    """Write the report's HTML pages (self-contained: inline SVG, relative links) and its JSON into `out`."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    names = [p for p in report.get("pages") or ["index.html"] if isinstance(p, str)]
    for name in names:
        # Page names come from the gateway: keep them plain file names inside `out`.
        if Path(name).name != name or not name.endswith(".html"):
            fail(f"the gateway listed a report page with an unexpected name: {name!r}")
        (out / name).write_text(c.synth_report_page(job_id, name), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return out / "index.html"


@synth_app.command("report")
def report(
    job_id: str,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="save the report's HTML pages here, for a browser offline")
    ] = None,
    open_: Annotated[bool, typer.Option("--open", help="open the saved report in a browser (with --out)")] = False,
    as_json: AsJson = False,
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Print a proxy's fidelity report (scores per column and per column pair); --out saves its pages."""
    if open_ and out is None:
        fail("--open opens the saved pages: give --out DIR too", 2)
    with gateway_client(url, token) as c:
        r = c.synth_report(job_id)
        index = _save_report(c, job_id, r, out) if out is not None else None
    if as_json:
        print_json(r)
        return
    console.print(f"reference: {r['reference']}")
    table = DataTable("column", "TVComplement", "bins inside the noise interval")
    for name, col in r["columns"].items():
        inside = col.get("proxy_within_interval")
        table.add_row(name, f"{col['tv_complement']:.3f}", "" if inside is None else f"{inside:.0%}")
    console.print(table)
    if r.get("pairs"):
        pairs = DataTable("pair", "DP ρ", "proxy ρ", "similarity")
        for p in r["pairs"]:
            pairs.add_row(
                " × ".join(p["columns"]),
                f"{p['dp_rho']:.3f}",
                f"{p['proxy_rho']:.3f}",
                f"{p['correlation_similarity']:.3f}",
            )
        console.print(pairs)
    if index is not None:
        console.print(f"report saved: {index.resolve().as_uri()}", highlight=False)
        if open_:
            import webbrowser

            if not webbrowser.open(index.resolve().as_uri()):
                fail(f"no browser to open; open {index} by hand")


# --- admin, on the gateway host ---------------------------------------------------------------------------


def _jobs(workspace: Path | None, store: str | None, shared_dir: Path | None) -> Any:
    """The gateway and its jobs as `serve` sees them: give the same --store and --shared-dir."""
    from gateway.service import Bastion
    from gateway.settings import Settings
    from gateway.synth_jobs import SynthJobs
    from policies.errors import GatewayError

    try:
        bastion = Bastion(Settings.load(workspace, store=store, shared_dir=shared_dir))
    except GatewayError as exc:
        fail(f"{exc.code}: {exc.message}")
    try:
        return bastion, SynthJobs(bastion)
    except GatewayError as exc:
        bastion.close()
        fail(f"{exc.code}: {exc.message}")


@synth_app.command("pending")
def pending(store: Store = None, shared_dir: SharedDir = None, workspace: Workspace = None) -> None:
    """List non-DP jobs awaiting approval (admin, on the host, or any replica's host with the same --store)."""
    bastion, jobs = _jobs(workspace, store, shared_dir)
    try:
        table = DataTable("job", "dataset", "method", "requested by", "rows", "created")
        for j in jobs.all_jobs():
            if j["status"] == "awaiting_approval":
                table.add_row(
                    j["job_id"], j["dataset"], j["method"], j["principal"]["principal"], str(j["rows"]), j["created"]
                )
        console.print(table)
    finally:
        jobs.close()
        bastion.close()


@synth_app.command("approve")
def approve(job_id: str, store: Store = None, shared_dir: SharedDir = None, workspace: Workspace = None) -> None:
    """Approve a non-DP proxy job (admin, on the host). The approval is audited as non-DP."""
    from policies.errors import GatewayError

    bastion, jobs = _jobs(workspace, store, shared_dir)
    try:
        job = jobs.approve(job_id)
    except GatewayError as exc:
        fail(f"{exc.code}: {exc.message}")
    finally:
        jobs.close()
        bastion.close()
    console.print(
        f"approved job {job['job_id']} ({job['method']}, NOT differentially private) on "
        f"{job['dataset']}; the gateway runs it when the requester next checks its status"
    )
