"""`bastion lf ...`: DP statistics of labeling functions and the registry of Python LFs (client commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.terminal import (
    AsJson,
    DataTable,
    Token,
    Url,
    console,
    err,
    fail,
    gateway_client,
    print_json,
    typer_app,
)

lf_app = typer_app(help="Labeling functions: DP coverage, overlap, conflict and accuracy.")


def read_lf_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """An LF file (YAML or JSON): a list of LFs, or {lfs: [...], python_lfs: [names]}."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if isinstance(raw, list):
        return raw, []
    if isinstance(raw, dict) and set(raw) <= {"lfs", "python_lfs"}:
        return list(raw.get("lfs") or []), list(raw.get("python_lfs") or [])
    raise ValueError(f"{path}: expected a list of labeling functions or a mapping with lfs and python_lfs")


def _cell(value: Any, interval: list[float] | None, *, count: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{int(value):,}" if count else f"{value:.3f}"
    if interval is None:
        return text
    lo, hi = interval
    return f"{text} [{lo:,.0f}, {hi:,.0f}]" if count else f"{text} [{lo:.3f}, {hi:.3f}]"


def print_summary(raw: dict[str, Any]) -> None:
    has_gold = any("correct" in lf for lf in raw["lfs"])
    headers = ["LF", "Polarity", "Coverage", "Overlaps", "Conflicts"]
    if has_gold:
        headers += ["Correct", "Incorrect", "Emp. Acc."]
    table = DataTable(*headers, title=f"{raw['dataset']}: {1 - raw['alpha']:.0%} intervals")
    for lf in raw["lfs"]:
        row = [lf["name"], ", ".join(lf["polarity"])]
        row += [_cell(lf[k]["value"], lf[k]["interval"]) for k in ("coverage", "overlaps", "conflicts")]
        if has_gold:
            row += [_cell(lf[k]["value"], lf[k]["interval"], count=True) for k in ("correct", "incorrect")]
            row.append(_cell(lf["emp_acc"]["value"], lf["emp_acc"]["interval"]))
        table.add_row(*row)
    console.print(table)
    ls = raw["label_set"]["coverage"]
    console.print(f"label-set coverage: {_cell(ls['value'], ls['interval'])}")
    lm = raw.get("label_model")
    if lm:
        balance = ", ".join(f"{c} {_cell(v['value'], v['interval'])}" for c, v in lm["class_balance"].items())
        console.print(f"label model: class balance {balance}")
        agreement = lm.get("gold_agreement")
        if agreement:
            console.print(f"label model: agreement with gold {_cell(agreement['value'], agreement['interval'])}")
        console.print(f"label model: probabilistic labels written privately to {lm['output']}")


@lf_app.command("stats")
def stats(
    lf_file: Annotated[Path, typer.Argument(help="YAML/JSON file: a list of LFs or {lfs: [...], python_lfs: [...]}")],
    dataset: Annotated[str, typer.Option(help="dataset name")],
    epsilon: Annotated[float | None, typer.Option(help="privacy loss to spend (required)")] = None,
    alpha: Annotated[float | None, typer.Option(help="1 - confidence level [default: 0.05]")] = None,
    python: Annotated[list[str] | None, typer.Option("--python", help="registered Python LF (repeatable)")] = None,
    label_model: Annotated[bool, typer.Option("--label-model", help="fit Snorkel's LabelModel privately")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show cost and half-widths without spending")] = False,
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
        typer.Option(help="a further private table joined on the privacy unit (priced at the product of the bounds)"),
    ] = None,
    as_json: AsJson = False,
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """DP coverage, overlap, conflict and (with a gold column) accuracy of the labeling functions in a file.

    A spinner on stderr shows that the gateway is still running them (Python LFs over many rows take a while)."""
    if epsilon is None:
        fail("say what to spend: --epsilon E (the privacy loss of the statistics, e.g. --epsilon 1)", 2)
    try:
        lfs, python_lfs = read_lf_file(lf_file)
    except ValueError as exc:
        fail(str(exc))
    # A spinner on stderr while the gateway runs the LFs (shown on a terminal only; nothing on a pipe).
    with gateway_client(url, token) as c, err.status("running the labeling functions on the gateway..."):
        raw = c.lf_stats_raw(
            dataset,
            lfs,
            python_lfs=python_lfs + list(python or []),
            epsilon=epsilon,
            alpha=alpha,
            label_model=label_model,
            dry_run=dry_run,
            table=table,
            join=join,
            join_on=join_on,
            join_private=join_private,
        )
    if as_json:
        print_json(raw)
        return
    if raw.get("dry_run"):
        console.print(f"dry run: would cost ε={raw['epsilon']:.4g}")
        for m in raw["measurements"]:
            console.print(
                f"  {m['measurement']}: ε={m['epsilon']:.4g}, sensitivity {m['sensitivity']}, "
                f"±{m['half_width']:,.0f} rows per count at {1 - raw['alpha']:.0%}"
            )
    else:
        print_summary(raw)
    b = raw["budget"]
    rho = f", ρ={raw['rho_spent']:.4g}" if raw.get("rho_spent") else ""
    rho_left = f", ρ={b['remaining']['rho']:.4g}" if b["remaining"].get("rho") is not None else ""
    console.print(
        f"spent ε={raw['epsilon_spent']:.4g}{rho}{' (cached)' if raw['cached'] else ''}; remaining on "
        f"{b['dataset']}: ε={b['remaining']['epsilon']:.4g}{rho_left}"
    )


@lf_app.command("registry")
def registry(url: Url = "http://127.0.0.1:8000", token: Token = None) -> None:
    """List the registered (reviewed) Python labeling functions and the columns each reads."""
    with gateway_client(url, token) as c:
        entries = c.lf_registry()
    table = DataTable("name", "dataset", "labels", "columns", "description")
    for e in entries:
        table.add_row(e["name"], e["dataset"], ", ".join(e["labels"]), ", ".join(e["columns"]), e["description"])
    console.print(table)


# --- LF sets that follow the data ------------------------------------------------------------------------------

sets_app = typer_app(help="LF sets that follow the data: recomputed at every new version, charged to you, up to a cap.")
lf_app.add_typer(sets_app, name="sets")


def follow_lf_sets(bastion: Any, dataset: str) -> list[str]:
    """After an append: recompute the LF sets that follow `dataset` at the versions they missed; one line each (a
    failure is a line too: the append is published either way, and the next gateway start or GET catches up)."""
    from gateway.lfsets import catch_up
    from policies.errors import GatewayError

    try:
        done = catch_up(bastion, dataset=dataset)
    except GatewayError as exc:
        return [f"LF sets not recomputed now ({exc.code}): a gateway catches them up at start or on GET"]
    return [
        f"LF set {d['id']} ({d['name']}): version {d['version']} {d['status']}"
        + (f", {len(d['changes'])} change(s) beyond noise" if d["changes"] else "")
        for d in done
    ]


def print_set(raw: dict[str, Any]) -> None:
    state = "following" if raw["following"] else f"stopped ({raw['stopped']})"
    console.print(
        f"[bold]{raw['name']}[/] ({raw['id']}) on {raw['dataset']}: {state}; ε={raw['epsilon']:g} per version, "
        f"spent {raw['epsilon_spent']:g} of the cap {raw['cap']:g}; false-alert rate ≤ {raw['alert_rate']:g} per "
        "comparison of two versions"
    )
    table = DataTable("version", "status", "ε spent", "changes beyond noise")
    for e in raw["history"]:
        changes = "; ".join(
            f"{c['lf']} {c['statistic']} {c['direction']} ({c['before']['value']:.3f} → {c['after']['value']:.3f})"
            for c in e.get("changes", [])
        )
        if e["status"] != "computed":
            changes = e.get("reason", "")
        elif "compared_with" not in e:
            changes = "(first version)"
        table.add_row(e["version"], e["status"], f"{e.get('epsilon_spent', 0.0):.4g}", changes or "none")
    console.print(table)


@sets_app.command("save")
def sets_save(
    lf_file: Annotated[Path, typer.Argument(help="YAML/JSON file: a list of LFs or {lfs: [...], python_lfs: [...]}")],
    dataset: Annotated[str, typer.Option(help="dataset name")],
    name: Annotated[str, typer.Option(help="your name for the set")],
    epsilon: Annotated[float, typer.Option(help="privacy loss of the statistics at each version")],
    cap: Annotated[float, typer.Option(help="the most ε the set may spend in total")],
    alert_rate: Annotated[
        float | None, typer.Option(help="false-alert rate per comparison of two versions [default: 0.05]")
    ] = None,
    python: Annotated[list[str] | None, typer.Option("--python", help="registered Python LF (repeatable)")] = None,
    as_json: AsJson = False,
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Save an LF set on a dataset: computed now at the latest version, then at every new version (charged to you,
    until the cap); each version reports the statistics that changed beyond noise."""
    try:
        lfs, python_lfs = read_lf_file(lf_file)
    except ValueError as exc:
        fail(str(exc))
    with gateway_client(url, token) as c, err.status("computing the set at the latest version..."):
        raw = c.lf_set_save(
            name,
            dataset,
            lfs,
            python_lfs=python_lfs + list(python or []),
            epsilon=epsilon,
            cap=cap,
            alert_rate=alert_rate,
        )
    if as_json:
        print_json(raw)
        return
    print_set(raw)


@sets_app.command("list")
def sets_list(as_json: AsJson = False, url: Url = "http://127.0.0.1:8000", token: Token = None) -> None:
    """Your LF sets."""
    with gateway_client(url, token) as c:
        rows = c.lf_sets()
    if as_json:
        print_json(rows)
        return
    table = DataTable("id", "name", "dataset", "following", "versions", "ε spent", "cap", "latest changes")
    for r in rows:
        following = "yes" if r["following"] else f"no ({r['stopped']})"
        table.add_row(
            r["id"],
            r["name"],
            r["dataset"],
            following,
            str(r["versions"]),
            f"{r['epsilon_spent']:.4g}",
            f"{r['cap']:g}",
            str(r["changes"]),
        )
    console.print(table)


@sets_app.command("show")
def sets_show(
    set_id: Annotated[str, typer.Argument(help="the set's id (bastion lf sets list)")],
    as_json: AsJson = False,
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """One of your LF sets: statistics per version and the changes beyond noise (missed versions computed first)."""
    with gateway_client(url, token) as c:
        raw = c.lf_set(set_id)
    if as_json:
        print_json(raw)
        return
    print_set(raw)


@sets_app.command("delete")
def sets_delete(
    set_id: Annotated[str, typer.Argument(help="the set's id (bastion lf sets list)")],
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Stop following: remove one of your LF sets (its accesses stay in the audit log)."""
    with gateway_client(url, token) as c:
        c.lf_set_delete(set_id)
    console.print(f"LF set {set_id} deleted")
