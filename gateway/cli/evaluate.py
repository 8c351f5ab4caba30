"""`bastion evaluate`, `bastion evaluation-card` and `bastion models`: DP evaluation of attached model predictions
(client commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from gateway.cli.terminal import AsJson, DataTable, Token, Url, console, fail, gateway_client, print_json


def _interval(m: dict[str, Any]) -> str:
    value = "–" if m["estimate"] is None else f"{m['estimate']:.3f}"
    flag = " (noise-dominated)" if m["noise_dominated"] else ""
    return f"{value} [{m['low']:.3f}, {m['high']:.3f}]{flag}"


def print_evaluation(raw: dict[str, Any]) -> None:
    title = f"{raw['dataset']} (version {raw['dataset_version']}): {1 - raw['alpha']:.0%} intervals"
    table = DataTable("model", "slice", "value", "metric", "class", "estimate [low, high]", title=title)
    for m in raw.get("metrics") or []:
        cells = [m["model"], m["slice"], str(m["value"]), m["metric"], m["class"] or "", _interval(m)]
        table.add_row(*cells)  # DataTable: shown as text (a slice or a value may look like rich markup)
    console.print(table)


def print_evaluation_dry_run(raw: dict[str, Any]) -> None:
    console.print(
        f"would spend ε={raw['epsilon']:.4g} on {raw['cells']:,} counts (sensitivity {raw['sensitivity']}); each "
        f"count within ±{raw['count_half_width']:.4g} at {1 - raw['alpha']:.0%}",
        highlight=False,
    )


def evaluate(
    dataset: Annotated[str, typer.Argument(help="dataset the predictions are attached to")],
    model: Annotated[list[str], typer.Option(help="model name; repeat to compare several in one release")],
    slice_: Annotated[
        list[str] | None,
        typer.Option(
            "--slice",
            help="a column or row expression with public values (e.g. sex, or \"CASE WHEN age >= 65 THEN 'senior' "
            "ELSE 'adult' END\"); repeatable [default: all rows]",
        ),
    ] = None,
    metric: Annotated[
        list[str] | None, typer.Option(help="accuracy, precision, recall or f1; repeatable [default: all four]")
    ] = None,
    per_class: Annotated[
        bool, typer.Option("--per-class/--macro-only", help="precision, recall and F1 per class as well as macro")
    ] = True,
    epsilon: Annotated[float | None, typer.Option(help="privacy loss of the release")] = None,
    accuracy: Annotated[
        float | None, typer.Option(help="instead of --epsilon: the half-width of each count's interval")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="1 - confidence level [default: 0.05]")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show cost and accuracy without spending")] = False,
    as_json: AsJson = False,
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Evaluate models' attached predictions against the gold labels, per slice: DP confusion matrices and
    accuracy, precision, recall and F1 with intervals."""
    if (epsilon is None) == (accuracy is None):
        fail("say what to spend: --epsilon E or --accuracy A (a count's half-width), not both", 2)
    with gateway_client(url, token) as c:
        raw = c.evaluate_raw(
            dataset,
            model if len(model) > 1 else model[0],
            slices=slice_,
            metrics=metric,
            per_class=per_class,
            epsilon=epsilon,
            accuracy=accuracy,
            alpha=alpha,
            dry_run=dry_run,
        )
    if as_json:
        print_json(raw)
        return
    if raw.get("dry_run"):
        print_evaluation_dry_run(raw)
        return
    print_evaluation(raw)
    left = raw["budget"]["remaining"]
    console.print(
        f"spent ε={raw['epsilon_spent']:.4g}{' (cached)' if raw['cached'] else ''}; remaining on {raw['dataset']}: "
        f"ε={left['epsilon']:.4g}",
        highlight=False,
        markup=False,
    )
    console.print(
        f"model card: bastion evaluation-card {raw['evaluation_id']} (--format markdown, --out FILE)",
        highlight=False,
        markup=False,
    )


def evaluation_card(
    evaluation_id: Annotated[str, typer.Argument(help="the evaluation_id of an evaluation's answer")],
    format: Annotated[
        Literal["html", "markdown"], typer.Option("--format", help="html (a page, plot as inline SVG) or markdown")
    ] = "html",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="write the card to this file [default: standard output]")
    ] = None,
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """The DP model card of one of your evaluations (GET /v1/evaluate/{id}/card): metrics with intervals by slice,
    the privacy cost and what it means, caveats. Post-processing of the stored release: costs nothing."""
    with gateway_client(url, token) as c:
        text = c.evaluation_card(evaluation_id, format)
    if out is None:
        typer.echo(text, nl=not text.endswith("\n"))
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")
    console.print(f"wrote the model card ({format}) to {out}", highlight=False, markup=False)


def models(as_json: AsJson = False, url: Url = "http://127.0.0.1:8000", token: Token = None) -> None:
    """The models whose predictions are attached, per dataset you may evaluate on."""
    with gateway_client(url, token) as c:
        raw = c.models()
    if as_json:
        print_json(raw)
        return
    table = DataTable("dataset", "model", "attached to version", "current", "attached at")
    for d in raw:
        for m in d["models"]:
            table.add_row(
                d["dataset"], m["model"], m["dataset_version"], "yes" if m["current"] else "no", m["attached_at"]
            )
    console.print(table)
