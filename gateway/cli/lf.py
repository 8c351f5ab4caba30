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
