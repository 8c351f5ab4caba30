"""`bastion access ...` (request and read: client; approve, deny, revoke, list: admin on the host) and
`bastion consent reload` (admin, on the host)."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from gateway.cli.terminal import (
    AsJson,
    DataTable,
    Token,
    Url,
    Workspace,
    console,
    fail,
    gateway_client,
    print_json,
    print_records,
    typer_app,
)

access_app = typer_app(
    help="Consented debug access to rows of named units: request and read (client); approve, deny, revoke and list "
    "(admin, on the gateway host). Not differentially private: every step is audited."
)
consent_app = typer_app(help="The units' consent to debug access (admin, on the gateway host).")

AsAdmin = Annotated[
    str | None,
    typer.Option(
        "--as", help="the approving admin's name, recorded in the audit log [default: the OS account running this]"
    ),
]


def _units(text: str) -> list[int | str]:
    units: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if part:
            units.append(int(part) if part.lstrip("-").isdigit() else part)
    if not units:
        fail("--units needs at least one unit, e.g. --units 123,456", 2)
    return units


def _print_request(raw: dict[str, Any]) -> None:
    console.print(
        f"access request [bold]{raw['id']}[/] on {raw['dataset']}: {raw['status']}"
        + (f", {raw['rows_left']} of {raw['max_rows']} rows left" if raw.get("max_rows") is not None else "")
        + (f", until {raw['expires_at']}" if raw.get("expires_at") else ""),
        highlight=False,
    )


@access_app.command("request")
def access_request(
    dataset: Annotated[str, typer.Option(help="registered dataset")],
    units: Annotated[str, typer.Option(help="comma-separated values of the privacy unit, e.g. 123,456")],
    purpose: Annotated[str, typer.Option(help='why, e.g. "ticket 8812: wrong triage"')],
    scope: Annotated[str | None, typer.Option(help="a consent scope of the dataset [default: its first]")] = None,
    as_json: AsJson = False,
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """File a request for the rows of named units with a purpose. It stays pending until an admin who is not you
    approves it on the gateway host; the answer never says which units have rows or consent."""
    with gateway_client(url, token) as c:
        raw = c.access_request(dataset, _units(units), purpose, scope=scope)
    if as_json:
        print_json(raw)
        return
    _print_request(raw)
    typer.echo(f"  an admin approves it on the gateway host: bastion access approve {raw['id']} --rows N --hours H")


@access_app.command("status")
def access_status(
    request_id: Annotated[str, typer.Argument(help="the request's id")],
    as_json: AsJson = False,
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Your access request's status, expiry and rows left."""
    with gateway_client(url, token) as c:
        raw = c.access_status(request_id)
    if as_json:
        print_json(raw)
        return
    _print_request(raw)


@access_app.command("rows")
def access_rows(
    request_id: Annotated[str, typer.Argument(help="the request's id")],
    as_json: AsJson = False,
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Read the rows of your approved request: those of its units whose consent holds now. Each read counts its
    rows against the approved cap and is audited."""
    with gateway_client(url, token) as c:
        raw = c.access_rows_raw(request_id)
    if as_json:
        print_json(raw)
        return
    table = DataTable(*raw["columns"], title=f"{raw['dataset']}: access request {raw['id']} ({raw['scope']})")
    for row in raw["rows"]:
        table.add_row(*["" if v is None else str(v) for v in row])
    console.print(table)
    console.print(f"{raw['rows_released']} rows released by this read; {raw['rows_left']} left", highlight=False)


def _host(workspace: Any) -> Any:
    from gateway.service import Bastion
    from gateway.settings import Settings
    from policies.errors import GatewayError

    try:
        return Bastion(Settings.load(workspace))
    except GatewayError as exc:
        fail(str(exc))


def _os_user() -> str:
    """The account the command runs as, from its user id (getpass.getuser() would believe $USER or $LOGNAME)."""
    import getpass
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a user id without an account (a container): its environment is all there is
        return getpass.getuser()


def _approver(name: str | None) -> str:
    who = name if name is not None else _os_user()
    if not who.strip():
        fail("--as needs a name", 2)
    return who.strip()


def _decision(action: str, request_id: str, workspace: Any, **kwargs: Any) -> Any:
    from gateway import access
    from policies.errors import GatewayError

    bastion = _host(workspace)
    try:
        return getattr(access, action)(bastion, request_id, **kwargs)
    except GatewayError as exc:
        fail(str(exc))
    finally:
        bastion.close()


@access_app.command("approve")
def access_approve(
    request_id: Annotated[str, typer.Argument(help="the request's id (bastion access list shows them)")],
    rows: Annotated[int, typer.Option(help="the most rows all reads together may release")],
    hours: Annotated[float, typer.Option(help="how long the grant lasts")],
    as_: AsAdmin = None,
    workspace: Workspace = None,
) -> None:
    """Approve a pending request for at most --rows rows over --hours hours (admin, on the host). The approver
    (--as, or the OS account) must not be the requester. Audited (access_approved)."""
    req = _decision("approve", request_id, workspace, rows=rows, hours=hours, approver=_approver(as_))
    console.print(
        f"approved {req.id} of {req.requester} on {req.dataset}: at most {req.max_rows} rows until {req.expires_at}",
        highlight=False,
    )


@access_app.command("deny")
def access_deny(
    request_id: Annotated[str, typer.Argument(help="the request's id")],
    as_: AsAdmin = None,
    workspace: Workspace = None,
) -> None:
    """Deny a pending request (admin, on the host). Audited (access_denied)."""
    req = _decision("deny", request_id, workspace, approver=_approver(as_))
    console.print(f"denied {req.id} of {req.requester} on {req.dataset}", highlight=False)


@access_app.command("revoke")
def access_revoke(
    request_id: Annotated[str, typer.Argument(help="the request's id")],
    as_: AsAdmin = None,
    workspace: Workspace = None,
) -> None:
    """End a pending or approved request at once (admin, on the host). Audited (access_revoked)."""
    req = _decision("revoke", request_id, workspace, approver=_approver(as_))
    console.print(f"revoked {req.id} of {req.requester} on {req.dataset}", highlight=False)


@access_app.command("list")
def access_list(
    dataset: Annotated[str | None, typer.Option(help="only this dataset's requests")] = None,
    as_json: AsJson = False,
    workspace: Workspace = None,
) -> None:
    """Every access request, oldest first, with its units, purpose, status and rows released (admin, on the host)."""
    from dataclasses import asdict

    from gateway.access import listing

    bastion = _host(workspace)
    try:
        records = [asdict(r) for r in listing(bastion, dataset)]
    finally:
        bastion.close()
    if as_json:
        print_json(records)
        return
    if not records:
        console.print("no access requests")
        return
    for r in records:
        r["units"] = ",".join(r["units"])
    print_records(
        records,
        [
            "id",
            "dataset",
            "requester",
            "units",
            "scope",
            "purpose",
            "status",
            "approver",
            "max_rows",
            "rows_released",
            "expires_at",
        ],
    )


@consent_app.command("reload")
def consent_reload(
    dataset: Annotated[str, typer.Argument(help="registered dataset")],
    workspace: Workspace = None,
) -> None:
    """Re-read the dataset's consent source (the file it was last loaded from) and put it in place: a consent
    removed from the file, or whose expiry has passed, ends access to that unit's rows at the next read. Safe while
    the gateway serves. Audited (consent_loaded)."""
    from gateway.access import consent_source, load_consent
    from policies.errors import GatewayError

    bastion = _host(workspace)
    try:
        policy, _ = bastion.engine.policy(dataset)
        if policy.consent is None:
            fail(f"dataset {dataset!r} declares no consent in its policy")
        source = consent_source(bastion, dataset)
        if source is None:
            fail(f"dataset {dataset!r} has no consent loaded: register it again (bastion register)")
        kept = load_consent(bastion, policy, source=source)
    except GatewayError as exc:
        fail(str(exc))
    finally:
        bastion.close()
    console.print(f"reloaded the consent of {dataset} from {source}: {kept:,} consent rows", highlight=False)
