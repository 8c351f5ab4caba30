"""`bastion predictions ...`: attach model predictions to a dataset and list them (admin, on the gateway host)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.terminal import AsJson, Workspace, console, fail, print_json, print_records, typer_app

REMINDER = (
    "Reminder: an evaluation's DP guarantee holds given these predictions. If the model was fitted on this "
    "dataset's rows, its predictions carry whatever the fit leaked: that training is a separate access to the "
    "private rows that must itself be DP and accounted for (train on a synthetic proxy, or with DP training)."
)

predictions_app = typer_app(help="Model predictions attached to datasets, for DP evaluation (admin, on the host).")


@predictions_app.command("add")
def predictions_add(
    dataset: Annotated[str, typer.Argument(help="registered dataset the predictions belong to")],
    file: Annotated[Path, typer.Argument(help="Parquet or CSV: the row key column, label and optionally score")],
    model: Annotated[str, typer.Option(help="model name, e.g. triage-v3")],
    replace: Annotated[bool, typer.Option("--replace", help="replace the model's predictions if it has some")] = False,
    workspace: Workspace = None,
) -> None:
    """Attach a model's predictions to the dataset's current version: one row per dataset row, keyed by the policy's
    row_key, with a predicted label among its labels.classes and an optional score in [0, 1]. Validated, stored in
    the workspace (a file written whole and renamed into place) and audited (predictions_added). Safe while the
    gateway serves; DuckDB workspaces only. An evaluation's guarantee holds given the predictions: a model fitted on
    the dataset's rows must itself have been trained with DP (or on a synthetic proxy), accounted for separately."""
    from gateway.predictions import attach
    from gateway.service import Bastion
    from gateway.settings import Settings
    from policies.errors import GatewayError

    try:
        bastion = Bastion(Settings.load(workspace))
    except GatewayError as exc:
        fail(str(exc))
    try:
        meta = attach(bastion, dataset, model, file, replace=replace)
    except GatewayError as exc:
        fail(str(exc))
    finally:
        bastion.close()
    console.print(
        f"attached [bold]{meta.model}[/] to {meta.dataset} version {meta.dataset_version}: "
        f"{meta.rows:,} predictions (sha256 {meta.digest[:16]}…)"
    )
    console.print(REMINDER, highlight=False, markup=False)


@predictions_app.command("list")
def predictions_list(
    dataset: Annotated[str | None, typer.Option(help="only this dataset's models")] = None,
    as_json: AsJson = False,
    workspace: Workspace = None,
) -> None:
    """The attached predictions: dataset, model, the dataset version they were attached to, rows and digest."""
    from dataclasses import asdict

    from gateway.predictions import PredictionsStore
    from gateway.settings import Settings

    settings = Settings.load(workspace)
    records = [asdict(a) for a in PredictionsStore(settings.predictions_dir).attachments(dataset)]
    if as_json:
        print_json(records)
        return
    if not records:
        console.print("no predictions attached")
        return
    print_records(records, ["dataset", "model", "dataset_version", "rows", "added_at", "attachment", "digest"])
